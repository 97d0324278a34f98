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

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rlhf.config import Sampling
from rlhf.rollout.base import ModelRollout

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


# ------------------------------------------------------------------------------------------ the lean Llama step


def _weight(linear: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a Linear, or of a LoRA layer's base Linear once the adapters are merged into it."""
    base = linear.get_base_layer() if hasattr(linear, "get_base_layer") else linear
    if base is not linear and not getattr(linear, "merged", False):
        raise ValueError("LoRA adapters must be fused before the lean decode step reads the weights")
    return base.weight, base.bias


def _llama_model(model: torch.nn.Module) -> Any | None:
    """The decoder stack of a Llama-family causal LM the lean step can run, or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    inner = getattr(base, "model", None)
    if cfg is None or inner is None or getattr(cfg, "model_type", None) not in ("llama", "qwen2", "mistral"):
        return None
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return None  # a window changes the mask
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") not in ("default", "linear", "llama3"):
        return None  # dynamic/long RoPE recomputes its frequencies with the length
    if getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return None
    return inner


class LlamaDecoder:
    """Prefill + one-token steps over a Llama-family model's own weights and a preallocated KV cache.

    Arithmetic follows transformers' Llama layers (float32 RMSNorm, rotary as q * cos + rotate_half(q) * sin,
    scaled_dot_product_attention with the same mask and GQA layout), so logits equal the model forward's up to the
    order of float sums."""

    def __init__(self, model: torch.nn.Module, inner: Any, batch: int, width: int):
        import torch

        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        cfg = lm.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.scale = self.head_dim**-0.5
        self.layers = []
        for layer in inner.layers:
            att, mlp = layer.self_attn, layer.mlp
            self.layers.append((
                (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
                _weight(att.q_proj), _weight(att.k_proj), _weight(att.v_proj), _weight(att.o_proj),
                (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon),
                _weight(mlp.gate_proj), _weight(mlp.up_proj), _weight(mlp.down_proj), mlp.act_fn,
            ))
        self.norm = (inner.norm.weight, inner.norm.variance_epsilon)
        self.head = _weight(lm.lm_head)
        self.embed = emb = inner.embed_tokens.weight
        # rotary cos/sin of every position of the rollout, computed as LlamaRotaryEmbedding.forward does
        rot = inner.rotary_emb
        freqs = torch.arange(width, device=emb.device).float()[:, None] * rot.inv_freq.float()[None, :]
        table = torch.cat((freqs, freqs), dim=-1)
        self.cos = (table.cos() * rot.attention_scaling).to(emb.dtype)  # (width, head_dim)
        self.sin = (table.sin() * rot.attention_scaling).to(emb.dtype)
        shape = (batch, self.kv_heads, width, self.head_dim)
        # zeros, not empty: the static step attends over unfilled columns too (masked; 0 x NaN would be NaN)
        self.k = [torch.zeros(shape, dtype=emb.dtype, device=emb.device) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=emb.dtype, device=emb.device) for _ in self.layers]

    @staticmethod
    def _rms(x: torch.Tensor, norm: tuple[Any, float]) -> torch.Tensor:
        import torch

        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm[1])
        return norm[0] * h.to(x.dtype)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        import torch

        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q (B, H, T, D) against k/v (B, Hkv, S, D); mask None (no padding: causal when T > 1) or bool (B, 1, T, S).
        GQA as transformers' sdpa_attention_forward lays it out."""
        import torch.nn.functional as F

        groups = self.heads // self.kv_heads
        b, _, t, d = q.shape
        if groups > 1 and mask is None:
            return F.scaled_dot_product_attention(q, k, v, scale=self.scale, is_causal=t > 1, enable_gqa=True)
        if groups > 1 and t == 1:  # one query per head: (B, Hkv, groups, D), every head of a group on its k/v
            out = F.scaled_dot_product_attention(q.reshape(b, self.kv_heads, groups, d), k, v, attn_mask=mask,
                                                 scale=self.scale)
            return out.reshape(b, self.heads, 1, d)
        if groups > 1:
            k = k[:, :, None].expand(b, self.kv_heads, groups, *k.shape[2:]).reshape(b, self.heads, *k.shape[2:])
            v = v[:, :, None].expand(b, self.kv_heads, groups, *v.shape[2:]).reshape(b, self.heads, *v.shape[2:])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, is_causal=mask is None and t > 1)

    def forward(self, ids: torch.Tensor, start: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Run (b, T) tokens into cache rows 0 .. b - 1 at columns start .. start + T - 1; return the (b, V) float32
        logits of the last one. positions: (b, T) rotary positions; mask: None (no padding) or bool
        (b, 1, T, start + T), what each query sees.
        The static form (one token, shapes independent of the column, as a CUDA graph needs): start a (1,) long
        tensor, mask bool (b, 1, 1, width) over the whole cache."""
        import torch.nn.functional as F

        b, t = ids.shape
        static = not isinstance(start, int)
        end = None if static else start + t
        h = F.embedding(ids, self.embed)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # (b, 1, T, D)
        for i, (n1, q, k, v, o, n2, gate, up, down, act) in enumerate(self.layers):
            x = self._rms(h, n1)
            qs = F.linear(x, *q).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            ks = F.linear(x, *k).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            vs = F.linear(x, *v).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            qs, ks = self._rotate(qs, cos, sin), self._rotate(ks, cos, sin)
            kc, vc = self.k[i][:b], self.v[i][:b]
            if static:
                kc.index_copy_(2, start, ks)
                vc.index_copy_(2, start, vs)
            else:
                kc[:, :, start:end], vc[:, :, start:end] = ks, vs
            att = self._attend(qs, kc[:, :, :end], vc[:, :, :end], mask)
            h = h + F.linear(att.transpose(1, 2).reshape(b, t, -1), *o)
            x = self._rms(h, n2)
            h = h + F.linear(act(F.linear(x, *gate)) * F.linear(x, *up), *down)
        return F.linear(self._rms(h[:, -1], self.norm), *self.head).float()

    def copy_rows(self, src: Any, width: int) -> None:
        """Row r of the cache takes the first `width` columns of row src[r] (a prompt's rows from where it was
        prefilled once)."""
        for cache in (*self.k, *self.v):
            cache[:, :, :width] = cache[src, :, :width]


class StaticStep:
    """The one-token step with static shapes: (B,) tokens at cache column `col` -> (B, V) float32 logits, every
    input copied into buffers the step reads. capture=True (CUDA) records it once as a CUDA graph and replays it;
    capture=False runs it eagerly (how CPU tests check the static arithmetic against the plain step)."""

    def __init__(self, dec: LlamaDecoder, batch: int, width: int, capture: bool):
        import torch

        device = dec.embed.device
        self.dec, self.graph = dec, None
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.col = torch.full((1,), width - 1, dtype=torch.long, device=device)  # never attended before it is written
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.mask = torch.zeros(batch, 1, 1, width, dtype=torch.bool, device=device)
        self.mask[..., 0] = True
        if not capture:
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture stream, as torch.cuda.graphs advises
            for _ in range(2):
                self._run()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._run()

    def _run(self) -> torch.Tensor:
        return self.dec.forward(self.tokens, self.col, self.positions, self.mask)

    def __call__(self, tokens: torch.Tensor, col: int, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens[:, None])
        self.col.fill_(col)
        self.positions.copy_(positions)
        self.mask.copy_(mask[:, None, None, :])
        if self.graph is None:
            return self._run()
        self.graph.replay()
        return self.logits


# ------------------------------------------------------------------------------------------ the loop

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
) -> Decoded:
    """(B, P) left-padded prompts -> Decoded with sequences (B, P + R), R <= max_new_tokens (the step at which every
    row had stopped), as `generate` returns them; model in eval mode under no_grad (the hybrid engine's generation
    mode). Each distinct prompt is prefilled once. eos_token_id: the id, or every id, that ends an answer (a chat
    model's turn end and its eos: rlhf.models.tokenizer.stop_ids). min_new_tokens: eos is not drawn before that many tokens
    (benchmarks use it for answers of a fixed length). cuda_graphs: on CUDA, replay the Llama-family step as a
    CUDA graph (ignored elsewhere). static_step: the graph's static step run eagerly (tests, on CPU)."""
    from rlhf.models.prefix import position_ids, prompt_groups

    b, p = input_ids.shape
    width = p + max_new_tokens
    inner = _llama_model(model)
    if inner is None:
        return _decode_with_forward(model, input_ids, attention_mask, do_sample=do_sample, temperature=temperature,
                                    top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens,
                                    pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                                    min_new_tokens=min_new_tokens)
    dec = LlamaDecoder(model, inner, b, width)
    groups = prompt_groups(input_ids, attention_mask)
    first, inverse = groups if groups is not None else (None, None)
    ids, pmask = (input_ids, attention_mask) if first is None else (input_ids[first], attention_mask[first])
    logits = dec.forward(ids, 0, position_ids(pmask), _prefill_mask(pmask))  # distinct prompts in rows 0 .. U - 1
    if first is not None:
        dec.copy_rows(inverse, p)
        logits = logits[inverse]
    next_pos = attention_mask.long().sum(-1)  # (B,) position of the first answer token
    padded = not bool(attention_mask.all())
    capture = cuda_graphs and input_ids.is_cuda
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
                 sync_every=_SYNC_EVERY if capture or static_step else 1)


def _loop(step: Any, logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, do_sample: bool,
          temperature: float, top_k: int, top_p: float, max_new_tokens: int, pad_token_id: int,
          eos_token_id: int | list[int], min_new_tokens: int, sync_every: int = 1) -> Decoded:
    """Sample from `logits`, feed the tokens to `step(tokens (B,), column, mask) -> next logits`, until every row
    drew its eos or max_new_tokens. mask: bool (B, P + max_new_tokens), the prompts' attention mask then the answer
    columns, set as they fill. sync_every: tokens between the host's checks that some row still runs (each check
    waits for the device); the tokens drawn after the batch stopped are all pad and are cut off."""
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
            if not bool(running.any()):
                break
        else:
            alive[n - 1] = running.any()
            if n % sync_every == 0 and not bool(alive[n - 1]):
                break
        logits = step(tokens, p + n - 1, mask)
    if sync_every > 1 and not bool(alive[:n].all()):  # the batch stopped after token `stop` - 1
        n = int((~alive[:n]).nonzero()[0]) + 1
    return Decoded(torch.cat([input_ids, out[:, :n]], dim=1), logprobs[:, :n])


def _decode_with_forward(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                         do_sample: bool, temperature: float, top_k: int, top_p: float, max_new_tokens: int,
                         pad_token_id: int, eos_token_id: int | list[int], min_new_tokens: int = 0) -> Decoded:
    """The same loop for any causal LM: its own forward and a DynamicCache (shared prompts prefilled once)."""
    from rlhf.models.prefix import position_ids, prefill_shared

    p = input_ids.shape[1]
    cache = prefill_shared(model, input_ids, attention_mask)
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
                 max_new_tokens, pad_token_id, eos_token_id, min_new_tokens)


class DecodeLoop(ModelRollout):
    """ppo.rollout.engine: own, the rollout engine of this module's `decode`."""

    def decode(self, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
               sampling: Sampling) -> tuple[torch.Tensor, torch.Tensor]:
        out = decode(model, ids, mask, **sampling.knobs(), pad_token_id=self.pad_token_id, eos_token_id=self.stop_ids,
                     min_new_tokens=sampling.min_answer_tokens, cuda_graphs=self.cuda_graphs)
        return out.sequences, out.logprobs
