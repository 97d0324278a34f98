"""Step 2: a reward model trained on preference pairs with the pairwise loss -log sigmoid(r_chosen - r_rejected)
(InstructGPT eq. 1; DeepSpeed-Chat step 2), scored at the last real token of prompt + answer."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.config import Params
from rlhf.data.batching import right_pad
from rlhf.errors import UserError
from rlhf.models.tokenizer import encode_answer, encode_prompt
from rlhf.training.runtime import Dist, evaluating

if TYPE_CHECKING:
    import torch
    from deepspeed import DeepSpeedEngine
    from transformers import PreTrainedTokenizerBase



def encode_pair(tok: PreTrainedTokenizerBase, row: dict[str, Any], max_prompt: int | None = None) -> dict[str, list[int]]:
    prompt = encode_prompt(tok, row["prompt"], max_prompt)
    return {"chosen": prompt + encode_answer(tok, row["prompt"], row["chosen"]),
            "rejected": prompt + encode_answer(tok, row["prompt"], row["rejected"])}


def pair_length(row: dict[str, list[int]]) -> int:
    """Tokens a pair takes in a batch: chosen and rejected are padded to one width, the longer one's."""
    return max(len(row["chosen"]), len(row["rejected"]))


def collate_pairs(pad_id: int):
    """(2B, T) input_ids/attention_mask: the B chosen sequences first, then the B rejected ones, right-padded."""

    def collate(batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        ids, mask = right_pad([b["chosen"] for b in batch] + [b["rejected"] for b in batch], pad_id)
        return {"input_ids": ids, "attention_mask": mask}

    return collate


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean of -log sigmoid(r_c - r_r) over pairs; chosen, rejected: (B,) scores."""
    import torch.nn.functional as F

    return -F.logsigmoid(chosen - rejected).mean()


def _scores(engine: DeepSpeedEngine, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    from rlhf.models.build import last_token_scores

    batch = {k: v.to(engine.device) for k, v in batch.items()}
    # (2B,) score at each sequence's last real token (its eos), by position: PPO and evaluate read it there too
    scores = last_token_scores(engine.module, batch["input_ids"], batch["attention_mask"])
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


def _loss(engine: DeepSpeedEngine, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    chosen, rejected = _scores(engine, batch)
    return pairwise_loss(chosen, rejected), {"accuracy": (chosen > rejected).float().mean().item()}


def _evaluate(dist: Dist):
    import torch

    from rlhf.training.loop import all_reduce_sum

    def evaluate(engine: DeepSpeedEngine, loader: Any) -> dict[str, float]:
        correct = n = c_sum = r_sum = loss_sum = 0.0
        with torch.no_grad(), evaluating(engine):
            for batch in loader:
                chosen, rejected = _scores(engine, batch)
                correct += (chosen > rejected).sum().item()
                c_sum += chosen.sum().item()
                r_sum += rejected.sum().item()
                loss_sum += pairwise_loss(chosen, rejected).item() * chosen.numel()
                n += chosen.numel()
        correct, c_sum, r_sum, loss_sum, n = all_reduce_sum([correct, c_sum, r_sum, loss_sum, n], dist)
        n = max(n, 1.0)
        return {
            "accuracy": correct / n,
            "chosen_mean": c_sum / n,
            "rejected_mean": r_sum / n,
            "eval_loss": loss_sum / n,
        }

    return evaluate


NO_REWARD_MODEL = (
    "No reward model: prepare found no preference pair and rewards.model_weight is 0, so step 3's reward is\n"
    "rewards.functions alone. Add a prompt/chosen/rejected source to train one (then rewards.model_weight > 0).\n"
)


def run_reward(
    params: Params, data_dir: Path, out_dir: Path, live_dir: Path | None, ckpt_dir: Path | None = None
) -> dict[str, Any]:
    """Train the reward model on data_dir/reward_train.jsonl and write the HF folder out_dir. When prepare skipped
    step 2 (no preference pair, rewards.model_weight 0), write the placeholder instead (metrics trained: false)."""
    from rlhf.data.split import read_split
    from rlhf.models.build import add_lora, build_reward_model
    from rlhf.models.tokenizer import resolve_tokenizer
    from rlhf.pipeline.outputs import skipped_steps, write_placeholder
    from rlhf.training.checks import check_eval_split, check_train_split, launch_world_size
    from rlhf.training.lifecycle import train_and_export
    from rlhf.training.runtime import init_distributed, seed_everything

    # Bad input (no tokenizer, a missing or too small split) fails here, before DeepSpeed is imported or a process
    # group started.
    tok = resolve_tokenizer(params.reward_model.name_or_path, data_dir, "reward_model.name_or_path")
    cfg = params.reward
    limit = params.data.max_prompt_tokens  # only data.truncate_prompts lets a longer prompt through prepare
    rows = read_split(data_dir / "reward_train.jsonl")
    train_rows = [encode_pair(tok, r, limit) for r in rows if r.get("label") is None]  # KTO's labelled answers: no pair
    unneeded = params.rewards.model_weight == 0 and rows  # only labelled answers, for DPO's kto: no reward model needed
    if not train_rows and ("reward" in skipped_steps(data_dir) or unneeded):
        return write_placeholder("reward", {"reward": params.reward.model_dump()}, params.seed, data_dir, out_dir,
                                 live_dir, ckpt_dir, NO_REWARD_MODEL)
    if not train_rows and rows:
        raise UserError(f"{data_dir / 'reward_train.jsonl'} holds {len(rows)} labelled answers (unpaired rows, KTO's) "
                        "and no preference pair, so no reward model can be trained: add pairs, or set "
                        "rewards.model_weight: 0 (step 3 on rewards.functions) and train with dpo.loss_type: kto")
    eval_rows = [encode_pair(tok, r, limit) for r in read_split(data_dir / "reward_eval.jsonl") if r.get("label") is None]
    check_train_split(data_dir / "reward_train.jsonl", len(train_rows), cfg, "reward", launch_world_size())
    check_eval_split(data_dir / "reward_eval.jsonl", len(eval_rows), "accuracy")
    dist = init_distributed(params.engine)
    seed_everything(params.seed, params.engine.deterministic)

    def build() -> Any:
        return add_lora(build_reward_model(params.reward_model, tok, params.seed), cfg.lora, "SEQ_CLS")

    return train_and_export(
        name="reward",
        params=params,
        train=cfg,
        dist=dist,
        tok=tok,
        build_model=build,
        train_rows=train_rows,
        eval_rows=eval_rows,
        collate=collate_pairs(tok.pad_token_id),
        length=pair_length,
        loss_fn=_loss,
        evaluate=_evaluate(dist),
        out_dir=out_dir,
        live_dir=live_dir,
        ckpt_dir=ckpt_dir,
        manifest_params={k: getattr(params, k).model_dump() for k in ("reward_model", "engine", "reward")},
        manifest_inputs={"reward_train": data_dir / "reward_train.jsonl", "reward_eval": data_dir / "reward_eval.jsonl"},
    )
