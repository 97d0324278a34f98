"""Our decode loop: the hybrid engine's generation mode without `transformers.generate`.

At the sizes step 3 runs on a CPU (5M-135M parameters), a rollout's time is mostly per-token overhead, not matmul:
`generate` walks logits processors, stopping criteria and cache bookkeeping every token, and the model's forward
builds masks, rotary tables and cache objects every token. This loop does one thing per token:

- **prefill** each distinct prompt once (rollouts repeat each prompt `answers_per_prompt` times) and copy its
  keys/values to its rows of a **preallocated KV cache** of the whole rollout's width (B, heads, P + R, head dim);
- **decode** one token for every row with a lean forward over the model's own weights (Llama-family layers:
  Llama, SmolLM2, Qwen2, Mistral without sliding window): the rotary table for every position is built once, the
  key/value of the new token is written in place, attention runs over the filled part of the cache;
- **sample** once on the float32 logits: temperature, top-k, top-p in transformers' order and arithmetic, one
  `torch.multinomial` draw (so a seed draws what `generate` draws from the same logits); the log-probability of the
  drawn token under log_softmax(logits / temperature), PPO's log pi_old, comes out of the same step;
- **stop** a row at its eos (later positions get pad, as `generate` does) and the batch when every row stopped.

On CUDA (ppo.rollout.cuda_graphs) the one-token step is captured once per rollout as a **CUDA graph** and replayed every
token: its shapes are made static by attending over the cache's whole width with a mask (unfilled columns masked,
the cache zero-initialised) and by writing the new key/value at a column held in a device tensor, so one replay
launches the step's hundreds of kernels at once; the loop then asks the GPU whether every row stopped once every
`_SYNC_EVERY` tokens instead of every token, and trims the extra columns (they hold pad) afterwards.

Any other architecture runs the same loop through the model's own forward and a DynamicCache (`decode` chooses).
Greedy output equals `generate`'s; sampled output too where the float arithmetic allows (tests/rollout/test_decode.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rlhf.config import Sampling
from rlhf.errors import UserError
from rlhf.rollout.base import ModelContext, ModelRollout
from rlhf.rollout.llama import Gather, LlamaDecoder, StaticStep, llama_model

if TYPE_CHECKING:
    import torch



@dataclass
class Decoded:
    sequences: torch.Tensor  # (B, P + R) prompts then answers; after a row's eos, pad_token_id
    logprobs: torch.Tensor  # (B, R) float32 log softmax(logits / temperature) of each drawn token, whole vocabulary


def sample(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """One sampling step on (B, V) float32 logits -> (B,) tokens: argmax, or transformers' order and arithmetic
    (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, softmax, one multinomial draw), so that one seed
    draws the same tokens from the same logits."""
    import torch

    if not do_sample:
        return torch.argmax(logits, dim=-1)
    scores = logits / temperature if temperature != 1.0 else logits
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]))[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(scores, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False  # keep at least one token
        scores = scores.masked_fill(remove.scatter(1, sorted_idx, remove), -float("inf"))
    return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)


_SYNC_EVERY = 8  # tokens between "has every row stopped?" checks when the step runs as a CUDA graph


def _prefill_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """None when no row has padding (then attention is plainly causal), else bool (B, 1, P, P): causal and not
    padding, as transformers' create_causal_mask builds it for sdpa."""
    import torch

    if bool(mask.all()):
        return None
    p = mask.shape[1]
    causal = torch.ones(p, p, dtype=torch.bool, device=mask.device).tril()
    # a padding query sees itself: a row that sees nothing would be NaN, and NaN keys/values poison the cache even
    # where they are masked out (0 x NaN); real tokens never see padding, so their outputs do not change
    return (causal[None, None] & mask.bool()[:, None, None, :]) | torch.eye(p, dtype=torch.bool, device=mask.device)


