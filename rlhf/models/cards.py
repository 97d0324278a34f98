"""Model cards: every model folder a stage writes gets a README.md in Hugging Face's model-card format (a YAML
header that `huggingface_hub.ModelCard` loads and the hub shows, then how the model was made, from its manifest).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_WHAT = {
    "base_model": "the pretrained model the pipeline starts from",
    "sft": "the actor after supervised fine-tuning on demonstrations (step 1)",
    "reward": "the reward model trained on preference pairs (step 2): a one-label sequence classifier",
    "dpo": "the SFT actor trained with DPO on the preference pairs (step 2, the alternative to a reward model)",
    "ppo": "the actor (or critic) after RL against the reward (step 3)",
}


def _hub_id(name: Any) -> str | None:
    """A hub model id (owner/name that is not a local folder), else None."""
    if not isinstance(name, str) or name.count("/") != 1 or Path(name).exists() or name.startswith((".", "/", "~")):
        return None
    return name


def _cell(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    return text.replace("|", "\\|")


def model_card(folder: Path, manifest: dict[str, Any], name: str | None = None) -> str:
    """The README.md text of the model folder `folder` (to be known as `name`, its final path): header (library_name,
    pipeline_tag, tags, base_model and datasets where the params name hub ids), then the stage, its params groups,
    metrics and input hashes."""
    from huggingface_hub import ModelCard, ModelCardData

    step = str(manifest.get("step", "?"))
    params = manifest.get("params", {})
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    archs = config.get("architectures") or []
    classifier = any(a.endswith("ForSequenceClassification") for a in archs)
    algorithm = (params.get("ppo") or {}).get("algorithm") if step == "ppo" else None
    model_group = params.get("reward_model" if step == "reward" else "model") or {}
    sources = [s.get("path") for s in (params.get("data") or {}).get("sources", []) if isinstance(s, dict)]
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-classification" if classifier else "text-generation",
        tags=["rlhf", "rlhf-dvc", "dvc", step, *([algorithm] if algorithm else []),
              "reward-model" if classifier else "causal-lm"],
        base_model=_hub_id(model_group.get("name_or_path")) or _hub_id((params.get("base_model") or {}).get("source")),
        datasets=[s for s in sources if _hub_id(s)] or None,
    )
    name = name or str(folder)
    lines = [
        f"# {name}: {_WHAT.get(step, step)}",
        "",
        f"Written by the `{step}` stage of rlhf-dvc (InstructGPT's three steps, each a DVC stage)"
        + (f", algorithm `{algorithm}`" if algorithm else "") + f"; architecture {', '.join(archs) or 'unknown'}, "
        f"seed {manifest.get('seed')}, {manifest.get('world_size')} rank(s).",
        "",
        "## Load it",
        "",
        "```python",
        f"from transformers import {'AutoModelForSequenceClassification' if classifier else 'AutoModelForCausalLM'}"
        ", AutoTokenizer",
        f"model = {'AutoModelForSequenceClassification' if classifier else 'AutoModelForCausalLM'}"
        f".from_pretrained(\"{name}\")",
        f"tok = AutoTokenizer.from_pretrained(\"{name}\")",
        "```",
    ]
    metrics = {k: v for k, v in (manifest.get("metrics") or {}).items() if not isinstance(v, (dict, list))}
    if metrics:
        lines += ["", "## Metrics (at the end of the stage)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {_cell(v)} |" for k, v in metrics.items()]
    for group, values in params.items():
        if isinstance(values, dict):
            lines += ["", f"## params.yaml `{group}`", "", "| key | value |", "|---|---|"]
            lines += [f"| {k} | {_cell(v)} |" for k, v in values.items()]
    if manifest.get("inputs"):
        lines += ["", "## Inputs (sha256)", "", "| input | sha256 |", "|---|---|"]
        lines += [f"| {k} | `{v}` |" for k, v in manifest["inputs"].items()]
    versions = manifest.get("versions") or {}
    if versions:
        lines += ["", "Packages: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "."]
    return str(ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines) + "\n"))
