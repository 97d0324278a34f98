"""Pure PPO math (tensors and floats in, tensors out). Shapes: (B, A) per answer token, mask 1 on real tokens."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) labels -> (B, T) log p(label)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def kl_shaped_rewards(logprobs, ref_logprobs, scores, mask, kl_coef: float, reward_clip: float):
    mask = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    if reward_clip > 0:
        scores = scores.clamp(-reward_clip, reward_clip)
    lengths = mask.sum(-1).long()
    rows = torch.nonzero(lengths > 0).squeeze(-1)
    rewards[rows, lengths[rows] - 1] += scores[rows].to(rewards.dtype)
    return rewards * mask, kl


@torch.no_grad()
def gae_advantages(values, rewards, mask, gamma: float, lam: float):
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    adv = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    a = values.shape[1]
    for t in reversed(range(a)):
        next_v = values[:, t + 1] * mask[:, t + 1] if t + 1 < a else torch.zeros_like(last)
        next_m = mask[:, t + 1] if t + 1 < a else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * next_m * last
        adv[:, t] = last
    adv = adv * mask
    return adv, (adv + values) * mask


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range: float):
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean((clipped > unclipped).float(), mask).item(),
            "approx_kl": masked_mean(0.5 * (logprobs - old_logprobs) ** 2, mask).item(),
            "ratio": masked_mean(ratio, mask).item(),
        }
    return loss, stats


def value_loss(values, old_values, returns, mask, clip_range: float):
    if clip_range > 0:
        clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
        a, b = (values - returns) ** 2, (clipped - returns) ** 2
        loss = 0.5 * masked_mean(torch.max(a, b), mask)
        frac = masked_mean((b > a).float(), mask).item()
    else:
        loss = 0.5 * masked_mean((values - returns) ** 2, mask)
        frac = 0.0
    return loss, {"value_clip_fraction": frac}


class AdaptiveKLController:
    def __init__(self, init_kl_coef: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        err = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + err * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]


@torch.no_grad()
def ema_update(ema_params: Iterable[torch.Tensor], params: Iterable[torch.Tensor], beta: float) -> None:
    for e, p in zip(ema_params, params):
        e.mul_(beta).add_(p.to(e.dtype), alpha=1 - beta)
