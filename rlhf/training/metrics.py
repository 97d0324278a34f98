"""MetricsLogger: every metric to dvclive, and to TensorBoard or W&B when logging.report_to names them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rlhf.config import LoggingConfig, check_loggers
from rlhf.training.runtime import Dist


class MetricsLogger:
    """Per-step curves through dvclive on rank 0; a no-op on other ranks.

    The previous run's curves stay in `live_dir` until this run completes: the run writes into a sibling folder,
    `.<name>.partial` (dvclive/.ppo.partial while dvclive/ppo holds the last finished run's), which `close` moves
    into place. A stage that stops, whether on bad input, non-finite losses or a grader failing at iteration 500,
    leaves the last complete run's curves as they were (its partial curves stay beside them, for a look).

    `resume_rows` (from a checkpoint's `rows()`) continues an interrupted run: each curve is put back as it was
    when the checkpoint was taken (the checkpoint keeps the curves' text), so the points logged between that
    checkpoint and the crash are not repeated, curves that `dvc repro` deleted with the stage's outputs come back,
    and the resumed run's curves equal an uninterrupted run's.
    """

    def __init__(self, live_dir: Path | None, dist: Dist, resume_rows: dict[str, int] | None = None,
                 logging: LoggingConfig | None = None, stage: str | None = None):
        self.live = None
        self.final = Path(live_dir) if live_dir is not None else None  # the last complete run's curves
        self.dir = self.final.parent / f".{self.final.name}.partial" if self.final is not None else None  # this run's
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
            import shutil

            from dvclive import Live

            shutil.rmtree(self.dir, ignore_errors=True)  # a stopped run's partial curves
            if self.resume_rows is not None:
                if self.final.is_dir():  # a checkpoint's count of lines before 2026-12-04 cuts these
                    shutil.copytree(self.final, self.dir)
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
        self._publish()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))})
            self.wandb.finish()


    def _publish(self) -> None:
        """The completed run's curves replace the last one's: renames only, so an interruption leaves either."""
        import shutil

        old = self.final.parent / f".{self.final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if self.final.exists():
            self.final.rename(old)
        self.dir.rename(self.final)
        shutil.rmtree(old, ignore_errors=True)


def _wandb_logged_in() -> bool:
    """Whether W&B has a key from `wandb login` (~/.netrc) without asking the network."""
    import netrc

    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False
