"""statemachine_orch: durable, auditable, replayable LLM workflows as explicit state machines.

The public names are listed once, in `__init__.pyi` (which type checkers read); each is
imported on first use (PEP 562), so `orch runs` and other reading commands do not pay for
the engine, pydantic or structlog at startup.
"""

from __future__ import annotations

import re
from importlib import import_module
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

_WHERE: dict[str, str] = {
    name: module for module, name in re.findall(
        r"^from (\.[\w.]+) import (\w+) as \2$", Path(__file__).with_suffix(".pyi").read_text(), re.MULTILINE)
}
__all__ = [*_WHERE, "__version__"]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'statemachine_orch' has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
