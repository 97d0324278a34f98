"""DVC sees every code change that changes a result: each stage's `deps` in dvc.yaml list exactly the project's
Python files that the stage's command can run, its import closure.

The closure starts at the stage's command module (`rlhf sft` -> stages/sft.py) and follows every import of a project
module, at module level and inside functions (a superset of what one run executes), plus stages/cli.py, which
dispatches to it. Not followed: stages/cli.py's own imports (the sibling command modules only define other
commands), `if TYPE_CHECKING:` blocks and a package's lazy PEP 562 `__getattr__` (rlhf/__init__.py loads rlhf.rl.trainer
only when a user names rlhf.RLTrainer; no stage does).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

PACKAGES = ("rlhf", "stages")
IMPORT_STRING = re.compile(r"^(rlhf|stages)(\.\w+)+:\w+$")


def _imported_names(tree: ast.Module) -> set[str]:
    """Dotted names a module may import: `import a.b`, `from a import b` (b may be a module: a.b)."""
    skip: set[int] = set()
    for node in tree.body:
        lazy_getattr = isinstance(node, ast.FunctionDef) and node.name == "__getattr__"
        type_checking = isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
        if lazy_getattr or type_checking:
            skip |= {id(n) for n in ast.walk(node)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and IMPORT_STRING.match(node.value):
            names.add(node.value.split(":")[0])  # "module:Class" imported by name (the rollout ENGINES)
    return names


def _module_file(root: Path, dotted: str) -> Path | None:
    path = root.joinpath(*dotted.split("."))
    return next((p for p in (path.with_suffix(".py"), path / "__init__.py") if p.is_file()), None)


def import_closure(root: Path, start: Path) -> set[Path]:
    """Every project file `start` imports, directly or through another (its packages' __init__.py included)."""
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imported_names(ast.parse(path.read_text())):
            parts = name.split(".")
            if parts[0] not in PACKAGES:
                continue
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py too
                found = _module_file(root, ".".join(parts[:i]))
                if found is not None:
                    todo.append(found)
    return seen


def stage_code(root: Path, cmd: str) -> set[str]:
    """The project files that `rlhf <subcommand> ...` can run, relative to root."""
    words = cmd.split()
    assert words[0] == "rlhf", cmd
    command_module = root / "stages" / f"{words[1].replace('-', '_')}.py"
    files = import_closure(root, command_module) | {root / "stages/cli.py", root / "stages/__init__.py"}
    return {str(p.relative_to(root)) for p in files}


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_are_its_import_closure(name: str) -> None:
    stage = STAGES[name]
    deps = [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]
    listed = {d for d in deps if d.split("/")[0] in PACKAGES}
    needed = stage_code(ROOT, stage["cmd"])
    missing, extra = sorted(needed - listed), sorted(listed - needed)
    assert not missing and not extra, (
        f"dvc.yaml stage {name!r}: deps miss {missing} and list {extra} that it never imports; "
        f"its code deps are: {sorted(needed)}"
    )
    produced = {o if isinstance(o, str) else next(iter(o)) for s in STAGES.values() for o in s.get("outs", [])}
    for dep in deps:  # a dep no stage writes must be in the repository
        assert dep in produced or (ROOT / dep).exists(), f"dvc.yaml stage {name!r} depends on missing {dep!r}"


def test_closure_follows_function_level_imports(tmp_path: Path) -> None:
    """The rule itself, on a made-up package: an import inside a function counts, a lazy __getattr__ and a
    TYPE_CHECKING block do not."""
    pkg = tmp_path / "rlhf"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from rlhf.c import C\n"
        "def __getattr__(name):\n    from rlhf import c\n    return getattr(c, name)\n"
    )
    (pkg / "a.py").write_text("import os\n\ndef f():\n    from rlhf.b import g\n    return g()\n")
    (pkg / "b.py").write_text("from rlhf import config\n")
    (pkg / "config.py").write_text("")
    (pkg / "c.py").write_text("")
    got = {str(p.relative_to(tmp_path)) for p in import_closure(tmp_path, pkg / "a.py")}
    assert got == {"rlhf/a.py", "rlhf/b.py", "rlhf/config.py", "rlhf/__init__.py"}


def test_importing_a_step_module_does_not_load_ppo() -> None:
    """rlhf/__init__.py is lazy: `import rlhf.training.sft` must not run rlhf/rl/trainer.py (else every stage depends on it),
    while `from rlhf import RLTrainer` still works."""
    import subprocess
    import sys

    code = "import sys, rlhf.training.sft; assert 'rlhf.rl.trainer' not in sys.modules; from rlhf import RLTrainer; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


MARKER = "      # the stage's code: its import closure (tests/pipeline/test_dvc_deps.py checks this list)\n"


def rewrite_code_deps(dvc_yaml: Path) -> None:
    """Replace every stage's code deps in dvc.yaml with its import closure, keeping the other deps and comments
    (`python -m tests.pipeline.test_dvc_deps` after changing imports)."""
    import re

    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    lines, out, stage, i = dvc_yaml.read_text().splitlines(keepends=True), [], None, 0
    while i < len(lines):
        line = lines[i]
        if found := re.match(r"^  (\w+):", line):
            stage = found.group(1)
        out.append(line)
        i += 1
        if line.strip() != "deps:":
            continue
        while i < len(lines) and lines[i].startswith("      ") and lines[i].strip()[:1] in ("-", "#"):
            item = lines[i].strip()
            code = item.startswith("- ") and item[2:].split()[0].split("/")[0] in PACKAGES
            if not code and item != MARKER.strip():  # other deps and their comments stay
                out.append(lines[i])
            i += 1
        out.append(MARKER)
        out += [f"      - {f}\n" for f in sorted(stage_code(dvc_yaml.parent, stages[stage]["cmd"]))]
    dvc_yaml.write_text("".join(out))


if __name__ == "__main__":
    rewrite_code_deps(ROOT / "dvc.yaml")
