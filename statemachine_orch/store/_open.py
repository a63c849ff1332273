"""Opening a store from what a user types: a file path or a URL (the one place that picks a backend)."""

from __future__ import annotations

import os
from typing import Any

from ..errors import UsageError
from ._contract import Store


def open_store(target: str | os.PathLike[str], **options: Any) -> Store:
    """The store at `target`: a SQLite file path, or `sqlite:///path`. `options` go to the
    backend (for SQLite: `synchronous`, `busy_timeout_s`, `create`, `tracer`, `audit_key`)."""
    text = os.fspath(target)
    scheme, sep, rest = text.partition("://")
    if not sep or len(scheme) == 1:  # a plain path (a Windows drive letter is not a scheme)
        path = text
    elif scheme == "sqlite":
        path = rest[1:] if rest.startswith("/") and not rest.startswith("//") else rest
    else:
        raise UsageError(f"no store for {scheme}:// URLs", fix="use a SQLite file path or sqlite:///path")
    if path in ("", ":memory:"):  # SQLite's in-memory database would be a file named so here
        raise UsageError(f"{text!r} names no database file",
                         fix="runs are kept in a file so that they can be resumed: give a file path")
    from .sqlite._store import SQLiteStore  # the backend is loaded only when chosen

    return SQLiteStore(path, **options)
