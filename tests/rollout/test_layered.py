"""ppo.rollout.gather_layers: under ZeRO-3 our decode loop gathers one layer group at a time instead of the whole
actor, on two CPU ranks (torchrun, gloo)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import ROOT, cli_env


def _four_layers(tiny_models: Path, out: Path) -> Path:
    """tiny_models' tokenizer with a 4-layer actor (a budget of one layer is then a quarter of the layers)."""
    from rlhf.config import ModelConfig
    from rlhf.models.build import build_causal_lm, save_pretrained
    from rlhf.models.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_models / "models/sft")
    save_pretrained(build_causal_lm(ModelConfig(hidden_size=32, num_layers=4, num_heads=2, intermediate_size=64),
                                    tok, 0), tok, out)
    return out


def test_one_layer_at_a_time_decodes_the_tokens_of_the_whole_gather(tiny_models: Path, tmp_path: Path) -> None:
    """Each rank's own prompts (ranks stop at different steps), greedy: the same tokens and log-probs with one layer
    gathered at a time as with the whole actor gathered; never more than one layer and the embeddings, final norm
    and head held whole at once; every parameter a shard again after the rollout. The same with LoRA adapters on
    every linear layer (applied beside the gathered layer, not merged), and for an OPT actor (not Llama-family:
    its own forward, DeepSpeed's hooks fetching each module)."""
    from tests.rl.test_batches import _free_port

    sft = _four_layers(tiny_models, tmp_path / "sft")
    env = cli_env()
    env.pop("RLHF_SINGLE_PROCESS", None)
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()),
         str(ROOT / "tests/rollout/layered_ranks.py"), str(sft), str(tmp_path / "out.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = torch.load(tmp_path / "out.pt")
    assert not torch.equal(results[0]["lora"]["want"], results[0]["plain"]["want"])  # the adapters change answers
    for rank, by_kind in enumerate(results):
        for kind, r in by_kind.items():
            assert r["want"].shape[1] > 10, (kind, r["want"])  # answers were decoded
            assert torch.equal(r["got"], r["want"]), (rank, kind, r["got"], r["want"])
            assert torch.allclose(*r["logprobs"], atol=1e-5), (rank, kind)
            assert r["shards"] < r["total"] / 2 + 1000, (kind, r)  # sharded again over the two ranks
            assert r["layers"] == 4, (kind, r)
            if kind != "forward":  # ours gathers: embeddings, final norm, head and one layer at most
                rest = r["total"] - 4 * r["layer"]
                assert 0 < r["peak"] <= rest + r["layer"] < r["total"], (kind, r)
