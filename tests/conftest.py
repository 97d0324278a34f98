"""Shared test helpers: tiny params built from the shipped params.yaml, and the real CLI in a subprocess.

Two layers: `make test` runs everything; `python -m pytest -m "not slow" tests` runs the unit layer alone (minutes).
A test is `slow` when it launches a process (the CLI, dvc, git, torchrun) or uses a fixture that does; it is marked
here at collection, and under `-m "not slow"` a test that still launches the CLI, DVC or another Python fails and
says to mark it."""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Small enough that a stage trains in seconds on 2 CPU cores, big enough that training visibly moves the weights.
TINY: dict[str, Any] = {
    "task": {"num_rows": 600},
    "tokenizer": {"vocab_size": 300},
    "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64},
    "reward_model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
    "sft": {"epochs": 1, "max_steps": 6, "micro_batch_size": 8, "eval_batch_size": 32, "log_every": 2},
    "reward": {"epochs": 1, "max_steps": 6, "micro_batch_size": 8, "eval_batch_size": 32, "log_every": 2},
    "ppo": {"iterations": 2, "rollout_batch_size": 8, "micro_batch_size": 4, "sampling": {"max_answer_tokens": 8},
            "eval_prompts": 8, "optimizer": {"actor_learning_rate": 0.01, "critic_learning_rate": 0.01}},
    "evaluate": {"num_prompts": 12, "batch_size": 8, "sampling": {"max_answer_tokens": 8}, "num_samples": 3},
}


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_params(path: Path, *overrides: dict[str, Any]) -> Path:
    """The shipped params.yaml with TINY and then each override applied."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for over in (TINY, *overrides):
        params = merge(params, over)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


# What a DVC repo of the project needs besides params.yaml: the code, the pipeline, the (empty) sources folder and
# the folder of the user's reward functions.
PROJECT_FILES = ("rlhf", "stages", "data/sources", "rewards", "dvc.yaml")


def copy_project(repo: Path) -> Path:
    """The project's pipeline and code copied into a new folder `repo` (for tests that run `dvc` there)."""
    repo.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, repo / name)
    return repo


