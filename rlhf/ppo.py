"""Step 3: RL against the reward (InstructGPT section 3.5; DeepSpeed-Chat step 3), on our hybrid engine: PPO (critic,
GAE) or the critic-free family (GRPO, RLOO, REINFORCE++), chosen by `ppo.algorithm`.

Public API, in DeepSpeed-Chat's shape:

    engine = RLHFEngine(params, dist, sft_path, reward_path)   # actor, ref, critic (ppo only), reward (+ EMA)
    trainer = PPOTrainer(engine, params.ppo)
    exp, info = trainer.generate_experience(prompt_batch)       # -> Experience, timings and token count
    actor_loss, critic_loss, stats = trainer.train_rlhf(exp)
    trainer.train_unsupervised(ptx_batch)                       # optional ptx mix

Every algorithm shares one rollout and scoring path (`generate` -> Rollout, `reward_scores`, reference log-probs);
what differs is the estimator (`advantages`, on rlhf/ppo_math.py's pure functions) and whether a critic exists. The
reward is params.yaml `rewards`: the reward model's score times `rewards.model_weight` plus verifier functions
(rlhf/rewards.py), no code needed. Subclass PPOTrainer and override the small documented methods (`reward_scores`,
`advantages`) to change the estimator, and name it in `ppo.trainer` for the stage to use it; see README.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf import faults
from rlhf.batching import Cycle, collate_prompt_rows, collate_prompts
from rlhf.config import EngineConfig, Params, PPOConfig, RewardsConfig, TrainConfig, resolve_engine
from rlhf.engine import Dist, evaluating, training
from rlhf.errors import UserError
from rlhf.models import classifier_parts as _classifier
from rlhf.prefix import answer_outputs
from rlhf.trainer import NonFiniteGuard

if TYPE_CHECKING:
    import torch

    from rlhf.rewards import RewardFunction


@dataclass
class Rollout:
    """What `generate` returns: B answers to left-padded prompts of P = prompt_width tokens."""

    sequences: torch.Tensor  # (B, P + R) prompt + answer ids, padded after each answer's first eos
    attention_mask: torch.Tensor  # (B, P + R) the prompt's mask, then 1 on answer tokens up to the first eos
    action_mask: torch.Tensor  # (B, R) float 1 on answer tokens up to and including the first eos
    logprobs: torch.Tensor | None  # (B, R) log pi_old from the rollout's own logits; None: to be recomputed
    prompt_width: int  # P: answers start at sequences[:, P:]

    def answers(self) -> list[list[int]]:
        """Each answer's real token ids (up to and including its eos)."""
        lengths = self.action_mask.sum(-1).long().tolist()
        return [row[:n] for row, n in zip(self.sequences[:, self.prompt_width :].tolist(), lengths)]


@dataclass
class Experience:
    """One rollout batch. B = rollouts, T = P + R (left-padded prompt of P tokens, answer of R tokens)."""

    sequences: torch.Tensor  # (B, T) prompt + answer token ids, pad_token_id in the padding
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens
    action_mask: torch.Tensor  # (B, R) 1 on answer tokens up to and including eos, 0 after
    logprobs: torch.Tensor  # (B, R) log pi_old(a_t | s_t) of the actor that generated the answer
    ref_logprobs: torch.Tensor  # (B, R) log pi_ref(a_t | s_t) of the frozen SFT model
    values: torch.Tensor  # (B, R) V_old(s_t) of the critic (0 without one)
    scores: torch.Tensor  # (B,) the summed reward (rewards.*) of each answer, raw
    rewards: torch.Tensor  # (B, R) per-token rewards the advantages came from (score, baselined for grpo/rloo, at
                           # the last answer token; minus kl_coef x KL per token under kl_penalty: reward)
    advantages: torch.Tensor  # (B, R) GAE (ppo) or reward-to-go of the critic-free family
    returns: torch.Tensor  # (B, R) advantages + values: the critic's targets (ppo)
    kl: torch.Tensor  # (B, R) per-token log pi_old - log pi_ref

    def slice(self, start: int, stop: int) -> Experience:
        return Experience(**{f.name: getattr(self, f.name)[start:stop] for f in fields(self)})

    @staticmethod
    def cat(parts: list[Experience]) -> Experience:
        """Concatenate rollouts along B, right-padding (B, R) tensors to the longest R (masked out)."""
        import torch

        def pad(ts: list[Any], value: float) -> Any:
            width = max(t.shape[1] for t in ts)
            return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in ts])

        out = {}
        for f in fields(Experience):
            ts = [getattr(p, f.name) for p in parts]
            out[f.name] = torch.cat(ts) if ts[0].dim() == 1 else pad(ts, 0)
        return Experience(**out)


def shares_cache(module: Any) -> bool:
    """Whether a forward pass of `module` keeps a KV cache: gradient checkpointing drops it while training."""
    return not (module.training and getattr(module, "is_activation_checkpointing", False))


def token_values(module: Any, sequences: Any, attention_mask: Any, prompt_len: int) -> Any:
    """(B, R) per-token values of a sequence classifier (the critic): its score head on the hidden states of
    positions P - 1 .. T - 2, the states in which each answer token is chosen."""
    body, score = _classifier(module)
    hidden = answer_outputs(body, "last_hidden_state", sequences, attention_mask, prompt_len, shares_cache(module))
    return score(hidden[:, :-1]).squeeze(-1).float()


