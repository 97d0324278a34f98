"""Data loading: every source (the builtin task, a local file or folder, a hub id) becomes rows of one schema.

A normalised row is a plain, JSON-serialisable dict::

    {"prompt": [{"role": str, "content": str}, ...],  # optional system turn, then user/assistant, ends with user
     "completion": str | None,                        # a demonstration answer (SFT)
     "chosen": str | None, "rejected": str | None,    # a preference pair (reward model)
     "source": str}                                   # the SourceConfig.path it came from

The flow is load_source -> validate_rows -> split_phases -> write_splits (prepare_data runs all of it). Loading never
raises on a bad row: it marks the row with private keys (`_invalid`, `_detail`, `_row`) so that validation counts it
(drop mode) or names it (error mode); validate_rows returns rows without any private key.

Input formats follow TRL's dataset formats (https://huggingface.co/docs/trl/dataset_formats) plus the two raw
transcript layouts DeepSpeed-Chat trains on (Dahoas/rm-static and Anthropic/hh-rlhf, see DeepSpeed-Chat
dschat/utils/data/raw_datasets.py). The three-way split follows DeepSpeed-Chat's data_split
(dschat/utils/data/data_utils.py get_raw_dataset_split_index).

`datasets` is imported inside the functions that read files, so importing this module stays light.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import socket
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

from rlhf.config import Params, SourceConfig, TaskConfig
from rlhf.errors import UserError
from rlhf.task import generate_rows

if TYPE_CHECKING:
    from datasets import Dataset

# Every reason validate_rows can give, in the order it checks them; its counts always hold all of them (zeros too),
# so stats from two runs line up key by key.
REASONS = (
    "missing_column",  # the format needs a column the source lacks (or a hand-built row lacks `prompt`)
    "wrong_type",  # a text that is not a string, a message list that is not a list of {role, content}
    "empty_text",  # None, empty or whitespace-only text where the format needs one
    "bad_role_order",  # prompt is not [system], user, assistant, ..., user; an answer is not one assistant turn
    "mismatched_prompt",  # chosen and rejected transcripts do not share the conversation before the last answer
    "chosen_equals_rejected",  # a pair that teaches the reward model nothing
    "prompt_too_long",  # over data.max_prompt_tokens
    "sequence_too_long",  # prompt + longest answer over data.max_seq_tokens
    "duplicate_prompt",  # the same prompt seen earlier (the first is kept): no prompt can land in two phases
)

SPLITS = ("sft_train", "sft_eval", "reward_train", "reward_eval", "ppo_train", "ppo_eval")
_PHASES = ("sft", "reward", "ppo")
_ANSWERS = ("completion", "chosen", "rejected")

# Local file suffix -> datasets packaged builder.
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}

# Columns each format needs. A preference source may leave out `prompt` when chosen/rejected are full message lists
# (TRL's implicit prompt).
_COLUMNS = {
    "prompt_completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "messages": ("messages",),
    "prompt": ("prompt",),
    "rm_static": ("prompt", "chosen", "rejected"),
    "hh_rlhf": ("chosen", "rejected"),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")  # Anthropic transcript turn markers
_ASSISTANT = "\n\nAssistant:"
_FIX = {
    "prompt_too_long": "raise data.max_prompt_tokens or set data.invalid_rows: drop to skip such rows",
    "sequence_too_long": "raise data.max_seq_tokens or set data.invalid_rows: drop to skip such rows",
    "missing_column": "check data.sources[].format against the columns, or set data.invalid_rows: drop",
}
_DEFAULT_FIX = "fix the row or set data.invalid_rows: drop to skip such rows"


class _Bad(Exception):
    """A raw row that cannot be normalised: caught in load_source and kept as a marked row."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# ----------------------------------------------------------------------------------------------------------- loading


