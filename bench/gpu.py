"""The CUDA path, measured on a lent GPU in one run: the machine's own peaks, our decode loop (eager and replayed
as a CUDA graph) against transformers' generate, and step-3 iterations with the DeepSpeed engines on CUDA.

    PYTHONPATH=. python bench/gpu.py --tokenizer data/prepared/tokenizer --out gpu.json
    PYTHONPATH=. python bench/gpu.py --smoke ...        # tiny sizes, any device (how tests run it on CPU)

Sections, each written to --out as soon as it is done (a later failure keeps what came before):
- `peak`: the best large bf16 matmul (and fp32 without TF32) and a device-to-device copy, measured here;
- `exact`: greedy and seeded-sampled tokens of our loop (eager step, graphed step) against generate's on the GPU,
  an fp32 model and a bf16 one (the share of equal tokens; fp32 must be all);
- `decode`: generated tokens/s at each size and batch, prompts of --prompt tokens and answers of exactly
  --answer tokens (min_new_tokens), bf16 weights; `floor_s`: reading every weight once per token at the memory
  rate a copy reaches in `peak` (bytes read + written per second): the least a token-by-token decoder can take
  while the weights are most of what it reads;
- `step3`: our PPO step 3 as run_ppo iterates it (generate_experience, train_rlhf per micro batch, EMA), the
  actor and critic DeepSpeed engines in bf16 on CUDA (nccl, one rank), the rollout decoded as `--decoders` says;
  samples/s and tokens/s (prompt + answer, as DeepSpeed-Chat counts a sample's 512 tokens), and the share of the
  matmul peak of the engines' dtype (bf16 on CUDA, fp32 on CPU) the iteration's useful FLOPs reach
  (rlhf.rl.report.phase_flops; the 2026-12-04 H200 record counted 10 x params per token per model, no attention).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.decode import SIZES, build  # noqa: E402
from bench.rl_iteration import fixed_length, iteration  # noqa: E402

STEP3 = {  # (actor size in bench.decode.SIZES, critic/reward (hidden, layers, heads, intermediate))
    "1.3b": ("1.3b", (1024, 24, 16, 2816)),  # OPT-1.3B-sized actor, OPT-350M-sized critic, as DeepSpeed-Chat's
    "tiny": ("tiny", (160, 4, 4, 480)),  # params.yaml's sizes (the smoke test)
}


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return best


def peak(device: str, n: int) -> dict:
    import torch

    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        torch.backends.cuda.matmul.allow_tf32 = False
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        out[f"{name}_tflops"] = 2 * n**3 / _best(lambda: a @ b, 5) / 1e12
    x = torch.empty(n * n * 8, device=device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    out["copy_gb_s"] = 2 * x.numel() * 2 / _best(lambda: y.copy_(x), 5) / 1e9
    return out


def _run(model, ids, mask, decoder: str, graphs: bool, answer: int, sample: bool):
    import torch

    from rlhf.config import Sampling
    from rlhf.rollout.base import make_rollout_engine

    # eos 2, pad 0; eos held back so that every answer is `answer` tokens long
    engine = make_rollout_engine(decoder, lambda: contextlib.nullcontext(model), [2], 0, cuda_graphs=graphs)
    torch.manual_seed(3)
    with torch.no_grad():
        return engine.generate(ids, mask, Sampling(max_answer_tokens=answer, do_sample=sample, min_answer_tokens=answer))


def _prompts(batch: int, width: int, vocab: int, device: str):
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, width), generator=g)
    mask = torch.ones_like(ids)
    for i in range(batch):  # left padding of 0..7 columns
        ids[i, : i % 8], mask[i, : i % 8] = 0, 0
    return ids.to(device), mask.to(device)


def exact(device: str, size: str, answer: int) -> dict:
    """Share of answer tokens equal to generate's, per dtype and sampling, for the eager and the graphed step."""
    import torch

    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = build(size).to(device, dtype)
        ids, mask = _prompts(8, 16, SIZES[size][0], device)
        for sample in (False, True):
            want = _run(model, ids, mask, "generate", False, answer, sample).sequences
            for name, graphs in (("eager", False), ("graph", True)):
                got = _run(model, ids, mask, "own", graphs, answer, sample).sequences
                key = f"{str(dtype)[6:]}_{'sampled' if sample else 'greedy'}_{name}"
                out[key] = float((got == want).float().mean()) if got.shape == want.shape else 0.0
        del model
    return out


