"""Step 3's algorithms, each one small piece on the shared rollout and scoring path: an advantage estimator.

The trainer (rlhf/ppo.py) rolls out, scores and takes the reference log-probs the same way for every algorithm,
then calls `ESTIMATORS[ppo.algorithm]`; the policy loss is shared too (clipped ratio, asymmetric clip, loss
aggregation, k3 KL loss, entropy bonus: each a param). What is left to an algorithm is how a sequence's reward
becomes per-token advantages, and whether it needs a critic (PPOConfig.needs_critic). The math is rlhf/ppo_math.py's.

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
    from rlhf.ppo_math import AllReduce

Estimate = tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]


def gae(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, values: torch.Tensor, scores: torch.Tensor,
        mask: torch.Tensor, cfg: PPOConfig, kl_coef: float, all_reduce: AllReduce | None = None) -> Estimate:
    """ppo: the KL-shaped reward (the score at the last token, -kl_coef x KL per token) and GAE (Schulman et al.
    2015), whitened over every real token of the iteration (all ranks) if configured; returns = advantages + values."""
    from rlhf.ppo_math import gae_advantages, kl_shaped_rewards, masked_whiten

    rewards, _ = kl_shaped_rewards(logprobs, ref_logprobs, scores, mask, kl_coef, 0.0)
    adv, ret = gae_advantages(values, rewards, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        adv = masked_whiten(adv, mask, all_reduce=all_reduce) * mask
    return rewards, adv, ret


def critic_free(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, values: torch.Tensor, scores: torch.Tensor,
                mask: torch.Tensor, cfg: PPOConfig, kl_coef: float, all_reduce: AllReduce | None = None) -> Estimate:
    """grpo / dr_grpo / dapo / rloo / reinforce_pp: the score's group baseline (none for reinforce_pp), then the per-token KL, summed
    to go (REINFORCE++ whitens over the batch); no critic learns the returns."""
    from rlhf.ppo_math import critic_free_advantages

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
