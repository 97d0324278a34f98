"""Params of the data: the shipped task, the sources (files, folders, hub datasets) and how rows are split and checked."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from rlhf.config.base import Group


class TaskConfig(Group):
    """The shipped, seeded sorting task (rlhf/data/task.py); used when data.sources holds `builtin`."""

    num_rows: int = Field(30000, gt=0)  # rows generated; data.data_split shares them among the three steps
    min_len: int = Field(3, ge=2)  # fewest numbers in a list to sort
    max_len: int = Field(6, ge=2)  # most numbers in a list to sort
    max_value: int = Field(29, ge=1)  # numbers are drawn from 0..max_value
    demo_error_rate: float = Field(0.45, ge=0, le=1)  # share of SFT demonstrations with a wrong ordering
    demo_impolite_rate: float = Field(0.6, ge=0, le=1)  # share of SFT demonstrations without the polite frame
    pair_error_rate: float = Field(0.4, ge=0, le=1)  # share of preference-pair candidates with a wrong ordering
    pair_impolite_rate: float = Field(0.5, ge=0, le=1)  # share of preference-pair candidates without the frame

    @model_validator(mode="after")
    def _lengths(self) -> TaskConfig:
        if self.min_len > self.max_len:
            raise ValueError(f"task.min_len ({self.min_len}) exceeds task.max_len ({self.max_len}): lower min_len")
        return self


STEPS = ("sft", "reward", "ppo")
# The steps a row of each format can feed: SFT needs an answer, the reward model a pair, PPO only a prompt.
FORMAT_STEPS = {
    "prompt": ("ppo",),
    "prompt_completion": ("sft", "ppo"),
    "unpaired": STEPS,  # a desirable answer is a demonstration too; the labelled answers feed dpo.loss_type kto
    "messages": ("sft", "ppo"),
    "preference": STEPS,
    "rm_static": STEPS,
    "hh_rlhf": STEPS,
}


class SourceConfig(Group):
    """One data source. `path` is `builtin`, a local file/folder, or a hub dataset id."""

    path: str  # builtin (the shipped task), a .jsonl/.json/.csv/.parquet file, a folder of them, or a hub id
    split: str = "train"  # split to read from a hub id or a save_to_disk DatasetDict
    weight: float = Field(1.0, gt=0)  # fraction of the source's rows to use (1.0 = all); blends sources
    # the rows' shape (README, "Your data"); auto: told from the columns
    format: Literal["auto", "prompt_completion", "preference", "unpaired", "messages", "prompt", "rm_static",
                    "hh_rlhf"] = "auto"
    # The steps this source feeds (TRL/OpenRLHF: one dataset per trainer); null = shared by data.data_split.
    # Several steps share the source by their data.data_split shares.
    steps: list[Literal["sft", "reward", "ppo"]] | None = None

    @model_validator(mode="after")
    def _steps(self) -> SourceConfig:
        if self.steps is None:
            return self
        if not self.steps or len(set(self.steps)) != len(self.steps):
            raise ValueError(
                f"steps of '{self.path}' is {self.steps}: list each step once (sft, reward, ppo) "
                "or leave steps out to share the source by data.data_split"
            )
        able = FORMAT_STEPS.get(self.format, STEPS)
        cannot = [s for s in self.steps if s not in able]
        if cannot:
            raise ValueError(
                f"steps of '{self.path}' names {cannot}, which format {self.format} cannot feed "
                f"(it feeds {list(able)}): remove them from its steps, or feed them from a source that has "
                + ("preference pairs" if "reward" in cannot else "answers")
            )
        return self


class DataConfig(Group):
    """Where the rows come from and how they are shared among the three steps."""

    # the data: a list of sources, each split among the steps it feeds (builtin: the shipped sorting task)
    sources: list[SourceConfig] = Field(default_factory=lambda: [SourceConfig(path="builtin")])
    # DeepSpeed-Chat's data_split: relative shares of every source for SFT, reward model and PPO, disjoint.
    data_split: str = "2,4,4"
    eval_fraction: float = Field(0.1, gt=0, lt=1)  # share of each step's rows held out for evaluation
    invalid_rows: Literal["drop", "error"] = "drop"  # drop and count bad rows, or stop at the first one
    # Sized for the shipped task (its prompts are 12-25 tokens); real chat data needs more: prepare's warning names
    # the 99th percentile of each source's lengths. Keep max_position_embeddings above max_seq_tokens
    max_prompt_tokens: int = Field(48, gt=0)  # rows whose prompt is longer are invalid (unless truncate_prompts)
    max_seq_tokens: int = Field(96, gt=0)  # rows whose prompt + response is longer are invalid
    # true: a prompt over max_prompt_tokens keeps its last max_prompt_tokens tokens (left truncation, TRL's) in every
    # step instead of its row being dropped; the row is then checked against max_seq_tokens at that length
    truncate_prompts: bool = False
    # ptx's data (ppo.loss.ptx_coef > 0; DeepSpeed-Chat's --unsupervised_dataset_name): a source of plain text, rows with
    # a `text` column (a local json/jsonl/parquet/csv/arrow file or save_to_disk folder, or a hub id); null = the SFT
    # demonstrations. prepare writes it to data/prepared/ptx_train.jsonl, each text cut to max_seq_tokens
    ptx_source: SourceConfig | None = None

    @model_validator(mode="after")
    def _split(self) -> DataConfig:
        parts = self.data_split.split(",")
        try:
            shares = [float(p) for p in parts]
        except ValueError:
            shares = []
        if len(shares) != 3 or not all(math.isfinite(s) and s >= 0 for s in shares) or sum(shares) <= 0:
            raise ValueError(
                f"data.data_split is {self.data_split!r}: give three non-negative shares for sft,reward,ppo, e.g. '2,4,4'"
            )
        if self.max_prompt_tokens >= self.max_seq_tokens:
            raise ValueError("data.max_prompt_tokens must be below data.max_seq_tokens: raise max_seq_tokens")
        if not self.sources:
            raise ValueError(
                "data.sources is empty, so there is no data: list a source (- path: data/sources/rows.jsonl), or "
                "remove the key for the shipped task (path: builtin)"
            )
        steps: dict[str, Any] = {}
        for src in self.sources:  # rows carry their source's path, so one path has one set of steps
            if steps.setdefault(src.path, src.steps) != src.steps:
                raise ValueError(
                    f"data.sources lists '{src.path}' twice with different steps ({steps[src.path]} and "
                    f"{src.steps}): give both entries the same steps"
                )
        return self

    @property
    def split_shares(self) -> tuple[float, float, float]:
        a, b, c = (float(p) for p in self.data_split.split(","))
        return a, b, c
