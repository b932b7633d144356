"""The package's layers: imports go one way (cli → sweeps, viz → studies → methods, stats → run → core;
store just above core), no module imports in a cycle, and no module grows past ~400 lines. Read from the source (every import statement,
also those inside functions), so an upward import anywhere fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "knlens"
MAX_LINES = 400

# The layers each layer may import from (itself included). `results` and `data` sit just above `core`
# so that every layer can hold results and read data; `stats` never reads methods. `store` (the results
# store) files results and knows no study; `sweeps` runs studies over data sets into a store.
BELOW = {
    "core": {"core"},
    "results": {"core", "results"},
    "data": {"core", "data"},
    "store": {"core", "results", "store"},
    "run": {"core", "results", "run"},
    "stats": {"core", "results", "stats"},
    "methods": {"core", "results", "data", "run", "stats", "methods"},
    "studies": {"core", "results", "data", "run", "stats", "methods", "studies"},
    "sweeps": {"core", "results", "data", "store", "run", "stats", "methods", "studies", "sweeps"},
    "viz": {"core", "results", "data", "store", "run", "stats", "methods", "studies", "viz"},
    "cli": {"core", "results", "data", "store", "run", "stats", "methods", "studies", "sweeps", "viz", "cli"},
}
FACADE = {"knlens", "knlens.__main__"}  # the public re-exports and `python -m knlens`


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Every knlens module ``name`` imports (absolute or relative, at any depth of the file)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "knlens"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "knlens":
                continue
            found.add(module)
            found |= {f"{module}.{a.name}" for a in node.names}  # `from knlens.run import staircase`
    return found


def _resolve(imported: str, modules: dict[str, Path]) -> str | None:
    while imported and imported not in modules:
        imported = imported.rpartition(".")[0]
    return imported or None


def _layer(name: str) -> str:
    return name.split(".")[1]


MODULES = _modules()
GRAPH = nx.DiGraph()
for _name, _path in MODULES.items():
    GRAPH.add_node(_name)
    for _imp in _imports(_name, _path):
        _target = _resolve(_imp, MODULES)
        if _target and _target != _name:
            GRAPH.add_edge(_name, _target)


def test_every_module_belongs_to_a_layer():
    assert set(MODULES) - FACADE, "no modules found"
    assert {_layer(m) for m in set(MODULES) - FACADE} <= set(BELOW)


def test_imports_only_go_down():
    upward = [f"{a} imports {b}" for a, b in GRAPH.edges
              if a not in FACADE and (b in FACADE or _layer(b) not in BELOW[_layer(a)])]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles():
    cycles = [c for c in nx.strongly_connected_components(GRAPH) if len(c) > 1]
    package_inits = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    # a package's __init__ re-exporting its own submodules is not a design cycle
    cycles = [c for c in cycles if not all(m in package_inits or any(m.startswith(i + ".") for i in c & package_inits)
                                           for m in c)]
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_small(name):
    n = len(MODULES[name].read_text().splitlines())
    assert n <= MAX_LINES, f"{name} has {n} lines (more than {MAX_LINES}): split it by what its parts do"


def test_the_checker_sees_an_upward_import(tmp_path):
    """The graph reads relative and in-function imports: a fake run-layer module importing a study is caught."""
    path = tmp_path / "engine.py"
    path.write_text("def f():\n    from ..studies.knowledge_neurons import locate\n")
    found = {_resolve(i, MODULES) for i in _imports("knlens.run.engine", path)}
    assert "knlens.studies.knowledge_neurons" in found
    assert _layer("knlens.studies.knowledge_neurons") not in BELOW["run"]
