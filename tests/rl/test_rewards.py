"""Reward functions (rlhf/rl/rewards.py): TRL's signature, extra data columns, every way a function can be wrong; the
data side (extra columns kept in the prepared splits); and, through the CLI, bad functions stopping step 3 and
evaluate in one line with nothing written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from rlhf.config import RewardFunctionConfig
from rlhf.errors import UserError
from rlhf.rl.rewards import function_values, load_functions, require_applies, user_completion, user_prompt, weighted_sum
from tests.conftest import run_cli, write_params

MODULE = '''
import math

def echo_share(prompts, completions, answer, **kwargs):
    """Share of the completion's words that are words of the `answer` column."""
    out = []
    for c, a in zip(completions, answer):
        words = c.split()
        out.append(sum(w in a.split() for w in words) / len(words) if words else 0.0)
    return out

def seen(prompts, completions, **kwargs):
    return [float(len(kwargs)) for _ in completions]

def only_first(prompts, completions, **kwargs):
    return [1.0] + [None] * (len(completions) - 1)

def never(prompts, completions, **kwargs):
    return [None] * len(completions)

def raises(prompts, completions, **kwargs):
    raise KeyError("solution")

def short(prompts, completions, **kwargs):
    return [0.0]

def nan(prompts, completions, **kwargs):
    return [math.nan] * len(completions)

def text(prompts, completions, **kwargs):
    return ["good"] * len(completions)

def scalar(prompts, completions, **kwargs):
    return 1.0

def no_completions(prompts):
    return [0.0]

def positional_only(prompts, completions, /):
    return [0.0]

