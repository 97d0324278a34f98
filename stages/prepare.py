"""Stage `prepare`: data sources -> validated, disjoint splits for the three steps, plus the tokenizer."""

from __future__ import annotations

from pathlib import Path

import typer

from stages.common import PARAMS_OPTION, guarded, read_params


def prepare(
    params_path: Path = PARAMS_OPTION,
    out: Path = typer.Option(Path("data/prepared"), help="folder for the splits and the tokenizer"),
    metrics: Path = typer.Option(Path("metrics/prepare.json"), help="row counts, invalid rows by reason"),
) -> None:
    """Load, validate and split the data; train the tokenizer when no pretrained model is named."""
    from rlhf.data.prepare import run_prepare
    from rlhf.pipeline.guards import check_outputs
    from rlhf.pipeline.outputs import write_json

    params = read_params(params_path)
    sources = [s.path for s in params.data.sources]  # local files and folders among them are inputs
    guarded(
        check_outputs, [params_path, *sources, params.model.name_or_path], folders=[("--out", out)],
        files=[("--metrics", metrics)],
    )
    stats = guarded(run_prepare, params, out)
    write_json(metrics, {k: v for k, v in stats.items() if k != "hashes"})
    for line in stats["warnings"]:
        typer.echo(f"warning: {line}", err=True)
    for path, src in stats["sources"].items():
        steps = ",".join(src["steps"]) if isinstance(src["steps"], list) else src["steps"]
        went = ", ".join(f"{k}={src[k]}" for k in (*stats["splits"], "unused") if src.get(k))
        typer.echo(
            f"prepare: source '{path}' (steps {steps}): {src['rows_valid']} valid of {src['rows_loaded']} rows -> "
            + (went or "nothing")
        )
    typer.echo(
        f"prepare: {stats['rows_valid']} valid rows over {stats['prompts_valid']} prompts "
        f"({stats['rows_invalid']} dropped) -> {out}; "
        + ", ".join(f"{k}={v} ({stats['prompts'][k]} prompts)" for k, v in stats["splits"].items())
    )
    if "reward" in stats["skipped_steps"]:
        typer.echo(
            "prepare: no row has a preference pair and rewards.model_weight is 0, so no reward model is trained "
            "(the reward stage writes a placeholder; the reward is rewards.functions alone)"
        )
