"""The table a person reads after a run (`rlhf summary`, the end of `make repro` and `rlhf train`): one row per
stage with its key figures, training time and where its output is, at most 100 columns wide. `dvc metrics show`
keeps every number; this keeps the few that say whether the run worked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WIDTH = 100


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _figures(stage: str, m: dict[str, Any]) -> str:
    """The key figures of one stage's metrics file."""
    if m.get("trained") is False:
        return "placeholder: no preference pairs, nothing to train"
    if stage == "prepare":
        s = m.get("splits", {})
        return (f"{m.get('rows_valid', '?')} rows ({m.get('rows_invalid', 0)} dropped) -> sft {s.get('sft_train', 0)}, "
                f"reward {s.get('reward_train', 0)}, ppo {s.get('ppo_train', 0)}")
    if stage == "sft":
        return f"perplexity {m.get('perplexity', float('nan')):.3f} after {m.get('steps', '?')} steps"
    if stage == "reward":
        return (f"pair accuracy {m.get('accuracy', float('nan')):.3f}, chosen {m.get('chosen_mean', 0):.2f} vs "
                f"rejected {m.get('rejected_mean', 0):.2f}")
    if stage == "dpo":
        return f"pair accuracy {m.get('accuracy', float('nan')):.3f}, margin {m.get('margin', float('nan')):.3f}"
    if stage == "ppo":
        early = ", stopped early" if m.get("stopped_early") else ""
        return (f"{m.get('algorithm', 'ppo')}: held-out reward {m.get('reward_sft', float('nan')):.3f} -> "
                f"{m.get('reward_ppo', float('nan')):.3f}, KL {m.get('final_kl', float('nan')):.3f}, "
                f"{m.get('iterations', '?')} it.{early}")
    if stage == "evaluate" and m:
        actors = sorted((a for a in m if isinstance(m[a], dict)), key=lambda a: (a != "sft", a in ("ema", "dpo"), a))
        first = m[actors[0]] if actors else {}
        skip = {"kl_to_sft", "num_prompts", "perplexity", "response_length", "rm_reward"}
        score = next((k for k in first if k not in skip), "rm_reward" if "rm_reward" in first else None)
        if score is None:
            return "no scorer"
        values = [f"{a} {m[a].get(score, float('nan')):.3f}" for a in actors]
        return f"{score}: {values[0]} -> " + ", ".join(values[1:]) if len(values) > 1 else f"{score}: {values[0]}"
    return ""


def summary_lines(root: Path = Path(".")) -> list[str]:
    """The table's lines for the stages of root/dvc.yaml whose metrics exist, each at most WIDTH characters."""
    import yaml

    try:
        stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return []
    rows = []
    for name, spec in stages.items():
        files = [next(iter(x)) if isinstance(x, dict) else x for x in spec.get("metrics") or []]
        metrics = _load(root / files[0]) if files else None
        if metrics is None:
            continue
        outs = [next(iter(x)) if isinstance(x, dict) else x for x in spec.get("outs") or []]
        seconds = metrics.get("train_seconds")
        rows.append((name, _figures(name, metrics), f"{seconds:.0f} s" if isinstance(seconds, (int, float)) else "",
                     outs[0] if outs else files[0]))
    if not rows:
        return []
    head = ("stage", "key figures", "train", "output")
    w0 = max(len(head[0]), *(len(r[0]) for r in rows))
    w2 = max(len(head[2]), *(len(r[2]) for r in rows))
    w3 = min(24, max(len(head[3]), *(len(r[3]) for r in rows)))
    w1 = WIDTH - w0 - w2 - w3 - 6

    def line(cells: tuple[str, str, str, str]) -> str:
        a, b, c, d = cells
        b = b if len(b) <= w1 else b[: w1 - 1] + "~"
        d = d if len(d) <= w3 else d[: w3 - 1] + "~"
        return f"{a:<{w0}}  {b:<{w1}}  {c:>{w2}}  {d}".rstrip()

    return [line(head), "-" * WIDTH, *(line(r) for r in rows)]
