"""rlhf/data/: every format and file type to the normalised schema, validation reasons, the three-way split."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from rlhf.config import Params, SourceConfig, TaskConfig
from rlhf.data.prepare import load_sources, prepare_data
from rlhf.data.sources import load_source
from rlhf.data.split import SPLITS, read_split, split_phases, write_splits
from rlhf.data.task import generate_rows
from rlhf.data.validate import REASONS, validate_rows
from rlhf.errors import UserError

TASK = TaskConfig(num_rows=50)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


def public(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def norm(
    prompt: list[dict], completion=None, chosen=None, rejected=None, source: str = "", conversational: bool = False
) -> dict:
    row = {"prompt": prompt, "completion": completion, "chosen": chosen, "rejected": rejected, "source": source}
    return {**row, "conversational": True} if conversational else row


def write(rows: list[dict], tmp_path: Path, kind: str, name: str = "d") -> Path:
    """Write rows the way a user would hand them over: a data file, or a save_to_disk folder."""
    import datasets
    import pyarrow as pa

    ds = datasets.Dataset.from_list(rows)
    if kind == "jsonl":
        path = tmp_path / f"{name}.jsonl"
        ds.to_json(path)
    elif kind == "json":  # one JSON array, not lines
        path = tmp_path / f"{name}.json"
        ds.to_json(path, lines=False)
    elif kind == "parquet":
        path = tmp_path / f"{name}.parquet"
        ds.to_parquet(path)
    elif kind == "csv":
        path = tmp_path / f"{name}.csv"
        ds.to_csv(path, index=False)
    elif kind == "arrow":  # an Arrow IPC file written by pyarrow itself
        path = tmp_path / f"{name}.arrow"
        table = ds.data.table
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    elif kind == "disk":
        path = tmp_path / name
        ds.save_to_disk(str(path))
    elif kind == "disk_dict":  # the wanted rows in "test", decoys in "train"
        path = tmp_path / name
        decoy = datasets.Dataset.from_list([dict(rows[0]) for _ in range(3)])
        datasets.DatasetDict({"train": decoy, "test": ds}).save_to_disk(str(path))
    else:
        raise ValueError(kind)
    return path


# ------------------------------------------------------------------------------------------------- formats

RM_PROMPT = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke\n\nAssistant:"
HH_PREFIX = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke"
HH_PROMPT = [user("Hi there"), assistant("Hello! How can I help?"), user("Tell me a joke")]

FORMATS = {
    "prompt_completion": (
        [{"prompt": "2+2?", "completion": "4"}, {"prompt": "3+3?", "completion": "6"}],
        [norm([user("2+2?")], completion="4"), norm([user("3+3?")], completion="6")],
    ),
    "prompt_completion_conversational": (
        [
            {"prompt": [system("Be brief."), user("2+2?")], "completion": [assistant("4")]},
            {"prompt": [user("3+3?")], "completion": [assistant("6")]},
        ],
        [
            norm([system("Be brief."), user("2+2?")], completion="4", conversational=True),
            norm([user("3+3?")], completion="6", conversational=True),
        ],
    ),
    "preference": (
        [{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."}],
        [norm([user("Capital of France?")], chosen="Paris.", rejected="Rome.")],
    ),
    "preference_conversational": (
        [{"prompt": [user("Capital?")], "chosen": [assistant("Paris.")], "rejected": [assistant("Rome.")]}],
        [norm([user("Capital?")], chosen="Paris.", rejected="Rome.", conversational=True)],
    ),
    "preference_implicit": (
        [
            {
                "chosen": [user("Hi"), assistant("Hey"), user("Capital?"), assistant("Paris.")],
                "rejected": [user("Hi"), assistant("Hey"), user("Capital?"), assistant("Rome.")],
            }
        ],
        [norm([user("Hi"), assistant("Hey"), user("Capital?")], chosen="Paris.", rejected="Rome.", conversational=True)],
    ),
    "messages": (
        [{"messages": [system("S"), user("hi"), assistant("hello"), user("how are you"), assistant("fine")]}],
        [norm([system("S"), user("hi"), assistant("hello"), user("how are you")], completion="fine", conversational=True)],
    ),
    "prompt": (
        [{"prompt": "Write a haiku."}, {"prompt": "Name a colour."}],
        [norm([user("Write a haiku.")]), norm([user("Name a colour.")])],
    ),
    "rm_static": (
        [
            {
                "prompt": RM_PROMPT,
                "response": " Why did the chicken cross the road?",
                "chosen": " Why did the chicken cross the road?",
                "rejected": " No.",
            }
        ],
        [norm(HH_PROMPT, chosen="Why did the chicken cross the road?", rejected="No.")],
    ),
    "hh_rlhf": (
        [
            {
                "chosen": HH_PREFIX + "\n\nAssistant: Knock knock: who's there?",
                "rejected": HH_PREFIX + "\n\nAssistant: No.",
            }
        ],
        [norm(HH_PROMPT, chosen="Knock knock: who's there?", rejected="No.")],
    ),
}


@pytest.mark.parametrize("case", list(FORMATS))
def test_each_format_normalises_with_auto_and_explicit_format(tmp_path: Path, case: str) -> None:
    raw, expected = FORMATS[case]
    path = write(raw, tmp_path, "jsonl")
    fmt = case.split("_conversational")[0].split("_implicit")[0]
    expected = [{**row, "source": str(path)} for row in expected]
    for chosen_format in ("auto", fmt):
        rows = load_source(SourceConfig(path=str(path), format=chosen_format), TASK, seed=0)
        assert public(rows) == expected, chosen_format
        assert all("_invalid" not in r for r in rows)


def test_rm_static_detected_from_transcript_without_response_column(tmp_path: Path) -> None:
    path = write([{"prompt": RM_PROMPT, "chosen": " Yes.", "rejected": " No."}], tmp_path, "jsonl")
    rows = load_source(SourceConfig(path=str(path)), TASK, seed=0)
    assert public(rows) == [norm(HH_PROMPT, chosen="Yes.", rejected="No.", source=str(path))]


@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet", "arrow", "csv", "disk", "disk_dict"])
def test_each_file_type_loads(tmp_path: Path, kind: str) -> None:
    raw = [
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."},
        {"prompt": "Capital of Italy?", "chosen": "Rome.", "rejected": "Paris."},
    ]
    path = write(raw, tmp_path, kind)
    src = SourceConfig(path=str(path), split="test" if kind == "disk_dict" else "train")
    rows = load_source(src, TASK, seed=0)
    assert public(rows) == [
        norm([user(r["prompt"])], chosen=r["chosen"], rejected=r["rejected"], source=str(path)) for r in raw
    ]


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv"])
def test_a_file_that_starts_with_a_utf8_byte_order_mark_reads_as_without_it(tmp_path: Path, kind: str) -> None:
    # What Notepad and Excel on Windows write: the bytes EF BB BF before the first row. It used to be refused
    # ("Unexpected UTF-8 BOM"); every other reader (utf-8-sig) takes it.
    raw = [{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."}]
    path = write(raw, tmp_path, kind)
    plain = load_source(SourceConfig(path=str(path)), TASK, seed=0)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert public(load_source(SourceConfig(path=str(path)), TASK, seed=0)) == public(plain)


def test_conversational_rows_survive_parquet(tmp_path: Path) -> None:
    raw, expected = FORMATS["messages"]
    path = write(raw, tmp_path, "parquet")
    assert public(load_source(SourceConfig(path=str(path)), TASK, 0)) == [{**expected[0], "source": str(path)}]


def test_dataset_dict_missing_split_names_the_available_ones(tmp_path: Path) -> None:
    path = write(FORMATS["prompt"][0], tmp_path, "disk_dict")
    with pytest.raises(UserError, match=r"no split 'validation'.*\['test', 'train'\]"):
        load_source(SourceConfig(path=str(path), split="validation"), TASK, 0)


def test_builtin_source_loads_num_rows_of_all_four_fields() -> None:
    task = TaskConfig(num_rows=37)
    rows = load_source(SourceConfig(path="builtin"), task, seed=3)
    assert len(rows) == 37
    first = next(generate_rows(37, 3, **task.model_dump(exclude={"num_rows"})))
    assert public(rows)[0] == {
        "prompt": [user(first["prompt"])],
        "completion": first["completion"],
        "chosen": first["chosen"],
        "rejected": first["rejected"],
        "source": "builtin",
    }
    assert all(isinstance(r[k], str) for r in rows for k in ("completion", "chosen", "rejected"))


# ------------------------------------------------------------------------------------------------ bad paths


def test_hub_id_offline_fails_fast_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        load_source(SourceConfig(path="Dahoas/rm-static"), TASK, 0)
    assert time.monotonic() - start < 20
    msg = str(err.value)
    assert "\n" not in msg
    assert "'Dahoas/rm-static'" in msg and "Hugging Face hub" in msg and "save_to_disk" in msg


@pytest.mark.parametrize("path", ["nope.jsonl", "data/missing.jsonl", "./missing_dir"])
def test_missing_path_is_a_user_error(path: str) -> None:
    with pytest.raises(UserError, match="not found"):
        load_source(SourceConfig(path=path), TASK, 0)


def test_corrupt_and_unsupported_files_name_the_file(tmp_path: Path) -> None:
    corrupt = tmp_path / "broken.parquet"
    corrupt.write_bytes(b"this is not parquet at all")
    with pytest.raises(UserError, match="broken.parquet") as err:
        load_source(SourceConfig(path=str(corrupt)), TASK, 0)
    assert "\n" not in str(err.value)
    text = tmp_path / "rows.txt"
    text.write_text("hello")
    with pytest.raises(UserError, match="unsupported file type '.txt'"):
        load_source(SourceConfig(path=str(text)), TASK, 0)
    folder = tmp_path / "not_a_dataset"
    folder.mkdir()
    with pytest.raises(UserError, match="save_to_disk"):
        load_source(SourceConfig(path=str(folder)), TASK, 0)


def test_columns_matching_no_format_is_a_user_error(tmp_path: Path) -> None:
    path = write([{"question": "q", "answer": "a"}], tmp_path, "jsonl")
    with pytest.raises(UserError, match=r"match no known format"):
        load_source(SourceConfig(path=str(path)), TASK, 0)


# ------------------------------------------------------------------------------------------------ validation


def good(i: int, source: str = "s") -> dict:
    return norm([user(f"question {i}")], chosen=f"good {i}", rejected=f"bad {i}", source=source)


def chars(row: dict) -> tuple[int, int]:
    """A stand-in tokenizer: one token per character."""
    prompt = sum(len(m["content"]) for m in row["prompt"])
    answers = [len(row[k]) for k in ("completion", "chosen", "rejected") if row.get(k) is not None]
    return prompt, prompt + max(answers, default=0)


def bad_rows() -> dict[str, list[dict]]:
    """reason -> rows that each have exactly that one defect."""
    return {
        "missing_column": [
            {"chosen": "a", "rejected": "b", "source": "s"},  # no prompt
            {"prompt": [user("q")], "chosen": "a", "source": "s"},  # a pair without its rejected key
        ],
        "wrong_type": [{**good(100), "chosen": 5}, {**good(101), "prompt": "plain string"}],
        "empty_text": [
            {**good(102), "chosen": "   "},
            {**good(103), "prompt": [user("")]},
            {**good(104), "rejected": None},
            {**good(105), "prompt": []},
        ],
        "bad_role_order": [
            {**good(106), "prompt": [assistant("hi"), user("q")]},
            {**good(107), "prompt": [user("a"), user("b")]},
            {**good(108), "prompt": [system("s"), user("q"), assistant("a")]},
        ],
        "mismatched_prompt": [{**norm([]), "source": "s", "_invalid": "mismatched_prompt", "_row": 7}],
        "chosen_equals_rejected": [{**good(109), "chosen": "same", "rejected": " same "}],
        "prompt_too_long": [{**good(110), "prompt": [user("q" * 50)]}],
        "sequence_too_long": [{**good(111), "chosen": "c" * 80}],
        "duplicate_row": [good(0), good(1)],  # exact copies; the same prompt with other answers is kept
    }


def test_drop_mode_counts_each_reason_exactly() -> None:
    bad = bad_rows()
    rows = [good(i) for i in range(5)] + [r for group in bad.values() for r in group]
    kept, counts = validate_rows(rows, "drop", length_fn=chars, max_prompt_tokens=40, max_seq_tokens=60)
    assert kept == [good(i) for i in range(5)]
    assert set(counts) == set(REASONS)
    assert counts == {reason: len(bad[reason]) for reason in REASONS}


def test_length_checks_skipped_without_length_fn() -> None:
    bad = bad_rows()
    rows = bad["prompt_too_long"] + bad["sequence_too_long"]
    kept, counts = validate_rows(rows, "drop", None, max_prompt_tokens=1, max_seq_tokens=2)
    assert len(kept) == 2 and sum(counts.values()) == 0


@pytest.mark.parametrize("reason", REASONS)
def test_error_mode_names_source_row_and_reason(reason: str) -> None:
    bad = bad_rows()[reason][-1]
    with pytest.raises(UserError) as err:
        validate_rows([good(0), good(1), bad], "error", chars, max_prompt_tokens=40, max_seq_tokens=60)
    msg = str(err.value)
    assert "\n" not in msg
    assert reason in msg and "data.invalid_rows: drop" in msg and "data source 's'" in msg
    assert "row 7" in msg if reason == "mismatched_prompt" else "row 2" in msg


def test_unreadable_rows_are_marked_not_raised(tmp_path: Path) -> None:
    raw = [
        {"prompt": "ok", "chosen": "a", "rejected": "b"},
        {"prompt": "no chosen", "chosen": None, "rejected": "b"},
        {"prompt": None, "chosen": "a", "rejected": "b"},
    ]
    path = write(raw, tmp_path, "jsonl")
    rows = load_source(SourceConfig(path=str(path)), TASK, 0)
    kept, counts = validate_rows(rows, "drop")
    assert public(kept) == [norm([user("ok")], chosen="a", rejected="b", source=str(path))]
    assert counts["empty_text"] == 2
    # A format whose columns the file lacks marks every row.
    rows = load_source(SourceConfig(path=str(path), format="prompt_completion"), TASK, 0)
    kept, counts = validate_rows(rows, "drop")
    assert kept == [] and counts["missing_column"] == 3
    with pytest.raises(UserError, match=r"row 0: missing_column .*'completion'"):
        validate_rows(rows, "error")


def test_transcripts_with_different_prefixes_are_mismatched(tmp_path: Path) -> None:
    raw = [
        {"chosen": HH_PREFIX + "\n\nAssistant: Yes.", "rejected": "\n\nHuman: Other\n\nAssistant: No."},
        {"chosen": "\n\nHuman: no answer here", "rejected": "\n\nHuman: nor here"},
    ]
    rows = load_source(SourceConfig(path=str(write(raw, tmp_path, "jsonl"))), TASK, 0)
    _, counts = validate_rows(rows, "drop")
    assert counts["mismatched_prompt"] == 1 and counts["bad_role_order"] == 1


# ------------------------------------------------------------------------------------------------ splitting


def prompts(rows: list[dict]) -> set[str]:
    return {json.dumps(r["prompt"]) for r in rows}


def builtin_rows(n: int, seed: int = 0) -> list[dict]:
    rows, _ = validate_rows(load_source(SourceConfig(path="builtin"), TaskConfig(num_rows=n), seed), "drop")
    return rows


def test_split_is_disjoint_and_follows_shares() -> None:
    rows = builtin_rows(400)
    n = len(rows)
    splits = split_phases(rows, (2.0, 4.0, 4.0), 0.1, seed=7)
    assert list(splits) == list(SPLITS)
    assert sum(len(s) for s in splits.values()) == n  # every valid row lands in exactly one split
    sets = [prompts(splits[name]) for name in SPLITS]
    assert sum(len(s) for s in sets) == len(prompts(rows)) == len(set().union(*sets))  # no prompt in two splits
    for phase, share in (("sft", 0.2), ("reward", 0.4), ("ppo", 0.4)):
        total = len(splits[f"{phase}_train"]) + len(splits[f"{phase}_eval"])
        assert abs(total - share * n) <= 2  # groups are cut whole: a slice ends within a group of its last prompt
        held = len(prompts(splits[f"{phase}_eval"]))
        assert held == round(0.1 * (held + len(prompts(splits[f"{phase}_train"]))))


def test_duplicate_prompts_are_kept_and_split_by_prompt_group() -> None:
    """Several answers/pairs per prompt (a 3,000-pair file over 98 prompts kept 98 rows before): every row is kept,
    all rows of one prompt land in one split, and the prompt counts are reported."""
    rows = [
        norm([user(f"q{p}")], chosen=f"good {p}.{k}", rejected=f"bad {p}.{k}", source="pairs")
        for p in range(30)
        for k in range(1 + p % 4)  # 1 to 4 pairs per prompt
    ]
    kept, counts = validate_rows(rows + [rows[5]], "drop")
    assert kept == rows and counts["duplicate_row"] == 1  # an exact copy is the only row dropped
    splits = split_phases(kept, (2.0, 4.0, 4.0), 0.1, seed=3)
    assert sum(len(s) for s in splits.values()) == len(rows)
    home = {}
    for name, split in splits.items():
        for r in split:
            assert home.setdefault(json.dumps(r["prompt"]), name) == name, "one prompt in two splits"
    assert len(home) == 30
    for phase in ("sft", "reward", "ppo"):
        assert splits[f"{phase}_train"] and splits[f"{phase}_eval"]
    params = Params.model_validate({"data": {"sources": [{"path": "pairs"}]}})
    _, stats = prepare_data(params, rows)
    assert stats["rows_valid"] == len(rows) and stats["prompts_valid"] == 30
    assert sum(stats["prompts"].values()) == 30 and sum(stats["splits"].values()) == len(rows)
    assert stats["sources"]["pairs"]["rows_valid"] == len(rows)
    assert sum(stats["sources"]["pairs"][name] for name in SPLITS) == len(rows)


def test_group_sizes_weigh_the_cut_by_rows() -> None:
    """Shares are row shares: one big group and many small ones still give each phase about its share of rows."""
    rows = [norm([user("big")], completion=f"a{k}", source="s") for k in range(50)]
    rows += [norm([user(f"q{p}")], completion=f"a{p}", source="s") for p in range(150)]
    splits = split_phases(rows, (1.0, 0.0, 1.0), 0.1, seed=0)
    sft = len(splits["sft_train"]) + len(splits["sft_eval"])
    assert abs(sft - 100) <= 25  # the 50-row group falls on one side; the rest fill to half of 200
    (home,) = [name for name, split in splits.items() if any(r["prompt"] == [user("big")] for r in split)]
    assert sum(r["prompt"] == [user("big")] for r in splits[home]) == 50  # all of it in one split


def test_split_is_deterministic_per_seed() -> None:
    rows = builtin_rows(200)
    a, b, c = (split_phases(rows, (2.0, 4.0, 4.0), 0.1, seed=s) for s in (1, 1, 2))
    assert a == b
    assert a != c


def test_prompt_completion_source_renormalises_over_sft_and_ppo() -> None:
    rows = [norm([user(f"q{i}")], completion=f"a{i}", source="pc") for i in range(90)]
    rows += [norm([user(f"p{i}")], source="p") for i in range(30)]
    splits = split_phases(rows, (2.0, 4.0, 4.0), 0.1, seed=0)

    def by_source(name: str, src: str) -> int:
        return sum(r["source"] == src for r in splits[name])

    assert by_source("sft_train", "pc") + by_source("sft_eval", "pc") == 30  # 2/(2+4) of 90
    assert by_source("ppo_train", "pc") + by_source("ppo_eval", "pc") == 60
    assert by_source("ppo_train", "p") + by_source("ppo_eval", "p") == 30  # prompt-only: all to PPO
    assert splits["reward_train"] == splits["reward_eval"] == []


def test_sft_takes_chosen_when_a_source_has_no_completion() -> None:
    rows = [good(i) for i in range(20)]
    splits = split_phases(rows, (1.0, 1.0, 1.0), 0.1, seed=0)
    sft = splits["sft_train"] + splits["sft_eval"]
    assert sft and all(r["completion"] == r["chosen"] for r in sft)
    assert all(r["completion"] is None for r in splits["reward_train"])


def test_eval_holds_out_at_least_one_row_but_never_all() -> None:
    for n, expected in ((1, 0), (2, 1), (5, 1), (40, 4)):
        rows = [norm([user(f"p{i}")], source="p") for i in range(n)]
        splits = split_phases(rows, (1.0, 1.0, 1.0), 0.1, seed=0)
        assert len(splits["ppo_eval"]) == expected and len(splits["ppo_train"]) == n - expected


def test_source_with_only_zero_share_phases_is_a_user_error() -> None:
    rows = [norm([user(f"p{i}")], source="prompts.jsonl") for i in range(5)]
    with pytest.raises(UserError, match="prompts.jsonl"):
        split_phases(rows, (1.0, 1.0, 0.0), 0.1, seed=0)


# ------------------------------------------------------------------------------------------------ blending


def test_weight_keeps_a_seeded_fraction() -> None:
    full = load_source(SourceConfig(path="builtin"), TaskConfig(num_rows=1000), seed=0)
    part = load_source(SourceConfig(path="builtin", weight=0.3), TaskConfig(num_rows=1000), seed=0)
    again = load_source(SourceConfig(path="builtin", weight=0.3), TaskConfig(num_rows=1000), seed=0)
    assert len(part) == 300
    assert part == again
    assert prompts(part) <= prompts(full)


def test_prepare_data_blends_sources_and_reports_stats(tmp_path: Path) -> None:
    file_rows = [{"prompt": f"Say {i}.", "completion": f"{i}"} for i in range(40)]
    path = write(file_rows, tmp_path, "jsonl")
    params = Params.model_validate(
        {
            "seed": 5,
            "task": {"num_rows": 200},
            "data": {"sources": [{"path": "builtin", "weight": 0.5}, {"path": str(path)}], "data_split": "2,4,4"},
        }
    )
    rows, per_source = load_sources(params)
    splits, stats = prepare_data(params, rows)
    assert stats["rows_loaded"] == 140 and per_source == {"builtin": 100, str(path): 40}
    assert stats["rows_valid"] == sum(stats["splits"].values()) == sum(len(s) for s in splits.values())
    assert stats["rows_loaded"] - stats["rows_valid"] == sum(stats["invalid"].values())
    reward = splits["reward_train"] + splits["reward_eval"]
    assert all(r["source"] == "builtin" for r in reward)  # the prompt/completion file cannot feed the reward step
    assert not any(k.startswith("_") for s in splits.values() for r in s for k in r)


def test_prepare_data_with_length_limits() -> None:
    # "Sort ascending: " plus 3 to 6 numbers is 21 to 33 characters: a limit of 26 drops the longer lists only.
    params = Params.model_validate({"task": {"num_rows": 200}, "data": {"max_prompt_tokens": 26, "max_seq_tokens": 60}})
    _, stats = prepare_data(params, load_sources(params)[0], length_fn=chars)
    assert stats["invalid"]["prompt_too_long"] > 0 and stats["rows_valid"] > 0
    assert stats["rows_valid"] + sum(stats["invalid"].values()) == 200
    # Not only a count in metrics/prepare.json: a warning names the source, the limit and the params to raise
    dropped = stats["invalid"]["prompt_too_long"] + stats["invalid"]["sequence_too_long"]
    line = next(w for w in stats["warnings"] if "too long" in w)
    assert line.startswith(f"{dropped} rows of builtin dropped as too long (")
    assert "data.max_prompt_tokens 26" in line and "raise data.max_prompt_tokens" in line
    # the lengths that would keep 99% of the rows: "Sort ascending: " plus 6 numbers of up to 2 digits is <= 33
    assert "99% of its rows fit data.max_prompt_tokens 3" in line and "data.truncate_prompts: true" in line


def test_truncate_prompts_keeps_the_rows_a_long_prompt_would_drop() -> None:
    # The same limit with data.truncate_prompts: no row is dropped for its prompt; each long prompt counts at the
    # limit (its last 26 tokens are kept when it is encoded), and its answer is checked at that length.
    got = {}
    for truncate in (False, True):
        params = Params.model_validate({"task": {"num_rows": 200}, "data": {
            "max_prompt_tokens": 26, "max_seq_tokens": 120, "truncate_prompts": truncate}})
        got[truncate] = prepare_data(params, load_sources(params)[0], length_fn=chars)[1]
    assert got[False]["invalid"]["prompt_too_long"] > 0
    assert got[True]["invalid"]["prompt_too_long"] == 0
    assert got[True]["rows_valid"] == got[False]["rows_valid"] + got[False]["invalid"]["prompt_too_long"]
    assert not [w for w in got[True]["warnings"] if "too long" in w]


# ------------------------------------------------------------------------------------------------ writing


def test_write_and_read_splits_round_trip(tmp_path: Path) -> None:
    rows = builtin_rows(60)
    rows[0] = {**rows[0], "prompt": [user("Trier: é ü 数字")], "_invalid": "leftover private key"}
    splits = split_phases(rows, (2.0, 4.0, 4.0), 0.1, seed=0)
    hashes = write_splits(tmp_path / "out", splits)
    assert set(hashes) == set(SPLITS)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(f"{n}.jsonl" for n in SPLITS)
    for name, rows_in in splits.items():
        file = tmp_path / "out" / f"{name}.jsonl"
        assert hashes[name] == hashlib.sha256(file.read_bytes()).hexdigest()
        assert read_split(file) == public(rows_in)
        for line in file.read_text(encoding="utf-8").splitlines():
            assert list(json.loads(line)) == sorted(json.loads(line))
    assert "Trier: é ü 数字" in "".join(p.read_text(encoding="utf-8") for p in (tmp_path / "out").iterdir())
    assert write_splits(tmp_path / "again", splits) == hashes  # same rows, same bytes


def test_read_split_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such split file"):
        read_split(tmp_path / "missing.jsonl")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": []}\n{not json\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"broken.jsonl:2"):
        read_split(broken)


# ------------------------------------------------------------------------------------------------ steps per source


def three_dedicated_sources(tmp_path: Path) -> tuple[Params, dict[str, Path]]:
    """A dedicated SFT file, a preference file and a prompt-only file, each naming its step (the TRL habit)."""
    files = {
        "sft": write([{"prompt": f"Say {i}.", "completion": f"{i}"} for i in range(60)], tmp_path, "jsonl", "sft"),
        "pairs": write(
            [{"prompt": f"Pick {i}.", "chosen": f"{i}", "rejected": f"{i + 1}"} for i in range(80)],
            tmp_path, "jsonl", "pairs",
        ),
        "prompts": write([{"prompt": f"Count to {i}."} for i in range(40)], tmp_path, "jsonl", "prompts"),
    }
    steps = {"sft": ["sft"], "pairs": ["reward"], "prompts": ["ppo"]}
    params = Params.model_validate(
        {"data": {"sources": [{"path": str(p), "steps": steps[k]} for k, p in files.items()], "data_split": "2,4,4"}}
    )
    return params, files


def test_sources_with_steps_feed_only_their_steps(tmp_path: Path) -> None:
    params, files = three_dedicated_sources(tmp_path)
    rows, _ = load_sources(params)
    splits, stats = prepare_data(params, rows)
    sizes = stats["splits"]
    assert sizes["sft_train"] + sizes["sft_eval"] == 60 and sizes["sft_eval"] == 6  # every SFT row, minus eval
    assert sizes["reward_train"] + sizes["reward_eval"] == 80 and sizes["reward_eval"] == 8
    assert sizes["ppo_train"] + sizes["ppo_eval"] == 40 and sizes["ppo_eval"] == 4
    for phase, key in (("sft", "sft"), ("reward", "pairs"), ("ppo", "prompts")):
        assert {r["source"] for name in ("train", "eval") for r in splits[f"{phase}_{name}"]} == {str(files[key])}
    src = stats["sources"][str(files["sft"])]
    assert src["steps"] == ["sft"] and src["sft_train"] == 54 and src["sft_eval"] == 6 and src["ppo_train"] == 0
    assert stats["warnings"] == []


def test_steps_share_by_data_split_and_mix_with_shared_sources(tmp_path: Path) -> None:
    pairs = write([{"prompt": f"Pick {i}.", "chosen": "a", "rejected": "b"} for i in range(100)], tmp_path, "jsonl")
    params = Params.model_validate(
        {"task": {"num_rows": 100},
         "data": {"sources": [{"path": str(pairs), "steps": ["sft", "reward"]}, {"path": "builtin"}],
                  "data_split": "1,3,4"}}
    )
    rows, _ = load_sources(params)
    splits, stats = prepare_data(params, rows)
    src = stats["sources"][str(pairs)]
    assert src["ppo_train"] == src["ppo_eval"] == 0
    assert src["sft_train"] + src["sft_eval"] == 25  # 1/(1+3) of 100
    assert stats["sources"]["builtin"]["steps"] == "data_split 1,3,4"
    assert stats["sources"]["builtin"]["ppo_train"] > 0


def test_a_prompt_pinned_by_steps_takes_its_shared_rows_along() -> None:
    """A shared (data_split) row whose prompt is also in an [sft] source goes to sft: no prompt in two phases."""
    rows = [norm([user(f"q{i}")], completion=f"a{i}", source="mine") for i in range(20)]
    rows += [good(i, source="other") for i in range(40)]
    rows += [norm([user(f"q{i}")], chosen=f"c{i}", rejected=f"r{i}", source="other") for i in range(20)]
    splits = split_phases(rows, (1.0, 1.0, 1.0), 0.1, 0, steps={"mine": ["sft"], "other": None})
    sft = prompts(splits["sft_train"] + splits["sft_eval"])
    assert {json.dumps([user(f"q{i}")]) for i in range(20)} <= sft
    others = prompts(splits["reward_train"] + splits["reward_eval"] + splits["ppo_train"] + splits["ppo_eval"])
    assert not sft & others


def test_steps_a_source_cannot_feed_are_one_line_errors(tmp_path: Path) -> None:
    from rlhf.config import ConfigError, parse_params

    with pytest.raises(ConfigError, match=r"'data.sources\[0\].steps\[0\]' = 'rm': must be one of"):
        parse_params({"data": {"sources": [{"path": "x.jsonl", "steps": ["rm"]}]}})
    with pytest.raises(ConfigError, match=r"names \['reward'\], which format prompt cannot feed"):
        parse_params({"data": {"sources": [{"path": "x.jsonl", "format": "prompt", "steps": ["reward"]}]}})
    path = write([{"prompt": "a", "completion": "b"}], tmp_path, "jsonl")  # auto: found when the file is read
    with pytest.raises(UserError, match=r"reads as format prompt_completion, which cannot feed \['reward'\]"):
        load_source(SourceConfig(path=str(path), steps=["sft", "reward"]), TASK, 0)


# ------------------------------------------------------------------------------------------------ split sizes


@pytest.mark.parametrize(
    ("sources", "data_split", "expect"),
    [
        ([{"path": "pc"}], "2,4,4",
         r"^reward_train is empty \(0 rows\), so the reward stage would train on nothing: .*preference pair"),
        ([{"path": "pairs"}], "0,4,4", r"^sft_train is empty.*share of 0: give sft a share"),
        ([{"path": "pairs", "steps": ["reward", "ppo"]}], "2,4,4", r"sft_train.*names other steps: add sft to"),
        ([{"path": "pairs", "steps": ["sft"]}], "2,4,4", r"^reward_train is empty"),
        ([{"path": "pairs"}], "0.5,4,4", r"^sft_eval is empty \(0 rows; sft has 1 prompt, all in sft_train\)"),
    ],
)
def test_a_step_with_an_empty_train_split_stops_prepare(sources: list, data_split: str, expect: str) -> None:
    rows = [norm([user(f"q{i}")], completion=f"a{i}", source="pc") for i in range(20)]
    rows += [good(i, source="pairs") for i in range(20)]
    params = Params.model_validate({"data": {"sources": sources, "data_split": data_split}})
    wanted = [r for r in rows if r["source"] in {s["path"] for s in sources}]
    with pytest.raises(UserError, match=expect) as err:
        prepare_data(params, wanted)
    assert "\n" not in str(err.value)


def test_no_pairs_with_a_reward_from_functions_alone_skips_the_reward_step() -> None:
    """rewards.model_weight 0 needs no reward model: with no preference pair at all prepare skips step 2 (its splits
    empty, stats.skipped_steps names it) instead of stopping; with pairs, or with model_weight > 0, nothing changes."""
    rows = [norm([user(f"q{i}")], completion=f"a{i}", source="pc") for i in range(20)]
    verifier = {"model_weight": 0.0, "functions": [{"function": "rlhf.data.task:gold_reward_fn"}]}
    params = Params.model_validate({"data": {"sources": [{"path": "pc"}]}, "rewards": verifier})
    splits, stats = prepare_data(params, rows)
    assert stats["skipped_steps"] == ["reward"]
    assert splits["reward_train"] == splits["reward_eval"] == []
    assert splits["sft_train"] and splits["ppo_train"] and splits["ppo_eval"]
    with_pairs = rows + [good(i, source="pc") for i in range(20)]
    assert prepare_data(params, with_pairs)[1]["skipped_steps"] == []
    with pytest.raises(UserError, match=r"^reward_train is empty.*or, for a reward from rewards.functions alone, set "
                                        r"rewards.model_weight: 0"):
        prepare_data(Params.model_validate({"data": {"sources": [{"path": "pc"}]}}), rows)


def test_a_far_smaller_train_split_warns() -> None:
    rows = [good(i, source="pairs") for i in range(200)]
    params = Params.model_validate({"data": {"sources": [{"path": "pairs"}], "data_split": "0.2,4,4"}})
    _, stats = prepare_data(params, rows)
    assert stats["splits"]["sft_train"] > 0
    (line,) = stats["warnings"]
    assert line.startswith(f"sft_train has {stats['splits']['sft_train']} rows") and "under 10%" in line
    params = Params.model_validate({"data": {"sources": [{"path": "pairs"}], "data_split": "2,4,4"}})
    assert prepare_data(params, rows)[1]["warnings"] == []


# ------------------------------------------------------------------------------------------------ tracked sources


def test_a_local_source_outside_the_prepare_deps_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rlhf.data.prepare import check_sources_tracked

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/sources").mkdir(parents=True)
    (tmp_path / "data/sources/mine.jsonl").write_text("{}\n")
    (tmp_path / "elsewhere.jsonl").write_text("{}\n")
    dvc_yaml = tmp_path / "dvc.yaml"
    dvc_yaml.write_text("stages:\n  prepare:\n    cmd: rlhf prepare\n    deps:\n      - data/sources\n      - rlhf/data/\n")
    ok = [SourceConfig(path="builtin"), SourceConfig(path="data/sources/mine.jsonl"), SourceConfig(path="a/hub-id")]
    check_sources_tracked(ok, dvc_yaml)
    check_sources_tracked([SourceConfig(path=str(tmp_path / "data/sources/mine.jsonl"))], dvc_yaml)  # absolute
    with pytest.raises(UserError, match=r"'elsewhere.jsonl' is not a dependency of the prepare stage.*data/sources/"):
        check_sources_tracked([SourceConfig(path="elsewhere.jsonl")], dvc_yaml)
    check_sources_tracked([SourceConfig(path="elsewhere.jsonl")], tmp_path / "no-dvc.yaml")  # outside DVC: no check


def test_source_identity_records_sha256_and_hub_revision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    from rlhf.data.sources import load_source_info

    path = write([{"prompt": "a", "completion": "b"}], tmp_path, "jsonl")
    _, info = load_source_info(SourceConfig(path=str(path)), TASK, 0)
    assert info == {"format": "prompt_completion", "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}

    # A hub dataset as datasets caches it: .../<owner>___<name>/default/0.0.0/<commit>/<name>-train.arrow
    commit = "0123456789abcdef0123456789abcdef01234567"
    cached = tmp_path / "cache" / "owner___name" / "default" / "0.0.0" / commit
    cached.mkdir(parents=True)
    ds = datasets.Dataset.from_list([{"prompt": "p", "chosen": "c", "rejected": "r"}])
    ds.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    (cached / "name-train.arrow").write_bytes(arrow.read_bytes())
    hub = datasets.Dataset.from_file(str(cached / "name-train.arrow"))
    monkeypatch.setattr("rlhf.data.sources._read_hub", lambda src: hub)
    _, info = load_source_info(SourceConfig(path="owner/name"), TASK, 0)
    assert info["revision"] == commit and info["fingerprint"] == hub._fingerprint and info["format"] == "preference"


def test_a_label_column_is_unpaired_preference_only_when_it_is_true_or_false() -> None:
    """TRL's unpaired rows have a boolean `label`; a `label` holding a gold answer (OpenRLHF's remote-reward
    convention) leaves the rows prompt/completion."""
    from rlhf.data.formats import detect_format

    cols = {"prompt", "completion", "label"}
    assert detect_format("thumbs", cols, [{"prompt": "p", "completion": "c", "label": False}]) == "unpaired"
    assert detect_format("gold", cols, [{"prompt": "2+2?", "completion": "4", "label": "4"}]) == "prompt_completion"
