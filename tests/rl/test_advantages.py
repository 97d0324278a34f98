"""The critic-free family's and DPO's math (rlhf/rl/advantages.py, rlhf/training/losses.py) on tiny tensors whose
expected values are derived by hand from each paper's formula in the comments."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from rlhf.models.logprobs import entropy_from_logits
from rlhf.rl.advantages import discounted_returns, grpo, grpo_baseline, reinforce_pp, rloo, rloo_baseline
from rlhf.training.losses import aggregate_loss, dpo_loss, k3_kl, policy_loss


def t(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def _cfg(group_size: int) -> SimpleNamespace:
    """The step-3 config fields the critic-free estimators read."""
    return SimpleNamespace(group_size=group_size, advantage=SimpleNamespace(group_std=True, gamma=1.0))


# ------------------------------------------------------------------------------------------- group advantages


def test_grpo_advantages_with_std() -> None:
    # GRPO eq. 3: A_i = (r_i - mean(r)) / std(r), per group of G = 3 answers to one prompt.
    # Group 1: r = [1, 2, 3] -> mean 2, unbiased std sqrt(((1)^2 + 0 + 1^2) / 2) = 1 -> A = [-1, 0, 1].
    # Group 2: r = [0, 0, 6] -> mean 2, std sqrt((4 + 4 + 16) / 2) = sqrt(12) = 3.4641 -> A = [-2, -2, 4] / 3.4641
    #          = [-0.57735, -0.57735, 1.15470].
    out = grpo_baseline(t([1, 2, 3, 0, 0, 6]), 3, scale=True, eps=0.0)
    assert_close(out, t([-1, 0, 1, -2 / math.sqrt(12), -2 / math.sqrt(12), 4 / math.sqrt(12)]))


def test_dr_grpo_advantages_without_std() -> None:
    # Dr. GRPO: A_i = r_i - mean(r), no std division. Group 2 above: [0, 0, 6] - 2 = [-2, -2, 4].
    out = grpo_baseline(t([1, 2, 3, 0, 0, 6]), 3, scale=False)
    assert_close(out, t([-1, 0, 1, -2, -2, 4]))


def test_grpo_group_of_equal_scores_has_zero_advantage() -> None:
    # r = [0.5, 0.5]: mean 0.5, std 0 -> (0) / (0 + eps) = 0, not NaN.
    assert_close(grpo_baseline(t([0.5, 0.5]), 2), t([0, 0]))


@pytest.mark.parametrize("group", [3, 5, 8, 16])
@pytest.mark.parametrize("baseline", [grpo_baseline, rloo_baseline])
def test_a_group_of_equal_scores_has_exactly_zero_advantage(group: int, baseline) -> None:
    # Scores as step 3 makes them: 0/1 verifier rewards z-scored by running moments, i.e. arbitrary float32 values.
    # In float32 the mean of G copies of such a value can be one rounding step off it and the std one step above 0;
    # (r - mean) / (std + 1e-6) then gave advantages up to 0.24 for answers that all scored alike. In float64 the
    # sum of G float32 values is exact, so the mean is the value and every advantage exactly 0.
    values = (torch.rand(200, generator=torch.Generator().manual_seed(0)) * 4 - 2).float()
    for value in values.tolist():
        scores = torch.full((2 * group,), value, dtype=torch.float32)
        out = baseline(scores, group)
        assert out.dtype == torch.float32 and torch.equal(out, torch.zeros_like(out)), (value, out)


def test_masked_whiten_over_ranks_equals_whiten_of_the_whole_batch() -> None:
    # Two ranks' halves, with all_reduce summing the halves' statistics: the same mean and variance as one batch of
    # every real token (verl's and OpenRLHF's global whitening), so each half is whitened as part of the whole.
    from rlhf.training.stats import masked_whiten

    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    mask = (torch.rand(8, 5, generator=torch.Generator().manual_seed(2)) > 0.3).float()
    whole = masked_whiten(x, mask)
    halves = [(x[:4], mask[:4]), (x[4:], mask[4:])]

    def two_ranks(i: int):  # what torch.distributed.all_reduce would give rank i: its value plus the other rank's
        calls = []

        def reduce(value: torch.Tensor) -> torch.Tensor:
            other_x, other_m = halves[1 - i]
            keep = other_m.bool()
            other64 = torch.where(keep, other_x.double(), torch.zeros_like(other_x, dtype=torch.float64))
            if not calls:  # the first call sums (total, count); the second the squared deviations
                calls.append(value)
                return value + torch.stack([other64.sum(), keep.sum().double()])
            mean = (calls[0][0] + other64.sum()) / (calls[0][1] + keep.sum())
            return value + torch.where(keep, (other64 - mean) ** 2, torch.zeros_like(other64)).sum()

        return reduce

    got = torch.cat([masked_whiten(hx, hm, all_reduce=two_ranks(i)) for i, (hx, hm) in enumerate(halves)])
    assert_close(got, whole, rtol=0, atol=1e-6)
    assert (masked_whiten(x[:4], mask[:4]) - whole[:4]).abs().max() > 1e-2  # a half alone is whitened otherwise


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_aggregate_loss_of_micro_batches_with_the_mini_batch_total_adds_up_to_the_whole(mode: str) -> None:
    # token_mean over 3 + 1 tokens is (1+2+3 + 10) / 4 = 4; the micro batches' own means (2 and 10) averaged give 6.
    # With total = the mini batch's count (4 tokens, or 2 rows) the micro batches' losses sum to the whole's.
    from rlhf.training.losses import aggregation_count

    loss, mask = t([[1, 2, 3], [10, 0, 0]]), t([[1, 1, 1], [1, 0, 0]])
    whole = aggregate_loss(loss, mask, mode, norm_length=3)
    total = aggregation_count(mask, mode).item()
    parts = sum(aggregate_loss(loss[i : i + 1], mask[i : i + 1], mode, 3, total) for i in range(2))
    assert_close(parts, whole)
    if mode == "token_mean":
        assert_close(whole, torch.tensor(4.0))
        assert_close(sum(aggregate_loss(loss[i : i + 1], mask[i : i + 1], mode) for i in range(2)) / 2,
                     torch.tensor(6.0))


def test_rloo_leave_one_out_baseline() -> None:
    # RLOO: A_i = r_i - 1/(G-1) sum_{j != i} r_j, G = 3. r = [1, 2, 6]:
    # A_0 = 1 - (2 + 6) / 2 = -3; A_1 = 2 - (1 + 6) / 2 = -1.5; A_2 = 6 - (1 + 2) / 2 = 4.5.
    # (= G/(G-1) (r_i - mean): mean 3 -> 1.5 x [-2, -1, 3] = [-3, -1.5, 4.5].)
    assert_close(rloo_baseline(t([1, 2, 6]), 3), t([-3, -1.5, 4.5]))


def test_group_advantages_refuse_a_ragged_group() -> None:
    with pytest.raises(ValueError, match="groups"):
        grpo_baseline(t([1, 2, 3]), 2)
    with pytest.raises(ValueError, match="groups"):
        rloo_baseline(t([1, 2]), 1)


# -------------------------------------------------------------------------------------- returns, REINFORCE++


def test_discounted_returns_reward_to_go_and_padding() -> None:
    # Row 0: r = [1, 2, 3], gamma 0.5: G_2 = 3, G_1 = 2 + 0.5 * 3 = 3.5, G_0 = 1 + 0.5 * 3.5 = 2.75.
    # Row 1: r = [1, 1, 100] with the last position padding: the 100 never reaches G_1 = 1, G_0 = 1 + 0.5 = 1.5.
    out = discounted_returns(t([[1, 2, 3], [1, 1, 100]]), t([[1, 1, 1], [1, 1, 0]]), gamma=0.5)
    assert_close(out, t([[2.75, 3.5, 3], [1.5, 1, 0]]))


def test_reinforce_pp_token_kl_in_reward_then_global_whitening() -> None:
    # REINFORCE++: r_t = -beta * (log pi - log ref)_t + [t = last] * score; A = reward-to-go, whitened over the batch.
    # beta = 0.5, two answers of 2 tokens; log pi - log ref = [[0.2, 0.4], [0, 0]]; scores [1, 3].
    # Row 0 rewards: [-0.1, -0.2 + 1] = [-0.1, 0.8] -> returns [0.7, 0.8]. Row 1: [0, 3] -> returns [3, 3].
    # Whitening over the 4 tokens [0.7, 0.8, 3, 3]: mean 1.875, deviations [-1.175, -1.075, 1.125, 1.125], biased
    # var = (1.380625 + 1.155625 + 1.265625 * 2) / 4 = 1.266875 -> std 1.125555;
    # A = [-1.043929, -0.955083, 0.999506, 0.999506].
    logprobs, ref = t([[0.2, 0.4], [0.0, 0.0]]), t([[0.0, 0.0], [0.0, 0.0]])
    mask = t([[1, 1], [1, 1]])
    rewards, adv, _ = reinforce_pp(logprobs, ref, torch.zeros(2, 2), t([1, 3]), mask, _cfg(1), kl_coef=0.5)
    assert_close(rewards, t([[-0.1, 0.8], [0.0, 3.0]]))
    assert_close(adv, t([[-1.043929, -0.955083], [0.999506, 0.999506]]), atol=1e-5, rtol=1e-5)


def test_grpo_outcome_advantage_on_every_token() -> None:
    # GRPO (outcome supervision, KL as a loss: kl_coef 0 in the reward): every token of answer i gets A_i.
    # G = 2, scores [0, 1] -> mean 0.5, unbiased std sqrt((0.25 + 0.25) / 1) = 0.7071 -> A = [-0.7071, 0.7071];
    # answer 0 has 3 tokens, answer 1 has 2 (its third position is padding, 0).
    mask = t([[1, 1, 1], [1, 1, 0]])
    zeros = torch.zeros(2, 3)
    _, adv, _ = grpo(zeros, zeros, zeros, t([0, 1]), mask, _cfg(2), kl_coef=0.0)
    a = 0.5 / math.sqrt(0.5)
    assert_close(adv, t([[-a, -a, -a], [a, a, 0]]), atol=1e-5, rtol=1e-5)


def test_rloo_with_kl_in_the_reward() -> None:
    # RLOO with k1 KL in the reward (OpenRLHF's rloo): baseline first, then -beta * kl per token, summed to go.
    # G = 2, scores [2, 4] -> A = [2 - 4, 4 - 2] = [-2, 2]; beta 1, kl = [[0.5], [0.25]] -> r = [-2.5, 1.75].
    zeros = t([[0.0], [0.0]])
    _, adv, _ = rloo(t([[0.5], [0.25]]), zeros, zeros, t([2, 4]), t([[1], [1]]), _cfg(2), kl_coef=1.0)
    assert_close(adv, t([[-2.5], [1.75]]))


# ---------------------------------------------------------------------------------------- loss aggregations


def test_loss_aggregations() -> None:
    # l = [[1, 2, 3], [4, 0, 0]] with mask [[1, 1, 1], [1, 0, 0]] (the 9 is padding and never counts).
    # token_mean: (1 + 2 + 3 + 4) / 4 = 2.5.
    # seq_mean_token_mean: ((1 + 2 + 3) / 3 + 4 / 1) / 2 = (2 + 4) / 2 = 3.
    # seq_mean_token_sum_norm, L = 4: ((1 + 2 + 3) / 4 + 4 / 4) / 2 = (1.5 + 1) / 2 = 1.25.
    loss, mask = t([[1, 2, 3], [4, 9, float("nan")]]), t([[1, 1, 1], [1, 0, 0]])
    assert_close(aggregate_loss(loss, mask, "token_mean"), torch.tensor(2.5))
    assert_close(aggregate_loss(loss, mask, "seq_mean_token_mean"), torch.tensor(3.0))
    assert_close(aggregate_loss(loss, mask, "seq_mean_token_sum_norm", 4), torch.tensor(1.25))
    with pytest.raises(ValueError, match="norm_length"):
        aggregate_loss(loss, mask, "seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="unknown"):
        aggregate_loss(loss, mask, "sum")


def test_asymmetric_clipping_clip_higher() -> None:
    # DAPO clip-higher: clamp(ratio, 1 - eps_low, 1 + eps_high), eps_low 0.2, eps_high 0.28.
    # Token 0: A = +1, ratio e^0.5 = 1.6487 -> clipped at 1.28: max(-1.6487, -1.28) = -1.28 (clip active).
    #          The symmetric clip would give -1.2.
    # Token 1: A = -1, ratio e^-0.5 = 0.6065 -> clipped at 0.8: max(0.6065, 0.8) = 0.8 (clip active).
    # loss (token_mean) = (-1.28 + 0.8) / 2 = -0.24; symmetric: (-1.2 + 0.8) / 2 = -0.2.
    logprobs, old, adv, mask = t([[0.5, -0.5]]), t([[0.0, 0.0]]), t([[1.0, -1.0]]), t([[1, 1]])
    loss, stats = policy_loss(logprobs, old, adv, mask, 0.2, clip_range_high=0.28)
    assert_close(loss, torch.tensor(-0.24))
    assert stats["clip_fraction"] == 1.0
    assert_close(policy_loss(logprobs, old, adv, mask, 0.2)[0], torch.tensor(-0.2))


def test_policy_loss_sequence_mean_aggregation() -> None:
    # ratio 1 everywhere (logprobs = old): per-token loss = -A. A = [[1, 1, 1], [4, 0, 0]], mask [[1,1,1],[1,0,0]].
    # token_mean: -(1 + 1 + 1 + 4) / 4 = -1.75; seq_mean_token_mean: -((3 / 3) + 4) / 2 = -2.5.
    zeros, mask = torch.zeros(2, 3), t([[1, 1, 1], [1, 0, 0]])
    adv = t([[1, 1, 1], [4, 0, 0]])
    assert_close(policy_loss(zeros, zeros, adv, mask, 0.2)[0], torch.tensor(-1.75))
    assert_close(policy_loss(zeros, zeros, adv, mask, 0.2, aggregation="seq_mean_token_mean")[0], torch.tensor(-2.5))


# ------------------------------------------------------------------------------------------------ KL, entropy


def test_k3_kl() -> None:
    # k3 = e^(ref - logp) - (ref - logp) - 1. logp = ref: 1 - 0 - 1 = 0.
    # ref - logp = ln 2: 2 - 0.693147 - 1 = 0.306853. ref - logp = -ln 2: 0.5 + 0.693147 - 1 = 0.193147.
    out = k3_kl(t([0.0, 0.0, 0.0]), t([0.0, math.log(2), -math.log(2)]))
    assert_close(out, t([0.0, 1 - math.log(2), math.log(2) - 0.5]))


def test_k3_kl_gradient_pulls_towards_the_reference() -> None:
    # d k3 / d logp = -e^(ref - logp) + 1: at ref - logp = ln 2 it is 1 - 2 = -1 (raising logp lowers the KL).
    logp = torch.zeros(1, requires_grad=True)
    k3_kl(logp, torch.tensor([math.log(2)])).sum().backward()
    assert_close(logp.grad, torch.tensor([-1.0]))


def test_entropy_from_logits() -> None:
    # Uniform over 4 tokens: H = ln 4 = 1.386294. Logits [ln 1, ln 3] -> p = [0.25, 0.75]:
    # H = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.346574 + 0.215762 = 0.562335. At T = 2, logits [0, 0] stay uniform.
    out = entropy_from_logits(torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3), -1e9, -1e9]]]))
    assert_close(out, t([[math.log(4), 0.5623351]]))
    assert_close(entropy_from_logits(torch.zeros(1, 1, 2), 2.0), t([[math.log(2)]]))


# ------------------------------------------------------------------------------------------------------- DPO


def test_dpo_sigmoid_loss() -> None:
    # DPO eq. 7: -log sigmoid(beta h), h = (pi_w - ref_w) - (pi_l - ref_l).
    # pi_w - ref_w = -1 - (-2) = 1; pi_l - ref_l = -3 - (-2) = -1; h = 2; beta = 0.5 -> beta h = 1.
    # loss = -log sigmoid(1) = log(1 + e^-1) = 0.313262. Implicit rewards: 0.5 x 1 = 0.5 and 0.5 x -1 = -0.5.
    loss, stats = dpo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), beta=0.5)
    assert_close(loss, torch.tensor(math.log(1 + math.exp(-1))))
    assert stats == pytest.approx({"rewards_chosen": 0.5, "rewards_rejected": -0.5, "margin": 1.0, "accuracy": 1.0})


def test_cdpo_label_smoothing() -> None:
    # cDPO, eps = 0.1, beta h = 1 (as above): 0.9 x -log sigmoid(1) + 0.1 x -log sigmoid(-1)
    # = 0.9 x 0.313262 + 0.1 x 1.313262 = 0.281936 + 0.131326 = 0.413262.
    loss, _ = dpo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), beta=0.5, label_smoothing=0.1)
    assert_close(loss, torch.tensor(0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.e)))


def test_ipo_loss() -> None:
    # IPO eq. 17: (h - 1 / (2 tau))^2 with tau = beta = 0.5: target 1. Pair 1: h = 2 -> 1. Pair 2: h = 0 -> 1.
    # Pair 3: h = 1 -> 0. Mean (1 + 1 + 0) / 3 = 0.666667.
    loss, stats = dpo_loss(t([-1.0, -2, -1]), t([-3.0, -2, -2]), t([-2.0, -2, -2]), t([-2.0, -2, -2]), 0.5, "ipo")
    assert_close(loss, torch.tensor(2 / 3))
    assert stats["accuracy"] == pytest.approx(2 / 3)  # pairs 1 and 3 rank chosen above rejected; pair 2 ties


def test_simpo_loss() -> None:
    # SimPO eq. 6 on mean log-probabilities per token, no reference: c = -1, r = -2, beta 2, gamma 1:
    # beta (c - r) - gamma = 1 -> -log sigmoid(1) = log(1 + e^-1) = 0.313262; implicit rewards beta x c, beta x r.
    from rlhf.training.losses import reference_free_loss

    loss, stats = reference_free_loss(t([-1.0]), t([-2.0]), 2.0, "simpo", gamma=1.0)
    assert_close(loss, torch.tensor(math.log(1 + math.exp(-1))))
    assert stats == pytest.approx({"rewards_chosen": -2.0, "rewards_rejected": -4.0, "margin": 2.0, "accuracy": 1.0})


def test_orpo_odds_ratio_term() -> None:
    # ORPO eqs. 4-7: mean per-token probabilities 0.5 (chosen) and 0.25 (rejected): odds 1 and 1/3, log odds
    # ratio ln 3 = 1.098612, sigmoid(ln 3) = 0.75 -> -lambda log 0.75 = 0.1 x 0.287682 = 0.0287682. Equal answers:
    # log odds ratio 0 -> 0.1 x log 2.
    from rlhf.training.losses import reference_free_loss

    loss, _ = reference_free_loss(torch.log(t([0.5])), torch.log(t([0.25])), 0.1, "orpo")
    assert_close(loss, torch.tensor(0.1 * -math.log(0.75)))
    same, _ = reference_free_loss(torch.log(t([0.3])), torch.log(t([0.3])), 0.1, "orpo")
    assert_close(same, torch.tensor(0.1 * math.log(2)))
    # near-certain answers (log p -> 0) stay finite: log(1 - e^x) is taken without cancelling
    assert torch.isfinite(reference_free_loss(t([-1e-7]), t([-5.0]), 0.1, "orpo")[0])
    with pytest.raises(ValueError, match="simpo or orpo"):
        reference_free_loss(t([-1.0]), t([-2.0]), 0.1, "dpo")


def test_kto_loss_by_hand() -> None:
    """KTO eq. 8 with beta 0.5, z0 0.4: a desirable answer at log-ratio 1.2 loses 1 - sigmoid(0.5 x 0.8) =
    0.401312, an undesirable one at -0.6 loses 1 - sigmoid(0.5 x 1.0) = 0.377541, weighted 1 and 2; accuracy: both
    on their label's side of z0."""
    from rlhf.training.losses import kto_loss

    policy, ref = t([-1.8, -3.6]), t([-3.0, -3.0])
    loss, stats = kto_loss(policy, ref, torch.tensor([True, False]), torch.tensor(0.4), 0.5, 1.0, 2.0)
    d, u = 1 - 1 / (1 + math.exp(-0.4)), 1 - 1 / (1 + math.exp(-0.5))
    assert_close(loss, torch.tensor((d + 2 * u) / 2))
    assert stats == pytest.approx({"rewards_chosen": 0.6, "rewards_rejected": -0.3, "margin": 0.9, "accuracy": 1.0,
                                   "kl": 0.4})
    # the gradient: up on the desirable answer, down on the undesirable one
    policy.requires_grad_(True)
    kto_loss(policy, ref, torch.tensor([True, False]), torch.tensor(0.4), 0.5)[0].backward()
    assert policy.grad[0] < 0 < policy.grad[1]
    # a batch of one kind: the other's mean reward is 0, not NaN
    _, only = kto_loss(t([-1.0]), t([-1.0]), torch.tensor([True]), torch.tensor(0.0), 0.1)
    assert only["rewards_rejected"] == 0.0 and only["accuracy"] == 0.0


