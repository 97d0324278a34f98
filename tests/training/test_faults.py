"""Injected faults: non-finite losses are skipped and counted, too many in a row abort with no output written,
PPO stops early when it drifts too far from the reference, and half-written checkpoints are never loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tests.conftest import run_cli, write_params


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _copy(prepared: Path, dest: Path, *overrides: dict) -> Path:
    shutil.copytree(prepared / "data", dest / "data")
    write_params(dest / "params.yaml", *overrides)
    return dest


def test_non_finite_steps_are_skipped_without_touching_the_weights(prepared: Path, tmp_path: Path) -> None:
    """NaN losses at steps 3 and 4 are skipped: the run takes the same 6 steps, on later batches, and the skipped
    updates leave no trace (the step-2 checkpoint's weights are those of a run that ends at step 2)."""
    work = _copy(prepared, tmp_path / "nan", {"sft": {"log_every": 1}})
    proc = run_cli("sft", "--params", "params.yaml", cwd=work, env={"RLHF_FAULT_NAN_AT_STEPS": "3"})
    assert proc.stdout.count("non-finite loss or gradient, step skipped") == 1
    metrics = json.loads((work / "metrics/sft.json").read_text())
    assert metrics["skipped_steps"] == 1 and metrics["steps"] == 6
    final = _weights(work / "models/sft")
    assert all(torch.isfinite(v).all() for v in final.values())



def test_a_skipped_step_leaves_weights_and_optimizer_state_as_if_the_batch_were_absent() -> None:
    """In process, on a real DeepSpeed engine: training on [a, NaN-batch, b] ends bit for bit where training on
    [a, b] ends, weights and Adam moments alike."""
    from rlhf.config import EngineConfig, TrainConfig
    from rlhf.training.loaders import make_loader
    from rlhf.training.loop import fit
    from rlhf.training.metrics import MetricsLogger
    from rlhf.training.runtime import init_distributed, initialize

    engine_cfg = EngineConfig(device="cpu")
    train = TrainConfig(micro_batch_size=1, learning_rate=0.1, warmup_ratio=0.0, lr_schedule="constant", log_every=1)
    dist = init_distributed(engine_cfg)
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[-1.0, 0.5]])

    def run(rows: list) -> tuple[dict, dict]:
        torch.manual_seed(0)
        engine = initialize(torch.nn.Linear(2, 1), engine_cfg, train, total_steps=2)
        loader = make_loader(rows, 1, lambda batch: batch[0], dist, seed=0, shuffle=False)
        loss_fn = lambda eng, x: (eng(x).pow(2).mean(), {})  # noqa: E731 - a NaN input gives a NaN loss
        metrics = fit(engine, loader, loss_fn, lambda: {}, train, dist, MetricsLogger(None, dist), "t", total=2)
        state = engine.optimizer.state_dict()["state"]
        return {k: v.clone() for k, v in engine.module.state_dict().items()}, {
            (i, k): v.clone() for i, s in state.items() for k, v in s.items() if torch.is_tensor(v)
        } | {"skipped": metrics["skipped_steps"]}

    clean_w, clean_opt = run([a, b])
    nan_w, nan_opt = run([a, torch.full((1, 2), float("nan")), b])
    assert nan_opt.pop("skipped") == 1 and clean_opt.pop("skipped") == 0
    assert all(torch.equal(clean_w[k], nan_w[k]) for k in clean_w)
    assert clean_opt.keys() == nan_opt.keys() and all(torch.equal(clean_opt[k], nan_opt[k]) for k in clean_opt)
    assert not torch.equal(clean_w["weight"], run([a])[0]["weight"])  # and the second step did move the weights