def check_compatible(actor_tok: Any, reward_tok: Any, actor_cfg: Any, reward_cfg: Any, other: str = "reward model") -> None:
    """The compatibility gate: PPO feeds the actor's tokens to the reward model and critic unchanged (and evaluate
    feeds every actor's answers to the reward model and the SFT model), so their tokenizers must agree exactly.
    Raises one UserError naming what differs and how to fix it."""
    checks = [
        ("vocabulary", actor_tok.get_vocab() == reward_tok.get_vocab(), f"{len(actor_tok)} vs {len(reward_tok)} tokens"),
        ("eos token", actor_tok.eos_token_id == reward_tok.eos_token_id, f"{actor_tok.eos_token!r} vs {reward_tok.eos_token!r}"),
        ("pad token", actor_tok.pad_token_id == reward_tok.pad_token_id, f"{actor_tok.pad_token!r} vs {reward_tok.pad_token!r}"),
        ("bos token", actor_tok.bos_token_id == reward_tok.bos_token_id, f"{actor_tok.bos_token!r} vs {reward_tok.bos_token!r}"),
        ("chat template", actor_tok.chat_template == reward_tok.chat_template, "templates differ"),
        ("embedding size", reward_cfg.vocab_size >= len(actor_tok), f"{other} has {reward_cfg.vocab_size} rows"),
    ]
    for what, ok, detail in checks:
        if not ok:
            raise UserError(
                f"the actor's and {other}'s tokenizers differ in {what} ({detail}): train the {other} "
                "from the same tokenizer as the actor (same model family, or the same data/prepared/tokenizer)"
            )


def _train_cfg(ppo: PPOConfig, lr: float) -> TrainConfig:
    return TrainConfig(
        micro_batch_size=ppo.micro_batch_size,
        learning_rate=lr,
        weight_decay=ppo.weight_decay,
        warmup_ratio=ppo.warmup_ratio,
        lr_schedule=ppo.lr_schedule,
        adam_beta1=ppo.adam_beta1,
        adam_beta2=ppo.adam_beta2,
    )


def _frozen_engine(model: Any, engine: EngineConfig, micro_batch_size: int) -> Any:
    """A DeepSpeed engine for a frozen model: sharded under ZeRO-3 like the trained ones (weights offloaded with
    offload_params), else whole."""
    import deepspeed

    from rlhf.engine import report_zero3, zero_config

    model.requires_grad_(False)
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "zero_optimization": zero_config(engine, trained=False),
        "bf16": {"enabled": engine.dtype == "bf16"},
        "fp16": {"enabled": engine.dtype == "fp16"},
        "steps_per_print": 10**9,
    }
    ds_engine, *_ = deepspeed.initialize(model=model, config=config)
    ds_engine.eval()
    if engine.zero_stage == 3:
        report_zero3(f"frozen {type(model).__name__}", ds_engine.module)
    return ds_engine


def critic_from_actor(path: str | Path) -> Any:
    """A critic without a reward model (rewards.model_weight 0, as OpenRLHF allows): the SFT actor's body with a
    fresh value head, zeroed so that every value starts at 0."""
    from rlhf.models import load_reward_model

    critic = load_reward_model(path)
    _classifier(critic)[1].weight.data.zero_()
    return critic


