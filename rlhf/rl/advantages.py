"""Step 3's algorithms, each one small piece on the shared rollout and scoring path: an advantage estimator.

The trainer (rlhf/rl/trainer.py) rolls out, scores and takes the reference log-probs the same way for every algorithm,
then calls `ESTIMATORS[ppo.algorithm]`; the policy loss is shared too (clipped ratio, asymmetric clip, loss
aggregation, k3 KL loss, entropy bonus: each a param). What is left to an algorithm is how a sequence's reward
becomes per-token advantages, and whether it needs a critic (PPOConfig.needs_critic). The math is rlhf/training/losses.py's.

Every estimator takes (B, R) tensors: log pi_old, log pi_ref and the critic's values (0 without one), the (B,)
normalised scores, the (B, R) answer mask, the step-3 config and the KL coefficient in the reward (0 under
kl_penalty: loss) and `all_reduce`, a sum over ranks (None on one rank) for the statistics taken over the whole
batch; it returns (rewards, advantages, returns), each (B, R): the per-token rewards the advantages came from, and
the critic's targets (the advantages again without a critic).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from rlhf.config import PPOConfig
    from rlhf.training.stats import AllReduce
import torch

from rlhf.training.stats import masked_whiten

Estimate = tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]


def gae(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, values: torch.Tensor, scores: torch.Tensor,
        mask: torch.Tensor, cfg: PPOConfig, kl_coef: float, all_reduce: AllReduce | None = None) -> Estimate:
    """ppo: the KL-shaped reward (the score at the last token, -kl_coef x KL per token) and GAE (Schulman et al.
    2015), whitened over every real token of the iteration (all ranks) if configured; returns = advantages + values."""
    from rlhf.rl.advantages import gae_advantages, kl_shaped_rewards
    from rlhf.training.stats import masked_whiten

    rewards, _ = kl_shaped_rewards(logprobs, ref_logprobs, scores, mask, kl_coef, 0.0)
    adv, ret = gae_advantages(values, rewards, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        adv = masked_whiten(adv, mask, all_reduce=all_reduce) * mask
    return rewards, adv, ret


def critic_free(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, values: torch.Tensor, scores: torch.Tensor,
                mask: torch.Tensor, cfg: PPOConfig, kl_coef: float, all_reduce: AllReduce | None = None) -> Estimate:
    """grpo / dr_grpo / dapo / rloo / reinforce_pp: the score's group baseline (none for reinforce_pp), then the
    per-token KL, summed to go (REINFORCE++ whitens over the batch); no critic learns the returns."""
    from rlhf.rl.advantages import critic_free_advantages

    baseline = {"rloo": "rloo", "reinforce_pp": "reinforce_pp"}.get(cfg.algorithm, "grpo")  # grpo, dr_grpo, dapo
    adv, rewards = critic_free_advantages(
        logprobs, ref_logprobs, scores, mask, baseline, cfg.group_size, kl_coef, cfg.gamma, cfg.group_std,
        all_reduce,
    )
    return rewards, adv, adv


ESTIMATORS: dict[str, Callable[..., Estimate]] = {
    "ppo": gae,
    "grpo": critic_free,
    "dr_grpo": critic_free,  # GRPO's baseline without the std (group_std false) and a constant length normaliser
    "dapo": critic_free,  # GRPO's baseline; DAPO's token_mean and clip-higher are in the loss
    "rloo": critic_free,
    "reinforce_pp": critic_free,
}


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
