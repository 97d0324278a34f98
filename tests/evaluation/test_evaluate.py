"""The evaluate stage on tiny models: every actor scored on the same held-out prompts, SFT as the KL baseline."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_cli


def test_evaluate_writes_metrics_per_actor_plot_rows_and_samples(ppo_trained: Path) -> None:
    """SFT, PPO, its EMA and DPO side by side (DPO: the dpo stage's model, as the default DAG has it)."""
    run_cli("dpo", "--params", "params.yaml", cwd=ppo_trained)
    proc = run_cli("evaluate", "--params", "params.yaml", "--dpo", "models/dpo", cwd=ppo_trained)
    assert "evaluate  sft: gold" in proc.stdout and "evaluate  ppo: gold" in proc.stdout
    assert "evaluate  dpo: gold" in proc.stdout
    metrics = json.loads((ppo_trained / "metrics/evaluate.json").read_text())
    assert set(metrics) == {"sft", "ppo", "ema", "dpo"}
    for values in metrics.values():
        assert set(values) >= {"gold_reward", "rm_reward", "kl_to_sft", "response_length", "perplexity"}
        assert 0.0 <= values["gold_reward"] <= 1.0 and values["perplexity"] > 1.0 and values["num_prompts"] == 12
    assert metrics["sft"]["kl_to_sft"] == 0.0  # the baseline against itself
    assert metrics["ppo"]["kl_to_sft"] != 0.0 and metrics["dpo"]["kl_to_sft"] != 0.0  # both moved the policy
    plot = json.loads((ppo_trained / "metrics/evaluate_plot.json").read_text())
    assert [row["model"] for row in plot] == ["sft", "ppo", "ema", "dpo"]
    table = (ppo_trained / "metrics/samples.md").read_text().splitlines()
    assert table[0] == "| prompt | sft | ppo | ema | dpo |" and len(table) == 2 + 3
    assert all("[gold_reward " in line for line in table[2:])


# ------------------------------------------------------------------- pad == eos: answers and scores by position


def _pad_is_eos_tokenizer():
    """A tiny trained tokenizer whose pad is its eos (what load_tokenizer gives a tokenizer without a pad)."""
    from rlhf.models.tokenizer import train_tokenizer

    tok = train_tokenizer(["Sort ascending: 3 1 2", "1 2 3", "Sort descending: 9 4"] * 4, vocab_size=300)
    tok.pad_token = tok.eos_token
    assert tok.pad_token_id == tok.eos_token_id
    return tok


def _tiny(tok, kind: str):
    import torch

    from rlhf.config import ModelConfig
    from rlhf.models.build import build_causal_lm, build_reward_model

    cfg = ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    model = (build_causal_lm if kind == "lm" else build_reward_model)(cfg, tok, 0).eval()
    torch.nn.init.normal_(model.score.weight if kind == "rm" else model.lm_head.weight, std=1.0)
    return model


def test_answers_are_cut_after_the_first_eos_and_keep_it(monkeypatch) -> None:
    """eos kept, an answer that never stopped kept whole; every sampling knob reaches generate explicitly and the
    model's own generation_config is set aside for the call."""
    import torch

    from rlhf.config import EvaluateConfig, Sampling
    from rlhf.evaluation.evaluate import _answers

    tok = _pad_is_eos_tokenizer()
    eos = tok.eos_token_id
    generated = torch.tensor([[20, 21, eos, eos], [20, 21, 22, 23], [eos, eos, eos, eos]])
    calls = []

    class Scripted:  # generate returns prompt + known answers, padded after the eos with the pad (the eos)
        generation_config = "the model's own"

        def generate(self, input_ids, attention_mask, **kwargs):
            calls.append((self.generation_config, kwargs))
            return torch.cat([input_ids, generated[: input_ids.shape[0]]], dim=1)

    cfg = EvaluateConfig(batch_size=8, sampling=Sampling(temperature=0.7, top_k=3, top_p=0.9, max_answer_tokens=4))
    got = _answers(Scripted(), tok, [[5, 6, 7], [5, 6], [8]], cfg, seed=0)
    assert got == [[20, 21, eos], [20, 21, 22, 23], [eos]]
    config, kwargs = calls[0]
    assert config != "the model's own" and config.top_k is None  # a blank GenerationConfig during the call
    assert (kwargs["temperature"], kwargs["top_k"], kwargs["top_p"]) == (0.7, 3, 0.9)


def test_reward_scores_are_read_at_the_eos_when_pad_is_eos() -> None:
    """transformers' own pooling takes the last token that is not the pad: with pad == eos, the token before the
    eos. The evaluate scorer reads the last real token by position, as PPO's reward_scores does."""
    import torch

    from rlhf.evaluation.evaluate import _reward_scores
    from rlhf.models.build import classifier_parts

    tok = _pad_is_eos_tokenizer()
    eos = tok.eos_token_id
    reward = _tiny(tok, "rm")
    prompts, answers = [[5, 6, 7], [5, 6], [8, 9]], [[20, 21, eos], [20, 21, 22, 23], [eos]]
    got = _reward_scores(reward, tok, prompts, answers, batch_size=8)
    body, head = classifier_parts(reward)
    with torch.no_grad():
        want, before = [], []
        for p, a in zip(prompts, answers):
            hidden = body(input_ids=torch.tensor([p + a])).last_hidden_state[0]
            want.append(head(hidden[-1]).item())
            before.append(head(hidden[-2]).item())
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=1e-5)
    assert abs(want[0] - before[0]) > 1e-4  # the eos and the token before it score differently


