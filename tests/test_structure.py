"""The package's layers: no module imports, directly or through others, one that imports it back.

Every import counts, also those inside functions or under ``TYPE_CHECKING``:
a cycle hidden by a deferred import is still a cycle.
"""

import ast
from pathlib import Path

import pytest

import qes_edge

pytestmark = pytest.mark.unit

PACKAGE = Path(qes_edge.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports, wherever in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}
    return {m for m in found if m in modules and m != name}


def test_no_import_cycles():
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    graph = {module_name(p): imports_of(p, modules) for p in paths}
    assert graph["qes_edge.trainer"] >= {"qes_edge.es", "qes_edge.run"}  # the walk sees relative imports

    def cycle_from(start, path, seen):
        for nxt in sorted(graph[path[-1]]):
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                found = cycle_from(start, path + [nxt], seen)
                if found:
                    return found
        return None

    for module in sorted(graph):
        cycle = cycle_from(module, [module], {module})
        assert cycle is None, " -> ".join(cycle)


def graph_of_package() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def test_low_layers_reach_no_higher():
    graph = graph_of_package()
    assert graph["qes_edge.cpu"] == set()
    assert graph["qes_edge.stock_llama"] == set()
    # llama.cpp, and nothing of ours above it
    assert graph["qes_edge.evaluator"] <= {"qes_edge.errors", "qes_edge.cpu", "qes_edge.stock_llama"}
    assert graph["qes_edge.metrics"] <= {"qes_edge.tasks"}


def test_the_cli_calls_the_library_layer():
    graph = graph_of_package()
    assert "qes_edge.api" in graph["qes_edge.cli"]
    assert not graph["qes_edge.cli"] & {"qes_edge.trainer", "qes_edge.replica", "qes_edge.fleet", "qes_edge.working_copy",
                                        "qes_edge.evaluator", "qes_edge.scorer"}