def load_source(src: SourceConfig, task: TaskConfig, seed: int) -> list[dict]:
    """Read one data source and normalise its rows to the schema above.

    Rows that cannot be normalised come back marked (`_invalid`), never raised, so validate_rows counts them.
    `src.weight` below 1 keeps a seeded random share of the rows (blending several sources).
    """
    if src.path == "builtin":
        # The shipped task has all four columns: a demonstration and a labelled pair per prompt.
        knobs = task.model_dump(exclude={"num_rows"})
        raw: list[dict] = list(generate_rows(task.num_rows, seed, **knobs))
        columns, fmt = {"prompt", "completion", "chosen", "rejected"}, "preference"
    else:
        ds = _read(src)
        raw, columns = ds.to_list(), set(ds.column_names)
        fmt = src.format if src.format != "auto" else _detect_format(src.path, columns, raw)
    rows = []
    for i in _sample(len(raw), src.weight, seed, src.path):
        try:
            row = _normalise(raw[i], fmt, columns)
        except _Bad as bad:
            row = {"prompt": [], "completion": None, "chosen": None, "rejected": None}
            row.update(_invalid=bad.reason, _detail=bad.detail)
        row.update(source=src.path, _row=i)
        rows.append(row)
    return rows


def _sample(n: int, weight: float, seed: int, path: str) -> list[int]:
    """Indices of the rows kept: all for weight >= 1, else a seeded random round(weight * n), in source order."""
    if weight >= 1:
        return list(range(n))
    rng = random.Random(f"{seed}:weight:{path}")  # str seeds are stable across runs (no hash randomisation)
    return sorted(rng.sample(range(n), round(weight * n)))


def _read(src: SourceConfig) -> Dataset:
    path = Path(src.path).expanduser()
    if path.is_file():
        return _read_file(path, src.path)
    if path.is_dir():
        return _read_folder(path, src.path, src.split)
    if _looks_like_hub_id(src.path):
        return _read_hub(src)
    raise UserError(
        f"data source '{src.path}' not found: no such file or folder under {Path.cwd()}; "
        "fix data.sources[].path (a local file or folder, 'builtin', or a hub id like 'Dahoas/rm-static')"
    )


def _looks_like_hub_id(path: str) -> bool:
    # `data/rows.jsonl` has the owner/name shape too; a data-file suffix or a path prefix means a missing local file.
    return (
        bool(_HUB_ID.match(path))
        and Path(path).suffix.lower() not in _BUILDERS
        and not path.startswith((".", "~", "/"))
    )


def _read_file(path: Path, name: str) -> Dataset:
    import datasets

    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise UserError(
            f"data source '{name}' has an unsupported file type '{path.suffix}': use one of {', '.join(_BUILDERS)}"
        )
    try:
        with _no_progress_bars():
            return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # datasets wraps parse errors in several types; all mean the same to a user
        raise UserError(
            f"data source '{name}' could not be read as {builder} ({_first_line(err)}): fix or re-export the file"
        ) from None


def _read_folder(path: Path, name: str, split: str) -> Dataset:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:
        raise UserError(
            f"data source '{name}' is a folder but could not be loaded with datasets.load_from_disk "
            f"({_first_line(err)}): point data.sources[].path at a folder written by save_to_disk, or at a file"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserError(
                f"data source '{name}' has no split '{split}': available splits are {sorted(loaded)}; "
                "set data.sources[].split to one of them"
            )
        return loaded[split]
    return loaded


def _read_hub(src: SourceConfig) -> Dataset:
    import datasets

    # huggingface_hub retries a dead connection for ~25 s; when the hub cannot be reached, run in offline mode so
    # that a cached copy still loads and anything else fails at once.
    offline = _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE") or not _hub_reachable()
    with _hub_offline(offline):
        try:
            return datasets.load_dataset(src.path, split=src.split)
        except (ConnectionError, FileNotFoundError) as err:  # offline, unknown id, or a private one
            raise UserError(
                f"data source '{src.path}' could not be loaded from the Hugging Face hub (offline or unknown id): "
                f"download it on a connected machine (load_dataset('{src.path}', split='{src.split}')"
                ".save_to_disk(DIR)) and point its data.sources path at DIR"
            ) from err
        except Exception as err:
            raise UserError(
                f"data source '{src.path}' failed to load from the Hugging Face hub ({_first_line(err)}): "
                "check data.sources[].path and data.sources[].split"
            ) from None


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub endpoint (skipped behind a proxy, which a direct probe cannot judge)."""
    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Switch datasets and huggingface_hub to offline mode for the block, and always restore their flags.

    Both libraries read HF_HUB_OFFLINE once, at import; setting the env var afterwards has no effect.
    """
    import datasets.config
    from huggingface_hub import constants

    saved = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, constants.HF_HUB_OFFLINE)
    if offline:
        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, constants.HF_HUB_OFFLINE = saved


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Hide datasets' progress bars and its error log lines for the block, and restore them. Converting a local file
    to arrow takes moments; its "Generating train split" bars on stderr, or its "Failed to read schema" log line for a
    corrupt file, would sit above the one error line that the caller raises instead."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not was_disabled:
            datasets.enable_progress_bars()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


