"""Outputs never destroy what they did not write: the checks every stage makes at its start, the atomic swap of an
output folder (SIGKILLed at each point of it), the sweep of what a killed write left, prepared data verified like a
model folder, dvclive untouched until the first point, and splits too small to train on refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.errors import UserError
from rlhf.pipeline.guards import check_outputs
from rlhf.pipeline.outputs import make_manifest, write_output_dir
from tests.conftest import ROOT, cli_env

MANIFEST = make_manifest("sft", {}, {}, seed=1, world_size=1)


def _write(out: Path, text: str) -> None:
    write_output_dir(out, lambda d: (d / "weights.txt").write_text(text), MANIFEST)


def _beside(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir())


def test_a_folder_this_project_did_not_write_is_refused_and_kept(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "README.md").write_text("the user's notes")
    with pytest.raises(UserError, match="holds files this project did not write .*README.md"):
        _write(data, "new")
    assert (data / "README.md").read_text() == "the user's notes" and _beside(data) == ["data"]
    # some other tool's manifest.json does not make a folder ours
    (data / "manifest.json").write_text('{"name": "a web app"}')
    with pytest.raises(UserError, match="did not write"):
        _write(data, "new")


def test_our_folders_are_replaced_and_a_folder_of_our_folders_counts_as_ours(tmp_path: Path) -> None:
    out = tmp_path / "models/sft"
    _write(out, "one")
    _write(out, "two")
    assert (out / "weights.txt").read_text() == "two" and _beside(out) == ["sft"]
    for name in ("actor", "critic"):  # models/ppo: no manifest of its own, only folders that have one
        _write(tmp_path / "models/ppo" / name, name)
    check_outputs([], folders=[("--out", tmp_path / "models/ppo")])
    (tmp_path / "models/ppo/notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt"):
        check_outputs([], folders=[("--out", tmp_path / "models/ppo")])


def test_outputs_that_are_inputs_files_or_the_working_folder_are_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data/mine.jsonl").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("x")
    refused = {
        "holds this stage's input 'data/mine.jsonl'": dict(folders=[("--out", Path("data"))]),
        "is this stage's input 'data'": dict(folders=[("--out", Path("data"))], inputs=["data"]),
        "is inside this stage's input 'data'": dict(folders=[("--out", Path("data/out"))], inputs=["data"]),
        "is the working folder": dict(folders=[("--out", Path("."))]),
        "is the working folder or a folder above it": dict(scratch=[("--live", tmp_path.parent)]),
        "'notes.txt' is a file, not a folder": dict(folders=[("--out", Path("notes.txt"))]),
        "inside 'notes.txt', which is a file": dict(files=[("--metrics", Path("notes.txt/m.json"))]),
        "'data' is a folder, not a file": dict(files=[("--metrics", Path("data"))]),
        "overlap": dict(folders=[("--out", Path("out"))], files=[("--metrics", Path("out/m.json"))]),
    }
    for expect, kwargs in refused.items():
        inputs = kwargs.pop("inputs", ["data/mine.jsonl"])
        with pytest.raises(UserError, match=expect.replace("(", r"\(").replace(")", r"\)")):
            check_outputs(inputs, **kwargs)
    check_outputs(["data/mine.jsonl", "nobody/a-hub-id"], folders=[("--out", Path("models/x"))],
                  files=[("--metrics", Path("metrics/x.json"))], scratch=[("--live", Path("dvclive/x"))])
    assert (tmp_path / "data/mine.jsonl").read_text() == "{}\n" and (tmp_path / "notes.txt").read_text() == "x"


KILLED_WRITE = """
import sys
from pathlib import Path
from rlhf.pipeline.outputs import make_manifest, write_output_dir
write_output_dir(Path(sys.argv[1]), lambda d: (d / "weights.txt").write_text("new"), make_manifest("sft", {}, {}, 1, 1))
"""


def _killed_write(out: Path, point: str) -> int:
    """Replace `out` in a child process that SIGKILLs itself at `point`; returns the child's pid."""
    env = {**cli_env(), "RLHF_FAULT_KILL_AT_POINT": point}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITE, str(out)], env=env, cwd=ROOT)
    assert proc.wait(timeout=120) == -9
    return proc.pid


