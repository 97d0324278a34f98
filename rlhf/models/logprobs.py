"""Summed log-probabilities of answers given their prompts, the quantity DPO trains on and evaluate's KL and
perplexity read (rlhf/data/batching.py pads the rows)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rlhf.data.batching import answer_positions, right_pad

if TYPE_CHECKING:
    import torch



def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[label] at every position, computed in float32.

    logits: (B, T, V); labels: (B, T) int64 token ids -> (B, T) float32 log p_T(label).
    The caller aligns them (logits at position t predict the token at t + 1).
    temperature: the sampler's; PPO scores log pi_old, log pi and log pi_ref all at the rollout temperature, over the
    whole vocabulary (OpenRLHF's and verl's convention), so the ratio and the KL compare the same distribution.
    Written as gather - logsumexp so no second (B, T, V) tensor of log-probabilities is kept.
    """
    logits = logits.float()  # (B, T, V) bf16/fp16 logits lose too much precision in the softmax
    if temperature != 1.0:
        logits = logits / temperature  # (B, T, V) a new tensor: the caller's logits are left as they were
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T) logit of the label
    return picked - torch.logsumexp(logits, dim=-1)  # (B, T)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T) entropy of softmax(logits / temperature) at each position, in float32 (logits: (B, T, V))."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def sequence_logprobs(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, answer: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """(B,) sum of log p_T(answer tokens | what precedes them) of right-padded rows under `model` (with gradient
    when the caller allows it); answer: (B, T) 1 on the answer's positions (answer_positions)."""
    from rlhf.models.logprobs import logprobs_from_logits
    from rlhf.models.prefix import position_ids

    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    lp = logprobs_from_logits(logits[:, :-1], ids[:, 1:], temperature)  # (B, T - 1): position t predicts t + 1
    return (lp * answer[:, 1:].to(lp.device)).sum(-1)


def answer_logprobs(
    model: torch.nn.Module, pad_id: int, prompts: list[list[int]], answers: list[list[int]], batch_size: int,
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
