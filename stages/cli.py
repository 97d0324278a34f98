"""`rlhf`: one subcommand per DVC stage. dvc.yaml calls these; so can a user."""

from __future__ import annotations

from typing import Optional

import typer

from stages import base_model, chat, dpo, evaluate, ppo, prepare, reward, sft, train

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


@app.callback()
def main(
    local_rank: Optional[int] = typer.Option(None, "--local_rank", "--local-rank", hidden=True),
) -> None:
    """InstructGPT-style RLHF on DeepSpeed; every step a DVC stage (see dvc.yaml)."""
    # The deepspeed launcher appends --local_rank; LOCAL_RANK in the environment says the same, so it is ignored.


app.command("base-model")(base_model.base_model)
app.command("prepare")(prepare.prepare)
app.command("sft")(sft.sft)
app.command("reward")(reward.reward)
app.command("dpo")(dpo.dpo)
app.command("ppo")(ppo.ppo)
app.command("evaluate")(evaluate.evaluate)
app.command("chat")(chat.chat)
app.command("train")(train.train)

if __name__ == "__main__":
    app()
