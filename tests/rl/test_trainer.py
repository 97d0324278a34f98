"""Step 3 on a tiny model: the hybrid engine, one PPO update through the Python API, and the `ppo` stage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import pad_is_eos_copies, run_cli, write_params

# The test models are below DeepSpeed's default persistence threshold: without this, ZeRO-3 would keep every
# parameter whole and no ZeRO-3 test would exercise a gather.
SHARD_ALL = {"zero3_persistence_threshold": 0}


def assert_sharded(module) -> None:
    """Every parameter is a ZeRO-3 partition (whole tensors only inside a gather)."""
    from rlhf.training.runtime import zero3_partitioning

    split = zero3_partitioning(module)
    assert split["partitioned"] == split["parameters"] > 0, split
    assert all(p.data.numel() == 0 for p in module.parameters())  # released: nothing whole outside a gather


def _params(trained: Path, name: str, *overrides: dict):
    from rlhf.config import load_params

    return load_params(write_params(trained / name, *overrides))


def _prompts(tok, texts: list[str]) -> dict[str, torch.Tensor]:
    from rlhf.data.batching import collate_prompts
    from rlhf.models.tokenizer import encode_prompt

    ids = [encode_prompt(tok, [{"role": "user", "content": t}]) for t in texts]
    return collate_prompts(max(map(len, ids)), tok.pad_token_id)(ids)


@pytest.mark.parametrize(
    "engine,lora",
    [({"zero_stage": 0}, 0), ({"zero_stage": 3, **SHARD_ALL}, 0), ({"zero_stage": 2}, 4),
     ({"zero_stage": 3, **SHARD_ALL}, 4)],
    ids=["zero0", "zero3", "zero2-lora", "zero3-lora"],
)
def test_hybrid_generation_matches_plain_generate(tiny_models: Path, dist, engine: dict, lora: int) -> None:
    """Same seed, same tokens: the hybrid engine's generation mode (gathered, LoRA fused) against transformers'
    generate on a plain copy of the same weights (LoRA merged)."""
    from rlhf.config import Sampling
    from rlhf.models.build import add_lora, load_causal_lm, unwrap_for_saving
    from rlhf.models.tokenizer import load_tokenizer
    from rlhf.rl.hybrid import HybridEngine
    from rlhf.rl.models import _train_cfg
    from rlhf.rollout.base import make_rollout_engine
    from rlhf.training import runtime as eng

    params = _params(tiny_models, "hybrid.yaml", {"engine": engine, "ppo": {"lora": {"actor": {"rank": lora}}}})
    tok = load_tokenizer(tiny_models / "models/sft")
    torch.manual_seed(0)
    model = add_lora(load_causal_lm(tiny_models / "models/sft"), params.ppo.lora.actor, "CAUSAL_LM")
    if lora:  # non-zero adapters, so that fusing them matters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = add_lora(load_causal_lm(tiny_models / "models/sft"), params.ppo.lora.actor, "CAUSAL_LM")
    plain.load_state_dict(state)
    plain = unwrap_for_saving(plain).eval()
    hybrid = HybridEngine(eng.initialize(model, params.engine, _train_cfg(params.ppo, 1e-3), 10), engine["zero_stage"])
    if engine["zero_stage"] == 3:
        assert_sharded(hybrid.module)
    batch = _prompts(tok, ["Sort ascending: 5 2 9", "Sort ascending: 14 3 7 1 22"])
    kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=10, pad_token_id=tok.pad_token_id,
                  eos_token_id=tok.eos_token_id)

    hybrid.engine.train()
    torch.manual_seed(123)
    with torch.no_grad():
        want = plain.generate(**batch, **kwargs)
    for decoder in ("own", "generate"):  # our decode loop (the default) and transformers' generate (the fallback)
        rollouts = make_rollout_engine(decoder, hybrid.generation_mode, [tok.eos_token_id], tok.pad_token_id)
        torch.manual_seed(123)
        got = rollouts.generate(batch["input_ids"], batch["attention_mask"], Sampling(max_answer_tokens=10))
        assert torch.equal(got.sequences, want), decoder
        assert got.logprobs.shape == (want.shape[0], want.shape[1] - batch["input_ids"].shape[1]), decoder
    # State restored: training mode, no merged adapters, shards released, weights untouched.
    assert hybrid.module.training
    after = eng.full_state_dict(hybrid.module, engine["zero_stage"], is_main=True)
    for k, v in after.items():
        assert torch.equal(v, state[k].float()), k


def test_one_ppo_update_moves_actor_and_critic_not_reference(tiny_models: Path, dist) -> None:
    from rlhf.rl.models import RLModels
    from rlhf.rl.trainer import RLTrainer
    from rlhf.training.runtime import full_state_dict

    # Each model its own ZeRO stage, as DeepSpeed-Chat allows for the actor and critic; the frozen reference and
    # reward model sharded by ZeRO-3 with their weights offloaded to the host (DeepSpeed-Chat's
    # --offload_reference_model / --offload_reward_model), fetched module by module when they score.
    engines = {"actor": {"zero_stage": 2}, "critic": {"zero_stage": 1}, "ref": {"zero_stage": 3, "offload_params": True},
               "reward": {"zero_stage": 3, "offload_params": True}}
    params = _params(tiny_models, "ppo_api.yaml", {"engine": SHARD_ALL, "ppo": {"ema_beta": 0.5, "engines": engines}})
    engine = RLModels(params.ppo, params.engine, dist, tiny_models / "models/sft", tiny_models / "models/reward")
    assert [engine.engine_configs[m].zero_stage for m in ("actor", "critic", "ref", "reward")] == [2, 1, 3, 3]
    assert_sharded(engine.ref.module)
    assert_sharded(engine.reward.module)
    assert engine.ref.zero_offload_param() is not None and engine.reward.zero_offload_param() is not None
    assert engine.actor.engine.zero_offload_param() is None
    trainer = RLTrainer(engine, params.ppo, params.rewards)
    modules = {"actor": engine.actor.module, "critic": engine.critic.module, "ref": engine.ref.module,
               "reward": engine.reward.module}

    def snapshot() -> dict:
        out = {name: full_state_dict(m, engine.engine_configs[name].zero_stage, is_main=True) for name, m in modules.items()}
        out["ema"] = full_state_dict(engine.ema, 0, is_main=True)
        return out

    before = snapshot()
    batch = _prompts(engine.tok, [f"Sort ascending: {i} {i + 7} 3" for i in range(8)])
    exp, _ = trainer.generate_experience(batch)
    b, r = exp.action_mask.shape
    assert exp.sequences.shape[0] == b == 8 and exp.logprobs.shape == exp.values.shape == exp.rewards.shape == (b, r)
    assert exp.scores.shape == (8,) and torch.isfinite(exp.advantages).all()
    assert (exp.rewards * (1 - exp.action_mask)).abs().sum() == 0  # nothing after the end of an answer
    a_loss, c_loss, stats = trainer.train_rlhf(exp)
    # Before the first step pi = pi_old (up to rounding), so the clipped surrogate is -mean(A) over the real tokens,
    # and the critic still gives the rollout's values: the value loss is 0.5 x mean((V - returns)^2)
    from rlhf.training.stats import masked_mean

    assert abs(stats["ratio"] - 1) < 1e-4 and stats["clip_fraction"] == 0
    assert abs(a_loss + masked_mean(exp.advantages, exp.action_mask).item()) < 1e-4, a_loss
    want = 0.5 * masked_mean((exp.values - exp.returns) ** 2, exp.action_mask).item()
    assert want > 0 and abs(c_loss - want) < 1e-4 * max(1.0, want), (c_loss, want)
    engine.update_ema()
    after = snapshot()

    def changed(name: str) -> int:
        return sum(not torch.equal(before[name][k], after[name][k]) for k in before[name])

    assert changed("actor") > len(before["actor"]) // 2
    assert changed("critic") > len(before["critic"]) // 2
    assert changed("ema") > 0
    assert changed("ref") == 0 and changed("reward") == 0


def _trained_away(trained: Path, out: Path) -> dict:
    """The ppo stage's actor and critic in `out` load with the Auto classes, and most of their tensors moved away
    from the SFT actor and the reward model they started from; returns the actor's state dict."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    sft = AutoModelForCausalLM.from_pretrained(trained / "models/sft").state_dict()
    actor = AutoModelForCausalLM.from_pretrained(out / "actor").state_dict()
    critic = AutoModelForSequenceClassification.from_pretrained(out / "critic").state_dict()
    reward = AutoModelForSequenceClassification.from_pretrained(trained / "models/reward").state_dict()
    assert sum(not torch.equal(actor[k], sft[k]) for k in sft) > len(sft) // 2
    assert sum(not torch.equal(critic[k], reward[k]) for k in reward) > len(reward) // 2
    return actor


