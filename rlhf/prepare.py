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


def run_prepare(params: Params, out_dir: Path, dvc_yaml: Path = Path("dvc.yaml")) -> dict[str, Any]:
    """Write out_dir/{sft,reward,ppo}_{train,eval}.jsonl (and ptx_train.jsonl when data.ptx_source is set) and
    out_dir/tokenizer/; return the statistics.

    A local source must be a dependency of dvc_yaml's prepare stage, when that file exists (check_sources_tracked);
    stats["sources"] says per source where its rows went and what identifies its content (sha256 or hub revision).
    """
    from rlhf.data import check_sources_tracked, load_ptx_texts, load_sources_info, prepare_data, write_splits
    from rlhf.outputs import check_model_folder, make_manifest, write_output_dir
    from rlhf.tokenizer import load_tokenizer, row_lengths, train_tokenizer

    ptx_source = params.data.ptx_source
    check_sources_tracked(params.data.sources + ([ptx_source] if ptx_source else []), dvc_yaml)
    rows, per_source, identity = load_sources_info(params)
    if params.model.name_or_path:
        check_model_folder(params.model.name_or_path, None, "model.name_or_path")
        tok = load_tokenizer(params.model.name_or_path)
    else:
        tok = train_tokenizer(_texts(rows), params.tokenizer.vocab_size)
    splits, stats = prepare_data(params, rows, length_fn=lambda r: row_lengths(tok, r))
    if ptx_source is not None:  # ptx's plain text, cut to data.max_seq_tokens when ppo encodes it
        splits["ptx_train"] = [{"text": t} for t in load_ptx_texts(ptx_source)]
        stats["ptx_rows"] = len(splits["ptx_train"])
    for path, entry in stats["sources"].items():
        entry.update(rows_loaded=per_source.get(path, 0), **identity.get(path, {}))
    stats["vocab_size"] = len(tok)

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
