"""Multi-turn rollouts (rlhf/rollout/turns.py, rlhf/rollout/environments/): Hermes tool calls read and run, the
trajectory is the exact tokens the model drew and saw (decoded, it is the chat template's rendering of the whole
conversation, for our template and a ChatML one whose turn ends with a token other than eos), the action mask covers
the model's tokens only, budgets end episodes, and a real model's log-probs of its own turns are the training
forward's on the assembled trajectory."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from pathlib import Path

import pytest
import torch

from rlhf.config import EnvironmentConfig, Sampling
from rlhf.rollout.base import finish
from rlhf.rollout.environments.base import Environment, Step, ToolEnvironment, load_environment
from rlhf.rollout.environments.calculator import Calculator, calculate, call_text
from rlhf.rollout.environments.tools import parse_tool_calls, render
from rlhf.rollout.turns import MultiTurnRollout

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


# ------------------------------------------------------------------------------------------------ tool calls


def test_hermes_tool_calls_are_read_and_bad_ones_named() -> None:
    text = ('I will compute. <tool_call>\n{"name": "calculate", "arguments": {"expression": "2 + 3"}}\n</tool_call>'
            '<tool_call>{"name": "calculate", "arguments": "{\\"expression\\": \\"4\\"}"}</tool_call>'
            "<tool_call>{not json}</tool_call><tool_call>[1, 2]</tool_call>"
            '<tool_call>{"name": "calculate", "arguments": [1]}</tool_call><tool_call>{"name": "x"')
    calls = parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in calls[:2]] == [("calculate", {"expression": "2 + 3"}),
                                                           ("calculate", {"expression": "4"})]
    assert calls[0].error is None and calls[1].error is None
    assert "not valid JSON" in calls[2].error and "names no tool" in calls[3].error
    assert "not a JSON object" in calls[4].error and "not valid JSON" in calls[5].error  # never closed
    assert parse_tool_calls("The answer is 5.") == []


def test_the_calculator_computes_and_refuses_code() -> None:
    assert calculate("37 * 29") == "1073" and calculate("(1 + 2) / 4") == "0.75" and calculate("-3 - 4") == "-7"
    with pytest.raises(ValueError, match="not arithmetic"):
        calculate("__import__('os').getcwd()")


class Slow(ToolEnvironment):
    def sleep(seconds: float) -> str:  # noqa: N805 (a tool, not a method)
        """Sleep.

        Args:
            seconds: how long
        """
        time.sleep(seconds)
        return "woke"

    tools = [sleep, calculate]

    def score(self, answer: str) -> float:
        return 0.5


def test_a_tool_environment_runs_calls_and_counts_the_ones_that_fail() -> None:
    env = Slow()
    env.timeout_s = 0.2
    env.reset({"prompt": [{"role": "user", "content": "hi"}]})
    step = env.step(call_text("6 * 7") + '<tool_call>{"name": "sleep", "arguments": {"seconds": 5}}</tool_call>'
                    '<tool_call>{"name": "nope", "arguments": {}}</tool_call>'
                    '<tool_call>{"name": "calculate", "arguments": {"expression": "os"}}</tool_call>')
    assert [m["content"] for m in step.messages][0] == "42"
    assert "longer than 0.2 s" in step.messages[1]["content"] and "no tool named 'nope'" in step.messages[2]["content"]
    assert step.messages[3]["content"].startswith("error: ValueError")
    assert (step.calls, step.failed, step.done, step.reward) == (4, 3, False, 0.0)
    assert env.step("The answer is 42.") == Step(reward=0.5, done=True)


def test_a_class_that_is_no_environment_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rlhf.errors import UserError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "envs_here.py").write_text("class NotOne:\n    pass\n")
    with pytest.raises(UserError, match="not a subclass of rlhf.rollout.environments.Environment"):
        load_environment("envs_here:NotOne", {}, 1.0)
    with pytest.raises(UserError, match="ppo.environment.options do not fit"):
        load_environment("rlhf.rollout.environments.calculator:Calculator", {"unknown": 1}, 1.0)


# ---------------------------------------------------------------------------------- token in, token out


def _tokenizer(tmp_path: Path, chatml: bool) -> object:
    """Our BPE tokenizer (answers end with eos) or, chatml, the same vocabulary with ChatML turns ending in
    <|im_end|>, a token other than eos; pad = eos in both, as load_tokenizer leaves a tokenizer without one."""
    from rlhf.models.tokenizer import load_tokenizer, train_tokenizer

    texts = [call_text(f"{a} * {b}") + f" The answer is {a * b}. What is {a} * {b}?" for a in range(10, 40)
             for b in range(10, 14)]
    tok = train_tokenizer(texts, 400)
    tok.pad_token = None
    if chatml:
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = CHATML
    tok.save_pretrained(tmp_path / "tok")
    return load_tokenizer(tmp_path / "tok")


class Scripted:
    """A rollout engine whose model says the given texts, one per turn, each ended by the first stop id."""

    def __init__(self, tok, turns: list[str]):
        from rlhf.models.tokenizer import stop_ids

        self.tok, self.turns, self.calls, self.stop = tok, turns, 0, stop_ids(tok)[0]
        self.seen: list[list[int]] = []

    def generate(self, prompt_ids, prompt_mask, sampling):
        text = self.turns[self.calls]
        self.calls += 1
        self.seen.append(prompt_ids[0][prompt_mask[0].bool()].tolist())
        ids = self.tok(text, add_special_tokens=False)["input_ids"] + [self.stop]
        ids = ids[: sampling.max_answer_tokens]
        answer = torch.tensor([ids] * prompt_ids.shape[0])
        logprobs = -torch.arange(1, answer.shape[1] + 1, dtype=torch.float).expand(answer.shape)
        return finish(prompt_ids, prompt_mask, torch.cat([prompt_ids, answer], 1), logprobs.clone(), [self.stop])


def _play(tok, turns, budget=200, **env):
    from rlhf.models.tokenizer import stop_ids

    engine = Scripted(tok, turns)
    config = EnvironmentConfig(name="rlhf.rollout.environments.calculator:Calculator", **env)
    rollout_engine = MultiTurnRollout(engine, tok, Calculator, config, stop_ids(tok), None)
    row = {"prompt": [{"role": "user", "content": "What is 37 * 29?"}], "columns": {"answer": 1073}}
    rollout = rollout_engine.generate([row, row], Sampling(max_answer_tokens=budget))
    return rollout, rollout_engine, engine


@pytest.mark.parametrize("chatml", [False, True], ids=["eos-ends-turns", "chatml-im-end"])
def test_the_trajectory_is_the_tokens_drawn_and_the_template_around_them(tmp_path: Path, chatml: bool) -> None:
    tok = _tokenizer(tmp_path, chatml)
    turns = [call_text("37 * 29"), "The answer is 1073."]
    rollout, engine, scripted = _play(tok, turns)
    assert rollout.env_rewards.tolist() == [1.0, 1.0] and rollout.stop_reasons == ["stop", "stop"]
    assert engine.stats == {"episodes": 2.0, "turns": 4.0, "tool_calls": 2.0, "tool_failed": 0.0}

    conversation = [{"role": "user", "content": "What is 37 * 29?"}, {"role": "assistant", "content": turns[0]},
                    {"role": "tool", "content": "1073", "name": "calculate"}, {"role": "assistant", "content": turns[1]}]
    schemas = Calculator().schemas()
    whole = render(tok, conversation, schemas, False)
    p = rollout.prompt_width
    real = rollout.attention_mask[0].bool()
    text = tok.decode(rollout.sequences[0][real].tolist())
    # everything the model saw and said, as the template renders the whole conversation (up to what it writes
    # after the last turn end, which the model never sees)
    assert whole.startswith(text) and whole[len(text):].strip() == ""

    # the model's tokens exactly as drawn, masked in; the environment's masked out
    tail, mask = rollout.sequences[0, p:], rollout.action_mask[0]
    drawn = [tok(t, add_special_tokens=False)["input_ids"] + [scripted.stop] for t in turns]
    assert tail[mask.bool()].tolist() == drawn[0] + drawn[1]
    k0 = len(drawn[0])
    assert mask[:k0].tolist() == [1.0] * k0 and mask[k0] == 0
    env_len = int(rollout.attention_mask[0, p:].sum()) - len(drawn[0]) - len(drawn[1])
    assert env_len > 0 and mask[k0 : k0 + env_len].sum() == 0
    assert "1073" in tok.decode(tail[k0 : k0 + env_len].tolist())
    # the second turn was drawn on exactly the first prompt + turn + feedback (no re-tokenised history)
    prompt = rollout.sequences[0, :p][rollout.attention_mask[0, :p].bool()].tolist()
    assert scripted.seen[1] == prompt + tail[: k0 + env_len].tolist()
    # log-probs kept at the model's tokens, 0 at the environment's
    lp = rollout.logprobs[0]
    assert lp[:k0].tolist() == [-float(i) for i in range(1, k0 + 1)] and lp[k0 : k0 + env_len].abs().sum() == 0
    assert rollout.answers()[0] == drawn[0] + drawn[1]


def test_budgets_end_episodes(tmp_path: Path) -> None:
    tok = _tokenizer(tmp_path, False)
    call = call_text("37 * 29")
    rollout, engine, _ = _play(tok, [call] * 3, max_turns=3)  # never answers: out of turns
    assert rollout.stop_reasons == ["turns", "turns"] and rollout.env_rewards.tolist() == [0.0, 0.0]
    assert engine.stats["turns"] == 6 and engine.stats["tool_calls"] == 6
    n_call = len(tok(call, add_special_tokens=False)["input_ids"]) + 1
    rollout, engine, _ = _play(tok, [call] * 3, budget=n_call + 3)  # no room for the feedback and another turn
    assert rollout.stop_reasons == ["length", "length"] and engine.stats["turns"] == 2
    assert rollout.attention_mask[:, rollout.prompt_width:].sum(-1).tolist() == [n_call, n_call]
    rollout, engine, _ = _play(tok, [call], max_turn_tokens=5)  # the turn is cut: the episode ends "length"
    assert rollout.stop_reasons == ["length", "length"] and rollout.action_mask.sum(-1).tolist() == [5.0, 5.0]


class Nag(Environment):
    """Feedback without tools: asks again after each turn, 0.25 reward per turn, done after the third."""

    def step(self, turn: str) -> Step:
        self.turns = getattr(self, "turns", 0) + 1
        return Step([{"role": "user", "content": "Once more, please."}], reward=0.25, done=self.turns == 3)


def test_a_real_model_scores_its_own_turns_as_the_training_forward_does(trained: Path) -> None:
    """The trajectory holds exactly what the model drew: the engine's log-probs at the model's tokens equal one
    forward over the assembled sequence (environment tokens included as context); rewards given per turn add up."""
    from transformers import AutoModelForCausalLM

    from rlhf.models.logprobs import logprobs_from_logits
    from rlhf.models.prefix import answer_outputs
    from rlhf.models.tokenizer import load_tokenizer, stop_ids
    from rlhf.rollout.hf import GenerateRollout

    model = AutoModelForCausalLM.from_pretrained(trained / "models/sft").eval()
    tok = load_tokenizer(trained / "models/sft")
    stops = stop_ids(tok) + list(range(2, len(tok), 3))  # a third of the vocabulary ends a turn: short turns
    engine = GenerateRollout(lambda: contextlib.nullcontext(model), stops, tok.pad_token_id)
    config = EnvironmentConfig(name="tests.rollout.test_turns:Nag", max_turns=4, max_turn_tokens=30)
    multi = MultiTurnRollout(engine, tok, Nag, config, stops, None)
    row = {"prompt": [{"role": "user", "content": "Sort ascending: 3 1 2"}]}
    torch.manual_seed(0)
    with torch.no_grad():
        rollout = multi.generate([row] * 4, Sampling(max_answer_tokens=160, temperature=1.0))
        logits = answer_outputs(model, "logits", rollout.sequences, rollout.attention_mask, rollout.prompt_width, last=False)
        forward = logprobs_from_logits(logits, rollout.sequences[:, rollout.prompt_width:], 1.0)
    mask = rollout.action_mask
    ended = [r == "stop" for r in rollout.stop_reasons]
    assert sum(ended) >= 2 and multi.stats["turns"] >= 8, rollout.stop_reasons
    assert all(r == 0.75 for r, e in zip(rollout.env_rewards.tolist(), ended, strict=True) if e)
    real = rollout.attention_mask[:, rollout.prompt_width:]
    assert ((real - mask).sum(-1) > 0).all()  # environment tokens sit between the turns, attended, not trained
    assert torch.allclose(forward * mask, rollout.logprobs * mask, atol=1e-4)


def test_ranks_draw_the_same_turns_when_their_episodes_end_apart(tmp_path: Path) -> None:
    """2 ranks (torchrun, gloo), rank 0's episodes over after one turn, rank 1's after three, every generation call
    collective (a ZeRO-3 gather): rank 0 keeps drawing idle turns at rank 1's width until both are done, so neither
    hangs, and each keeps its own episodes' results."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT, cli_env
    from tests.rl.test_batches import _free_port

    env = cli_env()
    env.pop("RLHF_SINGLE_PROCESS", None)
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()),
         str(ROOT / "tests/rollout/turns_ranks.py"), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["calls"] == r1["calls"] == 3 and r0["widths"] == r1["widths"] == [5, 5, 5]  # the wider rank's
    assert (r0["turns"], r1["turns"]) == (2.0, 6.0)  # each rank's own episodes
    assert r0["rewards"] == [1.0, 1.0] and r1["rewards"] == [3.0, 3.0]
    assert r0["ends"] == r1["ends"] == ["stop", "stop"]


