"""Step 3 as a recipe (`rlhf ppo`): named steps on the lifecycle every step shares (rlhf/training/lifecycle.py).

    inputs = check_inputs(...)        everything that can be wrong, before DeepSpeed starts
    dist = init_distributed(...)
    trainer, loaders = build(...)     the models (rlhf/rl/models.py), the trainer of ppo.algorithm, the prompt loaders
    run.start(...)                    resume from the newest checkpoint, or score the SFT actor first
    iterate(...)                      generate -> score -> advantages -> update, logged, checkpointed, early stops
    evaluate, export                  held-out reward after, the manifest, the actor (critic, EMA) folders

One iteration's phases live in the trainer (rlhf/rl/trainer.py); what the stage logs of it is `iteration_point`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf import faults
from rlhf.config import Params
from rlhf.data.batching import Cycle, collate_prompt_rows, collate_sft
from rlhf.errors import UserError
from rlhf.rl.filtering import dynamic_experience
from rlhf.rl.models import RLModels
from rlhf.rl.report import cache_hits, iteration_point, mean_reward_score, phase_flops, progress_line
from rlhf.rl.rewards import RewardFunction
from rlhf.rl.trainer import RLTrainer
from rlhf.rl.watch import flat_reward_message, max_kl_message
from rlhf.training.lifecycle import Lifecycle
from rlhf.training.runtime import Dist

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase



@dataclass
class Inputs:
    """What check_inputs read and checked: the tokenizer, the reward's parts, the encoded prompts."""

    tok: PreTrainedTokenizerBase
    reward_path: Path | None
    functions: list[RewardFunction]
    trainer_cls: type[RLTrainer]
    train_prompts: list[tuple[list[int], dict]]
    eval_prompts: list[tuple[list[int], dict]]
    ptx_rows: list[dict[str, list[int]]]


@dataclass
class Loaders:
    prompts: Cycle  # training prompts, without end (its position is checkpointed)
    eval: Any  # held-out prompts, scored before and after
    ptx: Cycle | None  # language-model batches when ppo.loss.ptx_coef > 0


def run_ppo(
    params: Params,
    data_dir: Path,
    sft_path: Path,
    reward_path: Path | None,
    out_dir: Path,
    live_dir: Path | None,
    ckpt_dir: Path | None = None,
    cache_dir: Path | None = None,
) -> dict[str, float]:
    """Train the actor (and, for ppo, the critic) with ppo.algorithm; write out_dir/{actor,critic,actor_ema} (no
    critic for the critic-free family); return the final metrics.
    reward_path is read only when rewards.model_weight > 0 (it may then be None)."""
    from rlhf.training.runtime import init_distributed, seed_everything

    inputs = check_inputs(params, data_dir, sft_path, reward_path, out_dir)
    dist = init_distributed(params.engine)
    if dist.is_main:  # what runs, with every algorithm default resolved (params.yaml's nulls)
        print(f"[ppo] {params.ppo.describe()}", flush=True)
    seed_everything(params.seed, params.engine.deterministic)
    trainer, loaders = build(params, dist, inputs, sft_path)
    if params.rewards.cache and cache_dir is not None and trainer.functions:
        from rlhf.rl.reward_cache import RewardCache

        trainer.grader.cache = RewardCache(cache_dir, trainer.functions, dist.rank)
    run = lifecycle(params, dist, data_dir, sft_path, inputs.reward_path, live_dir, ckpt_dir)
    loop = Iterations(trainer, loaders, run, params.seed)
    loop.start()
    loop.iterate()
    metrics = loop.finish(inputs.functions, inputs.reward_path is not None)
    export(trainer.models, run, metrics, out_dir, inputs.tok, inputs.reward_path or sft_path)
    run.close(metrics)
    return metrics


# ------------------------------------------------------------------------------------------------ check inputs


