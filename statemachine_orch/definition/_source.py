"""What a machine's code is, for the hash stored with each run: its module's file and the
project modules it imports.

A resume or replay that finds the hash changed treats the machine as edited (it replays the
recorded steps on the new code first). A shared `prompts.py` beside the machine is part of
it; the library itself, installed packages and the standard library are not. A project
module is one whose file lives under the machine file's directory or the current directory,
outside any site-packages; its own imports are followed too. A machine that imports none
hashes as its file alone, as runs stored before imports counted were hashed.
"""

from __future__ import annotations

import ast
import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path

_LIBRARY = Path(__file__).resolve().parents[1]  # statemachine_orch/: not part of any machine
_INSTALLED = frozenset({"site-packages", "dist-packages"})


def code_hash(source_file: str | None, *, package: str = "", fallback: bytes) -> str:
    """sha256 of the machine file and, by name, each project module it imports (`package`:
    the machine module's, for its relative imports; `fallback` stands in for a machine
    without a file)."""
    machine = Path(source_file).resolve() if source_file else None
    if machine is None or not machine.is_file():
        return hashlib.sha256(fallback).hexdigest()
    digest = hashlib.sha256(machine.read_bytes())
    for name, file in sorted(project_modules(machine, package).items()):
        digest.update(b"\0" + name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def project_modules(machine: Path, package: str = "") -> dict[str, Path]:
    """Module name -> file of every project module the machine file imports, directly or not
    (as imported in this process: a module never imported is not part of the run)."""
    roots = (machine.parent, Path.cwd().resolve())
    found: dict[str, Path] = {}
    todo = [(machine, package)]
    while todo:
        file, package = todo.pop()
        for name in _imported_names(file, package):
            module = sys.modules.get(name)
            where = getattr(module, "__file__", None)
            if name in found or not isinstance(where, str):
                continue
            path = Path(where).resolve()
            if path != machine and path.is_file() and _in_project(path, roots):
                found[name] = path
                todo.append((path, name if path.stem == "__init__" else name.rpartition(".")[0]))
    return found


def _in_project(path: Path, roots: tuple[Path, ...]) -> bool:
    if path.is_relative_to(_LIBRARY) or _INSTALLED.intersection(path.parts):
        return False
    return any(path.is_relative_to(root) for root in roots)


def _imported_names(file: Path, package: str) -> Iterator[str]:
    """Every module an import statement of `file` may load: `a.b` also loads `a`, and
    `from a import b` may load the submodule `a.b`. `package` resolves relative imports."""
    try:
        tree = ast.parse(file.read_bytes(), filename=str(file))
    except (SyntaxError, ValueError):  # not Python source (an extension module): no imports to follow
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _with_parents(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".") if package else []
                parent = ".".join(parts[:len(parts) - node.level + 1])
                base = ".".join(p for p in (parent, base) if p)
            if base:
                yield from _with_parents(base)
                yield from (f"{base}.{alias.name}" for alias in node.names)


def _with_parents(name: str) -> Iterator[str]:
    parts = name.split(".")
    return (".".join(parts[:i]) for i in range(1, len(parts) + 1))
