"""Stage `evaluate`: prove RLHF helped. SFT vs the step-3 actor (PPO, GRPO, ...) vs its EMA vs DPO on held-out
prompts, by evaluate.scorers."""

from __future__ import annotations

from pathlib import Path

import typer

from stages.common import PARAMS_OPTION, guarded, read_params


def evaluate(
    params_path: Path = PARAMS_OPTION,
    data: Path = typer.Option(Path("data/prepared"), help="folder written by `rlhf prepare`"),
    sft: Path = typer.Option(Path("models/sft"), help="the SFT actor (the baseline)"),
    ppo_dir: Path = typer.Option(Path("models/ppo"), "--ppo", help="folder with actor/ and actor_ema/"),
    reward_model: Path = typer.Option(Path("models/reward"), "--reward", help="the reward model"),
    dpo_dir: Path | None = typer.Option(None, "--dpo", help="the DPO actor (skipped when it is a placeholder)"),
    metrics: Path = typer.Option(Path("metrics/evaluate.json"), help="metrics per actor (JSON)"),
    plot: Path = typer.Option(Path("metrics/evaluate_plot.json"), help="rows for `dvc plots show`"),
    samples: Path = typer.Option(Path("metrics/samples.md"), help="sample answers side by side (Markdown)"),
) -> None:
    """Each scorer's mean (evaluate.scorers), reward-model score, KL to SFT, length and perplexity of each actor."""
    from rlhf.config import EVALUATE_METRICS
    from rlhf.evaluation.evaluate import evaluate_actors
    from rlhf.pipeline.guards import check_outputs
    from rlhf.pipeline.outputs import write_json

    params = read_params(params_path)
    guarded(
        check_outputs, [params_path, data, sft, ppo_dir, reward_model, dpo_dir],
        files=[("--metrics", metrics), ("--plot", plot), ("--samples", samples)],
    )
    from rlhf.pipeline.outputs import is_placeholder

    actors = {"sft": sft, params.ppo.algorithm: ppo_dir / "actor"}
    if (ppo_dir / "actor_ema" / "config.json").is_file():
        actors["ema"] = ppo_dir / "actor_ema"
    if dpo_dir is not None and not is_placeholder(dpo_dir):  # no pairs, no DPO model: nothing to compare
        actors["dpo"] = dpo_dir
    environment = params.ppo.environment if params.ppo.environment.name else None  # the actors play its episodes
    result, rows = guarded(evaluate_actors, actors, reward_model, data, params.evaluate, params.seed,
                           params.data.max_prompt_tokens, environment, params.ppo.sampling.max_answer_tokens)
    write_json(metrics, result)
    write_json(plot, [{"model": name, **values} for name, values in result.items()])
    names = list(actors)

    def cell(text: str) -> str:  # one Markdown table cell, whatever a model wrote
        return " ".join(text.split()).replace("|", "\\|")

    table = ["| prompt | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    table += ["| " + " | ".join(cell(c) for c in [r["prompt"], *(r[n] for n in names)]) + " |" for r in rows]
    samples.parent.mkdir(parents=True, exist_ok=True)
    samples.write_text("\n".join(table) + "\n")
    for name, values in result.items():
        quality = "".join(f"{k} {v:.3f}  " for k, v in values.items() if k not in EVALUATE_METRICS)
        typer.echo(
            f"evaluate {name:>4}: {quality}" + (f"rm {values['rm_reward']:.3f}  " if "rm_reward" in values else "")
            + f"kl_to_sft {values['kl_to_sft']:.3f}  "
            f"len {values['response_length']:.1f}  ppl {values['perplexity']:.3f}"
            + (f"  turns {values['turns']:.2f}  tool calls {values['tool_calls']:.2f} ({values['tool_valid']:.0%} ran)"
               if "turns" in values else "")
        )
    scorers = sorted({k for values in result.values() for k in values if k not in EVALUATE_METRICS})
    if not scorers:
        typer.echo(
            "evaluate: no gold scorer is configured for this data, so quality is not measured (only reward-model "
            "score, KL, length, perplexity): list a function in evaluate.scorers (README: reward functions)"
        )
    from rlhf.rl.watch import evaluate_warnings

    for line in evaluate_warnings(result, scorers):
        typer.echo(f"warning: {line}", err=True)
    typer.echo(f"evaluate: metrics -> {metrics}, samples -> {samples}")
