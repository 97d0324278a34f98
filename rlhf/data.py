"""Data loading: every source (the builtin task, a local file or folder, a hub id) becomes rows of one schema.

A normalised row is a plain, JSON-serialisable dict::

    {"prompt": [{"role": str, "content": str}, ...],  # optional system turn, then user/assistant, ends with user
     "completion": str | None,                        # a demonstration answer (SFT)
     "chosen": str | None, "rejected": str | None,    # a preference pair (reward model)
     "source": str,                                   # the SourceConfig.path it came from
     "columns": {name: value, ...},                   # only if any: the source's other columns (reward functions)
     "conversational": True}                          # only if the source gave message lists (functions get them)

The flow is load_source -> validate_rows -> split_phases -> write_splits (prepare_data runs all of it). Several rows
may share a prompt (several answers or pairs per prompt): the split keeps all rows of one prompt together. Loading never
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
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

from rlhf.config import FORMAT_STEPS, STEPS, Params, SourceConfig, TaskConfig
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
    "duplicate_row",  # the same prompt and the same answers seen earlier (the first is kept): a copy adds nothing
)

SPLITS = ("sft_train", "sft_eval", "reward_train", "reward_eval", "ppo_train", "ppo_eval")
_PHASES = STEPS  # sft, reward, ppo

# prepare warns (one line, and metrics/prepare.json `warnings`) when a step's train split holds fewer rows than this
# fraction of the largest step's: a warning changes no result, so it is a constant, not a param.
SMALL_SPLIT_FRACTION = 0.1
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
# Columns a format reads besides those it needs; every other column of a row is kept, under `columns`, for the
# reward functions and scorers (rlhf/rewards.py).
_READ_TOO = {"preference": ("completion",), "rm_static": ("response",)}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")  # Anthropic transcript turn markers
_ASSISTANT = "\n\nAssistant:"
_FIX = {
    "prompt_too_long": "raise data.max_prompt_tokens or set data.invalid_rows: drop to skip such rows",
    "sequence_too_long": "raise data.max_seq_tokens or set data.invalid_rows: drop to skip such rows",
    "missing_column": "check data.sources[].format against the columns, or set data.invalid_rows: drop",
    "duplicate_row": "remove the copy or set data.invalid_rows: drop to skip copies",
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
    return load_source_info(src, task, seed)[0]


def load_source_info(src: SourceConfig, task: TaskConfig, seed: int) -> tuple[list[dict], dict[str, Any]]:
    """load_source, plus what identifies the source's content (see source_identity)."""
    if src.path == "builtin":
        # The shipped task has all four columns: a demonstration and a labelled pair per prompt.
        knobs = task.model_dump(exclude={"num_rows"})
        raw: list[dict] = list(generate_rows(task.num_rows, seed, **knobs))
        columns, fmt = {"prompt", "completion", "chosen", "rejected"}, "preference"
        identity: dict[str, Any] = {"format": fmt}  # params.yaml task.* and seed make it
    else:
        ds = _read(src)
        raw, columns = ds.to_list(), set(ds.column_names)
        fmt = src.format if src.format != "auto" else _detect_format(src.path, columns, raw)
        if src.format == "auto":
            _check_one_format(src.path, fmt, raw)
        identity = {"format": fmt, **source_identity(src, ds)}
        able = FORMAT_STEPS[fmt]
        cannot = [s for s in src.steps or () if s not in able]
        if cannot:
            raise UserError(
                f"data source '{src.path}' reads as format {fmt}, which cannot feed {cannot} named in its "
                f"data.sources[].steps (it feeds {list(able)}): remove them from its steps, or set its format"
            )
    rows = []
    for i in _sample(len(raw), src.weight, seed, src.path):
        try:
            row = _normalise(raw[i], fmt, columns)
        except _Bad as bad:
            row = {"prompt": [], "completion": None, "chosen": None, "rejected": None}
            row.update(_invalid=bad.reason, _detail=bad.detail)
        row.update(source=src.path, _row=i)
        rows.append(row)
    return rows, identity


