"""RLHF in three steps (SFT, reward model or DPO, PPO or GRPO/RLOO/REINFORCE++) on DeepSpeed, each step a DVC stage.

Importing this package stays light: deepspeed, transformers and datasets are imported inside the functions that
need them, and the public names below load their module only when first used (PEP 562), so that `import rlhf.sft`
does not run rlhf/ppo.py: each DVC stage depends on the code it runs, not on every module (tests/test_dvc_deps.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Experience", "PPOTrainer", "RLHFEngine", "Rollout"]

_HOMES = {"Experience": "rlhf.ppo", "PPOTrainer": "rlhf.ppo", "Rollout": "rlhf.ppo", "RLHFEngine": "rlhf.rl_engine"}

if TYPE_CHECKING:
    from rlhf.ppo import Experience, PPOTrainer, Rollout
    from rlhf.rl_engine import RLHFEngine


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'rlhf' has no attribute {name!r}")
