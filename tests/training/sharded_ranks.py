"""Run by tests/training/test_sharded_load.py under `torchrun --nproc_per_node 2`: ZeRO-3's sharded load
(rlhf.training.runtime.sharded_load) on two CPU ranks. Each model of step 3 is read from its folder as shards, never
whole on a rank, and gathered back it equals the folder's weights; rank 0 writes what it saw.

    torchrun --nproc_per_node 2 tests/training/sharded_ranks.py SFT REWARD OUT
"""

from __future__ import annotations

import sys

import torch

from rlhf.config import EngineConfig, LoraConfig, TrainConfig
from rlhf.models.build import add_lora, load_causal_lm, load_reward_model
from rlhf.rl.models import critic_from_actor
from rlhf.training.runtime import full_state_dict, init_distributed, initialize, ndim, sharded_load
from tests.ranks import leave


def shards(model: torch.nn.Module) -> dict:
    """How the model's parameters are held on this rank: as ZeRO-3 shards (ds_id) with no whole tensor. LoRA
    adapters, which peft adds after the load, are left out (DeepSpeed partitions them when it wraps the model)."""
    ps = [p for name, p in model.named_parameters() if "lora_" not in name]
    return {"sharded": sum(hasattr(p, "ds_id") for p in ps), "params": len(ps),
            "held": sum(p.numel() for p in ps), "whole": sum(getattr(p, "ds_numel", 0) for p in ps)}


def main(sft: str, reward: str, out: str) -> None:
    engine = EngineConfig(zero_stage=3, zero3_persistence_threshold=0)
    dist = init_distributed(engine)
    seen = {}
    with sharded_load(engine):
        actor = add_lora(load_causal_lm(sft), LoraConfig(rank=4, alpha=8), "CAUSAL_LM")
        critic = critic_from_actor(sft)
        rm = load_reward_model(reward)
    outside = load_causal_lm(sft)  # after the block: whole again
    seen["outside"] = shards(outside)
    for name, model in (("actor", actor), ("critic", critic), ("reward", rm)):
        seen[name] = shards(model)
        # weight decay follows each parameter's whole shape (runtime.ndim), not its flat shard
        seen[name]["decay"] = sum(ndim(p) >= 2 for p in model.parameters() if p.requires_grad)
        ds = initialize(model, engine, TrainConfig(micro_batch_size=2), total_steps=1)
        seen[name]["state"] = full_state_dict(ds.module, 3, dist.is_main)
    if dist.is_main:
        torch.save(seen, out)
    leave()


if __name__ == "__main__":
    main(*sys.argv[1:])
