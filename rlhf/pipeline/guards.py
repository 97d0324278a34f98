"""Checks on paths before a stage writes: outputs that would overwrite inputs, folders that are not models, free space."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from rlhf.errors import UserError
from rlhf.pipeline.outputs import COMPLETE, MANIFEST, check_output_dir, check_path, read_manifest, resolved, sha256_file


def check_output_file(path: Path, inputs: Iterable[Path | str | None] = (), *, option: str = "--metrics") -> None:
    """Refuse, before any work, an output file path that names a folder, lies inside a file, or is (or lies inside)
    an input of the stage."""
    check_path(Path(path), option, inputs, folder=False)


def check_outputs(
    inputs: Iterable[Path | str | None],
    folders: Iterable[tuple[str, Path]] = (),
    files: Iterable[tuple[str, Path]] = (),
    scratch: Iterable[tuple[str, Path | None]] = (),
) -> None:
    """Every output check a stage makes at its start, in one call, before any work: `folders` are replaced whole
    (write_output_dir), `files` are JSON/Markdown outputs, `scratch` folders are written into (dvclive,
    checkpoints). Each output is (option that named it, path); no two of different options may be one path or one
    inside another (models/ppo and its actor/ are both --out)."""
    from rlhf.errors import UserError

    inputs = list(inputs)
    named: list[tuple[str, Path]] = []
    for option, path in folders:
        check_output_dir(path, inputs, option=option)
        named.append((option, Path(path)))
    for option, path in scratch:
        if path is not None:
            check_output_dir(path, inputs, option=option, owned=False)
            named.append((option, Path(path)))
    for option, path in files:
        check_output_file(path, inputs, option=option)
        named.append((option, Path(path)))
    for i, (a, pa) in enumerate(named):
        for b, pb in named[i + 1 :]:
            ra, rb = resolved(pa), resolved(pb)
            if a != b and (ra == rb or ra.is_relative_to(rb) or rb.is_relative_to(ra)):
                raise UserError(f"{a} '{pa}' and {b} '{pb}' overlap: give each output a path of its own")


_verified: set[tuple[str, int]] = set()  # (folder, COMPLETE.json mtime) already checked in this process


def verify_output_dir(path: Path) -> None:
    """Refuse a folder this project wrote (it has a manifest) that is unfinished or whose files no longer match the
    hashes in its COMPLETE.json: a half-copied checkout, a corrupted cache object, a split file edited by hand.
    Folders from elsewhere pass. Each folder is hashed once per process: PPO loads the SFT folder for the actor,
    the reference and the EMA; a stage reads several splits of data/prepared."""
    from rlhf.errors import UserError

    path = Path(path)
    if not (path / MANIFEST).is_file():
        return
    key = (str(path.resolve()), (path / COMPLETE).stat().st_mtime_ns if (path / COMPLETE).is_file() else -1)
    if key in _verified:
        return
    try:
        step = json.loads((path / MANIFEST).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        step = None
    rebuild = f"`dvc repro -f {step}` (or `rlhf {step.replace('_', '-')}`)" if isinstance(step, str) else "`dvc repro -f`"
    fix = f"restore it with `dvc checkout {path}` (or `dvc pull {path}`), or rebuild it with {rebuild}"
    try:
        files = json.loads((path / COMPLETE).read_text())["files"]
    except (OSError, ValueError, KeyError):
        raise UserError(f"'{path}' is unfinished (no valid {COMPLETE}): {fix}") from None
    for name, digest in files.items():
        if not (path / name).is_file() or sha256_file(path / name) != digest:
            raise UserError(f"'{path / name}' does not match the hash in {COMPLETE} (corrupted or half-copied): {fix}")
    _verified.add(key)


_KINDS = {"causal_lm": ("ForCausalLM", "LMHeadModel"), "classifier": ("ForSequenceClassification",)}
_KIND_NAMES = {"causal_lm": "a causal LM (an actor)", "classifier": "a sequence classifier (a reward model)"}


def check_model_folder(path: Path | str, kind: str | None = None, option: str = "the model") -> None:
    """Refuse, in one line, a local model folder that would fail (or, worse, load) later: a missing or one level too
    high folder, the base_model stage's placeholder, an invalid config.json, a model of the wrong kind (`kind`:
    causal_lm or classifier, from config.json's architectures), damaged safetensors. A hub id is left to the loader.
    `option` names where the path came from (--sft, model.name_or_path)."""
    path = Path(path)
    if not path.exists():
        if str(path).startswith((".", "/", "~")) or str(path).count("/") != 1:
            raise UserError(f"{option} '{path}': no such model folder: give a folder written by save_pretrained")
        return  # owner/name: a hub id
    config = path / "config.json"
    if not config.is_file():
        made = read_manifest(path)
        if made.get("step") == "base_model":
            raise UserError(
                f"{option} '{path}' is the base_model stage's placeholder (base_model.source: none): set "
                "base_model.source to a model package (README: a real pretrained model), or point it at another model"
            )
        inner = sorted(p.parent for p in path.glob("*/config.json"))
        if inner:
            raise UserError(f"{option} '{path}' holds no model, but '{inner[0]}' does: point it there")
        raise UserError(f"{option} '{path}' has no config.json: run the stage that writes it (dvc repro), or give a "
                        "folder written by save_pretrained")
    try:
        archs = json.loads(config.read_text()).get("architectures") or []
    except (ValueError, UnicodeDecodeError, AttributeError) as err:
        where = f" at line {err.lineno}" if isinstance(err, json.JSONDecodeError) else ""
        raise UserError(f"'{config}' is not valid JSON{where}: restore it (dvc checkout {path}) or re-save the model "
                        "with save_pretrained") from None
    if kind is not None and archs:
        other = next((k for k in _KINDS if k != kind), kind)
        if not any(a.endswith(_KINDS[kind]) for a in archs) and any(a.endswith(_KINDS[other]) for a in archs):
            fix = "the SFT or step-3 actor (models/sft, models/ppo/actor)" if kind == "causal_lm" else \
                "the reward stage's output (models/reward)"
            raise UserError(f"{option} '{path}' is {_KIND_NAMES[other]} ({archs[0]}), not {_KIND_NAMES[kind]}: pass "
                            f"{fix}")
    for weights in sorted(path.glob("*.safetensors")):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(weights), "pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise UserError(f"'{weights}' is damaged ({str(err).splitlines()[0][:80]}): restore it with `dvc checkout "
                            f"{path}` (or `dvc pull {path}`), or rebuild it (dvc repro -f)") from None


def folder_bytes(path: Path | str | None) -> int:
    """Bytes of a model folder's weight files (0 for None or a hub id)."""
    if path is None or not Path(path).is_dir():
        return 0
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.suffix in (".safetensors", ".bin"))


def check_free_space(out: Path, needed: int, what: str) -> None:
    """Refuse to start writing `out` when its disk has less than `needed` bytes free (plus 5%): one line with the
    path, what was needed and what is free, instead of ENOSPC halfway through a folder."""
    from rlhf import faults

    out = Path(out)
    existing = next(p for p in (out, *out.parents) if p.exists())
    free = faults.free_bytes(str(existing))
    if free < needed * 1.05:
        raise UserError(
            f"no room to write {what} '{out}': it needs about {_size(needed)} and the disk of '{existing}' "
            f"has {_size(free)} free; free some space (or point --out elsewhere) and rerun: the stage's "
            "checkpoint keeps the training done, so the rerun resumes from it"
        )


def _size(n: float) -> str:
    """1.5 GiB, 12 MiB, 300 KiB, 20 bytes."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}" if n < 10 * scale else f"{n / scale:.0f} {unit}"
    return f"{int(n)} bytes"

