"""DeepSpeed plumbing shared by every training step: process group, engine construction, gathering for saving.

CPU and GPU run the same code: on CPU DeepSpeed's accelerator is `cpu` and ranks talk over gloo; on GPU over nccl.
One process runs without a launcher; several come from the `deepspeed` launcher (one per GPU, or `--num_gpus` CPU
ranks), which sets RANK/LOCAL_RANK/WORLD_SIZE.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.config import EngineConfig, TrainConfig
from rlhf.errors import UserError

if TYPE_CHECKING:
    import torch



@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: str  # "cpu" or "cuda:N"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextmanager
def evaluating(*modules: Any) -> Iterator[None]:
    """Modules (None skipped) in eval mode inside the block, each back in its previous mode after it."""
    with _mode(False, modules):
        yield


@contextmanager
def training(*modules: Any) -> Iterator[None]:
    """Modules (None skipped) in train mode inside the block, each back in its previous mode after it."""
    with _mode(True, modules):
        yield


@contextmanager
def _mode(train: bool, modules: tuple[Any, ...]) -> Iterator[None]:
    present = [m for m in modules if m is not None]
    before = [m.training for m in present]
    for m in present:
        m.train(train)
    try:
        yield
    finally:
        for m, was in zip(present, before):
            m.train(was)


def resolve_device(cfg: EngineConfig) -> str:
    """'cpu' or 'cuda' for engine.device, checking that the dtype is possible there."""
    import torch

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("engine.device is cuda but no GPU is visible: set engine.device: auto or cpu")
    if device == "cpu" and cfg.dtype == "fp16":
        raise UserError("engine.dtype fp16 is not supported on CPU: set engine.dtype to bf16 or fp32")
    return device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unlink_shm_buffer() -> None:
    """Remove the name of this rank's /dev/shm all-reduce buffer once every rank has mapped it. DeepSpeed's CPU
    shm_comm creates one (~67 MB) per rank and never unlinks it, so each run left its buffers in memory until
    reboot (300 runs filled 20 GB of this 24 GB machine). The mappings live on until the processes end."""
    import torch

    torch.distributed.barrier()  # shm_initialize returns only after opening every peer's buffer
    name = "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"), torch.distributed.get_rank()
    )
    Path("/dev/shm", name).unlink(missing_ok=True)


def init_distributed(cfg: EngineConfig) -> Dist:
    """Join (or, alone, create) the process group. Must run before the first `import deepspeed` picks its
    accelerator, which is why DS_ACCELERATOR is set here."""
    import torch

    device = resolve_device(cfg)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if device == "cpu" else "cuda")
    if "RANK" not in os.environ:  # a single process started without a launcher
        # RLHF_SINGLE_PROCESS: these variables were set here, not by a launcher (stages.common.launched reads it)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", RLHF_SINGLE_PROCESS="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    if not torch.distributed.is_initialized():
        import contextlib
        import io

        said = io.StringIO()  # DeepSpeed prints "... shm_comm_op built successfully" on stdout: not our output
        with contextlib.redirect_stdout(said):
            deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl", dist_init_required=True)
        kept = [ln for ln in said.getvalue().splitlines() if ln.strip() and "built successfully" not in ln]
        if kept:
            print("\n".join(kept), flush=True)
        _unlink_shm_buffer()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=device)


def zero_config(engine: EngineConfig, trained: bool = True) -> dict[str, Any]:
    """DeepSpeed's `zero_optimization` block. A frozen model (trained=False) has no gradients or optimizer state
    to shard: ZeRO-3 still partitions its weights (and offloads them with offload_params), other stages keep it
    whole."""
    stage = engine.zero_stage if trained or engine.zero_stage == 3 else 0
    zero: dict[str, Any] = {"stage": stage}
    if engine.offload_optimizer and trained:
        zero["offload_optimizer"] = {"device": "cpu"}
    if engine.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = engine.zero3_persistence_threshold
    return zero


def zero3_partitioning(module: torch.nn.Module) -> dict[str, int]:
    """How ZeRO-3 split `module` on this rank: parameters partitioned (not kept whole by the persistence
    threshold) of all, and elements held here of all (a partitioned parameter holds ceil(numel / world) here)."""
    out = {"partitioned": 0, "parameters": 0, "local_elements": 0, "elements": 0}
    for p in module.parameters():
        whole = not hasattr(p, "ds_tensor") or getattr(p, "ds_persist", False)
        out["parameters"] += 1
        out["partitioned"] += not whole
        out["elements"] += numel(p)
        out["local_elements"] += numel(p) if whole else p.ds_tensor.numel()
    return out


def report_zero3(name: str, module: torch.nn.Module) -> None:
    """One line on rank 0 saying how ZeRO-3 partitioned a model (tests read it to check real sharding)."""
    import torch

    split = zero3_partitioning(module)
    if torch.distributed.get_rank() == 0:
        print(
            f"[zero-3] {name}: {split['partitioned']}/{split['parameters']} parameters partitioned over "
            f"{torch.distributed.get_world_size()} ranks; rank 0 holds {split['local_elements']:,} of "
            f"{split['elements']:,} elements",
            flush=True,
        )


def ds_config(engine: EngineConfig, train: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed config dict for one trained model."""
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "gradient_clipping": engine.gradient_clipping,
        "zero_optimization": zero_config(engine),
        "bf16": {"enabled": engine.dtype == "bf16"},
        "fp16": {"enabled": engine.dtype == "fp16"},
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
        "steps_per_print": 10**9,
    }


