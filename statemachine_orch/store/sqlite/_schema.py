"""The SQLite schema: tables, indexes and views as SQL, and the migrations between versions.

Version 9 (docs/storage.md). A database is created at the current version in one transaction,
or upgraded to it in one transaction: every migration from its version on, then `_conform`,
which rebuilds (with sqlite-utils' `transform`) any table whose columns differ from a new
database's in order, NOT NULL or default, so an upgraded database has exactly the schema of a
new one. Files of versions READABLE_FROM and later work unmigrated when they cannot be written:
the later versions only add indexes, reshape nothing a query depends on, or add the audit
chain's columns, which readers take as absent (version 1) when they are.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...errors import ForeignDatabaseError, SchemaVersionError, StoreError
from .._chain import CHAINED_COLUMNS, legacy_first_link, legacy_hash

SCHEMA_VERSION = 9
READABLE_FROM = 3
APPLICATION_ID = 0x4F524348  # "ORCH": marks a database as ours

# Per-machine totals for `orch runs`: finished runs enter the covering index once, when they
# finish (steps never update it); the unfinished ones are few and read from their rows.
_TOTALS_INDEXES = """
CREATE INDEX runs_finished_totals ON runs (machine, status, steps, input_tokens, output_tokens, cost_usd,
    cache_hits) WHERE status IN ('completed', 'terminated');
CREATE INDEX runs_unfinished ON runs (machine, status) WHERE status NOT IN ('completed', 'terminated');
"""

# child runs (a sub-machine's run, a map state's items) by their parent, in item order
_CHILDREN = """
CREATE INDEX runs_children ON runs (parent_run_id, parent_state, item) WHERE parent_run_id IS NOT NULL;
"""

# the runs of a batch (`orch batch`), by run id
_BATCHES = """
CREATE INDEX runs_by_batch ON runs (batch_id, run_id) WHERE batch_id IS NOT NULL;
"""

# forks by the run they came from (`orch runs --tree`); an experiment's runs by arm (`orch ab report`)
_LINEAGE = """
CREATE INDEX runs_forks ON runs (forked_from, run_id) WHERE forked_from IS NOT NULL;
CREATE INDEX runs_by_experiment ON runs (experiment, arm, run_id) WHERE experiment IS NOT NULL;
"""

_TAKEOVERS = """
CREATE TABLE takeovers (
    run_id   TEXT NOT NULL REFERENCES runs (run_id),
    at       TEXT NOT NULL,
    by_owner TEXT NOT NULL,
    previous TEXT NOT NULL,
    why      TEXT NOT NULL
);
CREATE INDEX takeovers_by_run ON takeovers (run_id, at);
"""

SCHEMA = """
CREATE TABLE runs (
    run_id       TEXT PRIMARY KEY,
    machine      TEXT NOT NULL,
    machine_ref  TEXT NOT NULL,
    machine_hash TEXT NOT NULL,
    input        TEXT NOT NULL,
    options      TEXT NOT NULL DEFAULT '{}',
    status       TEXT NOT NULL,
    error        TEXT,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL,
    owner        TEXT,
    owner_info   TEXT,
    in_flight    TEXT,
    last_seq      INTEGER NOT NULL DEFAULT 0,
    steps         INTEGER NOT NULL DEFAULT 0,
    input_tokens  INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd      REAL DEFAULT 0,
    cache_hits    INTEGER NOT NULL DEFAULT 0,
    chain_version INTEGER NOT NULL DEFAULT 1,
    chain_key     TEXT,
    chain_anchor  TEXT,
    parent_run_id TEXT,
    parent_state  TEXT,
    item          INTEGER,
    batch_id      TEXT,
    review        TEXT,
    forked_from   TEXT,
    experiment    TEXT,
    arm           TEXT
);
CREATE INDEX runs_by_created ON runs (created_at, run_id);
CREATE INDEX runs_by_machine ON runs (machine, created_at);
""" + _CHILDREN + _BATCHES + _LINEAGE + """CREATE TABLE transitions (
    run_id             TEXT NOT NULL REFERENCES runs (run_id),
    seq                INTEGER NOT NULL,
    from_state         TEXT NOT NULL,
    to_state           TEXT,
    decision           TEXT,
    reason             TEXT,
    attempt            INTEGER NOT NULL,
    started_at         TEXT NOT NULL,
    latency_ms         REAL NOT NULL,
    source             TEXT NOT NULL,
    input_tokens       INTEGER NOT NULL DEFAULT 0,
    output_tokens      INTEGER NOT NULL DEFAULT 0,
    cache_read_tokens  INTEGER NOT NULL DEFAULT 0,
    cache_write_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd           REAL,
    error              TEXT,
    output             TEXT,
    request            TEXT,
    response           TEXT,
    request_id         TEXT,
    request_hash       TEXT,
    in_doubt           INTEGER NOT NULL DEFAULT 0,
    chain              TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);
