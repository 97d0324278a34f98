"""What DVC's cache saves: an experiment, a teammate's pull and a no-op repro, each timed against retraining.

    PYTHONPATH=. python bench/dvc_savings.py --size small        # prints one JSON line at the end

In a fresh git + DVC repo (the project's rlhf/, stages/, dvc.yaml and default remote, params.yaml with --size's
overrides) it times, as a user types them:
1. the full pipeline, stage by stage (`dvc repro prepare`, `... sft`, `... reward`, then `dvc repro` for ppo and
   evaluate): full = their sum; retraining SFT + reward = those two;
2. a no-op `dvc repro` right after;
3. `dvc exp run -S ppo.kl.coef=0.05` (reruns ppo and evaluate, reuses the cached SFT and reward models);
4. `dvc push`, then models/sft, models/reward and .dvc/cache deleted (a teammate's fresh clone), then
   `dvc pull sft reward`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # overrides of params.yaml
    # tests/conftest.py's TINY: seconds per stage
    "tiny": {
        "task": {"num_rows": 600}, "tokenizer": {"vocab_size": 300},
        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64},
        "reward_model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
        "sft": {"epochs": 1, "max_steps": 6, "micro_batch_size": 8, "eval_batch_size": 32},
        "reward": {"epochs": 1, "max_steps": 6, "micro_batch_size": 8, "eval_batch_size": 32},
        "ppo": {"iterations": 2, "rollout_batch_size": 8, "micro_batch_size": 4, "sampling": {"max_answer_tokens": 8},
                "eval_prompts": 8},
        "evaluate": {"num_prompts": 12, "batch_size": 8, "sampling": {"max_answer_tokens": 8}, "num_samples": 3},
    },
    # the shipped models and batch sizes, fewer steps: about a minute per training stage on 2 cores
    "small": {
        "task": {"num_rows": 6000},
        "sft": {"epochs": 1, "max_steps": 80},
        "reward": {"epochs": 1, "max_steps": 60},
        "ppo": {"iterations": 10, "eval_prompts": 64},
        "evaluate": {"num_prompts": 100},
    },
}


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small", choices=SIZES)
    args = ap.parse_args()
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    times: dict[str, float] = {}
    load = [os.getloadavg()]

    with tempfile.TemporaryDirectory(prefix="dvc-bench-") as tmp:
        repo = Path(tmp) / "repo"
        repo.mkdir()
        env["PYTHONPATH"] = str(repo)

        def run(name: str | None, *cmd: str) -> None:
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
            if name:
                times[name] = time.perf_counter() - t0
                print(f"[dvc] {name}: {times[name]:.1f} s", flush=True)

        for name in ("rlhf", "stages", "data/sources", "rewards"):  # data/sources, rewards: deps of prepare, ppo
            shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
        params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), SIZES[args.size])
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        run(None, "git", "init", "-q")
        run(None, "dvc", "init", "-q")
        shutil.copy(ROOT / ".dvc/config", repo / ".dvc/config")  # the default remote: ../rlhf-dvc-storage
        git = ("git", "-c", "user.name=bench", "-c", "user.email=bench@localhost")
        run(None, "git", "add", "-A")
        run(None, *git, "commit", "-qm", "init")

        for stage in ("prepare", "sft", "reward"):
            run(f"repro_{stage}", "dvc", "repro", stage)
        run("repro_rest", "dvc", "repro")
        times["full_repro"] = sum(times[f"repro_{s}"] for s in ("prepare", "sft", "reward", "rest"))
        times["retrain_sft_reward"] = times["repro_sft"] + times["repro_reward"]
        load.append(os.getloadavg())
        run("noop_repro", "dvc", "repro")
        run(None, "git", "add", "-A")
        run(None, *git, "commit", "-qm", "baseline")
        run("exp_run_kl", "dvc", "exp", "run", "-S", "ppo.kl.coef=0.05")
        load.append(os.getloadavg())
        run("push", "dvc", "push")
        for path in ("models/sft", "models/reward", ".dvc/cache"):
            shutil.rmtree(repo / path)
        run("pull_sft_reward", "dvc", "pull", "sft", "reward")
        run(None, "dvc", "status", "sft", "reward")
        load.append(os.getloadavg())

    ratios = {
        "noop_vs_full": times["full_repro"] / times["noop_repro"],
        "exp_vs_full": times["full_repro"] / times["exp_run_kl"],
        "pull_vs_retrain": times["retrain_sft_reward"] / times["pull_sft_reward"],
    }
    print(json.dumps({"bench": "dvc_savings", "size": args.size, "seconds": times, "speedups": ratios, "load": load}))


if __name__ == "__main__":
    main()
