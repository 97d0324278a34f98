"""Params of step 3 (`ppo`): the run's shape at the top, then one group per concern: sampling, rollout,
advantage, loss, kl, optimizer, lora and engines. The algorithm groups live in rlhf/config/algorithm.py."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from rlhf.config.algorithm import (
    ALGORITHM_DEFAULTS,
    GROUP_ALGORITHMS,
    AdvantageConfig,
    DynamicSamplingConfig,
    KLConfig,
    LossConfig,
    OverlongConfig,
    with_algorithm_defaults,
)
from rlhf.config.base import Group, moved_keys
from rlhf.config.models import LoraConfig, ModelEngineConfig
from rlhf.config.sampling import Sampling, VLLMConfig

__all__ = ["ALGORITHM_DEFAULTS", "EnvironmentConfig", "GROUP_ALGORITHMS", "MOVED_PPO_KEYS", "PPOConfig", "moved_keys"]


class RolloutConfig(Group):
    """Who draws the rollouts (`rlhf/rollout/`), where log pi_old comes from, and how the mismatch between the
    rollout's log-probs and the training forward's is corrected (`rlhf/rl/correction.py`)."""

    # own: our decode loop (rlhf/rollout/decode.py: preallocated KV cache, a lean step for Llama-family models, the
    # model's forward for others) | generate: transformers' generate; the same tokens for the same seed, up to float
    # rounding (tests/rollout/test_decode.py) | vllm: vLLM in the training process, the actor's weights pushed to it
    # after every update (rlhf/rollout/vllm.py; `make vllm` installs the CPU build, GPUs take `vllm`)
    engine: Literal["own", "generate", "vllm"] = "own"
    # log pi_old: from the rollout's own logits ("generation"), or from one more actor forward ("recompute"; the
    # two differ by float rounding only, which bf16/fp16 make larger); "auto": generation for an fp32 actor,
    # recompute for bf16/fp16 (then pi_old is the very forward the update differentiates: a ratio of exactly 1
    # before the first step)
    logprobs: Literal["auto", "generation", "recompute"] = "auto"
    cuda_graphs: bool = True  # on CUDA our loop replays its one-token step as a CUDA graph (no effect on CPU)
    # under ZeRO-3, engine own: decode with this many decoder layers gathered at a time, re-gathered every token, so
    # no rank holds the whole actor (memory: these layers + embeddings and head; LoRA applied beside them; every rank
    # steps together; no CUDA graphs; an actor that is not Llama-family decodes through its own forward, DeepSpeed
    # fetching one module at a time, whatever the number); 0 gathers the whole actor once per rollout (far faster)
    gather_layers: int = Field(0, ge=0)
    # importance weights on the policy loss for the mismatch rho = pi_old / pi_rollout (needs log pi_old
    # recomputed): token_tis min(rho, max) | token_mask rho where min <= rho <= max, else 0 (icepop) | seq_tis
    # min(product of the answer's rho, max) | seq_mask token_tis on answers whose geometric-mean rho is in [min, max],
    # 0 on the others | none (the mismatch is logged whenever log pi_old is recomputed)
    correction: Literal["none", "token_tis", "token_mask", "seq_tis", "seq_mask"] = "none"
    correction_min: float = Field(0.5, ge=0)  # lower bound of the mask modes
    correction_max: float = Field(2.0, gt=1)  # upper bound / truncation cap (verl 2, TRL 3, OpenRLHF 5)
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)

    @model_validator(mode="after")
    def _correction(self) -> RolloutConfig:
        if self.correction != "none" and self.logprobs == "generation":
            raise ValueError(f"ppo.rollout.correction {self.correction} weighs pi_old / pi_rollout, so log pi_old must "
                             "come from the training forward: set ppo.rollout.logprobs to auto or recompute")
        if self.correction_min >= self.correction_max:
            raise ValueError(f"ppo.rollout.correction_min ({self.correction_min}) must be below correction_max "
                             f"({self.correction_max})")
        return self


class EnvironmentConfig(Group):
    """Multi-turn rollouts (rlhf/rollout/turns.py): each prompt an episode of model turns and environment answers
    (tool results, feedback) until the environment says done. Off while `name` is null."""

    # your environment, "module:Class" (a subclass of rlhf.rollout.environments.Environment) importable from the
    # project folder (rewards/, tracked by DVC) or the environment; the shipped example:
    # rlhf.rollout.environments.calculator:Calculator
    name: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    options: dict[str, Any] = Field(default_factory=dict)  # keyword arguments of the class, one instance per episode
    max_turns: int = Field(4, gt=0)  # model turns per episode; an episode still calling tools after them ends
    # tokens per model turn; null = what is left of sampling.max_answer_tokens, which bounds the whole trajectory
    # after the first prompt (model and environment tokens)
    max_turn_tokens: int | None = Field(None, gt=0)
    tool_timeout_s: float = Field(5.0, ge=0)  # a tool call running longer is abandoned and answered with an error
    # episodes whose turn is answered at once (threads; an async def step's requests then overlap): for tools that
    # wait on a sandbox or a network; 1 = one after another. Each episode has its own instance either way
    workers: int = Field(1, ge=1)


class OptimizerConfig(Group):
    """AdamW and the learning-rate schedule of the actor and the critic."""

    actor_learning_rate: float = Field(1e-4, gt=0)  # AdamW's peak learning rate for the actor
    critic_learning_rate: float = Field(5e-4, gt=0)  # and for the critic (ppo only)
    weight_decay: float = Field(0.0, ge=0)  # AdamW's decoupled weight decay (not on biases and norms)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)  # share of optimizer steps with linear warmup
    lr_schedule: Literal["cosine", "linear", "constant"] = "constant"  # decay after the warmup
    adam_beta1: float = Field(0.9, gt=0, lt=1)  # AdamW's first-moment decay
    adam_beta2: float = Field(0.95, gt=0, lt=1)  # AdamW's second-moment decay


class LoraPair(Group):
    """LoRA of the two trained models (rank 0 = off)."""

    actor: LoraConfig = Field(default_factory=LoraConfig)
    critic: LoraConfig = Field(default_factory=LoraConfig)


class EnginePair(Group):
    """Per-model overrides of the `engine` group; null inherits it. ref: frozen, so ZeRO-3 shards it
    (offload_params offloads it), other stages keep it whole; ref's and reward's offload_optimizer must stay null."""

    actor: ModelEngineConfig = Field(default_factory=ModelEngineConfig)
    critic: ModelEngineConfig = Field(default_factory=ModelEngineConfig)
    ref: ModelEngineConfig = Field(default_factory=ModelEngineConfig)
    reward: ModelEngineConfig = Field(default_factory=ModelEngineConfig)


class PPOConfig(Group):
    """Step 3. Every constant of the algorithm is here; none is hidden in the trainer (DeepSpeed-Chat hard-codes
    kl_ctl, clip ranges, gamma and lambda in ppo_trainer.py)."""

    # ppo: critic + GAE; grpo: group-relative advantages (no critic); dr_grpo: GRPO without the std and length
    # biases; dapo: GRPO's baseline with DAPO's token_mean and clip-higher; gspo: GRPO's baseline with one clipped
    # ratio per answer (GSPO); cispo: GRPO's baseline with CISPO's clipped importance weights on every token; rloo:
    # leave-one-out baseline over the group (no critic); reinforce_pp: REINFORCE++, token-level KL in the reward and
    # batch-whitened returns (no critic). The keys of ALGORITHM_DEFAULTS left null take the algorithm's published
    # values
    algorithm: Literal["ppo", "grpo", "dr_grpo", "dapo", "gspo", "cispo", "rloo", "reinforce_pp"] = "ppo"
    # your RLTrainer subclass, "module:Class" importable from the project folder or the environment (null = ours)
    trainer: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    iterations: int = Field(100, gt=0)  # each: generate -> score -> advantages -> update
    rollout_batch_size: int = Field(32, gt=0)  # prompts per rank per iteration
    # answers sampled per prompt (OpenRLHF's n_samples_per_prompt; GRPO's group size G); null: 4 for grpo and rloo,
    # which compare the answers to one prompt, 1 otherwise; > 1 runs each prompt through the models once, not k times
    answers_per_prompt: int | None = Field(None, gt=0)
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
    ema_beta: float = Field(0.992, ge=0, lt=1)  # EMA of the actor (0 = no EMA output)
    eval_prompts: int = Field(256, ge=0)  # held-out prompts scored by the reward model before and after PPO
    log_every: int = Field(1, gt=0)  # iterations between logged points
    checkpoint_every: int = Field(0, ge=0)  # iterations between resumable checkpoints in checkpoints/ppo (0 = none)
    max_bad_steps: int = Field(3, gt=0)  # consecutive non-finite micro-batch updates (skipped) before aborting
    # stop (exit 2, no model written) after this many iterations in a row whose rewards had no variance to learn
    # from: every answer scored alike (every group, for grpo and rloo); 0 = never
    max_flat_iterations: int = Field(10, ge=0)
    # Rollout sampling. log pi_old, log pi (update) and log pi_ref are all log_softmax(logits / temperature) over
    # the whole vocabulary (OpenRLHF's and verl's convention): the ratio and the KL compare one distribution, the
    # sampler's exactly while top_k and top_p are off. top_k/top_p truncate the sampler only; the drawn tokens are
    # scored untruncated, because a truncated reference (or the actor after an update) can give a drawn token
    # probability 0: an infinite KL, a zero ratio.
    sampling: Sampling = Field(default_factory=Sampling)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    advantage: AdvantageConfig = Field(default_factory=AdvantageConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    kl: KLConfig = Field(default_factory=KLConfig)
    environment: EnvironmentConfig = Field(default_factory=EnvironmentConfig)
    dynamic_sampling: DynamicSamplingConfig = Field(default_factory=DynamicSamplingConfig)
    overlong: OverlongConfig = Field(default_factory=OverlongConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    lora: LoraPair = Field(default_factory=LoraPair)
    engines: EnginePair = Field(default_factory=EnginePair)

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, raw: Any) -> Any:
        """A key of params.yaml's old flat shape names its new place; null algorithm keys take the algorithm's."""
        if not isinstance(raw, dict):
            return raw
        moved = moved_keys("ppo", raw, MOVED_PPO_KEYS)
        if moved:
            raise ValueError(moved)
        return with_algorithm_defaults(raw)

    def describe(self) -> str:
        """The effective step-3 configuration in one line (the stage prints it when it starts)."""
        kl, adv, loss = self.kl, self.advantage, self.loss
        line = f"k3 KL loss x {kl.coef:g}" if kl.penalty == "loss" else f"k1 KL in the reward x {kl.coef:g}"
        if kl.target is not None:
            line += f" (adaptive, target {kl.target:g})"
        rewards = "rewards z-scored (running)" if adv.reward_normalization == "running" else "raw rewards"
        if adv.reward_clip:
            rewards += f" clipped to +-{adv.reward_clip:g}"
        ratio = "answer ratio" if loss.ratio_level == "sequence" else "ratio"
        clip = (f"{ratio} as a weight clipped at {1 + loss.clip_high:g}" if loss.surrogate == "cispo" else
                f"{ratio} clip [{1 - loss.clip_low:g}, {1 + loss.clip_high:g}]")
        parts = [self.algorithm, line, rewards, loss.aggregation,
                 clip + (f", dual-clip {loss.dual_clip:g}" if loss.dual_clip else "")]
        if self.algorithm in GROUP_ALGORITHMS:
            parts.append(f"groups of {self.group_size}" + (" std-scaled" if adv.group_std else " mean-centred"))
        if self.needs_critic:
            parts.append(f"GAE gamma {adv.gamma:g} lambda {adv.lam:g}" + (", whitened" if adv.whiten else ""))
        parts.append(f"{self.rollouts_per_iteration} rollouts/iteration, {self.rollouts_per_iteration // self.mini_batch} "
                     f"optimizer step(s) x {self.ppo_epochs} epoch(s)")
        return "; ".join(parts)

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

    def recomputes_logprobs(self, actor_dtype: str) -> bool:
        """Whether log pi_old comes from one more actor forward, for an actor engine of this dtype: asked for, or
        under auto for a bf16/fp16 actor, for vLLM's rollouts (other kernels) and under a mismatch correction."""
        rollout = self.rollout
        auto = actor_dtype != "fp32" or rollout.engine == "vllm" or rollout.correction != "none"
        return rollout.logprobs == "recompute" or (rollout.logprobs == "auto" and auto)

    @model_validator(mode="after")
    def _batches(self) -> PPOConfig:
        if self.algorithm in GROUP_ALGORITHMS and self.group_size < 2:
            raise ValueError(
                f"ppo.algorithm {self.algorithm} compares the answers to one prompt, so ppo.answers_per_prompt must be "
                f">= 2 (got {self.answers_per_prompt}; null picks 4)"
            )
        truncated = self.sampling.top_k > 0 or self.sampling.top_p < 1
        if self.rollout.engine == "vllm" and self.rollout.correction != "none" and truncated:
            raise ValueError(
                f"ppo.rollout.correction {self.rollout.correction} with ppo.rollout.engine vllm and top_k/top_p "
                "sampling: vLLM's log-probs are of the truncated, renormalised distribution and the trainer's of the "
                "whole vocabulary, so the ratio is biased by the kept mass (trl#6789): set ppo.sampling.top_k: 0 and "
                "top_p: 1.0, or correction: none")
        if self.rollout.gather_layers and self.rollout.engine != "own":
            raise ValueError(f"ppo.rollout.gather_layers {self.rollout.gather_layers} decodes with ppo.rollout.engine "
                             f"own, not {self.rollout.engine}: set gather_layers: 0, or engine: own")
        if self.rollout.gather_layers and "embed_tokens" in self.lora.actor.target_modules and self.lora.actor.rank:
            raise ValueError("ppo.rollout.gather_layers decodes with the embeddings whole, without LoRA on them: drop "
                             "embed_tokens from ppo.lora.actor.target_modules, or set gather_layers: 0")
        if self.dynamic_sampling.enabled and self.algorithm not in GROUP_ALGORITHMS:
            raise ValueError(f"ppo.dynamic_sampling drops groups of answers that all scored alike; {self.algorithm} "
                             f"has no groups: use one of {', '.join(GROUP_ALGORITHMS)}, or set enabled: false")
        if not self.sampling.do_sample:
            raise ValueError("ppo.sampling.do_sample is false: step 3 learns from sampled answers, so it must be true "
                             "(greedy decoding is for evaluate.sampling and chat)")
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