CREATE INDEX transitions_by_request_hash ON transitions (request_hash)
    WHERE request_hash IS NOT NULL;
CREATE TABLE attempts (
    run_id             TEXT NOT NULL,
    seq                INTEGER NOT NULL,
    attempt            INTEGER NOT NULL,
    state              TEXT NOT NULL,
    started_at         TEXT NOT NULL,
    kind               TEXT NOT NULL,
    status_code        INTEGER,
    request_id         TEXT,
    delay_s            REAL,
    error              TEXT NOT NULL,
    input_tokens       INTEGER NOT NULL DEFAULT 0,
    output_tokens      INTEGER NOT NULL DEFAULT 0,
    cache_read_tokens  INTEGER NOT NULL DEFAULT 0,
    cache_write_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd           REAL,
    request            TEXT,
    response           TEXT,
    PRIMARY KEY (run_id, seq, attempt)
);
""" + _TOTALS_INDEXES + _TAKEOVERS

# Cost sums are NULL when any paid call had no known price (SQL sum() would skip it).
VIEWS = """
DROP VIEW IF EXISTS llm_calls;
DROP VIEW IF EXISTS step_outputs;
DROP VIEW IF EXISTS run_totals;
CREATE VIEW llm_calls AS
    SELECT run_id, seq, from_state AS state, request_id, request, response,
           input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_usd,
           started_at, latency_ms
    FROM transitions WHERE source IN ('llm', 'fallback') AND response IS NOT NULL;
CREATE VIEW step_outputs AS
    SELECT run_id, seq, from_state AS state, output FROM transitions
    WHERE output IS NOT NULL AND to_state IS NOT NULL;
CREATE VIEW run_totals AS
    SELECT run_id, count(to_state) AS steps, sum(input_tokens) AS input_tokens,
           sum(output_tokens) AS output_tokens, sum(cache_read_tokens) AS cache_read_tokens,
           sum(cache_write_tokens) AS cache_write_tokens,
           CASE WHEN sum(cost_usd IS NULL) > 0 THEN NULL ELSE sum(cost_usd) END AS cost_usd,
           sum(source = 'cache') AS cache_hits, sum(latency_ms) AS latency_ms
    FROM transitions GROUP BY run_id;
"""
_DROP_VIEWS = "\n".join(line for line in VIEWS.splitlines() if line.startswith("DROP VIEW"))


def _chain_unchained_rows(conn: sqlite3.Connection) -> None:
    """Rows written before the audit chain existed get one (version 1) when the schema is upgraded."""
    runs = [r[0] for r in conn.execute("SELECT DISTINCT run_id FROM transitions WHERE chain = ''")]
    for run_id in runs:
        previous = legacy_first_link(run_id)
        for row in conn.execute(f"SELECT {CHAINED_COLUMNS} FROM transitions WHERE run_id = ? "
                                "ORDER BY seq", (run_id,)).fetchall():
            previous = legacy_hash(previous, tuple(row))
            conn.execute("UPDATE transitions SET chain = ? WHERE run_id = ? AND seq = ?",
                         (previous, run_id, row[1]))


# version -> what brings a database at that version to the next one
_MIGRATIONS: dict[int, str | Callable[[sqlite3.Connection], None]] = {
    1: """
ALTER TABLE transitions ADD COLUMN cost_usd REAL;
ALTER TABLE transitions ADD COLUMN request_hash TEXT;
CREATE INDEX transitions_by_request_hash ON transitions (request_hash)
    WHERE request_hash IS NOT NULL;
