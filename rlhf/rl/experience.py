"""An iteration's experience: the rollouts with everything the update reads (log-probabilities of the actor and
the reference, the critic's values, rewards, advantages, returns, KL), and how the critic's per-token values of
a rollout are computed."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from rlhf.models.build import classifier_parts as _classifier
from rlhf.models.prefix import answer_outputs


@dataclass
class Experience:
    """One rollout batch. B = rollouts, T = P + R (left-padded prompt of P tokens, answer of R tokens)."""

    sequences: torch.Tensor  # (B, T) prompt + answer token ids, pad_token_id in the padding
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens
    action_mask: torch.Tensor  # (B, R) 1 on answer tokens up to and including eos, 0 after
    logprobs: torch.Tensor  # (B, R) log pi_old(a_t | s_t) of the actor that generated the answer
    ref_logprobs: torch.Tensor  # (B, R) log pi_ref(a_t | s_t) of the frozen SFT model
    values: torch.Tensor  # (B, R) V_old(s_t) of the critic (0 without one)
    scores: torch.Tensor  # (B,) the summed reward (rewards.*) of each answer, raw
    rewards: torch.Tensor  # (B, R) per-token rewards the advantages came from (score, baselined for grpo/rloo, at
                           # the last answer token; minus kl_coef x KL per token under kl_penalty: reward)
    advantages: torch.Tensor  # (B, R) GAE (ppo) or reward-to-go of the critic-free family
    returns: torch.Tensor  # (B, R) advantages + values: the critic's targets (ppo)
    kl: torch.Tensor  # (B, R) per-token log pi_old - log pi_ref
    # (B, R) log pi_rollout of the drawn tokens as the rollout engine gave them, kept when log pi_old was recomputed
    # by the training forward (else None: they are the same numbers); the mismatch is measured between the two
    rollout_logprobs: torch.Tensor | None = None
    # (B, R) importance weights of the policy loss for that mismatch (ppo.rollout.correction; rlhf/rl/correction.py),
    # None = 1 everywhere
    is_weights: torch.Tensor | None = None

    def slice(self, start: int, stop: int) -> Experience:
        return Experience(**{f.name: _rows(getattr(self, f.name), slice(start, stop)) for f in fields(self)})

    def select(self, rows: torch.Tensor) -> Experience:
        """The experiences at `rows` (a (n,) index tensor), in that order."""
        return Experience(**{f.name: _rows(getattr(self, f.name), rows) for f in fields(self)})

    @staticmethod
    def cat(parts: list[Experience]) -> Experience:
        """Concatenate rollouts along B: prompts left-padded to the widest prompt (a multi-turn batch's width is its
        own longest first prompt), then every (B, R) tensor and the sequences right-padded to the longest answer
        (masked out), so the prompt/answer boundary is one column for every row."""
        import torch

        def pad(ts: list[Any], value: float) -> torch.Tensor:
            width = max(t.shape[1] for t in ts)
            return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in ts])

        widths = [part.sequences.shape[1] - part.action_mask.shape[1] for part in parts]
        left = {name: [torch.nn.functional.pad(getattr(part, name), (max(widths) - w, 0), value=0)
                       for part, w in zip(parts, widths, strict=True)] for name in ("sequences", "attention_mask")}
        out = {}
        for f in fields(Experience):
            ts = left.get(f.name) or [getattr(p, f.name) for p in parts]
            if any(t is None for t in ts):
                out[f.name] = None  # an optional field some part lacks
            else:
                out[f.name] = torch.cat(ts) if ts[0].dim() == 1 else pad(ts, 0)
        return Experience(**out)


def _rows(t: torch.Tensor | None, index: slice | torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t[index]


def shares_cache(module: torch.nn.Module) -> bool:
    """Whether a forward pass of `module` keeps a KV cache: gradient checkpointing drops it while training."""
    return not (module.training and getattr(module, "is_activation_checkpointing", False))


def token_values(module: torch.nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """(B, R) per-token values of a sequence classifier (the critic): its score head on the hidden states of
    positions P - 1 .. T - 2, the states in which each answer token is chosen."""
    body, score = _classifier(module)
    hidden = answer_outputs(body, "last_hidden_state", sequences, attention_mask, prompt_len, shares_cache(module),
                            last=False)
    return score(hidden).squeeze(-1).float()
