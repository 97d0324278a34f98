"""Ctrl-C and SIGTERM during a training stage: one line that says where the newest complete checkpoint is and that
a rerun resumes from it, exit 130 / 143, no half-written output; the rerun does resume."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import cli_env, run_cli, write_params

SLOW_SFT = {"sft": {"max_steps": 400, "checkpoint_every": 2, "log_every": 1}}


def _interrupt_after_checkpoint(work: Path, sig: int) -> subprocess.CompletedProcess:
    """Start `rlhf sft`, wait for its first checkpoint line, send `sig`, return the finished process."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.cli", "sft", "--params", "params.yaml", "--checkpoints", "ckpt"],
        cwd=work, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # as from a terminal: a test run started in the background (`&`, nohup) ignores SIGINT, and a child that
        # starts with SIGINT ignored gets no KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines = []
    deadline = time.monotonic() + 300
    assert proc.stdout is not None
    for line in proc.stdout:  # read until a checkpoint is complete
        lines.append(line)
        if line.startswith("[checkpoint] saved") or time.monotonic() > deadline:
            break
    assert any(ln.startswith("[checkpoint] saved") for ln in lines), "".join(lines)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(lines) + out, err)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_interrupted_stage_says_where_to_resume_and_resumes(prepared: Path, tmp_path: Path, sig: int, code: int) -> None:
    work = tmp_path / "work"
    shutil.copytree(prepared / "data", work / "data")
    write_params(work / "params.yaml", SLOW_SFT)
    proc = _interrupt_after_checkpoint(work, sig)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    saved = sorted((work / "ckpt").glob("step-*"))
    assert saved and str(saved[-1].relative_to(work)) in errors[0], (errors, saved)
    assert "rerun the same command" in errors[0] and "resume" in errors[0]
    assert not (work / "models/sft").exists()  # the model folder is written whole at the end, or not at all
    # the rerun resumes from that checkpoint (a short rerun: the same run, stopped at the next step it reaches)
    write_params(work / "params.yaml", SLOW_SFT)
    step = int(saved[-1].name.split("-")[1])
    resumed = run_cli("sft", "--params", "params.yaml", "--checkpoints", "ckpt", cwd=work, check=False,
                      env={"RLHF_FAULT_KILL_AT_STEP": str(step + 1)})
    assert f"[checkpoint] resumed from {saved[-1].relative_to(work)}" in resumed.stdout or \
        f"resumed from {saved[-1]}" in resumed.stdout, resumed.stdout[-2000:]
