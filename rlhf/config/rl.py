"""Params of step 3: the algorithm, its defaults, sampling, KL, clipping and the engines it builds."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from rlhf.config.base import Group
from rlhf.config.models import LoraConfig, ModelEngineConfig
from rlhf.config.sampling import Sampling

GROUP_ALGORITHMS = ("grpo", "dr_grpo", "dapo", "rloo")  # step 3 algorithms whose baseline is the group of answers

# Each algorithm's published settings, used for every key of this table that params.yaml leaves null (an explicit
# value wins). Sources: ppo, ours since 2026-11 (DeepSpeed-Chat's shape: k1 KL in the reward; kl_coef 0.2 and the
# running reward normalisation tuned on the shipped task); grpo, DeepSeekMath (Shao et al. 2024): k3 KL as a loss
# at beta 0.04, 1/G sum_i 1/|o_i| sum_t, std-scaled group advantages, raw rewards; dr_grpo, Liu et al. 2025: no std
# division, a constant length normaliser, no KL (TRL's beta 0); dapo, Yu et al. 2025: token_mean, clip-higher 0.28,
# no KL; rloo, Ahmadian et al. 2024 as TRL runs it: k1 KL in the reward at 0.05, raw rewards; reinforce_pp, Hu 2025
# as OpenRLHF runs it: k1 KL in the reward at OpenRLHF's init_kl_coef 0.01, returns whitened over the batch.
ALGORITHM_DEFAULTS: dict[str, dict[str, Any]] = {
    "ppo": {"kl_penalty": "reward", "kl_coef": 0.2, "loss_aggregation": "token_mean",
            "reward_normalization": "running", "reward_clip": 5.0, "group_std": True, "clip_range_high": None},
    "grpo": {"kl_penalty": "loss", "kl_coef": 0.04, "loss_aggregation": "seq_mean_token_mean",
             "reward_normalization": "none", "reward_clip": 0.0, "group_std": True, "clip_range_high": None},
    "dr_grpo": {"kl_penalty": "loss", "kl_coef": 0.0, "loss_aggregation": "seq_mean_token_sum_norm",
                "reward_normalization": "none", "reward_clip": 0.0, "group_std": False, "clip_range_high": None},
    "dapo": {"kl_penalty": "loss", "kl_coef": 0.0, "loss_aggregation": "token_mean",
             "reward_normalization": "none", "reward_clip": 0.0, "group_std": True, "clip_range_high": 0.28},
    "rloo": {"kl_penalty": "reward", "kl_coef": 0.05, "loss_aggregation": "token_mean",
             "reward_normalization": "none", "reward_clip": 0.0, "group_std": True, "clip_range_high": None},
    "reinforce_pp": {"kl_penalty": "reward", "kl_coef": 0.01, "loss_aggregation": "token_mean",
                     "reward_normalization": "none", "reward_clip": 0.0, "group_std": True, "clip_range_high": None},
}


class PPOConfig(Group):
    """Step 3. Every constant of the algorithm is here; none is hidden in the trainer (DeepSpeed-Chat hard-codes
    kl_ctl, clip ranges, gamma and lambda in ppo_trainer.py)."""

    # ppo: critic + GAE; grpo: group-relative advantages (no critic); dr_grpo: GRPO without the std and length
    # biases; dapo: GRPO's baseline with DAPO's token_mean and clip-higher; rloo: leave-one-out baseline over the
    # group (no critic); reinforce_pp: REINFORCE++, token-level KL in the reward and batch-whitened returns (no
    # critic). The keys of ALGORITHM_DEFAULTS left null take the algorithm's published values
    algorithm: Literal["ppo", "grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp"] = "ppo"
    # your RLTrainer subclass, "module:Class" importable from the project folder or the environment (null = ours)
    trainer: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    iterations: int = Field(100, gt=0)  # PPO iterations; each generates `rollout_batch_size` answers per rank
    rollout_batch_size: int = Field(32, gt=0)  # prompts per rank per iteration
    # answers sampled per prompt (OpenRLHF's n_samples_per_prompt; GRPO's group size G); null: 4 for grpo and rloo,
    # which compare the answers to one prompt, 1 otherwise
    answers_per_prompt: int | None = Field(None, gt=0)
    group_std: bool | None = None  # group baselines: divide by the group's std (GRPO); false: mean-centred (Dr. GRPO)
    # how per-token losses become one: token_mean (every token alike: DAPO, PPO's masked mean), seq_mean_token_mean
    # (each answer alike: GRPO), seq_mean_token_sum_norm (token sums over max_answer_tokens: Dr. GRPO)
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] | None = None
    # reward: k1 KL per token in the reward (InstructGPT, PPO, REINFORCE++); loss: k3 KL as a loss term (GRPO).
    # kl_coef (adapted when kl_target is set) weighs it either way
    kl_penalty: Literal["reward", "loss"] | None = None
    entropy_coef: float = Field(0.0, ge=0)  # entropy bonus in the actor loss (0 = off)
    generation_batches: int = Field(1, gt=0)  # rollouts gathered before the PPO epochs (DeepSpeed-Chat's flag)
    ppo_epochs: int = Field(1, gt=0)  # passes over the gathered experience
    micro_batch_size: int = Field(16, gt=0)  # experiences per rank per training forward (memory only)
    # experiences per rank per optimizer step (verl's ppo_mini_batch_size, TRL's micro batch x
    # gradient_accumulation_steps): its micro batches' gradients are accumulated and each loss is normalised over the
    # whole mini batch of every rank; null = micro_batch_size (one step per micro batch, DeepSpeed-Chat's way). The
    # whole iteration's rollouts as one mini batch keep every step on-policy
    mini_batch_size: int | None = Field(None, gt=0)
    # dropout off in the actor, critic, reference and reward model (TRL's disable_dropout, DeepSpeed-Chat's
    # --disable_actor_dropout): with it on, pi_old and pi_ref (eval mode) and the update (train mode) compare
    # different functions and the first step's ratio is noise
    disable_dropout: bool = True
    actor_learning_rate: float = Field(1e-4, gt=0)
    critic_learning_rate: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    lr_schedule: Literal["cosine", "linear", "constant"] = "constant"
    adam_beta1: float = Field(0.9, gt=0, lt=1)
    adam_beta2: float = Field(0.95, gt=0, lt=1)
    kl_coef: float | None = Field(None, ge=0)  # weight of the per-token KL to the reference (reward or loss)
    kl_clamp: float = Field(0.0, ge=0)  # the k3 KL loss per token clamped to [0, c] (verl's 10); 0 = no clamp
    kl_target: float | None = Field(None, gt=0)  # set: adaptive KL (Ziegler et al. 2019) towards this KL/sequence
    kl_horizon: int = Field(10000, gt=0)  # adaptive KL: samples over which the coefficient adapts
    # running: the summed reward (rewards.*) z-scored by the mean and std of every reward so far before the KL
    # penalty is added, so kl_coef weighs the same whatever the reward's scale (a verifier's 0..1 or a reward
    # model's logits); none: the raw sum (DeepSpeed-Chat)
    reward_normalization: Literal["running", "none"] | None = None
    reward_clip: float | None = Field(None, ge=0)  # the (normalised) reward clipped to [-c, c]; 0 = no clipping
    clip_range: float = Field(0.2, gt=0)  # PPO policy ratio clip: ratio in [1 - low, 1 + high]
    clip_range_low: float | None = Field(None, gt=0, lt=1)  # null = clip_range
    clip_range_high: float | None = Field(None, gt=0)  # null = the algorithm's (dapo 0.28), else clip_range
    # dual-clip PPO (Ye et al. 2020; verl's clip_ratio_c): for negative advantages the loss is at most -A x c, so a
    # huge ratio cannot blow the step up; null = off (verl uses 3.0)
    dual_clip: float | None = Field(None, gt=1)
    value_clip_range: float = Field(0.2, ge=0)  # value clip around the old values; 0 = no clipping
    gamma: float = Field(1.0, ge=0, le=1)  # discount
    lam: float = Field(0.95, ge=0, le=1)  # GAE lambda
    whiten_advantages: bool = True
    # Rollout sampling; every knob is passed to generate, none comes from the model's generation_config or from
    # transformers' defaults (its top_k=50). log pi_old, log pi (update) and log pi_ref are all log_softmax(logits /
    # temperature) over the whole vocabulary (OpenRLHF's and verl's convention): the ratio and the KL compare one
    # distribution, the sampler's exactly while top_k and top_p are off. top_k/top_p truncate the sampler only;
    # the drawn tokens are scored untruncated, because a truncated reference (or the actor after an update) can
    # give a drawn token probability 0: an infinite KL, a zero ratio.
    temperature: float = Field(1.0, gt=0)  # sampling temperature of rollouts, and of every PPO log-probability
    top_k: int = Field(0, ge=0)  # sample among the k most likely tokens only; 0 = off
    top_p: float = Field(1.0, gt=0, le=1)  # nucleus sampling of rollouts; 1.0 = off
    max_answer_tokens: int = Field(32, gt=0)  # longest generated answer; prompts are capped by data.max_prompt_tokens
    # log pi_old: from the rollout's own logits ("generation"), or from one more actor forward ("recompute"; the
    # two differ by float rounding only, which bf16/fp16 make larger); "auto": generation for an fp32 actor,
    # recompute for bf16/fp16 (then pi_old is the very forward the update differentiates: a ratio of exactly 1
    # before the first step)
    rollout_logprobs: Literal["auto", "generation", "recompute"] = "auto"
    # who decodes the rollouts: "own" (rlhf.decode: preallocated KV cache, a lean step for Llama-family models, the
    # model's forward for others) or "generate" (transformers' generate); the same tokens for the same seed, up to
    # float rounding (tests/rollout/test_decode.py)
    decoder: Literal["own", "generate"] = "own"
    # on CUDA, our loop replays its one-token step as a CUDA graph (rlhf/rollout/decode.py); no effect on CPU
    cuda_graphs: bool = True
    ema_beta: float = Field(0.992, ge=0, lt=1)  # EMA of the actor (0 = no EMA output)
    ptx_coef: float = Field(0.0, ge=0)  # InstructGPT's pretraining-loss mix, on the SFT demonstrations
    eval_prompts: int = Field(256, ge=0)  # held-out prompts scored by the reward model before and after PPO
    log_every: int = Field(1, gt=0)  # iterations between logged points
    checkpoint_every: int = Field(0, ge=0)  # iterations between resumable checkpoints (0 = none)
    max_bad_steps: int = Field(3, gt=0)  # consecutive non-finite micro-batch updates (skipped) before aborting
    max_kl: float | None = Field(None, gt=0)  # stop early when the mean KL to the reference per answer exceeds it
    # stop (exit 2, no model written) after this many iterations in a row whose rewards had no variance to learn
    # from: every answer scored alike (every group, for grpo and rloo); 0 = never
    max_flat_iterations: int = Field(10, ge=0)
    actor_lora: LoraConfig = Field(default_factory=LoraConfig)
    critic_lora: LoraConfig = Field(default_factory=LoraConfig)
    actor_engine: ModelEngineConfig = Field(default_factory=ModelEngineConfig)
    critic_engine: ModelEngineConfig = Field(default_factory=ModelEngineConfig)
    ref_engine: ModelEngineConfig = Field(default_factory=ModelEngineConfig)
    reward_engine: ModelEngineConfig = Field(default_factory=ModelEngineConfig)

    @model_validator(mode="before")
    @classmethod
    def _algorithm_defaults(cls, raw: Any) -> Any:
        """Every key of ALGORITHM_DEFAULTS that is missing or null takes the algorithm's value."""
        if not isinstance(raw, dict):
            return raw
        defaults = ALGORITHM_DEFAULTS.get(raw.get("algorithm", "ppo"))
        if defaults is None:
            return raw  # an unknown algorithm: the Literal's error names it
        return {**raw, **{k: v for k, v in defaults.items() if raw.get(k) is None}}

    def describe(self) -> str:
        """The effective step-3 configuration in one line (the stage prints it when it starts)."""
        kl = (f"k3 KL loss x {self.kl_coef:g}" if self.kl_penalty == "loss" else f"k1 KL in the reward x {self.kl_coef:g}")
        if self.kl_target is not None:
            kl += f" (adaptive, target {self.kl_target:g})"
        rewards = "rewards z-scored (running)" if self.reward_normalization == "running" else "raw rewards"
        if self.reward_clip:
            rewards += f" clipped to +-{self.reward_clip:g}"
        parts = [self.algorithm, kl, rewards, self.loss_aggregation,
                 f"ratio clip [{1 - self.clip_low:g}, {1 + self.clip_high:g}]"
                 + (f", dual-clip {self.dual_clip:g}" if self.dual_clip else "")]
        if self.algorithm in GROUP_ALGORITHMS:
            parts.append(f"groups of {self.group_size}" + (" std-scaled" if self.group_std else " mean-centred"))
        if self.needs_critic:
            parts.append(f"GAE gamma {self.gamma:g} lambda {self.lam:g}"
                         + (", whitened" if self.whiten_advantages else ""))
        parts.append(f"{self.rollouts_per_iteration} rollouts/iteration, {self.rollouts_per_iteration // self.mini_batch} "
                     f"optimizer step(s) x {self.ppo_epochs} epoch(s)")
        return "; ".join(parts)

    @property
    def sampling(self) -> Sampling:
        """How rollouts draw answers (rlhf/rollout/base.py)."""
        return Sampling(self.max_answer_tokens, self.temperature, self.top_k, self.top_p)

    @property
    def rollouts_per_iteration(self) -> int:
        """Answers per rank per iteration: prompts x answers per prompt x generation batches."""
        return self.rollout_batch_size * self.group_size * self.generation_batches

    @property
    def mini_batch(self) -> int:
        """mini_batch_size, resolved (null: micro_batch_size)."""
        return self.mini_batch_size if self.mini_batch_size is not None else self.micro_batch_size

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps of the whole run (each model's learning-rate schedule is this long)."""
        return self.iterations * self.ppo_epochs * (self.rollouts_per_iteration // self.mini_batch)

    @property
    def group_size(self) -> int:
        """answers_per_prompt, resolved (null: 4 for grpo and rloo, else 1)."""
        if self.answers_per_prompt is not None:
            return self.answers_per_prompt
        return 4 if self.algorithm in GROUP_ALGORITHMS else 1

    @property
    def needs_critic(self) -> bool:
        """Only ppo learns a value function; the critic-free family builds, steps and saves no critic."""
        return self.algorithm == "ppo"

    @property
    def clip_low(self) -> float:
        return self.clip_range if self.clip_range_low is None else self.clip_range_low

    @property
    def clip_high(self) -> float:
        return self.clip_range if self.clip_range_high is None else self.clip_range_high

    def recomputes_logprobs(self, actor_dtype: str) -> bool:
        """Whether log pi_old comes from one more actor forward, for an actor engine of this dtype."""
        return self.rollout_logprobs == "recompute" or (self.rollout_logprobs == "auto" and actor_dtype != "fp32")

    @model_validator(mode="after")
    def _batches(self) -> PPOConfig:
        if self.algorithm in GROUP_ALGORITHMS and self.group_size < 2:
            raise ValueError(
                f"ppo.algorithm {self.algorithm} compares the answers to one prompt, so ppo.answers_per_prompt must be "
                f">= 2 (got {self.answers_per_prompt}; null picks 4)"
            )
        if self.clip_low >= 1:
            raise ValueError(f"ppo.clip_range ({self.clip_range}) must be < 1 when clip_range_low is null: the ratio's "
                             "lower bound 1 - clip_range must stay positive")
        if self.rollouts_per_iteration % self.micro_batch_size:
            raise ValueError(
                "ppo.rollout_batch_size x ppo.answers_per_prompt x ppo.generation_batches "
                f"({self.rollouts_per_iteration}) is not divisible by ppo.micro_batch_size ({self.micro_batch_size}): "
                "make micro_batch_size a divisor"
            )
        if self.mini_batch % self.micro_batch_size:
            raise ValueError(
                f"ppo.mini_batch_size ({self.mini_batch_size}) is not a multiple of ppo.micro_batch_size "
                f"({self.micro_batch_size}): a mini batch is a whole number of micro batches"
            )
        if self.rollouts_per_iteration % self.mini_batch:
            raise ValueError(
                "ppo.rollout_batch_size x ppo.answers_per_prompt x ppo.generation_batches "
                f"({self.rollouts_per_iteration}) is not divisible by ppo.mini_batch_size ({self.mini_batch_size}): "
                "make mini_batch_size a divisor (null = micro_batch_size)"
            )
        return self
