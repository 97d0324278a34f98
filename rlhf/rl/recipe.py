"""The step-3 stage loop (`rlhf ppo`): read the prompts, build the engine and the trainer of `ppo.algorithm` (or the
user's `ppo.trainer`), iterate generate -> score -> advantages -> update with checkpoints, resume and the early
stops, and export the actor (critic, EMA) with its manifest and curves."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rlhf import faults
from rlhf.config import Params
from rlhf.data.batching import Cycle, collate_prompt_rows, collate_sft
from rlhf.errors import UserError
from rlhf.rl.models import RLHFEngine
from rlhf.rl.trainer import Experience, PPOTrainer
from rlhf.training.runtime import Dist


def _drop_stale(folder: Path) -> None:
    """Remove `folder` when an earlier run of this stage wrote it (its manifest says step ppo); leave anything else."""
    import shutil

    from rlhf.pipeline.outputs import read_manifest

    if folder.is_dir() and read_manifest(folder).get("step") == "ppo":
        shutil.rmtree(folder)


def trainer_class(name: str | None) -> type[PPOTrainer]:
    """PPOTrainer, or the subclass `ppo.trainer` names ("module:Class", importable from the project folder or the
    environment); one UserError when it does not import or is not a PPOTrainer."""
    if name is None:
        return PPOTrainer
    import sys

    from rlhf.rl.rewards import import_object, untracked_source

    cls = import_object(name, "ppo.trainer")
    if not (isinstance(cls, type) and issubclass(cls, PPOTrainer)):
        raise UserError(f"ppo.trainer '{name}' is not a subclass of rlhf.PPOTrainer: subclass it, or set ppo.trainer: null")
    path = untracked_source(cls, Path.cwd())
    if path is not None:  # editing it would change results while `dvc repro` says the stage is up to date
        print(f"warning: ppo.trainer: {path} is in the project folder but no DVC dep of the ppo stage: move it under "
              f"rewards/ (ppo.trainer: rewards.{Path(path).stem}:{cls.__name__}) so that editing it reruns the stage",
              file=sys.stderr, flush=True)
    return cls


def mean_reward_score(trainer: PPOTrainer, loader: Any, dist: Dist) -> dict[str, float]:
    """Mean reward of the actor's sampled answers to held-out prompts (all ranks): `reward` (the sum of the terms)
    and each term's own mean (`model`, each function's label). A function that applies to none of the prompts
    (None for all) stops the run: it was written for other data."""
    import torch

    from rlhf.training.loop import all_reduce_sum

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
            from rlhf.rl.rewards import not_applicable

            raise not_applicable(function, int(n), "held-out answers")
        out[label] = term_sum / count if count else float("nan")  # nan: a subclass's reward_scores kept no stats
    return out


def phase_flops(engine: RLHFEngine, exp: Experience, ppo: Any) -> dict[str, float]:
    """Useful FLOPs of this rank's iteration by phase (rlhf/training/flops.py): generation = one actor forward over prompt
    and answer; scoring = the reference, reward model and critic forwards (and the actor's when log pi_old is
    recomputed); training = ppo_epochs x (actor + critic) forward and backward. Each prompt counts once per group of
    answers, as the shared prefix computes it once."""
    from rlhf.training.flops import forward_flops

    p = exp.sequences.shape[1] - exp.action_mask.shape[1]
    prompts = exp.attention_mask[:, :p].sum(-1).tolist()
    answers = exp.action_mask.sum(-1).long().tolist()
    k = ppo.group_size
    lengths = [int(x) for x in answers] + [int(x) for x in prompts[::k]]
    actor = engine.actor.module
    fwd = {name: forward_flops(m, lengths) if m is not None else 0.0 for name, m in (
        ("actor", actor), ("ref", getattr(engine.ref, "module", engine.ref)),
        ("reward", getattr(engine.reward, "module", None)), ("critic", getattr(engine.critic, "module", None)))}
    recompute = fwd["actor"] if ppo.recomputes_logprobs(engine.engines["actor"].dtype) else 0.0
    return {
        "generate": fwd["actor"],
        "score": fwd["ref"] + fwd["reward"] + fwd["critic"] + recompute,
        "train": ppo.ppo_epochs * 3 * (fwd["actor"] + fwd["critic"]),
    }


def flat_reward_message(it: int, flat: int, scores: Any, ppo: Any) -> str:
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

    from tqdm.auto import tqdm

    from rlhf.data.split import read_split
    from rlhf.models.tokenizer import check_compatible, encode_prompt, encode_sft_row, encode_text, load_tokenizer
    from rlhf.pipeline.outputs import hash_inputs, make_manifest
    from rlhf.rl.rewards import load_functions
    from rlhf.training.checkpoint import Checkpointer, fingerprint, set_rng_state
    from rlhf.training.checks import check_ppo_splits, launch_world_size
    from rlhf.training.lifecycle import export_model
    from rlhf.training.loaders import make_loader
    from rlhf.training.loop import all_reduce_sum, flop_rate
    from rlhf.training.metrics import MetricsLogger
    from rlhf.training.runtime import init_distributed, seed_everything

    ppo = params.ppo
    if params.rewards.model_weight == 0:
        reward_path = None  # the reward is the functions alone: no reward model is read
    elif reward_path is None:
        raise UserError("rewards.model_weight > 0 needs a reward model: pass --reward, or set rewards.model_weight: 0")
    from rlhf.pipeline.guards import check_free_space, check_model_folder, folder_bytes
    from rlhf.pipeline.outputs import is_placeholder

    if reward_path is not None and is_placeholder(reward_path):
        raise UserError(
            f"'{reward_path}' is a placeholder (prepare found no preference pair, so no reward model was trained) but "
            "rewards.model_weight is > 0: set rewards.model_weight: 0 for a reward from rewards.functions alone, or "
            "add a prompt/chosen/rejected source"
        )
    check_model_folder(sft_path, "causal_lm", "--sft")
    if reward_path is not None:
        check_model_folder(reward_path, "classifier", "--reward")
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
    limit = params.data.max_prompt_tokens  # only data.truncate_prompts lets a longer prompt through prepare
    train_prompts = [(encode_prompt(tok, r["prompt"], limit), r) for r in train_rows]
    eval_prompts = [(encode_prompt(tok, r["prompt"], limit), r) for r in eval_rows]
    ptx_rows = []
    if ppo.ptx_coef > 0:  # data.ptx_source's text (prepare wrote ptx_train.jsonl), else the SFT demonstrations
        if (data_dir / "ptx_train.jsonl").is_file():
            ptx_rows = [encode_text(tok, r["text"], params.data.max_seq_tokens) for r in read_split(data_dir / "ptx_train.jsonl")]
        else:
            ptx_rows = [encode_sft_row(tok, r, False, limit) for r in read_split(data_dir / "sft_train.jsonl")]
    check_ppo_splits(data_dir, len(train_prompts), len(eval_prompts), len(ptx_rows), ppo, launch_world_size())

    # room for the actor (and EMA, critic) before any training: not an ENOSPC after it
    needed = folder_bytes(sft_path) * (1 + (ppo.ema_beta > 0)) + (folder_bytes(reward_path or sft_path) if ppo.needs_critic else 0)
    check_free_space(out_dir, needed, "the step-3 models")
    dist = init_distributed(params.engine)
    if dist.is_main:  # what runs, with every algorithm default resolved (params.yaml's nulls)
        print(f"[ppo] {ppo.describe()}", flush=True)
    seed_everything(params.seed)
    engine = RLHFEngine(params, dist, sft_path, reward_path)
    trainer = trainer_cls(engine, ppo, params.rewards, functions)
    trained = {"actor": engine.actor.engine} | ({"critic": engine.critic} if engine.critic is not None else {})
    width = max(len(p) for p, _ in train_prompts + eval_prompts)
    collate = collate_prompt_rows(width, tok.pad_token_id)
    prompts = Cycle(make_loader(train_prompts, ppo.rollout_batch_size, collate, dist, params.seed, shuffle=True))
    eval_loader = make_loader(eval_prompts, ppo.rollout_batch_size, collate, dist, params.seed, shuffle=False)
    ptx = Cycle(make_loader(ptx_rows, ppo.micro_batch_size, collate_sft(tok.pad_token_id), dist, params.seed, True)) if ptx_rows else None
    trainer.ptx = ptx

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
    start, point, stopped, resumed_flat = 1, {}, "", 0
    if saved is None:
        score_before = mean_reward_score(trainer, eval_loader, dist) if eval_prompts else {}
        logger = MetricsLogger(live_dir, dist, None, params.logging, "ppo")
    else:  # the data positions first, the RNG states last: the resumed run then draws what the straight one drew
        state = saved["state"]
        start, point, score_before = state["iteration"] + 1, state["point"], state["score_before"]
        prompts.load_state_dict(state["prompts"])
        if ptx is not None:
            ptx.load_state_dict(state["ptx"])
        trainer.kl_ctl.load_state_dict(state["kl_ctl"])
        trainer.reward_moments.load_state_dict(state["reward_moments"])
        trainer.guard.skipped = state["skipped"]
        resumed_flat = state.get("flat", 0)
        if engine.ema is not None:
            engine.ema.load_state_dict(state["ema"])
        logger = MetricsLogger(live_dir, dist, state["log_rows"], params.logging, "ppo")
        set_rng_state(saved["rng"])
    bar = tqdm(total=ppo.iterations, initial=start - 1, desc="ppo", disable=not (dist.is_main and sys.stderr.isatty()), dynamic_ncols=True)
    t_start = time.perf_counter()
    flat_run = resumed_flat  # iterations in a row whose rewards had no variance (nothing to learn from)
    for it in range(start, ppo.iterations + 1):
        trainer.iteration = it
        trainer.term_stats = {}
        # 1-3: generate, score, advantages (timed inside make_experience), over all generation batches at once
        exp, timings = trainer.make_experience([next(prompts) for _ in range(ppo.generation_batches)])
        tokens = timings.pop("tokens")
        flat_run = 0 if trainer.informative(exp.scores) else flat_run + 1
        if ppo.max_flat_iterations and flat_run >= ppo.max_flat_iterations:
            raise UserError(flat_reward_message(it, flat_run, exp.scores, ppo))
        flops = phase_flops(engine, exp, ppo)
        # 4: update, one optimizer step per mini batch, in an order drawn from the seed and the iteration
        t0 = time.perf_counter()
        sums = trainer.update(exp, params.seed * 100_003 + it * ppo.ppo_epochs)
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
            **sums,
            "actor_lr": engine.actor.engine.get_lr()[0],
            "gen_tokens_per_s": tok_sum / max(gen_s / dist.world_size, 1e-9),
            "train_samples_per_s": n * ppo.ppo_epochs / max(train_s, 1e-9),
            # achieved TFLOP/s of each phase on this rank (rlhf/training/flops.py; the prompt counted once per group)
            "gen_tflops": flops["generate"] / max(timings["generate_s"], 1e-9) / 1e12,
            "score_tflops": flops["score"] / max(timings["score_s"], 1e-9) / 1e12,
            "train_tflops": flops["train"] / max(train_s, 1e-9) / 1e12,
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
                    f"train {train_s:.2f}s ({point['train_samples_per_s']:.1f} samples/s, "
                    f"{flop_rate(flops['train'] / max(train_s, 1e-9))})",
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
                "flat": flat_run,
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
    from rlhf.rl.watch import ppo_warnings

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
