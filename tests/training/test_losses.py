"""Step 3's math (losses, statistics, KL control, log-probs, GAE) on tiny tensors whose expected values are worked out
by hand in the comments."""

from __future__ import annotations

import ast
import math

import pytest
import torch
from torch.testing import assert_close

from rlhf.models.logprobs import logprobs_from_logits
from rlhf.rl.advantages import gae_advantages, kl_shaped_rewards
from rlhf.rl.kl import AdaptiveKLController
from rlhf.rl.models import ema_update
from rlhf.rollout.base import answer_mask
from rlhf.training.losses import policy_loss, value_loss
from rlhf.training.stats import masked_mean, masked_whiten


def t(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


PURE = ("rlhf/training/losses.py", "rlhf/training/stats.py", "rlhf/rl/kl.py", "rlhf/models/logprobs.py")


@pytest.mark.parametrize("path", PURE)
def test_math_modules_import_only_torch(path: str) -> None:
    # The pure-math modules stay importable without deepspeed/transformers (STYLE: importing rlhf stays light); they
    # may import each other (logprobs' batching helpers are pure too).
    from tests.conftest import ROOT

    tree = ast.parse((ROOT / path).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported = {"torch" if name.startswith("torch.") else name for name in imported}
    helpers = ("rlhf/data/batching.py", "rlhf/models/prefix.py", "rlhf/errors.py")
    allowed = {"__future__", "collections.abc", "typing", "torch", "math"} | {
        p.removesuffix(".py").replace("/", ".") for p in PURE + helpers}
    assert imported <= allowed, imported - allowed


# ---------------------------------------------------------------------------------------- logprobs_from_logits


def test_logprobs_from_logits_matches_hand_log_softmax() -> None:
    # Vocabulary of 3. Position 0: logits [0, ln 2, ln 3] -> exp = [1, 2, 3], sum 6 -> p = [1/6, 2/6, 3/6].
    # Position 1: logits [0, 0, ln 2] -> exp = [1, 1, 2], sum 4 -> p = [1/4, 1/4, 2/4].
    # Labels [2, 0]: log p = [log(3/6), log(1/4)] = [-0.693147, -1.386294].
    # Adding a constant to a row does not change log-softmax: position 1 also gets +10 to prove it.
    logits = torch.tensor([[[0.0, math.log(2), math.log(3)], [10.0, 10.0, 10.0 + math.log(2)]]])  # (1, 2, 3)
    labels = torch.tensor([[2, 0]])  # (1, 2)
    out = logprobs_from_logits(logits, labels)
    assert_close(out, torch.tensor([[math.log(3 / 6), math.log(1 / 4)]]))


def test_logprobs_from_logits_is_float32_for_bf16_logits() -> None:
    # bf16 logits [0, 0, 0] -> uniform, log(1/3) = -1.098612 for any label; the result is float32.
    out = logprobs_from_logits(torch.zeros(2, 1, 3, dtype=torch.bfloat16), torch.tensor([[0], [2]]))
    assert out.dtype == torch.float32
    assert_close(out, torch.full((2, 1), math.log(1 / 3)))


def test_logprobs_from_logits_at_a_temperature() -> None:
    # Temperature 0.5 doubles the logits. Position 0: [0, ln 2, ln 3] / 0.5 = [0, ln 4, ln 9] -> exp = [1, 4, 9],
    # sum 14 -> p = [1/14, 4/14, 9/14]; label 2: log(9/14) = -0.441833 (at temperature 1 it was log(3/6)).
    # Temperature 2 halves them. Position 1: [0, 2 ln 2, 0] / 2 = [0, ln 2, 0] -> exp = [1, 2, 1], sum 4;
    # label 1: log(2/4) = -0.693147 (at temperature 1: exp = [1, 4, 1], log(4/6)).
    logits = torch.tensor([[[0.0, math.log(2), math.log(3)], [0.0, 2 * math.log(2), 0.0]]])  # (1, 2, 3)
    labels = torch.tensor([[2, 1]])
    assert_close(logprobs_from_logits(logits, labels, 0.5)[0, 0], torch.tensor(math.log(9 / 14)))
    assert_close(logprobs_from_logits(logits, labels, 2.0)[0, 1], torch.tensor(math.log(2 / 4)))
    assert_close(logprobs_from_logits(logits, labels, 1.0), torch.tensor([[math.log(3 / 6), math.log(4 / 6)]]))
    # The caller's logits are not divided in place.
    assert_close(logits[0, 1, 1], torch.tensor(2 * math.log(2)))


# ----------------------------------------------------------------------------------------------- answer_mask


def test_answer_mask_is_by_position_and_keeps_the_eos_when_pad_is_eos() -> None:
    # eos = pad = 2, as for a tokenizer without a pad token. generate pads after the first eos with 2 as well.
    # Row 0: 5 7 eos | pad pad   -> 1 1 1 0 0  (the eos, the decision to stop, is an action)
    # Row 1: 5 7 8 9 4           -> 1 1 1 1 1  (never stopped: every token real)
    # Row 2: eos | pad pad pad pad -> 1 0 0 0 0
    # Row 3: 0 3 eos | pad pad with 0 a token like any other (it is not the pad here) -> 1 1 1 0 0
    answer = torch.tensor([[5, 7, 2, 2, 2], [5, 7, 8, 9, 4], [2, 2, 2, 2, 2], [0, 3, 2, 2, 2]])
    want = t([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    got = answer_mask(answer, eos_token_id=2)
    assert got.dtype == torch.float32
    assert_close(got, want)
    # pad != eos (pad 0 here): the same positions; a pad id the model emitted mid-answer is still a real token.
    answer = torch.tensor([[5, 0, 2, 0, 0]])
    assert_close(answer_mask(answer, eos_token_id=2), t([[1, 1, 1, 0, 0]]))


# ----------------------------------------------------------------------------------- masked_mean / whiten


def test_masked_mean_all_and_per_row() -> None:
    x = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    # All real entries: (1 + 2 + 4) / 3 = 7/3.
    assert_close(masked_mean(x, mask), torch.tensor(7 / 3))
    # Per row: row 0 (1 + 2) / 2 = 1.5; row 1 4 / 1 = 4.0.
    assert_close(masked_mean(x, mask, dim=1), t([1.5, 4.0]))
    # Padding holding inf/NaN does not leak: still 7/3.
    dirty = x.clone()
    dirty[0, 2], dirty[1, 1] = float("inf"), float("nan")
    assert_close(masked_mean(dirty, mask.bool()), torch.tensor(7 / 3))
    # An all-padding row has mean 0 (count clamped to 1).
    assert_close(masked_mean(x, t([[0, 0, 0], [1, 1, 1]]), dim=1), t([0.0, 5.0]))


def test_masked_whiten_uses_only_real_tokens() -> None:
    x = t([[1.0, 2.0, 3.0, 100.0]])  # 100 is padding and must not move mean or variance
    mask = t([[1, 1, 1, 0]])
    # mean = (1 + 2 + 3) / 3 = 2
    # var (biased) = ((1-2)^2 + (2-2)^2 + (3-2)^2) / 3 = 2/3 ; std = sqrt(2/3) = 0.816497
    # whitened = [-1, 0, 1] / sqrt(2/3 + 1e-8) = [-1.224745, 0, 1.224745]; padding -> 0
    s = 1 / math.sqrt(2 / 3 + 1e-8)
    assert_close(masked_whiten(x, mask), t([[-s, 0.0, s, 0.0]]))
    # shift_mean=False adds the mean back: [2 - 1.224745, 2, 2 + 1.224745] = [0.775255, 2, 3.224745]; padding 0
    assert_close(masked_whiten(x, mask, shift_mean=False), t([[2 - s, 2.0, 2 + s, 0.0]]))


# ------------------------------------------------------------------------------------------ kl_shaped_rewards


def test_kl_shaped_rewards_score_at_last_real_token_clipped() -> None:
    logprobs = t([[-1.0, -2.0, -0.5, -3.0], [-0.2, -0.4, -0.6, -0.8], [-1.0, -1.0, -1.0, -1.0]])  # (3, 4)
    ref = t([[-1.5, -1.0, -0.5, -9.0], [-0.4, -0.4, -0.4, -0.4], [-2.0, -2.0, -2.0, -2.0]])  # (3, 4)
    mask = t([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])  # lengths 3, 4, 0
    scores = t([7.0, -7.0, 3.0])
    rewards, kl = kl_shaped_rewards(logprobs, ref, scores, mask, kl_coef=0.1, reward_clip=5.0)
    # Row 0: kl = [-1.0+1.5, -2.0+1.0, -0.5+0.5, pad] = [0.5, -1.0, 0.0, 0] (the -3+9 = 6 on padding is dropped)
    #        -0.1*kl = [-0.05, 0.1, 0.0, 0]; score 7 clipped to 5 at index 2 (last real) -> [-0.05, 0.1, 5.0, 0]
    # Row 1: kl = [-0.2+0.4, 0, -0.6+0.4, -0.8+0.4] = [0.2, 0.0, -0.2, -0.4]
    #        -0.1*kl = [-0.02, 0.0, 0.02, 0.04]; score -7 clipped to -5 at index 3: 0.04 - 5 = -4.96
    # Row 2: no real token -> all zeros, score 3 dropped.
    assert_close(kl, t([[0.5, -1.0, 0.0, 0.0], [0.2, 0.0, -0.2, -0.4], [0.0, 0.0, 0.0, 0.0]]))
    assert_close(rewards, t([[-0.05, 0.1, 5.0, 0.0], [-0.02, 0.0, 0.02, -4.96], [0.0, 0.0, 0.0, 0.0]]))


def test_kl_shaped_rewards_no_clip_when_reward_clip_not_positive() -> None:
    # One real token: kl = -1 - (-1.5) = 0.5 -> -0.2 * 0.5 = -0.1, plus the unclipped score 7 -> 6.9.
    rewards, _ = kl_shaped_rewards(t([[-1.0, 0.0]]), t([[-1.5, 0.0]]), t([7.0]), t([[1, 0]]), 0.2, 0.0)
    assert_close(rewards, t([[6.9, 0.0]]))


def test_running_moments_merged_batch_by_batch_equal_those_of_all_rewards_at_once() -> None:
    from rlhf.training.stats import RunningMoments

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, generator=gen, dtype=torch.float64) * 3 + 2 for n in (4, 7, 1, 16)]
    moments = RunningMoments()
    assert moments.std == 1.0 and moments.normalize(t([3.0])).item() == 3.0  # nothing seen: unchanged
    for b in batches:
        moments.update(b.sum().item(), b.pow(2).sum().item(), b.numel())
    every = torch.cat(batches)
    assert moments.count == every.numel()
    assert math.isclose(moments.mean, every.mean().item(), rel_tol=1e-9)
    assert math.isclose(moments.std, every.std().item(), rel_tol=1e-9)  # unbiased, as torch.std
    x = t([0.0, 5.0])
    assert_close(moments.normalize(x), (x - every.mean().float()) / every.std().float())
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())  # the checkpoint's record
    assert restored.state_dict() == moments.state_dict()
    moments.update(0.0, 0.0, 0)  # an empty batch changes nothing
    assert restored.state_dict() == moments.state_dict()


# ------------------------------------------------------------------------------------------------------ GAE


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value() -> None:
    values = t([[0.5, 1.0, 2.0]])
    rewards = t([[1.0, 0.0, 3.0]])
    mask = t([[1, 1, 1]])
    # gamma = lam = 1:
    # delta_2 = r_2 - V_2 = 3.0 - 2.0 = 1.0 ;                 A_2 = 1.0
    # delta_1 = r_1 + V_2 - V_1 = 0.0 + 2.0 - 1.0 = 1.0 ;     A_1 = 1.0 + A_2 = 2.0
    # delta_0 = r_0 + V_1 - V_0 = 1.0 + 1.0 - 0.5 = 1.5 ;     A_0 = 1.5 + A_1 = 3.5
    # check: reward-to-go [4, 3, 3] minus V [0.5, 1, 2] = [3.5, 2, 1]; returns = A + V = [4, 3, 3]
    adv, ret = gae_advantages(values, rewards, mask, gamma=1.0, lam=1.0)
    assert_close(adv, t([[3.5, 2.0, 1.0]]))
    assert_close(ret, t([[4.0, 3.0, 3.0]]))


# gamma = 0.9, lam = 0.95 -> gamma * lam = 0.855, on values [1.0, 2.0, 0.5], rewards [0.0, 0.5, 1.0]:
# delta_2 = r_2 - V_2 = 1.0 - 0.5 = 0.5 ;                           A_2 = 0.5
# delta_1 = r_1 + 0.9*V_2 - V_1 = 0.5 + 0.45 - 2.0 = -1.05 ;         A_1 = -1.05 + 0.855*0.5 = -0.6225
# delta_0 = r_0 + 0.9*V_1 - V_0 = 0.0 + 1.8 - 1.0 = 0.8 ;            A_0 = 0.8 + 0.855*(-0.6225) = 0.2677625
# returns = A + V = [1.2677625, 1.3775, 1.0]
GAE_ADV = [0.2677625, -0.6225, 0.5]
GAE_RET = [1.2677625, 1.3775, 1.0]


def test_gae_discounted_three_tokens() -> None:
    adv, ret = gae_advantages(t([[1.0, 2.0, 0.5]]), t([[0.0, 0.5, 1.0]]), t([[1, 1, 1]]), gamma=0.9, lam=0.95)
    assert_close(adv, t([GAE_ADV]))
    assert_close(ret, t([GAE_RET]))


def test_gae_padding_gets_zero_and_does_not_leak() -> None:
    # Row 0 is the row above plus two padding positions holding garbage (V = 9, r = 7). If V_3 = 9 leaked,
    # delta_2 would be 1.0 + 0.9*9 - 0.5 = 8.6 instead of 0.5. Row 1 is all padding.
    values = t([[1.0, 2.0, 0.5, 9.0, 9.0], [5.0, 5.0, 5.0, 5.0, 5.0]])  # (2, 5)
    rewards = t([[0.0, 0.5, 1.0, 7.0, 7.0], [1.0, 1.0, 1.0, 1.0, 1.0]])  # (2, 5)
    mask = t([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    values.requires_grad_(True)
    adv, ret = gae_advantages(values, rewards, mask, gamma=0.9, lam=0.95)
    assert_close(adv, t([[*GAE_ADV, 0.0, 0.0], [0.0] * 5]))
    assert_close(ret, t([[*GAE_RET, 0.0, 0.0], [0.0] * 5]))
    assert not adv.requires_grad and not ret.requires_grad


# ------------------------------------------------------------------------------------------------ policy_loss


def test_policy_loss_clipping_both_signs() -> None:
    # clip_range 0.2 -> ratios clamped to [0.8, 1.2]. Four real tokens and one padding token:
    #   tok  ratio  A    -A*ratio   -A*clamp(ratio)       max    active
    #   0    0.9    2    -1.8       -1.8 (inside)         -1.8   unclipped (tie: not counted)
    #   1    1.5    1    -1.5       -1.2                  -1.2   clipped
    #   2    0.5   -1     0.5        0.8                   0.8   clipped
    #   3    1.5   -1     1.5        1.2                   1.5   unclipped (pessimistic bound keeps the big ratio)
    #   pad  3.0    5    ignored
    # loss = (-1.8 - 1.2 + 0.8 + 1.5) / 4 = -0.7 / 4 = -0.175 ; clip_fraction = 2 / 4 = 0.5
    # ratio mean = (0.9 + 1.5 + 0.5 + 1.5) / 4 = 4.4 / 4 = 1.1
    # approx_kl = 0.5 * mean(log r ^ 2) = 0.5 * (0.0111008 + 0.1644020 + 0.4804530 + 0.1644020) / 4 = 0.1025447
    ratios = [0.9, 1.5, 0.5, 1.5, 3.0]
    old = t([[-1.0] * 5])
    logprobs = (old + t([[math.log(r) for r in ratios]])).requires_grad_(True)
    advantages = t([[2.0, 1.0, -1.0, -1.0, 5.0]])
    mask = t([[1, 1, 1, 1, 0]])
    loss, stats = policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    assert_close(loss, torch.tensor(-0.175))
    assert stats["clip_fraction"] == pytest.approx(0.5)
    assert stats["ratio"] == pytest.approx(1.1, rel=1e-6)
    assert stats["approx_kl"] == pytest.approx(0.1025447, rel=1e-5)
    # Gradient flows only through unclipped tokens: d/d logprob of -A*ratio/4 = -A*ratio/4.
    # tok 0: -2*0.9/4 = -0.45 ; tok 1, 2: 0 (clamped) ; tok 3: 1*1.5/4 = 0.375 ; padding: 0
    loss.backward()
    assert_close(logprobs.grad, t([[-0.45, 0.0, 0.0, 0.375, 0.0]]))


# ------------------------------------------------------------------------------------------------- value_loss

VALUES = t([[1.0, 2.0, 0.0, 10.0]])
OLD_VALUES = t([[0.0, 1.75, 1.0, 0.0]])
RETURNS = t([[2.0, 1.0, 0.5, -10.0]])
VALUE_MASK = t([[1, 1, 1, 0]])  # the 4th token is padding with garbage


def test_value_loss_clipped() -> None:
    # clip_range 0.5:
    # tok 0: v - old = 1.0 -> 0.5, v_clip = 0.5 ; (1-2)^2 = 1.0, (0.5-2)^2 = 2.25 -> max 2.25 (clipped active)
    # tok 1: v - old = 0.25 inside, v_clip = 2.0 ; (2-1)^2 = 1.0 both -> 1.0 (not counted)
    # tok 2: v - old = -1.0 -> -0.5, v_clip = 0.5 ; (0-0.5)^2 = 0.25, (0.5-0.5)^2 = 0 -> 0.25 (unclipped)
    # loss = 0.5 * (2.25 + 1.0 + 0.25) / 3 = 0.5 * 3.5 / 3 = 0.583333 ; clip fraction 1/3
    loss, stats = value_loss(VALUES, OLD_VALUES, RETURNS, VALUE_MASK, clip_range=0.5)
    assert_close(loss, torch.tensor(3.5 / 6))
    assert stats["value_clip_fraction"] == pytest.approx(1 / 3)


def test_value_loss_unclipped() -> None:
    # clip_range 0 -> plain 0.5 * masked MSE: 0.5 * ((1-2)^2 + (2-1)^2 + (0-0.5)^2) / 3 = 0.5 * 2.25 / 3 = 0.375
    loss, stats = value_loss(VALUES, OLD_VALUES, RETURNS, VALUE_MASK, clip_range=0.0)
    assert_close(loss, torch.tensor(0.375))
    assert stats["value_clip_fraction"] == 0.0


# ---------------------------------------------------------------------------------------- AdaptiveKLController


def test_kl_controller_fixed_when_target_is_none() -> None:
    ctl = AdaptiveKLController(0.1, None, 10000)
    ctl.update(current_kl=100.0, n_steps=256)
    assert ctl.value == 0.1


def test_kl_controller_moves_by_clipped_proportional_error() -> None:
    # target 6, horizon 10000, n_steps 256 -> n_steps / horizon = 0.0256
    # KL 12: 12/6 - 1 = 1.0 -> clipped 0.2 ; 0.1 * (1 + 0.2 * 0.0256) = 0.1 * 1.00512 = 0.100512
    up = AdaptiveKLController(0.1, 6.0, 10000)
    up.update(12.0, 256)
    assert up.value == pytest.approx(0.100512)
    # KL 3: 3/6 - 1 = -0.5 -> clipped -0.2 ; 0.1 * (1 - 0.00512) = 0.099488
    down = AdaptiveKLController(0.1, 6.0, 10000)
    down.update(3.0, 256)
    assert down.value == pytest.approx(0.099488)
    # KL 6.6 (inside the clip): 6.6/6 - 1 = 0.1 ; 0.1 * (1 + 0.1 * 0.0256) = 0.1 * 1.00256 = 0.100256
    mid = AdaptiveKLController(0.1, 6.0, 10000)
    mid.update(6.6, 256)
    assert mid.value == pytest.approx(0.100256)


def test_kl_controller_state_round_trip() -> None:
    ctl = AdaptiveKLController(0.1, 6.0, 10000)
    ctl.update(12.0, 256)
    resumed = AdaptiveKLController(0.1, 6.0, 10000)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value == pytest.approx(0.100512)
    assert ctl.state_dict() == {"value": ctl.value, "target": 6.0, "horizon": 10000}


def test_kl_controller_rejects_bad_target() -> None:
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, 0.0, 10000)
    with pytest.raises(ValueError, match="horizon"):
        AdaptiveKLController(0.1, 6.0, 0)


# ------------------------------------------------------------------------------------------------- ema_update


def test_ema_update_in_place() -> None:
    # beta 0.75: ema = 0.75*ema + 0.25*param
    # [1, 2] with [3, -2] -> [0.75 + 0.75, 1.5 - 0.5] = [1.5, 1.0]
    # [[4]] with [[0]] (bf16 param, cast to float32) -> [[3.0]]
    a = torch.nn.Parameter(t([1.0, 2.0]))  # requires_grad: the update runs under no_grad
    b = t([[4.0]])
    ema_update([a, b], [t([3.0, -2.0]), torch.zeros(1, 1, dtype=torch.bfloat16)], beta=0.75)
    assert_close(a.data, t([1.5, 1.0]))
    assert_close(b, t([[3.0]]))
    assert b.dtype == torch.float32
    with pytest.raises(ValueError):
        ema_update([a, b], [a], beta=0.75)