def check_inputs(params: Params, data_dir: Path, sft_path: Path, reward_path: Path | None, out_dir: Path) -> Inputs:
    """Every check that needs no process group: the model folders, the reward's parts, the user's code, the
    tokenizers, the splits' sizes and the disk room for the outputs; then the prompts, encoded."""
    from rlhf.models.tokenizer import load_tokenizer
    from rlhf.pipeline.guards import check_free_space, check_model_folder, folder_bytes
    from rlhf.rl.rewards import load_functions
    from rlhf.training.checks import check_ppo_splits, launch_world_size

    ppo = params.ppo
    reward_path = _reward_model(params, reward_path)
    check_model_folder(sft_path, "causal_lm", "--sft")
    if reward_path is not None:
        check_model_folder(reward_path, "classifier", "--reward")
    functions = load_functions(params.rewards.functions, "rewards.functions")  # import errors before any model
    trainer_cls = trainer_class(ppo.trainer)
    tok = load_tokenizer(sft_path)
    if reward_path is not None:  # before DeepSpeed starts, so a mismatch costs a second, not a process group
        from transformers import AutoConfig

        from rlhf.models.tokenizer import check_compatible

        reward_cfg = AutoConfig.from_pretrained(reward_path)
        check_compatible(tok, load_tokenizer(reward_path), AutoConfig.from_pretrained(sft_path), reward_cfg)
    train_prompts, eval_prompts, ptx_rows = _encode(params, data_dir, tok)
    check_ppo_splits(data_dir, len(train_prompts), len(eval_prompts), len(ptx_rows), ppo, launch_world_size())
    # room for the actor (and EMA, critic) before any training: not an ENOSPC after it
    needed = folder_bytes(sft_path) * (1 + (ppo.ema_beta > 0))
    needed += folder_bytes(reward_path or sft_path) if ppo.needs_critic else 0
    check_free_space(out_dir, needed, "the step-3 models")
    return Inputs(tok, reward_path, functions, trainer_cls, train_prompts, eval_prompts, ptx_rows)


def _reward_model(params: Params, reward_path: Path | None) -> Path | None:
    """The reward model to read: None when rewards.model_weight is 0; one UserError when it is missing or a
    placeholder."""
    from rlhf.pipeline.outputs import is_placeholder

    if params.rewards.model_weight == 0:
        return None  # the reward is the functions alone: no reward model is read
    if reward_path is None:
        raise UserError("rewards.model_weight > 0 needs a reward model: pass --reward, or set rewards.model_weight: 0")
    if is_placeholder(reward_path):
        raise UserError(
            f"'{reward_path}' is a placeholder (prepare found no preference pair, so no reward model was trained) but "
            "rewards.model_weight is > 0: set rewards.model_weight: 0 for a reward from rewards.functions alone, or "
            "add a prompt/chosen/rejected source"
        )
    return reward_path


def _encode(params: Params, data_dir: Path, tok: PreTrainedTokenizerBase) -> tuple[list, list, list]:
    """(train prompts, held-out prompts, ptx rows): each prompt as (ids, its data row), at most
    data.max_prompt_tokens (only data.truncate_prompts lets a longer prompt through prepare); ptx rows from
    data.ptx_source's text (prepare wrote ptx_train.jsonl), else the SFT demonstrations."""
    from rlhf.data.split import read_split
    from rlhf.models.tokenizer import encode_prompt, encode_sft_row, encode_text

    limit = params.data.max_prompt_tokens
    train_rows = read_split(data_dir / "ppo_train.jsonl")
    eval_rows = read_split(data_dir / "ppo_eval.jsonl")[: params.ppo.eval_prompts]
    train = [(encode_prompt(tok, r["prompt"], limit), r) for r in train_rows]
    held_out = [(encode_prompt(tok, r["prompt"], limit), r) for r in eval_rows]
    ptx: list[dict[str, list[int]]] = []
    if params.ppo.loss.ptx_coef > 0:
        if (data_dir / "ptx_train.jsonl").is_file():
            texts = read_split(data_dir / "ptx_train.jsonl")
            ptx = [encode_text(tok, r["text"], params.data.max_seq_tokens) for r in texts]
        else:
            ptx = [encode_sft_row(tok, r, False, limit) for r in read_split(data_dir / "sft_train.jsonl")]
    return train, held_out, ptx


