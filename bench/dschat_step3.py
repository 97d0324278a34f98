"""Seconds per step-3 iteration: DeepSpeed-Chat's own step 3 (its training/step3_rlhf_finetuning/main.py) vs ours,
side by side in one run, on CPU.

    git --git-dir=<DeepSpeedExamples mirror> archive HEAD applications/DeepSpeed-Chat | tar -x -C /tmp/dschat
    PYTHONPATH=. python bench/dschat_step3.py --dschat /tmp/dschat/applications/DeepSpeed-Chat   # JSON line last

DeepSpeed-Chat's code is not part of this repository: `--dschat` is the `applications/DeepSpeed-Chat` folder of
deepspeedai/DeepSpeedExamples (formerly microsoft/DeepSpeedExamples).

The work, identical on both sides:
- the same random-init Llama actor and reward model (bench/rl_iteration.py's `setup`: actor size 'tiny' ~5M or
  '50m' ~48M parameters, params.yaml's reward model), loaded by ours from HF folders and by DeepSpeed-Chat from the
  same actor folder and a critic folder converted from the same reward-model weights (base `model.*` ->
  `rwtransformer.*`, `score.weight` -> `v_head.weight`, the state dict of DS-Chat's RewardModel that its
  create_critic_model(rlhf_training=True) loads from `pytorch_model.bin`); both build the critic from the reward
  model, as DS-Chat does;
- the same prompts, tokenised by our tokenizer and left-padded to the same width (the longest prompt of the run:
  ours via collate_prompts, DS-Chat via its own DataCollatorRLHF with --max_prompt_seq_len = that width);
- `--prompts` prompts x 1 answer per iteration, every answer exactly `--new-tokens` tokens (min_new_tokens on both);
- generation_batches 1, ppo_epochs 1, training micro batch = the whole rollout (one actor and one critic optimizer
  step per iteration), no EMA actor, no LoRA, no hybrid engine, no gradient checkpointing, fp32;
- actor, ref, critic and reward model at the same ZeRO stage (`--zero`; DS-Chat: --actor_zero_stage and
  --critic_zero_stage; its ref follows the actor and its reward model the critic at ZeRO-3, else stage 0, as ours);
- one process, `--threads` torch threads.
DS-Chat runs no hybrid engine on CPU (DeepSpeed's inference kernels are CUDA's), so at ZeRO-3 its HF `generate`
fetches the partitioned layers for every token; ours gathers the actor once per rollout.

What each side runs:
- ours: bench/rl_iteration.py's `run_ours`, our iteration exactly as `run_ppo` iterates (generate_experience,
  train_rlhf per micro batch, update_ema), with engine.zero_stage = `--zero` and ppo.ema_beta 0;
- DS-Chat: its step-3 `main()` itself, run in-process by this script as the `deepspeed` launcher would run it with
  one process (--local_rank 0, RANK/WORLD_SIZE/MASTER_* set), with args --per_device_generation_batch_size P
  --per_device_training_batch_size P --generation_batches 1 --ppo_epochs 1 --max_prompt_seq_len W
  --max_answer_seq_len N --actor_zero_stage Z --critic_zero_stage Z --seed <params seed>, everything else its
  defaults (no --enable_hybrid_engine, --enable_ema, --offload, LoRA). Its loop, data loader (RandomSampler),
  optimizer (DeepSpeed's FusedAdam, whose CPU build `setup` compiles once), LR schedule, logging and
  print_throughput_step3 run unchanged. An iteration is timed from the start of `trainer.generate_experience` to
  the end of `trainer.get_overflow`, the last call of its loop body; the first iteration of each side warms up.

DS-Chat run-time patches (nothing is written into its folder; each is applied by `run_dschat` below):
1. `transformers.modeling_utils.no_init_weights` moved to `transformers.initialization` in transformers 5: the old
   name is re-exported so dschat/utils/model/model_utils.py imports.
2. fp32: main.py's --dtype accepts only fp16/bf16 and its ds_utils configs leave `data_type` unset otherwise.
   The launcher passes `--dtype bf16` and sets args.dtype = "fp32" after parse_args; get_train_ds_config and
   get_eval_ds_config (as imported by dschat.rlhf.rlhf_engine) are wrapped to build the bf16 config and drop its
   `bfloat16` block for fp32 (DeepSpeed's fp32 engine); DeepSpeedPPOTrainer.get_overflow returns (False, False)
   for fp32 as it already does for bf16 (there is no loss scaler to overflow).
3. Data: main.py's create_prompt_dataset (Dahoas/rm-static from the hub, unreachable here) is replaced by one that
   returns DS-Chat's own PromptDataset (phase 3: flipped ids and mask, pad id) over our prompts; create_datasets,
   DataCollatorRLHF and the DataLoader are DS-Chat's.
4. Fixed answer length: DS-Chat's _generate_sequence calls generate with max_length = prompt + max_answer_seq_len
   only, so answers that hit eos (= its pad token) would end early. The actor's `generate` gets
   min_new_tokens = max_answer_seq_len (the same wrapper run_ours puts on ours); the side asserts that no answer
   was dropped or shortened.
5. Timing: DeepSpeedPPOTrainer.generate_experience, train_rlhf and get_overflow are wrapped with perf_counter.
No CUDA call needed patching: DS-Chat goes through get_accelerator(), which DS_ACCELERATOR=cpu makes DeepSpeed's
CPU accelerator (gloo process group, set_device a no-op).

Not identical between the sides (DS-Chat's own choices, left as they are):
- DS-Chat decodes greedily for Llama actors (do_sample=False, its workaround for a Llama-2 NaN); ours samples at
  ppo.sampling.temperature 1.0;
- DS-Chat's optimizer is DeepSpeed's FusedAdam (its CPU C++ build), ours torch's AdamW;
- DS-Chat's generate runs with synced_gpus=True at actor ZeRO-3 (an all-reduce per token), and its actor and ref
  forward passes over the rollout run with the config's use_cache (a KV cache built and discarded);
- DS-Chat uses eos as its pad token (its load_hf_tokenizer), ours a separate <pad>: same prompt ids and widths;
- DS-Chat's create_hf_model resizes every model's vocabulary to a multiple of 8 (the shipped tokenizer's 324 ->
  328 rows: its actor's LM head is ~1% wider). Its critic checkpoint must already have that size (its step 2
  saves it after the same resize), so the converted critic's embedding gets the extra rows (the mean row; no
  prompt or answer uses those ids); setup checks every converted weight's name and shape, since DS-Chat's loader
  silently skips mismatches;
- PPO constants differ (DS-Chat: kl_ctl 0.1, no reward normalisation; ours: params.yaml), which changes no work.
The figure per side is the median iteration over all its rounds (sides alternate for `--rounds` rounds, each in its
own subprocess: DeepSpeed process groups are per process); `speedup` = DS-Chat s/iter / ours s/iter.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import rl_iteration as rl  # noqa: E402  (setup, run_ours, the prompts)

STEP3_MAIN = "training/step3_rlhf_finetuning/main.py"


def _prompt_ids(work: Path, size: str, n: int) -> list[list[int]]:
    """The run's prompts as run_ours encodes them."""
    from rlhf.models.tokenizer import encode_prompt, load_tokenizer

    tok = load_tokenizer(work / size / "sft")
    return [encode_prompt(tok, p) for p in rl._prompts(work, n)]