def source_identity(src: SourceConfig, ds: Dataset) -> dict[str, Any]:
    """What says that a source's content changed, for the prepare manifest and metrics/prepare.json.

    A local file or folder: its sha256 (the dvc.yaml dependency on it reruns prepare; this records which content was
    read). A hub dataset: the resolved revision (the commit its cached arrow files were built from: datasets keeps
    them under .../<version>/<commit>/), its version and datasets' fingerprint of the loaded split, so a dataset that
    changed on the hub shows as a changed manifest.
    """
    path = Path(src.path).expanduser()
    if path.exists():
        from rlhf.outputs import hash_path

        return {"sha256": hash_path(path)}
    out: dict[str, Any] = {"fingerprint": getattr(ds, "_fingerprint", None)}
    version = getattr(getattr(ds, "info", None), "version", None)
    if version is not None:
        out["version"] = str(version)
    files = [f.get("filename", "") for f in getattr(ds, "cache_files", None) or []]
    commits = {Path(f).parent.name for f in files if re.fullmatch(r"[0-9a-f]{40}", Path(f).parent.name)}
    if len(commits) == 1:
        out["revision"] = commits.pop()
    return out


def _sample(n: int, weight: float, seed: int, path: str) -> list[int]:
    """Indices of the rows kept: all for weight >= 1, else a seeded random round(weight * n), in source order."""
    if weight >= 1:
        return list(range(n))
    rng = random.Random(f"{seed}:weight:{path}")  # str seeds are stable across runs (no hash randomisation)
    return sorted(rng.sample(range(n), round(weight * n)))


def _read(src: SourceConfig) -> Dataset:
    path, kind = Path(src.path).expanduser(), locate_source(src)
    if kind == "file":
        return _read_file(path, src.path)
    if kind == "folder":
        return _read_folder(path, src.path, src.split)
    return _read_hub(src)


def locate_source(src: SourceConfig) -> str:
    """Where a (non-builtin) source is, without reading it: 'file', 'folder' or 'hub'; a local path that does not
    exist raises one UserError (a dangling link, a name without its extension, a missing file)."""
    path = Path(src.path).expanduser()
    if path.is_file():
        return "file"
    if path.is_dir():
        return "folder"
    fix = "fix data.sources[].path (a local file or folder, 'builtin', or a hub id like 'Dahoas/rm-static')"
    if path.is_symlink():
        raise UserError(
            f"data source '{src.path}' is a symbolic link that leads to no file (its target "
            f"'{os.readlink(path)}' is missing, or the links form a loop): point it at the file, or {fix}"
        )
    near = [path.with_name(path.name + ext) for ext in _BUILDERS if path.with_name(path.name + ext).is_file()]
    if near:
        raise UserError(f"data source '{src.path}' not found, but '{near[0]}' is: write the file name in full")
    top = Path(src.path.split("/", 1)[0]).expanduser()
    if _looks_like_hub_id(src.path) and not top.is_dir():
        return "hub"
    local = f" ('{top}' is a local folder, so this is not a hub id)" if top.is_dir() and top != path else ""
    raise UserError(f"data source '{src.path}' not found: no such file or folder under {Path.cwd()}{local}; {fix}")


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
    if builder in ("json", "csv"):
        _check_text_file(path, name, builder)
    try:
        with _no_progress_bars(), _without_bom(path) as readable:
            return datasets.load_dataset(builder, data_files=str(readable), split="train")
    except Exception as err:  # datasets wraps parse errors in several types; all mean the same to a user
        raise UserError(
            f"data source '{name}' could not be read as {builder} ({_first_line(err)}): fix or re-export the file"
        ) from None


BOM = b"\xef\xbb\xbf"  # the UTF-8 byte-order mark many Windows tools write first


@contextlib.contextmanager
def _without_bom(path: Path) -> Iterator[Path]:
    """`path`, or a temporary copy without its leading UTF-8 byte-order mark (read as utf-8-sig, as Python's csv
    and pandas read it; datasets' JSON reader refuses the mark)."""
    if path.suffix.lower() not in (".json", ".jsonl", ".csv") or path.read_bytes()[:3] != BOM:
        yield path
        return
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / path.name
        copy.write_bytes(path.read_bytes()[3:])
        yield copy


