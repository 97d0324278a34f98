"""Step 2's alternative: Direct Preference Optimization (Rafailov et al. 2023; DeepSpeed-Chat step2_dpo), the SFT
actor trained on the preference pairs against a frozen copy of itself, with no reward model and no RL.

The reference's summed log-probabilities of every chosen and rejected answer are computed once, before training,
and travel with the rows (not recomputed per epoch); the loss (DPO, cDPO or IPO) is rlhf.training.losses.dpo_loss.
SimPO and ORPO (dpo.loss_type simpo / orpo) need no reference: none is loaded (reference_free_loss). KTO
(dpo.loss_type kto) trains on labelled answers instead of pairs: rlhf/prefs/kto.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.config import DPOConfig, Params
from rlhf.data.batching import answer_positions, right_pad
from rlhf.models.logprobs import sequence_logprobs
from rlhf.models.tokenizer import encode_answer, encode_prompt
from rlhf.prefs.kto import collate_kto, encode_kto, kto_length, kto_loss_fn
from rlhf.training.runtime import Dist, evaluating

if TYPE_CHECKING:
    import torch
    from deepspeed import DeepSpeedEngine
    from transformers import PreTrainedTokenizerBase

NO_PAIRS = (
    "No DPO model: prepare found no preference pair (rewards.model_weight is 0), so there was nothing to train DPO on.\n"
    "Add a prompt/chosen/rejected source to train one.\n"
)


def encode_dpo_pair(tok: PreTrainedTokenizerBase, row: dict[str, Any], max_prompt: int | None = None) -> dict[str, Any]:
    """Prompt ids (left-truncated to max_prompt) and the two answers' ids (each ending with the template's turn
    end)."""
    return {"prompt": encode_prompt(tok, row["prompt"], max_prompt), "chosen": encode_answer(tok, row["prompt"], row["chosen"]),
            "rejected": encode_answer(tok, row["prompt"], row["rejected"])}


def dpo_length(row: dict[str, Any]) -> int:
    return len(row["prompt"]) + max(len(row["chosen"]), len(row["rejected"]))


def collate_dpo(pad_id: int):
    """(2B, T) right-padded input_ids/attention_mask (the B chosen rows, then the B rejected ones), the (2B, T)
    answer positions, and the reference's (2B,) summed log-probabilities (`ref`), when the rows carry them."""
    import torch

    def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
        prompts = [b["prompt"] for b in batch] * 2
        rows = [b["prompt"] + b["chosen"] for b in batch] + [b["prompt"] + b["rejected"] for b in batch]
        ids, mask = right_pad(rows, pad_id)
        out = {"input_ids": ids, "attention_mask": mask,
               "answer": answer_positions([len(p) for p in prompts], [len(r) for r in rows], ids.shape[1])}
        if "ref_chosen" in batch[0]:
            out["ref"] = torch.tensor([b["ref_chosen"] for b in batch] + [b["ref_rejected"] for b in batch])
        return out

    return collate