def test_ppo_stage_writes_loadable_actor_critic_and_ema(trained: Path) -> None:
    from transformers import AutoModelForCausalLM

    write_params(trained / "ppo.yaml", {"ppo": {"loss": {"ptx_coef": 0.5}}})
    proc = run_cli("ppo", "--params", "ppo.yaml", cwd=trained)
    assert "[ppo] iter 2/2" in proc.stdout and "tok/s" in proc.stdout
    actor = _trained_away(trained, trained / "models/ppo")
    ema = AutoModelForCausalLM.from_pretrained(trained / "models/ppo/actor_ema").state_dict()
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


def _tiny_lm(tok):
    from rlhf.config import load_params
    from rlhf.models.build import build_causal_lm

    return build_causal_lm(load_params(Path("params.yaml"), {"model.num_layers": 2}).model, tok, 0)


def _grouped_batch(tok, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of different lengths, each k times in a row, left-padded with two all-padding columns."""
    batch = _prompts(tok, ["Sort ascending: 5 2 9", "Sort ascending: 14 3 7 1 22", "Sort descending: 8 1"])
    ids = torch.nn.functional.pad(batch["input_ids"], (2, 0), value=tok.pad_token_id).repeat_interleave(k, 0)
    return ids, torch.nn.functional.pad(batch["attention_mask"], (2, 0)).repeat_interleave(k, 0)


def test_shared_prefix_forward_matches_full_forward(tiny_models: Path) -> None:
    """Each repeated prompt runs once and its cache is copied to its rows: the answers' logits and the gradients
    equal one full forward pass's up to float rounding, and sampled generations are token for token the same."""
    from rlhf.models.prefix import answer_outputs, position_ids, prefill_shared, prompt_groups
    from rlhf.models.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_models / "models/sft")
    model = _tiny_lm(tok)
    ids, mask = _grouped_batch(tok, 3)
    first, inverse = prompt_groups(ids, mask)
    assert len(first) == 3 and len(set(inverse[::3].tolist())) == 3 and torch.equal(inverse[::3].repeat_interleave(3), inverse)
    assert torch.equal(ids[first][inverse], ids)
    assert prompt_groups(ids[::3], mask[::3]) is None

    kwargs = dict(do_sample=True, max_new_tokens=6, min_new_tokens=6, pad_token_id=tok.pad_token_id,
                  eos_token_id=tok.eos_token_id)
    model.eval()
    with torch.no_grad():
        torch.manual_seed(7)
        plain = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        torch.manual_seed(7)
        shared = model.generate(input_ids=ids, attention_mask=mask, past_key_values=prefill_shared(model, ids, mask), **kwargs)
    assert torch.equal(plain, shared)

    p = ids.shape[1]
    seq, full = plain, torch.cat([mask, torch.ones_like(plain[:, p:])], dim=1)
    model.train()
    grads = []
    for share in (False, True):
        model.zero_grad()
        logits = answer_outputs(model, "logits", seq, full, p, share)
        assert logits.shape[:2] == (seq.shape[0], seq.shape[1] - p + 1)
        logits.logsumexp(-1).mean().backward()
        grads.append([q.grad.clone() for q in model.parameters()])
        if not share:
            whole = model(input_ids=seq, attention_mask=full, position_ids=position_ids(full)).logits[:, p - 1 :]
            torch.testing.assert_close(logits, whole, rtol=0, atol=1e-5)  # the padding columns cut off: same
            want = logits.detach()
    torch.testing.assert_close(logits.detach(), want, rtol=0, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # last=False: the positions that predict answer tokens only, without feeding the last token; also when the
    # answers are one token long (nothing after the prompt is fed then)
    with torch.no_grad():
        for share in (False, True):
            cut = answer_outputs(model, "logits", seq, full, p, share, last=False)
            torch.testing.assert_close(cut, want[:, :-1], rtol=0, atol=1e-5)
            one = answer_outputs(model, "logits", seq[:, : p + 1], full[:, : p + 1], p, share, last=False)
            torch.testing.assert_close(one, want[:, :1], rtol=0, atol=1e-5)


def test_answers_per_prompt_and_rollout_logprobs(tiny_models: Path, dist) -> None:
    """k answers per prompt come out grouped, log pi_old kept from generation equals the recomputed one, and an
    update through the shared-prefix forward moves a ZeRO-3 actor (two forward calls before one backward)."""
    from rlhf.models.build import load_causal_lm
    from rlhf.models.prefix import position_ids
    from rlhf.rl.models import RLModels
    from rlhf.rl.trainer import RLTrainer
    from rlhf.training.runtime import full_state_dict

    # Sampled at temperature 0.7 among the 5 likeliest tokens: log pi_old, log pi_ref and the update's log pi are
    # all log_softmax(logits / 0.7) over the whole vocabulary (PPOConfig's convention); top_k truncates sampling only.
    temperature, top_k = 0.7, 5
    k = {"answers_per_prompt": 3, "rollout_batch_size": 2, "micro_batch_size": 6, "engines": {"actor": {"zero_stage": 3}},
         "sampling": {"temperature": temperature, "top_k": top_k}}
    params = _params(tiny_models, "ppo_k.yaml", {"ppo": k}, {"engine": SHARD_ALL})
    engine = RLModels(params.ppo, params.engine, dist, tiny_models / "models/sft", tiny_models / "models/reward")
    assert_sharded(engine.actor.module)
    trainer = RLTrainer(engine, params.ppo, params.rewards)
    batch = _prompts(engine.tok, ["Sort ascending: 5 2 9", "Sort ascending: 14 3 7 1 22"])
    exp, _ = trainer.generate_experience(batch)
    p = batch["input_ids"].shape[1]
    assert exp.sequences.shape[0] == 6
    assert torch.equal(exp.sequences[:, :p], batch["input_ids"].repeat_interleave(3, 0))
    with torch.no_grad():
        recomputed = trainer._logprobs(engine.actor.engine, exp.sequences, exp.attention_mask, p) * exp.action_mask
    torch.testing.assert_close(exp.logprobs, recomputed, rtol=0, atol=1e-4)
    assert exp.action_mask.sum() > 0 and exp.logprobs.abs().sum() > 0

    # Independently: a plain copy of the SFT weights (the actor before its first update), one full forward pass.
    plain = load_causal_lm(tiny_models / "models/sft").eval()
    with torch.no_grad():
        logits = plain(input_ids=exp.sequences, attention_mask=exp.attention_mask,
                       position_ids=position_ids(exp.attention_mask)).logits[:, p - 1 : -1]  # (B, R, V)
    answer, real = exp.sequences[:, p:], exp.action_mask.bool()
    at_t = torch.log_softmax(logits / temperature, -1).gather(-1, answer[..., None])[..., 0] * exp.action_mask
    at_1 = torch.log_softmax(logits, -1).gather(-1, answer[..., None])[..., 0] * exp.action_mask
    torch.testing.assert_close(exp.logprobs, at_t, rtol=0, atol=1e-4)
    assert (exp.logprobs - at_1).abs().max() > 1e-2  # the temperature is in it: not the raw softmax
    torch.testing.assert_close(exp.ref_logprobs, at_t, rtol=0, atol=1e-4)  # the reference: same processing
    # top_k reached the sampler (transformers' default would be 50): every drawn token is among the 5 likeliest.
    rank = (logits > logits.gather(-1, answer[..., None])).sum(-1)  # (B, R) tokens strictly more likely
    assert rank[real].max() < top_k

    before = full_state_dict(engine.actor.module, 3, is_main=True)
    a_loss, c_loss, stats = trainer.train_rlhf(exp)
    after = full_state_dict(engine.actor.module, 3, is_main=True)
    from rlhf.training.stats import masked_mean

    assert abs(a_loss + masked_mean(exp.advantages, exp.action_mask).item()) < 1e-4, a_loss  # ratio 1: -mean(A)
    # The update's log pi uses the same processing: before the step pi = pi_old, a ratio of 1 on every token.
    assert abs(stats["ratio"] - 1) < 1e-4 and stats["approx_kl"] < 1e-8 and stats["clip_fraction"] == 0
    assert sum(not torch.equal(before[k], after[k]) for k in before) > len(before) // 2


def test_pad_is_eos_the_eos_is_an_action_and_the_reward_is_read_there(tiny_models: Path, dist, tmp_path: Path) -> None:
    """With pad == eos, the action mask is by position: every answer token up to and including the first eos, the
    eos itself (the decision to stop) included; rows that never stop are real throughout; the reward model's score
    is the one at the eos (or at the last token of an answer that never stopped)."""
    from rlhf.models.build import classifier_parts
    from rlhf.models.tokenizer import stop_ids
    from rlhf.rl.models import RLModels
    from rlhf.rl.trainer import RLTrainer
    from rlhf.rollout.base import finish

    sft, reward = pad_is_eos_copies(tiny_models, tmp_path)
    params = _params(tiny_models, "ppo_eos.yaml", {"ppo": {"rollout": {"logprobs": "recompute"}, "kl": {"coef": 0.0},
                                                       "advantage": {"reward_clip": 0.0, "reward_normalization": "none"},
                                                       "ema_beta": 0.0}})
    engine = RLModels(params.ppo, params.engine, dist, sft, reward)
    tok = engine.tok
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos
    batch = _prompts(tok, ["Sort ascending: 5 2 9", "Sort ascending: 14 3 7 1 22", "Sort descending: 8 1",
                           "Sort ascending: 4 4"])
    assert (batch["input_ids"][batch["attention_mask"] == 0] == eos).all()  # the prompts' left padding is eos too
    # What generate returns: each answer padded after its first eos with the pad, here the eos.
    answers = torch.tensor([[20, 21, eos, eos, eos], [20, 21, 22, 23, 24], [eos, eos, eos, eos, eos],
                            [25, eos, eos, eos, eos]])
    want = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.float32)
    seq = torch.cat([batch["input_ids"], answers], dim=1)
    # a rollout with known answers, through the real models (log pi_old recomputed: the rollout's are not read)
    engine.rollout.generate = lambda ids, mask, sampling: finish(ids, mask, seq, torch.full(answers.shape, float("nan")),
                                                                 stop_ids(tok))
    trainer = RLTrainer(engine, params.ppo, params.rewards)
    exp, _ = trainer.generate_experience(batch)

    assert torch.equal(exp.action_mask, want)
    assert torch.equal(exp.attention_mask, torch.cat([batch["attention_mask"], want.long()], dim=1))
    assert (exp.logprobs[:, 0] != 0).all() and exp.logprobs[0, 2] != 0 and exp.logprobs[2, 0] != 0  # eos scored
    assert (exp.values[0, :3] != 0).all() and exp.values[0, 2] != 0

    # Independently: each row's real tokens alone (no padding at all) through the reward model's body and head.
    body, head = classifier_parts(engine.reward.module)
    at_last, before_last = [], []
    with torch.no_grad():
        for row, m in zip(exp.sequences, exp.attention_mask):
            hidden = body(input_ids=row[m.bool()][None]).last_hidden_state[0]
            at_last.append(head(hidden[-1]).item())
            before_last.append(head(hidden[-2]).item())
    torch.testing.assert_close(exp.scores, torch.tensor(at_last), rtol=0, atol=1e-4)
    assert abs(at_last[0] - before_last[0]) > 1e-5  # the test can tell the eos from the token before it
    # kl_coef 0: the only reward is the score, at the eos (row 0: index 2; row 2: index 0; row 1: the last token).
    last = want.cumsum(-1).argmax(-1)
    onehot = torch.nn.functional.one_hot(last, 5).float()
    torch.testing.assert_close(exp.rewards, onehot * exp.scores[:, None], rtol=0, atol=1e-6)

    # reward_normalization running: the first batch is z-scored by its own mean and (unbiased) std.
    running = RLTrainer(engine, params.ppo.model_copy(update={"advantage": params.ppo.advantage.model_copy(
        update={"reward_normalization": "running"})}), params.rewards)
    exp, _ = running.generate_experience(batch)
    z = (exp.scores - exp.scores.mean()) / exp.scores.std()
    torch.testing.assert_close(exp.rewards, onehot * z[:, None], rtol=0, atol=1e-5)
    assert running.reward_moments.count == 4


