"""Output folders a stage writes: written aside then swapped in, with a manifest and COMPLETE.json last."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
from collections.abc import Callable, Iterable
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
    """Build an output folder under a temporary name, seal it with COMPLETE.json, then swap it into place.

    The swap never leaves `out_dir` missing or half deleted: the previous folder is renamed aside
    (`.NAME.old-PID`), the new one renamed in, and only then is the old one deleted. A run killed anywhere in
    between leaves leftovers that the next write (or stage start, see check_output_dir) sweeps up: the previous
    folder is put back if the kill came between the two renames. A folder this project did not write is refused
    (check_output_dir), never replaced."""
    from rlhf import faults

    out_dir = Path(out_dir)
    check_output_dir(out_dir)  # the stage checked at its start; this guards library callers
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(out_dir)
    tmp, old = _leftover(out_dir, "tmp"), _leftover(out_dir, "old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        if (tmp / "config.json").is_file() and not (tmp / "README.md").exists():  # a model: its card
            from rlhf.models.cards import model_card

            (tmp / "README.md").write_text(model_card(tmp, manifest, str(out_dir)))
        write_json(tmp / MANIFEST, manifest)
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        write_json(tmp / COMPLETE, {"files": files})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    faults.kill_at_point("replace:sealed")
    if out_dir.exists():
        os.rename(out_dir, old)
    faults.kill_at_point("replace:aside")
    os.rename(tmp, out_dir)
    faults.kill_at_point("replace:renamed")
    shutil.rmtree(old, ignore_errors=True)


# .NAME.tmp-PID (being built) and .NAME.old-PID (the previous folder, moved aside) beside an output
LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>[0-9]+)$")


def _leftover(out: Path, kind: str) -> Path:
    return out.with_name(f".{out.name}.{kind}-{os.getpid()}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():  # this process writes one output at a time: its own leftovers are from an earlier try
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (alive), or not a pid we can ask about: leave it alone
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sweep_leftovers(out: Path) -> None:
    """Remove what killed writes of `out` (by this project, whose process is gone) left beside it. If the kill
    came between moving the previous folder aside and renaming the new one in, `out` is missing: the previous folder
    is put back (the run that was killed did not finish, so what it built is discarded). Leftovers of a process
    that is still running are left alone."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    found = []
    for entry in out.parent.iterdir():
        m = LEFTOVER.match(entry.name)
        if m and m["name"] == out.name and not _alive(int(m["pid"])):
            found.append((m["kind"] != "old", entry))  # the previous folders first
    for _, entry in sorted(found):
        if entry.name.startswith(f".{out.name}.old-") and not out.exists() and not out.is_symlink():
            try:
                os.rename(entry, out)
            except OSError:  # another rank put it back first
                continue
            print(f"[outputs] put back {out} from {entry.name} (a run was killed while replacing it)", flush=True)
        else:
            _remove(entry)


