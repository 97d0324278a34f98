"""Data loaders for training rows: a length-grouped sampler (less padding) and the loader itself."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from rlhf.training.runtime import Dist


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
