"""The shipped multi-turn example: products of two numbers, which a small model cannot work out in its head but can
copy from a calculator tool. `ppo.environment.name: rlhf.rollout.environments.calculator:Calculator`.

    python -m rlhf.rollout.environments.calculator data/sources/calculator   # writes sft.jsonl and prompts.jsonl

sft.jsonl teaches the two turns in TRL's `messages` format (the tool instructions in the system message, as
`render` writes them for a template without tool support): call the tool, then answer from its result; a share
`direct_rate` of the questions is answered at once with a guess instead, so the SFT model sometimes skips the tool
and RL has something to fix. prompts.jsonl holds the questions with their `answer` column for step 3.
"""

from __future__ import annotations

import ast
import json
import operator
import random
import re
import sys
from pathlib import Path
from typing import Any

from rlhf.rollout.environments.base import ToolEnvironment
from rlhf.rollout.environments.tools import tool_schema, with_tool_instructions

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.USub: operator.neg}
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: numbers, + - * / and parentheses, e.g. "37 * 29"
    """

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"not arithmetic: {ast.unparse(node)}")

    value = ev(ast.parse(expression, mode="eval").body)
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


class Calculator(ToolEnvironment):
    """The question is the row's prompt; the reward is 1 when the last number of the final answer is the row's
    `answer` column, else 0."""

    tools = [calculate]

    def score(self, answer: str) -> float:
        numbers = _NUMBER.findall(answer)
        want = self.row.get("columns", {}).get("answer")
        return float(bool(numbers) and want is not None and float(numbers[-1]) == float(want))


def call_text(expression: str) -> str:
    """A tool call in the Hermes format."""
    return "<tool_call>\n" + json.dumps({"name": "calculate", "arguments": {"expression": expression}}) + "\n</tool_call>"


def make_rows(n: int, seed: int = 0, low: int = 11, high: int = 99, direct_rate: float = 0.4,
              instructions: bool = True) -> dict[str, list[dict[str, Any]]]:
    """{sft.jsonl: demonstrations, prompts.jsonl: questions with `answer`} for n questions a * b, a and b drawn
    from low..high. instructions False: the demonstrations carry no tool instructions (then run the environment
    with options {describe_tools: false}, so the episodes see none either)."""
    rng = random.Random(seed)
    instructions = with_tool_instructions([], [tool_schema(calculate)]) if instructions else []
    sft, prompts = [], []
    for _ in range(n):
        a, b = rng.randint(low, high), rng.randint(low, high)
        question = {"role": "user", "content": f"What is {a} * {b}?"}
        asked = [*instructions, question]
        if rng.random() < direct_rate:  # a guess, no tool: wrong but for luck
            guess = a * b + rng.choice([-1, 1]) * rng.randint(1, 50)
            sft.append({"messages": [*asked, {"role": "assistant", "content": f"The answer is {guess}."}]})
        else:
            call = {"role": "assistant", "content": call_text(f"{a} * {b}")}
            sft.append({"messages": [*asked, call]})
            sft.append({"messages": [*asked, call, {"role": "tool", "content": str(a * b)},
                                     {"role": "assistant", "content": f"The answer is {a * b}."}]})
        prompts.append({"prompt": question["content"], "answer": a * b})
    return {"sft.jsonl": sft, "prompts.jsonl": prompts}


def write_rows(folder: Path, n: int = 400, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in make_rows(n, seed).items():
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    write_rows(Path(sys.argv[1] if len(sys.argv) > 1 else "data/sources/calculator"))
