"""The one exception type that reaches a user as a single line and exit code 2 (see stages/cli.py)."""


class UserError(Exception):
    """Bad input: a data row, a params key, a path, a model. The message names the problem and the fix."""
