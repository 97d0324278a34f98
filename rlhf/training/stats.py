"""Masked statistics over answer tokens, summed over ranks when asked: mean, whitening, running moments."""

from __future__ import annotations

from collections.abc import Callable

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over entries where mask is 1.

    x: any shape; mask: same shape (bool or 0/1 float). dim None -> scalar; an int -> that dimension reduced.
    Masked-off entries are replaced (not multiplied) by 0, so inf/NaN in padding cannot leak in.
    An all-masked slice has mean 0 (its count is clamped to 1).
    """
    keep = mask.bool()
    total = torch.where(keep, x, torch.zeros_like(x))
    count = keep.to(x.dtype)
    if dim is None:
        return total.sum() / count.sum().clamp(min=1)
    return total.sum(dim) / count.sum(dim).clamp(min=1)


AllReduce = Callable[[torch.Tensor], torch.Tensor]  # a tensor summed over every rank (identity on one rank)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
    all_reduce: AllReduce | None = None,
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and biased variance (unbiased=False) over masked entries only.

    x, mask: same shape, e.g. (B, A) advantages. Returns x's shape; entries where mask is 0 are 0.
    shift_mean False adds the mean back (scale only), as TRL's masked_whiten does.
    all_reduce (a sum over ranks): the mean and variance are those of every rank's entries together, as verl and
    OpenRLHF whiten over the global batch; the sums are taken in float64, so splitting a batch changes nothing.
    """
    if all_reduce is None:
        mean = masked_mean(x, mask)  # () over all real tokens of the batch
        var = masked_mean((x - mean) ** 2, mask)  # () biased: divides by the count, not count - 1
    else:  # over every rank's real tokens: sums first, then the variance around the global mean
        keep = mask.bool()
        x64 = torch.where(keep, x.double(), torch.zeros_like(x, dtype=torch.float64))
        total, count = all_reduce(torch.stack([x64.sum(), keep.sum().double()])).unbind()
        mean64 = total / count.clamp(min=1)
        sq = all_reduce(torch.where(keep, (x64 - mean64) ** 2, torch.zeros_like(x64)).sum())
        mean, var = mean64.to(x.dtype), (sq / count.clamp(min=1)).to(x.dtype)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


class RunningMoments:
    """Mean and standard deviation of every reward seen so far, merged batch by batch (Chan et al. 1979's parallel
    update, as TRL's RunningMoments), for ppo.advantage.reward_normalization: running.

    update(total, total_sq, n) takes a batch's sum, sum of squares and count (summed over ranks by the caller, so
    every rank holds the same moments); normalize(scores) is (scores - mean) / std with the moments so far.
    """

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0.0

    def update(self, total: float, total_sq: float, n: float) -> None:
        if n <= 0:
            return
        batch_mean = total / n
        batch_var = max(total_sq / n - batch_mean**2, 0.0)
        count = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / count
        self.mean += delta * n / count
        self.var, self.count = m2 / count, count

    @property
    def std(self) -> float:
        """The unbiased standard deviation (1.0 until two rewards were seen)."""
        return (self.var * self.count / (self.count - 1)) ** 0.5 if self.count > 1 else 1.0

    def normalize(self, scores: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        return (scores - self.mean) / (self.std + eps)

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), float(state["count"])


def sum_over_ranks(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """x summed over every rank (a new tensor; x itself alone on one rank)."""
    if world_size == 1:
        return x
    x = x.clone()
    torch.distributed.all_reduce(x)
    return x


def scores_vary(scores: torch.Tensor, group_size: int | None, world_size: int) -> bool:
    """Whether raw scores (every rank's) have something to learn from: with `group_size` (grpo, rloo) some group of
    that many consecutive answers scored differently; without, some spread over the whole batch."""
    if group_size is not None:
        groups = scores.double().view(-1, group_size)
        spread = (groups.max(-1).values > groups.min(-1).values).sum().double()
        return sum_over_ranks(spread, world_size).item() > 0
    low_high = torch.stack([scores.double().min(), -scores.double().max()])
    if world_size > 1:
        low_high = low_high.clone()
        torch.distributed.all_reduce(low_high, op=torch.distributed.ReduceOp.MIN)
    return low_high[0].item() < -low_high[1].item()


def max_over_ranks(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """x's elementwise maximum over every rank (a new tensor; x itself alone on one rank)."""
    if world_size == 1:
        return x
    x = x.clone()
    torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX)
    return x
