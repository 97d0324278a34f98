"""What every stage command shares: loading params, turning bad input into one line and exit code 2, and
re-running itself under the `deepspeed` launcher when params ask for more than one process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from rlhf.config import Params, load_params
from rlhf.errors import UserError

T = TypeVar("T")

PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params", help="params.yaml with every hyperparameter")


def fail(message: str) -> None:
    """One line on stderr, exit code 2, no traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def guarded(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a stage body; a UserError becomes one line and exit code 2. Under the launcher, a rank that lost its
    peers (one of them died) says so in one line and exits 3; the launcher then stops the rest and the parent
    command explains (see relaunch_if_distributed)."""
    try:
        return fn(*args, **kwargs)
    except UserError as err:
        fail(str(err))
    except RuntimeError as err:
        if not (launched() and _lost_peer(err)):
            raise
        typer.echo(f"[rank {os.environ.get('RANK')}] stopped: lost contact with another rank ({str(err)[:160]})", err=True)
        raise typer.Exit(code=3) from None
    raise AssertionError("unreachable")


def _lost_peer(err: RuntimeError) -> bool:
    import torch

    text = str(err)
    return isinstance(err, torch.distributed.DistError) or any(s in text for s in ("gloo", "NCCL", "Connection reset"))


def read_params(path: Path) -> Params:
    return guarded(load_params, path)


def launched() -> bool:
    """True inside a process that the deepspeed launcher started."""
    return "LOCAL_RANK" in os.environ


def relaunch_if_distributed(params: Params) -> bool:
    """When engine.num_procs > 1 or a hostfile is set, run this same command under the deepspeed launcher (one
    process per rank) and exit with its code. Returns False when the caller should just run in this process."""
    engine = params.engine
    if launched() or (engine.num_procs == 1 and not engine.hostfile):
        return False
    from rlhf.engine import _free_port, resolve_device

    device = guarded(resolve_device, engine)
    env = dict(os.environ, DS_ACCELERATOR="cpu" if device == "cpu" else "cuda")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(_free_port())]
    if engine.hostfile:
        if not Path(engine.hostfile).is_file():
            fail(f"engine.hostfile '{engine.hostfile}' does not exist: give a DeepSpeed hostfile or clear it")
        cmd += ["--hostfile", engine.hostfile]
    cmd += ["--num_gpus", str(engine.num_procs), "--module", "stages.cli", *sys.argv[1:]]
    typer.echo(f"launching {engine.num_procs} ranks per node: {' '.join(cmd[2:])}", err=True)
    code = subprocess.call(cmd, env=env)
    if code not in (0, 2):  # 2: the ranks already printed the bad input
        # the launcher exits with the failed rank's code; a signal -N comes back as 256 - N
        how = f"was killed by signal {256 - code}" if code > 128 else f"exited with code {code}"
        typer.echo(
            f"error: the {engine.num_procs}-rank job stopped: a rank {how} and the launcher "
            "stopped the others (see the lines above). Rerun the same command: training resumes from the newest "
            "checkpoint (checkpoint_every in params.yaml)",
            err=True,
        )
    raise typer.Exit(code=code)


def is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"
