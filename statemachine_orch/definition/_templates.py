"""Prompt templates: `str.format` syntax restricted to plain `{name}` placeholders.

Attribute and index lookups (`{x.__class__}`, `{x[0]}`), conversions and format specs are
rejected when the machine is loaded, and values are substituted once, never re-parsed, so
neither inputs nor model outputs can reach Python objects through a prompt.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from string import Formatter
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python


@dataclass(frozen=True, slots=True)
class Template:
    source: str
    literals: tuple[str, ...]
    names: tuple[str, ...]
    problems: tuple[str, ...]

    @classmethod
    def parse(cls, source: str) -> Template:
        literals: list[str] = []
        names: list[str] = []
        problems: list[str] = []
        try:
            parsed = list(Formatter().parse(source))
        except ValueError as exc:
            problem = f"template is malformed ({exc}); write {{{{ and }}}} for literal braces"
            return cls(source, (source,), (), (problem,))
        pending = ""
        for literal, name, spec, conversion in parsed:
            pending += literal
            if name is None:
                continue
            if not name.isidentifier():
                what = "a positional {}" if name == "" else f"'{{{name}}}'"
                problems.append(
                    f"template uses {what}; only plain {{name}} placeholders are allowed "
                    "(no attribute access, indexing or positions)"
                )
                continue
            if spec or conversion:
                problems.append(
                    f"placeholder '{{{name}}}' has a conversion or format spec; use plain {{{name}}}"
                )
                continue
            literals.append(pending)
            names.append(name)
            pending = ""
        literals.append(pending)
        return cls(source, tuple(literals), tuple(names), tuple(problems))

    def render(self, values: Mapping[str, Any]) -> str:
        """Substitute each placeholder with `as_text(value)`; `values` must hold every name."""
        out = [self.literals[0]]
        for name, literal in zip(self.names, self.literals[1:], strict=True):
            out.append(as_text(values[name]))
            out.append(literal)
        return "".join(out)


def as_text(value: Any) -> str:
    """How a value appears inside a prompt: strings verbatim, everything else as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    return json.dumps(value, ensure_ascii=False, default=to_jsonable_python)