CREATE TABLE attempts (
    run_id TEXT NOT NULL, seq INTEGER NOT NULL, attempt INTEGER NOT NULL, state TEXT NOT NULL,
    started_at TEXT NOT NULL, kind TEXT NOT NULL, status_code INTEGER, request_id TEXT,
    delay_s REAL, error TEXT NOT NULL, input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0, cache_read_tokens INTEGER NOT NULL DEFAULT 0,
    cache_write_tokens INTEGER NOT NULL DEFAULT 0, cost_usd REAL, request TEXT, response TEXT,
    PRIMARY KEY (run_id, seq, attempt)
);
UPDATE transitions SET cost_usd = 0 WHERE input_tokens = 0 AND output_tokens = 0;
ALTER TABLE transitions ADD COLUMN in_doubt INTEGER NOT NULL DEFAULT 0;
ALTER TABLE transitions ADD COLUMN chain TEXT NOT NULL DEFAULT '';
ALTER TABLE runs ADD COLUMN in_flight TEXT;
""",
    2: """
DROP INDEX runs_by_created;
CREATE INDEX runs_by_created ON runs (created_at, run_id);
ALTER TABLE runs ADD COLUMN last_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN steps INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN input_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN output_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN cost_usd REAL DEFAULT 0;
ALTER TABLE runs ADD COLUMN cache_hits INTEGER NOT NULL DEFAULT 0;
UPDATE runs SET
    last_seq = (SELECT coalesce(max(seq), 0) FROM transitions t WHERE t.run_id = runs.run_id),
    steps = (SELECT count(to_state) FROM transitions t WHERE t.run_id = runs.run_id),
    input_tokens = (SELECT coalesce(sum(input_tokens), 0) FROM transitions t WHERE t.run_id = runs.run_id),
    output_tokens = (SELECT coalesce(sum(output_tokens), 0) FROM transitions t WHERE t.run_id = runs.run_id),
    cost_usd = (SELECT CASE WHEN sum(cost_usd IS NULL) > 0 THEN NULL ELSE coalesce(sum(cost_usd), 0) END
                FROM transitions t WHERE t.run_id = runs.run_id),
    cache_hits = (SELECT coalesce(sum(source = 'cache'), 0) FROM transitions t WHERE t.run_id = runs.run_id);
""",
    3: _TOTALS_INDEXES,
    4: _chain_unchained_rows,  # version 5 reshapes tables (`_conform`); the chain must be whole first
    # the takeovers table, and the audit chain's version, key and anchor per run (the runs
    # written before keep chain version 1)
    5: _TAKEOVERS + """
ALTER TABLE runs ADD COLUMN chain_version INTEGER NOT NULL DEFAULT 1;
ALTER TABLE runs ADD COLUMN chain_key TEXT;
ALTER TABLE runs ADD COLUMN chain_anchor TEXT;
""",
    # child runs: the run, state and item that started each one
    6: """
ALTER TABLE runs ADD COLUMN parent_run_id TEXT;
ALTER TABLE runs ADD COLUMN parent_state TEXT;
ALTER TABLE runs ADD COLUMN item INTEGER;
""" + _CHILDREN,
    # batches: the batch each run of `orch batch` belongs to
    7: """
ALTER TABLE runs ADD COLUMN batch_id TEXT;
""" + _BATCHES,
    # review gates, forks and experiments: the pending review, the run forked from, experiment and arm
    8: """
ALTER TABLE runs ADD COLUMN review TEXT;
ALTER TABLE runs ADD COLUMN forked_from TEXT;
ALTER TABLE runs ADD COLUMN experiment TEXT;
ALTER TABLE runs ADD COLUMN arm TEXT;
""" + _LINEAGE,
}


def run_script(conn: sqlite3.Connection, script: str) -> None:
    """Statements separated by ';' inside the caller's transaction (executescript would commit)."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def user_version(conn: sqlite3.Connection) -> int:
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    return version


