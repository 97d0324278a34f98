"""Forward passes over prompt + answer batches that do not pay for the prompt more than once.

An RL batch is (B, T) = (B, P + R): left-padded prompts of width P, then answers. Two things waste work there:
- padding columns: prompts are padded to a width fixed for the whole run, so the batch usually starts with
  columns that are padding in every row; they are cut off (exact: position ids start at each row's first real
  token and padding is masked out anyway);
- repeated prompts: with several answers per prompt (`ppo.answers_per_prompt`, GRPO's groups) each prompt
  appears k times. Its tokens go through the model once, the key/value cache is copied to its k rows, and only
  the answers run per row: at k = 4 and prompts as long as answers that removes ~40% of every forward pass, in
  generation, scoring and training alike (gradients flow through the shared cache to the prompt's activations).

Results equal those of one full forward pass up to float rounding (the attention sums run in another order).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch



def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions that start at 0 on the first real token, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def first_real_column(prompt_mask: torch.Tensor) -> int:
    """Index of the first column of (B, P) left-padded prompts that holds a real token in some row."""
    return int(prompt_mask.any(0).long().argmax())


def prompt_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rows that repeat a prompt: (first (U,) one row of each distinct prompt, inverse (B,) each row's distinct
    prompt), or None when every prompt differs (then there is nothing to share)."""
    import torch

    key = torch.cat([prompt_ids * prompt_mask, prompt_mask], dim=1)
    distinct, inverse = torch.unique(key, dim=0, return_inverse=True)
    if distinct.shape[0] == key.shape[0]:
        return None
    rows = torch.arange(key.shape[0], device=key.device)
    first = torch.empty(distinct.shape[0], dtype=torch.long, device=key.device).scatter_(0, inverse, rows)
    return first, inverse


def _prefill(call: Callable[..., Any], ids: torch.Tensor, mask: torch.Tensor, groups: tuple[Any, Any],
             **kwargs: Any) -> tuple[Any, Any]:
    """Run each distinct prompt of (B, P) `ids` once into a fresh KV cache, then copy the cache to every row of its
    prompt: (the output for the distinct prompts, the (B, ...) cache)."""
    from transformers import DynamicCache

    first, inverse = groups
    cache = DynamicCache()
    out = call(input_ids=ids[first], attention_mask=mask[first], position_ids=position_ids(mask[first]),
               past_key_values=cache, use_cache=True, **kwargs)
    cache.batch_select_indices(inverse)
    return out, cache


def prefill_shared(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any | None:
    """The KV cache of every prompt but its last token, computed once per distinct prompt and copied to its rows,
    for `generate(..., past_key_values=cache)`; None when no prompt repeats."""
    groups = prompt_groups(input_ids, attention_mask) if input_ids.shape[1] > 1 else None
    if groups is None:
        return None
    return _prefill(model, input_ids[:, :-1], attention_mask[:, :-1], groups, logits_to_keep=1)[1]


def answer_outputs(call: Callable[..., Any], field: str, sequences: torch.Tensor, attention_mask: torch.Tensor,
                   p: int, share: bool = True,
                   last: bool = True) -> Any:
    """`call(input_ids=..., attention_mask=..., position_ids=...)`'s output `field` (logits or last_hidden_state)
    at positions p - 1 .. T - 1, the ones that predict or score the answer tokens: (B, R + 1, ...). With `last`
    False, at p - 1 .. T - 2 only, (B, R, ...): the positions that predict an answer token; the last token is then
    not fed at all (causal attention: nothing before it changes), which log-probabilities and values need.

    All-padding prompt columns are skipped, and logits are computed only where they are returned; with `share`
    and repeated prompts, each prompt runs once (see the module docstring). `share` must be False where the model
    drops its cache (gradient checkpointing in training).
    """
    import torch

    if not last:
        sequences, attention_mask = sequences[:, :-1], attention_mask[:, :-1]
    start = first_real_column(attention_mask[:, :p])
    seq, mask, p = sequences[:, start:], attention_mask[:, start:], p - start
    keep = (lambda n: {"logits_to_keep": n}) if field == "logits" else (lambda n: {})
    groups = prompt_groups(seq[:, :p], mask[:, :p]) if share and seq.shape[1] > p else None
    if groups is None:
        out = call(input_ids=seq, attention_mask=mask, position_ids=position_ids(mask), **keep(seq.shape[1] - p + 1))
        return getattr(out, field)[:, -(seq.shape[1] - p + 1) :]
    head, cache = _prefill(call, seq[:, :p], mask[:, :p], groups, **keep(1))
    tail = call(input_ids=seq[:, p:], attention_mask=mask, position_ids=position_ids(mask)[:, p:],
                past_key_values=cache, use_cache=True)
    return torch.cat([getattr(head, field)[groups[1], -1:], getattr(tail, field)], dim=1)