def test_answer_logprobs_score_each_answer_as_given_at_the_temperature() -> None:
    """Sum of log softmax(logits / T) over the answer's own tokens: the eos when it was emitted, no eos added to an
    answer that never stopped."""
    import torch

    from rlhf.models.logprobs import answer_logprobs

    tok = _pad_is_eos_tokenizer()
    eos = tok.eos_token_id
    model = _tiny(tok, "lm")
    prompts, answers = [[5, 6, 7], [5, 6]], [[20, 21, eos], [20, 21, 22, 23]]
    got = answer_logprobs(model, tok.pad_token_id, prompts, answers, batch_size=8, temperature=0.7)
    want = []
    with torch.no_grad():
        for p, a in zip(prompts, answers):
            logits = model(input_ids=torch.tensor([p + a])).logits[0, len(p) - 1 : -1] / 0.7
            want.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(a)[:, None]).sum().item())
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=1e-4)


def test_an_empty_held_out_split_is_one_line_not_a_division_by_zero(tmp_path: Path) -> None:
    import pytest

    from rlhf.config import EvaluateConfig
    from rlhf.errors import UserError
    from rlhf.evaluation.evaluate import evaluate_actors

    for name in ("sft", "reward"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    data = tmp_path / "prepared"
    data.mkdir()
    (data / "ppo_eval.jsonl").write_text("")
    (data / "sft_eval.jsonl").write_text('{"prompt": [{"role": "user", "content": "hi"}], "completion": "hello"}\n')
    with pytest.raises(UserError, match=r"ppo_eval.jsonl is empty, so evaluate has nothing to measure"):
        evaluate_actors({"sft": tmp_path / "sft"}, tmp_path / "reward", data, EvaluateConfig(), seed=0)


def test_evaluate_warns_when_no_actor_differs_from_sft_beyond_noise() -> None:
    from rlhf.evaluation.evaluate import no_difference_warning

    # Every actor scored 0 on every answer, as on a verifier the model never passes: nothing moved.
    zeros = {"gold": [0.0] * 50}
    line = no_difference_warning({"sft": zeros, "ppo": zeros, "dpo": dict(zeros)})
    assert line is not None and line.startswith("no actor differs from sft beyond noise (gold; 2 standard errors)")
    # Means 0.50 vs 0.52 over 50 coin flips: a difference far inside the noise (standard error ~0.1).
    coin = [float(i % 2) for i in range(50)]
    assert no_difference_warning({"sft": {"gold": coin}, "ppo": {"gold": coin[1:] + [1.0]}}) is not None
    # 0.5 -> 0.9 over 50 answers: about 4.7 standard errors, a real change: no warning.
    better = [1.0] * 45 + [0.0] * 5
    assert no_difference_warning({"sft": {"gold": coin}, "ppo": {"gold": better}}) is None
    assert no_difference_warning({"sft": zeros}) is None
