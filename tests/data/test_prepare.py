"""`rlhf prepare` through the real CLI on a small task of our own in local files (not the builtin sorting task):
sources that name their steps, where each source's rows went, and the split-size warning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conftest import run_cli, write_params


def jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path.relative_to(path.parents[2]))


def capitals(work: Path) -> dict[str, str]:
    """A toy task in TRL's three formats, several answers and pairs per prompt: 40 prompts, 120 SFT rows
    (3 phrasings each), 160 pairs (4 each) and the 40 prompts alone."""
    places = [f"Country {i}" for i in range(40)]
    src = work / "data/sources"
    return {
        "sft": jsonl(src / "sft.jsonl", [
            {"prompt": f"Capital of {p}?", "completion": f"{form} {p} City."}
            for p in places for form in ("It is", "That is", "The capital is")
        ]),
        "pairs": jsonl(src / "pairs.jsonl", [
            {"prompt": f"Capital of {p}?", "chosen": f"{p} City.", "rejected": f"Not {p} {k}."}
            for p in places for k in range(4)
        ]),
        "prompts": jsonl(src / "prompts.jsonl", [{"prompt": f"Capital of {p}?"} for p in places]),
    }


def test_sources_with_steps_go_only_to_their_steps(tmp_path: Path) -> None:
    files = capitals(tmp_path)
    steps = {"sft": ["sft"], "pairs": ["reward"], "prompts": ["ppo"]}
    write_params(tmp_path / "params.yaml", {"data": {"sources": [{"path": files[k], "steps": s} for k, s in steps.items()]}})
    proc = run_cli("prepare", "--params", "params.yaml", cwd=tmp_path)
    stats = json.loads((tmp_path / "metrics/prepare.json").read_text())
    # Every row of each file is kept (the same prompt with other answers is data) and feeds its own step only.
    assert stats["rows_valid"] == stats["rows_loaded"] == 120 + 160 + 40 and stats["prompts_valid"] == 40
    sizes = stats["splits"]
    assert (sizes["sft_train"], sizes["sft_eval"]) == (108, 12)  # 4 of 40 prompts held out, 3 rows each
    assert (sizes["reward_train"], sizes["reward_eval"]) == (144, 16)
    assert (sizes["ppo_train"], sizes["ppo_eval"]) == (36, 4)
    assert stats["prompts"]["sft_train"] == 36 and stats["prompts"]["reward_eval"] == 4
    for key, step in (("sft", "sft"), ("pairs", "reward"), ("prompts", "ppo")):
        src = stats["sources"][files[key]]
        assert src["steps"] == [step] and len(src["sha256"]) == 64
        assert src[f"{step}_train"] + src[f"{step}_eval"] == src["rows_valid"] == src["rows_loaded"]
        assert all(src[f"{other}_{side}"] == 0 for other in ("sft", "reward", "ppo") if other != step
                   for side in ("train", "eval"))
        assert f"prepare: source '{files[key]}' (steps {step}): " in proc.stdout
    assert "prepare: source 'data/sources/sft.jsonl' (steps sft): 120 valid of 120 rows -> sft_train=108, sft_eval=12" \
        in proc.stdout
    assert stats["warnings"] == [] and "warning" not in proc.stderr
    # The three files share their 40 prompts, and their steps send them to three steps: the user's choice, counted.
    # A prompt held out is held out in every step, so no eval prompt is trained on anywhere.
    assert stats["prompts_in_several_steps"] == 40 and stats["rows_unused"] == 0
    side = {name: {json.dumps(json.loads(line)["prompt"])
                   for line in (tmp_path / f"data/prepared/{name}.jsonl").read_text().splitlines()}
            for name in sizes}
    assert side["sft_eval"] == side["reward_eval"] == side["ppo_eval"]
    assert not side["sft_eval"] & (side["sft_train"] | side["reward_train"] | side["ppo_train"])
    manifest = json.loads((tmp_path / "data/prepared/manifest.json").read_text())
    assert manifest["stats"]["sources"][files["pairs"]]["sha256"] == stats["sources"][files["pairs"]]["sha256"]


def test_shared_sources_split_by_prompt_and_a_tiny_step_warns(tmp_path: Path) -> None:
    """Without steps, the same three files share by data_split: a prompt never feeds two steps, so the rows of a
    prompt that cannot feed its step go unused (and say so). A data_split that leaves SFT a sliver warns on stderr and
    in metrics, and still writes the splits."""
    files = capitals(tmp_path)
    write_params(tmp_path / "params.yaml",
                 {"data": {"sources": [{"path": f} for f in files.values()], "data_split": "0.5,4,4"}})
    proc = run_cli("prepare", "--params", "params.yaml", cwd=tmp_path)
    stats = json.loads((tmp_path / "metrics/prepare.json").read_text())
    homes: dict[str, set[str]] = {}
    for name in stats["splits"]:
        for line in (tmp_path / f"data/prepared/{name}.jsonl").read_text().splitlines():
            homes.setdefault(json.dumps(json.loads(line)["prompt"]), set()).add(name)
    assert len(homes) == 40 and all(len(h) == 1 for h in homes.values())  # one split per prompt
    assert stats["prompts_in_several_steps"] == 0
    assert 0 < stats["splits"]["sft_train"] < 0.1 * max(stats["splits"].values())
    small = [w for w in stats["warnings"] if w.startswith(f"sft_train has {stats['splits']['sft_train']} rows")]
    assert len(small) == 1 and "under 10%" in small[0]
    unused = stats["rows_unused"]
    assert unused == sum(s["unused"] for s in stats["sources"].values()) > 0
    assert unused == stats["rows_valid"] - sum(stats["splits"].values())
    assert any(w.startswith(f"{unused} valid rows unused") for w in stats["warnings"])
    assert proc.stderr.splitlines() == [f"warning: {w}" for w in stats["warnings"]]
    assert (tmp_path / "data/prepared/COMPLETE.json").is_file()


def test_long_prompts_are_dropped_with_a_warning_or_truncated_and_trained_on(tmp_path: Path) -> None:
    """Our own task with prompts longer than data.max_prompt_tokens: by default prepare drops those rows and says
    so per source, with the limits that would keep 99% of them; with data.truncate_prompts the rows stay and sft
    trains on their last max_prompt_tokens prompt tokens."""
    files = capitals(tmp_path)
    long = [{"prompt": "Background: " + "the weather was fine that day. " * 6 + f"Capital of Country {i}?",
             "completion": f"It is Country {i} City."} for i in range(40)]
    files["long"] = jsonl(tmp_path / "data/sources/long.jsonl", long)
    sources = [{"path": files["sft"], "steps": ["sft"]}, {"path": files["long"], "steps": ["sft"]},
               {"path": files["pairs"], "steps": ["reward"]}, {"path": files["prompts"], "steps": ["ppo"]}]
    write_params(tmp_path / "params.yaml", {"data": {"sources": sources, "max_prompt_tokens": 40}})
    proc = run_cli("prepare", "--params", "params.yaml", cwd=tmp_path)
    warning = next(line for line in proc.stderr.splitlines() if "dropped as too long" in line)
    assert warning.startswith(f"warning: 40 rows of {files['long']} dropped as too long (40 with a prompt over "
                              "data.max_prompt_tokens 40)") and "99% of its rows fit data.max_prompt_tokens" in warning

    write_params(tmp_path / "params.yaml", {"data": {"sources": sources, "max_prompt_tokens": 40,
                                                     "truncate_prompts": True}})
    proc = run_cli("prepare", "--params", "params.yaml", cwd=tmp_path)
    assert "dropped as too long" not in proc.stderr
    prepared = json.loads((tmp_path / "metrics/prepare.json").read_text())
    assert prepared["invalid"]["prompt_too_long"] == 0 and prepared["sources"][files["long"]]["rows_valid"] == 40
    run_cli("sft", "--params", "params.yaml", cwd=tmp_path)
    from rlhf.config import load_params
    from rlhf.data.split import read_split
    from rlhf.models.tokenizer import encode_sft_row, load_tokenizer

    tok = load_tokenizer(tmp_path / "models/sft")
    rows = [r for r in read_split(tmp_path / "data/prepared/sft_train.jsonl") if r["source"] == files["long"]]
    limit = load_params(tmp_path / "params.yaml").data.max_prompt_tokens
    encoded = [encode_sft_row(tok, r, False, limit) for r in rows]
    assert rows and all(e["labels"].count(-100) == limit for e in encoded)  # every long prompt cut to the limit