@contextmanager
def sharded_load(engine: EngineConfig, micro_batch_size: int = 1) -> Iterator[None]:
    """Under ZeRO-3, a model read from a folder inside the block (transformers' from_pretrained) is created as
    shards (deepspeed.zero.Init, through transformers' HfDeepSpeedConfig) and its checkpoint is read on rank 0 one
    tensor at a time into them, so no rank holds the whole model (DeepSpeed-Chat and TRL load 13B+ this way); a
    model built from a config is untouched. Elsewhere, nothing changes."""
    if engine.zero_stage != 3 or not _distributed():
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    live = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": micro_batch_size,  # noqa: F841 - held by weakref
                              "zero_optimization": zero_config(engine),
                              "bf16": {"enabled": engine.dtype == "bf16"}, "fp16": {"enabled": engine.dtype == "fp16"}})
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


def _distributed() -> bool:
    import torch

    return torch.distributed.is_available() and torch.distributed.is_initialized()


def numel(param: Any) -> int:
    """A parameter's elements, whole even when it is a ZeRO-3 shard."""
    return getattr(param, "ds_numel", None) or param.numel()


def ndim(param: Any) -> int:
    """A parameter's dimensions, of the whole even when it is a ZeRO-3 shard (a shard is flat)."""
    return len(getattr(param, "ds_shape", None) or param.shape)


def _scheduler(optimizer: Any, train: TrainConfig, total_steps: int) -> Any:
    from transformers import get_scheduler

    warmup = int(train.warmup_ratio * total_steps)
    return get_scheduler(train.lr_schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def initialize(model: torch.nn.Module, engine: EngineConfig, train: TrainConfig, total_steps: int) -> Any:
    """Wrap a model in a DeepSpeed engine with AdamW over its trainable parameters and a warmup schedule.

    The optimizer is torch's fused AdamW (one vectorised kernel over all parameters, CPU and CUDA, no C++ build
    needed; 3.0-3.7x its per-parameter loop at 11M-100M fp32 parameters, bench/matmul_efficiency.py) unless
    optimizer state is offloaded, which needs DeepSpeed's CPU Adam.
    """
    import deepspeed
    import torch

    if engine.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if ndim(p) >= 2]
    no_decay = [p for p in params if ndim(p) < 2]
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    betas = (train.adam_beta1, train.adam_beta2)
    if engine.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=train.learning_rate, betas=betas)
    else:
        optimizer = torch.optim.AdamW(groups, lr=train.learning_rate, betas=betas, fused=True)
    scheduler = _scheduler(optimizer, train, total_steps)
    ds_engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config(engine, train)
    )
    if engine.zero_stage == 3:
        report_zero3(type(model).__name__, ds_engine.module)
    return ds_engine


def full_state_dict(
    module: torch.nn.Module, zero_stage: int, is_main: bool, all_ranks: bool = False
) -> dict[str, Any] | None:
    """The whole model's parameters and persistent buffers as fp32 CPU tensors on rank 0 (None elsewhere), or on
    every rank with all_ranks.

    Under ZeRO-3 each parameter is gathered in turn (every rank must call this) so peak memory stays at one
    parameter beyond the shard, as DeepSpeed-Chat's save_zero_three_model does.
    """
    import torch

    is_main = is_main or all_ranks
    state: dict[str, Any] = {}
    for name, param in module.named_parameters():
        if zero_stage == 3 and hasattr(param, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if is_main:
                    state[name] = param.detach().to("cpu", torch.float32).clone()
        elif is_main:
            state[name] = param.detach().to("cpu", torch.float32).clone()
    if is_main:
        persistent = {k for k, _ in module.named_buffers() if k in module.state_dict()}
        for name, buf in module.named_buffers():
            if name in persistent:
                state[name] = buf.detach().to("cpu").clone()
    return state if is_main else None


def barrier() -> None:
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices) so that a run repeats; `deterministic` (engine.deterministic)
    also makes torch pick deterministic kernels (warning, not failing, where an op has none)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what cuBLAS needs to be deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
