"""The pipeline as DVC runs it: `dvc repro` on a fresh repo, a reward.* edit that leaves sft up to date, and an
experiment that reruns only ppo and evaluate."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import ROOT, cli_env, write_params


def _run(*cmd: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env={**cli_env(), **(env or {})}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _commit(repo: Path, message: str) -> None:
    _run("git", "add", "-A", cwd=repo)
    _run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message, cwd=repo)


def _reproduced_repo(tmp_path: Path) -> Path:
    """A fresh git + DVC repo with the project's stages and tiny params, committed, after a first `dvc repro`."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("rlhf", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    write_params(repo / "params.yaml")
    _run("git", "init", "-q", cwd=repo)
    _run("dvc", "init", "-q", cwd=repo)
    shutil.copy(ROOT / ".dvc/config", repo / ".dvc/config")  # the embedded default remote: ../rlhf-dvc-storage
    _commit(repo, "init")  # dvclive needs a commit to exist
    _run("dvc", "repro", cwd=repo)
    return repo


def test_repro_then_reward_edit_keeps_sft_cached(tmp_path: Path) -> None:
    repo = _reproduced_repo(tmp_path)
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


def test_experiment_reruns_only_ppo_and_evaluate(tmp_path: Path) -> None:
    """`dvc exp run -S ppo.kl_coef=...` reuses the cached SFT and reward models and lists its metrics."""
    repo = _reproduced_repo(tmp_path)
    _commit(repo, "baseline")
    sft_before = (repo / "models/sft/model.safetensors").read_bytes()

    out = _run("dvc", "exp", "run", "-n", "kl05", "-S", "ppo.kl_coef=0.05", cwd=repo)
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"ppo", "evaluate"}, out
    assert (repo / "models/sft/model.safetensors").read_bytes() == sft_before
    shown = _run("dvc", "exp", "show", "--json", cwd=repo)
    assert "kl05" in shown and "gold_reward" in shown


def test_push_wipe_pull_restores_every_output_without_retraining(tmp_path: Path) -> None:
    """The embedded default remote (a folder beside the repo) carries every stage output to a teammate."""
    repo = _reproduced_repo(tmp_path)
    _run("dvc", "push", cwd=repo)
    assert (tmp_path / "rlhf-dvc-storage").is_dir()
    weights = (repo / "models/ppo/actor/model.safetensors").read_bytes()
    for path in (".dvc/cache", "data/prepared", "models"):
        shutil.rmtree(repo / path)
    _run("dvc", "pull", cwd=repo)
    assert (repo / "models/ppo/actor/model.safetensors").read_bytes() == weights
    assert json.loads(_run("dvc", "status", "--json", cwd=repo)) == {}
    out = _run("dvc", "repro", cwd=repo)
    assert "Running stage" not in out


def test_push_and_pull_through_s3(tmp_path: Path) -> None:
    """The same round trip against S3: moto's server mode on 127.0.0.1, started and stopped here, with dvc-s3."""
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        endpoint = f"http://127.0.0.1:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in aws.items() if "KEY" in k},
                          region_name="us-east-1")
        s3.create_bucket(Bucket="rlhf-team")
        repo = _reproduced_repo(tmp_path)
        _run("dvc", "remote", "add", "-d", "team", "s3://rlhf-team/store", cwd=repo)
        _run("dvc", "remote", "modify", "team", "endpointurl", endpoint, cwd=repo)
        _run("dvc", "push", cwd=repo, env=aws)
        stored = s3.list_objects_v2(Bucket="rlhf-team", Prefix="store/")
        assert stored["KeyCount"] > 0
        weights = (repo / "models/reward/model.safetensors").read_bytes()
        for path in (".dvc/cache", "data/prepared", "models"):
            shutil.rmtree(repo / path)
        _run("dvc", "pull", cwd=repo, env=aws)
        assert (repo / "models/reward/model.safetensors").read_bytes() == weights
        assert json.loads(_run("dvc", "status", "--json", cwd=repo)) == {}
    finally:
        server.stop()


def test_rlhf_train_writes_params_and_reproduces_with_step_times(tmp_path: Path) -> None:
    repo = _reproduced_repo(tmp_path)
    out = _run(sys.executable, "-m", "stages.cli", "train", "--deployment-type", "cpu", cwd=repo)
    assert yaml.safe_load((repo / "params.yaml").read_text())["engine"]["device"] == "cpu"
    last = out.strip().splitlines()[-1]
    assert last.startswith("train: wall time per step:")
    assert all(f"{step} " in last for step in ("prepare", "sft", "reward", "ppo", "evaluate"))
    assert json.loads(_run("dvc", "status", "--json", cwd=repo)) == {}
