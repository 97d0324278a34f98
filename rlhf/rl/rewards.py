"""Reward terms of step 3 and the quality scorers of `evaluate`: Python functions with TRL's reward-function
signature, named "module:function" in params.yaml (`rewards.functions`, `evaluate.scorers`).

    def my_reward(prompts, completions, **columns) -> list[float | None]: ...

The function is called by keyword (trl GRPOTrainer._calculate_rewards): `prompts` and `completions` as the user's
data holds them (plain strings; message lists, and completions as [{"role": "assistant", "content": ...}], for
conversational data), `completion_ids` (the answer's token ids, its eos included when it stopped), and one list per
extra column of the data rows (an `answer` key column, say). A function receives the columns it names, or all of them
through **kwargs. It returns one number per sample, or None where it does not apply (TRL's convention: that sample gets
nothing from it, and the term's mean leaves it out). A function that applies to no sample at all is an error.

Every way a function can be wrong (it does not import, is not callable, cannot take the arguments, raises, returns
the wrong length, NaN or a non-number) is one UserError naming the function and the fix.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.config import RewardFunctionConfig
from rlhf.errors import UserError

# The project folder whose files DVC tracks for reward functions (a dep of the ppo and evaluate stages).
TRACKED_FOLDERS = ("rewards", "rlhf")

_ARGS = ("prompts", "completions", "completion_ids")


@dataclass(frozen=True)
class RewardFunction:
    """One loaded function of a params list (`key` is where it is named, for messages)."""

    label: str
    spec: str
    weight: float
    fn: Callable[..., Any]
    key: str
    # from the signature (__post_init__): keyword parameters, the required ones, positional-only ones, **kwargs
    named: set[str] = field(init=False, repr=False)
    required: set[str] = field(init=False, repr=False)
    positional_only: list[str] = field(init=False, repr=False)
    var_kw: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        """Read the function's signature once: which arguments it takes by keyword, and whether **kwargs."""
        try:
            params = list(inspect.signature(self.fn).parameters.values())
        except (TypeError, ValueError):  # a builtin without a signature: trust it
            params, var_kw = [], True
        else:
            var_kw = any(p.kind == p.VAR_KEYWORD for p in params)
        keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        set_ = object.__setattr__  # frozen: derived once here
        set_(self, "named", {p.name for p in params if p.kind in keyword})
        set_(self, "required", {p.name for p in params if p.kind in keyword and p.default is p.empty})
        set_(self, "positional_only", [p.name for p in params if p.kind == p.POSITIONAL_ONLY and p.default is p.empty])
        set_(self, "var_kw", var_kw)

    def __call__(self, prompts: list[Any], completions: list[Any], ids: list[list[int]],
                 columns: list[dict]) -> list[float | None]:
        """The function's values for a batch, checked: one finite number or None per sample."""
        n = len(completions)
        try:
            out = self.invoke(self.arguments(prompts, completions, ids, columns))
        except UserError:
            raise
        except Exception as err:  # the user's code: any failure becomes one line
            raise self.failed(err, n) from None
        return self._checked(out, n)

    def invoke(self, kwargs: dict[str, Any]) -> Any:
        """The raw call: the function on `kwargs` (an `async def` function run to completion)."""
        return completed(self.fn(**kwargs))

    def failed(self, err: BaseException, n: int) -> UserError:
        """The one line for a call that raised `err` on a batch of n samples."""
        return UserError(
            f"{self.key} '{self.spec}' raised {error_line(err)} (on a batch of {n} samples): "
            "fix the function; return None for a sample it does not apply to"
        )

    def arguments(self, prompts: list[Any], completions: list[Any], ids: list[list[int]],
                  columns: list[dict]) -> dict[str, Any]:
        """The keyword arguments the function takes for a batch: TRL's and the data rows' extra columns."""
        named, var_kw, required = self.named, self.var_kw, self.required
        names = dict.fromkeys(c for row in columns for c in row)  # every extra column, in first-seen order
        data = {c: [row.get(c) for row in columns] for c in names}
        offered = {"prompts": prompts, "completions": completions, "completion_ids": ids, **data}
        missing = sorted(required - set(offered))
        if missing:
            have = sorted(data) or "none"
            raise UserError(
                f"{self.key} '{self.spec}' needs argument(s) {missing}, which are neither {list(_ARGS)} nor columns "
                f"of the data rows (extra columns: {have}): add the column to the data, or give the parameter a default"
            )
        return {k: v for k, v in offered.items() if var_kw or k in named}

    def _checked(self, out: Any, n: int) -> list[float | None]:
        if hasattr(out, "tolist"):  # a numpy array or a tensor
            out = out.tolist()
        if not isinstance(out, (list, tuple)):
            raise UserError(
                f"{self.key} '{self.spec}' returned a {type(out).__name__}, not a list: return one number (or None) "
                "per completion"
            )
        if len(out) != n:
            raise UserError(
                f"{self.key} '{self.spec}' returned {len(out)} values for {n} completions: return one number (or "
                "None) per completion"
            )
        values: list[float | None] = []
        for i, v in enumerate(out):
            if v is None:
                values.append(None)
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise UserError(
                    f"{self.key} '{self.spec}' returned {v!r} ({type(v).__name__}) for sample {i}: return a number, "
                    "or None where the function does not apply"
                )
            if not math.isfinite(v):
                raise UserError(
                    f"{self.key} '{self.spec}' returned {v} for sample {i}: return a finite number, or None where the "
                    "function does not apply"
                )
            values.append(float(v))
        return values