def test_each_dpo_loss_takes_its_published_beta_and_sft_weight() -> None:
    from rlhf.config import DPOConfig

    assert (DPOConfig().beta, DPOConfig().sft_coef, DPOConfig().needs_reference) == (0.1, 1.0, True)
    simpo = DPOConfig(loss_type="simpo")
    assert (simpo.beta, simpo.sft_coef, simpo.needs_reference) == (2.0, 0.0, False)
    assert (DPOConfig(loss_type="orpo").beta, DPOConfig(loss_type="orpo").sft_coef) == (0.1, 1.0)
    assert DPOConfig(loss_type="simpo", beta=2.5, sft_coef=0.5).beta == 2.5  # an explicit value wins


def test_dpo_loss_gradient_raises_chosen_and_lowers_rejected() -> None:
    pc, pr = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    loss, _ = dpo_loss(pc, pr, torch.zeros(1), torch.zeros(1), beta=0.1)
    loss.backward()
    # d/d pc of -log sigmoid(beta (pc - pr)) at 0 = -beta x sigmoid(0)... = -beta / 2 = -0.05; d/d pr = +0.05.
    assert_close(pc.grad, torch.tensor([-0.05]))
    assert_close(pr.grad, torch.tensor([0.05]))


def test_dual_clip_bounds_the_loss_of_a_negative_advantage() -> None:
    # A = -1 at ratio 5: the clipped surrogate is max(-A r, -A clip(r)) = max(5, 1.2) = 5; dual-clip with c = 3
    # bounds it at -A c = 3. A = +1 at ratio 5: max(-5, -1.2) = -1.2, untouched by the dual clip (A > 0).
    lp, old, mask = torch.log(t([[5.0, 5.0]])), t([[0.0, 0.0]]), t([[1, 1]])

    def per(adv: list[float], c: float | None) -> torch.Tensor:
        return policy_loss(lp, old, t([adv]), mask, 0.2, aggregation="token_mean", dual_clip=c)[0]

    assert_close(per([-1.0, -1.0], None), torch.tensor(5.0))
    assert_close(per([-1.0, -1.0], 3.0), torch.tensor(3.0))
    assert_close(per([1.0, 1.0], 3.0), torch.tensor(-1.2))


