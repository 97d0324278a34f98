"""The environment of a multi-turn rollout (`ppo.environment.name: "module:Class"`): a data row -> the first messages;
each model turn -> what the environment says back (tool results, feedback), a reward and whether the episode is
over. A class in the project's rewards/ folder is tracked by DVC like a reward function: editing it reruns step 3.

    from rlhf.rollout.environments import Step, ToolEnvironment

    def calculate(expression: str) -> str:
        '''Evaluate an arithmetic expression.

        Args:
            expression: digits, + - * / and parentheses
        '''
        ...

    class Calculator(ToolEnvironment):
        tools = [calculate]                        # schemas from the type hints and docstring

        def score(self, answer: str) -> float:     # the turn without a tool call is the answer
            return float(answer.strip().endswith(str(self.row["answer"])))

One instance per episode, built with `ppo.environment.options` as keyword arguments, so it may keep the episode's
state on self. The episode's reward is the sum of its steps' rewards (at the end, or some on every turn).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rlhf.errors import UserError
from rlhf.rollout.environments.tools import call_tool, parse_tool_calls, tool_schema


@dataclass
class Step:
    """What the environment answers a model turn with."""

    messages: list[dict[str, Any]] = field(default_factory=list)  # fed back to the model: tool results, feedback
    reward: float = 0.0  # this turn's reward; the episode's is the sum
    done: bool = False  # the episode is over (messages are then not fed back)
    calls: int = 0  # tool calls the turn made
    failed: int = 0  # of which could not be read or run


class Environment:
    """One episode. Override `reset` (default: the row's own prompt) and `step`."""

    tools: list[Callable[..., Any]] = []  # functions the model may call (see ToolEnvironment)

    def __init__(self, describe_tools: bool = True):
        # False: the first messages already describe the tools (your data's system prompt), so they are neither
        # given to the chat template nor written into the system message
        self.describe_tools = describe_tools

    def reset(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """The first messages of the episode on `row` (a prepared data row: prompt, columns)."""
        self.row = row
        return list(row["prompt"])

    def step(self, turn: str) -> Step:
        """The model's turn (its text, special tokens removed) -> the environment's answer."""
        raise NotImplementedError

    def schemas(self) -> list[dict[str, Any]]:
        """The tools as the chat template takes them (OpenAI function schemas); [] under describe_tools False."""
        return [tool_schema(fn) for fn in self.tools] if getattr(self, "describe_tools", True) else []


class ToolEnvironment(Environment):
    """Runs the <tool_call>s of each model turn (rlhf/rollout/environments/tools.py) with `tools`, each result a
    `tool` message back; a turn without a call is the final answer, rewarded by `score`. A call that cannot be read,
    names no tool, has wrong arguments, raises or runs past `timeout_s` gets its error back as the tool's result and
    is counted failed."""

    timeout_s: float = 0.0  # set from ppo.environment.tool_timeout_s

    def step(self, turn: str) -> Step:
        calls = parse_tool_calls(turn)
        if not calls:
            return Step(reward=float(self.score(turn)), done=True)
        by_name = {fn.__name__: fn for fn in self.tools}
        messages, failed = [], 0
        for call in calls:
            if call.error is None and call.name not in by_name:
                call.error = f"there is no tool named '{call.name}' (tools: {', '.join(by_name)})"
            if call.error is not None:
                text, ok = f"error: {call.error}", False
            else:
                text, ok = call_tool(by_name[call.name], call.arguments, self.timeout_s)
            failed += not ok
            messages.append({"role": "tool", "content": text} | ({"name": call.name} if call.name else {}))
        return Step(messages, calls=len(calls), failed=failed)

    def score(self, answer: str) -> float:
        """The reward of the final answer (the row is self.row)."""
        raise NotImplementedError


def answered(spec: str, method: Callable[..., Any], *args: Any) -> Any:
    """`method(*args)` of a user's environment (reset or step), an `async def` one run to completion; anything it
    raises becomes one line naming the environment (ppo.environment.name `spec`)."""
    from rlhf.rl.rewards import completed, error_line

    try:
        return completed(method(*args))
    except UserError:
        raise
    except Exception as err:  # the user's code: one line, not a traceback
        raise UserError(f"ppo.environment '{spec}' raised {error_line(err)} in {method.__name__}: fix the environment "
                        "(a tool's own failure is better answered to the model as a message)") from None


def load_environment(spec: str, options: dict[str, Any], timeout_s: float) -> Callable[[], Environment]:
    """A factory of fresh episodes of the class `spec` names ("module:Class", ppo.environment.name), built with
    `options`; one UserError when it does not import, is not an Environment or does not take the options."""
    from rlhf.rl.rewards import import_object

    cls = import_object(spec, "ppo.environment.name")
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        raise UserError(f"ppo.environment.name '{spec}' is not a subclass of rlhf.rollout.environments.Environment: "
                        "subclass Environment (or ToolEnvironment) and implement step (and score)")

    def make() -> Environment:
        try:
            env = cls(**options)
        except TypeError as err:
            raise UserError(f"ppo.environment.options do not fit {spec} ({err}): give the keyword arguments its "
                            "__init__ takes") from None
        if isinstance(env, ToolEnvironment):
            env.timeout_s = timeout_s
        return env

    make().schemas()  # the options and the tools' schemas fail here, before any model is loaded
    return make
