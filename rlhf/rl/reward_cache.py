"""The reward cache (`rewards.cache: true`): each reward function's values kept by (prompt, completion, the row's
other columns, the function's source), so a rerun, a resumed run or a `dvc exp run` never pays twice for an answer
an expensive grader (an LLM judge, a sandbox) already scored.

The cache is the ppo stage's `reward_cache/` folder, a persistent DVC output: DVC stores it with the run's models,
`dvc push` shares it with the team, and an experiment starts from the cache of the workspace it runs in. One file
per function version and rank: `<label>-<source hash>.rank<r>.jsonl`, one line per scored sample, appended as the
run goes (a crash loses nothing scored). The source hash is that of the file defining the function (editing the
function, or a helper beside it, starts a new file: old values never leak into a changed grader); a remote reward's
is its URL's (a server that changes its grader behind the same URL must be given a new URL or the cache cleared).

Only values from calls that succeeded are kept; a sample a function could not score (after its retries) is asked
again next time.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlhf.rl.rewards import RewardFunction

MISSING = object()  # a key the cache does not hold (None is a value: the function does not apply)
README = ("Scores of step 3's reward functions, kept by rewards.cache (rlhf/rl/reward_cache.py): one JSONL file per "
          "function version and rank. Delete a file to forget its scores.\n")


def source_hash(f: RewardFunction) -> str:
    """16 hex digits naming the function's version: its defining file's bytes, or its URL for a remote reward."""
    try:
        path = inspect.getsourcefile(f.fn)
        data = Path(path).read_bytes() if path else None
    except (TypeError, OSError):
        data = None
    if data is None:
        data = f.spec.encode()
    return hashlib.sha256(data).hexdigest()[:16]


class RewardCache:
    """label -> {sample key -> value} for `functions`, read from `folder` (every rank's files), appended to this
    rank's file."""

    def __init__(self, folder: Path, functions: list[RewardFunction], rank: int = 0):
        self.folder, self.rank = Path(folder), rank
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "README.txt").write_text(README)
        self.names = {f.label: f"{f.label}-{source_hash(f)}" for f in functions}
        self.values: dict[str, dict[str, Any]] = {}
        for label, name in self.names.items():
            table = self.values[label] = {}
            for path in sorted(self.folder.glob(f"{name}.rank*.jsonl")):
                for line in path.read_text().splitlines():
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:  # a line cut short by a crash or a full disk: asked again
                        continue
                    table[entry["key"]] = entry["value"]
        self.hits = self.lookups = 0  # this rank's, since the last take_hits
        self.run_hits = self.run_lookups = 0.0  # every rank's, over the run (rlhf/rl/report.py adds them up)

    @staticmethod
    def key(prompt: Any, completion: Any, columns: dict) -> str:
        text = json.dumps([prompt, completion, columns], sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def get(self, label: str, key: str) -> Any:
        self.lookups += 1
        value = self.values[label].get(key, MISSING)
        self.hits += value is not MISSING
        return value

    def put(self, label: str, items: list[tuple[str, Any]]) -> None:
        """Keep and append the (key, value) pairs of one successful call."""
        table = self.values[label]
        new = [(k, v) for k, v in items if k not in table]
        if not new:
            return
        table.update(new)
        with open(self.folder / f"{self.names[label]}.rank{self.rank}.jsonl", "a") as out:
            out.write("".join(json.dumps({"key": k, "value": v}) + "\n" for k, v in new))

    def take_hits(self) -> tuple[int, int]:
        """(hits, lookups) since the last call: what an iteration logs."""
        got = (self.hits, self.lookups)
        self.hits = self.lookups = 0
        return got
