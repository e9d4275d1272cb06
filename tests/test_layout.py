"""The layout shows the architecture: the server package imports nothing from outside it,
and no module's imports lead back to itself (typing-only imports included)."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("services", "harness", "loadtest", "bench")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for pkg in PACKAGES for path in (ROOT / pkg).rglob("*.py")}


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project's modules that `path` imports, wherever the import statement is."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in known)
    return found - {module_name(path)}


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) for name, path in known.items()}


def test_no_import_runs_in_a_circle() -> None:
    graph = import_graph()
    assert len(graph) > 40  # the walk found the project
    graphlib.TopologicalSorter(graph).prepare()  # CycleError names the circle


def test_the_server_package_imports_nothing_from_outside_it() -> None:
    outside = {
        (name, dep)
        for name, deps in import_graph().items()
        if name.startswith("services")
        for dep in deps
        if not dep.startswith("services")
    }
    assert not outside
