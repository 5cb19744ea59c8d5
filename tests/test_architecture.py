"""The package's shape (docs/architecture.md): no import circle, even through imports inside functions; no
module past 450 lines; the coordinator short."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rose_trl"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports, wherever the import statement is (functions included)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from . import x`: x may be a module
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports(p, modules) for p in paths}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
    return found


def test_the_cycle_finder_finds_a_planted_circle():
    graph = import_graph()
    assert "rose_trl.scoring" in graph["rose_trl.selection"]
    graph["rose_trl.scoring"] = graph["rose_trl.scoring"] | {"rose_trl.selection"}  # balance <-> selection, as it was
    assert ["rose_trl.scoring", "rose_trl.selection"] in cycles(graph)


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_no_module_past_450_lines():
    sizes = {module_name(p): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {m: n for m, n in sizes.items() if n > 450} == {}


def test_the_coordinator_stays_short():
    tree = ast.parse((PACKAGE / "selector.py").read_text())
    selector = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ROSESelector")
    assert selector.end_lineno - selector.lineno + 1 < 150
