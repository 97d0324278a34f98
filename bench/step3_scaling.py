"""How a step-3 iteration's cost grows: our PPO iteration time against the answer length and against the actor's
size, with where the time goes (generation / scoring / update) and the share of the matmul peak it reaches.

    PYTHONPATH=. python bench/step3_scaling.py --lengths 32,64,128,256 --sizes tiny,50m,135m   # one JSON line last

Each cell is bench/rl_iteration.py's `run_ours` (our iteration exactly as run_ppo runs it) in its own subprocess:
`--prompts` prompts x `--completions` answers of exactly N tokens, one optimizer step, fp32 (or `--dtype`), one
thread. The length sweep runs at every size in `--length-sizes`; the size sweep at `--size-length` tokens. Per cell:
seconds per iteration (median of `--iters` after a warm-up), seconds per answer token, the three phases' shares,
and the iteration's useful FLOPs (rlhf.rl.report.phase_flops) over the matmul peak measured by the same setup run.
Linear in tokens means seconds per answer token stay flat as N grows (the prompt is a fixed cost that N spreads).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RL = ROOT / "bench/rl_iteration.py"
sys.path.insert(0, str(ROOT))

from bench.rl_iteration import run_side  # noqa: E402


def _side(side: str, work: str, size: str, tokens: int, args: argparse.Namespace) -> dict:
    return run_side(RL, ["--side", side, "--work", work, "--size", size, "--dtype", args.dtype,
                         "--prompts", str(args.prompts), "--completions", str(args.completions),
                         "--new-tokens", str(tokens), "--iters", str(args.iters), "--threads", str(args.threads)],
                    f"{side} ({size}, {tokens} tokens)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="32,64,128,256", help="answer lengths of the length sweep")
    ap.add_argument("--length-sizes", default="tiny,50m", help="sizes the length sweep runs at")
    ap.add_argument("--sizes", default="tiny,50m,135m", help="sizes of the size sweep")
    ap.add_argument("--size-length", type=int, default=32, help="answer length of the size sweep")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--completions", type=int, default=2)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="fp32")
    args = ap.parse_args()
    cells = [(s, int(n)) for s in args.length_sizes.split(",") for n in args.lengths.split(",")]
    cells += [(s, args.size_length) for s in args.sizes.split(",") if (s, args.size_length) not in cells]
    rows = []
    with tempfile.TemporaryDirectory(prefix="step3-scaling-") as tmp:
        peaks: dict[str, float] = {}
        for size, tokens in cells:
            if size not in peaks:  # the models once per size, with positions for its longest answer
                longest = max(n for s_, n in cells if s_ == size)
                peaks[size] = _side("setup", tmp, size, longest, args)["peak_flops_per_s"]
            out = _side("ours", tmp, size, tokens, args)
            s = statistics.median(out["times"])
            n_iter = sum(out[k] for k in ("generate_s", "score_s", "train_s"))
            row = {"size": size, "params": out["params"], "answer": tokens, "s_per_iter": s,
                   "s_per_answer_token": s / (args.prompts * args.completions * out["answer_tokens"]),
                   **{f"{k[:-2]}_share": out[k] / n_iter for k in ("generate_s", "score_s", "train_s")},
                   "flops": out["flops"], "peak_flops_per_s": peaks[size],
                   "peak_fraction": out["flops"] / s / peaks[size], "answer_tokens": out["answer_tokens"],
                   **{f"{k}_peak_fraction": out[f"flops_{k}"] / out[f"{k}_s"] / peaks[size]
                      for k in ("generate", "score", "train")}}
            print(f"[scaling] {size} {tokens} tokens: {s:.2f} s/iter, generation {row['generate_share']:.0%}, "
                  f"{row['peak_fraction']:.0%} of peak", flush=True)
            rows.append(row)
    print(json.dumps({"bench": "step3_scaling", "prompts": args.prompts, "completions": args.completions,
                      "iters": args.iters, "threads": args.threads, "dtype": args.dtype, "rows": rows}))


if __name__ == "__main__":
    main()
