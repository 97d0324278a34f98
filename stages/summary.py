"""`rlhf summary`: the short table of a run, per stage (not a DVC stage; `dvc metrics show` has every number)."""

from __future__ import annotations

from pathlib import Path

import typer

from stages.common import fail


def summary(folder: Path = typer.Option(Path("."), help="the project folder (with dvc.yaml and the metrics)")) -> None:
    """Per stage: its key figures (perplexity, pair accuracy, reward and KL, gold reward per actor), training time
    and output, at most 100 columns wide."""
    from rlhf.pipeline.summary import summary_lines

    lines = summary_lines(folder)
    if not lines:
        fail(f"no stage metrics under '{folder}' (dvc.yaml's metrics files): run `dvc repro` first")
    typer.echo("\n".join(lines))
