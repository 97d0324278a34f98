"""Steps 1 and 2 end to end through the real CLI on a tiny model: weights change, outputs load with the Auto
classes, metrics and manifests are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli, write_params


def _changed(saved: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in initial.items() if k in saved and not torch.equal(saved[k], v)]


def _initial_actor(work: Path, params_file: str = "params.yaml"):
    """The actor exactly as training started it (seeded build)."""
    from rlhf.config import load_params
    from rlhf.models.build import build_causal_lm
    from rlhf.models.tokenizer import resolve_tokenizer

    p = load_params(work / params_file)
    return build_causal_lm(p.model, resolve_tokenizer(None, work / "data/prepared"), p.seed)


def test_prepare_writes_splits_tokenizer_and_metrics(prepared: Path) -> None:
    out = prepared / "data/prepared"
    for name in ("sft_train", "sft_eval", "reward_train", "reward_eval", "ppo_train", "ppo_eval"):
        assert (out / f"{name}.jsonl").stat().st_size > 0
    stats = json.loads((prepared / "metrics/prepare.json").read_text())
    assert stats["rows_loaded"] == 600 and stats["rows_valid"] + stats["rows_invalid"] == 600
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert tok.chat_template and tok.pad_token_id != tok.eos_token_id


def test_sft_trains_and_output_loads(prepared: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proc = run_cli("sft", "--params", "params.yaml", cwd=prepared)
    assert "sft: model -> models/sft" in proc.stdout
    model = AutoModelForCausalLM.from_pretrained(prepared / "models/sft")
    tok = AutoTokenizer.from_pretrained(prepared / "models/sft")
    initial = _initial_actor(prepared).state_dict()
    assert len(_changed(model.state_dict(), initial)) >= len(initial) // 2
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Sort ascending: 3 1 2"}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    metrics = json.loads((prepared / "metrics/sft.json").read_text())
    assert metrics["perplexity"] > 1.0 and metrics["steps"] == 6
    manifest = json.loads((prepared / "models/sft/manifest.json").read_text())
    assert manifest["params"]["sft"]["max_steps"] == 6 and manifest["seed"] == 1234 and manifest["world_size"] == 1
    assert set(manifest["inputs"]) == {"sft_train", "sft_eval"} and "torch" in manifest["versions"]
    assert (prepared / "dvclive/sft/plots/metrics/train/loss.tsv").is_file()


def test_reward_trains_and_scores_a_pair(prepared: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_cli("reward", "--params", "params.yaml", cwd=prepared)
    model = AutoModelForSequenceClassification.from_pretrained(prepared / "models/reward").eval()
    assert model.config.num_labels == 1
    tok = AutoTokenizer.from_pretrained(prepared / "models/reward")
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": "Sort ascending: 3 1 2"}, {"role": "assistant", "content": answer}],
            tokenize=False,
        )
        for answer in ("Sure! Here they are in order: 1 2 3.", "Sorted: 3 1 2")
    ]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        scores = model(**batch).logits.squeeze(-1)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    # Training moved the weights away from the seeded build it started from.
    from rlhf.config import load_params
    from rlhf.models.build import build_reward_model
    from rlhf.models.tokenizer import resolve_tokenizer

    p = load_params(prepared / "params.yaml")
    initial = build_reward_model(p.reward_model, resolve_tokenizer(None, prepared / "data/prepared"), p.seed)
    initial_state = initial.state_dict()
    assert len(_changed(model.state_dict(), initial_state)) >= len(initial_state) // 2
    # The reported metrics are the saved model's: recomputed pair by pair, one unpadded sequence at a time.
    from rlhf.data.split import read_split
    from rlhf.prefs.reward_model import encode_pair

    rows = read_split(prepared / "data/prepared/reward_eval.jsonl")
    chosen, rejected = [], []
    with torch.no_grad():
        for row in rows:
            pair = encode_pair(tok, row)
            chosen.append(model(input_ids=torch.tensor([pair["chosen"]])).logits.item())
            rejected.append(model(input_ids=torch.tensor([pair["rejected"]])).logits.item())
    metrics = json.loads((prepared / "metrics/reward.json").read_text())
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(rows)
    assert len(rows) >= 10 and metrics["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert metrics["chosen_mean"] == pytest.approx(sum(chosen) / len(rows), abs=1e-4)
    assert metrics["rejected_mean"] == pytest.approx(sum(rejected) / len(rows), abs=1e-4)


@pytest.mark.parametrize("stage", ["sft"])
def test_lora_output_is_merged_and_changed(prepared: Path, stage: str) -> None:
    from transformers import AutoModelForCausalLM

    write_params(prepared / "lora.yaml", {"sft": {"lora": {"rank": 4, "alpha": 8}, "learning_rate": 0.01}})
    run_cli(stage, "--params", "lora.yaml", "--out", "models/sft_lora", "--metrics", "metrics/lora.json",
            "--live", "dvclive/lora", cwd=prepared)
    saved = AutoModelForCausalLM.from_pretrained(prepared / "models/sft_lora").state_dict()
    assert not any("lora" in k for k in saved)
    changed = _changed(saved, _initial_actor(prepared, "lora.yaml").state_dict())
    # Only attention projections carry adapters: they change, the MLP and embeddings do not.
    assert changed and all(any(m in k for m in ("q_proj", "k_proj", "v_proj", "o_proj")) for k in changed)
