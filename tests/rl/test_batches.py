"""Step 3 on every batch shape: an iteration's statistics and its optimizer step do not depend on how its batch is
split into generation batches, micro batches or ranks; dropout does not turn the first ratio into noise; the
learning-rate schedule counts the steps taken (ptx included)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from tests.conftest import ROOT, cli_env, run_cli, write_params
from tests.rl.two_ranks import scored_experience, step_gradients

SCORED = ("sequences", "attention_mask", "action_mask", "logprobs", "ref_logprobs", "values", "scores", "kl")


def _trainer(trained: Path, dist, name: str, ppo: dict, sft: Path | None = None):
    from rlhf.config import load_params
    from rlhf.rl.models import RLModels
    from rlhf.rl.trainer import RLTrainer

    params = load_params(write_params(trained / name, {"ppo": {"ema_beta": 0.0, **ppo}}))
    engine = RLModels(params.ppo, params.engine, dist, sft or trained / "models/sft", trained / "models/reward")
    return RLTrainer(engine, params.ppo, params.rewards)


def _prompts(tok, n: int) -> dict[str, torch.Tensor]:
    from rlhf.data.batching import collate_prompts
    from rlhf.models.tokenizer import encode_prompt

    ids = [encode_prompt(tok, [{"role": "user", "content": f"Sort ascending: {i} {i * 7 % 23} 3 {i % 5}"}])
           for i in range(n)]
    return collate_prompts(max(map(len, ids)), tok.pad_token_id)(ids)


@pytest.fixture(scope="module")
def scored(trained: Path, dist) -> dict[str, torch.Tensor]:
    """16 real rollouts of the tiny SFT actor (4 prompts x 4 answers), scored by the reward model: phases 1-2."""
    trainer = _trainer(trained, dist, "scored.yaml", {"rollout_batch_size": 4, "answers_per_prompt": 4})
    torch.manual_seed(0)
    exp, _ = trainer._rollout_and_score(_prompts(trainer.tok, 4))
    # The tiny actor rarely stops within 8 tokens: end the answers after 2..8 tokens, as an eos there would (the
    # rest padding), so that rows differ in length and token counts matter
    b, r = exp.action_mask.shape
    lengths = torch.tensor([2 + (i * 5) % 7 for i in range(b)])
    real = (torch.arange(r)[None, :] < lengths[:, None]).float()
    p = exp.sequences.shape[1] - r
    exp.action_mask = exp.action_mask * real
    exp.attention_mask = torch.cat([exp.attention_mask[:, :p], exp.action_mask.long()], dim=1)
    exp.sequences[:, p:] = torch.where(real.bool(), exp.sequences[:, p:], trainer.tok.pad_token_id)
    for name in ("logprobs", "ref_logprobs", "values", "kl"):
        setattr(exp, name, getattr(exp, name) * exp.action_mask)
    return {name: getattr(exp, name) for name in SCORED}


def _feed(trainer, parts: list) -> None:
    """Make the trainer's phases 1-2 return these scored experiences, one per generation batch, in turn."""
    queue = list(parts)
    trainer._rollout_and_score = lambda batch: (queue.pop(0), {"generate_s": 0.0, "score_s": 0.0})


@pytest.mark.parametrize("algorithm", ["ppo", "reinforce_pp"])
def test_advantages_are_those_of_the_whole_iteration_however_it_is_generated(trained: Path, dist, scored: dict,
                                                                             algorithm: str) -> None:
    """One iteration of 16 rollouts as 1 x 16 or 2 x 8 generation batches: the same running reward statistics,
    whitening and advantages (they used to be taken per generation batch: differences up to 1.13)."""
    ppo = {"algorithm": algorithm, "rollout_batch_size": 8, "answers_per_prompt": 2, "micro_batch_size": 4}
    whole = _trainer(trained, dist, f"gen1_{algorithm}.yaml", ppo)
    _feed(whole, [scored_experience(scored, slice(0, 16))])
    one, _ = whole.make_experience([{}])
    split = _trainer(trained, dist, f"gen2_{algorithm}.yaml", {**ppo, "rollout_batch_size": 4, "generation_batches": 2})
    _feed(split, [scored_experience(scored, slice(0, 8)), scored_experience(scored, slice(8, 16))])
    two, _ = split.make_experience([{}, {}])
    assert one.advantages.abs().max() > 0.1
    for name in ("advantages", "returns", "rewards"):
        assert_close(getattr(two, name), getattr(one, name), rtol=0, atol=1e-6)
    assert split.reward_moments.state_dict() == whole.reward_moments.state_dict()


