"""KTO (Ethayarajh et al. 2024; TRL's KTOTrainer) in the DPO stage (`dpo.loss_type: kto`): the SFT actor trained on
answers labelled desirable or undesirable, one at a time, against its frozen copy, no pairs needed.

Its examples come from the preference split: TRL's unpaired rows (`prompt`, `completion`, `label`: thumbs up or
down) as they are, and each pair as two examples, its chosen answer desirable and its rejected one not (TRL's
unpair_preference_dataset). KTO's reference point z0 estimates KL(policy || ref) on mismatched answers: each
example's prompt with the answer of the next example of another prompt (fixed once, as TRL's KL dataset), scored by
the policy without gradient and averaged over the micro batch and the ranks, floored at 0. The reference's
log-probabilities of every answer and mismatched answer are computed once, before training, as DPO's are
(rlhf.prefs.dpo.add_reference_logprobs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rlhf.data.batching import answer_positions, right_pad
from rlhf.models.logprobs import sequence_logprobs
from rlhf.models.tokenizer import encode_answer, encode_prompt

if TYPE_CHECKING:
    import torch
    from deepspeed import DeepSpeedEngine
    from transformers import PreTrainedTokenizerBase

    from rlhf.config import DPOConfig


def encode_kto(tok: PreTrainedTokenizerBase, rows: list[dict[str, Any]], max_prompt: int | None = None) -> list[dict]:
    """The examples of a preference split: {prompt, answer ids, desirable, mismatched answer ids}."""
    examples = []
    for r in rows:
        prompt = encode_prompt(tok, r["prompt"], max_prompt)
        for key, desirable in (("chosen", True), ("rejected", False)):
            if r.get(key) is not None:
                examples.append({"prompt": prompt, "answer": encode_answer(tok, r["prompt"], r[key]),
                                 "desirable": desirable})
    n = len(examples)
    for i, e in enumerate(examples):  # the next example's answer to another prompt (its own, with one prompt only)
        j = next((k % n for k in range(i + 1, i + n) if examples[k % n]["prompt"] != e["prompt"]), i)
        e["mismatched"] = examples[j]["answer"]
    return examples


def kto_length(row: dict[str, Any]) -> int:
    return len(row["prompt"]) + max(len(row["answer"]), len(row["mismatched"]))


def collate_kto(pad_id: int) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """(2B, T) right-padded rows (the B answers, then the B mismatched ones), their answer positions, (B,)
    `desirable`, and the reference's (2B,) summed log-probabilities (`ref`) when the examples carry them."""
    import torch

    def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
        prompts = [b["prompt"] for b in batch] * 2
        rows = [b["prompt"] + b["answer"] for b in batch] + [b["prompt"] + b["mismatched"] for b in batch]
        ids, mask = right_pad(rows, pad_id)
        out = {"input_ids": ids, "attention_mask": mask, "desirable": torch.tensor([b["desirable"] for b in batch]),
               "answer": answer_positions([len(p) for p in prompts], [len(r) for r in rows], ids.shape[1])}
        if "ref_answer" in batch[0]:
            out["ref"] = torch.tensor([b["ref_answer"] for b in batch] + [b["ref_mismatched"] for b in batch])
        return out

    return collate


def kto_loss_fn(cfg: DPOConfig, world_size: int) -> Callable[[Any, dict[str, Any]], tuple[torch.Tensor, dict]]:
    """loss_fn(engine, batch): KTO's loss (rlhf.training.losses.kto_loss) on the batch's examples, z0 from their
    mismatched answers (no gradient; averaged over ranks), plus sft_coef x the desirable answers' NLL per token."""
    import torch

    from rlhf.training.losses import kto_loss

    def loss_fn(engine: DeepSpeedEngine, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        device = engine.device
        ids, mask, answer = batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["answer"]
        half = ids.shape[0] // 2
        policy = sequence_logprobs(engine, ids[:half], mask[:half], answer[:half])
        with torch.no_grad():
            mismatched = sequence_logprobs(engine, ids[half:], mask[half:], answer[half:])
        ref = batch["ref"].to(policy.device)
        kl = (mismatched - ref[half:]).mean().detach()
        if world_size > 1:
            torch.distributed.all_reduce(kl)
            kl = kl / world_size
        desirable = batch["desirable"].to(policy.device)
        loss, stats = kto_loss(policy, ref[:half].to(policy.dtype), desirable, kl.clamp(min=0), cfg.beta,
                               cfg.kto_desirable_weight, cfg.kto_undesirable_weight)
        tokens = (answer[:half, 1:].sum(-1).to(policy.device) * desirable).sum().clamp(min=1)
        nll = -(policy * desirable).sum() / tokens
        if cfg.sft_coef > 0:
            loss = loss + cfg.sft_coef * nll
        return loss, {**stats, "nll_chosen": nll.item()}

    return loss_fn
