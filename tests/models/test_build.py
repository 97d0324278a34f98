"""Reward scores are read by position, not by token id: a tokenizer whose pad token is its eos (SmolLM2's, and any
tokenizer without a pad, which rlhf/models/tokenizer.py gives pad = eos) must not lose the eos that ends each answer."""

from __future__ import annotations

import torch

from rlhf.config import ModelConfig


def _pad_is_eos_tokenizer():
    from rlhf.models.tokenizer import train_tokenizer

    tok = train_tokenizer(["Sort ascending: 3 1 2", "Sure! Here they are in order: 1 2 3."] * 20, 300)
    tok.pad_token = tok.eos_token
    assert tok.pad_token_id == tok.eos_token_id
    return tok


class _Engine:
    """What the reward stage's scoring sees of a DeepSpeed engine: callable, with .module and .device."""

    def __init__(self, model) -> None:
        self.module, self.device = model, "cpu"

    def __call__(self, **batch):
        return self.module(**batch)


def test_reward_scores_are_read_at_the_eos_when_pad_is_eos() -> None:
    from rlhf.models.build import build_reward_model, classifier_parts
    from rlhf.prefs.reward_model import _scores, collate_pairs, encode_pair

    tok = _pad_is_eos_tokenizer()
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    model = build_reward_model(cfg, tok, seed=0).eval()
    assert model.config.pad_token_id == tok.eos_token_id
    rows = [
        {"prompt": [{"role": "user", "content": "Sort ascending: 3 1 2"}], "chosen": "1 2 3", "rejected": "3 1 2 1 2"},
        {"prompt": [{"role": "user", "content": "Sort ascending: 2 1"}], "chosen": "Sure! 1 2.", "rejected": "2"},
    ]
    pairs = [encode_pair(tok, r) for r in rows]
    batch = collate_pairs(tok.pad_token_id)(pairs)  # right-padded with the eos id
    with torch.no_grad():
        chosen, rejected = _scores(_Engine(model), batch)
        # The expected score: the head on the hidden state of each unpadded sequence's final token, its eos.
        body, head = classifier_parts(model)
        want = []
        for seq in [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]:
            assert seq[-1] == tok.eos_token_id
            hidden = body(input_ids=torch.tensor([seq])).last_hidden_state
            want.append(head(hidden[0, -1]).item())
        # transformers' pooling by pad id reads the token before the eos instead: a different score
        by_pad_id = model(**batch).logits.squeeze(-1)
    got = torch.cat([chosen, rejected])
    torch.testing.assert_close(got, torch.tensor(want), rtol=0, atol=1e-5)
    assert (by_pad_id - got).abs().max() > 1e-4
