"""Build, load and save the models: causal LMs (actor, reference), classifiers (reward model, critic), LoRA, dropout."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.config import LoraConfig, ModelConfig
from rlhf.errors import UserError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase



def llama_config(cfg: ModelConfig, vocab_size: int, **extra: Any) -> Any:
    """The LlamaConfig of a model built from params.yaml's `model` group (no name_or_path)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        attention_dropout=cfg.dropout,
        tie_word_embeddings=False,
        **extra,
    )


def _llama_config(cfg: ModelConfig, tok: PreTrainedTokenizerBase, **extra: Any) -> Any:
    return llama_config(cfg, len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, **extra)


def _from_pretrained(auto_cls: Any, path: str, **kwargs: Any) -> Any:
    """`auto_cls.from_pretrained(path)` with transformers' own loading bar and LOAD REPORT table kept off stderr
    (they read like failures when a reward model or critic starts from a causal LM, which is expected): a head
    initialised fresh is said in one line of ours, and only when it is not the classifier's expected score head."""
    from safetensors import SafetensorError

    from rlhf.pipeline.guards import verify_output_dir

    verify_output_dir(Path(path))
    try:
        with quiet_transformers():
            model, info = auto_cls.from_pretrained(path, output_loading_info=True, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:
        raise UserError(
            f"'{path}' is not a loadable model ({str(err).splitlines()[0][:160]}): "
            "give an HF model folder with config.json and weights, or a hub id on a connected machine"
        ) from None
    fresh = [k for k in info.get("missing_keys", []) if not k.startswith("score.")]
    if fresh:
        import sys

        shown = ", ".join(sorted(fresh)[:3]) + (f" and {len(fresh) - 3} more" if len(fresh) > 3 else "")
        print(f"warning: {path}: {len(fresh)} weights are not in the checkpoint and start untrained ({shown})",
              file=sys.stderr, flush=True)
    return model


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' progress bars off and its logger at errors only, for the duration (both restored)."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def build_causal_lm(cfg: ModelConfig, tok: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    """The actor: `cfg.name_or_path` loaded, or a fresh Llama-style model from the config."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if cfg.name_or_path:
        model = _from_pretrained(AutoModelForCausalLM, cfg.name_or_path, dtype=torch.float32)
    else:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(_llama_config(cfg, tok))
    _check_vocab(model, tok, cfg.name_or_path or "model")
    model.config.pad_token_id = tok.pad_token_id
    return model


def build_reward_model(cfg: ModelConfig, tok: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    """The reward model: a sequence classifier with one label, scored at the last real (non-pad) token.

    From a causal LM checkpoint (as DeepSpeed-Chat does with OPT-350m) transformers adds a fresh score head.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

    if cfg.name_or_path:
        model = _from_pretrained(
            AutoModelForSequenceClassification, cfg.name_or_path, num_labels=1, dtype=torch.float32
        )
    else:
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(_llama_config(cfg, tok, num_labels=1))
    _check_vocab(model, tok, cfg.name_or_path or "reward_model")
    model.config.pad_token_id = tok.pad_token_id
    return model


def load_causal_lm(path: str | Path) -> PreTrainedModel:
    """A causal LM from an HF folder (fp32; DeepSpeed casts it to the engine dtype)."""
    import torch
    from transformers import AutoModelForCausalLM

    return _from_pretrained(AutoModelForCausalLM, str(path), dtype=torch.float32)


def load_reward_model(path: str | Path) -> PreTrainedModel:
    """A one-label sequence classifier from an HF folder (the reward model, or the critic's starting point)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    return _from_pretrained(AutoModelForSequenceClassification, str(path), num_labels=1, dtype=torch.float32)


def classifier_parts(module: torch.nn.Module) -> tuple[Any, Any]:
    """(body, score head) of a sequence classifier (LlamaForSequenceClassification and kin), LoRA or not."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    return getattr(base, base.base_model_prefix), base.score


def last_token_scores(module: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) a sequence classifier's score at each row's last real token, found by the attention mask.

    transformers' own pooling takes the last token that is not pad_token_id: when the pad is the eos (a tokenizer
    without a pad), that is the token before the eos, not the eos that ends the answer. Rows may be left- or
    right-padded; position ids start at each row's first real token."""
    import torch

    from rlhf.models.prefix import position_ids

    body, score = classifier_parts(module)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
    cols = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (cols * attention_mask.long()).argmax(-1)  # (B,) the rightmost real position
    rows = torch.arange(attention_mask.shape[0], device=attention_mask.device)
    return score(hidden.last_hidden_state[rows, last]).squeeze(-1).float()


def _check_vocab(model: torch.nn.Module, tok: PreTrainedTokenizerBase, name: str) -> None:
    weight = model.get_input_embeddings().weight
    rows = (getattr(weight, "ds_shape", None) or weight.shape)[0]  # a ZeRO-3 shard is flat: its whole shape
    if rows < len(tok):
        raise UserError(
            f"{name} has {rows} embedding rows but the tokenizer has {len(tok)} tokens: "
            "use the tokenizer that was trained with this model"
        )


def add_lora(model: torch.nn.Module, cfg: LoraConfig, task_type: str) -> torch.nn.Module:
    """Wrap with peft LoRA adapters when cfg.rank > 0; optionally keep the base weights trainable too."""
    if cfg.rank == 0:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        task_type=task_type,
    )
    try:
        model = get_peft_model(model, peft_cfg)
    except ValueError as err:
        raise UserError(f"LoRA could not be added ({str(err).splitlines()[0][:160]}): fix lora.target_modules") from None
    if not cfg.only_optimize_lora:
        for p in model.parameters():
            p.requires_grad_(True)
    return model


# Module attributes that hold a dropout probability as a plain float, read in forward (Llama's and Qwen's
# attention_dropout, OPT's dropout/activation_dropout, OPT's layerdrop): nn.Dropout modules are not the only kind.
_DROPOUT_FLOATS = ("dropout", "attention_dropout", "activation_dropout", "attn_dropout", "resid_dropout",
                   "embd_pdrop", "resid_pdrop", "attn_pdrop", "hidden_dropout", "layerdrop")


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with every dropout probability set to 0, in train mode too (TRL's disable_dropout_in_model, which
    also sees the float probabilities some attention modules read): the RL ratio pi / pi_old and DPO's log-ratios
    then compare the same function in train and eval mode. The config is left as it was, so a saved model keeps
    its dropout for whoever trains it next."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in _DROPOUT_FLOATS:
            value = getattr(module, name, None)
            if isinstance(value, float) and not isinstance(value, bool):
                setattr(module, name, 0.0)
    return model


def unwrap_for_saving(model: torch.nn.Module) -> torch.nn.Module:
    """The plain transformers model, with any LoRA adapters merged into the base weights."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model


def save_pretrained(model: torch.nn.Module, tok: PreTrainedTokenizerBase, out_dir: Path) -> None:
    """An HF folder that transformers' Auto classes load: safetensors, config, tokenizer with its chat template."""
    model = unwrap_for_saving(model)
    with quiet_transformers():  # no "Writing model shards" bar: the stage says where it wrote in its own line
        model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
