"""The memory plan (rlhf/plan/) against measured peaks, on CPU: each configuration's training stage runs through
the `rlhf` CLI as a user runs it, and its peak resident memory per rank (the largest rank's VmHWM, written by each
rank as it exits) is compared with the plan's largest phase per rank.

    PYTHONPATH=. python bench/memory_plan.py            # prints a table, then one JSON line

What the plan leaves out is the same for every run of one stage with the same ranks: the Python process, torch,
DeepSpeed and the data. So each configuration runs beside a baseline of the same stage, ranks, dtype and ZeRO stage
on a 1-layer, 64-wide model, and the figure compared is the difference: (peak - baseline peak) against (plan -
baseline plan), the baseline's peak the lower of two runs. Glibc is told to hand freed memory back
(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_) so that a phase's peak is its own, not what an earlier one left
cached.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from bench.dvc_savings import merge

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"tiny": (64, 1, 1, 128), "50m": (576, 12, 9, 1536), "135m": (576, 30, 9, 1536)}
# name: (stage, actor shape, ranks, params overrides)
CONFIGS = {
    "sft 50m fp32 zero0 1 rank": ("sft", "50m", 1, {"engine": {"zero_stage": 0}}),
    "sft 135m bf16 zero2 2 ranks": ("sft", "135m", 2, {"engine": {"dtype": "bf16", "zero_stage": 2}}),
    "sft 135m fp32 zero3 LoRA 2 ranks": ("sft", "135m", 2, {"engine": {"zero_stage": 3},
                                                           "sft": {"lora": {"rank": 16}}}),
    "sft 135m bf16 zero0 1 rank": ("sft", "135m", 1, {"engine": {"dtype": "bf16"}}),
    "sft 135m fp32 zero0 LoRA 1 rank": ("sft", "135m", 1, {"sft": {"lora": {"rank": 16}}}),
    "reward 135m fp32 zero1 checkpointing": ("reward", "135m", 1, {"engine": {"zero_stage": 1,
                                                                              "gradient_checkpointing": True}}),
    "dpo 50m fp32 zero0": ("dpo", "50m", 1, {}),
    "ppo 50m fp32 zero0": ("ppo", "50m", 1, {}),
    "ppo 50m fp32 zero3 LoRA layered 2 ranks": ("ppo", "50m", 2, {"engine": {"zero_stage": 3}, "ppo": {
        "lora": {"actor": {"rank": 16}}, "rollout": {"gather_layers": 1}}}),
}
COMMON = {  # a few steps of each stage, on the shipped task
    "task": {"num_rows": 3000},
    "sft": {"max_steps": 4, "micro_batch_size": 16, "eval_batch_size": 32},
    "reward": {"max_steps": 4, "micro_batch_size": 16, "eval_batch_size": 32},
    "dpo": {"max_steps": 4, "micro_batch_size": 8, "eval_batch_size": 16},
    "ppo": {"iterations": 2, "rollout_batch_size": 16, "micro_batch_size": 8, "eval_prompts": 16},
    "evaluate": {"num_prompts": 16},
}


def _shape(name: str) -> dict:
    hidden, layers, heads, inter = SHAPES[name]
    return {"hidden_size": hidden, "num_layers": layers, "num_heads": heads, "intermediate_size": inter}


def write_params(work: Path, name: str, shape: str, ranks: int, over: dict) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw = merge(raw, COMMON)
    raw = merge(raw, {"model": _shape(shape), "reward_model": _shape(shape), "engine": {"num_procs": ranks}})
    raw = merge(raw, over)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# Every Python process of a run (the stage, the launcher, its ranks) writes its own peak resident memory (VmHWM)
# when it exits: rusage would also count the compilers DeepSpeed's JIT starts, and the launcher's processes.
SITECUSTOMIZE = """
import atexit, os, sys