def trainer_class(name: str | None) -> type[RLTrainer]:
    """RLTrainer, or the subclass `ppo.trainer` names ("module:Class", importable from the project folder or the
    environment); one UserError when it does not import or is not a RLTrainer."""
    if name is None:
        return RLTrainer
    import sys

    from rlhf.rl.rewards import import_object, untracked_source

    cls = import_object(name, "ppo.trainer")
    if not (isinstance(cls, type) and issubclass(cls, RLTrainer)):
        raise UserError(f"ppo.trainer '{name}' is not a subclass of rlhf.RLTrainer: subclass it, or set ppo.trainer: null")
    path = untracked_source(cls, Path.cwd())
    if path is not None:  # editing it would change results while `dvc repro` says the stage is up to date
        print(f"warning: ppo.trainer: {path} is in the project folder but no DVC dep of the ppo stage: move it under "
              f"rewards/ (ppo.trainer: rewards.{Path(path).stem}:{cls.__name__}) so that editing it reruns the stage",
              file=sys.stderr, flush=True)
    return cls


# ------------------------------------------------------------------------------------------------------- build


def build(params: Params, dist: Dist, inputs: Inputs, sft_path: Path) -> tuple[RLTrainer, Loaders]:
    """The models (actor behind the hybrid engine, reference, critic, reward model, EMA), the trainer of
    ppo.algorithm (or ppo.trainer) and the loaders of prompts, held-out prompts and ptx batches."""
    from rlhf.training.loaders import make_loader

    ppo = params.ppo
    models = RLModels(ppo, params.engine, dist, sft_path, inputs.reward_path)
    trainer = inputs.trainer_cls(models, ppo, params.rewards, inputs.functions)
    if trainer.episodes is not None:  # the environment writes the prompts: held to the same limit, checked now
        trainer.episodes.max_prompt_tokens = params.data.max_prompt_tokens
        trainer.episodes.check_prompts([row for _, row in inputs.train_prompts + inputs.eval_prompts])
    width = max(len(p) for p, _ in inputs.train_prompts + inputs.eval_prompts)
    collate = collate_prompt_rows(width, inputs.tok.pad_token_id)
    prompts = Cycle(make_loader(inputs.train_prompts, ppo.rollout_batch_size, collate, dist, params.seed, shuffle=True))
    held_out = make_loader(inputs.eval_prompts, ppo.rollout_batch_size, collate, dist, params.seed, shuffle=False)
    ptx = None
    if inputs.ptx_rows:
        lm = collate_sft(inputs.tok.pad_token_id)
        ptx = Cycle(make_loader(inputs.ptx_rows, ppo.micro_batch_size, lm, dist, params.seed, True))
    trainer.ptx = ptx
    return trainer, Loaders(prompts, held_out, ptx)


def lifecycle(params: Params, dist: Dist, data_dir: Path, sft_path: Path, reward_path: Path | None,
              live_dir: Path | None, ckpt_dir: Path | None) -> Lifecycle:
    """Step 3's checkpoints, curves and manifest: fingerprinted by the params it reads and its hashed inputs."""
    inputs = {"ppo_train": data_dir / "ppo_train.jsonl", "sft_model": sft_path}
    if (data_dir / "ptx_train.jsonl").is_file():
        inputs["ptx_train"] = data_dir / "ptx_train.jsonl"
    if reward_path is not None:
        inputs["reward_model"] = reward_path
    manifest_params = {k: getattr(params, k).model_dump() for k in ("engine", "ppo", "rewards", "data")}
    return Lifecycle("ppo", seed=params.seed, logging=params.logging, dist=dist, manifest_params=manifest_params,
                     manifest_inputs=inputs, ckpt_dir=ckpt_dir, checkpoint_every=params.ppo.checkpoint_every,
                     live_dir=live_dir)


