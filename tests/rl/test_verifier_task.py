"""Verifier-only RLHF on a user's own task, through `dvc repro` as they would run it: their data (TRL formats, an
extra `answer` column on the PPO prompts, demonstrations but no preference pair), their "pretrained" model whose
tokenizer has pad = eos, and a verifier of their own in rewards/ as the only reward (`rewards.model_weight: 0`:
prepare skips step 2, the reward stage writes its placeholder, the critic starts from the SFT actor with a fresh
value head). PPO must raise the verifier's held-out mean; evaluate reports it as a scorer; editing the verifier
makes DVC rerun ppo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import commit, copy_project, run_ok, write_params
from tests.pipeline.test_own_task import _pretrained_folder, _rows

VERIFIER = '''
def reversed_words(prompts, completions, answer, **columns):
    """0.5 for the "Reversed:" form, and 0.5 for the answer's first word first (after that prefix)."""
    out = []
    for completion, want in zip(completions, answer):
        words = completion.split()
        prefixed = words[:1] == ["Reversed:"]
        body = words[1:] if prefixed else words
        out.append(0.5 * prefixed + 0.5 * (body[:1] == want.split()[:1]))
    return out
'''
VERIFIER_FN = {"function": "rewards.reverse:reversed_words", "name": "reversed"}


def verifier_repo(repo: Path, heads: int = 2, ppo: dict | None = None, evaluate: dict | None = None,
                  sft_steps: int = 400) -> Path:
    """A DVC project of the user's own: their data (TRL formats, no preference pair), their "pretrained" model
    (`heads` attention heads), their verifier as the only reward; git and dvc initialised, committed."""
    copy_project(repo)
    rows = _rows()
    for r in rows["prompts.jsonl"]:  # the reference answer, for the verifier only
        r["answer"] = " ".join(reversed(r["prompt"].removeprefix("Reverse the words: ").split()))
    del rows["pairs.jsonl"]  # no preference data at all: nothing for a reward model to learn from
    for name, items in rows.items():
        (repo / "data/sources" / name).write_text("".join(json.dumps(r) + "\n" for r in items))
    (repo / "rewards/reverse.py").write_text(VERIFIER)
    texts = [r["prompt"] for r in rows["prompts.jsonl"]] + [r["completion"] for r in rows["sft.jsonl"]]
    _pretrained_folder(repo / "pretrained", texts, heads)
    steps = {"sft.jsonl": ["sft"], "prompts.jsonl": ["ppo"]}
    write_params(repo / "params.yaml", {
        "data": {"sources": [{"path": f"data/sources/{n}", "steps": s} for n, s in steps.items()]},
        "model": {"name_or_path": "pretrained"},
        "sft": {"micro_batch_size": 8, "max_steps": sft_steps, "epochs": 100},
        "rewards": {"model_weight": 0.0, "functions": [VERIFIER_FN]},
        "ppo": {"rollout_batch_size": 16, "micro_batch_size": 8, "iterations": 20, "eval_prompts": 12,
                "answers_per_prompt": 4, "optimizer": {"actor_learning_rate": 0.001}, **(ppo or {})},
        "evaluate": {"scorers": [VERIFIER_FN], **(evaluate or {})},
    })
    run_ok("git", "init", "-q", cwd=repo)
    run_ok("dvc", "init", "-q", cwd=repo)
    commit(repo, "own task, own verifier")
    return repo


@pytest.mark.slow
def test_a_verifier_alone_raises_its_own_score_through_dvc_repro(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    repo = verifier_repo(tmp_path / "repo")
    out = run_ok("dvc", "repro", cwd=repo)
    assert "Running stage 'evaluate'" in out, out
    assert "no reward model to train (no preference pairs, rewards.model_weight 0): placeholder" in out, out
    from rlhf.pipeline.outputs import is_placeholder

    assert is_placeholder(repo / "models/reward") and not (repo / "models/reward/config.json").exists()
    assert json.loads((repo / "metrics/prepare.json").read_text())["skipped_steps"] == ["reward"]

    metrics = json.loads((repo / "metrics/ppo.json").read_text())
    print({k: v for k, v in metrics.items() if "reward" in k or "reversed" in k})
    assert "rm_score_sft" not in metrics  # model_weight 0: the reward model is not read
    assert metrics["reversed_ppo"] >= metrics["reversed_sft"] + 0.1, metrics
    curve = (repo / "dvclive/ppo/plots/metrics/ppo/term/reversed.tsv").read_text().splitlines()
    assert len(curve) == 1 + 20  # the verifier's mean logged each iteration
    evaluate = json.loads((repo / "metrics/evaluate.json").read_text())
    assert evaluate["ppo"]["reversed"] > evaluate["sft"]["reversed"], evaluate
    assert "gold_reward" not in evaluate["sft"]  # not the builtin task: no builtin gold scorer
    assert "rm_reward" not in evaluate["sft"]  # and no reward model to score with

    sft = AutoModelForCausalLM.from_pretrained(repo / "models/sft").state_dict()
    actor = AutoModelForCausalLM.from_pretrained(repo / "models/ppo/actor").state_dict()
    assert sum(not torch.equal(sft[k], actor[k]) for k in sft) >= len(sft) // 2
    critic = AutoModelForSequenceClassification.from_pretrained(repo / "models/ppo/critic")
    assert critic.config.num_labels == 1

    # The verifier is code DVC tracks: editing it makes ppo (and evaluate) stale, not prepare or sft.
    (repo / "rewards/reverse.py").write_text(VERIFIER.replace("0.5 * prefixed", "0.4 * prefixed"))
    status = json.loads(run_ok("dvc", "status", "--json", cwd=repo))
    assert {"ppo", "evaluate"} <= set(status) and not {"prepare", "sft"} & set(status), status

    # The critic-free family on the same data and verifier: `dvc exp run` reruns only check, ppo and evaluate, and
    # GRPO (no critic built or saved) raises the verifier's held-out mean too.
    commit(repo, "verifier edited")
    out = run_ok("dvc", "exp", "run", "-n", "grpo", "-S", "ppo.algorithm=grpo", cwd=repo)
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"check", "ppo", "evaluate"}, out
    metrics = json.loads((repo / "metrics/ppo.json").read_text())
    print({k: v for k, v in metrics.items() if "reversed" in k})
    assert metrics["algorithm"] == "grpo" and metrics["reversed_ppo"] >= metrics["reversed_sft"] + 0.1, metrics
    assert not (repo / "models/ppo/critic").exists()
    evaluate = json.loads((repo / "metrics/evaluate.json").read_text())
    assert evaluate["grpo"]["reversed"] > evaluate["sft"]["reversed"], evaluate


COUNTING = VERIFIER + '''

