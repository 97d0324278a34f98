"""Rollouts through transformers' generate (ppo.rollout.engine: generate), with the same stop ids as our loop."""

from __future__ import annotations

from typing import Any

import torch

from rlhf.config import Sampling
from rlhf.rollout.base import ModelRollout


def generate_tokens(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    do_sample: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_id: int | list[int],
    **kwargs: Any,
) -> torch.Tensor:
    """`model.generate` with every knob that decides which tokens are drawn given here and none taken elsewhere.

    transformers fills each knob a call leaves unset from the model's generation_config (a hub model's may set
    temperature, top_k, top_p, repetition_penalty, min_p ...), then from its own defaults, top_k=50 among them. So
    the model's generation_config is set aside for the call (restored after), and temperature/top_k/top_p
    (0 = off, 1.0 = off) are always passed when sampling. eos_token_id: every id that ends an answer
    (rlhf.models.tokenizer.stop_ids: the template's turn end, eos and generation_config's eos ids, which setting the
    generation_config aside would otherwise drop). kwargs: the rest (past_key_values, return_dict_in_generate,
    output_logits, streamer ...)."""
    from transformers import GenerationConfig

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = base.generation_config
    base.generation_config = GenerationConfig()
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p} if do_sample else {}
    try:
        return model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=do_sample,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            **sampling,
            **kwargs,
        )
    finally:
        base.generation_config = saved


class GenerateRollout(ModelRollout):
    """ppo.rollout.engine: generate, transformers' generate as a rollout engine (any architecture). A prompt that several
    rows repeat is prefilled once; the drawn tokens' log-probabilities come from the raw logits, before any
    processing, as our loop scores them."""

    def decode(self, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
               sampling: Sampling) -> tuple[torch.Tensor, torch.Tensor]:
        from rlhf.models.logprobs import logprobs_from_logits
        from rlhf.models.prefix import prefill_shared

        extra = {"min_new_tokens": sampling.min_answer_tokens} if sampling.min_answer_tokens else {}
        out = generate_tokens(model, ids, mask, **sampling.knobs(), pad_token_id=self.pad_token_id,
                              eos_token_id=self.stop_ids, use_cache=True, past_key_values=prefill_shared(model, ids, mask),
                              return_dict_in_generate=True, output_logits=True, **extra)
        logprobs = logprobs_from_logits(torch.stack(out.logits, dim=1), out.sequences[:, ids.shape[1]:],
                                        sampling.temperature)
        return out.sequences, logprobs
