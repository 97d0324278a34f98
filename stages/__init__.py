"""The `rlhf` CLI: one thin Typer command per DVC stage (stages/cli.py dispatches)."""
