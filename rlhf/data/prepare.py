"""Stage 0: load and blend the data sources, train the tokenizer when no pretrained model is named, drop (or reject)
bad rows, and split the rest disjointly among the three steps (DeepSpeed-Chat's data_split)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.config import Params, SourceConfig
from rlhf.errors import UserError

if TYPE_CHECKING:
    pass
from rlhf.data.sources import load_source_info, read_source
from rlhf.data.split import PHASES, SMALL_SPLIT_FRACTION, SPLITS, feeds, prompt_key, split_phases
from rlhf.data.validate import length_warnings, validate_rows

# ------------------------------------------------------------------------------------------------------- the stage


def load_sources(params: Params) -> tuple[list[dict], dict[str, int]]:
    """Every source of params.data, concatenated; also the rows each source gave (after weighting)."""
    rows, per_source, _ = load_sources_info(params)
    return rows, per_source


def load_sources_info(params: Params) -> tuple[list[dict], dict[str, int], dict[str, dict[str, Any]]]:
    """load_sources, plus each source's identity (sha256 of a local source, revision of a hub one)."""
    rows: list[dict] = []
    per_source: dict[str, int] = {}
    identity: dict[str, dict[str, Any]] = {}
    for src in params.data.sources:
        loaded, identity[src.path] = load_source_info(src, params.task, params.seed)
        per_source[src.path] = per_source.get(src.path, 0) + len(loaded)
        rows.extend(loaded)
    return rows, per_source, identity


def load_ptx_texts(src: SourceConfig) -> list[str]:
    """The non-empty `text` values of data.ptx_source, in order; one UserError when it has no such column or none."""
    ds = read_source(src)
    if "text" not in ds.column_names:
        raise UserError(
            f"data.ptx_source '{src.path}' has no `text` column (columns: {', '.join(ds.column_names)}): give rows "
            'of plain text as {"text": ...}, or set data.ptx_source: null to mix in the SFT demonstrations'
        )
    texts = [t for t in ds["text"] if isinstance(t, str) and t.strip()]
    if not texts:
        raise UserError(f"data.ptx_source '{src.path}' has no non-empty text: fill its `text` column or set it to null")
    return texts


def check_sources_tracked(sources: list[SourceConfig], dvc_yaml: Path) -> None:
    """Refuse a local source that the `prepare` stage of dvc_yaml does not depend on: DVC would never rerun prepare
    when the user edits it (the shipped dvc.yaml depends on data/sources/). No dvc.yaml, or no prepare stage in it,
    means the stage runs outside DVC and there is nothing to check. A dep covers a source when it is the same path
    or a folder above it; paths are compared as written (symlinks are not followed: DVC hashes what they point at)."""
    import yaml

    if not dvc_yaml.is_file():
        return
    try:
        stage = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {}).get("prepare")
    except (yaml.YAMLError, AttributeError):
        return  # dvc itself reports a broken dvc.yaml
    if not isinstance(stage, dict):
        return
    wdir = dvc_yaml.parent / str(stage.get("wdir", "."))
    deps = [Path(os.path.abspath(wdir / d)) for d in stage.get("deps") or [] if isinstance(d, str)]
    for src in sources:
        path = Path(src.path).expanduser()
        if src.path == "builtin" or not path.exists():
            continue  # builtin is params; a hub id has no file (its revision goes in the manifest)
        where = Path(os.path.abspath(path))
        if not any(where == d or d in where.parents for d in deps):
            raise UserError(
                f"data source '{src.path}' is not a dependency of the prepare stage in {dvc_yaml}, so DVC would not "
                "rerun prepare when it changes: move it under data/sources/ (a dependency already) and update "
                "data.sources[].path, or add its path to the deps of the prepare stage"
            )


def prepare_data(
    params: Params, rows: list[dict], length_fn: Callable[[dict], tuple[int, int]] | None = None
) -> tuple[dict[str, list[dict]], dict]:
    """Validate loaded rows (see load_sources) and split them; return (splits, stats).

    stats: rows_loaded, rows_valid, rows_invalid, invalid (reason -> count, all reasons), splits (name -> rows),
    prompts (name -> distinct prompts), sources (path -> {steps, rows_valid, split name -> rows}) and warnings (one
    line each: a step's train split under SMALL_SPLIT_FRACTION of the largest, valid rows left unused).
    Raises UserError, before anything is written, when a step's train or eval split would be empty.
    """
    data = params.data
    drops: dict[str, dict[str, int]] = {}
    lengths: dict[str, list[tuple[int, int]]] = {}
    valid, invalid = validate_rows(rows, data.invalid_rows, length_fn, data.max_prompt_tokens, data.max_seq_tokens,
                                   drops, data.truncate_prompts, lengths)
    if not valid:
        bad = {k: v for k, v in invalid.items() if v}
        raise UserError(
            f"no valid rows in data.sources ({len(rows)} loaded, invalid: {bad}): fix the data, "
            "data.sources[].format or the data.max_*_tokens limits"
        )
    steps = {src.path: src.steps for src in data.sources}
    splits = split_phases(valid, data.split_shares, data.eval_fraction, params.seed, steps)
    # A reward from rewards.functions alone needs no reward model: with no preference pair at all, step 2 is skipped
    not_needed = ("reward",) if params.rewards.model_weight == 0 else ()
    skipped = _check_not_empty(splits, valid, data.split_shares, steps, not_needed)
    sources: dict[str, dict[str, Any]] = {}
    for src in data.sources:
        entry = sources.setdefault(src.path, {"steps": src.steps or f"data_split {data.data_split}", "rows_valid": 0})
        entry.update(dict.fromkeys(SPLITS, 0))
    for row in valid:
        sources.setdefault(row.get("source", ""), {"steps": None, "rows_valid": 0, **dict.fromkeys(SPLITS, 0)})
        sources[row.get("source", "")]["rows_valid"] += 1
    for name, split in splits.items():
        for row in split:
            sources[row.get("source", "")][name] += 1
    for entry in sources.values():
        entry["unused"] = entry["rows_valid"] - sum(entry[name] for name in SPLITS)
    unused = sum(entry["unused"] for entry in sources.values())
    steps_of: dict[str, set[str]] = {}
    for name, split in splits.items():
        for row in split:
            steps_of.setdefault(prompt_key(row), set()).add(name.rsplit("_", 1)[0])
    stats = {
        "rows_loaded": len(rows),
        "rows_valid": len(valid),
        "rows_invalid": len(rows) - len(valid),
        "invalid": invalid,
        "splits": {name: len(split) for name, split in splits.items()},
        "prompts": {name: len({prompt_key(r) for r in split}) for name, split in splits.items()},
        "prompts_valid": len({prompt_key(r) for r in valid}),
        "rows_unused": unused,  # valid rows whose prompt went to a step they cannot feed
        "prompts_in_several_steps": sum(len(s) > 1 for s in steps_of.values()),  # only where sources' steps say so
        "sources": sources,
        "skipped_steps": skipped,  # steps with no data that the run does not need (read by their stages)
        "warnings": length_warnings(drops, data.max_prompt_tokens, data.max_seq_tokens, lengths)
        + split_warnings(splits, unused, skipped),
    }
    return splits, stats


