"""Checks that a split holds enough rows for the batch shape asked for, before a model is built."""

from __future__ import annotations

import os
from pathlib import Path

from rlhf.config import PPOConfig, TrainConfig
from rlhf.errors import UserError


def launch_world_size() -> int:
    """The ranks this run has (the launcher's WORLD_SIZE; 1 alone), known before the process group starts."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_rows(split: Path | str, rows: int, need: int, batch: str, fix: str) -> None:
    """Refuse, before DeepSpeed starts, a split with fewer rows than one batch (`batch` says how `need` is made):
    training loaders drop the ragged end (make_loader), so such a split gives no step at all, and a stage that
    trains on nothing must not write an untrained model with exit code 0."""
    if rows == 0:
        raise UserError(f"{split} is empty (0 rows), so there is nothing to train on: {fix}")
    if rows < need:
        raise UserError(
            f"{split} has {rows} row{'s' if rows != 1 else ''}, fewer than one batch of {need} ({batch}), so no "
            f"step would run: {fix}"
        )


def check_train_split(split: Path | str, rows: int, train: TrainConfig, group: str, world_size: int,
                      share: str | None = None) -> None:
    """A training split must fill one global batch (micro_batch_size x gradient_accumulation_steps x ranks): with
    fewer rows `fit` takes 0 optimizer steps. `share`: the data_split share that fills the split (default: group)."""
    batch = (
        f"{group}.micro_batch_size {train.micro_batch_size} x {group}.gradient_accumulation_steps "
        f"{train.gradient_accumulation_steps} x {world_size} rank(s)"
    )
    fix = (
        f"lower {group}.micro_batch_size or {group}.gradient_accumulation_steps (and {group}.global_batch_size), "
        f"bring more data, or give {share or group} a larger share (data.data_split)"
    )
    check_rows(split, rows, train.micro_batch_size * train.gradient_accumulation_steps * world_size, batch, fix)


def check_eval_split(split: Path | str, rows: int, metric: str, or_else: str = "") -> None:
    """An empty evaluation split would report a `metric` of nothing (NaN, 0.000): refuse it before training."""
    if rows == 0:
        raise UserError(
            f"{split} is empty (0 rows), so the {metric} reported after training would measure nothing: raise "
            f"data.eval_fraction, bring more data, or give this step a larger share (data.data_split){or_else}"
        )


def check_ppo_splits(data_dir: Path, train: int, held_out: int, ptx: int, ppo: PPOConfig, world_size: int) -> None:
    """PPO's splits, before DeepSpeed starts: each iteration draws ppo.rollout_batch_size prompts per rank from
    ppo_train (its loader drops the ragged end, so fewer prompts give no rollout at all); the held-out score needs
    ppo_eval unless ppo.eval_prompts is 0; the ptx mix (ppo.loss.ptx_coef > 0) draws micro batches of ptx_train (from
    data.ptx_source) or else of sft_train."""
    data_dir = Path(data_dir)
    check_rows(
        data_dir / "ppo_train.jsonl", train, ppo.rollout_batch_size * world_size,
        f"ppo.rollout_batch_size {ppo.rollout_batch_size} x {world_size} rank(s)",
        "lower ppo.rollout_batch_size, bring more prompts, or give ppo a larger share (data.data_split)",
    )
    if ppo.eval_prompts > 0:
        check_eval_split(data_dir / "ppo_eval.jsonl", held_out, "reward-model score", ", or set ppo.eval_prompts: 0")
    if ppo.loss.ptx_coef > 0:
        own = (data_dir / "ptx_train.jsonl").is_file()
        check_rows(
            data_dir / ("ptx_train.jsonl" if own else "sft_train.jsonl"), ptx, ppo.micro_batch_size * world_size,
            f"ppo.micro_batch_size {ppo.micro_batch_size} x {world_size} rank(s), for ppo.loss.ptx_coef > 0",
            "lower ppo.micro_batch_size, set ppo.loss.ptx_coef: 0, or "
            + ("bring more text to data.ptx_source" if own else "give sft a larger share (data.data_split)"),
        )


def optimizer_steps(num_rows: int, train: TrainConfig, world_size: int) -> int:
    """How many optimizer steps `fit` will take: the LR schedule needs it up front."""
    micro_per_epoch = num_rows // world_size // train.micro_batch_size
    steps = train.epochs * max(1, micro_per_epoch // train.gradient_accumulation_steps)
    return min(steps, train.max_steps) if train.max_steps else steps
