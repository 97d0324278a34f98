"""Multi-turn RL with a tool, as a user runs it: the shipped calculator task (products a small model cannot work out
but can copy from a `calculate` tool) in the user's own DVC project, their "pretrained" tiny Llama whose tokenizer
has pad = eos, SFT on the task's two-turn demonstrations (some of which answer with a guess and skip the tool), and
GRPO over episodes of up to three turns (`ppo.environment`) with the environment's reward as the only reward. The
held-out reward and the share of episodes that call the tool must rise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import commit, copy_project, run_ok, write_params

ENV = "rlhf.rollout.environments.calculator:Calculator"


def tool_repo(repo: Path, ppo: dict | None = None, n: int = 1500) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.models.tokenizer import train_tokenizer
    from rlhf.rollout.environments.calculator import make_rows

    copy_project(repo)
    rows = make_rows(n, seed=1, high=49, instructions=False)  # short prompts: a fast test
    for name, items in rows.items():
        (repo / "data/sources" / name).write_text("".join(json.dumps(r) + "\n" for r in items))
    texts = [m["content"] for r in rows["sft.jsonl"] for m in r["messages"]] + ["<|tool|>"] * 50
    tok = train_tokenizer(texts, 600, split_digits=True)  # as Llama's and Qwen's
    tok.pad_token = None  # load_tokenizer makes it eos
    tok.save_pretrained(repo / "pretrained")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(repo / "pretrained")
    steps = {"sft.jsonl": ["sft"], "prompts.jsonl": ["ppo"]}
    write_params(repo / "params.yaml", {
        "data": {"sources": [{"path": f"data/sources/{n}", "steps": s} for n, s in steps.items()],
                 "max_prompt_tokens": 64, "max_seq_tokens": 160},
        "model": {"name_or_path": "pretrained"},
        "reward_model": {"max_position_embeddings": 512},  # unused (no pairs, model_weight 0), still checked
        "sft": {"micro_batch_size": 8, "max_steps": 1500, "epochs": 100, "learning_rate": 0.003},
        "rewards": {"model_weight": 0.0, "functions": []},
        "ppo": {"algorithm": "grpo", "rollout_batch_size": 16, "answers_per_prompt": 4, "micro_batch_size": 16,
                "iterations": 16, "eval_prompts": 64, "ema_beta": 0.0, "optimizer": {"actor_learning_rate": 0.0002},
                "sampling": {"max_answer_tokens": 96},
                "environment": {"name": ENV, "options": {"describe_tools": False}, "max_turns": 3,
                                "max_turn_tokens": 48}, **(ppo or {})},
        "evaluate": {"num_prompts": 64, "scorers": []},  # the environment's reward is the measure
    })
    run_ok("git", "init", "-q", cwd=repo)
    run_ok("dvc", "init", "-q", cwd=repo)
    commit(repo, "calculator task")
    return repo


@pytest.mark.slow
def test_grpo_over_several_turns_raises_the_tool_tasks_reward(tmp_path: Path) -> None:
    repo = tool_repo(tmp_path / "repo")
    out = run_ok("dvc", "repro", cwd=repo)
    print(out[-3000:])
    metrics = json.loads((repo / "metrics/ppo.json").read_text())
    print({k: v for k, v in metrics.items() if k.split("_")[0] in ("env", "turns", "tool", "reward")})
    assert metrics["env_ppo"] >= metrics["env_sft"] + 0.2, metrics  # 0.594 -> 0.906 on the dev machine
    assert metrics["tool_calls_ppo"] >= metrics["tool_calls_sft"] + 0.15, metrics  # learnt to reach for the tool
    assert metrics["turns_ppo"] > 1.0 and metrics["tool_valid_ppo"] > 0.5, metrics
    curve = (repo / "dvclive/ppo/plots/metrics/ppo/term/env.tsv").read_text().splitlines()
    assert len(curve) == 1 + 16  # the environment's reward logged each iteration, with turns and tool calls
    assert (repo / "dvclive/ppo/plots/metrics/ppo/tool_calls.tsv").is_file()

    # evaluate plays the same episodes with each actor: the environment's reward is the quality
    evaluate = json.loads((repo / "metrics/evaluate.json").read_text())
    print(evaluate)
    assert evaluate["grpo"]["env"] >= evaluate["sft"]["env"] + 0.1, evaluate  # 0.562 -> 0.875
    assert evaluate["grpo"]["tool_calls"] > evaluate["sft"]["tool_calls"] and evaluate["sft"]["kl_to_sft"] == 0
    assert evaluate["grpo"]["kl_to_sft"] > 0 and "gold_reward" not in evaluate["sft"]
    assert "turns" in out and "tool calls" in out

    from transformers import AutoModelForCausalLM

    sft = AutoModelForCausalLM.from_pretrained(repo / "models/sft").state_dict()
    actor = AutoModelForCausalLM.from_pretrained(repo / "models/ppo/actor").state_dict()
    assert sum(not torch.equal(sft[k], actor[k]) for k in sft) >= len(sft) // 2
