"""How a model draws answers: one set of knobs wherever it samples (step 3's rollouts, evaluate, chat).

params.yaml spells them inside ppo (temperature, top_k, top_p, max_answer_tokens) and evaluate (the same and
do_sample); `PPOConfig.sampling` and `EvaluateConfig.sampling` hand them to the code as one object."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Sampling:
    """How answers are drawn, the same knobs wherever a model samples (rollouts, evaluation, chat)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    do_sample: bool = True  # False: greedy
    min_new_tokens: int = 0  # no stop id is drawn before this many tokens (benchmarks: answers of a fixed length)

    def knobs(self) -> dict[str, Any]:
        """The keyword arguments of rlhf.rollout.decode.decode and rlhf.rollout.hf.generate_tokens."""
        return {"do_sample": self.do_sample, "temperature": self.temperature, "top_k": self.top_k,
                "top_p": self.top_p, "max_new_tokens": self.max_new_tokens}
