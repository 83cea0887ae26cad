"""The modules of ``polystore/backends/sql`` import each other top down, never back up.

``backend.py`` is the façade: nothing below it imports it (only the package's
``__init__``, and ``reopen``, which rebuilds backends from pickles), and the
import graph has no cycle, so a save or a load visits
each module once and never climbs back into the module that called it.
docs/architecture.rst draws the layers this test pins, and lists the modules in an
order it checks: each above every module it imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import polystore.backends.sql

PACKAGE = "polystore.backends.sql"
ROOT = Path(polystore.backends.sql.__file__).parent


def _imports(*, top_level_only: bool = False) -> dict[str, set[str]]:
    """Module name (``catalog``) -> the modules of this package it imports.

    Every import, in functions too; or, with ``top_level_only``, those that run
    when the module is imported.
    """
    graph: dict[str, set[str]] = {}
    for path in sorted(ROOT.glob("*.py")):
        name = path.stem
        found: set[str] = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = tree.body if top_level_only else list(ast.walk(tree))
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == PACKAGE:
                    found.update(alias.name for alias in node.names)
                elif node.module.startswith(PACKAGE + "."):
                    found.add(node.module[len(PACKAGE) + 1 :].split(".")[0])
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith(PACKAGE + "."):
                        found.add(alias.name[len(PACKAGE) + 1 :].split(".")[0])
        graph[name] = found - {name}
    return graph


def test_nothing_below_the_facade_imports_it() -> None:
    graph = _imports()
    assert "backend" in graph and "catalog" in graph
    importers = sorted(name for name, deps in graph.items() if "backend" in deps)
    assert importers == ["__init__", "reopen"]
    assert not any(graph[name] & {"__init__", "reopen"} for name in graph if name != "backend")


def test_no_import_cycles() -> None:
    """Among the imports that run at import time (``SQLBackend.__reduce__`` imports
    ``reopen``, which builds backends, when it is called)."""
    graph = _imports(top_level_only=True)
    done: set[str] = set()

    def visit(name: str, trail: tuple[str, ...]) -> None:
        assert name not in trail, " -> ".join((*trail, name))
        if name in done:
            return
        for dep in sorted(graph.get(name, ())):
            visit(dep, (*trail, name))
        done.add(name)

    for name in sorted(graph):
        visit(name, ())


def test_only_the_catalog_runs_transactions_and_translates_errors() -> None:
    """``translate_errors`` and ``retrying`` have one user: catalog.py (engine.py defines them)."""
    users = sorted(
        path.stem
        for path in ROOT.glob("*.py")
        if path.stem not in ("engine", "catalog")
        and any(
            word in path.read_text(encoding="utf-8") for word in ("translate_errors(", "retrying(")
        )
    )
    assert users == []


def _documented_order() -> list[str]:
    """The modules of ``docs/architecture.rst``'s list, from the top (a line may name two)."""
    text = (ROOT.parents[2] / "docs" / "architecture.rst").read_text(encoding="utf-8")
    listing = text.split("The modules\n-----------", 1)[1].split("\nA save\n", 1)[0]
    order: list[str] = []
    for line in listing.splitlines():
        if line.startswith("* "):
            head = line.split(" -- ", 1)[0]
            order += [part.strip("`*, ")[: -len(".py")] for part in head.split(" and ")]
    return order


def test_the_docs_list_every_module_above_the_modules_it_imports() -> None:
    """docs/architecture.rst lists each module once, above every module it imports
    (``reopen``, named on the façade's line, rebuilds backends above it)."""
    order = _documented_order()
    graph = _imports()
    assert sorted(order) == sorted(set(order)), "a module listed twice"
    assert sorted(order) == sorted(set(graph) - {"__init__", "reopen"})
    for name, deps in graph.items():
        if name in ("__init__", "reopen"):
            continue
        above = order[: order.index(name) + 1]
        assert not deps & set(above), f"{name} imports {sorted(deps & set(above))}, listed above it"