def _peak():
    if os.environ.get("RANK") is None and "stages.cli" not in " ".join(sys.argv) and "rlhf" not in sys.argv[0]:
        return
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            with open(os.path.join(os.environ["BENCH_PEAKS"], str(os.getpid())), "w") as f:
                f.write(line.split()[1] + " " + os.environ.get("RANK", "-") + " " + " ".join(sys.argv))

atexit.register(_peak)

if os.environ.get("BENCH_TRACE") and os.environ.get("RANK") is not None:
    import threading, time, traceback
    _main, _top = threading.main_thread(), [0, ""]

    _phases = {}  # the innermost rlhf function on the stack -> the largest RSS sampled in it

    def _sample():
        while True:
            rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            stack = traceback.extract_stack(sys._current_frames()[_main.ident])
            if rss > _top[0]:
                _top[:] = [rss, " < ".join(f"{f.name}:{os.path.basename(f.filename)}" for f in stack[::-1][:8])]
            ours = [f for f in stack if "/rlhf/" in f.filename]
            if ours:
                where = f"{ours[-1].name}:{os.path.basename(ours[-1].filename)}"
                _phases[where] = max(_phases.get(where, 0), rss)
            time.sleep(0.01)

    def _trace():
        with open(os.path.join(os.environ["BENCH_PEAKS"], "trace-" + os.environ["RANK"]), "w") as f:
            top = sorted(_phases.items(), key=lambda kv: -kv[1])[:6]
            f.write(f"{_top[0]} {_top[1]} | " + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in top))

    threading.Thread(target=_sample, daemon=True).start()
    atexit.register(_trace)
"""


def run_stage(work: Path, stage: str, params: Path, tag: str) -> int:
    """Run `rlhf STAGE` as a user does; its peak resident bytes: the process's, or its largest rank's."""
    out = work / "runs" / tag
    args = {"sft": ["--out", out / "model"], "reward": ["--out", out / "model"], "dpo": ["--out", out / "model"],
            "ppo": ["--out", out / "model", "--reward", work / "models/reward"]}[stage]
    if stage in ("dpo", "ppo"):
        args += ["--sft", work / "models/sft"]
    cmd = ["rlhf", stage, "--params", params, "--data", work / "data", *args, "--metrics", out / "m.json",
           "--live", out / "live", "--checkpoints", out / "ckpt"]
    peaks, hook = out / "peaks", work / "hook"
    peaks.mkdir(parents=True)
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", BENCH_PEAKS=str(peaks),
               PYTHONPATH=os.pathsep.join(filter(None, [str(hook), str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([str(c) for c in cmd], cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{tag} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    for f in sorted(peaks.glob("trace-*")):  # --trace: each rank's largest sampled RSS and where it was
        rss, where = f.read_text().split(" ", 1)
        print(f"[trace] {tag} rank {f.name[6:]}: {int(rss) / 2**30:.2f} GiB at {where}", flush=True)
        f.unlink()
    ranks = [f.read_text().split() for f in peaks.iterdir()]
    ranks = [r for r in ranks if r[1] != "-"] or ranks  # the ranks when launched, else the stage's one process
    if os.environ.get("BENCH_TRACE"):
        print(f"[trace] {tag} VmHWM per rank: " + ", ".join(f"{r[1]} {int(r[0]) / 2**20:.2f}" for r in ranks), flush=True)
    return max(int(r[0]) for r in ranks) * 1024


def planned(stage: str, params_path: Path, work: Path, ranks: int) -> tuple[int, str]:
    """The plan's largest phase per rank (everything a rank holds, device and host alike on CPU) and its name."""
    from rlhf.config import load_params
    from rlhf.plan.memory import Cluster
    from rlhf.plan.plan import stage_phases, stage_shapes

    params = load_params(params_path)
    cluster = Cluster(ranks, ranks, "cpu", 2**40, 2**40)
    phases = stage_phases(stage, params, cluster, stage_shapes(stage, params, work / "models/sft",
                                                               work / "models/reward"))
    top = max(phases, key=lambda p: p.total("device") + p.total("host"))
    return top.total("device") + top.total("host"), top.name


