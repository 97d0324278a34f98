"""Stage `ppo`: step 3, RL of the SFT actor against the reward (params.yaml `rewards`: reward model, functions) with
`ppo.algorithm`: ppo, grpo, rloo or reinforce_pp."""

from __future__ import annotations

from pathlib import Path

import typer

from stages.common import PARAMS_OPTION, check_memory, guarded, is_main_rank, read_params, relaunch_if_distributed


def ppo(
    params_path: Path = PARAMS_OPTION,
    data: Path = typer.Option(Path("data/prepared"), help="folder written by `rlhf prepare`"),
    sft: Path = typer.Option(Path("models/sft"), help="the SFT actor (initialises actor and reference)"),
    reward_model: Path = typer.Option(
        Path("models/reward"), "--reward", help="the reward model (and critic init); unread if rewards.model_weight is 0"
    ),
    out: Path = typer.Option(Path("models/ppo"), help="folder for actor/, critic/ and actor_ema/"),
    metrics: Path = typer.Option(Path("metrics/ppo.json"), help="final metrics (JSON)"),
    live: Path = typer.Option(Path("dvclive/ppo"), help="dvclive folder for per-iteration curves"),
    checkpoints: Path = typer.Option(
        Path("checkpoints/ppo"), help="resumable checkpoints (every ppo.checkpoint_every iterations); a rerun resumes"
    ),
    reward_cache: Path = typer.Option(
        Path("reward_cache"), help="the reward functions' scores kept across runs (rewards.cache; a README otherwise)"
    ),
) -> None:
    """Step 3: PPO (critic, GAE), GRPO, RLOO or REINFORCE++ (ppo.algorithm) with a KL penalty to the reference, EMA
    and optional ptx, on the hybrid engine."""
    from rlhf.pipeline.guards import check_outputs
    from rlhf.pipeline.outputs import write_json
    from rlhf.rl.recipe import run_ppo

    params = read_params(params_path)
    used_reward = reward_model if params.rewards.model_weight > 0 else None  # rewards.model_weight 0: functions only
    guarded(
        check_outputs, [params_path, data, sft, used_reward],
        folders=[("--out", out / name) for name in ("actor", "critic", "actor_ema")], files=[("--metrics", metrics)],
        scratch=[("--out", out), ("--live", live), ("--checkpoints", checkpoints), ("--reward-cache", reward_cache)],
    )
    check_memory("ppo", params, sft, used_reward)
    relaunch_if_distributed(params)
    result = guarded(run_ppo, params, data, sft, used_reward, out, live, checkpoints, reward_cache)
    if is_main_rank():
        from rlhf.rl.reward_cache import README

        reward_cache.mkdir(parents=True, exist_ok=True)  # the stage's output, whether rewards.cache is on or not
        (reward_cache / "README.txt").write_text(README)
        write_json(metrics, result)
        terms = ["reward"] + (["rm_score"] if used_reward is not None else []) + [f.label for f in params.rewards.functions]
        moved = ", ".join(f"{t} {result[t + '_sft']:.3f} -> {result[t + '_ppo']:.3f}" for t in terms)
        for line in result["warnings"]:
            typer.echo(f"warning: {line}", err=True)
        written = ",".join(n for n in ("actor", "critic", "actor_ema") if (out / n).is_dir())
        typer.echo(
            f"ppo ({params.ppo.algorithm}): models -> {out}/{{{written}}}, metrics -> {metrics} (held-out prompts, "
            f"SFT -> {params.ppo.algorithm.upper()}: {moved})"
        )
