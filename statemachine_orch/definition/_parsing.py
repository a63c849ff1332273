"""Parsers for `LLMState(parse=...)`: a text answer in, the state's output out.

A parser raises `ValueError` saying what the answer lacks and what to write instead: the
step re-asks the model with that message, as it does for an answer that fails `output=`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from ..errors import UsageError

_TAG_NAME = re.compile(r"[A-Za-z_][\w.-]*")


def xml_tags(*names: str, required: bool | Iterable[str] = True) -> Callable[[str], dict[str, str | None]]:
    """A parser that reads `<name>...</name>` sections (as the Anthropic cookbook prompts ask
    for `<thoughts>`, `<response>`, `<evaluation>`...) into `{name: text inside, stripped}`.

    `required`: True (every tag), False (none) or the names that must be there; a tag that
    is not there is None if optional, else a `ValueError` naming it and saying what to answer.
    The first section of each name counts; attributes on the opening tag are allowed."""
    bad = [n for n in names if not isinstance(n, str) or not _TAG_NAME.fullmatch(n)]
    if not names or bad:
        raise UsageError(f"xml_tags() needs tag names, got {bad or 'none'}", fix="pass names like xml_tags('response')")
    must = set(names) if required is True else set() if required is False else (
        {required} if isinstance(required, str) else set(required))
    if not must <= set(names):
        raise UsageError(f"xml_tags(required=...) names {sorted(must - set(names))}, which are not among its tags",
                         fix=f"require some of {list(names)}")
    patterns = {n: re.compile(rf"<{re.escape(n)}(?:\s[^>]*)?>(.*?)</{re.escape(n)}\s*>", re.DOTALL) for n in names}

    def parse(text: str) -> dict[str, str | None]:
        found = {n: (m.group(1).strip() if (m := pattern.search(text)) else None) for n, pattern in patterns.items()}
        missing = [n for n in names if n in must and found[n] is None]
        if missing:
            sections = " ".join(f"<{n}>...</{n}>" for n in names)
            raise ValueError(f"the answer has no {' or '.join(f'<{n}>' for n in missing)} section; "
                             f"answer with {sections}")
        return found

    parse.__name__ = parse.__qualname__ = f"xml_tags({', '.join(map(repr, names))})"
    return parse
