"""SFT training efficiency vs the machine's matmul peak, measured in the same run.

    PYTHONPATH=. python bench/matmul_efficiency.py --sizes 10m,100m      # prints one JSON line at the end

Peak: the best of several large square matmuls (torch.mm) per dtype, fp32 and bf16, with torch's thread count
(= cores), measured before and after the SFT steps; the higher of the two is the peak.
SFT step: our real path -- rlhf.training.runtime.initialize (DeepSpeed engine, ZeRO 0, fused torch AdamW), then per step
`engine(**batch).loss`, `engine.backward`, `engine.step`, on the shipped task's SFT rows (`rlhf prepare` in a
temporary folder) collated as the sft stage collates them. Useful FLOPs per step count real tokens only:
6 * N * tokens (N = parameters in matmuls: every Linear, lm_head included, embeddings not) plus causal attention
6 * layers * T * hidden per token (PaLM appendix B, halved for the causal mask). Variants, each a try at what
keeps the fraction low:
- `fp32 padded`: the sft stage with `sft.group_by_length: false` (random batches right-padded to their longest row);
- `fp32 grouped`: the sft stage as it runs (`group_by_length: true`: batches of rows of similar length), same rows;
- `bf16 grouped`: the same in engine.dtype bf16 (DeepSpeed's bf16 engine, fp32 master weights);
- `fp32 grouped x4`: 4x the micro batch (fewer, larger matmuls).
AdamW step alone, over each size's parameters (fp32, random gradients): torch's per-parameter loop (`foreach=False`,
its CPU default), `foreach=True` and `fused=True` (one vectorised kernel, what rlhf.training.runtime.initialize uses), the
three taking turns, best of `--steps` + 2 steps each.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # Llama shapes (hidden, layers, heads, intermediate) with the task's 512-token vocabulary
    "10m": (384, 6, 6, 1024),  # ~10.6M parameters
    "100m": (768, 14, 12, 2048),  # ~99M parameters
}
VARIANTS = {  # name: (dtype, batching, micro batch multiplier)
    "fp32 padded": ("fp32", "random", 1),
    "fp32 grouped": ("fp32", "grouped", 1),
    "bf16 grouped": ("bf16", "grouped", 1),
    "fp32 grouped x4": ("fp32", "grouped", 4),
}


def matmul_peak(dtype: str, n: int, seconds: float) -> float:
    """Best FLOP/s of (n x n) @ (n x n) in `dtype` over about `seconds` of repeats."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    torch.mm(a, b)  # warm-up (thread pool, packing buffers)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def batches(rows: list[dict], size: int, grouped: bool, seed: int) -> list[list[dict]]:
    """The sft stage's training batches of epoch 0 on one rank (rlhf.training.loaders.make_loader): random, or grouped by
    length as sft.group_by_length groups them."""
    from rlhf.data.batching import sft_length
    from rlhf.training.loaders import make_loader
    from rlhf.training.runtime import Dist

    lengths = [sft_length(r) for r in rows] if grouped else None
    one_rank = Dist(rank=0, world_size=1, local_rank=0, device="cpu")
    return list(make_loader(rows, size, list, one_rank, seed, True, lengths))


def sft_step_flops(model, batch) -> float:
    """Useful training FLOPs of one step on `batch` (real tokens only; see the module docstring)."""
    import torch

    cfg = model.config
    n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    lengths = batch["attention_mask"].sum(-1).tolist()
    return sum(6 * n_matmul * t + 6 * cfg.num_hidden_layers * t * t * cfg.hidden_size for t in lengths)


def measure_sft(size: str, variant: str, rows: list[dict], tok, micro: int, steps: int) -> dict:
    """Mean seconds per optimizer step over `steps` steps (after one warm-up step) and useful FLOP/s."""
    from rlhf.config import EngineConfig, ModelConfig, TrainConfig
    from rlhf.data.batching import collate_sft
    from rlhf.models.build import build_causal_lm
    from rlhf.training.runtime import initialize

    dtype, batching, mult = VARIANTS[variant]
    hidden, layers, heads, inter = SIZES[size]
    model = build_causal_lm(
        ModelConfig(hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=inter), tok, 0
    )
    n_params = sum(p.numel() for p in model.parameters())
    mb = micro * mult
    engine = initialize(model, EngineConfig(device="cpu", dtype=dtype), TrainConfig(micro_batch_size=mb), 100)
    collate = collate_sft(tok.pad_token_id)
    plan = [collate(b) for b in batches(rows, mb, batching == "grouped", 0)[: steps + 1]]
    elapsed = flops = real = padded = 0.0
    for i, batch in enumerate(plan):
        t0 = time.perf_counter()
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        dt = time.perf_counter() - t0
        if i:  # the first step warms up
            elapsed += dt
            flops += sft_step_flops(engine.module, batch)
            real += batch["attention_mask"].sum().item()
            padded += batch["attention_mask"].numel()
    del engine, model
    return {"size": size, "variant": variant, "dtype": dtype, "params": n_params, "micro_batch": mb,
            "s_per_step": elapsed / steps, "flops_per_s": flops / elapsed, "padding_fraction": 1 - real / padded,
            "tokens_per_s": real / elapsed}


