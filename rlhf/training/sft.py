"""Step 1: supervised fine-tuning of the actor on demonstrations (InstructGPT section 3.5)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.config import Params
from rlhf.data.batching import IGNORE, collate_sft, sft_length
from rlhf.models.tokenizer import encode_sft_row
from rlhf.training.runtime import Dist, evaluating

if TYPE_CHECKING:
    import torch
    from deepspeed import DeepSpeedEngine



def _loss(engine: DeepSpeedEngine, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    batch = {k: v.to(engine.device) for k, v in batch.items()}
    return engine(**batch).loss, {}


def _evaluate(dist: Dist):
    import torch

    from rlhf.training.loop import all_reduce_sum, perplexity

    def evaluate(engine: DeepSpeedEngine, loader: Any) -> dict[str, float]:
        nll, tokens = 0.0, 0.0
        with torch.no_grad(), evaluating(engine):
            for batch in loader:
                batch = {k: v.to(engine.device) for k, v in batch.items()}
                n = (batch["labels"][:, 1:] != IGNORE).sum().item()  # the loss shifts labels by one
                nll += engine(**batch).loss.float().item() * n
                tokens += n
        nll, tokens = all_reduce_sum([nll, tokens], dist)
        return {"perplexity": perplexity(nll, tokens), "eval_loss": nll / max(tokens, 1.0)}

    return evaluate


def run_sft(
    params: Params, data_dir: Path, out_dir: Path, live_dir: Path | None, ckpt_dir: Path | None = None
) -> dict[str, float]:
    """Train the actor on data_dir/sft_train.jsonl and write the HF folder out_dir; returns the final metrics."""
    from rlhf.data.split import read_split
    from rlhf.models.build import add_lora, build_causal_lm
    from rlhf.models.tokenizer import resolve_tokenizer
    from rlhf.training.checks import check_eval_split, check_train_split, launch_world_size
    from rlhf.training.lifecycle import train_and_export
    from rlhf.training.runtime import init_distributed, seed_everything

    # Bad input (no tokenizer, a missing or too small split) fails here, before DeepSpeed is imported or a process
    # group started.
    tok = resolve_tokenizer(params.model.name_or_path, data_dir)
    cfg = params.sft
    limit = params.data.max_prompt_tokens  # only data.truncate_prompts lets a longer prompt through prepare
    train_rows = [encode_sft_row(tok, r, cfg.loss_on_prompt, limit) for r in read_split(data_dir / "sft_train.jsonl")]
    eval_rows = [encode_sft_row(tok, r, cfg.loss_on_prompt, limit) for r in read_split(data_dir / "sft_eval.jsonl")]
    check_train_split(data_dir / "sft_train.jsonl", len(train_rows), cfg, "sft", launch_world_size())
    check_eval_split(data_dir / "sft_eval.jsonl", len(eval_rows), "perplexity")
    dist = init_distributed(params.engine)
    seed_everything(params.seed, params.engine.deterministic)

    def build() -> Any:
        return add_lora(build_causal_lm(params.model, tok, params.seed), cfg.lora, "CAUSAL_LM")

    return train_and_export(
        name="sft",
        params=params,
        train=cfg,
        dist=dist,
        tok=tok,
        build_model=build,
        train_rows=train_rows,
        eval_rows=eval_rows,
        collate=collate_sft(tok.pad_token_id),
        length=sft_length,
        loss_fn=_loss,
        evaluate=_evaluate(dist),
        out_dir=out_dir,
        live_dir=live_dir,
        ckpt_dir=ckpt_dir,
        manifest_params={k: getattr(params, k).model_dump() for k in ("model", "engine", "sft")},
        manifest_inputs={"sft_train": data_dir / "sft_train.jsonl", "sft_eval": data_dir / "sft_eval.jsonl"},
    )
