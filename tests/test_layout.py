"""The shape of the library: module and function sizes, and imports that flow one way.

Layers, lowest first (docs/style.md): the shared leaves (errors, config, schema, data, task,
plots), then ``gedi/`` <- ``logic/`` <- ``shortcuts/`` <- ``train/`` <- ``bench/`` <- ``cli``.
A module may import its own layer and the layers below it, never one above; only the CLI
imports ``tasks`` (lazily, to resolve a task by name); only ``logic/`` imports deepproblog,
problog or pysdd at run time (type-only imports under ``if TYPE_CHECKING:`` are allowed
anywhere).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "gedi_nesy"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
LAYERS = {
    "errors": 0, "config": 0, "schema": 0, "data": 0, "task": 0, "plots": 0, "files": 0,
    "gedi": 1, "logic": 2, "shortcuts": 3, "train": 4, "bench": 5,
    "cli": 6, "__main__": 6, "__init__": 6,
}  # fmt: skip
LOGIC_ONLY = ("deepproblog", "problog", "pysdd")
MODULES = sorted(ROOT.rglob("*.py"))


def _layer(module: str) -> int:
    """Layer of a dotted module name inside gedi_nesy (``gedi_nesy.logic.dpl`` -> 2)."""
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else "__init__"]


def _dotted(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    return ".".join(rel.parts)


def _runtime_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, module) of every import outside ``if TYPE_CHECKING:`` blocks."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_and_functions_are_short(path: Path) -> None:
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{path.name}: split the module"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{path.name}:{node.lineno} {node.name}: {length}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_flow_one_way(path: Path) -> None:
    me = _dotted(path)
    for line, module in _runtime_imports(ast.parse(path.read_text())):
        top = module.split(".")[0]
        if top == "tasks":  # only the CLI resolves tasks, by name, lazily
            assert me == "gedi_nesy.cli", f"{me}:{line} imports {module}: only the CLI may"
        if top in LOGIC_ONLY:
            assert me.startswith("gedi_nesy.logic."), f"{me}:{line} imports {module}"
        if top == "gedi_nesy" and module != "gedi_nesy":
            assert _layer(module) <= _layer(me), f"{me}:{line} imports {module}, a higher layer"
