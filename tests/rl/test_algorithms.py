"""Step 3's critic-free family (GRPO, RLOO, REINFORCE++), a user's trainer subclass, and DPO, each through the CLI
as a user runs it, on the tiny trained models: weights change, outputs load with the Auto classes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli, write_params


def _state(path: Path, kind: str = "lm") -> dict:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if kind == "lm" else AutoModelForSequenceClassification
    return cls.from_pretrained(path).state_dict()


def _changed(a: dict, b: dict) -> int:
    return sum(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "algorithm,options",
    [
        # GRPO as DeepSeekMath has it: std-normalised groups, the k3 KL as a loss, per-answer loss means; plus an
        # entropy bonus
        ("grpo", {"kl": {"penalty": "loss"}, "loss": {"aggregation": "seq_mean_token_mean", "entropy_coef": 0.01}}),
        # RLOO with DAPO's clip-higher and Dr. GRPO's constant normaliser
        ("rloo", {"loss": {"clip_range_high": 0.28, "aggregation": "seq_mean_token_sum_norm"}}),
        ("reinforce_pp", {"answers_per_prompt": 2}),
        # their published defaults alone (params.yaml's nulls)
        ("dr_grpo", {}),
        ("dapo", {}),  # with dynamic sampling, the soft overlong punishment and truncated answers masked
        ("gspo", {}),
        ("cispo", {}),
    ],
)
def test_critic_free_algorithm_trains_the_actor_and_builds_no_critic(trained: Path, tmp_path: Path,
                                                                      algorithm: str, options: dict) -> None:
    out, metrics, live = tmp_path / "models", tmp_path / "ppo.json", tmp_path / "live"
    (out / "critic").mkdir(parents=True)  # an earlier ppo run's critic, to be dropped: it is not this run's
    (out / "critic" / "manifest.json").write_text(json.dumps({"step": "ppo", "versions": {}}))
    write_params(trained / f"{algorithm}.yaml", {"ppo": {"algorithm": algorithm, "rollout_batch_size": 4, **options}})
    proc = run_cli("ppo", "--params", f"{algorithm}.yaml", "--out", str(out), "--metrics", str(metrics),
                   "--live", str(live), "--checkpoints", str(tmp_path / "ckpt"), cwd=trained)
    assert f"ppo ({algorithm}): models -> {out}/{{actor,actor_ema}}" in proc.stdout, proc.stdout
    from rlhf.config import load_params

    # the effective configuration, every algorithm default resolved, is the stage's first line
    assert f"[ppo] {load_params(trained / f'{algorithm}.yaml').ppo.describe()}\n" in proc.stdout, proc.stdout
    assert _changed(_state(trained / "models/sft"), _state(out / "actor")) > 0
    assert (out / "actor_ema/config.json").is_file() and not (out / "critic").exists()
    result = json.loads(metrics.read_text())
    assert result["algorithm"] == algorithm and result["iterations"] == 2
    curves = live / "plots/metrics/ppo"
    assert (curves / "actor_loss.tsv").is_file() and not (curves / "critic_loss.tsv").exists()
    dynamic = ("dynamic_rounds", "dynamic_dropped", "dynamic_filled", "sampled_reward")
    assert all((curves / f"{name}.tsv").is_file() == (algorithm == "dapo") for name in dynamic), algorithm
    if options.get("kl", {}).get("penalty") == "loss":
        assert (curves / "kl_loss.tsv").is_file() and (curves / "entropy.tsv").is_file()


def test_group_algorithm_needs_a_group(trained: Path, tmp_path: Path) -> None:
    write_params(trained / "grpo1.yaml", {"ppo": {"algorithm": "grpo", "answers_per_prompt": 1}})
    proc = run_cli("ppo", "--params", "grpo1.yaml", "--out", str(tmp_path / "m"), cwd=trained, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "ppo.answers_per_prompt must be >= 2" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


TRAINER = '''
from rlhf import RLTrainer


class LengthOnly(RLTrainer):
    """Rewards nothing but brevity: minus the answer's length in tokens."""

    def reward_scores(self, rollout, rows=None):
        return -rollout.action_mask.sum(-1)
