"""Tokenizers: trained offline on the prepared text, or a pretrained model's own, and how rows become token ids.

Every row's prompt is a list of chat messages; the tokenizer's chat template turns it into text, so a tokenizer
trained here and a pretrained chat model are used the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.data.batching import IGNORE
from rlhf.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}

# A minimal template in the spirit of Zephyr/TinyLlama: one header per role; the answer ends with eos so the model
# learns to stop. `add_generation_prompt` leaves the assistant header open.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, split_digits: bool = False) -> Any:
    """Train a byte-level BPE tokenizer (seconds) and wrap it as a transformers fast tokenizer with a chat template.
    split_digits: every digit its own token, as Llama's and Qwen's tokenizers write numbers (a number is then the
    same tokens wherever it stands, so a model can copy it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values()) + ["<|system|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), tok.pre_tokenizer])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    fast.stop_token_ids = end_of_turn_ids(fast)
    return fast


def load_tokenizer(path: str | Path) -> Any:
    """A tokenizer from a local folder or hub id, with a pad token and a chat template guaranteed."""
    from transformers import AutoTokenizer

    if not Path(path).exists() and (str(path).startswith((".", "/", "~")) or str(path).count("/") != 1):
        raise UserError(f"no such model folder '{path}': give a folder written by save_pretrained")
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:  # no tokenizer files, a broken one, or a hub id that cannot be fetched
        where = "the folder" if Path(path).exists() else "no such local folder, and as a hub id it"
        raise UserError(
            f"no tokenizer could be loaded from '{path}': {where} gave '{str(err).splitlines()[0][:100]}'; "
            "give a folder written by save_pretrained (with tokenizer files), or fetch the hub model on a "
            "connected machine and point at its local copy"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "right"
    tok.stop_token_ids = end_of_turn_ids(tok, _generation_eos(path))
    return tok


def _generation_eos(path: str | Path) -> list[int]:
    """The eos ids of a local model folder's generation_config.json (Llama-3's lists <|eot_id|> there), or []."""
    import json

    config = Path(path) / "generation_config.json"
    try:
        eos = json.loads(config.read_text()).get("eos_token_id") if config.is_file() else None
    except (OSError, ValueError):
        return []
    return [int(i) for i in ([eos] if isinstance(eos, int) else eos or []) if isinstance(i, int)]


_PROBE = "PROBE-ANSWER"


def _turn_end_id(tok: PreTrainedTokenizerBase) -> int | None:
    """The special token the chat template closes an assistant turn with (Gemma's <end_of_turn>, Llama-3's
    <|eot_id|>, Phi-3's <|end|>, ChatML's <|im_end|>, eos for ours), found by rendering a probe answer; None when
    the template writes none after it."""
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": _PROBE}],
                                       tokenize=False)
    except Exception:  # a template with rules of its own (a system turn first, ...): fall back to eos
        return None
    if _PROBE not in text:
        return None
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    after = tok(text.split(_PROBE, 1)[1], add_special_tokens=False)["input_ids"]
    return next((i for i in after if i in special), None)


def end_of_turn_ids(tok: PreTrainedTokenizerBase, generation_eos: list[int] | None = None) -> list[int]:
    """Every id that ends an answer: the template's turn end, then eos, then the model's generation_config eos
    ids (deduplicated, in that order). Rollouts, evaluation and chat stop on any of them."""
    ids = [_turn_end_id(tok), tok.eos_token_id, *(generation_eos or [])]
    return list(dict.fromkeys(i for i in ids if i is not None))


def stop_ids(tok: PreTrainedTokenizerBase) -> list[int]:
    """The ids that end an answer for this tokenizer (load_tokenizer computed them; eos alone otherwise)."""
    return list(getattr(tok, "stop_token_ids", None) or [tok.eos_token_id])


def encode_prompt(tok: PreTrainedTokenizerBase, messages: list[dict[str, str]], max_tokens: int | None = None) -> list[int]:
    """Token ids of a conversation with the assistant header open, ready for the answer; BOS first when the
    tokenizer adds one to its own encodings and the template did not write it (a base model's tokenizer).
    max_tokens: a longer prompt keeps its last max_tokens tokens (left truncation, TRL's: the question and the open
    assistant header stay), BOS still first when it had one. Prepare drops such rows unless data.truncate_prompts."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id
    if bos is not None and ids[:1] != [bos] and adds_bos(tok):
        ids = [bos, *ids]
    if max_tokens is not None and len(ids) > max_tokens:
        ids = [bos, *ids[len(ids) - max_tokens + 1 :]] if bos is not None and ids[0] == bos else ids[-max_tokens:]
    return ids


def adds_bos(tok: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's own encoding starts with BOS (Llama-2, Mistral, Gemma base tokenizers do)."""
    cached = getattr(tok, "_rlhf_adds_bos", None)
    if cached is None:
        cached = tok("x", add_special_tokens=True)["input_ids"][:1] == [tok.bos_token_id]
        tok._rlhf_adds_bos = cached
    return cached


def encode_answer(tok: PreTrainedTokenizerBase, prompt: list[dict[str, str]], answer: str) -> list[int]:
    """Token ids of an answer to `prompt` as the chat template renders it, ending with the template's turn end
    (Gemma's <end_of_turn>, Llama-3's <|eot_id|>, ChatML's <|im_end|>, eos for ours), as TRL takes the completion
    from the rendered conversation: a model then learns to end its turn with the token the template ends it with,
    the one rollouts and chat stop on. The answer is tokenised after the rendered prompt (so the boundary is exact),
    and what the template writes after the turn end (a newline, an eos) is not part of it. A template that does
    not render the answer after the prompt gets the answer's tokens and the first stop id (eos)."""
    stops = stop_ids(tok)
    head = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    try:
        whole = tok.apply_chat_template([*prompt, {"role": "assistant", "content": answer}], tokenize=False)
    except Exception:  # a template with rules of its own: the plain form below
        whole = ""
    if whole.startswith(head) and answer.strip() in whole[len(head):]:
        ids = tok(whole[len(head):], add_special_tokens=False)["input_ids"]
        ends = [i for i, t in enumerate(ids) if t in stops]
        if ends:
            return ids[: ends[0] + 1]
    return tok(answer, add_special_tokens=False)["input_ids"] + [stops[0]]


def row_lengths(tok: PreTrainedTokenizerBase, row: dict[str, Any]) -> tuple[int, int]:
    """(prompt tokens, longest prompt + answer tokens) of a normalised data row."""
    prompt = len(encode_prompt(tok, row["prompt"]))
    answers = [row.get(k) for k in ("completion", "chosen", "rejected")]
    longest = max((len(encode_answer(tok, row["prompt"], a)) for a in answers if isinstance(a, str)), default=0)
    return prompt, prompt + longest


def resolve_tokenizer(name_or_path: str | None, data_dir: Path, option: str = "model.name_or_path") -> Any:
    """A named model's own tokenizer, else the one the prepare stage saved in data_dir/tokenizer (trained there, or
    the actor's when model.name_or_path is set, so a reward model built from config shares the actor's tokens)."""
    if name_or_path:
        from rlhf.pipeline.guards import check_model_folder

        check_model_folder(name_or_path, None, option)
        return load_tokenizer(name_or_path)
    path = Path(data_dir) / "tokenizer"
    if not (path / "tokenizer.json").is_file():
        raise UserError(f"no trained tokenizer in {path}: run `rlhf prepare` (or `dvc repro prepare`) first")
    return load_tokenizer(path)


def encode_sft_row(tok: PreTrainedTokenizerBase, row: dict[str, Any], loss_on_prompt: bool,
                   max_prompt: int | None = None) -> dict[str, list[int]]:
    """input_ids = prompt (left-truncated to max_prompt) + answer up to its turn end (encode_answer); labels mask
    the prompt unless loss_on_prompt (DeepSpeed-Chat's default)."""
    prompt = encode_prompt(tok, row["prompt"], max_prompt)
    answer = encode_answer(tok, row["prompt"], row["completion"] if row.get("completion") else row["chosen"])
    labels = (prompt if loss_on_prompt else [IGNORE] * len(prompt)) + answer
    return {"input_ids": prompt + answer, "labels": labels}


def encode_text(tok: PreTrainedTokenizerBase, text: str, max_tokens: int) -> dict[str, list[int]]:
    """Plain text for ptx's language-model loss on every token: its ids (no chat template) cut to max_tokens - 1,
    then the eos."""
    ids = tok(text, add_special_tokens=False)["input_ids"][: max_tokens - 1] + [tok.eos_token_id]
    return {"input_ids": ids, "labels": list(ids)}


def check_compatible(actor_tok: Any, reward_tok: PreTrainedTokenizerBase, actor_cfg: Any, reward_cfg: Any,
                     other: str = "reward model") -> None:
    """The compatibility gate: PPO feeds the actor's tokens to the reward model and critic unchanged (and evaluate
    feeds every actor's answers to the reward model and the SFT model), so their tokenizers must agree exactly.
    Raises one UserError naming what differs and how to fix it."""
    checks = [
        ("vocabulary", actor_tok.get_vocab() == reward_tok.get_vocab(), f"{len(actor_tok)} vs {len(reward_tok)} tokens"),
        ("eos token", actor_tok.eos_token_id == reward_tok.eos_token_id, f"{actor_tok.eos_token!r} vs {reward_tok.eos_token!r}"),
        ("pad token", actor_tok.pad_token_id == reward_tok.pad_token_id, f"{actor_tok.pad_token!r} vs {reward_tok.pad_token!r}"),
        ("bos token", actor_tok.bos_token_id == reward_tok.bos_token_id, f"{actor_tok.bos_token!r} vs {reward_tok.bos_token!r}"),
        ("chat template", actor_tok.chat_template == reward_tok.chat_template, "templates differ"),
        ("embedding size", reward_cfg.vocab_size >= len(actor_tok), f"{other} has {reward_cfg.vocab_size} rows"),
    ]
    for what, ok, detail in checks:
        if not ok:
            raise UserError(
                f"the actor's and {other}'s tokenizers differ in {what} ({detail}): train the {other} "
                "from the same tokenizer as the actor (same model family, or the same data/prepared/tokenizer)"
            )
