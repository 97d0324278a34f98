"""Your reward functions and quality scorers, named in params.yaml as `rewards.<module>:<function>`.

This folder is a DVC dep of the ppo and evaluate stages: editing a function here reruns them. A function has TRL's
reward-function signature (see rlhf/rl/rewards.py)::

    def exact_answer(prompts, completions, answer, **kwargs):   # `answer`: an extra column of your data rows
        return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]

and is listed under `rewards.functions` (a term of step 3's reward) or `evaluate.scorers` (reported per actor).
"""