def load_functions(configs: Sequence[RewardFunctionConfig], key: str) -> list[RewardFunction]:
    """Import every function of a params list (`key`: rewards.functions or evaluate.scorers) and check that it
    can take TRL's arguments, before any model is loaded."""
    loaded = [_load(cfg, f"{key}[{i}]") for i, cfg in enumerate(configs)]
    for path in untracked_modules(loaded, Path.cwd()):
        print(
            f"warning: {key}: {path} is in the project folder but no DVC dep of this stage: move it under rewards/ "
            "so that editing it reruns the stage", file=sys.stderr, flush=True,
        )
    return loaded


def import_object(spec: str, key: str) -> Any:
    """The object a "module:name" spec names (the module importable from the project folder or the environment);
    one UserError naming `key` (the params key) and the fix when it does not import."""
    module_name, attr = spec.split(":")
    if os.getcwd() not in sys.path and "" not in sys.path:  # the project folder, as `python -m` would have it
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise UserError(
            f"{key} '{spec}': module '{module_name}' is not importable ({err}): put it in the project folder "
            f"(as rewards/{module_name.rsplit('.', 1)[-1]}.py, named rewards.{module_name.rsplit('.', 1)[-1]}, which "
            "DVC tracks) or install it"
        ) from None
    except Exception as err:
        detail = " ".join(str(err).split())[:200]
        raise UserError(
            f"{key} '{spec}': importing module '{module_name}' raised {type(err).__name__}: {detail}: fix the module"
        ) from None
    if not hasattr(module, attr):
        raise UserError(f"{key} '{spec}': module '{module_name}' has no '{attr}': check the name")
    return getattr(module, attr)


def _load(cfg: RewardFunctionConfig, key: str) -> RewardFunction:
    if cfg.url is not None:
        from rlhf.rl.remote import RemoteReward

        return RewardFunction(cfg.label, cfg.url, cfg.weight, RemoteReward(cfg.url), key)
    fn = import_object(cfg.function, key)
    if not callable(fn):
        raise UserError(
            f"{key} '{cfg.function}' is a {type(fn).__name__}, not a function: name a callable fn(prompts, "
            "completions, **columns)"
        )
    loaded = RewardFunction(cfg.label, cfg.function, cfg.weight, fn, key)
    if loaded.positional_only:
        raise UserError(
            f"{key} '{cfg.function}' cannot be called by keyword (positional-only {loaded.positional_only}): give it "
            "TRL's signature fn(prompts, completions, **columns)"
        )
    if "completions" not in loaded.named and not loaded.var_kw:
        raise UserError(
            f"{key} '{cfg.function}' takes no 'completions' argument: give it TRL's signature fn(prompts, "
            "completions, **columns)"
        )
    return loaded


