"""A new user's own task, through `dvc repro` as they would run it: three local files in TRL's formats under
data/sources/ (each naming its step, several answers and pairs per prompt), a "pretrained" model folder of their own
whose tokenizer has no pad token (so pad = eos, as SmolLM2's), SFT -> reward -> PPO. Every step must train on real
rows, the eos must count, and editing one row of their data must make DVC rerun prepare."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import commit, copy_project, run_ok, write_params

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "rock", "leaf"]


def _rows() -> dict[str, list[dict[str, Any]]]:
    """Reverse a list of words: 60 prompts; 2 demonstrations each, 3 pairs each (chosen = reversed, rejected = the
    input echoed or shuffled), the prompts alone for PPO."""
    import random

    rng = random.Random(0)
    prompts = [" ".join(rng.sample(WORDS, rng.randint(2, 4))) for _ in range(60)]
    prompts = list(dict.fromkeys(prompts))
    ask = lambda p: f"Reverse the words: {p}"  # noqa: E731
    rev = lambda p: " ".join(reversed(p.split()))  # noqa: E731
    return {
        "sft.jsonl": [{"prompt": ask(p), "completion": form.format(rev(p))} for p in prompts
                      for form in ("{}", "Reversed: {}")],
        "pairs.jsonl": [{"prompt": ask(p), "chosen": rev(p), "rejected": bad} for p in prompts
                        for bad in (p, " ".join(rng.sample(p.split(), len(p.split()))) + " " + p.split()[0], "no")],
        "prompts.jsonl": [{"prompt": ask(p)} for p in prompts],
    }


def _pretrained_folder(path: Path, texts: list[str], heads: int = 2) -> None:
    """A tiny Llama with a tokenizer that has no pad token: what a user brings from elsewhere. heads=1 gives head
    size 32, which vLLM's CPU attention runs (16 it does not)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.models.tokenizer import train_tokenizer

    tok = train_tokenizer(texts, 300)
    tok.pad_token = None
    tok.save_pretrained(path)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=128,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)


@pytest.mark.slow
def test_own_task_through_dvc_repro_with_pad_equal_to_eos(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    repo = copy_project(tmp_path / "repo")
    rows = _rows()
    for name, items in rows.items():
        (repo / "data/sources").mkdir(parents=True, exist_ok=True)
        (repo / "data/sources" / name).write_text("".join(json.dumps(r) + "\n" for r in items))
    texts = [r["prompt"] for r in rows["prompts.jsonl"]] + [r["completion"] for r in rows["sft.jsonl"]]
    _pretrained_folder(repo / "pretrained", texts)
    steps = {"sft.jsonl": ["sft"], "pairs.jsonl": ["reward"], "prompts.jsonl": ["ppo"]}
    write_params(repo / "params.yaml", {
        "data": {"sources": [{"path": f"data/sources/{n}", "steps": s} for n, s in steps.items()]},
        "model": {"name_or_path": "pretrained"},
        "sft": {"micro_batch_size": 8, "max_steps": 8, "epochs": 3},
        "reward": {"micro_batch_size": 8, "max_steps": 8, "epochs": 3},
        "ppo": {"rollout_batch_size": 8, "micro_batch_size": 4, "iterations": 2, "eval_prompts": 4},
    })
    run_ok("git", "init", "-q", cwd=repo)
    run_ok("dvc", "init", "-q", cwd=repo)
    commit(repo, "own task")
    out = run_ok("dvc", "repro", "ppo", cwd=repo)
    assert all(f"Running stage '{s}'" in out for s in ("prepare", "sft", "reward", "ppo")), out

    tok = AutoTokenizer.from_pretrained(repo / "models/sft")
    assert tok.pad_token_id == tok.eos_token_id  # the user's tokenizer had no pad: pad = eos
    stats = json.loads((repo / "metrics/prepare.json").read_text())
    n_prompts = len(rows["prompts.jsonl"])
    # Every demonstration and pair kept (several per prompt), each in its own step's splits.
    assert stats["splits"]["sft_train"] + stats["splits"]["sft_eval"] == 2 * n_prompts
    assert stats["splits"]["reward_train"] + stats["splits"]["reward_eval"] == 3 * n_prompts
    assert stats["splits"]["ppo_train"] + stats["splits"]["ppo_eval"] == n_prompts
    sft = json.loads((repo / "metrics/sft.json").read_text())
    reward = json.loads((repo / "metrics/reward.json").read_text())
    assert sft["steps"] == 8 and reward.get("steps", 8) == 8
    # Each step moved its model, and the outputs load with the Auto classes.
    base = AutoModelForCausalLM.from_pretrained(repo / "pretrained").state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(repo / "models/sft").state_dict()
    assert sum(not torch.equal(base[k], tuned[k]) for k in base) >= len(base) // 2
    actor = AutoModelForCausalLM.from_pretrained(repo / "models/ppo/actor").state_dict()
    assert sum(not torch.equal(tuned[k], actor[k]) for k in tuned) >= len(tuned) // 2
    rm = AutoModelForSequenceClassification.from_pretrained(repo / "models/reward")
    assert rm.config.num_labels == 1
    curves = (repo / "dvclive/ppo/plots/metrics/ppo/response_length.tsv").read_text().splitlines()
    assert len(curves) == 3  # header + 2 iterations

    # One row of the user's data changes: DVC sees it, prepare (and what follows) is stale.
    assert json.loads(run_ok("dvc", "status", "ppo", "--with-deps", "--json", cwd=repo)) == {}
    sft_file = repo / "data/sources/sft.jsonl"
    lines = sft_file.read_text().splitlines()
    edited = json.loads(lines[3])
    edited["completion"] += " indeed"
    lines[3] = json.dumps(edited)
    sft_file.write_text("\n".join(lines) + "\n")
    status = json.loads(run_ok("dvc", "status", "ppo", "--with-deps", "--json", cwd=repo))
    assert "prepare" in status and {"changed deps": {"data/sources": "modified"}} in status["prepare"], status
