"""Fault injection for the reliability tests, in the manner of SQLite's: environment variables that make a run
SIGKILL itself or see a non-finite loss at a chosen step. Unset (normal use) they cost one dict lookup.

    RLHF_FAULT_KILL_AT_STEP=N     SIGKILL this process right after step (PPO: iteration) N is logged
    RLHF_FAULT_NAN_AT_STEPS=3,4   the loss of the 3rd and 4th micro-batches (PPO: of iterations 3 and 4) is NaN
    RLHF_FAULT_RANK=R             only rank R is affected (default: every rank)
    RLHF_FAULT_KILL_AT_POINT=P    SIGKILL this process at the named point P, e.g. `replace:aside` (in
                                  rlhf/pipeline/outputs.py write_output_dir: the old folder moved aside, the new not yet in)
    RLHF_FAULT_FREE_BYTES=N       the free space every disk reports (rlhf/pipeline/guards.py check_free_space): a full disk
"""

from __future__ import annotations

import os
import signal
from typing import Any

KILL_AT_STEP = "RLHF_FAULT_KILL_AT_STEP"
NAN_AT_STEPS = "RLHF_FAULT_NAN_AT_STEPS"
RANK = "RLHF_FAULT_RANK"
KILL_AT_POINT = "RLHF_FAULT_KILL_AT_POINT"
FREE_BYTES = "RLHF_FAULT_FREE_BYTES"


def _this_rank() -> bool:
    wanted = os.environ.get(RANK)
    return wanted is None or wanted == os.environ.get("RANK", "0")


def kill_at(step: int) -> None:
    if os.environ.get(KILL_AT_STEP) == str(step) and _this_rank():
        os.kill(os.getpid(), signal.SIGKILL)


def kill_at_point(point: str) -> None:
    if os.environ.get(KILL_AT_POINT) == point and _this_rank():
        os.kill(os.getpid(), signal.SIGKILL)


def poison(loss: Any, step: int) -> Any:
    steps = os.environ.get(NAN_AT_STEPS)
    if steps and str(step) in steps.split(",") and _this_rank():
        return loss * float("nan")
    return loss


def free_bytes(path: str) -> int:
    """The free bytes on the disk that holds `path` (an existing folder), or RLHF_FAULT_FREE_BYTES when set."""
    import shutil

    forced = os.environ.get(FREE_BYTES)
    return int(forced) if forced is not None and _this_rank() else shutil.disk_usage(path).free
