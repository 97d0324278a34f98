"""Run by tests/rollout/test_layered.py under `torchrun --nproc_per_node 2`: an actor under ZeRO-3 on two CPU ranks
decodes each rank's own prompts greedily twice, with the whole actor gathered once (ppo.rollout.gather_layers 0) and
one decoder layer gathered at a time (1), counting the elements held gathered at once; rank 0 writes both ranks'
tokens and the peak, for three actors: the Llama-family SFT folder as it is (`plain`), with LoRA adapters on every
linear layer (`lora`: fused into the whole weights by the one, applied beside the layer's weights by the other), and
a small OPT (`forward`: not Llama-family, decoded through its own forward with DeepSpeed's hooks fetching each
module).

    torchrun --nproc_per_node 2 tests/rollout/layered_ranks.py SFT OUT
"""

from __future__ import annotations

import contextlib
import sys

import torch

from rlhf.config import EngineConfig, LoraConfig, Sampling, TrainConfig
from rlhf.data.batching import collate_prompts
from rlhf.models.build import add_lora, load_causal_lm
from rlhf.models.tokenizer import encode_prompt, load_tokenizer, stop_ids
from rlhf.rl.hybrid import HybridEngine
from rlhf.rollout.decode import DecodeLoop
from rlhf.training.runtime import init_distributed, initialize
from tests.ranks import leave

PROMPTS = [["Sort ascending: 5 2 9", "Sort descending: 14 3 7 1 22", "Sort ascending: 8 1"],
           ["Sort ascending: 4 4 0 7 1 9", "Sort descending: 3 1"]]  # rank 1's rows stop at other steps
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def actor(kind: str, sft: str, tok) -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights on both ranks
    if kind == "forward":
        from transformers import OPTConfig, OPTForCausalLM

        return OPTForCausalLM(OPTConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, ffn_dim=64,
                                        num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=128,
                                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                        bos_token_id=tok.eos_token_id))
    model = load_causal_lm(sft)
    if kind == "lora":
        model = add_lora(model, LoraConfig(rank=4, alpha=8, target_modules=LINEAR), "CAUSAL_LM")
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: the adapters would change nothing
                param.data.normal_(0, 0.2)
    return model


def decode(kind: str, sft: str, tok, batch, dist) -> dict:
    engine = EngineConfig(zero_stage=3, zero3_persistence_threshold=0)
    ds = initialize(actor(kind, sft, tok).eval(), engine, TrainConfig(micro_batch_size=4), total_steps=1)
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
    layers = ds.module.get_base_model().model if kind == "lora" else ds.module.model
    layers = layers.decoder.layers if kind == "forward" else layers.layers
    return {"want": want.sequences, "got": got.sequences, "logprobs": (want.logprobs, got.logprobs),
            "peak": peak[0], "shards": sum(shards), "total": sum(p.ds_numel for p in ds.module.parameters()),
            "layer": sum(p.ds_numel for p in layers[0].parameters()), "layers": len(layers)}


def main(sft: str, out: str) -> None:
    dist = init_distributed(EngineConfig(zero_stage=3))
    tok = load_tokenizer(sft)
    tok.padding_side = "left"
    ids = [encode_prompt(tok, [{"role": "user", "content": t}]) for t in PROMPTS[dist.rank]]
    batch = collate_prompts(max(map(len, ids)), tok.pad_token_id)(ids)
    result = {kind: decode(kind, sft, tok, batch, dist) for kind in ("plain", "lora", "forward")}
    results = [None] * dist.world_size
    torch.distributed.all_gather_object(results, result)
    if dist.is_main:
        torch.save(results, out)
    leave()


if __name__ == "__main__":
    main(*sys.argv[1:])
