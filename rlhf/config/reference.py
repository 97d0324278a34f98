"""docs/params.md, generated from the config classes themselves: each group's docstring, and for each key its type,
default and the comments written beside it in rlhf/config/ (the comment lines right above a field and the one at
the end of its line). `python -m rlhf.config.reference > docs/params.md` rewrites it; a test keeps it current."""

from __future__ import annotations

import ast
import inspect
import io
import textwrap
import tokenize
import typing
from typing import Any

from pydantic import BaseModel

from rlhf.config.params import Params


def field_comments(cls: type[BaseModel]) -> dict[str, str]:
    """field name -> its comments in the class's source, joined into one paragraph."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, alone on its line)
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row = tok.start[0]
            comments[row] = (tok.string.lstrip("#").strip(), not lines[row - 1][: tok.start[1]].strip())
    body = ast.parse(source).body[0]
    out = {}
    for node in body.body if isinstance(body, ast.ClassDef) else []:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, row = [], node.lineno - 1
        while row in comments and comments[row][1]:
            above.insert(0, comments[row][0])
            row -= 1
        after = [comments[r][0] for r in range(node.lineno, node.end_lineno + 1) if r in comments and not comments[r][1]]
        out[node.target.id] = " ".join(above + after)
    return out


def all_comments(cls: type[BaseModel]) -> dict[str, str]:
    """field_comments over the class and the groups it inherits from (the subclass's own comment wins)."""
    out: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if isinstance(base, type) and issubclass(base, BaseModel) and base.__module__.startswith("rlhf."):
            out.update({k: v for k, v in field_comments(base).items() if v})
    return out


def _nested(info: Any) -> tuple[type[BaseModel] | None, str]:
    """The group a field holds (itself, or as the items of a list) and the suffix its dotted name takes."""
    for ann in (info.annotation, *getattr(info.annotation, "__args__", ())):
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            return ann, ""
        items = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        if items and typing.get_origin(ann) is list:
            return items[0], "[]"
    return None, ""


def _groups(cls: type[BaseModel], prefix: str = "", note: str = "") -> list[tuple[str, type[BaseModel], str]]:
    """(dotted name, class, the comment beside it in its parent) of `cls` and every group nested in it (list items
    as `name[]`), depth first."""
    out = [(prefix, cls, note)]
    notes = all_comments(cls)
    for name, info in cls.model_fields.items():
        group, suffix = _nested(info)
        if group is not None:
            out += _groups(group, (f"{prefix}.{name}" if prefix else name) + suffix, notes.get(name, ""))
    return out


def _default(info: Any) -> str:
    if info.default_factory is not None:
        value = info.default_factory()
        if isinstance(value, list) and value and isinstance(value[0], BaseModel):
            value = [v.model_dump(exclude_defaults=True) for v in value]
        return f"`{value}`"
    if info.is_required():
        return "required"
    value = info.default
    return "`null`" if value is None else f"`{str(value).lower()}`" if isinstance(value, bool) else f"`{value}`"


def _type(info: Any) -> str:
    text = str(info.annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
    for module in ("rlhf.config.data.", "rlhf.config.rewards.", "rlhf.config.models."):
        text = text.replace(module, "")
    text = text.replace("NoneType", "null").replace(" | None", " | null").replace("Literal", "one of ")
    return text.replace("Optional[", "null | ").replace("]]", "]") if text.startswith("Optional[") else text


def reference() -> str:
    """The whole of docs/params.md."""
    parts = ["# params.yaml, key by key\n",
             "Generated from `rlhf/config/` by `python -m rlhf.config.reference > docs/params.md`; the comments in "
             "the shipped params.yaml say the same in short. `null` takes the documented fallback.\n"]
    places: dict[type[BaseModel], list[str]] = {}
    intro: dict[type[BaseModel], list[str]] = {}
    for dotted, cls, note in _groups(Params):
        places.setdefault(cls, []).append(dotted)
        intro.setdefault(cls, [" ".join(inspect.getdoc(cls).split())] if cls is not Params and cls.__doc__ else [])
        if note and note not in intro[cls]:
            intro[cls].append(f"`{dotted}`: {note.rstrip('.')}.")
    for cls, names in places.items():  # a group used in several places (lora, sampling) is written once
        notes = all_comments(cls)
        rows = [(name, info) for name, info in cls.model_fields.items() if _nested(info)[1] == "[]"
                or _nested(info)[0] is None]
        if not rows:
            continue
        parts.append("## " + ", ".join(f"`{n or 'top level'}`" for n in names) + "\n")
        if intro[cls]:
            parts.append(" ".join(intro[cls]) + "\n")
        parts.append("| key | type | default | meaning |\n|---|---|---|---|")
        for name, info in rows:
            meaning, kind = (text.replace("|", "\\|") for text in (notes.get(name, ""), _type(info)))
            parts.append(f"| `{name}` | {kind} | {_default(info)} | {meaning} |")
        parts.append("")
    return "\n".join(parts)


if __name__ == "__main__":
    print(reference(), end="")
