"""The package's imports flow one way (issue 13): no import cycle between ``streamexec``'s modules,
and no module imports a later stage of the data flow

    base (errors, sizes, configs, the root package) → kernels → weights → models → planner
    → runtime → pipelines → top (api, run, cli)

The graph is read from the source with ``ast`` (nothing is imported): every ``import`` and
``from … import`` anywhere in a module — function-local ones included, relative ones resolved —
except those under ``if TYPE_CHECKING:`` (never run). ``kernels`` sits below ``weights`` because
the weight store decodes with ``kernels.decode``; kernels themselves import no other layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "streamexec"

#: Layers from the bottom; a module may import its own layer and the ones before it.
LAYERS = ("base", "kernels", "weights", "models", "planner", "runtime", "api", "pipelines", "top")

#: The layer of each top-level module or subpackage of ``streamexec`` (a new one must be added).
LAYER_OF = {
    "": "base",  # the root package: __version__ and the lazy ``streamexec.load`` (see FACADE)
    "errors": "base",
    "sizes": "base",
    "configs": "base",
    "memlimit": "base",
    "kernels": "kernels",
    "weights": "weights",
    "models": "models",
    "planner": "planner",
    "runtime": "runtime",
    "pipelines": "pipelines",
    # the streamed models (``load``): built on the planner and the runtime, used by the pipelines
    "api": "api",
    "run": "top",
    "cli": "top",
    "__main__": "top",
}

#: Not edges: ``streamexec.__getattr__`` imports the API only when ``streamexec.load`` is read (so
#: that ``import streamexec`` stays light); the root package is imported before any of its
#: modules anyway, so this hook orders nothing.
FACADE = {("streamexec", "streamexec.api")}

#: Known edges that still break the rules (none since issue 13; an entry that no longer exists in
#: the code fails the test, so the list cannot go stale).
KNOWN: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node, skipping the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _target(name: str) -> str | None:
    """The package module ``name`` refers to: itself, else its closest existing parent."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _edges_of(mod: str, path: Path) -> set[str]:
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in _imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                pkg = ".".join(base + ([node.module] if node.module else []))
            else:
                pkg = node.module or ""
            # ``from pkg import name``: the submodule pkg.name if there is one, else pkg itself
            names = [f"{pkg}.{a.name}" if f"{pkg}.{a.name}" in MODULES else pkg for a in node.names]
        for n in names:
            if n == "streamexec" or n.startswith("streamexec."):
                t = _target(n)
                if t is not None and t != mod and (mod, t) not in FACADE:
                    out.add(t)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports."""
    return {m: _edges_of(m, p) for m, p in MODULES.items()}


def _layer(mod: str) -> str:
    top = mod.split(".")[1] if "." in mod else ""
    if top not in LAYER_OF:
        pytest.fail(f"{mod}: give streamexec.{top} a layer in LAYER_OF (tests/test_imports.py)")
    return LAYER_OF[top]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _without_known(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {m: {t for t in ts if (m, t) not in KNOWN} for m, ts in graph.items()}


def test_graph_is_read() -> None:
    """The walker sees relative, absolute, function-local and package imports, and skips
    ``TYPE_CHECKING`` blocks (checked on edges the code has today)."""
    g = import_graph()
    assert "streamexec.planner.schedule" in g["streamexec.runtime.executor"]  # relative, module level
    assert "streamexec.kernels.decode" in g["streamexec.weights.store"]  # function-local
    assert "streamexec.kernels.buffers" in g["streamexec.kernels.conv"]  # absolute ``from pkg import mod``
    assert "streamexec" in g["streamexec.planner.plan"]  # ``from .. import __version__``
    assert "streamexec.runtime.ops" not in g["streamexec.runtime.ops_transformer"]  # TYPE_CHECKING only
    assert "streamexec.runtime.ops_transformer" in g["streamexec.runtime.ops"]


def test_no_import_cycle() -> None:
    cycles = _cycles(_without_known(import_graph()))
    assert not cycles, "import cycles between streamexec modules:\n" + "\n".join(" ↔ ".join(c) for c in cycles)


def _upward(graph: dict[str, set[str]]) -> list[str]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    return [f"{m} ({_layer(m)}) imports {t} ({_layer(t)})"
            for m, ts in sorted(graph.items()) for t in sorted(ts) if rank[_layer(t)] > rank[_layer(m)]]


def test_imports_follow_the_layers() -> None:
    bad = _upward(_without_known(import_graph()))
    assert not bad, "imports against the data flow " + " → ".join(LAYERS) + ":\n" + "\n".join(bad)


def test_known_exceptions_still_exist() -> None:
    """Each allowed edge is still in the code; once fixed it must leave ``KNOWN``."""
    g = import_graph()
    gone = [f"{a} → {b}" for a, b in KNOWN if b not in g.get(a, ())]
    assert not gone, "fixed, now remove from KNOWN in tests/test_imports.py: " + ", ".join(gone)


def test_detects_a_cycle_and_an_upward_import() -> None:
    """The checks catch what they are for: the planner importing the runtime back (the cycle
    this issue removed) shows as both."""
    g = _without_known(import_graph())
    g["streamexec.planner.schedule"].add("streamexec.runtime.executor")
    assert any({"streamexec.planner.schedule", "streamexec.runtime.executor"} <= set(c) for c in _cycles(g))
    assert "streamexec.planner.schedule (planner) imports streamexec.runtime.executor (runtime)" in _upward(g)


def test_no_test_module_imports_another() -> None:
    """Shared test code lives in helper modules (``helpers.py``, ``outside_memory.py`` …), never in a
    ``test_*.py`` that another test imports (issue 13)."""
    bad = []
    for path in sorted((PKG.parent / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            bad += [f"{path.name} imports {n}" for n in names if n.split(".")[0].startswith("test_")]
    assert not bad, "\n".join(bad)
