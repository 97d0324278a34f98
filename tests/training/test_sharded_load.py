"""ZeRO-3 reads each model from its folder as shards (runtime.sharded_load), on two CPU ranks (torchrun, gloo)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import ROOT, cli_env


def test_step3_models_load_as_shards_and_gather_back_to_their_folders(tiny_models: Path, tmp_path: Path) -> None:
    """Inside sharded_load every parameter of the actor (with LoRA), the critic made from the actor and the reward
    model is a shard from the start (no rank ever held the whole); gathered back they equal the folders' weights,
    the critic's value head zeroed; after the block a load is whole again. Weight decay goes to the matrices by their
    whole shapes (a shard is flat)."""
    from safetensors.torch import load_file

    from tests.rl.test_batches import _free_port

    sft, reward = tiny_models / "models/sft", tiny_models / "models/reward"
    env = cli_env()
    env.pop("RLHF_SINGLE_PROCESS", None)
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()),
         str(ROOT / "tests/training/sharded_ranks.py"), str(sft), str(reward), str(tmp_path / "out.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = torch.load(tmp_path / "out.pt")
    assert seen["outside"]["sharded"] == 0 and seen["outside"]["held"] > 0, seen["outside"]
    for name in ("actor", "critic", "reward"):
        s = seen[name]
        assert s["sharded"] == s["params"] > 0 and s["held"] == 0 and s["whole"] > 0, (name, s)
    want_sft, want_rm = load_file(sft / "model.safetensors"), load_file(reward / "model.safetensors")
    assert seen["reward"]["decay"] == sum(v.ndim >= 2 for v in want_rm.values()) > 0
    actor = seen["actor"]["state"]
    for key, value in want_sft.items():  # the base weights as saved; the adapters beside them
        assert torch.equal(actor[f"base_model.model.{key}".replace(".weight", ".base_layer.weight")]
                           if f"base_model.model.{key}" not in actor else actor[f"base_model.model.{key}"], value), key
    assert any("lora_A" in k for k in actor)
    critic, rm = seen["critic"]["state"], seen["reward"]["state"]
    assert torch.count_nonzero(critic["score.weight"]) == 0
    for key, value in want_rm.items():
        assert torch.equal(rm[key], value), key
    body = [k for k in want_sft if k.startswith("model.")]
    assert all(torch.equal(critic[k], want_sft[k]) for k in body)


def test_sft_from_a_folder_under_zero3_through_the_launcher(trained: Path) -> None:
    """`rlhf sft` on 2 ranks under ZeRO-3 starting from a model folder (model.name_or_path): read as shards, trained,
    gathered and written; the result loads with transformers' Auto class and moved from where it started."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tests.conftest import run_cli, write_params
    from tests.training.test_runtime import SHARD_ALL, assert_sharded

    start = trained / "models/sft"
    write_params(trained / "sft_folder.yaml", {"engine": SHARD_ALL, "model": {"name_or_path": str(start)},
                                               "sft": {"max_steps": 2}})
    proc = run_cli("sft", "--params", "sft_folder.yaml", "--out", "models/sft_folder", "--metrics",
                   "metrics/sft_folder.json", "--live", "dvclive/sft_folder", cwd=trained)
    assert "launching 2 ranks" in proc.stderr
    assert_sharded(proc.stdout, "LlamaForCausalLM")
    saved = AutoModelForCausalLM.from_pretrained(trained / "models/sft_folder").state_dict()
    before = load_file(start / "model.safetensors")
    assert before.keys() <= saved.keys()
    assert [k for k in before if not torch.equal(before[k], saved[k])], "no weight moved"
