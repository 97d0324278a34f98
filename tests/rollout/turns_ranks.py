"""Run by tests/rollout/test_turns.py under `torchrun --nproc_per_node 2`: rank 0's episodes end after one turn, rank
1's after three; every generation call is collective (as under ZeRO-3, where each gathers the actor), so the ranks
must draw the same number of turns or hang. Rank r writes its calls, its episodes' turns and the widths it drew.

    torchrun --nproc_per_node 2 tests/rollout/turns_ranks.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from rlhf.config import EnvironmentConfig, Sampling
from rlhf.models.tokenizer import train_tokenizer
from rlhf.rollout.base import finish
from rlhf.rollout.environments.base import Environment, Step
from rlhf.rollout.turns import MultiTurnRollout
from tests.ranks import leave


class Counted(Environment):
    """Done after the row's `turns` model turns; feedback in between."""

    def step(self, turn: str) -> Step:
        self.n = getattr(self, "n", 0) + 1
        return Step([{"role": "user", "content": "again"}], reward=1.0, done=self.n == self.row["turns"])


class Collective:
    """Says "ok" and the stop id; every call all-reduces, as a ZeRO-3 gather does."""

    def __init__(self, tok):
        self.tok, self.calls, self.widths = tok, 0, []

    def generate(self, ids, mask, sampling):
        self.calls += 1
        self.widths.append(sampling.max_answer_tokens)
        torch.distributed.all_reduce(torch.ones(1))
        answer = torch.tensor([self.tok("ok", add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]]
                              * ids.shape[0])
        return finish(ids, mask, torch.cat([ids, answer], 1), torch.zeros(answer.shape), [self.tok.eos_token_id])


def main(out: Path) -> None:
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    tok = train_tokenizer(["ok again", "hello there"] * 10, 300)
    engine = Collective(tok)
    config = EnvironmentConfig(name="tests.rollout.turns_ranks:Counted", max_turns=5, max_turn_tokens=4 + rank)
    multi = MultiTurnRollout(engine, tok, Counted, config, [tok.eos_token_id], None, "cpu", world_size=2)
    turns = 1 if rank == 0 else 3
    rows = [{"prompt": [{"role": "user", "content": "hello"}], "turns": turns}] * 2
    rollout = multi.generate(rows, Sampling(max_answer_tokens=64))
    (out / f"rank{rank}.json").write_text(json.dumps({
        "calls": engine.calls, "widths": engine.widths, "turns": multi.stats["turns"],
        "rewards": rollout.env_rewards.tolist(), "ends": rollout.stop_reasons}))
    leave()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
