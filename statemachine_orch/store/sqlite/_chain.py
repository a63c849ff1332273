"""The audit chain's reads on a SQLite connection (the chain itself is `store._chain`)."""

from __future__ import annotations

import sqlite3
from typing import Any

from ...errors import TamperedRunError
from .._chain import CHAINED_ATTEMPT_COLUMNS, CHAINED_COLUMNS, AuditKey, chain_start, verify_log


def run_row(conn: sqlite3.Connection, run_id: str) -> dict[str, Any] | None:
    """The run's row by column name (an old file opened read-only has no chain columns)."""
    cursor = conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,))
    found = cursor.fetchone()
    return None if found is None else dict(zip([c[0] for c in cursor.description], found, strict=True))


def last_link(conn: sqlite3.Connection, run_id: str, key: AuditKey) -> tuple[int, str]:
    """(version, the hash the run's next row chains to)."""
    version, first = chain_start(run_id, run_row(conn, run_id), key)
    row = conn.execute("SELECT chain FROM transitions WHERE run_id = ? ORDER BY seq DESC LIMIT 1",
                       (run_id,)).fetchone()
    return version, row[0] if row else first


def verify(conn: sqlite3.Connection, run_id: str, key: AuditKey) -> str | None:
    """None when the run's row and log are intact, else what is wrong (`_chain.verify_log`)."""
    return verify_log(
        run_id, run_row(conn, run_id),
        conn.execute(f"SELECT {CHAINED_COLUMNS}, chain FROM transitions WHERE run_id = ? ORDER BY seq", (run_id,)),
        conn.execute(f"SELECT {CHAINED_ATTEMPT_COLUMNS} FROM attempts WHERE run_id = ? ORDER BY seq, attempt",
                     (run_id,)),
        key)


def require_intact(conn: sqlite3.Connection, run_id: str, key: AuditKey, where: str) -> None:
    """Refuse a run whose rows fail its chain (`TamperedRunError`, naming the first bad row)."""
    problem = verify(conn, run_id, key)
    if problem is not None:
        raise TamperedRunError(run_id, problem, where=where)