def decode(
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
    min_new_tokens: int = 0,
    cuda_graphs: bool = False,
    static_step: bool = False,
    gather: Gather | None = None,
    layers_at_once: int = 0,
) -> Decoded:
    """(B, P) left-padded prompts -> Decoded with sequences (B, P + R), R <= max_new_tokens (the step at which every
    row had stopped), as `generate` returns them; model in eval mode under no_grad (the hybrid engine's generation
    mode). Each distinct prompt is prefilled once. eos_token_id: the id, or every id, that ends an answer (a chat
    model's turn end and its eos: rlhf.models.tokenizer.stop_ids). min_new_tokens: eos is not drawn before that many tokens
    (benchmarks use it for answers of a fixed length). cuda_graphs: on CUDA, replay the Llama-family step as a
    CUDA graph (ignored elsewhere). static_step: the graph's static step run eagerly (tests, on CPU). gather,
    layers_at_once: ZeRO-3 shards decoded `layers_at_once` decoder layers at a time (rlhf.rollout.llama.LlamaDecoder,
    LoRA adapters applied beside the base weights), or, for other architectures, through the model's forward with
    DeepSpeed's hooks fetching each module; every rank steps until every rank's rows stopped, as each step
    gathers."""

    b, p = input_ids.shape
    width = p + max_new_tokens
    inner = llama_model(model)
    if gather is not None and inner is None:  # DeepSpeed's own hooks fetch each module as the forward reaches it
        return _decode_with_forward(model, input_ids, attention_mask, do_sample=do_sample, temperature=temperature,
                                    top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens,
                                    pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                                    min_new_tokens=min_new_tokens, synced=True)
    if gather is not None:
        try:
            dec = LlamaDecoder(model, inner, b, width, gather, layers_at_once)
        except ValueError as err:
            raise UserError(f"ppo.rollout.gather_layers: {err}") from None
        with gather(dec.outer_params):  # embeddings, final norm and head: whole for the rollout
            return _decode_llama(dec, input_ids, attention_mask, do_sample, temperature, top_k, top_p,
                                 max_new_tokens, pad_token_id, eos_token_id, min_new_tokens, False, False, True)
    if inner is None:
        return _decode_with_forward(model, input_ids, attention_mask, do_sample=do_sample, temperature=temperature,
                                    top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens,
                                    pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                                    min_new_tokens=min_new_tokens)
    return _decode_llama(LlamaDecoder(model, inner, b, width), input_ids, attention_mask, do_sample, temperature,
                         top_k, top_p, max_new_tokens, pad_token_id, eos_token_id, min_new_tokens,
                         cuda_graphs and input_ids.is_cuda, static_step, False)


def _decode_llama(dec: LlamaDecoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, do_sample: bool,
                  temperature: float, top_k: int, top_p: float, max_new_tokens: int, pad_token_id: int,
                  eos_token_id: int | list[int], min_new_tokens: int, capture: bool, static_step: bool,
                  synced: bool) -> Decoded:
    from rlhf.models.prefix import position_ids, prompt_groups

    b, p = input_ids.shape
    width = p + max_new_tokens
    groups = prompt_groups(input_ids, attention_mask)
    first, inverse = groups if groups is not None else (None, None)
    ids, pmask = (input_ids, attention_mask) if first is None else (input_ids[first], attention_mask[first])
    logits = dec.forward(ids, 0, position_ids(pmask), _prefill_mask(pmask))  # distinct prompts in rows 0 .. U - 1
    if first is not None:
        dec.copy_rows(inverse, p)
        logits = logits[inverse]
    next_pos = attention_mask.long().sum(-1)  # (B,) position of the first answer token
    padded = not bool(attention_mask.all())
    if capture or static_step:
        graphed = StaticStep(dec, b, width, capture)

        def step(tokens: torch.Tensor, col: int, mask: torch.Tensor) -> torch.Tensor:
            return graphed(tokens, col, (next_pos + col - p)[:, None], mask)
    else:
        def step(tokens: torch.Tensor, col: int, mask: torch.Tensor) -> torch.Tensor:
            seen = mask[:, None, None, : col + 1] if padded else None
            return dec.forward(tokens[:, None], col, (next_pos + col - p)[:, None], seen)

    return _loop(step, logits, input_ids, attention_mask, do_sample, temperature, top_k, top_p, max_new_tokens,
                 pad_token_id, eos_token_id, min_new_tokens,
                 sync_every=_SYNC_EVERY if capture or static_step else 1, synced=synced)