# ----------------------------------------------------------------------------------------------------- normalising


def _detect_format(name: str, columns: set[str], raw: list[dict]) -> str:
    """The format a source's columns imply (data.sources[].format: auto)."""
    if "messages" in columns:
        return "messages"
    if {"chosen", "rejected"} <= columns:
        if "prompt" not in columns:
            # hh-rlhf keeps whole transcripts as strings; TRL's implicit-prompt preference keeps message lists.
            return "hh_rlhf" if isinstance(_first_value(raw, "chosen"), str) else "preference"
        prompt = _first_value(raw, "prompt")
        if "response" in columns or (isinstance(prompt, str) and _TURN.match(prompt.lstrip(" "))):
            return "rm_static"
        return "preference"
    if "completion" in columns and "prompt" in columns:
        return "prompt_completion"
    if "prompt" in columns:
        return "prompt"
    raise UserError(
        f"data source '{name}' has columns {sorted(columns)}, which match no known format: rename them "
        "(prompt/completion, prompt/chosen/rejected, messages, prompt) or set data.sources[].format"
    )


def _first_value(raw: list[dict], key: str) -> Any:
    return next((r[key] for r in raw if r.get(key) is not None), None)


def _normalise(raw: dict, fmt: str, columns: set[str]) -> dict:
    """One raw row -> the schema; raises _Bad when the row cannot be read in this format."""
    implicit = fmt == "preference" and "prompt" not in columns
    for col in _COLUMNS[fmt]:
        if col not in columns and not (implicit and col == "prompt"):
            raise _Bad("missing_column", f"no '{col}' column for format {fmt}")
    row: dict[str, Any] = {"prompt": None, "completion": None, "chosen": None, "rejected": None}
    if fmt == "prompt":
        row["prompt"] = _prompt(raw["prompt"])
    elif fmt == "prompt_completion":
        row["prompt"], row["completion"] = _prompt(raw["prompt"]), _answer(raw["completion"], "completion")
    elif fmt == "messages":
        row["prompt"], row["completion"] = _split_messages(raw["messages"])
    elif fmt == "preference" and implicit:
        row["prompt"], row["chosen"], row["rejected"] = _implicit_pair(raw["chosen"], raw["rejected"])
    elif fmt == "preference":
        row["prompt"] = _prompt(raw["prompt"])
        row["chosen"], row["rejected"] = _answer(raw["chosen"], "chosen"), _answer(raw["rejected"], "rejected")
        if raw.get("completion") is not None:  # the builtin layout: a demonstration beside the pair
            row["completion"] = _answer(raw["completion"], "completion")
    elif fmt == "rm_static":
        # `response` duplicates `chosen` in rm-static, so SFT takes chosen (as DeepSpeed-Chat does).
        row["prompt"] = _transcript_prompt(_text(raw["prompt"], "prompt"))
        row["chosen"] = _text(raw["chosen"], "chosen").strip()
        row["rejected"] = _text(raw["rejected"], "rejected").strip()
    else:  # hh_rlhf
        chosen, rejected = _text(raw["chosen"], "chosen"), _text(raw["rejected"], "rejected")
        row["prompt"], row["chosen"], row["rejected"] = _hh_pair(chosen, rejected)
    return row


def _text(value: Any, field: str) -> str:
    if value is None:
        raise _Bad("empty_text", f"{field} is empty")
    if not isinstance(value, str):
        raise _Bad("wrong_type", f"{field} is a {type(value).__name__}, not a string")
    return value


def _messages(value: Any, field: str) -> list[dict]:
    """A TRL conversational list -> plain {role, content} dicts (types are checked later, in validation)."""
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise _Bad("wrong_type", f"{field} is not a list of {{role, content}} messages")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _prompt(value: Any) -> list[dict]:
    if isinstance(value, list):
        return _messages(value, "prompt")
    return [{"role": "user", "content": _text(value, "prompt")}]


def _answer(value: Any, field: str) -> Any:
    """A plain string, or TRL's conversational answer: a list holding one assistant message."""
    if not isinstance(value, list):
        return _text(value, field)
    msgs = _messages(value, field)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise _Bad("bad_role_order", f"{field} is not a single assistant message")
    return msgs[0]["content"]


