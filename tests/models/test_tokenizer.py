"""Chat models whose turn ends with a token other than eos: tokenizers made here whose templates copy Gemma's
(<end_of_turn>), Llama-3's (<|eot_id|>, with its base eos <|end_of_text|> as the pad) and Phi-3's (<|end|>, then eos)
turn formats. SFT rows end with the turn-end token, rollouts stop on it, the reward is read at it, `Chat` stops on
it, and a model's generation_config eos ids are stop ids too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import write_params

FAMILIES = {
    "gemma": {
        "specials": ["<bos>", "<eos>", "<pad>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        "bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "turn_end": "<end_of_turn>",
        "template": (
            "{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else "
            "m['role']) + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
        ),
    },
    "llama3": {
        "specials": ["<|begin_of_text|>", "<|end_of_text|>", "<unk>", "<|start_header_id|>", "<|end_header_id|>",
                     "<|eot_id|>"],
        "bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "pad": "<|end_of_text|>", "turn_end": "<|eot_id|>",
        "template": (
            "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
            "m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
        ),
    },
    "phi3": {
        "specials": ["<s>", "<|endoftext|>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"],
        "bos": "<s>", "eos": "<|endoftext|>", "pad": "<|endoftext|>", "turn_end": "<|end|>",
        "template": (
            "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
        ),
    },
}
TEXTS = ["Sort ascending: 5 2 9", "Sorted: 2 5 9", "Reverse the words: red green blue", "hi there"] * 20


def _tokenizer(family: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=320, special_tokens=spec["specials"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=spec["bos"], eos_token=spec["eos"],
                                  pad_token=spec["pad"], unk_token="<unk>")
    tok.chat_template = spec["template"]
    return tok


def _model_folder(path: Path, family: str, generation_eos: list[str] | None = None) -> Path:
    """A tiny Llama actor and a reward model with the family's tokenizer, as folders from elsewhere."""
    from rlhf.config import ModelConfig
    from rlhf.models.build import build_causal_lm, build_reward_model

    tok = _tokenizer(family)
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    for name, build in (("actor", build_causal_lm), ("reward", build_reward_model)):
        model = build(cfg, tok, 0)
        model.save_pretrained(path / name)
        tok.save_pretrained(path / name)
    if generation_eos:
        ids = tok.convert_tokens_to_ids(generation_eos)
        (path / "actor/generation_config.json").write_text(json.dumps({"eos_token_id": ids}))
    return path


