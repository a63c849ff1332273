"""The audit chain: each log row stores a hash over its values and the previous row's hash.

Editing, inserting or removing a row breaks the chain from that row on; rows cut from the end
are found against the run's own record of its last step (`runs.last_seq`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from functools import cache
from typing import Any

CHAINED_COLUMNS = (
    "run_id, seq, from_state, to_state, decision, reason, attempt, started_at, latency_ms, source, "
    "input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_usd, error, output, "
    "request, response, request_id, request_hash, in_doubt"
)


def chain_hash(previous: str, content: tuple[Any, ...]) -> str:
    """sha256 over the previous row's hash and this row's stored values (response included).

    The values are hashed as their Python repr: unambiguous for the SQL types (text, integer,
    real, NULL, and a BLOB someone planted), and one C call instead of re-encoding the JSON
    columns.
    """
    digest = _sha256()(previous.encode())
    digest.update(repr(content).encode())
    hexdigest: str = digest.hexdigest()
    return hexdigest


def first_link(run_id: str) -> str:
    """What a run's first row chains to: a hash of its id, so rows cannot move between runs."""
    return chain_hash("", (run_id,))


@cache
def _sha256() -> Callable[[bytes], Any]:
    """hashlib's sha256, imported on first use: `orch runs`/`log`/`show` never hash."""
    from hashlib import sha256

    return sha256


def last_link(conn: sqlite3.Connection, run_id: str) -> str:
    """The hash the run's next row chains to."""
    row = conn.execute("SELECT chain FROM transitions WHERE run_id = ? ORDER BY seq DESC LIMIT 1",
                       (run_id,)).fetchone()
    return row[0] if row else first_link(run_id)


def verify(conn: sqlite3.Connection, run_id: str) -> str | None:
    """None when the run's log is intact, else what is wrong and at which row."""
    expected_seq, previous = 1, first_link(run_id)
    for row in conn.execute(
            f"SELECT {CHAINED_COLUMNS}, chain FROM transitions WHERE run_id = ? ORDER BY seq", (run_id,)):
        content, stored = row[:-1], row[-1]
        seq = content[1]
        if seq != expected_seq:
            what = "missing (deleted)" if seq > expected_seq else "duplicated"
            return f"row seq {expected_seq} is {what}: the log jumps to seq {seq}"
        previous = chain_hash(previous, content)
        if previous != stored:
            return (f"row seq {seq} does not match its hash: it was edited, or inserted, or a row "
                    "before it was removed")
        expected_seq += 1
    # the log's end against the run's own record of it: rows cut from the end leave a
    # consistent chain, but not the seq the run row was last advanced to
    found = conn.execute("SELECT last_seq FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    last = expected_seq - 1
    if found is not None and found[0] > last:
        return (f"row seq {last + 1} is missing (deleted): the run was advanced to seq {found[0]}, "
                f"its log ends at seq {last}")
    if found is not None and found[0] < last:
        return f"row seq {found[0] + 1} was added after the run's last recorded step (seq {found[0]})"
    return None
