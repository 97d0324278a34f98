"""Row validation: each bad row named with its reason and a fix, and length warnings per source."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Literal

from rlhf.errors import UserError

if TYPE_CHECKING:
    pass
from rlhf.data.formats import ANSWERS

# Every reason validate_rows can give, in the order it checks them; its counts always hold all of them (zeros too),
# so stats from two runs line up key by key.
REASONS = (
    "missing_column",  # the format needs a column the source lacks (or a hand-built row lacks `prompt`)
    "wrong_type",  # a text that is not a string, a message list that is not a list of {role, content}
    "empty_text",  # None, empty or whitespace-only text where the format needs one
    "bad_role_order",  # prompt is not [system], user, assistant, ..., user; an answer is not one assistant turn
    "mismatched_prompt",  # chosen and rejected transcripts do not share the conversation before the last answer
    "chosen_equals_rejected",  # a pair that teaches the reward model nothing
    "prompt_too_long",  # over data.max_prompt_tokens
    "sequence_too_long",  # prompt + longest answer over data.max_seq_tokens
    "duplicate_row",  # the same prompt and the same answers seen earlier (the first is kept): a copy adds nothing
)
_FIX = {
    "prompt_too_long": "raise data.max_prompt_tokens or set data.invalid_rows: drop to skip such rows",
    "sequence_too_long": "raise data.max_seq_tokens or set data.invalid_rows: drop to skip such rows",
    "missing_column": "check data.sources[].format against the columns, or set data.invalid_rows: drop",
    "duplicate_row": "remove the copy or set data.invalid_rows: drop to skip copies",
}
_DEFAULT_FIX = "fix the row or set data.invalid_rows: drop to skip such rows"

# a prompt's turns after its system message: user, then (assistant, then tool results or the user) again and again
_ROLE_LETTERS = {"user": "u", "assistant": "a", "tool": "t"}
_ROLE_ORDER = re.compile(r"u(?:a(?:t+|u))*")


# ------------------------------------------------------------------------------------------------------ validating


def validate_rows(
    rows: Iterable[dict],
    mode: Literal["drop", "error"] = "drop",
    length_fn: Callable[[dict], tuple[int, int]] | None = None,
    max_prompt_tokens: int | None = None,
    max_seq_tokens: int | None = None,
    by_source: dict[str, dict[str, int]] | None = None,
    truncate_prompts: bool = False,
    lengths: dict[str, list[tuple[int, int]]] | None = None,
) -> tuple[list[dict], dict[str, int]]:
    """Keep the rows every step can train on; return them (without private keys) and reason -> count.
    `by_source`, when given, is filled with source -> reason -> count of the rows dropped, and `lengths` with
    source -> every row's (prompt, prompt + longest answer) tokens. truncate_prompts: a prompt over the limit is
    kept (its last max_prompt_tokens tokens, at encoding) instead of dropped.

    The counts hold every reason in REASONS, zeros included. `length_fn(row)` gives (prompt tokens, tokens of the
    prompt plus its longest answer); it needs the tokenizer, so the caller supplies it, and None skips length checks.
    mode "error" raises UserError at the first bad row, naming its source, row index, reason and the fix.
    Rows that share a prompt are all kept (several answers or pairs per prompt are data; split_phases keeps them
    together); only an exact copy (same prompt, same answers) is dropped as `duplicate_row`. Duplicates are checked
    last, so an invalid first copy does not shadow a valid later one.
    """
    counts = dict.fromkeys(REASONS, 0)
    by_source = {} if by_source is None else by_source
    kept: list[dict] = []
    seen: set[str] = set()
    for index, row in enumerate(rows):
        clean = {k: v for k, v in row.items() if not k.startswith("_")}
        problem = _check(row) or _check_length(clean, length_fn, max_prompt_tokens, max_seq_tokens, truncate_prompts,
                                               lengths)
        key = json.dumps([clean.get(k) for k in ("prompt", *ANSWERS, "columns")], sort_keys=True, ensure_ascii=False,
                         default=str)
        if problem is None and key in seen:
            problem = ("duplicate_row", "the same prompt and answers appear earlier in the data")
        if problem is not None:
            reason, detail = problem
            if mode == "error":
                where = f"data source '{row.get('source', '?')}' row {row.get('_row', index)}"
                raise UserError(f"{where}: {reason} ({detail}): {_FIX.get(reason, _DEFAULT_FIX)}")
            counts[reason] += 1
            per_source = by_source.setdefault(str(row.get("source", "?")), {})
            per_source[reason] = per_source.get(reason, 0) + 1
            continue
        seen.add(key)
        kept.append(clean)
    return kept, counts


def length_warnings(drops: dict[str, dict[str, int]], max_prompt_tokens: int, max_seq_tokens: int,
                    lengths: dict[str, list[tuple[int, int]]] | None = None) -> list[str]:
    """One line per source whose rows were dropped for length: how many, which limit, and the values that would
    keep 99% of that source's rows (the 99th percentiles of its prompt and prompt + answer lengths)."""
    out = []
    for source, reasons in sorted(drops.items()):
        prompts, sequences = reasons.get("prompt_too_long", 0), reasons.get("sequence_too_long", 0)
        if not prompts and not sequences:
            continue
        parts = ([f"{prompts} with a prompt over data.max_prompt_tokens {max_prompt_tokens}"] if prompts else []) + (
            [f"{sequences} with prompt + answer over data.max_seq_tokens {max_seq_tokens}"] if sequences else [])
        seen = sorted((lengths or {}).get(source, []))
        p99 = ""
        if seen:
            def pct(values: list[int]) -> int:
                return sorted(values)[min(len(values) - 1, int(0.99 * len(values)))]

            p99 = (f" (99% of its rows fit data.max_prompt_tokens {pct([p for p, _ in seen])} and data.max_seq_tokens "
                   f"{pct([s for _, s in seen])})")
        out.append(
            f"{prompts + sequences} rows of {source} dropped as too long ({', '.join(parts)}): raise "
            f"data.max_prompt_tokens / data.max_seq_tokens{p99} (and the model's max_position_embeddings), or set "
            "data.truncate_prompts: true to keep long prompts' last tokens"
        )
    return out


