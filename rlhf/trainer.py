"""The shared training loop: one DeepSpeed engine, a sharded data loader, timed logging, progress on rank 0.

The SFT and reward steps (rlhf/sft.py, rlhf/reward.py) differ only in how a batch is built, what the loss is and
what evaluation measures; they hand those to :func:`fit` as plain functions (composition, not a base class).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from rlhf.checkpoint import Checkpointer
from rlhf.config import LoggingConfig, PPOConfig, TrainConfig, check_loggers
from rlhf.engine import Dist, training
from rlhf.errors import UserError

class MetricsLogger:
    """Per-step curves through dvclive on rank 0; a no-op on other ranks.

    Nothing is touched until the first point is logged: opening dvclive clears the folder's previous curves, so a
    stage that stops before training (bad input, or non-finite losses from the first step) leaves the last run's
    curves as they were.

    `resume_rows` (from a checkpoint's `rows()`) continues an interrupted run: each curve is put back as it was
    when the checkpoint was taken (the checkpoint keeps the curves' text), so the points logged between that
    checkpoint and the crash are not repeated, curves that `dvc repro` deleted with the stage's outputs come back,
    and the resumed run's curves equal an uninterrupted run's.
    """

    def __init__(self, live_dir: Path | None, dist: Dist, resume_rows: dict[str, int] | None = None,
                 logging: LoggingConfig | None = None, stage: str | None = None):
        self.live = None
        self.dir = Path(live_dir) if live_dir is not None else None
        self.resume_rows = resume_rows
        self.enabled = dist.is_main and live_dir is not None
        # the other backends of logging.report_to (rank 0 only), opened with dvclive
        self.stage = stage or (self.dir.name if self.dir is not None else "run")
        self.extra = [b for b in (logging.report_to if logging else []) if b != "dvclive"] if self.enabled else []
        self.logging = logging
        self.tb: Any = None
        self.wandb: Any = None
        check_loggers(self.extra)


    def _open(self) -> bool:
        """Open dvclive on the first use (rank 0); whether there is a live logger."""
        if self.live is None and self.enabled:
            from dvclive import Live

            if self.resume_rows is not None:
                self._restore(self.resume_rows)
            # dvcyaml=False: dvc.yaml is ours and declares the plots; save_dvc_exp=False: `dvc exp run` owns exps.
            self.live = Live(
                dir=str(self.dir), dvcyaml=False, save_dvc_exp=False, report=None, resume=self.resume_rows is not None
            )
            self._open_extra()
        return self.live is not None

    def _open_extra(self) -> None:
        cfg = self.logging
        if "tensorboard" in self.extra:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(cfg.tensorboard_dir) / self.stage))
        if "wandb" in self.extra:
            import wandb

            mode = cfg.wandb_mode
            if mode == "auto":
                mode = "online" if os.environ.get("WANDB_API_KEY") or _wandb_logged_in() else "offline"
            Path(cfg.wandb_dir).mkdir(parents=True, exist_ok=True)
            self.wandb = wandb.init(project=cfg.wandb_project, name=self.stage, job_type=self.stage, mode=mode,
                                    dir=cfg.wandb_dir, reinit="finish_previous", settings=wandb.Settings(
                                        silent=True, console="off"))

    def _curves(self) -> list[Path]:
        return sorted((self.dir / "plots" / "metrics").rglob("*.tsv")) if self.dir is not None else []

    def rows(self) -> dict[str, str]:
        """Each curve file's text now (rank 0; empty elsewhere): a checkpoint keeps it."""
        if not self._open():
            return {}
        return {str(f.relative_to(self.dir)): f.read_text() for f in self._curves()}

    def _restore(self, rows: dict[str, str | int]) -> None:
        """Every curve as the checkpoint saw it: its text (a checkpoint's count of lines before 2026-12-04 cuts the
        file on disk back to that many); a curve begun after the checkpoint goes."""
        for f in self._curves():
            if str(f.relative_to(self.dir)) not in rows:
                f.unlink()
        for name, saved in rows.items():
            f = self.dir / name
            if isinstance(saved, int):
                lines = f.read_text().splitlines(keepends=True) if f.is_file() else []
                saved = "".join(lines[:saved])
            if len(saved.splitlines()) <= 1:  # the header alone
                f.unlink(missing_ok=True)
            else:
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_text(saved)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self._open():
            return
        self.live.step = step
        for k, v in values.items():
            self.live.log_metric(k, v)
        self.live.make_summary()
        scalars = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self, summary: dict[str, float]) -> None:
        if not self._open():
            return
        for k, v in summary.items():
            self.live.summary[k] = v
        self.live.make_summary()
        self.live.end()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))})
            self.wandb.finish()