def _check_text_file(path: Path, name: str, builder: str) -> None:
    """The first problem of a JSON (lines) or CSV file, by line, before datasets reads it (its errors name no line):
    bytes that are not UTF-8, no content, a line that does not parse, a CSV row with the wrong number of fields."""
    data = path.read_bytes().removeprefix(BOM)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserError(
            f"data source '{name}' line {line} is not UTF-8 (byte 0x{data[err.start]:02x}): re-save the file as "
            f"UTF-8 (for example iconv -f latin1 -t utf-8 {name})"
        ) from None
    if not text.strip():
        raise UserError(f"data source '{name}' is empty (no rows): fill it, or remove it from data.sources")
    if builder == "csv":
        import csv
        import io

        reader = csv.reader(io.StringIO(text), strict=True)
        try:
            header = next(reader)
            for fields in reader:
                if fields and len(fields) != len(header):
                    raise UserError(
                        f"data source '{name}' line {reader.line_num}: {len(fields)} fields where the header has "
                        f"{len(header)} ({', '.join(header)}): quote fields that hold commas, and close every quote"
                    )
        except csv.Error as err:
            raise UserError(f"data source '{name}' line {reader.line_num}: not valid CSV ({err}): close the quote "
                            "or re-export the file") from None
        return
    try:
        json.loads(text)  # one JSON document (a list of rows, or one object): fine
        return
    except json.JSONDecodeError as whole:
        first = whole
    lines = text.splitlines()
    if text.lstrip().startswith("{") and len([ln for ln in lines if ln.strip()]) > 1:  # JSON lines: one row a line
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"data source '{name}' line {number}: not valid JSON ({err.msg} at column "
                                    f"{err.colno}): fix that line (one JSON object per line)") from None
        return
    raise UserError(f"data source '{name}' line {first.lineno}: not valid JSON ({first.msg} at column {first.colno}): "
                    "fix the file there") from None


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


def _check_one_format(name: str, fmt: str, raw: list[dict]) -> None:
    """A file detected as one format whose rows are of two (prompt/completion rows among pairs, say): one line
    naming the first row of the other kind, instead of its empty columns under the detected format."""
    for i, r in enumerate(raw):
        has = {k for k, v in r.items() if v is not None}
        other = None
        if fmt in ("preference", "rm_static", "hh_rlhf") and not has & {"chosen", "rejected"}:
            other = "messages" if "messages" in has else "prompt_completion" if "completion" in has else None
        elif fmt == "messages" and "messages" not in has and "prompt" in has:
            other = "prompt_completion" if "completion" in has else "prompt"
        if other is not None:
            raise UserError(
                f"data source '{name}' mixes formats: it reads as {fmt}, but row {i} has only {sorted(has)} "
                f"(format {other}): put each format in its own file, each its own data.sources entry"
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
    if fmt == "messages" or isinstance(raw.get("prompt"), list) or implicit:
        row["conversational"] = True  # the functions get message lists, as the data gave them
    extra = {k: v for k, v in raw.items() if k not in _COLUMNS[fmt] + _READ_TOO.get(fmt, ())}
    if extra:
        try:
            json.dumps(extra, ensure_ascii=False)
        except (TypeError, ValueError):
            bad = next(k for k, v in extra.items() if not _jsonable(v))
            raise _Bad("wrong_type", f"column '{bad}' holds a {type(extra[bad]).__name__}, which a prepared split "
                       "(JSON) cannot keep") from None
        row["columns"] = extra
    return row


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return False
    return True


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
    by_source: dict[str, dict[str, int]] | None = None,
    truncate_prompts: bool = False,
    lengths: dict[str, list[tuple[int, int]]] | None = None,
) -> tuple[list[dict], dict[str, int]]:
    """Keep the rows every step can train on; return them (without private keys) and reason -> count.
    `by_source`, when given, is filled with source -> reason -> count of the rows dropped, and `lengths` with
    source -> every row's (prompt, prompt + longest answer) tokens. truncate_prompts: a prompt over the limit is
    kept (its last max_prompt_tokens tokens, at encoding) instead of dropped.

    The counts hold every reason in REASONS, zeros included. `length_fn(row)` gives (prompt tokens, tokens of the
    prompt plus its longest answer); it needs the tokenizer, so the caller supplies it, and None skips length checks.
    mode "error" raises UserError at the first bad row, naming its source, row index, reason and the fix.
    Rows that share a prompt are all kept (several answers or pairs per prompt are data; split_phases keeps them
    together); only an exact copy (same prompt, same answers) is dropped as `duplicate_row`. Duplicates are checked
    last, so an invalid first copy does not shadow a valid later one.
    """
    counts = dict.fromkeys(REASONS, 0)
    by_source = {} if by_source is None else by_source
    kept: list[dict] = []
    seen: set[str] = set()
    for index, row in enumerate(rows):
        clean = {k: v for k, v in row.items() if not k.startswith("_")}
        problem = _check(row) or _check_length(clean, length_fn, max_prompt_tokens, max_seq_tokens, truncate_prompts,
                                               lengths)
        key = json.dumps([clean.get(k) for k in ("prompt", *_ANSWERS, "columns")], sort_keys=True, ensure_ascii=False,
                         default=str)
        if problem is None and key in seen:
            problem = ("duplicate_row", "the same prompt and answers appear earlier in the data")
        if problem is not None:
            reason, detail = problem
            if mode == "error":
                where = f"data source '{row.get('source', '?')}' row {row.get('_row', index)}"
                raise UserError(f"{where}: {reason} ({detail}): {_FIX.get(reason, _DEFAULT_FIX)}")
            counts[reason] += 1
            per_source = by_source.setdefault(str(row.get("source", "?")), {})
            per_source[reason] = per_source.get(reason, 0) + 1
            continue
        seen.add(key)
        kept.append(clean)
    return kept, counts


