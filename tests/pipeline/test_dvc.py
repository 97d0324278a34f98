"""The pipeline as DVC runs it: `dvc repro` on a fresh repo, a reward.* edit that leaves sft up to date, and an
experiment that reruns only ppo and evaluate."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import cli_env, commit, copy_project, reproduced_repo, run_ok, write_params


def test_repro_then_reward_edit_keeps_sft_cached(tmp_path: Path, reproduced: Path) -> None:
    repo = reproduced_repo(tmp_path, reproduced)
    assert (repo / "models/sft/model.safetensors").is_file() and (repo / "models/reward/model.safetensors").is_file()
    assert json.loads(run_ok("dvc", "status", "--json", cwd=repo)) == {}
    metrics = json.loads(run_ok("dvc", "metrics", "show", "--json", cwd=repo))
    assert "metrics/reward.json" in json.dumps(metrics)

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["reward"]["learning_rate"] = params["reward"]["learning_rate"] / 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(run_ok("dvc", "status", "--json", cwd=repo))
    assert set(status) == {"check", "reward"}, status  # check reads all of params.yaml; its output stays the same
    sft_before = (repo / "models/sft/model.safetensors").read_bytes()
    out = run_ok("dvc", "repro", cwd=repo)
    assert "Running stage 'reward'" in out and "Running stage 'sft'" not in out
    assert (repo / "models/sft/model.safetensors").read_bytes() == sft_before

    # A typo in sft.*: `dvc repro` stops at the check stage with one line, before DVC removes any stage's outputs
    # (models/sft, and metrics/sft.json and the curves, which DVC's cache does not keep)
    before = {rel: data for rel, data in _snapshot(repo).items() if rel.startswith(("models/", "metrics/", "dvclive/"))}
    params["sft"]["learning_rat"] = 0.1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.run(["dvc", "repro"], cwd=repo, env=cli_env(), capture_output=True, text=True, timeout=300)
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("error: ")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stdout + proc.stderr
    assert "sft.learning_rat" in errors[0] and "did you mean sft.learning_rate?" in errors[0], errors
    assert "every earlier output is as it was" in errors[0], errors
    assert "Traceback" not in proc.stdout + proc.stderr
    after = {rel: data for rel, data in _snapshot(repo).items() if rel.startswith(("models/", "metrics/", "dvclive/"))}
    assert after == before, "a params typo under dvc repro changed earlier outputs"
    # fixed: the check passes with the same output bytes, so no stage after it is stale
    del params["sft"]["learning_rat"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run_ok("dvc", "repro", cwd=repo)
    assert [ln for ln in out.splitlines() if ln.startswith("Running stage")] == ["Running stage 'check':"], out


def test_experiment_reruns_only_ppo_and_evaluate(tmp_path: Path, reproduced: Path) -> None:
    """`dvc exp run -S ppo.algorithm=dapo` (DAPO's preset: dynamic sampling, the overlong punishment, truncated
    answers masked) reuses the cached SFT and reward models and lists its metrics; `-S dpo.loss_type=simpo` reruns
    the dpo stage alone, without a reference."""
    repo = reproduced_repo(tmp_path, reproduced)
    commit(repo, "baseline")
    sft_before = (repo / "models/sft/model.safetensors").read_bytes()

    out = run_ok("dvc", "exp", "run", "-n", "dapo", "-S", "ppo.algorithm=dapo", cwd=repo)
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"check", "ppo", "evaluate"}, out  # check: seconds, and its output unchanged
    assert (repo / "models/sft/model.safetensors").read_bytes() == sft_before
    curves = repo / "dvclive/ppo/plots/metrics/ppo"
    assert (curves / "dynamic_rounds.tsv").is_file() and (curves / "sampled_reward.tsv").is_file()
    out = run_ok("dvc", "exp", "run", "-n", "simpo", "-S", "dpo.loss_type=simpo", cwd=repo)
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"check", "dpo", "evaluate"} and "[dpo] simpo has no reference model" in out, out
    shown = run_ok("dvc", "exp", "show", "--json", cwd=repo)
    assert "dapo" in shown and "simpo" in shown and "gold_reward" in shown


def test_push_wipe_pull_restores_every_output_without_retraining(tmp_path: Path, reproduced: Path) -> None:
    """The embedded default remote (a folder beside the repo) carries every stage output to a teammate."""
    repo = reproduced_repo(tmp_path, reproduced)
    run_ok("dvc", "push", cwd=repo)
    assert (tmp_path / "rlhf-dvc-storage").is_dir()
    weights = (repo / "models/ppo/actor/model.safetensors").read_bytes()
    for path in (".dvc/cache", "data/prepared", "models"):
        shutil.rmtree(repo / path)
    run_ok("dvc", "pull", cwd=repo)
    assert (repo / "models/ppo/actor/model.safetensors").read_bytes() == weights
    assert json.loads(run_ok("dvc", "status", "--json", cwd=repo)) == {}
    out = run_ok("dvc", "repro", cwd=repo)
    assert "Running stage" not in out

    # The model registry: dvc.yaml's artifacts, a version registered with gto (a git tag), and a teammate's clone
    # that takes one model from the shared remote with `dvc artifacts get`, without the pipeline
    from transformers import AutoModelForCausalLM

    commit(repo, "trained")
    run_ok("gto", "register", "rl-actor", cwd=repo)
    run_ok("git", "clone", "-q", str(repo), str(tmp_path / "teammate"), cwd=tmp_path)
    run_ok("dvc", "artifacts", "get", ".", "rl-actor", "-o", "got/actor", cwd=tmp_path / "teammate")
    got = tmp_path / "teammate/got/actor"
    assert (got / "model.safetensors").read_bytes() == weights
    assert AutoModelForCausalLM.from_pretrained(got).config.architectures == ["LlamaForCausalLM"]
    listed = yaml.safe_load((repo / "dvc.yaml").read_text())["artifacts"]
    assert {a["path"] for a in listed.values()} >= {"models/sft", "models/reward", "models/ppo/actor"}


def test_push_and_pull_through_s3(tmp_path: Path, reproduced: Path) -> None:
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
        repo = reproduced_repo(tmp_path, reproduced)
        run_ok("dvc", "remote", "add", "-d", "team", "s3://rlhf-team/store", cwd=repo)
        run_ok("dvc", "remote", "modify", "team", "endpointurl", endpoint, cwd=repo)
        run_ok("dvc", "push", cwd=repo, env=aws)
        stored = s3.list_objects_v2(Bucket="rlhf-team", Prefix="store/")
        assert stored["KeyCount"] > 0
        weights = (repo / "models/reward/model.safetensors").read_bytes()
        for path in (".dvc/cache", "data/prepared", "models"):
            shutil.rmtree(repo / path)
        run_ok("dvc", "pull", cwd=repo, env=aws)
        assert (repo / "models/reward/model.safetensors").read_bytes() == weights
        assert json.loads(run_ok("dvc", "status", "--json", cwd=repo)) == {}
    finally:
        server.stop()


def test_rlhf_train_writes_params_and_reproduces_with_step_times(tmp_path: Path, reproduced: Path) -> None:
    repo = reproduced_repo(tmp_path, reproduced)
    out = run_ok(sys.executable, "-m", "stages.cli", "train", "--deployment-type", "cpu", cwd=repo)
    assert yaml.safe_load((repo / "params.yaml").read_text())["engine"]["device"] == "cpu"
    lines = out.strip().splitlines()
    last = next(line for line in lines if line.startswith("train: wall time per step:"))
    table = lines[lines.index(last) + 1:]  # then the summary: a row per stage, 100 columns at most
    assert table[0].split() == ["stage", "key", "figures", "train", "output"] and all(len(x) <= 100 for x in table)
    assert [row.split()[0] for row in table[2:]] == ["prepare", "sft", "reward", "dpo", "ppo", "evaluate"], table
    assert all(f"{step} " in last for step in ("prepare", "sft", "reward", "ppo", "evaluate"))
    assert json.loads(run_ok("dvc", "status", "--json", cwd=repo)) == {}


def _snapshot(repo: Path) -> dict[str, bytes]:
    """dvc.lock and every DVC cache object, byte for byte."""
    files = {"dvc.lock": (repo / "dvc.lock").read_bytes()} if (repo / "dvc.lock").exists() else {}
    cache = repo / ".dvc/cache"
    files |= {str(p.relative_to(repo)): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()}
    return files


def test_killed_stage_leaves_lock_and_cache_untouched_then_resumes(tmp_path: Path) -> None:
    """SIGKILL `dvc repro`'s sft mid-run: dvc.lock and the cache are as before; the next `dvc repro` resumes from
    the checkpoint and succeeds. Then a corrupted cache object is detected, not checked out as the model."""
    repo = copy_project(tmp_path / "repo")
    write_params(repo / "params.yaml", {"sft": {"max_steps": 12, "checkpoint_every": 4}})
    run_ok("git", "init", "-q", cwd=repo)
    run_ok("dvc", "init", "-q", cwd=repo)
    commit(repo, "init")
    run_ok("dvc", "repro", "prepare", cwd=repo)
    before = _snapshot(repo)

    proc = subprocess.run(
        ["dvc", "repro", "sft"], cwd=repo, env={**cli_env(), "RLHF_FAULT_KILL_AT_STEP": "6"},
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode != 0
    assert _snapshot(repo) == before
    assert not (repo / "models/sft").exists() and (repo / "checkpoints/sft/step-00000004/COMPLETE.json").is_file()

    out = run_ok("dvc", "repro", "sft", cwd=repo)
    assert "resumed from checkpoints/sft/step-00000004" in out
    assert json.loads(run_ok("dvc", "status", "sft", "--json", cwd=repo)) == {}

    # corrupt the cached weights, drop the workspace copy, and ask DVC for it back
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    sft_dir = next(o for o in lock["stages"]["sft"]["outs"] if o["path"] == "models/sft")["md5"]
    listing = json.loads((repo / ".dvc/cache/files/md5" / sft_dir[:2] / sft_dir[2:]).read_text())
    weights_md5 = next(e["md5"] for e in listing if e["relpath"] == "model.safetensors")
    obj = repo / ".dvc/cache/files/md5" / weights_md5[:2] / weights_md5[2:]
    obj.chmod(0o644)
    obj.write_bytes(obj.read_bytes()[:-16] + b"\0" * 16)
    shutil.rmtree(repo / "models/sft")
    run_ok("dvc", "checkout", "models/sft", cwd=repo)  # DVC trusts its cache on checkout and links the bad bytes...
    proc = subprocess.run(
        [sys.executable, "-m", "stages.cli", "chat", "--model", "models/sft", "--prompt", "hi"],
        cwd=repo, env=cli_env(), capture_output=True, text=True, timeout=300,
    )  # ...our loader refuses them: the file no longer has the hash in COMPLETE.json
    assert proc.returncode == 2 and "does not match the hash in COMPLETE.json" in proc.stderr, proc.stderr[-2000:]
    status = json.loads(run_ok("dvc", "status", "--json", "sft", cwd=repo))
    assert {"changed outs": {"models/sft": "not in cache"}} in status["sft"], status  # DVC rehashes and notices
    shutil.rmtree(repo / "models/sft")
    proc = subprocess.run(["dvc", "checkout", "models/sft"], cwd=repo, env=cli_env(), capture_output=True, text=True)
    assert proc.returncode != 0 and "Checkout failed" in proc.stderr  # and from then on will not hand it out


def test_editing_a_row_of_a_local_source_makes_prepare_stale(tmp_path: Path) -> None:
    """A local file under data/sources/ is a dependency of prepare: after `dvc repro prepare`, changing one row of it
    shows prepare as changed (and a rerun records the new file's sha256)."""
    repo = copy_project(tmp_path / "repo")
    mine = repo / "data/sources/mine.jsonl"
    mine.write_text("".join(json.dumps({"prompt": f"Pick {i}.", "chosen": f"{i}", "rejected": f"{i + 1}"}) + "\n"
                            for i in range(30)))
    write_params(repo / "params.yaml", {"data": {"sources": [{"path": "data/sources/mine.jsonl"}]}})
    run_ok("git", "init", "-q", cwd=repo)
    run_ok("dvc", "init", "-q", cwd=repo)
    commit(repo, "init")
    run_ok("dvc", "repro", "prepare", cwd=repo)
    assert json.loads(run_ok("dvc", "status", "prepare", "--json", cwd=repo)) == {}
    before = json.loads((repo / "metrics/prepare.json").read_text())["sources"]["data/sources/mine.jsonl"]["sha256"]

    lines = mine.read_text().splitlines()
    lines[7] = json.dumps({"prompt": "Pick 7.", "chosen": "7", "rejected": "9"})
    mine.write_text("\n".join(lines) + "\n")
    status = json.loads(run_ok("dvc", "status", "prepare", "--json", cwd=repo))
    assert {"changed deps": {"data/sources": "modified"}} in status["prepare"], status
    run_ok("dvc", "repro", "prepare", cwd=repo)
    after = json.loads((repo / "metrics/prepare.json").read_text())["sources"]["data/sources/mine.jsonl"]["sha256"]
    assert after != before and after == hashlib.sha256(mine.read_bytes()).hexdigest()
