"""Step 3's algorithm groups: how advantages are estimated (`ppo.advantage`), what the actor and critic minimise
(`ppo.loss`), the KL to the reference (`ppo.kl`), and each algorithm's published defaults for the keys left null."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from rlhf.config.base import Group

# step 3 algorithms whose baseline is the group of answers
GROUP_ALGORITHMS = ("grpo", "dr_grpo", "dapo", "gspo", "cispo", "rloo")

# Each algorithm's published settings, used for every key of this table that params.yaml leaves null (an explicit
# value wins). Sources: ppo, ours since 2026-11 (DeepSpeed-Chat's shape: k1 KL in the reward; kl.coef 0.2 and the
# running reward normalisation tuned on the shipped task); grpo, DeepSeekMath (Shao et al. 2024): k3 KL as a loss
# at beta 0.04, 1/G sum_i 1/|o_i| sum_t, std-scaled group advantages, raw rewards; dr_grpo, Liu et al. 2025: no std
# division, a constant length normaliser, no KL (TRL's beta 0); dapo, Yu et al. 2025: token_mean, clip-higher 0.28,
# no KL; rloo, Ahmadian et al. 2024 as TRL runs it: k1 KL in the reward at 0.05, raw rewards; reinforce_pp, Hu 2025
# as OpenRLHF runs it: k1 KL in the reward at OpenRLHF's init_kl_coef 0.01, returns whitened over the batch;
# gspo, Zheng et al. 2025 (Qwen) as TRL runs it: one ratio per answer (the geometric mean of its tokens'),
# clipped to [1 - 3e-4, 1 + 4e-4], per-answer means, no KL; cispo, MiniMax-M1 (2025) with ScaleRL's (Khatri et al.
# 2025) bound as TRL runs it: the ratio as a weight clipped above at 5 (1 + 4), no lower clip, on the REINFORCE term
# of every token, token_mean, no KL.
_CRITIC_FREE = {"reward_normalization": "none", "reward_clip": 0.0, "group_std": True}
_PLAIN = {"ratio_level": "token", "surrogate": "clip", "clip_range_low": None}  # the PPO surrogate, token ratios


# DAPO's sampling and length handling (Yu et al. 2025 sections 3.2 and 3.4, as verl's recipe runs it): groups whose
# answers all scored alike dropped and prompts drawn again until the batch is full; the soft overlong punishment
# over the last 20% of the answer budget (4,096 of 20,480 tokens); truncated answers out of the loss (overlong
# filtering). Off for every other algorithm.
_NO_DAPO = {"dynamic_sampling": {"enabled": False}, "overlong": {"buffer": 0.0, "mask_truncated": False}}


def _loss(aggregation: str, clip_range_high: float | None, **other: Any) -> dict[str, Any]:
    return {"aggregation": aggregation, "clip_range_high": clip_range_high, **_PLAIN, **other}


ALGORITHM_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {name: {**groups, **(
    {"dynamic_sampling": {"enabled": True}, "overlong": {"buffer": 0.2, "mask_truncated": True}} if name == "dapo"
    else _NO_DAPO)} for name, groups in {
    "ppo": {"kl": {"penalty": "reward", "coef": 0.2}, "loss": _loss("token_mean", None),
            "advantage": {"reward_normalization": "running", "reward_clip": 5.0, "group_std": True}},
    "grpo": {"kl": {"penalty": "loss", "coef": 0.04}, "loss": _loss("seq_mean_token_mean", None),
             "advantage": _CRITIC_FREE},
    "dr_grpo": {"kl": {"penalty": "loss", "coef": 0.0}, "loss": _loss("seq_mean_token_sum_norm", None),
                "advantage": {**_CRITIC_FREE, "group_std": False}},
    "dapo": {"kl": {"penalty": "loss", "coef": 0.0}, "loss": _loss("token_mean", 0.28), "advantage": _CRITIC_FREE},
    "gspo": {"kl": {"penalty": "loss", "coef": 0.0},
             "loss": _loss("seq_mean_token_mean", 4e-4, ratio_level="sequence", clip_range_low=3e-4),
             "advantage": _CRITIC_FREE},
    "cispo": {"kl": {"penalty": "loss", "coef": 0.0}, "loss": _loss("token_mean", 4.0, surrogate="cispo"),
              "advantage": _CRITIC_FREE},
    "rloo": {"kl": {"penalty": "reward", "coef": 0.05}, "loss": _loss("token_mean", None), "advantage": _CRITIC_FREE},
    "reinforce_pp": {"kl": {"penalty": "reward", "coef": 0.01}, "loss": _loss("token_mean", None),
                     "advantage": _CRITIC_FREE},
}.items()}


def with_algorithm_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """raw `ppo` mapping -> the same with every key of ALGORITHM_DEFAULTS that is missing or null set to the
    algorithm's value (an unknown algorithm is left for the Literal's error to name)."""
    defaults = ALGORITHM_DEFAULTS.get(raw.get("algorithm", "ppo"))
    if defaults is None:
        return raw
    out = dict(raw)
    for group, values in defaults.items():
        given = out.get(group)
        if given is None:
            given = {}
        elif isinstance(given, Group):
            given = given.model_dump()
        elif not isinstance(given, dict):
            continue  # not a mapping: the group's own error says so
        out[group] = {**given, **{k: v for k, v in values.items() if given.get(k) is None}}
    return out


class AdvantageConfig(Group):
    """How the scored rollouts become advantages (`rlhf/rl/advantages.py`)."""

    # group baselines (grpo, dapo, rloo): divide by the group's std (GRPO); false: mean-centred (Dr. GRPO);
    # null = the algorithm's
    group_std: bool | None = None
    gamma: float = Field(1.0, ge=0, le=1)  # discount (every algorithm)
    lam: float = Field(0.95, ge=0, le=1)  # GAE lambda (ppo)
    whiten: bool = True  # ppo's advantages whitened over the batch; reinforce_pp always whitens its returns
    # running: the summed reward (rewards.*) z-scored by the mean and std of every reward so far before the KL
    # penalty is added, so kl.coef weighs the same whatever the reward's scale (a verifier's 0..1 or a reward
    # model's logits); none: the raw sum (DeepSpeed-Chat); null = the algorithm's
    reward_normalization: Literal["running", "none"] | None = None
    # the (normalised) reward clipped to [-c, c]; 0 = no clipping; null = the algorithm's (ppo 5)
    reward_clip: float | None = Field(None, ge=0)


class LossConfig(Group):
    """What the actor and critic minimise (`rlhf/training/losses.py`)."""

    # how per-token losses become one: token_mean (every token alike: DAPO, PPO's masked mean), seq_mean_token_mean
    # (each answer alike: GRPO), seq_mean_token_sum_norm (token sums over sampling.max_answer_tokens: Dr. GRPO);
    # null = the algorithm's
    aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] | None = None
    clip_range: float = Field(0.2, gt=0)  # policy ratio clip: ratio in [1 - clip_range_low, 1 + clip_range_high]
    clip_range_low: float | None = Field(None, gt=0, lt=1)  # null = the algorithm's (gspo: 3e-4), else clip_range
    # null = the algorithm's (dapo: 0.28, clip-higher; gspo: 4e-4; cispo: 4.0, a weight of at most 5), else clip_range
    clip_range_high: float | None = Field(None, gt=0)
    # the importance ratio: token (each token's) | sequence (one per answer, the geometric mean of its tokens':
    # GSPO); null = the algorithm's
    ratio_level: Literal["token", "sequence"] | None = None
    # clip: PPO's clipped surrogate | cispo: the ratio as a weight clipped above at 1 + clip_range_high, without
    # gradient, on the REINFORCE term of every token (no token loses its gradient: CISPO); null = the algorithm's
    surrogate: Literal["clip", "cispo"] | None = None
    # dual-clip PPO (Ye et al. 2020; verl's clip_ratio_c): for negative advantages the loss is at most -A x c, so a
    # huge ratio cannot blow the step up; null = off (verl uses 3.0)
    dual_clip: float | None = Field(None, gt=1)
    value_clip_range: float = Field(0.2, ge=0)  # critic: value clip around the old values; 0 = no clipping
    entropy_coef: float = Field(0.0, ge=0)  # entropy bonus in the actor loss (0 = off)
    ptx_coef: float = Field(0.0, ge=0)  # > 0 mixes the LM loss on SFT demonstrations (InstructGPT's PPO-ptx)

    @property
    def clip_low(self) -> float:
        return self.clip_range if self.clip_range_low is None else self.clip_range_low

    @property
    def clip_high(self) -> float:
        return self.clip_range if self.clip_range_high is None else self.clip_range_high

    @model_validator(mode="after")
    def _clip(self) -> LossConfig:
        if self.dual_clip is not None and self.surrogate == "cispo":
            raise ValueError("loss.dual_clip bounds the clipped surrogate; surrogate cispo has none: set dual_clip: "
                             "null, or surrogate: clip")
        if self.clip_low >= 1:
            raise ValueError(f"clip_range ({self.clip_range}) must be < 1 when clip_range_low is null: the ratio's "
                             "lower bound 1 - clip_range must stay positive")
        return self


class KLConfig(Group):
    """The KL to the reference (`rlhf/rl/kl.py`)."""

    # reward: k1 KL per token in the reward (InstructGPT, PPO, RLOO, REINFORCE++); loss: k3 KL as a loss term (GRPO
    # family); coef weighs it either way; null = the algorithm's
    penalty: Literal["reward", "loss"] | None = None
    # per-token KL weight (fixed unless target is set); null = the algorithm's: ppo 0.2, grpo 0.04, dr_grpo 0,
    # dapo 0, rloo 0.05, reinforce_pp 0.01
    coef: float | None = Field(None, ge=0)
    clamp: float = Field(0.0, ge=0)  # the k3 KL loss per token clamped to at most this (verl: 10); 0 = no clamp
    target: float | None = Field(None, gt=0)  # set: adaptive KL (Ziegler et al. 2019) towards this KL per answer
    horizon: int = Field(10000, gt=0)  # adaptive KL: samples over which the coefficient adapts
    # stop early (and write the models) when the mean KL to the reference per answer exceeds it (null = never)
    stop_above: float | None = Field(None, gt=0)


class DynamicSamplingConfig(Group):
    """DAPO's dynamic sampling (group algorithms): a group whose answers all got the same reward has no advantage
    to learn from; it is dropped and more prompts are drawn until the iteration has rollout_batch_size informative
    groups per rank (`rlhf/rl/filtering.py`)."""

    enabled: bool | None = None  # null = the algorithm's (dapo: true)
    # generation rounds per iteration at most (each of generation_batches batches of prompts); short after the
    # last, the batch is filled with dropped groups (they add nothing but their count) and the shortfall logged
    max_rounds: int = Field(10, ge=1)


class OverlongConfig(Group):
    """DAPO's length handling (`rlhf/rl/filtering.py`)."""

    # the soft overlong punishment: over the last `buffer` x sampling.max_answer_tokens of the budget, an answer
    # of length L loses penalty x (L - (max - buffer tokens)) / buffer tokens, reaching -penalty at the budget;
    # 0 = off; null = the algorithm's (dapo: 0.2, i.e. DAPO's 4,096 of 20,480)
    buffer: float | None = Field(None, ge=0, lt=1)
    penalty: float = Field(1.0, ge=0)  # the punishment at the budget (DAPO's penalty factor)
    # answers cut off by max_answer_tokens (no stop token) out of the loss (DAPO's overlong filtering, TRL's
    # mask_truncated_completions); null = the algorithm's (dapo: true)
    mask_truncated: bool | None = None
