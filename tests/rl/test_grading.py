"""Reward functions called as a long run needs them (rlhf/rl/grading.py): retries, timeouts, chunks at once, async
functions, the failure-rate stop (a step-3 run through the CLI that survives a grader's hiccup: tests/rl/test_remote.py)."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import pytest

from rlhf.config import RewardFunctionConfig, RewardsConfig
from rlhf.errors import UserError
from rlhf.rl.grading import Grader
from rlhf.rl.rewards import RewardFunction

PROMPTS = ["p"] * 6
COMPLETIONS = ["ok", "ok", "boom", "ok", "ok", "ok"]


def _fn(fn, label: str = "f") -> RewardFunction:
    return RewardFunction(label, f"tests:{label}", 1.0, fn, "rewards.functions[0]")


def _grader(**policy) -> Grader:
    return Grader(RewardsConfig(functions=[RewardFunctionConfig(function="m:f")], **policy))


def _values(grader: Grader, fn: RewardFunction) -> list[float | None]:
    return grader.values([fn], PROMPTS, COMPLETIONS, [[1]] * 6, [{}] * 6)[fn.label]


def test_a_call_that_fails_once_is_retried() -> None:
    calls = []

    def flaky(prompts, completions, **kw):
        calls.append(len(completions))
        if len(calls) == 1:
            raise ConnectionError("grader hiccup")
        return [1.0] * len(completions)

    grader = _grader(retries=2)
    assert _values(grader, _fn(flaky)) == [1.0] * 6 and calls == [6, 6]
    assert grader.take_failed() == 0


def test_a_chunk_that_keeps_failing_is_scored_none_and_counted_within_the_rate() -> None:
    def fails_on_boom(prompts, completions, **kw):
        if "boom" in completions:
            raise ValueError("cannot grade boom")
        return [1.0] * len(completions)

    grader = _grader(chunk_size=2, retries=1, max_failure_rate=0.5)
    assert _values(grader, _fn(fails_on_boom)) == [1.0, 1.0, None, None, 1.0, 1.0]  # the chunk with "boom"
    assert grader.take_failed() == 2 and grader.take_failed() == 0  # counted once, for the iteration's log
    with pytest.raises(UserError, match=r"left 2 of 6 samples \(33.3%\) unscored after 1 retries "
                                        r"\(rewards.max_failure_rate 0.1\); its last error: ValueError: cannot grade"):
        _values(_grader(chunk_size=2, retries=1, max_failure_rate=0.1), _fn(fails_on_boom))


def test_past_the_failure_rate_the_run_stops_over_the_run_so_far() -> None:
    state = {"n": 0}

    def fails_second_batch(prompts, completions, **kw):
        state["n"] += 1
        if state["n"] >= 2:
            raise RuntimeError("down")
        return [0.5] * len(completions)

    grader = _grader(retries=0, max_failure_rate=0.5)
    assert _values(grader, _fn(fails_second_batch)) == [0.5] * 6
    assert _values(grader, _fn(fails_second_batch)) == [None] * 6  # 6 of 12: at the rate, not past it
    with pytest.raises(UserError, match="left 12 of 18 samples"):
        _values(grader, _fn(fails_second_batch))


def test_a_call_past_its_timeout_is_abandoned_and_retried() -> None:
    calls = []

    def slow_first(prompts, completions, **kw):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(30)  # hangs; the daemon thread is left behind
        return [2.0] * len(completions)

    grader = _grader(timeout_s=0.2, retries=1)
    assert _values(grader, _fn(slow_first)) == [2.0] * 6 and len(calls) == 2
    with pytest.raises(UserError, match="its last error: CallTimeout: no result after 0.2 s"):
        _values(_grader(timeout_s=0.2, retries=0), _fn(lambda prompts, completions, **kw: time.sleep(30)))


def test_chunks_run_workers_at_a_time_and_async_functions_are_awaited() -> None:
    lock, live, most = threading.Lock(), [0], [0]

    async def remote(prompts, completions, **kw):
        with lock:
            live[0] += 1
            most[0] = max(most[0], live[0])
        await asyncio.sleep(0.05)
        with lock:
            live[0] -= 1
        return [float(len(c)) for c in completions]

    grader = _grader(workers=3, chunk_size=1)
    assert _values(grader, _fn(remote)) == [2.0, 2.0, 4.0, 2.0, 2.0, 2.0]  # in the samples' order
    assert most[0] == 3  # three calls in flight at once, never more


def test_a_wrong_result_is_a_bug_not_a_hiccup() -> None:
    calls = []

    def nan(prompts, completions, **kw):
        calls.append(1)
        return [math.nan] * len(completions)

    with pytest.raises(UserError, match="returned nan for sample 0"):
        _values(_grader(retries=3, max_failure_rate=0.9), _fn(nan))
    assert len(calls) == 1  # not retried


def test_the_cache_answers_what_was_scored_and_forgets_a_changed_function(tmp_path) -> None:
    """rewards.cache: a sample scored once is not scored again (by another grader reading the same folder, as a
    rerun or an experiment does); a failed call is not kept; another version of the function starts afresh."""
    from rlhf.rl.reward_cache import RewardCache

    scored: list[str] = []
    fail = {"on": False}

    def judge(prompts, completions, answer, **kw):
        if fail["on"]:
            raise ConnectionError("judge down")
        scored.extend(completions)
        return [float(c == a) for c, a in zip(completions, answer)]

    fn = _fn(judge, "judge")
    prompts, answers = ["q1", "q2", "q3", "q1"], ["4", "x", "7", "4"]
    columns = [{"answer": a} for a in ["4", "5", "7", "4"]]

    def values(grader, completions):
        return grader.values([fn], prompts[: len(completions)], completions, [[1]] * len(completions),
                             columns[: len(completions)])["judge"]

    first = _grader(chunk_size=2)
    first.cache = RewardCache(tmp_path / "cache", [fn])
    assert values(first, answers) == [1.0, 0.0, 1.0, 1.0]
    assert scored == ["4", "x", "7", "4"]  # q1 twice in one batch: both asked (the cache fills after the call)
    assert first.cache.take_hits() == (0, 4)

    again = _grader(chunk_size=2)
    again.cache = RewardCache(tmp_path / "cache", [fn], rank=1)  # a later run (another rank, even)
    assert values(again, ["4", "y", "7", "4"]) == [1.0, 0.0, 1.0, 1.0]
    assert scored[4:] == ["y"] and again.cache.take_hits() == (3, 4)  # only the new answer is scored

    fail["on"] = True
    down = _grader(retries=0, max_failure_rate=0.9)
    down.cache = RewardCache(tmp_path / "cache", [fn])
    assert values(down, ["z", "x"]) == [None, 0.0]  # the unscored one is not kept...
    fail["on"] = False
    assert values(down, ["z"]) == [0.0] and scored[-1] == "z"  # ...and asked again

    files = sorted(p.name for p in (tmp_path / "cache").glob("*.jsonl"))
    assert len(files) == 2 and all(f.startswith("judge-") for f in files)  # this rank's file and rank 1's

    import importlib.util

    (tmp_path / "judges.py").write_text("def judge(prompts, completions, **kw):\n    return [0.5] * len(completions)\n")
    spec = importlib.util.spec_from_file_location("judges", tmp_path / "judges.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    other = _fn(module.judge, "judge")  # the function edited: its file is another
    changed = _grader()
    changed.cache = RewardCache(tmp_path / "cache", [other])
    assert changed.cache.names["judge"] != again.cache.names["judge"]
    assert changed.values([other], ["q1"], ["4"], [[1]], [{"answer": "4"}])["judge"] == [0.5]  # not the old 1.0
    assert changed.cache.take_hits() == (0, 1)