def read_manifest(folder: Path | str) -> dict[str, Any]:
    """The manifest this project wrote in `folder` (make_manifest), or {} when there is none, it does not parse, or it
    is some other tool's manifest.json."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and {"step", "versions"} <= set(data) else {}


def skipped_steps(data_dir: Path) -> list[str]:
    """The steps prepare skipped for want of data the run does not need (its manifest's stats.skipped_steps)."""
    return list(read_manifest(data_dir).get("stats", {}).get("skipped_steps", []))


def is_placeholder(path: Path | str) -> bool:
    """Whether `path` is the placeholder of the reward or dpo stage (no preference pair to train on), not a model."""
    made = read_manifest(path)
    return not (Path(path) / "config.json").is_file() and made.get("step") in ("reward", "dpo") and (
        made.get("metrics", {}).get("trained") is False
    )


def write_placeholder(
    step: str, manifest_params: dict[str, Any], seed: int, data_dir: Path, out_dir: Path, live_dir: Path | None,
    ckpt_dir: Path | None, text: str,
) -> dict[str, Any]:
    """The output of a step that had no preference pair to train on (reward, dpo): out_dir holds README.txt and a
    manifest whose metrics say trained: false; the stage's curves and checkpoints exist, empty."""
    metrics: dict[str, Any] = {"trained": False, "pairs": 0}
    if os.environ.get("RANK", "0") == "0":
        # The stage's other outputs exist too, empty: no curve (an earlier model's are dropped), no checkpoint (DVC
        # requires every declared output)
        if live_dir is not None:
            shutil.rmtree(live_dir, ignore_errors=True)
            (live_dir / "plots" / "metrics").mkdir(parents=True)
        if ckpt_dir is not None:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
        manifest = make_manifest(
            step, manifest_params, hash_inputs({"reward_train": data_dir / "reward_train.jsonl"}),
            seed=seed, world_size=1, metrics=metrics,
        )
        write_output_dir(out_dir, lambda tmp: (tmp / "README.txt").write_text(text), manifest)
    return metrics



def _is_manifest(path: Path) -> bool:
    """Whether `path` is a manifest this project wrote (make_manifest), not some other tool's manifest.json."""
    return path.name == MANIFEST and bool(read_manifest(path.parent))


def _foreign(folder: Path) -> Path | None:
    """The first entry of `folder` that this project did not write, or None: a folder is ours when it holds our
    manifest, or holds only folders that are ours and our own leftovers (models/ppo: actor/, critic/, actor_ema/)."""
    if _is_manifest(folder / MANIFEST):
        return None
    for entry in sorted(folder.iterdir()):
        if LEFTOVER.match(entry.name) and entry.is_dir():
            continue
        if not entry.is_dir() or entry.is_symlink():
            return entry
        inner = _foreign(entry)
        if inner is not None:
            return inner
    return None


def resolved(path: Path | str) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def check_path(path: Path, option: str, inputs: Iterable[Path | str | None], folder: bool) -> Path:
    """The rules every output path obeys; returns it resolved."""
    from rlhf.errors import UserError

    path = Path(path)
    for p in path.parents:
        if p.exists() and not p.is_dir():
            raise UserError(f"{option} '{path}' is inside '{p}', which is a file: give a path under a folder")
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"{option} '{path}' is a file, not a folder: give a folder path (or move the file away)")
    if not folder and path.is_dir():
        raise UserError(f"{option} '{path}' is a folder, not a file: give a file path, e.g. {path / 'out.json'}")
    res, cwd = resolved(path), Path.cwd().resolve()
    if res == cwd or cwd.is_relative_to(res):
        raise UserError(
            f"{option} '{path}' is the working folder or a folder above it, and writing it would replace or clear "
            "what it holds: give the output a folder of its own below the working folder"
        )
    if folder and any((res / marker).exists() for marker in (".git", ".dvc", "dvc.yaml")):
        raise UserError(f"{option} '{path}' is the root of a repository: give a folder of its own inside it")
    for inp in inputs:
        if inp is None or str(inp) == "" or not Path(inp).exists():
            continue  # not a local path (a hub id, an unset model)
        ires = resolved(inp)
        if ires == res or ires.is_relative_to(res):
            what = "is" if ires == res else "holds"
            raise UserError(
                f"{option} '{path}' {what} this stage's input '{inp}': writing it would destroy what the stage "
                "reads; give another path"
            )
        if res.is_relative_to(ires):
            raise UserError(
                f"{option} '{path}' is inside this stage's input '{inp}': writing it would change what the stage "
                "reads; give a path outside it"
            )
    return res


def check_output_dir(
    out: Path, inputs: Iterable[Path | str | None] = (), *, option: str = "--out", owned: bool = True
) -> None:
    """Refuse, before any work, an output folder whose replacement would destroy what this project did not write:
    a file, the working folder (or one above it), a repository root, an input of the stage (or a folder holding
    one, or one inside one), or (`owned`, for folders write_output_dir replaces whole) a folder holding anything
    without our manifest. Leftovers of killed writes beside it are swept first (sweep_leftovers), on rank 0.
    `owned=False` is for folders that are written into, not replaced (dvclive, checkpoints)."""
    from rlhf.errors import UserError

    out = Path(out)
    check_path(out, option, inputs, folder=True)
    # rank 0 only, and on node 0 only (a leftover's pid means something on the host that wrote it)
    if owned and os.environ.get("RANK", "0") == "0" and os.environ.get("RLHF_NODE_RANK", "0") == "0":
        sweep_leftovers(out)
    if owned and out.is_dir():
        stray = _foreign(out)
        if stray is not None:
            raise UserError(
                f"{option} '{out}' holds files this project did not write (e.g. '{stray}', no {MANIFEST} of ours "
                "beside it) and would be replaced: give a new or empty folder, or move those files away"
            )

