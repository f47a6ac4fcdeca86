"""The import graph of coredi_fast has no cycle: every arrow between two modules runs one way.

The graph is read from the source with `ast` (nothing is imported): one node per module file, one arrow per import
statement anywhere in the file, function-level (lazy) imports included, since a lazy import is still a dependency
that runs the other way when the two modules import each other. `from pkg import name` points at the module
`pkg.name` when there is one, else at `pkg`. The parent packages Python imports on the way to a module (`a` and `a.b`
before `a.b.c`) are not arrows: a package's `__init__` gathering its submodules is the layout, not a dependency.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "coredi_fast"


def module_files(package: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package __init__) for every .py file under `package`."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def imported_modules(name: str, is_package: bool, node: ast.AST, modules: dict) -> list[str]:
    """The modules of `modules` that one import statement of module `name` points at."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in modules]
    here = name.split(".") if is_package else name.split(".")[:-1]   # the package a relative import starts from
    if node.level:
        here = here[:len(here) - (node.level - 1)]
        base = ".".join(here + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    return [t for t in targets if t in modules]


def import_graph(package: Path) -> dict[str, set[str]]:
    modules = module_files(package)
    graph = {}
    for name, (path, is_package) in modules.items():
        arrows = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                arrows.update(imported_modules(name, is_package, node, modules))
        arrows.discard(name)
        graph[name] = arrows
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted; [] for an acyclic graph."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_the_detector_finds_a_cycle_through_a_lazy_import_and_ignores_parent_packages(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .sub import a\n")
    (pkg / "sub" / "__init__.py").write_text("from .a import f\nfrom .b import g\n")
    (pkg / "sub" / "a.py").write_text("from .b import g\n\ndef f():\n    return g()\n")
    (pkg / "sub" / "b.py").write_text("def g():\n    from . import a  # lazy, still an arrow\n    return a\n")
    (pkg / "c.py").write_text("import pkg.sub.a\nfrom pkg import sub\nfrom ..outside import x\n")
    graph = import_graph(pkg)
    assert graph["pkg.sub.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.sub.a"}
    assert graph["pkg.c"] == {"pkg.sub.a", "pkg.sub"}
    assert cycles(graph) == [["pkg.sub.a", "pkg.sub.b"]]
    (pkg / "sub" / "b.py").write_text("def g():\n    return 1\n")
    assert cycles(import_graph(pkg)) == []  # __init__ -> submodule -> sibling is no cycle


def test_the_data_loaders_import_each_other_one_way_only():
    graph = import_graph(PACKAGE)
    torch_loader, dali_loader = "coredi_fast.data.torch_loader", "coredi_fast.data.dali_loader"
    assert "coredi_fast.data.batches" in graph[torch_loader] and "coredi_fast.data.batches" in graph[dali_loader]
    assert torch_loader not in graph[dali_loader]
    assert not [c for c in cycles(graph) if c[0].startswith("coredi_fast.data.")]


def test_coredi_fast_has_no_import_cycle():
    found = cycles(import_graph(PACKAGE))
    assert found == [], "import cycles (move what both modules need into one both import): " + "; ".join(
        " <-> ".join(c) for c in found)
