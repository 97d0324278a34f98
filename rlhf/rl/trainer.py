"""Step 3: RL against the reward (InstructGPT section 3.5; DeepSpeed-Chat step 3), on our hybrid engine: PPO (critic,
GAE) or the critic-free family (GRPO, Dr. GRPO, DAPO, GSPO, CISPO, RLOO, REINFORCE++), chosen by `ppo.algorithm`.

Public API, in DeepSpeed-Chat's shape (the stage loop around it is rlhf/rl/recipe.py's run_ppo):

    models = RLModels(params.ppo, params.engine, dist, sft_path, reward_path)  # rlhf/rl/models.py: actor, ref, ...
    trainer = RLTrainer(models, params.ppo, params.rewards)
    exp, info = trainer.make_experience([prompt_batch, ...])    # -> Experience, timings, counts
    stats = trainer.update(exp, seed)                           # ppo_epochs x one step per mini batch
    actor_loss, critic_loss, stats = trainer.train_rlhf(exp)    # or: one optimizer step on exp as one mini batch

Every algorithm shares one rollout and scoring path (`generate` -> Rollout, `reward_scores`, reference log-probs);
what differs is the estimator (rlhf/rl/advantages.py), the loss's settings and whether a critic exists. The reward
is params.yaml `rewards`: the reward model's score x `rewards.model_weight` plus verifier functions
(rlhf/rl/rewards.py). Subclass RLTrainer, override `reward_scores` or `advantages`, and name it in `ppo.trainer`.
"""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Any

from rlhf import faults
from rlhf.config import GROUP_ALGORITHMS, PPOConfig, RewardsConfig
from rlhf.errors import UserError
from rlhf.models.build import classifier_parts as _classifier
from rlhf.models.prefix import answer_outputs
from rlhf.rl.experience import Experience, shares_cache, token_values
from rlhf.rl.filtering import overlong
from rlhf.rl.grading import Grader
from rlhf.rollout.base import Rollout
from rlhf.training.loop import NonFiniteGuard, accumulate, finish_step
from rlhf.training.runtime import evaluating, training
from rlhf.training.stats import scores_vary, sum_over_ranks

if TYPE_CHECKING:
    import torch

    from rlhf.rl.models import RLModels
    from rlhf.rl.rewards import RewardFunction


