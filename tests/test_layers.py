"""Layers: every import points down. The package's import graph (top-level and function-level imports,
a submodule depending on its package) has no cycle outside the ones listed below, and every module
imports in a fresh interpreter in dependency order."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

PKG = Path(__file__).resolve().parent.parent / "selflabel"
SCRIPTS = {"selflabel.__main__", "selflabel.review.app_main"}  # entry points: importing them runs the CLI or the app
# cycles other work in progress removes (issue 12, parts not in the clustering layer); none may grow
KNOWN_CYCLES: list[set[str]] = []  # none left; none may come back


# docs/ARCHITECTURE.md's layers; a module may import its own layer or lower ones. Longest prefix wins;
# modules not listed (new ones from other work) are not checked here until they are placed.
LAYERS = {
    "selflabel": 6, "selflabel.cli": 6, "selflabel.__main__": 6, "selflabel.review.app_main": 6,
    "selflabel.api": 5, "selflabel.run": 5, "selflabel.assign": 5, "selflabel.pipeline": 5, "selflabel.evaluate": 5,
    "selflabel.review": 5, "selflabel.export": 5, "selflabel.dense.pipeline": 5, "selflabel.dense.evaluate": 5,
    "selflabel.methods": 4, "selflabel.method_estimator": 4, "selflabel.train": 4, "selflabel.curate": 4,
    "selflabel.data": 3, "selflabel.backbones": 3, "selflabel.ensemble": 3, "selflabel.features": 3, "selflabel.digests": 3,
    "selflabel.dense": 3, "selflabel.geometry_io": 3, "selflabel.sample": 3, "selflabel.kselect_io": 3,
    "selflabel.ot": 2, "selflabel.kmeans": 2, "selflabel.cluster": 2,
    "selflabel.estimators": 2, "selflabel.geometry": 2, "selflabel.metrics": 2,
    "selflabel.marginals": 2, "selflabel.imbalanced": 2, "selflabel.kselect": 2, "selflabel.default_clustering": 2,
    "selflabel.errors": 1, "selflabel.atomic": 1, "selflabel.result": 1, "selflabel.config": 1,
    "selflabel.runfiles": 1, "selflabel.rundir": 1, "selflabel.devices": 1, "selflabel.precision": 1,
    "selflabel.naming": 1, "selflabel.suggest": 3, "selflabel.neighbors": 2, "selflabel.engine": 3, "selflabel.distributed": 1, "selflabel.progress": 1,
}


def layer(mod: str) -> int | None:
    # the package itself ("selflabel") is a layer of its own, not a prefix for every module
    best = max((p for p in LAYERS if mod == p or (p != "selflabel" and mod.startswith(p + "."))), key=len, default=None)
    return LAYERS.get(best) if best is not None else None


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom | ast.Import, known: set[str]) -> list[tuple[str, bool]]:
    """Package modules named by one import statement."""
    names = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = mod if is_pkg else mod.rsplit(".", 1)[0]
        if node.level:
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            target = f"{base}.{node.module}" if node.module else base
        else:
            target = node.module or ""
        names = [target] + [f"{target}.{a.name}" for a in node.names]
    return [(n, True) for n in names if n in known]


def import_graph(with_functions: bool = True) -> tuple[nx.DiGraph, dict[str, list[str]]]:
    """Edges module -> module it imports; also the function-level package imports of each module."""
    mods = modules()
    known = set(mods)
    g = nx.DiGraph()
    g.add_nodes_from(known)
    inner: dict[str, list[str]] = {}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        parent = mod.rsplit(".", 1)[0]
        if parent != mod and parent in known:
            g.add_edge(mod, parent)  # importing a submodule runs its package first
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = set(id(n) for n in tree.body)
        guarded = {id(n) for s in tree.body if isinstance(s, ast.If) and "TYPE_CHECKING" in ast.unparse(s.test)
                   for n in ast.walk(s)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in guarded:
                continue
            # a package importing its own submodules is not a cycle with their implicit import of it
            targets = [t for t, _ in _resolve(mod, is_pkg, node, known) if t != mod and not t.startswith(mod + ".")]
            if id(node) not in top:
                inner.setdefault(mod, []).extend(targets)
                if not with_functions:
                    continue
            g.add_edges_from((mod, t) for t in targets)
    return g, inner


def test_no_import_cycles_beyond_the_known_ones():
    g, _ = import_graph(with_functions=True)
    cycles = [c for c in nx.strongly_connected_components(g) if len(c) > 1]
    for c in cycles:
        assert any(c <= k for k in KNOWN_CYCLES), f"import cycle: {sorted(c)}"
    clustering = {"selflabel.cluster", "selflabel.kmeans", "selflabel.geometry", "selflabel.geometry_io",
                  "selflabel.methods", "selflabel.result", "selflabel.train.sela", "selflabel.train.swav",
                  "selflabel.dense.parts", "selflabel.assign", "selflabel.run", "selflabel.api", "selflabel.estimators",
                  "selflabel.method_estimator"}
    assert not any(c & clustering for c in cycles)


def test_every_top_level_import_points_down():
    g, _ = import_graph(with_functions=False)
    up = [(a, b) for a, b in g.edges if a != "selflabel" and not a.startswith(b + ".")
          and None not in (layer(a), layer(b)) and layer(b) > layer(a)]
    assert not up, f"imports pointing up a layer: {up}"


def test_clustering_layer_imports_nothing_inside_functions_but_third_party():
    _, inner = import_graph()
    for mod in ("selflabel.cluster", "selflabel.kmeans", "selflabel.geometry", "selflabel.methods",
                "selflabel.train.sela", "selflabel.train.swav", "selflabel.dense.parts", "selflabel.assign",
                "selflabel.run", "selflabel.api", "selflabel.estimators", "selflabel.result", "selflabel.geometry_io"):
        assert not inner.get(mod), f"{mod} imports {inner[mod]} inside a function"


def test_every_module_imports_in_dependency_order_in_a_fresh_interpreter():
    g, _ = import_graph(with_functions=False)
    assert nx.is_directed_acyclic_graph(g), nx.find_cycle(g)
    order = [m for m in reversed(list(nx.topological_sort(g))) if m not in SCRIPTS]  # dependencies first
    code = ("import importlib, sys\n"
            f"for m in {order!r}:\n"
            "    importlib.import_module(m)\n"
            "print(len(sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=PKG.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert order.index("selflabel.result") < order.index("selflabel.cluster") < order.index("selflabel.methods")
    assert order.index("selflabel.methods") < order.index("selflabel.pipeline") < order.index("selflabel.api")


def test_pyflakes_is_clean():
    pytest.importorskip("pyflakes")
    proc = subprocess.run([sys.executable, "-m", "pyflakes", str(PKG)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]
