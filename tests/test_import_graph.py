"""The package's import graph has no cycle, counting imports inside functions too (none may hide a cycle), and
the leaf modules import nothing of the stages above them.

The graph is read from the source with :mod:`ast`, so an import is seen whether or not it runs: ``import a.b`` and
``from a import b`` give an edge to ``a.b`` when that is a module, else to ``a`` (its ``__init__``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qk_sniffer"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    here = module.split(".")
    is_package = MODULES[module].name == "__init__.py"
    base = here if is_package else here[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str) -> set[str]:
    """The package modules ``module`` imports anywhere in its source."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names]
        else:
            continue
        found |= {n for n in names if n in MODULES and n != module}
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    graph = {m: imports_of(m) for m in MODULES}
    assert _cycles(graph) == []


@pytest.mark.parametrize("leaf", ["qk_sniffer.store", "qk_sniffer.records", "qk_sniffer.layout", "qk_sniffer.config",
                                  "qk_sniffer.errors", "qk_sniffer.front_matter", "qk_sniffer.sampling"])
def test_leaf_modules_import_no_stage(leaf):
    stages = ("qk_sniffer.merge", "qk_sniffer.card", "qk_sniffer.report", "qk_sniffer.verify", "qk_sniffer.remote",
              "qk_sniffer.chunk", "qk_sniffer.cli", "qk_sniffer.sweep")
    assert not {m for m in imports_of(leaf) if m.startswith(stages)}


def test_the_graph_reader_sees_function_level_imports(tmp_path):
    # the reader itself: a cycle hidden in a function is still a cycle
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert "qk_sniffer.merge" in imports_of("qk_sniffer.sweep_stages")  # imported inside functions there


@pytest.mark.parametrize("below", ["qk_sniffer.store", "qk_sniffer.report", "qk_sniffer.merge", "qk_sniffer.legacy"])
def test_the_card_is_imported_by_nothing_it_builds_on(below):
    """The card (``qk_sniffer.card``) draws on these; none of their modules imports it back."""
    modules = [m for m in MODULES if m == below or m.startswith(below + ".")]
    assert modules
    assert not {m for mod in modules for m in imports_of(mod) if m == "qk_sniffer.card" or m.startswith("qk_sniffer.card.")}
