"""The shipped task: sort a short list of numbers and answer in a fixed polite frame.

Why this task: a 5-10M parameter model learns it in minutes on two CPU cores, every response has an exact quality
(the gold reward below), and its two failure modes (a wrong order, a missing polite frame) are easy for a small
reward model to see in a pair. The SFT demonstrations are deliberately noisy, so a model that imitates them is
imperfect and the reward model and PPO have room to improve on it. Training never calls :func:`gold_reward`;
only the preference labels carry its signal, and evaluation uses it to prove that RLHF helped.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

PROMPT_PREFIX = "Sort ascending:"
POLITE_PREFIX = "Sure! Here they are in order:"
BARE_PREFIX = "Sorted:"

_NUMBERS = re.compile(r"\d+")
POLITE_WEIGHT = 0.25  # share of the gold reward for the polite frame; the rest is for the order


def make_prompt(numbers: list[int]) -> str:
    return f"{PROMPT_PREFIX} {' '.join(map(str, numbers))}"


def prompt_numbers(prompt: str) -> list[int]:
    """The numbers a prompt asks to sort (empty if the prompt is not of this task)."""
    if PROMPT_PREFIX not in prompt:
        return []
    return [int(n) for n in _NUMBERS.findall(prompt.split(PROMPT_PREFIX, 1)[1])]


def render_response(numbers: list[int], polite: bool) -> str:
    body = " ".join(map(str, numbers))
    return f"{POLITE_PREFIX} {body}." if polite else f"{BARE_PREFIX} {body}"


def gold_reward(prompt: str, response: str) -> float:
    """Score a response to a prompt in [0, 1].

    POLITE_WEIGHT for answering in the polite frame ("Sure! Here they are in order: ... ."), the rest for the order:
    the share of positions that hold the right number, counted against the longer of the answer and the target, so
    dropped, extra or misplaced numbers all cost.
    """
    target = sorted(prompt_numbers(prompt))
    if not target:
        return 0.0
    text = response.strip()
    polite = text.startswith(POLITE_PREFIX) and text.endswith(".")
    body = text.split(":", 1)[1] if ":" in text else text
    got = [int(n) for n in _NUMBERS.findall(body)]
    hits = sum(1 for a, b in zip(got, target) if a == b)
    order = hits / max(len(got), len(target))
    return POLITE_WEIGHT * float(polite) + (1 - POLITE_WEIGHT) * order


def gold_reward_fn(prompts: list, completions: list, **columns: object) -> list[float | None]:
    """:func:`gold_reward` with TRL's reward-function signature (`rewards.functions`, `evaluate.scorers`):
    None for a prompt that is not of this task, so it never passes for a score of someone else's data."""
    out: list[float | None] = []
    for prompt, completion in zip(prompts, completions):
        text = prompt[-1]["content"] if isinstance(prompt, list) else prompt
        answer = completion[-1]["content"] if isinstance(completion, list) else completion
        out.append(gold_reward(text, answer) if prompt_numbers(text) else None)
    return out


def _corrupt(numbers: list[int], rng: random.Random) -> list[int]:
    """One realistic mistake on a sorted list: a swapped pair, a dropped or repeated number, or a reversed span."""
    out = list(numbers)
    kind = rng.randrange(4)
    if kind == 0:
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    elif kind == 1:
        del out[rng.randrange(len(out))]
    elif kind == 2:
        i = rng.randrange(len(out))
        out.insert(i, out[i])
    else:
        i = rng.randrange(len(out) - 1)
        j = rng.randrange(i + 2, len(out) + 1)
        out[i:j] = reversed(out[i:j])
    if out == numbers:  # a swap or reversal of equal numbers changes nothing: miscopy one number instead
        out[-1] += 1
    return out


def _noisy_response(numbers: list[int], error_rate: float, impolite_rate: float, rng: random.Random) -> str:
    answer = sorted(numbers)
    if rng.random() < error_rate:
        answer = _corrupt(answer, rng)
    return render_response(answer, polite=rng.random() >= impolite_rate)


def generate_rows(
    num_rows: int,
    seed: int,
    min_len: int = 3,
    max_len: int = 6,
    max_value: int = 29,
    demo_error_rate: float = 0.45,
    demo_impolite_rate: float = 0.45,
    pair_error_rate: float = 0.5,
    pair_impolite_rate: float = 0.5,
) -> Iterator[dict[str, str]]:
    """Yield rows {prompt, completion, chosen, rejected}: a noisy demonstration and a labelled preference pair.

    Both candidates of a pair come from the same noisy writer; the one with the higher gold reward is `chosen`
    (ties are redrawn), the way human labellers would rank two model samples.
    """
    rng = random.Random(seed)
    for _ in range(num_rows):
        numbers = [rng.randint(0, max_value) for _ in range(rng.randint(min_len, max_len))]
        prompt = make_prompt(numbers)
        completion = _noisy_response(numbers, demo_error_rate, demo_impolite_rate, rng)
        while True:
            a = _noisy_response(numbers, pair_error_rate, pair_impolite_rate, rng)
            b = _noisy_response(numbers, pair_error_rate, pair_impolite_rate, rng)
            ra, rb = gold_reward(prompt, a), gold_reward(prompt, b)
            if ra != rb:
                break
        chosen, rejected = (a, b) if ra > rb else (b, a)
        yield {"prompt": prompt, "completion": completion, "chosen": chosen, "rejected": rejected}
