"""RLHF in three steps (SFT, reward model or DPO, PPO or GRPO/RLOO/REINFORCE++) on DeepSpeed, each step a DVC stage.

Importing this package stays light: deepspeed, transformers and datasets are imported inside the functions that
need them, and the public names below load their module only when first used (PEP 562), so that `import rlhf.training.sft`
does not run rlhf/rl/trainer.py: each DVC stage depends on the code it runs, not on every module (tests/test_dvc_deps.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Experience", "PPOTrainer", "RLHFEngine", "Rollout"]

_HOMES = {
    "Experience": "rlhf.rl.experience",
    "PPOTrainer": "rlhf.rl.trainer",
    "Rollout": "rlhf.rollout.base",
    "RLHFEngine": "rlhf.rl.models",
}

if TYPE_CHECKING:
    from rlhf.rl.experience import Experience
    from rlhf.rl.models import RLHFEngine
    from rlhf.rl.trainer import PPOTrainer
    from rlhf.rollout.base import Rollout


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'rlhf' has no attribute {name!r}")
