"""Every loss in one place: the policy and value losses of step 3 (with their aggregations and the k3 KL term) and the
DPO family."""

from __future__ import annotations

import torch

from rlhf.training.stats import masked_mean

LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def aggregation_count(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """() what aggregate_loss divides by in `mode`: the real tokens of mask (token_mean) or its rows (the sequence
    modes). Summed over every micro batch and rank of a mini batch, it is the `total` that makes the micro batches'
    losses add up to the mini batch's."""
    return mask.bool().sum().double() if mode == "token_mean" else torch.tensor(float(mask.shape[0]), dtype=torch.float64)


def aggregate_loss(loss: torch.Tensor, mask: torch.Tensor, mode: str, norm_length: int | None = None,
                   total: float | None = None) -> torch.Tensor:
    """One scalar from per-token losses (B, A) over the real tokens of mask (B, A):

        token_mean               sum_{i,t} l_it / sum_{i,t} m_it    every token weighs the same (DAPO; PPO's
                                                                    masked mean)
        seq_mean_token_mean      1/B sum_i (sum_t l_it / sum_t m_it)  each answer weighs the same, its tokens
                                                                    averaged (GRPO's 1/G sum_i 1/|o_i| sum_t)
        seq_mean_token_sum_norm  1/B sum_i (sum_t l_it / L)           Dr. GRPO: a constant L (norm_length, the
                                                                    longest answer allowed) instead of |o_i|, so
                                                                    the loss has no length bias

    Padding entries are replaced by 0 (not multiplied), so inf/NaN there cannot leak in; an answer with no real
    token counts as 0 in the sequence means.

    total: divide the sum by this count instead of this batch's own (aggregation_count): a mini batch taken as
    several micro batches (and ranks) then adds up to exactly the loss of the whole mini batch, with `total` the
    mini batch's count (verl's and TRL's global token normalisation).
    """
    keep = mask.bool()
    per_token = torch.where(keep, loss, torch.zeros_like(loss))  # (B, A)
    if mode == "token_mean":
        summed = per_token.sum()
    elif mode == "seq_mean_token_mean":
        summed = (per_token.sum(-1) / keep.sum(-1).clamp(min=1)).sum()
    elif mode == "seq_mean_token_sum_norm":
        if not norm_length or norm_length <= 0:
            raise ValueError("seq_mean_token_sum_norm needs norm_length > 0 (the longest answer allowed)")
        summed = (per_token.sum(-1) / norm_length).sum()
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}: use one of {', '.join(LOSS_AGGREGATIONS)}")
    count = aggregation_count(mask, mode).item() if total is None else total
    return summed / max(count, 1.0)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    clip_range_high: float | None = None,
    aggregation: str = "token_mean",
    norm_length: int | None = None,
    total: float | None = None,
    dual_clip: float | None = None,
    weights: torch.Tensor | None = None,
    ratio_level: str = "token",
    surrogate: str = "clip",
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate (Schulman et al. 2017 eq. 7; DeepSpeed-Chat actor_loss_fn), as a loss to minimise.

    logprobs: (B, A) log pi_theta(a_t|s_t) with gradient; old_logprobs: (B, A) at rollout time;
    advantages: (B, A); mask: (B, A); clip_range: epsilon (the low side, eps_low); clip_range_high: eps_high
    (None = clip_range: the symmetric clip; larger lets unlikely tokens grow, DAPO's clip-higher).
        ratio = exp(logprobs - old_logprobs)
        loss  = aggregate(max(-A * ratio, -A * clamp(ratio, 1 - eps_low, 1 + eps_high)))
    aggregation, norm_length, total: see aggregate_loss (token_mean is the masked mean over every real token).
    dual_clip: c > 1 (Ye et al. 2020, "Mastering Complex Control in MOBA Games", eq. 5; verl's clip_ratio_c): where
    A < 0 the per-token loss is min(that loss, -A x c), so a ratio far above 1 + eps cannot make it unbounded
    (the clip surrogate only).
    weights: (B, A) importance weights, no gradient, multiplying each token's loss before aggregation (the
    rollout/training mismatch correction, rlhf/rl/correction.py); None = 1.
    ratio_level: token (each token's ratio) | sequence (GSPO, Zheng et al. 2025 eq. 7: one ratio per answer, the
    geometric mean of its tokens' ratios, exp(1/|o| sum_t log ratio_t), clipped as a whole; the gradient flows
    through every token's log-probability, as TRL's importance_sampling_level="sequence").
    surrogate: clip (above) | cispo (MiniMax-M1, 2025: the ratio becomes a weight, clipped above at 1 + eps_high
    and never below, without gradient, on the REINFORCE term, so every token keeps its gradient:
        loss = aggregate(-sg(min(ratio, 1 + eps_high)) * A * logprobs)
    as TRL's loss_type="cispo"; its eps_high is the ratio's distance above 1, TRL's epsilon_high the bound itself).
    Returns (loss (), stats) with stats:
        clip_fraction  share of real tokens where the clipped term is the active (strictly larger) one (cispo:
                       where the weight is clipped)
        approx_kl      masked_mean(0.5 * (logprobs - old_logprobs)^2), Schulman's k2 estimator of KL(old || new)
        ratio          masked mean of the ratio (sequence: each answer's, on each of its tokens)
    """
    high = clip_range if clip_range_high is None else clip_range_high
    log_ratio = logprobs - old_logprobs  # (B, A)
    if ratio_level == "sequence":  # one ratio per answer, on each of its tokens
        per_answer = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (B,)
        ratio = torch.exp(per_answer)[:, None].expand_as(log_ratio)  # (B, A)
    elif ratio_level == "token":
        ratio = torch.exp(log_ratio)  # (B, A)
    else:
        raise ValueError(f"unknown ratio_level {ratio_level!r}")
    if surrogate == "cispo":
        weight = ratio.clamp(max=1.0 + high).detach()
        per_token = -advantages * weight * logprobs  # (B, A)
        active = ratio > 1.0 + high
    elif surrogate == "clip":
        unclipped = -advantages * ratio  # (B, A)
        clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + high)  # (B, A)
        per_token = torch.maximum(unclipped, clipped)  # (B, A)
        active = clipped > unclipped
        if dual_clip is not None:
            per_token = torch.where(advantages < 0, torch.minimum(per_token, -advantages * dual_clip), per_token)
    else:
        raise ValueError(f"unknown surrogate {surrogate!r}")
    if weights is not None:
        per_token = per_token * weights
    loss = aggregate_loss(per_token, mask, aggregation, norm_length, total)  # ()
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean(active.to(ratio.dtype), mask).item(),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask).item(),
            "ratio": masked_mean(ratio, mask).item(),
        }
    return loss, stats


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """(B, A) per-token k3 estimate of KL(pi || pi_ref) at tokens sampled from pi (Schulman 2020; GRPO eq. 4):

        k3 = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1     (>= 0, unbiased, low variance)

    Differentiable in logprobs: GRPO adds beta * k3 to the loss instead of putting the KL in the reward.
    """
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1.0


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    total: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss (DeepSpeed-Chat critic_loss_fn; PPO2's value clipping).

    values: (B, A) V_theta(s_t) with gradient; old_values: (B, A) at rollout time; returns: (B, A) targets;
    mask: (B, A); clip_range: c, where c <= 0 turns clipping off (plain 0.5 * masked MSE).
        v_clipped = old + clamp(values - old, -c, c)
        loss      = 0.5 * masked_mean(max((values - returns)^2, (v_clipped - returns)^2))
    total: the real tokens of the whole mini batch (see aggregate_loss), None: this batch's.
    Returns (loss (), {"value_clip_fraction": share of real tokens where the clipped error was strictly larger}).
    """
    err = (values - returns) ** 2  # (B, A)
    if clip_range <= 0:
        return 0.5 * aggregate_loss(err, mask, "token_mean", total=total), {"value_clip_fraction": 0.0}
    v_clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)  # (B, A)
    err_clipped = (v_clipped - returns) ** 2  # (B, A)
    loss = 0.5 * aggregate_loss(torch.maximum(err, err_clipped), mask, "token_mean", total=total)  # ()
    with torch.no_grad():
        frac = masked_mean((err_clipped > err).to(err.dtype), mask).item()
    return loss, {"value_clip_fraction": frac}


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Preference loss on (B,) summed answer log-probabilities of the policy and the frozen reference.

        h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))       the implicit reward margin / beta
        sigmoid  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)    DPO eq. 7; eps > 0 is cDPO: a label
                                                                              flipped with probability eps
        ipo      (h - 1 / (2 beta))^2                                          IPO eq. 17 (beta is its tau)

    Returns (mean loss, stats): rewards_chosen / rewards_rejected (mean beta x log-ratio, DPO's implicit rewards),
    margin (their difference) and accuracy (share of pairs whose chosen implicit reward is the larger).
    """
    import torch.nn.functional as F

    chosen = policy_chosen - ref_chosen  # (B,)
    rejected = policy_rejected - ref_rejected  # (B,)
    h = chosen - rejected
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}: sigmoid or ipo")
    return losses.mean(), preference_stats(beta * chosen, beta * rejected)


def kto_loss(policy: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """KTO (Ethayarajh et al. 2024, eq. 8; TRL's kto loss) on unpaired answers: (B,) summed log-probabilities of each
    answer under the policy and the frozen reference, `desirable` (B,) bool (thumbs up), `kl` the batch's reference
    point z0 (a detached estimate of KL(policy || ref), >= 0):

        r = log pi(y|x) - log ref(y|x)
        desirable    w_d (1 - sigmoid(beta (r - z0)))
        undesirable  w_u (1 - sigmoid(beta (z0 - r)))

    Returns (the mean over the B answers, stats): rewards_chosen / rewards_rejected (mean beta r of the desirable /
    undesirable answers, 0 where the batch has none), their margin, accuracy (the share of answers on their label's
    side of z0) and kl."""
    r = policy - ref
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - r))))
    with torch.no_grad():
        rewards = beta * r.detach()
        up, down = desirable, ~desirable
        mean = lambda x, m: (x * m).sum() / m.sum() if m.any() else x.new_zeros(())  # noqa: E731
        r_c, r_r = mean(rewards, up), mean(rewards, down)
        stats = {"rewards_chosen": r_c.item(), "rewards_rejected": r_r.item(), "margin": (r_c - r_r).item(),
                 "accuracy": ((r.detach() > kl) == desirable).float().mean().item(), "kl": float(kl)}
    return losses.mean(), stats


def preference_stats(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor) -> dict[str, float]:
    """The (B,) implicit rewards of each pair's answers as logged: their means, the mean margin, and the share of
    pairs whose chosen answer has the larger."""
    with torch.no_grad():
        r_c, r_r = rewards_chosen.detach(), rewards_rejected.detach()
        return {"rewards_chosen": r_c.mean().item(), "rewards_rejected": r_r.mean().item(),
                "margin": (r_c - r_r).mean().item(), "accuracy": (r_c > r_r).float().mean().item()}


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, accurate near 0 and far below it (Maechler 2012)."""
    return torch.where(x > -0.6931472, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def reference_free_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, beta: float, loss_type: str, gamma: float = 0.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Preference losses without a reference, on (B,) mean log-probabilities per answer token of the policy:

        simpo  -log sigmoid(beta (c - r) - gamma)                                 SimPO eq. 6
        orpo   -beta log sigmoid(log odds(c) - log odds(r)), log odds(p) = p - log(1 - e^p)   ORPO eqs. 4-7, the
               odds-ratio term alone (its NLL term is the stage's sft_coef x the chosen answers' NLL)

    Returns (mean loss, stats): rewards_chosen / rewards_rejected (mean beta x mean log-probability, the implicit
    rewards of both papers), margin and accuracy, as dpo_loss's."""
    import torch.nn.functional as F

    if loss_type == "simpo":
        losses = -F.logsigmoid(beta * (chosen - rejected) - gamma)
    elif loss_type == "orpo":
        log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
        losses = -beta * F.logsigmoid(log_odds)
    else:
        raise ValueError(f"unknown reference-free loss {loss_type!r}: simpo or orpo")
    return losses.mean(), preference_stats(beta * chosen, beta * rejected)