def test_a_write_killed_between_the_two_renames_puts_the_previous_folder_back(tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    _write(out, "old")
    pid = _killed_write(out, "replace:aside")
    # the old folder moved aside, the complete new one not yet renamed in: nothing at `out`, nothing lost
    assert _beside(out) == [f".prepared.old-{pid}", f".prepared.tmp-{pid}"]
    check_outputs([], folders=[("--out", out)])  # a stage start sweeps: the previous folder is back
    assert _beside(out) == ["prepared"] and (out / "weights.txt").read_text() == "old"
    _write(out, "newer")
    assert _beside(out) == ["prepared"] and (out / "weights.txt").read_text() == "newer"


@pytest.mark.parametrize("point, content", [("replace:sealed", "old"), ("replace:renamed", "new")])
def test_a_write_killed_before_or_after_the_swap_leaves_one_whole_folder(tmp_path: Path, point: str, content: str) -> None:
    out = tmp_path / "prepared"
    _write(out, "old")
    pid = _killed_write(out, point)
    leftover = f".prepared.tmp-{pid}" if point == "replace:sealed" else f".prepared.old-{pid}"
    assert _beside(out) == sorted([leftover, "prepared"]) and (out / "weights.txt").read_text() == content
    check_outputs([], folders=[("--out", out)])
    assert _beside(out) == ["prepared"] and (out / "weights.txt").read_text() == content


def test_leftovers_of_a_running_process_are_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    _write(out, "old")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f".prepared.tmp-{other.pid}").mkdir()  # another run of this stage, still writing
        _write(out, "new")
        assert _beside(out) == sorted([f".prepared.tmp-{other.pid}", "prepared"])
    finally:
        other.kill()
        other.wait()
    _write(out, "newer")
    assert _beside(out) == ["prepared"]


