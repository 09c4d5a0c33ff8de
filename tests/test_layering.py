"""The package's floors hold. Read from the code's own imports (grimp, the library import-linter
builds on; imports under ``TYPE_CHECKING`` count): no import circle anywhere inside
``src/qformer``, and no import from a floor to a higher one, the floors being the layers of the
import-linter contract in ``pyproject.toml`` (which ``make test`` also runs as ``lint-imports``).
A circle or an import that runs back up fails here with the modules that make it."""

import tomllib
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]


def circles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, without
    recursion): each is a set of modules that import one another round a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            module, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[module] = min(low[module], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[module])
            if low[module] == index[module]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == module:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def floors() -> list[list[str]]:
    """The layers contract of pyproject.toml, top floor first; each floor a list of modules."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    (root,) = contract["containers"]
    return [[f"{root}.{name.strip()}" for name in layer.split("|")] for layer in contract["layers"]]


def upward_imports(graph: grimp.ImportGraph, layers: list[list[str]]) -> list[tuple[str, str]]:
    """Every direct import from a module of one floor into a module of a higher floor."""
    def floor_of(module: str) -> int | None:
        for level, layer in enumerate(layers):
            if any(module == name or module.startswith(name + ".") for name in layer):
                return level
        return None

    found = []
    for importer in sorted(graph.modules):
        level = floor_of(importer)
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            other = floor_of(imported)
            if level is not None and other is not None and other < level:
                found.append((importer, imported))
    return found


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("qformer", cache_dir=None)  # this checkout's: conftest puts its src first


def test_no_import_circle_inside_the_package(graph):
    assert circles(graph) == []


def test_no_import_runs_up_a_floor(graph):
    layers = floors()
    named = {name for layer in layers for name in layer}
    assert all(graph.find_children(name) or name in graph.modules for name in named)  # every floor exists
    top_level = {m for m in graph.modules if m.count(".") == 1}
    assert sorted(top_level - named - {"qformer.__main__"}) == []  # every module has a floor
    assert upward_imports(graph, layers) == []


def test_the_checks_catch_a_circle_and_an_import_up_a_floor():
    """The same functions on a made-up package: a -> b -> c -> a is one circle; with floors
    [a], [b], [c], the import c -> a runs up."""
    graph = grimp.ImportGraph()
    for module in ("p", "p.a", "p.b", "p.c", "p.d"):
        graph.add_module(module)
    for importer, imported in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.d", "p.a")):
        graph.add_import(importer=importer, imported=imported)
    assert circles(graph) == [["p.a", "p.b", "p.c"]]
    assert upward_imports(graph, [["p.a"], ["p.b"], ["p.c"]]) == [("p.c", "p.a")]
