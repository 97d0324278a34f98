"""What every stage command shares: loading params, turning bad input into one line and exit code 2, and
re-running itself under the `deepspeed` launcher when params ask for more than one process."""

from __future__ import annotations

import errno
import os
import signal
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
    """One line on stderr, exit code 2, no traceback (under `dvc repro`, with what became of the earlier outputs)."""
    typer.echo(f"error: {message}{_under_dvc()}", err=True)
    raise typer.Exit(code=2)


def _under_dvc() -> str:
    """Under `dvc repro` (DVC_STAGE is set): the check stage stopped the run before any stage started; any other
    stage's outputs were removed by DVC before its command ran, so say how to bring the last ones back."""
    stage = os.environ.get("DVC_STAGE")
    if not stage:
        return ""
    if stage == "check":
        return " (dvc repro stopped before any stage ran: every earlier output is as it was)"
    import yaml

    try:
        spec = yaml.safe_load((Path(os.environ.get("DVC_ROOT", ".")) / "dvc.yaml").read_text())["stages"][stage]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return ""
    names = [(o, {}) if isinstance(o, str) else next(iter(o.items())) for k in ("outs", "metrics", "plots")
             for o in spec.get(k) or []]
    uncached = [n for n, opts in names if (opts or {}).get("cache") is False and not (opts or {}).get("persist")]
    metrics = f", `git checkout HEAD -- {' '.join(uncached)}` its committed metrics and curves" if uncached else ""
    return f" (DVC removed this stage's outputs first: `dvc checkout {stage}` restores its cached outputs{metrics})"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised wherever the process is, so that a stage stops as it does on Ctrl-C."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def install_signal_handlers() -> None:
    """SIGTERM (a scheduler, `kill`, the deepspeed launcher stopping its ranks) stops a stage like Ctrl-C does."""
    signal.signal(signal.SIGTERM, _on_sigterm)


def interrupted(term: bool) -> None:
    """One line saying where the newest complete checkpoint is and that a rerun resumes from it; exit 130 (Ctrl-C)
    or 143 (SIGTERM). Output folders are written whole or not at all, so nothing is left half-written."""
    from rlhf.training.checkpoint import last_complete

    how = "stopped by SIGTERM" if term else "interrupted (Ctrl-C)"
    root, path = last_complete()
    if path is not None:
        line = (f"{how}: the last complete checkpoint is {path}; rerun the same command (or `dvc repro`) to resume "
                "from it")
    elif root is not None:
        line = (f"{how} before the first checkpoint in {root}: rerun the same command (or `dvc repro`) to start "
                "again; no output was written")
    else:
        line = f"{how}: no output was written; rerun the same command (or `dvc repro`)"
    if is_main_rank():
        # under the launcher the parent command prints the one error line (a SIGTERM there is usually the launcher
        # stopping this rank because another one died); this rank's line only says where its checkpoint is
        typer.echo(f"[rank 0] {line}" if launched() else f"error: {line}", err=True)
    raise typer.Exit(code=143 if term else 130)


