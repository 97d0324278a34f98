"""The memory plan (rlhf/plan/): model shapes against real models, each item's arithmetic by hand, the stop before
launch, and `rlhf plan` for another machine. Its estimates against measured peaks are bench/memory_plan.py's."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import run_cli, write_params

GiB = 2**30


def test_shapes_count_what_transformers_and_peft_build(tiny_models: Path) -> None:
    """Parameters, the largest module, one layer and LoRA's adapters, read from a config on the meta device, equal
    the real models' (a causal LM, a reward model, a LoRA actor)."""
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model
    from transformers import AutoConfig

    from rlhf.config import LoraConfig
    from rlhf.models.build import load_causal_lm, load_reward_model
    from rlhf.plan.shapes import model_shape

    config = AutoConfig.from_pretrained(tiny_models / "models/sft")
    actor = load_causal_lm(tiny_models / "models/sft")
    shape = model_shape(config)
    assert shape.params == sum(p.numel() for p in actor.parameters()) and shape.trained == shape.params
    assert shape.layers == config.num_hidden_layers and shape.vocab == config.vocab_size
    assert shape.layer == sum(p.numel() for p in actor.model.layers[0].parameters())
    assert shape.largest_module == config.vocab_size * config.hidden_size  # the embedding (or the LM head)
    reward = load_reward_model(tiny_models / "models/reward")
    reward_shape = model_shape(AutoConfig.from_pretrained(tiny_models / "models/reward"), "score")
    assert reward_shape.params == sum(p.numel() for p in reward.parameters())
    lora = LoraConfig(rank=4, target_modules=["q_proj", "v_proj"])
    peft = get_peft_model(actor, PeftLora(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with_lora = model_shape(config, lora=lora)
    assert with_lora.lora == with_lora.trained == sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert model_shape(config, lora=lora.model_copy(update={"only_optimize_lora": False})).trained == (
        shape.params + with_lora.lora)


def test_model_states_by_hand() -> None:
    """1000 parameters: fp32 ZeRO-0 keeps 4 + 8 bytes each and 4 more for gradients while it trains; bf16 ZeRO-3
    on 4 ranks (2 + 12) / 4 with the optimizer on the host under offload_optimizer and its fp32 gradient partition
    4 / 4 for the whole run; a frozen model is its weights alone (sharded only by ZeRO-3)."""
    from rlhf.config import EngineConfig
    from rlhf.plan.memory import gradients, model_states
    from rlhf.plan.shapes import ModelShape

    shape = ModelShape(params=1000, trained=1000, lora=0, largest_module=100, layer=100, layers=2, hidden=8,
                       intermediate=16, heads=2, kv_width=8, vocab=32, head="causal_lm")
    by = {i.what: (i.bytes, i.where) for i in model_states("actor", shape, EngineConfig(), 4, trained=True)}
    assert by == {"actor weights": (4000, "device"), "actor optimizer": (8000, "device")}
    assert gradients("actor", shape, EngineConfig(), 4).bytes == 4000
    z3 = EngineConfig(dtype="bf16", zero_stage=3, offload_optimizer=True)
    by = {i.what: (i.bytes, i.where) for i in model_states("actor", shape, z3, 4, trained=True)}
    assert by == {"actor weights": (500, "device"), "actor optimizer": (3000, "host"),
                  "actor ZeRO gradient bucket": (500_000_000 * 2, "device"),  # DeepSpeed's reduce bucket, any size
                  "actor ZeRO-3 gradient partition (fp32)": (1000, "host")}  # 4 bytes / 4 ranks, beside the optimizer
    assert gradients("actor", shape, z3, 4).bytes == 0  # already in the partition above
    # on CPU ranks only the bucket's pages the gradients were copied into are resident: at most the trained elements
    cpu = {i.what: i.bytes for i in model_states("actor", shape, z3, 4, trained=True, device="cpu")}
    assert cpu["actor ZeRO gradient bucket"] == 1000 * 2
    frozen = model_states("ref", shape, EngineConfig(zero_stage=2), 4, trained=False)
    assert [(i.what, i.bytes) for i in frozen] == [("ref weights", 4000)]


def test_the_kv_cache_and_the_zero3_gather_by_hand() -> None:
    from rlhf.config import EngineConfig
    from rlhf.plan.memory import kv_cache, zero3_gathered
    from rlhf.plan.shapes import ModelShape

    shape = ModelShape(params=1000, trained=1000, lora=0, largest_module=300, layer=100, layers=3, hidden=8,
                       intermediate=16, heads=2, kv_width=4, vocab=32, head="causal_lm")
    assert kv_cache(shape, rows=5, tokens=7, dtype="bf16") == 2 * 3 * 4 * 5 * 7 * 2
    # ZeRO-3 keeps whole what it reuses within 1e9 elements (stage3_max_reuse_distance): all of a small model
    assert zero3_gathered(shape, EngineConfig(zero_stage=3)) == 1000 * 4
    big = ModelShape(params=3 * 10**9, trained=0, lora=0, largest_module=3 * 10**8, layer=10**8, layers=27,
                     hidden=8, intermediate=16, heads=2, kv_width=4, vocab=32, head="causal_lm")
    assert zero3_gathered(big, EngineConfig(zero_stage=3, dtype="bf16")) == 10**9 * 2
    assert zero3_gathered(shape, EngineConfig(zero_stage=2)) == 0


def test_the_zero12_bucket_is_held_in_the_backward_only() -> None:
    """ZeRO-1/2 allocate the 5e8-element reduce bucket as each backward starts and free it at its end: in the
    training phase, not in the evaluation or the save."""
    from rlhf.config import EngineConfig
    from rlhf.plan.memory import model_states, training_phase
    from rlhf.plan.shapes import ModelShape

    shape = ModelShape(params=1000, trained=1000, lora=0, largest_module=300, layer=100, layers=3, hidden=8,
                       intermediate=16, heads=2, kv_width=4, vocab=32, head="causal_lm")
    z2 = EngineConfig(zero_stage=2, dtype="bf16")
    states = model_states("actor", shape, z2, 2, trained=True)
    assert not [i for i in states if "bucket" in i.what]
    train = training_phase("sft", "train", states, "actor", shape, z2, 2, rows=1, tokens=4)
    assert [i.bytes for i in train.items if "bucket" in i.what] == [500_000_000 * 2]


def test_a_stage_that_will_not_fit_stops_before_loading(tmp_path: Path) -> None:
    """A 70B-sized Llama on this machine: `rlhf sft` stops in one line (exit 2) naming the phase, the estimate, the
    memory and a knob, before it reads any data or builds a model; `engine.memory_check: off` lets it through to
    its next check."""
    from tests.conftest import copy_project

    huge = {"model": {"hidden_size": 8192, "num_layers": 80, "num_heads": 64, "intermediate_size": 28672}}
    copy_project(tmp_path)
    write_params(tmp_path / "params.yaml", huge)
    proc = run_cli("sft", "--data", "nowhere", cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: sft: the load phase needs ~") and "GiB of node memory" in line, line
    assert "model loaded whole (fp32)" in line and "engine.num_procs" in line, line  # what lowers it
    assert "rlhf plan --stage sft" in line and not (tmp_path / "models/sft").exists()
    write_params(tmp_path / "params.yaml", {**huge, "engine": {"memory_check": "off"}})
    proc = run_cli("sft", "--data", "nowhere", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "GiB" not in proc.stderr, proc.stderr  # past the plan: the data is missing


def test_rlhf_plan_plans_another_machine(tmp_path: Path) -> None:
    """The same 70B actor planned for one node of 8 GPUs of 80 GiB, ZeRO-3 with the optimizer offloaded: each
    stage's phases printed; SFT's weights and gradients shard over 8 and fit a GPU, but the hybrid engine's
    whole-actor gather for generation does not."""
    from tests.conftest import copy_project

    copy_project(tmp_path)
    write_params(tmp_path / "params.yaml", {
        "model": {"hidden_size": 8192, "num_layers": 80, "num_heads": 64, "intermediate_size": 28672},
        "engine": {"zero_stage": 3, "dtype": "bf16", "offload_optimizer": True, "gradient_checkpointing": True},
        "ppo": {"ema_beta": 0.0}})
    proc = run_cli("plan", "--ranks", "8", "--device", "cuda", "--gpu-memory", "80", "--host-memory", "2048",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "sft: 8 rank(s), 8 per node, cuda" in out and "ppo: 8 rank(s)" in out, out
    generate = next(ln for ln in out.splitlines() if ln.strip().startswith("generate"))
    assert "GPU memory" in generate and "DOES NOT FIT" in generate and "gathered whole" in generate, generate
    hint = out.splitlines()[out.splitlines().index(generate) + 1]
    assert "fits with ppo.rollout.gather_layers:" in hint, hint  # the most layers at a time that fit
    k = int(hint.split("gather_layers:")[1].split()[0])
    assert 0 < k < 80, hint
    sft_train = next(ln for ln in out.splitlines() if ln.strip().startswith("train"))
    assert "GPU memory" in sft_train and "DOES NOT FIT" not in sft_train.split(";")[0], sft_train


def test_deepspeed_chat_table_as_readme_states() -> None:
    """bench/dschat_plan.py (README "Will it fit?"): DeepSpeed-Chat's 1.3B and 6.7B configurations fit on its
    hardware as they are; from 13B step 3's whole-actor gather for generation does not, and with the
    ppo.rollout.gather_layers the plan names (the LoRA actor DeepSpeed-Chat trains; OPT decodes module by module) it
    does; 66B and 175B too, as every ZeRO-3 model is read from its folder as shards (a whole fp32 copy per rank
    would not fit their nodes)."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT, cli_env

    proc = subprocess.run([sys.executable, "bench/dschat_plan.py"], cwd=ROOT, env=cli_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
    for r in rows:
        small = r["actor"] in ("1.3b", "6.7b")
        assert r["fits"] and not r["misses"], r
        assert (r["gather_layers"] > 0) == (r["stage"] == "ppo" and not small), r
        assert r["host_phase"] != "load" or r["actor"] in ("1.3b",), r  # sharded from 6.7B (ZeRO-3)


def test_offloaded_frozen_models_and_layered_generation_leave_the_gpu(tmp_path: Path) -> None:
    """Step 3 planned for one GPU under ZeRO-3: with ppo.engines.ref / reward offload_params their weights are counted
    on the host, not the GPU (the knob the plan's line names for them); with ppo.rollout.gather_layers the actor is no
    longer held whole for generation, only k layers and the embeddings and head."""
    from rlhf.config import load_params
    from rlhf.plan.memory import Cluster
    from rlhf.plan.plan import stage_phases, stage_shapes

    def generate(over: dict) -> dict:
        params = load_params(write_params(tmp_path / "p.yaml", {"engine": {"zero_stage": 3}, "ppo": over}))
        cluster = Cluster(1, 1, "cuda", 80 * GiB, 512 * GiB)
        shapes = stage_shapes("ppo", params, None, None)
        phase = next(p for p in stage_phases("ppo", params, cluster, shapes) if p.name == "generate")
        return {i.what: i for i in phase.items}, shapes["actor"]

    items, actor = generate({})
    assert items["reference weights"].where == items["reward weights"].where == "device"
    assert items["actor gathered whole for generation (ZeRO-3)"].bytes == actor.params * 4
    off = {"zero_stage": 3, "offload_params": True}
    items, _ = generate({"engines": {"ref": off, "reward": off}, "rollout": {"gather_layers": 1}})
    assert items["reference weights"].where == items["reward weights"].where == "host"
    layered = items["actor gathered 1 layer(s) at a time for generation (ZeRO-3)"].bytes
    assert layered == (actor.params - (actor.layers - 1) * actor.layer) * 4 < actor.params * 4


def test_the_plan_knows_which_actors_the_lean_step_decodes() -> None:
    from rlhf.plan.memory import LEAN_TYPES
    from rlhf.rollout import llama

    assert LEAN_TYPES == llama.LEAN_TYPES
