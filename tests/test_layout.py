"""The shape of the library, held to what README.md says of it: its Layout section names every folder of rlhf/
and only modules that exist, no module passes 400 lines, and a module imports only downwards (config and errors
import nothing else of rlhf; no folder imports stages)."""

from __future__ import annotations

import ast
import re

import pytest

from tests.conftest import ROOT

LIB = ROOT / "rlhf"
MAX_LINES = 400


def _layout() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Layout\n") :]
    return section[section.index("```") : section.index("```", section.index("```") + 3)]


def test_readme_layout_names_every_folder_and_only_real_modules() -> None:
    layout = _layout()
    folders = sorted(p.name for p in LIB.iterdir() if p.is_dir() and (p / "__init__.py").is_file())
    missing = [f for f in folders if not re.search(rf"^  {f}/", layout, re.M)]
    assert not missing, f"README.md's Layout misses rlhf/ folders {missing}"
    named: list[tuple[str, str]] = []  # (folder, module) for every `name.py` in a folder's lines
    folder = ""
    for line in layout.splitlines():
        if found := re.match(r"^  (\w+)/", line):
            folder = found.group(1)
        elif re.match(r"^\S", line):
            folder = ""
        named += [(folder, m) for m in re.findall(r"(?<![\w/])([\w/]+)\.py\b", line)]  # environments/base.py too
    gone = [f"rlhf/{f}/{m}.py" if f else f"rlhf/{m}.py" for f, m in named
            if not (LIB / f / f"{m}.py").is_file()]
    assert not gone, f"README.md's Layout names modules that do not exist: {gone}"


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in LIB.rglob("*.py")))
def test_no_module_passes_400_lines(path: str) -> None:
    lines = len((ROOT / path).read_text().splitlines())
    assert lines <= MAX_LINES, f"{path} has {lines} lines: split it by concern (README.md's Layout)"


def _rlhf_imports(path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
    return {n for n in names if n.split(".")[0] in ("rlhf", "stages")}


def test_imports_run_downwards() -> None:
    """config/ and errors.py are the floor: they import nothing of rlhf but each other; no library module
    imports the CLI."""
    wrong = []
    for path in LIB.rglob("*.py"):
        rel = path.relative_to(LIB).as_posix()
        for name in _rlhf_imports(path):
            if name.startswith("stages"):
                wrong.append(f"{rel} imports {name}")
            if (rel.startswith("config/") or rel == "errors.py") and not (
                    name.startswith("rlhf.config") or name == "rlhf.errors"):
                wrong.append(f"{rel} imports {name}")
    assert not wrong, wrong


def test_the_earlier_class_names_still_import() -> None:
    """`ppo.trainer` subclasses written against DeepSpeed-Chat's names keep working."""
    import rlhf

    assert rlhf.PPOTrainer is rlhf.RLTrainer and rlhf.RLHFEngine is rlhf.RLModels
