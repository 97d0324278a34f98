"""RLHF in three steps (SFT, reward model, PPO) on DeepSpeed, each step a DVC stage.

Importing this package stays light: deepspeed, transformers and datasets are imported inside the functions that
need them.
"""

__version__ = "0.1.0"

from rlhf.ppo import Experience, PPOTrainer, RLHFEngine  # noqa: E402  (light: heavy imports are inside)

__all__ = ["Experience", "PPOTrainer", "RLHFEngine"]
