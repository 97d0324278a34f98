"""A stage's memory plan against the machine it runs on: the models' shapes (from their folders, else from
params.yaml's `model` group), the cluster (ranks, device, memory), each phase's estimate (rlhf/plan/memory.py), the
table `rlhf plan` prints, and the check every training stage makes before it loads a model
(`engine.memory_check`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.errors import UserError
from rlhf.plan.memory import LEAN_TYPES, Cluster, Phase, dpo_phases, ppo_phases, sft_like
from rlhf.plan.shapes import ModelShape, model_shape

if TYPE_CHECKING:
    from rlhf.config import ModelConfig, Params

STAGES = ("sft", "reward", "dpo", "ppo")
HEADROOM = 0.9  # a plan fits when its estimate is within this share of the memory (allocator, CUDA context, ...)
GiB = 2**30

# What lowers each kind of item, for the line of a plan that does not fit.
KNOBS = {
    "vLLM": "lower ppo.rollout.vllm.gpu_memory_utilization / cpu_kv_cache_gib",
    "reference weights": "ppo.engines.ref: {zero_stage: 3, offload_params: true} keeps it on the host, fetched "
                         "module by module as it scores (DeepSpeed-Chat's --offload_reference_model)",
    "reward weights": "ppo.engines.reward: {zero_stage: 3, offload_params: true} keeps it on the host",
    "optimizer": "engine.zero_stage 1-3 shards it, engine.offload_optimizer moves it to the host",
    "gradients": "engine.zero_stage 2-3 shards them; LoRA (lora.rank) trains far fewer",
    "weights": "engine.zero_stage 3 shards them, engine.offload_params moves them to the host, bf16 halves them",
    "activations": "lower the micro_batch_size, or set engine.gradient_checkpointing: true",
    "forward": "lower the micro_batch_size / eval_batch_size",
    "KV cache": "lower ppo.rollout_batch_size or ppo.sampling.max_answer_tokens",
    "gathered whole": "more ranks do not help here: the hybrid engine gathers the whole actor on every rank for "
                      "generation; set ppo.rollout.gather_layers (layers gathered at a time, slower) or "
                      "ppo.rollout.engine: vllm with ppo.rollout.vllm.tensor_parallel_size",
    "layer(s) at a time": "lower ppo.rollout.gather_layers",
    "loaded whole": "every rank reads this model whole in fp32: under engine.zero_stage 3 a model from a folder "
                    "is read as shards (a model built from params.yaml's model group is not); else fewer ranks per "
                    "node (engine.num_procs) or a node with more memory",
    "EMA": "ppo.ema_beta: 0 drops the EMA actor",
}


def base_config(model: ModelConfig, params: Params) -> Any:
    """The config of a model params.yaml builds (`model` or `reward_model`): its name_or_path's, or the Llama of
    the group's keys."""
    from transformers import AutoConfig

    from rlhf.models.build import llama_config

    if model.name_or_path:
        return AutoConfig.from_pretrained(model.name_or_path)
    return llama_config(model, params.tokenizer.vocab_size)


def _config(folder: Path | None, model: ModelConfig, params: Params) -> Any:
    """A model folder's config when it has one (the stage's real input), else the one params.yaml would build."""
    from transformers import AutoConfig

    if folder is not None and (Path(folder) / "config.json").is_file():
        return AutoConfig.from_pretrained(folder)
    return base_config(model, params)


def stage_shapes(stage: str, params: Params, sft: Path | None = None,
                 reward: Path | None = None) -> dict[str, ModelShape]:
    """The models `stage` holds, by role."""
    if stage == "sft":
        return {"model": model_shape(base_config(params.model, params), "causal_lm", params.sft.lora)}
    if stage == "reward":
        return {"model": model_shape(base_config(params.reward_model, params), "score", params.reward.lora)}
    actor_cfg = _config(sft, params.model, params)
    if stage == "dpo":
        return {"actor": model_shape(actor_cfg, "causal_lm", params.dpo.lora)}
    ppo = params.ppo
    shapes = {"actor": model_shape(actor_cfg, "causal_lm", ppo.lora.actor), "ref": model_shape(actor_cfg)}
    with_reward = params.rewards.model_weight > 0
    if with_reward:
        shapes["reward"] = model_shape(_config(reward, params.reward_model, params), "score")
    if ppo.needs_critic:
        critic_cfg = _config(reward, params.reward_model, params) if with_reward else actor_cfg
        shapes["critic"] = model_shape(critic_cfg, "score", ppo.lora.critic)
    return shapes


def stage_phases(stage: str, params: Params, cluster: Cluster, shapes: dict[str, ModelShape]) -> list[Phase]:
    from rlhf.config import resolve_engine

    if stage in ("sft", "reward"):
        return sft_like(stage, params, shapes["model"], cluster)
    if stage == "dpo":
        return dpo_phases(params, shapes["actor"], cluster)
    engines = {name: resolve_engine(params.engine, getattr(params.ppo.engines, name))
               for name in ("actor", "critic", "ref", "reward")}
    return ppo_phases(params, shapes, engines, cluster)


def _nodes(hostfile: str | None) -> int:
    if not hostfile or not Path(hostfile).is_file():
        return 1
    lines = [ln.split("#")[0].strip() for ln in Path(hostfile).read_text().splitlines()]
    return max(1, sum(1 for ln in lines if ln))


