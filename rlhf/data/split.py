"""Splitting rows between the steps (no prompt in two splits) and writing/reading the split files."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf.config import STEPS
from rlhf.errors import UserError

if TYPE_CHECKING:
    pass


SPLITS = ("sft_train", "sft_eval", "reward_train", "reward_eval", "ppo_train", "ppo_eval")
PHASES = STEPS  # sft, reward, ppo

# prepare warns (one line, and metrics/prepare.json `warnings`) when a step's train split holds fewer rows than this
# fraction of the largest step's: a warning changes no result, so it is a constant, not a param.
SMALL_SPLIT_FRACTION = 0.1


# ------------------------------------------------------------------------------------------------------- splitting


def feeds(row: dict) -> tuple[bool, bool, bool]:
    """Which phases (sft, reward, ppo) a row can train: SFT needs an answer (not a thumbs-down one), the preference
    step a pair or a labelled answer (KTO's)."""
    has_pair = row.get("chosen") is not None and row.get("rejected") is not None
    return (row.get("completion") is not None or row.get("chosen") is not None,
            has_pair or row.get("label") is not None, True)


def prompt_key(row: dict) -> str:
    """The prompt group of a row: its normalised prompt messages (rows of one prompt always split together)."""
    return json.dumps(row.get("prompt"), sort_keys=True, ensure_ascii=False, default=str)


def split_phases(
    rows: list[dict],
    shares: tuple[float, float, float],
    eval_fraction: float,
    seed: int,
    steps: dict[str, list[str] | None] | None = None,
) -> dict[str, list[dict]]:
    """Cut valid rows into SFT / reward / PPO sets, each with a held-out eval split, by prompt group.

    DeepSpeed-Chat's data_split, applied to prompt groups (all rows of one prompt, see prompt_key): the groups are cut,
    in one seeded order, into three contiguous slices whose row counts follow the shares, so no prompt feeds two
    phases and each phase keeps every answer or pair of its prompts. The shares are renormalised over the phases some
    row of a group can feed (prompt/completion rows skip the reward step; prompt-only rows go to PPO only); groups
    with the same feedable phases are cut together. A row that cannot feed its group's phase (a prompt/completion row
    whose prompt went to the reward step with a pair of another source) is left out: the caller counts it as unused.

    `steps` maps a source path to the steps it names (data.sources[].steps; None or missing = shared by data_split).
    A source with one step gives it all its rows; with several, they share it by their data_split shares. A group
    with rows of such a source goes to the steps that source names, taking the group's other rows along where they
    can feed it. A group whose sources name disjoint steps (the same prompt in a dedicated SFT file and a dedicated
    preference file) is the one case where a prompt feeds two phases: each source's rows go where the user sent them.

    Then each phase holds out round(eval_fraction * prompts) prompt groups (at least 1 when it has >= 2, never all),
    and a prompt held out by one phase is held out by every phase it feeds: no eval prompt is trained on anywhere.
    SFT rows without a completion get their chosen answer as completion, so the SFT step always reads `completion`.
    """
    steps = steps or {}
    named = {src for src, st in steps.items() if st}
    allowed = _allowed_phases(rows, steps, named)
    classes = _classes(rows, allowed, named)
    phase_of = _assign_phases(rows, classes, allowed, shares, seed)
    return _hold_out(rows, phase_of, eval_fraction, seed)


def _allowed_phases(rows: list[dict], steps: dict[str, list[str] | None], named: set[str]) -> list[frozenset]:
    """The phases each row can feed: by its format, narrowed to its source's data.sources[].steps."""
    allowed = []
    for row in rows:
        can = frozenset(p for p, ok in zip(PHASES, feeds(row)) if ok)
        allowed.append(can & frozenset(steps[row["source"]]) if row.get("source") in named else can)
        if not allowed[-1]:
            raise UserError(
                f"data source '{row['source']}' has rows that cannot feed its data.sources[].steps "
                f"{steps[row['source']]} (a prompt-only row feeds ppo only, a row without a pair cannot feed reward): "
                "fix its steps or its format"
            )
    return allowed


def _classes(rows: list[dict], allowed: list[frozenset],
             named: set[str]) -> dict[tuple[tuple[str, ...], bool], list[list[int]]]:
    """Units (rows that go to one phase together: a prompt group, or its part of one source with named steps),
    grouped in classes of units with the same feedable phases (and whether a source named them), cut as one."""
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(prompt_key(row), []).append(i)
    classes: dict[tuple[tuple[str, ...], bool], list[list[int]]] = {}
    for members in groups.values():
        pinned = [i for i in members if rows[i].get("source") in named]
        if not pinned:
            parts = [(frozenset.union(*(allowed[i] for i in members)), members)]
        else:
            common = frozenset.intersection(*(allowed[i] for i in pinned))
            parts = [(common, members)] if common else _by_allowed(members, pinned, allowed)
        for able, unit in parts:
            classes.setdefault((tuple(p for p in PHASES if p in able), bool(pinned)), []).append(unit)
    return classes


def _assign_phases(rows: list[dict], classes: dict[tuple[tuple[str, ...], bool], list[list[int]]],
                   allowed: list[frozenset], shares: tuple[float, float, float], seed: int) -> list[str]:
    """Each row's phase ("" = unused): each class's units in one seeded order, cut into contiguous slices whose row
    counts follow the shares renormalised over the phases the class can feed."""
    phase_of = [""] * len(rows)
    for (able, explicit), units in classes.items():
        local = [share if p in able else 0.0 for p, share in zip(PHASES, shares)]
        if explicit and len(able) == 1:
            local = [1.0 if p in able else 0.0 for p in PHASES]  # a source's one named step takes all its rows
        total = sum(local)
        if total <= 0:
            names = sorted({rows[i].get("source", "") for unit in units for i in unit})
            what = f"data source '{names[0]}'" if len(names) == 1 else f"data sources {names}"
            raise UserError(
                f"{what} can only feed {list(able)}, whose data.data_split shares are all 0: "
                "give those steps a share or drop the source"
            )
        order = list(range(len(units)))
        random.Random(f"{seed}:split:{'+'.join(able)}:{explicit}").shuffle(order)
        n_rows = sum(len(u) for u in units)
        bounds, cum = [], 0.0
        for share in local:
            cum += share
            bounds.append(n_rows * cum / total)
        done = 0
        for j in order:
            # A group goes to the slice that holds its middle row: row-count shares even when groups differ in size.
            middle, done = done + len(units[j]) / 2, done + len(units[j])
            phase = next((p for p, b in zip(PHASES, bounds) if middle < b), PHASES[-1])
            for i in units[j]:
                phase_of[i] = phase if phase in allowed[i] else ""  # "": unused (its prompt feeds another step)
    return phase_of


def _hold_out(rows: list[dict], phase_of: list[str], eval_fraction: float, seed: int) -> dict[str, list[dict]]:
    """Each phase's train and eval splits: round(eval_fraction * prompts) prompt groups held out, a prompt held out
    by one phase held out by every phase it feeds; rows shuffled; SFT rows given their chosen answer as completion."""
    held_out: dict[str, bool] = {}  # prompt key -> held out (shared by every phase the prompt feeds)
    splits: dict[str, list[dict]] = {}
    for phase in PHASES:
        members = [i for i in range(len(rows)) if phase_of[i] == phase]
        keys = list(dict.fromkeys(prompt_key(rows[i]) for i in members))
        n = len(keys)
        n_eval = min(max(1, round(eval_fraction * n)), n - 1) if n >= 2 else 0
        free = [k for k in keys if k not in held_out]
        random.Random(f"{seed}:eval:{phase}").shuffle(free)
        need = max(0, n_eval - sum(held_out.get(k, False) for k in keys))
        held_out.update({k: j < need for j, k in enumerate(free)})
        # Shuffled, so that the first rows of a split (evaluate reads a prefix) come from every source and prompt.
        random.Random(f"{seed}:order:{phase}").shuffle(members)
        chosen = [rows[i] if phase != "sft" or rows[i].get("completion") is not None
                  else {**rows[i], "completion": rows[i]["chosen"]} for i in members]
        splits[f"{phase}_eval"] = [r for r in chosen if held_out[prompt_key(r)]]
        splits[f"{phase}_train"] = [r for r in chosen if not held_out[prompt_key(r)]]
    return {name: splits[name] for name in SPLITS}


def _by_allowed(
    members: list[int], pinned: list[int], allowed: list[frozenset]
) -> list[tuple[frozenset, list[int]]]:
    """The rows of one prompt whose sources named disjoint steps, grouped by those steps; the prompt's rows from
    sources without steps go along with the first group."""
    parts: dict[frozenset, list[int]] = {}
    for i in pinned:
        parts.setdefault(allowed[i], []).append(i)
    first, pinned_set = next(iter(parts)), set(pinned)
    parts[first].extend(i for i in members if i not in pinned_set)
    return list(parts.items())


# --------------------------------------------------------------------------------------------------------- writing


def write_splits(out_dir: Path, splits: dict[str, list[dict]]) -> dict[str, str]:
    """Write `<name>.jsonl` per split (utf-8, sorted keys, one object a line); return name -> sha256 of the file.

    Each file is written under a temporary name in the same folder and renamed when complete, so a killed run never
    leaves a half file that looks finished.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hashes: dict[str, str] = {}
    for name, rows in splits.items():
        final, tmp = out_dir / f"{name}.jsonl", out_dir / f".{name}.jsonl.tmp"
        digest = hashlib.sha256()
        try:
            with tmp.open("wb") as f:
                for row in rows:
                    clean = {k: v for k, v in row.items() if not k.startswith("_")}
                    line = (json.dumps(clean, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
                    digest.update(line)
                    f.write(line)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        hashes[name] = digest.hexdigest()
    return hashes


def read_split(path: Path) -> list[dict]:
    """Read one split written by write_splits. The prepared folder is checked against its COMPLETE.json first
    (once per process, as model folders are): a split edited by hand or half copied is refused, not trained on."""
    from rlhf.pipeline.guards import verify_output_dir

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such split file: run the prepare stage first (dvc repro prepare)")
    verify_output_dir(path.parent)
    rows = []
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({err.msg}): rerun the prepare stage") from None
                missing = [k for k in _SPLIT_KEYS.get(path.stem.split("_")[0], ()) if not isinstance(row, dict) or k not in row]
                if missing:
                    raise UserError(f"{path}:{lineno}: the row has no {' or '.join(missing)}: this is not a split prepare "
                                    "wrote; rerun the prepare stage (dvc repro prepare)")
                rows.append(row)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text: rerun the prepare stage (dvc repro prepare)") from None
    return rows


# The keys every row of a split has (by the split name's first word), as write_splits writes them.
_SPLIT_KEYS = {"sft": ("prompt",), "reward": ("prompt", "chosen", "rejected"), "ppo": ("prompt",), "ptx": ("text",)}