def _wandb_logged_in() -> bool:
    """Whether W&B has a key from `wandb login` (~/.netrc) without asking the network."""
    import netrc

    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class LengthGroupedSampler:
    """DistributedSampler's seeded, disjoint slice of one rank, reordered so that each micro batch holds rows of
    similar length: less padding, the same rows (HF transformers' LengthGroupedSampler).

    The shuffled slice is cut into mega batches of `group_batches` x batch_size, each sorted longest first, and the
    micro batches then run in a seeded random order, so the epoch is no sawtooth of lengths. The order is a pure
    function of seed, epoch, rank and world size, which is what resuming mid-epoch relies on. It wraps the
    sampler rather than subclassing it so that importing rlhf does not import torch.
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, rank: int, world_size: int, seed: int, group_batches: int = 50
    ):
        from torch.utils.data import DistributedSampler

        self.lengths, self.batch_size, self.seed, self.group_batches = lengths, batch_size, seed, group_batches
        self.ranks = DistributedSampler(
            lengths, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )

    def set_epoch(self, epoch: int) -> None:
        self.ranks.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.ranks)

    def __iter__(self) -> Iterator[int]:
        import torch

        indices = list(self.ranks)
        # The ragged end stays last, where the loader's drop_last drops it: the same random rows as ungrouped.
        full = len(indices) - len(indices) % self.batch_size
        mega = self.group_batches * self.batch_size
        grouped = [
            i
            for start in range(0, full, mega)
            for i in sorted(indices[start : min(start + mega, full)], key=self.lengths.__getitem__, reverse=True)
        ]
        batches = [grouped[s : s + self.batch_size] for s in range(0, full, self.batch_size)]
        g = torch.Generator()
        g.manual_seed(self.seed + self.ranks.epoch)
        order = torch.randperm(len(batches), generator=g).tolist()
        return iter([i for b in order for i in batches[b]] + indices[full:])


def make_loader(
    rows: Sequence[Any],
    batch_size: int,
    collate: Callable,
    dist: Dist,
    seed: int,
    shuffle: bool,
    lengths: Sequence[int] | None = None,
    group_batches: int = 50,
) -> Any:
    """Each rank gets a disjoint, seeded slice. Training drops the ragged end; evaluation keeps every row, and the
    sampler repeats at most world_size - 1 rows so that all ranks run the same number of forward passes (ZeRO-3
    gathers parameters collectively: a rank that stopped early would hang the others).

    `lengths` (one per row) groups a training loader's micro batches by length, `group_batches` micro batches
    at a time (LengthGroupedSampler); evaluation (shuffle False) keeps its order."""
    from torch.utils.data import DataLoader, DistributedSampler

    if shuffle and lengths is not None:
        sampler = LengthGroupedSampler(lengths, batch_size, dist.rank, dist.world_size, seed, group_batches)
    else:
        sampler = DistributedSampler(
            rows, num_replicas=dist.world_size, rank=dist.rank, shuffle=shuffle, seed=seed, drop_last=shuffle
        )
    return DataLoader(list(rows), batch_size=batch_size, sampler=sampler, collate_fn=collate, drop_last=shuffle)


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
    ppo_eval unless ppo.eval_prompts is 0; the ptx mix (ppo.ptx_coef > 0) draws micro batches of ptx_train (from
    data.ptx_source) or else of sft_train."""
    data_dir = Path(data_dir)
    check_rows(
        data_dir / "ppo_train.jsonl", train, ppo.rollout_batch_size * world_size,
        f"ppo.rollout_batch_size {ppo.rollout_batch_size} x {world_size} rank(s)",
        "lower ppo.rollout_batch_size, bring more prompts, or give ppo a larger share (data.data_split)",
    )
    if ppo.eval_prompts > 0:
        check_eval_split(data_dir / "ppo_eval.jsonl", held_out, "reward-model score", ", or set ppo.eval_prompts: 0")
    if ppo.ptx_coef > 0:
        own = (data_dir / "ptx_train.jsonl").is_file()
        check_rows(
            data_dir / ("ptx_train.jsonl" if own else "sft_train.jsonl"), ptx, ppo.micro_batch_size * world_size,
            f"ppo.micro_batch_size {ppo.micro_batch_size} x {world_size} rank(s), for ppo.ptx_coef > 0",
            "lower ppo.micro_batch_size, set ppo.ptx_coef: 0, or "
            + ("bring more text to data.ptx_source" if own else "give sft a larger share (data.data_split)"),
        )