def _loop(step: Any, logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, do_sample: bool,
          temperature: float, top_k: int, top_p: float, max_new_tokens: int, pad_token_id: int,
          eos_token_id: int | list[int], min_new_tokens: int, sync_every: int = 1, synced: bool = False) -> Decoded:
    """Sample from `logits`, feed the tokens to `step(tokens (B,), column, mask) -> next logits`, until every row
    drew its eos or max_new_tokens. mask: bool (B, P + max_new_tokens), the prompts' attention mask then the answer
    columns, set as they fill. sync_every: tokens between the host's checks that some row still runs (each check
    waits for the device); the tokens drawn after the batch stopped are all pad and are cut off. synced: stop only
    when every rank's rows stopped (each step is a collective: every rank must take the same steps)."""
    import torch

    from rlhf.models.logprobs import logprobs_from_logits

    b, p = input_ids.shape
    mask = torch.zeros(b, p + max_new_tokens, dtype=torch.bool, device=input_ids.device)
    mask[:, :p] = attention_mask.bool()
    out = torch.full((b, max_new_tokens), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    logprobs = torch.zeros(b, max_new_tokens, dtype=torch.float32, device=input_ids.device)
    running = torch.ones(b, dtype=torch.bool, device=input_ids.device)
    eos = torch.tensor(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id], device=input_ids.device)
    if sync_every > 1:  # alive[n]: some row still runs after token n
        alive = torch.zeros(max_new_tokens, dtype=torch.bool, device=input_ids.device)
    n = 0
    while True:
        # eos not yet allowed: its logit -inf for the draw only (transformers' MinNewTokensLengthLogitsProcessor)
        allowed = logits if n >= min_new_tokens else logits.index_fill(-1, eos, -float("inf"))
        tokens = torch.where(running, sample(allowed, do_sample, temperature, top_k, top_p), pad_token_id)
        # log pi_old of the token placed, over the whole vocabulary (see PPOConfig.sampling)
        out[:, n], logprobs[:, n] = tokens, logprobs_from_logits(logits[:, None], tokens[:, None], temperature)[:, 0]
        mask[:, p + n] = True  # generate attends to every fed token, pad after eos included
        running &= ~torch.isin(tokens, eos)
        n += 1
        if n == max_new_tokens:
            break
        if sync_every == 1:
            if not _any_rank(running.any(), synced):
                break
        else:
            alive[n - 1] = running.any()
            if n % sync_every == 0 and not bool(alive[n - 1]):
                break
        logits = step(tokens, p + n - 1, mask)
    if sync_every > 1 and not bool(alive[:n].all()):  # the batch stopped after token `stop` - 1
        n = int((~alive[:n]).nonzero()[0]) + 1
    return Decoded(torch.cat([input_ids, out[:, :n]], dim=1), logprobs[:, :n])


def _any_rank(flag: torch.Tensor, synced: bool) -> bool:
    """`flag` on this rank, or (synced) on any rank."""
    if synced:
        import torch

        flag = flag.to(torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag)


def _decode_with_forward(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                         do_sample: bool, temperature: float, top_k: int, top_p: float, max_new_tokens: int,
                         pad_token_id: int, eos_token_id: int | list[int], min_new_tokens: int = 0,
                         synced: bool = False) -> Decoded:
    """The same loop for any causal LM: its own forward and a DynamicCache (shared prompts prefilled once). synced:
    the model is ZeRO-3 shards that DeepSpeed's hooks gather module by module in each forward (every rank steps
    until every rank's rows stopped)."""
    from rlhf.models.prefix import position_ids, prefill_shared

    p = input_ids.shape[1]
    # synced: one forward per step on every rank (each gathers), so no extra prefill where this rank's prompts repeat
    cache = None if synced else prefill_shared(model, input_ids, attention_mask)
    if cache is None:
        from transformers import DynamicCache

        cache, head = DynamicCache(), 0
    else:
        head = p - 1  # the shared cache holds every prompt column but the last
    am = attention_mask.long()
    out = model(input_ids=input_ids[:, head:], attention_mask=am, position_ids=position_ids(am)[:, head:],
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    next_pos = am.sum(-1)

    def step(tokens: torch.Tensor, col: int, mask: torch.Tensor) -> torch.Tensor:
        o = model(input_ids=tokens[:, None], attention_mask=mask[:, : col + 1].long(),
                  position_ids=(next_pos + col - p)[:, None], past_key_values=cache, use_cache=True)
        return o.logits[:, -1].float()

    return _loop(step, out.logits[:, -1].float(), input_ids, attention_mask, do_sample, temperature, top_k, top_p,
                 max_new_tokens, pad_token_id, eos_token_id, min_new_tokens, synced=synced)


class DecodeLoop(ModelRollout):
    """ppo.rollout.engine: own, the rollout engine of this module's `decode`. gather / layers_at_once: ZeRO-3's
    layer groups gathered in turn (ppo.rollout.gather_layers, the hybrid engine's layer_gather)."""

    def __init__(self, model_context: ModelContext, stop_ids: Sequence[int], pad_token_id: int,
                 cuda_graphs: bool = False, *, gather: Gather | None = None, layers_at_once: int = 0):
        super().__init__(model_context, stop_ids, pad_token_id, cuda_graphs and gather is None)
        self.gather, self.layers_at_once = gather, layers_at_once

    def decode(self, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
               sampling: Sampling) -> tuple[torch.Tensor, torch.Tensor]:
        out = decode(model, ids, mask, **sampling.knobs(), pad_token_id=self.pad_token_id, eos_token_id=self.stop_ids,
                     min_new_tokens=sampling.min_answer_tokens, cuda_graphs=self.cuda_graphs, gather=self.gather,
                     layers_at_once=self.layers_at_once)
        return out.sequences, out.logprobs