def _split_messages(value: Any) -> tuple[list[dict], Any]:
    """TRL `messages`: the turns before the last assistant turn are the prompt, that turn is the completion."""
    msgs = _messages(value, "messages")
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if last is None:
        raise _Bad("bad_role_order", "messages has no assistant turn")
    if last < len(msgs) - 1:
        raise _Bad("bad_role_order", f"messages end with a {msgs[-1]['role']} turn after the last assistant answer")
    if not any(m["role"] == "user" for m in msgs[:last]):
        raise _Bad("bad_role_order", "messages have no user turn before the assistant answer")
    return msgs[:last], msgs[last]["content"]


def _implicit_pair(chosen: Any, rejected: Any) -> tuple[list[dict], Any, Any]:
    """TRL implicit prompt: chosen and rejected are whole conversations; the shared leading turns are the prompt."""
    a, b = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    shared = 0
    while shared < min(len(a), len(b)) - 1 and a[shared] == b[shared]:
        shared += 1
    if len(a) - shared != 1 or len(b) - shared != 1:
        raise _Bad("mismatched_prompt", "chosen and rejected differ before their last turn")
    return a[:shared], _answer(a[shared:], "chosen"), _answer(b[shared:], "rejected")


def _transcript_prompt(text: str) -> list[dict]:
    """'\\n\\nHuman: hi\\n\\nAssistant:' -> [{user: hi}]: the empty assistant turn that invites the answer is cut."""
    parts = _TURN.split(text)
    if len(parts) == 1:  # no markers: a plain prompt
        return [{"role": "user", "content": text}]
    if parts[0].strip():
        raise _Bad("bad_role_order", "prompt has text before its first 'Human:' turn")
    msgs = [
        {"role": "user" if role == "Human" else "assistant", "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2])
    ]
    if msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
        msgs.pop()
    return msgs


def _hh_pair(chosen: str, rejected: str) -> tuple[list[dict], str, str]:
    """hh-rlhf: both texts are whole transcripts; the prompt is everything before the last Assistant turn."""
    cut_c, cut_r = chosen.rfind(_ASSISTANT), rejected.rfind(_ASSISTANT)
    if cut_c < 0 or cut_r < 0:
        raise _Bad("bad_role_order", "a transcript has no '\\n\\nAssistant:' turn")
    if chosen[:cut_c] != rejected[:cut_r]:
        raise _Bad("mismatched_prompt", "chosen and rejected transcripts differ before the last Assistant turn")
    answer_c, answer_r = chosen[cut_c + len(_ASSISTANT):].strip(), rejected[cut_r + len(_ASSISTANT):].strip()
    return _transcript_prompt(chosen[:cut_c]), answer_c, answer_r


# ------------------------------------------------------------------------------------------------------ validating


def validate_rows(
    rows: Iterable[dict],
    mode: Literal["drop", "error"] = "drop",
    length_fn: Callable[[dict], tuple[int, int]] | None = None,
    max_prompt_tokens: int | None = None,
    max_seq_tokens: int | None = None,
) -> tuple[list[dict], dict[str, int]]:
    """Keep the rows every step can train on; return them (without private keys) and reason -> count.

    The counts hold every reason in REASONS, zeros included. `length_fn(row)` gives (prompt tokens, tokens of the
    prompt plus its longest answer); it needs the tokenizer, so the caller supplies it, and None skips length checks.
    mode "error" raises UserError at the first bad row, naming its source, row index, reason and the fix.
    Duplicates are checked last, so an invalid first copy of a prompt does not shadow a valid later one.
    """
    counts = dict.fromkeys(REASONS, 0)
    kept: list[dict] = []
    seen: set[str] = set()
    for index, row in enumerate(rows):
        clean = {k: v for k, v in row.items() if not k.startswith("_")}
        problem = _check(row) or _check_length(clean, length_fn, max_prompt_tokens, max_seq_tokens)
        key = json.dumps(clean.get("prompt"), sort_keys=True, ensure_ascii=False, default=str)
        if problem is None and key in seen:
            problem = ("duplicate_prompt", "the same prompt appears earlier in the data")
        if problem is not None:
            reason, detail = problem
            if mode == "error":
                where = f"data source '{row.get('source', '?')}' row {row.get('_row', index)}"
                raise UserError(f"{where}: {reason} ({detail}): {_FIX.get(reason, _DEFAULT_FIX)}")
            counts[reason] += 1
            continue
        seen.add(key)
        kept.append(clean)
    return kept, counts


def _check(row: dict) -> tuple[str, str] | None:
    """(reason, detail) for the first content problem of a row, or None."""
    if "_invalid" in row:
        return row["_invalid"], row.get("_detail", "")
    if "prompt" not in row:
        return "missing_column", "the row has no prompt"
    if ("chosen" in row) != ("rejected" in row):
        return "missing_column", "the row has only one of chosen and rejected"
    prompt = row["prompt"]
    if not isinstance(prompt, list) or not all(isinstance(m, dict) for m in prompt):
        return "wrong_type", "prompt is not a list of messages"
    for m in prompt:
        if m.get("content") is None:
            return "empty_text", "a prompt message has no content"
        if not isinstance(m.get("role"), str) or not isinstance(m["content"], str):
            return "wrong_type", "a prompt message's role or content is not a string"
        if not m["content"].strip():
            return "empty_text", f"a {m['role']} message is empty"
    if not prompt:
        return "empty_text", "prompt has no messages"
    for field in _ANSWERS:
        value = row.get(field)
        if value is not None and not isinstance(value, str):
            return "wrong_type", f"{field} is a {type(value).__name__}, not a string"
        if value is not None and not value.strip():
            return "empty_text", f"{field} is empty or whitespace"
    if (row.get("chosen") is None) != (row.get("rejected") is None):
        return "empty_text", "a pair needs both chosen and rejected"
    roles = [m["role"] for m in prompt]
    turns = roles[1:] if roles[0] == "system" else roles
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    if not turns or turns != expected or turns[-1] != "user":
        return "bad_role_order", f"prompt roles are {roles}; expected [system], user, assistant, ..., user"
    if row.get("chosen") is not None and row["chosen"].strip() == row["rejected"].strip():
        return "chosen_equals_rejected", "chosen and rejected are the same text"
    return None


def _check_length(
    row: dict,
    length_fn: Callable[[dict], tuple[int, int]] | None,
    max_prompt_tokens: int | None,
    max_seq_tokens: int | None,
) -> tuple[str, str] | None:
    if length_fn is None:
        return None
    prompt_tokens, seq_tokens = length_fn(row)
    if max_prompt_tokens is not None and prompt_tokens > max_prompt_tokens:
        return "prompt_too_long", f"{prompt_tokens} prompt tokens > data.max_prompt_tokens {max_prompt_tokens}"
    if max_seq_tokens is not None and seq_tokens > max_seq_tokens:
        return "sequence_too_long", f"{seq_tokens} tokens > data.max_seq_tokens {max_seq_tokens}"
    return None


# ------------------------------------------------------------------------------------------------------- splitting


def _feeds(row: dict) -> tuple[bool, bool, bool]:
    """Which phases (sft, reward, ppo) a row can train: SFT needs an answer, the reward model a pair."""
    has_pair = row.get("chosen") is not None and row.get("rejected") is not None
    return row.get("completion") is not None or row.get("chosen") is not None, has_pair, True


def split_phases(
    rows: list[dict], shares: tuple[float, float, float], eval_fraction: float, seed: int
) -> dict[str, list[dict]]:
    """Cut valid rows into disjoint SFT / reward / PPO sets, each with a held-out eval split.

    DeepSpeed-Chat's data_split: per source, one seeded permutation of its rows is cut into three contiguous slices
    by the shares, so no row feeds two phases. A source's shares are renormalised over the phases all of its rows
    can feed (prompt/completion rows skip the reward step; prompt-only rows go to PPO only). Then each phase holds out
    round(eval_fraction * n) rows (at least 1 when it has >= 2, never all). SFT rows without a completion get their
    chosen answer as completion, so the SFT step always reads `completion`.
    """
    by_source: dict[str, list[dict]] = {}
    for row in rows:
        by_source.setdefault(row.get("source", ""), []).append(row)
    phases: dict[str, list[dict]] = {p: [] for p in _PHASES}
    for source, group in by_source.items():
        able = [all(_feeds(r)[i] for r in group) for i in range(len(_PHASES))]
        local = [share if ok else 0.0 for share, ok in zip(shares, able)]
        total = sum(local)
        if total <= 0:
            usable = [p for p, ok in zip(_PHASES, able) if ok]
            raise UserError(
                f"data source '{source}' can only feed {usable}, whose data.data_split shares are all 0: "
                "give those steps a share or drop the source"
            )
        order = list(range(len(group)))
        random.Random(f"{seed}:split:{source}").shuffle(order)
        start, cum = 0, 0.0
        for i, (phase, share) in enumerate(zip(_PHASES, local)):
            cum += share
            end = len(group) if i == len(_PHASES) - 1 else round(len(group) * cum / total)
            phases[phase].extend(group[j] for j in order[start:end])
            start = end
    phases["sft"] = [r if r.get("completion") is not None else {**r, "completion": r["chosen"]} for r in phases["sft"]]
    splits: dict[str, list[dict]] = {}
    for phase, members in phases.items():
        # Shuffle before holding out, so eval draws from every source, not only the last one concatenated.
        members = list(members)
        random.Random(f"{seed}:eval:{phase}").shuffle(members)
        n = len(members)
        n_eval = min(max(1, round(eval_fraction * n)), n - 1) if n >= 2 else 0
        splits[f"{phase}_eval"], splits[f"{phase}_train"] = members[:n_eval], members[n_eval:]
    return {name: splits[name] for name in SPLITS}


# --------------------------------------------------------------------------------------------------------- writing


def write_splits(out_dir: Path, splits: dict[str, list[dict]]) -> dict[str, str]:
    """Write `<name>.jsonl` per split (utf-8, sorted keys, one object a line); return name -> sha256 of the file.

    Each file is written under a temporary name in the same folder and renamed when complete, so a killed run never
    leaves a half file that looks finished.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hashes: dict[str, str] = {}
    for name, rows in splits.items():
        final, tmp = out_dir / f"{name}.jsonl", out_dir / f".{name}.jsonl.tmp"
        digest = hashlib.sha256()
        try:
            with tmp.open("wb") as f:
                for row in rows:
                    clean = {k: v for k, v in row.items() if not k.startswith("_")}
                    line = (json.dumps(clean, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
                    digest.update(line)
                    f.write(line)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        hashes[name] = digest.hexdigest()
    return hashes


def read_split(path: Path) -> list[dict]:
    """Read one split written by write_splits. The prepared folder is checked against its COMPLETE.json first
    (once per process, as model folders are): a split edited by hand or half copied is refused, not trained on."""
    from rlhf.outputs import verify_output_dir

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such split file: run the prepare stage first (dvc repro prepare)")
    verify_output_dir(path.parent)
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{lineno}: not valid JSON ({err.msg}): rerun the prepare stage") from None
    return rows


# ------------------------------------------------------------------------------------------------------- the stage


def load_sources(params: Params) -> tuple[list[dict], dict[str, int]]:
    """Every source of params.data, concatenated; also the rows each source gave (after weighting)."""
    rows: list[dict] = []
    per_source: dict[str, int] = {}
    for src in params.data.sources:
        loaded = load_source(src, params.task, params.seed)
        per_source[src.path] = per_source.get(src.path, 0) + len(loaded)
        rows.extend(loaded)
    return rows, per_source


def prepare_data(
    params: Params, rows: list[dict], length_fn: Callable[[dict], tuple[int, int]] | None = None
) -> tuple[dict[str, list[dict]], dict]:
    """Validate loaded rows (see load_sources) and split them; return (splits, stats).

    stats: rows_loaded, rows_valid, rows_invalid, invalid (reason -> count, all reasons) and splits (name -> rows).
    """
    data = params.data
    valid, invalid = validate_rows(rows, data.invalid_rows, length_fn, data.max_prompt_tokens, data.max_seq_tokens)
    if not valid:
        bad = {k: v for k, v in invalid.items() if v}
        raise UserError(
            f"no valid rows in data.sources ({len(rows)} loaded, invalid: {bad}): fix the data, "
            "data.sources[].format or the data.max_*_tokens limits"
        )
    splits = split_phases(valid, data.split_shares, data.eval_fraction, params.seed)
    stats = {
        "rows_loaded": len(rows),
        "rows_valid": len(valid),
        "rows_invalid": len(rows) - len(valid),
        "invalid": invalid,
        "splits": {name: len(split) for name, split in splits.items()},
    }
    return splits, stats
