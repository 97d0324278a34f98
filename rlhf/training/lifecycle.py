"""The lifecycle every step shares: resume from the last checkpoint, log, train, write the manifest, export."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.config import LoggingConfig, TrainConfig
from rlhf.training.checkpoint import Checkpointer
from rlhf.training.checks import optimizer_steps
from rlhf.training.loaders import make_loader
from rlhf.training.loop import fit
from rlhf.training.metrics import MetricsLogger
from rlhf.training.runtime import Dist

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase



def train_and_export(
    *,
    name: str,
    params: Any,
    train: TrainConfig,
    dist: Dist,
    tok: PreTrainedTokenizerBase,
    build_model: Callable[[], Any],
    train_rows: Sequence[dict],
    eval_rows: Sequence[dict],
    collate: Callable[[list[dict]], dict],
    length: Callable[[dict], int],
    loss_fn: Callable[[Any, Any], tuple[Any, dict[str, float]]],
    evaluate: Callable[[Any, Any], dict[str, float]],
    out_dir: Path,
    live_dir: Path | None,
    manifest_params: dict[str, Any],
    manifest_inputs: dict[str, Path],
    ckpt_dir: Path | None = None,
) -> dict[str, float]:
    """The body every supervised step shares: build, wrap in DeepSpeed, fit, gather and write the HF folder.

    `build_model()` must return the same architecture every call (LoRA included): rank 0 calls it again to get a
    skeleton that receives the gathered weights, so ZeRO-3 shards are never saved as they are. `length(row)` is
    the width a row is padded to in a batch; train.group_by_length sorts by it.
    """
    from rlhf.pipeline.guards import check_free_space
    from rlhf.training import runtime as eng

    with eng.sharded_load(params.engine, train.micro_batch_size):  # ZeRO-3: a model read from a folder, as shards
        model = build_model()
    check_free_space(out_dir, sum(eng.numel(t) * t.element_size() for t in model.parameters()), "the model")
    total = optimizer_steps(len(train_rows), train, dist.world_size)
    ds_engine = eng.initialize(model, params.engine, train, total)
    lengths = [length(r) for r in train_rows] if train.group_by_length else None
    train_loader = make_loader(
        train_rows, train.micro_batch_size, collate, dist, params.seed, True, lengths, train.length_group_batches
    )
    eval_loader = make_loader(eval_rows, train.eval_batch_size, collate, dist, params.seed, shuffle=False)
    run = Lifecycle(name, seed=params.seed, logging=params.logging, dist=dist, manifest_params=manifest_params,
                    manifest_inputs=manifest_inputs, ckpt_dir=ckpt_dir, checkpoint_every=train.checkpoint_every,
                    live_dir=live_dir)
    saved = run.start({"model": ds_engine})
    t0 = time.perf_counter()
    metrics = fit(ds_engine, train_loader, loss_fn, lambda: evaluate(ds_engine, eval_loader), train, dist,
                  run.logger, name, total, run, saved)
    metrics["train_seconds"] = time.perf_counter() - t0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    manifest = run.manifest(metrics, trainable_parameters=trainable)
    export_model(ds_engine.module, build_model, tok, out_dir, manifest, params.engine.zero_stage, dist)
    run.close(metrics)
    return metrics


def export_model(
    module: torch.nn.Module,
    build_model: Callable[[], Any],
    tok: PreTrainedTokenizerBase,
    out_dir: Path,
    manifest: dict[str, Any],
    zero_stage: int,
    dist: Dist,
) -> None:
    """Gather `module`'s weights (every rank calls this), load them into a fresh `build_model()` skeleton on rank 0,
    merge LoRA and write an HF folder with its manifest; ranks meet at a barrier afterwards."""
    from rlhf.models.build import save_pretrained
    from rlhf.pipeline.guards import check_free_space
    from rlhf.pipeline.outputs import write_output_dir
    from rlhf.training import runtime as eng

    state = eng.full_state_dict(module, zero_stage, dist.is_main)
    if dist.is_main:
        skeleton = build_model()
        missing, unexpected = skeleton.load_state_dict(state, strict=False)
        # A tied weight (SmolLM2's lm_head is its embedding matrix) is gathered once, under its first name; loading
        # that name fills both, so the other name is not missing.
        named = {k for k, _ in skeleton.named_parameters()} | {k for k, _ in skeleton.named_buffers()}
        tied = set(skeleton.state_dict()) - named
        if unexpected or [k for k in missing if k not in tied and not k.endswith("inv_freq")]:
            raise RuntimeError(f"gathered weights do not fit the model: missing={missing} unexpected={unexpected}")
        check_free_space(out_dir, sum(t.numel() * t.element_size() for t in state.values()), "the model")
        write_output_dir(out_dir, lambda d: save_pretrained(skeleton, tok, d), manifest)
    eng.barrier()


class Lifecycle:
    """What every step does around its training, written once: the checkpoint fingerprint (name, params, hashed
    inputs, seed, world size), resume from the newest complete checkpoint, the metrics logger (its rows survive a
    resume), the manifest and the export of each model. SFT, the reward model and DPO use it through
    `train_and_export`; step 3's recipe (rlhf/rl/recipe.py) drives it itself."""

    def __init__(self, name: str, *, seed: int, logging: LoggingConfig, dist: Dist, manifest_params: dict[str, Any],
                 manifest_inputs: dict[str, Path], ckpt_dir: Path | None, checkpoint_every: int,
                 live_dir: Path | None):
        from rlhf.pipeline.outputs import hash_inputs
        from rlhf.training.checkpoint import fingerprint

        self.name, self.seed, self.dist, self.params = name, seed, dist, manifest_params
        self.inputs = hash_inputs(manifest_inputs)
        fp = fingerprint(name, manifest_params, self.inputs, seed, dist.world_size)
        self.checkpoints = Checkpointer(ckpt_dir, checkpoint_every, fp, dist)
        self.logging, self.live_dir = logging, live_dir
        self.logger: MetricsLogger | None = None  # set by start()

    def start(self, engines: dict[str, Any]) -> dict[str, Any] | None:
        """Resume or start: load this run's newest complete checkpoint, if any, into `engines` and open the logger
        (with the saved rows); returns the checkpoint's {"state", "rng"}, or None for a fresh start."""
        latest = self.checkpoints.latest()
        saved = self.checkpoints.load(latest, engines) if latest is not None else None
        rows = saved["state"].get("log_rows") if saved else None
        self.logger = MetricsLogger(self.live_dir, self.dist, rows, self.logging, self.name)
        return saved

    def save_if_due(self, step: int, total: int, engines: dict[str, Any], state: Callable[[], dict[str, Any]]) -> None:
        """Checkpoint `engines` and `state()` (with the logged rows) when step is a checkpoint step."""
        if self.checkpoints.due(step, total):
            self.checkpoints.save(step, engines, {**state(), "log_rows": self.logger.rows()})

    def manifest(self, metrics: dict[str, Any], **extra: Any) -> dict[str, Any]:
        from rlhf.pipeline.outputs import make_manifest

        return make_manifest(self.name, self.params, self.inputs, seed=self.seed, world_size=self.dist.world_size,
                             metrics=metrics, **extra)

    def close(self, metrics: dict[str, Any]) -> None:
        if self.dist.is_main:
            self.logger.close(metrics)
