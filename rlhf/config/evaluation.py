"""Params of evaluation and logging."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from rlhf.config.base import Group, moved_keys
from rlhf.config.rewards import RewardFunctionConfig, unique_labels
from rlhf.config.sampling import Sampling, VLLMConfig

# What evaluate reports of every actor besides the scorers (whose names must differ from these); turns, tool_calls
# and tool_valid under a multi-turn ppo.environment.
EVALUATE_METRICS = ("rm_reward", "kl_to_sft", "response_length", "perplexity", "num_prompts", "turns", "tool_calls",
                    "tool_valid")
MOVED_EVALUATE_KEYS = {k: f"sampling.{k}" for k in ("do_sample", "temperature", "top_k", "top_p", "max_answer_tokens")}


class EvaluateConfig(Group):
    """The evaluate stage: every actor answers the same held-out prompts with the same sampling seed."""

    num_prompts: int = Field(500, gt=0)  # held-out PPO prompts (and SFT demonstrations for perplexity)
    # how every actor answers (do_sample false: greedy); kl_to_sft compares both models at sampling.temperature
    sampling: Sampling = Field(default_factory=Sampling)
    batch_size: int = Field(64, gt=0)  # prompts per generation and scoring forward
    # who draws the answers: transformers' generate, or vLLM in the evaluate process (`make vllm`; on a GPU it draws
    # there): one vLLM engine for every actor, each actor's weights pushed in turn, one seed per prompt (seed + its
    # index), fp32 as the rest of evaluate. The same model draws different tokens under each engine for one seed.
    engine: Literal["generate", "vllm"] = "generate"
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)  # with engine vllm (tensor_parallel_size, memory, ...)
    num_samples: int = Field(8, ge=0)  # sample answers shown side by side
    # Scorers of quality, each reported per actor under its name; null = the shipped task's gold scorer when the
    # held-out prompts are the builtin task's, else none (evaluate then says so). Weights are not used here.
    scorers: list[RewardFunctionConfig] | None = None

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, raw: Any) -> Any:
        """A key of params.yaml's old flat shape names its new place."""
        moved = moved_keys("evaluate", raw, MOVED_EVALUATE_KEYS) if isinstance(raw, dict) else None
        if moved:
            raise ValueError(moved)
        return raw

    @model_validator(mode="after")
    def _scorers(self) -> EvaluateConfig:
        unique_labels(self.scorers or [], "evaluate.scorers", EVALUATE_METRICS)
        return self


class LoggingConfig(Group):
    """Where the training stages' curves go. dvclive always (DVC reads it); TensorBoard and W&B get the same scalars
    under the same names. Changes no result, so no stage lists this group in dvc.yaml."""

    # where the scalars go; dvclive always (DVC reads it), TensorBoard and W&B besides
    report_to: list[Literal["dvclive", "tensorboard", "wandb"]] = Field(default_factory=lambda: ["dvclive"])
    tensorboard_dir: str = "runs"  # event files under <tensorboard_dir>/<stage>/ (tensorboard --logdir runs)
    wandb_project: str = "rlhf-dvc"  # the W&B project the runs go to
    wandb_dir: str = "."  # W&B keeps its runs under <wandb_dir>/wandb/
    # auto: online when W&B has a key (WANDB_API_KEY or `wandb login`), else offline (`wandb sync` uploads later)
    wandb_mode: Literal["auto", "online", "offline"] = "auto"
