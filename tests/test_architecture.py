"""Imports follow the arrows of docs/architecture.md, and no module imports itself in a circle.

Every import counts: at module level, inside functions (lazy ones) and under TYPE_CHECKING.
Cycles are looked for among the imports that run (type-only ones cannot form a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "statemachine_orch"

# layer -> the modules in it (a name covers the module and everything under it)
LAYERS: dict[str, tuple[str, ...]] = {
    "vocabulary": ("types", "limits", "errors", "hooks", "_redact"),
    "definition": ("definition",),
    "ports": ("store._contract", "store._owner", "store._queue", "llm._client", "llm._retry", "llm._prices",
              "llm._limiter"),
    "engine": ("engine",),
    "adapters": ("store.sqlite", "store.postgres", "store._chain", "store._rows", "store._open", "store._copy",
                 "llm._anthropic", "llm._offline", "llm._offline_limits",
                 "llm._fake_wire", "trace"),
    "interface": ("cli", "testing", ""),  # "": the package itself (its lazy public names)
}
# layer -> the layers it may import: definition -> engine -> ports <- adapters <- interface
MAY_IMPORT: dict[str, set[str]] = {
    "vocabulary": {"vocabulary"},
    "definition": {"vocabulary", "definition"},
    "ports": {"vocabulary", "ports"},
    "engine": {"vocabulary", "definition", "ports", "engine"},
    "adapters": {"vocabulary", "ports", "adapters"},
    "interface": set(LAYERS),
}


def modules(root: Path) -> dict[str, Path]:
    """Dotted name (relative to the package, "" for the package) -> file."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def layer_of(module: str) -> str:
    best, found = -1, None
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".") or prefix == "") and len(prefix) > best:
                best, found = len(prefix), layer
    assert found is not None, f"module {module!r} belongs to no layer: add it to LAYERS"
    return found


def imports(name: str, path: Path, known: set[str], package: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, runs at import time or later) for each import of the package's own modules."""
    tree = ast.parse(path.read_text(), str(path))
    here = name.split(".") if name else []
    is_package = path.name == "__init__.py"
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    found = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here if is_package else here[:-1]
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                origin = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and (node.module == package or node.module.startswith(package + ".")):
                origin = node.module[len(package) + 1:]
            else:
                continue
            for alias in node.names:
                sub = f"{origin}.{alias.name}" if origin else alias.name
                targets.append(sub if sub in known else origin)
        elif isinstance(node, ast.Import):
            targets = [a.name[len(package) + 1:] for a in node.names if a.name.startswith(package + ".")]
        found += [(t, node.lineno, id(node) not in type_only) for t in targets if t in known]
    return found


def problems(root: Path) -> list[str]:
    """Every import against the arrows, and every import cycle, one line each."""
    package = root.name
    mods = modules(root)
    known = set(mods)
    out = []
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for target, line, runs in imports(name, path, known, package):
            if layer_of(target) not in MAY_IMPORT[layer_of(name)]:
                out.append(f"{path.relative_to(root.parent)}:{line}: {name or package} ({layer_of(name)}) "
                           f"imports {target} ({layer_of(target)})")
            if runs and target != name:
                graph[name].add(target)
    out += [f"import cycle: {' -> '.join(sorted(c))}" for c in _cycles(graph)]
    return out


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_every_import_follows_the_arrows_and_none_forms_a_cycle() -> None:
    assert problems(PACKAGE) == []


@pytest.mark.parametrize(("files", "expected"), [
    ({"engine/_run.py": "from ..store.sqlite._store import SQLiteStore\n"},
     "engine._run (engine) imports store.sqlite._store (adapters)"),
    ({"definition/_machine.py": "def later():\n    from ..engine import _run\n"},
     "definition._machine (definition) imports engine._run (engine)"),
    ({"store/sqlite/_store.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                "    from ...engine._run import Run\n"},
     "store.sqlite._store (adapters) imports engine._run (engine)"),
    ({"engine/_a.py": "from . import _b\n", "engine/_b.py": "def f():\n    from ._a import x\n"},
     "import cycle: engine._a -> engine._b"),
])
def test_the_check_catches_a_wrong_arrow_and_a_lazy_cycle(tmp_path: Path, files: dict[str, str],
                                                          expected: str) -> None:
    root = tmp_path / "statemachine_orch"
    for name in ("__init__.py", "engine/__init__.py", "definition/__init__.py", "store/__init__.py",
                 "store/sqlite/__init__.py", "store/sqlite/_store.py", "engine/_run.py",
                 "definition/_machine.py", *files):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(files.get(name, ""))
    assert any(expected in line for line in problems(root)), problems(root)
