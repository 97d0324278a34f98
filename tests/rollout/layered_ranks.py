"""Run by tests/rollout/test_layered.py under `torchrun --nproc_per_node 2`: the actor under ZeRO-3 on two CPU ranks
decodes each rank's own prompts greedily twice, with the whole actor gathered once (ppo.rollout.gather_layers 0) and
one decoder layer gathered at a time (1), counting the elements held gathered at once; rank 0 writes both ranks'
tokens and the peak.

    torchrun --nproc_per_node 2 tests/rollout/layered_ranks.py SFT OUT
"""

from __future__ import annotations

import contextlib
import sys

import torch

from rlhf.config import EngineConfig, Sampling, TrainConfig
from rlhf.data.batching import collate_prompts
from rlhf.models.build import load_causal_lm
from rlhf.models.tokenizer import encode_prompt, load_tokenizer, stop_ids
from rlhf.rl.hybrid import HybridEngine
from rlhf.rollout.decode import DecodeLoop
from rlhf.training.runtime import init_distributed, initialize

PROMPTS = [["Sort ascending: 5 2 9", "Sort descending: 14 3 7 1 22", "Sort ascending: 8 1"],
           ["Sort ascending: 4 4 0 7 1 9", "Sort descending: 3 1"]]  # rank 1's rows stop at other steps


def main(sft: str, out: str) -> None:
    engine = EngineConfig(zero_stage=3, zero3_persistence_threshold=0)
    dist = init_distributed(engine)
    tok = load_tokenizer(sft)
    tok.padding_side = "left"
    ds = initialize(load_causal_lm(sft).eval(), engine, TrainConfig(micro_batch_size=4), total_steps=1)
    ids = [encode_prompt(tok, [{"role": "user", "content": t}]) for t in PROMPTS[dist.rank]]
    batch = collate_prompts(max(map(len, ids)), tok.pad_token_id)(ids)
    greedy = Sampling(do_sample=False, max_answer_tokens=16)

    whole = HybridEngine(ds, 3)
    want = DecodeLoop(whole.generation_mode, stop_ids(tok), tok.pad_token_id).generate(
        batch["input_ids"], batch["attention_mask"], greedy)

    layered = HybridEngine(ds, 3, gather_layers=1)
    held, peak = [0], [0]

    @contextlib.contextmanager
    def counted(params):
        with layered.layer_gather(params):
            held[0] += sum(p.ds_numel for p in params)
            peak[0] = max(peak[0], held[0])
            assert all(p.numel() == p.ds_numel for p in params)  # whole while held
            yield
            held[0] -= sum(p.ds_numel for p in params)

    got = DecodeLoop(layered.generation_mode, stop_ids(tok), tok.pad_token_id, gather=counted,
                     layers_at_once=1).generate(batch["input_ids"], batch["attention_mask"], greedy)
    shards = [p.numel() for p in ds.module.parameters()]  # after the rollout: every parameter a shard again
    result = {"want": want.sequences, "got": got.sequences, "logprobs": (want.logprobs, got.logprobs),
              "peak": peak[0], "shards": sum(shards), "total": sum(p.ds_numel for p in ds.module.parameters()),
              "layer": sum(p.ds_numel for p in ds.module.model.layers[0].parameters())}
    results = [None] * dist.world_size
    torch.distributed.all_gather_object(results, result)
    if dist.is_main:
        torch.save(results, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