# params.yaml's flat step-3 keys before 2026-12 -> their place in the groups (a file of the old shape is refused
# with one line naming the new keys).
MOVED_PPO_KEYS = {
    **{k: f"sampling.{k}" for k in ("temperature", "top_k", "top_p", "max_answer_tokens")},
    "decoder": "rollout.engine", "rollout_logprobs": "rollout.logprobs", "cuda_graphs": "rollout.cuda_graphs",
    **{k: f"advantage.{k}" for k in ("group_std", "gamma", "lam", "reward_normalization", "reward_clip")},
    "whiten_advantages": "advantage.whiten", "loss_aggregation": "loss.aggregation",
    **{k: f"loss.{k}" for k in ("clip_range", "clip_range_low", "clip_range_high", "dual_clip", "value_clip_range",
                                "entropy_coef", "ptx_coef")},
    "kl_penalty": "kl.penalty", "kl_coef": "kl.coef", "kl_clamp": "kl.clamp", "kl_target": "kl.target",
    "kl_horizon": "kl.horizon", "max_kl": "kl.stop_above",
    **{k: f"optimizer.{k}" for k in ("actor_learning_rate", "critic_learning_rate", "weight_decay", "warmup_ratio",
                                     "lr_schedule", "adam_beta1", "adam_beta2")},
    "actor_lora": "lora.actor", "critic_lora": "lora.critic",
    **{f"{m}_engine": f"engines.{m}" for m in ("actor", "critic", "ref", "reward")},
}

