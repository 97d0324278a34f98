"""Step 3's models: the actor behind the hybrid engine, the frozen reference and reward model, the critic (ppo
only) and the actor's EMA, each a DeepSpeed engine built from the earlier stages' folders (DeepSpeed-Chat's
DeepSpeedRLHFEngine)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from rlhf.config import EngineConfig, PPOConfig, TrainConfig, resolve_engine
from rlhf.models.build import classifier_parts as _classifier
from rlhf.models.tokenizer import check_compatible
from rlhf.training.runtime import Dist


@torch.no_grad()
def ema_update(ema_params: Iterable[torch.Tensor], params: Iterable[torch.Tensor], beta: float) -> None:
    """In place, parameter by parameter: ema = beta * ema + (1 - beta) * param (DeepSpeed-Chat moving_average).

    The two iterables pair up in order and must have the same length (ValueError otherwise); each param is
    cast to its ema tensor's dtype and device first.
    """
    for ema, param in zip(ema_params, params, strict=True):
        ema.mul_(beta).add_(param.to(device=ema.device, dtype=ema.dtype), alpha=1.0 - beta)


def _train_cfg(ppo: PPOConfig, lr: float) -> TrainConfig:
    """A trained model's optimisation settings: one optimizer step per mini batch of micro batches."""
    return TrainConfig(
        micro_batch_size=ppo.micro_batch_size,
        gradient_accumulation_steps=ppo.mini_batch // ppo.micro_batch_size,
        learning_rate=lr,
        weight_decay=ppo.optimizer.weight_decay,
        warmup_ratio=ppo.optimizer.warmup_ratio,
        lr_schedule=ppo.optimizer.lr_schedule,
        adam_beta1=ppo.optimizer.adam_beta1,
        adam_beta2=ppo.optimizer.adam_beta2,
    )


def _frozen_engine(model: torch.nn.Module, engine: EngineConfig, micro_batch_size: int) -> Any:
    """A DeepSpeed engine for a frozen model: sharded under ZeRO-3 like the trained ones (weights offloaded with
    offload_params), else whole."""
    import deepspeed

    from rlhf.training.runtime import report_zero3, zero_config

    model.requires_grad_(False)
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "zero_optimization": zero_config(engine, trained=False),
        "bf16": {"enabled": engine.dtype == "bf16"},
        "fp16": {"enabled": engine.dtype == "fp16"},
        "steps_per_print": 10**9,
    }
    ds_engine, *_ = deepspeed.initialize(model=model, config=config)
    ds_engine.eval()
    if engine.zero_stage == 3:
        report_zero3(f"frozen {type(model).__name__}", ds_engine.module)
    return ds_engine


def critic_from_actor(path: str | Path) -> Any:
    """A critic without a reward model (rewards.model_weight 0, as OpenRLHF allows): the SFT actor's body with a
    fresh value head, zeroed so that every value starts at 0."""
    import deepspeed

    from rlhf.models.build import load_reward_model

    critic = load_reward_model(path)
    head = _classifier(critic)[1].weight
    with deepspeed.zero.GatheredParameters([head], modifier_rank=0, enabled=hasattr(head, "ds_id")):
        head.data.zero_()  # a ZeRO-3 shard (sharded load): zeroed whole on rank 0, then partitioned again
    return critic