# ----------------------------------------------------------------------------------------------------- iterate


class Iterations:
    """The loop over ppo.iterations and what it carries from one iteration to the next (checkpointed with the
    trainer's own state): the data position, the last logged point, the held-out reward before training and the
    run of iterations without reward variance."""

    def __init__(self, trainer: RLTrainer, loaders: Loaders, run: Lifecycle, seed: int):
        self.trainer, self.loaders, self.run, self.seed = trainer, loaders, run, seed
        self.ppo, self.dist = trainer.config, trainer.models.dist
        self.first, self.point, self.score_before, self.flat = 1, {}, {}, 0
        self.stopped = ""
        self.seconds = 0.0

    def trained(self) -> dict[str, Any]:
        models = self.trainer.models
        return {"actor": models.actor.engine} | ({"critic": models.critic} if models.critic is not None else {})

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.trainer.iteration, "point": self.point, "score_before": self.score_before,
                "prompts": self.loaders.prompts.state_dict(), "flat": self.flat, "trainer": self.trainer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.first, self.point, self.score_before = state["iteration"] + 1, state["point"], state["score_before"]
        self.flat = state.get("flat", 0)
        self.loaders.prompts.load_state_dict(state["prompts"])
        self.trainer.load_state_dict(state["trainer"])

    def start(self) -> None:
        """Resume from the newest checkpoint (the data positions first, the RNG states last: the resumed run then
        draws what the straight one drew), or score the SFT actor on the held-out prompts."""
        from rlhf.training.checkpoint import set_rng_state

        saved = self.run.start(self.trained())
        if saved is None:
            self.score_before = self._held_out_reward()
            return
        self.load_state_dict(saved["state"])
        set_rng_state(saved["rng"])

    def iterate(self) -> None:
        import sys

        from tqdm.auto import tqdm

        ppo = self.ppo
        quiet = not (self.dist.is_main and sys.stderr.isatty())
        bar = tqdm(total=ppo.iterations, initial=self.first - 1, desc="ppo", disable=quiet, dynamic_ncols=True)
        t_start = time.perf_counter()
        for it in range(self.first, ppo.iterations + 1):
            self.point = self.one(it)
            bar.update(1)
            if ppo.kl.stop_above is not None and self.point["kl"] > ppo.kl.stop_above:
                self.stopped = max_kl_message(it, self.point["kl"], ppo)
                if self.dist.is_main:
                    print(f"[ppo] {self.stopped}", flush=True)
                break
            self.run.save_if_due(it, ppo.iterations, self.trained(), self.state_dict)
            faults.kill_at(it)
        bar.close()
        self.seconds = time.perf_counter() - t_start

    def one(self, it: int) -> dict[str, float]:
        """Iteration `it`: experience over ppo.generation_batches batches of prompts, the flat-reward stop, the
        update (one optimizer step per mini batch, rows in an order drawn from the seed and the iteration), the
        EMA and the KL controller; returns the logged point."""
        trainer, ppo = self.trainer, self.ppo
        trainer.iteration = it
        trainer.term_stats, trainer.episode_stats = {}, {}

        def draw() -> list[dict[str, Any]]:
            return [next(self.loaders.prompts) for _ in range(ppo.generation_batches)]

        if ppo.dynamic_sampling.enabled:  # DAPO: groups that all scored alike dropped, more prompts drawn
            exp, timings = dynamic_experience(trainer, draw, ppo.dynamic_sampling)
        else:
            exp, timings = trainer.make_experience(draw())
        self.flat = 0 if trainer.informative(exp.scores) else self.flat + 1
        if ppo.max_flat_iterations and self.flat >= ppo.max_flat_iterations:
            raise UserError(flat_reward_message(it, self.flat, exp.scores, ppo))
        flops = phase_flops(trainer.models, exp, ppo)
        t0 = time.perf_counter()
        sums = trainer.update(exp, self.seed * 100_003 + it * ppo.ppo_epochs)
        trainer.models.update_ema()
        timings["train_s"] = time.perf_counter() - t0
        point = iteration_point(trainer, exp, sums, timings, flops, self.dist)
        if it % ppo.log_every == 0 or it == ppo.iterations:
            self.run.logger.log(it, {f"ppo/{k}": v for k, v in point.items()})
            if self.dist.is_main:
                print(progress_line(it, ppo.iterations, point, flops), flush=True)
        return point

    def finish(self, functions: list[RewardFunction], has_reward_model: bool) -> dict[str, Any]:
        """The stage's metrics: the held-out reward before and after (summed, the reward model's, each function's),
        the last point, how the run ended, and the over-optimisation warnings (the stage prints them)."""
        from rlhf.rl.watch import ppo_warnings

        before, after = self.score_before, self._held_out_reward()
        nan = float("nan")
        metrics: dict[str, Any] = {"reward_sft": before.get("reward", nan), "reward_ppo": after.get("reward", nan)}
        if has_reward_model:
            metrics |= {"rm_score_sft": before.get("model", nan), "rm_score_ppo": after.get("model", nan)}
        episodes = ["env", "turns", "tool_calls", "tool_valid"] if self.trainer.episodes is not None else []
        for label in [f.label for f in functions] + episodes:
            metrics |= {f"{label}_sft": before.get(label, nan), f"{label}_ppo": after.get(label, nan)}
        cache = self.trainer.grader.cache
        if cache is not None:
            cache_hits(self.trainer, self.dist)  # the held-out scoring's lookups too
            metrics["reward_cache_hit_rate"] = cache.run_hits / cache.run_lookups if cache.run_lookups else nan
        metrics |= {
            "final_reward": self.point.get("reward", nan),
            "final_kl": self.point.get("kl", nan),
            "algorithm": self.ppo.algorithm,
            "iterations": self.trainer.iteration,
            "stopped_early": bool(self.stopped),
            "skipped_steps": self.trainer.guard.skipped,
            "train_seconds": self.seconds,
        }
        metrics["warnings"] = ppo_warnings(metrics, [f.label for f in functions], self.point.get("kl", 0.0),
                                           self.point.get("response_length", 0.0), self.ppo.sampling.max_answer_tokens)
        return metrics

    def _held_out_reward(self) -> dict[str, float]:
        if not self.loaders.eval:
            return {}
        return mean_reward_score(self.trainer, self.loaders.eval, self.dist)


