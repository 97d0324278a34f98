"""RLHF in three steps (SFT, reward model or DPO, PPO or GRPO/RLOO/REINFORCE++) on DeepSpeed, each step a DVC stage.

Importing this package stays light: deepspeed, transformers and datasets are imported inside the functions that
need them, and the public names below load their module only when first used (PEP 562), so that
`import rlhf.training.sft` does not run rlhf/rl/trainer.py: each DVC stage depends on the code it runs, not on every
module (tests/pipeline/test_dvc_deps.py). PPOTrainer and RLHFEngine are the earlier names (DeepSpeed-Chat's) of
RLTrainer and RLModels, kept for the `ppo.trainer` subclasses that import them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Experience", "RLModels", "RLTrainer", "Rollout", "Sampling"]

_HOMES = {
    "Experience": ("rlhf.rl.experience", "Experience"),
    "RLTrainer": ("rlhf.rl.trainer", "RLTrainer"),
    "RLModels": ("rlhf.rl.models", "RLModels"),
    "Rollout": ("rlhf.rollout.base", "Rollout"),
    "Sampling": ("rlhf.config.sampling", "Sampling"),
    "PPOTrainer": ("rlhf.rl.trainer", "RLTrainer"),  # the earlier names
    "RLHFEngine": ("rlhf.rl.models", "RLModels"),
}

if TYPE_CHECKING:
    from rlhf.config.sampling import Sampling
    from rlhf.rl.experience import Experience
    from rlhf.rl.models import RLModels
    from rlhf.rl.trainer import RLTrainer
    from rlhf.rollout.base import Rollout


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        module, attr = _HOMES[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'rlhf' has no attribute {name!r}")
