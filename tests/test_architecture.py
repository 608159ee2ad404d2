"""The house's one-way rules (issue 11), read from the source with ``ast`` so that no import can hide:
imports inside functions, under ``TYPE_CHECKING``, relative ones and ``importlib.import_module("...")``
with a literal name all count.

- a compressor never imports the experiment (it gets a ``CompressionContext``);
- the model and data layers never import ``compression/`` (the head-pruned checkpoint format and the
  architecture lookups live in ``models/``)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGE = REPO / "subgroup_robustness"

RULES = [
    # (folder whose modules are checked, module it must not import, why)
    ("compression", "subgroup_robustness.experiment", "a compressor gets a CompressionContext, not the run"),
    ("models", "subgroup_robustness.compression", "the model layer must not know the compressors"),
    ("data", "subgroup_robustness.compression", "the data layer must not know the compressors"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, wherever it sits. ``from a import b``
    yields both ``a`` and ``a.b`` (b may be a submodule)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y / from .. import experiment
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            out += [(node.lineno, f"{mod}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr in ("import_module", "__import__"))
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            out.append((node.lineno, node.args[0].value))
    return out


def violations(folder: str, forbidden: str) -> list[str]:
    found = []
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        for line, mod in imported_modules(path):
            if mod == forbidden or mod.startswith(forbidden + "."):
                found.append(f"{path.relative_to(REPO)}:{line} imports {mod}")
    return found


@pytest.mark.parametrize("folder, forbidden, why", RULES, ids=[f"{f}-not-{m.split('.')[-1]}" for f, m, _ in RULES])
def test_one_way_imports(folder, forbidden, why):
    assert (PACKAGE / folder).is_dir()
    assert list((PACKAGE / folder).rglob("*.py")), f"no modules under {folder}/"
    bad = violations(folder, forbidden)
    assert not bad, f"{why}:\n" + "\n".join(bad)


def test_the_checker_sees_hidden_imports(tmp_path, monkeypatch):
    """Imports inside functions, under TYPE_CHECKING, relative and through importlib are all found."""
    pkg = tmp_path / "subgroup_robustness"
    (pkg / "compression").mkdir(parents=True)
    (pkg / "models").mkdir()
    (pkg / "compression" / "a.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from subgroup_robustness.experiment import RunContext\n")
    (pkg / "compression" / "b.py").write_text("def f():\n    from .. import experiment\n")
    (pkg / "compression" / "c.py").write_text("from ..experiment import run\n")
    (pkg / "compression" / "d.py").write_text("import importlib\nX = importlib.import_module('subgroup_robustness.experiment')\n")
    (pkg / "compression" / "ok.py").write_text("from subgroup_robustness.experiments_log import x\nimport subgroup_robustness.models\n")
    (pkg / "models" / "m.py").write_text("def g():\n    import subgroup_robustness.compression.pruning as p\n")
    (pkg / "models" / "n.py").write_text("from subgroup_robustness import compression\n")
    this = sys.modules[__name__]
    monkeypatch.setattr(this, "REPO", tmp_path)
    monkeypatch.setattr(this, "PACKAGE", pkg)
    bad = violations("compression", "subgroup_robustness.experiment")
    assert sorted({b.split(":")[0].rsplit("/", 1)[-1] for b in bad}) == ["a.py", "b.py", "c.py", "d.py"], bad
    bad = violations("models", "subgroup_robustness.compression")
    assert sorted({b.split(":")[0].rsplit("/", 1)[-1] for b in bad}) == ["m.py", "n.py"], bad
