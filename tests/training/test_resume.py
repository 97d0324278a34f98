"""Kill a training stage with SIGKILL mid-run and rerun it: it resumes from the newest complete checkpoint and
ends with the same weights, bit for bit, and the same logged curves as a run that was never interrupted."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli, write_params

# Two epochs of the tiny split (13 batches each), a checkpoint every 8 steps, the kill after step 15: the resumed
# run starts from step 8, crosses an epoch boundary (and its evaluation) it had already logged once. Batches
# are grouped by length, whose order must also be rebuilt exactly.
LONGER = {"epochs": 2, "max_steps": 20, "log_every": 1, "checkpoint_every": 8, "group_by_length": True}
# One intra-op thread: with two, the first step after a resume sometimes (1 in ~5 on an Intel Xeon with AMX, never
# in 8 runs with one thread) sums a reduction in another order and the loss moves by ~3e-7; straight runs never
# differ. That is the kernels' order, not a resume state of ours, which is what this test checks, bit for bit.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
KILL = {"RLHF_FAULT_KILL_AT_STEP": "15", **ONE_THREAD}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _curve(live: Path, name: str) -> list[tuple[str, str]]:
    """(step, value) rows of a dvclive curve; the timestamp column differs between runs by nature."""
    lines = (live / "plots/metrics" / f"{name}.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    s, v = header.index("step"), header.index(name.split("/")[-1])
    return [(row.split("\t")[s], row.split("\t")[v]) for row in lines[1:]]


def _copy(prepared: Path, dest: Path, stage: str) -> Path:
    shutil.copytree(prepared / "data", dest / "data")
    write_params(dest / "params.yaml", {stage: LONGER})
    return dest


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_killed_stage_resumes_to_identical_weights_and_curves(prepared: Path, tmp_path: Path, stage: str) -> None:
    straight = _copy(prepared, tmp_path / "straight", stage)
    run_cli(stage, "--params", "params.yaml", cwd=straight, env=ONE_THREAD)

    killed = _copy(prepared, tmp_path / "killed", stage)
    proc = run_cli(stage, "--params", "params.yaml", cwd=killed, check=False, env=KILL)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (killed / "models" / stage).exists()
    assert [p.name for p in (killed / "checkpoints" / stage).iterdir()] == ["step-00000008"]

    proc = run_cli(stage, "--params", "params.yaml", cwd=killed, env=ONE_THREAD)
    assert "resumed from checkpoints/" + stage + "/step-00000008" in proc.stdout

    a, b = _weights(straight / "models" / stage), _weights(killed / "models" / stage)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # training did move them after the last checkpoint (step 16), which the finished run keeps
    ckpt = torch.load(killed / "checkpoints" / stage / "step-00000016/model/mp_rank_00_model_states.pt", weights_only=False)
    moved = [k for k, v in ckpt["module"].items() if k in b and not torch.equal(v.float(), b[k].float())]
    assert len(moved) >= len(b) // 2
    live = f"dvclive/{stage}"
    for curve in ("train/loss", "train/lr", "eval/eval_loss" if stage == "sft" else "eval/accuracy"):
        assert _curve(straight / live, curve) == _curve(killed / live, curve), curve
    assert len(_curve(killed / live, "train/loss")) == 20

    # `dvc repro` after a change that leaves the stage's params alone deletes its outputs, curves included, and
    # reruns it: it resumes from its last checkpoint, which brings the curves back as they were
    shutil.rmtree(killed / live)
    shutil.rmtree(killed / "models" / stage)
    run_cli(stage, "--params", "params.yaml", cwd=killed, env=ONE_THREAD)
    for curve in ("train/loss", "train/lr", "eval/eval_loss" if stage == "sft" else "eval/accuracy"):
        assert _curve(straight / live, curve) == _curve(killed / live, curve), curve
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if stage == "sft" else AutoModelForSequenceClassification
    loaded = auto.from_pretrained(killed / "models" / stage).state_dict()
    assert all(torch.equal(loaded[k], b[k]) for k in b if k in loaded)


def test_killed_ppo_resumes_to_identical_models_and_curves(trained: Path, tmp_path: Path) -> None:
    """Actor, critic and EMA weights, the adaptive KL coefficient and the sampled rollouts all continue exactly."""
    longer = {"ppo": {"iterations": 6, "checkpoint_every": 2, "kl": {"target": 1.0, "horizon": 100}}}
    runs = {}
    for name, env in (("straight", None), ("killed", {"RLHF_FAULT_KILL_AT_STEP": "3"})):
        work = tmp_path / name
        shutil.copytree(trained / "data", work / "data")
        shutil.copytree(trained / "models", work / "models", ignore=shutil.ignore_patterns("ppo"))
        write_params(work / "params.yaml", longer)
        proc = run_cli("ppo", "--params", "params.yaml", cwd=work, check=False, env=env)
        if env:
            assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
            assert not (work / "models/ppo").exists()
            proc = run_cli("ppo", "--params", "params.yaml", cwd=work)
            assert "resumed from checkpoints/ppo/step-00000002" in proc.stdout
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[name] = work

    for model in ("actor", "critic", "actor_ema"):
        a, b = (_weights(runs[n] / "models/ppo" / model) for n in ("straight", "killed"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), model
    sft = _weights(trained / "models/sft")
    actor = _weights(runs["killed"] / "models/ppo/actor")
    assert sum(not torch.equal(actor[k], sft[k]) for k in sft) >= len(sft) // 2
    for curve in ("ppo/reward", "ppo/kl", "ppo/kl_coef", "ppo/actor_loss", "ppo/critic_loss"):
        assert _curve(runs["straight"] / "dvclive/ppo", curve) == _curve(runs["killed"] / "dvclive/ppo", curve), curve
    assert len(_curve(runs["killed"] / "dvclive/ppo", "ppo/reward")) == 6
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(runs["killed"] / "models/ppo/actor_ema")
