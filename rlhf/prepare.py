"""Stage 0: load and blend the data sources, train the tokenizer when no pretrained model is named, drop (or reject)
bad rows, and split the rest disjointly among the three steps (DeepSpeed-Chat's data_split)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhf.config import Params


def _texts(rows: list[dict[str, Any]]):
    for r in rows:
        for m in r.get("prompt") or []:
            if isinstance(m, dict) and isinstance(m.get("content"), str):
                yield m["content"]
        for k in ("completion", "chosen", "rejected"):
            if isinstance(r.get(k), str):
                yield r[k]


def run_prepare(params: Params, out_dir: Path) -> dict[str, Any]:
    """Write out_dir/{sft,reward,ppo}_{train,eval}.jsonl and out_dir/tokenizer/; return the statistics."""
    from rlhf.data import load_sources, prepare_data, write_splits
    from rlhf.outputs import make_manifest, write_output_dir
    from rlhf.tokenizer import load_tokenizer, row_lengths, train_tokenizer

    rows, per_source = load_sources(params)
    if params.model.name_or_path:
        tok = load_tokenizer(params.model.name_or_path)
    else:
        tok = train_tokenizer(_texts(rows), params.tokenizer.vocab_size)
    splits, stats = prepare_data(params, rows, length_fn=lambda r: row_lengths(tok, r))
    stats.update(sources=per_source, vocab_size=len(tok))

    def fill(tmp: Path) -> None:
        stats["hashes"] = write_splits(tmp, splits)
        # Always saved, a pretrained model's too: a reward model built from config takes its vocabulary from here.
        tok.save_pretrained(tmp / "tokenizer")

    manifest = make_manifest(
        "prepare",
        {k: getattr(params, k).model_dump() for k in ("task", "data", "tokenizer")},
        {},
        seed=params.seed,
        world_size=1,
        stats=stats,
    )
    write_output_dir(out_dir, fill, manifest)
    return stats
