"""Multi-turn rollouts (`ppo.environment`): each row an episode of model turns and environment answers (tool results,
feedback), drawn by any single-turn engine (own, generate, vllm) one turn at a time for every open episode.

Token in, token out: an episode's trajectory is the exact token sequence the model saw and produced. The model's
turns are kept as the ids it drew (never decoded and re-encoded: the drift of trl#5224 and verl#6719), and only what
the environment adds is tokenised: the chat template's text between the end of a model turn and the start of the
next (the tool messages, then the open assistant header), rendered on a stand-in conversation and cut where the
model's turn ends. The Rollout's answer is everything after the first prompt; its action mask is 1 on the model's
tokens only (each turn up to its stop id), so environment tokens carry no log-prob, no KL and no loss, while every
token is attended.

Budgets: `sampling.max_answer_tokens` bounds the whole trajectory after the prompt (model and environment tokens),
`max_turn_tokens` each model turn, `max_turns` the model turns. An episode that runs out of tokens ends "length"
(DAPO's overlong handling applies to it); one that uses up its turns ends "turns".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from rlhf.errors import UserError
from rlhf.models.tokenizer import adds_bos
from rlhf.rollout.base import Rollout
from rlhf.rollout.environments.base import Environment, Step, answered
from rlhf.rollout.environments.tools import render

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from rlhf.config import EnvironmentConfig, Sampling
    from rlhf.rollout.base import RolloutEngine

_USER, _ANSWER = "QUESTION_STAND_IN", "ANSWER_STAND_IN"  # the stand-in conversation's texts


@dataclass
class Episode:
    env: Environment
    prompt: list[int]  # the first messages' ids, with the open assistant header
    tools: list[dict[str, Any]]  # the environment's tool schemas, rendered with every turn
    tail: list[int] = field(default_factory=list)  # everything after the prompt: model and environment tokens
    mask: list[float] = field(default_factory=list)  # 1 on the model's tokens
    logprobs: list[float] = field(default_factory=list)  # the drawn tokens' (0 on environment tokens)
    reward: float = 0.0
    turns: int = 0
    calls: int = 0
    failed: int = 0
    end: str | None = None  # "stop", "length" or "turns" once over


class MultiTurnRollout:
    """Episodes of `make_env()` on data rows, each model turn drawn by `engine` (a single-turn RolloutEngine)."""

    def __init__(self, engine: RolloutEngine, tok: PreTrainedTokenizerBase, make_env: Callable[[], Environment],
                 config: EnvironmentConfig, stop_ids: Sequence[int], max_prompt_tokens: int | None,
                 device: torch.device | str = "cpu", world_size: int = 1):
        self.engine, self.tok, self.make_env, self.config = engine, tok, make_env, config
        self.spec = config.name or "?"  # the environment, as its errors name it
        self.stop_ids, self.max_prompt_tokens, self.device = set(stop_ids), max_prompt_tokens, device
        self.world_size = world_size  # > 1: every rank draws the same turns (generation under ZeRO-3 is collective)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.has_logprobs = True  # whether the engine returns the drawn tokens' log-probs
        self.stats: dict[str, float] = {}  # the last call's sums: episodes, turns, tool_calls, tool_failed

    def generate(self, rows: list[dict[str, Any]], sampling: Sampling) -> Rollout:
        """One episode per row (a group's rows repeat its row), played to the end -> a Rollout whose answer is the
        trajectory after the first prompt, with `env_rewards` the episodes' summed rewards."""
        episodes = [self._start(row) for row in rows]
        budget = sampling.max_answer_tokens
        for _ in range(self.config.max_turns):
            open_ = [e for e in episodes if e.end is None]
            if not self._most(len(open_)):  # every rank's episodes are over
                break
            self._turn(open_, sampling, budget, idle=episodes[0].prompt)
        for e in episodes:
            e.end = e.end or "turns"
        self.stats = {"episodes": float(len(episodes)), "turns": float(sum(e.turns for e in episodes)),
                      "tool_calls": float(sum(e.calls for e in episodes)),
                      "tool_failed": float(sum(e.failed for e in episodes))}
        return self._assemble(episodes, budget)

    def _start(self, row: dict[str, Any]) -> Episode:
        env = self.make_env()
        messages = answered(self.spec, env.reset, row)
        tools = env.schemas()
        ids = self.tok(render(self.tok, messages, tools, True), add_special_tokens=False)["input_ids"]
        bos = self.tok.bos_token_id
        if bos is not None and ids[:1] != [bos] and adds_bos(self.tok):  # as encode_prompt: a base model's tokenizer
            ids = [bos, *ids]
        if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
            raise UserError(f"ppo.environment: an episode's first messages are {len(ids)} tokens (tool instructions "
                            f"included), above data.max_prompt_tokens {self.max_prompt_tokens}: raise it")
        return Episode(env, ids, tools)

    def _turn(self, episodes: list[Episode], sampling: Sampling, budget: int, idle: list[int]) -> None:
        """One model turn of every open episode, drawn as one batch, then each environment's answer. A rank whose
        episodes are over while another's are not draws a turn for `idle` (a prompt) and drops it, at the widest
        rank's width: the ranks' generation calls stay paired."""
        room = [budget - len(e.tail) for e in episodes]
        width = self._most(min(max(room, default=1), self.config.max_turn_tokens or budget))
        ids, mask = self._left_pad([e.prompt + e.tail for e in episodes] or [idle])
        drawn = self.engine.generate(ids.to(self.device), mask.to(self.device), sampling.model_copy(update={
            "max_answer_tokens": width, "min_answer_tokens": min(sampling.min_answer_tokens, width)}))
        if not episodes:
            return
        self.has_logprobs = drawn.logprobs is not None
        turns = [t[: room[i]] for i, t in enumerate(drawn.answers())]
        for i, (e, tokens) in enumerate(zip(episodes, turns, strict=True)):
            e.tail += tokens
            e.mask += [1.0] * len(tokens)
            e.logprobs += drawn.logprobs[i, : len(tokens)].tolist() if self.has_logprobs else [0.0] * len(tokens)
            e.turns += 1
        # each turn's text without its stop id, other special tokens kept (a tokenizer may mark <tool_call> special)
        texts = [self.tok.decode([t for t in tokens if t not in self.stop_ids]) for tokens in turns]
        for e, tokens, step in zip(episodes, turns, self._answers(episodes, texts), strict=True):
            cut = not (tokens and tokens[-1] in self.stop_ids)  # ran out of tokens before ending its turn
            e.reward += float(step.reward)
            e.calls, e.failed = e.calls + step.calls, e.failed + step.failed
            if cut or step.done:
                e.end = "length" if cut else "stop"
                continue
            feedback = self._feedback(e, tokens, step.messages)
            if len(e.tail) + len(feedback) >= budget:  # no room for the feedback and a turn after it
                e.end = "length"
                continue
            e.tail += feedback
            e.mask += [0.0] * len(feedback)
            e.logprobs += [0.0] * len(feedback)

    def _answers(self, episodes: list[Episode], texts: list[str]) -> list[Step]:
        """Each environment's answer to its episode's turn, `config.workers` of them at once (threads)."""
        def answer(e: Episode, text: str) -> Step:
            return answered(self.spec, e.env.step, text)

        if self.config.workers == 1 or len(episodes) < 2:
            return list(map(answer, episodes, texts))
        with ThreadPoolExecutor(min(self.config.workers, len(episodes)), thread_name_prefix="environment") as pool:
            return list(pool.map(answer, episodes, texts))

    def _feedback(self, e: Episode, turn: list[int], messages: list[dict[str, Any]]) -> list[int]:
        """The ids of what the template writes after the model's turn: the rest of its turn end, the environment's
        messages, the open assistant header. Rendered on a stand-in conversation: the model's own history is never
        re-rendered (a template may rewrite past assistant turns, Qwen3's drops their reasoning)."""
        tools = e.tools
        base = [{"role": "user", "content": _USER}, {"role": "assistant", "content": _ANSWER}]
        before = render(self.tok, base, tools, False)
        after = render(self.tok, base + messages, tools, True)
        if _ANSWER not in before or _ANSWER not in after:
            raise UserError("ppo.environment: the chat template drops an assistant turn's text, so the environment's "
                            "tokens cannot be placed after the model's: use a chat template that renders it")
        # what the template writes after an assistant turn's text, alone ("<|im_end|>\n", "</s>\n") and followed by
        # the environment's messages and the open header: only what comes after the text is compared, so a
        # template that rewrites the text of earlier turns (Qwen3 drops their reasoning) still fits
        lead = before[before.rindex(_ANSWER) + len(_ANSWER):]
        text = after[after.rindex(_ANSWER) + len(_ANSWER):]
        if not text.startswith(lead.rstrip()):
            raise UserError("ppo.environment: the chat template ends an assistant turn differently when more turns "
                            "follow, so the environment's tokens cannot be told apart from the model's: use a chat "
                            "template that appends turns")
        ended = self.tok.decode(turn[-1:]) if turn and turn[-1] in self.stop_ids else ""
        if ended and text.startswith(ended):
            text = text[len(ended):]  # the model drew the turn end itself: what follows it
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def check_prompts(self, rows: list[dict[str, Any]]) -> None:
        """Every row's first messages (tool instructions included) within max_prompt_tokens: one line before
        training, not an error at the iteration that first draws the row."""
        for row in rows:
            self._start(row)

    def _most(self, n: int) -> int:
        """n's maximum over every rank."""
        from rlhf.training.stats import max_over_ranks

        return int(max_over_ranks(torch.tensor([float(n)], device=self.device), self.world_size).item())

    def _left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        from rlhf.data.batching import collate_prompts

        batch = collate_prompts(max(map(len, rows)), self.pad_id)(rows)
        return batch["input_ids"], batch["attention_mask"]

    def _assemble(self, episodes: list[Episode], budget: int) -> Rollout:
        """The Rollout of played episodes: prompts left-padded to P, trajectories right-padded to the budget."""
        prompt_ids, prompt_mask = self._left_pad([e.prompt for e in episodes])
        n, width = len(episodes), budget
        tail = torch.full((n, width), self.pad_id, dtype=prompt_ids.dtype)
        real = torch.zeros(n, width, dtype=prompt_mask.dtype)
        action = torch.zeros(n, width)
        logprobs = torch.zeros(n, width)
        for i, e in enumerate(episodes):
            k = len(e.tail)
            tail[i, :k] = torch.tensor(e.tail, dtype=tail.dtype)
            real[i, :k] = 1
            action[i, :k] = torch.tensor(e.mask)
            logprobs[i, :k] = torch.tensor(e.logprobs)
        d = self.device
        return Rollout(torch.cat([prompt_ids, tail], 1).to(d), torch.cat([prompt_mask, real], 1).to(d), action.to(d),
                       logprobs.to(d) if self.has_logprobs else None, prompt_ids.shape[1],
                       [e.end or "turns" for e in episodes], torch.tensor([e.reward for e in episodes], device=d))
