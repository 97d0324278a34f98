"""Useful FLOPs, the count people compare hardware by (DeepSpeed-Chat prints TFLOPs for every step).

For a model with N parameters in matmuls (every Linear, lm_head or score head included, embeddings not) and a
sequence of T real tokens (padding is not useful work): a forward pass costs 2 N T plus causal attention
2 L T^2 d (L layers, hidden size d: QK^T and AV, halved for the causal mask; PaLM appendix B); a training step
(forward and backward) three times that, 6 N T + 6 L T^2 d. LoRA's frozen weights still take part in the forward
and in the backward through activations, so the same count is used (a slight overcount of the weight gradients).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch



def matmul_params(model: torch.nn.Module) -> int:
    """N: the parameters in matmuls (torch.nn.Linear weights, LoRA's included)."""
    import torch

    module = getattr(model, "module", model)
    # under ZeRO-3 a weight is a shard here: ds_numel is its whole size
    return sum(getattr(m.weight, "ds_numel", m.weight.numel()) for m in module.modules() if isinstance(m, torch.nn.Linear))


def forward_flops(model: torch.nn.Module, lengths: list[int], n_matmul: int | None = None) -> float:
    """2 N T + 2 L T^2 d summed over sequences of the given real lengths."""
    module = getattr(model, "module", model)
    cfg = getattr(module, "config", None)
    layers, hidden = getattr(cfg, "num_hidden_layers", 0), getattr(cfg, "hidden_size", 0)
    n = matmul_params(model) if n_matmul is None else n_matmul
    return float(sum(2 * n * t + 2 * layers * t * t * hidden for t in lengths))


def train_flops(model: torch.nn.Module, lengths: list[int], n_matmul: int | None = None) -> float:
    """One training step (forward + backward) on sequences of these lengths: 3 x forward_flops."""
    return 3 * forward_flops(model, lengths, n_matmul)


def batch_lengths(batch: dict[str, Any]) -> list[int]:
    """Real tokens per row of a collated batch (its attention mask; every row of a pair batch counts)."""
    mask = batch.get("attention_mask")
    if mask is None:
        return []
    return [int(x) for x in mask.sum(-1).tolist()]
