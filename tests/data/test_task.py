"""rlhf/data/task.py: the gold reward on hand-scored answers, and the seeded noisy rows the pipeline trains on."""

from __future__ import annotations

import pytest

from rlhf.data.task import (
    BARE_PREFIX,
    POLITE_PREFIX,
    POLITE_WEIGHT,
    _corrupt,
    generate_rows,
    gold_reward,
    make_prompt,
    prompt_numbers,
    render_response,
)

# gold = POLITE_WEIGHT * polite + (1 - POLITE_WEIGHT) * hits / max(len(answer), len(target)), with
# POLITE_WEIGHT = 0.25 and `hits` the positions where the answer holds the sorted target's number.
PROMPT = make_prompt([3, 1, 4, 2])  # target: 1 2 3 4


def test_weight_is_the_one_the_comments_assume() -> None:
    assert POLITE_WEIGHT == 0.25


def test_prompt_round_trip() -> None:
    assert PROMPT == "Sort ascending: 3 1 4 2"
    assert prompt_numbers(PROMPT) == [3, 1, 4, 2]


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        # polite frame (0.25) + 4/4 positions (0.75) = 1.0
        ("Sure! Here they are in order: 1 2 3 4.", 1.0),
        # bare frame (0) + 4/4 positions (0.75) = 0.75
        ("Sorted: 1 2 3 4", 0.75),
        # polite, 2 and 3 swapped: positions 0 and 3 right -> 0.25 + 0.75 * 2/4 = 0.625
        ("Sure! Here they are in order: 1 3 2 4.", 0.25 + 0.75 * 2 / 4),
        # polite, 3 dropped: [1 2 4] vs [1 2 3 4] -> 2 hits over max(3, 4) = 4 -> 0.25 + 0.75 * 2/4 = 0.625
        ("Sure! Here they are in order: 1 2 4.", 0.25 + 0.75 * 2 / 4),
        # bare, 9 appended: [1 2 3 4 9] -> 4 hits over max(5, 4) = 5 -> 0.75 * 4/5 = 0.6
        ("Sorted: 1 2 3 4 9", 0.75 * 4 / 5),
        # bare, reversed: [4 3 2 1] -> no position right -> 0.0
        ("Sorted: 4 3 2 1", 0.0),
        # polite frame without its closing full stop is not polite: 0 + 0.75 = 0.75
        ("Sure! Here they are in order: 1 2 3 4", 0.75),
        # garbage with no numbers: not polite, 0 hits -> 0.0
        ("I like turtles", 0.0),
        ("", 0.0),
        # garbage with numbers but no frame: the whole text is the body; [1 7] -> 1 hit over 4 -> 0.75 * 1/4
        ("blah 1 blah 7", 0.75 * 1 / 4),
    ],
)
def test_gold_reward_hand_scored(response: str, expected: float) -> None:
    assert gold_reward(PROMPT, response) == pytest.approx(expected)


def test_duplicates_in_the_prompt_must_be_repeated() -> None:
    prompt = make_prompt([5, 2, 5])  # target: 2 5 5
    # polite, one 5 missing: [2 5] -> 2 hits over max(2, 3) = 3 -> 0.25 + 0.75 * 2/3 = 0.75
    assert gold_reward(prompt, render_response([2, 5], polite=True)) == pytest.approx(0.25 + 0.75 * 2 / 3)
    assert gold_reward(prompt, render_response([2, 5, 5], polite=True)) == pytest.approx(1.0)


@pytest.mark.parametrize("prompt", ["What is the capital of France?", "", "Sort ascending:", "sort ascending: 3 1 2"])
def test_prompt_not_of_the_task_scores_zero(prompt: str) -> None:
    # no target numbers -> 0.0, even for an answer that would be perfect elsewhere
    assert gold_reward(prompt, "Sure! Here they are in order: 1 2 3.") == 0.0


def test_render_response_frames() -> None:
    assert render_response([1, 2], polite=True) == f"{POLITE_PREFIX} 1 2."
    assert render_response([1, 2], polite=False) == f"{BARE_PREFIX} 1 2"


# ---------------------------------------------------------------------------------------------------- generation

