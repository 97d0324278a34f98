"""Pure math of step 3 (PPO and the critic-free family) and of DPO: plain tensors and floats in, tensors (and float
stats) out; no config objects.

Conventions used throughout:
    B  batch size (rollouts);  T  sequence length;  V  vocabulary size
    A  number of generated (action) positions the caller sliced out of the sequence
    mask (B, A)  1 on real response tokens, 0 on padding after the end of the response (bool or float)

References:
    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" (KL-shaped reward, adaptive KL).
    Ouyang et al. 2022, "Training language models to follow instructions with human feedback" (InstructGPT).
    Schulman et al. 2015, "High-Dimensional Continuous Control Using Generalized Advantage Estimation" (GAE).
    Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (clipped surrogate).
    DeepSpeed-Chat, applications/DeepSpeed-Chat/dschat/rlhf/ppo_trainer.py (compute_rewards, get_advantages_and_returns,
    actor_loss_fn, critic_loss_fn) and dschat/utils/utils.py moving_average.
    Shao et al. 2024, "DeepSeekMath" (GRPO: group-relative advantages, the k3 KL loss, per-sequence loss averaging).
    Liu et al. 2025, "Understanding R1-Zero-Like Training" (Dr. GRPO: no std division, a constant length normaliser).
    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization" (RLOO's leave-one-out baseline).
    Hu 2025, "REINFORCE++" (token-level KL in the reward, returns whitened over the global batch).
    Yu et al. 2025, "DAPO" (token-mean loss aggregation, asymmetric clipping "clip-higher").
    Rafailov et al. 2023, "Direct Preference Optimization" (DPO); Mitchell 2023, "A note on DPO with noisy
    preferences" (cDPO, label smoothing); Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning
    from Human Preferences" (IPO).
    Schulman 2020, "Approximating KL Divergence" (the k1, k2, k3 estimators).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

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


def answer_mask(answer: torch.Tensor, eos_token_id: int | Sequence[int]) -> torch.Tensor:
    """(B, R) float 1 on every answer position up to and including the first eos, 0 after it.

    answer: (B, R) generated token ids; eos_token_id: the id, or every id, that ends an answer (a chat model's
    turn end and its eos). By position, never by token id: generate pads after the eos with pad_token_id, which is
    the eos itself for many tokenizers (and for any that `load_tokenizer` gave a pad), so `answer !=
    pad_token_id` would drop the eos, the decision to stop. A row without eos is real throughout.
    """
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    is_eos = torch.isin(answer, torch.tensor(ids, device=answer.device)).long()  # (B, R)
    eos_before = is_eos.cumsum(-1) - is_eos  # (B, R) eos tokens strictly before position t
    return (eos_before == 0).float()


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


@torch.no_grad()
def kl_shaped_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    reward_clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token reward: -kl_coef * KL to the reference policy, plus the reward-model score on the last token.

    logprobs, ref_logprobs: (B, A) log pi(a_t|s_t) and log pi_ref(a_t|s_t); scores: (B,) reward-model score;
    mask: (B, A). Returns (rewards (B, A), kl (B, A)), both exactly 0 where mask is 0.

    kl_t = logprobs_t - ref_logprobs_t is the k1 (single-sample) estimator, as in Ziegler et al. 2019 eq. 2,
    InstructGPT and DeepSpeed-Chat compute_rewards. The score is clipped to [-reward_clip, reward_clip]
    (reward_clip <= 0: no clipping) and added at the last index where mask is 1; a row with no real token
    gets no score. Rewards are constants for PPO, so no gradient flows.
    """
    keep = mask.bool()  # (B, A)
    zeros = torch.zeros_like(logprobs)
    kl = torch.where(keep, logprobs - ref_logprobs, zeros)  # (B, A) k1 estimate, 0 on padding
    rewards = -kl_coef * kl  # (B, A)
    if reward_clip > 0:
        scores = scores.clamp(-reward_clip, reward_clip)
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(keep)  # (B, A) 0..A-1
    last = torch.where(keep, positions, torch.full_like(positions, -1)).max(dim=-1).values  # (B,) -1: empty row
    has_token = last >= 0  # (B,)
    at_last = positions == last.unsqueeze(-1)  # (B, A) one-hot of the last real token (none for empty rows)
    score_per_row = torch.where(has_token, scores.to(rewards.dtype), torch.zeros_like(scores, dtype=rewards.dtype))
    rewards = rewards + at_last.to(rewards.dtype) * score_per_row.unsqueeze(-1)  # (B, A)
    return rewards, kl