def decode_speed(device: str, sizes: list[str], batches: list[int], prompt: int, answer: int, repeats: int,
                 copy_gb_s: float) -> list[dict]:
    import torch

    rows = []
    for size in sizes:
        model = build(size).to(device, torch.bfloat16)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        for batch in batches:
            ids, mask = _prompts(batch, prompt, SIZES[size][0], device)
            row = {"size": size, "params": sum(p.numel() for p in model.parameters()), "batch": batch,
                   "prompt": prompt, "answer": answer,
                   "floor_s": answer * weight_bytes / (copy_gb_s * 1e9)}  # bytes moved per second, as a copy moves them
            for name, decoder, graphs in (("generate", "generate", False), ("own_eager", "own", False),
                                          ("own_graph", "own", True)):
                t = _best(lambda: _run(model, ids, mask, decoder, graphs, answer, True), repeats)
                row[f"{name}_s"], row[f"{name}_tok_s"] = t, batch * answer / t
            row["graph_vs_generate"] = row["generate_s"] / row["own_graph_s"]
            row["eager_vs_generate"] = row["generate_s"] / row["own_eager_s"]
            print("[gpu] decode " + json.dumps(row), flush=True)
            rows.append(row)
        model = None  # free it before the next size
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def step3(device: str, size: str, tokenizer: Path, prompt: int, answer: int, batch: int, micro: int, iters: int,
          decoders: list[str], zero_stages: list[int], peaks: dict) -> list[dict]:
    """Our PPO iteration as bench/rl_iteration.py's run_ours drives it, on CUDA in bf16."""
    import torch

    from rlhf.config import load_params
    from rlhf.models.build import build_causal_lm, build_reward_model, save_pretrained
    from rlhf.models.tokenizer import load_tokenizer
    from rlhf.rl.models import RLModels
    from rlhf.rl.report import phase_flops
    from rlhf.rl.trainer import RLTrainer
    from rlhf.training.runtime import init_distributed, seed_everything

    actor_size, (c_hidden, c_layers, c_heads, c_inter) = STEP3[size]
    _, hidden, layers, heads, _, inter = SIZES[actor_size]
    tok = load_tokenizer(tokenizer)
    dtype = "bf16" if device.startswith("cuda") else "fp32"  # CPU: the default pipeline's dtype
    peak_tflops = peaks.get(f"{dtype}_tflops", 0.0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-step3-") as tmp:
        work = Path(tmp)
        dist = None
        for zero in zero_stages:
            for decoder in decoders:
                over = {
                    "engine.device": device, "engine.dtype": dtype,
                    "engine.zero_stage": zero,
                    "model.hidden_size": hidden, "model.num_layers": layers, "model.num_heads": heads,
                    "model.intermediate_size": inter, "model.max_position_embeddings": prompt + answer + 8,
                    "reward_model.hidden_size": c_hidden, "reward_model.num_layers": c_layers,
                    "reward_model.num_heads": c_heads, "reward_model.intermediate_size": c_inter,
                    "reward_model.max_position_embeddings": prompt + answer + 8,
                    "data.max_prompt_tokens": prompt, "data.max_seq_tokens": prompt + answer,
                    "ppo.algorithm": "ppo", "ppo.rollout_batch_size": batch, "ppo.answers_per_prompt": 1,
                    "ppo.micro_batch_size": micro, "ppo.sampling.max_answer_tokens": answer, "ppo.iterations": iters + 1,
                    "ppo.ppo_epochs": 1, "ppo.generation_batches": 1, "ppo.rollout.engine": decoder.split("_")[0],
                    "ppo.rollout.cuda_graphs": decoder == "own_graph",
                }
                params = load_params(ROOT / "params.yaml", over)
                if not (work / "sft").is_dir():
                    save_pretrained(build_causal_lm(params.model, tok, params.seed), tok, work / "sft")
                    save_pretrained(build_reward_model(params.reward_model, tok, params.seed), tok, work / "reward")
                dist = dist or init_distributed(params.engine)
                seed_everything(params.seed)
                engine = RLModels(params.ppo, params.engine, dist, work / "sft", work / "reward")
                trainer = RLTrainer(engine, params.ppo, params.rewards)
                fixed_length(engine, answer)
                g = torch.Generator().manual_seed(1)
                times, gen, flops = [], [], 0.0
                for it in range(iters + 1):
                    ids = torch.randint(3, len(tok), (batch, prompt), generator=g)
                    ids[ids == tok.eos_token_id] = 3
                    ids[ids == tok.pad_token_id] = 3
                    _sync()
                    t0 = time.perf_counter()
                    trainer.iteration = it + 1
                    exp, info, _ = iteration(trainer, engine, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                                             micro)
                    _sync()
                    if it:
                        times.append(time.perf_counter() - t0)
                        gen.append(info["generate_s"])
                        flops += sum(phase_flops(engine, exp, params.ppo).values()) / iters
                n_actor = sum(getattr(p, "ds_numel", p.numel()) for p in engine.actor.module.parameters())
                n_critic = sum(getattr(p, "ds_numel", p.numel()) for p in engine.critic.module.parameters())
                s = sorted(times)[len(times) // 2]
                row = {"size": size, "zero": zero, "decoder": decoder, "actor_params": n_actor,
                       "critic_params": n_critic, "batch": batch, "prompt": prompt, "answer": answer,
                       "micro": micro, "s_per_iter": s, "times": times, "generate_s": sorted(gen)[len(gen) // 2],
                       "samples_s": batch / s, "tokens_s": batch * (prompt + answer) / s,
                       "answer_tokens_s": batch * answer / s,
                       "dtype": dtype, "peak_fraction": flops / s / (peak_tflops * 1e12) if peak_tflops else None,
                       "max_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0}
                print("[gpu] step3 " + json.dumps(row), flush=True)
                rows.append(row)
                del trainer, engine
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", type=Path, default=ROOT / "data/prepared/tokenizer")
    ap.add_argument("--out", type=Path, default=Path("gpu.json"))
    ap.add_argument("--sections", default="peak,exact,decode,step3")
    ap.add_argument("--sizes", default="135m,1.3b")
    ap.add_argument("--batches", default="32,128")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--answer", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--step3-size", default="1.3b")
    ap.add_argument("--step3-batch", type=int, default=32)
    ap.add_argument("--step3-micro", type=int, default=16)
    ap.add_argument("--step3-iters", type=int, default=3)
    ap.add_argument("--decoders", default="own_graph,own_eager,generate")
    ap.add_argument("--zero", default="0")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and lengths (tests, any device)")
    args = ap.parse_args()
    if args.smoke:
        args.sizes, args.batches, args.prompt, args.answer, args.repeats = "tiny", "4", 12, 8, 1
        args.step3_size, args.step3_batch, args.step3_micro, args.step3_iters = "tiny", 4, 2, 1
        args.decoders = "own_graph"
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device == "cuda" else "cpu")
    result: dict = {"bench": "gpu", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}}

    def save() -> None:
        args.out.write_text(json.dumps(result, indent=1))

    sections = args.sections.split(",")
    if "peak" in sections:
        result["peak"] = peak(device, 256 if args.smoke else 8192)
        print("[gpu] peak " + json.dumps(result["peak"]), flush=True)
        save()
    if "exact" in sections:
        result["exact"] = exact(device, "tiny" if args.smoke else "135m", args.answer)
        print("[gpu] exact " + json.dumps(result["exact"]), flush=True)
        save()
    copy = result.get("peak", {}).get("copy_gb_s", 1.0)
    if "decode" in sections:
        result["decode"] = decode_speed(device, args.sizes.split(","), [int(b) for b in args.batches.split(",")],
                                        args.prompt, args.answer, args.repeats, copy)
        save()
    if "step3" in sections:
        result["step3"] = step3(device, args.step3_size, args.tokenizer, args.prompt, args.answer, args.step3_batch,
                                args.step3_micro, args.step3_iters, args.decoders.split(","),
                                [int(z) for z in args.zero.split(",")], result.get("peak", {}))
        save()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
