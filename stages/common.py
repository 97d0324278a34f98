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
    """Run a stage body; a UserError becomes one line and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except UserError as err:
        fail(str(err))
    raise AssertionError("unreachable")


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
    raise typer.Exit(code=subprocess.call(cmd, env=env))


def is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"
