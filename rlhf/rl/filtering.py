"""DAPO's sampling and length handling (Yu et al. 2025, sections 3.2 and 3.4), for any algorithm that turns them on
(`ppo.dynamic_sampling`, `ppo.overlong`; the dapo preset does):

- **dynamic sampling**: a group whose answers all got the same reward has a zero advantage on every token (GRPO's
  baseline is its own mean): it spends compute and dilutes a token-mean loss. Its groups are dropped and more
  prompts are drawn, a round of `generation_batches` batches at a time, until the iteration holds
  `rollout_batch_size` informative groups per rank, at most `max_rounds` rounds (verl's max_num_gen_batches). Every
  rank takes the same rounds (generation under ZeRO-3 is collective) and trims to the same size, so ranks step
  together. Short after the last round, the batch is filled with dropped groups (zero advantage: they add only
  their count) and the shortfall is logged, not hidden;
- **the soft overlong punishment** (DAPO eq. 13): over the last `buffer` share of the answer budget L_max, an
  answer of L tokens gets penalty x (L_max - L_buffer - L) / L_buffer added to its reward, -penalty at L_max;
- **overlong filtering**: an answer cut off by the budget (no stop token) is masked out of the loss (its action
  mask zeroed), as TRL's mask_truncated_completions: its ending says nothing about the reward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from rlhf.rl.experience import Experience
from rlhf.training.stats import max_over_ranks, sum_over_ranks

if TYPE_CHECKING:
    from rlhf.config.algorithm import DynamicSamplingConfig, OverlongConfig
    from rlhf.rl.trainer import RLTrainer
    from rlhf.rollout.base import Rollout


def overlong_penalty(lengths: torch.Tensor, max_tokens: int, buffer: float, penalty: float) -> torch.Tensor:
    """(B,) DAPO's soft overlong punishment of answers of `lengths` tokens under a budget of max_tokens: 0 up to
    max_tokens - L_buffer (L_buffer = buffer x max_tokens, rounded), then falling linearly to -penalty at the
    budget."""
    cache = round(buffer * max_tokens)
    if cache <= 0 or penalty == 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    over = (lengths.float() - (max_tokens - cache)).clamp(min=0)
    return -penalty * (over / cache).clamp(max=1.0)


def overlong(rollout: Rollout, scores: torch.Tensor, cfg: OverlongConfig,
             max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores with the soft overlong punishment, the action mask with truncated answers zeroed) under `cfg`."""
    mask = rollout.action_mask
    if cfg.buffer:  # the answer's length against its budget: multi-turn, the whole trajectory after the prompt
        lengths = rollout.attention_mask[:, rollout.prompt_width :].sum(-1)
        scores = scores + overlong_penalty(lengths, max_tokens, cfg.buffer, cfg.penalty).to(scores.device)
    if cfg.mask_truncated:
        truncated = torch.tensor([r == "length" for r in rollout.stop_reasons], device=mask.device)
        mask = mask * (~truncated).to(mask.dtype)[:, None]
    return scores, mask


def informative_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(G,) bool: the groups of `group_size` consecutive answers whose rewards are not all equal."""
    groups = scores.view(-1, group_size)
    return groups.max(-1).values > groups.min(-1).values


def _group_rows(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    """The row indices of the groups selected by the (G,) bool mask, each group's rows in order."""
    first = groups.nonzero()[:, 0] * group_size
    return (first[:, None] + torch.arange(group_size, device=first.device)[None]).flatten()


def dynamic_experience(trainer: RLTrainer, draw: Callable[[], list[dict[str, Any]]],
                       cfg: DynamicSamplingConfig) -> tuple[Experience, dict[str, float]]:
    """The iteration's experience under dynamic sampling: rounds of `draw()` (one round's batches of prompts)
    through trainer.rollouts until rollout_batch_size informative groups per rank (or cfg.max_rounds), then
    trainer.estimate on exactly that many groups. Logs dynamic_rounds, dynamic_dropped (groups dropped, every rank),
    dynamic_filled (dropped groups put back to fill the batch, every rank) and sampled_reward (the mean reward of
    every answer drawn, the dropped included: `reward` is the trained batch's)."""
    k, world = trainer.config.group_size, trainer.models.dist.world_size
    kept: list[Experience] = []
    dropped: list[Experience] = []
    info: dict[str, float] = {}
    n_kept, rounds, target, drawn = 0, 0, 0, [0.0, 0.0]
    while True:
        exp, got = trainer.rollouts(draw())
        got["tokens"] = exp.action_mask.sum().item()  # every answer token generated, for the throughput
        info = {key: info.get(key, 0.0) + value for key, value in got.items()}
        target = target or exp.scores.numel() // k  # the groups of one round: the batch the iteration trains on
        vary = informative_groups(exp.scores, k)
        kept.append(exp.select(_group_rows(vary, k)))
        dropped.append(exp.select(_group_rows(~vary, k)))
        n_kept += int(vary.sum())
        drawn = [drawn[0] + exp.scores.sum().item(), drawn[1] + exp.scores.numel()]
        rounds += 1
        short = max_over_ranks(torch.tensor([float(n_kept < target)]), world).item() > 0
        if not short or rounds >= cfg.max_rounds:
            break
    exp = Experience.cat(kept + dropped).slice(0, target * k)  # the informative groups first
    counts = sum_over_ranks(torch.tensor([float(sum(d.scores.numel() for d in dropped) // k),
                                          float(max(target - n_kept, 0)), *drawn], dtype=torch.float64), world)
    info |= {"dynamic_rounds": float(rounds), "dynamic_dropped": counts[0].item(),
             "dynamic_filled": counts[1].item(), "sampled_reward": (counts[2] / counts[3].clamp(min=1)).item()}
    return trainer.estimate(exp, info)