def test_each_algorithm_takes_its_published_defaults_unless_params_say_otherwise() -> None:
    from rlhf.config import ALGORITHM_DEFAULTS, LossConfig, PPOConfig

    grpo = PPOConfig(algorithm="grpo")  # DeepSeekMath: k3 KL loss at 0.04, per-answer means, raw rewards
    assert (grpo.kl.penalty, grpo.kl.coef, grpo.loss.aggregation, grpo.advantage.reward_normalization,
            grpo.advantage.reward_clip) == ("loss", 0.04, "seq_mean_token_mean", "none", 0.0)
    assert PPOConfig(algorithm="dr_grpo").advantage.group_std is False
    assert PPOConfig(algorithm="dapo").loss.clip_high == 0.28 and PPOConfig(algorithm="dapo").kl.coef == 0.0
    gspo, cispo = PPOConfig(algorithm="gspo").loss, PPOConfig(algorithm="cispo").loss  # TRL's GSPO and CISPO
    assert (gspo.ratio_level, gspo.clip_low, gspo.clip_high, gspo.surrogate) == ("sequence", 3e-4, 4e-4, "clip")
    assert (cispo.surrogate, 1 + cispo.clip_high, cispo.aggregation) == ("cispo", 5.0, "token_mean")
    with pytest.raises(ValueError, match="dual_clip"):
        PPOConfig(algorithm="cispo", loss={"dual_clip": 3.0})
    ppo = PPOConfig()  # ours, unchanged: the default pipeline's figures hold
    assert (ppo.kl.penalty, ppo.kl.coef, ppo.advantage.reward_normalization, ppo.advantage.reward_clip) == (
        "reward", 0.2, "running", 5.0)
    explicit = PPOConfig(algorithm="grpo", kl={"coef": 0.1}, loss={"aggregation": None})
    assert (explicit.kl.coef, explicit.kl.penalty, explicit.loss.aggregation) == (0.1, "loss", "seq_mean_token_mean")
    given = PPOConfig(algorithm="dapo", loss=LossConfig(entropy_coef=0.01))  # a group object, not a mapping
    assert (given.loss.entropy_coef, given.loss.clip_high) == (0.01, 0.28)
    for name, defaults in ALGORITHM_DEFAULTS.items():
        cfg = PPOConfig(algorithm=name, **({"answers_per_prompt": 2} if name == "reinforce_pp" else {}))
        got = {group: {k: getattr(getattr(cfg, group), k) for k in values} for group, values in defaults.items()}
        assert got == defaults, name
        assert cfg.describe().startswith(f"{name}; ")


