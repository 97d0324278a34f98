"""Summed log-probabilities of answers given their prompts, the quantity DPO trains on and evaluate's KL and
perplexity read (rlhf/batching.py pads the rows)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlhf.batching import answer_positions, right_pad

if TYPE_CHECKING:
    import torch


def sequence_logprobs(model: Any, ids: torch.Tensor, mask: torch.Tensor, answer: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """(B,) sum of log p_T(answer tokens | what precedes them) of right-padded rows under `model` (with gradient
    when the caller allows it); answer: (B, T) 1 on the answer's positions (answer_positions)."""
    from rlhf.ppo_math import logprobs_from_logits
    from rlhf.prefix import position_ids

    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    lp = logprobs_from_logits(logits[:, :-1], ids[:, 1:], temperature)  # (B, T - 1): position t predicts t + 1
    return (lp * answer[:, 1:].to(lp.device)).sum(-1)


def answer_logprobs(
    model: Any, pad_id: int, prompts: list[list[int]], answers: list[list[int]], batch_size: int,
    temperature: float = 1.0,
) -> list[float]:
    """Sum of log p_T(answer tokens | prompt) under `model` at `temperature`, per row, without gradient; each answer
    is scored as given (its eos included when it has one)."""
    import torch

    sums: list[float] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        rows = [p + a for p, a in zip(chunk, answers[i : i + batch_size])]
        ids, mask = right_pad(rows, pad_id)
        answer = answer_positions([len(p) for p in chunk], [len(r) for r in rows], ids.shape[1])
        with torch.no_grad():
            sums += sequence_logprobs(model, ids, mask, answer, temperature).tolist()
    return sums