'''


def test_a_users_trainer_subclass_runs_from_the_stage(trained: Path, tmp_path: Path) -> None:
    (trained / "my_trainers.py").write_text(TRAINER)
    write_params(trained / "mine.yaml", {"ppo": {"trainer": "my_trainers:LengthOnly", "ema_beta": 0.0}})
    metrics = tmp_path / "ppo.json"
    proc = run_cli("ppo", "--params", "mine.yaml", "--out", str(tmp_path / "m"), "--metrics", str(metrics),
                   "--live", str(tmp_path / "live"), "--checkpoints", str(tmp_path / "ckpt"), cwd=trained)
    # At the project's root it is no DVC dep of the stage: editing it would not rerun ppo, and the stage says so
    assert ("warning: ppo.trainer: my_trainers.py is in the project folder but no DVC dep of the ppo stage: move it "
            "under rewards/ (ppo.trainer: rewards.my_trainers:LengthOnly)") in proc.stderr, proc.stderr
    result = json.loads(metrics.read_text())
    # Its reward (minus the length) is what the stage measured, on held-out prompts and in the last iteration.
    assert result["reward_sft"] <= -1 and result["final_reward"] <= -1  # every answer has at least one token
    assert _changed(_state(trained / "models/sft"), _state(tmp_path / "m/actor")) > 0

    write_params(trained / "bad.yaml", {"ppo": {"trainer": "json:JSONDecoder"}})
    proc = run_cli("ppo", "--params", "bad.yaml", "--out", str(tmp_path / "m2"), cwd=trained, check=False)
    assert proc.returncode == 2 and "is not a subclass of rlhf.RLTrainer" in proc.stderr
    assert not (tmp_path / "m2").exists()


UNPASSABLE = '''
def exact_phrase(prompts, completions, **columns):
    """1 only for an answer no tiny model writes by chance."""
    return [float(c.strip() == "The quick brown fox jumps over the lazy dog 1234567890.") for c in completions]