def length_warnings(drops: dict[str, dict[str, int]], max_prompt_tokens: int, max_seq_tokens: int,
                    lengths: dict[str, list[tuple[int, int]]] | None = None) -> list[str]:
    """One line per source whose rows were dropped for length: how many, which limit, and the values that would
    keep 99% of that source's rows (the 99th percentiles of its prompt and prompt + answer lengths)."""
    out = []
    for source, reasons in sorted(drops.items()):
        prompts, sequences = reasons.get("prompt_too_long", 0), reasons.get("sequence_too_long", 0)
        if not prompts and not sequences:
            continue
        parts = ([f"{prompts} with a prompt over data.max_prompt_tokens {max_prompt_tokens}"] if prompts else []) + (
            [f"{sequences} with prompt + answer over data.max_seq_tokens {max_seq_tokens}"] if sequences else [])
        seen = sorted((lengths or {}).get(source, []))
        p99 = ""
        if seen:
            def pct(values: list[int]) -> int:
                return sorted(values)[min(len(values) - 1, int(0.99 * len(values)))]

            p99 = (f" (99% of its rows fit data.max_prompt_tokens {pct([p for p, _ in seen])} and data.max_seq_tokens "
                   f"{pct([s for _, s in seen])})")
        out.append(
            f"{prompts + sequences} rows of {source} dropped as too long ({', '.join(parts)}): raise "
            f"data.max_prompt_tokens / data.max_seq_tokens{p99} (and the model's max_position_embeddings), or set "
            "data.truncate_prompts: true to keep long prompts' last tokens"
        )
    return out


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
    truncate: bool = False,
    lengths: dict[str, list[tuple[int, int]]] | None = None,
) -> tuple[str, str] | None:
    """A row too long for the limits, or None. truncate: a long prompt counts at max_prompt_tokens (its last tokens
    are kept at encoding). `lengths` collects source -> [(prompt, sequence) tokens] for the warnings' percentiles."""
    if length_fn is None:
        return None
    prompt_tokens, seq_tokens = length_fn(row)
    if lengths is not None:
        lengths.setdefault(str(row.get("source", "?")), []).append((prompt_tokens, seq_tokens))
    if truncate and max_prompt_tokens is not None and prompt_tokens > max_prompt_tokens:
        seq_tokens -= prompt_tokens - max_prompt_tokens
        prompt_tokens = max_prompt_tokens
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


def prompt_key(row: dict) -> str:
    """The prompt group of a row: its normalised prompt messages (rows of one prompt always split together)."""
    return json.dumps(row.get("prompt"), sort_keys=True, ensure_ascii=False, default=str)


