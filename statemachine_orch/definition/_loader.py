"""Load a machine from `path/to/file.py[:attr]` or `dotted.module[:attr]`.

Loading executes the module, which constructs (and so validates) its machines. Every
failure becomes a one-line `DefinitionError`/`MachineNotFoundError` naming the file, whatever
the module raised: `sys.exit()`, `KeyboardInterrupt` or another `BaseException` too, since no
module has a reason to end the program that loads it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from ..errors import DefinitionError, MachineNotFoundError
from ._machine import Machine


@dataclass(frozen=True, slots=True)
class Loaded:
    machine: Machine
    ref: str  # canonical reference stored with runs: absolute path or module, plus :attr


def load_machine(spec: str) -> Loaded:
    target, _, attr = _split(spec)
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise MachineNotFoundError([f"{target}: no such file; pass path/to/machine.py or a dotted module"])
        module = _exec_file(path, target)
        where = str(path)
    else:
        module = _import(target)
        where = target
    machine, name = _pick(module, attr, target)
    return Loaded(machine, f"{where}:{name}")


def _split(spec: str) -> tuple[str, str, str]:
    head, sep, tail = spec.rpartition(":")
    if sep and tail.isidentifier() and head and not (len(head) == 1 and head.isalpha()):
        return head, sep, tail
    return spec, "", ""


def _exec_file(path: Path, shown: str) -> ModuleType:
    name = "orch_machine_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise MachineNotFoundError([f"{shown}: cannot be imported as a Python module"])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pydantic resolve annotations through it
    parent = str(path.parent)
    added = parent not in sys.path
    if added:
        sys.path.insert(0, parent)  # let a machine import its sibling modules
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(name, None)
        raise _import_failure(shown, exc, syntax_in=shown) from None
    finally:
        if added:
            sys.path.remove(parent)
    return module


def _import(dotted: str) -> ModuleType:
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # machines in the current directory, like `python -m`
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == dotted or dotted.startswith(exc.name + ".")):
            raise MachineNotFoundError(
                [f"{dotted}: no such module; pass path/to/machine.py or a dotted module on sys.path"]
            ) from None
        raise _import_failure(dotted, exc) from None
    except BaseException as exc:
        raise _import_failure(dotted, exc, syntax_in=getattr(exc, "filename", None)) from None


def _import_failure(shown: str, exc: BaseException, *, syntax_in: str | None = None) -> DefinitionError:
    """The one-line error for a machine module that failed while importing (`syntax_in`: the
    file a syntax error is reported in)."""
    if isinstance(exc, DefinitionError):
        return exc
    if isinstance(exc, SyntaxError):
        return DefinitionError([f"{syntax_in}:{exc.lineno}: syntax error: {exc.msg}; fix the module"])
    if isinstance(exc, SystemExit):
        return DefinitionError([f"{shown}: importing the module raised SystemExit (sys.exit({exc.code!r})); "
                                "fix the module"])
    raised = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return DefinitionError([f"{shown}: importing the module raised {raised}; fix the module"])


def _pick(module: ModuleType, attr: str, shown: str) -> tuple[Machine, str]:
    if attr:
        found = getattr(module, attr, None)
        if not isinstance(found, Machine):
            raise MachineNotFoundError(
                [f"{shown}: '{attr}' is {'missing' if found is None else 'not a Machine'}; "
                 f"pass the name of a module-level Machine"])
        return found, attr
    machines = {k: v for k, v in vars(module).items() if isinstance(v, Machine)}
    own = {k: v for k, v in machines.items() if v.module == module.__name__} or machines
    if not own:
        raise MachineNotFoundError([f"{shown}: defines no Machine; create one at module level"])
    if len(own) > 1:
        raise MachineNotFoundError(
            [f"{shown}: defines several machines ({', '.join(sorted(own))}); pick one with {shown}:NAME"])
    name, machine = next(iter(own.items()))
    return machine, name
