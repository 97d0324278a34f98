"""`rlhf plan`: the memory plan of the training stages, per phase and per rank, before anything is launched."""

from __future__ import annotations

from pathlib import Path

import typer

from stages.common import PARAMS_OPTION, fail, guarded, read_params


def plan(
    params_path: Path = PARAMS_OPTION,
    stage: str = typer.Option("all", help="sft, reward, dpo, ppo or all"),
    sft: Path = typer.Option(Path("models/sft"), help="the SFT actor's folder (when absent: params.yaml's model)"),
    reward_model: Path = typer.Option(Path("models/reward"), "--reward", help="the reward model's folder (likewise)"),
    ranks: int | None = typer.Option(None, help="plan for this many ranks in all (default: engine.num_procs x the "
                                     "hostfile's nodes)"),
    ranks_per_node: int | None = typer.Option(None, help="ranks sharing one node (default: all of --ranks, else "
                                              "engine.num_procs)"),
    device: str | None = typer.Option(None, help="plan for cpu or cuda (default: this machine's)"),
    gpu_memory: float | None = typer.Option(None, help="GiB of one GPU (default: this machine's)"),
    host_memory: float | None = typer.Option(None, help="GiB of one node's memory (default: this machine's "
                                             "available memory)"),
) -> None:
    """Each phase's estimate per GPU and per node against the memory, and its largest parts. Plans another machine
    with --ranks, --device, --gpu-memory and --host-memory (DeepSpeed-Chat's 8 x A100-80G: --ranks 8 --device cuda
    --gpu-memory 80 --host-memory 1024)."""
    from rlhf.plan.memory import Cluster
    from rlhf.plan.plan import STAGES, GiB, detect_cluster, layers_that_fit, stage_phases, stage_shapes, table

    stages = STAGES if stage == "all" else (stage,)
    checks = [
        (stage == "all" or stage in STAGES, f"--stage {stage}: must be one of {', '.join(STAGES)} or all"),
        (ranks is None or ranks >= 1, f"--ranks {ranks}: must be at least 1"),
        (ranks_per_node is None or ranks_per_node >= 1, f"--ranks-per-node {ranks_per_node}: must be at least 1"),
        (device in (None, "cpu", "cuda"), f"--device {device}: must be cpu or cuda"),
        (device != "cuda" or gpu_memory is not None or _has_gpu(), "--device cuda on a machine without a GPU: give "
         "--gpu-memory (GiB of one GPU)"),
        (gpu_memory is None or gpu_memory > 0, f"--gpu-memory {gpu_memory}: must be > 0"),
        (host_memory is None or host_memory > 0, f"--host-memory {host_memory}: must be > 0"),
    ]
    for ok, problem in checks:
        if not ok:
            fail(problem)
    params = read_params(params_path)
    here = guarded(detect_cluster, params) if device in (None, "cuda" if _has_gpu() else "cpu") else None
    total = ranks or (here.ranks if here else params.engine.num_procs)
    kind = device or (here.device if here else "cpu")
    host = int(host_memory * GiB) if host_memory else (here.host_memory if here else _host())
    gpu = int(gpu_memory * GiB) if gpu_memory else (here.device_memory if here and kind == "cuda" else host)
    per_node = ranks_per_node or (ranks if ranks else here.local_ranks if here else params.engine.num_procs)
    cluster = Cluster(total, min(per_node, total), kind, gpu, host)
    for name in stages:
        shapes = guarded(stage_shapes, name, params, sft, reward_model)
        layers = layers_that_fit(params, cluster, shapes) if name == "ppo" else None
        typer.echo(table(name, stage_phases(name, params, cluster, shapes), cluster, layers))


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _host() -> int:
    from rlhf.plan.plan import host_memory

    return host_memory()
