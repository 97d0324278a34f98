"""Our decode loop (rlhf.rollout.decode) against transformers' generate: the same tokens for the same seed and the
log-probabilities generate's raw logits give, on Llama-family models (the lean step) and others (the model's own
forward), with left padding, repeated prompts, GQA, top-k/top-p, min_new_tokens and a pad token that is the eos."""

from __future__ import annotations

import pytest
import torch

from rlhf.models.logprobs import logprobs_from_logits
from rlhf.rollout.decode import decode, sample
from rlhf.rollout.hf import generate_tokens

EOS = 5


def _llama(kv_heads: int = 4, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, intermediate_size=128, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def _eos_bias(lm, value: float) -> None:
    """A bias on the LM head that favours eos (both decoders read the head's bias)."""
    bias = torch.zeros(lm.lm_head.out_features)
    bias[EOS] = value
    lm.lm_head.bias = torch.nn.Parameter(bias)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                      bos_token_id=1, eos_token_id=EOS)).eval()


def _prompts(padded: bool, repeat: int, rows: int = 5, width: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(6, 96, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    if padded:  # left padding of 0..3 columns, the longest prompt fills the width
        for i in range(rows):
            ids[i, : i % 4], mask[i, : i % 4] = 0, 0
    return ids.repeat_interleave(repeat, 0), mask.repeat_interleave(repeat, 0)


def _both(model, ids, mask, **kw):
    """(generate's output with raw logits, ours), each drawn from seed 3."""
    with torch.no_grad():
        torch.manual_seed(3)
        want = generate_tokens(model, ids, mask, return_dict_in_generate=True, output_logits=True, **kw)
        torch.manual_seed(3)
        got = decode(model, ids, mask, **kw)
    return want, got


GREEDY = dict(do_sample=False, temperature=1.0, top_k=0, top_p=1.0)
SAMPLED = dict(do_sample=True, temperature=0.7, top_k=40, top_p=0.9)


@pytest.mark.parametrize("model", ["llama", "llama-gqa", "gpt2"])
@pytest.mark.parametrize("padded, repeat", [(False, 1), (True, 1), (True, 3)], ids=["full", "left-padded", "groups"])
@pytest.mark.parametrize("knobs", [GREEDY, SAMPLED, {**SAMPLED, "top_k": 0, "top_p": 1.0, "temperature": 1.0}],
                         ids=["greedy", "top-k-top-p", "plain-sampling"])
def test_decode_draws_what_generate_draws(model: str, padded: bool, repeat: int, knobs: dict) -> None:
    lm = {"llama": _llama, "llama-gqa": lambda: _llama(kv_heads=2), "gpt2": _gpt2}[model]()
    ids, mask = _prompts(padded, repeat)
    # pad is the eos, as with many chat tokenizers: rows that stopped are filled with it
    want, got = _both(lm, ids, mask, max_new_tokens=20, pad_token_id=EOS, eos_token_id=EOS, **knobs)
    assert torch.equal(got.sequences, want.sequences)
    answer = want.sequences[:, ids.shape[1]:]
    expect = logprobs_from_logits(torch.stack(want.logits, 1), answer, knobs["temperature"])
    torch.testing.assert_close(got.logprobs, expect, atol=1e-5, rtol=0)
    assert got.logprobs.shape == answer.shape and bool((got.logprobs <= 0).all())


@pytest.mark.parametrize("model", ["llama", "llama-gqa"])
@pytest.mark.parametrize("padded, repeat", [(False, 1), (True, 1), (True, 3)], ids=["full", "left-padded", "groups"])
@pytest.mark.parametrize("knobs", [GREEDY, SAMPLED], ids=["greedy", "top-k-top-p"])
def test_static_step_of_the_cuda_graph_draws_what_generate_draws(model: str, padded: bool, repeat: int,
                                                                 knobs: dict) -> None:
    """The step a CUDA graph replays (whole-width masked attention over a zeroed cache, the column in a tensor,
    the stop checked every few tokens), run eagerly on CPU: the tokens and log-probs of generate."""
    lm = _llama(kv_heads=2 if model == "llama-gqa" else 4)
    ids, mask = _prompts(padded, repeat)
    want, _ = _both(lm, ids, mask, max_new_tokens=20, pad_token_id=EOS, eos_token_id=EOS, **knobs)
    with torch.no_grad():
        torch.manual_seed(3)
        got = decode(lm, ids, mask, max_new_tokens=20, pad_token_id=EOS, eos_token_id=EOS, static_step=True, **knobs)
    assert torch.equal(got.sequences, want.sequences)
    expect = logprobs_from_logits(torch.stack(want.logits, 1), want.sequences[:, ids.shape[1]:], knobs["temperature"])
    torch.testing.assert_close(got.logprobs, expect, atol=1e-5, rtol=0)


@pytest.mark.parametrize("static_step", [False, True], ids=["plain-step", "static-step"])
def test_rows_stop_at_their_eos_and_the_batch_when_all_did(static_step: bool) -> None:
    """An eos that comes often: each row is pad after its first eos, and decoding stops at the step where the
    last row drew one (the sequences are as wide as generate's, not max_new_tokens)."""
    lm = _llama()
    _eos_bias(lm, 2.5)  # eos likely, not certain
    ids, mask = _prompts(True, 2)
    want, got = _both(lm, ids, mask, max_new_tokens=40, pad_token_id=0, eos_token_id=EOS, **SAMPLED)
    if static_step:  # the stop is checked every 8 tokens there: the columns drawn after it are cut off
        with torch.no_grad():
            torch.manual_seed(3)
            got = decode(lm, ids, mask, max_new_tokens=40, pad_token_id=0, eos_token_id=EOS, static_step=True,
                         **SAMPLED)
        assert got.sequences.shape[1] % 8 != ids.shape[1] % 8  # it did stop between two checks
    assert torch.equal(got.sequences, want.sequences)
    answer = got.sequences[:, ids.shape[1]:]
    assert answer.shape[1] < 40
    for row in answer.tolist():
        if EOS in row:
            end = row.index(EOS)
            assert set(row[end + 1:]) <= {0}
    assert any(row[-1] == EOS for row in answer.tolist())  # some row drew its eos at the last step


def test_min_new_tokens_holds_eos_back() -> None:
    lm = _llama()
    _eos_bias(lm, 50.0)  # eos always the argmax once allowed
    ids, mask = _prompts(False, 1)
    want, got = _both(lm, ids, mask, max_new_tokens=12, min_new_tokens=7, pad_token_id=0, eos_token_id=EOS, **GREEDY)
    assert torch.equal(got.sequences, want.sequences)
    answer = got.sequences[:, ids.shape[1]:]
    assert EOS not in answer[:, :7] and bool((answer[:, 7] == EOS).all())


def test_bf16_model_decodes_in_bf16() -> None:
    """A bf16 actor (engine.dtype bf16) decodes in bf16: greedy tokens as generate's on the same bf16 weights
    (both round every op to bf16 the same way) and float32 log-probabilities."""
    lm = _llama(dtype=torch.bfloat16)
    ids, mask = _prompts(True, 2)
    want, got = _both(lm, ids, mask, max_new_tokens=16, pad_token_id=0, eos_token_id=EOS, **GREEDY)
    assert torch.equal(got.sequences, want.sequences)
    assert got.logprobs.dtype == torch.float32


def test_sample_applies_temperature_then_top_k_then_top_p() -> None:
    """Hand-made logits: log(0.5, 0.3, 0.15, 0.05). top_k=3 drops the 0.05 token; top_p=0.75 then keeps the
    smallest set whose mass reaches 0.75 of the renormalised (0.5, 0.3, 0.15)/0.95 = (0.526, 0.316, 0.158): tokens
    0 and 1 (0.842), so token 2 and 3 are never drawn; greedy takes token 0."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(4000, 1)
    torch.manual_seed(0)
    drawn = sample(logits, True, 1.0, 3, 0.75)
    counts = torch.bincount(drawn, minlength=4)
    assert counts[2] == 0 and counts[3] == 0
    assert abs(counts[0].item() / 4000 - 0.5 / 0.8) < 0.03  # 0.625 of the kept mass (0.5 / (0.5 + 0.3))
    assert torch.equal(sample(logits[:1], False, 1.0, 0, 1.0), torch.tensor([0]))
