"""Hybrid-engine generation vs naive ZeRO-3 generation, side by side in one run.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 bench/hybrid_generation.py            # 2 CPU ranks
    deepspeed --num_gpus 1 bench/hybrid_generation.py --sizes tiny,50m              # one GPU

Both paths use the same model, prompts, sampling seed and lengths (eos is suppressed so every answer has exactly
--new-tokens tokens). Naive: `model.generate(..., synced_gpus=True)` on the ZeRO-3 engine, which gathers every
layer's shards for every token. Hybrid: our rollout engine in rlhf.rl.hybrid.HybridEngine's generation mode,
which gathers once per rollout. Layered: the same engine with ppo.rollout.gather_layers (--gather-layers decoder
layers gathered at a time, every token: the whole actor is never held by one rank).
Rank 0 prints tokens/s of each and the ratio, then the same as one JSON line (for bench/run_all.py).
"""

from __future__ import annotations

import argparse
import json
import os
import time

SIZES = {  # Llama-style shapes: (vocab, hidden, layers, heads, intermediate)
    "tiny": (512, 256, 6, 4, 768),  # the default actor of params.yaml (~5M parameters)
    "50m": (8192, 576, 10, 9, 1536),  # ~50M parameters
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tiny,50m")
    ap.add_argument("--batch", type=int, default=8, help="prompts per rank")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--gather-layers", type=int, default=1, help="the layered side's layers gathered at a time")
    ap.add_argument("--local_rank", type=int, default=0)  # the deepspeed launcher passes it
    args = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.config import EngineConfig, Sampling, TrainConfig
    from rlhf.rl.hybrid import HybridEngine
    from rlhf.rollout.base import make_rollout_engine
    from rlhf.training.runtime import init_distributed, initialize

    dist = init_distributed(EngineConfig(zero_stage=3))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // dist.world_size))
    rows = []
    for size in args.sizes.split(","):
        vocab, hidden, layers, heads, inter = SIZES[size]
        cfg = LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=heads, intermediate_size=inter, max_position_embeddings=256,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        n_params = sum(p.numel() for p in model.parameters())
        engine = initialize(model, EngineConfig(zero_stage=3), TrainConfig(micro_batch_size=args.batch), 10)
        hybrid = HybridEngine(engine, zero_stage=3)
        device = engine.device
        g = torch.Generator().manual_seed(1 + dist.rank)
        prompts = torch.randint(3, vocab, (args.batch, args.prompt_tokens), generator=g).to(device)
        mask = torch.ones_like(prompts)
        kwargs = dict(
            do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens, pad_token_id=0, eos_token_id=2,
        )

        def naive() -> None:
            with torch.no_grad():
                engine.module.generate(  # noqa: F821 - `del engine` comes after this size's timings
                    input_ids=prompts, attention_mask=mask, synced_gpus=True, **kwargs)

        rollouts = make_rollout_engine("own", hybrid.generation_mode, [2], 0)  # eos 2, pad 0, as above
        sampling = Sampling(max_answer_tokens=args.new_tokens, min_answer_tokens=args.new_tokens)

        def fast() -> None:
            rollouts.generate(prompts, mask, sampling)

        layered_engine = HybridEngine(engine, zero_stage=3, gather_layers=args.gather_layers)
        layered_rollouts = make_rollout_engine("own", layered_engine.generation_mode, [2], 0, gather=
                                               layered_engine.layer_gather, layers_at_once=args.gather_layers)

        def layered() -> None:
            layered_rollouts.generate(prompts, mask, sampling)

        timings = {}
        for name, fn in (("naive_zero3", naive), ("hybrid", fast), ("layered", layered)):
            fn()  # warm-up
            torch.distributed.barrier()
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                torch.manual_seed(7)
                fn()
            torch.distributed.barrier()
            timings[name] = time.perf_counter() - t0
        tokens = args.repeats * args.batch * args.new_tokens * dist.world_size
        rows.append((size, n_params, tokens / timings["naive_zero3"], tokens / timings["hybrid"],
                     tokens / timings["layered"]))
        del engine, hybrid, model, layered_engine
    if dist.is_main:
        print(f"ranks={dist.world_size} device={dist.device} batch/rank={args.batch} prompt={args.prompt_tokens} "
              f"new={args.new_tokens} repeats={args.repeats}")
        print(f"{'model':<6} {'params':>8} {'naive tok/s':>12} {'hybrid tok/s':>13} {'ratio':>6} {'layered tok/s':>14}")
        for size, n, naive_tps, hybrid_tps, layered_tps in rows:
            print(f"{size:<6} {n / 1e6:>7.1f}M {naive_tps:>12.1f} {hybrid_tps:>13.1f} {hybrid_tps / naive_tps:>5.1f}x "
                  f"{layered_tps:>14.1f}")
        print(json.dumps({"bench": "hybrid_generation", "ranks": dist.world_size, "batch_per_rank": args.batch,
                          "new_tokens": args.new_tokens, "repeats": args.repeats, "gather_layers": args.gather_layers,
                          "rows": [{"size": s, "params": n, "naive_tok_s": a, "hybrid_tok_s": b, "layered_tok_s": c}
                                   for s, n, a, b, c in rows]}))


if __name__ == "__main__":
    main()