def test_a_strict_template_gets_several_results_as_one_user_turn(tmp_path: Path) -> None:
    """A template that wants user and assistant alternating (and knows no `tool` role): two results of one turn
    become one user turn between <tool_response> tags."""
    tok = _tokenizer(tmp_path, False)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('roles') }}{% endif %}"
        "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('alternate') }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "calls"},
                {"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}]
    text = render(tok, messages, None, True)
    assert text.endswith("user: <tool_response>\n1\n</tool_response>\n<tool_response>\n2\n</tool_response>\nassistant: ")


# ------------------------------------------------------------------------------------------- answered at once

MET = threading.Barrier(4, timeout=60)  # passed only by four steps running at the same time


class Waits(Environment):
    """A tool that waits on something slow (a sandbox, a search API): each step waits for three others."""

    def step(self, turn: str) -> Step:
        MET.wait()
        return Step(reward=1.0, done=True)


class WaitsAsync(Environment):
    async def reset(self, row: dict) -> list[dict]:
        await asyncio.sleep(0)
        self.row = row
        return list(row["prompt"])

    async def step(self, turn: str) -> Step:
        await asyncio.sleep(0)
        MET.wait()
        return Step(reward=float(self.row["columns"]["r"]), done=True)


class Breaks(Environment):
    def step(self, turn: str) -> Step:
        return Step(reward=1 / 0)


@pytest.mark.parametrize("env", [Waits, WaitsAsync], ids=["threads", "async-def"])
def test_workers_answer_episodes_at_once(tmp_path: Path, env: type) -> None:
    """ppo.environment.workers 4: the four episodes' steps run together (each waits for the other three, so one
    after another they would never pass); an `async def` reset and step are run to completion."""
    from rlhf.models.tokenizer import stop_ids

    tok = _tokenizer(tmp_path, False)
    config = EnvironmentConfig(name="tests.rollout.test_turns:Waits", workers=4)
    multi = MultiTurnRollout(Scripted(tok, ["The answer is 1."]), tok, env, config, stop_ids(tok), None)
    rows = [{"prompt": [{"role": "user", "content": "What is 1 * 1?"}], "columns": {"r": 0.5 * i}} for i in range(4)]
    rollout = multi.generate(rows, Sampling(max_answer_tokens=50))
    assert rollout.stop_reasons == ["stop"] * 4
    assert rollout.env_rewards.tolist() == ([1.0] * 4 if env is Waits else [0.0, 0.5, 1.0, 1.5])  # each its own


def test_an_environment_that_raises_is_one_line(tmp_path: Path) -> None:
    from rlhf.errors import UserError
    from rlhf.models.tokenizer import stop_ids

    tok = _tokenizer(tmp_path, False)
    for workers in (1, 2):
        config = EnvironmentConfig(name="rewards.envs:Breaks", workers=workers)
        multi = MultiTurnRollout(Scripted(tok, ["The answer is 1."]), tok, Breaks, config, stop_ids(tok), None)
        row = {"prompt": [{"role": "user", "content": "What is 1 * 1?"}]}
        with pytest.raises(UserError, match=r"^ppo.environment 'rewards.envs:Breaks' raised ZeroDivisionError: "
                                            r"division by zero in step: fix the environment"):
            multi.generate([row, row], Sampling(max_answer_tokens=50))


def test_ppo_stops_in_one_line_when_the_environment_raises_and_writes_nothing(trained: Path) -> None:
    """Through `rlhf ppo`: a user's environment raising in step is exit 2 and one line naming it, no traceback, no
    output written."""
    from tests.conftest import run_cli, write_params

    (trained / "rewards").mkdir(exist_ok=True)
    (trained / "rewards" / "__init__.py").touch()
    (trained / "rewards" / "envs.py").write_text("from rlhf.rollout.environments import Environment\n\n\n"
                                                 "class Breaks(Environment):\n    def step(self, turn):\n"
                                                 "        return 1 / 0\n")
    params = write_params(trained / "env_raises.yaml", {"rewards": {"model_weight": 0.0, "functions": []},
                                                        "ppo": {"environment": {"name": "rewards.envs:Breaks"}}})
    out = run_cli("ppo", "--params", params.name, "--out", "models/ppo_env", "--metrics", "metrics/ppo_env.json",
                  "--live", "dvclive/ppo_env", "--checkpoints", "checkpoints/ppo_env", cwd=trained, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert [line for line in out.stderr.splitlines() if line.startswith("error:")] == [
        "error: ppo.environment 'rewards.envs:Breaks' raised ZeroDivisionError: division by zero in step: fix the "
        "environment (a tool's own failure is better answered to the model as a message)"]
    assert not (trained / "models/ppo_env").exists() and not (trained / "metrics/ppo_env.json").exists()