def guarded(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a stage body; a UserError becomes one line and exit code 2. Under the launcher, a rank that lost its
    peers (one of them died) says so in one line and exits 3; the launcher then stops the rest and the parent
    command explains (see relaunch_if_distributed)."""
    try:
        return fn(*args, **kwargs)
    except UserError as err:
        fail(str(err))
    except KeyboardInterrupt as err:
        interrupted(isinstance(err, Terminated))
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        fail(f"no space left on the disk while writing '{err.filename or '?'}': free some space and rerun the "
             "stage (a training stage resumes from its last checkpoint)")
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


# Multi-node without ssh (DeepSpeed's --no_ssh): run the same command on every node with these set. They say how this
# machine joins the job, not what it computes, so they are environment, not params.
NODE_RANK, MASTER_ADDR, MASTER_PORT = "RLHF_NODE_RANK", "RLHF_MASTER_ADDR", "RLHF_MASTER_PORT"


def launched() -> bool:
    """True inside a process that the deepspeed launcher started (a single process sets LOCAL_RANK itself, see
    rlhf.training.runtime.init_distributed, and says so)."""
    return "LOCAL_RANK" in os.environ and "RLHF_SINGLE_PROCESS" not in os.environ


def check_memory(stage: str, params: Params, sft: Path | None = None, reward: Path | None = None) -> None:
    """The memory plan (rlhf/plan/) before anything is loaded or launched: a stage that will not fit stops here in
    one line (engine.memory_check). Once, in the process that launches the ranks."""
    if launched():
        return
    from rlhf.plan.plan import check_fits

    guarded(check_fits, stage, params, sft, reward)


def relaunch_if_distributed(params: Params) -> bool:
    """When engine.num_procs > 1 or a hostfile is set, run this same command under the deepspeed launcher (one
    process per rank) and exit with its code. Returns False when the caller should just run in this process."""
    engine = params.engine
    if launched() or (engine.num_procs == 1 and not engine.hostfile):
        return False
    from rlhf.training.runtime import _free_port, resolve_device

    device = guarded(resolve_device, engine)
    env = dict(os.environ, DS_ACCELERATOR="cpu" if device == "cpu" else "cuda")
    env.pop("RLHF_SINGLE_PROCESS", None)  # the ranks are the launcher's
    node_rank = os.environ.get(NODE_RANK)
    port = os.environ.get(MASTER_PORT) or str(_free_port())
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", port]
    if engine.hostfile:
        if not Path(engine.hostfile).is_file():
            fail(f"engine.hostfile '{engine.hostfile}' does not exist: give a DeepSpeed hostfile or clear it")
        cmd += ["--hostfile", engine.hostfile]
    if node_rank is not None:  # one node of a job started on every node by hand or a scheduler: no ssh
        if not engine.hostfile or not os.environ.get(MASTER_ADDR) or not os.environ.get(MASTER_PORT):
            fail(f"{NODE_RANK} is set, so this command is one node of a multi-node job: it also needs "
                 f"engine.hostfile (every node and its slots) and {MASTER_ADDR} / {MASTER_PORT} (node 0's address "
                 "and a free port, the same on every node)")
        cmd += ["--no_ssh", "--node_rank", node_rank, "--master_addr", os.environ[MASTER_ADDR]]
    cmd += ["--num_gpus", str(engine.num_procs), "--module", "stages.cli", *sys.argv[1:]]
    typer.echo(f"launching {engine.num_procs} ranks per node: {' '.join(cmd[2:])}", err=True)
    launcher = subprocess.Popen(cmd, env=env)
    try:
        code = launcher.wait()
    except KeyboardInterrupt as err:  # the ranks get the signal too; rank 0's line says where its checkpoint is
        term = isinstance(err, Terminated)
        launcher.send_signal(signal.SIGTERM if term else signal.SIGINT)
        launcher.wait()
        how = "stopped by SIGTERM" if term else "interrupted (Ctrl-C)"
        typer.echo(f"error: the {engine.num_procs}-rank job was {how}: rerun the same command (or `dvc repro`) to "
                   "resume from the last complete checkpoint (rank 0's line above names it)", err=True)
        raise typer.Exit(code=143 if term else 130) from None
    if code not in (0, 2):  # 2: the ranks already printed the bad input
        # the launcher exits with the failed rank's code; a signal -N comes back as 256 - N
        how = {130: "was interrupted (Ctrl-C)", 143: "was stopped by SIGTERM"}.get(code) or (
            f"was killed by signal {256 - code}" if code > 128 else f"exited with code {code}")
        typer.echo(
            f"error: the {engine.num_procs}-rank job stopped: a rank {how} and the launcher "
            "stopped the others (see the lines above). Rerun the same command: training resumes from the newest "
            "checkpoint (checkpoint_every in params.yaml)",
            err=True,
        )
    raise typer.Exit(code=code)


def is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"
