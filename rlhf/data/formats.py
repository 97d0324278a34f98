"""Row formats: TRL's dataset shapes, chat messages and Anthropic transcripts, normalised to one row shape."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from rlhf.errors import UserError

if TYPE_CHECKING:
    import torch
    pass

ANSWERS = ("completion", "chosen", "rejected")

# Columns each format needs. A preference source may leave out `prompt` when chosen/rejected are full message lists
# (TRL's implicit prompt).
_COLUMNS = {
    "prompt_completion": ("prompt", "completion"),
    "unpaired": ("prompt", "completion", "label"),  # TRL's unpaired preference: one answer, thumbs up or down
    "preference": ("prompt", "chosen", "rejected"),
    "messages": ("messages",),
    "prompt": ("prompt",),
    "rm_static": ("prompt", "chosen", "rejected"),
    "hh_rlhf": ("chosen", "rejected"),
}
# Columns a format reads besides those it needs; every other column of a row is kept, under `columns`, for the
# reward functions and scorers (rlhf/rl/rewards.py).
_READ_TOO = {"preference": ("completion",), "rm_static": ("response",)}
_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")  # Anthropic transcript turn markers
_ASSISTANT = "\n\nAssistant:"


class BadRow(Exception):
    """A raw row that cannot be normalised: caught in load_source and kept as a marked row."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# ----------------------------------------------------------------------------------------------------- normalising


def detect_format(name: str, columns: set[str], raw: list[dict]) -> str:
    """The format a source's columns imply (data.sources[].format: auto)."""
    if "messages" in columns:
        return "messages"
    if {"chosen", "rejected"} <= columns:
        if "prompt" not in columns:
            # hh-rlhf keeps whole transcripts as strings; TRL's implicit-prompt preference keeps message lists.
            return "hh_rlhf" if isinstance(_first_value(raw, "chosen"), str) else "preference"
        prompt = _first_value(raw, "prompt")
        if "response" in columns or (isinstance(prompt, str) and _TURN.match(prompt.lstrip(" "))):
            return "rm_static"
        return "preference"
    if {"prompt", "completion", "label"} <= columns and isinstance(_first_value(raw, "label"), bool):
        return "unpaired"  # TRL's thumbs up/down; a label of another type (a gold answer) is just a column
    if "completion" in columns and "prompt" in columns:
        return "prompt_completion"
    if "prompt" in columns:
        return "prompt"
    raise UserError(
        f"data source '{name}' has columns {sorted(columns)}, which match no known format: rename them "
        "(prompt/completion, prompt/chosen/rejected, messages, prompt) or set data.sources[].format"
    )


def check_one_format(name: str, fmt: str, raw: list[dict]) -> None:
    """A file detected as one format whose rows are of two (prompt/completion rows among pairs, say): one line
    naming the first row of the other kind, instead of its empty columns under the detected format."""
    for i, r in enumerate(raw):
        has = {k for k, v in r.items() if v is not None}
        other = None
        if fmt in ("preference", "rm_static", "hh_rlhf") and not has & {"chosen", "rejected"}:
            other = "messages" if "messages" in has else "prompt_completion" if "completion" in has else None
        elif fmt == "messages" and "messages" not in has and "prompt" in has:
            other = "prompt_completion" if "completion" in has else "prompt"
        if other is not None:
            raise UserError(
                f"data source '{name}' mixes formats: it reads as {fmt}, but row {i} has only {sorted(has)} "
                f"(format {other}): put each format in its own file, each its own data.sources entry"
            )


def _first_value(raw: list[dict], key: str) -> Any:
    return next((r[key] for r in raw if r.get(key) is not None), None)