@pytest.mark.parametrize(
    "algorithm,aggregation",
    [("ppo", "token_mean"), ("grpo", "seq_mean_token_mean"), ("rloo", "seq_mean_token_sum_norm")],
)
def test_one_mini_batch_as_1x16_or_4x4_takes_the_same_step(trained: Path, dist, scored: dict, algorithm: str,
                                                           aggregation: str) -> None:
    """A mini batch of 16 rollouts as one micro batch of 16 or four of 4: the gradients accumulated for its one
    optimizer step are the same (each loss normalised over the mini batch's tokens or answers), and so are the
    weights after it. Before, each micro batch of 4 was its own step on its own mean."""
    from rlhf.training.runtime import full_state_dict

    ppo = {"algorithm": algorithm, "loss": {"aggregation": aggregation, "entropy_coef": 0.01}, "rollout_batch_size": 4,
           "answers_per_prompt": 4, "mini_batch_size": 16, "kl": {"penalty": "loss"},
           "optimizer": {"actor_learning_rate": 1e-3}}
    got = {}
    for micro in (16, 4):
        trainer = _trainer(trained, dist, f"mini_{algorithm}_{micro}.yaml", {**ppo, "micro_batch_size": micro})
        _feed(trainer, [scored_experience(scored, slice(0, 16))])
        exp, _ = trainer.make_experience([{}])
        grads = step_gradients(trainer, exp)
        weights = full_state_dict(trainer.models.actor.module, 0, is_main=True)
        got[micro] = grads, weights
    (grads16, w16), (grads4, w4) = got[16], got[4]
    assert grads16.keys() == grads4.keys() == ({"actor", "critic"} if algorithm == "ppo" else {"actor"})
    for model, grads in grads16.items():
        scale = max(g.abs().max().item() for g in grads.values())
        assert scale > 0
        for name, g in grads.items():
            assert_close(grads4[model][name], g, rtol=1e-5, atol=1e-6 * scale, msg=f"{model} {name}")
    # Adam's first step moves each weight by about lr x sign(gradient): equal gradients, equal weights, except
    # where a gradient is at float-rounding level and its sign may differ
    moved = [(w4[k] - w16[k]).abs().max().item() for k in w16]
    assert sorted(moved)[len(moved) // 2] <= 1e-6


def test_two_ranks_x_2x4_equal_one_rank_x_4x4(trained: Path, dist, scored: dict, tmp_path: Path) -> None:
    """The same 16 rollouts as 2 ranks x 2 micro batches of 4 (torchrun, gloo) and as 1 rank x 4 x 4: the same
    advantages (whitening and running reward statistics over both ranks) and the same reduced gradients for the
    step (each rank's loss normalised by the token count of both ranks)."""
    ppo = {"rollout_batch_size": 16, "micro_batch_size": 4, "mini_batch_size": 16}
    single = _trainer(trained, dist, "ranks1.yaml", ppo)
    _feed(single, [scored_experience(scored, slice(0, 16))])
    exp, _ = single.make_experience([{}])
    want = step_gradients(single, exp)

    write_params(trained / "ranks2.yaml", {"ppo": {"ema_beta": 0.0, **ppo, "rollout_batch_size": 8,
                                                    "mini_batch_size": 8}})
    torch.save(scored, tmp_path / "scored.pt")
    env = cli_env()
    env.pop("RLHF_SINGLE_PROCESS", None)
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()),
         str(ROOT / "tests/rl/two_ranks.py"), str(trained / "ranks2.yaml"), str(trained / "models/sft"),
         str(trained / "models/reward"), str(tmp_path / "scored.pt"), str(tmp_path / "out.pt")],
        cwd=trained, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert_close(got["advantages"], exp.advantages, rtol=0, atol=1e-6)
    for model, grads in want.items():
        scale = max(g.abs().max().item() for g in grads.values())
        for name, g in grads.items():
            assert_close(got["grads"][model][name], g, rtol=1e-5, atol=1e-6 * scale, msg=f"{model} {name}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_dropout(trained: Path, tmp_path: Path, p: float) -> Path:
    """A copy of the SFT actor whose config has attention dropout p (as a pretrained GPT-2, OPT or Phi has), as a
    folder from elsewhere (no manifest)."""
    from transformers import AutoConfig

    dst = tmp_path / "sft_dropout"
    shutil.copytree(trained / "models/sft", dst, ignore=shutil.ignore_patterns("COMPLETE.json", "manifest*"))
    cfg = AutoConfig.from_pretrained(dst)
    cfg.attention_dropout = p
    cfg.save_pretrained(dst)
    return dst


@pytest.mark.parametrize("disable", [True, False])
def test_first_step_ratio_is_exactly_one_with_dropout_off(trained: Path, dist, tmp_path: Path, disable: bool) -> None:
    """With attention dropout 0.1 in the model, pi_old (eval mode) and the update's pi (train mode) are the same
    function only when dropout is off (ppo.disable_dropout, the default): the first step's ratio is then exactly 1;
    with it kept, it is noise."""
    sft = _with_dropout(trained, tmp_path, 0.1)
    trainer = _trainer(trained, dist, f"dropout_{disable}.yaml", {"disable_dropout": disable,
                                                                  "rollout": {"logprobs": "recompute"}}, sft=sft)
    torch.manual_seed(0)
    exp, _ = trainer.generate_experience(_prompts(trainer.tok, 8))
    _, _, stats = trainer.train_rlhf(exp)
    if disable:
        assert stats["ratio"] == 1.0 and stats["approx_kl"] == 0.0 and stats["clip_fraction"] == 0.0
    else:
        assert abs(stats["ratio"] - 1.0) > 1e-4 or stats["approx_kl"] > 1e-6


def test_dpo_first_step_loss_is_log_2_with_dropout_off(trained: Path, tmp_path: Path) -> None:
    """DPO from an SFT model with attention dropout 0.1: the policy (train mode) starts equal to the reference
    (scored once in eval mode), so the first step's loss is log 2 exactly (sigmoid(0) = 1/2) with dropout off."""
    import math

    sft = _with_dropout(trained, tmp_path, 0.1)
    write_params(trained / "dpo_dropout.yaml", {"dpo": {"max_steps": 1, "log_every": 1, "sft_coef": 0.0,
                                                         "micro_batch_size": 8}})
    live = tmp_path / "live"
    run_cli("dpo", "--params", "dpo_dropout.yaml", "--sft", str(sft), "--out", str(tmp_path / "dpo"), "--metrics",
            str(tmp_path / "dpo.json"), "--live", str(live), "--checkpoints", str(tmp_path / "ckpt"), cwd=trained)
    rows = (live / "plots/metrics/train/loss.tsv").read_text().splitlines()
    first = float(rows[1].split("\t")[-1])
    assert abs(first - math.log(2)) < 1e-6, rows[:3]


def test_cosine_schedule_with_ptx_ends_at_its_minimum_and_never_rises(trained: Path, tmp_path: Path) -> None:
    """With ppo.loss.ptx_coef > 0 the schedule used to count each micro batch once while the optimizer stepped twice
    (the RL step and the ptx step): cosine reached 0 halfway and climbed back. The ptx loss now joins the RL step,
    and the schedule is as long as the steps taken."""
    write_params(trained / "ptx_cosine.yaml", {"ppo": {"loss": {"ptx_coef": 0.5}, "iterations": 4, "eval_prompts": 0,
                                                        "optimizer": {"lr_schedule": "cosine", "warmup_ratio": 0.25}}})
    live = tmp_path / "live"
    run_cli("ppo", "--params", "ptx_cosine.yaml", "--out", str(tmp_path / "ppo"), "--metrics",
            str(tmp_path / "ppo.json"), "--live", str(live), "--checkpoints", str(tmp_path / "ckpt"), cwd=trained)
    curve = (live / "plots/metrics/ppo/actor_lr.tsv").read_text().splitlines()[1:]
    lrs = [float(row.split("\t")[-1]) for row in curve]
    assert len(lrs) == 4 and lrs[-1] == 0.0, lrs
    peak = lrs.index(max(lrs))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :])), lrs  # after warmup, never up again
    assert (live / "plots/metrics/ppo/ptx_loss.tsv").is_file()