def test_generate_tokens_takes_no_knob_from_the_models_generation_config(trained: Path) -> None:
    """A hub model's generation_config may set temperature, top_k, repetition penalties...; transformers fills every
    knob a call leaves unset from it (and then top_k=50). generate_tokens draws what a model with an empty
    generation_config draws under the same explicit knobs, and leaves the model's own config as it was."""
    from transformers import GenerationConfig

    from rlhf.models.tokenizer import load_tokenizer
    from rlhf.rollout.hf import generate_tokens

    tok = load_tokenizer(trained / "models/sft")
    model = _tiny_lm(tok).eval()
    ids, mask = _grouped_batch(tok, 2)
    knobs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=8, pad_token_id=tok.pad_token_id,
                 eos_token_id=tok.eos_token_id)
    with torch.no_grad():
        model.generation_config = GenerationConfig()
        torch.manual_seed(5)
        want = model.generate(input_ids=ids, attention_mask=mask, **knobs)
        sneaky = GenerationConfig(temperature=0.05, top_k=2, top_p=0.5, repetition_penalty=50.0, no_repeat_ngram_size=1)
        model.generation_config = sneaky
        torch.manual_seed(5)
        got = generate_tokens(model, ids, mask, **knobs)
        torch.manual_seed(5)
        leaked = model.generate(input_ids=ids, attention_mask=mask, **knobs)  # what a plain call would have drawn
    assert torch.equal(got, want)
    assert not torch.equal(leaked, want)  # the sneaky config does change a plain call's tokens
    assert model.generation_config is sneaky and model.generation_config.top_k == 2