def test_a_fill_that_fails_leaves_the_previous_folder_and_no_temp(tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    _write(out, "old")

    def fill(d: Path) -> None:
        (d / "weights.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_output_dir(out, fill, MANIFEST)
    assert _beside(out) == ["prepared"] and (out / "weights.txt").read_text() == "old"


def test_a_split_edited_by_hand_is_refused_naming_the_file_and_the_fix(tmp_path: Path) -> None:
    from rlhf.data.split import read_split, write_splits

    out = tmp_path / "prepared"
    write_output_dir(out, lambda d: write_splits(d, {"sft_train": [{"prompt": "a", "completion": "b"}]}),
                     make_manifest("prepare", {}, {}, 1, 1))
    assert read_split(out / "sft_train.jsonl") == [{"prompt": "a", "completion": "b"}]
    (out / "sft_train.jsonl").write_text('{"prompt": "a", "completion": "edited"}\n')
    os.utime(out / "COMPLETE.json")  # a new process would check again; this one caches by COMPLETE.json's mtime
    with pytest.raises(UserError) as err:
        read_split(out / "sft_train.jsonl")
    line = str(err.value)
    assert "sft_train.jsonl' does not match the hash in COMPLETE.json" in line
    assert f"dvc checkout {out}" in line and "dvc repro -f prepare" in line and "\n" not in line


def test_the_last_runs_curves_stay_until_a_run_completes(tmp_path: Path) -> None:
    """A run logs into dvclive/.sft.partial; dvclive/sft keeps the last complete run's curves until `close`, so a
    run that stops midway (a grader's failure at iteration 500) loses none of them; a new run starts its partial
    folder afresh."""
    from rlhf.training.metrics import MetricsLogger
    from rlhf.training.runtime import Dist

    live = tmp_path / "dvclive/sft"
    (live / "plots/metrics/train").mkdir(parents=True)
    (live / "metrics.json").write_text('{"earlier": 1}\n')
    (live / "plots/metrics/train/loss.tsv").write_text("step\tloss\n1\t0.5\n")
    rank0 = Dist(rank=0, world_size=1, local_rank=0, device="cpu")
    stopped = MetricsLogger(live, rank0)
    stopped.log(1, {"train/loss": 0.9})
    stopped.log(2, {"train/loss": 0.8})  # ... and the run stops here
    partial = tmp_path / "dvclive/.sft.partial"
    assert (partial / "plots/metrics/train/loss.tsv").read_text().splitlines()[1:] == ["1\t0.9", "2\t0.8"]
    assert (live / "metrics.json").read_text() == '{"earlier": 1}\n'
    assert (live / "plots/metrics/train/loss.tsv").read_text() == "step\tloss\n1\t0.5\n"

    logger = MetricsLogger(live, rank0)
    logger.log(1, {"train/loss": 0.25})
    assert (partial / "plots/metrics/train/loss.tsv").read_text().splitlines() == ["step\tloss", "1\t0.25"]
    assert (live / "plots/metrics/train/loss.tsv").read_text() == "step\tloss\n1\t0.5\n"
    logger.close({"final": 1.0})
    assert json.loads((live / "metrics.json").read_text())["train"]["loss"] == 0.25
    assert (live / "plots/metrics/train/loss.tsv").read_text().splitlines() == ["step\tloss", "1\t0.25"]
    assert not partial.exists() and not (tmp_path / "dvclive/.sft.old").exists()


# ------------------------------------------------------------------------------------ a step with nothing to learn


def test_a_split_smaller_than_one_global_batch_is_refused_with_its_size_and_the_fix() -> None:
    from rlhf.config import SFTConfig
    from rlhf.training.checks import check_eval_split, check_train_split, optimizer_steps

    cfg = SFTConfig(micro_batch_size=8, gradient_accumulation_steps=2)
    check_train_split("sft_train.jsonl", 32, cfg, "sft", world_size=2)  # exactly one global batch: one step
    assert optimizer_steps(32, cfg, 2) == cfg.epochs
    with pytest.raises(UserError) as err:
        check_train_split("data/prepared/sft_train.jsonl", 31, cfg, "sft", world_size=2)
    line = str(err.value)
    assert "data/prepared/sft_train.jsonl has 31 rows, fewer than one batch of 32" in line
    assert "sft.micro_batch_size 8 x sft.gradient_accumulation_steps 2 x 2 rank(s)" in line
    assert "data.data_split" in line and "lower sft.micro_batch_size" in line
    with pytest.raises(UserError, match="reward_train.jsonl is empty"):
        check_train_split("reward_train.jsonl", 0, cfg, "reward", world_size=1)
    with pytest.raises(UserError, match="sft_eval.jsonl is empty .*perplexity.*data.eval_fraction"):
        check_eval_split("sft_eval.jsonl", 0, "perplexity")


def test_ppo_prompts_fewer_than_one_rollout_batch_are_refused() -> None:
    from rlhf.config import PPOConfig
    from rlhf.training.checks import check_ppo_splits

    ppo = PPOConfig(rollout_batch_size=8, micro_batch_size=4, eval_prompts=4)
    check_ppo_splits(Path("d"), 16, 1, 0, ppo, world_size=2)
    with pytest.raises(UserError, match=r"d/ppo_train.jsonl has 15 rows, fewer than one batch of 16 \(ppo.rollout_batch_size 8"):
        check_ppo_splits(Path("d"), 15, 1, 0, ppo, world_size=2)
    with pytest.raises(UserError, match="ppo_eval.jsonl is empty.*ppo.eval_prompts: 0"):
        check_ppo_splits(Path("d"), 16, 0, 0, ppo, world_size=2)
    check_ppo_splits(Path("d"), 16, 0, 0, ppo.model_copy(update={"eval_prompts": 0}), world_size=2)
    with pytest.raises(UserError, match="sft_train.jsonl has 3 rows.*ppo.loss.ptx_coef"):
        ptx = ppo.model_copy(update={"loss": ppo.loss.model_copy(update={"ptx_coef": 0.5})})
        check_ppo_splits(Path("d"), 16, 1, 3, ptx, world_size=1)


def test_an_empty_prompt_loader_stops_instead_of_recursing_forever() -> None:
    from rlhf.data.batching import Cycle
    from rlhf.training.loaders import make_loader
    from rlhf.training.runtime import Dist

    dist = Dist(rank=0, world_size=1, local_rank=0, device="cpu")
    cycle = Cycle(make_loader([[1], [2], [3]], 4, lambda b: b, dist, seed=0, shuffle=True))  # drop_last: no batch
    with pytest.raises(UserError, match="gives no batch"):
        next(cycle)


def test_every_model_folder_has_a_model_card_that_huggingface_hub_loads(ppo_trained: Path) -> None:
    """README.md in Hugging Face's model-card format beside the weights of every model a stage wrote: its YAML
    header loads with huggingface_hub's ModelCard, and its body says how the model was made (from the manifest)."""
    from huggingface_hub import ModelCard

    folders = {"models/sft": ("sft", "text-generation"), "models/reward": ("reward", "text-classification"),
               "models/ppo/actor": ("ppo", "text-generation"), "models/ppo/critic": ("ppo", "text-classification"),
               "models/ppo/actor_ema": ("ppo", "text-generation")}
    for rel, (step, pipeline) in folders.items():
        card = ModelCard.load(ppo_trained / rel / "README.md")
        assert card.data.library_name == "transformers" and card.data.pipeline_tag == pipeline, (rel, card.data)
        assert step in card.data.tags and "rlhf" in card.data.tags
        manifest = json.loads((ppo_trained / rel / "manifest.json").read_text())
        assert f"Written by the `{step}` stage" in card.text and f'from_pretrained("{rel}")' in card.text
        for name, digest in manifest["inputs"].items():  # the data and model hashes of the manifest
            assert f"| {name} | `{digest}` |" in card.text
        assert "README.md" in json.loads((ppo_trained / rel / "COMPLETE.json").read_text())["files"]


def test_summary_is_a_short_table_of_every_stage(tmp_path: Path) -> None:
    """`rlhf summary` after a run: one row per stage with its key figures, at most 100 columns."""
    import shutil

    from tests.conftest import run_cli

    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    metrics = {
        "sft": {"perplexity": 1.4638, "steps": 504, "train_seconds": 120.0},
        "reward": {"accuracy": 0.878, "chosen_mean": 2.48, "rejected_mean": -0.19, "train_seconds": 300.0},
        "ppo": {"algorithm": "grpo", "reward_sft": 1.254, "reward_ppo": 4.069, "final_kl": 2.06, "iterations": 100},
        "evaluate": {"sft": {"gold_reward": 0.639, "kl_to_sft": 0.0}, "grpo": {"gold_reward": 0.87, "kl_to_sft": 0.1}},
    }
    (tmp_path / "metrics").mkdir()
    for stage, values in metrics.items():
        (tmp_path / "metrics" / f"{stage}.json").write_text(json.dumps(values))
    out = run_cli("summary", cwd=tmp_path).stdout.splitlines()
    assert all(len(line) <= 100 for line in out), out
    rows = {line.split()[0]: line for line in out[2:]}
    assert list(rows) == ["sft", "reward", "ppo", "evaluate"], out
    assert "perplexity 1.464" in rows["sft"] and "120 s" in rows["sft"] and "models/sft" in rows["sft"]
    assert "grpo: held-out reward 1.254 -> 4.069" in rows["ppo"]
    assert "gold_reward: sft 0.639 -> grpo 0.870" in rows["evaluate"]
    (tmp_path / "metrics").rename(tmp_path / "elsewhere")
    failed = run_cli("summary", cwd=tmp_path, check=False)
    assert failed.returncode == 2 and failed.stderr.startswith("error: no stage metrics"), failed.stderr