def split_phases(
    rows: list[dict],
    shares: tuple[float, float, float],
    eval_fraction: float,
    seed: int,
    steps: dict[str, list[str] | None] | None = None,
) -> dict[str, list[dict]]:
    """Cut valid rows into SFT / reward / PPO sets, each with a held-out eval split, by prompt group.

    DeepSpeed-Chat's data_split, applied to prompt groups (all rows of one prompt, see prompt_key): the groups are cut,
    in one seeded order, into three contiguous slices whose row counts follow the shares, so no prompt feeds two
    phases and each phase keeps every answer or pair of its prompts. The shares are renormalised over the phases some
    row of a group can feed (prompt/completion rows skip the reward step; prompt-only rows go to PPO only); groups
    with the same feedable phases are cut together. A row that cannot feed its group's phase (a prompt/completion row
    whose prompt went to the reward step with a pair of another source) is left out: the caller counts it as unused.

    `steps` maps a source path to the steps it names (data.sources[].steps; None or missing = shared by data_split).
    A source with one step gives it all its rows; with several, they share it by their data_split shares. A group
    with rows of such a source goes to the steps that source names, taking the group's other rows along where they
    can feed it. A group whose sources name disjoint steps (the same prompt in a dedicated SFT file and a dedicated
    preference file) is the one case where a prompt feeds two phases: each source's rows go where the user sent them.

    Then each phase holds out round(eval_fraction * prompts) prompt groups (at least 1 when it has >= 2, never all),
    and a prompt held out by one phase is held out by every phase it feeds: no eval prompt is trained on anywhere.
    SFT rows without a completion get their chosen answer as completion, so the SFT step always reads `completion`.
    """
    steps = steps or {}
    named = {src for src, st in steps.items() if st}
    allowed = []
    for row in rows:
        can = frozenset(p for p, ok in zip(_PHASES, _feeds(row)) if ok)
        allowed.append(can & frozenset(steps[row["source"]]) if row.get("source") in named else can)
        if not allowed[-1]:
            raise UserError(
                f"data source '{row['source']}' has rows that cannot feed its data.sources[].steps "
                f"{steps[row['source']]} (a prompt-only row feeds ppo only, a row without a pair cannot feed reward): "
                "fix its steps or its format"
            )
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(prompt_key(row), []).append(i)
    # A unit is rows that go to one phase together; units with the same feedable phases form a class, cut as one.
    classes: dict[tuple[tuple[str, ...], bool], list[list[int]]] = {}
    for members in groups.values():
        pinned = [i for i in members if rows[i].get("source") in named]
        if not pinned:
            parts = [(frozenset.union(*(allowed[i] for i in members)), members)]
        else:
            common = frozenset.intersection(*(allowed[i] for i in pinned))
            parts = [(common, members)] if common else _by_allowed(members, pinned, allowed)
        for able, unit in parts:
            classes.setdefault((tuple(p for p in _PHASES if p in able), bool(pinned)), []).append(unit)
    phase_of = [""] * len(rows)
    for (able, explicit), units in classes.items():
        local = [share if p in able else 0.0 for p, share in zip(_PHASES, shares)]
        if explicit and len(able) == 1:
            local = [1.0 if p in able else 0.0 for p in _PHASES]  # a source's one named step takes all its rows
        total = sum(local)
        if total <= 0:
            names = sorted({rows[i].get("source", "") for unit in units for i in unit})
            what = f"data source '{names[0]}'" if len(names) == 1 else f"data sources {names}"
            raise UserError(
                f"{what} can only feed {list(able)}, whose data.data_split shares are all 0: "
                "give those steps a share or drop the source"
            )
        order = list(range(len(units)))
        random.Random(f"{seed}:split:{'+'.join(able)}:{explicit}").shuffle(order)
        n_rows = sum(len(u) for u in units)
        bounds, cum = [], 0.0
        for share in local:
            cum += share
            bounds.append(n_rows * cum / total)
        done = 0
        for j in order:
            # A group goes to the slice that holds its middle row: row-count shares even when groups differ in size.
            middle, done = done + len(units[j]) / 2, done + len(units[j])
            phase = next((p for p, b in zip(_PHASES, bounds) if middle < b), _PHASES[-1])
            for i in units[j]:
                phase_of[i] = phase if phase in allowed[i] else ""  # "": unused (its prompt feeds another step)
    held_out: dict[str, bool] = {}  # prompt key -> held out (shared by every phase the prompt feeds)
    splits: dict[str, list[dict]] = {}
    for phase in _PHASES:
        members = [i for i in range(len(rows)) if phase_of[i] == phase]
        keys = list(dict.fromkeys(prompt_key(rows[i]) for i in members))
        n = len(keys)
        n_eval = min(max(1, round(eval_fraction * n)), n - 1) if n >= 2 else 0
        free = [k for k in keys if k not in held_out]
        random.Random(f"{seed}:eval:{phase}").shuffle(free)
        need = max(0, n_eval - sum(held_out.get(k, False) for k in keys))
        held_out.update({k: j < need for j, k in enumerate(free)})
        # Shuffled, so that the first rows of a split (evaluate reads a prefix) come from every source and prompt.
        random.Random(f"{seed}:order:{phase}").shuffle(members)
        chosen = [rows[i] if phase != "sft" or rows[i].get("completion") is not None
                  else {**rows[i], "completion": rows[i]["chosen"]} for i in members]
        splits[f"{phase}_eval"] = [r for r in chosen if held_out[prompt_key(r)]]
        splits[f"{phase}_train"] = [r for r in chosen if not held_out[prompt_key(r)]]
    return {name: splits[name] for name in SPLITS}


