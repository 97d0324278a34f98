"""`rlhf`: one subcommand per DVC stage. dvc.yaml calls these; so can a user."""

from __future__ import annotations

import difflib
import sys

import typer

from stages import base_model, chat, check, dpo, evaluate, plan, plots, ppo, prepare, reward, serve, sft, summary, train

commands = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


@commands.callback()
def main(
    local_rank: int | None = typer.Option(None, "--local_rank", "--local-rank", hidden=True),
) -> None:
    """InstructGPT-style RLHF on DeepSpeed; every step a DVC stage (see dvc.yaml)."""
    # The deepspeed launcher appends --local_rank; LOCAL_RANK in the environment says the same, so it is ignored.


commands.command("check")(check.check)
commands.command("base-model")(base_model.base_model)
commands.command("prepare")(prepare.prepare)
commands.command("sft")(sft.sft)
commands.command("reward")(reward.reward)
commands.command("dpo")(dpo.dpo)
commands.command("ppo")(ppo.ppo)
commands.command("evaluate")(evaluate.evaluate)
commands.command("chat")(chat.chat)
commands.command("train")(train.train)
commands.command("summary")(summary.summary)
commands.command("plots")(plots.plots)
commands.command("plan")(plan.plan)
commands.command("serve-reward")(serve.serve_reward)



def app() -> None:
    """The `rlhf` console script: the commands above, with every usage mistake (an unknown command or option, a
    missing or bad value, an extra argument) as one `error:` line with a did-you-mean, exit 2, like bad input."""
    try:  # typer >= 0.20 carries its own copy of click
        from typer._click import exceptions as cx
    except ImportError:
        from click import exceptions as cx  # type: ignore[no-redef]

    from stages.common import install_signal_handlers

    install_signal_handlers()
    try:
        code = commands(standalone_mode=False)
    except cx.UsageError as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # plain `rlhf`: the help was shown
            sys.exit(0)
        message = " ".join(err.format_message().split())
        if isinstance(err, cx.NoSuchOption) and err.possibilities:
            message = message.split(" (Possible options", 1)[0].split(" Did you mean", 1)[0]
            message += f" (did you mean {' or '.join(sorted(err.possibilities))}?)"
        if message.startswith("No such command") and "did you mean" not in message.lower():
            names = sorted(typer.main.get_command(commands).commands)  # type: ignore[attr-defined]
            word = message.split("'")[1] if "'" in message else ""
            near = difflib.get_close_matches(word, names, n=1)
            message += f" (did you mean `rlhf {near[0]}`?)" if near else f" (commands: {', '.join(names)})"
        where = f"rlhf {err.ctx.command_path.split(' ', 1)[1]}" if err.ctx and " " in err.ctx.command_path else "rlhf"
        typer.echo(f"error: {where}: {message.rstrip('.')}; see `{where} --help`", err=True)
        sys.exit(2)
    except cx.ClickException as err:  # a bad file argument and kin
        typer.echo(f"error: {' '.join(err.format_message().split())}", err=True)
        sys.exit(2)
    except typer.Abort:  # Ctrl-C at a prompt
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    except Exception:  # not bad input (that is one `error:` line): a bug, so the traceback stays, with what to do
        import traceback

        traceback.print_exc()
        typer.echo(
            "internal error: this is a bug in rlhf-dvc, not in your input: please report it with the command, your "
            "params.yaml and the traceback above (any output's manifest.json lists the package versions)", err=True,
        )
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    app()
