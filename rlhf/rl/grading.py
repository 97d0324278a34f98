"""Step 3's reward functions called the way a long run needs (`rewards.workers`, `chunk_size`, `timeout_s`,
`retries`, `max_failure_rate`): a grader that hiccups must not end a multi-hour run, and one that is broken must
stop it at once, in one line.

- The batch is cut into chunks of `chunk_size` samples (0: one call per function, TRL's way) and the calls run
  `workers` at a time on threads; an `async def` function is run to completion in its thread (a remote grader's
  requests then overlap).
- A call that raises, or takes longer than `timeout_s`, is tried again up to `retries` times. A call still failing
  after that scores its samples None for that function (TRL's "does not apply": that term adds nothing to them) and
  counts them as failed.
- When the failed share of every sample scored so far in the run passes `max_failure_rate`, step 3 stops with one
  line naming the function, the share and its last error (0, the default: the first sample that no retry could
  score stops it; a broken function fails every call, so it stops at the first batch whatever the rate).

What a call returns is checked as before (one finite number or None per sample): a wrong length or a NaN is a bug in
the function, not a hiccup, and stops the run at once. A timed-out call cannot be killed (Python threads cannot be);
it is left to finish in the background, its result dropped.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rlhf.errors import UserError
from rlhf.rl.rewards import error_line

if TYPE_CHECKING:
    from rlhf.config import RewardsConfig
    from rlhf.rl.reward_cache import RewardCache
    from rlhf.rl.rewards import RewardFunction


class CallTimeout(Exception):
    """A reward call that ran past rewards.timeout_s."""


def call_with_timeout(f: RewardFunction, kwargs: dict[str, Any], timeout_s: float) -> Any:
    """f's raw result on kwargs; CallTimeout after timeout_s seconds (0: no limit), the call left running."""
    if timeout_s <= 0:
        return f.invoke(kwargs)
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["out"] = f.invoke(kwargs)
        except BaseException as err:  # handed to the caller's thread
            box["err"] = err

    worker = threading.Thread(target=run, daemon=True, name=f"reward-{f.label}")
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise CallTimeout(f"no result after {timeout_s:g} s (rewards.timeout_s)")
    if "err" in box:
        raise box["err"]
    return box["out"]


@dataclass
class Failures:
    """Samples a function could not score after its retries, over the run so far."""

    failed: int = 0
    scored: int = 0
    since_log: int = 0  # failed samples since the last iteration's log
    last: str = ""  # the last error, as a line


class Grader:
    """Calls the reward functions of `rewards` under its call policy (module docstring); one per run."""

    def __init__(self, rewards: RewardsConfig):
        self.workers, self.chunk_size = rewards.workers, rewards.chunk_size
        self.timeout_s, self.retries, self.max_failure_rate = rewards.timeout_s, rewards.retries, rewards.max_failure_rate
        self.failures: dict[str, Failures] = {}
        self.cache: RewardCache | None = None  # rewards.cache: the stage sets it (rlhf/rl/reward_cache.py)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="rewards") if self.workers > 1 else None

    def values(self, functions: Sequence[RewardFunction], prompts: list[Any], completions: list[Any],
               ids: list[list[int]], columns: list[dict]) -> dict[str, list[float | None]]:
        """label -> one checked value (or None) per sample, every function on every chunk of the batch; with a
        cache (rlhf/rl/reward_cache.py), on the samples it does not hold only."""
        from rlhf.rl.reward_cache import MISSING

        n = len(completions)
        cache = self.cache
        out: dict[str, list[Any]] = {}
        keys = [cache.key(p, c, col) for p, c, col in zip(prompts, completions, columns, strict=True)] if cache else []
        calls: list[tuple[RewardFunction, list[int]]] = []
        for f in functions:
            out[f.label] = [cache.get(f.label, k) for k in keys] if cache else [MISSING] * n
            todo = [i for i, v in enumerate(out[f.label]) if v is MISSING]
            size = self.chunk_size or max(len(todo), 1)
            calls += [(f, todo[lo : lo + size]) for lo in range(0, len(todo), size)] or ([(f, [])] if not n else [])

        def one(call: tuple[RewardFunction, list[int]]) -> tuple[list[float | None], bool]:
            f, idx = call
            pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
            return self._attempts(f, f.arguments(pick(prompts), pick(completions), pick(ids), pick(columns)), len(idx))

        results = list(self._pool.map(one, calls)) if self._pool is not None else [one(c) for c in calls]
        for (f, idx), (got, ok) in zip(calls, results, strict=True):
            for i, v in zip(idx, got, strict=True):
                out[f.label][i] = v
            if ok and cache:
                cache.put(f.label, [(keys[i], v) for i, v in zip(idx, got, strict=True)])
        for f in functions:
            self._check_rate(f, n)
        return out

    def _attempts(self, f: RewardFunction, kwargs: dict[str, Any], n: int) -> tuple[list[float | None], bool]:
        """(the chunk's checked values, True) after up to `retries` more tries; (n Nones, False), counted, when none
        succeeded."""
        err: BaseException | None = None
        for _ in range(self.retries + 1):
            try:
                out = call_with_timeout(f, kwargs, self.timeout_s)
            except UserError:
                raise
            except Exception as caught:  # the user's code, or CallTimeout: try again
                err = caught
                continue
            return f._checked(out, n), True  # noqa: SLF001 - the function's own output check
        record = self.failures.setdefault(f.label, Failures())
        record.failed += n
        record.since_log += n
        record.last = error_line(err)
        return [None] * n, False

    def _check_rate(self, f: RewardFunction, n: int) -> None:
        record = self.failures.setdefault(f.label, Failures())
        record.scored += n
        if record.failed and record.failed > self.max_failure_rate * record.scored:
            raise UserError(
                f"{f.key} '{f.spec}' left {record.failed} of {record.scored} samples "
                f"({record.failed / record.scored:.1%}) unscored after {self.retries} retries "
                f"(rewards.max_failure_rate {self.max_failure_rate:g}); its last error: {record.last}: fix the "
                "function, or raise rewards.retries / timeout_s / max_failure_rate for a grader that fails now and then"
            )

    def take_failed(self) -> int:
        """Samples left unscored (every function) since the last call: what an iteration logs."""
        total = sum(r.since_log for r in self.failures.values())
        for r in self.failures.values():
            r.since_log = 0
        return total
