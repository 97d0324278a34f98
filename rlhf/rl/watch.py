"""Over-optimisation made visible: the warnings that step 3 and evaluate print at the end of a run when a rising
reward looks like reward hacking rather than a better model (Gao et al. 2022, "Scaling laws for reward model
overoptimization"): the reward rose while the KL to the SFT model or the answer length blew up, or the reward model
and a verifier (or evaluate scorer) moved in opposite directions; and the lines step 3 stops with when its KL runs
away or its rewards are flat.

A warning changes no result, so its thresholds are constants here, not params; the stage still exits 0 (the work was
done) but says, one line per finding, what to look at and which param reins it in (`ppo.kl.target`, `ppo.kl.stop_above`,
`ppo.kl.coef`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from rlhf.config import PPOConfig

KL_PER_ANSWER = 5.0  # nats of KL to the reference per answer above which a rising reward is suspect
KL_PER_TOKEN = 0.5  # the same for evaluate's kl_to_sft (per answer token)
LENGTH_SHARE = 0.9  # mean answer length at or above this share of the length limit
MOVED = 0.01  # a change of a mean smaller than this counts as no change


def _rose(before: float, after: float) -> bool:
    return after > before + MOVED


def _fell(before: float, after: float) -> bool:
    return after < before - MOVED


def ppo_warnings(
    metrics: Mapping[str, float], labels: list[str], kl: float, length: float, max_length: int
) -> list[str]:
    """Warnings for a PPO run: `metrics` holds the held-out `reward_sft`/`reward_ppo`, `rm_score_*` (with a reward
    model) and `<label>_sft`/`_ppo` for each function; `kl` and `length` are the last iteration's mean KL to the
    reference per answer and mean answer length, `max_length` is ppo.sampling.max_answer_tokens."""
    out: list[str] = []
    before, after = metrics.get("reward_sft", float("nan")), metrics.get("reward_ppo", float("nan"))
    if _rose(before, after):
        moved = f"the held-out reward rose ({before:.3f} -> {after:.3f})"
        if kl > KL_PER_ANSWER:
            out.append(
                f"{moved} while the KL to the reference reached {kl:.2f} nats per answer (over {KL_PER_ANSWER}): the "
                "actor may be exploiting the reward; read metrics/samples.md, and set ppo.kl.target or ppo.kl.stop_above "
                "or raise ppo.kl.coef"
            )
        if length >= LENGTH_SHARE * max_length:
            out.append(
                f"{moved} while answers grew to {length:.1f} tokens, at the limit ppo.sampling.max_answer_tokens {max_length}: "
                "the reward may be paying for length; read metrics/samples.md, and penalise length or raise "
                "ppo.kl.coef"
            )
    if "rm_score_sft" in metrics:
        out += disagreements(
            "the reward model's held-out score", metrics["rm_score_sft"], metrics["rm_score_ppo"],
            {label: (metrics[f"{label}_sft"], metrics[f"{label}_ppo"]) for label in labels}, "SFT -> PPO",
        )
    return out


def disagreements(
    model: str, before: float, after: float, scorers: Mapping[str, tuple[float, float]], change: str
) -> list[str]:
    """One warning for each scorer that moved against the reward model (one rose, the other fell)."""
    out = []
    for label, (s_before, s_after) in scorers.items():
        if (_rose(before, after) and _fell(s_before, s_after)) or (_fell(before, after) and _rose(s_before, s_after)):
            out.append(
                f"{model} and {label} disagree ({change}: {before:.3f} -> {after:.3f} vs {s_before:.3f} -> "
                f"{s_after:.3f}): trust the verifier, and look for what the reward model pays for in "
                "metrics/samples.md (retrain it on more pairs, or raise ppo.kl.coef)"
            )
    return out


def evaluate_warnings(result: Mapping[str, Mapping[str, float]], scorers: list[str]) -> list[str]:
    """Warnings for evaluate's result (actor -> metrics, the SFT actor as baseline): an actor far from SFT whose
    reward-model score rose, and any scorer that moved against the reward model."""
    out: list[str] = []
    sft = result.get("sft", {})
    for name, got in result.items():
        if name == "sft" or "rm_reward" not in got:
            continue
        if _rose(sft["rm_reward"], got["rm_reward"]) and got["kl_to_sft"] > KL_PER_TOKEN:
            out.append(
                f"{name}: the reward model's score rose ({sft['rm_reward']:.3f} -> {got['rm_reward']:.3f}) with a KL "
                f"to SFT of {got['kl_to_sft']:.3f} per token (over {KL_PER_TOKEN}): check that the answers got "
                "better (metrics/samples.md), and rein in step 3 with ppo.kl.target or ppo.kl.stop_above"
            )
        out += disagreements(
            f"{name}: the reward model's score", sft["rm_reward"], got["rm_reward"],
            {s: (sft[s], got[s]) for s in scorers if s in got and s in sft}, "SFT -> " + name,
        )
    return out


def max_kl_message(it: int, kl: float, ppo: PPOConfig) -> str:
    return (
        f"PPO stopped early at iteration {it}: mean KL to the reference {kl:.3f} per answer exceeds "
        f"ppo.kl.stop_above {ppo.kl.stop_above}; the models of this iteration are written. Raise ppo.kl.coef or lower "
        "ppo.optimizer.actor_learning_rate to stay closer to the SFT model"
    )


def flat_reward_message(it: int, flat: int, scores: torch.Tensor, ppo: PPOConfig) -> str:
    """The one line step 3 stops with when `flat` iterations in a row gave every answer (every group's answers)
    the same reward: the advantages are all 0, so training would only drift."""
    from rlhf.config import GROUP_ALGORITHMS

    alike = "every group's answers scored alike" if ppo.algorithm in GROUP_ALGORITHMS else "every answer scored alike"
    return (
        f"step 3 stopped at iteration {it}: for {flat} iterations in a row {alike} (reward {scores.mean().item():.3f}), "
        "so there was nothing to learn from and no model was written. Train SFT further (its answers must pass the "
        "reward sometimes), give the reward partial credit, or sample more answers per prompt "
        "(ppo.answers_per_prompt); ppo.max_flat_iterations: 0 turns this check off"
    )
