"""logging.report_to: TensorBoard and W&B (offline, no network) get the same scalars as dvclive, under the same
names; every training stage logs tokens/s and achieved FLOP/s (rlhf/training/flops.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli, write_params


def _tsv(path: Path) -> list[tuple[int, float]]:
    lines = path.read_text().splitlines()
    head = lines[0].split("\t")
    s, v = head.index("step"), len(head) - 1
    return [(int(r.split("\t")[s]), float(r.split("\t")[v])) for r in lines[1:]]


def _wandb_records(path: Path) -> list[object]:
    """The protobuf records of an offline W&B run file (`run-ID.wandb`: LevelDB's log format, 32 KiB blocks of
    records with a 7-byte header, after W&B's own 7-byte file header)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block = path.read_bytes(), 7, 32768
    assert data.startswith(b":W&B")
    chunks, buf = [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:  # full
            chunks.append(chunk)
        elif kind == 2:  # first
            buf = chunk
        elif kind == 3:  # middle
            buf += chunk
        elif kind == 4:  # last
            chunks.append(buf + chunk)
    records = []
    for raw in chunks:
        record = pb.Record()
        record.ParseFromString(raw)
        records.append(record)
    return records


def test_tensorboard_and_wandb_get_the_same_scalars_as_dvclive(prepared: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    work = tmp_path / "work"
    shutil.copytree(prepared / "data", work / "data")
    write_params(work / "params.yaml", {"logging": {"report_to": ["dvclive", "tensorboard", "wandb"]}})
    run_cli("sft", "--params", "params.yaml", cwd=work, env={"WANDB_API_KEY": "", "NETRC": str(tmp_path / "no-netrc")})
    curves = work / "dvclive/sft/plots/metrics"
    loss = _tsv(curves / "train/loss.tsv")
    assert len(loss) == 3  # 6 steps, a point every 2

    events = EventAccumulator(str(work / "runs/sft"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "train/tflops", "eval/perplexity"} <= tags, tags
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("train/loss")] == loss

    runs = sorted((work / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((work / "wandb").iterdir())  # offline: no key, no network
    records = _wandb_records(next(runs[0].glob("run-*.wandb")))
    def key(item: object) -> str:  # W&B writes a key whole or as its nested parts
        return item.key or "/".join(item.nested_key)

    history = [(r.history.step.num, {key(i): json.loads(i.value_json) for i in r.history.item}) for r in records
               if r.WhichOneof("record_type") == "history"]
    assert [(step, pytest.approx(h["train/loss"], rel=1e-6)) for step, h in history] == loss
    assert all("train/tflops" in h and "train/tokens_per_s" in h for _, h in history)
    summary = {key(i): json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "summary"
               for i in r.summary.update}
    metrics = json.loads((work / "metrics/sft.json").read_text())
    assert summary["perplexity"] == pytest.approx(metrics["perplexity"])


def test_every_training_stage_logs_tokens_per_second_and_flops(ppo_trained: Path) -> None:
    for stage, names in (("sft", ("train/tokens_per_s", "train/tflops")),
                         ("reward", ("train/tokens_per_s", "train/tflops")),
                         ("ppo", ("ppo/gen_tflops", "ppo/score_tflops", "ppo/train_tflops"))):
        for name in names:
            points = _tsv(ppo_trained / f"dvclive/{stage}/plots/metrics/{name}.tsv")
            assert points and all(v > 0 for _, v in points), (stage, name, points)


def test_a_logger_whose_package_is_missing_is_one_line(monkeypatch) -> None:
    import importlib.util

    from rlhf.config import check_loggers
    from rlhf.errors import UserError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match="logging.report_to lists wandb but the wandb package is not installed"):
        check_loggers(["tensorboard", "wandb"])
