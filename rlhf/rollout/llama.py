"""The lean one-token step of our decode loop (rlhf/rollout/decode.py) for Llama-family models (Llama, SmolLM2,
Qwen2, Mistral without sliding window): the model's own weights, a preallocated KV cache, rotary tables built once,
and the static form a CUDA graph captures."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

LEAN_TYPES = ("llama", "qwen2", "mistral")  # the model types the lean step runs (config.model_type)
Gather = Callable[[list[Any]], contextlib.AbstractContextManager[Any]]


Linear = tuple[Any, Any, tuple[tuple[Any, Any, float], ...]]  # weight, bias, LoRA adapters (A, B, scale) unmerged


def _weight(linear: Any, unmerged: bool = False) -> Linear:
    """(weight, bias, adapters) of a Linear, or of a LoRA layer's base Linear: its adapters merged into it (none
    listed) or, with `unmerged` (layered generation: the base weights are ZeRO-3 shards, gathered a layer group at a
    time, so there is no whole weight to merge into), each active adapter's A, B and scale, applied as
    x A^T B^T x scale beside the base weight, as peft's forward does."""
    base = linear.get_base_layer() if hasattr(linear, "get_base_layer") else linear
    if base is linear or getattr(linear, "merged", False):
        return base.weight, base.bias, ()
    if not unmerged:
        raise ValueError("LoRA adapters must be fused before the lean decode step reads the weights")
    names = [a for a in linear.active_adapters if a in linear.lora_A]
    if any(linear.use_dora.get(a) for a in names) or any(getattr(linear, "lora_bias", {}).get(a) for a in names):
        raise ValueError("the lean decode step applies plain LoRA adapters, not DoRA or adapter biases")
    return base.weight, base.bias, tuple((linear.lora_A[a].weight, linear.lora_B[a].weight, linear.scaling[a])
                                         for a in names)


def _linear(x: torch.Tensor, w: Linear) -> torch.Tensor:
    import torch.nn.functional as F

    out = F.linear(x, w[0], w[1])
    for a, b, scale in w[2]:
        out = out + F.linear(F.linear(x, a), b) * scale
    return out


def llama_model(model: torch.nn.Module) -> Any | None:
    """The decoder stack of a Llama-family causal LM the lean step can run, or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    inner = getattr(base, "model", None)
    if cfg is None or inner is None or getattr(cfg, "model_type", None) not in LEAN_TYPES:
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

    def __init__(self, model: torch.nn.Module, inner: Any, batch: int, width: int, gather: Gather | None = None,
                 layers_at_once: int = 0):
        """gather (ZeRO-3 without the whole model gathered): a context manager factory that holds the parameters it
        is given whole for its block; the decoder layers are then run `layers_at_once` at a time, each group gathered
        for its forward and released after it (the embeddings, final norm and head: `outer_params`, gathered by the
        caller for the whole rollout)."""
        import torch

        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        cfg = lm.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.scale = self.head_dim**-0.5
        self.layers = []
        unmerged = gather is not None  # layered: LoRA adapters beside the base weights (see _weight)
        for layer in inner.layers:
            att, mlp = layer.self_attn, layer.mlp
            lin = [_weight(m, unmerged) for m in (att.q_proj, att.k_proj, att.v_proj, att.o_proj,
                                                  mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
            self.layers.append((
                (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon), *lin[:4],
                (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon),
                *lin[4:], mlp.act_fn,
            ))
        self.gather = gather
        step = layers_at_once if gather is not None and layers_at_once > 0 else len(self.layers)
        self.groups = [(lo, min(lo + step, len(self.layers)),
                        [p for layer in inner.layers[lo: lo + step] for p in layer.parameters()])
                       for lo in range(0, len(self.layers), step)]
        if hasattr(inner.embed_tokens, "get_base_layer"):
            raise ValueError("the lean decode step reads the embeddings whole: no LoRA on embed_tokens")
        outer = [inner.embed_tokens.weight, inner.norm.weight, *lm.lm_head.parameters()]
        self.outer_params = list({id(p): p for p in outer}.values())  # a tied head is the embedding
        self.norm = (inner.norm.weight, inner.norm.variance_epsilon)
        self.head = _weight(lm.lm_head, unmerged)
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
        for lo, hi, params in self.groups:
            with self.gather(params) if self.gather is not None else contextlib.nullcontext():
                for i in range(lo, hi):
                    h = self._layer(i, h, b, t, cos, sin, start, end, static, mask)
        return _linear(self._rms(h[:, -1], self.norm), self.head).float()

    def _layer(self, i: int, h: torch.Tensor, b: int, t: int, cos: torch.Tensor, sin: torch.Tensor, start: Any,
               end: int | None, static: bool, mask: torch.Tensor | None) -> torch.Tensor:
        """Decoder layer i on the hidden states h, its keys and values written into the cache."""

        n1, q, k, v, o, n2, gate, up, down, act = self.layers[i]
        x = self._rms(h, n1)
        qs = _linear(x, q).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        ks = _linear(x, k).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        vs = _linear(x, v).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        qs, ks = self._rotate(qs, cos, sin), self._rotate(ks, cos, sin)
        kc, vc = self.k[i][:b], self.v[i][:b]
        if static:
            kc.index_copy_(2, start, ks)
            vc.index_copy_(2, start, vs)
        else:
            kc[:, :, start:end], vc[:, :, start:end] = ks, vs
        att = self._attend(qs, kc[:, :, :end], vc[:, :, :end], mask)
        h = h + _linear(att.transpose(1, 2).reshape(b, t, -1), o)
        x = self._rms(h, n2)
        return h + _linear(act(_linear(x, gate)) * _linear(x, up), down)

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