def _check(row: dict) -> tuple[str, str] | None:
    """(reason, detail) for the first content problem of a row, or None."""
    if "_invalid" in row:
        return row["_invalid"], row.get("_detail", "")
    if "prompt" not in row:
        return "missing_column", "the row has no prompt"
    if ("chosen" in row) != ("rejected" in row):
        return "missing_column", "the row has only one of chosen and rejected"
    prompt = row["prompt"]
    if not isinstance(prompt, list) or not all(isinstance(m, dict) for m in prompt):
        return "wrong_type", "prompt is not a list of messages"
    for m in prompt:
        if m.get("content") is None:
            return "empty_text", "a prompt message has no content"
        if not isinstance(m.get("role"), str) or not isinstance(m["content"], str):
            return "wrong_type", "a prompt message's role or content is not a string"
        if not m["content"].strip():
            return "empty_text", f"a {m['role']} message is empty"
    if not prompt:
        return "empty_text", "prompt has no messages"
    for field in ANSWERS:
        value = row.get(field)
        if value is not None and not isinstance(value, str):
            return "wrong_type", f"{field} is a {type(value).__name__}, not a string"
        if value is not None and not value.strip():
            return "empty_text", f"{field} is empty or whitespace"
    if (row.get("chosen") is None) != (row.get("rejected") is None) and row.get("label") is None:
        return "empty_text", "a pair needs both chosen and rejected"
    roles = [m["role"] for m in prompt]
    turns = roles[1:] if roles[0] == "system" else roles
    if not _ROLE_ORDER.fullmatch("".join(_ROLE_LETTERS.get(r, "?") for r in turns)):
        return "bad_role_order", (f"prompt roles are {roles}; expected [system], user, assistant, ..., user (a "
                                  "multi-turn prompt may answer an assistant turn with tool turns instead of a user's)")
    if None not in (row.get("chosen"), row.get("rejected")) and row["chosen"].strip() == row["rejected"].strip():
        return "chosen_equals_rejected", "chosen and rejected are the same text"
    return None


def _check_length(
    row: dict,
    length_fn: Callable[[dict], tuple[int, int]] | None,
    max_prompt_tokens: int | None,
    max_seq_tokens: int | None,
    truncate: bool = False,
    lengths: dict[str, list[tuple[int, int]]] | None = None,
) -> tuple[str, str] | None:
    """A row too long for the limits, or None. truncate: a long prompt counts at max_prompt_tokens (its last tokens
    are kept at encoding). `lengths` collects source -> [(prompt, sequence) tokens] for the warnings' percentiles."""
    if length_fn is None:
        return None
    prompt_tokens, seq_tokens = length_fn(row)
    if lengths is not None:
        lengths.setdefault(str(row.get("source", "?")), []).append((prompt_tokens, seq_tokens))
    if truncate and max_prompt_tokens is not None and prompt_tokens > max_prompt_tokens:
        seq_tokens -= prompt_tokens - max_prompt_tokens
        prompt_tokens = max_prompt_tokens
    if max_prompt_tokens is not None and prompt_tokens > max_prompt_tokens:
        return "prompt_too_long", f"{prompt_tokens} prompt tokens > data.max_prompt_tokens {max_prompt_tokens}"
    if max_seq_tokens is not None and seq_tokens > max_seq_tokens:
        return "sequence_too_long", f"{seq_tokens} tokens > data.max_seq_tokens {max_seq_tokens}"
    return None
