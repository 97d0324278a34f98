"""The evaluate stage on tiny models: every actor scored on the same held-out prompts, SFT as the KL baseline."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_cli


def test_evaluate_writes_metrics_per_actor_plot_rows_and_samples(ppo_trained: Path) -> None:
    proc = run_cli("evaluate", "--params", "params.yaml", cwd=ppo_trained)
    assert "evaluate  sft: gold" in proc.stdout and "evaluate  ppo: gold" in proc.stdout
    metrics = json.loads((ppo_trained / "metrics/evaluate.json").read_text())
    assert set(metrics) == {"sft", "ppo", "ema"}
    for values in metrics.values():
        assert set(values) >= {"gold_reward", "rm_reward", "kl_to_sft", "response_length", "perplexity"}
        assert 0.0 <= values["gold_reward"] <= 1.0 and values["perplexity"] > 1.0 and values["num_prompts"] == 12
    assert metrics["sft"]["kl_to_sft"] == 0.0  # the baseline against itself
    assert metrics["ppo"]["kl_to_sft"] != 0.0  # PPO moved the policy
    plot = json.loads((ppo_trained / "metrics/evaluate_plot.json").read_text())
    assert [row["model"] for row in plot] == ["sft", "ppo", "ema"]
    table = (ppo_trained / "metrics/samples.md").read_text().splitlines()
    assert table[0] == "| prompt | sft | ppo | ema |" and len(table) == 2 + 3
    assert all("[gold " in line for line in table[2:])

