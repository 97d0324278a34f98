"""Reading data sources: local files and folders (json, jsonl, csv, parquet, arrow), hub datasets, the shipped task."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from rlhf.config import FORMAT_STEPS, SourceConfig, TaskConfig
from rlhf.data.task import generate_rows
from rlhf.errors import UserError

if TYPE_CHECKING:
    from datasets import Dataset
from rlhf.data.formats import BadRow, check_one_format, detect_format, normalise

# Local file suffix -> datasets packaged builder.
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
        ds = read_source(src)
        raw, columns = ds.to_list(), set(ds.column_names)
        fmt = src.format if src.format != "auto" else detect_format(src.path, columns, raw)
        if src.format == "auto":
            check_one_format(src.path, fmt, raw)
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
            row = normalise(raw[i], fmt, columns)
        except BadRow as bad:
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
        from rlhf.pipeline.outputs import hash_path

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


def read_source(src: SourceConfig) -> Dataset:
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
