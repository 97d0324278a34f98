"""The rollout/training mismatch: how far the rollout engine's log-probs of the drawn tokens are from the training
forward's, and the importance weights that correct the policy loss for it.

A rollout engine (vLLM's kernels, our bf16 decode) samples from a policy pi_rollout that differs from the training
forward's pi_old by float rounding, and more in bf16/fp16 or across kernels. The update's ratio pi / pi_old then
corrects for the wrong distribution. The field's fix (Yao et al. 2025, "Your efficient RL framework secretly brings
you off-policy RL training"; OpenRLHF's tis / icepop / seq-mask-tis, verl's rollout_corr, TRL's
vllm_importance_sampling_*) weighs each token's policy loss by rho = pi_old / pi_rollout, detached, bounded:

    token_tis   w_t = min(rho_t, max)                                    truncated IS per token
    token_mask  w_t = rho_t if min <= rho_t <= max else 0                masked IS per token (icepop)
    seq_tis     w_t = min(prod_t rho_t, max) for every token of the answer   truncated IS per sequence
    seq_mask    w_t = min(rho_t, max) where the answer's geometric mean exp(mean_t log rho_t) is in [min, max],
                else 0 for the whole answer                              (OpenRLHF's seq-mask-tis filter)
    none        w_t = 1 (the mismatch is still measured)

Every weight is 0 on padding. Traps avoided: a ratio taken against a top-k/top-p renormalised rollout log-prob is off
by the kept mass (trl#6789), so the config refuses a correction with truncated sampling on an engine that
renormalises; a sequence ratio is a product that grows with length (trl#4772): log its raw value and how many
answers a mask dropped.
"""

from __future__ import annotations

import typing
from typing import TYPE_CHECKING

import torch

from rlhf.config.rl import RolloutConfig
from rlhf.training.stats import max_over_ranks, sum_over_ranks

if TYPE_CHECKING:
    from rlhf.rl.experience import Experience
    from rlhf.training.runtime import Dist

CORRECTIONS = typing.get_args(RolloutConfig.model_fields["correction"].annotation)  # ppo.rollout.correction's values


def _exp(log_ratio: torch.Tensor) -> torch.Tensor:
    """exp of a log ratio bounded to [-20, 20] (verl's safety bound): it never overflows."""
    return torch.exp(log_ratio.clamp(-20.0, 20.0))


def is_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, mode: str,
               low: float, high: float) -> torch.Tensor:
    """(B, R) importance weights of the policy loss for `mode` (module docstring), 0 on padding, no gradient."""
    mask = mask.to(old_logprobs.dtype)
    if mode == "none":
        return mask.clone()
    log_rho = ((old_logprobs - rollout_logprobs) * mask).detach()
    rho = _exp(log_rho)
    if mode == "token_tis":
        return rho.clamp(max=high) * mask
    if mode == "token_mask":
        return rho * ((rho >= low) & (rho <= high)) * mask
    if mode == "seq_tis":
        seq = _exp(log_rho.sum(-1)).clamp(max=high)  # (B,)
        return seq[:, None] * mask
    if mode == "seq_mask":
        geo = torch.exp(log_rho.sum(-1) / mask.sum(-1).clamp(min=1))  # (B,)
        keep = ((geo >= low) & (geo <= high)).to(rho.dtype)
        return rho.clamp(max=high) * keep[:, None] * mask
    raise ValueError(f"unknown correction {mode!r}: one of {', '.join(CORRECTIONS)}")


def mismatch_stats(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                   weights: torch.Tensor, dist: Dist | None = None) -> dict[str, float]:
    """What the mismatch was this iteration, over every real answer token of every rank:
        mismatch_kl          mean of log pi_rollout - log pi_old (k1 estimate of KL(rollout || old) per token)
        mismatch_k3          mean of rho - 1 - log rho (k3 estimate of the same, never negative)
        mismatch_ratio_mean  mean of rho = pi_old / pi_rollout, before any bound
        mismatch_ratio_max   its largest value
        mismatch_abs_max     largest |log pi_old - log pi_rollout|
        is_weight_mean       mean importance weight of the loss (1 under correction none)
        is_masked            share of answer tokens the correction gave weight 0"""
    real = mask > 0
    log_rho = (old_logprobs - rollout_logprobs)[real].double()
    rho = _exp(log_rho)
    w = weights[real].double()
    sums = torch.stack([-log_rho.sum(), (rho - 1 - log_rho).sum(), rho.sum(), w.sum(), (w == 0).sum().double(),
                        torch.tensor(float(log_rho.numel()), dtype=torch.float64)])
    tops = torch.stack([rho.max() if rho.numel() else rho.new_zeros(()),
                        log_rho.abs().max() if rho.numel() else rho.new_zeros(())])
    world = dist.world_size if dist is not None else 1
    sums, tops = sum_over_ranks(sums, world), max_over_ranks(tops, world)
    n = max(sums[-1].item(), 1.0)
    return {"mismatch_kl": sums[0].item() / n, "mismatch_k3": sums[1].item() / n, "mismatch_ratio_mean": sums[2].item() / n,
            "mismatch_ratio_max": tops[0].item(), "mismatch_abs_max": tops[1].item(),
            "is_weight_mean": sums[3].item() / n, "is_masked": sums[4].item() / n}


def correct(exp: Experience, cfg: RolloutConfig, dist: Dist) -> dict[str, float]:
    """The rollout/training mismatch of an iteration's experience: sets exp.is_weights under ppo.rollout.correction
    and returns what to log (mismatch_*, is_*) over every rank's answer tokens."""
    weights = is_weights(exp.logprobs, exp.rollout_logprobs, exp.action_mask, cfg.correction, cfg.correction_min,
                         cfg.correction_max)
    exp.is_weights = None if cfg.correction == "none" else weights
    return mismatch_stats(exp.logprobs, exp.rollout_logprobs, exp.action_mask, weights, dist)