def _check_not_empty(
    splits: dict[str, list[dict]],
    valid: list[dict],
    shares: tuple[float, ...],
    steps: dict[str, list[str] | None],
    not_needed: tuple[str, ...] = (),
) -> list[str]:
    """Every step the pipeline runs needs training rows and eval rows: an empty split stops prepare, with the reason
    and the fix, before anything is written (the training stages would refuse it later, after the wait). A step in
    `not_needed` that no valid row can feed is skipped instead: the skipped steps are returned."""
    skipped: list[str] = []
    for phase, share in zip(PHASES, shares):
        if splits[f"{phase}_train"]:
            continue
        index = PHASES.index(phase)
        feeders = [r for r in valid if feeds(r)[index]]
        named = [p for p, st in steps.items() if st and phase in st]
        if not feeders and phase in not_needed:
            skipped.append(phase)
            continue
        if not feeders:
            what = "a preference pair" if phase == "reward" else "an answer (a completion, or a pair's chosen)"
            kind = "prompt/chosen/rejected" if phase == "reward" else "prompt/completion, messages or preference"
            why, fix = f"no valid row has {what}", f"add a {kind} source"
            if phase == "reward":
                fix += " (or, for a reward from rewards.functions alone, set rewards.model_weight: 0)"
        elif not named and all(steps.get(r.get("source", "")) for r in feeders):
            why, fix = "every source that could feed it names other steps", f"add {phase} to a data.sources[].steps"
        elif not named and share <= 0:
            why, fix = f"data.data_split gives {phase} a share of 0", f"give {phase} a share in data.data_split"
        else:
            n = len({prompt_key(r) for r in feeders})
            why = f"the {len(feeders)} rows that could feed it ({n} prompts) went to other steps or to {phase}_eval"
            fix = f"raise {phase}'s share in data.data_split, give a source steps: [{phase}], or add prompts"
        raise UserError(f"{phase}_train is empty (0 rows), so the {phase} stage would train on nothing: {why}: {fix}")
    for phase in PHASES:
        if phase not in skipped and not splits[f"{phase}_eval"]:  # one prompt: held out it leaves nothing to train
            n = len({prompt_key(r) for r in splits[f"{phase}_train"]})
            raise UserError(
                f"{phase}_eval is empty (0 rows; {phase} has {n} prompt, all in {phase}_train), so the {phase} stage's "
                f"eval metrics would measure nothing: give {phase} rows with at least 2 distinct prompts (one is held "
                "out), e.g. a larger data.data_split share"
            )
    return skipped


def split_warnings(splits: dict[str, list[dict]], unused: int = 0, skipped: Sequence[str] = ()) -> list[str]:
    """One line per split that will train or measure badly: a train split far smaller than the largest one (under
    SMALL_SPLIT_FRACTION of its rows; a skipped step has none by design), and one when valid rows went unused (their
    prompt went to a step they cannot feed)."""
    sizes = {p: len(splits[f"{p}_train"]) for p in PHASES if p not in skipped}
    largest = max(sizes, key=lambda p: sizes[p])
    out = []
    for phase, n in sizes.items():
        if n < SMALL_SPLIT_FRACTION * sizes[largest]:
            out.append(
                f"{phase}_train has {n} rows, {100 * n / sizes[largest]:.1f}% of {largest}_train's {sizes[largest]} "
                f"(under {SMALL_SPLIT_FRACTION:.0%}): {phase} will learn from little; give it a larger data.data_split "
                f"share or a source with steps: [{phase}]"
            )
    if unused:
        out.append(
            f"{unused} valid rows unused: their prompt went to a step they cannot feed (a prompt feeds one step); "
            "name each source's steps (data.sources[].steps) to use them all"
        )
    return out


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
    from rlhf.data.prepare import check_sources_tracked, load_ptx_texts, load_sources_info, prepare_data
    from rlhf.data.split import write_splits
    from rlhf.models.tokenizer import load_tokenizer, row_lengths, train_tokenizer
    from rlhf.pipeline.guards import check_model_folder
    from rlhf.pipeline.outputs import make_manifest, write_output_dir

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
