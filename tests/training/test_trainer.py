"""rlhf/training/loaders.py make_loader: length-grouped training batches pad far less than random ones, yet each rank sees
the same rows as DistributedSampler gives it, in an order fixed by (seed, epoch)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from rlhf.training.loaders import make_loader
from rlhf.training.runtime import Dist


def _rank(rank: int, world_size: int = 1) -> Dist:
    return Dist(rank=rank, world_size=world_size, local_rank=rank, device="cpu")


def _epoch(loader, epoch: int) -> list[list]:
    loader.sampler.set_epoch(epoch)
    return list(loader)


def _padding(loader) -> float:
    """Share of the epoch's batch tokens that are padding."""
    masks = [batch["attention_mask"] for batch in _epoch(loader, 0)]
    return 1 - sum(m.sum().item() for m in masks) / sum(m.numel() for m in masks)


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_grouped_batches_pad_much_less_on_the_shipped_rows(prepared: Path, stage: str) -> None:
    from rlhf.data.batching import collate_sft, sft_length
    from rlhf.data.split import read_split
    from rlhf.models.tokenizer import encode_sft_row, load_tokenizer
    from rlhf.prefs.reward_model import collate_pairs, encode_pair, pair_length

    tok = load_tokenizer(prepared / "data/prepared/tokenizer")
    if stage == "sft":
        raw = read_split(prepared / "data/prepared/sft_train.jsonl")
        rows, collate, length = [encode_sft_row(tok, r, False) for r in raw], collate_sft(tok.pad_token_id), sft_length
    else:
        raw = read_split(prepared / "data/prepared/reward_train.jsonl")
        rows, collate, length = [encode_pair(tok, r) for r in raw], collate_pairs(tok.pad_token_id), pair_length
    random_ = _padding(make_loader(rows, 8, collate, _rank(0), seed=0, shuffle=True))
    grouped = _padding(make_loader(rows, 8, collate, _rank(0), seed=0, shuffle=True, lengths=[length(r) for r in rows]))
    assert random_ > 0.1 and grouped < random_ / 2, (random_, grouped)


_rng = random.Random(0)
LENGTHS = [_rng.randint(5, 90) for _ in range(203)]  # an odd count: each rank has a ragged end


def _grouped(rank: int, world_size: int = 1, seed: int = 7, lengths: list[int] | None = LENGTHS):
    rows = list(range(len(LENGTHS)))  # a row is its own index, so batches show which rows they hold
    return make_loader(rows, 4, list, _rank(rank, world_size), seed, shuffle=True, lengths=lengths)


def test_grouped_order_is_fixed_by_seed_and_epoch() -> None:
    first = _epoch(_grouped(0), 0)
    assert _epoch(_grouped(0), 0) == first  # a fresh loader (a resumed run) replays the epoch
    assert _epoch(_grouped(0), 1) != first and _epoch(_grouped(0, seed=8), 0) != first
    # not one sorted sweep: the micro batches run in shuffled order
    widths = [max(LENGTHS[i] for i in batch) for batch in first]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)


@pytest.mark.parametrize("epoch", [0, 3])
def test_two_ranks_get_disjoint_equal_shares_of_the_same_rows_as_ungrouped(epoch: int) -> None:
    grouped = [[i for b in _epoch(_grouped(r, 2), epoch) for i in b] for r in (0, 1)]
    plain = [[i for b in _epoch(_grouped(r, 2, lengths=None), epoch) for i in b] for r in (0, 1)]
    # 203 rows: 101 per rank (DistributedSampler's drop_last), 25 full batches of 4, the last row dropped
    assert [len(g) for g in grouped] == [100, 100] and not set(grouped[0]) & set(grouped[1])
    assert all(len(set(g)) == len(g) for g in grouped)  # each row at most once
    assert len(set(grouped[0]) | set(grouped[1])) == len(LENGTHS) - 3  # every row but the ragged ends, once
    # only the order changes: each rank trains on exactly the rows it trained on before grouping
    assert [sorted(g) for g in grouped] == [sorted(p) for p in plain] and grouped != plain
