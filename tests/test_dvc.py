"""The pipeline as DVC runs it: `dvc repro` on a fresh repo, and a reward.* edit that leaves sft up to date."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.conftest import ROOT, cli_env, write_params


def _run(*cmd: str, cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_repro_then_reward_edit_keeps_sft_cached(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("rlhf", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    write_params(repo / "params.yaml")
    _run("git", "init", "-q", cwd=repo)
    _run("dvc", "init", "-q", cwd=repo)
    _run("git", "add", "-A", cwd=repo)
    _run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init", cwd=repo)

    _run("dvc", "repro", cwd=repo)
    assert (repo / "models/sft/model.safetensors").is_file() and (repo / "models/reward/model.safetensors").is_file()
    assert json.loads(_run("dvc", "status", "--json", cwd=repo)) == {}
    metrics = json.loads(_run("dvc", "metrics", "show", "--json", cwd=repo))
    assert "metrics/reward.json" in json.dumps(metrics)

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["reward"]["learning_rate"] = params["reward"]["learning_rate"] / 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(_run("dvc", "status", "--json", cwd=repo))
    assert set(status) == {"reward"}, status
    sft_before = (repo / "models/sft/model.safetensors").read_bytes()
    out = _run("dvc", "repro", cwd=repo)
    assert "Running stage 'reward'" in out and "Running stage 'sft'" not in out
    assert (repo / "models/sft/model.safetensors").read_bytes() == sft_before