# ------------------------------------------------------------------------------------------------------ export


def export(models: RLModels, run: Lifecycle, metrics: dict[str, Any], out_dir: Path, tok: PreTrainedTokenizerBase,
           critic_tokenizer_path: Path) -> None:
    """out_dir/actor, out_dir/critic (ppo) and out_dir/actor_ema (ppo.ema_beta > 0), each with the manifest; an
    earlier run's critic is removed when this run has none (it would pass for this run's)."""
    from rlhf.models.tokenizer import load_tokenizer
    from rlhf.training.lifecycle import export_model

    manifest = run.manifest(metrics)
    dist = models.dist
    export_model(models.actor.module, models.build_actor, tok, out_dir / "actor", manifest,
                 models.engine_configs["actor"].zero_stage, dist)
    if models.critic is not None:
        export_model(models.critic.module, models.build_critic, load_tokenizer(critic_tokenizer_path),
                     out_dir / "critic", manifest, models.engine_configs["critic"].zero_stage, dist)
    if models.ema is not None:
        export_model(models.ema, models.build_actor, tok, out_dir / "actor_ema", manifest, 0, dist)
    if models.critic is None and dist.is_main:
        _drop_stale(out_dir / "critic")


def _drop_stale(folder: Path) -> None:
    """Remove `folder` when an earlier run of this stage wrote it (its manifest says step ppo); leave anything else."""
    import shutil

    from rlhf.pipeline.outputs import read_manifest

    if folder.is_dir() and read_manifest(folder).get("step") == "ppo":
        shutil.rmtree(folder)