def test_ipo_length_normalisation_divides_each_answer_by_its_token_count() -> None:
    # Chosen answer of 2 tokens, rejected of 4 (answer positions from column 1 on, as sequence_logprobs counts them):
    # summed log-probabilities -2 / -8 (policy) and -1 / -4 (reference) become means -1 / -2 and -0.5 / -1.
    from rlhf.prefs.dpo import per_token

    answer = t([[0, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    got = per_token([t([-2.0]), t([-8.0]), t([-1.0]), t([-4.0])], answer)
    assert [g.item() for g in got] == [-1.0, -2.0, -0.5, -1.0]


def test_gspo_clips_one_ratio_per_answer() -> None:
    # GSPO (Zheng et al. 2025 eq. 7): s = exp(mean over the answer's tokens of log ratio). Answer 0: log ratios
    # [0.3, -0.3] -> s = e^0 = 1, A = +1: every token's loss is -1 (no clip), the answer's mean -1. Answer 1: one
    # real token, log ratio -0.6 -> s = 0.548812, A = -1 -> max(0.548812, clip 0.8) = 0.8. seq_mean_token_mean:
    # (-1 + 0.8) / 2 = -0.1. Token ratios instead: answer 0 = mean(max(-1.349859, -1.2), max(-0.740818, -0.8))
    # = (-1.2 - 0.740818) / 2 = -0.970409, so (-0.970409 + 0.8) / 2 = -0.085205.
    lp = torch.tensor([[0.3, -0.3], [-0.6, 5.0]], requires_grad=True)
    old, adv, mask = t([[0.0, 0.0], [0.0, 0.0]]), t([[1.0, 1.0], [-1.0, -1.0]]), t([[1, 1], [1, 0]])
    loss, stats = policy_loss(lp, old, adv, mask, 0.2, aggregation="seq_mean_token_mean", ratio_level="sequence")
    assert_close(loss, torch.tensor(-0.1))
    assert stats["clip_fraction"] == pytest.approx(1 / 3)  # answer 1's one real token
    token, _ = policy_loss(lp, old, adv, mask, 0.2, aggregation="seq_mean_token_mean")
    assert_close(token, torch.tensor(-0.0852045))
    # the gradient reaches every token of an unclipped answer through the mean: d(-s)/d lp_t x 1/2 (the answer's
    # mean over its 2 tokens) x 1/2 (two answers) = -1 x 1/2 x 1/2; nothing reaches the clipped answer or padding
    loss.backward()
    assert_close(lp.grad, t([[-0.25, -0.25], [0.0, 0.0]]))


def test_cispo_weights_every_token_by_its_clipped_ratio_without_gradient() -> None:
    # CISPO (MiniMax-M1): loss = -sg(min(r, 1 + eps_high)) A log pi. r = [2, 0.5] (log pi = [ln .5, ln .25], old =
    # [ln .25, ln .5]), eps_high 0.5 -> weights [1.5, 0.5], A = +1: per token [1.5 x 0.693147, 0.5 x 1.386294] =
    # [1.039721, 0.693147], token_mean 0.866434. The gradient is -A w / 2 = [-0.75, -0.25]: the clipped token
    # keeps its gradient, where PPO's clip gives it none.
    lp = torch.log(t([[0.5, 0.25]])).requires_grad_(True)
    old, adv, mask = torch.log(t([[0.25, 0.5]])), t([[1.0, 1.0]]), t([[1, 1]])
    loss, stats = policy_loss(lp, old, adv, mask, 0.2, clip_range_high=0.5, surrogate="cispo")
    assert_close(loss, torch.tensor(0.866434))
    assert stats["clip_fraction"] == 0.5
    loss.backward()
    assert_close(lp.grad, t([[-0.75, -0.25]]))
    ppo = torch.log(t([[0.5, 0.25]])).requires_grad_(True)
    policy_loss(ppo, old, adv, mask, 0.2, clip_range_high=0.5)[0].backward()
    assert ppo.grad[0, 0] == 0  # the clipped surrogate: no gradient where r > 1 + eps and A > 0
    with pytest.raises(ValueError, match="surrogate"):
        policy_loss(lp, old, adv, mask, 0.2, surrogate="cipso")


def test_gae_and_returns_skip_an_environments_tokens_between_turns() -> None:
    """A multi-turn answer: model tokens, 2 environment tokens (mask 0), model tokens, padding. GAE and the
    reward-to-go equal those of the model's tokens alone, laid side by side (t + 1 is the next model token), and
    are 0 on the environment's tokens."""
    from rlhf.rl.advantages import gae_advantages

    values = torch.tensor([[0.5, -0.2, 9.0, 9.0, 0.3, 0.1, 7.0]])
    rewards = torch.tensor([[0.0, 0.1, 5.0, 5.0, -0.2, 1.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]])
    model = torch.tensor([0, 1, 4, 5])
    gamma, lam = 0.9, 0.8
    adv, ret = gae_advantages(values, rewards, mask, gamma, lam)
    want_adv, want_ret = gae_advantages(values[:, model], rewards[:, model], torch.ones(1, 4), gamma, lam)
    assert_close(adv[:, model], want_adv) and assert_close(ret[:, model], want_ret)
    assert adv[0, 2:4].abs().sum() == 0 and ret[0, 2:4].abs().sum() == 0
    # by hand, backwards over the model tokens v = (0.5, -0.2, 0.3, 0.1), r = (0, 0.1, -0.2, 1)
    d3 = 1.0 - 0.1
    d2 = -0.2 + gamma * 0.1 - 0.3
    d1 = 0.1 + gamma * 0.3 + 0.2
    d0 = 0.0 + gamma * -0.2 - 0.5
    a3 = d3
    a2 = d2 + gamma * lam * a3
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    assert_close(adv[0, model], torch.tensor([a0, a1, a2, a3]))
    g = discounted_returns(rewards, mask, gamma)
    assert_close(g[0, model], torch.tensor([0.1 * gamma + -0.2 * gamma**2 + gamma**3, 0.1 + -0.2 * gamma + gamma**2,
                                            -0.2 + gamma, 1.0]))
    assert g[0, 2:4].abs().sum() == 0
