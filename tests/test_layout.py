"""The package's shape: no module past ~450 lines, no import circle between modules (what each imports at its top;
a function may import a layer above it lazily, as the reports do for the pictures)."""

import ast
from pathlib import Path

import kdbench

PKG = Path(kdbench.__file__).parent


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PKG.rglob("*.py")}


def _imports(name: str, path: Path, known) -> set[str]:
    """The kdbench modules ``name`` imports at its top level."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                out.add(target if target in known else base)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m in known and m != name}


def test_no_module_is_longer_than_450_lines():
    long = {n: len(p.read_text().splitlines()) for n, p in _modules().items() if len(p.read_text().splitlines()) > 450}
    assert not long, long


def test_no_two_modules_import_each_other_in_a_circle():
    mods = _modules()
    graph = {n: _imports(n, p, mods) for n, p in mods.items()}
    assert graph["kdbench.train"] >= {"kdbench.records", "kdbench.terms"}  # the parser sees relative imports
    state, path = {}, []

    def visit(n):
        state[n] = "open"
        path.append(n)
        for m in graph[n]:
            if state.get(m) == "open":
                raise AssertionError("import circle: " + " -> ".join(path[path.index(m):] + [m]))
            if m not in state:
                visit(m)
        state[n] = "done"
        path.pop()

    for n in graph:
        if n not in state:
            visit(n)