def counted(prompts, completions, answer, **columns):
    """reversed_words, each call's sample count appended to $CALLS_FILE (the test reads how often it was asked)."""
    import os

    with open(os.environ["CALLS_FILE"], "a") as out:
        out.write(f"{len(completions)}\\n")
    return reversed_words(prompts, completions, answer)
'''


@pytest.mark.slow
def test_the_reward_cache_spares_a_rerun_every_call(tmp_path: Path) -> None:
    """rewards.cache: true through `dvc repro`, then a `dvc exp run` whose change leaves the rollouts as they were
    (the EMA's beta): the experiment asks the verifier nothing, every score comes from reward_cache/ (a DVC output),
    and its rewards are the first run's."""
    counted_fn = {"function": "rewards.reverse:counted", "name": "reversed"}
    repo = verifier_repo(tmp_path / "repo", ppo={"iterations": 3, "eval_prompts": 8}, sft_steps=40)
    (repo / "rewards/reverse.py").write_text(COUNTING)
    write_params(repo / "params.yaml", yaml.safe_load((repo / "params.yaml").read_text()),
                 {"rewards": {"functions": [counted_fn], "cache": True}, "evaluate": {"scorers": [counted_fn]}})
    commit(repo, "counted verifier, cache on")
    calls = tmp_path / "calls.txt"
    run_ok("dvc", "repro", "ppo", cwd=repo, env={"CALLS_FILE": str(calls)})
    first = json.loads((repo / "metrics/ppo.json").read_text())
    asked = sum(int(n) for n in calls.read_text().split())
    assert asked >= 3 * 16 * 4 and first["reward_cache_hit_rate"] < 0.5, first
    cached = list((repo / "reward_cache").glob("reversed-*.rank0.jsonl"))
    assert len(cached) == 1 and len(cached[0].read_text().splitlines()) > 0
    assert "path: reward_cache" in (repo / "dvc.lock").read_text()  # an output DVC caches and shares
    commit(repo, "first run")

    calls.write_text("")
    run_ok("dvc", "exp", "run", "ppo", "-S", "ppo.ema_beta=0.5", cwd=repo, env={"CALLS_FILE": str(calls)})
    again = json.loads((repo / "metrics/ppo.json").read_text())
    assert calls.read_text().split() == [], "the verifier was asked again"
    assert again["reward_cache_hit_rate"] == 1.0, again
    assert (again["reward_sft"], again["reward_ppo"]) == (first["reward_sft"], first["reward_ppo"])
