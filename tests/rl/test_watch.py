"""Over-optimisation warnings (rlhf/rl/watch.py), on the figures of a hacked run and of a healthy one."""

from __future__ import annotations

from rlhf.rl.watch import evaluate_warnings, ppo_warnings

# What a new user's run did (issue 13): the reward model's score driven to the clip, KL ~10 nats per answer,
# answers at the length limit, and the task's own scorer down to 0. Every stage exited 0 without a word.
HACKED = {"reward_sft": 1.1, "reward_ppo": 5.0, "rm_score_sft": 0.9, "rm_score_ppo": 5.0, "exact_sft": 0.4,
          "exact_ppo": 0.0}


def test_a_hacked_run_gets_one_warning_per_finding() -> None:
    got = ppo_warnings(HACKED, ["exact"], kl=10.2, length=32.0, max_length=32)
    assert len(got) == 3, got
    assert "KL to the reference reached 10.20 nats per answer" in got[0] and "ppo.kl.target or ppo.kl.stop_above" in got[0]
    assert "answers grew to 32.0 tokens, at the limit ppo.sampling.max_answer_tokens 32" in got[1]
    assert "the reward model's held-out score and exact disagree (SFT -> PPO: 0.900 -> 5.000 vs 0.400 -> 0.000)" in got[2]
    assert all("\n" not in line for line in got)


def test_a_healthy_run_gets_none() -> None:
    # the default run (README): reward model and gold scorer rise together, KL 2.6, answers well under the limit
    healthy = {"reward_sft": 1.25, "reward_ppo": 4.29, "rm_score_sft": 1.25, "rm_score_ppo": 4.29, "gold_sft": 0.64,
               "gold_ppo": 0.86}
    assert ppo_warnings(healthy, ["gold"], kl=2.6, length=13.4, max_length=32) == []
    # a verifier-only run has no reward model to disagree with; a falling reward warns of nothing
    assert ppo_warnings({"reward_sft": 0.5, "reward_ppo": 0.4, "v_sft": 0.5, "v_ppo": 0.4}, ["v"], 20.0, 32, 32) == []


def test_evaluate_warns_per_actor_on_kl_and_on_a_scorer_against_the_reward_model() -> None:
    sft = {"rm_reward": 1.0, "kl_to_sft": 0.0, "gold_reward": 0.6}
    result = {
        "sft": sft,
        "ppo": {"rm_reward": 4.9, "kl_to_sft": 0.8, "gold_reward": 0.2},
        "ema": {"rm_reward": 3.0, "kl_to_sft": 0.1, "gold_reward": 0.7},
    }
    got = evaluate_warnings(result, ["gold_reward"])
    assert [line.split(":")[0] for line in got] == ["ppo", "ppo"], got
    assert "KL to SFT of 0.800 per token" in got[0] and "gold_reward disagree" in got[1]