@torch.no_grad()
def gae_advantages(
    values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2015), run backwards over the A positions.

    values: (B, A) V(s_t) from the critic; rewards: (B, A) per-token rewards; mask: (B, A).
    Returns (advantages (B, A), returns (B, A)), both 0 where mask is 0; returns = advantages + values
    (the critic's regression target, as DeepSpeed-Chat get_advantages_and_returns).

        delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
        A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}        (V_A = A_A = 0)

    Values and rewards where mask is 0 are zeroed first, so padding after the response cannot leak into
    earlier positions. Inputs are treated as constants (no gradient).
    """
    keep = mask.bool()  # (B, A)
    m = keep.to(values.dtype)  # (B, A)
    values = torch.where(keep, values, torch.zeros_like(values))  # (B, A)
    rewards = torch.where(keep, rewards.to(values.dtype), torch.zeros_like(values))  # (B, A)
    n = values.shape[-1]
    next_value = torch.zeros_like(values[:, 0])  # (B,) V_{t+1} * m_{t+1}; 0 past the last position
    next_mask = torch.zeros_like(values[:, 0])  # (B,) m_{t+1}
    next_adv = torch.zeros_like(values[:, 0])  # (B,) A_{t+1}
    columns: list[torch.Tensor] = []
    for t in reversed(range(n)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        next_adv = delta + gamma * lam * next_mask * next_adv  # (B,) A_t
        columns.append(next_adv)
        next_value, next_mask = values[:, t] * m[:, t], m[:, t]
    advantages = torch.stack(columns[::-1], dim=-1) if columns else torch.zeros_like(values)  # (B, A)
    advantages = torch.where(keep, advantages, torch.zeros_like(advantages))
    returns = torch.where(keep, advantages + values, torch.zeros_like(advantages))  # (B, A)
    return advantages, returns


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
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate (Schulman et al. 2017 eq. 7; DeepSpeed-Chat actor_loss_fn), as a loss to minimise.

    logprobs: (B, A) log pi_theta(a_t|s_t) with gradient; old_logprobs: (B, A) at rollout time;
    advantages: (B, A); mask: (B, A); clip_range: epsilon (the low side, eps_low); clip_range_high: eps_high
    (None = clip_range: the symmetric clip; larger lets unlikely tokens grow, DAPO's clip-higher).
        ratio = exp(logprobs - old_logprobs)
        loss  = aggregate(max(-A * ratio, -A * clamp(ratio, 1 - eps_low, 1 + eps_high)))
    aggregation, norm_length, total: see aggregate_loss (token_mean is the masked mean over every real token).
    dual_clip: c > 1 (Ye et al. 2020, "Mastering Complex Control in MOBA Games", eq. 5; verl's clip_ratio_c): where
    A < 0 the per-token loss is min(that loss, -A x c), so a ratio far above 1 + eps cannot make it unbounded.
    Returns (loss (), stats) with stats:
        clip_fraction  share of real tokens where the clipped term is the active (strictly larger) one
        approx_kl      masked_mean(0.5 * (logprobs - old_logprobs)^2), Schulman's k2 estimator of KL(old || new)
        ratio          masked mean of the ratio
    """
    high = clip_range if clip_range_high is None else clip_range_high
    log_ratio = logprobs - old_logprobs  # (B, A)
    ratio = torch.exp(log_ratio)  # (B, A)
    unclipped = -advantages * ratio  # (B, A)
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + high)  # (B, A)
    per_token = torch.maximum(unclipped, clipped)  # (B, A)
    if dual_clip is not None:
        per_token = torch.where(advantages < 0, torch.minimum(per_token, -advantages * dual_clip), per_token)
    loss = aggregate_loss(per_token, mask, aggregation, norm_length, total)  # ()
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean((clipped > unclipped).to(ratio.dtype), mask).item(),
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


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T) entropy of softmax(logits / temperature) at each position, in float32 (logits: (B, T, V))."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def group_advantages(scores: torch.Tensor, group_size: int, baseline: str, scale: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """(B,) per-answer advantage from the scores of G = group_size answers to each prompt (rows i*G .. i*G+G-1
    share a prompt; B must be a multiple of G):

        grpo   A_i = (r_i - mean_g(r)) / (std_g(r) + eps)    (GRPO eq. 3, std unbiased as torch.std and TRL);
               scale False: A_i = r_i - mean_g(r)             (Dr. GRPO: no std division, no difficulty bias)
        rloo   A_i = r_i - 1/(G-1) sum_{j != i} r_j           (RLOO; = G/(G-1) (r_i - mean_g(r)))

    A group whose answers all scored alike gets advantage exactly 0 (nothing to learn from it): the statistics are
    taken in float64, where the sum of G equal float32 scores is exact (and so is its mean), whereas a float32 mean
    can be one rounding step off the score and the std one step above 0, which the division turned into advantages
    up to 0.24.
    """
    if group_size < 2 or scores.numel() % group_size:
        raise ValueError(f"group advantages need groups of >= 2 answers dividing the batch, got {group_size} "
                         f"for {scores.numel()} scores")
    groups = scores.double().view(-1, group_size)  # (B / G, G) float64: see above
    mean = groups.mean(-1, keepdim=True)
    if baseline == "rloo":
        out = (groups * group_size - groups.sum(-1, keepdim=True)) / (group_size - 1)
    elif baseline == "grpo":
        out = groups - mean
        if scale:
            out = out / (groups.std(-1, keepdim=True) + eps)
    else:
        raise ValueError(f"unknown group baseline {baseline!r}: grpo or rloo")
    return out.view(-1).float()


@torch.no_grad()
def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """(B, A) reward-to-go G_t = sum_{s >= t} gamma^(s-t) r_s over the real tokens (REINFORCE; the critic-free
    family's advantage before any normalisation); 0 where mask is 0, which padding rewards never reach."""
    keep = mask.bool()
    rewards = torch.where(keep, rewards.float(), torch.zeros_like(rewards, dtype=torch.float32))
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0]) if rewards.shape[-1] else None
    for t in reversed(range(rewards.shape[-1])):
        running = rewards[:, t] + gamma * running
        out[:, t] = running
    return torch.where(keep, out, torch.zeros_like(out))