def normalise(raw: dict, fmt: str, columns: set[str]) -> dict:
    """One raw row -> the schema; raises BadRow when the row cannot be read in this format."""
    implicit = fmt == "preference" and "prompt" not in columns
    for col in _COLUMNS[fmt]:
        if col not in columns and not (implicit and col == "prompt"):
            raise BadRow("missing_column", f"no '{col}' column for format {fmt}")
    row: dict[str, Any] = {"prompt": None, "completion": None, "chosen": None, "rejected": None}
    if fmt == "prompt":
        row["prompt"] = _prompt(raw["prompt"])
    elif fmt == "prompt_completion":
        row["prompt"], row["completion"] = _prompt(raw["prompt"]), _answer(raw["completion"], "completion")
    elif fmt == "messages":
        row["prompt"], row["completion"] = _split_messages(raw["messages"])
    elif fmt == "unpaired":  # the answer stands where a pair's chosen or rejected one would; `label` says which
        row["prompt"], answer, label = _prompt(raw["prompt"]), _answer(raw["completion"], "completion"), raw["label"]
        if not isinstance(label, bool):
            raise BadRow("wrong_type", f"label is {label!r}, not true (desirable) or false (undesirable)")
        row["chosen" if label else "rejected"], row["label"] = answer, label
    elif fmt == "preference" and implicit:
        row["prompt"], row["chosen"], row["rejected"] = _implicit_pair(raw["chosen"], raw["rejected"])
    elif fmt == "preference":
        row["prompt"] = _prompt(raw["prompt"])
        row["chosen"], row["rejected"] = _answer(raw["chosen"], "chosen"), _answer(raw["rejected"], "rejected")
        if raw.get("completion") is not None:  # the builtin layout: a demonstration beside the pair
            row["completion"] = _answer(raw["completion"], "completion")
    elif fmt == "rm_static":
        # `response` duplicates `chosen` in rm-static, so SFT takes chosen (as DeepSpeed-Chat does).
        row["prompt"] = _transcript_prompt(_text(raw["prompt"], "prompt"))
        row["chosen"] = _text(raw["chosen"], "chosen").strip()
        row["rejected"] = _text(raw["rejected"], "rejected").strip()
    else:  # hh_rlhf
        chosen, rejected = _text(raw["chosen"], "chosen"), _text(raw["rejected"], "rejected")
        row["prompt"], row["chosen"], row["rejected"] = _hh_pair(chosen, rejected)
    if fmt == "messages" or isinstance(raw.get("prompt"), list) or implicit:
        row["conversational"] = True  # the functions get message lists, as the data gave them
    extra = {k: v for k, v in raw.items() if k not in _COLUMNS[fmt] + _READ_TOO.get(fmt, ())}
    if extra:
        try:
            json.dumps(extra, ensure_ascii=False)
        except (TypeError, ValueError):
            bad = next(k for k, v in extra.items() if not _jsonable(v))
            raise BadRow("wrong_type", f"column '{bad}' holds a {type(extra[bad]).__name__}, which a prepared split "
                       "(JSON) cannot keep") from None
        row["columns"] = extra
    return row


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return False
    return True


def _text(value: Any, field: str) -> str:
    if value is None:
        raise BadRow("empty_text", f"{field} is empty")
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"{field} is a {type(value).__name__}, not a string")
    return value


def _messages(value: Any, field: str) -> list[dict]:
    """A TRL conversational list -> plain {role, content} dicts (types are checked later, in validation)."""
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise BadRow("wrong_type", f"{field} is not a list of {{role, content}} messages")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _prompt(value: Any) -> list[dict]:
    if isinstance(value, list):
        return _messages(value, "prompt")
    return [{"role": "user", "content": _text(value, "prompt")}]


def _answer(value: Any, field: str) -> Any:
    """A plain string, or TRL's conversational answer: a list holding one assistant message."""
    if not isinstance(value, list):
        return _text(value, field)
    msgs = _messages(value, field)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise BadRow("bad_role_order", f"{field} is not a single assistant message")
    return msgs[0]["content"]


def _split_messages(value: Any) -> tuple[list[dict], Any]:
    """TRL `messages`: the turns before the last assistant turn are the prompt, that turn is the completion."""
    msgs = _messages(value, "messages")
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if last is None:
        raise BadRow("bad_role_order", "messages has no assistant turn")
    if last < len(msgs) - 1:
        raise BadRow("bad_role_order", f"messages end with a {msgs[-1]['role']} turn after the last assistant answer")
    if not any(m["role"] == "user" for m in msgs[:last]):
        raise BadRow("bad_role_order", "messages have no user turn before the assistant answer")
    return msgs[:last], msgs[last]["content"]


def _implicit_pair(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[list[dict], Any, Any]:
    """TRL implicit prompt: chosen and rejected are whole conversations; the shared leading turns are the prompt."""
    a, b = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    shared = 0
    while shared < min(len(a), len(b)) - 1 and a[shared] == b[shared]:
        shared += 1
    if len(a) - shared != 1 or len(b) - shared != 1:
        raise BadRow("mismatched_prompt", "chosen and rejected differ before their last turn")
    return a[:shared], _answer(a[shared:], "chosen"), _answer(b[shared:], "rejected")


def _transcript_prompt(text: str) -> list[dict]:
    """'\\n\\nHuman: hi\\n\\nAssistant:' -> [{user: hi}]: the empty assistant turn that invites the answer is cut."""
    parts = _TURN.split(text)
    if len(parts) == 1:  # no markers: a plain prompt
        return [{"role": "user", "content": text}]
    if parts[0].strip():
        raise BadRow("bad_role_order", "prompt has text before its first 'Human:' turn")
    msgs = [
        {"role": "user" if role == "Human" else "assistant", "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2])
    ]
    if msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
        msgs.pop()
    return msgs


def _hh_pair(chosen: str, rejected: str) -> tuple[list[dict], str, str]:
    """hh-rlhf: both texts are whole transcripts; the prompt is everything before the last Assistant turn."""
    cut_c, cut_r = chosen.rfind(_ASSISTANT), rejected.rfind(_ASSISTANT)
    if cut_c < 0 or cut_r < 0:
        raise BadRow("bad_role_order", "a transcript has no '\\n\\nAssistant:' turn")
    if chosen[:cut_c] != rejected[:cut_r]:
        raise BadRow("mismatched_prompt", "chosen and rejected transcripts differ before the last Assistant turn")
    answer_c, answer_r = chosen[cut_c + len(_ASSISTANT):].strip(), rejected[cut_r + len(_ASSISTANT):].strip()
    return _transcript_prompt(chosen[:cut_c]), answer_c, answer_r
