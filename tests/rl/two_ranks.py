"""Run by tests/rl/test_batches.py under `torchrun --nproc_per_node 2`: each rank takes its half of a fixed,
scored experience, computes the iteration's advantages (statistics over both ranks) and takes one optimizer step on
its half as a mini batch of micro batches; rank 0 writes every rank's advantages and the gradients the step used.

    torchrun --nproc_per_node 2 tests/rl/two_ranks.py PARAMS SFT REWARD EXPERIENCE OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from rlhf.config import load_params
from rlhf.rl.experience import Experience
from rlhf.rl.models import RLModels
from rlhf.rl.trainer import RLTrainer
from rlhf.training.runtime import init_distributed
from tests.ranks import leave


def scored_experience(saved: dict, rows: slice) -> Experience:
    """The saved experience's rows, as phases 1-2 leave it: rewards, advantages and returns not yet estimated."""
    part = {name: value[rows] for name, value in saved.items()}
    zeros = torch.zeros_like(part["logprobs"])
    return Experience(**part, rewards=zeros, advantages=zeros, returns=zeros)


def step_gradients(trainer: RLTrainer, exp: Experience) -> dict[str, dict[str, torch.Tensor]]:
    """train_rlhf(exp) as one mini batch, returning the reduced gradients each model's optimizer step consumed."""
    grads: dict[str, dict[str, torch.Tensor]] = {}
    models = {"actor": trainer.models.actor.engine, "critic": trainer.models.critic}
    for name, engine in models.items():
        if engine is None:
            continue
        step = engine.step

        def recorded(*args, _name=name, _engine=engine, _step=step, **kwargs):
            grads[_name] = {k: p.grad.detach().clone() for k, p in _engine.module.named_parameters()
                            if p.grad is not None}
            return _step(*args, **kwargs)

        engine.step = recorded
    trainer.train_rlhf(exp)
    return grads


def main(params_path: str, sft: str, reward: str, experience: str, out: str) -> None:
    params = load_params(params_path)
    dist = init_distributed(params.engine)
    models = RLModels(params.ppo, params.engine, dist, Path(sft), Path(reward))
    trainer = RLTrainer(models, params.ppo, params.rewards)
    saved = torch.load(experience)
    n = saved["sequences"].shape[0] // dist.world_size
    mine = scored_experience(saved, slice(dist.rank * n, (dist.rank + 1) * n))
    trainer._rollout_and_score = lambda batch: (mine, {"generate_s": 0.0, "score_s": 0.0})
    exp, _ = trainer.make_experience([{}])
    advantages = [torch.zeros_like(exp.advantages) for _ in range(dist.world_size)]
    torch.distributed.all_gather(advantages, exp.advantages.contiguous())
    grads = step_gradients(trainer, exp)
    if dist.is_main:
        torch.save({"advantages": torch.cat(advantages), "grads": grads}, out)
    leave()


if __name__ == "__main__":
    main(*sys.argv[1:])