KNOBS = dict(min_len=3, max_len=6, max_value=29)


def rows(n: int = 300, seed: int = 0, **rates: float) -> list[dict[str, str]]:
    return list(generate_rows(n, seed, **KNOBS, **rates))


def is_sorted_answer(row: dict[str, str], answer: str) -> bool:
    """The answer holds exactly the prompt's numbers in ascending order (frame aside)."""
    return gold_reward(row["prompt"], answer) - POLITE_WEIGHT * is_polite(answer) == pytest.approx(1 - POLITE_WEIGHT)


def is_polite(answer: str) -> bool:
    return answer.startswith(POLITE_PREFIX) and answer.endswith(".")


def test_rows_have_the_four_columns_and_valid_prompts() -> None:
    for row in rows(100):
        assert set(row) == {"prompt", "completion", "chosen", "rejected"}
        numbers = prompt_numbers(row["prompt"])
        assert KNOBS["min_len"] <= len(numbers) <= KNOBS["max_len"]
        assert all(0 <= x <= KNOBS["max_value"] for x in numbers)


def test_deterministic_for_a_seed() -> None:
    assert rows(200, seed=7) == rows(200, seed=7)


def test_differs_across_seeds() -> None:
    a, b = rows(200, seed=7), rows(200, seed=8)
    assert a != b
    assert sum(x["prompt"] == y["prompt"] for x, y in zip(a, b)) < 20  # not just a shifted copy


def test_prefix_of_a_longer_run_is_the_same() -> None:
    # num_rows only decides where to stop: 50 rows are the first 50 of 200.
    assert rows(50, seed=3) == rows(200, seed=3)[:50]


def test_chosen_beats_rejected_on_every_row() -> None:
    for row in rows(500, seed=1):
        rc, rr = gold_reward(row["prompt"], row["chosen"]), gold_reward(row["prompt"], row["rejected"])
        assert 0.0 <= rr < rc <= 1.0


def test_gold_reward_always_in_unit_interval() -> None:
    for row in rows(300, seed=2, demo_error_rate=0.8, pair_error_rate=0.8):
        for answer in (row["completion"], row["chosen"], row["rejected"]):
            assert 0.0 <= gold_reward(row["prompt"], answer) <= 1.0


def test_zero_error_rate_gives_sorted_demonstrations() -> None:
    data = rows(300, seed=4, demo_error_rate=0.0, demo_impolite_rate=0.0)
    assert all(is_sorted_answer(r, r["completion"]) for r in data)
    assert all(gold_reward(r["prompt"], r["completion"]) == 1.0 for r in data)


def test_error_and_impolite_rates_of_one_give_all_wrong_and_all_bare() -> None:
    data = rows(300, seed=5, demo_error_rate=1.0, demo_impolite_rate=1.0)
    assert not any(is_sorted_answer(r, r["completion"]) for r in data)
    assert all(r["completion"].startswith(BARE_PREFIX) for r in data)
    assert all(gold_reward(r["prompt"], r["completion"]) < 0.75 for r in data)


@pytest.mark.parametrize(("error_rate", "impolite_rate"), [(0.45, 0.6), (0.2, 0.8)])
def test_demo_rates_roughly_match(error_rate: float, impolite_rate: float) -> None:
    n = 2000
    data = rows(n, seed=6, demo_error_rate=error_rate, demo_impolite_rate=impolite_rate)
    wrong = sum(not is_sorted_answer(r, r["completion"]) for r in data) / n
    impolite = sum(not is_polite(r["completion"]) for r in data) / n
    # binomial sd at n=2000 is <= 0.012; 0.05 is 4+ sd
    assert wrong == pytest.approx(error_rate, abs=0.05)
    assert impolite == pytest.approx(impolite_rate, abs=0.05)



def test_corrupt_changes_a_list_of_one_repeated_number() -> None:
    # A demonstration drawn as an error must be wrong, also for "Sort ascending: 11 11 11", where a swap or a
    # reversed span changes nothing.
    import random

    for seed in range(20):
        assert _corrupt([11, 11, 11], random.Random(seed)) != [11, 11, 11]