class RLHFEngine:
    """Builds and owns the four models of step 3 (and the actor's EMA), each a DeepSpeed engine.

    actor: from the SFT output, trained, behind the hybrid engine; ref: frozen copy of SFT; critic (ppo only, else
    None): initialised from the reward model (from the actor with a fresh value head when reward_path is None),
    trained; reward: frozen, or None without a reward model. `build_actor()` / `build_critic()` return fresh skeletons of the trained
    architectures (LoRA included) for exporting gathered weights.
    """

    def __init__(self, params: Params, dist: Dist, sft_path: Path, reward_path: Path | None):
        from transformers import AutoConfig

        from rlhf import engine as eng
        from rlhf.hybrid import HybridEngine
        from rlhf.models import add_lora, load_causal_lm, load_reward_model
        from rlhf.tokenizer import load_tokenizer

        self.params, self.dist = params, dist
        ppo = params.ppo
        self.tok = load_tokenizer(sft_path)
        if reward_path is not None:
            reward_tok = load_tokenizer(reward_path)
            check_compatible(self.tok, reward_tok, AutoConfig.from_pretrained(sft_path), AutoConfig.from_pretrained(reward_path))
        self.tok.padding_side = "left"  # prompts are left-padded for batched generation

        self.build_actor: Callable[[], Any] = lambda: add_lora(load_causal_lm(sft_path), ppo.actor_lora, "CAUSAL_LM")
        critic_body = (lambda: load_reward_model(reward_path)) if reward_path is not None else (lambda: critic_from_actor(sft_path))
        self.build_critic: Callable[[], Any] | None = None
        if ppo.needs_critic:
            self.build_critic = lambda: add_lora(critic_body(), ppo.critic_lora, "SEQ_CLS")
        steps = ppo.iterations * ppo.ppo_epochs * ppo.rollouts_per_iteration // ppo.micro_batch_size
        self.engines = {
            name: resolve_engine(params.engine, getattr(ppo, f"{name}_engine"))
            for name in ("actor", "critic", "ref", "reward")
        }
        self.actor = HybridEngine(
            eng.initialize(self.build_actor(), self.engines["actor"], _train_cfg(ppo, ppo.actor_learning_rate), steps),
            self.engines["actor"].zero_stage,
        )
        self.critic = None  # the critic-free family has none: nothing built, stepped or saved
        if self.build_critic is not None:
            self.critic = eng.initialize(
                self.build_critic(), self.engines["critic"], _train_cfg(ppo, ppo.critic_learning_rate), steps
            )
        self.ref = _frozen_engine(load_causal_lm(sft_path), self.engines["ref"], ppo.micro_batch_size)
        self.reward = None
        if reward_path is not None:
            self.reward = _frozen_engine(load_reward_model(reward_path), self.engines["reward"], ppo.micro_batch_size)
        self.ema = None
        if ppo.ema_beta > 0:
            state = eng.full_state_dict(self.actor.module, self.actor.zero_stage, is_main=True, all_ranks=True)
            self.ema = self.build_actor().requires_grad_(False)
            self.ema.load_state_dict(state, strict=False)

    def update_ema(self) -> None:
        """ema = beta * ema + (1 - beta) * actor, parameter by parameter (gathered under ZeRO-3)."""
        if self.ema is None:
            return
        from rlhf.engine import full_state_dict
        from rlhf.ppo_math import ema_update

        state = full_state_dict(self.actor.module, self.actor.zero_stage, is_main=True, all_ranks=True)
        ema_params = dict(self.ema.named_parameters())
        names = [n for n in ema_params if n in state]
        ema_update([ema_params[n] for n in names], [state[n] for n in names], self.params.ppo.ema_beta)


