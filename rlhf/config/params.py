"""params.yaml as a whole: loading, one-line errors with did-you-mean, and the checks across groups."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from rlhf.config.base import ConfigError, Group
from rlhf.config.data import DataConfig, TaskConfig
from rlhf.config.evaluation import EvaluateConfig, LoggingConfig
from rlhf.config.models import BaseModelConfig, EngineConfig, ModelConfig, TokenizerConfig, resolve_engine
from rlhf.config.rewards import RewardsConfig
from rlhf.config.rl import PPOConfig
from rlhf.config.training import DPOConfig, RewardConfig, SFTConfig
from rlhf.errors import UserError


class Params(Group):
    seed: int = Field(1234, ge=0, lt=2**32)  # numpy's and torch's seeds: 0 .. 2**32 - 1
    task: TaskConfig = Field(default_factory=TaskConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    base_model: BaseModelConfig = Field(default_factory=BaseModelConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    reward_model: ModelConfig = Field(
        default_factory=lambda: ModelConfig(hidden_size=160, num_layers=4, num_heads=4, intermediate_size=480)
    )
    engine: EngineConfig = Field(default_factory=EngineConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    rewards: RewardsConfig = Field(default_factory=RewardsConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _cross(self) -> Params:
        if self.rewards.model_weight == 0 and not self.rewards.functions and self.ppo.environment.name is None:
            raise ValueError(
                "rewards.model_weight is 0 and rewards.functions is empty, so step 3 has no reward: set model_weight "
                "> 0, list a function, or name an environment (ppo.environment.name) that rewards its episodes"
            )
        if self.engine.dtype == "fp16" and self.engine.device == "cpu":
            raise ValueError("engine.dtype fp16 is not supported on CPU: use bf16 or fp32")
        for name in ("actor", "critic", "ref", "reward"):
            try:
                resolved = resolve_engine(self.engine, getattr(self.ppo.engines, name))
            except ValidationError as err:
                raise ValueError(f"ppo.engines.{name}: {err.errors()[0]['msg'].removeprefix('Value error, ')}") from None
            if resolved.dtype == "fp16" and resolved.device == "cpu":
                raise ValueError(f"ppo.engines.{name}.dtype fp16 is not supported on CPU: use bf16 or fp32")
        for name in ("ref", "reward"):  # frozen: nothing to optimise, so nothing to offload
            if getattr(self.ppo.engines, name).offload_optimizer:
                raise ValueError(
                    f"ppo.engines.{name}.offload_optimizer: this model is frozen and has no optimizer state: set it to "
                    f"null (ppo.engines.{name}.offload_params with zero_stage 3 offloads its weights)"
                )
        for name, model in (("model", self.model), ("reward_model", self.reward_model)):
            if model.name_or_path is None and model.max_position_embeddings < self.data.max_seq_tokens:
                raise ValueError(
                    f"{name}.max_position_embeddings ({model.max_position_embeddings}) is below "
                    f"data.max_seq_tokens ({self.data.max_seq_tokens}): raise it or lower max_seq_tokens"
                )
        procs = self.engine.num_procs
        for name, train in (("sft", self.sft), ("reward", self.reward)):
            derived = train.micro_batch_size * train.gradient_accumulation_steps * procs
            if train.global_batch_size and train.global_batch_size != derived:
                raise ValueError(
                    f"{name}.global_batch_size ({train.global_batch_size}) != {name}.micro_batch_size "
                    f"({train.micro_batch_size}) x {name}.gradient_accumulation_steps "
                    f"({train.gradient_accumulation_steps}) x engine.num_procs ({procs}) = {derived}: "
                    "change one of them"
                )
        return self


def _field_names(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The valid keys at `loc` (for did-you-mean)."""
    cls: Any = model
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            break
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cls = ann
        else:
            args = getattr(ann, "__args__", ())
            nested = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            if not nested:
                break
            cls = nested[0]
    return list(cls.model_fields)


def _field_info(model: type[BaseModel], loc: tuple[Any, ...]) -> Any:
    """The pydantic FieldInfo of the key at `loc`, or None (list indices are stepped over)."""
    cls: Any = model
    info = None
    for part in loc:
        if not isinstance(part, str):
            continue
        info = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if info is None:
            return None
        args = (info.annotation, *getattr(info.annotation, "__args__", ()))
        cls = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return info


def _allowed(loc: tuple[Any, ...], one_sided: bool = True) -> str:
    """' (allowed: 0 <= zero_stage <= 3)' from the field's bounds; '' when it has none, or only one and not
    one_sided (a bound error already names that one)."""
    info = _field_info(Params, loc)
    low = high = None  # (value, sign)
    for bound in info.metadata if info is not None else ():
        for attr, sign in (("ge", ">="), ("gt", ">")):
            if getattr(bound, attr, None) is not None:
                low = (getattr(bound, attr), sign)
        for attr, sign in (("le", "<="), ("lt", "<")):
            if getattr(bound, attr, None) is not None:
                high = (getattr(bound, attr), sign)
    name = str(loc[-1]) if loc else "value"
    if low and high:
        return f" (allowed: {low[0]} {low[1].replace('>', '<')} {name} {high[1]} {high[0]})"
    if one_sided and (low or high):
        value, sign = low or high  # type: ignore[misc]
        return f" (allowed: {name} {sign} {value})"
    return ""


