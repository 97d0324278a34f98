"""What the scripts that tests start under `torchrun --nproc_per_node 2` share."""

from __future__ import annotations

import os
import sys

import torch


def leave() -> None:
    """End a rank script once its output is written: the ranks wait for each other, flush, and leave without the
    interpreter's teardown. Gloo and DeepSpeed keep C++ threads and work handles whose destruction at interpreter
    exit now and then aborts a rank ("terminate called without an active exception", SIGABRT) after its work was
    done (seen twice in full-suite runs, once per rank, with and without destroy_process_group); torchrun then
    reports a failure the test is not about. The test still fails on anything that goes wrong before this point."""
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