def test_consecutive_non_finite_steps_abort_with_nothing_written(prepared: Path, tmp_path: Path) -> None:
    """...and nothing of the previous run lost: its dvclive curves are still there. This stage fails after DeepSpeed
    started and the loop ran, where no bad-input case of tests/pipeline/test_cli_errors.py reaches (they all stop while
    loading params, data or models): dvclive, opened before the loop, used to clear dvclive/sft here."""
    work = _copy(prepared, tmp_path / "abort", {"sft": {"max_bad_steps": 2}})
    earlier = {"metrics.json": '{"train": {"loss": 0.5}}\n', "plots/metrics/train/loss.tsv": "step\tloss\n2\t0.5\n"}
    for rel, text in earlier.items():
        (work / "dvclive/sft" / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / "dvclive/sft" / rel).write_text(text)
    # step 1 trains (no point is logged before step 2: log_every 2), then two NaN losses in a row abort
    proc = run_cli("sft", "--params", "params.yaml", cwd=work, check=False, env={"RLHF_FAULT_NAN_AT_STEPS": "2,3,4"})
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "2 consecutive steps had a non-finite loss" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (work / "models/sft").exists() and not (work / "metrics/sft.json").exists()
    assert {rel: (work / "dvclive/sft" / rel).read_text() for rel in earlier} == earlier
    assert sorted(str(p.relative_to(work / "dvclive/sft")) for p in (work / "dvclive/sft").rglob("*.*")) == sorted(earlier)


def test_ppo_stops_early_when_kl_exceeds_kl_stop_above(trained: Path, tmp_path: Path) -> None:
    work = tmp_path / "kl"
    shutil.copytree(trained / "data", work / "data")
    shutil.copytree(trained / "models", work / "models", ignore=shutil.ignore_patterns("ppo"))
    write_params(work / "params.yaml", {"ppo": {"iterations": 6, "kl": {"stop_above": 1e-6}, "eval_prompts": 0}})
    proc = run_cli("ppo", "--params", "params.yaml", cwd=work)
    assert "PPO stopped early at iteration" in proc.stdout and "exceeds ppo.kl.stop_above" in proc.stdout
    metrics = json.loads((work / "metrics/ppo.json").read_text())
    assert metrics["stopped_early"] and metrics["iterations"] < 6
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(work / "models/ppo/actor")


def test_half_written_and_foreign_checkpoints_are_removed_not_loaded(prepared: Path, tmp_path: Path) -> None:
    work = _copy(prepared, tmp_path / "junk", {"sft": {"checkpoint_every": 2}})
    run_cli("sft", "--params", "params.yaml", cwd=work, env={"RLHF_FAULT_KILL_AT_STEP": "4"}, check=False)
    root = work / "checkpoints/sft"
    good = root / "step-00000004"
    assert (good / "COMPLETE.json").is_file()
    # a half-written newer one (no marker), a tampered newer one (a file no longer matches its hash), a temp folder
    shutil.copytree(good, root / "step-00000006")
    (root / "step-00000006/COMPLETE.json").unlink()
    shutil.copytree(good, root / "step-00000005")
    (root / "step-00000005/rank0.pt").write_bytes(b"torn")
    (root / ".tmp-step-00000007").mkdir()
    (root / "notes").mkdir()  # not a checkpoint: not ours to remove
    (root / "notes/todo.txt").write_text("mine")
    proc = run_cli("sft", "--params", "params.yaml", cwd=work)
    assert "resumed from checkpoints/sft/step-00000004" in proc.stdout
    for junk in ("step-00000006", "step-00000005", ".tmp-step-00000007"):
        assert f"removing checkpoints/sft/{junk}" in proc.stdout and not (root / junk).exists()
    assert (root / "notes/todo.txt").read_text() == "mine"

    # other params: the old checkpoint is not resumed, it is removed, and training starts from step 0
    write_params(work / "params.yaml", {"sft": {"checkpoint_every": 2, "learning_rate": 0.002}})
    proc = run_cli("sft", "--params", "params.yaml", cwd=work)
    assert "resumed" not in proc.stdout and "of other params" in proc.stdout
