"""Stage outputs that are never half-written, and the manifest that says how each was made (litgpt's
hyperparameters.yaml, nanoGPT's config in ckpt.pt)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
COMPLETE = "COMPLETE.json"  # written last: lists every file and its hash; a folder without it is unfinished
PACKAGES = ("torch", "deepspeed", "transformers", "tokenizers", "peft", "datasets", "dvc", "dvclive", "rlhf-dvc")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def hash_inputs(inputs: dict[str, Path]) -> dict[str, str]:
    """{name: sha256} of input files or folders, computed once per stage (manifest and checkpoint fingerprint)."""
    return {name: hash_path(p) for name, p in inputs.items()}


def make_manifest(
    step: str, params: dict[str, Any], input_hashes: dict[str, str], seed: int, world_size: int, **extra: Any
) -> dict[str, Any]:
    """Resolved params of the groups the step read, input hashes (see hash_inputs), versions, seed, world size."""
    return {
        "step": step,
        "params": params,
        "inputs": input_hashes,
        "seed": seed,
        "world_size": world_size,
        "versions": package_versions(),
        **extra,
    }


def hash_path(path: Path) -> str:
    """sha256 of a file, or of a folder's sorted (relative name, file hash) list."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_output_dir(out_dir: Path, fill: Callable[[Path], None], manifest: dict[str, Any]) -> None:
    """Build an output folder under a temporary name, seal it with COMPLETE.json, then rename it into place."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    fill(tmp)
    write_json(tmp / MANIFEST, manifest)
    files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    write_json(tmp / COMPLETE, {"files": files})
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


_verified: set[tuple[str, int]] = set()  # (folder, COMPLETE.json mtime) already checked in this process


def verify_output_dir(path: Path) -> None:
    """Refuse a folder this project wrote (it has a manifest) that is unfinished or whose files no longer match the
    hashes in its COMPLETE.json: a half-copied checkout, a corrupted cache object. Folders from elsewhere pass.
    Each folder is hashed once per process: PPO loads the SFT folder for the actor, the reference and the EMA."""
    from rlhf.errors import UserError

    path = Path(path)
    if not (path / MANIFEST).is_file():
        return
    key = (str(path.resolve()), (path / COMPLETE).stat().st_mtime_ns if (path / COMPLETE).is_file() else -1)
    if key in _verified:
        return
    fix = f"restore it with `dvc checkout {path}` or `dvc pull {path}`, or rebuild it with `dvc repro -f`"
    try:
        files = json.loads((path / COMPLETE).read_text())["files"]
    except (OSError, ValueError, KeyError):
        raise UserError(f"'{path}' is unfinished (no valid {COMPLETE}): {fix}") from None
    for name, digest in files.items():
        if not (path / name).is_file() or sha256_file(path / name) != digest:
            raise UserError(f"'{path / name}' does not match the hash in {COMPLETE} (corrupted or half-copied): {fix}")
    _verified.add(key)
