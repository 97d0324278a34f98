"""The real `rlhf` command on bad input: exit code 2, one `error:` line on stderr, no traceback, outputs untouched.

BAD_INPUTS is the table: data rows, params and paths/models a user gets wrong. Each case runs the console module in
a fresh process (as dvc.yaml does) in a working folder that already holds earlier outputs; a failed run must leave
every one of those bytes as it was. With BAD_INPUTS_REPORT=FILE set, each case appends what it printed to FILE.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import cli_env, merge, run_cli, write_params

TINY_TASK = {"task": {"num_rows": 50}}  # prepare on 50 rows takes seconds

# Outputs a previous, successful run left behind (each output folder with the manifest that marks it as ours); a
# failing stage must not touch them.
EARLIER_MANIFEST = '{"step": "earlier", "versions": {}}\n'
EARLIER_OUTPUTS = {
    "data/prepared/sft_train.jsonl": '{"prompt": "earlier"}\n',
    "data/prepared/manifest.json": EARLIER_MANIFEST,
    "data/prepared/COMPLETE.json": '{"files": {}}\n',
    "data/prepared/tokenizer/tokenizer.json": "{}\n",
    "metrics/prepare.json": '{"rows_valid": 1}\n',
    "models/sft/model.safetensors": "not really weights",
    "models/sft/manifest.json": EARLIER_MANIFEST,
    "metrics/sft.json": '{"perplexity": 1.0}\n',
    "dvclive/sft/metrics.json": "{}\n",
    "dvclive/sft/plots/metrics/train/loss.tsv": "step\tloss\n1\t0.5\n",
    "models/reward/model.safetensors": "not really weights",
    "models/reward/manifest.json": EARLIER_MANIFEST,
    "metrics/reward.json": '{"accuracy": 1.0}\n',
    "dvclive/reward/metrics.json": "{}\n",
    "models/ppo/actor/manifest.json": EARLIER_MANIFEST,
    "dvclive/ppo/metrics.json": "{}\n",
}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder (relative path -> bytes), empty folders as b'<dir>'."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_file():
            out[rel] = p.read_bytes()
        elif p.is_dir() and not any(p.iterdir()):
            out[rel] = b"<dir>"
    return out


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A working folder with tiny params.yaml and earlier outputs in every default output path."""
    write_params(tmp_path / "params.yaml", TINY_TASK)
    for rel, text in EARLIER_OUTPUTS.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def fails_cleanly(work: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run `rlhf ARGS` in work; assert exit 2, one `error:` line on stderr, no traceback, nothing in work changed.
    Returns the error line."""
    before = snapshot(work)
    env = env or cli_env()
    assert env["HF_HUB_OFFLINE"] == "1" and env["HF_DATASETS_OFFLINE"] == "1"  # never reach the network
    proc = subprocess.run(
        [sys.executable, "-m", "stages.cli", *args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    shown = f"rlhf {' '.join(args)} -> {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 2, shown
    assert "Traceback" not in proc.stdout + proc.stderr, shown
    assert proc.stdout == "", shown  # no progress bars, launcher or DeepSpeed banners before the error
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0][len("error: "):].strip(), shown
    assert snapshot(work) == before, "a failed run changed the working folder"
    return lines[0]


def with_params(work: Path, *overrides: dict[str, Any]) -> None:
    write_params(work / "params.yaml", TINY_TASK, *overrides)



def jsonl(*rows: Any) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def source(path: str, fmt: str = "auto", **data: Any) -> dict[str, Any]:
    """Params that read one local file and stop at its first bad row."""
    return {"data": {"sources": [{"path": path, "format": fmt}], "invalid_rows": "error", **data}}


GOOD = {"prompt": "Sort 3 1 2.", "completion": "1 2 3"}
# A small dataset of the user's own (not the sorting task), in TRL's prompt/completion format: 30 rows over 30
# prompts. Prompt/completion rows feed SFT and PPO, never the reward model.
CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Chile", "Santiago"),
            ("Spain", "Madrid"), ("Egypt", "Cairo"), ("Italy", "Rome"), ("Cuba", "Havana"), ("Nepal", "Kathmandu")]
MINE = jsonl(*({"prompt": f"{q} {country}?", "completion": f"{city}."} for country, city in CAPITALS
               for q in ("What is the capital of", "Which city is the capital of", "Name the capital of")))


# And preference pairs over the same prompts (the right city chosen, a wrong one rejected), so that prepare can
# feed every step.
MINE_PAIRS = jsonl(*({"prompt": f"{q} {country}?", "chosen": f"{city}.", "rejected": f"{CAPITALS[i - 1][1]}."}
                     for i, (country, city) in enumerate(CAPITALS)
                     for q in ("What is the capital of", "Which city is the capital of", "Name the capital of")))
MINE_FILES = {"mine.jsonl": MINE, "mine_pairs.jsonl": MINE_PAIRS}
# The same answers as TRL's unpaired rows (thumbs up for the right city, down for a wrong one): no pair at all.
MINE_THUMBS = jsonl(*({"prompt": f"{q} {country}?", "completion": f"{city if up else CAPITALS[i - 1][1]}.", "label": up}
                      for i, (country, city) in enumerate(CAPITALS)
                      for q in ("What is the capital of", "Which city is the capital of", "Name the capital of")
                      for up in (True, False)))


def mine(**data: Any) -> dict[str, Any]:
    sources = [{"path": "mine.jsonl", "format": "prompt_completion"}, {"path": "mine_pairs.jsonl", "format": "auto"}]
    return {"data": {"sources": sources, **data}}
PAIR = {"prompt": "Sort 3 1 2.", "chosen": "1 2 3", "rejected": "3 2 1"}
SAY = jsonl(*({"prompt": f"Say {i}.", "completion": f"{i}"} for i in range(20)))  # demonstrations, no pairs
# No pairs, a reward from a function alone: prepare skips step 2 and the reward stage writes its placeholder.
VERIFIER_ONLY = merge(source("d.jsonl"), {"rewards": {"model_weight": 0.0,
                                                      "functions": [{"function": "rlhf.data.task:gold_reward_fn"}]}})


@dataclass(frozen=True)
class Bad:
    """One bad input: what is wrong, the files and params that carry it, the command, what the line must say."""

    what: str
    args: tuple[str, ...]
    expect: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str | bytes] = field(default_factory=dict)
    trained: bool = False  # copy the session's trained tokenizer, data and models into the folder first
    takes_params: bool = True  # the command reads params.yaml (chat does not)
    setup: tuple[tuple[str, ...], ...] = ()  # commands that must succeed first (`prepare` of the case's own data)
    env: dict[str, str] = field(default_factory=dict)  # variables for the failing command (fault injection)
    links: dict[str, str] = field(default_factory=dict)  # symbolic links to make: path -> target


BAD_INPUTS = [
    # ---------------------------------------------------------------------------------------------------- data
    Bad("missing column (prompt/completion without completion)", ("prepare",),
        ("row 0", "missing_column", "data.sources[].format"),
        source("d.jsonl", "prompt_completion"), {"d.jsonl": jsonl({"prompt": "Sort 2 1."})}),
    Bad("empty prompt text", ("prepare",), ("row 1", "empty_text", "invalid_rows: drop"),
        source("d.jsonl"), {"d.jsonl": jsonl(GOOD, {"prompt": "  ", "completion": "1"})}),
    Bad("None completion", ("prepare",), ("row 0", "empty_text"),
        source("d.jsonl", "prompt_completion"), {"d.jsonl": jsonl({"prompt": "Sort 2 1.", "completion": None})}),
    Bad("wrong type (completion is a number)", ("prepare",), ("row 0", "wrong_type"),
        source("d.jsonl", "prompt_completion"), {"d.jsonl": jsonl({"prompt": "Sort 2 1.", "completion": 12})}),
    Bad("an unpaired row whose label is not true or false", ("prepare",), ("row 1", "wrong_type", "label is 'yes'"),
        source("d.jsonl"), {"d.jsonl": jsonl({"prompt": "Sort 2 1.", "completion": "1 2", "label": True},
                                             {"prompt": "Sort 3 1.", "completion": "3 1", "label": "yes"})}),
    Bad("chosen == rejected", ("prepare",), ("row 1", "chosen_equals_rejected"),
        source("d.jsonl"), {"d.jsonl": jsonl(PAIR, dict(PAIR, rejected="1 2 3"))}),
    Bad("prompt longer than data.max_prompt_tokens", ("prepare",), ("row 0", "prompt_too_long", "max_prompt_tokens"),
        source("d.jsonl", max_prompt_tokens=8), {"d.jsonl": jsonl({"prompt": "Sort " + "9 " * 40, "completion": "9"})}),
    Bad("all-masked labels (the answer would be cut off by max_seq_tokens)", ("prepare",),
        ("row 0", "sequence_too_long", "max_seq_tokens"),
        source("d.jsonl", max_prompt_tokens=40, max_seq_tokens=41),
        {"d.jsonl": jsonl({"prompt": "Sort 3 1 4 1 5 9 2 6 5 3 5 8 9 7 9 3.", "completion": "1 3 5 7 9 " * 12})}),
    Bad("wrong chat role order", ("prepare",), ("row 0", "bad_role_order"),
        source("d.jsonl", "messages"),
        {"d.jsonl": jsonl({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]})}),
    Bad("chosen and rejected with different conversations", ("prepare",), ("row 0", "mismatched_prompt"),
        source("d.jsonl", "preference"),
        {"d.jsonl": jsonl({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "1"}],
                           "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "2"}]})}),
    Bad("duplicate row (same prompt, same answer)", ("prepare",), ("row 1", "duplicate_row"),
        source("d.jsonl"), {"d.jsonl": jsonl(GOOD, GOOD)}),
    Bad("a step with an empty train split (no pairs for the reward model)", ("prepare",),
        ("reward_train is empty (0 rows)", "no valid row has a preference pair", "prompt/chosen/rejected",
         "rewards.model_weight: 0"),
        source("d.jsonl"), {"d.jsonl": SAY}),
    Bad("source steps its rows cannot feed", ("prepare",),
        ("'d.jsonl' reads as format prompt_completion", "cannot feed ['reward']", "data.sources[].steps"),
        {"data": {"sources": [{"path": "d.jsonl", "steps": ["reward"]}]}}, {"d.jsonl": jsonl(GOOD)}),
    Bad("unknown step name in a source's steps", ("prepare",), ("data.sources[0].steps[0]", "'rm'", "'reward'"),
        {"data": {"sources": [{"path": "d.jsonl", "steps": ["rm"]}]}}, {"d.jsonl": jsonl(GOOD)}),
    Bad("local source that dvc.yaml's prepare stage does not depend on", ("prepare",),
        ("'d.jsonl' is not a dependency of the prepare stage in dvc.yaml", "move it under data/sources/"),
        source("d.jsonl"), {"d.jsonl": jsonl(GOOD, PAIR), "dvc.yaml": "stages:\n  prepare:\n    cmd: rlhf prepare\n"
                            "    deps:\n      - data/sources\n"}),
    Bad("unreadable file (not JSON lines)", ("prepare",), ("d.jsonl",),
        source("d.jsonl"), {"d.jsonl": "{not json at all\n"}),
    Bad("unreadable file (corrupt parquet)", ("prepare",), ("d.parquet",),
        source("d.parquet"), {"d.parquet": b"PAR1\x00\x01garbage"}),
    Bad("columns that match no format", ("prepare",), ("d.jsonl", "format"),
        source("d.jsonl"), {"d.jsonl": jsonl({"question": "a", "answer": "b"})}),
    Bad("every row bad in drop mode", ("prepare",), ("no valid rows", "'empty_text': 3"),
        {"data": {"sources": [{"path": "d.jsonl"}], "invalid_rows": "drop"}},
        {"d.jsonl": jsonl({"prompt": "", "completion": "x"}, {"prompt": "a", "completion": " "},
                          {"prompt": "", "completion": ""})}),
    Bad("missing data file", ("prepare",), ("data/no_such_file.jsonl", "not found", "data.sources[].path"),
        source("data/no_such_file.jsonl")),
    Bad("hub dataset id while offline", ("prepare",), ("nobody-xyz/no-such-dataset-xyz", "save_to_disk"),
        source("nobody-xyz/no-such-dataset-xyz")),
    # -------------------------------------------------------------------------------------------------- params
    Bad("unknown key", ("sft",), ("sft.learning_rat", "did you mean sft.learning_rate?"),
        {"sft": {"learning_rat": 0.1}}),
    Bad("unknown group", ("prepare",), ("'sftt'", "did you mean sft?"), {"sftt": {"epochs": 1}}),
    Bad("wrong type", ("reward",), ("reward.epochs", "'three'", "whole number"), {"reward": {"epochs": "three"}}),
    Bad("out-of-range value", ("ppo",), ("ppo.kl.coef", "-0.1"), {"ppo": {"kl": {"coef": -0.1}}}),
    Bad("a key of the old flat shape", ("ppo",), ("ppo.kl_coef -> ppo.kl.coef", "ppo.temperature -> ppo.sampling.temperature"),
        {"ppo": {"kl_coef": 0.05, "temperature": 0.7}}),
    Bad("an evaluate key of the old flat shape", ("evaluate",), ("evaluate.top_k -> evaluate.sampling.top_k",),
        {"evaluate": {"top_k": 5}}),
    Bad("ZeRO stage 5", ("sft",), ("'engine.zero_stage' = 5", "allowed: 0 <= zero_stage <= 3"),
        {"engine": {"zero_stage": 5}}),
    Bad("fp16 on CPU", ("sft",), ("fp16", "bf16"), {"engine": {"dtype": "fp16", "device": "cpu"}}),
    Bad("inconsistent batch sizes", ("reward",), ("reward.global_batch_size (7) != reward.micro_batch_size",),
        {"reward": {"global_batch_size": 7}}),
    Bad("heads do not divide hidden size", ("sft",), ("model: hidden_size (30)", "num_heads (4)"),
        {"model": {"hidden_size": 30, "num_heads": 4}}),
    Bad("grpo with one answer per prompt", ("ppo",), ("ppo.algorithm grpo", "ppo.answers_per_prompt must be >= 2"),
        {"ppo": {"algorithm": "grpo", "answers_per_prompt": 1}}),
    Bad("layered generation with LoRA on the embeddings", ("ppo",), ("ppo.rollout.gather_layers", "embed_tokens"),
        {"ppo": {"rollout": {"gather_layers": 1}, "lora": {"actor": {"rank": 4, "target_modules": ["embed_tokens"]}}}}),
    Bad("layered generation through vLLM", ("ppo",), ("ppo.rollout.gather_layers 1", "engine: own"),
        {"ppo": {"rollout": {"gather_layers": 1, "engine": "vllm"}}}),
    Bad("ppo.trainer not in module:Class form", ("ppo",), ("ppo.trainer", "must be 'module:Class'"),
        {"ppo": {"trainer": "rewards.my_trainers.Mine"}}),
    Bad("ppo.trainer that is not a RLTrainer", ("ppo",), ("ppo.trainer 'json:JSONDecoder'", "not a subclass"),
        {"ppo": {"trainer": "json:JSONDecoder"}}, trained=True),
    Bad("ptx source without a text column", ("prepare",), ("data.ptx_source 'd.jsonl' has no `text` column",),
        {"data": {"ptx_source": {"path": "d.jsonl"}}}, {"d.jsonl": jsonl({"body": "words"})}),
    Bad("params file missing", ("prepare", "--params", "nope.yaml"), ("nope.yaml", "no such params file")),
    Bad("params file not YAML", ("prepare", "--params", "broken.yaml"), ("not valid YAML at line 3",),
        files={"broken.yaml": "sft:\n  epochs: [1, 2\n  micro_batch_size: 4\n"}),
    Bad("reward function not in module:function form", ("ppo",), ("rewards.functions[0].function", "module:function"),
        {"rewards": {"functions": [{"function": "rewards.checks.exact"}]}}),
    Bad("a reward with both a function and a url", ("ppo",), ("rewards.functions[0]", "either `function`", "not both"),
        {"rewards": {"functions": [{"function": "rewards.checks:exact", "url": "http://127.0.0.1:8000/"}]}}),
    Bad("a reward url that is not http", ("ppo",), ("rewards.functions[0].url", "must start with http:// or https://"),
        {"rewards": {"functions": [{"url": "127.0.0.1:8000"}]}}),
    Bad("serve-reward with a function not in module:function form", ("serve-reward", "--function", "checks.exact"),
        ("--function 'checks.exact': must be module:function",), takes_params=False),
    Bad("no reward at all", ("ppo",), ("rewards.model_weight is 0 and rewards.functions is empty",),
        {"rewards": {"model_weight": 0.0}}),
    Bad("an environment not in module:Class form", ("check", "--out", "c.txt"),
        ("'ppo.environment.name' = 'rewards.envs.Calc'", "must be 'module:Class'", "Environment subclass"),
        {"ppo": {"environment": {"name": "rewards.envs.Calc"}}}),
    Bad("an environment that does not import", ("check", "--out", "c.txt"),
        ("ppo.environment.name 'rewards.nope:Calc'", "not importable", "rewards/nope.py"),
        {"ppo": {"environment": {"name": "rewards.nope:Calc"}}}),
    Bad("an environment's options that its class does not take", ("check", "--out", "c.txt"),
        ("ppo.environment.options do not fit rlhf.rollout.environments.calculator:Calculator", "unexpected keyword"),
        {"ppo": {"environment": {"name": "rlhf.rollout.environments.calculator:Calculator", "options": {"units": 2}}}}),
    Bad("scorer named like a metric", ("evaluate",), ("evaluate.scorers", "'rm_reward'"),
        {"evaluate": {"scorers": [{"function": "rewards.checks:exact", "name": "rm_reward"}]}}),
    Bad("reward function that does not import", ("ppo",),
        ("rewards.functions[0] 'rewards.nope:exact'", "not importable", "rewards/nope.py"),
        {"rewards": {"functions": [{"function": "rewards.nope:exact"}]}}, trained=True),
    Bad("reward function without the completions argument", ("ppo",),
        ("rewards.functions[0] 'rewards.checks:exact'", "takes no 'completions' argument", "fn(prompts, completions"),
        {"rewards": {"functions": [{"function": "rewards.checks:exact"}]}},
        {"rewards/__init__.py": "", "rewards/checks.py": "def exact(prompts, answers):\n    return [0.0]\n"},
        trained=True),
    # --------------------------------------------------------------------------------------------- paths/models
    Bad("data folder missing", ("sft", "--data", "no_such_dir"), ("no_such_dir",)),
    Bad("data folder without a tokenizer", ("reward", "--data", "empty_data"),
        ("no trained tokenizer in empty_data/tokenizer", "rlhf prepare"), files={"empty_data/.keep": ""}),
    Bad("model folder missing", ("sft",), ("models/no_such_model",), {"model": {"name_or_path": "models/no_such_model"}},
        trained=True),
    Bad("folder that is not a model", ("sft",), ("not_a_model", "save_pretrained"), {"model": {"name_or_path": "not_a_model"}},
        {"not_a_model/notes.txt": "hello"}, trained=True),
    Bad("hub model id while offline", ("reward",), ("nobody-xyz/no-such-model", "connected machine"),
        {"reward_model": {"name_or_path": "nobody-xyz/no-such-model"}}, trained=True),
    Bad("actor and reward model tokenizers differ", ("ppo", "--reward", "other_reward"),
        ("tokenizers differ in vocabulary",), files={"other_reward/.extra_token": "<extra>"}, trained=True),
    Bad("SFT model missing for ppo", ("ppo", "--sft", "models/nope"), ("models/nope",), trained=True),
    Bad("chat on a missing model", ("chat", "--model", "models/nope", "--prompt", "hi"), ("models/nope",),
        takes_params=False),
    Bad("hostfile that does not exist", ("sft",), ("engine.hostfile 'hosts.txt' does not exist",),
        {"engine": {"hostfile": "hosts.txt"}}),
    Bad("split file edited by hand", ("sft",),
        ("data/prepared/sft_train.jsonl' does not match the hash", "dvc checkout data/prepared", "dvc repro -f prepare"),
        files={"data/prepared/sft_train.jsonl": jsonl({"prompt": [{"role": "user", "content": "Sort 2 1."}],
                                                      "completion": "1 2", "source": "edited by hand"})},
        trained=True),
    # ------------------------------------------------------------------- outputs never destroy what we did not write
    Bad("--out a folder holding the user's files", ("prepare", "--out", "data"),
        ("--out 'data' holds files this project did not write", "data/README.md"),
        files={"data/README.md": "the user's notes\n"}),
    Bad("--out the folder of the stage's own source", ("prepare", "--out", "data"),
        ("--out 'data' holds this stage's input 'data/my_rows.jsonl'",),
        source("data/my_rows.jsonl"), {"data/my_rows.jsonl": jsonl(GOOD)}),
    Bad("--out the stage's own input", ("sft", "--out", "data/prepared"), ("--out 'data/prepared' is this stage's input",)),
    Bad("--out the working folder", ("reward", "--out", "."), ("--out '.' is the working folder",)),
    Bad("--out a file", ("sft", "--out", "notes.txt"), ("--out 'notes.txt' is a file",), files={"notes.txt": "mine\n"}),
    Bad("--out whose actor/ holds the user's files", ("ppo", "--out", "mine"),
        ("--out 'mine/actor' holds files this project did not write", "mine/actor/notes.txt"),
        files={"mine/actor/notes.txt": "mine\n"}),
    Bad("--metrics naming a folder", ("evaluate", "--metrics", "metrics"), ("--metrics 'metrics' is a folder",)),
    Bad("--live the working folder", ("sft", "--live", "."), ("--live '.' is the working folder",)),
    Bad("--checkpoints a folder above the input", ("sft", "--checkpoints", "data"),
        ("--checkpoints 'data' holds this stage's input 'data/prepared'",)),
    # ---------------------------------------------------------------------------- a step with nothing to learn from
    Bad("SFT split smaller than one micro batch (prepared from the user's 30 rows)", ("sft",),
        ("data/prepared/sft_train.jsonl has", "fewer than one batch of 32", "sft.micro_batch_size 32", "data.data_split"),
        merge(mine(), {"sft": {"micro_batch_size": 32}}), MINE_FILES, setup=(("prepare",),)),
    Bad("SFT split smaller than one global batch (gradient accumulation)", ("sft",),
        ("fewer than one batch of 40", "sft.gradient_accumulation_steps 5"),
        merge(mine(), {"sft": {"gradient_accumulation_steps": 5}}), MINE_FILES, setup=(("prepare",),)),
    Bad("reward pairs fewer than one micro batch", ("reward",),
        ("data/prepared/reward_train.jsonl has", "fewer than one batch of 32", "reward.micro_batch_size 32"),
        merge(mine(), {"reward": {"micro_batch_size": 32}}), MINE_FILES, setup=(("prepare",),)),
    Bad("a reward model asked of labelled answers only (unpaired rows)", ("reward",),
        ("reward_train.jsonl holds", "labelled answers", "no preference pair", "dpo.loss_type: kto"),
        {"data": {"sources": [{"path": "mine.jsonl", "steps": ["sft", "ppo"]},
                              {"path": "mine_thumbs.jsonl", "steps": ["reward"]}]}},
        {"mine.jsonl": MINE, "mine_thumbs.jsonl": MINE_THUMBS}, setup=(("prepare",),)),
    Bad("DPO pairs fewer than one micro batch", ("dpo",),
        ("data/prepared/reward_train.jsonl has", "fewer than one batch of 32", "dpo.micro_batch_size 32"),
        merge(mine(), {"dpo": {"micro_batch_size": 32}}), MINE_FILES, trained=True, setup=(("prepare",),)),
    Bad("ppo with rewards.model_weight > 0 on the reward stage's placeholder", ("ppo", "--params", "p1.yaml"),
        ("'models/reward' is a placeholder", "no reward model was trained", "rewards.model_weight: 0"),
        VERIFIER_ONLY, {"d.jsonl": SAY, "p1.yaml": yaml.safe_dump(merge(source("d.jsonl"), {"rewards": {"model_weight": 1.0}}))},
        setup=(("prepare",), ("reward",))),
    Bad("evaluate with neither a reward model nor a scorer", ("evaluate",),
        ("'models/reward' is a placeholder", "evaluate.scorers lists no scorer", "list your verifier"),
        VERIFIER_ONLY, {"d.jsonl": SAY}, setup=(("prepare",), ("reward",))),
    # (An empty eval split, or an empty reward split, stops prepare itself: "a step with an empty train split"
    # above; the training stages check again, tests/pipeline/test_outputs.py.)
    Bad("PPO prompts fewer than one rollout batch", ("ppo",),
        ("data/prepared/ppo_train.jsonl has", "fewer than one batch of 32", "ppo.rollout_batch_size 32"),
        merge(mine(), {"ppo": {"rollout_batch_size": 32}}), MINE_FILES, trained=True, setup=(("prepare",),)),
    # ----------------------------------------------------------- issue 15: params that used to crash or pass silently
    Bad("negative seed", ("prepare",), ("'seed' = -1", "0 <= seed"), {"seed": -1}),
    Bad("data_split with a NaN share", ("prepare",), ("data.data_split is 'nan,1,1'", "non-negative"),
        {"data": {"data_split": "nan,1,1"}}),
    Bad("empty params file", ("prepare", "--params", "empty.yaml"), ("empty.yaml is empty", "30,000 rows"),
        files={"empty.yaml": "# nothing but a comment\n"}),
    Bad("a key written twice", ("prepare", "--params", "twice.yaml"),
        ("'epochs' is written twice in one block (lines 2 and 3)", "merge"),
        files={"twice.yaml": "sft:\n  epochs: 1\n  epochs: 2\n"}),
    Bad("a group's key at the top level", ("prepare",), ("'learning_rate'", "belongs under a group", "sft.learning_rate"),
        {"learning_rate": 0.1}),
    Bad("no data sources", ("prepare",), ("data.sources is empty", "path: builtin"), {"data": {"sources": []}}),
    Bad("--params naming a folder", ("prepare", "--params", "data"), ("data is a folder", "params file itself")),
    # --------------------------------------------------------------------------- data read errors, by line
    Bad("Latin-1 bytes in a JSON lines file", ("prepare",), ("'d.jsonl' line 2 is not UTF-8", "iconv"),
        source("d.jsonl"), {"d.jsonl": jsonl(GOOD).encode() + b'{"prompt": "caf\xe9", "completion": "x"}\n'}),
    Bad("a broken line in a JSON lines file", ("prepare",), ("'d.jsonl' line 2: not valid JSON", "one JSON object per line"),
        source("d.jsonl"), {"d.jsonl": jsonl(GOOD) + '{"prompt": "a", "completion": \n' + jsonl(PAIR)}),
    Bad("a broken JSON array", ("prepare",), ("'d.json' line 2: not valid JSON",),
        source("d.json"), {"d.json": '[{"prompt": "a", "completion": "b"},\n {"prompt": "c" "completion": "d"}]\n'}),
    Bad("an empty data file", ("prepare",), ("'d.jsonl' is empty (no rows)",), source("d.jsonl"), {"d.jsonl": ""}),
    Bad("a CSV row with too many fields", ("prepare",), ("'d.csv' line 3: 3 fields where the header has 2",),
        source("d.csv"), {"d.csv": "prompt,completion\nSort 2 1.,1 2\nSort 3 1.,1,3\n"}),
    Bad("a file that mixes formats", ("prepare",), ("'d.jsonl' mixes formats", "row 1", "prompt_completion"),
        source("d.jsonl"), {"d.jsonl": jsonl(PAIR, GOOD)}),
    Bad("a symbolic link loop", ("prepare",), ("'d.jsonl' is a symbolic link that leads to no file",),
        source("d.jsonl"), links={"d.jsonl": "d.jsonl"}),
    Bad("a file name without its extension", ("prepare",), ("'data/rows' not found, but 'data/rows.jsonl' is",),
        source("data/rows"), {"data/rows.jsonl": jsonl(GOOD)}),
    # ------------------------------------------------------------------------------ models of the wrong kind
    Bad("--sft and --reward swapped", ("ppo", "--sft", "models/reward", "--reward", "models/sft"),
        ("--sft 'models/reward' is a sequence classifier (a reward model)", "not a causal LM"), trained=True),
    Bad("chat with the reward model", ("chat", "--model", "models/reward", "--prompt", "hi"),
        ("--model 'models/reward' is a sequence classifier",), trained=True, takes_params=False),
    Bad("truncated model.safetensors", ("chat", "--model", "mine", "--prompt", "hi"),
        ("'mine/model.safetensors' is damaged", "dvc checkout"), files={"mine/.truncated": ""}, trained=True,
        takes_params=False),
    Bad("invalid config.json", ("dpo", "--sft", "mine"), ("'mine/config.json' is not valid JSON at line 2",),
        files={"mine/.broken_config": ""}, trained=True),
    Bad("a model folder one level too high", ("evaluate", "--sft", "mine"), ("'mine' holds no model, but 'mine/actor' does",),
        files={"mine/.nested": ""}, trained=True),
    Bad("model.name_or_path at the base_model placeholder", ("sft",),
        ("'models/base' is the base_model stage's placeholder", "base_model.source"),
        {"model": {"name_or_path": "models/base"}},
        {"models/base/manifest.json": '{"step": "base_model", "versions": {}}\n', "models/base/README.txt": "none\n"}),
    Bad("evaluate through vLLM, whose CPU kernels lack the actor's head size", ("evaluate", "--ppo", "step3"),
        ("evaluate.engine", "head size 16", "set evaluate.engine to another engine"), {"evaluate": {"engine": "vllm"}},
        files={"step3/.nested": ""}, trained=True),
    Bad("evaluate with an engine it does not have", ("evaluate",), ("evaluate.engine", "'generate' or 'vllm'"),
        {"evaluate": {"engine": "vlm"}}),
    Bad("evaluate against a reward model with another tokenizer",
        ("evaluate", "--reward", "other_reward", "--ppo", "step3"), ("tokenizers differ in vocabulary",),
        files={"other_reward/.extra_token": "<extra>", "step3/.nested": ""}, trained=True),
    Bad("no room on the disk for the model", ("sft",), ("no room to write the model 'models/sft'", "1000 bytes free"),
        env={"RLHF_FAULT_FREE_BYTES": "1000"}, trained=True),
    # ------------------------------------------------------------------- CLI usage: one line, with did-you-mean
    Bad("unknown subcommand", ("sfft",), ("No such command 'sfft'", "'sft'"), takes_params=False),
    Bad("misspelt option", ("sft", "--paramz", "p.yaml"), ("No such option: --paramz", "did you mean --params?"),
        takes_params=False),
    Bad("option without its value", ("sft", "--params"), ("'--params' requires an argument",)),
    Bad("extra argument", ("sft", "extra"), ("unexpected extra argument", "extra"), takes_params=False),
    Bad("option value of the wrong type", ("chat", "--max-new-tokens", "many"), ("'--max-new-tokens'",),
        takes_params=False),
    Bad("chat with no tokens to write", ("chat", "--model", "models/sft", "--max-new-tokens", "-1"),
        ("--max-new-tokens -1", "at least 1"), takes_params=False),
    Bad("chat at temperature 0", ("chat", "--model", "models/sft", "--temperature", "0"), ("--temperature 0", "--greedy"),
        takes_params=False),
    Bad("chat with top-p above 1", ("chat", "--model", "models/sft", "--top-p", "1.5"), ("--top-p 1.5", "(0, 1]"),
        takes_params=False),
    Bad("chat with an engine it does not have", ("chat", "--model", "models/sft", "--engine", "vlm"),
        ("--engine vlm", "generate or vllm"), takes_params=False),
]


def arrange(work: Path, bad: Bad, trained: Path | None) -> None:
    """Lay the case out in work: the session's trained outputs if asked, its files, its params."""
    if bad.trained:
        assert trained is not None
        for rel in ("data/prepared", "models/sft", "models/reward"):
            shutil.rmtree(work / rel, ignore_errors=True)
            shutil.copytree(trained / rel, work / rel)
    for rel, content in bad.files.items():
        path = work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".extra_token"):  # a copy of the reward model whose tokenizer gained a token
            from transformers import AutoTokenizer

            shutil.copytree(work / "models/reward", path.parent, dirs_exist_ok=True)
            tok = AutoTokenizer.from_pretrained(path.parent)
            tok.add_tokens([str(content)])
            tok.save_pretrained(path.parent)
        elif rel.endswith((".truncated", ".broken_config", ".nested")):  # copies of the SFT model, damaged
            copy = path.parent / "actor" if rel.endswith(".nested") else path.parent
            shutil.copytree(work / "models/sft", copy, dirs_exist_ok=True)
            for name in ("COMPLETE.json", "manifest.json"):  # a folder of the user's own: no hashes to check
                (copy / name).unlink()
            if rel.endswith(".truncated"):
                weights = copy / "model.safetensors"
                weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
            elif rel.endswith(".broken_config"):
                (copy / "config.json").write_text('{"architectures": [\n')
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    for rel, target in bad.links.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).symlink_to(target)
    with_params(work, bad.params)
    for command in bad.setup:
        run_cli(*command, "--params", "params.yaml", cwd=work)


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=[b.what for b in BAD_INPUTS])
def test_bad_input_is_one_clear_line(work: Path, bad: Bad, request: pytest.FixtureRequest) -> None:
    trained = request.getfixturevalue("trained") if bad.trained else None
    arrange(work, bad, trained)
    args = bad.args if "--params" in bad.args or not bad.takes_params else (*bad.args, "--params", "params.yaml")
    line = fails_cleanly(work, *args, env={**cli_env(), **bad.env} if bad.env else None)
    for text in bad.expect:
        assert text in line, f"{bad.what}: {text!r} not in {line!r}"
    if os.environ.get("BAD_INPUTS_REPORT"):
        with open(os.environ["BAD_INPUTS_REPORT"], "a") as report:
            report.write(f"| {bad.what} | `rlhf {' '.join(args)}` | `{line}` |\n")


def test_the_table_covers_enough_bad_inputs() -> None:
    assert len(BAD_INPUTS) >= 80 and len({b.what for b in BAD_INPUTS}) == len(BAD_INPUTS)