def _prefer_turn_end(model, tok, prompt_ids: list[int], turn_end: int) -> None:
    """Make the turn end the likeliest next token after `prompt_ids` (its output row along the prompt's last hidden
    state), and eos the least likely there: a model that ends its turn at once unless it samples otherwise."""
    with torch.no_grad():
        h = model(torch.tensor([prompt_ids]), output_hidden_states=True).hidden_states[-1][0, -1]
        row = 12.0 * h / h.pow(2).sum()
        model.lm_head.weight[turn_end] = row
        model.lm_head.weight[tok.eos_token_id] = -row


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sft_rows_end_with_the_templates_turn_end(family: str, tmp_path: Path) -> None:
    from rlhf.models.tokenizer import encode_prompt, encode_sft_row, load_tokenizer, stop_ids

    spec = FAMILIES[family]
    _tokenizer(family).save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    turn_end = tok.convert_tokens_to_ids(spec["turn_end"])
    assert stop_ids(tok) == [turn_end, tok.eos_token_id]  # the turn end first, then eos
    prompt = [{"role": "user", "content": "Sort ascending: 5 2 9"}]
    row = encode_sft_row(tok, {"prompt": prompt, "completion": "Sorted: 2 5 9"}, loss_on_prompt=False)
    ids, labels = row["input_ids"], row["labels"]
    answer = [t for t, label in zip(ids, labels) if label != -100]
    # the answer, then the turn end as the template closes the turn; no eos (Llama-3's pad), no trailing newline
    assert answer[-1] == turn_end and tok.eos_token_id not in answer
    assert tok.decode(answer, skip_special_tokens=True) == "Sorted: 2 5 9"
    # the rendered conversation is prompt + answer exactly: what the model learns is what the template writes
    whole = tok.apply_chat_template([*prompt, {"role": "assistant", "content": "Sorted: 2 5 9"}], tokenize=False)
    assert tok(whole, add_special_tokens=False)["input_ids"][: len(ids)] == ids
    # BOS once, where the template writes it (Gemma, Llama-3); Phi-3's template writes none and its tokenizer adds none
    prompt_ids = encode_prompt(tok, prompt)
    assert prompt_ids.count(tok.bos_token_id) == (0 if family == "phi3" else 1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rollouts_stop_on_the_turn_end_and_the_reward_is_read_there(family: str, tmp_path: Path) -> None:
    from rlhf.config import EngineConfig, load_params
    from rlhf.data.batching import collate_prompts
    from rlhf.models.build import last_token_scores, load_causal_lm
    from rlhf.models.tokenizer import encode_prompt, load_tokenizer
    from rlhf.rl.models import RLModels
    from rlhf.rl.trainer import RLTrainer
    from rlhf.training.runtime import init_distributed

    folder = _model_folder(tmp_path / "models", family)
    tok = load_tokenizer(folder / "actor")
    turn_end = tok.convert_tokens_to_ids(FAMILIES[family]["turn_end"])
    prompt = encode_prompt(tok, [{"role": "user", "content": "hi there"}])
    actor = load_causal_lm(folder / "actor")
    _prefer_turn_end(actor, tok, prompt, turn_end)
    actor.save_pretrained(folder / "actor")

    dist = init_distributed(EngineConfig(device="cpu"))
    sequences = {}
    for decoder in ("own", "generate"):
        params = load_params(write_params(tmp_path / f"{decoder}.yaml", {"ppo": {
            "ema_beta": 0.0, "sampling": {"max_answer_tokens": 12}, "rollout": {"engine": decoder, "logprobs": "recompute"}}}))
        models = RLModels(params.ppo, params.engine, dist, folder / "actor", folder / "reward")
        trainer = RLTrainer(models, params.ppo, params.rewards)
        batch = collate_prompts(len(prompt), tok.pad_token_id)([prompt] * 16)
        torch.manual_seed(0)
        rollout = trainer.generate(batch["input_ids"], batch["attention_mask"])
        sequences[decoder] = rollout.sequences
    assert torch.equal(sequences["own"], sequences["generate"])  # our loop and transformers' stop alike

    p = rollout.prompt_width
    answers = rollout.sequences[:, p:]
    ended = 0
    for row, mask in zip(answers.tolist(), rollout.action_mask.tolist()):
        n = int(sum(mask))
        stops = [i for i, t in enumerate(row) if t in (turn_end, tok.eos_token_id)]
        if stops:  # real up to and including the first stop id, nothing drawn after it
            assert n == stops[0] + 1 and all(t == tok.pad_token_id for t in row[n:]), (row, mask)
            ended += row[stops[0]] == turn_end
        else:
            assert n == len(row)
    assert ended >= 8, answers  # most rows ended their turn with the turn end, not eos

    # The reward model's score is the one at each answer's last real token: the turn end where it has one
    scores = trainer.model_scores(rollout)
    for i in range(len(answers)):
        n = int(rollout.action_mask[i].sum())
        ids, mask = rollout.sequences[i : i + 1, : p + n], rollout.attention_mask[i : i + 1, : p + n]
        if n and answers[i, n - 1] == turn_end:
            with torch.no_grad():
                want = last_token_scores(trainer.models.reward.module, ids, mask)
            torch.testing.assert_close(scores[i : i + 1], want.float().view(1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_chat_stops_on_the_turn_end(family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rlhf.rollout.hf
    from rlhf.evaluation.chat import Chat
    from rlhf.models.build import load_causal_lm
    from rlhf.models.tokenizer import encode_prompt, load_tokenizer

    folder = _model_folder(tmp_path / "models", family)
    tok = load_tokenizer(folder / "actor")
    turn_end = tok.convert_tokens_to_ids(FAMILIES[family]["turn_end"])
    actor = load_causal_lm(folder / "actor")
    _prefer_turn_end(actor, tok, encode_prompt(tok, [{"role": "user", "content": "hi there"}]), turn_end)
    actor.save_pretrained(folder / "actor")

    drawn = []
    generate = rlhf.rollout.hf.generate_tokens
    monkeypatch.setattr(rlhf.rollout.hf, "generate_tokens", lambda *a, **kw: drawn.append(out := generate(*a, **kw)) or out)
    chat = Chat(folder / "actor", do_sample=False, max_new_tokens=10)
    assert chat.reply("hi there") == ""  # greedy: the turn ends at once (before, it ran on for 10 tokens)
    prompt = encode_prompt(tok, [{"role": "user", "content": "hi there"}])
    assert drawn[0][0, -1].item() == turn_end and drawn[0].shape[1] == len(prompt) + 1


def test_generation_config_eos_ids_are_stop_ids(tmp_path: Path) -> None:
    """Llama-3 instruct checkpoints list <|eot_id|> in generation_config.json: it stops rollouts too, even where
    the template and the tokenizer say otherwise."""
    from rlhf.models.tokenizer import load_tokenizer, stop_ids

    folder = _model_folder(tmp_path / "models", "phi3", generation_eos=["<|endoftext|>", "<|user|>"])
    tok = load_tokenizer(folder / "actor")
    ids = tok.convert_tokens_to_ids(["<|end|>", "<|endoftext|>", "<|user|>"])
    assert stop_ids(tok) == ids


@pytest.mark.parametrize("family", ["gemma", "phi3"])
def test_a_long_prompt_keeps_its_last_tokens_and_its_bos(family: str, tmp_path: Path) -> None:
    """data.truncate_prompts: encode_prompt(max_tokens=n) keeps the last n tokens (the question's end and the open
    assistant header, TRL's left truncation), with BOS still first where the template wrote one."""
    from rlhf.models.tokenizer import encode_prompt, load_tokenizer

    _tokenizer(family).save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    messages = [{"role": "user", "content": "Reverse the words: " + "red green blue " * 10}]
    whole = encode_prompt(tok, messages)
    cut = encode_prompt(tok, messages, max_tokens=12)
    assert len(whole) > 12 and len(cut) == 12 and encode_prompt(tok, messages, max_tokens=len(whole)) == whole
    if family == "gemma":  # <bos> first, then the last 11 tokens
        assert cut[0] == tok.bos_token_id and cut[1:] == whole[-11:]
    else:
        assert cut == whole[-12:]
