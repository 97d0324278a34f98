"""Step 3's algorithms, one estimator each: how the rollouts' scores become per-token advantages.

The trainer (rlhf/rl/trainer.py) rolls out, scores and takes the reference log-probs the same way for every algorithm,
then calls `ESTIMATORS[ppo.algorithm]`; the policy loss is shared too (clipped ratio, asymmetric clip, loss
aggregation, k3 KL loss, entropy bonus: rlhf/training/losses.py). What is left to an algorithm is its estimator
below and its defaults, which live with the params they fill (ALGORITHM_DEFAULTS in rlhf/config/algorithm.py: params.yaml
is validated before any of this is imported).

Every estimator takes (B, R) tensors: log pi_old, log pi_ref and the critic's values (0 without one), the (B,)
normalised scores, the (B, R) answer mask, the step-3 config and the KL coefficient in the reward (0 under
kl.penalty: loss) and `all_reduce`, a sum over ranks (None on one rank) for the statistics taken over the whole
batch; it returns (rewards, advantages, returns), each (B, R): the per-token rewards the advantages came from, and
the critic's targets (the advantages again without a critic).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from rlhf.training.stats import masked_whiten

if TYPE_CHECKING:
    from rlhf.config import PPOConfig
    from rlhf.training.stats import AllReduce

Estimate = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def ppo(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, values: torch.Tensor, scores: torch.Tensor,
        mask: torch.Tensor, cfg: PPOConfig, kl_coef: float, all_reduce: AllReduce | None = None) -> Estimate:
    """PPO: the KL-shaped reward (the score at the last token, -kl_coef x KL per token) and GAE (Schulman et al.
    2015), whitened over every real token of the iteration (all ranks) if configured; returns = advantages + values."""
    rewards, _ = kl_shaped_rewards(logprobs, ref_logprobs, scores, mask, kl_coef, 0.0)
    adv, ret = gae_advantages(values, rewards, mask, cfg.advantage.gamma, cfg.advantage.lam)
    if cfg.advantage.whiten:
        adv = masked_whiten(adv, mask, all_reduce=all_reduce) * mask
    return rewards, adv, ret


def grpo(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, values: torch.Tensor, scores: torch.Tensor,
         mask: torch.Tensor, cfg: PPOConfig, kl_coef: float, all_reduce: AllReduce | None = None) -> Estimate:
    """GRPO (Shao et al. 2024, eq. 3): each answer's score minus its group's mean, over the group's std when
    ppo.advantage.group_std, on every token of the answer (then the per-token KL in the reward, if any, summed to go)."""
    baselined = grpo_baseline(scores, cfg.group_size, cfg.advantage.group_std)
    adv, rewards = score_to_go(logprobs, ref_logprobs, baselined, mask, kl_coef, cfg.advantage.gamma)
    return rewards, adv, adv


def dr_grpo(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, values: torch.Tensor, scores: torch.Tensor,
            mask: torch.Tensor, cfg: PPOConfig, kl_coef: float, all_reduce: AllReduce | None = None) -> Estimate:
    """Dr. GRPO (Liu et al. 2025): GRPO's estimator; what differs is in its defaults (no std division,
    group_std false; token sums over a constant length, seq_mean_token_sum_norm)."""
    return grpo(logprobs, ref_logprobs, values, scores, mask, cfg, kl_coef, all_reduce)


def dapo(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, values: torch.Tensor, scores: torch.Tensor,
         mask: torch.Tensor, cfg: PPOConfig, kl_coef: float, all_reduce: AllReduce | None = None) -> Estimate:
    """DAPO (Yu et al. 2025): GRPO's estimator; its token-level loss and clip-higher are in the loss's defaults."""
    return grpo(logprobs, ref_logprobs, values, scores, mask, cfg, kl_coef, all_reduce)


def rloo(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, values: torch.Tensor, scores: torch.Tensor,
         mask: torch.Tensor, cfg: PPOConfig, kl_coef: float, all_reduce: AllReduce | None = None) -> Estimate:
    """RLOO (Ahmadian et al. 2024): each answer's score minus the mean of the other answers to its prompt, then the
    per-token KL in the reward (OpenRLHF's rloo), summed to go."""
    baselined = rloo_baseline(scores, cfg.group_size)
    adv, rewards = score_to_go(logprobs, ref_logprobs, baselined, mask, kl_coef, cfg.advantage.gamma)
    return rewards, adv, adv


def reinforce_pp(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, values: torch.Tensor, scores: torch.Tensor,
                 mask: torch.Tensor, cfg: PPOConfig, kl_coef: float, all_reduce: AllReduce | None = None) -> Estimate:
    """REINFORCE++ (Hu 2025): no baseline; the score and the per-token KL summed to go, then whitened over every
    real token of the batch (every rank's, with all_reduce)."""
    adv, rewards = score_to_go(logprobs, ref_logprobs, scores, mask, kl_coef, cfg.advantage.gamma)
    adv = masked_whiten(adv, mask, all_reduce=all_reduce)
    return rewards, adv, adv


ESTIMATORS: dict[str, Callable[..., Estimate]] = {
    "ppo": ppo, "grpo": grpo, "dr_grpo": dr_grpo, "dapo": dapo, "rloo": rloo, "reinforce_pp": reinforce_pp,
    "gspo": grpo, "cispo": grpo,  # GRPO's estimator; what differs is in the loss's defaults (ratio_level, surrogate)
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
    earlier positions. The recursion runs over the masked-in positions only: a multi-turn answer's environment
    tokens (mask 0 between two model turns) are skipped, so t + 1 is the next model token. Inputs are treated as
    constants (no gradient).
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
        adv = delta + gamma * lam * next_mask * next_adv  # (B,) A_t
        columns.append(adv)
        # a masked position (padding, or an environment's tokens between two model turns) passes the next model
        # token's value and advantage through: the turn's last token bootstraps from the next turn's first
        k = keep[:, t]
        next_value = torch.where(k, values[:, t], next_value)
        next_mask = torch.where(k, m[:, t], next_mask)
        next_adv = torch.where(k, adv, next_adv)
    advantages = torch.stack(columns[::-1], dim=-1) if columns else torch.zeros_like(values)  # (B, A)
    advantages = torch.where(keep, advantages, torch.zeros_like(advantages))
    returns = torch.where(keep, advantages + values, torch.zeros_like(advantages))  # (B, A)
    return advantages, returns


@torch.no_grad()
def grpo_baseline(scores: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """(B,) A_i = (r_i - mean_g(r)) / (std_g(r) + eps) over each group of G = group_size answers to one prompt (rows
    i*G .. i*G+G-1; std unbiased as torch.std and TRL); scale False: A_i = r_i - mean_g(r) (Dr. GRPO).

    A group whose answers all scored alike gets advantage exactly 0 (nothing to learn from it): the statistics are
    taken in float64, where the sum of G equal float32 scores is exact (and so is its mean), whereas a float32 mean
    can be one rounding step off the score and the std one step above 0, which the division turned into advantages
    up to 0.24.
    """
    groups = _groups(scores, group_size)
    out = groups - groups.mean(-1, keepdim=True)
    if scale:
        out = out / (groups.std(-1, keepdim=True) + eps)
    return out.view(-1).float()


@torch.no_grad()
def rloo_baseline(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) A_i = r_i - 1/(G-1) sum_{j != i} r_j (= G/(G-1) (r_i - mean_g(r))), in float64 as grpo_baseline."""
    groups = _groups(scores, group_size)
    return ((groups * group_size - groups.sum(-1, keepdim=True)) / (group_size - 1)).view(-1).float()


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B / G, G) float64 view of the scores, one row per prompt; B must be a multiple of G >= 2."""
    if group_size < 2 or scores.numel() % group_size:
        raise ValueError(f"group advantages need groups of >= 2 answers dividing the batch, got {group_size} "
                         f"for {scores.numel()} scores")
    return scores.double().view(-1, group_size)


@torch.no_grad()
def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """(B, A) reward-to-go G_t = sum_{s >= t} gamma^(s-t) r_s over the real tokens (REINFORCE; the critic-free
    family's advantage before any normalisation); 0 where mask is 0, which padding rewards never reach."""
    keep = mask.bool()
    rewards = torch.where(keep, rewards.float(), torch.zeros_like(rewards, dtype=torch.float32))
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0]) if rewards.shape[-1] else None
    for t in reversed(range(rewards.shape[-1])):  # masked positions (an environment's tokens) neither add nor discount
        running = torch.where(keep[:, t], rewards[:, t] + gamma * running, running)
        out[:, t] = running
    return torch.where(keep, out, torch.zeros_like(out))


@torch.no_grad()
def score_to_go(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
                kl_coef: float, gamma: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) advantages and the (B, A) per-token rewards they came from, for the critic-free family (OpenRLHF's and
    verl's layout): the (baselined) sequence score at the last token plus the per-token KL penalty, summed to go.

        r_it = -kl_coef * (log pi_old - log pi_ref)_it + [t = last] * score_i     (k1; kl_coef 0 with the KL loss)
        A_it = sum_{s >= t} gamma^(s-t) r_is
    """
    rewards, _ = kl_shaped_rewards(logprobs, ref_logprobs, scores, mask, kl_coef, 0.0)
    return discounted_returns(rewards, mask, gamma), rewards