def cli_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    # An in-process DeepSpeed test leaves rank variables behind; a child must start as a fresh single process.
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def run_cli(
    *args: str,
    cwd: Path,
    check: bool = True,
    timeout: float = 600,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """`rlhf ARGS` as a user runs it (a fresh process), returning its output. `env` adds variables (faults)."""
    proc = subprocess.run(
        [sys.executable, "-m", "stages.cli", *args],
        cwd=cwd,
        env={**cli_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"rlhf {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working folder with tiny params and `rlhf prepare` already run (data/prepared)."""
    work = tmp_path_factory.mktemp("pipeline")
    write_params(work / "params.yaml")
    run_cli("prepare", "--params", "params.yaml", cwd=work)
    return work


@pytest.fixture(scope="session")
def trained(prepared: Path) -> Path:
    """`prepared` with the SFT actor and the reward model trained (models/sft, models/reward)."""
    for stage in ("sft", "reward"):
        if not (prepared / "models" / stage / "COMPLETE.json").is_file():
            run_cli(stage, "--params", "params.yaml", cwd=prepared)
    return prepared


@pytest.fixture(scope="session")
def ppo_trained(trained: Path) -> Path:
    """`trained` with the ppo stage run on the tiny params (models/ppo/{actor,critic,actor_ema})."""
    if not (trained / "models/ppo/actor/COMPLETE.json").is_file():
        run_cli("ppo", "--params", "params.yaml", cwd=trained)
    return trained


@pytest.fixture(scope="module")
def dist():
    """A one-rank CPU process group for tests that build step 3's models in this process."""
    from rlhf.config import EngineConfig
    from rlhf.training.runtime import init_distributed

    return init_distributed(EngineConfig(device="cpu"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder shaped like `trained` (params.yaml, models/sft, models/reward) made in this process, without the CLI:
    TINY's sizes, a tokenizer trained on the shipped task's text, untrained weights. The unit layer's models, for
    tests that need step 3's models rather than trained ones."""
    import random

    from rlhf.config import load_params
    from rlhf.data.task import make_prompt, render_response
    from rlhf.models.build import build_causal_lm, build_reward_model, save_pretrained
    from rlhf.models.tokenizer import train_tokenizer

    work = tmp_path_factory.mktemp("tiny_models")
    params = load_params(write_params(work / "params.yaml"))
    rng = random.Random(0)
    numbers = [[rng.randrange(100) for _ in range(rng.randint(2, 6))] for _ in range(300)]
    texts = [make_prompt(n) + " " + render_response(sorted(n), rng.random() < 0.5) for n in numbers]
    tok = train_tokenizer(texts, params.tokenizer.vocab_size)
    save_pretrained(build_causal_lm(params.model, tok, params.seed), tok, work / "models/sft")
    save_pretrained(build_reward_model(params.reward_model, tok, params.seed), tok, work / "models/reward")
    return work


def run_ok(*cmd: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run a command (dvc, git, ...) in `cwd` with the CLI's environment; its stdout, after asserting it succeeded."""
    proc = subprocess.run(cmd, cwd=cwd, env={**cli_env(), **(env or {})}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


def commit(repo: Path, message: str) -> None:
    """git add -A and commit everything in `repo`."""
    run_ok("git", "add", "-A", cwd=repo)
    run_ok("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message, cwd=repo)


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh git + DVC repo with the project's stages and tiny params, committed, after a first `dvc repro`: made
    once per session; each test works on its own copy (`reproduced_repo`)."""
    repo = copy_project(tmp_path_factory.mktemp("reproduced") / "repo")
    write_params(repo / "params.yaml")
    run_ok("git", "init", "-q", cwd=repo)
    run_ok("dvc", "init", "-q", cwd=repo)
    shutil.copy(ROOT / ".dvc/config", repo / ".dvc/config")  # the embedded default remote: ../rlhf-dvc-storage
    commit(repo, "init")  # dvclive needs a commit to exist
    run_ok("dvc", "repro", cwd=repo)
    return repo


def reproduced_repo(tmp_path: Path, reproduced: Path) -> Path:
    """The test's own copy of the `reproduced` repo (git history, DVC cache and outputs) in tmp_path/repo."""
    return Path(shutil.copytree(reproduced, tmp_path / "repo", symlinks=True))


# ------------------------------------------------------------------------------------------------- the slow layer

SLOW_FIXTURES = {"prepared", "trained", "ppo_trained", "reproduced", "reproduced_repo"}
LAUNCHERS = ("run_cli(", "run_ok(", "commit(", "subprocess.", "torchrun", "_torchrun(")


def _launchers(module: Any) -> set[str]:
    """Names of `module`'s own functions that launch a process (one level: a helper calling run_cli)."""
    found = set()
    for name, obj in vars(module).items():
        if inspect.isfunction(obj) and obj.__module__ == module.__name__ and not name.startswith("test_"):
            try:
                src = inspect.getsource(obj)
            except (OSError, TypeError):
                continue
            if any(word in src for word in LAUNCHERS):
                found.add(name)
    return found


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    helpers: dict[str, set[str]] = {}
    for item in items:
        fn = getattr(item, "function", None)
        if fn is None or item.get_closest_marker("slow"):
            continue
        module = sys.modules[fn.__module__]
        if fn.__module__ not in helpers:
            helpers[fn.__module__] = _launchers(module)
        src = inspect.getsource(fn)
        calls = any(word in src for word in LAUNCHERS) or any(f"{h}(" in src for h in helpers[fn.__module__])
        if calls or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# What the unit layer may not launch: a Python process (the rlhf CLI, a bench script), DVC or a launcher. Libraries'
# own helpers (DeepSpeed's JIT compile through ninja, dvclive's git) stay allowed.
LAUNCHED = {"rlhf", "dvc", "torchrun", "deepspeed"}


class _UnitPopen(subprocess.Popen):
    def __init__(self, args: Any, *rest: Any, **kwargs: Any):
        argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
        exe = os.path.basename(str(argv[0]).split()[0]) if argv else ""
        if exe in LAUNCHED or exe.startswith("python") or str(argv[0]) == sys.executable:
            raise AssertionError(f"this test launches `{exe}`, so it belongs to the slow layer: mark it "
                                 "@pytest.mark.slow (tests/conftest.py)")
        super().__init__(args, *rest, **kwargs)


@pytest.fixture(autouse=True)
def _unit_tests_launch_nothing(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under `-m "not slow"`, a test that launches the CLI, DVC or another Python fails: the unit layer stays
    in-process."""
    if "not slow" in (request.config.getoption("-m") or "") and not request.node.get_closest_marker("slow"):
        monkeypatch.setattr(subprocess, "Popen", _UnitPopen)


def pad_is_eos_copies(trained: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Copies of the SFT and reward models whose tokenizer's pad token is its eos (as SmolLM2's, or any tokenizer
    `load_tokenizer` gave a pad), as a model folder from elsewhere (no manifest)."""
    import shutil

    from transformers import AutoConfig, AutoTokenizer

    out = []
    for name in ("sft", "reward"):
        dst = tmp_path / name
        shutil.copytree(trained / "models" / name, dst, ignore=shutil.ignore_patterns("COMPLETE.json", "manifest*"))
        tok = AutoTokenizer.from_pretrained(dst)
        tok.pad_token = tok.eos_token
        tok.save_pretrained(dst)
        cfg = AutoConfig.from_pretrained(dst)
        cfg.pad_token_id = tok.eos_token_id
        cfg.save_pretrained(dst)
        out.append(dst)
    return out[0], out[1]
