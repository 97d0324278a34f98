"""Tool calls in the Hermes/Qwen convention that transformers' `apply_chat_template(tools=...)` renders: the model
writes each call as JSON between tags,

    <tool_call>
    {"name": "calculate", "arguments": {"expression": "37 * 29"}}
    </tool_call>

and each result comes back as a `tool` message. A template that renders no tools (ours, SmolLM2's, Llama-2's) gets
Qwen's tool instructions in its system message instead, so every chat model is told the same thing; a template that
refuses a `tool` role gets the result as a user turn between <tool_response> tags (Qwen's own rendering).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

# Qwen2.5's tool instructions (its chat template's words), for templates that do not render `tools` themselves
_INSTRUCTIONS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function "
    "signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\nFor each function call, return a json "
    "object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


@dataclass
class ToolCall:
    """One call the model wrote: the tool's name and its arguments, or `error` when the call cannot be read."""

    name: str | None
    arguments: dict[str, Any]
    error: str | None = None


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every <tool_call> block of a model turn, in order. A block that is not JSON, names no tool or whose arguments
    are not an object (a JSON string holding one is accepted, as OpenAI's format sends it) becomes a call with
    `error` set, so the model is told what was wrong and the call is counted invalid."""
    calls = []
    for body in _CALL.findall(text):
        try:
            data = json.loads(body.strip())
        except json.JSONDecodeError as err:
            calls.append(ToolCall(None, {}, f"the tool call is not valid JSON ({err.msg})"))
            continue
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            calls.append(ToolCall(None, {}, 'the tool call names no tool: write {"name": ..., "arguments": {...}}'))
            continue
        args = data.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                args = None
        if not isinstance(args, dict):
            calls.append(ToolCall(data["name"], {}, "the tool call's arguments are not a JSON object"))
            continue
        calls.append(ToolCall(data["name"], args))
    return calls


def call_tool(fn: Callable[..., Any], arguments: dict[str, Any], timeout_s: float) -> tuple[str, bool]:
    """(the text the model gets back, whether the call worked): fn(**arguments) as a string, or one line saying
    why not. After timeout_s seconds (0: no limit) the call is abandoned on its daemon thread (Python cannot kill
    a thread) and reported as timed out."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["out"] = fn(**arguments)
        except Exception as err:  # the tool's failure is the model's feedback, not the run's end
            box["err"] = err

    worker = threading.Thread(target=run, daemon=True, name="tool-call")
    worker.start()
    worker.join(timeout_s if timeout_s > 0 else None)
    if worker.is_alive():
        return f"error: the tool took longer than {timeout_s:g} s", False
    if "err" in box:
        err = box["err"]
        return f"error: {type(err).__name__}: {err}", False
    out = box["out"]
    return (out if isinstance(out, str) else json.dumps(out)), True


def tool_schema(fn: Callable[..., Any]) -> dict[str, Any]:
    """The OpenAI function schema of a Python function from its type hints and Google-style docstring
    (transformers' get_json_schema, what apply_chat_template(tools=[fn]) does)."""
    from transformers.utils import get_json_schema

    return get_json_schema(fn)


def render(tok: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
           generation_prompt: bool) -> str:
    """The chat template's text of `messages`, tools given to the template that renders them, and written into the
    system message (Qwen's words) for one that does not; tool messages as user turns for a template that refuses
    them."""
    if tools and not renders_tools(tok):
        messages = with_tool_instructions(messages, tools)
    try:
        return tok.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                       add_generation_prompt=generation_prompt)
    except Exception:  # a template with strict roles (alternating user/assistant): tool results as user turns
        if not any(m["role"] == "tool" for m in messages):
            raise
        plain: list[dict[str, Any]] = []
        after_tool = False
        for m in messages:  # consecutive results in one user turn: such templates want user and assistant alternating
            text = f"<tool_response>\n{m['content']}\n</tool_response>"
            if m["role"] != "tool":
                plain.append(m)
            elif after_tool:
                plain[-1] = {**plain[-1], "content": f"{plain[-1]['content']}\n{text}"}
            else:
                plain.append({"role": "user", "content": text})
            after_tool = m["role"] == "tool"
        return tok.apply_chat_template(plain, tokenize=False, add_generation_prompt=generation_prompt)


def renders_tools(tok: PreTrainedTokenizerBase) -> bool:
    """Whether the chat template writes a `tools` list into the prompt (Qwen, Llama-3.1, Mistral, Hermes do)."""
    cached = getattr(tok, "_rlhf_renders_tools", None)
    if cached is None:
        probe = [{"role": "user", "content": "hi"}]
        schema = {"type": "function", "function": {"name": "zq_probe_tool", "description": "probe",
                                                     "parameters": {"type": "object", "properties": {}}}}
        try:
            cached = "zq_probe_tool" in tok.apply_chat_template(probe, tools=[schema], tokenize=False)
        except Exception:
            cached = False
        tok._rlhf_renders_tools = cached
    return cached


def with_tool_instructions(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` with Qwen's tool instructions at the end of the system message (a new one when there is none)."""
    text = _INSTRUCTIONS.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]
