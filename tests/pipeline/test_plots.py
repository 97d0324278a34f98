"""`rlhf plots`: the `dvc plots show` page with its plotting libraries inlined, loaded in a real headless browser
(Debian's Chromium) with no network: every plot draws, and the evaluate comparison has a bar per actor."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import reproduced_repo, run_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _rendered(page: Path) -> str:
    """The page's DOM after its scripts ran, from headless Chromium (no network is used or reachable)."""
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=30000", "--dump-dom",
         page.resolve().as_uri()], capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (`make test` installs Debian's where it can; CI does)")
def test_the_plots_page_draws_every_chart_offline_in_a_browser(tmp_path: Path, reproduced: Path) -> None:
    repo = reproduced_repo(tmp_path, reproduced)
    run_cli("plots", "--out", "dvc_plots", cwd=repo)
    page = repo / "dvc_plots/index.html"
    html = page.read_text()
    assert "cdn.jsdelivr.net" not in html and "<script src=" not in html  # nothing to fetch
    charts = html.count("vegaEmbed(")
    assert charts >= 20, charts  # every stage's curves and the evaluate comparison

    dom = _rendered(page)
    assert dom.count('class="marks"') == charts, "a chart did not draw"
    bars = re.findall(r'aria-label="gold_reward: [0-9.e-]+; model: (\w+)', dom)
    assert sorted(bars) == ["dpo", "ema", "ppo", "sft"], bars  # the evaluate stage's bar chart, one bar per actor
    assert "mark-line" in dom  # and the curves (ppo/reward, ppo/kl, ...) as lines