def check_version(conn: sqlite3.Connection, where: str) -> int:
    """The database's schema version (0: a new, empty file), or why it is not ours to use."""
    # one statement, one snapshot: another process may be creating the schema meanwhile
    version, app_id, objects = conn.execute(
        "SELECT (SELECT user_version FROM pragma_user_version), "
        "(SELECT application_id FROM pragma_application_id), (SELECT count(*) FROM sqlite_master)").fetchone()
    if version == 0 and app_id == 0:
        if objects:
            raise ForeignDatabaseError(f"{where} holds another application's tables", where=where)
        return 0
    if app_id != APPLICATION_ID:
        raise ForeignDatabaseError(f"{where} is not a statemachine_orch database", where=where)
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(f"{where} has schema version {version}, newer than this statemachine_orch "
                                 f"understands ({SCHEMA_VERSION})", where=where, fix="upgrade statemachine_orch")
    return int(version)


def create(conn: sqlite3.Connection) -> None:
    """The current schema in an empty database (inside the caller's transaction)."""
    run_script(conn, SCHEMA + VIEWS)
    conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


def upgrade(conn: sqlite3.Connection) -> None:
    """Every migration from the database's version on (inside the caller's transaction)."""
    current = user_version(conn)
    if current >= SCHEMA_VERSION:
        return  # another process upgraded it while we waited for the lock
    run_script(conn, _DROP_VIEWS)
    for version in range(current, SCHEMA_VERSION):
        step = _MIGRATIONS[version]
        if isinstance(step, str):
            run_script(conn, step)
        else:
            step(conn)
    _conform(conn)
    run_script(conn, VIEWS)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


def _columns(conn: sqlite3.Connection, table: str) -> list[tuple[Any, ...]]:
    """(name, type, not null, default) of each column, in order."""
    return [(name, kind, notnull, default)
            for _, name, kind, notnull, default, _ in conn.execute(f"PRAGMA table_info({table})")]


def fresh_columns() -> dict[str, list[tuple[Any, ...]]]:
    """Each table's columns as a new database has them."""
    fresh = sqlite3.connect(":memory:")
    try:
        run_script(fresh, SCHEMA)
        tables = [row[0] for row in fresh.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {table: _columns(fresh, table) for table in tables}
    finally:
        fresh.close()


def _conform(conn: sqlite3.Connection) -> None:
    """Rebuild each table whose columns differ from a new database's (an ALTER TABLE can only
    append a column, and needs a default to add one that is NOT NULL)."""
    import sqlite_utils  # only an upgrade needs it

    db = sqlite_utils.Database(conn, execute_plugins=False, recursive_triggers=False)
    for table, columns in fresh_columns().items():
        now = _columns(conn, table)
        if now == columns:
            continue
        held = {name: bool(notnull) for name, _, notnull, _ in now}
        db.table(table).transform(
            column_order=[name for name, *_ in columns],
            # only the changes: sqlite-utils (4.2) makes a column given False NOT NULL unless it already is
            not_null={name: bool(notnull) for name, _, notnull, _ in columns if bool(notnull) != held.get(name)},
            defaults={name: _default_value(default) for name, _, _, default in columns})


def _default_value(sql: str | None) -> object:
    """A column default as sqlite-utils takes it: SQL `0` is the number 0, `'{}'` the text {}."""
    if sql is None:
        return None
    if sql.startswith("'"):
        return sql[1:-1].replace("''", "'")
    return int(sql) if sql.lstrip("-").isdigit() else float(sql)


def migrate(conn: sqlite3.Connection, where: str, begin: Callable[[], Any]) -> int:
    """Create or upgrade the schema in one transaction (`begin()` opens it, as a context
    manager); return the version found (0: none).

    A file we may not write (or that stays busy) and that needs only an upgrade that adds
    indexes is used as it is, and upgraded the next time it can be."""
    version = check_version(conn, where)
    if version == SCHEMA_VERSION:
        return version
    if version == 0:
        with begin():
            if user_version(conn) == SCHEMA_VERSION:
                return SCHEMA_VERSION  # another process created the schema while we waited for the lock
            check_version(conn, where)
            create(conn)
        return version
    try:
        with begin():  # all steps or none; a concurrent opener waits, then sees it done
            upgrade(conn)
    except StoreError:
        if version < READABLE_FROM:
            raise
    return version


def create_private(path: Path) -> None:
    """Create the database file readable by its owner only; SQLite gives -wal/-shm the same mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)