def optimizer_steps(num_rows: int, train: TrainConfig, world_size: int) -> int:
    """How many optimizer steps `fit` will take: the LR schedule needs it up front."""
    micro_per_epoch = num_rows // world_size // train.micro_batch_size
    steps = train.epochs * max(1, micro_per_epoch // train.gradient_accumulation_steps)
    return min(steps, train.max_steps) if train.max_steps else steps


def all_finite(value: Any, dist: Dist) -> bool:
    """Whether a loss is finite on every rank: the skip decision must be the same everywhere, or a rank that
    skipped its backward would leave the others waiting in the gradient all-reduce."""
    import torch

    flag = torch.tensor([1.0 if bool(torch.isfinite(value.detach()).all()) else 0.0])
    if dist.world_size > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def grads_finite(engine: Any) -> bool:
    """Whether the reduced gradients are finite. Checked where they are whole on every rank (ZeRO 0); ZeRO 1-3
    partition them inside DeepSpeed's optimizer, where the non-finite loss check is what catches a blow-up."""
    import torch

    if engine.zero_optimization_stage() != 0:
        return True
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    # one fused pass: a norm is non-finite exactly when some element is (a per-tensor isfinite costs a parallel
    # region per parameter, which bench/README.md measured at 0.76 s a step on a contended machine)
    return not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())


class NonFiniteGuard:
    """Counts skipped steps; aborts the stage after `limit` consecutive ones, before any output is written."""

    def __init__(self, limit: int, what: str, skipped: int = 0):
        self.limit, self.what, self.skipped, self.run = limit, what, skipped, 0

    def ok(self, finite: bool, step: int) -> bool:
        if finite:
            self.run = 0
            return True
        self.skipped += 1
        self.run += 1
        print(f"[{self.what}] step {step}: non-finite loss or gradient, step skipped ({self.skipped} so far)", flush=True)
        if self.run >= self.limit:
            raise UserError(
                f"{self.what} stopped: {self.run} consecutive steps had a non-finite loss or gradient (last at step "
                f"{step}); no model was written. Lower the learning rate, use fp32 (engine.dtype), or check the data"
            )
        return False


