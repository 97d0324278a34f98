"""Each step-3 algorithm learns, by a margin a wrong sign cannot reach: on the tiny SFT actor, a reward that pays
for half the vocabulary (the share of answer tokens with an even id, about 0.5 at the start) must rise within a few
iterations through the trainer's own make_experience / update; with the advantages' sign flipped (the control) the
same run must make it fall."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import write_params

ITERATIONS = 15


def _run(trained: Path, algorithm: str, flip: bool = False) -> list[float]:
    """Mean reward of each iteration's rollouts over ITERATIONS iterations of `algorithm`."""
    from rlhf.config import EngineConfig, load_params
    from rlhf.data.batching import collate_prompts
    from rlhf.models.tokenizer import encode_prompt
    from rlhf.rl.models import RLModels
    from rlhf.rl.trainer import RLTrainer
    from rlhf.training.runtime import init_distributed

    class TokenShare(RLTrainer):
        """Reward: the share of an answer's tokens whose id is even (the reward-model term is off)."""

        def reward_scores(self, rollout, rows=None):
            answer = rollout.sequences[:, rollout.prompt_width :]
            hits = ((answer % 2 == 0).float() * rollout.action_mask).sum(-1)
            return hits / rollout.action_mask.sum(-1).clamp(min=1)

        def advantages(self, *args):
            rewards, advantages, returns = super().advantages(*args)
            return (rewards, -advantages, returns) if flip else (rewards, advantages, returns)

    params = load_params(write_params(trained / f"learn_{algorithm}.yaml", {"ppo": {
        "algorithm": algorithm, "rollout_batch_size": 8, "answers_per_prompt": 4, "micro_batch_size": 16,
        "optimizer": {"actor_learning_rate": 0.01, "critic_learning_rate": 0.01}, "ema_beta": 0.0,
        "sampling": {"max_answer_tokens": 8}, "kl": {"coef": 0.0}}}))
    dist = init_distributed(EngineConfig(device="cpu"))
    torch.manual_seed(0)
    models = RLModels(params.ppo, params.engine, dist, trained / "models/sft", trained / "models/reward")
    trainer = TokenShare(models, params.ppo, params.rewards)
    tok = trainer.tok
    ids = [encode_prompt(tok, [{"role": "user", "content": f"Sort ascending: {i} {i * 3 % 17} {i % 5}"}])
           for i in range(8)]
    batch = collate_prompts(max(map(len, ids)), tok.pad_token_id)(ids)
    means = []
    for it in range(ITERATIONS):
        exp, _ = trainer.make_experience([batch])
        means.append(exp.scores.mean().item())
        trainer.update(exp, seed=it)
    return means


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "dr_grpo", "dapo", "gspo", "cispo", "rloo", "reinforce_pp"])
def test_each_algorithm_raises_its_reward(trained: Path, algorithm: str) -> None:
    means = _run(trained, algorithm)
    before, after = sum(means[:3]) / 3, sum(means[-3:]) / 3
    assert after > before + 0.1, means


def test_a_flipped_advantage_lowers_the_reward(trained: Path) -> None:
    """The control: the same run with -A must not pass the test above, so a sign error cannot hide."""
    means = _run(trained, "grpo", flip=True)
    assert sum(means[-3:]) / 3 < sum(means[:3]) / 3, means
