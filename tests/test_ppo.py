"""Step 3 on a tiny model: the hybrid engine, one PPO update through the Python API, and the `ppo` stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli, write_params


@pytest.fixture(scope="module")
def dist():
    from rlhf.config import EngineConfig
    from rlhf.engine import init_distributed

    return init_distributed(EngineConfig(device="cpu"))


def _params(trained: Path, name: str, *overrides: dict):
    from rlhf.config import load_params

    return load_params(write_params(trained / name, *overrides))


def _prompts(tok, texts: list[str]) -> dict[str, torch.Tensor]:
    from rlhf.ppo import collate_prompts
    from rlhf.tokenizer import encode_prompt

    ids = [encode_prompt(tok, [{"role": "user", "content": t}]) for t in texts]
    return collate_prompts(max(map(len, ids)), tok.pad_token_id)(ids)


@pytest.mark.parametrize(
    "engine,lora",
    [({"zero_stage": 0}, 0), ({"zero_stage": 3}, 0), ({"zero_stage": 2}, 4), ({"zero_stage": 3}, 4)],
    ids=["zero0", "zero3", "zero2-lora", "zero3-lora"],
)
def test_hybrid_generation_matches_plain_generate(trained: Path, dist, engine: dict, lora: int) -> None:
    """Same seed, same tokens: the hybrid engine's generation mode (gathered, LoRA fused) against transformers'
    generate on a plain copy of the same weights (LoRA merged)."""
    from rlhf import engine as eng
    from rlhf.hybrid import HybridEngine
    from rlhf.models import add_lora, load_causal_lm, unwrap_for_saving
    from rlhf.ppo import _train_cfg
    from rlhf.tokenizer import load_tokenizer

    params = _params(trained, "hybrid.yaml", {"engine": engine, "ppo": {"actor_lora": {"rank": lora}}})
    tok = load_tokenizer(trained / "models/sft")
    torch.manual_seed(0)
    model = add_lora(load_causal_lm(trained / "models/sft"), params.ppo.actor_lora, "CAUSAL_LM")
    if lora:  # non-zero adapters, so that fusing them matters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = add_lora(load_causal_lm(trained / "models/sft"), params.ppo.actor_lora, "CAUSAL_LM")
    plain.load_state_dict(state)
    plain = unwrap_for_saving(plain).eval()
    hybrid = HybridEngine(eng.initialize(model, params.engine, _train_cfg(params.ppo, 1e-3), 10), engine["zero_stage"])
    batch = _prompts(tok, ["Sort ascending: 5 2 9", "Sort ascending: 14 3 7 1 22"])
    kwargs = dict(do_sample=True, top_p=1.0, max_new_tokens=10, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)

    hybrid.engine.train()
    torch.manual_seed(123)
    got = hybrid.generate(batch["input_ids"], batch["attention_mask"], **kwargs)
    torch.manual_seed(123)
    with torch.no_grad():
        want = plain.generate(**batch, **kwargs)
    assert torch.equal(got, want)
    # State restored: training mode, no merged adapters, shards released, weights untouched.
    assert hybrid.module.training
    after = eng.full_state_dict(hybrid.module, engine["zero_stage"], is_main=True)
    for k, v in after.items():
        assert torch.equal(v, state[k].float()), k


def test_one_ppo_update_moves_actor_and_critic_not_reference(trained: Path, dist) -> None:
    from rlhf.engine import full_state_dict
    from rlhf.ppo import PPOTrainer, RLHFEngine

    # Each model its own ZeRO stage, as DeepSpeed-Chat allows for the actor and critic.
    engines = {"actor_engine": {"zero_stage": 2}, "critic_engine": {"zero_stage": 1}, "ref_engine": {"zero_stage": 3}}
    params = _params(trained, "ppo_api.yaml", {"ppo": {"ema_beta": 0.5, **engines}})
    engine = RLHFEngine(params, dist, trained / "models/sft", trained / "models/reward")
    assert [engine.engines[m].zero_stage for m in ("actor", "critic", "ref", "reward")] == [2, 1, 3, 0]
    trainer = PPOTrainer(engine, params.ppo)
    modules = {"actor": engine.actor.module, "critic": engine.critic.module, "ref": engine.ref.module,
               "reward": engine.reward.module}

    def snapshot() -> dict:
        out = {name: full_state_dict(m, engine.engines[name].zero_stage, is_main=True) for name, m in modules.items()}
        out["ema"] = full_state_dict(engine.ema, 0, is_main=True)
        return out

    before = snapshot()
    batch = _prompts(engine.tok, [f"Sort ascending: {i} {i + 7} 3" for i in range(8)])
    exp = trainer.generate_experience(batch)
    b, r = exp.action_mask.shape
    assert exp.sequences.shape[0] == b == 8 and exp.logprobs.shape == exp.values.shape == exp.rewards.shape == (b, r)
    assert exp.scores.shape == (8,) and torch.isfinite(exp.advantages).all()
    assert (exp.rewards * (1 - exp.action_mask)).abs().sum() == 0  # nothing after the end of an answer
    a_loss, c_loss, stats = trainer.train_rlhf(exp)
    assert all(map(lambda x: x == x, (a_loss, c_loss))) and 0 <= stats["clip_fraction"] <= 1
    engine.update_ema()
    after = snapshot()

    def changed(name: str) -> int:
        return sum(not torch.equal(before[name][k], after[name][k]) for k in before[name])

    assert changed("actor") > len(before["actor"]) // 2
    assert changed("critic") > len(before["critic"]) // 2
    assert changed("ema") > 0
    assert changed("ref") == 0 and changed("reward") == 0


def test_ppo_stage_writes_loadable_actor_critic_and_ema(trained: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    write_params(trained / "ppo.yaml", {"ppo": {"ptx_coef": 0.5}})
    proc = run_cli("ppo", "--params", "ppo.yaml", cwd=trained)
    assert "[ppo] iter 2/2" in proc.stdout and "tok/s" in proc.stdout
    sft = AutoModelForCausalLM.from_pretrained(trained / "models/sft").state_dict()
    actor = AutoModelForCausalLM.from_pretrained(trained / "models/ppo/actor").state_dict()
    ema = AutoModelForCausalLM.from_pretrained(trained / "models/ppo/actor_ema").state_dict()
    critic = AutoModelForSequenceClassification.from_pretrained(trained / "models/ppo/critic").state_dict()
    reward = AutoModelForSequenceClassification.from_pretrained(trained / "models/reward").state_dict()
    assert sum(not torch.equal(actor[k], sft[k]) for k in sft) > len(sft) // 2
    assert sum(not torch.equal(critic[k], reward[k]) for k in reward) > len(reward) // 2
    assert any(not torch.equal(ema[k], actor[k]) for k in actor)
    metrics = json.loads((trained / "metrics/ppo.json").read_text())
    assert {"rm_score_sft", "rm_score_ppo", "final_kl"} <= set(metrics)
    curves = trained / "dvclive/ppo/plots/metrics/ppo"
    for name in ("reward", "kl", "actor_loss", "critic_loss", "clip_fraction", "approx_kl", "response_length",
                 "gen_tokens_per_s", "train_samples_per_s", "generate_s", "ptx_loss"):
        assert (curves / f"{name}.tsv").is_file(), name


def test_mismatched_tokenizers_fail_the_gate(trained: Path, tmp_path: Path) -> None:
    import shutil

    from transformers import AutoTokenizer

    other = tmp_path / "reward"
    shutil.copytree(trained / "models/reward", other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    proc = run_cli("ppo", "--params", "params.yaml", "--reward", str(other), "--out", str(tmp_path / "out"),
                   cwd=trained, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "tokenizers differ in vocabulary" in proc.stderr
    assert not (tmp_path / "out").exists()
