"""`rlhf train --deployment-type ...`: the params it writes, and the bad inputs it refuses without touching them."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.config import load_params
from tests.conftest import ROOT, run_cli


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    return path


def test_dry_run_writes_deployment_and_models_keeping_comments(params_file: Path) -> None:
    run_cli("train", "--params", str(params_file), "--actor-model", "models/my-actor", "--reward-model",
            "models/my-rm", "--deployment-type", "single_node", "--num-gpus", "4", "--dry-run", cwd=params_file.parent)
    p = load_params(params_file)
    assert (p.engine.device, p.engine.zero_stage, p.engine.num_procs, p.engine.dtype) == ("cuda", 2, 4, "bf16")
    assert p.model.name_or_path == "models/my-actor" and p.reward_model.name_or_path == "models/my-rm"
    before, after = (ROOT / "params.yaml").read_text().splitlines(), params_file.read_text().splitlines()
    changed = [a for b, a in zip(before, after) if a != b]
    # Only the lines of the changed keys differ; every comment survives.
    assert len(before) == len(after) and len(changed) == 6, changed
    assert all("#" in a for a, b in zip(after, before) if "#" in b)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--deployment-type", "moon"], "is unknown"),
        (["--deployment-type", "multi_node", "--num-gpus", "8"], "needs --hostfile"),
    ],
)
def test_bad_deployment_is_one_line_and_params_untouched(params_file: Path, args: list[str], message: str) -> None:
    before = params_file.read_bytes()
    proc = run_cli("train", "--params", str(params_file), *args, "--dry-run", cwd=params_file.parent, check=False)
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1
    assert params_file.read_bytes() == before


def test_dry_run_adds_the_groups_a_params_file_leaves_out(tmp_path: Path) -> None:
    """A params file without an `engine:` (or `model:`) group means their defaults: the deployment adds them."""
    path = tmp_path / "params.yaml"
    path.write_text("seed: 7\nengine:\n")  # an empty engine group, and no model group at all
    run_cli("train", "--params", str(path), "--actor-model", "models/my-actor", "--deployment-type", "cpu",
            "--dry-run", cwd=tmp_path)
    p = load_params(path)
    assert (p.seed, p.engine.device, p.model.name_or_path) == (7, "cpu", "models/my-actor")