@torch.no_grad()
def critic_free_advantages(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    algorithm: str,
    group_size: int,
    kl_coef: float,
    gamma: float = 1.0,
    scale_group: bool = True,
    all_reduce: AllReduce | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) advantages and the (B, A) per-token rewards they came from, for the critic-free family (OpenRLHF's and
    verl's layout): the sequence score gets its baseline first, then the KL penalty is added per token, then the
    rewards are summed to go.

        grpo / rloo    score_i -> group_advantages(score, G)     (the baseline of each prompt's answers)
        reinforce_pp   score_i unchanged                          (no baseline; returns whitened below)
        r_it = -kl_coef * (log pi_old - log pi_ref)_it + [t = last] * score_i     (k1; kl_coef 0 with the KL loss)
        A_it = sum_{s >= t} gamma^(s-t) r_is                      reinforce_pp: then whitened over the whole batch
                                                                  (every rank's, with all_reduce)
    """
    if algorithm in ("grpo", "rloo"):
        scores = group_advantages(scores, group_size, algorithm, scale_group)
    elif algorithm != "reinforce_pp":
        raise ValueError(f"unknown critic-free algorithm {algorithm!r}")
    rewards, _ = kl_shaped_rewards(logprobs, ref_logprobs, scores, mask, kl_coef, 0.0)
    advantages = discounted_returns(rewards, mask, gamma)
    if algorithm == "reinforce_pp":
        advantages = masked_whiten(advantages, mask, all_reduce=all_reduce)
    return advantages, rewards


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


class AdaptiveKLController:
    """The KL coefficient beta, adapted towards a target KL (Ziegler et al. 2019, section 2.2), or fixed.

        e_t    = clip(KL_t / target - 1, -0.2, 0.2)
        beta  <- beta * (1 + e_t * n_steps / horizon)

    target None keeps beta fixed at init_kl_coef (what DeepSpeed-Chat does).
    """

    def __init__(self, init_kl_coef: float, target: float | None, horizon: int) -> None:
        if target is not None and target <= 0:
            raise ValueError(f"KL target must be > 0 (or None for a fixed coefficient), got {target}")
        if target is not None and horizon <= 0:
            raise ValueError(f"KL horizon must be > 0 when a KL target is set, got {horizon}")
        self.value: float = float(init_kl_coef)  # beta, read by kl_shaped_rewards
        self.target = target  # nats per sequence the controller steers towards; None: fixed
        self.horizon = horizon  # samples over which a full proportional error is applied

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move beta after a batch whose mean KL was current_kl; n_steps = samples in that batch."""
        if self.target is None:
            return
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        """The adapted coefficient plus the settings it was adapted under (for the checkpoint's record)."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the adapted coefficient. target and horizon stay those given to __init__ (params.yaml is
        their single source), so a resumed run follows the current config."""
        self.value = float(state["value"])


class RunningMoments:
    """Mean and standard deviation of every reward seen so far, merged batch by batch (Chan et al. 1979's parallel
    update, as TRL's RunningMoments), for ppo.reward_normalization: running.

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


@torch.no_grad()
def ema_update(ema_params: Iterable[torch.Tensor], params: Iterable[torch.Tensor], beta: float) -> None:
    """In place, parameter by parameter: ema = beta * ema + (1 - beta) * param (DeepSpeed-Chat moving_average).

    The two iterables pair up in order and must have the same length (ValueError otherwise); each param is
    cast to its ema tensor's dtype and device first.
    """
    for ema, param in zip(ema_params, params, strict=True):
        ema.mul_(beta).add_(param.to(device=ema.device, dtype=ema.dtype), alpha=1.0 - beta)


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
    with torch.no_grad():
        r_c, r_r = beta * chosen, beta * rejected
        stats = {
            "rewards_chosen": r_c.mean().item(),
            "rewards_rejected": r_r.mean().item(),
            "margin": (r_c - r_r).mean().item(),
            "accuracy": (r_c > r_r).float().mean().item(),
        }
    return losses.mean(), stats