class PPOTrainer:
    """Step 3's trainer: one rollout and scoring path, the estimator of `ppo.algorithm`, a clipped policy loss
    (asymmetric clip, loss aggregation, k3 KL loss and entropy bonus as configured) and, for ppo, a clipped value
    loss. Override the small methods to customise.

    The reward is `rewards` (default: engine.params.rewards): model_weight x the reward model's score plus each
    function's weight x value; `functions` are the loaded rewards.functions (rlhf.rewards.load_functions)."""

    def __init__(self, engine: RLHFEngine, config: PPOConfig, rewards: RewardsConfig | None = None,
                 functions: list[RewardFunction] | None = None):
        from rlhf.ppo_math import AdaptiveKLController, RunningMoments
        from rlhf.rewards import load_functions

        self.engine, self.config = engine, config
        self.rewards = rewards if rewards is not None else engine.params.rewards
        if self.rewards.model_weight > 0 and engine.reward is None:
            raise UserError("rewards.model_weight > 0 needs a reward model: pass --reward, or set rewards.model_weight: 0")
        if config.needs_critic and engine.critic is None:
            raise UserError(f"ppo.algorithm {config.algorithm} needs a critic, but the engine was built without one")
        self.functions = functions if functions is not None else load_functions(self.rewards.functions, "rewards.functions")
        # label -> [sum, count] of each reward term over the rollouts since the last reset (logged per iteration)
        self.term_stats: dict[str, list[float]] = {}
        self.tok = engine.tok
        self.kl_ctl = AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
        self.reward_moments = RunningMoments()  # of every summed reward so far (ppo.reward_normalization: running)
        self.iteration = 0  # the iteration under way (1-based), for messages and fault injection
        self.guard = NonFiniteGuard(config.max_bad_steps, "ppo")

    # ------------------------------------------------------------------ overridable pieces (small on purpose)

    def reward_scores(self, rollout: Rollout, rows: list[dict] | None = None) -> torch.Tensor:
        """(B,) reward for each prompt + answer: rewards.model_weight x the reward model's score at the last real
        token, plus weight x value of each function in rewards.functions (`rows`: the data row of each sample, for
        the prompt as the user wrote it and the extra columns). Each term's sum and count go to `term_stats`.
        Override to add terms or to call another scorer."""
        import torch

        from rlhf.rewards import function_values, weighted_sum

        sequences = rollout.sequences
        total = torch.zeros(sequences.shape[0], device=sequences.device)
        if self.rewards.model_weight > 0:
            model = self.model_scores(rollout)
            self._add_stat("model", model.tolist())
            total = total + self.rewards.model_weight * model
        if self.functions:
            if rows is None:
                raise UserError("reward functions need the data rows of the batch: pass `rows` to reward_scores")
            ids = rollout.answers()
            texts = [self.tok.decode(i, skip_special_tokens=True) for i in ids]
            values = function_values(self.functions, rows, texts, ids)
            for label, got in values.items():
                self._add_stat(label, got)
            added = weighted_sum(self.functions, values, len(rows))
            total = total + torch.tensor(added, device=total.device, dtype=total.dtype)
        return total.float()

    def model_scores(self, rollout: Rollout) -> torch.Tensor:
        """(B,) the reward model's score of each prompt + answer at its last real token."""
        import torch

        p = rollout.prompt_width
        body, score = _classifier(self.engine.reward.module)
        hidden = answer_outputs(body, "last_hidden_state", rollout.sequences, rollout.attention_mask, p)  # P-1 .. T-1
        last = rollout.attention_mask[:, p:].sum(-1)  # answers are contiguous: the last real token, 0 = the prompt's
        return score(hidden[torch.arange(hidden.shape[0]), last]).squeeze(-1).float()

    def _add_stat(self, label: str, values: list[float | None]) -> None:
        got = [v for v in values if v is not None]
        stat = self.term_stats.setdefault(label, [0.0, 0.0])
        stat[0] += sum(got)
        stat[1] += len(got)

    def term_labels(self) -> list[str]:
        """The reward terms in use, as logged: `model` (the reward model) and each function's label."""
        return (["model"] if self.rewards.model_weight > 0 else []) + [f.label for f in self.functions]

    def normalized(self, scores: torch.Tensor) -> torch.Tensor:
        """(B,) the summed rewards as the estimator takes them: under ppo.reward_normalization: running, z-scored by
        the moments of every reward so far, this batch's included (summed over ranks, so each rank normalises
        alike); under none, unchanged. Then clipped to [-reward_clip, reward_clip] (0: no clip)."""
        if self.config.reward_normalization == "running":
            from rlhf.trainer import all_reduce_sum

            total, total_sq, n = all_reduce_sum(
                [scores.sum().item(), scores.double().pow(2).sum().item(), float(scores.numel())], self.engine.dist
            )
            self.reward_moments.update(total, total_sq, n)
            scores = self.reward_moments.normalize(scores)
        clip = self.config.reward_clip
        return scores.clamp(-clip, clip) if clip > 0 else scores

    def advantages(self, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, values: torch.Tensor,
                   scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The estimator of ppo.algorithm -> (rewards, advantages, returns), each (B, R). scores: (B,) normalised.

        ppo: the KL-shaped reward (score at the last token, -kl_coef x KL per token) and GAE (Schulman et al. 2015),
        whitened over real tokens if configured; returns = advantages + values. grpo / rloo / reinforce_pp: the
        score's group baseline first, then the per-token KL, summed to go (REINFORCE++ whitens over the batch);
        returns = advantages (no critic learns them). Under kl_penalty: loss the reward has no KL term."""
        from rlhf.ppo_math import critic_free_advantages, gae_advantages, kl_shaped_rewards, masked_whiten

        cfg = self.config
        kl_coef = self.kl_ctl.value if cfg.kl_penalty == "reward" else 0.0
        if cfg.algorithm == "ppo":
            rewards, _ = kl_shaped_rewards(logprobs, ref_logprobs, scores, mask, kl_coef, 0.0)
            adv, ret = gae_advantages(values, rewards, mask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                adv = masked_whiten(adv, mask) * mask
            return rewards, adv, ret
        adv, rewards = critic_free_advantages(
            logprobs, ref_logprobs, scores, mask, cfg.algorithm, cfg.group_size, kl_coef, cfg.gamma, cfg.group_std
        )
        return rewards, adv, adv

    # ------------------------------------------------------------------------------------------ the phases

    def _logprobs(self, model: Any, sequences: Any, attention_mask: Any, prompt_len: int,
                  entropy: bool = False) -> Any:
        """(B, R) log-probabilities of the answer tokens under `model` at the rollout temperature, over the whole
        vocabulary: the one processing log pi_old, log pi and log pi_ref share (see PPOConfig.temperature). With
        `entropy`, also the (B, R) entropy of each position's distribution: (logprobs, entropy)."""
        from rlhf.ppo_math import entropy_from_logits, logprobs_from_logits

        module = getattr(model, "module", model)
        logits = answer_outputs(model, "logits", sequences, attention_mask, prompt_len, shares_cache(module))[:, :-1]
        logprobs = logprobs_from_logits(logits, sequences[:, prompt_len:], self.config.temperature)
        if entropy:
            return logprobs, entropy_from_logits(logits, self.config.temperature)
        return logprobs

    def generate(self, prompt_ids: Any, prompt_mask: Any) -> Rollout:
        """Rollout in the hybrid engine's generation mode."""
        import torch

        from rlhf.ppo_math import answer_mask, logprobs_from_logits

        cfg = self.config
        keep = cfg.rollout_logprobs == "generation"
        out = self.engine.actor.generate(
            prompt_ids,
            prompt_mask,
            do_sample=True,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_answer_tokens,
            pad_token_id=self.tok.pad_token_id,
            eos_token_id=self.tok.eos_token_id,
            return_dict_in_generate=keep,
            output_logits=keep,  # raw logits, before any processing: log pi_old is taken from them as _logprobs does
        )
        seq = out.sequences if keep else out
        answer = seq[:, prompt_ids.shape[1] :]
        # (B, R) log pi_old of the sampled tokens, or None: generate_experience then runs the actor once more
        logprobs = logprobs_from_logits(torch.stack(out.logits, dim=1), answer, cfg.temperature) if keep else None
        # Real answer tokens by position: everything up to and including the first eos (generate pads after it,
        # with a pad that may be the eos itself). The prompt's own mask stays as the collate built it.
        action_mask = answer_mask(answer, self.tok.eos_token_id)
        attention_mask = torch.cat([prompt_mask, action_mask.long()], dim=1)
        return Rollout(seq, attention_mask, action_mask, logprobs, prompt_ids.shape[1])

    def generate_experience(self, prompt_batch: dict[str, Any]) -> tuple[Experience, dict[str, float]]:
        """Phases 1-3 of an iteration: generate, score, advantages. prompt_batch: input_ids/attention_mask (N, P);
        the experience has B = N x answers per prompt rollouts (each prompt's answers in a row: a group). Returns
        the experience and {generate_s, score_s, advantages_s, tokens} (seconds per phase, answer tokens)."""
        import torch

        device = self.engine.actor.engine.device
        k = self.config.group_size  # each prompt k times in a row: the hybrid engine prefills it once
        prompt_ids = prompt_batch["input_ids"].to(device).repeat_interleave(k, dim=0)
        prompt_mask = prompt_batch["attention_mask"].to(device).repeat_interleave(k, dim=0)
        rows = [r for r in prompt_batch.get("rows") or [] for _ in range(k)] or None  # the data row of each rollout

        t0 = time.perf_counter()
        rollout = self.generate(prompt_ids, prompt_mask)
        t1 = time.perf_counter()
        seq, mask, action_mask, p = rollout.sequences, rollout.attention_mask, rollout.action_mask, rollout.prompt_width
        actor, critic = self.engine.actor.engine, self.engine.critic
        with torch.no_grad(), evaluating(actor, critic):
            logprobs = rollout.logprobs
            if logprobs is None:
                logprobs = self._logprobs(actor, seq, mask, p)
            ref_logprobs = self._logprobs(self.engine.ref, seq, mask, p)
            values = token_values(critic.module, seq, mask, p) if critic is not None else torch.zeros_like(logprobs)
            scores = self.reward_scores(rollout, rows)
            logprobs, ref_logprobs, values = logprobs * action_mask, ref_logprobs * action_mask, values * action_mask
            kl = (logprobs - ref_logprobs) * action_mask
            t2 = time.perf_counter()
            rewards, advantages, returns = self.advantages(logprobs, ref_logprobs, values, self.normalized(scores),
                                                           action_mask)
        t3 = time.perf_counter()
        info = {"generate_s": t1 - t0, "score_s": t2 - t1, "advantages_s": t3 - t2, "tokens": action_mask.sum().item()}
        exp = Experience(seq, mask, action_mask, logprobs, ref_logprobs, values, scores, rewards, advantages, returns, kl)
        return exp, info

    def train_rlhf(self, exp: Experience) -> tuple[float, float, dict[str, float]]:
        """Phase 4 on one micro-batch: one clipped policy step of the actor and (ppo) one of the critic.
        Returns (actor_loss, critic_loss (0 without a critic), stats)."""
        from rlhf.ppo_math import aggregate_loss, k3_kl, policy_loss, value_loss

        cfg = self.config
        p = exp.sequences.shape[1] - exp.action_mask.shape[1]
        actor, critic = self.engine.actor.engine, self.engine.critic
        agg, norm = cfg.loss_aggregation, cfg.max_answer_tokens
        with training(actor):
            out = self._logprobs(actor, exp.sequences, exp.attention_mask, p, entropy=cfg.entropy_coef > 0)
            logprobs, entropy = out if cfg.entropy_coef > 0 else (out, None)
            a_loss, stats = policy_loss(logprobs, exp.logprobs, exp.advantages, exp.action_mask, cfg.clip_low,
                                        cfg.clip_high, agg, norm)
            if cfg.kl_penalty == "loss":
                kl_loss = aggregate_loss(k3_kl(logprobs, exp.ref_logprobs), exp.action_mask, agg, norm)
                a_loss = a_loss + self.kl_ctl.value * kl_loss
                stats["kl_loss"] = kl_loss.item()
            if entropy is not None:
                mean_entropy = aggregate_loss(entropy, exp.action_mask, agg, norm)
                a_loss = a_loss - cfg.entropy_coef * mean_entropy
                stats["entropy"] = mean_entropy.item()
            self._step(actor, faults.poison(a_loss, self.iteration))
        if critic is None:
            return a_loss.item(), 0.0, stats
        with training(critic):
            values = token_values(critic.module, exp.sequences, exp.attention_mask, p)
            c_loss, c_stats = value_loss(values, exp.values, exp.returns, exp.action_mask, cfg.value_clip_range)
            self._step(critic, c_loss)
        return a_loss.item(), c_loss.item(), {**stats, **c_stats}

    def _step(self, engine: Any, loss: Any) -> None:
        """backward + step, unless the loss or the gradients are not finite on some rank: then the update is
        skipped (weights and optimizer state untouched) and counted; `guard` aborts after too many in a row."""
        from rlhf.trainer import all_finite, grads_finite

        if not self.guard.ok(all_finite(loss, self.engine.dist), self.iteration):
            return
        engine.backward(loss)
        if not self.guard.ok(grads_finite(engine), self.iteration):
            engine.zero_grad()
            return
        engine.step()

    def train_unsupervised(self, batch: dict[str, Any]) -> float:
        """The ptx step (InstructGPT's PPO-ptx): ptx_coef x language-model loss on demonstrations, its own step."""
        actor = self.engine.actor.engine
        with training(actor):
            batch = {k: v.to(actor.device) for k, v in batch.items()}
            loss = actor(**batch).loss
            self._step(actor, self.config.ptx_coef * loss)
        return loss.item()


# ---------------------------------------------------------------------------------------------- the stage


def _drop_stale(folder: Path) -> None:
    """Remove `folder` when an earlier run of this stage wrote it (its manifest says step ppo); leave anything else."""
    import shutil

    from rlhf.outputs import read_manifest

    if folder.is_dir() and read_manifest(folder).get("step") == "ppo":
        shutil.rmtree(folder)


def trainer_class(name: str | None) -> type[PPOTrainer]:
    """PPOTrainer, or the subclass `ppo.trainer` names ("module:Class", importable from the project folder or the
    environment); one UserError when it does not import or is not a PPOTrainer."""
    if name is None:
        return PPOTrainer
    from rlhf.rewards import import_object

    cls = import_object(name, "ppo.trainer")
    if not (isinstance(cls, type) and issubclass(cls, PPOTrainer)):
        raise UserError(f"ppo.trainer '{name}' is not a subclass of rlhf.PPOTrainer: subclass it, or set ppo.trainer: null")
    return cls


def mean_reward_score(trainer: PPOTrainer, loader: Any, dist: Dist) -> dict[str, float]:
    """Mean reward of the actor's sampled answers to held-out prompts (all ranks): `reward` (the sum of the terms)
    and each term's own mean (`model`, each function's label). A function that applies to none of the prompts
    (None for all) stops the run: it was written for other data."""
    from rlhf.trainer import all_reduce_sum

    import torch

    device = trainer.engine.actor.engine.device
    total = n = 0.0
    trainer.term_stats = {}
    for batch in loader:  # rollout and reward only: no reference, critic or advantages needed here
        rollout = trainer.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device))
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
            from rlhf.rewards import not_applicable

            raise not_applicable(function, int(n), "held-out answers")
        out[label] = term_sum / count if count else float("nan")  # nan: a subclass's reward_scores kept no stats
    return out


