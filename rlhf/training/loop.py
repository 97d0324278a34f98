"""The training loop every supervised step shares (SFT, reward model, DPO): fit, the non-finite guard, and the
reductions it logs; step 3's accumulate / finish_step use the same guard."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rlhf.config import TrainConfig
from rlhf.errors import UserError
from rlhf.training.metrics import MetricsLogger
from rlhf.training.runtime import Dist, training

if TYPE_CHECKING:
    import torch
    from deepspeed import DeepSpeedEngine

    from rlhf.training.lifecycle import Lifecycle


def all_finite(value: Any, dist: Dist) -> bool:
    """Whether a loss is finite on every rank: the skip decision must be the same everywhere, or a rank that
    skipped its backward would leave the others waiting in the gradient all-reduce."""
    import torch

    flag = torch.tensor([1.0 if bool(torch.isfinite(value.detach()).all()) else 0.0])
    if dist.world_size > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def grads_finite(engine: DeepSpeedEngine) -> bool:
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


def accumulate(engine: DeepSpeedEngine, loss: torch.Tensor, last: bool, guard: NonFiniteGuard, dist: Dist,
               step: int) -> bool:
    """Backward of one micro batch's loss into the accumulated gradients (DeepSpeed reduces them over ranks at the
    mini batch's last micro batch, `last`). The loss is already normalised over the mini batch, so DeepSpeed's own
    division by the accumulation steps is off. False (and no backward) when the loss is not finite on some rank:
    the mini batch then takes no step."""
    if not guard.ok(all_finite(loss, dist), step):
        return False
    engine.set_gradient_accumulation_boundary(last)
    engine.backward(loss, scale_wrt_gas=False)
    return True


def finish_step(engine: DeepSpeedEngine, ok: bool, guard: NonFiniteGuard, step: int) -> None:
    """The mini batch's optimizer step, unless a micro batch's loss or the reduced gradients were not finite: then
    the gradients are dropped (weights and optimizer state untouched) and the step counted as skipped; `guard`
    aborts after too many in a row."""
    if ok and guard.ok(grads_finite(engine), step):
        engine.set_gradient_accumulation_boundary(True)
        engine.step()
        return
    engine.zero_grad()
    if hasattr(engine.optimizer, "zero_grad"):
        engine.optimizer.zero_grad()


def fit(
    engine: DeepSpeedEngine,
    loader: Any,
    loss_fn: Callable[[Any, Any], tuple[Any, dict[str, float]]],
    evaluate: Callable[[], dict[str, float]],
    train: TrainConfig,
    dist: Dist,
    logger: MetricsLogger,
    desc: str,
    total: int,
    run: Lifecycle | None = None,
    saved: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Train for `total` optimizer steps (see optimizer_steps), evaluating after each epoch.

    `loss_fn(engine, batch) -> (loss, extra metrics)`; `evaluate() -> metrics` runs on every rank (it may
    all-reduce). Returns the last evaluation. `run` checkpoints when a step is due; `saved` (from `run.start`) resumes
    mid-run: the epoch, the batch position in it, the logging window and the RNG states continue exactly where the
    checkpoint left them. One loop on purpose (~70 lines): that position is the loop's own state, and a checkpoint
    taken at any step must see all of it; the logging and the epoch's end are helpers.
    """
    from tqdm.auto import tqdm

    from rlhf import faults
    from rlhf.training.checkpoint import set_rng_state

    pos = {"step": 0, "epoch": 0, "batch": 0, "micro": 0, "window": [], "skipped": 0, "metrics": {}}
    if saved is not None:
        pos.update(saved["state"])
    step, micro, window, metrics = pos["step"], pos["micro"], list(pos["window"]), dict(pos["metrics"])
    guard = NonFiniteGuard(train.max_bad_steps, desc, pos["skipped"])
    bar = tqdm(total=total, initial=step, desc=desc, disable=not (dist.is_main and sys.stderr.isatty()), dynamic_ncols=True)
    from rlhf.training.flops import batch_lengths, matmul_params, train_flops

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
                    _log_window(engine, logger, bar, dist, train, step, window, work, time.perf_counter() - t0,
                                extra, guard.skipped)
                    window, t0, work = [], time.perf_counter(), [0.0, 0.0]
                if run is not None:
                    run.save_if_due(step, total, {"model": engine}, lambda: {
                        "step": step, "epoch": epoch, "batch": index, "micro": micro, "window": window,  # noqa: B023
                        "skipped": guard.skipped, "metrics": metrics,  # noqa: B023 - called at once
                    })
                faults.kill_at(step)
                if step >= total:
                    break
        metrics = _end_epoch(evaluate, logger, dist, desc, step, epoch, epoch_work, time.perf_counter() - epoch_t0)
    bar.close()
    metrics["steps"] = step
    metrics["skipped_steps"] = guard.skipped
    return metrics


def _log_window(engine: DeepSpeedEngine, logger: MetricsLogger, bar: Any, dist: Dist, train: TrainConfig, step: int,
                window: list[float], work: list[float], elapsed: float, extra: dict[str, float], skipped: int) -> None:
    """Log the mean loss, learning rate and throughput of the steps since the last logged point (every rank's real
    tokens and useful FLOPs), and show them on the progress bar."""
    tokens, flops = all_reduce_sum(work, dist)
    point = {
        "train/loss": sum(window) / len(window),
        "train/lr": engine.get_lr()[0],
        "train/samples_per_s": len(window) * train.micro_batch_size * dist.world_size / elapsed,
        "train/tokens_per_s": tokens / elapsed,
        "train/tflops": flops / elapsed / 1e12,  # achieved, all ranks (rlhf/training/flops.py)
        "train/skipped_steps": skipped,
        **{f"train/{k}": v for k, v in extra.items()},
    }
    logger.log(step, point)
    bar.set_postfix(loss=f"{point['train/loss']:.4f}", tok_s=f"{point['train/tokens_per_s']:.0f}",
                    flops=flop_rate(flops / elapsed))


def _end_epoch(evaluate: Callable[[], dict[str, float]], logger: MetricsLogger, dist: Dist, desc: str, step: int,
               epoch: int, work: list[float], seconds: float) -> dict[str, float]:
    """Evaluate after an epoch, log it (eval/*) and print one line with the epoch's throughput; the evaluation."""
    tokens, flops = all_reduce_sum(work, dist)
    metrics = evaluate()
    metrics["epoch"] = epoch + 1
    logger.log(step, {f"eval/{k}": v for k, v in metrics.items()})
    if dist.is_main:
        print(f"[{desc}] epoch {epoch + 1}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
              + f" | train {tokens / max(seconds, 1e-9):.0f} tokens/s, {flop_rate(flops / max(seconds, 1e-9))}",
              flush=True)
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