'''


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_a_reward_with_nothing_to_learn_from_stops_step_3(trained: Path, tmp_path: Path, algorithm: str) -> None:
    """A verifier the tiny actor never passes: every answer (every group) scores 0, every advantage is 0. The stage
    stops after ppo.max_flat_iterations such iterations with one line saying so and what to try, exit 2, and
    writes no model (it used to run all its iterations and exit 0 at "reward 0.000 -> 0.000")."""
    (trained / "unpassable.py").write_text(UNPASSABLE)
    write_params(trained / f"flat_{algorithm}.yaml", {
        "rewards": {"model_weight": 0.0, "functions": [{"function": "unpassable:exact_phrase"}]},
        "ppo": {"algorithm": algorithm, "iterations": 5, "max_flat_iterations": 3, "rollout_batch_size": 4,
                "eval_prompts": 4},
    })
    out = tmp_path / "m"
    proc = run_cli("ppo", "--params", f"flat_{algorithm}.yaml", "--out", str(out), "--metrics",
                   str(tmp_path / "ppo.json"), "--checkpoints", str(tmp_path / "ckpt"), cwd=trained, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    alike = "every group's answers scored alike" if algorithm == "grpo" else "every answer scored alike"
    assert len(errors) == 1 and f"stopped at iteration 3: for 3 iterations in a row {alike}" in errors[0], errors
    assert "Train SFT further" in errors[0] and not out.exists() and not (tmp_path / "ppo.json").exists()


# ------------------------------------------------------------------------------------------------------- DPO


@pytest.mark.parametrize("options", [{}, {"loss_type": "ipo"}, {"label_smoothing": 0.1}, {"sft_coef": 1.0},
                                     {"loss_type": "kto"}], ids=["dpo", "ipo", "cdpo", "rpo", "kto"])
def test_dpo_stage_trains_from_sft_against_the_cached_reference(trained: Path, tmp_path: Path, options: dict) -> None:
    out, metrics, live = tmp_path / "dpo", tmp_path / "dpo.json", tmp_path / "live"
    options = {"sft_coef": 0.0, **options}  # plain DPO unless the case adds RPO's term (params.yaml's default 1.0)
    write_params(trained / "dpo.yaml", {"dpo": {"max_steps": 4, "micro_batch_size": 8, "log_every": 1,
                                                "learning_rate": 0.01, **options}})
    proc = run_cli("dpo", "--params", "dpo.yaml", "--out", str(out), "--metrics", str(metrics), "--live", str(live),
                   "--checkpoints", str(tmp_path / "ckpt"), cwd=trained)
    assert f"dpo: model -> {out}" in proc.stdout
    assert _changed(_state(trained / "models/sft"), _state(out)) > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["step"] == "dpo" and manifest["params"]["dpo"]["beta"] == 0.1
    result = json.loads(metrics.read_text())
    assert {"accuracy", "margin", "rewards_chosen", "rewards_rejected", "eval_loss"} <= set(result)
    curves = live / "plots/metrics/train"
    for name in ("loss", "rewards_chosen", "rewards_rejected", "margin", "accuracy", "nll_chosen"):
        assert (curves / f"{name}.tsv").is_file(), name
    # Step 1's loss is computed before any update, with the policy equal to the reference: h = 0 exactly when
    # the cached reference log-probabilities are the policy's own. DPO/cDPO: -log sigmoid(0) = log 2 whatever the
    # smoothing; IPO: (0 - 1 / (2 beta))^2 = 25; RPO: log 2 + 1.0 x the chosen answers' NLL per token.
    def first(name: str) -> float:
        return float((curves / f"{name}.tsv").read_text().splitlines()[1].split("\t")[1])

    # KTO: r = 0 and z0 = 0 on every answer, 1 - sigmoid(0) = 0.5.
    want = {"ipo": 25.0, "kto": 0.5}.get(options.get("loss_type"), 0.6931472 + options["sft_coef"] * first("nll_chosen"))
    assert first("loss") == pytest.approx(want, abs=1e-4) and first("nll_chosen") > 0
    assert first("margin") == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("options", [{}, {"loss_type": "ipo"}, {"label_smoothing": 0.1}, {"sft_coef": 1.0},
                                     {"loss_type": "simpo"}, {"loss_type": "orpo"}, {"loss_type": "kto"}],
                         ids=["dpo", "ipo", "cdpo", "rpo", "simpo", "orpo", "kto"])
def test_each_dpo_variant_learns_the_held_out_preferences(trained: Path, tmp_path: Path, options: dict) -> None:
    """Trained for two epochs, every variant ranks most held-out pairs the right way round with a positive mean
    implicit-reward margin: a flipped sign (or a loss that ignores the labels) ends below 0.5 and at a negative
    margin. The policy starts equal to the reference: accuracy 0 and margin 0 at step 1 (the test above). SimPO
    and ORPO load and score no reference, and take their published beta (params.yaml's null)."""
    metrics, out = tmp_path / "dpo.json", tmp_path / "dpo"
    write_params(trained / "dpo_learn.yaml", {"dpo": {"epochs": 2, "max_steps": 0, "micro_batch_size": 8,
                                                      "learning_rate": 0.01, "sft_coef": 0.0, **options}})
    proc = run_cli("dpo", "--params", "dpo_learn.yaml", "--out", str(out), "--metrics", str(metrics),
                   "--live", str(tmp_path / "live"), "--checkpoints", str(tmp_path / "ckpt"), cwd=trained)
    loss = options.get("loss_type", "sigmoid")
    assert (f"[dpo] {loss} has no reference model" in proc.stdout) == (loss in ("simpo", "orpo")), proc.stdout
    assert json.loads((out / "manifest.json").read_text())["params"]["dpo"]["beta"] == (2.0 if loss == "simpo" else 0.1)
    assert _changed(_state(trained / "models/sft"), _state(out)) > 0
    result = json.loads(metrics.read_text())
    print(options, {k: result[k] for k in ("accuracy", "margin")})
    assert result["accuracy"] >= 0.6 and result["margin"] > 0, result  # 15 of the 24 held-out pairs


# --------------------------------------------------------------------------------------------- ptx's own data


def test_ptx_reads_its_own_text_source(trained: Path, tmp_path: Path) -> None:
    """data.ptx_source: prepare writes its texts to ptx_train.jsonl and ptx trains on them, not on the SFT split."""
    work = tmp_path / "work"
    (work / "data/sources").mkdir(parents=True)
    texts = [f"Numbers are written left to right: {i} comes before {i + 1}." for i in range(40)]
    (work / "data/sources/text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    source = {"data": {"ptx_source": {"path": "data/sources/text.jsonl"}}}
    write_params(work / "params.yaml", source)
    run_cli("prepare", "--params", "params.yaml", cwd=work)
    rows = [json.loads(line) for line in (work / "data/prepared/ptx_train.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == texts
    assert json.loads((work / "metrics/prepare.json").read_text())["ptx_rows"] == 40

    write_params(work / "ptx.yaml", source, {"ppo": {"loss": {"ptx_coef": 0.5}, "ema_beta": 0.0}})
    out = tmp_path / "models"
    run_cli("ppo", "--params", "ptx.yaml", "--sft", str(trained / "models/sft"), "--reward",
            str(trained / "models/reward"), "--out", str(out), cwd=work)
    assert (work / "dvclive/ppo/plots/metrics/ppo/ptx_loss.tsv").is_file()
    manifest = json.loads((out / "actor/manifest.json").read_text())
    assert "ptx_train" in manifest["inputs"]  # the text it mixed in is part of what made the actor

    (work / "data/sources/bad.jsonl").write_text(json.dumps({"body": "no text column"}) + "\n")
    write_params(work / "bad.yaml", {"data": {"ptx_source": {"path": "data/sources/bad.jsonl"}}})
    proc = run_cli("prepare", "--params", "bad.yaml", "--out", str(tmp_path / "p2"), cwd=work, check=False)
    assert proc.returncode == 2 and "has no `text` column (columns: body)" in proc.stderr
    assert not (tmp_path / "p2").exists()


@pytest.mark.parametrize("algorithm,loss_type", [("grpo", "sigmoid"), ("dapo", "orpo"), ("cispo", "kto")])
def test_grpo_and_dpo_with_a_tokenizer_whose_pad_is_its_eos(trained: Path, tmp_path: Path, algorithm: str,
                                                            loss_type: str) -> None:
    """SmolLM2's case: pad == eos. GRPO (answers end at their first eos, by position) and DPO (each answer's eos is
    scored as an answer token, never as padding) both train through the CLI and write loadable models; so do DAPO
    (dynamic sampling, and truncated answers told from stopped ones by position) and ORPO (no reference), CISPO and
    KTO (each answer and its mismatched one end at their eos)."""
    from tests.conftest import pad_is_eos_copies

    sft, reward = pad_is_eos_copies(trained, tmp_path)
    write_params(trained / "eos.yaml", {"ppo": {"algorithm": algorithm, "rollout_batch_size": 4},
                                        "dpo": {"max_steps": 2, "micro_batch_size": 8, "loss_type": loss_type}})
    run_cli("ppo", "--params", "eos.yaml", "--sft", str(sft), "--reward", str(reward), "--out", str(tmp_path / "ppo"),
            "--metrics", str(tmp_path / "ppo.json"), "--live", str(tmp_path / "live"),
            "--checkpoints", str(tmp_path / "ckpt"), cwd=trained)
    assert _changed(_state(sft), _state(tmp_path / "ppo/actor")) > 0
    run_cli("dpo", "--params", "eos.yaml", "--sft", str(sft), "--out", str(tmp_path / "dpo"),
            "--metrics", str(tmp_path / "dpo.json"), "--live", str(tmp_path / "dlive"),
            "--checkpoints", str(tmp_path / "dckpt"), cwd=trained)
    assert _changed(_state(sft), _state(tmp_path / "dpo")) > 0
    assert json.loads((tmp_path / "dpo.json").read_text())["steps"] == 2


def test_kto_trains_on_unpaired_thumbs_up_and_down_rows(trained: Path, tmp_path: Path) -> None:
    """TRL's unpaired preference format (prompt, completion, label) as a user's own file: prepare reads it (no pair
    at all; rewards.model_weight 0, so the reward stage writes its placeholder), a non-boolean label is a bad row,
    and `dpo.loss_type: kto` trains the SFT actor on the labelled answers: weights change, the folder loads with
    AutoModelForCausalLM, and the held-out answers end on their label's side of KTO's reference point."""
    from transformers import AutoModelForCausalLM

    work = tmp_path / "work"
    (work / "data/sources").mkdir(parents=True)
    pairs = [json.loads(line) for name in ("reward_train", "reward_eval")
             for line in (trained / f"data/prepared/{name}.jsonl").read_text().splitlines()]
    rows = [{"prompt": p["prompt"], "completion": p[key], "label": key == "chosen"}
            for i, p in enumerate(pairs) for key in (("chosen", "rejected") if i % 3 else ("chosen",))]
    rows.append({"prompt": "Sort ascending: 3 1", "completion": "1 3", "label": "yes"})  # not a boolean
    (work / "data/sources/thumbs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    demos = (trained / "data/prepared/sft_train.jsonl").read_text().splitlines()
    (work / "data/sources/demos.jsonl").write_text("".join(
        json.dumps({"prompt": d["prompt"], "completion": d["completion"]}) + "\n" for d in map(json.loads, demos)))
    shutil.copy(trained / "data/prepared/ppo_train.jsonl", work / "data/sources/prompts.jsonl")
    write_params(work / "params.yaml", {
        "data": {"sources": [{"path": "data/sources/demos.jsonl", "steps": ["sft"]},
                             {"path": "data/sources/thumbs.jsonl", "steps": ["reward"]},
                             {"path": "data/sources/prompts.jsonl", "format": "prompt", "steps": ["ppo"]}],
                 "invalid_rows": "drop"},
        "rewards": {"model_weight": 0.0, "functions": [{"function": "rlhf.data.task:gold_reward_fn"}]},
        "dpo": {"loss_type": "kto", "epochs": 2, "max_steps": 0, "micro_batch_size": 8, "learning_rate": 0.001}})
    run_cli("prepare", "--params", "params.yaml", cwd=work)
    stats = json.loads((work / "metrics/prepare.json").read_text())
    assert stats["invalid"]["wrong_type"] == 1 and stats["splits"]["reward_train"] + stats["splits"]["reward_eval"] \
        == len(rows) - 1 - stats["invalid"]["duplicate_row"], stats
    first = json.loads((work / "data/prepared/reward_train.jsonl").read_text().splitlines()[0])
    assert isinstance(first["label"], bool) and (first["chosen"] is None) == (not first["label"])

    out, metrics = tmp_path / "kto", tmp_path / "kto.json"
    run_cli("dpo", "--params", "params.yaml", "--sft", str(trained / "models/sft"), "--out", str(out),
            "--metrics", str(metrics), "--live", str(tmp_path / "live"), "--checkpoints", str(tmp_path / "ckpt"),
            cwd=work)
    assert _changed(_state(trained / "models/sft"), _state(out)) > 0
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size > 0
    result = json.loads(metrics.read_text())
    print({k: result[k] for k in ("accuracy", "margin")})  # 0.628, 0.437 on the dev machine
    assert result["accuracy"] > 0.55 and result["margin"] > 0.2, result  # a flipped label: below 0.5, negative