def run_ppo(
    params: Params,
    data_dir: Path,
    sft_path: Path,
    reward_path: Path | None,
    out_dir: Path,
    live_dir: Path | None,
    ckpt_dir: Path | None = None,
) -> dict[str, float]:
    """Train the actor (and, for ppo, the critic) with ppo.algorithm; write out_dir/{actor,critic,actor_ema} (no
    critic for the critic-free family); return the final metrics.
    reward_path is read only when rewards.model_weight > 0 (it may then be None)."""
    import sys

    import torch
    from tqdm.auto import tqdm

    from rlhf.checkpoint import Checkpointer, fingerprint, set_rng_state
    from rlhf.data import read_split
    from rlhf.engine import init_distributed, seed_everything
    from rlhf.outputs import hash_inputs, make_manifest
    from rlhf.rewards import load_functions
    from rlhf.sft import collate_sft, encode_sft_row, encode_text
    from rlhf.tokenizer import encode_prompt, load_tokenizer
    from rlhf.trainer import MetricsLogger, all_reduce_sum, check_ppo_splits, export_model, launch_world_size, make_loader

    ppo = params.ppo
    if params.rewards.model_weight == 0:
        reward_path = None  # the reward is the functions alone: no reward model is read
    elif reward_path is None:
        raise UserError("rewards.model_weight > 0 needs a reward model: pass --reward, or set rewards.model_weight: 0")
    from rlhf.reward import is_placeholder

    if reward_path is not None and is_placeholder(reward_path):
        raise UserError(
            f"'{reward_path}' is a placeholder (prepare found no preference pair, so no reward model was trained) but "
            "rewards.model_weight is > 0: set rewards.model_weight: 0 for a reward from rewards.functions alone, or "
            "add a prompt/chosen/rejected source"
        )
    for path, what in ((sft_path, "SFT actor"), (reward_path, "reward model")):
        if path is not None and not (Path(path) / "config.json").is_file():
            raise UserError(f"{what} folder '{path}' has no config.json: run the earlier stages (dvc repro) first")
    functions = load_functions(params.rewards.functions, "rewards.functions")  # import errors before any model
    trainer_cls = trainer_class(ppo.trainer)
    tok = load_tokenizer(sft_path)
    from transformers import AutoConfig

    # The gate runs before DeepSpeed starts, so a mismatch costs a second, not a process group.
    if reward_path is not None:
        reward_cfg = AutoConfig.from_pretrained(reward_path)
        check_compatible(tok, load_tokenizer(reward_path), AutoConfig.from_pretrained(sft_path), reward_cfg)
    train_rows = read_split(data_dir / "ppo_train.jsonl")
    eval_rows = read_split(data_dir / "ppo_eval.jsonl")[: ppo.eval_prompts]
    train_prompts = [(encode_prompt(tok, r["prompt"]), r) for r in train_rows]
    eval_prompts = [(encode_prompt(tok, r["prompt"]), r) for r in eval_rows]
    ptx_rows = []
    if ppo.ptx_coef > 0:  # data.ptx_source's text (prepare wrote ptx_train.jsonl), else the SFT demonstrations
        if (data_dir / "ptx_train.jsonl").is_file():
            ptx_rows = [encode_text(tok, r["text"], params.data.max_seq_tokens) for r in read_split(data_dir / "ptx_train.jsonl")]
        else:
            ptx_rows = [encode_sft_row(tok, r, False) for r in read_split(data_dir / "sft_train.jsonl")]
    check_ppo_splits(data_dir, len(train_prompts), len(eval_prompts), len(ptx_rows), ppo, launch_world_size())

    dist = init_distributed(params.engine)
    seed_everything(params.seed)
    engine = RLHFEngine(params, dist, sft_path, reward_path)
    trainer = trainer_cls(engine, ppo, params.rewards, functions)
    trained = {"actor": engine.actor.engine} | ({"critic": engine.critic} if engine.critic is not None else {})
    width = max(len(p) for p, _ in train_prompts + eval_prompts)
    collate = collate_prompt_rows(width, tok.pad_token_id)
    prompts = Cycle(make_loader(train_prompts, ppo.rollout_batch_size, collate, dist, params.seed, shuffle=True))
    eval_loader = make_loader(eval_prompts, ppo.rollout_batch_size, collate, dist, params.seed, shuffle=False)
    ptx = Cycle(make_loader(ptx_rows, ppo.micro_batch_size, collate_sft(tok.pad_token_id), dist, params.seed, True)) if ptx_rows else None

    manifest_params = {k: getattr(params, k).model_dump() for k in ("engine", "ppo", "rewards", "data")}
    inputs = hash_inputs(
        {"ppo_train": data_dir / "ppo_train.jsonl", "sft_model": sft_path}
        | ({"ptx_train": data_dir / "ptx_train.jsonl"} if (data_dir / "ptx_train.jsonl").is_file() else {})
        | ({"reward_model": reward_path} if reward_path is not None else {})
    )
    ckpt = Checkpointer(
        ckpt_dir, ppo.checkpoint_every, fingerprint("ppo", manifest_params, inputs, params.seed, dist.world_size), dist
    )
    resume = ckpt.latest()
    saved = ckpt.load(resume, trained) if resume is not None else None
    start, point, stopped = 1, {}, ""
    if saved is None:
        score_before = mean_reward_score(trainer, eval_loader, dist) if eval_prompts else {}
        logger = MetricsLogger(live_dir, dist)
    else:  # the data positions first, the RNG states last: the resumed run then draws what the straight one drew
        state = saved["state"]
        start, point, score_before = state["iteration"] + 1, state["point"], state["score_before"]
        prompts.load_state_dict(state["prompts"])
        if ptx is not None:
            ptx.load_state_dict(state["ptx"])
        trainer.kl_ctl.load_state_dict(state["kl_ctl"])
        trainer.reward_moments.load_state_dict(state["reward_moments"])
        trainer.guard.skipped = state["skipped"]
        if engine.ema is not None:
            engine.ema.load_state_dict(state["ema"])
        logger = MetricsLogger(live_dir, dist, state["log_rows"])
        set_rng_state(saved["rng"])
    bar = tqdm(total=ppo.iterations, initial=start - 1, desc="ppo", disable=not (dist.is_main and sys.stderr.isatty()), dynamic_ncols=True)
    t_start = time.perf_counter()
    for it in range(start, ppo.iterations + 1):
        trainer.iteration = it
        trainer.term_stats = {}
        # 1-3: generate, score, advantages (timed inside generate_experience)
        parts, timings, tokens = [], {"generate_s": 0.0, "score_s": 0.0, "advantages_s": 0.0}, 0.0
        for _ in range(ppo.generation_batches):
            part, info = trainer.generate_experience(next(prompts))
            parts.append(part)
            timings = {k: v + info[k] for k, v in timings.items()}
            tokens += info["tokens"]
        exp = Experience.cat(parts)
        # 4: update
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        steps = 0
        for _ in range(ppo.ppo_epochs):
            for i in range(0, exp.sequences.shape[0], ppo.micro_batch_size):
                a_loss, c_loss, stats = trainer.train_rlhf(exp.slice(i, i + ppo.micro_batch_size))
                losses = {"actor_loss": a_loss} | ({"critic_loss": c_loss} if engine.critic is not None else {})
                for k, v in {**losses, **stats}.items():
                    sums[k] = sums.get(k, 0.0) + v
                if ptx is not None:
                    sums["ptx_loss"] = sums.get("ptx_loss", 0.0) + trainer.train_unsupervised(next(ptx))
                steps += 1
        engine.update_ema()
        train_s = time.perf_counter() - t0
        # KL per sequence drives the adaptive controller (Ziegler et al. 2019)
        seq_kl = (exp.kl * exp.action_mask).sum(-1)
        reward_sum, kl_sum, len_sum, n, tok_sum, gen_s = all_reduce_sum(
            [exp.scores.sum().item(), seq_kl.sum().item(), exp.action_mask.sum().item(), exp.scores.numel(),
             float(tokens), timings["generate_s"]],
            dist,
        )
        mean_kl = kl_sum / n
        trainer.kl_ctl.update(mean_kl, int(n))
        labels = trainer.term_labels()
        flat = all_reduce_sum([x for label in labels for x in trainer.term_stats.get(label, [0.0, 0.0])], dist)
        point = {
            "reward": reward_sum / n,
            # each term's mean over the samples it applies to (NaN: a function that applied to none this iteration)
            **{f"term/{label}": flat[2 * i] / flat[2 * i + 1] if flat[2 * i + 1] else float("nan")
               for i, label in enumerate(labels)},
            "kl": mean_kl,
            "kl_coef": trainer.kl_ctl.value,
            **({"reward_mean": trainer.reward_moments.mean, "reward_std": trainer.reward_moments.std}
               if ppo.reward_normalization == "running" else {}),
            "response_length": len_sum / n,
            **{k: v / steps for k, v in sums.items()},
            "gen_tokens_per_s": tok_sum / max(gen_s / dist.world_size, 1e-9),
            "train_samples_per_s": n * ppo.ppo_epochs / max(train_s, 1e-9),
            **timings,
            "train_s": train_s,
        }
        if it % ppo.log_every == 0 or it == ppo.iterations:
            logger.log(it, {f"ppo/{k}": v for k, v in point.items()})
            if dist.is_main:
                print(
                    f"[ppo] iter {it}/{ppo.iterations} reward {point['reward']:.3f} kl {mean_kl:.3f} "
                    f"len {point['response_length']:.1f} | gen {timings['generate_s']:.2f}s "
                    f"({point['gen_tokens_per_s']:.0f} tok/s) score {timings['score_s']:.2f}s "
                    f"train {train_s:.2f}s ({point['train_samples_per_s']:.1f} samples/s)",
                    flush=True,
                )
        bar.update(1)
        if ppo.max_kl is not None and mean_kl > ppo.max_kl:
            stopped = (
                f"PPO stopped early at iteration {it}: mean KL to the reference {mean_kl:.3f} per answer exceeds "
                f"ppo.max_kl {ppo.max_kl}; the models of this iteration are written. Raise ppo.kl_coef or lower "
                "ppo.actor_learning_rate to stay closer to the SFT model"
            )
            if dist.is_main:
                print(f"[ppo] {stopped}", flush=True)
            break
        if ckpt.due(it, ppo.iterations):
            state = {
                "iteration": it,
                "point": point,
                "score_before": score_before,
                "prompts": prompts.state_dict(),
                "ptx": ptx.state_dict() if ptx is not None else None,
                "kl_ctl": trainer.kl_ctl.state_dict(),
                "reward_moments": trainer.reward_moments.state_dict(),
                "skipped": trainer.guard.skipped,
                "ema": engine.ema.state_dict() if engine.ema is not None else None,
                "log_rows": logger.rows(),
            }
            ckpt.save(it, trained, state)
        faults.kill_at(it)
    bar.close()
    score_after = mean_reward_score(trainer, eval_loader, dist) if eval_prompts else {}
    metrics = {
        # held-out prompts before and after: the summed reward, the reward model's score, each function's mean
        "reward_sft": score_before.get("reward", float("nan")),
        "reward_ppo": score_after.get("reward", float("nan")),
        **({"rm_score_sft": score_before.get("model", float("nan")),
            "rm_score_ppo": score_after.get("model", float("nan"))} if reward_path is not None else {}),
        **{f"{f.label}_{when}": got.get(f.label, float("nan"))
           for f in functions for when, got in (("sft", score_before), ("ppo", score_after))},
        "final_reward": point.get("reward", float("nan")),
        "final_kl": point.get("kl", float("nan")),
        "algorithm": ppo.algorithm,
        "iterations": trainer.iteration,
        "stopped_early": bool(stopped),
        "skipped_steps": trainer.guard.skipped,
        "train_seconds": time.perf_counter() - t_start,
    }
    from rlhf.watch import ppo_warnings

    metrics["warnings"] = ppo_warnings(  # reward hacking made visible (the stage prints them)
        metrics, [f.label for f in functions], point.get("kl", 0.0), point.get("response_length", 0.0),
        ppo.max_answer_tokens,
    )
    manifest = make_manifest(
        "ppo", manifest_params, inputs, seed=params.seed, world_size=dist.world_size, metrics=metrics
    )
    z_actor, z_critic = engine.engines["actor"].zero_stage, engine.engines["critic"].zero_stage
    export_model(engine.actor.module, engine.build_actor, tok, out_dir / "actor", manifest, z_actor, dist)
    if engine.critic is not None:
        critic_tok = load_tokenizer(reward_path if reward_path is not None else sft_path)
        export_model(engine.critic.module, engine.build_critic, critic_tok, out_dir / "critic", manifest, z_critic, dist)
    if engine.ema is not None:
        export_model(engine.ema, engine.build_actor, tok, out_dir / "actor_ema", manifest, 0, dist)
    if engine.critic is None and dist.is_main:
        _drop_stale(out_dir / "critic")  # an earlier ppo run's critic would pass for this run's
    if dist.is_main:
        logger.close(metrics)
    return metrics
