"""Generation tokens/s: our decode loop (rlhf.rollout.decode, ppo.rollout.engine: own) vs the `generate` path it replaced
(ppo.rollout.engine: generate), side by side in one run, with the matmul floor and peak measured in the same run.

    PYTHONPATH=. python bench/decode.py --sizes tiny,50m,135m          # prints one JSON line at the end

Both sides decode exactly what step 3 decodes in the hybrid engine's generation mode (the rollout engines of rlhf/rollout/: the
same model, prompts, seed, sampling at temperature 1, log pi_old of every drawn token kept), every answer exactly
`--answers` tokens long (min_new_tokens), one thread (`--threads`), in each `--dtypes` (bf16: the model's weights
in bf16, as engine.dtype bf16 has them; the CPU's bf16 matmuls, AVX512-BF16 or AMX, where it has them).
Each cell is the best of `--repeats`
timed rollouts after a warm-up; the two sides alternate, so a load change hits both.

Two references tell how close to the machine each side is:
- `floor`: the time of the decode steps' matmuls alone (every Linear of the model on a (batch, hidden) input, once
  per token, plus the prefill's), the least any decoder that runs the model token by token can take; the rest is
  per-token overhead (attention, norms, rotary, cache, sampling, Python);
- `peak`: the best large square fp32 matmul; a decode step is a (batch x hidden) @ (hidden x out) product per
  weight, whose efficiency is far below the peak at small batches (it streams every weight from memory per token).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

SIZES = {  # Llama shapes: (vocab, hidden, layers, heads, kv heads, intermediate)
    "tiny": (512, 256, 6, 4, 4, 768),  # params.yaml's actor, ~5M parameters
    "50m": (8192, 576, 10, 9, 9, 1536),  # ~48M parameters
    "135m": (49152, 576, 30, 9, 3, 1536),  # SmolLM2-135M's shape (GQA, tied embeddings)
    "1.3b": (50272, 2048, 24, 32, 32, 5504),  # OPT-1.3B's width, depth, vocabulary and tied embeddings (~1.3B)
}


def build(size: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab, hidden, layers, heads, kv, inter = SIZES[size]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=1024,
                      tie_word_embeddings=size in ("135m", "1.3b"), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def matmul_floor(model, batch: int, prompt: int, answers: int) -> float:
    """Seconds of the matmuls a token-by-token decoder cannot avoid: every Linear on (batch, in) once per answer
    token (the prefill of batch x prompt tokens counted as one (batch * prompt, in) product per Linear)."""
    import torch
    import torch.nn.functional as F

    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    dtype = weights[0].dtype
    step = {n: torch.randn(batch, n, dtype=dtype) for n in {w.shape[1] for w in weights}}
    pre = {n: torch.randn(batch * prompt, n, dtype=dtype) for n in step}

    def run(inputs: dict) -> float:
        t0 = time.perf_counter()
        for w in weights:
            F.linear(inputs[w.shape[1]], w)
        return time.perf_counter() - t0

    run(step)
    per_token = min(sum(run(step) for _ in range(answers)) / answers for _ in range(2))
    return per_token * answers + min(run(pre) for _ in range(2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tiny,50m,135m")
    ap.add_argument("--batches", default="8,32", help="rollouts per batch")
    ap.add_argument("--answers", default="32,128", help="tokens per answer (exact)")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtypes", default="fp32,bf16")
    args = ap.parse_args()

    import torch

    from bench.matmul_efficiency import matmul_peak
    from rlhf.config import Sampling
    from rlhf.rollout.base import make_rollout_engine

    torch.set_num_threads(args.threads)
    peak = matmul_peak("fp32", 1024, 1.0)
    rows = []
    for size, dtype in [(s, d) for s in args.sizes.split(",") for d in args.dtypes.split(",")]:
        model = build(size).to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
        n_params = sum(p.numel() for p in model.parameters())
        vocab = model.config.vocab_size
        for batch in map(int, args.batches.split(",")):
            prompts = torch.randint(3, vocab, (batch, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
            mask = torch.ones_like(prompts)
            for answers in map(int, args.answers.split(",")):
                # eos 2 held back: answers of one length
                sampling = Sampling(max_answer_tokens=answers, min_answer_tokens=answers)
                engines = {d: make_rollout_engine(d, lambda m=model: contextlib.nullcontext(m), [2], 0)
                           for d in ("generate", "own")}
                best = {"generate": float("inf"), "own": float("inf")}
                with torch.no_grad():
                    for decoder in best:
                        engines[decoder].generate(prompts, mask, sampling)  # warm-up
                    for _ in range(args.repeats):
                        for decoder in best:
                            torch.manual_seed(7)
                            t0 = time.perf_counter()
                            out = engines[decoder].generate(prompts, mask, sampling)
                            best[decoder] = min(best[decoder], time.perf_counter() - t0)
                            assert out.sequences.shape[1] == args.prompt_tokens + answers
                floor = matmul_floor(model, batch, args.prompt_tokens, answers)
                tokens = batch * answers
                rows.append({"size": size, "dtype": dtype, "params": n_params, "batch": batch, "answers": answers,
                             "generate_tok_s": tokens / best["generate"], "own_tok_s": tokens / best["own"],
                             "floor_tok_s": tokens / floor})
                r = rows[-1]
                print(f"{size:<5} {dtype} {n_params / 1e6:6.1f}M B={batch:<3} R={answers:<4} generate {r['generate_tok_s']:8.0f} "
                      f"tok/s  own {r['own_tok_s']:8.0f} tok/s  ({r['own_tok_s'] / r['generate_tok_s']:.2f}x)  "
                      f"matmul floor {r['floor_tok_s']:8.0f} tok/s", flush=True)
        del model
    print(json.dumps({"bench": "decode", "threads": args.threads, "prompt_tokens": args.prompt_tokens,
                      "repeats": args.repeats, "peak_fp32_flops_per_s": peak, "rows": rows}))


if __name__ == "__main__":
    main()
