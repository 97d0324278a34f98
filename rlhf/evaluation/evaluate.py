"""Evaluate the SFT, PPO and EMA actors side by side on held-out prompts.

For each actor: the mean of every quality scorer (evaluate.scorers: functions with TRL's reward-function signature,
see rlhf/rl/rewards.py; by default the shipped task's gold scorer, which training never saw, and only on the builtin
task's prompts), the mean reward-model score, the KL to the SFT model per answer token, the mean answer length and
the perplexity on held-out demonstrations; plus a table of sample answers side by side. Without a scorer for the
data it reports the rest and says so; never a score that does not apply. Plain transformers on one process; the
answers drawn by transformers' generate or by vLLM (evaluate.engine).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.config import EnvironmentConfig, EvaluateConfig, RewardFunctionConfig
from rlhf.data.batching import right_pad
from rlhf.data.split import read_split
from rlhf.errors import UserError
from rlhf.models.logprobs import answer_logprobs
from rlhf.rl.rewards import function_values, load_functions, require_applies

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from rlhf.rollout.vllm import VLLMEngine


# The shipped task's scorer, the default of evaluate.scorers on the builtin task's prompts.
BUILTIN_GOLD = RewardFunctionConfig(function="rlhf.data.task:gold_reward_fn", name="gold_reward")


def default_scorers(cfg: EvaluateConfig, rows: list[dict]) -> list[RewardFunctionConfig]:
    """evaluate.scorers, or when it is null the builtin gold scorer if every held-out prompt is the builtin task's
    (else none: the gold scorer would score someone else's prompts)."""
    if cfg.scorers is not None:
        return list(cfg.scorers)
    return [BUILTIN_GOLD] if rows and all(r.get("source") == "builtin" for r in rows) else []


def _answers(model: torch.nn.Module, tok: PreTrainedTokenizerBase, prompts: list[list[int]], cfg: EvaluateConfig,
             seed: int, vllm: VLLMEngine | None = None) -> list[list[int]]:
    """Sampled (or greedy) answer token ids for each prompt: up to and including the first eos, or every generated
    token of an answer that never stopped (by position: the pad after the eos may be the eos itself). With `vllm`,
    vLLM draws them from `model`'s weights, prompt i with seed + i."""
    import torch

    from rlhf.data.batching import collate_prompts
    from rlhf.models.tokenizer import stop_ids
    from rlhf.rollout.base import answer_mask
    from rlhf.rollout.hf import generate_tokens

    if vllm is not None:
        from rlhf.rollout.vllm import checkpoint_weights

        vllm.load(checkpoint_weights(model, zero_stage=0))
        seeds = [seed + i for i in range(len(prompts))]
        return [ids for ids, _ in vllm.sample(prompts, cfg.sampling, stop_ids(tok), seeds)]
    out: list[list[int]] = []
    torch.manual_seed(seed)
    for i in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[i : i + cfg.batch_size]
        batch = collate_prompts(max(map(len, chunk)), tok.pad_token_id)(chunk)
        with torch.no_grad():
            seq = generate_tokens(model, batch["input_ids"], batch["attention_mask"], **cfg.sampling.knobs(),
                                  pad_token_id=tok.pad_token_id, eos_token_id=stop_ids(tok))
        answer = seq[:, batch["input_ids"].shape[1] :]
        lengths = answer_mask(answer, stop_ids(tok)).sum(-1).long().tolist()
        out += [row[:n] for row, n in zip(answer.tolist(), lengths)]
    return out


def _perplexity(model: torch.nn.Module, tok: PreTrainedTokenizerBase, rows: list[dict[str, Any]], batch_size: int,
                max_prompt: int | None = None) -> float:
    from rlhf.models.tokenizer import encode_sft_row

    encoded = [encode_sft_row(tok, r, loss_on_prompt=False, max_prompt=max_prompt) for r in rows]
    prompts = [[t for t, lab in zip(e["input_ids"], e["labels"]) if lab == -100] for e in encoded]
    answers = [e["input_ids"][len(p) :] for e, p in zip(encoded, prompts)]  # each ends with its eos
    nll = -sum(answer_logprobs(model, tok.pad_token_id, prompts, answers, batch_size))
    tokens = sum(len(a) for a in answers)
    return math.exp(nll / max(tokens, 1))


def evaluate_actors(
    actors: dict[str, Path], reward_path: Path, data_dir: Path, cfg: EvaluateConfig, seed: int,
    max_prompt_tokens: int | None = None, environment: EnvironmentConfig | None = None, episode_tokens: int = 0,
) -> tuple[dict[str, dict[str, float]], list[dict[str, str]]]:
    """Metrics per actor name (the first one is the SFT baseline for KL) and sample rows side by side. The scorers'
    means are under their labels (default_scorers). Under a multi-turn `environment` each actor plays the rows'
    episodes (rlhf/evaluation/episodes.py) within `episode_tokens` (step 3's ppo.sampling.max_answer_tokens): its
    reward is the quality `env`, with turns and tool-call measures."""
    from rlhf.models.build import load_causal_lm, load_reward_model
    from rlhf.models.tokenizer import encode_prompt, load_tokenizer
    from rlhf.pipeline.outputs import is_placeholder

    with_rm = not is_placeholder(reward_path)  # the reward stage's placeholder: no reward model was needed
    rows = read_split(data_dir / "ppo_eval.jsonl")[: cfg.num_prompts]
    scorers = load_functions(default_scorers(cfg, rows), "evaluate.scorers")
    demos = _check_inputs(actors, reward_path, with_rm, data_dir, cfg, rows, bool(scorers) or environment is not None)
    baseline_path = next(iter(actors.values()))
    tok = load_tokenizer(baseline_path)
    _check_tokenizers(tok, actors, reward_path if with_rm else None)
    prompts = [encode_prompt(tok, r["prompt"], max_prompt_tokens) for r in rows]
    reward = load_reward_model(reward_path).eval() if with_rm else None
    baseline = load_causal_lm(baseline_path).eval()
    vllm = _vllm_engine(baseline_path, baseline.config, cfg, seed) if cfg.engine == "vllm" else None

    metrics: dict[str, dict[str, float]] = {}
    per_answer: dict[str, dict[str, list[float]]] = {}  # actor -> measure -> each answer's value (for the noise)
    samples: list[dict[str, str]] = [{"prompt": r["prompt"][-1]["content"]} for r in rows[: cfg.num_samples]]
    for name, path in actors.items():
        model = load_causal_lm(path).eval()
        scored, kl, episode = (prompts, None, {})  # what the reward model scores: prompt + answer
        if environment is None:
            answers = _answers(model, tok, prompts, cfg, seed, vllm)
        else:  # the episodes: the model's tokens are the answer, the whole trajectory is scored
            from rlhf.evaluation.episodes import play, trajectory_kl

            rollouts, episode = play(model, tok, rows, cfg, seed, environment, max_prompt_tokens, episode_tokens)
            answers = [a for r in rollouts for a in r.answers()]
            scored = [s[m.bool()].tolist() for r in rollouts for s, m in zip(r.sequences, r.attention_mask)]
            kl = trajectory_kl(model, baseline, rollouts, cfg.sampling.temperature if cfg.sampling.do_sample else 1.0)
        decoded = [tok.decode(a, skip_special_tokens=True) for a in answers]
        shown = decoded if environment is None else [  # the samples table shows whole episodes, tool results too
            tok.decode(s[r.prompt_width :][m[r.prompt_width :].bool()], skip_special_tokens=True)
            for r in rollouts for s, m in zip(r.sequences, r.attention_mask, strict=True)]
        quality = function_values(scorers, rows, decoded, answers)
        if environment is not None:
            quality = {"env": [v for r in rollouts for v in r.env_rewards.tolist()], **quality}
        require_applies(scorers, quality, f"held-out answers of the {name} actor")
        scores = (_reward_scores(reward, tok, scored, [[] if environment else a for a in answers], cfg.batch_size)
                  if reward is not None else None)
        metrics[name] = _measures(model, baseline, tok, prompts, answers, demos, cfg, max_prompt_tokens, kl)
        metrics[name] = {**{label: _mean(values) for label, values in quality.items()},
                         **({"rm_reward": _mean(scores)} if scores is not None else {}), **metrics[name], **episode}
        per_answer[name] = {label: [v for v in values if v is not None] for label, values in quality.items()}
        if scores is not None:
            per_answer[name]["rm_reward"] = list(scores)
        for i, (s, d) in enumerate(zip(samples, shown)):
            marks = "  ".join(f"{label} {v[i]:.2f}" for label, v in quality.items() if v[i] is not None)
            s[name] = f"{d}  [{marks}]" if marks else d
    line = no_difference_warning(per_answer)
    if line:
        import sys

        print(f"warning: {line}", file=sys.stderr, flush=True)
    return metrics, samples


def _vllm_engine(path: Path, config: Any, cfg: EvaluateConfig, seed: int) -> VLLMEngine:
    """One vLLM engine for every actor (evaluate.engine: vllm), built from the baseline's folder, fp32."""
    import torch

    from rlhf.rollout.vllm import VLLMEngine

    return VLLMEngine(path, config, "fp32", cfg.vllm, param="evaluate.engine", on_cuda=torch.cuda.is_available(),
                      seed=seed)


def _check_inputs(actors: dict[str, Path], reward_path: Path, with_rm: bool, data_dir: Path, cfg: EvaluateConfig,
                  rows: list[dict], has_scorers: bool) -> list[dict]:
    """One UserError for anything evaluate cannot measure with: no reward model and no scorer, a folder that is not
    a model of its kind, an empty held-out split. Returns the held-out SFT demonstrations (for perplexity)."""
    from rlhf.pipeline.guards import check_model_folder

    if not with_rm and not has_scorers:
        raise UserError(
            f"'{reward_path}' is a placeholder (no reward model was trained) and evaluate.scorers lists no scorer for "
            "this data, so nothing would measure the answers: list your verifier in evaluate.scorers"
        )
    for name, path in actors.items():
        check_model_folder(path, "causal_lm", f"the {name} actor")
    if with_rm:
        check_model_folder(reward_path, "classifier", "--reward")
    demos = read_split(data_dir / "sft_eval.jsonl")[: cfg.num_prompts]
    for split, got in (("ppo_eval", rows), ("sft_eval", demos)):
        if not got:  # prepare refuses empty eval splits; a folder made some other way may still have one
            raise UserError(
                f"{data_dir / split}.jsonl is empty, so evaluate has nothing to measure: rerun prepare with data that "
                "fills it (data.eval_fraction > 0)"
            )
    return demos


def _check_tokenizers(tok: PreTrainedTokenizerBase, actors: dict[str, Path], reward_path: Path | None) -> None:
    """The compatibility gate: every actor's answers are scored by the reward model and compared with the SFT model
    (the first actor), so their tokenizers must agree."""
    from transformers import AutoConfig

    from rlhf.models.tokenizer import check_compatible, load_tokenizer

    names = list(actors)
    base_cfg = AutoConfig.from_pretrained(actors[names[0]])
    if reward_path is not None:
        check_compatible(tok, load_tokenizer(reward_path), base_cfg, AutoConfig.from_pretrained(reward_path))
    for name in names[1:]:
        path = actors[name]
        check_compatible(tok, load_tokenizer(path), base_cfg, AutoConfig.from_pretrained(path), other=f"{name} actor")


def _measures(model: torch.nn.Module, baseline: torch.nn.Module, tok: PreTrainedTokenizerBase,
              prompts: list[list[int]], answers: list[list[int]],
              demos: list[dict], cfg: EvaluateConfig, max_prompt_tokens: int | None,
              kl: float | None = None) -> dict[str, float]:
    """KL to the SFT model (k1 per token, at the temperature the answers were drawn at; `kl` when the caller
    measured it, on multi-turn trajectories), answer length without the stop token, perplexity on the held-out
    demonstrations, and the number of prompts."""
    from rlhf.models.tokenizer import stop_ids

    stops = stop_ids(tok)
    temperature = cfg.sampling.temperature if cfg.sampling.do_sample else 1.0  # the distribution the answers were drawn from
    if kl is None:
        own = answer_logprobs(model, tok.pad_token_id, prompts, answers, cfg.batch_size, temperature)
        ref = answer_logprobs(baseline, tok.pad_token_id, prompts, answers, cfg.batch_size, temperature)
        kl = (sum(own) - sum(ref)) / max(sum(len(a) for a in answers), 1)
    return {
        "kl_to_sft": kl,  # k1 estimate of KL(actor || sft) per token
        "response_length": sum(len(a) - (a[-1:] != [] and a[-1] in stops) for a in answers) / len(answers),
        "perplexity": _perplexity(model, tok, demos, cfg.batch_size, max_prompt_tokens),
        "num_prompts": len(answers),
    }


def no_difference_warning(per_answer: dict[str, dict[str, list[float]]], z: float = 2.0) -> str | None:
    """A line when no actor's mean differs from the first (SFT) actor's beyond noise on any measure: more than z
    standard errors of the difference of two means (Welch's). None when some actor moved, or with one actor."""
    import statistics

    names = list(per_answer)
    if len(names) < 2:
        return None
    base = per_answer[names[0]]

    def moved(a: list[float], b: list[float]) -> bool:
        if len(a) < 2 or len(b) < 2:
            return False
        se = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
        diff = abs(statistics.fmean(a) - statistics.fmean(b))
        return diff > z * se and diff > 0

    if any(moved(per_answer[n][m], base[m]) for n in names[1:] for m in per_answer[n] if m in base):
        return None
    measures = ", ".join(sorted(base)) or "no measure"
    return (f"no actor differs from {names[0]} beyond noise ({measures}; {z:g} standard errors): step 3 and DPO "
            "learned nothing measurable here. Check that the reward has variance (ppo/reward curves), train SFT "
            "further, or give the reward partial credit")


def _mean(values: list[float | None]) -> float:
    """Mean over the samples a scorer applies to (require_applies guarantees one)."""
    got = [v for v in values if v is not None]
    return sum(got) / len(got)


def _reward_scores(reward: torch.nn.Module, tok: PreTrainedTokenizerBase, prompts: list[list[int]], answers: list[list[int]],
                   batch_size: int) -> list[float]:
    """Reward-model score of each prompt + answer at its last real token (the eos, when the answer has one), found
    by position as PPO's reward_scores does."""
    import torch

    from rlhf.models.build import last_token_scores

    scores: list[float] = []
    for i in range(0, len(prompts), batch_size):
        rows = [p + a for p, a in zip(prompts[i : i + batch_size], answers[i : i + batch_size])]
        ids, mask = right_pad(rows, tok.pad_token_id)
        with torch.no_grad():
            scores += last_token_scores(reward, ids, mask).tolist()
    return scores
