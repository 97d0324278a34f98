"""The rollout/training mismatch (rlhf/rl/correction.py): each correction's weights and the logged statistics
against hand-computed values, and the weights reaching the policy loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from rlhf.rl.correction import is_weights, mismatch_stats
from rlhf.training.losses import aggregate_loss, policy_loss

# Row 0: rho = pi_old / pi_rollout = 0.5 / 0.25 = 2 and 0.2 / 0.4 = 0.5, then padding. Row 1: rho = 3 on 3 tokens.
OLD = torch.log(torch.tensor([[0.5, 0.2, 0.7], [0.9, 0.9, 0.9]]))
ROLLOUT = torch.log(torch.tensor([[0.25, 0.4, 0.1], [0.3, 0.3, 0.3]]))
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])


@pytest.mark.parametrize("mode,low,high,want", [
    ("none", 0.5, 2.0, [[1, 1, 0], [1, 1, 1]]),
    # min(rho, 1.5) per token
    ("token_tis", 0.5, 1.5, [[1.5, 0.5, 0], [1.5, 1.5, 1.5]]),
    # rho kept inside [0.6, 2.5], 0 outside: 0.5 and 3 are dropped
    ("token_mask", 0.6, 2.5, [[2.0, 0, 0], [0, 0, 0]]),
    # the answer's product: 2 x 0.5 = 1, 3^3 = 27 -> capped at 2.5
    ("seq_tis", 0.5, 2.5, [[1, 1, 0], [2.5, 2.5, 2.5]]),
    # geometric means 1 (kept: min(rho, 1.5)) and 3 (outside [0.5, 1.5]: the whole answer dropped)
    ("seq_mask", 0.5, 1.5, [[1.5, 0.5, 0], [0, 0, 0]]),
])
def test_each_correction_weighs_tokens_as_written(mode: str, low: float, high: float, want: list) -> None:
    got = is_weights(OLD, ROLLOUT, MASK, mode, low, high)
    assert_close(got, torch.tensor(want, dtype=torch.float32), atol=1e-6, rtol=1e-6)
    assert not got.requires_grad


def test_mismatch_statistics_by_hand() -> None:
    # log rollout - log old over the 5 real tokens: -log 2, log 2, 3 x -log 3
    weights = is_weights(OLD, ROLLOUT, MASK, "token_mask", 0.6, 2.5)  # keeps 1 token of 5
    got = mismatch_stats(OLD, ROLLOUT, MASK, weights)
    k3 = (2 - 1 - math.log(2)) + (0.5 - 1 + math.log(2)) + 3 * (3 - 1 - math.log(3))
    assert got["mismatch_kl"] == pytest.approx(-3 * math.log(3) / 5)
    assert got["mismatch_k3"] == pytest.approx(k3 / 5)
    assert got["mismatch_ratio_mean"] == pytest.approx((2 + 0.5 + 9) / 5)
    assert got["mismatch_ratio_max"] == pytest.approx(3.0)
    assert got["mismatch_abs_max"] == pytest.approx(math.log(3))
    assert got["is_weight_mean"] == pytest.approx(2.0 / 5) and got["is_masked"] == pytest.approx(4 / 5)


def test_equal_logprobs_weigh_one_and_measure_no_mismatch() -> None:
    got = mismatch_stats(OLD, OLD.clone(), MASK, is_weights(OLD, OLD.clone(), MASK, "seq_tis", 0.5, 2.0))
    assert got["mismatch_kl"] == 0 and got["mismatch_k3"] == 0 and got["mismatch_ratio_max"] == 1
    assert got["is_weight_mean"] == 1 and got["is_masked"] == 0


def test_weights_multiply_each_tokens_policy_loss_before_aggregation() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.2, -0.1]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 0.5], [2.0, 0.0, -1.0]])
    weights = is_weights(OLD, ROLLOUT, MASK, "token_tis", 0.5, 1.5)
    plain, _ = policy_loss(logprobs, OLD, adv, MASK, 0.2, aggregation="seq_mean_token_mean")
    weighted, _ = policy_loss(logprobs, OLD, adv, MASK, 0.2, aggregation="seq_mean_token_mean", weights=weights)
    ratio = torch.exp(logprobs - OLD)
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    assert_close(weighted, aggregate_loss(per_token * weights, MASK, "seq_mean_token_mean"))
    assert not torch.allclose(plain, weighted)
    weighted.backward()  # the weights carry no gradient of their own: the loss's gradient flows through logprobs only
    assert logprobs.grad is not None and torch.isfinite(logprobs.grad).all()


def test_a_correction_needs_pi_old_from_the_training_forward() -> None:
    from pydantic import ValidationError

    from rlhf.config import PPOConfig

    with pytest.raises(ValidationError, match="logprobs to auto or recompute"):
        PPOConfig(rollout={"correction": "token_tis", "logprobs": "generation"})
    cfg = PPOConfig(rollout={"correction": "token_tis"})
    assert cfg.recomputes_logprobs("fp32")  # auto recomputes under a correction, for vLLM and for bf16
    assert PPOConfig(rollout={"engine": "vllm"}).recomputes_logprobs("fp32")
    assert not PPOConfig().recomputes_logprobs("fp32")


def test_the_trainer_measures_the_mismatch_and_weighs_the_update(tiny_models, dist) -> None:
    """A rollout engine whose log-probs are log 2 below the training forward's on each answer's first token: rho is
    2 there and 1 elsewhere. Each correction with max 1.5 weighs the trained tokens as its formula says (token_tis:
    1.5 on the first token; token_mask: 0 there; seq_tis: the answer's product 2 capped at 1.5 on every token;
    seq_mask: token_tis where the geometric mean 2^(1/length) is inside [0.5, 1.5], else 0), the iteration logs the
    mismatch, and each weighted update moves the actor differently from an unweighted one."""
    from rlhf.config import load_params
    from rlhf.data.batching import collate_prompts
    from rlhf.models.tokenizer import encode_prompt
    from rlhf.rl.models import RLModels
    from rlhf.rl.trainer import RLTrainer
    from rlhf.training.runtime import full_state_dict
    from tests.conftest import write_params

    def trainer(correction: str) -> RLTrainer:
        params = load_params(write_params(tiny_models / f"corr_{correction}.yaml", {"ppo": {
            "ema_beta": 0.0, "rollout_batch_size": 4, "micro_batch_size": 4,
            "rollout": {"logprobs": "recompute", "correction": correction, "correction_max": 1.5}}}))
        models = RLModels(params.ppo, params.engine, dist, tiny_models / "models/sft", tiny_models / "models/reward")
        generate = models.rollout.generate

        def shifted(ids, mask, sampling):
            rollout = generate(ids, mask, sampling)
            rollout.logprobs[:, 0] -= math.log(2)  # the engine's pi_rollout of the first token: half the forward's
            return rollout

        models.rollout.generate = shifted
        return RLTrainer(models, params.ppo, params.rewards)

    runs = {}
    for correction in ("none", "token_tis", "token_mask", "seq_tis", "seq_mask"):
        t = trainer(correction)
        ids = [encode_prompt(t.tok, [{"role": "user", "content": f"Sort ascending: {i} 3 1"}]) for i in range(4)]
        torch.manual_seed(0)
        exp, info = t.make_experience([collate_prompts(max(map(len, ids)), t.tok.pad_token_id)(ids)])
        assert info["mismatch_ratio_max"] == pytest.approx(2.0, rel=1e-4)  # fp32 engine: 1 elsewhere, to rounding
        assert info["mismatch_abs_max"] == pytest.approx(math.log(2), rel=1e-4)
        if correction == "none":
            assert exp.is_weights is None and info["is_weight_mean"] == 1.0
        else:
            mask = exp.action_mask
            kept = ((2.0 ** (1 / mask.sum(-1)) <= 1.5) if correction == "seq_mask" else torch.ones(4)).float()
            first, rest = {"token_tis": (1.5, 1.0), "token_mask": (0.0, 1.0), "seq_tis": (1.5, 1.5),
                           "seq_mask": (1.5, 1.0)}[correction]
            want = torch.cat([torch.full((4, 1), first), torch.full((4, mask.shape[1] - 1), rest)], 1) * kept[:, None]
            assert_close(exp.is_weights * mask, want * mask, atol=1e-4, rtol=0)
        before = {k: v.clone() for k, v in full_state_dict(t.models.actor.module, 0, True).items()}
        t.train_rlhf(exp)
        after = full_state_dict(t.models.actor.module, 0, True)
        runs[correction] = {k: after[k] - before[k] for k in before}
        assert any((d != 0).any() for d in runs[correction].values())
    for correction in ("token_tis", "token_mask", "seq_tis", "seq_mask"):
        assert any(not torch.allclose(runs["none"][k], runs[correction][k]) for k in runs["none"]), correction


def test_vllm_with_truncated_sampling_refuses_a_correction() -> None:
    """vLLM's processed log-probs are renormalised over the kept tokens (trl#6789): the ratio would be biased."""
    from pydantic import ValidationError

    from rlhf.config import PPOConfig

    with pytest.raises(ValidationError, match="trl#6789"):
        PPOConfig(rollout={"engine": "vllm", "correction": "token_tis"}, sampling={"top_p": 0.9})
    PPOConfig(rollout={"engine": "vllm"}, sampling={"top_p": 0.9})  # measured only: allowed
    PPOConfig(rollout={"correction": "token_tis"}, sampling={"top_k": 5})  # our engine: whole-vocabulary log-probs
