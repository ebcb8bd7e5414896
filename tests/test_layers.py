"""Layers point one way: the imports between stimpute's parts form no cycle.

A part is a top-level module (`stimpute/benchmark.py`) or a subpackage (`stimpute/models/`).
Imports inside functions (deferred, for start-up time) count like module-level ones: a
deferred import still ties the two parts together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

import stimpute

SRC = Path(stimpute.__file__).parent
LEAVES = ("stimpute.metrics", "stimpute.trainer", "stimpute.threads", "stimpute.errors", "stimpute.combine", "stimpute.defaults", "stimpute.files")


def part(module: str) -> str:
    return ".".join(module.split(".")[:2])


def stimpute_imports(path: Path) -> set[str]:
    """stimpute modules that `path` imports, at module level or inside functions and classes."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {m for m in found if m == "stimpute" or m.startswith("stimpute.")}


def import_graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    for path in SRC.rglob("*.py"):
        me = part(".".join(("stimpute", *path.relative_to(SRC).with_suffix("").parts)))
        graph.add_node(me)
        for target in stimpute_imports(path):
            if part(target) != me and target != "stimpute":
                graph.add_edge(me, part(target), file=str(path.relative_to(SRC)))
    return graph


def test_no_import_cycles_between_parts():
    graph = import_graph()
    cycles = list(nx.simple_cycles(graph))
    described = [" -> ".join(c + [c[0]]) + " (" + ", ".join(graph.edges[a, b]["file"] for a, b in zip(c, c[1:] + c[:1])) + ")"
                 for c in cycles]
    assert not cycles, "import cycles:\n" + "\n".join(described)


def test_leaves_import_no_other_part():
    graph = import_graph()
    for leaf in LEAVES:  # a leaf may raise stimpute's errors, and import nothing else of it
        assert set(graph.successors(leaf)) <= {"stimpute.errors"}, (leaf, list(graph.successors(leaf)))


def test_the_cycle_check_sees_a_cycle():
    graph = import_graph()
    graph.add_edge("stimpute.metrics", "stimpute.benchmark", file="(test)")
    assert list(nx.simple_cycles(graph))


def test_no_module_imports_another_modules_private_names():
    private = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stimpute"):
                private += [f"{path.relative_to(SRC)}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not private, "make these public or keep them in their module:\n" + "\n".join(private)


def test_function_level_imports_count(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from stimpute.benchmark import run_benchmark\n")
    assert stimpute_imports(source) == {"stimpute.benchmark"}
