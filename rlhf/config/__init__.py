"""params.yaml as typed groups, one module per concern; import them from here:
`from rlhf.config import PPOConfig, Params, load_params`."""

from __future__ import annotations

from rlhf.config.algorithm import AdvantageConfig, KLConfig, LossConfig
from rlhf.config.base import ConfigError, Group
from rlhf.config.data import FORMAT_STEPS, STEPS, DataConfig, SourceConfig, TaskConfig
from rlhf.config.evaluation import EVALUATE_METRICS, EvaluateConfig, LoggingConfig
from rlhf.config.models import (
    BaseModelConfig,
    EngineConfig,
    LoraConfig,
    ModelConfig,
    ModelEngineConfig,
    TokenizerConfig,
    resolve_engine,
)
from rlhf.config.params import Params, check_loggers, load_params, parse_params, read_yaml
from rlhf.config.rewards import RewardFunctionConfig, RewardsConfig, unique_labels
from rlhf.config.rl import (
    ALGORITHM_DEFAULTS,
    GROUP_ALGORITHMS,
    EnginePair,
    EnvironmentConfig,
    LoraPair,
    OptimizerConfig,
    PPOConfig,
    RolloutConfig,
)
from rlhf.config.sampling import Sampling
from rlhf.config.training import DPOConfig, RewardConfig, SFTConfig, TrainConfig

__all__ = [
    "RolloutConfig",
    "OptimizerConfig",
    "LoraPair",
    "EnginePair",
    "EnvironmentConfig",
    "LossConfig",
    "KLConfig",
    "AdvantageConfig",
    "ALGORITHM_DEFAULTS",
    "BaseModelConfig",
    "ConfigError",
    "DPOConfig",
    "DataConfig",
    "EVALUATE_METRICS",
    "EngineConfig",
    "EvaluateConfig",
    "FORMAT_STEPS",
    "GROUP_ALGORITHMS",
    "Group",
    "LoggingConfig",
    "LoraConfig",
    "ModelConfig",
    "ModelEngineConfig",
    "PPOConfig",
    "Params",
    "RewardConfig",
    "RewardFunctionConfig",
    "RewardsConfig",
    "SFTConfig",
    "STEPS",
    "Sampling",
    "SourceConfig",
    "TaskConfig",
    "TokenizerConfig",
    "TrainConfig",
    "check_loggers",
    "load_params",
    "parse_params",
    "read_yaml",
    "resolve_engine",
    "unique_labels",
]