class RLTrainer:
    """Step 3's trainer: one rollout and scoring path, the estimator of `ppo.algorithm`, a clipped policy loss
    (asymmetric clip, loss aggregation, k3 KL loss and entropy bonus as configured) and, for ppo, a clipped value
    loss. Override the small methods to customise.

    The reward is `rewards`: model_weight x the reward model's score plus each function's weight x value;
    `functions` are the loaded rewards.functions (default: loaded here, rlhf.rl.rewards.load_functions)."""

    def __init__(self, models: RLModels, config: PPOConfig, rewards: RewardsConfig,
                 functions: list[RewardFunction] | None = None):
        from rlhf.rl.kl import AdaptiveKLController
        from rlhf.rl.rewards import load_functions
        from rlhf.training.stats import RunningMoments

        self.models, self.config, self.rewards = models, config, rewards
        if self.rewards.model_weight > 0 and models.reward is None:
            raise UserError("rewards.model_weight > 0 needs a reward model: pass --reward, or set rewards.model_weight: 0")
        if config.needs_critic and models.critic is None:
            raise UserError(f"ppo.algorithm {config.algorithm} needs a critic, but the models were built without one")
        self.functions = functions if functions is not None else load_functions(self.rewards.functions, "rewards.functions")
        self.grader = Grader(rewards)  # how the functions are called: chunks at once, timeouts, retries, failures
        self.term_stats: dict[str, list[float]] = {}  # label -> [sum, count] of each reward term since the last log
        self.episode_stats: dict[str, float] = {}  # multi-turn: episodes, turns, tool calls, failed calls, summed
        self.tok = models.tok
        self.episodes = _episodes(models, config)  # ppo.environment: the multi-turn engine around models.rollout
        self.kl_ctl = AdaptiveKLController(config.kl.coef, config.kl.target, config.kl.horizon)
        self.reward_moments = RunningMoments()  # of every summed reward so far (ppo.advantage.reward_normalization: running)
        self.iteration = 0  # the iteration under way (1-based), for messages and fault injection
        self.guard = NonFiniteGuard(config.max_bad_steps, "ppo")
        self.ptx: Any = None  # an iterator of ptx micro batches when ppo.loss.ptx_coef > 0 (the stage sets it)

    # ------------------------------------------------------------------------------------------- resume

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs of the trainer beyond the engines' weights and optimizers: the adaptive KL
        coefficient, the running reward moments, the skipped-step count, the ptx position and the EMA weights."""
        ema = self.models.ema
        return {
            "kl_ctl": self.kl_ctl.state_dict(),
            "reward_moments": self.reward_moments.state_dict(),
            "skipped": self.guard.skipped,
            "ptx": self.ptx.state_dict() if self.ptx is not None else None,
            "ema": ema.state_dict() if ema is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.ptx is not None:
            self.ptx.load_state_dict(state["ptx"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.reward_moments.load_state_dict(state["reward_moments"])
        self.guard.skipped = state["skipped"]
        if self.models.ema is not None:
            self.models.ema.load_state_dict(state["ema"])

    # ------------------------------------------------------------------ overridable pieces (small on purpose)

    def reward_scores(self, rollout: Rollout, rows: list[dict] | None = None) -> torch.Tensor:
        """(B,) reward for each prompt + answer: rewards.model_weight x the reward model's score at the last real
        token, plus weight x value of each function in rewards.functions (`rows`: the data row of each sample, for
        the prompt as the user wrote it and the extra columns). Each term's sum and count go to `term_stats`.
        Override to add terms or to call another scorer."""
        import torch

        from rlhf.rl.rewards import function_values, weighted_sum

        sequences = rollout.sequences
        total = torch.zeros(sequences.shape[0], device=sequences.device)
        if self.rewards.model_weight > 0:
            model = self.model_scores(rollout)
            self._add_stat("model", model.tolist())
            total = total + self.rewards.model_weight * model
        if rollout.env_rewards is not None:
            self._add_stat("env", rollout.env_rewards.tolist())
            total = total + rollout.env_rewards.to(total)
        if self.functions:
            if rows is None:
                raise UserError("reward functions need the data rows of the batch: pass `rows` to reward_scores")
            ids = rollout.answers()
            texts = [self.tok.decode(i, skip_special_tokens=True) for i in ids]
            values = function_values(self.functions, rows, texts, ids, self.grader)
            for label, got in values.items():
                self._add_stat(label, got)
            added = weighted_sum(self.functions, values, len(rows))
            total = total + torch.tensor(added, device=total.device, dtype=total.dtype)
        return total.float()

    def model_scores(self, rollout: Rollout) -> torch.Tensor:
        """(B,) the reward model's score of each prompt + answer at its last real token."""
        import torch

        p = rollout.prompt_width
        body, score = _classifier(self.models.reward.module)
        hidden = answer_outputs(body, "last_hidden_state", rollout.sequences, rollout.attention_mask, p)  # P-1 .. T-1
        last = rollout.attention_mask[:, p:].sum(-1)  # answers are contiguous: the last real token, 0 = the prompt's
        return score(hidden[torch.arange(hidden.shape[0]), last]).squeeze(-1).float()

    def _add_stat(self, label: str, values: list[float | None]) -> None:
        got = [v for v in values if v is not None]
        stat = self.term_stats.setdefault(label, [0.0, 0.0])
        stat[0], stat[1] = stat[0] + sum(got), stat[1] + len(got)

    def term_labels(self) -> list[str]:
        """The reward terms in use, as logged: `model` (the reward model) and each function's label."""
        return ((["model"] if self.rewards.model_weight > 0 else []) + (["env"] if self.episodes else [])
                + [f.label for f in self.functions])

    def normalized(self, scores: torch.Tensor) -> torch.Tensor:
        """(B,) the summed rewards as the estimator takes them: under ppo.advantage.reward_normalization: running,
        z-scored by the moments of every reward so far, this batch's included (summed over ranks, so each rank normalises
        alike); under none, unchanged. Then clipped to [-reward_clip, reward_clip] (0: no clip)."""
        if self.config.advantage.reward_normalization == "running":
            from rlhf.training.loop import all_reduce_sum

            total, total_sq, n = all_reduce_sum(
                [scores.sum().item(), scores.double().pow(2).sum().item(), float(scores.numel())], self.models.dist
            )
            self.reward_moments.update(total, total_sq, n)
            scores = self.reward_moments.normalize(scores)
        clip = self.config.advantage.reward_clip
        return scores.clamp(-clip, clip) if clip > 0 else scores

    def advantages(self, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, values: torch.Tensor,
                   scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The estimator of ppo.algorithm (rlhf/rl/advantages.py) -> (rewards, advantages, returns), each (B, R).
        scores: (B,) normalised. Under kl_penalty: loss the reward has no KL term (the loss carries it). Batch
        statistics (whitening) are taken over every rank's rows."""
        from rlhf.rl.advantages import ESTIMATORS

        kl_coef = self.kl_ctl.value if self.config.kl.penalty == "reward" else 0.0
        world = self.models.dist.world_size
        reduce = functools.partial(sum_over_ranks, world_size=world) if world > 1 else None
        return ESTIMATORS[self.config.algorithm](logprobs, ref_logprobs, values, scores, mask, self.config, kl_coef,
                                                 reduce)

    # ------------------------------------------------------------------------------------------ the phases

    def _logprobs(self, model: torch.nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor,
                  prompt_len: int, entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, R) log-probabilities of the answer tokens under `model` at the rollout temperature, over the whole
        vocabulary: the one processing log pi_old, log pi and log pi_ref share (see PPOConfig.sampling). With
        `entropy`, also the (B, R) entropy of each position's distribution: (logprobs, entropy)."""
        from rlhf.models.logprobs import entropy_from_logits, logprobs_from_logits

        module = getattr(model, "module", model)
        logits = answer_outputs(model, "logits", sequences, attention_mask, prompt_len, shares_cache(module), last=False)
        logprobs = logprobs_from_logits(logits, sequences[:, prompt_len:], self.config.sampling.temperature)
        if entropy:
            return logprobs, entropy_from_logits(logits, self.config.sampling.temperature)
        return logprobs

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, rows: list[dict] | None = None) -> Rollout:
        """One answer per prompt row from the engine's rollout engine (ppo.rollout.engine, rlhf/rollout/), drawn with
        ppo's sampling config, with the engine's log-probs of the drawn tokens. Under ppo.environment, one episode
        per data row of `rows` instead (the environment writes its first messages)."""
        if self.episodes is None:
            return self.models.rollout.generate(prompt_ids, prompt_mask, self.config.sampling)
        if rows is None:
            raise UserError("ppo.environment plays episodes on data rows: pass `rows` to generate")
        rollout = self.episodes.generate(rows, self.config.sampling)
        for key, value in self.episodes.stats.items():
            self.episode_stats[key] = self.episode_stats.get(key, 0.0) + value
        return rollout

    def generate_experience(self, prompt_batch: dict[str, Any]) -> tuple[Experience, dict[str, float]]:
        """Phases 1-3 of an iteration on one batch of prompts: make_experience([prompt_batch])."""
        return self.make_experience([prompt_batch])

    def make_experience(self, prompt_batches: list[dict[str, Any]]) -> tuple[Experience, dict[str, float]]:
        """Phases 1-3 of an iteration: generate and score each batch of prompts (input_ids/attention_mask (N, P)),
        then the advantages once over all of them (and over every rank): the running reward statistics, the
        whitening and the KL means are those of the iteration's whole batch, however it was split into generation
        batches. The experience has B = sum of N x answers per prompt rollouts (each prompt's answers in a row: a
        group). Returns it and {generate_s, score_s, advantages_s, tokens, truncated} (seconds per phase, answer
        tokens, answers cut off by max_answer_tokens)."""
        return self.estimate(*self.rollouts(prompt_batches))

    def rollouts(self, prompt_batches: list[dict[str, Any]]) -> tuple[Experience, dict[str, float]]:
        """Phases 1-2 on each batch of prompts, as one experience without its estimate (see make_experience)."""
        info = {"generate_s": 0.0, "score_s": 0.0, "advantages_s": 0.0, "tokens": 0.0, "truncated": 0.0}
        parts = []
        for batch in prompt_batches:
            part, timings = self._rollout_and_score(batch)
            parts.append(part)
            info = {k: info.get(k, 0.0) + timings.get(k, 0.0) for k in info | timings}
        return (Experience.cat(parts) if len(parts) > 1 else parts[0]), info

    def estimate(self, exp: Experience, info: dict[str, float]) -> tuple[Experience, dict[str, float]]:
        """Phase 3 on the experience of `rollouts`: the mismatch correction, then the advantages."""
        import torch

        if exp.rollout_logprobs is not None:
            from rlhf.rl.correction import correct

            info.update(correct(exp, self.config.rollout, self.models.dist))
        t0 = time.perf_counter()
        with torch.no_grad():
            exp.rewards, exp.advantages, exp.returns = self.advantages(
                exp.logprobs, exp.ref_logprobs, exp.values, self.normalized(exp.scores), exp.action_mask
            )
        info["advantages_s"] = time.perf_counter() - t0
        info["tokens"] = info.get("tokens") or exp.action_mask.sum().item()
        return exp, info

    def _rollout_and_score(self, prompt_batch: dict[str, Any]) -> tuple[Experience, dict[str, float]]:
        """Phases 1-2 on one batch of prompts: the experience without its estimate (rewards, advantages and
        returns are zeros until make_experience fills them) and {generate_s, score_s}."""
        import torch

        device = self.models.device
        k = self.config.group_size  # each prompt k times in a row: the hybrid engine prefills it once
        prompt_ids = prompt_batch["input_ids"].to(device).repeat_interleave(k, dim=0)
        prompt_mask = prompt_batch["attention_mask"].to(device).repeat_interleave(k, dim=0)
        rows = [r for r in prompt_batch.get("rows") or [] for _ in range(k)] or None  # the data row of each rollout

        t0 = time.perf_counter()
        rollout = self.generate(prompt_ids, prompt_mask, rows)
        t1 = time.perf_counter()
        seq, mask, action_mask, p = rollout.sequences, rollout.attention_mask, rollout.action_mask, rollout.prompt_width
        actor, critic = self.models.actor.engine, self.models.critic
        # log pi_old: the rollout's, or the training forward's (the rollout's then kept to measure the mismatch)
        recompute = rollout.logprobs is None or self.config.recomputes_logprobs(self.models.engine_configs["actor"].dtype)
        with torch.no_grad(), evaluating(actor, critic):
            logprobs = self._logprobs(actor, seq, mask, p) if recompute else rollout.logprobs
            ref_logprobs = self._logprobs(self.models.ref, seq, mask, p)
            values = token_values(critic.module, seq, mask, p) if critic is not None else torch.zeros_like(logprobs)
            scores = self.reward_scores(rollout, rows)
            scores, action_mask = overlong(rollout, scores, self.config.overlong, self.config.sampling.max_answer_tokens)
            logprobs, ref_logprobs, values = logprobs * action_mask, ref_logprobs * action_mask, values * action_mask
            kl = (logprobs - ref_logprobs) * action_mask
        t2 = time.perf_counter()
        zeros = torch.zeros_like(logprobs)
        drawn = rollout.logprobs * action_mask if recompute and rollout.logprobs is not None else None
        exp = Experience(seq, mask, action_mask, logprobs, ref_logprobs, values, scores, zeros, zeros, zeros, kl, drawn)
        return exp, {"generate_s": t1 - t0, "score_s": t2 - t1, "truncated": rollout.stop_reasons.count("length")}

    def informative(self, scores: torch.Tensor) -> bool:
        """Whether this iteration's raw scores (every rank's) have something to learn from (stats.scores_vary)."""
        groups = self.config.group_size if self.config.algorithm in GROUP_ALGORITHMS else None
        return scores_vary(scores, groups, self.models.dist.world_size)

    def update(self, exp: Experience, seed: int) -> dict[str, float]:
        """Phase 4: ppo.ppo_epochs passes over the experience, each in a fresh order (a torch.Generator seeded
        with `seed` and the epoch: the global RNG, which sampling uses, is left alone), one optimizer step per mini
        batch of ppo.mini_batch_size rows. Returns each loss and statistic averaged over the steps."""
        import torch

        cfg = self.config
        sums: dict[str, float] = {}
        steps = 0
        for epoch in range(cfg.ppo_epochs):
            order = torch.randperm(exp.sequences.shape[0], generator=torch.Generator().manual_seed(seed + epoch))
            for start in range(0, len(order), cfg.mini_batch):
                ptx = [next(self.ptx) for _ in range(cfg.mini_batch // cfg.micro_batch_size)] if self.ptx else None
                a_loss, c_loss, stats = self.train_rlhf(exp.select(order[start : start + cfg.mini_batch]), ptx)
                losses = {"actor_loss": a_loss} | ({"critic_loss": c_loss} if self.models.critic is not None else {})
                for key, value in {**losses, **stats}.items():
                    sums[key] = sums.get(key, 0.0) + value
                steps += 1
        return {key: value / max(steps, 1) for key, value in sums.items()}

    def train_rlhf(self, exp: Experience, ptx: list[dict[str, Any]] | None = None) -> tuple[float, float, dict[str, float]]:
        """Phase 4 on one mini batch: one optimizer step of the actor and (ppo) one of the critic, the gradients of
        its micro batches (ppo.micro_batch_size rows each) accumulated. Every loss is normalised over the whole
        mini batch of every rank (ppo.loss.aggregation's count summed over micro batches and ranks), so the step
        is the same however the mini batch is split. `ptx`: one language-model batch per micro batch, whose loss
        x ppo.loss.ptx_coef joins the same step (InstructGPT's PPO-ptx objective). Returns (actor_loss, critic_loss (0
        without a critic), stats), the losses as the mini batch's."""
        import torch

        from rlhf.training.losses import aggregation_count

        cfg = self.config
        micro = [exp.slice(i, i + cfg.micro_batch_size) for i in range(0, exp.sequences.shape[0], cfg.micro_batch_size)]
        world = self.models.dist.world_size
        counts = [aggregation_count(m.action_mask, cfg.loss.aggregation) for m in micro]
        tokens = [aggregation_count(m.action_mask, "token_mean") for m in micro]
        total, total_tokens = sum_over_ranks(torch.stack([sum(counts), sum(tokens)]), world).tolist()
        actor, critic = self.models.actor.engine, self.models.critic
        a_loss, stats, ptx_loss = 0.0, {}, 0.0
        with training(actor):
            steps = []
            for j, m in enumerate(micro):
                loss, micro_stats = self._actor_loss(m, total)
                a_loss += loss.item() * world
                if ptx is not None:  # each rank's LM mean, averaged over the micro batches (DeepSpeed averages ranks)
                    lm = self._ptx_loss(ptx[j])
                    ptx_loss += lm.item() / len(micro)
                    loss = loss + cfg.loss.ptx_coef * lm / len(micro) / world
                steps.append(accumulate(actor, loss * world, j == len(micro) - 1, self.guard, self.models.dist, self.iteration))
                for key, value in micro_stats.items():
                    stats[key] = stats.get(key, 0.0) + value / len(micro)
            finish_step(actor, all(steps), self.guard, self.iteration)
        if ptx is not None:
            stats["ptx_loss"] = ptx_loss
        if critic is None:
            return a_loss, 0.0, stats
        c_loss = 0.0
        with training(critic):
            steps = []
            for j, m in enumerate(micro):
                loss, c_stats = self._critic_loss(m, total_tokens)
                c_loss += loss.item() * world
                steps.append(accumulate(critic, loss * world, j == len(micro) - 1, self.guard, self.models.dist, self.iteration))
                for key, value in c_stats.items():
                    stats[key] = stats.get(key, 0.0) + value / len(micro)
            finish_step(critic, all(steps), self.guard, self.iteration)
        return a_loss, c_loss, stats

    def _actor_loss(self, exp: Experience, total: float) -> tuple[torch.Tensor, dict[str, float]]:
        """This micro batch's share of the mini batch's actor loss (`total`: the mini batch's aggregation count)."""
        from rlhf.training.losses import aggregate_loss, k3_kl, policy_loss

        cfg = self.config
        p = exp.sequences.shape[1] - exp.action_mask.shape[1]
        agg, norm = cfg.loss.aggregation, cfg.sampling.max_answer_tokens
        out = self._logprobs(self.models.actor.engine, exp.sequences, exp.attention_mask, p, entropy=cfg.loss.entropy_coef > 0)
        logprobs, entropy = out if cfg.loss.entropy_coef > 0 else (out, None)
        loss, stats = policy_loss(logprobs, exp.logprobs, exp.advantages, exp.action_mask, cfg.loss.clip_low,
                                  cfg.loss.clip_high, agg, norm, total, cfg.loss.dual_clip, exp.is_weights,
                                  cfg.loss.ratio_level, cfg.loss.surrogate)
        if cfg.kl.penalty == "loss":
            k3 = k3_kl(logprobs, exp.ref_logprobs)
            if cfg.kl.clamp > 0:  # verl's clamp: one token far from the reference cannot dominate the step
                k3 = k3.clamp(max=cfg.kl.clamp)
            loss = loss + self.kl_ctl.value * aggregate_loss(k3, exp.action_mask, agg, norm, total)
            stats["kl_loss"] = aggregate_loss(k3.detach(), exp.action_mask, agg, norm).item()
        if entropy is not None:
            loss = loss - cfg.loss.entropy_coef * aggregate_loss(entropy, exp.action_mask, agg, norm, total)
            stats["entropy"] = aggregate_loss(entropy.detach(), exp.action_mask, agg, norm).item()
        return faults.poison(loss, self.iteration), stats

    def _critic_loss(self, exp: Experience, total_tokens: float) -> tuple[torch.Tensor, dict[str, float]]:
        """This micro batch's share of the mini batch's value loss (a mean over its `total_tokens` real tokens)."""
        from rlhf.training.losses import value_loss

        p = exp.sequences.shape[1] - exp.action_mask.shape[1]
        values = token_values(self.models.critic.module, exp.sequences, exp.attention_mask, p)
        return value_loss(values, exp.values, exp.returns, exp.action_mask, self.config.loss.value_clip_range, total_tokens)

    def _ptx_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The language-model loss of one ptx batch under the actor (train mode is the caller's)."""
        actor = self.models.actor.engine
        return actor(**{k: v.to(actor.device) for k, v in batch.items()}).loss


def _episodes(models: RLModels, config: PPOConfig) -> Any:
    """The multi-turn engine of ppo.environment around the models' rollout engine, or None (single turn)."""
    if config.environment.name is None:
        return None
    from rlhf.models.tokenizer import stop_ids
    from rlhf.rollout.environments.base import load_environment
    from rlhf.rollout.turns import MultiTurnRollout

    env = config.environment
    make_env = load_environment(env.name, env.options, env.tool_timeout_s)
    return MultiTurnRollout(models.rollout, models.tok, make_env, env, stop_ids(models.tok), None, models.device,
                            models.dist.world_size)
