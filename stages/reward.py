"""Stage `reward`: the reward model on preference pairs."""

from __future__ import annotations

from pathlib import Path

import typer

from stages.common import PARAMS_OPTION, check_memory, guarded, is_main_rank, read_params, relaunch_if_distributed


def reward(
    params_path: Path = PARAMS_OPTION,
    data: Path = typer.Option(Path("data/prepared"), help="folder written by `rlhf prepare`"),
    out: Path = typer.Option(Path("models/reward"), help="HF model folder to write"),
    metrics: Path = typer.Option(Path("metrics/reward.json"), help="final metrics (JSON)"),
    live: Path = typer.Option(Path("dvclive/reward"), help="dvclive folder for per-step curves"),
    checkpoints: Path = typer.Option(
        Path("checkpoints/reward"), help="resumable checkpoints (every reward.checkpoint_every steps); a rerun resumes"
    ),
) -> None:
    """Step 2: train the reward model on chosen/rejected pairs."""
    from rlhf.pipeline.guards import check_outputs
    from rlhf.pipeline.outputs import write_json
    from rlhf.prefs.reward_model import run_reward

    params = read_params(params_path)
    guarded(
        check_outputs, [params_path, data, params.reward_model.name_or_path], folders=[("--out", out)],
        files=[("--metrics", metrics)], scratch=[("--live", live), ("--checkpoints", checkpoints)],
    )
    check_memory("reward", params)
    relaunch_if_distributed(params)
    result = guarded(run_reward, params, data, out, live, checkpoints)
    if is_main_rank():
        write_json(metrics, result)
        if not result.get("trained", True):
            typer.echo(f"reward: no reward model to train (no preference pairs, rewards.model_weight 0): placeholder -> {out}")
        else:
            typer.echo(f"reward: model -> {out}, metrics -> {metrics} (held-out accuracy {result['accuracy']:.3f})")
