"""Params of steps 1 and 2: the shared training knobs (SFT, reward model) and DPO's."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from rlhf.config.base import Group
from rlhf.config.models import LoraConfig


class TrainConfig(Group):
    """Optimisation knobs shared by the SFT and reward steps."""

    epochs: int = Field(1, gt=0)  # passes over the training split
    micro_batch_size: int = Field(16, gt=0)  # per rank, per forward pass
    gradient_accumulation_steps: int = Field(1, gt=0)  # micro batches whose gradients make one optimizer step
    # Samples per optimizer step over all ranks, as a check: 0 derives it (micro_batch_size x
    # gradient_accumulation_steps x engine.num_procs); non-zero must equal that product, so a changed rank count
    # cannot silently change the effective batch (DeepSpeed's train_batch_size rule).
    global_batch_size: int = Field(0, ge=0)
    learning_rate: float = Field(1e-3, gt=0)  # AdamW's peak learning rate
    weight_decay: float = Field(0.0, ge=0)  # AdamW's decoupled weight decay (not on biases and norms)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)  # share of optimizer steps with linear warmup
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after the warmup
    adam_beta1: float = Field(0.9, gt=0, lt=1)  # AdamW's first-moment decay
    adam_beta2: float = Field(0.95, gt=0, lt=1)  # AdamW's second-moment decay
    eval_batch_size: int = Field(64, gt=0)  # rows per forward when scoring the held-out split
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

    # sigmoid: DPO (cDPO with label_smoothing > 0); ipo: IPO; simpo: SimPO (Meng et al. 2024: no reference, mean
    # log-probability per token, a target margin); orpo: ORPO (Hong et al. 2024: no reference, the chosen answers'
    # NLL plus beta x the log odds ratio term); kto: KTO (Ethayarajh et al. 2024: answers labelled desirable or not,
    # one at a time: TRL's unpaired rows, and each pair as its two answers; rlhf/prefs/kto.py)
    loss_type: Literal["sigmoid", "ipo", "simpo", "orpo", "kto"] = "sigmoid"
    # DPO's beta, the strength of the KL to the reference (IPO: its tau; SimPO: its reward scale; ORPO: its lambda);
    # null = the loss's published value: 0.1 (sigmoid, ipo, orpo, kto), 2.0 (simpo)
    beta: float | None = Field(None, gt=0)
    simpo_gamma: float = Field(1.0, ge=0)  # SimPO's target reward margin gamma (gamma / beta = 0.5 at beta 2)
    ipo_length_normalize: bool = True  # ipo on mean log-probabilities per answer token (TRL's); false: summed
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # cDPO: the probability that a preference label is flipped
    # + sft_coef x the chosen answers' negative log-likelihood per token: RPO (Pang et al. 2024; TRL's rpo_alpha),
    # so that DPO cannot lower the likelihood of both answers of a pair (0 = plain DPO; on the shipped task it ran
    # every answer to the length limit at this learning rate: README); ORPO's own SFT term; null = the loss's:
    # 1.0 (sigmoid, ipo, orpo), 0 (simpo, kto)
    sft_coef: float | None = Field(None, ge=0)
    # KTO's weight of the desirable answers' losses (TRL's desirable_weight): keep desirable weight x their count
    # over undesirable weight x theirs within 1 to 4/3
    kto_desirable_weight: float = Field(1.0, ge=0)
    kto_undesirable_weight: float = Field(1.0, ge=0)  # and of the undesirable answers' (TRL's undesirable_weight)
    # dropout off in the trained policy (the reference is scored in eval mode): with it on, the first step's
    # log-ratios are noise and its loss is not log 2 (TRL's disable_dropout)
    disable_dropout: bool = True

    @model_validator(mode="before")
    @classmethod
    def _loss_defaults(cls, raw: Any) -> Any:
        """beta and sft_coef left null take the loss's published values (LOSS_DEFAULTS)."""
        if not isinstance(raw, dict):
            return raw
        defaults = LOSS_DEFAULTS.get(raw.get("loss_type", "sigmoid"), {})
        return {**raw, **{k: v for k, v in defaults.items() if raw.get(k) is None}}

    @property
    def needs_reference(self) -> bool:
        """Whether the loss compares the policy with the frozen SFT model (SimPO and ORPO do not)."""
        return self.loss_type in ("sigmoid", "ipo", "kto")


# dpo.loss_type -> its published beta and SFT weight: DPO and IPO as TRL runs them, with our RPO term (README);
# SimPO's recommended beta 2.0 (Meng et al. 2024: 2.0-2.5) without the CPO term; ORPO's lambda 0.1 and its NLL;
# KTO's beta 0.1 (TRL's), no SFT term
LOSS_DEFAULTS: dict[str, dict[str, float]] = {
    "sigmoid": {"beta": 0.1, "sft_coef": 1.0}, "ipo": {"beta": 0.1, "sft_coef": 1.0},
    "simpo": {"beta": 2.0, "sft_coef": 0.0}, "orpo": {"beta": 0.1, "sft_coef": 1.0},
    "kto": {"beta": 0.1, "sft_coef": 0.0},
}
