"""What step 3 measures and logs of an iteration (as ppo/*): the reward and each term, KL, lengths, throughput,
achieved TFLOP/s per phase, the progress line, and the held-out reward before and after training."""

from __future__ import annotations

from typing import Any

from rlhf.config import PPOConfig
from rlhf.rl.models import RLModels
from rlhf.rl.trainer import Experience, RLTrainer
from rlhf.training.runtime import Dist


def iteration_point(trainer: RLTrainer, exp: Experience, sums: dict[str, float], timings: dict[str, float],
                    flops: dict[str, float], dist: Dist) -> dict[str, float]:
    """What one iteration logs (as ppo/*), over every rank: reward and each term's mean, KL (which also drives the
    adaptive controller, Ziegler et al. 2019), answer length, the update's sums, throughput and achieved TFLOP/s of
    each phase on this rank (rlhf/training/flops.py; the prompt counted once per group)."""
    from rlhf.training.loop import all_reduce_sum

    ppo = trainer.config
    tokens = timings.pop("tokens")
    seq_kl = (exp.kl * exp.action_mask).sum(-1)
    reward_sum, kl_sum, len_sum, n, tok_sum, gen_s, failed = all_reduce_sum(
        [exp.scores.sum().item(), seq_kl.sum().item(), exp.action_mask.sum().item(), exp.scores.numel(),
         float(tokens), timings["generate_s"], float(trainer.grader.take_failed())],
        dist,
    )
    mean_kl = kl_sum / n
    trainer.kl_ctl.update(mean_kl, int(n))
    labels = trainer.term_labels()
    terms = all_reduce_sum([x for label in labels for x in trainer.term_stats.get(label, [0.0, 0.0])], dist)
    train_s = timings["train_s"]
    for key in EPISODE_KEYS:
        timings.pop(key, None)
    return {
        "reward": reward_sum / n,
        # each term's mean over the samples it applies to (NaN: a function that applied to none this iteration)
        **{f"term/{label}": terms[2 * i] / terms[2 * i + 1] if terms[2 * i + 1] else float("nan")
           for i, label in enumerate(labels)},
        "kl": mean_kl,
        "kl_coef": trainer.kl_ctl.value,
        **({"reward_mean": trainer.reward_moments.mean, "reward_std": trainer.reward_moments.std}
           if ppo.advantage.reward_normalization == "running" else {}),
        "response_length": len_sum / n,
        "reward_failures": failed,  # samples a reward function left unscored after its retries (every rank)
        **episode_means(trainer, dist),
        **cache_hits(trainer, dist),
        **sums,
        "actor_lr": trainer.models.actor.engine.get_lr()[0],
        "gen_tokens_per_s": tok_sum / max(gen_s / dist.world_size, 1e-9),
        "train_samples_per_s": n * ppo.ppo_epochs / max(train_s, 1e-9),
        "gen_tflops": flops["generate"] / max(timings["generate_s"], 1e-9) / 1e12,
        "score_tflops": flops["score"] / max(timings["score_s"], 1e-9) / 1e12,
        "train_tflops": flops["train"] / max(train_s, 1e-9) / 1e12,
        **timings,
    }


def cache_hits(trainer: RLTrainer, dist: Dist) -> dict[str, float]:
    """rewards.cache: the share of reward-function lookups the cache answered since the last point (every rank),
    with the run's totals kept on the cache for the stage's metrics. {} without a cache."""
    from rlhf.training.loop import all_reduce_sum

    cache = trainer.grader.cache
    if cache is None:
        return {}
    hits, lookups = all_reduce_sum([float(x) for x in cache.take_hits()], dist)
    cache.run_hits, cache.run_lookups = cache.run_hits + hits, cache.run_lookups + lookups
    return {"reward_cache_hits": hits / lookups if lookups else float("nan")}


EPISODE_KEYS = ("episodes", "turns", "tool_calls", "tool_failed")


