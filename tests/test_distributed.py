"""Two CPU ranks through the deepspeed launcher: ZeRO-3 shards the actor, rank 0 gathers and writes it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from tests.conftest import run_cli, write_params

# Partition every parameter (the tiny test models are below DeepSpeed's persistence threshold), so that the ranks
# really hold shards and the gathers are exercised.
SHARD_ALL = {"zero_stage": 3, "num_procs": 2, "zero3_persistence_threshold": 0}


def assert_sharded(stdout: str, model: str) -> None:
    """The engine's `[zero-3]` line: every parameter partitioned, rank 0 holding about half the elements."""
    found = re.search(rf"\[zero-3\] {model}: (\d+)/(\d+) parameters partitioned over 2 ranks; rank 0 holds ([\d,]+) of ([\d,]+)", stdout)
    assert found, stdout[-3000:]
    parts, total, local, elements = (int(g.replace(",", "")) for g in found.groups())
    assert parts == total > 0 and local < 0.6 * elements, found.group(0)


def test_two_rank_zero3_sft_through_the_launcher(prepared: Path) -> None:
    from transformers import AutoModelForCausalLM

    from rlhf.config import load_params
    from rlhf.models import build_causal_lm
    from rlhf.tokenizer import resolve_tokenizer

    write_params(prepared / "zero3.yaml", {"engine": SHARD_ALL})
    proc = run_cli(
        "sft", "--params", "zero3.yaml", "--out", "models/sft_zero3", "--metrics", "metrics/sft_zero3.json",
        "--live", "dvclive/sft_zero3", cwd=prepared,
    )
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


def test_two_rank_zero3_lora_ppo_through_the_launcher(trained: Path) -> None:
    from transformers import AutoModelForCausalLM

    write_params(
        trained / "ppo_zero3.yaml",
        {"engine": SHARD_ALL,
         "ppo": {"actor_lora": {"rank": 4, "alpha": 8}, "critic_lora": {"rank": 4, "alpha": 8}}},
    )
    proc = run_cli(
        "ppo", "--params", "ppo_zero3.yaml", "--out", "models/ppo_zero3", "--metrics", "metrics/ppo_zero3.json",
        "--live", "dvclive/ppo_zero3", cwd=trained,
    )
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
