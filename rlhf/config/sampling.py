"""How a model draws answers: one group of knobs wherever it samples (step 3's rollouts, evaluate, chat), and
vLLM's settings where vLLM draws them.

params.yaml spells it as `ppo.sampling` and `evaluate.sampling`; the rollout engines, evaluate and chat take the
object itself."""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field, model_validator

from rlhf.config.base import Group


class Sampling(Group):
    """How answers are drawn. Every knob is passed to the sampler; none comes from the model's generation_config or
    from transformers' defaults (its top_k=50)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_answer_tokens: int = Field(32, gt=0)  # longest answer; prompts are capped by data.max_prompt_tokens
    temperature: float = Field(1.0, gt=0)  # sampling temperature (step 3 scores every log-prob at it too)
    top_k: int = Field(0, ge=0)  # sample among the k most likely tokens only; 0 = off
    top_p: float = Field(1.0, gt=0, le=1)  # nucleus sampling; 1.0 = off
    do_sample: bool = True  # false: greedy (evaluate and chat only; step 3 must sample)
    min_answer_tokens: int = Field(0, ge=0)  # no stop token is drawn before this many tokens (0 = off)

    @model_validator(mode="after")
    def _lengths(self) -> Sampling:
        if self.min_answer_tokens > self.max_answer_tokens:
            raise ValueError(f"min_answer_tokens ({self.min_answer_tokens}) is above max_answer_tokens "
                             f"({self.max_answer_tokens}): lower it")
        return self

    def knobs(self) -> dict[str, Any]:
        """The keyword arguments of rlhf.rollout.decode.decode and rlhf.rollout.hf.generate_tokens."""
        return {"do_sample": self.do_sample, "temperature": self.temperature, "top_k": self.top_k,
                "top_p": self.top_p, "max_new_tokens": self.max_answer_tokens}


class VLLMConfig(Group):
    """vLLM where it draws answers (rlhf/rollout/vllm.py), in the stage's own process: step 3's rollouts
    (`ppo.rollout.engine: vllm`, settings `ppo.rollout.vllm`) and evaluate's answers (`evaluate.engine: vllm`,
    settings `evaluate.vllm`)."""

    tensor_parallel_size: int = Field(1, gt=0)  # devices one actor is split over for generation (GPU)
    # share of the device's memory vLLM may take (weights, activations, KV cache) on a GPU; on CPU, see cpu_kv_cache_gib
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    cpu_kv_cache_gib: int = Field(1, gt=0)  # on CPU: the KV cache's size in GiB (VLLM_CPU_KVCACHE_SPACE)
    # release vLLM's KV cache and weights while the update trains, wake it before the next rollout (GPU only: vLLM
    # has no sleep mode on CPU)
    sleep: bool = True
    enforce_eager: bool = True  # no CUDA graphs and no torch.compile in vLLM: fast start (false: faster decode on GPU)
