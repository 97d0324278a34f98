"""The base of every params group: unknown keys refused, and the error type a bad params.yaml raises."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from rlhf.errors import UserError


class ConfigError(UserError):
    """A params.yaml problem, worded as one line that names the key and the fix."""


class Group(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
