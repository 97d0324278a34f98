"""Params of the rewards: the reward model's weight and the verifier functions (module:function)."""

from __future__ import annotations

from pydantic import Field, model_validator

from rlhf.config.base import Group

# "module:function": a module importable from the project folder (rewards/ is tracked by DVC) or the environment.
_FUNCTION = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


class RewardFunctionConfig(Group):
    """A verifier or scorer: a Python callable with TRL's reward-function signature (see rlhf/rl/rewards.py)."""

    function: str | None = Field(None, pattern=_FUNCTION)  # "module:function", e.g. rlhf.data.task:gold_reward_fn
    # or a reward served over HTTP (OpenRLHF's remote reward convention; `rlhf serve-reward` serves a function)
    url: str | None = Field(None, pattern=r"^https?://")
    weight: float = 1.0  # its weight in the summed reward (step 3; evaluate reports each scorer on its own)
    name: str | None = Field(None, pattern=r"^\w+$")  # its name in logs and metrics; null = the function's name

    @model_validator(mode="after")
    def _one_source(self) -> RewardFunctionConfig:
        if (self.function is None) == (self.url is None):
            raise ValueError("give each reward either `function` (module:function) or `url` (a reward server), not "
                             f"{'both' if self.function else 'neither'}")
        return self

    @property
    def label(self) -> str:
        return self.name or (self.function.rsplit(":", 1)[1] if self.function else "remote")

    @property
    def spec(self) -> str:
        return self.function or self.url


def unique_labels(functions: list[RewardFunctionConfig], key: str, reserved: tuple[str, ...]) -> None:
    labels = [f.label for f in functions]
    for label in labels:
        if labels.count(label) > 1:
            raise ValueError(f"{key}: two entries are named '{label}': give each a distinct `name`")
        if label in reserved:
            raise ValueError(f"{key}: '{label}' is the name of a built-in metric: give the entry another `name`")


class RewardsConfig(Group):
    """Step 3's reward: model_weight x the reward model's score + the sum of weight x function value. The same
    terms serve every RL algorithm of step 3."""

    model_weight: float = Field(1.0, ge=0)  # the trained reward model's score; 0 = no reward model (critic from actor)
    functions: list[RewardFunctionConfig] = Field(default_factory=list)  # verifiers, summed with their weights
    # how the functions are called (rlhf/rl/grading.py): this many calls at once (threads; an async def function's
    # requests then overlap)
    workers: int = Field(1, ge=1)
    chunk_size: int = Field(0, ge=0)  # samples per call; 0 = the whole batch in one call (TRL's way)
    timeout_s: float = Field(0.0, ge=0)  # a call running longer fails and is retried; 0 = no limit
    retries: int = Field(2, ge=0)  # a call that raised or timed out is tried again this many times
    # share of the run's samples a function may leave unscored (None) after its retries before step 3 stops;
    # 0 = the first such sample stops it
    max_failure_rate: float = Field(0.0, ge=0, lt=1)
    # keep every function's values by (prompt, completion, columns, the function's source) in reward_cache/, a DVC
    # output of the ppo stage: a rerun or an experiment never calls an expensive grader twice for one answer
    # (rlhf/rl/reward_cache.py); hit rates in ppo/reward_cache_hits
    cache: bool = False

    @model_validator(mode="after")
    def _terms(self) -> RewardsConfig:
        unique_labels(self.functions, "rewards.functions", ("reward", "model", "env"))
        return self
