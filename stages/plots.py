"""`rlhf plots`: `dvc plots show` as a page that works offline (not a DVC stage).

DVC's page loads Vega, Vega-Lite and vega-embed from a CDN, so on a machine without the internet it draws nothing.
This command gives `dvc plots show` an HTML template with those libraries inlined (vl-convert's bundle), so the
page (every plot of dvc.yaml: the evaluate stage's comparison, each stage's curves) renders from the file alone."""

from __future__ import annotations

import subprocess
from pathlib import Path

import typer

from stages.common import fail

TEMPLATE = Path(".dvc/tmp/plots-offline.html")
VEGA_LITE = "v5.21"  # the schema of the specs DVC writes


def offline_template(path: Path = TEMPLATE) -> Path:
    """An HTML template for `dvc plots show --html-template` with the plotting libraries inlined (made once)."""
    if not path.is_file():
        import vl_convert

        bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n{refresh_tag}\n<title>rlhf-dvc plots</title>\n"
            f"<script>{bundle}</script>\n<style>body {{ font-family: sans-serif; }}</style>\n</head>\n<body>\n"
            "{plot_divs}\n</body>\n</html>\n"
        )
    return path


def plots(
    targets: list[str] | None = typer.Argument(None, help="plots or curve files to show (default: every plot)"),
    out: Path = typer.Option(Path("dvc_plots"), help="folder for index.html (as `dvc plots show -o`)"),
) -> None:
    """Render the plots of dvc.yaml (or only TARGETS) to OUT/index.html, drawable offline."""
    template = offline_template()
    proc = subprocess.run(["dvc", "plots", "show", *(targets or []), "--html-template", str(template), "-o", str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        fail(f"dvc plots show failed ({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}): "
             "run `dvc repro` first, in the project folder")
    typer.echo(f"plots: {out / 'index.html'} (opens offline)")
