"""The PostgreSQL schema: its tables in their own schema (`orch` unless chosen), and its version.

A new database gets the schema when a store first opens it (under an advisory lock, so two
processes opening it at once create it once). Upgrades are never automatic: workers of
several versions may share the database, so `orch db migrate` upgrades it explicitly, and a
store refuses a schema older or newer than its own. The column types give back what the audit
chain hashed when it wrote a row (TEXT, BIGINT, DOUBLE PRECISION, as SQLite does); identifiers
sort as bytes (COLLATE "C"), as in SQLite, whatever the database's locale.
"""

from __future__ import annotations

from typing import Any

from ...errors import ForeignDatabaseError, SchemaVersionError

SCHEMA_VERSION = 2
APPLICATION = "statemachine_orch"
_LOCK = 0x4F524348  # "ORCH": the advisory lock that serialises creating and migrating the schema

# forks by the run they came from (`orch runs --tree`); an experiment's runs by arm (`orch ab report`)
_LINEAGE_INDEXES = """
CREATE INDEX runs_forks ON runs (forked_from, run_id) WHERE forked_from IS NOT NULL;
CREATE INDEX runs_by_experiment ON runs (experiment, arm, run_id) WHERE experiment IS NOT NULL;
"""

# the runs a worker may claim: queued, held (by a lease that may lapse), or waiting (for a review that may time out)
_CLAIMABLE = """
CREATE INDEX runs_claimable ON runs (queue, created_at, run_id)
    WHERE queue IS NOT NULL AND status IN ('pending', 'running', 'waiting');
"""

