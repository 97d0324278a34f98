"""Does torch.compile of a static-width decode step pay on this CPU? The 5M actor, batch 8, 16 + 32 tokens.

    PYTHONPATH=. python bench/decode_compile.py      # prints ms per step: eager static width, eager ours, compiled

A probe (bench/README.md section 2 has its figures), not part of run_all: the step is rlhf.rollout.decode.LlamaDecoder.forward
written for one fixed cache width (attention over every column with a mask) so that inductor compiles it once.
"""
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf.rollout.decode import LlamaDecoder, _llama_model

torch.set_num_threads(1)
v, h, layers, hd, i = (512, 256, 6, 4, 768)
cfg = LlamaConfig(vocab_size=v, hidden_size=h, num_hidden_layers=layers, num_attention_heads=hd,
                  num_key_value_heads=hd, intermediate_size=i, max_position_embeddings=512)
torch.manual_seed(0)
m = LlamaForCausalLM(cfg).eval()
B, P, R = 8, 16, 32
W = P + R
dec = LlamaDecoder(m, _llama_model(m), B, W)

def step(tok, col, pos, mask):
    """static shapes: tok (B,1), col (1,) long, pos (B,1), mask (B,1,1,W) bool"""
    b = tok.shape[0]
    x0 = F.embedding(tok, dec.embed)
    cos, sin = dec.cos[pos][:, None], dec.sin[pos][:, None]
    hh = x0
    for li, (n1, q, k, vv, o, n2, gate, up, down, act) in enumerate(dec.layers):
        x = dec._rms(hh, n1)
        qs = F.linear(x, *q[:2]).view(b, 1, dec.heads, dec.head_dim).transpose(1, 2)
        ks = F.linear(x, *k[:2]).view(b, 1, dec.kv_heads, dec.head_dim).transpose(1, 2)
        vs = F.linear(x, *vv[:2]).view(b, 1, dec.kv_heads, dec.head_dim).transpose(1, 2)
        qs, ks = dec._rotate(qs, cos, sin), dec._rotate(ks, cos, sin)
        dec.k[li].index_copy_(2, col, ks)
        dec.v[li].index_copy_(2, col, vs)
        att = F.scaled_dot_product_attention(qs, dec.k[li], dec.v[li], attn_mask=mask, scale=dec.scale)
        hh = hh + F.linear(att.transpose(1, 2).reshape(b, 1, -1), *o[:2])
        x = dec._rms(hh, n2)
        hh = hh + F.linear(act(F.linear(x, *gate[:2])) * F.linear(x, *up[:2]), *down[:2])
    return F.linear(dec._rms(hh[:, -1], dec.norm), *dec.head[:2]).float()

with torch.no_grad():
    ids = torch.randint(3, v, (B, P))
    dec.forward(ids, 0, torch.arange(P).expand(B, P), None)
    tok = torch.randint(3, v, (B, 1))
    mask = torch.zeros(B, 1, 1, W, dtype=torch.bool)
    mask[..., :P + 1] = True
    def run(fn, n=R):
        t0 = time.perf_counter()
        for j in range(n):
            c = torch.tensor([P + (j % R)])
            mask[..., : P + (j % R) + 1] = True
            fn(tok, c, torch.full((B, 1), P + (j % R)), mask)
        return (time.perf_counter() - t0) / n * 1e3
    run(step)
    eager = min(run(step) for _ in range(3))
    t0 = time.perf_counter()
    cstep = torch.compile(step, dynamic=False)
    cstep(tok, torch.tensor([P]), torch.full((B, 1), P), mask)
    ct = time.perf_counter() - t0
    comp = min(run(cstep) for _ in range(3))
    # the eager variable-width step as decode uses it
    dyn = min(run(lambda t, c, p, mk: dec.forward(t, int(c), p, None)) for _ in range(3))
    print(f"eager static-width {eager:.2f} ms/step, eager variable width {dyn:.2f}, compiled {comp:.2f} ms/step, "
          f"compile {ct:.1f} s")
