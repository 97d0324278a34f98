"""docs/params.md is generated from the config classes (rlhf/config/reference.py) and kept current."""

from __future__ import annotations

from pathlib import Path

from rlhf.config import Params
from rlhf.config.reference import _groups, field_comments, reference

DOCS = Path(__file__).resolve().parents[2] / "docs/params.md"


def test_docs_params_md_is_current() -> None:
    assert DOCS.read_text() == reference(), "regenerate it: python -m rlhf.config.reference > docs/params.md"


def test_every_key_of_every_group_is_documented() -> None:
    text = reference()
    for dotted, cls, _ in _groups(Params):
        for name in cls.model_fields:
            assert f"| `{name}` |" in text or f"{dotted}.{name}".lstrip(".") in text, (dotted, name)
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows and all(not line.endswith("|  |") for line in rows), [r for r in rows if r.endswith("|  |")]


def test_comments_above_and_beside_a_field_are_its_doc() -> None:
    from rlhf.config import KLConfig

    notes = field_comments(KLConfig)
    assert notes["clamp"].startswith("the k3 KL loss per token clamped")  # beside it
    assert notes["penalty"].startswith("reward: k1 KL per token in the reward")  # the lines above it
    assert "null = the algorithm's" in notes["penalty"]