def setup(work: Path, shape: str) -> dict:
    """Data, tokenizer, and an SFT actor and reward model of `shape` (random init) for dpo and ppo to start from.
    Returns the data's longest prompt and longest row in tokens: the runs set data.max_prompt_tokens and
    max_seq_tokens to them, so that the plan's worst case is a batch the data really has (a plan for the default
    96 tokens would be compared with batches of the task's ~40)."""
    from rlhf.config import load_params
    from rlhf.data.prepare import run_prepare
    from rlhf.data.split import read_split
    from rlhf.models.build import build_causal_lm, build_reward_model, save_pretrained
    from rlhf.models.tokenizer import encode_prompt, encode_sft_row, load_tokenizer
    from rlhf.prefs.reward_model import encode_pair, pair_length

    params = load_params(write_params(work, f"setup-{shape}", shape, 1, {}))
    if not (work / "data/tokenizer").is_dir():
        run_prepare(params, work / "data")
    tok = load_tokenizer(work / "data/tokenizer")
    save_pretrained(build_causal_lm(params.model, tok, params.seed), tok, work / "models/sft")
    save_pretrained(build_reward_model(params.reward_model, tok, params.seed), tok, work / "models/reward")
    rows = {name: read_split(work / f"data/{name}.jsonl") for name in
            ("sft_train", "sft_eval", "reward_train", "reward_eval", "ppo_train", "ppo_eval")}
    prompts = [len(encode_prompt(tok, r["prompt"])) for split in rows.values() for r in split]
    seqs = [len(encode_sft_row(tok, r, loss_on_prompt=False)["input_ids"]) for k in ("sft_train", "sft_eval")
            for r in rows[k]]
    seqs += [pair_length(encode_pair(tok, r)) for k in ("reward_train", "reward_eval") for r in rows[k]]
    return {"max_prompt_tokens": max(prompts), "max_seq_tokens": max(seqs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names of CONFIGS")
    ap.add_argument("--trace", action="store_true", help="print where each rank's sampled peak was (every 10 ms)")
    args = ap.parse_args()
    if args.trace:
        os.environ["BENCH_TRACE"] = "1"
    rows = []
    with tempfile.TemporaryDirectory(prefix="memory-plan-") as tmp:
        work = Path(tmp)
        for name in args.configs.split(","):
            stage, shape, ranks, over = CONFIGS[name]
            over = merge(over, {"data": setup(work, shape)})
            tag = name.replace(" ", "_")
            base = write_params(work, f"{tag}-base", "tiny", ranks, over)
            run = write_params(work, tag, shape, ranks, over)
            setup(work, "tiny")  # dpo and ppo's baseline start from tiny folders
            # the baseline's peak moves by ~0.05 GiB run to run (its allocations are the runtime's): the lower of two
            base_peak = min(run_stage(work, stage, base, f"{tag}-base{i}") for i in range(2))
            base_plan, _ = planned(stage, base, work, ranks)
            setup(work, shape)
            peak, (plan, phase) = run_stage(work, stage, run, tag), planned(stage, run, work, ranks)
            measured, estimate = peak - base_peak, plan - base_plan
            row = {"config": name, "stage": stage, "ranks": ranks, "peak_gib": peak / 2**30,
                   "baseline_peak_gib": base_peak / 2**30, "measured_gib": measured / 2**30,
                   "planned_gib": estimate / 2**30, "plan_phase": phase, "plan_over_measured": estimate / measured}
            rows.append(row)
            print(f"[plan] {name:<40} measured {row['measured_gib']:6.2f} GiB  planned {row['planned_gib']:6.2f} "
                  f"GiB ({phase})  plan/measured {row['plan_over_measured']:.2f}", flush=True)
    print(json.dumps({"bench": "memory_plan", "rows": rows}))


if __name__ == "__main__":
    main()