_TABLES = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs (
    run_id        TEXT COLLATE "C" PRIMARY KEY,
    machine       TEXT COLLATE "C" NOT NULL,
    machine_ref   TEXT NOT NULL,
    machine_hash  TEXT NOT NULL,
    input         TEXT NOT NULL,
    options       TEXT NOT NULL DEFAULT '{}',
    status        TEXT NOT NULL,
    error         TEXT,
    created_at    TEXT COLLATE "C" NOT NULL,
    updated_at    TEXT NOT NULL,
    owner         TEXT,
    owner_info    TEXT,
    in_flight     TEXT,
    last_seq      BIGINT NOT NULL DEFAULT 0,
    steps         BIGINT NOT NULL DEFAULT 0,
    input_tokens  BIGINT NOT NULL DEFAULT 0,
    output_tokens BIGINT NOT NULL DEFAULT 0,
    cost_usd      DOUBLE PRECISION DEFAULT 0,
    cache_hits    BIGINT NOT NULL DEFAULT 0,
    chain_version INTEGER NOT NULL,
    chain_key     TEXT,
    chain_anchor  TEXT,
    parent_run_id TEXT COLLATE "C",
    parent_state  TEXT,
    item          BIGINT,
    batch_id      TEXT COLLATE "C",
    queue         TEXT,
    holder        TEXT,
    lease_epoch   BIGINT NOT NULL DEFAULT 0,
    review        TEXT,
    forked_from   TEXT COLLATE "C",
    experiment    TEXT COLLATE "C",
    arm           TEXT COLLATE "C"
);
CREATE INDEX runs_by_created ON runs (created_at, run_id);
CREATE INDEX runs_by_machine ON runs (machine, created_at);
CREATE INDEX runs_children ON runs (parent_run_id, parent_state, item) WHERE parent_run_id IS NOT NULL;
CREATE INDEX runs_by_batch ON runs (batch_id, run_id) WHERE batch_id IS NOT NULL;
""" + _CLAIMABLE + """CREATE INDEX runs_by_holder ON runs (holder) WHERE holder IS NOT NULL;
""" + _LINEAGE_INDEXES + """CREATE TABLE transitions (
    run_id             TEXT COLLATE "C" NOT NULL REFERENCES runs (run_id),
    seq                BIGINT NOT NULL,
    from_state         TEXT NOT NULL,
    to_state           TEXT,
    decision           TEXT,
    reason             TEXT,
    attempt            BIGINT NOT NULL,
    started_at         TEXT NOT NULL,
    latency_ms         DOUBLE PRECISION NOT NULL,
    source             TEXT NOT NULL,
    input_tokens       BIGINT NOT NULL DEFAULT 0,
    output_tokens      BIGINT NOT NULL DEFAULT 0,
    cache_read_tokens  BIGINT NOT NULL DEFAULT 0,
    cache_write_tokens BIGINT NOT NULL DEFAULT 0,
    cost_usd           DOUBLE PRECISION,
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
CREATE INDEX transitions_by_request_hash ON transitions (request_hash) WHERE request_hash IS NOT NULL;
CREATE TABLE attempts (
    run_id             TEXT COLLATE "C" NOT NULL REFERENCES runs (run_id),
    seq                BIGINT NOT NULL,
    attempt            BIGINT NOT NULL,
    state              TEXT NOT NULL,
    started_at         TEXT NOT NULL,
    kind               TEXT NOT NULL,
    status_code        BIGINT,
    request_id         TEXT,
    delay_s            DOUBLE PRECISION,
    error              TEXT NOT NULL,
    input_tokens       BIGINT NOT NULL DEFAULT 0,
    output_tokens      BIGINT NOT NULL DEFAULT 0,
    cache_read_tokens  BIGINT NOT NULL DEFAULT 0,
    cache_write_tokens BIGINT NOT NULL DEFAULT 0,
    cost_usd           DOUBLE PRECISION,
    request            TEXT,
    response           TEXT,
    PRIMARY KEY (run_id, seq, attempt)
);
CREATE INDEX attempts_in_doubt ON attempts (run_id) WHERE kind = 'in_doubt';
CREATE TABLE takeovers (
    run_id   TEXT COLLATE "C" NOT NULL REFERENCES runs (run_id),
    at       TEXT NOT NULL,
    by_owner TEXT NOT NULL,
    previous TEXT NOT NULL,
    why      TEXT NOT NULL
);
CREATE INDEX takeovers_by_run ON takeovers (run_id, at);
-- One row per process that holds runs: its lease, renewed by its heartbeat (database clock only).
CREATE TABLE workers (
    key          TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    host         TEXT NOT NULL,
    pid          BIGINT NOT NULL,
    queue        TEXT,
    machines     TEXT,
    started_at   TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    expires_at   TIMESTAMPTZ NOT NULL,
    ttl_s        DOUBLE PRECISION NOT NULL,
    stopping     BOOLEAN NOT NULL DEFAULT false
);
CREATE VIEW llm_calls AS
    SELECT run_id, seq, from_state AS state, request_id, request, response,
           input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_usd, started_at, latency_ms
    FROM transitions WHERE source IN ('llm', 'fallback') AND response IS NOT NULL;
CREATE VIEW step_outputs AS
    SELECT run_id, seq, from_state AS state, output FROM transitions
    WHERE output IS NOT NULL AND to_state IS NOT NULL;
CREATE VIEW run_totals AS
    SELECT run_id, count(to_state) AS steps, sum(input_tokens) AS input_tokens,
           sum(output_tokens) AS output_tokens, sum(cache_read_tokens) AS cache_read_tokens,
           sum(cache_write_tokens) AS cache_write_tokens,
           CASE WHEN count(*) FILTER (WHERE cost_usd IS NULL) > 0 THEN NULL ELSE sum(cost_usd) END AS cost_usd,
           count(*) FILTER (WHERE source = 'cache') AS cache_hits, sum(latency_ms) AS latency_ms
    FROM transitions GROUP BY run_id;
"""

# version -> the SQL that brings a schema at that version to the next one
MIGRATIONS: dict[int, str] = {
    # review gates, forks and experiments: the pending review, the run forked from, experiment and arm
    1: """
ALTER TABLE runs ADD COLUMN review TEXT;
ALTER TABLE runs ADD COLUMN forked_from TEXT COLLATE "C";
ALTER TABLE runs ADD COLUMN experiment TEXT COLLATE "C";
ALTER TABLE runs ADD COLUMN arm TEXT COLLATE "C";
DROP INDEX runs_claimable;
""" + _CLAIMABLE + _LINEAGE_INDEXES,
}


def quoted(schema: str) -> str:
    """The schema's name as an SQL identifier (validated: letters, digits and _ only)."""
    return '"' + schema + '"'


def prepare(conn: Any, schema: str, where: str, *, create: bool, upgrade: bool = False) -> tuple[int, int]:
    """Check (and create, or with `upgrade` migrate) the schema on a psycopg connection in
    autocommit mode; return (the version it had before, 0 for none; the version now)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        found = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
        version = _version(conn, schema, where) if found else 0
        if version == SCHEMA_VERSION:
            return version, version
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{where} has statemachine_orch schema version {version}, newer than this statemachine_orch's "
                f"({SCHEMA_VERSION})", where=where, fix="upgrade statemachine_orch")
        if version == 0 and (create or upgrade):
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quoted(schema)}")
            conn.execute(f"SET LOCAL search_path TO {quoted(schema)}")
            conn.execute(_TABLES)
            conn.execute("INSERT INTO meta (key, value) VALUES ('application', %s), ('schema_version', %s)",
                         (APPLICATION, str(SCHEMA_VERSION)))
            return version, SCHEMA_VERSION
        if version == 0:
            raise SchemaVersionError(f"{where} has no statemachine_orch schema {schema!r}", where=where,
                                     fix="create it with `orch db migrate`")
        if not upgrade:
            raise SchemaVersionError(
                f"{where} has statemachine_orch schema version {version}, older than this statemachine_orch's "
                f"({SCHEMA_VERSION})", where=where, fix="upgrade it with `orch db migrate` (stop older workers first)")
        conn.execute(f"SET LOCAL search_path TO {quoted(schema)}")
        for step in range(version, SCHEMA_VERSION):
            conn.execute(MIGRATIONS[step])
        conn.execute("UPDATE meta SET value = %s WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
        return version, SCHEMA_VERSION


def _version(conn: Any, schema: str, where: str) -> int:
    """The schema's version: 0 when it holds no table yet (made by hand, say)."""
    tables = {row[0] for row in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,))}
    if not tables:
        return 0
    rows = dict(conn.execute(f"SELECT key, value FROM {quoted(schema)}.meta").fetchall()) if "meta" in tables else {}
    if rows.get("application") != APPLICATION:
        raise ForeignDatabaseError(f"schema {schema!r} of {where} was not made by statemachine_orch", where=where)
    try:
        return int(rows["schema_version"])
    except (KeyError, ValueError):
        raise ForeignDatabaseError(f"schema {schema!r} of {where} has no readable schema version",
                                   where=where) from None
