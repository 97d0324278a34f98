"""Run every benchmark and rewrite the results tables in bench/README.md.

    PYTHONPATH=. python bench/run_all.py                       # all of them (about an hour on 2 CPU cores)
    PYTHONPATH=. python bench/run_all.py --only rl_iteration   # one; the other tables keep their stored results
    PYTHONPATH=. python bench/run_all.py --only dvc_savings --options dvc_savings='--size tiny'
    PYTHONPATH=. python bench/run_all.py --smoke --results DIR --readme FILE   # smallest sizes (the smoke test)

Each script prints one JSON line last; it is stored with the date, the machine, the load averages and the exact
command in bench/results/<name>.json, and every table between `<!-- results:<name> -->` markers in the README is
rendered again from the stored files. Text outside the markers (what limits a missed goal) is left alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = "PYTHONPATH=. python"
BENCHES = {  # name: (command as a user types it, smoke arguments that replace its defaults)
    "rl_iteration": (f"{PY} bench/rl_iteration.py --sizes tiny,50m --dtype fp32,bf16 --threads 1",
                     "--sizes tiny --trl grpo --ours ppo,grpo --prompts 2 --completions 2 --new-tokens 4 --iters 1 --rounds 1"),
    "decode": (f"{PY} bench/decode.py --sizes tiny,50m,135m --dtypes fp32,bf16 --threads 1",
               "--sizes tiny --dtypes fp32 --batches 2 --answers 4 --repeats 1"),
    "hybrid_generation": ("DS_ACCELERATOR=cpu deepspeed --num_gpus 2 bench/hybrid_generation.py",
                          "--sizes tiny --batch 2 --new-tokens 4 --repeats 1"),
    "matmul_efficiency": (f"{PY} bench/matmul_efficiency.py --sizes 10m,100m",
                          "--sizes 10m --variants 'fp32 padded' --steps 1 --micro-batch 4 --matmul-n 256 "
                          "--peak-seconds 0.2"),
    "dvc_savings": (f"{PY} bench/dvc_savings.py --size small", "--size tiny"),
    "step3_scaling": (f"{PY} bench/step3_scaling.py --lengths 32,64,128,256 --sizes tiny,50m,135m",
                      "--lengths 4 --length-sizes tiny --sizes tiny --size-length 4 --prompts 2 --completions 2 "
                      "--iters 1"),
}


def machine() -> str:
    """One line: cores, memory, CPU model, torch and DeepSpeed versions, and whether a GPU was visible."""
    from importlib import metadata

    import torch

    model = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} cores, {mem:.0f} GiB, {model} ({platform.machine()}), torch {torch.__version__}, "
            f"DeepSpeed {metadata.version('deepspeed')}, {gpu}")


def run(name: str, smoke: bool, results: Path, options: str | None = None) -> dict:
    """Run one benchmark (`options` replace its default options) and store its record in results/<name>.json."""
    command, smoke_args = BENCHES[name]
    options = smoke_args if smoke else options
    if options is not None:
        command = command.split(".py", 1)[0] + ".py " + options  # the script, then these options alone
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    shell = command.replace("python ", f"{sys.executable} ", 1)
    load = os.getloadavg()
    print(f"[run_all] {command}", flush=True)
    proc = subprocess.run(shell, shell=True, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        sys.exit(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    record = {"date": datetime.date.today().isoformat(), "machine": machine(), "command": command,
              "load_before": load, "load_after": os.getloadavg(), "result": json.loads(lines[-1])}
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def _load(rec: dict) -> str:
    return "load " + " / ".join(f"{x:.1f}" for x in (rec["load_before"][0], rec["load_after"][0]))


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table: the header, its rule and one line per row of cells."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    return [line(head), "|" + "---|" * len(head), *map(line, rows)]


def table_rl_iteration(rec: dict) -> list[str]:
    r = rec["result"]
    algos = [k[len("speedup_vs_"):] for k in r["rows"][0] if k.startswith("speedup_vs_")]
    head = ["model", "params", "dtype", "ours PPO s/iter (gen / score / train)"]
    head += [c for a in algos for c in (f"ours {a.upper()} s/iter", f"TRL {a.upper()} s/iter", f"ours vs TRL {a.upper()}")]
    ours = [k for k in ("ours", *(f"ours_{a}" for a in algos)) if k in r["rows"][0]]
    head.append("ours of the dtype's peak (" + " / ".join(
        "PPO" if k == "ours" else k[5:].upper() for k in ours) + ")")
    rows = []
    for row in r["rows"]:
        o = row["ours"]
        cells = [row["size"], f"{o['params'] / 1e6:.1f}M", row.get("dtype", "fp32"),
                 f"{o['s_per_iter']:.2f} ({o['generate_s']:.2f} / {o['score_s']:.2f} / {o['train_s']:.2f})"]
        for a in algos:
            mine = row.get(f"ours_{a}")  # absent in records from before our GRPO/RLOO: the ratio is our PPO's
            ratio = f"{row[f'speedup_vs_{a}']:.2f}x" + ("" if mine else " (our PPO)")
            cells += [f"{mine['s_per_iter']:.2f}" if mine else "-", f"{row[a]['s_per_iter']:.2f}", ratio]
        cells.append(" / ".join(f"{row[k]['peak_fraction']:.0%}" if "peak_fraction" in row[k] else "-" for k in ours))
        rows.append(cells)
    out = _table(head, rows) + [""]
    peaks = ", ".join(f"{row['dtype']} {row['peak_flops_per_s'] / 1e9:.0f}" for row in r["rows"] if "peak_flops_per_s" in row)
    out.append(f"{r['prompts']} prompts x {r['completions']} answers x {r['new_tokens']} tokens per iteration; median "
               f"of {r['iters']} timed iterations x {r['rounds']} alternating rounds per side; {rec['date']}; "
               f"{rec['machine']}; {_load(rec)} (1-min average before / after, the machine is shared). "
               + (f"`of peak`: the iteration's useful FLOPs (rlhf.rl.report.phase_flops) over the 1024^3 matmul peak "
                  f"measured in the same run with the same threads (GFLOP/s: {peaks}). " if peaks else "")
               + f"Command: `{rec['command']}`")
    return out


def table_decode(rec: dict) -> list[str]:
    r = rec["result"]
    out = _table(["model", "params", "dtype", "batch", "answer tokens", "generate tok/s", "own tok/s", "own vs generate",
                  "matmul floor tok/s", "own of floor"], [
        [row["size"], f"{row['params'] / 1e6:.1f}M", row["dtype"], str(row["batch"]), str(row["answers"]),
         f"{row['generate_tok_s']:.0f}", f"{row['own_tok_s']:.0f}", f"{row['own_tok_s'] / row['generate_tok_s']:.2f}x",
         f"{row['floor_tok_s']:.0f}", f"{row['own_tok_s'] / row['floor_tok_s']:.0%}"] for row in r["rows"]])
    out += ["", f"Prompts of {r['prompt_tokens']} tokens; best of {r['repeats']} rollouts per cell, the sides "
            f"alternating; fp32 matmul peak in the same run {r['peak_fp32_flops_per_s'] / 1e9:.0f} GFLOP/s; "
            f"{r['threads']} thread; {rec['date']}; {rec['machine']}; {_load(rec)}. Command: `{rec['command']}`"]
    return out


def table_hybrid_generation(rec: dict) -> list[str]:
    r = rec["result"]
    layered = "layered_tok_s" in r["rows"][0]  # runs stored before ppo.rollout.gather_layers have none
    out = _table(["model", "params", "naive tok/s", "hybrid tok/s", "ratio"]
                 + ([f"layered tok/s ({r['gather_layers']} layer at a time)"] if layered else []), [
        [row["size"], f"{row['params'] / 1e6:.1f}M", f"{row['naive_tok_s']:.1f}", f"{row['hybrid_tok_s']:.1f}",
         f"{row['hybrid_tok_s'] / row['naive_tok_s']:.1f}x"] + ([f"{row['layered_tok_s']:.1f}"] if layered else [])
        for row in r["rows"]])
    out += ["", f"{r['ranks']} CPU ranks (gloo); {rec['date']}; {rec['machine']}; {_load(rec)}. "
            f"Command: `{rec['command']}`"]
    return out


def table_matmul_efficiency(rec: dict) -> list[str]:
    r = rec["result"]
    peaks = r["peak_flops_per_s"]
    threads = f"{r['threads']} thread" + ("s" if r["threads"] != 1 else "")
    out = [f"Peak (best torch.mm of {r['matmul_n']}x{r['matmul_n']}, {threads}): fp32 "
           f"{peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s.", ""]
    out += _table(["model", "params", "variant", "micro batch", "padding", "s/step", "tokens/s", "GFLOP/s", "of peak"], [
        [row["size"], f"{row['params'] / 1e6:.1f}M", row["variant"], str(row["micro_batch"]),
         f"{row['padding_fraction']:.0%}", f"{row['s_per_step']:.2f}", f"{row['tokens_per_s']:.0f}",
         f"{row['flops_per_s'] / 1e9:.1f}", f"{row['fraction_of_peak']:.0%}"] for row in r["rows"]])
    if r.get("adamw"):  # runs stored before the AdamW rows have none
        out += ["", "AdamW step alone over the same parameters (fp32, best of the repeats):", ""]
        out += _table(["model", "params", "per-parameter loop", "foreach", "fused (ours)", "fused vs loop"], [
            [a["size"], f"{a['params'] / 1e6:.1f}M", *(f"{a[k] * 1e3:.0f} ms" for k in ("loop_s", "foreach_s", "fused_s")),
             f"{a['loop_s'] / a['fused_s']:.1f}x"] for a in r["adamw"]])
    out += ["", f"Mean of {r['steps']} timed optimizer steps after a warm-up; {rec['date']}; {rec['machine']}; "
            f"{_load(rec)}. Command: `{rec['command']}`"]
    return out


def table_dvc_savings(rec: dict) -> list[str]:
    r = rec["result"]
    s, x = r["seconds"], r["speedups"]
    out = _table(["what", "seconds", "vs", "seconds", "saved"], [
        ["no-op `dvc repro`", f"{s['noop_repro']:.1f}", "full repro", f"{s['full_repro']:.1f}",
         f"{x['noop_vs_full']:.0f}x"],
        ["`dvc exp run -S ppo.kl.coef=0.05`", f"{s['exp_run_kl']:.1f}", "full repro", f"{s['full_repro']:.1f}",
         f"{x['exp_vs_full']:.1f}x"],
        ["`dvc pull sft reward` (empty cache)", f"{s['pull_sft_reward']:.1f}", "retraining sft + reward",
         f"{s['retrain_sft_reward']:.1f}", f"{x['pull_vs_retrain']:.1f}x"],
    ])
    out += ["", f"Full repro by stage: prepare {s['repro_prepare']:.1f} s, sft {s['repro_sft']:.1f} s, reward "
           f"{s['repro_reward']:.1f} s, ppo + evaluate {s['repro_rest']:.1f} s; `dvc push` {s['push']:.1f} s. "
           f"Params: `{r['size']}`; {rec['date']}; {rec['machine']}; {_load(rec)}. Command: `{rec['command']}`"]
    return out


def table_step3_scaling(rec: dict) -> list[str]:
    r = rec["result"]
    out = _table(["model", "params", "answer tokens", "s/iter", "ms per answer token", "generation / scoring / update",
                  "of peak"], [
        [row["size"], f"{row['params'] / 1e6:.1f}M", str(row["answer"]), f"{row['s_per_iter']:.2f}",
         f"{row['s_per_answer_token'] * 1e3:.1f}",
         " / ".join(f"{row[k]:.0%}" for k in ("generate_share", "score_share", "train_share")),
         f"{row['peak_fraction']:.0%}"] for row in r["rows"]])
    out += ["", f"Our PPO iteration (critic, EMA), {r['prompts']} prompts x {r['completions']} answers of exactly the "
            f"given length, {r['dtype']}, {r['threads']} thread; median of {r['iters']} timed iterations after a "
            f"warm-up; `of peak`: useful FLOPs (rlhf.rl.report.phase_flops) over the {r['dtype']} 1024^3 matmul peak "
            f"measured by the same run ({r['rows'][0]['peak_flops_per_s'] / 1e9:.0f} GFLOP/s); {rec['date']}; "
            f"{rec['machine']}; {_load(rec)}. Command: `{rec['command']}`"]
    return out


def render(readme: Path, results: Path) -> None:
    """Replace each marked block of the README with the table rendered from results/<name>.json."""
    text = readme.read_text()
    for name in BENCHES:
        path = results / f"{name}.json"
        if not path.is_file():
            continue
        table = "\n".join(globals()[f"table_{name}"](json.loads(path.read_text())))
        text = re.sub(rf"(<!-- results:{name} -->\n)(?:.*?\n)?(<!-- /results:{name} -->)",
                      lambda m: m.group(1) + table + "\n" + m.group(2), text, flags=re.S)
    readme.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(BENCHES), help="comma-separated benchmark names")
    ap.add_argument("--smoke", action="store_true", help="smallest sizes, to check that each script still runs")
    ap.add_argument("--results", type=Path, default=ROOT / "bench/results")
    ap.add_argument("--readme", type=Path, default=ROOT / "bench/README.md")
    ap.add_argument("--options", action="append", default=[], metavar="NAME=OPTIONS",
                    help="replace a benchmark's default options, e.g. rl_iteration='--sizes 50m --rounds 1'")
    ap.add_argument("--render-only", action="store_true", help="rewrite the README from stored results")
    args = ap.parse_args()
    if not args.render_only:
        options = dict(o.split("=", 1) for o in args.options)
        for name in args.only.split(","):
            run(name, args.smoke, args.results, options.get(name))
    if args.readme != ROOT / "bench/README.md" and not args.readme.exists():
        shutil.copy(ROOT / "bench/README.md", args.readme)
    render(args.readme, args.results)


if __name__ == "__main__":
    main()