def _policy_logprobs(engine: DeepSpeedEngine, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """(policy chosen, policy rejected, reference chosen, reference rejected), each (B,) summed over the answer
    (the reference's None for a reference-free loss), and the chosen answers' mean negative log-likelihood per token
    (RPO's term, ORPO's SFT term)."""
    device = engine.device
    lp = sequence_logprobs(engine, batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["answer"])
    half = lp.shape[0] // 2
    ref = batch["ref"].to(lp.device) if "ref" in batch else None
    chosen_tokens = batch["answer"][:half, 1:].sum().clamp(min=1).to(lp.device)
    return (lp[:half], lp[half:], *((ref[:half], ref[half:]) if ref is not None else (None, None)),
            -lp[:half].sum() / chosen_tokens)


def per_token(logprobs: list[Any], answer: Any) -> list[Any]:
    """(policy chosen, policy rejected, ref chosen, ref rejected) summed log-probabilities, each divided by its
    answer's token count (answer: the (2B, T) answer positions, chosen rows then rejected): TRL's IPO takes the
    log-ratios of mean log-probabilities, so a long answer does not weigh more."""
    counts = answer[:, 1:].sum(-1).clamp(min=1).to(logprobs[0].device)  # (2B,) tokens of each answer
    half = counts.shape[0] // 2
    chosen, rejected = counts[:half], counts[half:]
    return [x if x is None else x / n for x, n in zip(logprobs, (chosen, rejected, chosen, rejected), strict=True)]


def add_reference_logprobs(ref_model: torch.nn.Module, rows: list[dict[str, Any]], pad_id: int, batch_size: int,
                           dist: Dist, collate_fn: Callable[[int], Callable] | None = None,
                           keys: tuple[str, str] = ("ref_chosen", "ref_rejected")) -> None:
    """Fill each row's ref_chosen / ref_rejected (summed log-probabilities under the frozen reference), once; each
    rank scores its share of the rows and the shares are summed over ranks. `collate_fn` and `keys`: another
    layout of two answers per row (KTO's answer and mismatched answer)."""
    import torch

    collate = (collate_fn or collate_dpo)(pad_id)
    out = torch.zeros(len(rows), 2, dtype=torch.float64)
    mine = list(range(dist.rank, len(rows), dist.world_size))
    ref_model.eval().to(dist.device)
    for i in range(0, len(mine), batch_size):
        index = mine[i : i + batch_size]
        batch = collate([rows[j] for j in index])
        with torch.no_grad():
            lp = sequence_logprobs(ref_model, batch["input_ids"].to(dist.device),
                                   batch["attention_mask"].to(dist.device), batch["answer"]).cpu()
        out[index, 0], out[index, 1] = lp[: len(index)].double(), lp[len(index) :].double()
    if dist.world_size > 1:
        torch.distributed.all_reduce(out)
    for row, (c, r) in zip(rows, out.tolist(), strict=True):
        row[keys[0]], row[keys[1]] = c, r


def run_dpo(
    params: Params, data_dir: Path, sft_path: Path, out_dir: Path, live_dir: Path | None, ckpt_dir: Path | None = None
) -> dict[str, Any]:
    """Train the SFT actor with DPO on data_dir/reward_train.jsonl and write the HF folder out_dir. When prepare
    skipped step 2 (no preference pair), write a placeholder instead (metrics trained: false)."""
    from rlhf.data.split import read_split
    from rlhf.models.build import add_lora, disable_dropout, load_causal_lm
    from rlhf.models.tokenizer import load_tokenizer
    from rlhf.pipeline.guards import check_model_folder
    from rlhf.pipeline.outputs import skipped_steps, write_placeholder
    from rlhf.training.checks import check_eval_split, check_train_split, launch_world_size
    from rlhf.training.lifecycle import train_and_export
    from rlhf.training.runtime import init_distributed, seed_everything

    cfg = params.dpo
    check_model_folder(sft_path, "causal_lm", "--sft")
    tok = load_tokenizer(sft_path)
    limit = params.data.max_prompt_tokens  # only data.truncate_prompts lets a longer prompt through prepare
    kto = cfg.loss_type == "kto"  # KTO takes every answer, labelled; the others take the pairs
    encode = (lambda rows: encode_kto(tok, rows, limit)) if kto else (  # noqa: E731
        lambda rows: [encode_dpo_pair(tok, r, limit) for r in rows if r.get("label") is None])
    train_rows = encode(read_split(data_dir / "reward_train.jsonl"))
    if not train_rows and "reward" in skipped_steps(data_dir):
        return write_placeholder("dpo", {"dpo": cfg.model_dump()}, params.seed, data_dir, out_dir, live_dir,
                                 ckpt_dir, NO_PAIRS)
    eval_rows = encode(read_split(data_dir / "reward_eval.jsonl"))
    check_train_split(data_dir / "reward_train.jsonl", len(train_rows), cfg, "dpo", launch_world_size(), "reward")
    check_eval_split(data_dir / "reward_eval.jsonl", len(eval_rows), "accuracy")
    dist = init_distributed(params.engine)
    seed_everything(params.seed, params.engine.deterministic)
    if cfg.needs_reference:  # SimPO and ORPO have none
        reference = load_causal_lm(sft_path)
        for rows in (train_rows, eval_rows):
            add_reference_logprobs(reference, rows, tok.pad_token_id, cfg.eval_batch_size, dist,
                                   *((collate_kto, ("ref_answer", "ref_mismatched")) if kto else ()))
        del reference
    elif dist.is_main:
        print(f"[dpo] {cfg.loss_type} has no reference model: none loaded or scored", flush=True)

    loss_fn = kto_loss_fn(cfg, dist.world_size) if kto else dpo_loss_fn(cfg)

    def build() -> Any:
        model = add_lora(load_causal_lm(sft_path), cfg.lora, "CAUSAL_LM")
        return disable_dropout(model) if cfg.disable_dropout else model

    return train_and_export(
        name="dpo",
        params=params,
        train=cfg,
        dist=dist,
        tok=tok,
        build_model=build,
        train_rows=train_rows,
        eval_rows=eval_rows,
        collate=(collate_kto if kto else collate_dpo)(tok.pad_token_id),
        length=kto_length if kto else dpo_length,
        loss_fn=loss_fn,
        evaluate=dpo_evaluate(loss_fn, dist),
        out_dir=out_dir,
        live_dir=live_dir,
        ckpt_dir=ckpt_dir,
        manifest_params={k: getattr(params, k).model_dump() for k in ("engine", "dpo")},
        manifest_inputs={"reward_train": data_dir / "reward_train.jsonl", "reward_eval": data_dir / "reward_eval.jsonl",
                         "sft_model": sft_path},
    )


def dpo_loss_fn(cfg: DPOConfig) -> Callable[[Any, dict[str, Any]], tuple[torch.Tensor, dict[str, float]]]:
    """loss_fn(engine, batch) of dpo.loss_type on the batch's pairs (the reference log-probs are in the batch),
    with IPO's per-token normalisation and RPO's NLL term when configured; SimPO and ORPO on mean log-probabilities
    per answer token, without a reference."""
    from rlhf.training.losses import dpo_loss, reference_free_loss

    def loss_fn(engine: DeepSpeedEngine, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        *logprobs, nll = _policy_logprobs(engine, batch)
        if not cfg.needs_reference:
            chosen, rejected, *_ = per_token(logprobs, batch["answer"])
            loss, stats = reference_free_loss(chosen, rejected, cfg.beta, cfg.loss_type, cfg.simpo_gamma)
        else:
            if cfg.loss_type == "ipo" and cfg.ipo_length_normalize:  # TRL's IPO: mean log-probabilities per token
                logprobs = per_token(logprobs, batch["answer"])
            loss, stats = dpo_loss(*logprobs, cfg.beta, cfg.loss_type, cfg.label_smoothing)
        if cfg.sft_coef > 0:  # RPO (Pang et al. 2024; TRL's rpo_alpha), ORPO's SFT term: keep the chosen answers likely
            loss = loss + cfg.sft_coef * nll
        return loss, {**stats, "nll_chosen": nll.item()}

    return loss_fn


def dpo_evaluate(loss_fn: Callable[[Any, dict[str, Any]], tuple[torch.Tensor, dict[str, float]]],
                 dist: Dist) -> Callable[[Any, Any], dict[str, float]]:
    """evaluate(engine, loader): the held-out pairs' loss, accuracy, implicit rewards and margin, per pair over
    every rank."""
    from rlhf.training.loop import all_reduce_sum

    def evaluate(engine: DeepSpeedEngine, loader: Any) -> dict[str, float]:
        import torch

        keys = ("eval_loss", "accuracy", "rewards_chosen", "rewards_rejected", "margin", "nll_chosen")
        sums = [0.0] * (len(keys) + 1)
        with torch.no_grad(), evaluating(engine):
            for batch in loader:
                loss, stats = loss_fn(engine, batch)
                n = batch["input_ids"].shape[0] // 2
                for i, v in enumerate([loss.item(), *(stats[k] for k in keys[1:]), 1.0]):
                    sums[i] += v * n
        *totals, n = all_reduce_sum(sums, dist)
        return {k: v / max(n, 1.0) for k, v in zip(keys, totals)}

    return evaluate
