"""What a memory plan needs to know of a model, read from its config without loading a weight: its parameters (all,
trained, the largest module's, one decoder layer's) from the model built on PyTorch's meta device (any architecture
transformers knows: Llama, Qwen, Gemma, OPT, ...), and the widths that size activations and the KV cache."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

from rlhf.config import LoraConfig

Head = Literal["causal_lm", "score"]


@dataclass(frozen=True)
class ModelShape:
    params: int  # every parameter (tied embeddings once)
    trained: int  # parameters the optimizer updates: all, or the LoRA adapters (+ the base with only_optimize_lora off)
    lora: int  # LoRA adapter parameters (0 without LoRA)
    largest_module: int  # the largest module's own parameters (ZeRO-3 gathers one module's at a time to train)
    layer: int  # one decoder layer's parameters (a gathered layer group is made of these)
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_width: int  # key/value heads x head size: one token's K (or V) in one layer
    vocab: int
    head: Head  # causal_lm: logits over the vocabulary; score: one value per token (reward model, critic)
    model_type: str = ""  # the config's model_type (llama, opt, ...)


def _first(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _lora_params(model: Any, lora: LoraConfig) -> int:
    """Adapter parameters peft would add: rank x (in + out) per targeted linear layer (matched by its last name)."""
    import torch

    total = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in lora.target_modules and isinstance(module, torch.nn.Linear):
            total += lora.rank * (module.in_features + module.out_features)
    return total


def model_shape(config: Any, head: Head = "causal_lm", lora: LoraConfig | None = None) -> ModelShape:
    """The shape of the model `config` describes (an HF PretrainedConfig), with `head`, LoRA applied if given."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    with torch.device("meta"):
        if head == "score":
            config = copy.deepcopy(config)
            config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    own = [sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()]
    blocks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1]
    layers = max(blocks, key=lambda b: sum(p.numel() for p in b.parameters()), default=None)
    layer = sum(p.numel() for p in layers[0].parameters()) if layers is not None else params
    adapters = _lora_params(model, lora) if lora is not None and lora.rank > 0 else 0
    trained = params + adapters if adapters == 0 or not lora.only_optimize_lora else adapters
    hidden = _first(text, "hidden_size", "n_embd", "d_model")
    heads = _first(text, "num_attention_heads", "n_head")
    head_dim = _first(text, "head_dim", default=None) or hidden // heads
    kv_heads = _first(text, "num_key_value_heads", default=heads)
    return ModelShape(
        params=params, trained=trained, lora=adapters, largest_module=max(own), layer=layer,
        layers=len(layers) if layers is not None else _first(text, "num_hidden_layers", "n_layer", default=1),
        hidden=hidden, intermediate=_first(text, "intermediate_size", "ffn_dim", "n_inner", default=4 * hidden),
        heads=heads, kv_width=kv_heads * head_dim, vocab=_first(text, "vocab_size"), head=head,
        model_type=getattr(text, "model_type", "") or "",
    )
