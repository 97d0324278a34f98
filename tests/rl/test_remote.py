"""A reward behind a URL (rlhf/rl/remote.py): OpenRLHF's request shape, the grader's retries on a server error,
and `rlhf serve-reward` serving a project's function to a step-3 run through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.config import RewardFunctionConfig, RewardsConfig
from rlhf.rl.grading import Grader
from rlhf.rl.remote import RemoteReward, reward_server, serve_in_thread
from rlhf.rl.rewards import load_functions
from tests.conftest import cli_env, run_cli, write_params


@pytest.fixture()
def server():
    """A reward server on a free port of 127.0.0.1 scoring each completion's length (plus the `bonus` column), that
    fails its first request when `fail_first` is set; yields (url, the requests it saw, the settings)."""
    seen, settings = [], {"fail_first": False}

    def score(prompts, completions, columns):
        seen.append((prompts, completions, columns))
        if settings["fail_first"] and len(seen) == 1:
            raise RuntimeError("warming up")
        return [float(len(c)) + row.get("bonus", 0) for c, row in zip(completions, columns)]

    srv = reward_server(score, "127.0.0.1", 0)
    serve_in_thread(srv)
    yield f"http://127.0.0.1:{srv.server_address[1]}/score", seen, settings
    srv.shutdown()
    srv.server_close()


def test_the_request_is_openrlhfs_and_the_columns_travel(server) -> None:
    url, seen, _ = server
    remote = RemoteReward(url)
    assert remote(["Say hi"], ["hello"], answer=["hi"], bonus=[1]) == [6.0]
    prompts, completions, columns = seen[0]
    assert (prompts, completions, columns) == (["Say hi"], ["hello"], [{"answer": "hi", "bonus": 1}])


def test_a_url_is_a_reward_function_and_a_server_error_is_retried(server) -> None:
    url, seen, settings = server
    settings["fail_first"] = True
    f = load_functions([RewardFunctionConfig(url=url, name="judge")], "rewards.functions")[0]
    grader = Grader(RewardsConfig(functions=[RewardFunctionConfig(url=url)], retries=1))
    values = grader.values([f], ["p", "q"], ["ab", "abc"], [[1], [2]], [{}, {}])
    assert values == {"judge": [2.0, 3.0]} and len(seen) == 2  # the 500 counted as a failed call, then retried
    with pytest.raises(ValueError, match="either `function`"):
        RewardFunctionConfig(url=url, function="m:f")


def test_an_unreachable_url_is_a_failed_call_in_one_line() -> None:
    from rlhf.errors import UserError

    f = load_functions([RewardFunctionConfig(url="http://127.0.0.1:9/none")], "rewards.functions")[0]
    grader = Grader(RewardsConfig(functions=[RewardFunctionConfig(url="http://127.0.0.1:9/none")], retries=0))
    with pytest.raises(UserError, match=r"'http://127.0.0.1:9/none' left 1 of 1 samples .* ConnectionError: "
                                        r"http://127.0.0.1:9/none is unreachable"):
        grader.values([f], ["p"], ["a"], [[1]], [{}])


SCORER = '''
from pathlib import Path


def digits(prompts, completions, **kwargs):
    """The share of the answer's characters that are digits; raises on its third call, once (a grader's hiccup)."""
    count = Path("calls.txt")
    n = int(count.read_text()) + 1 if count.exists() else 1
    count.write_text(str(n))
    if n == 3:
        raise ConnectionError("grader went away for a moment")
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
'''


def test_step_3_scores_through_rlhf_serve_reward_and_survives_a_hiccup(trained: Path) -> None:
    """`rlhf serve-reward --function rewards.remote_scorer:digits --port 0` serves the project's function; GRPO with
    `rewards.functions: [{url: ...}]` trains against it and logs its term. The function raised once, on its third
    call (the server answered 500): that used to end step 3 with exit 2; retried, the run completes and the curve of
    unscored samples says none was lost."""
    (trained / "rewards").mkdir(exist_ok=True)
    (trained / "rewards" / "__init__.py").write_text("")
    (trained / "rewards" / "remote_scorer.py").write_text(SCORER)
    (trained / "calls.txt").unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "stages.cli", "serve-reward", "--function",
                             "rewards.remote_scorer:digits", "--port", "0"], cwd=trained, env=cli_env(),
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert line.startswith("serving rewards.remote_scorer:digits on http://127.0.0.1:"), line
        url = line.split(" on ")[1].split()[0]
        write_params(trained / "remote.yaml", {"rewards": {"model_weight": 0.0, "functions": [
            {"url": url, "name": "digits"}]}, "ppo": {"algorithm": "grpo", "rollout_batch_size": 4}})
        live = trained / "dvclive/ppo_remote"
        run_cli("ppo", "--params", "remote.yaml", "--out", "models/ppo_remote", "--metrics", "metrics/ppo_remote.json",
                "--live", str(live), "--checkpoints", "checkpoints/ppo_remote", cwd=trained)
        assert (live / "plots/metrics/ppo/term/digits.tsv").is_file()
        assert json.loads((trained / "metrics/ppo_remote.json").read_text())["iterations"] == 2
        assert int((trained / "calls.txt").read_text()) > 3  # the third call raised; the run went on
        failures = (live / "plots/metrics/ppo/reward_failures.tsv").read_text().splitlines()[1:]
        assert failures and all(float(line.split("\t")[1]) == 0 for line in failures)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
