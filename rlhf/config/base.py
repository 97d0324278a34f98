"""The base of every params group: unknown keys refused, and the error type a bad params.yaml raises."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from rlhf.errors import UserError


class ConfigError(UserError):
    """A params.yaml problem, worded as one line that names the key and the fix."""


class Group(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def moved_keys(group: str, raw: dict[str, Any], table: dict[str, str]) -> str | None:
    """One line naming each old-shape key of `raw` and where it lives now, or None when there is none."""
    old = [k for k in raw if k in table]
    if not old:
        return None
    where = ", ".join(f"{group}.{k} -> {group}.{table[k]}" for k in old)
    sub, leaf = table[old[0]].split(".", 1)
    return (f"{where}: params are in groups since 2026-12: move each key under its group (`{group}:` then "
            f"`  {sub}:` then `    {leaf}: ...`)")
