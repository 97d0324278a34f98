"""rlhf/config/: the shipped params.yaml parses, and every bad key or value is one line naming the key and a fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from rlhf.config import ConfigError, Params, load_params, parse_params, resolve_engine

ROOT = Path(__file__).resolve().parents[2]
PARAMS = ROOT / "params.yaml"


def config_error(overrides: dict[str, Any], path: Path = PARAMS) -> str:
    """The one-line message load_params raises for the shipped params.yaml with `overrides` applied."""
    with pytest.raises(ConfigError) as info:
        load_params(path, overrides)
    msg = str(info.value)
    assert msg and "\n" not in msg, f"not one line: {msg!r}"
    return msg


def test_shipped_params_parse() -> None:
    p = load_params(PARAMS)
    raw = yaml.safe_load(PARAMS.read_text())
    assert isinstance(p, Params)
    # A few values straight from the file, so a silent default would show.
    assert p.seed == raw["seed"]
    assert p.task.num_rows == raw["task"]["num_rows"]
    assert p.model.num_layers == raw["model"]["num_layers"]
    assert p.reward_model.hidden_size == raw["reward_model"]["hidden_size"]
    assert p.sft.micro_batch_size == raw["sft"]["micro_batch_size"]
    assert [s.path for s in p.data.sources] == [s["path"] for s in raw["data"]["sources"]]
    assert p.data.split_shares == tuple(float(x) for x in raw["data"]["data_split"].split(","))
    assert p.sft.global_batch_size == 0 and p.reward.global_batch_size == 0  # derived


def test_overrides_apply_dotted_keys_and_create_groups(tmp_path: Path) -> None:
    p = load_params(PARAMS, {"sft.learning_rate": 0.5, "sft.lora.rank": 4, "engine.zero_stage": 2, "seed": 7})
    assert (p.sft.learning_rate, p.sft.lora.rank, p.engine.zero_stage, p.seed) == (0.5, 4, 2, 7)
    assert p.reward.learning_rate == yaml.safe_load(PARAMS.read_text())["reward"]["learning_rate"]  # untouched

    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set: every default\n")
    q = load_params(empty, {"model.hidden_size": 64, "model.num_heads": 2})
    assert (q.model.hidden_size, q.model.num_heads) == (64, 2)
    assert q.engine.zero_stage == Params().engine.zero_stage


def test_overrides_do_not_touch_the_file() -> None:
    before = PARAMS.read_bytes()
    load_params(PARAMS, {"sft.epochs": 9})
    assert PARAMS.read_bytes() == before


def test_override_below_a_scalar_is_a_config_error() -> None:
    msg = config_error({"seed.value": 1})
    assert "'seed.value'" in msg and "'seed'" in msg


# ----------------------------------------------------------------------------------------------- one-line messages


def test_unknown_key_suggests_the_near_one() -> None:
    msg = config_error({"sft.learning_rat": 1e-3})
    assert "sft.learning_rat" in msg and "did you mean sft.learning_rate?" in msg


def test_unknown_nested_key_suggests_with_its_full_path() -> None:
    msg = config_error({"reward.lora.rnak": 2})
    assert "did you mean reward.lora.rank?" in msg


def test_unknown_key_in_a_source_names_its_index() -> None:
    # `pathh` also leaves `path` missing; the unknown key is the one worth reporting.
    msg = config_error({"data.sources": [{"pathh": "builtin"}]})
    assert "data.sources[0].pathh" in msg and "did you mean data.sources[0].path?" in msg


def test_unknown_top_level_group() -> None:
    msg = config_error({"sfft": {"epochs": 1}})
    assert "'sfft'" in msg and "did you mean sft?" in msg


def test_unknown_key_with_no_near_match_says_remove_it() -> None:
    msg = config_error({"zzz_not_a_group": 1})
    assert "'zzz_not_a_group'" in msg and "remove it" in msg


def test_wrong_type_names_key_value_and_expected_type() -> None:
    msg = config_error({"sft.epochs": "x"})
    assert "'sft.epochs' = 'x'" in msg
    assert "whole number" in msg and "epochs > 0" in msg


def test_wrong_type_for_a_bool_and_a_group() -> None:
    assert "must be true or false" in config_error({"engine.offload_params": "maybe"})
    assert "'reward' = 3: must be a mapping of keys" in config_error({"reward": 3})


def test_out_of_range_says_the_bound_and_the_allowed_values() -> None:
    msg = config_error({"engine.zero_stage": 5})
    assert msg.endswith("'engine.zero_stage' = 5: must be <= 3 (allowed: 0 <= zero_stage <= 3)")


def test_below_a_one_sided_bound() -> None:
    msg = config_error({"sft.micro_batch_size": 0})
    assert "'sft.micro_batch_size' = 0: must be > 0" in msg


def test_open_interval_float() -> None:
    msg = config_error({"data.eval_fraction": 1.5})
    assert "'data.eval_fraction' = 1.5" in msg and "(allowed: 0 < eval_fraction < 1)" in msg


def test_literal_lists_the_choices() -> None:
    msg = config_error({"engine.dtype": "fp8"})
    assert "'engine.dtype' = 'fp8': must be one of 'fp32', 'bf16' or 'fp16'" in msg


def test_fp16_on_cpu() -> None:
    msg = config_error({"engine.device": "cpu", "engine.dtype": "fp16"})
    assert "engine.dtype fp16" in msg and "CPU" in msg and "bf16 or fp32" in msg


@pytest.mark.parametrize("split", ["2,4", "1,a,2", "0,0,0", "-1,2,2"])
def test_bad_data_split(split: str) -> None:
    msg = config_error({"data.data_split": split})
    assert f"data.data_split is {split!r}" in msg and "e.g. '2,4,4'" in msg


def test_min_len_above_max_len() -> None:
    msg = config_error({"task.min_len": 7, "task.max_len": 4})
    assert "task.min_len (7)" in msg and "task.max_len (4)" in msg and "lower min_len" in msg


@pytest.mark.parametrize("group", ["model", "reward_model"])
def test_hidden_size_not_divisible_by_heads_names_the_group(group: str) -> None:
    msg = config_error({f"{group}.hidden_size": 30, f"{group}.num_heads": 4})
    assert msg.startswith(f"{PARAMS}: {group}: ")  # the rule sits in ModelConfig, shared by both groups
    assert "hidden_size (30)" in msg and "num_heads (4)" in msg and "change one of them" in msg


def test_offload_optimizer_needs_zero() -> None:
    msg = config_error({"engine.offload_optimizer": True, "engine.zero_stage": 0})
    assert "engine.offload_optimizer" in msg and "engine.zero_stage >= 1" in msg


def test_offload_params_needs_zero3() -> None:
    msg = config_error({"engine.offload_params": True, "engine.zero_stage": 2})
    assert "engine.offload_params" in msg and "zero_stage: 3" in msg


@pytest.mark.parametrize("model", ["ref", "reward"])
def test_frozen_model_offload_optimizer_is_refused(model: str) -> None:
    """The reference and reward model are frozen: an optimizer offload for them would be silently ignored."""
    msg = config_error({f"ppo.engines.{model}.offload_optimizer": True, "engine.zero_stage": 3})
    assert f"ppo.engines.{model}.offload_optimizer" in msg and "frozen" in msg and "offload_params" in msg


def test_zero3_persistence_threshold_reaches_deepspeed() -> None:
    from rlhf.training.runtime import zero_config

    p = load_params(PARAMS, {"engine.zero_stage": 3, "engine.zero3_persistence_threshold": 0})
    assert zero_config(p.engine)["stage3_param_persistence_threshold"] == 0
    frozen = zero_config(resolve_engine(p.engine, p.ppo.engines.ref), trained=False)
    assert frozen["stage"] == 3 and frozen["stage3_param_persistence_threshold"] == 0
    p2 = load_params(PARAMS, {"engine.zero_stage": 2, "engine.offload_optimizer": True})
    assert zero_config(p2.engine, trained=False) == {"stage": 0}  # frozen under ZeRO-2: whole, nothing offloaded


@pytest.mark.parametrize("group", ["model", "reward_model"])
def test_position_embeddings_below_max_seq_tokens(group: str) -> None:
    msg = config_error({f"{group}.max_position_embeddings": 64, "data.max_seq_tokens": 96})
    assert f"{group}.max_position_embeddings (64)" in msg and "data.max_seq_tokens (96)" in msg


def test_position_embeddings_rule_skips_a_named_model() -> None:
    # A pretrained model brings its own position embeddings; the built-from-config limit does not apply.
    p = load_params(PARAMS, {"model.name_or_path": "some/model", "model.max_position_embeddings": 8})
    assert p.model.max_position_embeddings == 8


def test_missing_params_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    msg = config_error({}, path=missing)
    assert str(missing) in msg and "no such params file" in msg and "--params" in msg


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft:\n  epochs: [1, 2\n  micro_batch_size: 4\n")
    msg = config_error({}, path=bad)
    assert str(bad) in msg and "not valid YAML at line 3" in msg and "fix the syntax" in msg


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    bad = tmp_path / "list.yaml"
    bad.write_text("- sft\n- reward\n")
    msg = config_error({}, path=bad)
    assert "mapping of groups" in msg


def test_message_names_the_file_it_came_from(tmp_path: Path) -> None:
    other = tmp_path / "tiny.yaml"
    other.write_text("sft:\n  learning_rat: 0.1\n")
    assert config_error({}, path=other).startswith(f"{other}: unknown key 'sft.learning_rat'")


# ------------------------------------------------------------------------------------ global_batch_size cross rule


@pytest.mark.parametrize("group", ["sft", "reward"])
def test_global_batch_size_mismatch(group: str) -> None:
    msg = config_error(
        {
            f"{group}.global_batch_size": 64,
            f"{group}.micro_batch_size": 16,
            f"{group}.gradient_accumulation_steps": 1,
            "engine.num_procs": 2,
        }
    )
    assert msg == (
        f"{PARAMS}: {group}.global_batch_size (64) != {group}.micro_batch_size (16) x "
        f"{group}.gradient_accumulation_steps (1) x engine.num_procs (2) = 32: change one of them"
    )


def test_global_batch_size_matching_or_zero_is_accepted() -> None:
    # 8 x 2 x 2 = 32 for sft; reward left at 0 (derived) whatever its batch.
    p = load_params(
        PARAMS,
        {
            "sft.global_batch_size": 32,
            "sft.micro_batch_size": 8,
            "sft.gradient_accumulation_steps": 2,
            "engine.num_procs": 2,
            "reward.global_batch_size": 0,
            "reward.micro_batch_size": 5,
        },
    )
    assert p.sft.global_batch_size == 32 and p.reward.global_batch_size == 0


def test_global_batch_size_must_not_be_negative() -> None:
    assert "'sft.global_batch_size' = -1: must be >= 0" in config_error({"sft.global_batch_size": -1})


def test_parse_params_on_a_mapping() -> None:
    # No file behind it: defaults fill every group, and errors start with the name it is given.
    assert parse_params({}).engine.zero_stage == Params().engine.zero_stage
    with pytest.raises(ConfigError, match=r"^params\.yaml: 'sft\.epochs' = 0: must be > 0$"):
        parse_params({"sft": {"epochs": 0}})
    with pytest.raises(ConfigError, match=r"^override\.yaml: unknown key"):
        parse_params({"sft": {"epoch": 1}}, source="override.yaml")


def test_a_params_file_of_the_old_flat_shape_names_the_new_keys() -> None:
    """Before 2026-12 step 3's keys were flat (ppo.kl_coef); such a file gets one line naming each key's new place."""
    msg = config_error({"ppo.kl_coef": 0.05, "ppo.actor_engine": {"zero_stage": 3}})
    assert "ppo.kl_coef -> ppo.kl.coef, ppo.actor_engine -> ppo.engines.actor" in msg and "\n" not in msg
    assert "evaluate.temperature -> evaluate.sampling.temperature" in config_error({"evaluate.temperature": 0.7})
    assert load_params(PARAMS, {"ppo.kl.coef": 0.05}).ppo.kl.coef == 0.05