def untracked_modules(functions: Sequence[RewardFunction], project: Path) -> list[str]:
    """Source files of the functions that lie in the project folder but outside the folders DVC tracks for them:
    editing one would change results without rerunning the stage."""
    return sorted({path for f in functions if (path := untracked_source(f.fn, project)) is not None})


def untracked_source(obj: Any, project: Path) -> str | None:
    """The source file of a function or class (relative to `project`) when it lies in the project folder but
    outside the folders DVC tracks for user code; None otherwise."""
    if not (inspect.isfunction(obj) or inspect.isclass(obj)):
        return None
    try:
        source = inspect.getsourcefile(obj)
    except TypeError:  # a built-in
        return None
    if source is None:
        return None
    root, path = project.resolve(), Path(source).resolve()
    if path.is_relative_to(root) and path.relative_to(root).parts[0] not in TRACKED_FOLDERS:
        return str(path.relative_to(root))
    return None


def user_prompt(row: dict) -> Any:
    """A prepared row's prompt as the user's data held it: the plain string of a one-turn prompt given as text, else
    the message list."""
    prompt = row["prompt"]
    if row.get("conversational") or len(prompt) != 1 or prompt[0]["role"] != "user":
        return prompt
    return prompt[0]["content"]


def user_completion(row: dict, text: str) -> Any:
    """An answer in the form of its prompt: a string, or [{"role": "assistant", "content": text}]."""
    return [{"role": "assistant", "content": text}] if isinstance(user_prompt(row), list) else text


def error_line(err: BaseException) -> str:
    """An exception as one line: its type and its message, whitespace folded, at most 200 characters."""
    return f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"


def completed(out: Any) -> Any:
    """A user function's result; an `async def` function's coroutine is run to completion in this thread."""
    if inspect.isawaitable(out):
        import asyncio

        out = asyncio.run(_awaited(out))
    return out


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def function_values(
    functions: Sequence[RewardFunction], rows: Sequence[dict], texts: Sequence[str], ids: Sequence[list[int]],
    grader: Any = None,
) -> dict[str, list[float | None]]:
    """label -> one value (or None) per sample: each function on the same batch (rows[i] answered with texts[i]);
    through `grader` (rlhf.rl.grading.Grader: chunks at once, timeouts, retries, failures counted) when given, else
    one call each, whose failure is one line."""
    prompts = [user_prompt(r) for r in rows]
    completions = [user_completion(r, t) for r, t in zip(rows, texts)]
    columns = [r.get("columns") or {} for r in rows]
    ids = [list(i) for i in ids]
    if grader is not None:
        return grader.values(functions, prompts, completions, ids, columns)
    return {f.label: f(prompts, completions, ids, columns) for f in functions}


def weighted_sum(functions: Sequence[RewardFunction], values: dict[str, list[float | None]], n: int) -> list[float]:
    """sum_f weight_f x value_f per sample, a None adding nothing (trl: nansum over the functions)."""
    total = [0.0] * n
    for f in functions:
        for i, v in enumerate(values[f.label]):
            if v is not None:
                total[i] += f.weight * v
    return total


def require_applies(functions: Sequence[RewardFunction], values: dict[str, list[float | None]], what: str) -> None:
    """A function that returned None for every sample of `what` does not apply to this data: an error, never a
    silent 0."""
    for f in functions:
        got = values[f.label]
        if got and all(v is None for v in got):
            raise not_applicable(f, len(got), what)


def not_applicable(f: RewardFunction, n: int, what: str) -> UserError:
    return UserError(
        f"{f.key} '{f.spec}' returned None for all {n} {what}, so it does not apply to this data: remove it or "
        "name a function written for these prompts"
    )
