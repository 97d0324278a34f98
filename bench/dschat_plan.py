"""DeepSpeed-Chat's published OPT configurations, planned with our memory plan (rlhf/plan/): for each one, the
params that run it here and each step's largest phase per GPU and per node against the hardware. Where step 3's
generation does not fit with the whole actor gathered, the most decoder layers gathered at a time with which it fits
(ppo.rollout.gather_layers) is planned instead. Nothing is trained: the models are OPT configs (transformers'
OPTConfig, the published sizes) built on the meta device.

    PYTHONPATH=. python bench/dschat_plan.py            # a Markdown table, then one JSON line

DeepSpeed-Chat's settings per configuration are its launch scripts' (docs/deepspeed-chat-configs.md): fp16 (ours:
engine.dtype fp16), sequences of 512 in steps 1-2 and 256 + 256 in step 3, the step-3 actor with LoRA rank 128 on
q/k/v/out/fc1/fc2 from 13B up (DeepSpeed-Chat freezes the base weights under LoRA: ours only_optimize_lora), the
critic and reward model OPT-350m, no EMA. Host memory per node: 1 TiB with A100-40G (DGX A100 320G), 2 TiB with
A100-80G (DGX A100 640G), 256 GiB for one A6000 workstation.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OPT = {  # hidden, layers, heads, ffn (OPT paper, HF configs; vocab 50272, 2048 positions)
    "350m": (1024, 24, 16, 4096), "1.3b": (2048, 24, 32, 8192), "6.7b": (4096, 32, 32, 16384),
    "13b": (5120, 40, 40, 20480), "30b": (7168, 48, 56, 28672), "66b": (9216, 64, 72, 36864),
    "175b": (12288, 96, 96, 49152),
}
LORA = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
# (actor, hardware, GPUs, GPU GiB, host GiB per node, GPUs per node, step-1 zero, step-1 lora, step-1 micro,
#  step-3 zero, step-3 lora, step-3 generation/training micro batch, DeepSpeed-Chat's step-3 time)
ROWS = [
    ("1.3b", "1x A6000-48G", 1, 48, 256, 1, 0, 128, 16, 0, 128, 16, "1.2 h (e2e 2.2 h)"),
    ("1.3b", "8x A100-40G", 8, 40, 1024, 8, 2, 0, 8, 2, 0, 4, "2 h"),
    ("6.7b", "8x A100-40G", 8, 40, 1024, 8, 3, 0, 6, 3, 0, 4, "5.7 h"),
    ("13b", "8x A100-40G", 8, 40, 1024, 8, 3, 128, 4, 3, 128, 16, "10.8 h (e2e 13.6 h)"),
    ("30b", "8x A100-80G", 8, 80, 2048, 8, 3, 128, 4, 3, 128, 4, "18 h"),
    ("66b", "8x A100-80G", 8, 80, 2048, 8, 3, 128, 4, 3, 128, 4, "2.1 days (no script)"),
    ("66b", "64x A100-80G", 64, 80, 2048, 8, 3, 128, 4, 3, 128, 4, "7.5 h (e2e 9 h)"),
    ("175b", "64x A100-80G", 64, 80, 2048, 8, 3, 128, 4, 3, 128, 4, "20 h (no script)"),
]


def opt_folder(root: Path, size: str) -> Path:
    from transformers import OPTConfig

    hidden, layers, heads, ffn = OPT[size]
    extra = {"word_embed_proj_dim": 512, "do_layer_norm_before": False} if size == "350m" else {}
    folder = root / f"opt-{size}"
    OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
              vocab_size=50272, max_position_embeddings=2048, **extra).save_pretrained(folder)
    return folder


def row_params(root: Path, row: tuple) -> Path:
    size, _, gpus, _, _, per_node, z1, lora1, micro1, z3, lora3, micro3, _ = row
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"]["name_or_path"] = str(opt_folder(root, size))
    raw["reward_model"]["name_or_path"] = str(opt_folder(root, "350m"))
    raw["data"].update(max_prompt_tokens=256, max_seq_tokens=512)
    raw["engine"].update(dtype="fp16", zero_stage=z1, gradient_checkpointing=z1 == 3 or lora1 > 0,
                         num_procs=per_node)
    raw["sft"].update(micro_batch_size=micro1, eval_batch_size=micro1,
                      lora={"rank": lora1, "target_modules": LORA, "only_optimize_lora": True})
    raw["reward"].update(micro_batch_size=4, eval_batch_size=4)
    raw["dpo"].update(micro_batch_size=micro1 // 2 or 1, eval_batch_size=micro1 // 2 or 1)
    ppo = raw["ppo"]
    ppo.update(rollout_batch_size=micro3, micro_batch_size=micro3, ema_beta=0.0)
    ppo["sampling"]["max_answer_tokens"] = 256
    ppo["lora"] = {"actor": {"rank": lora3, "target_modules": LORA, "only_optimize_lora": True}}
    ppo["engines"] = {"actor": {"zero_stage": z3}, "critic": {"zero_stage": z3}, "ref": {"zero_stage": z3},
                      "reward": {"zero_stage": z3}}
    path = root / f"{size}-{gpus}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def main() -> None:
    from rlhf.config import load_params
    from rlhf.plan.memory import Cluster
    from rlhf.plan.plan import HEADROOM, layers_that_fit, needs, stage_phases, stage_shapes

    out = []
    print("| actor | hardware | step | largest phase per GPU | GiB / GPU | largest phase per node (host) | GiB / node "
          "| with | fits | what does not fit |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for row in ROWS:
            size, hardware, gpus, gpu_gib, host_gib, per_node = row[:6]
            params = load_params(row_params(root, row))
            cluster = Cluster(gpus, per_node, "cuda", gpu_gib * 2**30, host_gib * 2**30)
            for stage in ("sft", "reward", "ppo"):
                shapes = stage_shapes(stage, params, root / f"opt-{size}", root / "opt-350m")
                phases = stage_phases(stage, params, cluster, shapes)
                # the most layers gathered at a time with which generation would fit (0: the whole actor does)
                layers = (layers_that_fit(params, cluster, shapes) or 0) if stage == "ppo" else 0
                lora = params.ppo.lora.actor.rank > 0
                if layers:
                    layered = params.model_copy(deep=True)
                    layered.ppo.rollout.gather_layers = layers
                    phases = stage_phases(stage, layered, cluster, shapes)
                gpu = max(phases, key=lambda p: needs(p, cluster)[0][1])
                host = max(phases, key=lambda p: needs(p, cluster)[1][1])
                misses = [f"{p.name}: {p.largest(1)[0].what}" for p in phases for where, need, have in
                          needs(p, cluster) if need > HEADROOM * have]
                gpu_need, host_need = needs(gpu, cluster)[0][1], needs(host, cluster)[1][1]
                verdict = "yes" if not misses else "no"
                knob = f"ppo.rollout.gather_layers {layers}" if layers else ""
                print(f"| OPT-{size} | {hardware} | {stage} | {gpu.name} | {gpu_need / 2**30:.1f} / {gpu_gib} | "
                      f"{host.name} | {host_need / 2**30:.0f} / {host_gib} | {knob} | {verdict} | {'; '.join(misses)} |")
                out.append({"actor": size, "hardware": hardware, "stage": stage, "gpu_phase": gpu.name,
                            "gpu_gib": gpu_need / 2**30, "host_phase": host.name, "host_gib": host_need / 2**30,
                            "gather_layers": layers, "lora": lora, "fits": not misses, "misses": misses,
                            "dschat_step3_time": row[-1]})
    print(json.dumps({"bench": "dschat_plan", "rows": out}))


if __name__ == "__main__":
    main()
