"""Resumable training: intermediate checkpoints that are never half-read, and the run state they carry.

A checkpoint is a folder `<root>/step-<N>` holding one DeepSpeed checkpoint per trained engine (weights, optimizer
and LR-scheduler state, sharded as ZeRO shards them), one `rank<R>.pt` per rank (RNG states of python, numpy and
torch, and the loop's own state: step, data position, KL controller, EMA, counters), and `COMPLETE.json`, written
last, listing every file with its hash and the run's fingerprint. It is built under `.tmp-step-<N>` and renamed;
a folder without a valid COMPLETE.json is never loaded and is removed. Only the newest checkpoint is kept.

The fingerprint is a hash of the params and inputs that shape training: a checkpoint of another configuration is
discarded, not resumed (DVC reruns a stage exactly when those change). Several nodes need `root` on a shared
filesystem, as DeepSpeed's own checkpoints do.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

from rlhf.pipeline.outputs import COMPLETE, sha256_file, write_json
from rlhf.training.runtime import Dist, barrier

PREFIX = "step-"

# The newest complete checkpoint this process found or wrote, and where its stage keeps them: what an interrupted
# stage tells the user (stages/common.py).
LAST: dict[str, Path | None] = {"root": None, "path": None}


def last_complete() -> tuple[Path | None, Path | None]:
    """(checkpoint folder of the running stage, its newest complete checkpoint or None)."""
    return LAST["root"], LAST["path"]


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-able parts (resolved params, input hashes, world size)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _is_complete(path: Path, fp: str) -> bool:
    """COMPLETE.json exists, names this run's fingerprint, and every listed file has its recorded hash."""
    try:
        marker = json.loads((path / COMPLETE).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("fingerprint") != fp:
        return False
    return all((path / name).is_file() and sha256_file(path / name) == digest for name, digest in marker["files"].items())


class Checkpointer:
    """Saves every `every` steps into `root` and finds the newest complete checkpoint of this run.

    Every rank calls every method (DeepSpeed saves shards collectively); rank 0 writes the marker and renames.
    `root` None or `every` 0 turns checkpointing off.
    """

    def __init__(self, root: Path | None, every: int, fp: str, dist: Dist):
        self.root = Path(root) if root is not None else None
        self.every, self.fp, self.dist = every, fp, dist
        if self.root is not None:  # on every rank: each must see it before deciding whether to meet at a barrier
            self.root.mkdir(parents=True, exist_ok=True)

    def due(self, step: int, total: int) -> bool:
        return self.root is not None and self.every > 0 and step % self.every == 0 and step < total

    def latest(self) -> Path | None:
        """The newest complete checkpoint of this run; on rank 0, removes half-written and foreign ones."""
        if self.root is None:
            return None
        LAST["root"] = self.root
        found = None
        steps = sorted((p for p in self.root.iterdir() if p.name.startswith(PREFIX)), key=lambda p: p.name, reverse=True)
        for path in steps:
            if _is_complete(path, self.fp):
                found = path
                break
        barrier()
        if self.dist.is_main:
            for path in self.root.iterdir():  # only checkpoints: whatever else is in the folder is not ours
                if path != found and path.is_dir() and path.name.startswith((PREFIX, f".tmp-{PREFIX}")):
                    why = "half-written" if path.name.startswith(".tmp-") else "incomplete, or of other params"
                    print(f"[checkpoint] removing {path} ({why})", flush=True)
                    shutil.rmtree(path, ignore_errors=True)
        barrier()
        LAST["path"] = found
        return found

    def save(self, step: int, engines: dict[str, Any], state: dict[str, Any]) -> None:
        """Write checkpoint `step`: each DeepSpeed engine, then this rank's loop state and RNG; seal and rename."""
        import torch

        assert self.root is not None
        name = f"{PREFIX}{step:08d}"
        tmp = self.root / f".tmp-{name}"
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        for tag, engine in engines.items():
            engine.save_checkpoint(str(tmp), tag=tag, save_latest=False)
        torch.save({"state": state, "rng": rng_state()}, tmp / f"rank{self.dist.rank}.pt")
        barrier()
        if self.dist.is_main:
            files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            write_json(tmp / COMPLETE, {"fingerprint": self.fp, "step": step, "files": files})
            final = self.root / name
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            LAST["path"] = final
            for old in self.root.iterdir():
                if old.name.startswith(PREFIX) and old != final:
                    shutil.rmtree(old, ignore_errors=True)
            print(f"[checkpoint] saved {final}", flush=True)
        barrier()

    def load(self, path: Path, engines: dict[str, Any]) -> dict[str, Any]:
        """Restore each engine from `path` and return this rank's saved {"state", "rng"} (RNG not yet applied:
        the caller applies it last, after rebuilding its data position, so both runs draw the same numbers)."""
        import torch

        for tag, engine in engines.items():
            loaded, _ = engine.load_checkpoint(str(path), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
            if loaded is None:
                raise RuntimeError(f"DeepSpeed could not load '{tag}' from checkpoint {path}")
        saved = torch.load(path / f"rank{self.dist.rank}.pt", weights_only=False)
        if self.dist.is_main:
            print(f"[checkpoint] resumed from {path}", flush=True)
        return saved
