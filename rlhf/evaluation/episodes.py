"""Evaluate under a multi-turn environment (ppo.environment): each actor plays the held-out rows' episodes as step 3
does (rlhf/rollout/turns.py, answers drawn by transformers' generate with evaluate.sampling's knobs, within step
3's trajectory budget ppo.sampling.max_answer_tokens), and is measured on them: the environment's
reward (`env`, its quality), turns and tool calls per episode and the share of calls that ran (`tool_valid`), and
the KL to the SFT model over the model's own tokens of each trajectory, the environment's tokens as context."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from rlhf.config import EnvironmentConfig, EvaluateConfig
    from rlhf.rollout.base import Rollout

EPISODE_METRICS = ("turns", "tool_calls", "tool_valid")


def play(model: torch.nn.Module, tok: PreTrainedTokenizerBase, rows: list[dict[str, Any]], cfg: EvaluateConfig,
         seed: int, environment: EnvironmentConfig, max_prompt_tokens: int | None,
         budget: int) -> tuple[list[Rollout], dict]:
    """The episodes of `rows` (evaluate.batch_size at a time, seeded, drawn with evaluate.sampling's knobs within
    step 3's trajectory budget `budget`, ppo.sampling.max_answer_tokens) -> (their rollouts, {turns, tool_calls,
    tool_valid} per episode)."""
    import torch

    from rlhf.models.tokenizer import stop_ids
    from rlhf.rollout.environments.base import load_environment
    from rlhf.rollout.hf import GenerateRollout
    from rlhf.rollout.turns import MultiTurnRollout

    engine = GenerateRollout(lambda: contextlib.nullcontext(model), stop_ids(tok), tok.pad_token_id)
    make_env = load_environment(environment.name, environment.options, environment.tool_timeout_s)
    episodes = MultiTurnRollout(engine, tok, make_env, environment, stop_ids(tok), max_prompt_tokens)
    torch.manual_seed(seed)
    rollouts, sums = [], {}
    sampling = cfg.sampling.model_copy(update={"max_answer_tokens": budget})
    for i in range(0, len(rows), cfg.batch_size):
        with torch.no_grad():
            rollouts.append(episodes.generate(rows[i : i + cfg.batch_size], sampling))
        sums = {k: sums.get(k, 0.0) + v for k, v in episodes.stats.items()}
    n, calls = max(sums["episodes"], 1.0), sums["tool_calls"]
    stats = {"turns": sums["turns"] / n, "tool_calls": calls / n,
             "tool_valid": (calls - sums["tool_failed"]) / calls if calls else float("nan")}
    return rollouts, stats


def trajectory_kl(model: torch.nn.Module, baseline: torch.nn.Module, rollouts: list[Rollout],
                  temperature: float) -> float:
    """k1 KL(model || baseline) per model token over the trajectories (environment tokens are context only)."""
    import torch

    from rlhf.models.logprobs import logprobs_from_logits
    from rlhf.models.prefix import answer_outputs

    total = tokens = 0.0
    for r in rollouts:
        answer = r.sequences[:, r.prompt_width :]
        with torch.no_grad():
            own, ref = (logprobs_from_logits(answer_outputs(m, "logits", r.sequences, r.attention_mask,
                                                            r.prompt_width, last=False), answer, temperature)
                        for m in (model, baseline))
        total += ((own - ref) * r.action_mask).sum().item()
        tokens += r.action_mask.sum().item()
    return total / max(tokens, 1.0)