def host_memory() -> int:
    """Bytes this node can still give (MemAvailable), or its total where /proc/meminfo is absent."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def detect_cluster(params: Params) -> Cluster:
    """The cluster params.yaml launches on this machine: engine.num_procs ranks per node, the hostfile's nodes."""
    from rlhf.training.runtime import resolve_device

    device = resolve_device(params.engine)
    memory = host_memory()
    if device == "cuda":
        import torch

        gpu = torch.cuda.get_device_properties(0).total_memory
    procs = params.engine.num_procs
    return Cluster(procs * _nodes(params.engine.hostfile), procs, device, gpu if device == "cuda" else memory, memory)


def needs(phase: Phase, cluster: Cluster) -> list[tuple[str, int, int]]:
    """(where, estimate, memory) of each memory the phase uses: one GPU's and the node's host memory (on CPU the
    ranks of a node share one memory for both)."""
    others = cluster.local_ranks - 1  # node 0 holds rank 0 and local_ranks - 1 others
    host = phase.total("host") + phase.total("host", rank0=False) * others
    if cluster.device == "cpu":
        device = phase.total("device") + phase.total("device", rank0=False) * others
        return [("node memory", host + device, cluster.host_memory)]
    return [("GPU memory", phase.total("device"), cluster.device_memory), ("host memory", host, cluster.host_memory)]


def _knob(what: str) -> str:
    return next((hint for key, hint in KNOBS.items() if key in what), "lower the batch sizes")


def fits(phase: Phase, cluster: Cluster) -> bool:
    return all(need <= HEADROOM * have for _, need, have in needs(phase, cluster))


def layers_that_fit(params: Params, cluster: Cluster, shapes: dict[str, ModelShape]) -> int | None:
    """When step 3's generation does not fit with the whole actor gathered (ZeRO-3, our own loop): the most decoder
    layers gathered at a time (ppo.rollout.gather_layers) with which it does; None if it fits already or if none
    does."""
    from rlhf.config import resolve_engine

    ppo = params.ppo
    if resolve_engine(params.engine, ppo.engines.actor).zero_stage != 3 or ppo.rollout.engine != "own":
        return None
    if fits(next(p for p in stage_phases("ppo", params, cluster, shapes) if p.name == "generate"), cluster):
        return None
    lean = shapes["actor"].model_type in LEAN_TYPES  # else any k decodes module by module (DeepSpeed's hooks)
    for k in range(shapes["actor"].layers - 1, 0, -1) if lean else [1]:
        trial = params.model_copy(deep=True)
        trial.ppo.rollout.gather_layers = k
        generate = next(p for p in stage_phases("ppo", trial, cluster, shapes) if p.name == "generate")
        if fits(generate, cluster):
            return k
    return None


def check_fits(stage: str, params: Params, sft: Path | None = None, reward: Path | None = None) -> list[Phase]:
    """The stage's phases; one UserError naming the first phase that will not fit, before anything is loaded."""
    if params.engine.memory_check == "off":
        return []
    cluster = detect_cluster(params)
    try:
        shapes = stage_shapes(stage, params, sft, reward)
    except Exception:  # a config that cannot be read (a hub id offline, a folder that is no model, a placeholder):
        return []  # the stage's own checks say what is wrong, in one line
    phases = stage_phases(stage, params, cluster, shapes)
    for phase in phases:
        for where, need, have in needs(phase, cluster):
            if need > HEADROOM * have:
                top = phase.largest(1)[0]
                knob = _knob(top.what)
                k = layers_that_fit(params, cluster, shapes) if "gathered whole" in top.what else None
                if k:
                    knob = (f"set ppo.rollout.gather_layers: {k}, the most decoder layers gathered at a time that "
                            "fit (slower), or ppo.rollout.engine: vllm with ppo.rollout.vllm.tensor_parallel_size")
                line = (f"{stage}: the {phase.name} phase needs ~{need / GiB:.1f} GiB of {where} per "
                        f"{'node' if where != 'GPU memory' else 'GPU'} ({cluster.ranks} rank(s)) but "
                        f"{have / GiB:.1f} GiB is there; the largest part is {top.what} ({top.bytes / GiB:.1f} GiB): "
                        f"{knob} (`rlhf plan --stage {stage}` prints the whole plan; "
                        "engine.memory_check: warn runs anyway)")
                if params.engine.memory_check == "warn":
                    print(f"warning: {line}", flush=True)
                    return phases
                raise UserError(line)
    return phases


def table(stage: str, phases: list[Phase], cluster: Cluster, layers: int | None = None) -> str:
    """`rlhf plan`'s table: each phase's estimate per memory against it, and its three largest parts; `layers`: the
    ppo.rollout.gather_layers with which a generation that does not fit would (layers_that_fit)."""
    rows = [f"{stage}: {cluster.ranks} rank(s), {cluster.local_ranks} per node, {cluster.device}"]
    for phase in phases:
        cells = []
        for where, need, have in needs(phase, cluster):
            verdict = "fits" if need <= HEADROOM * have else "DOES NOT FIT"
            cells.append(f"{where} {need / GiB:8.2f} / {have / GiB:.1f} GiB {verdict}")
        parts = ", ".join(f"{i.what} {i.bytes / GiB:.2f}" for i in phase.largest())
        rows.append(f"  {phase.name:<13} " + "; ".join(cells) + f"  [{parts}]")
        if phase.name == "generate" and layers and not fits(phase, cluster):
            rows.append(f"  {'':<13} fits with ppo.rollout.gather_layers: {layers} (layers gathered at a time)")
    return "\n".join(rows)
