"""DAPO's sampling and length handling (rlhf/rl/filtering.py): the soft overlong punishment and the truncated-answer
mask by hand, and dynamic sampling's rounds, drops and fill on a stand-in trainer whose rollouts are fixed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rlhf.config.algorithm import DynamicSamplingConfig, OverlongConfig
from rlhf.rl.experience import Experience
from rlhf.rl.filtering import dynamic_experience, informative_groups, overlong, overlong_penalty
from rlhf.rollout.base import Rollout


def test_soft_overlong_punishment_by_hand() -> None:
    # DAPO eq. 13 with L_max 10 and a buffer of 0.2 (2 tokens): no penalty up to 8 tokens, (8 - L) / 2 above,
    # -1 at the budget; the penalty factor scales it.
    lengths = torch.tensor([5, 8, 9, 10])
    assert torch.equal(overlong_penalty(lengths, 10, 0.2, 1.0), torch.tensor([0.0, 0.0, -0.5, -1.0]))
    assert torch.equal(overlong_penalty(lengths, 10, 0.2, 0.5), torch.tensor([0.0, 0.0, -0.25, -0.5]))
    assert torch.equal(overlong_penalty(lengths, 10, 0.0, 1.0), torch.zeros(4))


def test_truncated_answers_leave_the_loss_and_pay_the_punishment() -> None:
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    attention = torch.cat([torch.ones(2, 2, dtype=torch.long), mask.long()], 1)
    rollout = Rollout(torch.zeros(2, 6, dtype=torch.long), attention, mask, None, 2, ["stop", "length"])
    scores, out = overlong(rollout, torch.tensor([1.0, 1.0]), OverlongConfig(buffer=0.5, mask_truncated=True), 4)
    # budget 4, buffer 2 tokens: the 2-token answer is free, the 4-token one pays the whole penalty
    assert torch.equal(scores, torch.tensor([1.0, 0.0]))
    assert torch.equal(out, torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    scores, out = overlong(rollout, torch.tensor([1.0, 1.0]), OverlongConfig(buffer=0.0, mask_truncated=False), 4)
    assert torch.equal(scores, torch.tensor([1.0, 1.0])) and torch.equal(out, mask)
    # multi-turn: 2 model tokens around 2 environment tokens are a 4-token trajectory, punished as such
    turns = Rollout(torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 6, dtype=torch.long),
                    torch.tensor([[1.0, 0.0, 0.0, 1.0]]), None, 2, ["stop"])
    scores, _ = overlong(turns, torch.tensor([1.0]), OverlongConfig(buffer=0.5), 4)
    assert torch.equal(scores, torch.tensor([0.0]))


def test_informative_groups() -> None:
    assert informative_groups(torch.tensor([1.0, 1, 0, 1, 2, 2, 2, 2]), 4).tolist() == [True, False]


def _experience(scores: list[float], tag: float) -> Experience:
    """B rollouts whose scores are `scores` and whose every other tensor holds `tag` (to tell rounds apart)."""
    b = len(scores)
    full = torch.full((b, 3), tag)
    return Experience(torch.full((b, 5), int(tag)), torch.ones(b, 5, dtype=torch.long), torch.ones(b, 3), full, full,
                      full, torch.tensor(scores), full, full, full, full)


class StandIn:
    """What dynamic_experience needs of a trainer: groups of 2, one rank, `rollouts` returning fixed rounds."""

    def __init__(self, rounds: list[list[float]]):
        self.config = SimpleNamespace(group_size=2)
        self.models = SimpleNamespace(dist=SimpleNamespace(world_size=1))
        self.rounds = iter(enumerate(rounds))
        self.estimated: Experience | None = None

    def rollouts(self, batches: list) -> tuple[Experience, dict[str, float]]:
        i, scores = next(self.rounds)
        return _experience(scores, float(i)), {"generate_s": 1.0}

    def estimate(self, exp: Experience, info: dict[str, float]) -> tuple[Experience, dict[str, float]]:
        self.estimated = exp
        return exp, info


def test_dynamic_sampling_draws_until_the_batch_is_informative() -> None:
    # round 0: groups (1, 0) informative, (1, 1) flat; round 1: (0, 0) flat, (0, 1) informative -> two informative
    # groups, the batch of one round, after 2 rounds; the flat ones dropped
    trainer = StandIn([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0], [9.0, 9.0, 9.0, 9.0]])
    exp, info = dynamic_experience(trainer, lambda: [], DynamicSamplingConfig(enabled=True, max_rounds=5))
    assert exp.scores.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert exp.sequences[:, 0].tolist() == [0, 0, 1, 1]  # rows of round 0, then of round 1
    assert (info["dynamic_rounds"], info["dynamic_dropped"], info["dynamic_filled"]) == (2.0, 2.0, 0.0)
    assert info["generate_s"] == 2.0 and info["sampled_reward"] == pytest.approx((3 + 1) / 8)
    assert info["tokens"] == 2 * 4 * 3  # every answer token generated, the dropped included


def test_dynamic_sampling_fills_with_dropped_groups_at_its_round_cap() -> None:
    trainer = StandIn([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    exp, info = dynamic_experience(trainer, lambda: [], DynamicSamplingConfig(enabled=True, max_rounds=2))
    assert exp.scores.tolist() == [1.0, 0.0, 1.0, 1.0]  # the informative group, then the first dropped one
    assert (info["dynamic_rounds"], info["dynamic_dropped"], info["dynamic_filled"]) == (2.0, 3.0, 1.0)


def test_experiences_of_different_prompt_widths_join_at_one_boundary() -> None:
    """Two batches whose prompts were padded to different widths (a multi-turn batch's width is its own longest
    first prompt): the narrower is left-padded, so every row's answer starts at the same column."""
    a = Experience(torch.tensor([[7, 8, 1, 2]]), torch.ones(1, 4, dtype=torch.long), torch.ones(1, 2),
                   *[torch.full((1, 2), 0.5)] * 3, torch.tensor([1.0]), *[torch.full((1, 2), 0.5)] * 4)
    b = Experience(torch.tensor([[9, 3, 4]]), torch.ones(1, 3, dtype=torch.long), torch.ones(1, 2),
                   *[torch.full((1, 2), 0.25)] * 3, torch.tensor([0.0]), *[torch.full((1, 2), 0.25)] * 4)
    both = Experience.cat([a, b])
    assert both.sequences.tolist() == [[7, 8, 1, 2], [0, 9, 3, 4]]
    assert both.attention_mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    p = both.sequences.shape[1] - both.action_mask.shape[1]
    assert both.sequences[:, p:].tolist() == [[1, 2], [3, 4]] and both.logprobs.tolist() == [[0.5, 0.5], [0.25, 0.25]]
