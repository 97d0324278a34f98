"""Our hybrid engine: the actor switches between ZeRO training and a fast generation mode.

DeepSpeed's own `hybrid_engine` has no CPU kernels, so this one is built from public DeepSpeed and peft APIs and
runs the same code on CPU and CUDA:

- generation mode: eval, no grad; under ZeRO-3 every parameter is gathered **once per rollout** (not once per layer
  per token, which is what makes `generate(..., synced_gpus=True)` on a ZeRO-3 engine slow); LoRA adapters are
  fused into the base weights for the rollout (with ppo.rollout.gather_layers, where the actor is gathered a layer
  group at a time, applied beside them instead); our decode loop (rlhf.rollout.decode) runs on the gathered weights with a
  preallocated KV cache (transformers' generate stays as a fallback, ppo.rollout.engine);
- training mode: the DeepSpeed engine as it was (sharded, LoRA unfused, train/eval state restored).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from deepspeed import DeepSpeedEngine



def _lora_layers(module: torch.nn.Module) -> list[Any]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft is a dependency; keep the engine usable without adapters anyway
        return []
    return [m for m in module.modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def _fused_lora(module: torch.nn.Module) -> Iterator[None]:
    """Merge LoRA adapters into the base weights for the block, then restore the exact original weights (an
    unmerge alone would leave rounding drift in frozen base weights)."""
    layers = _lora_layers(module)
    if not layers:
        yield
        return
    originals = [(layer.get_base_layer().weight, layer.get_base_layer().weight.data.clone()) for layer in layers]
    for layer in layers:
        layer.merge()
    try:
        yield
    finally:
        for layer in layers:
            layer.unmerge()
        for weight, data in originals:
            weight.data.copy_(data)


@contextlib.contextmanager
def _zero3_gathered(engine: DeepSpeedEngine) -> Iterator[None]:
    """Gather every ZeRO-3 parameter once and lift DeepSpeed's per-module fetch/release hooks for the block, so
    that decoding runs on whole local weights with no collective per layer per token (the approach of DeepSpeed's
    own unwrap_model_for_generation, made exception-safe); the hooks are registered again on the way out."""
    import deepspeed

    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)  # noqa: SLF001 - DeepSpeed's own re-hook


class HybridEngine:
    """Wraps the actor's DeepSpeed engine. Train through `.engine`; generate inside `generation_mode()`."""

    def __init__(self, engine: DeepSpeedEngine, zero_stage: int, gather_layers: int = 0):
        self.engine = engine
        self.zero_stage = zero_stage
        # ppo.rollout.gather_layers under ZeRO-3: the decode loop gathers layer groups itself (layer_gather)
        self.gather_layers = gather_layers if zero_stage == 3 else 0

    def layer_gather(self, params: list[torch.nn.Parameter]) -> contextlib.AbstractContextManager[Any]:
        """`params` whole on every rank for the block (ZeRO-3's shards gathered, then released)."""
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @contextlib.contextmanager
    def generation_mode(self) -> Iterator[Any]:
        """Yield the model ready to decode; always restores training state, shards and unfused adapters. Nothing
        is garbage-collected here: the gathered shards and the KV cache are freed when their last reference goes
        (a full gc.collect() per rollout cost 0.15 s of a 0.8 s iteration at 5M parameters)."""
        import torch

        module = self.engine.module
        was_training = module.training
        whole = self.zero_stage == 3 and not self.gather_layers
        gather = _zero3_gathered(self.engine) if whole else contextlib.nullcontext()
        # layered: the weights are shards until the decode loop gathers their group, so the adapters are applied
        # beside them (rlhf.rollout.llama._weight), not merged
        fuse = contextlib.nullcontext() if self.gather_layers else _fused_lora(module)
        try:
            with torch.no_grad(), gather, fuse:
                module.eval()
                yield module
        finally:
            module.train(was_training)