def measure_adamw(size: str, tok, steps: int) -> dict:
    """Seconds of one AdamW step over the model's parameters for each implementation (best of the repeats, the
    implementations taking turns so that load hits them alike)."""
    import torch

    from rlhf.config import ModelConfig
    from rlhf.models.build import build_causal_lm

    hidden, layers, heads, inter = SIZES[size]
    model = build_causal_lm(
        ModelConfig(hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=inter), tok, 0
    )
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    kinds = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    optimizers = {k: torch.optim.AdamW(params, lr=1e-5, **kw) for k, kw in kinds.items()}
    best = {k: float("inf") for k in kinds}
    for _ in range(steps + 2):
        for k, opt in optimizers.items():
            t0 = time.perf_counter()
            opt.step()
            best[k] = min(best[k], time.perf_counter() - t0)
    return {"size": size, "params": sum(p.numel() for p in params), **{f"{k}_s": v for k, v in best.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10m,100m")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per variant (after one warm-up)")
    ap.add_argument("--micro-batch", type=int, default=32, help="the sft group's micro_batch_size")
    ap.add_argument("--matmul-n", type=int, default=2048)
    ap.add_argument("--peak-seconds", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, the cores)")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from rlhf.config import EngineConfig, load_params
    from rlhf.data.prepare import run_prepare
    from rlhf.data.split import read_split
    from rlhf.models.tokenizer import encode_sft_row, load_tokenizer
    from rlhf.training.runtime import init_distributed

    init_distributed(EngineConfig(device="cpu"))
    with tempfile.TemporaryDirectory(prefix="mm-bench-") as tmp:
        run_prepare(load_params(ROOT / "params.yaml", {"task.num_rows": 4000}), Path(tmp) / "data")
        tok = load_tokenizer(Path(tmp) / "data/tokenizer")
        rows = [encode_sft_row(tok, r, False) for r in read_split(Path(tmp) / "data/sft_train.jsonl")]
    peaks = {d: matmul_peak(d, args.matmul_n, args.peak_seconds) for d in ("fp32", "bf16")}
    load = [os.getloadavg()]
    results = []
    for size in args.sizes.split(","):
        for variant in args.variants.split(","):
            r = measure_sft(size, variant, rows, tok, args.micro_batch, args.steps)
            load.append(os.getloadavg())
            print(f"[mm] {size} {variant}: {r['s_per_step']:.2f} s/step {r['flops_per_s'] / 1e9:.1f} GFLOP/s "
                  f"padding {r['padding_fraction']:.0%}", flush=True)
            results.append(r)
    adamw = []
    for size in args.sizes.split(","):
        a = measure_adamw(size, tok, args.steps)
        print(f"[mm] {size} AdamW step: loop {a['loop_s'] * 1e3:.0f} ms, foreach {a['foreach_s'] * 1e3:.0f} ms, "
              f"fused {a['fused_s'] * 1e3:.0f} ms ({a['loop_s'] / a['fused_s']:.1f}x the loop)", flush=True)
        adamw.append(a)
    for d, p in {d: matmul_peak(d, args.matmul_n, args.peak_seconds) for d in ("fp32", "bf16")}.items():
        peaks[d] = max(peaks[d], p)
    for r in results:
        r["fraction_of_peak"] = r["flops_per_s"] / peaks[r["dtype"]]
    print(json.dumps({"bench": "matmul_efficiency", "peak_flops_per_s": peaks, "threads": torch.get_num_threads(),
                      "matmul_n": args.matmul_n, "steps": args.steps, "load": load, "rows": results,
                      "adamw": adamw}))


if __name__ == "__main__":
    main()