def _by_allowed(
    members: list[int], pinned: list[int], allowed: list[frozenset]
) -> list[tuple[frozenset, list[int]]]:
    """The rows of one prompt whose sources named disjoint steps, grouped by those steps; the prompt's rows from
    sources without steps go along with the first group."""
    parts: dict[frozenset, list[int]] = {}
    for i in pinned:
        parts.setdefault(allowed[i], []).append(i)
    first, pinned_set = next(iter(parts)), set(pinned)
    parts[first].extend(i for i in members if i not in pinned_set)
    return list(parts.items())


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
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({err.msg}): rerun the prepare stage") from None
                missing = [k for k in _SPLIT_KEYS.get(path.stem.split("_")[0], ()) if not isinstance(row, dict) or k not in row]
                if missing:
                    raise UserError(f"{path}:{lineno}: the row has no {' or '.join(missing)}: this is not a split prepare "
                                    "wrote; rerun the prepare stage (dvc repro prepare)")
                rows.append(row)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text: rerun the prepare stage (dvc repro prepare)") from None
    return rows


# The keys every row of a split has (by the split name's first word), as write_splits writes them.
_SPLIT_KEYS = {"sft": ("prompt",), "reward": ("prompt", "chosen", "rejected"), "ppo": ("prompt",), "ptx": ("text",)}


# ------------------------------------------------------------------------------------------------------- the stage


def load_sources(params: Params) -> tuple[list[dict], dict[str, int]]:
    """Every source of params.data, concatenated; also the rows each source gave (after weighting)."""
    rows, per_source, _ = load_sources_info(params)
    return rows, per_source


def load_sources_info(params: Params) -> tuple[list[dict], dict[str, int], dict[str, dict[str, Any]]]:
    """load_sources, plus each source's identity (sha256 of a local source, revision of a hub one)."""
    rows: list[dict] = []
    per_source: dict[str, int] = {}
    identity: dict[str, dict[str, Any]] = {}
    for src in params.data.sources:
        loaded, identity[src.path] = load_source_info(src, params.task, params.seed)
        per_source[src.path] = per_source.get(src.path, 0) + len(loaded)
        rows.extend(loaded)
    return rows, per_source, identity


def load_ptx_texts(src: SourceConfig) -> list[str]:
    """The non-empty `text` values of data.ptx_source, in order; one UserError when it has no such column or none."""
    ds = _read(src)
    if "text" not in ds.column_names:
        raise UserError(
            f"data.ptx_source '{src.path}' has no `text` column (columns: {', '.join(ds.column_names)}): give rows "
            'of plain text as {"text": ...}, or set data.ptx_source: null to mix in the SFT demonstrations'
        )
    texts = [t for t in ds["text"] if isinstance(t, str) and t.strip()]
    if not texts:
        raise UserError(f"data.ptx_source '{src.path}' has no non-empty text: fill its `text` column or set it to null")
    return texts


