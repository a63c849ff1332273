"""Opening a store from what a user types: a file path or a URL (the one place that picks a backend)."""

from __future__ import annotations

import os
from typing import Any

from ..errors import UsageError
from ._contract import Store


def open_store(target: str | os.PathLike[str], **options: Any) -> Store:
    """The store at `target`: a SQLite file path, `sqlite:///path` or a `postgresql://` URL.
    `options` go to the backend (for SQLite: `synchronous`, `busy_timeout_s`, `create`,
    `tracer`, `audit_key`; PostgreSQL takes `create`, `upgrade`, `tracer`, `audit_key`,
    `schema`, `lease_ttl_s`, `pool_size`; each ignores the other's own)."""
    text = os.fspath(target)
    scheme, sep, rest = text.partition("://")
    if not sep or len(scheme) == 1:  # a plain path (a Windows drive letter is not a scheme)
        path = text
    elif scheme == "sqlite":
        path = rest[1:] if rest.startswith("/") and not rest.startswith("//") else rest
    elif scheme in ("postgresql", "postgres"):
        return _postgres(text, options)
    else:
        raise UsageError(f"no store for {scheme}:// URLs",
                         fix="use a SQLite file path, sqlite:///path or postgresql://...")
    if path in ("", ":memory:"):  # SQLite's in-memory database would be a file named so here
        raise UsageError(f"{text!r} names no database file",
                         fix="runs are kept in a file so that they can be resumed: give a file path")
    from .sqlite._store import SQLiteStore  # the backend is loaded only when chosen

    return SQLiteStore(path, **{name: value for name, value in options.items() if name not in _POSTGRES_ONLY})


_POSTGRES_OPTIONS = ("create", "upgrade", "tracer", "audit_key", "schema", "lease_ttl_s", "pool_size")
_POSTGRES_ONLY = ("upgrade", "schema", "lease_ttl_s", "pool_size")


def _postgres(dsn: str, options: dict[str, Any]) -> Store:
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError:
        raise UsageError("PostgreSQL needs the psycopg driver",
                         fix="pip install 'statemachine-orch[postgres]'") from None
    from .postgres._store import PostgresStore

    return PostgresStore(dsn, **{name: value for name, value in options.items() if name in _POSTGRES_OPTIONS})
