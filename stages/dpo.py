"""Stage `dpo`: step 2's alternative, DPO of the SFT actor on the preference pairs."""

from __future__ import annotations

from pathlib import Path

import typer

from stages.common import PARAMS_OPTION, check_memory, guarded, is_main_rank, read_params, relaunch_if_distributed


def dpo(
    params_path: Path = PARAMS_OPTION,
    data: Path = typer.Option(Path("data/prepared"), help="folder written by `rlhf prepare` (its reward split)"),
    sft: Path = typer.Option(Path("models/sft"), help="the SFT actor (initialises the policy and the reference)"),
    out: Path = typer.Option(Path("models/dpo"), help="HF model folder to write"),
    metrics: Path = typer.Option(Path("metrics/dpo.json"), help="final metrics (JSON)"),
    live: Path = typer.Option(Path("dvclive/dpo"), help="dvclive folder for per-step curves"),
    checkpoints: Path = typer.Option(
        Path("checkpoints/dpo"), help="resumable checkpoints (every dpo.checkpoint_every steps); a rerun resumes"
    ),
) -> None:
    """DPO (or cDPO, IPO: dpo.loss_type, dpo.label_smoothing) against the frozen SFT model, no reward model."""
    from rlhf.pipeline.guards import check_outputs
    from rlhf.pipeline.outputs import write_json
    from rlhf.prefs.dpo import run_dpo

    params = read_params(params_path)
    guarded(
        check_outputs, [params_path, data, sft], folders=[("--out", out)],
        files=[("--metrics", metrics)], scratch=[("--live", live), ("--checkpoints", checkpoints)],
    )
    check_memory("dpo", params, sft)
    relaunch_if_distributed(params)
    result = guarded(run_dpo, params, data, sft, out, live, checkpoints)
    if is_main_rank():
        write_json(metrics, result)
        if not result.get("trained", True):
            typer.echo(f"dpo: no preference pairs to train on (rewards.model_weight 0): placeholder -> {out}")
        else:
            typer.echo(
                f"dpo: model -> {out}, metrics -> {metrics} (held-out pairs: accuracy {result['accuracy']:.3f}, "
                f"margin {result['margin']:.3f})"
            )