NOT_CALLABLE = 3
'''


@pytest.fixture()
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module of reward functions in a project folder of its own (the cwd, as a stage runs)."""
    (tmp_path / "rewards").mkdir()
    (tmp_path / "rewards" / "__init__.py").write_text("")
    (tmp_path / "rewards" / "checks.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "rewards.checks"
    for name in ("rewards.checks", "rewards"):
        sys.modules.pop(name, None)


def _load(spec: str, weight: float = 1.0):
    return load_functions([RewardFunctionConfig(function=spec, weight=weight)], "rewards.functions")[0]


ROWS = [
    {"prompt": [{"role": "user", "content": "Echo: red cat"}], "columns": {"answer": "red cat", "id": 1}},
    {"prompt": [{"role": "user", "content": "Echo: dog"}], "columns": {"answer": "dog", "id": 2}},
]


def test_a_function_gets_trl_arguments_and_the_extra_columns(module: str) -> None:
    echo, seen = _load(f"{module}:echo_share", 2.0), _load(f"{module}:seen")
    values = function_values([echo, seen], ROWS, ["red dog", "dog"], [[5, 6], [7]])
    assert values["echo_share"] == [0.5, 1.0]  # `answer` reached the function, row by row
    assert values["seen"] == [3.0, 3.0]  # **kwargs got completion_ids and both columns (answer, id)
    assert weighted_sum([echo, seen], values, 2) == [2 * 0.5 + 3.0, 2 * 1.0 + 3.0]


def test_none_adds_nothing_and_a_function_that_never_applies_is_refused(module: str) -> None:
    first, never = _load(f"{module}:only_first", 3.0), _load(f"{module}:never")
    values = function_values([first, never], ROWS, ["a", "b"], [[1], [2]])
    assert weighted_sum([first, never], values, 2) == [3.0, 0.0]
    with pytest.raises(UserError, match=r"rewards.functions\[0\] '.*:never' returned None for all 2 .*does not apply"):
        require_applies([never], values, "answers")


def test_prompts_and_completions_come_as_the_data_gave_them() -> None:
    text = {"prompt": [{"role": "user", "content": "hi"}]}
    chat = {"prompt": [{"role": "user", "content": "hi"}], "conversational": True}
    turns = {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
    assert user_prompt(text) == "hi" and user_completion(text, "yo") == "yo"
    assert user_prompt(chat) == chat["prompt"] and user_completion(chat, "yo") == [{"role": "assistant", "content": "yo"}]
    assert user_prompt(turns) == turns["prompt"]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("raises", r"'rewards.checks:raises' raised KeyError: 'solution' \(on a batch of 2 samples\): fix the function"),
        ("short", r"returned 1 values for 2 completions: return one number \(or None\) per completion"),
        ("nan", r"returned nan for sample 0: return a finite number, or None where"),
        ("text", r"returned 'good' \(str\) for sample 0: return a number"),
        ("scalar", r"returned a float, not a list"),
    ],
)
def test_a_bad_result_is_one_line_naming_the_function(module: str, name: str, message: str) -> None:
    fn = _load(f"{module}:{name}")
    with pytest.raises(UserError, match=message) as err:
        function_values([fn], ROWS, ["a", "b"], [[1], [2]])
    assert "\n" not in str(err.value) and "rewards.functions[0]" in str(err.value)


def test_a_missing_column_names_it(module: str) -> None:
    fn = _load(f"{module}:echo_share")
    rows = [{"prompt": r["prompt"]} for r in ROWS]
    with pytest.raises(UserError, match=r"needs argument\(s\) \['answer'\].*extra columns: none\): add the column"):
        function_values([fn], rows, ["a", "b"], [[1], [2]])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("rewards.nope:f", r"module 'rewards.nope' is not importable .*put it in the project folder"),
        ("rewards.checks:missing", r"module 'rewards.checks' has no 'missing': check the name"),
        ("rewards.checks:NOT_CALLABLE", r"is a int, not a function"),
        ("rewards.checks:no_completions", r"takes no 'completions' argument: give it TRL's signature"),
        ("rewards.checks:positional_only", r"cannot be called by keyword"),
    ],
)
def test_a_function_that_cannot_load_is_one_line(module: str, spec: str, message: str) -> None:
    with pytest.raises(UserError, match=message) as err:
        _load(spec)
    assert "\n" not in str(err.value) and spec in str(err.value)


def test_the_gold_scorer_does_not_pass_for_a_score_of_other_prompts() -> None:
    from rlhf.data.task import gold_reward_fn

    got = gold_reward_fn(["Sort ascending: 3 1 2", "Reverse the words: a b"], ["Sorted: 1 2 3", "b a"])
    assert got == [0.75, None]
    chat = [[{"role": "user", "content": "Sort ascending: 2 1"}]]
    assert gold_reward_fn(chat, [[{"role": "assistant", "content": "Sure! Here they are in order: 1 2."}]]) == [1.0]


def test_prepare_keeps_extra_columns_and_the_conversational_form(tmp_path: Path) -> None:
    from rlhf.config import SourceConfig, TaskConfig
    from rlhf.data.sources import load_source
    from rlhf.data.validate import validate_rows

    src = tmp_path / "rows.jsonl"
    rows = [
        {"prompt": "What is 2+2?", "answer": "4", "meta": {"level": 1}},
        {"prompt": [{"role": "user", "content": "What is 3+3?"}], "answer": "6", "meta": {"level": 2}},
        {"prompt": "What is 1+1?", "answer": {1, 2}},  # a set: JSON cannot keep it
    ]
    src.write_text("\n".join(json.dumps(r, default=str) for r in rows[:2]) + "\n")
    got = load_source(SourceConfig(path=str(src), format="prompt"), TaskConfig(), 0)
    kept, _ = validate_rows(got)
    assert [r["columns"] for r in kept] == [{"answer": "4", "meta": {"level": 1}}, {"answer": "6", "meta": {"level": 2}}]
    assert [r.get("conversational", False) for r in kept] == [False, True]
    from rlhf.data.formats import normalise

    with pytest.raises(Exception, match="column 'answer' holds a set"):
        normalise(rows[2], "prompt", {"prompt", "answer"})


# ------------------------------------------------------------------------------------------- through the CLI


def test_ppo_stops_in_one_line_on_a_function_that_does_not_import(trained: Path) -> None:
    params = write_params(trained / "bad_import.yaml", {"rewards": {"functions": [{"function": "rewards.nope:f"}]}})
    out = run_cli("ppo", "--params", params.name, "--out", "models/ppo_bad", "--metrics", "metrics/ppo_bad.json",
                  "--live", "dvclive/ppo_bad", "--checkpoints", "checkpoints/ppo_bad", cwd=trained, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        "error: rewards.functions[0] 'rewards.nope:f': module 'rewards.nope' is not importable (No module named "
        "'rewards.nope'): put it in the project folder (as rewards/nope.py, named rewards.nope, which DVC tracks) "
        "or install it"
    ]
    assert not (trained / "models/ppo_bad").exists() and not (trained / "metrics/ppo_bad.json").exists()


def test_ppo_stops_in_one_line_when_a_function_raises_and_writes_nothing(trained: Path) -> None:
    (trained / "rewards").mkdir(exist_ok=True)
    (trained / "rewards" / "__init__.py").write_text("")
    (trained / "rewards" / "checks.py").write_text(MODULE)
    params = write_params(trained / "raises.yaml", {"rewards": {"functions": [{"function": "rewards.checks:raises"}]}})
    out = run_cli("ppo", "--params", params.name, "--out", "models/ppo_raises", "--metrics", "metrics/ppo_raises.json",
                  "--live", "dvclive/ppo_raises", "--checkpoints", "checkpoints/ppo_raises", cwd=trained, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [  # tried rewards.retries (2) more times, then past rewards.max_failure_rate (0)
        "error: rewards.functions[0] 'rewards.checks:raises' left 8 of 8 samples (100.0%) unscored after 2 retries "
        "(rewards.max_failure_rate 0); its last error: KeyError: 'solution': fix the function, or raise "
        "rewards.retries / timeout_s / max_failure_rate for a grader that fails now and then"
    ], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not (trained / "models/ppo_raises").exists() and not (trained / "metrics/ppo_raises.json").exists()


def _not_the_task(trained: Path, work: Path) -> Path:
    """A project folder whose held-out prompts are not the sorting task (someone else's data), with the SFT actor
    standing in as the PPO actor; the split is resealed as prepare would (COMPLETE.json lists the new hash)."""
    import shutil

    from rlhf.pipeline.outputs import COMPLETE, sha256_file, write_json

    shutil.copytree(trained / "data", work / "data")
    shutil.copytree(trained / "models/sft", work / "ppo/actor")
    prepared = work / "data/prepared"
    rows = [json.loads(line) for line in (prepared / "ppo_eval.jsonl").read_text().splitlines()]
    for i, r in enumerate(rows):
        r["prompt"] = [{"role": "user", "content": f"Say something kind to friend {i}."}]
        r["source"] = "data/sources/mine.jsonl"
    (prepared / "ppo_eval.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    files = {str(p.relative_to(prepared)): sha256_file(p) for p in sorted(prepared.rglob("*"))
             if p.is_file() and p.name != COMPLETE}
    write_json(prepared / COMPLETE, {"files": files})
    return work


def _evaluate(trained: Path, work: Path, params: Path):
    return run_cli("evaluate", "--params", params.name, "--sft", str(trained / "models/sft"), "--ppo", "ppo",
                   "--reward", str(trained / "models/reward"), cwd=work, check=False)


def test_evaluate_refuses_the_gold_scorer_on_prompts_it_does_not_apply_to(tmp_path: Path, trained: Path) -> None:
    """The shipped task's scorer named on someone else's prompts: one line, not a gold reward of 0."""
    work = _not_the_task(trained, tmp_path / "work")
    params = write_params(work / "params.yaml", {"evaluate": {"scorers": [{"function": "rlhf.data.task:gold_reward_fn"}]}})
    out = _evaluate(trained, work, params)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(
        "error: evaluate.scorers[0] 'rlhf.data.task:gold_reward_fn' returned None for all "
    ), out.stderr[-2000:]
    assert "does not apply" in out.stderr and "Traceback" not in out.stderr
    assert not (work / "metrics").exists()


def test_evaluate_on_other_data_says_no_scorer_is_configured_then_reports_a_listed_one(
    tmp_path: Path, trained: Path
) -> None:
    work = _not_the_task(trained, tmp_path / "work")
    out = _evaluate(trained, work, write_params(work / "params.yaml"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "no gold scorer is configured" in out.stdout
    metrics = json.loads((work / "metrics/evaluate.json").read_text())
    assert "gold_reward" not in metrics["sft"]  # never a silent 0
    assert {"rm_reward", "kl_to_sft", "response_length", "perplexity"} <= set(metrics["sft"]), metrics["sft"]

    (work / "rewards").mkdir()
    (work / "rewards" / "__init__.py").write_text("")
    (work / "rewards" / "checks.py").write_text(MODULE)
    scorers = [{"function": "rewards.checks:only_first", "name": "first"}, {"function": "rewards.checks:seen"}]
    out = _evaluate(trained, work, write_params(work / "params.yaml", {"evaluate": {"scorers": scorers}}))
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.loads((work / "metrics/evaluate.json").read_text())
    for actor in ("sft", "ppo"):
        assert metrics[actor]["first"] == 1.0  # the mean over the answers it applies to (one), not over all
        assert metrics[actor]["seen"] == 1.0  # one keyword beyond prompts/completions: completion_ids
    assert "no gold scorer" not in out.stdout and "first" in out.stdout
