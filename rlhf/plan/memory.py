"""The memory plan: bytes per rank of every phase of every training stage, from params.yaml and the models' shapes,
before anything is loaded (`rlhf plan`, and the check at the start of each training stage).

Per model (DeepSpeed's accounting, ZeRO over N ranks, b bytes per element of engine.dtype):
- weights: params x b, / N under ZeRO-3; on the host with offload_params;
- gradients: trained x b, / N from ZeRO-2 (ZeRO-1 adds a flat copy of this rank's share); from ZeRO-1,
  DeepSpeed's reduce bucket of 5e8 elements, whatever the model's size (ZeRO-1/2: during the backward only;
  ZeRO-3: for the whole run);
- optimizer: AdamW's two moments (8 bytes) + an fp32 master copy in bf16/fp16 (4) per trained parameter, / N from
  ZeRO-1 (and under DeepSpeed's bf16 optimizer at ZeRO 0); on the host with offload_optimizer. With LoRA only the
  adapters are trained;
- activations of a training micro batch of B rows of T tokens: per decoder layer and token, (A_HIDDEN x hidden +
  A_INTERMEDIATE x intermediate + A_KV x kv_width) elements, plus the attention scores (B x heads x T x T) where the
  attention kernel keeps them (the CPU's), plus the logits over the vocabulary (in the engine dtype and in fp32
  for the log-softmax and its gradient). Gradient checkpointing keeps one hidden state per layer and one layer's
  worth; a forward without gradients keeps one layer's worth and the logits;
- ZeRO-3 training keeps gathered what it will use again within 1e9 elements (stage3_max_reuse_distance): a
  smaller model, whole;
- generation: the KV cache (2 x layers x kv_width x b per token of B x (prompt + answer)) and, under ZeRO-3, the
  whole actor gathered on every rank (the hybrid engine's generation mode);
- every rank loads each model whole in fp32 on the host before DeepSpeed casts and partitions it (`load`), but
  under ZeRO-3 a model read from a folder is created as shards (rlhf.training.runtime.sharded_load).
A_* are measured on this implementation (bench/memory_plan.py, bench/README.md): the plan is an estimate, validated
there against measured peaks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from rlhf.config import EngineConfig, Params
    from rlhf.plan.shapes import ModelShape

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# Elements a Llama-style decoder layer keeps per token for its backward, in the engine dtype (A_HIDDEN x hidden +
# A_INTERMEDIATE x intermediate + A_KV x kv_width), plus A_FP32 x hidden in fp32 under bf16/fp16 (the norms
# compute in fp32): counted with torch's saved-tensor hooks on transformers' Llama (bench/memory_plan.py --saved);
# the attention kernels (SDPA, CPU and CUDA) keep no T x T scores.
A_HIDDEN, A_INTERMEDIATE, A_KV, A_FP32 = 8.5, 4.0, 1.75, 1.2
REDUCE_BUCKET = 500_000_000  # elements of DeepSpeed's reduce_bucket_size (its default; 1.86 GiB in fp32, measured)
REUSE_DISTANCE = 1_000_000_000  # elements of DeepSpeed's stage3_max_reuse_distance (its default)
A_LOGITS = 2  # fp32 copies of the logits a forward holds besides its own (the log-softmax, its gradient)
Where = Literal["device", "host"]
# the model types our lean decode step runs (rlhf.rollout.llama.LEAN_TYPES, held equal by tests/plan): others decode
# layered generation through their own forward, DeepSpeed fetching one module at a time
LEAN_TYPES = ("llama", "qwen2", "mistral")


@dataclass(frozen=True)
class Item:
    what: str  # e.g. "actor optimizer"
    bytes: int
    where: Where = "device"
    rank0_only: bool = False  # held by rank 0 alone (a model gathered to be saved), not by every rank


@dataclass
class Phase:
    stage: str
    name: str  # load, train, generate, score, ...
    items: list[Item] = field(default_factory=list)

    def total(self, where: Where, rank0: bool = True) -> int:
        """Bytes one rank holds there: rank 0's (with `rank0`), or any other rank's."""
        return sum(i.bytes for i in self.items if i.where == where and (rank0 or not i.rank0_only))

    def largest(self, n: int = 3) -> list[Item]:
        return sorted(self.items, key=lambda i: -i.bytes)[:n]


@dataclass(frozen=True)
class Cluster:
    """Where the run goes: `ranks` in all, `local_ranks` per node, on `device` (cpu: the ranks of a node share its
    memory; cuda: one GPU each), `device_memory` bytes of one GPU (cuda) and `host_memory` of one node."""

    ranks: int
    local_ranks: int
    device: Literal["cpu", "cuda"]
    device_memory: int
    host_memory: int


def model_states(name: str, shape: ModelShape, engine: EngineConfig, ranks: int, trained: bool,
                 device: str = "cuda") -> list[Item]:
    """What one model keeps on one rank for the whole stage: its weights and, trained, its optimizer state. ZeRO-3's
    reduce bucket is allocated once and never cleared: a GPU holds all of it; on a CPU (`device`) only the pages the
    gradients were copied into become resident, at most the trained elements (measured: 0.4 GiB per rank after the
    first update of a 2-rank 48M step 3, not its 3.7 GiB of buckets)."""
    b, z = BYTES[engine.dtype], engine.zero_stage if trained or engine.zero_stage == 3 else 0
    weights_at: Where = "host" if engine.offload_params else "device"
    items = [Item(f"{name} weights", shape.params * b // (ranks if z == 3 else 1), weights_at)]
    if trained:
        per_param = 8 + (4 if b < 4 else 0)  # AdamW's moments, and an fp32 master copy under bf16/fp16
        shards = ranks if z >= 1 or b < 4 else 1
        items.append(Item(f"{name} optimizer", shape.trained * per_param // shards,
                          "host" if engine.offload_optimizer else "device"))
        if z == 3:  # ZeRO-3 allocates its reduce bucket once, whatever the model's size; ZeRO-1/2 per backward
            touched = REDUCE_BUCKET if device == "cuda" else min(REDUCE_BUCKET, shape.trained)
            items.append(Item(f"{name} ZeRO gradient bucket", touched * b))
            # and this rank's share of the gradients, in fp32, for the whole run (stage3.py grad_partitions_flat_buffer)
            items.append(Item(f"{name} ZeRO-3 gradient partition (fp32)", shape.trained * 4 // ranks,
                              "host" if engine.offload_optimizer else "device"))  # with the optimizer's state
    return items


def gradients(name: str, shape: ModelShape, engine: EngineConfig, ranks: int) -> Item:
    """A trained model's gradients, held from its backward to its optimizer step: whole, / N from ZeRO-2; ZeRO-1
    also copies this rank's partition into a flat buffer at the end of the backward (averaged_gradients, measured:
    bench/memory_plan.py's ZeRO-1 configuration)."""
    whole = shape.trained * BYTES[engine.dtype]
    if engine.zero_stage == 3:  # reduced through the bucket into the partition held for the whole run (model_states)
        return Item(f"{name} gradients (in ZeRO-3's partition)", 0)
    if engine.zero_stage == 1:
        return Item(f"{name} gradients (and ZeRO-1's flat copy of this rank's share)", whole + whole // ranks)
    return Item(f"{name} gradients", whole // (ranks if engine.zero_stage >= 2 else 1))


def activations(shape: ModelShape, rows: int, tokens: int, dtype: str, *, grad: bool, checkpointing: bool) -> int:
    """Bytes a forward of `rows` x `tokens` keeps for its backward (`grad`), or holds at its peak without."""
    b, n = BYTES[dtype], rows * tokens
    per_layer = n * (b * (A_HIDDEN * shape.hidden + A_INTERMEDIATE * shape.intermediate + A_KV * shape.kv_width)
                     + (4 * A_FP32 * shape.hidden if b < 4 else 0))
    logits = n * shape.vocab * (b + 4 * A_LOGITS) if shape.head == "causal_lm" else n * 4
    if not grad:
        return int(per_layer + logits)
    if checkpointing:  # each layer's input kept, one layer recomputed at a time in the backward
        return int(shape.layers * n * shape.hidden * (b + 1) + per_layer + logits)
    return int(shape.layers * per_layer + logits)


def zero3_gathered(shape: ModelShape, engine: EngineConfig) -> int:
    """What ZeRO-3 holds gathered while it trains: once its trace is recorded (from the second step), it keeps every
    parameter it will use again within stage3_max_reuse_distance elements (DeepSpeed's default 1e9), so at the turn
    from forward to backward the last REUSE_DISTANCE elements stay whole: a model smaller than that, whole
    (measured: bench/memory_plan.py --trace); at least the module in use and the next, prefetched."""
    if engine.zero_stage != 3:
        return 0
    return max(min(shape.params, REUSE_DISTANCE), shape.largest_module + shape.layer) * BYTES[engine.dtype]


def kv_cache(shape: ModelShape, rows: int, tokens: int, dtype: str) -> int:
    return 2 * shape.layers * shape.kv_width * rows * tokens * BYTES[dtype]


def training_phase(stage: str, name: str, resident: list[Item], label: str, shape: ModelShape,
                   engine: EngineConfig, ranks: int, rows: int, tokens: int) -> Phase:
    """`resident` plus one training micro batch of the model `label`. The backward frees each layer's activations
    as it writes that layer's gradients, so the peak holds the larger of the two, not both."""
    act = activations(shape, rows, tokens, engine.dtype, grad=True, checkpointing=engine.gradient_checkpointing)
    grads = gradients(label, shape, engine, ranks)
    items = [*resident, grads if grads.bytes > act else Item(f"{label} activations ({rows} x {tokens} tokens)", act)]
    if engine.zero_stage in (1, 2):  # allocated as the backward starts, freed at its end (stage_1_and_2.py)
        items.append(Item(f"{label} ZeRO gradient bucket", REDUCE_BUCKET * BYTES[engine.dtype]))
    if engine.zero_stage == 3:
        items.append(Item(f"{label} ZeRO-3 gathered modules", zero3_gathered(shape, engine)))
    return Phase(stage, name, items)


def forward_item(label: str, shape: ModelShape, rows: int, tokens: int, engine: EngineConfig) -> Item:
    """A forward without gradients: its activations at their peak and, under ZeRO-3, what it holds gathered
    (DeepSpeed keeps a module gathered while it will use it again within 1e9 elements: from the second forward on,
    a smaller model is whole until the forward ends; measured)."""
    act = activations(shape, rows, tokens, engine.dtype, grad=False, checkpointing=False)
    return Item(f"{label} forward ({rows} x {tokens} tokens" + (", ZeRO-3 gathered)" if engine.zero_stage == 3
                                                                 else ")"),
                act + zero3_gathered(shape, engine))


def load_phase(stage: str, shapes: dict[str, ModelShape], sharded: set[str] = frozenset()) -> Phase:
    """Every rank reads each model whole in fp32 before DeepSpeed casts and partitions it; the largest two at once.
    A model in `sharded` (ZeRO-3, read from a folder: rlhf.training.runtime.sharded_load) is created as shards and
    read on rank 0 one tensor at a time."""
    whole = sorted(((n, s) for n, s in shapes.items() if n not in sharded), key=lambda kv: -kv[1].params)[:2]
    items = [Item(f"{name} loaded whole (fp32)", s.params * 4, "host") for name, s in whole]
    items += [Item(f"{name} read as ZeRO-3 shards, a tensor at a time (rank 0)", s.largest_module * 4, "host",
                   rank0_only=True) for name, s in shapes.items() if name in sharded]
    return Phase(stage, "load", items)


def save_phase(stage: str, resident: list[Item], shapes: dict[str, ModelShape]) -> Phase:
    """Writing a model: rank 0 gathers its weights whole in fp32 and loads them into a fresh fp32 copy of the model
    (LoRA merged there) to save it: two whole fp32 copies of the largest model written, on the host."""
    name, shape = max(shapes.items(), key=lambda kv: kv[1].params)
    return Phase(stage, "save", [*resident, Item(f"{name} gathered and rebuilt to save (2 x fp32, rank 0)",
                                                 2 * shape.params * 4, "host", rank0_only=True)])


def sft_like(stage: str, params: Params, shape: ModelShape, cluster: Cluster) -> list[Phase]:
    """sft and reward: one trained model, its micro batches of data.max_seq_tokens."""
    train, engine, n = params.sft if stage == "sft" else params.reward, params.engine, cluster.ranks
    seq = params.data.max_seq_tokens
    states = model_states("model", shape, engine, n, trained=True, device=cluster.device)
    folder = (params.model if stage == "sft" else params.reward_model).name_or_path
    return [load_phase(stage, {"model": shape}, {"model"} if engine.zero_stage == 3 and folder else set()),
            training_phase(stage, "train", states, "model", shape, engine, n, train.micro_batch_size, seq),
            Phase(stage, "evaluate", [*states, forward_item("model", shape, train.eval_batch_size, seq, engine)]),
            save_phase(stage, states, {"model": shape})]


def dpo_phases(params: Params, shape: ModelShape, cluster: Cluster) -> list[Phase]:
    """dpo: the reference (fp32, on the host, before the actor is built) scores every pair once; then the actor
    trains on chosen + rejected rows."""
    engine, seq, n = params.engine, params.data.max_seq_tokens, cluster.ranks
    scoring = forward_item("reference", shape, 2 * params.dpo.eval_batch_size, seq, engine.model_copy(
        update={"dtype": "fp32", "zero_stage": 0}))
    states = model_states("actor", shape, engine, n, trained=True, device=cluster.device)
    return [load_phase("dpo", {"reference": shape}),
            Phase("dpo", "reference", [Item("reference weights (fp32)", shape.params * 4, "host"),
                                       Item(scoring.what, scoring.bytes, "host")]),
            training_phase("dpo", "train", states, "actor", shape, engine, n, 2 * params.dpo.micro_batch_size, seq),
            save_phase("dpo", states, {"actor": shape})]


def ppo_phases(params: Params, shapes: dict[str, ModelShape], engines: dict[str, EngineConfig],
               cluster: Cluster) -> list[Phase]:
    """Step 3 (every algorithm): `shapes` has actor, ref, and critic / reward when the run has them."""
    ppo, n = params.ppo, cluster.ranks
    actor = shapes["actor"]
    rows = ppo.rollout_batch_size * (ppo.answers_per_prompt or 1)  # answers per rank per generation batch
    seq = params.data.max_prompt_tokens + ppo.sampling.max_answer_tokens
    resident = model_states("actor", actor, engines["actor"], n, trained=True, device=cluster.device)
    resident += model_states("reference", shapes["ref"], engines["ref"], n, trained=False)
    for name, trained in (("critic", True), ("reward", False)):
        if name in shapes:
            resident += model_states(name, shapes[name], engines[name], n, trained=trained, device=cluster.device)
    if ppo.ema_beta > 0:  # a whole fp32 copy on every rank's host
        resident.append(Item("EMA actor (fp32)", actor.params * 4, "host"))
    generate = [*resident, *rollout_items(params, actor, rows, seq, engines["actor"], cluster)]
    scoring = [forward_item(name, s, ppo.micro_batch_size, seq, engines[name]) for name, s in shapes.items()]
    sharded = {name for name in shapes if engines[name].zero_stage == 3}  # every step-3 model is read from a folder
    phases = [load_phase("ppo", shapes, sharded), Phase("ppo", "generate", generate),
              Phase("ppo", "score", [*resident, max(scoring, key=lambda i: i.bytes)]),
              training_phase("ppo", "train actor", resident, "actor", actor, engines["actor"], n,
                             ppo.micro_batch_size, seq)]
    if "critic" in shapes:
        phases.append(training_phase("ppo", "train critic", resident, "critic", shapes["critic"], engines["critic"],
                                     n, ppo.micro_batch_size, seq))
    if ppo.ema_beta > 0:  # update_ema gathers the actor whole in fp32 on every rank
        phases.append(Phase("ppo", "ema", [*resident, Item("actor gathered for the EMA (fp32)", actor.params * 4,
                                                           "host")]))
    phases.append(save_phase("ppo", resident, {k: v for k, v in shapes.items() if k in ("actor", "critic")}))
    return phases


def rollout_items(params: Params, actor: ModelShape, rows: int, seq: int, engine: EngineConfig,
                  cluster: Cluster) -> list[Item]:
    """What a rollout adds to the resident models, by engine."""
    vllm, dtype = params.ppo.rollout.vllm, engine.dtype
    if params.ppo.rollout.engine == "vllm":
        if cluster.device == "cuda":
            return [Item("vLLM (gpu_memory_utilization)", int(vllm.gpu_memory_utilization * cluster.device_memory))]
        return [Item("vLLM weights", actor.params * BYTES[dtype] // vllm.tensor_parallel_size),
                Item("vLLM KV cache (cpu_kv_cache_gib)", vllm.cpu_kv_cache_gib * 2**30)]
    items = [Item(f"KV cache ({rows} x {seq} tokens)", kv_cache(actor, rows, seq, dtype)),
             Item("logits of one decode step", rows * actor.vocab * 4 * 2)]
    k = params.ppo.rollout.gather_layers
    if engine.zero_stage == 3 and k and actor.model_type not in LEAN_TYPES:  # the model's forward, DeepSpeed's hooks
        items.append(Item("actor gathered module by module for generation (ZeRO-3)", zero3_gathered(actor, engine)))
    elif engine.zero_stage == 3 and k:  # ppo.rollout.gather_layers: k layers and the rest (embeddings, head) at once
        held = min(k, actor.layers) * actor.layer + actor.params - actor.layers * actor.layer
        items.append(Item(f"actor gathered {k} layer(s) at a time for generation (ZeRO-3)", held * BYTES[dtype]))
    elif engine.zero_stage == 3:
        items.append(Item("actor gathered whole for generation (ZeRO-3)", actor.params * BYTES[dtype]))
    return items
