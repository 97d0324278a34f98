"""Stage `sft`: supervised fine-tuning of the actor."""

from __future__ import annotations

from pathlib import Path

import typer

from stages.common import PARAMS_OPTION, check_memory, guarded, is_main_rank, read_params, relaunch_if_distributed


def sft(
    params_path: Path = PARAMS_OPTION,
    data: Path = typer.Option(Path("data/prepared"), help="folder written by `rlhf prepare`"),
    out: Path = typer.Option(Path("models/sft"), help="HF model folder to write"),
    metrics: Path = typer.Option(Path("metrics/sft.json"), help="final metrics (JSON)"),
    live: Path = typer.Option(Path("dvclive/sft"), help="dvclive folder for per-step curves"),
    checkpoints: Path = typer.Option(
        Path("checkpoints/sft"), help="resumable checkpoints (every sft.checkpoint_every steps); a rerun resumes"
    ),
) -> None:
    """Step 1: fine-tune the actor on demonstrations."""
    from rlhf.pipeline.guards import check_outputs
    from rlhf.pipeline.outputs import write_json
    from rlhf.training.sft import run_sft

    params = read_params(params_path)
    guarded(
        check_outputs, [params_path, data, params.model.name_or_path], folders=[("--out", out)],
        files=[("--metrics", metrics)], scratch=[("--live", live), ("--checkpoints", checkpoints)],
    )
    check_memory("sft", params)
    relaunch_if_distributed(params)
    result = guarded(run_sft, params, data, out, live, checkpoints)
    if is_main_rank():
        write_json(metrics, result)
        typer.echo(f"sft: model -> {out}, metrics -> {metrics} (perplexity {result['perplexity']:.3f})")
