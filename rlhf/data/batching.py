"""Padding and collation, written once for every step: right-padded training rows (SFT demonstrations, preference
pairs), left-padded prompts for generation, the answer positions of a row, and a loader that cycles without end.

Conventions: a row is a list of token ids; B rows pad to (B, T) with the tokenizer's pad id and an attention mask
of 1 on real tokens. Answers follow their prompt in the row; an answer mask marks the answer's positions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from rlhf.errors import UserError

if TYPE_CHECKING:
    import torch


IGNORE = -100  # label value the loss skips (transformers' convention)


def right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask of right-padded rows (T = the longest row)."""
    import torch

    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[j, : len(r)] = 1
    return ids, mask


def right_pad_labels(labels: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    """(B, width) labels right-padded with IGNORE."""
    import torch

    out = torch.full((len(labels), width), IGNORE, dtype=torch.long)
    for j, lab in enumerate(labels):
        out[j, : len(lab)] = torch.tensor(lab, dtype=torch.long)
    return out


def collate_prompts(width: int, pad_id: int) -> Callable[[list[list[int]]], dict[str, Any]]:
    """Left-pad prompts to a fixed width P, so every rollout of the run has the same prompt/answer boundary."""
    import torch

    def collate(batch: list[list[int]]) -> dict[str, Any]:
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(batch):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        return {"input_ids": ids, "attention_mask": mask}

    return collate


def collate_prompt_rows(width: int, pad_id: int) -> Callable[[list[tuple[list[int], dict]]], dict[str, Any]]:
    """collate_prompts over (prompt ids, data row) items, the rows kept as `rows` (for the reward functions)."""
    collate = collate_prompts(width, pad_id)

    def collate_rows(batch: list[tuple[list[int], dict]]) -> dict[str, Any]:
        return {**collate([ids for ids, _ in batch]), "rows": [row for _, row in batch]}

    return collate_rows


def answer_positions(prompt_lengths: Sequence[int], row_lengths: Sequence[int], width: int) -> torch.Tensor:
    """(B, width) float 1 on the answer's positions of each right-padded row: prompt_length .. row_length - 1."""
    import torch

    out = torch.zeros((len(row_lengths), width))
    for j, (p, n) in enumerate(zip(prompt_lengths, row_lengths)):
        out[j, p:n] = 1
    return out


class Cycle:
    """Batches from a loader, epoch after epoch without end, that can report and restore its position (for
    resuming), reshuffling each epoch as the DistributedSampler's seed + epoch dictates."""

    def __init__(self, loader: Any):
        self.loader, self.epoch, self.index, self._it = loader, 0, 0, None

    def __iter__(self) -> Cycle:
        return self

    def __next__(self) -> Any:
        if self._it is None:
            self._open()
        try:
            batch = next(self._it)
        except StopIteration:
            if self.index == 0:  # a whole epoch without a batch: recursing would never end
                raise UserError("a PPO data loader gives no batch (its split has fewer rows than one batch per rank): "
                                "lower the batch size or bring more data") from None
            self.epoch, self.index, self._it = self.epoch + 1, 0, None
            return next(self)
        self.index += 1
        return batch

    def _open(self) -> None:
        self.loader.sampler.set_epoch(self.epoch)
        self._it = iter(self.loader)
        for _ in range(self.index):
            next(self._it)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Jump to a saved position now (not at the next batch), so that it happens before RNG states are restored."""
        self.epoch, self.index = state["epoch"], state["index"]
        self._open()


def sft_length(row: dict[str, list[int]]) -> int:
    """Tokens an encoded row takes in a batch (what length grouping sorts by)."""
    return len(row["input_ids"])


def collate_sft(pad_id: int):
    """Right-pad a list of encoded rows to (B, T) tensors: input_ids, attention_mask, labels (pad -> IGNORE)."""

    def collate(batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        ids, mask = right_pad([b["input_ids"] for b in batch], pad_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": right_pad_labels([b["labels"] for b in batch], ids.shape[1])}

    return collate