def check_sources_tracked(sources: list[SourceConfig], dvc_yaml: Path) -> None:
    """Refuse a local source that the `prepare` stage of dvc_yaml does not depend on: DVC would never rerun prepare
    when the user edits it (the shipped dvc.yaml depends on data/sources/). No dvc.yaml, or no prepare stage in it,
    means the stage runs outside DVC and there is nothing to check. A dep covers a source when it is the same path
    or a folder above it; paths are compared as written (symlinks are not followed: DVC hashes what they point at)."""
    import yaml

    if not dvc_yaml.is_file():
        return
    try:
        stage = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {}).get("prepare")
    except (yaml.YAMLError, AttributeError):
        return  # dvc itself reports a broken dvc.yaml
    if not isinstance(stage, dict):
        return
    wdir = dvc_yaml.parent / str(stage.get("wdir", "."))
    deps = [Path(os.path.abspath(wdir / d)) for d in stage.get("deps") or [] if isinstance(d, str)]
    for src in sources:
        path = Path(src.path).expanduser()
        if src.path == "builtin" or not path.exists():
            continue  # builtin is params; a hub id has no file (its revision goes in the manifest)
        where = Path(os.path.abspath(path))
        if not any(where == d or d in where.parents for d in deps):
            raise UserError(
                f"data source '{src.path}' is not a dependency of the prepare stage in {dvc_yaml}, so DVC would not "
                "rerun prepare when it changes: move it under data/sources/ (a dependency already) and update "
                "data.sources[].path, or add its path to the deps of the prepare stage"
            )


def prepare_data(
    params: Params, rows: list[dict], length_fn: Callable[[dict], tuple[int, int]] | None = None
) -> tuple[dict[str, list[dict]], dict]:
    """Validate loaded rows (see load_sources) and split them; return (splits, stats).

    stats: rows_loaded, rows_valid, rows_invalid, invalid (reason -> count, all reasons), splits (name -> rows),
    prompts (name -> distinct prompts), sources (path -> {steps, rows_valid, split name -> rows}) and warnings (one
    line each: a step's train split under SMALL_SPLIT_FRACTION of the largest, valid rows left unused).
    Raises UserError, before anything is written, when a step's train or eval split would be empty.
    """
    data = params.data
    drops: dict[str, dict[str, int]] = {}
    lengths: dict[str, list[tuple[int, int]]] = {}
    valid, invalid = validate_rows(rows, data.invalid_rows, length_fn, data.max_prompt_tokens, data.max_seq_tokens,
                                   drops, data.truncate_prompts, lengths)
    if not valid:
        bad = {k: v for k, v in invalid.items() if v}
        raise UserError(
            f"no valid rows in data.sources ({len(rows)} loaded, invalid: {bad}): fix the data, "
            "data.sources[].format or the data.max_*_tokens limits"
        )
    steps = {src.path: src.steps for src in data.sources}
    splits = split_phases(valid, data.split_shares, data.eval_fraction, params.seed, steps)
    # A reward from rewards.functions alone needs no reward model: with no preference pair at all, step 2 is skipped
    not_needed = ("reward",) if params.rewards.model_weight == 0 else ()
    skipped = _check_not_empty(splits, valid, data.split_shares, steps, not_needed)
    sources: dict[str, dict[str, Any]] = {}
    for src in data.sources:
        entry = sources.setdefault(src.path, {"steps": src.steps or f"data_split {data.data_split}", "rows_valid": 0})
        entry.update(dict.fromkeys(SPLITS, 0))
    for row in valid:
        sources.setdefault(row.get("source", ""), {"steps": None, "rows_valid": 0, **dict.fromkeys(SPLITS, 0)})
        sources[row.get("source", "")]["rows_valid"] += 1
    for name, split in splits.items():
        for row in split:
            sources[row.get("source", "")][name] += 1
    for entry in sources.values():
        entry["unused"] = entry["rows_valid"] - sum(entry[name] for name in SPLITS)
    unused = sum(entry["unused"] for entry in sources.values())
    steps_of: dict[str, set[str]] = {}
    for name, split in splits.items():
        for row in split:
            steps_of.setdefault(prompt_key(row), set()).add(name.rsplit("_", 1)[0])
    stats = {
        "rows_loaded": len(rows),
        "rows_valid": len(valid),
        "rows_invalid": len(rows) - len(valid),
        "invalid": invalid,
        "splits": {name: len(split) for name, split in splits.items()},
        "prompts": {name: len({prompt_key(r) for r in split}) for name, split in splits.items()},
        "prompts_valid": len({prompt_key(r) for r in valid}),
        "rows_unused": unused,  # valid rows whose prompt went to a step they cannot feed
        "prompts_in_several_steps": sum(len(s) > 1 for s in steps_of.values()),  # only where sources' steps say so
        "sources": sources,
        "skipped_steps": skipped,  # steps with no data that the run does not need (read by their stages)
        "warnings": length_warnings(drops, data.max_prompt_tokens, data.max_seq_tokens, lengths)
        + split_warnings(splits, unused, skipped),
    }
    return splits, stats


