"""ituning/ holds no import cycle, read from the source: every import statement counts, those inside
functions too, so a cycle cannot be kept by deferring one of its imports into a function."""

import ast
from pathlib import Path

from tests.test_layers import ROOT

PACKAGE = "ituning"


def module_names(folder: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of a package (its __init__ left out: it only re-exports)."""
    return {".".join(path.relative_to(folder.parent).with_suffix("").parts): path
            for path in sorted(folder.rglob("*.py")) if path.stem != "__init__"}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that a file imports anywhere in it (`from pkg import module` included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return found & known


def import_graph(folder: Path) -> dict[str, set[str]]:
    modules = module_names(folder)
    return {name: imports_of(path, set(modules)) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of the graph as the modules along it (the first repeated at the end), or []."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once all below it are seen
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        path.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                return path[path.index(child):] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        path.pop()
        state[node] = "done"
        return []

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return []


def test_the_science_package_has_no_import_cycle():
    cycle = find_cycle(import_graph(ROOT / PACKAGE))
    assert cycle == [], "import cycle: " + " -> ".join(cycle)


def test_a_cycle_through_a_deferred_import_is_found(tmp_path):
    package = tmp_path / "science"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from science.b import thing\n")
    (package / "b.py").write_text("from science import c\nthing = 1\n")
    (package / "c.py").write_text("def later():\n    import science.a\n")
    assert find_cycle(import_graph(package)) == ["science.a", "science.b", "science.c", "science.a"]
    (package / "c.py").write_text("def later():\n    pass\n")
    assert find_cycle(import_graph(package)) == []
