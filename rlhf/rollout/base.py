"""The rollout interface: prompts and a sampling config in; answers (token ids, masks, the drawn tokens'
log-probabilities, why each answer ended) out.

Step 3's scoring, rewards and algorithms read a `Rollout` and nothing else of the engine that made it, so an engine
is one class with one method (`RolloutEngine.generate`). Three are built in, chosen by `ppo.rollout.engine`:

    own       rlhf/rollout/decode.py  our decode loop: preallocated KV cache, lean Llama-family step, CUDA graphs
    generate  rlhf/rollout/hf.py      transformers' generate, for any architecture
    vllm      rlhf/rollout/vllm.py    vLLM in this process, the actor's weights pushed to it after each update

The first two run on a model handed over by a context manager (the hybrid engine's generation mode: ZeRO-3 shards gathered
once, LoRA fused), draw with the same arithmetic, and stop on every stop id of the tokenizer (the chat template's
turn end, eos, generation_config's eos ids). A new engine (a multi-turn environment) subclasses `ModelRollout` or
implements `generate` outright and is added to `ENGINES`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from rlhf.config import Sampling

# ppo.rollout.engine -> the engine's class, imported when chosen ("module:Class")
ENGINES = {"own": "rlhf.rollout.decode:DecodeLoop", "generate": "rlhf.rollout.hf:GenerateRollout",
           "vllm": "rlhf.rollout.vllm:VLLMRollout"}

ModelContext = Callable[[], contextlib.AbstractContextManager[Any]]


@dataclass
class Rollout:
    """B answers to left-padded prompts of P = prompt_width tokens."""

    sequences: torch.Tensor  # (B, P + R) prompt + answer ids, padded after each answer's first stop id
    attention_mask: torch.Tensor  # (B, P + R) the prompt's mask, then 1 on answer tokens up to the first stop id
    action_mask: torch.Tensor  # (B, R) float 1 on answer tokens up to and including the first stop id
    logprobs: torch.Tensor | None  # (B, R) log pi_old of the drawn tokens from the rollout's own logits; None: recompute
    prompt_width: int  # P: answers start at sequences[:, P:]
    # per row: "stop" (drew a stop id), "length" (ran out of tokens) or, multi-turn, "turns" (ran out of turns)
    stop_reasons: list[str] = field(default_factory=list)
    # multi-turn (rlhf/rollout/turns.py): (B,) each episode's summed environment reward. Its answer is the whole
    # trajectory after the first prompt, model and environment tokens, action_mask 1 on the model's only
    env_rewards: torch.Tensor | None = None

    def answers(self) -> list[list[int]]:
        """Each answer's token ids where the action mask is 1: the model's own tokens (up to and including its stop
        id; multi-turn, every turn's, the environment's left out)."""
        rows = self.sequences[:, self.prompt_width :].tolist()
        keep = self.action_mask.bool().tolist()
        return [[t for t, k in zip(row, m, strict=True) if k] for row, m in zip(rows, keep, strict=True)]


class RolloutEngine(Protocol):
    """What step 3 needs of a rollout engine."""

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: Sampling) -> Rollout:
        """(B, P) left-padded prompts and their mask -> B answers, one per row."""
        ...


def answer_mask(answer: torch.Tensor, eos_token_id: int | Sequence[int]) -> torch.Tensor:
    """(B, R) float 1 on every answer position up to and including the first eos, 0 after it.

    answer: (B, R) generated token ids; eos_token_id: the id, or every id, that ends an answer (a chat model's
    turn end and its eos). By position, never by token id: generate pads after the eos with pad_token_id, which is
    the eos itself for many tokenizers (and for any that `load_tokenizer` gave a pad), so `answer !=
    pad_token_id` would drop the eos, the decision to stop. A row without eos is real throughout.
    """
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    is_eos = torch.isin(answer, torch.tensor(ids, device=answer.device)).long()  # (B, R)
    eos_before = is_eos.cumsum(-1) - is_eos  # (B, R) eos tokens strictly before position t
    return (eos_before == 0).float()


def finish(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sequences: torch.Tensor,
           logprobs: torch.Tensor | None, stop_ids: Sequence[int]) -> Rollout:
    """The Rollout of decoded `sequences` (B, P + R): the answer mask by position up to the first stop id (the pad
    after it may be that id itself), the prompt's own mask kept, and each row's stop reason."""
    p = prompt_ids.shape[1]
    answer = sequences[:, p:]
    action_mask = answer_mask(answer, stop_ids)
    stopped = torch.isin(answer, torch.tensor(list(stop_ids), device=answer.device)).any(-1).tolist()
    attention_mask = torch.cat([prompt_mask, action_mask.long()], dim=1)
    return Rollout(sequences, attention_mask, action_mask, logprobs, p,
                   ["stop" if s else "length" for s in stopped])


class ModelRollout:
    """An engine that decodes with a model held by `model_context()` (the hybrid engine's generation mode, or
    `contextlib.nullcontext(model)` for a plain model). Columns that are padding in every prompt are not fed to the
    model; subclasses implement `decode` on the rest."""

    def __init__(self, model_context: ModelContext, stop_ids: Sequence[int], pad_token_id: int,
                 cuda_graphs: bool = False):
        self.model_context, self.stop_ids, self.pad_token_id = model_context, list(stop_ids), pad_token_id
        self.cuda_graphs = cuda_graphs

    def decode(self, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
               sampling: Sampling) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, P') prompts without all-padding columns -> (sequences (B, P' + R), logprobs (B, R))."""
        raise NotImplementedError

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: Sampling) -> Rollout:
        from rlhf.models.prefix import first_real_column

        start = first_real_column(prompt_mask)
        with self.model_context() as model:
            sequences, logprobs = self.decode(model, prompt_ids[:, start:], prompt_mask[:, start:], sampling)
        sequences = torch.nn.functional.pad(sequences, (start, 0), value=self.pad_token_id)
        return finish(prompt_ids, prompt_mask, sequences, logprobs, self.stop_ids)


def make_rollout_engine(name: str, model_context: ModelContext, stop_ids: Sequence[int], pad_token_id: int,
                        cuda_graphs: bool = False, **options: Any) -> RolloutEngine:
    """The engine `ppo.rollout.engine` names (ENGINES), decoding with the model that `model_context()` holds;
    `options` go to engines that take more (vllm: the actor, the model folder, dtype, settings, seed)."""
    import importlib

    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)(model_context, stop_ids, pad_token_id, cuda_graphs, **options)