class RLModels:
    """Builds and owns the four models of step 3 (and the actor's EMA), each a DeepSpeed engine.

    actor: from the SFT output, trained, behind the hybrid engine; ref: frozen copy of SFT; critic (ppo only, else
    None): initialised from the reward model (from the actor with a fresh value head when reward_path is None),
    trained; reward: frozen, or None without a reward model. `build_actor()` / `build_critic()` return fresh skeletons
    of the trained architectures (LoRA included) for exporting gathered weights.
    """

    def __init__(self, ppo: PPOConfig, engine: EngineConfig, dist: Dist, sft_path: Path, reward_path: Path | None):
        from transformers import AutoConfig

        from rlhf.models.build import add_lora, disable_dropout, load_causal_lm, load_reward_model
        from rlhf.models.tokenizer import load_tokenizer, stop_ids
        from rlhf.rl.hybrid import HybridEngine
        from rlhf.rollout.base import make_rollout_engine
        from rlhf.training import runtime as eng

        self.ppo, self.dist, self.sft_path = ppo, dist, Path(sft_path)
        self.tok = load_tokenizer(sft_path)
        if reward_path is not None:
            reward_tok = load_tokenizer(reward_path)
            check_compatible(self.tok, reward_tok, AutoConfig.from_pretrained(sft_path), AutoConfig.from_pretrained(reward_path))
        self.tok.padding_side = "left"  # prompts are left-padded for batched generation

        quiet = disable_dropout if ppo.disable_dropout else (lambda m: m)  # the same function in train and eval mode
        self.build_actor: Callable[[], Any] = lambda: quiet(add_lora(load_causal_lm(sft_path), ppo.lora.actor, "CAUSAL_LM"))
        if reward_path is not None:
            critic_body: Callable[[], Any] = lambda: load_reward_model(reward_path)  # noqa: E731
        else:
            critic_body = lambda: critic_from_actor(sft_path)  # noqa: E731
        self.build_critic: Callable[[], Any] | None = None
        if ppo.needs_critic:
            self.build_critic = lambda: quiet(add_lora(critic_body(), ppo.lora.critic, "SEQ_CLS"))
        steps = ppo.optimizer_steps  # the ptx loss joins the RL loss in the same step: no extra steps
        self.engine_configs = {
            name: resolve_engine(engine, getattr(ppo.engines, name))
            for name in ("actor", "critic", "ref", "reward")
        }
        def load(name: str, build: Callable[[], Any]) -> Any:  # under ZeRO-3 read as shards (eng.sharded_load)
            with eng.sharded_load(self.engine_configs[name], ppo.micro_batch_size):
                return build()

        self.actor = HybridEngine(
            eng.initialize(load("actor", self.build_actor), self.engine_configs["actor"],
                           _train_cfg(ppo, ppo.optimizer.actor_learning_rate), steps),
            self.engine_configs["actor"].zero_stage, ppo.rollout.gather_layers,
        )
        self.critic = None  # the critic-free family has none: nothing built, stepped or saved
        if self.build_critic is not None:
            self.critic = eng.initialize(load("critic", self.build_critic), self.engine_configs["critic"],
                                         _train_cfg(ppo, ppo.optimizer.critic_learning_rate), steps)
        self.ref = _frozen_engine(load("ref", lambda: quiet(load_causal_lm(sft_path))), self.engine_configs["ref"],
                                  ppo.micro_batch_size)
        self.reward = None
        if reward_path is not None:
            reward = load("reward", lambda: quiet(load_reward_model(reward_path)))
            self.reward = _frozen_engine(reward, self.engine_configs["reward"], ppo.micro_batch_size)
        # rollouts decode with the actor in the hybrid engine's generation mode (ZeRO-3 gathered once, LoRA fused)
        vllm = {"actor": self.actor, "model_path": sft_path, "dtype": self.engine_configs["actor"].dtype,
                "settings": ppo.rollout.vllm, "seed": torch.initial_seed() % 2**31 + dist.rank,
                "world_size": dist.world_size}
        self.rollout = make_rollout_engine(ppo.rollout.engine, self.actor.generation_mode, stop_ids(self.tok),
                                           self.tok.pad_token_id, ppo.rollout.cuda_graphs,
                                           **(vllm if ppo.rollout.engine == "vllm" else self._layered()))
        self.ema = None
        if ppo.ema_beta > 0:
            state = eng.full_state_dict(self.actor.module, self.actor.zero_stage, is_main=True, all_ranks=True)
            self.ema = self.build_actor().requires_grad_(False)
            self.ema.load_state_dict(state, strict=False)

    def _layered(self) -> dict[str, Any]:
        """The own engine's options under ppo.rollout.gather_layers (ZeRO-3): decode layer groups gathered in turn."""
        if not self.actor.gather_layers:
            return {}
        return {"gather": self.actor.layer_gather, "layers_at_once": self.actor.gather_layers}

    @property
    def device(self) -> torch.device:
        """Where the actor, and so the rollouts, live."""
        return self.actor.engine.device

    def update_ema(self) -> None:
        """ema = beta * ema + (1 - beta) * actor, parameter by parameter (gathered under ZeRO-3)."""
        if self.ema is None:
            return
        from rlhf.rl.models import ema_update
        from rlhf.training.runtime import full_state_dict

        state = full_state_dict(self.actor.module, self.actor.zero_stage, is_main=True, all_ranks=True)
        ema_params = dict(self.ema.named_parameters())
        names = [n for n in ema_params if n in state]
        ema_update([ema_params[n] for n in names], [state[n] for n in names], self.ppo.ema_beta)