def episode_means(trainer: RLTrainer, dist: Dist) -> dict[str, float]:
    """Multi-turn (ppo.environment), over every rank's episodes since the stats were reset: model turns and tool
    calls per episode, and the share of calls that could be read and ran (tool_valid; NaN without a call). {}
    single turn."""
    from rlhf.training.loop import all_reduce_sum

    if trainer.episodes is None:
        return {}
    episodes, turns, calls, failed = all_reduce_sum([trainer.episode_stats.get(k, 0.0) for k in EPISODE_KEYS], dist)
    return {"turns": turns / max(episodes, 1.0), "tool_calls": calls / max(episodes, 1.0),
            "tool_valid": (calls - failed) / calls if calls else float("nan")}


def progress_line(it: int, iterations: int, point: dict[str, float], flops: dict[str, float]) -> str:
    from rlhf.training.loop import flop_rate

    return (
        f"[ppo] iter {it}/{iterations} reward {point['reward']:.3f} kl {point['kl']:.3f} "
        f"len {point['response_length']:.1f} | gen {point['generate_s']:.2f}s "
        f"({point['gen_tokens_per_s']:.0f} tok/s) score {point['score_s']:.2f}s "
        f"train {point['train_s']:.2f}s ({point['train_samples_per_s']:.1f} samples/s, "
        f"{flop_rate(flops['train'] / max(point['train_s'], 1e-9))})"
    )


def mean_reward_score(trainer: RLTrainer, loader: Any, dist: Dist) -> dict[str, float]:
    """Mean reward of the actor's sampled answers to held-out prompts (all ranks): `reward` (the sum of the terms)
    and each term's own mean (`model`, each function's label). A function that applies to none of the prompts
    (None for all) stops the run: it was written for other data."""
    import torch

    from rlhf.training.loop import all_reduce_sum

    device = trainer.models.device
    total = n = 0.0
    trainer.term_stats, trainer.episode_stats = {}, {}
    for batch in loader:  # rollout and reward only: no reference, critic or advantages needed here
        rollout = trainer.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device), batch.get("rows"))
        with torch.no_grad():
            scores = trainer.reward_scores(rollout, batch.get("rows"))
        total += scores.sum().item()
        n += scores.numel()
    labels = trainer.term_labels()
    stats = [trainer.term_stats.get(label, [0.0, 0.0]) for label in labels]
    total, n, *flat = all_reduce_sum([total, n, *(x for s in stats for x in s)], dist)
    out = {"reward": total / max(n, 1.0)}
    for i, label in enumerate(labels):
        term_sum, count = flat[2 * i], flat[2 * i + 1]
        function = next((f for f in trainer.functions if f.label == label), None)
        if count == 0 and n > 0 and function is not None:
            from rlhf.rl.rewards import not_applicable

            raise not_applicable(function, int(n), "held-out answers")
        out[label] = term_sum / count if count else float("nan")  # nan: a subclass's reward_scores kept no stats
    return out | episode_means(trainer, dist)


def phase_flops(models: RLModels, exp: Experience, ppo: PPOConfig) -> dict[str, float]:
    """Useful FLOPs of this rank's iteration by phase (rlhf/training/flops.py): generation = one actor forward over
    prompt and answer; scoring = the reference, reward model and critic forwards (and the actor's when log pi_old
    is recomputed); training = ppo_epochs x (actor + critic) forward and backward. Each prompt counts once per
    group of answers, as the shared prefix computes it once."""
    from rlhf.training.flops import forward_flops

    p = exp.sequences.shape[1] - exp.action_mask.shape[1]
    prompts = exp.attention_mask[:, :p].sum(-1).tolist()
    answers = exp.action_mask.sum(-1).long().tolist()
    lengths = [int(x) for x in answers] + [int(x) for x in prompts[:: ppo.group_size]]
    modules = {"actor": models.actor.module, "ref": getattr(models.ref, "module", models.ref),
               "reward": getattr(models.reward, "module", None), "critic": getattr(models.critic, "module", None)}
    fwd = {name: forward_flops(m, lengths) if m is not None else 0.0 for name, m in modules.items()}
    recompute = fwd["actor"] if ppo.recomputes_logprobs(models.engine_configs["actor"].dtype) else 0.0
    return {
        "generate": fwd["actor"],
        "score": fwd["ref"] + fwd["reward"] + fwd["critic"] + recompute,
        "train": ppo.ppo_epochs * 3 * (fwd["actor"] + fwd["critic"]),
    }