def test_bf16_step3_fp32_master_weights_recomputed_log_pi_old_and_loadable_outputs(trained: Path, dist) -> None:
    """engine.dtype bf16 for every model of step 3: bf16 weights, DeepSpeed's fp32 master copy stepped by the
    optimizer, log pi_old recomputed by the actor forward (rollout_logprobs auto), so the first update starts
    from a ratio of 1; the stage's outputs load with the Auto classes."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    from rlhf.rl.models import RLModels
    from rlhf.rl.trainer import RLTrainer
    from rlhf.training.runtime import full_state_dict

    params = _params(trained, "ppo_bf16.yaml", {"engine": {"dtype": "bf16"}})
    assert params.ppo.rollout.logprobs == "auto" and params.ppo.recomputes_logprobs("bf16")
    engine = RLModels(params.ppo, params.engine, dist, trained / "models/sft", trained / "models/reward")
    for name in ("actor", "critic", "ref", "reward"):
        assert {p.dtype for p in getattr(engine, name).module.parameters()} == {torch.bfloat16}, name
    optimizer = engine.actor.engine.optimizer  # ZeRO-0 in bf16: DeepSpeed's wrapper with an fp32 copy per parameter
    assert isinstance(optimizer, FP16_UnfusedOptimizer)
    master = [t.detach().clone() for group in optimizer.fp32_groups for t in group]
    assert master and {t.dtype for t in master} == {torch.float32}
    trainer = RLTrainer(engine, params.ppo, params.rewards)
    batch = _prompts(engine.tok, [f"Sort ascending: {i} {i + 7} 3" for i in range(8)])
    exp, _ = trainer.generate_experience(batch)
    p = batch["input_ids"].shape[1]
    with torch.no_grad():
        again = trainer._logprobs(engine.actor.engine, exp.sequences, exp.attention_mask, p) * exp.action_mask
    assert torch.equal(exp.logprobs, again) and exp.logprobs.dtype == torch.float32
    before = full_state_dict(engine.actor.module, 0, is_main=True)
    _, _, stats = trainer.train_rlhf(exp)
    assert abs(stats["ratio"] - 1) < 1e-6 and stats["clip_fraction"] == 0  # pi_old is the update's own forward
    after = full_state_dict(engine.actor.module, 0, is_main=True)
    assert sum(not torch.equal(before[k], after[k]) for k in before) > len(before) // 2
    stepped = [t for group in optimizer.fp32_groups for t in group]
    assert sum(not torch.equal(a, b) for a, b in zip(master, stepped)) > len(master) // 2

    # the stage in bf16: its actor and critic load back with the Auto classes, trained away from their inits
    run_cli("ppo", "--params", "ppo_bf16.yaml", "--out", "models/ppo_bf16", "--metrics", "metrics/ppo_bf16.json",
            "--live", "dvclive/ppo_bf16", "--checkpoints", "checkpoints/ppo_bf16", cwd=trained)
    _trained_away(trained, trained / "models/ppo_bf16")
    kl = json.loads((trained / "metrics/ppo_bf16.json").read_text())["final_kl"]
    curve = (trained / "dvclive/ppo_bf16/plots/metrics/ppo/kl.tsv").read_text().splitlines()
    assert math.isfinite(kl) and kl == float(curve[-1].split("\t")[-1])  # finite, and the last iteration's