def fit(
    engine: Any,
    loader: Any,
    loss_fn: Callable[[Any, Any], tuple[Any, dict[str, float]]],
    evaluate: Callable[[], dict[str, float]],
    train: TrainConfig,
    dist: Dist,
    logger: MetricsLogger,
    desc: str,
    total: int,
    ckpt: Checkpointer | None = None,
    saved: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Train for `total` optimizer steps (see optimizer_steps), evaluating after each epoch.

    `loss_fn(engine, batch) -> (loss, extra metrics)`; `evaluate() -> metrics` runs on every rank (it may
    all-reduce). Returns the last evaluation. `saved` (from Checkpointer.load) resumes mid-run: the epoch, the
    batch position in it, the logging window and the RNG states continue exactly where the checkpoint left them.
    """
    from tqdm.auto import tqdm

    from rlhf import faults
    from rlhf.checkpoint import set_rng_state

    pos = {"step": 0, "epoch": 0, "batch": 0, "micro": 0, "window": [], "skipped": 0, "metrics": {}}
    if saved is not None:
        pos.update(saved["state"])
    step, micro, window, metrics = pos["step"], pos["micro"], list(pos["window"]), dict(pos["metrics"])
    guard = NonFiniteGuard(train.max_bad_steps, desc, pos["skipped"])
    bar = tqdm(total=total, initial=step, desc=desc, disable=not (dist.is_main and sys.stderr.isatty()), dynamic_ncols=True)
    from rlhf.flops import batch_lengths, matmul_params, train_flops

    n_matmul = matmul_params(engine)
    work = [0.0, 0.0]  # real tokens and useful FLOPs since the last logged point
    t0 = time.perf_counter()
    for epoch in range(pos["epoch"], train.epochs):
        if step >= total:
            break
        loader.sampler.set_epoch(epoch)
        batches = iter(loader)
        first = pos["batch"] if epoch == pos["epoch"] else 0
        for _ in range(first):  # the resumed epoch: the same shuffled order, minus what the checkpoint had seen
            next(batches)
        if saved is not None:  # last, so that building the data position above draws nothing from the saved RNG
            set_rng_state(saved["rng"])
            saved = None
        epoch_t0, epoch_work = time.perf_counter(), [0.0, 0.0]
        with training(engine):  # evaluate() below switches to eval mode and back
            for index, batch in enumerate(batches, start=first + 1):
                lengths = batch_lengths(batch) if isinstance(batch, dict) else []
                loss, extra = loss_fn(engine, batch)
                micro += 1
                loss = faults.poison(loss, micro)
                if not guard.ok(all_finite(loss, dist), step + 1):
                    continue
                engine.backward(loss)
                if engine.is_gradient_accumulation_boundary() and not guard.ok(grads_finite(engine), step + 1):
                    engine.zero_grad()
                    continue
                engine.step()
                window.append(loss.item())
                done = (sum(lengths), train_flops(engine, lengths, n_matmul))
                work = [work[0] + done[0], work[1] + done[1]]
                epoch_work = [epoch_work[0] + done[0], epoch_work[1] + done[1]]
                if not engine.is_gradient_accumulation_boundary():
                    continue
                step += 1
                bar.update(1)
                if step % train.log_every == 0 or step == total:
                    elapsed = time.perf_counter() - t0
                    tokens, flops = all_reduce_sum(work, dist)  # every rank's real tokens and FLOPs
                    point = {
                        "train/loss": sum(window) / len(window),
                        "train/lr": engine.get_lr()[0],
                        "train/samples_per_s": len(window) * train.micro_batch_size * dist.world_size / elapsed,
                        "train/tokens_per_s": tokens / elapsed,
                        "train/tflops": flops / elapsed / 1e12,  # achieved, all ranks (rlhf/flops.py)
                        "train/skipped_steps": guard.skipped,
                        **{f"train/{k}": v for k, v in extra.items()},
                    }
                    logger.log(step, point)
                    bar.set_postfix(loss=f"{point['train/loss']:.4f}", tok_s=f"{point['train/tokens_per_s']:.0f}",
                                    flops=flop_rate(flops / elapsed))
                    window, t0, work = [], time.perf_counter(), [0.0, 0.0]
                if ckpt is not None and ckpt.due(step, total):
                    state = {
                        "step": step, "epoch": epoch, "batch": index, "micro": micro, "window": window,
                        "skipped": guard.skipped, "metrics": metrics, "log_rows": logger.rows(),
                    }
                    ckpt.save(step, {"model": engine}, state)
                faults.kill_at(step)
                if step >= total:
                    break
        epoch_s = time.perf_counter() - epoch_t0
        epoch_tokens, epoch_flops = all_reduce_sum(epoch_work, dist)
        metrics = evaluate()
        metrics["epoch"] = epoch + 1
        logger.log(step, {f"eval/{k}": v for k, v in metrics.items()})
        if dist.is_main:
            print(f"[{desc}] epoch {epoch + 1}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
                  + f" | train {epoch_tokens / max(epoch_s, 1e-9):.0f} tokens/s, "
                  f"{flop_rate(epoch_flops / max(epoch_s, 1e-9))}", flush=True)
    bar.close()
    metrics["steps"] = step
    metrics["skipped_steps"] = guard.skipped
    return metrics


def flop_rate(per_s: float) -> str:
    """'1.23 TFLOP/s' on a GPU-sized rate, '45.6 GFLOP/s' below one TFLOP/s (a CPU's)."""
    return f"{per_s / 1e12:.2f} TFLOP/s" if per_s >= 1e12 else f"{per_s / 1e9:.1f} GFLOP/s"


def all_reduce_sum(values: list[float], dist: Dist) -> list[float]:
    """Sum floats over ranks (evaluation shards)."""
    import torch

    t = torch.tensor(values, dtype=torch.float64)
    if dist.world_size > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def perplexity(total_nll: float, total_tokens: float) -> float:
    return math.exp(total_nll / max(total_tokens, 1.0))


def train_and_export(
    *,
    name: str,
    params: Any,
    train: TrainConfig,
    dist: Dist,
    tok: Any,
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
    from rlhf import engine as eng
    from rlhf.checkpoint import fingerprint
    from rlhf.outputs import hash_inputs, make_manifest

    from rlhf.outputs import check_free_space

    model = build_model()
    check_free_space(out_dir, sum(t.numel() * t.element_size() for t in model.state_dict().values()), "the model")
    total = optimizer_steps(len(train_rows), train, dist.world_size)
    ds_engine = eng.initialize(model, params.engine, train, total)
    lengths = [length(r) for r in train_rows] if train.group_by_length else None
    train_loader = make_loader(
        train_rows, train.micro_batch_size, collate, dist, params.seed, True, lengths, train.length_group_batches
    )
    eval_loader = make_loader(eval_rows, train.eval_batch_size, collate, dist, params.seed, shuffle=False)
    inputs = hash_inputs(manifest_inputs)
    ckpt = Checkpointer(
        ckpt_dir, train.checkpoint_every, fingerprint(name, manifest_params, inputs, params.seed, dist.world_size), dist
    )
    resume = ckpt.latest()
    saved = ckpt.load(resume, {"model": ds_engine}) if resume is not None else None
    logger = MetricsLogger(live_dir, dist, saved["state"].get("log_rows") if saved else None, params.logging, name)
    t0 = time.perf_counter()
    metrics = fit(
        ds_engine, train_loader, loss_fn, lambda: evaluate(ds_engine, eval_loader), train, dist, logger, name, total,
        ckpt, saved,
    )
    metrics["train_seconds"] = time.perf_counter() - t0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    manifest = make_manifest(
        name,
        manifest_params,
        inputs,
        seed=params.seed,
        world_size=dist.world_size,
        metrics=metrics,
        trainable_parameters=trainable,
    )
    export_model(ds_engine.module, build_model, tok, out_dir, manifest, params.engine.zero_stage, dist)
    if dist.is_main:
        logger.close(metrics)
    return metrics


def export_model(
    module: Any,
    build_model: Callable[[], Any],
    tok: Any,
    out_dir: Path,
    manifest: dict[str, Any],
    zero_stage: int,
    dist: Dist,
) -> None:
    """Gather `module`'s weights (every rank calls this), load them into a fresh `build_model()` skeleton on rank 0,
    merge LoRA and write an HF folder with its manifest; ranks meet at a barrier afterwards."""
    from rlhf import engine as eng
    from rlhf.models import save_pretrained
    from rlhf.outputs import check_free_space, write_output_dir

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
