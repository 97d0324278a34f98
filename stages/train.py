"""`rlhf train`: DeepSpeed-Chat's one command. Writes the matching params for a deployment and runs `dvc repro`,
printing each step's wall time at the end."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import typer

from stages.common import PARAMS_OPTION, fail, read_params

STEPS = ("base_model", "prepare", "sft", "reward", "dpo", "ppo", "evaluate")

# engine settings per deployment (DeepSpeed-Chat's single_gpu / single_node / multi_node scripts, on our params)
DEPLOYMENTS = {
    "cpu": {"device": "cpu", "dtype": "fp32", "zero_stage": 0, "num_procs": 1},
    "single_gpu": {"device": "cuda", "dtype": "bf16", "zero_stage": 0, "num_procs": 1},
    "single_node": {"device": "cuda", "dtype": "bf16", "zero_stage": 2},
    "multi_node": {"device": "cuda", "dtype": "bf16", "zero_stage": 3},
}


def plan(deployment: str, num_gpus: int | None, hostfile: Path | None) -> dict:
    """The engine group for a deployment type."""
    if deployment not in DEPLOYMENTS:
        fail(f"--deployment-type '{deployment}' is unknown: use one of {', '.join(DEPLOYMENTS)}")
    engine = dict(DEPLOYMENTS[deployment], hostfile=None)
    if deployment in ("single_node", "multi_node"):
        if num_gpus is None:
            import torch

            num_gpus = torch.cuda.device_count()
        if num_gpus < 1:
            fail(f"--deployment-type {deployment} needs GPUs and none is visible: pass --num-gpus or use cpu")
        engine["num_procs"] = num_gpus
    if deployment == "multi_node":
        if hostfile is None or not hostfile.is_file():
            fail("--deployment-type multi_node needs --hostfile pointing at a DeepSpeed hostfile (host slots=N lines)")
        engine["hostfile"] = str(hostfile)
    return engine


def train(
    actor_model: str | None = typer.Option(None, help="actor: local HF folder or hub id (default: built from params)"),
    reward_model: str | None = typer.Option(None, help="reward model: local HF folder or hub id"),
    deployment_type: str = typer.Option("cpu", help="cpu | single_gpu | single_node | multi_node"),
    num_gpus: int | None = typer.Option(None, help="GPUs per node (default: all visible)"),
    hostfile: Path | None = typer.Option(None, help="DeepSpeed hostfile, for multi_node"),
    params_path: Path = PARAMS_OPTION,
    dry_run: bool = typer.Option(False, help="write params.yaml and show the plan, run nothing"),
) -> None:
    """Write the params for a deployment, then `dvc repro` every step and print each step's wall time."""
    from ruamel.yaml import YAML

    read_params(params_path)  # refuse to edit a params file that is already invalid
    engine = plan(deployment_type, num_gpus, hostfile)
    yaml = YAML()  # round-trip: keeps the comments, quotes, layout and nulls of params.yaml
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = yaml.load(params_path.read_text())
    for group, values in (("engine", engine), ("model", {"name_or_path": actor_model}),
                          ("reward_model", {"name_or_path": reward_model})):
        values = {k: v for k, v in values.items() if v is not None or group == "engine"}
        if values:  # a group the file leaves out (its defaults) is added
            if doc.get(group) is None:
                doc[group] = {}
            doc[group].update(values)
    before = params_path.read_text()
    with params_path.open("w") as f:
        yaml.dump(doc, f)
    try:
        read_params(params_path)
    except typer.Exit:
        params_path.write_text(before)  # nothing written is lost: put the old params back
        raise
    typer.echo(f"train: {deployment_type}: engine {engine}; actor {actor_model or 'from params'}; "
               f"reward model {reward_model or 'from params'} -> {params_path}")
    if dry_run:
        return
    times = {}
    for step in STEPS:
        t0 = time.perf_counter()
        code = subprocess.call(["dvc", "repro", step])
        times[step] = time.perf_counter() - t0
        if code != 0:
            fail(f"step '{step}' failed (exit {code}); fix it and rerun `rlhf train` or `dvc repro`: done steps are cached")
    typer.echo("train: wall time per step: " + ", ".join(f"{s} {t:.0f}s" for s, t in times.items()))
    from rlhf.pipeline.summary import summary_lines

    typer.echo("\n".join(summary_lines(Path("."))))
