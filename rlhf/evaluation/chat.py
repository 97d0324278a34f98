"""Talk to a trained actor: a multi-turn conversation through the tokenizer's chat template, streamed token by
token, drawn by transformers' generate or by vLLM (`engine="vllm"`). Used by `rlhf chat`; usable from Python:

    chat = Chat("models/ppo/actor", temperature=0.7)
    print(chat.reply("Sort ascending: 5 3 9"))
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase



class Chat:
    """A conversation with one model; `history` holds the turns so far, `clear()` forgets them."""

    def __init__(
        self,
        model_path: str | Path,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 64,
        do_sample: bool = True,
        seed: int | None = None,
        top_k: int = 0,
        engine: str = "generate",
    ):
        import torch

        from rlhf.config import Sampling
        from rlhf.models.build import load_causal_lm
        from rlhf.models.tokenizer import load_tokenizer, stop_ids
        from rlhf.pipeline.guards import check_model_folder

        check_model_folder(model_path, "causal_lm", "--model")
        self.tok = load_tokenizer(model_path)
        self.model = load_causal_lm(model_path).eval() if engine == "generate" else None
        self.vllm = _vllm_engine(model_path, seed) if engine == "vllm" else None
        # every sampling knob explicit (top_k 0 = off): none comes from the model's generation_config or from
        # transformers' defaults (its top_k=50), see rlhf.rollout.hf.generate_tokens
        self.sampling = Sampling(max_answer_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 do_sample=do_sample)
        self.stop_ids = stop_ids(self.tok)  # the template's turn end too (Gemma's <end_of_turn>, ...)
        if seed is not None:
            torch.manual_seed(seed)
        self.seed = seed
        self.history: list[dict[str, str]] = []

    def clear(self) -> None:
        self.history = []

    def reply(self, message: str, on_text: Callable[[str], None] | None = None) -> str:
        """Answer `message` in the context of the conversation; `on_text` receives the answer as it streams."""
        import torch

        self.history.append({"role": "user", "content": message})
        from rlhf.models.tokenizer import encode_prompt

        if self.vllm is not None:
            answer = self._vllm_reply(encode_prompt(self.tok, self.history), on_text)
            self.history.append({"role": "assistant", "content": answer})
            return answer
        prompt = torch.tensor([encode_prompt(self.tok, self.history)])  # as training encoded its prompts
        ids = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
        streamer = _streamer(self.tok, on_text) if on_text is not None else None
        from rlhf.rollout.hf import generate_tokens

        with torch.no_grad():
            out = generate_tokens(self.model, ids["input_ids"], ids["attention_mask"], streamer=streamer,
                                  **self.sampling.knobs(), pad_token_id=self.tok.pad_token_id, eos_token_id=self.stop_ids)
        answer = self.tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        self.history.append({"role": "assistant", "content": answer})
        return answer


    def _vllm_reply(self, prompt: list[int], on_text: Callable[[str], None] | None) -> str:
        """vLLM's answer, its new text sent to `on_text` after each step (held while a character is incomplete)."""
        assert self.vllm is not None
        seed = None if self.seed is None else self.seed + len(self.history)
        sent, text = "", ""
        for ids in self.vllm.stream(prompt, self.sampling, self.stop_ids, seed):
            text = self.tok.decode([t for t in ids if t not in self.stop_ids], skip_special_tokens=True)
            if on_text is not None and text.startswith(sent) and not text.endswith("\ufffd"):
                on_text(text[len(sent):])
                sent = text
        if on_text is not None and text.startswith(sent) and text != sent:
            on_text(text[len(sent):])
        return text.strip()


def _vllm_engine(model_path: str | Path, seed: int | None) -> Any:
    """vLLM for a chat (--engine vllm): the default settings, fp32 on CPU, bf16 on a GPU."""
    import torch
    from transformers import AutoConfig

    from rlhf.config.sampling import VLLMConfig
    from rlhf.rollout.vllm import VLLMEngine

    on_cuda = torch.cuda.is_available()
    return VLLMEngine(model_path, AutoConfig.from_pretrained(model_path), "bf16" if on_cuda else "fp32",
                      VLLMConfig(sleep=False), param="--engine", on_cuda=on_cuda, seed=seed or 0)


def _streamer(tok: PreTrainedTokenizerBase, callback: Callable[[str], None]) -> Any:
    """transformers' TextStreamer, sending finished pieces of text to `callback` instead of stdout."""
    from transformers import TextStreamer

    class CallbackStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            callback(text)

    return CallbackStreamer(tok, skip_prompt=True, skip_special_tokens=True)
