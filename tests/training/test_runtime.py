"""Two CPU ranks through the deepspeed launcher: ZeRO-3 shards the actor, rank 0 gathers and writes it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import cli_env, run_cli, write_params

# Partition every parameter (the tiny test models are below DeepSpeed's persistence threshold), so that the ranks
# really hold shards and the gathers are exercised.
SHARD_ALL = {"zero_stage": 3, "num_procs": 2, "zero3_persistence_threshold": 0}


def assert_sharded(stdout: str, model: str) -> None:
    """The engine's `[zero-3]` line: every parameter partitioned, rank 0 holding about half the elements."""
    pattern = rf"\[zero-3\] {model}: (\d+)/(\d+) parameters partitioned over 2 ranks; rank 0 holds ([\d,]+) of ([\d,]+)"
    found = re.search(pattern, stdout)
    assert found, stdout[-3000:]
    parts, total, local, elements = (int(g.replace(",", "")) for g in found.groups())
    assert parts == total > 0 and local < 0.6 * elements, found.group(0)


PPO_LORA = {"ppo": {"lora": {"actor": {"rank": 4, "alpha": 8}, "critic": {"rank": 4, "alpha": 8}}}}
LAYERED = {"ppo": {"rollout": {"gather_layers": 1}}}


@pytest.fixture(scope="module")
def zero3_sft(prepared: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """SFT on 2 ranks of one node, ZeRO-3: the reference the multi-node and resumed runs must equal."""
    write_params(prepared / "zero3.yaml", {"engine": SHARD_ALL})
    proc = run_cli(
        "sft", "--params", "zero3.yaml", "--out", "models/sft_zero3", "--metrics", "metrics/sft_zero3.json",
        "--live", "dvclive/sft_zero3", cwd=prepared,
    )
    return prepared, proc


@pytest.fixture(scope="module")
def zero3_ppo(trained: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """PPO (LoRA actor and critic) on 2 ranks of one node, ZeRO-3, every model read as shards, the rollouts
    decoded one layer gathered at a time (ppo.rollout.gather_layers, the LoRA adapters beside the layer)."""
    write_params(trained / "ppo_zero3.yaml", {"engine": SHARD_ALL}, PPO_LORA, LAYERED)
    proc = run_cli(
        "ppo", "--params", "ppo_zero3.yaml", "--out", "models/ppo_zero3", "--metrics", "metrics/ppo_zero3.json",
        "--live", "dvclive/ppo_zero3", cwd=trained,
    )
    return trained, proc


def assert_same_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert left.keys() == right.keys()
    differ = [k for k in left if not torch.equal(left[k], right[k])]
    assert not differ, f"{a} and {b} differ in {differ[:5]}"


def test_two_rank_zero3_sft_through_the_launcher(zero3_sft: tuple[Path, subprocess.CompletedProcess]) -> None:
    from transformers import AutoModelForCausalLM

    from rlhf.config import load_params
    from rlhf.models.build import build_causal_lm
    from rlhf.models.tokenizer import resolve_tokenizer

    prepared, proc = zero3_sft
    assert "launching 2 ranks" in proc.stderr
    assert_sharded(proc.stdout, "LlamaForCausalLM")
    saved = AutoModelForCausalLM.from_pretrained(prepared / "models/sft_zero3").state_dict()
    params = load_params(prepared / "zero3.yaml")
    initial = build_causal_lm(params.model, resolve_tokenizer(None, prepared / "data/prepared"), params.seed)
    # Every parameter was gathered whole (no empty ZeRO-3 shards) and training moved it.
    for name, value in initial.state_dict().items():
        assert saved[name].shape == value.shape, name
    changed = [k for k, v in initial.state_dict().items() if not torch.equal(saved[k], v)]
    assert len(changed) >= len(saved) // 2
    manifest = json.loads((prepared / "models/sft_zero3/manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["params"]["engine"]["zero_stage"] == 3
    metrics = json.loads((prepared / "metrics/sft_zero3.json").read_text())
    assert metrics["steps"] == 6 and metrics["perplexity"] > 1.0


def test_two_rank_zero3_lora_ppo_through_the_launcher(zero3_ppo: tuple[Path, subprocess.CompletedProcess]) -> None:
    from transformers import AutoModelForCausalLM

    trained, proc = zero3_ppo
    assert "launching 2 ranks" in proc.stderr and "[ppo] iter 2/2" in proc.stdout
    for model in ("PeftModelForCausalLM", "PeftModelForSequenceClassification", "frozen LlamaForCausalLM",
                  "frozen LlamaForSequenceClassification"):
        assert_sharded(proc.stdout, model)
    sft = AutoModelForCausalLM.from_pretrained(trained / "models/sft").state_dict()
    actor = AutoModelForCausalLM.from_pretrained(trained / "models/ppo_zero3/actor").state_dict()
    assert not any("lora" in k for k in actor)
    changed = [k for k in sft if not torch.equal(sft[k], actor[k])]
    # LoRA on the attention projections only: exactly those moved, merged into the saved weights.
    assert changed and all(any(m in k for m in ("q_proj", "k_proj", "v_proj", "o_proj")) for k in changed)
    manifest = json.loads((trained / "models/ppo_zero3/actor/manifest.json").read_text())
    assert manifest["world_size"] == 2


def test_a_killed_rank_stops_the_whole_job_quickly(prepared: Path, tmp_path: Path) -> None:
    """SIGKILL rank 1 after its second step: rank 0 must not wait in a collective for ever; the job ends within
    60 s with one line naming what happened and how to go on."""
    import shutil
    import time

    work = tmp_path / "kill"
    shutil.copytree(prepared / "data", work / "data")
    write_params(work / "params.yaml", {"engine": {"num_procs": 2}, "sft": {"epochs": 50, "max_steps": 0}})
    t0 = time.perf_counter()
    proc = run_cli(
        "sft", "--params", "params.yaml", cwd=work, check=False, timeout=300,
        env={"RLHF_FAULT_KILL_AT_STEP": "2", "RLHF_FAULT_RANK": "1"},
    )
    elapsed = time.perf_counter() - t0
    assert proc.returncode != 0 and elapsed < 60, (proc.returncode, elapsed)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "killed by signal 9" in errors[0] and "Rerun" in errors[0], proc.stderr[-3000:]
    assert not (work / "models/sft").exists()


def _as_two_nodes(work: Path, *args: str, port: int) -> list[subprocess.CompletedProcess]:
    """`rlhf ARGS` as a 2-node x 1-rank job on this machine: the same command started once per node with
    RLHF_NODE_RANK, through DeepSpeed's own multi-node launch without ssh (--no_ssh), both nodes in one shared
    folder (as a shared file system would have it). Returns (node 0, node 1)."""
    (work / "hosts.txt").write_text("node-a slots=1\nnode-b slots=1\n")
    procs = []
    for node in (1, 0):
        env = {**cli_env(), "RLHF_NODE_RANK": str(node), "RLHF_MASTER_ADDR": "127.0.0.1", "RLHF_MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "stages.cli", *args], cwd=work, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    done = []
    for proc in reversed(procs):
        out, err = proc.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    for node, proc in enumerate(done):
        assert proc.returncode == 0, f"node {node}: {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return done


TWO_NODES = {"engine": {**SHARD_ALL, "num_procs": 1, "hostfile": "hosts.txt"}}


def test_two_nodes_equal_one_node_with_two_ranks(zero3_sft: tuple[Path, subprocess.CompletedProcess],
                                                 zero3_ppo: tuple[Path, subprocess.CompletedProcess]) -> None:
    """sft and ppo as 2 nodes x 1 rank (node_rank 0 and 1, DeepSpeed --no_ssh) write the same weights as the
    2-rank single-node runs; only node 0's rank 0 writes."""
    from rlhf.training.runtime import _free_port

    work, _ = zero3_ppo  # the trained folder: data, models/sft, models/reward, and the single-node outputs
    assert zero3_sft[0] == work
    write_params(work / "sft_2nodes.yaml", TWO_NODES, {"sft": {"checkpoint_every": 3}})
    shutil.rmtree(work / "ckpt_2nodes", ignore_errors=True)
    node0, node1 = _as_two_nodes(work, "sft", "--params", "sft_2nodes.yaml", "--out", "models/sft_2nodes",
                                 "--metrics", "metrics/sft_2nodes.json", "--live", "dvclive/sft_2nodes",
                                 "--checkpoints", "ckpt_2nodes", port=_free_port())
    assert "--no_ssh" in node0.stderr and "--node_rank 1" in node1.stderr
    # one checkpoint folder shared by both nodes: each rank's state beside the engine's shards, sealed by rank 0
    # (6 steps, checkpoint_every 3: step 3 is the last checkpoint; the final step writes the model, not a checkpoint)
    last = work / "ckpt_2nodes/step-00000003"
    assert (last / "COMPLETE.json").is_file() and {"rank0.pt", "rank1.pt"} <= {p.name for p in last.iterdir()}
    assert_same_weights(work / "models/sft_zero3", work / "models/sft_2nodes")
    assert json.loads((work / "models/sft_2nodes/manifest.json").read_text())["world_size"] == 2

    write_params(work / "ppo_2nodes.yaml", TWO_NODES, PPO_LORA, LAYERED)
    _as_two_nodes(work, "ppo", "--params", "ppo_2nodes.yaml", "--out", "models/ppo_2nodes", "--metrics",
                  "metrics/ppo_2nodes.json", "--live", "dvclive/ppo_2nodes", port=_free_port())
    for model in ("actor", "critic", "actor_ema"):
        assert_same_weights(work / "models/ppo_zero3" / model, work / "models/ppo_2nodes" / model)


def test_two_rank_resume_after_a_killed_rank_equals_the_uninterrupted_run(
    zero3_sft: tuple[Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    """2 ranks, ZeRO-3, checkpoints every 2 steps: SIGKILL rank 1 after step 3, rerun: the final weights equal the
    uninterrupted 2-rank run's, bit for bit (fp32, CPU)."""
    prepared, _ = zero3_sft
    work = tmp_path / "resume"
    shutil.copytree(prepared / "data", work / "data")
    write_params(work / "params.yaml", {"engine": SHARD_ALL, "sft": {"checkpoint_every": 2}})
    killed = run_cli("sft", "--params", "params.yaml", "--checkpoints", "ckpt", cwd=work, check=False,
                     env={"RLHF_FAULT_KILL_AT_STEP": "3", "RLHF_FAULT_RANK": "1"})
    assert killed.returncode != 0 and not (work / "models/sft").exists(), killed.stderr[-2000:]
    assert (work / "ckpt/step-00000002/COMPLETE.json").is_file()
    resumed = run_cli("sft", "--params", "params.yaml", "--checkpoints", "ckpt", cwd=work)
    assert "resumed from ckpt/step-00000002" in resumed.stdout, resumed.stdout[-2000:]
    assert_same_weights(prepared / "models/sft_zero3", work / "models/sft")
