"""Stage `check`: validate all of params.yaml before `dvc repro` runs (and so removes the outputs of) any stage."""

from __future__ import annotations

from pathlib import Path

import typer

from stages.common import PARAMS_OPTION, guarded, read_params


def check(
    params_path: Path = PARAMS_OPTION,
    out: Path = typer.Option(Path("data/checked.txt"), help="written when the params pass (always the same bytes)"),
) -> None:
    """Check every params group and what it names (data paths, reward functions, models, device) in seconds."""
    from rlhf.pipeline.check import OK, run_check

    params = read_params(params_path)
    done = guarded(run_check, params)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.is_file() or out.read_text() != OK:
        out.write_text(OK)
    typer.echo(f"check: {params_path} passed ({', '.join(done)})")
