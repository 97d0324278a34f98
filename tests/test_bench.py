"""Smoke test of the benchmarks: `bench/run_all.py --smoke` runs every script on its smallest size and renders the
README tables from their results. It checks that they keep working, not what they measure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli_env


@pytest.mark.slow  # minutes on the shared 2-core machine: 2 min at load 3, 3 min 45 s at load 5
def test_run_all_smoke(tmp_path: Path) -> None:
    results, readme = tmp_path / "results", tmp_path / "README.md"
    proc = subprocess.run(
        [sys.executable, "bench/run_all.py", "--smoke", "--results", str(results), "--readme", str(readme)],
        cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = {p.stem: json.loads(p.read_text()) for p in results.glob("*.json")}
    assert set(records) == {"rl_iteration", "decode", "hybrid_generation", "matmul_efficiency", "dvc_savings",
                            "step3_scaling"}
    dec = records["decode"]["result"]["rows"][0]
    assert dec["own_tok_s"] > 0 and dec["generate_tok_s"] > 0 and dec["floor_tok_s"] > 0
    rl = records["rl_iteration"]["result"]["rows"][0]
    assert rl["ours"]["s_per_iter"] > 0 and rl["ours_grpo"]["s_per_iter"] > 0 and rl["speedup_vs_grpo"] > 0
    assert 0 < rl["ours"]["answer_tokens"] <= 4  # --new-tokens (fewer only where a random model sampled its eos)
    assert 0 < rl["ours"]["peak_fraction"] < 1 and rl["peak_flops_per_s"] > 0
    scaling = records["step3_scaling"]["result"]["rows"][0]
    assert scaling["s_per_iter"] > 0 and 0 < scaling["peak_fraction"] < 1
    assert abs(scaling["generate_share"] + scaling["score_share"] + scaling["train_share"] - 1) < 1e-9
    assert records["hybrid_generation"]["result"]["rows"][0]["hybrid_tok_s"] > 0
    mm = records["matmul_efficiency"]["result"]
    assert mm["peak_flops_per_s"]["fp32"] > 0 and 0 < mm["rows"][0]["fraction_of_peak"]
    assert all(v > 0 for v in records["dvc_savings"]["result"]["speedups"].values())
    text = readme.read_text()
    for record in records.values():
        assert record["command"] in text  # each table says how to reproduce it


def test_gpu_bench_runs_on_cpu(tmp_path: Path, prepared: Path) -> None:
    """bench/gpu.py --smoke on this machine (no GPU): every section runs on CPU, our loop's tokens equal generate's
    (eager and static step), and one step-3 iteration is timed, so the script is ready when a GPU is lent."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, "bench/gpu.py", "--smoke", "--tokenizer", str(prepared / "data/prepared/tokenizer"),
         "--out", str(out)],
        cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["peak"]["bf16_tflops"] > 0 and r["peak"]["copy_gb_s"] > 0
    assert set(r["exact"].values()) == {1.0} and len(r["exact"]) == 8
    assert r["decode"][0]["own_graph_tok_s"] > 0 and r["decode"][0]["generate_tok_s"] > 0
    step = r["step3"][0]
    assert step["s_per_iter"] > 0 and step["actor_params"] > 0 and 0 < step["peak_fraction"] < 1