def write_dschat_critic(reward_dir: Path, out: Path, vocab_size: int) -> None:
    """DS-Chat's critic folder from our reward model: its config and a RewardModel state dict (pytorch_model.bin);
    `vocab_size` = len(tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModel

    from rlhf.models.build import load_reward_model

    state = load_reward_model(reward_dir).state_dict()
    vocab = 8 * math.ceil(vocab_size / 8)  # DS-Chat's create_hf_model resizes every model to this before loading
    converted = {}
    for key, value in state.items():
        if key == "model.embed_tokens.weight" and value.shape[0] < vocab:  # as its step 2 would have saved it
            value = torch.cat([value, value.mean(0, keepdim=True).expand(vocab - value.shape[0], -1)])
        if key.startswith("model."):
            converted["rwtransformer." + key.removeprefix("model.")] = value
        elif key == "score.weight":
            converted["v_head.weight"] = value  # [1, hidden]: Linear(hidden, 1, bias=False) on both
        else:
            raise ValueError(f"unexpected reward-model weight {key}")
    # DS-Chat's loader ignores missing, unexpected and mis-shaped weights: check them against its RewardModel's
    base = AutoModel.from_config(AutoConfig.from_pretrained(reward_dir))
    base.resize_token_embeddings(vocab)
    want = {"rwtransformer." + k: v.shape for k, v in base.state_dict().items()}
    want["v_head.weight"] = state["score.weight"].shape
    if {k: v.shape for k, v in converted.items()} != want:
        raise ValueError(f"critic weights differ from DS-Chat's RewardModel: {sorted(set(converted) ^ set(want))[:5]}")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(reward_dir / "config.json", out / "config.json")
    torch.save(converted, out / "pytorch_model.bin")


def setup(work: Path, size: str, args: argparse.Namespace) -> dict:
    """rl_iteration's models, prompts and matmul peak; DS-Chat's critic folder; its FusedAdam built once."""
    from rlhf.models.tokenizer import load_tokenizer

    out = rl.setup(work, size, args)
    write_dschat_critic(work / size / "reward", work / size / "dschat_critic", len(load_tokenizer(work / size / "sft")))
    from deepspeed.ops.op_builder import FusedAdamBuilder

    FusedAdamBuilder().load()  # a JIT C++ build the first time (minutes), then a cached load
    prompts = _prompt_ids(work, size, args.prompts * (args.iters + 1))
    return {**out, "prompt_width": max(len(p) for p in prompts)}


def run_ours(work: Path, size: str, args: argparse.Namespace) -> dict:
    """rl_iteration.run_ours at ZeRO stage `args.zero` with no EMA actor."""
    extra = {"engine.zero_stage": args.zero, "ppo.ema_beta": 0.0}
    return {**rl.run_ours(work, size, args, extra=extra), "zero": args.zero, "ema_beta": 0.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_dschat(work: Path, size: str, args: argparse.Namespace) -> dict:
    """DeepSpeed-Chat's step-3 main() in this process, patched at run time only as the module docstring lists."""
    import torch

    dschat = Path(args.dschat).resolve()
    prompts = _prompt_ids(work, size, args.prompts * (args.iters + 1))
    width = max(len(p) for p in prompts)
    port = str(_free_port())
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=port)  # what the `deepspeed` launcher sets for one process
    sys.path.insert(0, str(dschat))  # the `dschat` package

    import transformers.initialization
    import transformers.modeling_utils

    if not hasattr(transformers.modeling_utils, "no_init_weights"):  # patch 1
        transformers.modeling_utils.no_init_weights = transformers.initialization.no_init_weights
    spec = importlib.util.spec_from_file_location("dschat_step3_main", dschat / STEP3_MAIN)
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    import dschat.rlhf.rlhf_engine as rlhf_engine
    from dschat.rlhf.ppo_trainer import DeepSpeedPPOTrainer
    from dschat.utils.data.data_utils import PromptDataset

    # patch 2: fp32
    parse_args = main.parse_args

    def parse_args_fp32():
        parsed = parse_args()
        parsed.dtype = "fp32"
        return parsed

    def fp32_config(make):
        def config(offload, dtype, *a, **kw):
            if dtype != "fp32":
                return make(offload, dtype, *a, **kw)
            cfg = make(offload, "bf16", *a, **kw)
            del cfg["bfloat16"]
            return cfg

        return config

    main.parse_args = parse_args_fp32
    rlhf_engine.get_train_ds_config = fp32_config(rlhf_engine.get_train_ds_config)
    rlhf_engine.get_eval_ds_config = fp32_config(rlhf_engine.get_eval_ds_config)

    # patch 3: our prompts in DS-Chat's phase-3 PromptDataset (ids and mask stored flipped, as its
    # create_dataset_split stores them; DataCollatorRLHF flips them back into left padding)
    def create_prompt_dataset(local_rank, data_path, data_split, output_path, train_phase, seed, tokenizer,
                              max_seq_len, *a, **kw):
        rows = [{"input_ids": torch.tensor(p).flip(0), "attention_mask": torch.ones(len(p), dtype=torch.long)}
                for p in prompts if len(p) <= max_seq_len]
        return PromptDataset(rows, [], [], tokenizer.pad_token_id, train_phase), None

    main.create_prompt_dataset = create_prompt_dataset

    # patches 4 and 5: fixed answer length, timing
    init, generate_experience, train_rlhf, get_overflow = (
        DeepSpeedPPOTrainer.__init__, DeepSpeedPPOTrainer.generate_experience, DeepSpeedPPOTrainer.train_rlhf,
        DeepSpeedPPOTrainer.get_overflow)
    log: list[dict] = []

    def init_fixed_length(self, rlhf_engine, a):
        init(self, rlhf_engine, a)
        generate = self.actor_model.module.generate
        self.actor_model.module.generate = lambda *x, **kw: generate(*x, min_new_tokens=a.max_answer_seq_len, **kw)

    def generate_experience_timed(self, prompts, mask, step):
        t0 = time.perf_counter()
        out = generate_experience(self, prompts, mask, step)
        t1 = time.perf_counter()
        answers = out["attention_mask"][:, prompts.shape[1]:]
        log.append({"start": t0, "generate_s": self.generate_time, "score_s": t1 - t0 - self.generate_time,
                    "train_s": 0.0, "answers": answers.shape[0], "min_tokens": int(answers.sum(1).min()),
                    "answer_tokens": answers.sum(1).float().mean().item(), "prompt_width": prompts.shape[1]})
        return out

    def train_rlhf_timed(self, inputs):
        t0 = time.perf_counter()
        losses = train_rlhf(self, inputs)
        log[-1]["train_s"] += time.perf_counter() - t0
        return losses

    def get_overflow_fp32(self):
        overflow = (False, False) if self.args.dtype == "fp32" else get_overflow(self)
        log[-1]["end"] = time.perf_counter()
        return overflow

    DeepSpeedPPOTrainer.__init__ = init_fixed_length
    DeepSpeedPPOTrainer.generate_experience = generate_experience_timed
    DeepSpeedPPOTrainer.train_rlhf = train_rlhf_timed
    DeepSpeedPPOTrainer.get_overflow = get_overflow_fp32

    n = str(args.prompts)
    sys.argv = [
        str(dschat / STEP3_MAIN), "--local_rank", "0",
        "--actor_model_name_or_path", str(work / size / "sft"),
        "--critic_model_name_or_path", str(work / size / "dschat_critic"),
        "--per_device_generation_batch_size", n, "--per_device_training_batch_size", n,
        "--generation_batches", "1", "--ppo_epochs", "1",
        "--max_prompt_seq_len", str(width), "--max_answer_seq_len", str(args.new_tokens),
        "--actor_zero_stage", str(args.zero), "--critic_zero_stage", str(args.zero),
        "--dtype", "bf16",  # rewritten to fp32 after parsing (patch 2)
        "--seed", str(rl._params(work, size, args).seed),
    ]
    params = {}
    original_init = rlhf_engine.DeepSpeedRLHFEngine.__init__

    def engine_init(self, *a, **kw):  # parameter counts only (ZeRO-3 keeps the full size in ds_numel)
        original_init(self, *a, **kw)
        for name in ("actor", "critic"):
            params[name] = sum(getattr(p, "ds_numel", p.numel()) for p in getattr(self, name).module.parameters())

    rlhf_engine.DeepSpeedRLHFEngine.__init__ = engine_init
    try:
        main.main()
    finally:  # DeepSpeed's CPU shm all-reduce buffer is never unlinked by DeepSpeed (see rlhf.engine)
        Path("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_0").unlink(missing_ok=True)

    if len(log) != args.iters + 1 or any("end" not in e for e in log):
        raise RuntimeError(f"DS-Chat ran {len(log)} iterations, expected {args.iters + 1}")
    for e in log:  # no answer dropped by _generate_sequence, none shorter than asked, the same prompt width
        if e["answers"] != args.prompts or e["min_tokens"] != args.new_tokens or e["prompt_width"] != width:
            raise RuntimeError(f"DS-Chat's rollout differs from the requested shape: {e}")
    timed = log[1:]  # the first iteration warms up
    return {"times": [e["end"] - e["start"] for e in timed], "params": params["actor"],
            "critic_params": params["critic"], "zero": args.zero, "prompt_width": width,
            **{k: statistics.fmean(e[k] for e in timed) for k in ("generate_s", "score_s", "train_s", "answer_tokens")},
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dschat", help="the applications/DeepSpeed-Chat folder of deepspeedai/DeepSpeedExamples")
    ap.add_argument("--sizes", default="tiny,50m", help="actor sizes (bench/rl_iteration.py SIZES)")
    ap.add_argument("--zero", default="0,3", help="ZeRO stages, comma-separated: a row each")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per iteration (one answer each)")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens per answer (exact)")
    ap.add_argument("--iters", type=int, default=3, help="timed iterations (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=1, help="turns each side takes (alternating)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per side (0: torch's default)")
    ap.add_argument("--smoke", action="store_true", help="tiny check: tiny actor, ZeRO 0, 4 prompts x 8 tokens, 1 iter")
    ap.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side in this process
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.completions, args.dtype = 1, "fp32"  # what rl_iteration's helpers read
    if args.smoke:
        args.sizes, args.zero, args.prompts, args.new_tokens, args.iters, args.rounds = "tiny", "0", 4, 8, 1, 1
    if not args.dschat or not (Path(args.dschat) / STEP3_MAIN).is_file():
        ap.error("--dschat must be DeepSpeed-Chat's folder (with training/step3_rlhf_finetuning/main.py), e.g. from "
                 "`git archive HEAD applications/DeepSpeed-Chat` of deepspeedai/DeepSpeedExamples")
    if args.side:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        args.zero = int(args.zero)
        run = {"setup": setup, "ours": run_ours, "dschat": run_dschat}[args.side]
        print("RESULT " + json.dumps(run(Path(args.work), args.size, args)), flush=True)
        return

    shape = ["--dschat", str(Path(args.dschat).resolve()), "--prompts", str(args.prompts),
             "--new-tokens", str(args.new_tokens), "--iters", str(args.iters), "--threads", str(args.threads)]
    sides = ["dschat", "ours"]

    def side(name: str, work: str, size: str, zero: str) -> dict:
        return rl.run_side(__file__, ["--side", name, "--work", work, "--size", size, "--zero", zero, *shape],
                           f"{name} ({size}, ZeRO {zero})")

    rows = []
    with tempfile.TemporaryDirectory(prefix="dschat-bench-") as tmp:
        for size in args.sizes.split(","):
            prepared = side("setup", tmp, size, "0")
            for zero in args.zero.split(","):
                row: dict = {"size": size, "zero": int(zero), **prepared, "load_before": os.getloadavg()}
                times: dict[str, list[float]] = {s: [] for s in sides}
                for name in sides * args.rounds:
                    out = side(name, tmp, size, zero)
                    times[name] += out.pop("times")
                    row[name] = out
                    print(f"[dschat_step3] {size} ZeRO-{zero} {name}: "
                          + " ".join(f"{t:.2f}" for t in times[name]) + " s/iter", flush=True)
                for name in sides:
                    row[name].update(s_per_iter=statistics.median(times[name]), fastest_s=min(times[name]),
                                     times=times[name])
                row["load_after"] = os.getloadavg()
                row["speedup"] = row["dschat"]["s_per_iter"] / row["ours"]["s_per_iter"]
                rows.append(row)
    print(json.dumps({"bench": "dschat_step3", "prompts": args.prompts, "completions": 1,
                      "new_tokens": args.new_tokens, "iters": args.iters, "rounds": args.rounds,
                      "threads": args.threads, "dtype": "fp32", "dschat": str(Path(args.dschat).resolve()),
                      "rows": rows}))


if __name__ == "__main__":
    main()