def _check_not_empty(
    splits: dict[str, list[dict]],
    valid: list[dict],
    shares: tuple[float, ...],
    steps: dict[str, list[str] | None],
    not_needed: tuple[str, ...] = (),
) -> list[str]:
    """Every step the pipeline runs needs training rows and eval rows: an empty split stops prepare, with the reason
    and the fix, before anything is written (the training stages would refuse it later, after the wait). A step in
    `not_needed` that no valid row can feed is skipped instead: the skipped steps are returned."""
    skipped: list[str] = []
    for phase, share in zip(_PHASES, shares):
        if splits[f"{phase}_train"]:
            continue
        index = _PHASES.index(phase)
        feeders = [r for r in valid if _feeds(r)[index]]
        named = [p for p, st in steps.items() if st and phase in st]
        if not feeders and phase in not_needed:
            skipped.append(phase)
            continue
        if not feeders:
            what = "a preference pair" if phase == "reward" else "an answer (a completion, or a pair's chosen)"
            kind = "prompt/chosen/rejected" if phase == "reward" else "prompt/completion, messages or preference"
            why, fix = f"no valid row has {what}", f"add a {kind} source"
            if phase == "reward":
                fix += " (or, for a reward from rewards.functions alone, set rewards.model_weight: 0)"
        elif not named and all(steps.get(r.get("source", "")) for r in feeders):
            why, fix = "every source that could feed it names other steps", f"add {phase} to a data.sources[].steps"
        elif not named and share <= 0:
            why, fix = f"data.data_split gives {phase} a share of 0", f"give {phase} a share in data.data_split"
        else:
            n = len({prompt_key(r) for r in feeders})
            why = f"the {len(feeders)} rows that could feed it ({n} prompts) went to other steps or to {phase}_eval"
            fix = f"raise {phase}'s share in data.data_split, give a source steps: [{phase}], or add prompts"
        raise UserError(f"{phase}_train is empty (0 rows), so the {phase} stage would train on nothing: {why}: {fix}")
    for phase in _PHASES:
        if phase not in skipped and not splits[f"{phase}_eval"]:  # one prompt: held out it leaves nothing to train
            n = len({prompt_key(r) for r in splits[f"{phase}_train"]})
            raise UserError(
                f"{phase}_eval is empty (0 rows; {phase} has {n} prompt, all in {phase}_train), so the {phase} stage's "
                f"eval metrics would measure nothing: give {phase} rows with at least 2 distinct prompts (one is held "
                "out), e.g. a larger data.data_split share"
            )
    return skipped


def split_warnings(splits: dict[str, list[dict]], unused: int = 0, skipped: Sequence[str] = ()) -> list[str]:
    """One line per split that will train or measure badly: a train split far smaller than the largest one (under
    SMALL_SPLIT_FRACTION of its rows; a skipped step has none by design), and one when valid rows went unused (their
    prompt went to a step they cannot feed)."""
    sizes = {p: len(splits[f"{p}_train"]) for p in _PHASES if p not in skipped}
    largest = max(sizes, key=lambda p: sizes[p])
    out = []
    for phase, n in sizes.items():
        if n < SMALL_SPLIT_FRACTION * sizes[largest]:
            out.append(
                f"{phase}_train has {n} rows, {100 * n / sizes[largest]:.1f}% of {largest}_train's {sizes[largest]} "
                f"(under {SMALL_SPLIT_FRACTION:.0%}): {phase} will learn from little; give it a larger data.data_split "
                f"share or a source with steps: [{phase}]"
            )
    if unused:
        out.append(
            f"{unused} valid rows unused: their prompt went to a step they cannot feed (a prompt feeds one step); "
            "name each source's steps (data.sources[].steps) to use them all"
        )
    return out