# Pydantic error type -> what the value must be, worded as the fix.
_MUST = {
    "int_parsing": "must be a whole number",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string (quote it)",
    "list_type": "must be a list",
    "model_type": "must be a mapping of keys",
    "model_attributes_type": "must be a mapping of keys",
    "dict_type": "must be a mapping of keys",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _one_line(err: ValidationError, source: str = "params.yaml") -> str:
    errors = err.errors()
    # An unknown key explains a "missing" one next to it (`pathh` for `path`), so it is reported first.
    e = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
    loc = tuple(e["loc"])
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "params"
    if e["type"] == "extra_forbidden":
        parent, leaf = loc[:-1], str(loc[-1])
        near = difflib.get_close_matches(leaf, _field_names(Params, tuple(p for p in parent if isinstance(p, str))), n=1)
        prefix = key[: len(key) - len(leaf)]
        hint = f"did you mean {prefix}{near[0]}?" if near else "remove it"
        homes = [g for g in Params.model_fields if g != leaf and leaf in _field_names(Params, (g,))] if not parent else []
        if homes:  # a group's key written at the top level
            hint = f"it belongs under a group: {' or '.join(f'{g}.{leaf}' for g in homes)} (indent it under `{homes[0]}:`)"
        return f"{source}: unknown key '{key}': {hint}"
    if e["type"] == "value_error":
        msg = str(e.get("ctx", {}).get("error", e["msg"]))
        # A group's own rule does not know the group's name (model vs reward_model): say where it fired.
        where = "" if not loc or msg.startswith(key) else f"{key}: "
        return f"{source}: {where}{msg}"
    if e["type"] == "missing":
        return f"{source}: '{key}' is required: add it"
    shown = repr(e.get("input"))
    value = f"'{key}' = {shown if len(shown) <= 60 else shown[:57] + '...'}"
    if e["type"] in _BOUNDS:
        bound = next(iter(e.get("ctx", {}).values()), "?")
        return f"{source}: {value}: must be {_BOUNDS[e['type']]} {bound}{_allowed(loc, one_sided=False)}"
    if e["type"] == "literal_error":
        return f"{source}: {value}: must be one of {e.get('ctx', {}).get('expected', '?')}"
    if e["type"] == "string_pattern_mismatch":
        pattern = _PATTERNS.get(".".join(map(str, loc))) or _PATTERNS.get(str(loc[-1]), "must be letters, digits and _")
        return f"{source}: {value}: {pattern}"
    if e["type"] in _MUST:
        return f"{source}: {value}: {_MUST[e['type']]}{_allowed(loc)}"
    return f"{source}: {value}: {e['msg']}"


# what a string key's pattern asks for, by the key's name (any other pattern is a name: letters, digits and _)
_PATTERNS = {
    "function": "must be 'module:function', a callable importable from the project folder or the environment (for "
                "example rlhf.data.task:gold_reward_fn)",
    "trainer": "must be 'module:Class', an RLTrainer subclass importable from the project folder or the environment",
    "url": "must start with http:// or https:// (a reward server, such as `rlhf serve-reward`)",
    "ppo.environment.name": "must be 'module:Class', an rlhf.rollout.environments.Environment subclass importable from "
                            "the project folder or the environment",
}

_GROUPS = {name for name, f in Params.model_fields.items() if isinstance(f.annotation, type) and
           issubclass(f.annotation, BaseModel)}


def parse_params(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    """Validate a params mapping; raise ConfigError with one line on the first problem (`source` starts it)."""
    # `group:` with nothing under it reads as null: it means the group's defaults, as leaving it out does
    raw = {k: {} if v is None and k in _GROUPS else v for k, v in (raw or {}).items()}
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_one_line(err, source)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key written twice in one mapping is an error (PyYAML keeps the last one
    silently; DVC refuses such a file)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:  # an unhashable key: the base class says so
                break
            if first != line:
                raise ConfigError(
                    f"'{key}' is written twice in one block (lines {first} and {line}): merge the two into one "
                    "(only one of them would count)"
                )
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> Any:
    """A YAML file's content, refusing duplicate keys (ConfigError names both lines)."""
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read params.yaml into typed groups. `overrides` maps dotted keys to values (tests, `rlhf train`)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder: pass --params the params file itself (for example {path / 'params.yaml'})")
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file: pass --params with the path to params.yaml")
    try:
        raw = read_yaml(path)
        if raw is None and not overrides:
            raise ConfigError(
                f"{path} is empty: write the groups you change (for example `seed: 1`), or start from the shipped "
                "file (`git checkout params.yaml`); an empty file would run every default, 30,000 rows and all"
            )
        raw = raw or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(err, "problem", None) or str(err).splitlines()[0]).split())
        raise ConfigError(f"{path}: not valid YAML{where} ({problem}): fix the syntax there") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: could not be read as UTF-8 text ({err}): pass --params a YAML file") from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: expected a mapping of groups at the top level (`group:`, then `key: value` under it)"
        )
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{dotted}': '{p}' is not a group of keys: override '{p}' itself")
        node[leaf] = value
    return parse_params(raw, str(path))


_LOGGER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_loggers(backends: list[str]) -> None:
    """Each logging.report_to backend's package is installed (before any training), else one UserError."""
    import importlib.util

    for name in backends:
        package = _LOGGER_PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise UserError(f"logging.report_to lists {name} but the {package} package is not installed: "
                            f"pip install -c constraints.txt {package} (or remove {name} from logging.report_to)")
