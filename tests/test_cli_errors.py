"""The real `rlhf` command on bad input: exit code 2, one `error:` line on stderr, no traceback, outputs untouched.

Each case runs the console module in a fresh process (as dvc.yaml does) in a working folder that already holds
earlier outputs; a failed run must leave every one of those bytes as it was.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cli_env, write_params

TINY_TASK = {"task": {"num_rows": 50}}  # prepare on 50 rows takes seconds

# Outputs a previous, successful run left behind; a failing stage must not touch them.
EARLIER_OUTPUTS = {
    "data/prepared/sft_train.jsonl": '{"prompt": "earlier"}\n',
    "data/prepared/COMPLETE.json": '{"files": {}}\n',
    "data/prepared/tokenizer/tokenizer.json": "{}\n",
    "metrics/prepare.json": '{"rows_valid": 1}\n',
    "models/sft/model.safetensors": "not really weights",
    "metrics/sft.json": '{"perplexity": 1.0}\n',
    "dvclive/sft/metrics.json": "{}\n",
    "models/reward/model.safetensors": "not really weights",
    "metrics/reward.json": '{"accuracy": 1.0}\n',
}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder (relative path -> bytes), empty folders as b'<dir>'."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_file():
            out[rel] = p.read_bytes()
        elif p.is_dir() and not any(p.iterdir()):
            out[rel] = b"<dir>"
    return out


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A working folder with tiny params.yaml and earlier outputs in every default output path."""
    write_params(tmp_path / "params.yaml", TINY_TASK)
    for rel, text in EARLIER_OUTPUTS.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def fails_cleanly(work: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run `rlhf ARGS` in work; assert exit 2, one `error:` line on stderr, no traceback, nothing in work changed.
    Returns the error line."""
    before = snapshot(work)
    env = env or cli_env()
    assert env["HF_HUB_OFFLINE"] == "1" and env["HF_DATASETS_OFFLINE"] == "1"  # never reach the network
    proc = subprocess.run(
        [sys.executable, "-m", "stages.cli", *args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    shown = f"rlhf {' '.join(args)} -> {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 2, shown
    assert "Traceback" not in proc.stdout + proc.stderr, shown
    assert proc.stdout == "", shown  # no progress bars, launcher or DeepSpeed banners before the error
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0][len("error: "):].strip(), shown
    assert snapshot(work) == before, "a failed run changed the working folder"
    return lines[0]


def with_params(work: Path, *overrides: dict[str, Any]) -> None:
    write_params(work / "params.yaml", TINY_TASK, *overrides)


# ------------------------------------------------------------------------------------------------------ params


@pytest.mark.parametrize("stage", ["prepare", "sft", "reward"])
def test_unknown_key_in_params(work: Path, stage: str) -> None:
    with_params(work, {"sft": {"learning_rat": 0.1}})
    line = fails_cleanly(work, stage, "--params", "params.yaml")
    assert "sft.learning_rat" in line and "did you mean sft.learning_rate?" in line


def test_out_of_range_value_in_params(work: Path) -> None:
    with_params(work, {"engine": {"zero_stage": 5}})
    line = fails_cleanly(work, "sft", "--params", "params.yaml")
    assert "'engine.zero_stage' = 5" in line and "allowed: 0 <= zero_stage <= 3" in line


def test_global_batch_size_mismatch(work: Path) -> None:
    with_params(work, {"reward": {"global_batch_size": 7}})
    line = fails_cleanly(work, "reward", "--params", "params.yaml")
    assert "reward.global_batch_size (7) != reward.micro_batch_size" in line


@pytest.mark.parametrize("stage", ["prepare", "sft"])
def test_params_file_missing(work: Path, stage: str) -> None:
    line = fails_cleanly(work, stage, "--params", "nope.yaml")
    assert "nope.yaml" in line and "no such params file" in line


def test_params_not_yaml(work: Path) -> None:
    (work / "broken.yaml").write_text("sft:\n  epochs: [1, 2\n  micro_batch_size: 4\n")
    line = fails_cleanly(work, "prepare", "--params", "broken.yaml")
    assert "not valid YAML at line 3" in line


# -------------------------------------------------------------------------------------------------------- data


def test_prepare_with_missing_local_source(work: Path) -> None:
    with_params(work, {"data": {"sources": [{"path": "data/no_such_file.jsonl"}]}})
    line = fails_cleanly(work, "prepare", "--params", "params.yaml")
    assert "data/no_such_file.jsonl" in line and "not found" in line and "data.sources[].path" in line


def test_prepare_with_hub_id_offline(work: Path) -> None:
    with_params(work, {"data": {"sources": [{"path": "nobody-xyz/no-such-dataset-xyz"}]}})
    env = dict(cli_env(), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    line = fails_cleanly(work, "prepare", "--params", "params.yaml", env=env)
    assert "nobody-xyz/no-such-dataset-xyz" in line and "save_to_disk" in line


def write_bad_jsonl(work: Path) -> Path:
    """Rows in prompt/completion format that are all invalid: empty texts and an empty prompt."""
    path = work / "bad.jsonl"
    rows = [
        {"prompt": "", "completion": "x"},
        {"prompt": "sort 2 1", "completion": "  "},
        {"prompt": "", "completion": ""},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prepare_every_row_bad_error_mode(work: Path) -> None:
    write_bad_jsonl(work)
    with_params(work, {"data": {"sources": [{"path": "bad.jsonl"}], "invalid_rows": "error"}})
    line = fails_cleanly(work, "prepare", "--params", "params.yaml")
    assert "data source 'bad.jsonl' row 0" in line and "empty_text" in line and "invalid_rows: drop" in line


def test_prepare_every_row_bad_drop_mode(work: Path) -> None:
    write_bad_jsonl(work)
    with_params(work, {"data": {"sources": [{"path": "bad.jsonl"}], "invalid_rows": "drop"}})
    line = fails_cleanly(work, "prepare", "--params", "params.yaml")
    assert "no valid rows" in line and "'empty_text': 3" in line


# ------------------------------------------------------------------------------------------------ training steps


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_training_step_without_tokenizer_fails_before_deepspeed(work: Path, stage: str) -> None:
    (work / "empty_data").mkdir()
    line = fails_cleanly(work, stage, "--params", "params.yaml", "--data", "empty_data")
    assert "no trained tokenizer in empty_data/tokenizer" in line and "rlhf prepare" in line
