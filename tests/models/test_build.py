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


def test_loading_a_critic_from_an_actor_prints_nothing_of_transformers(tmp_path, capfd) -> None:
    """A classifier loaded from a causal LM (the critic from the actor, a reward model from a base model) gets a
    fresh score head, as expected: no transformers LOAD REPORT table or loading bar on stderr, and no warning of
    ours; a causal LM missing a weight gets one line of ours naming it. Saving shows no shard bar either."""
    from rlhf.models.build import build_causal_lm, load_causal_lm, load_reward_model, save_pretrained

    tok = _pad_is_eos_tokenizer()
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    actor = build_causal_lm(cfg, tok, seed=0)
    save_pretrained(actor, tok, tmp_path / "actor")
    (tmp_path / "actor" / "COMPLETE.json").unlink(missing_ok=True)
    capfd.readouterr()
    critic = load_reward_model(tmp_path / "actor")
    err = capfd.readouterr().err
    assert critic.score.weight.shape[0] == 1
    assert "LOAD REPORT" not in err and "Loading weights" not in err and "warning" not in err, err

    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "actor" / "model.safetensors")
    dropped = next(k for k in weights if "layers.0.mlp.up_proj" in k)
    save_file({k: v for k, v in weights.items() if k != dropped}, tmp_path / "actor" / "model.safetensors",
              metadata={"format": "pt"})
    load_causal_lm(tmp_path / "actor")
    err = capfd.readouterr().err
    assert "LOAD REPORT" not in err
    assert err.count("warning:") == 1 and "1 weights are not in the checkpoint" in err and "up_proj" in err, err

    save_pretrained(critic, tok, tmp_path / "critic")
    assert "Writing model shards" not in capfd.readouterr().err


def test_deterministic_kernels_follow_the_engine_param() -> None:
    from rlhf.config import EngineConfig
    from rlhf.training.runtime import seed_everything

    assert EngineConfig().deterministic  # the default: one seed, the same weights on every run
    try:
        seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        seed_everything(0, deterministic=False)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
