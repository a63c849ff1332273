"""SQLite store: one file, WAL, one short transaction per transition; `store.db` is sqlite-utils.

Layout (schema version 3, see docs/storage.md):
  runs         one row per run: identity, input, status, owner and running totals. With the
               run's last log row it is the resumable snapshot, so a transition writes one
               INSERT and one UPDATE (the totals, fenced on the owner), never a snapshot copy.
  transitions  the append-only log: one row per step, with the step's output and the LLM
               request/response/usage of its call. Views `llm_calls`, `step_outputs` and
               `run_totals` present the same rows by concept.

Writes happen after a step completes and never across a network call. Each uses
`BEGIN IMMEDIATE`, so a busy database waits (busy timeout) instead of failing half-way,
and is fenced on the owner token and on (run_id, seq) uniqueness.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from functools import cache, cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .errors import (
    CorruptRunError,
    OwnershipLostError,
    RunBusyError,
    RunNotFoundError,
    SchemaVersionError,
    StoreError,
    UsageError,
)
from .faults import ARMED, kill_point
from .ownership import Owner, is_alive, owner_from_json
from .store import MachineTotals, RunSummary
from .types import Attempt, RunRecord, RunStatus, TransitionRecord, Usage, now_iso

if TYPE_CHECKING:
    import sqlite_utils

SCHEMA_VERSION = 4
READABLE_FROM = 3  # the oldest version whose files work unmigrated (later versions only add indexes)
APPLICATION_ID = 0x4F524348  # "ORCH": marks a database as ours
Synchronous = Literal["FULL", "NORMAL"]

# Per-machine totals for `orch runs`: finished runs enter the covering index once, when they
# finish (steps never update it); the unfinished ones are few and read from their rows.
_TOTALS_INDEXES = """
CREATE INDEX runs_finished_totals ON runs (machine, status, steps, input_tokens, output_tokens, cost_usd,
    cache_hits) WHERE status IN ('completed', 'terminated');
CREATE INDEX runs_unfinished ON runs (machine, status) WHERE status NOT IN ('completed', 'terminated');
"""

_SCHEMA = """
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
    cache_hits    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX runs_by_created ON runs (created_at, run_id);
CREATE INDEX runs_by_machine ON runs (machine, created_at);
CREATE TABLE transitions (
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
""" + _TOTALS_INDEXES

# Cost sums are NULL when any paid call had no known price (SQL sum() would skip it).
_VIEWS = """
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

# version -> statements that bring a database at that version to the next one
_MIGRATIONS: dict[int, str] = {
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
}

_CHAINED_COLUMNS = (
    "run_id, seq, from_state, to_state, decision, reason, attempt, started_at, latency_ms, source, "
    "input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_usd, error, output, "
    "request, response, request_id, request_hash, in_doubt"
)
# The fence: the run's totals (and its status, when it changes) are updated only while we
# own it; no row changed means another process took the run, and nothing is inserted.
# `_STEP` is the common case of `_ADVANCE` (the run goes on, its status stays): fewer terms.
_STEP = (
    "UPDATE runs SET last_seq = ?1, steps = steps + ?2, input_tokens = input_tokens + ?3, "
    "output_tokens = output_tokens + ?4, cache_hits = cache_hits + ?5, "
    "cost_usd = CASE WHEN cost_usd IS NULL OR ?6 IS NULL THEN NULL ELSE cost_usd + ?6 END "
    "WHERE run_id = ?7 AND owner = ?8"
)
_ADVANCE = (
    "UPDATE runs SET last_seq = :seq, steps = steps + :step, input_tokens = input_tokens + :input_tokens, "
    "output_tokens = output_tokens + :output_tokens, cache_hits = cache_hits + :cache_hit, "
    "cost_usd = CASE WHEN cost_usd IS NULL OR :cost IS NULL THEN NULL ELSE cost_usd + :cost END, "
    "status = coalesce(:status, status), "
    "error = CASE WHEN :status IS NULL THEN error ELSE :error END, "
    "updated_at = CASE WHEN :status IS NULL THEN updated_at ELSE :now END, "
    "owner = CASE WHEN :release THEN NULL ELSE owner END, "
    "owner_info = CASE WHEN :release THEN NULL ELSE owner_info END "
    "WHERE run_id = :run_id AND owner = :owner"
)
_APPEND = f"INSERT INTO transitions ({_CHAINED_COLUMNS}, chain) VALUES ({','.join('?' * 23)})"
_APPEND_ATTEMPT = (
    "INSERT INTO attempts (run_id, seq, attempt, state, started_at, kind, status_code, request_id, "
    "delay_s, error, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_usd, "
    "request, response) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
_SET_STATUS = (
    "UPDATE runs SET status = ?, error = ?, updated_at = ?, "
    "owner = CASE WHEN ? THEN owner ELSE NULL END, "
    "owner_info = CASE WHEN ? THEN owner_info ELSE NULL END "
    "WHERE run_id = ? AND owner = ?"
)


def _dump(value: Any) -> str | None:
    """Compact JSON text, non-ASCII kept; pydantic-core's encoder (models included) is several
    times faster than the json module's for the request and response on every row."""
    if value is None:
        return None
    return _encoder()(value).decode()


@cache
def _encoder() -> Callable[[Any], bytes]:
    """pydantic-core's `to_json`, imported on the first write: reading commands never load it."""
    from pydantic_core import to_json

    return to_json


def _load(text: str | None, *where: object) -> Any:
    """A stored JSON value; anything else (truncated JSON, a pickle, binary junk) is refused.

    `where` names the value ("run", id, "seq", 2, "output"), joined only if it is refused."""
    if text is None:
        return None
    try:
        if not isinstance(text, str):
            raise ValueError(f"a {type(text).__name__} value where JSON text belongs")
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        what = " ".join(map(str, where)) or "a stored value"
        raise CorruptRunError(f"{what} is not valid JSON ({str(exc)[:80]}); this run "
                              "cannot be read or resumed (other runs are unaffected); restore the "
                              "database from a backup") from None


class SQLiteStore:
    """The default store: a local SQLite file, safe for many processes on one machine."""

    def __init__(
        self,
        path: str | os.PathLike[str] = "orch.db",
        *,
        synchronous: Synchronous = "FULL",
        busy_timeout_s: float = 30.0,
        create: bool = True,
    ) -> None:
        self.path = Path(path)
        if synchronous not in ("FULL", "NORMAL"):
            raise UsageError(f"synchronous={synchronous!r} is not supported; use 'FULL' or 'NORMAL'")
        if not self.path.exists():
            if not create:
                raise UsageError(f"no database at {self.path}; start a run first or pass --db PATH")
            _create_private(self.path)
        self._busy_timeout_s = busy_timeout_s
        self._chains: dict[str, tuple[int, str]] = {}  # run -> (seq, chain) of its last row here
        self._marks: sqlite3.Connection | None = None
        # A closed WAL database in a directory we cannot write: SQLite could not create the
        # -shm file it needs even to read, so open it immutable (reads work, writes say read-only).
        frozen = not os.access(self.path.parent, os.W_OK) and not Path(f"{self.path}-wal").exists()
        conn = self.conn = _connect(self.path, busy_timeout_s, immutable=frozen)
        try:
            if not frozen:
                self._while_busy(lambda: conn.execute("PRAGMA journal_mode=WAL"))
            conn.execute(f"PRAGMA synchronous={synchronous}")
            self._while_busy(self._migrate)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(f"{self.path} is not a usable SQLite database: {exc}") from exc
        except StoreError:
            conn.close()
            raise

    @cached_property
    def db(self) -> sqlite_utils.Database:
        """The same connection as a `sqlite_utils.Database`, for your own queries and tools.

        Built on first use: the store's own statements are prepared SQL on the connection,
        so `orch runs` and friends start without importing sqlite-utils."""
        import sqlite_utils

        return sqlite_utils.Database(self.conn, execute_plugins=False, recursive_triggers=False)

    def _query(self, sql: str, params: Sequence[Any] = ()) -> Iterator[dict[str, Any]]:
        cursor = self.conn.execute(sql, params)
        names = [column[0] for column in cursor.description]
        for row in cursor:
            yield dict(zip(names, row, strict=True))

    def _while_busy(self, action: Callable[[], object]) -> None:
        """Run `action`, retrying while another opener holds the file (switching a new file to
        WAL and creating the schema do not always wait on the busy handler), up to the timeout."""
        deadline, delay = time.monotonic() + self._busy_timeout_s, 0.001
        while True:
            try:
                action()
                return
            except (sqlite3.OperationalError, StoreError) as exc:
                if not _is_busy(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    # ------------------------------------------------------------------ schema

    def _migrate(self) -> None:
        conn = self.conn
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        if version == 0 and app_id == 0:
            with self._write():
                if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
                    return  # another process created the schema while we waited for the lock
                if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                    raise StoreError(
                        f"{self.path} holds another application's tables; use a new file with --db"
                    )
                _run_script(conn, _SCHEMA + _VIEWS)
                conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            return
        if app_id != APPLICATION_ID:
            raise StoreError(f"{self.path} is not a statemachine_orch database; use a new file with --db")
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{self.path} has schema version {version}, newer than this statemachine_orch "
                f"understands ({SCHEMA_VERSION}); upgrade statemachine_orch"
            )
        if version < SCHEMA_VERSION:
            try:
                with self._write():  # all steps or none; a concurrent opener waits, then sees it done
                    current = conn.execute("PRAGMA user_version").fetchone()[0]
                    for step in range(current, SCHEMA_VERSION):
                        _run_script(conn, _MIGRATIONS[step])
                    if current < SCHEMA_VERSION:
                        _run_script(conn, _VIEWS)
                        _chain_unchained_rows(conn)
                        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            except StoreError:
                if version < READABLE_FROM:
                    raise
                # what is missing only makes queries faster: a file we cannot write (or that is
                # busy) is used as it is, and upgraded the next time it can be

    def _write(self) -> _Transaction:
        """One IMMEDIATE transaction: take the write lock up front, wait if busy, all or nothing."""
        return _Transaction(self.conn, self.path)

    # ------------------------------------------------------------------ the engine's verbs

    def create_run(self, run: RunRecord, owner: Owner) -> None:
        try:
            self._insert_run(run, owner)
        except StoreError as exc:
            if isinstance(exc.__cause__, sqlite3.IntegrityError):
                raise UsageError(f"run {run.run_id} already exists in {self.path}; resume it with "
                                 f"`orch resume {run.run_id}` or choose another id") from None
            raise
        self._chains[run.run_id] = (0, first_link(run.run_id))  # no log yet: step 1 chains to this

    def _insert_run(self, run: RunRecord, owner: Owner) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO runs (run_id, machine, machine_ref, machine_hash, input, options, status, "
                "error, created_at, updated_at, owner, owner_info) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (run.run_id, run.machine, run.machine_ref, run.machine_hash, _dump(run.input),
                 _dump(run.options), run.status.value, run.error, run.created_at, run.updated_at,
                 owner.token, owner.info_json()),
            )

    def claim_run(self, run_id: str, owner: Owner, *, options: dict[str, Any] | None = None
                  ) -> tuple[RunRecord, list[TransitionRecord]]:
        with self._write() as conn:
            row = conn.execute(
                "SELECT status, owner, owner_info FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
            if row is None:
                raise RunNotFoundError(f"no run {run_id!r} in {self.path}; list runs with `orch runs`")
            status, current, info = row
            if RunStatus(status).finished:
                raise UsageError(f"run {run_id} is already {status}; nothing to resume")
            holder = owner_from_json(info)
            if current is not None and (holder is None or is_alive(holder)):
                who = holder.describe() if holder else "an unknown process"
                raise RunBusyError(
                    f"run {run_id} is being driven by {who}; wait for it to finish or stop it first"
                )
            conn.execute(
                "UPDATE runs SET status = ?, error = NULL, updated_at = ?, owner = ?, owner_info = ?, "
                "options = coalesce(?, options) WHERE run_id = ?",
                (RunStatus.RUNNING.value, now_iso(), owner.token, owner.info_json(), _dump(options),
                 run_id),
            )
        return self.load_run(run_id)

    def load_run(self, run_id: str) -> tuple[RunRecord, list[TransitionRecord]]:
        """The run row and its log as of one moment: read in one transaction, so a step that
        another process commits in between cannot show a finished log with a running row."""
        conn = self.conn
        conn.execute("BEGIN")
        try:
            return self.get_run(run_id), self.transitions(run_id)
        finally:
            conn.execute("COMMIT")

    def append(
        self,
        record: TransitionRecord,
        owner: Owner,
        *,
        status: RunStatus | None = None,
        error: str | None = None,
    ) -> None:
        r = record
        u = r.usage
        request = _dump(r.request)  # retried attempts usually carry this same body: encoded once
        content = (
            r.run_id, r.seq, r.from_state, r.to_state, r.decision, r.reason, r.attempt, r.started_at,
            r.latency_ms, r.source, u.input_tokens, u.output_tokens, u.cache_read_tokens,
            u.cache_write_tokens, r.cost_usd, r.error, _dump(r.output), request,
            _dump(r.response), r.request_id, r.request_hash, int(r.in_doubt),
        )
        final = status is not None and status is not RunStatus.RUNNING
        try:
            with self._write() as conn:
                previous = self._chains.get(r.run_id)
                if previous is None or previous[0] != r.seq - 1:
                    previous = (r.seq - 1, _last_chain(conn, r.run_id))
                chain = chain_hash(previous[1], content)
                if status is None:
                    fenced = conn.execute(_STEP, (
                        r.seq, r.to_state is not None, u.input_tokens, u.output_tokens, r.source == "cache",
                        r.cost_usd, r.run_id, owner.token))
                else:
                    fenced = conn.execute(_ADVANCE, {
                        "seq": r.seq, "step": r.to_state is not None, "input_tokens": u.input_tokens,
                        "output_tokens": u.output_tokens, "cache_hit": r.source == "cache", "cost": r.cost_usd,
                        "status": status.value, "error": error, "now": now_iso(), "release": final,
                        "run_id": r.run_id, "owner": owner.token})
                if fenced.rowcount != 1:
                    raise OwnershipLostError(
                        f"run {r.run_id} was taken over by another process; this process stopped "
                        f"before writing step {r.seq}"
                    )
                conn.execute(_APPEND, (*content, chain))
                if r.attempts:
                    conn.executemany(_APPEND_ATTEMPT, [
                        (r.run_id, r.seq, a.number, r.from_state, a.started_at, a.kind, a.status_code,
                         a.request_id, a.delay_s, a.error, a.usage.input_tokens, a.usage.output_tokens,
                         a.usage.cache_read_tokens, a.usage.cache_write_tokens, a.cost_usd,
                         request if a.request is r.request else _dump(a.request), _dump(a.response))
                        for a in r.attempts])
                if ARMED:
                    kill_point("mid_commit")
            if not final:
                self._chains[r.run_id] = (r.seq, chain)
            else:
                self._chains.pop(r.run_id, None)  # the run is over here: keep no state for it
        except StoreError as exc:
            if isinstance(exc.__cause__, sqlite3.IntegrityError):
                raise OwnershipLostError(
                    f"run {r.run_id} already has step {r.seq}: another process advanced it"
                ) from exc
            raise

    def release(self, run_id: str, owner: Owner, status: RunStatus, error: str | None) -> None:
        with self._write() as conn:
            self._set_status(conn, run_id, owner, status, error)
        self._chains.pop(run_id, None)

    def mark_in_flight(self, run_id: str, owner: Owner, seq: int, state: str) -> None:
        """Note, before a paid call is sent, that step `seq` has a call in flight.

        A resume that finds the mark ahead of the log knows the call may have been paid
        already and flags the step it re-sends (`in_doubt`). Written on a second connection
        with synchronous=OFF: it survives a killed process (not a power cut) for a fraction of
        a durable commit's cost. Fenced like every write: no mark, no call.
        """
        marks = self._marks
        if marks is None:
            marks = self._marks = _connect(self.path, self._busy_timeout_s)
            marks.execute("PRAGMA synchronous=OFF")
        mark = json.dumps({"seq": seq, "state": state, "at": now_iso()}, separators=(",", ":"))
        try:
            marks.execute("BEGIN IMMEDIATE")
            updated = marks.execute("UPDATE runs SET in_flight = ? WHERE run_id = ? AND owner = ?",
                                    (mark, run_id, owner.token)).rowcount
            marks.execute("COMMIT")
        except sqlite3.Error as exc:
            if marks.in_transaction:
                marks.execute("ROLLBACK")
            hint = "; retry when the database is free" if _is_busy(exc) else ""
            raise StoreError(f"cannot write to {self.path}: {exc}; no call was made{hint}") from exc
        if updated != 1:
            raise OwnershipLostError(f"run {run_id} was taken over by another process; no call was made")

    @staticmethod
    def _set_status(
        conn: sqlite3.Connection, run_id: str, owner: Owner, status: RunStatus, error: str | None
    ) -> None:
        keep = status is RunStatus.RUNNING
        conn.execute(_SET_STATUS, (status.value, error, now_iso(), keep, keep, run_id, owner.token))

    # ------------------------------------------------------------------ reading

    def get_run(self, run_id: str) -> RunRecord:
        rows = list(self._query("SELECT * FROM runs WHERE run_id = ?", [run_id]))
        if not rows:
            raise RunNotFoundError(f"no run {run_id!r} in {self.path}; list runs with `orch runs`")
        row = rows[0]
        return RunRecord(
            run_id=row["run_id"], machine=row["machine"], machine_ref=row["machine_ref"],
            machine_hash=row["machine_hash"], input=_load(row["input"], "run", run_id, "input"),
            status=RunStatus(row["status"]), created_at=row["created_at"],
            updated_at=row["updated_at"], error=row["error"],
            options=_load(row["options"], "run", run_id, "options") or {},
            owner=row["owner"], in_flight=_load(row["in_flight"], "run", run_id, "in-flight mark"),
        )

    def owner_of(self, run_id: str) -> Owner | None:
        row = self.conn.execute("SELECT owner_info FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return owner_from_json(row[0]) if row else None

    def transitions(self, run_id: str) -> list[TransitionRecord]:
        attempts: dict[int, list[Attempt]] = {}
        for a in self.attempts(run_id):
            attempts.setdefault(a[0], []).append(a[1])
        return [_transition(row, attempts.get(row["seq"], [])) for row in self._query(
            "SELECT * FROM transitions WHERE run_id = ? ORDER BY seq", [run_id])]

    def attempts(self, run_id: str) -> list[tuple[int, Attempt]]:
        """(seq, attempt) for every recorded failed attempt of a run, in order."""
        return [
            (row["seq"], Attempt(
                number=row["attempt"], started_at=row["started_at"], kind=row["kind"],
                error=row["error"], status_code=row["status_code"], request_id=row["request_id"],
                delay_s=row["delay_s"], usage=_usage(row), cost_usd=row["cost_usd"],
                request=_load(row["request"], "run", run_id, "seq", row["seq"], "attempt", row["attempt"],
                              "request"),
                response=_load(row["response"], "run", run_id, "seq", row["seq"], "attempt", row["attempt"],
                               "response")))
            for row in self._query(
                "SELECT * FROM attempts WHERE run_id = ? ORDER BY seq, attempt", [run_id])
        ]

    def find_cached(self, request_hash: str) -> TransitionRecord | None:
        """An earlier successful call with exactly this request (the step cache)."""
        for row in self._query(
            "SELECT * FROM transitions WHERE request_hash = ? AND response IS NOT NULL "
            "AND to_state IS NOT NULL AND source IN ('llm', 'fallback') LIMIT 1", [request_hash]):
            return _transition(row, [])
        return None

    def list_runs(
        self,
        *,
        machine: str | None = None,
        status: str | None = None,
        limit: int = 50,
    ) -> list[RunSummary]:
        where: list[str] = []
        params: list[Any] = []
        if machine:
            where.append("r.machine = ?")
            params.append(machine)
        if status:
            where.append("r.status = ?")
            params.append(status)
        sql = (
            "SELECT r.run_id, r.machine, r.status, r.created_at, r.updated_at, r.error, r.owner_info, "
            "r.steps, r.input_tokens, r.output_tokens, r.cost_usd "
            "FROM runs r "
            + ("WHERE " + " AND ".join(where) + " " if where else "")
            + "ORDER BY r.created_at DESC, r.run_id DESC LIMIT ?"
        )
        params.append(limit)
        summaries = []
        for row in self._query(sql, params):
            holder = owner_from_json(row.pop("owner_info"))
            stale = row["status"] == RunStatus.RUNNING.value and (holder is None or not is_alive(holder))
            summaries.append(RunSummary(**row, stale=stale))
        return summaries

    def machine_totals(self, machines: Sequence[str]) -> list[MachineTotals]:
        """Runs, committed steps, paid tokens, cost and cache hits per machine."""
        if not machines:
            return []
        marks = ",".join("?" * len(machines))
        # finished runs and the others apart: each WHERE matches one of `_TOTALS_INDEXES`
        part = ("SELECT machine, count(*) AS runs, sum(steps) AS steps, sum(input_tokens) AS input_tokens, "
                "sum(output_tokens) AS output_tokens, sum(cost_usd IS NULL) AS unpriced, sum(cost_usd) AS cost_usd, "
                f"sum(cache_hits) AS cache_hits FROM runs WHERE machine IN ({marks}) AND status ")
        return [MachineTotals(**row) for row in self._query(
            "SELECT machine, sum(runs) AS runs, sum(steps) AS steps, sum(input_tokens) AS input_tokens, "
            "sum(output_tokens) AS output_tokens, "
            "CASE WHEN sum(unpriced) > 0 THEN NULL ELSE sum(cost_usd) END AS cost_usd, "
            f"sum(cache_hits) AS cache_hits FROM ({part}IN ('completed', 'terminated') GROUP BY machine "
            f"UNION ALL {part}NOT IN ('completed', 'terminated') GROUP BY machine) "
            "GROUP BY machine ORDER BY machine", [*machines, *machines])]

    def all_run_ids(self) -> list[str]:
        return [row[0] for row in self.conn.execute("SELECT run_id FROM runs ORDER BY created_at, run_id")]

    def run_ids(self, machine: str) -> Sequence[str]:
        return [row["run_id"] for row in self._query(
            "SELECT run_id FROM runs WHERE machine = ? ORDER BY created_at, run_id", [machine])]

    def verify_chain(self, run_id: str) -> str | None:
        """None when the run's log is intact, else what is wrong and at which row."""
        expected_seq, previous = 1, first_link(run_id)
        for row in self.conn.execute(
                f"SELECT {_CHAINED_COLUMNS}, chain FROM transitions WHERE run_id = ? ORDER BY seq",
                (run_id,)):
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
        row = self.conn.execute("SELECT last_seq FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        last = expected_seq - 1
        if row is not None and row[0] > last:
            return (f"row seq {last + 1} is missing (deleted): the run was advanced to seq {row[0]}, "
                    f"its log ends at seq {last}")
        if row is not None and row[0] < last:
            return f"row seq {row[0] + 1} was added after the run's last recorded step (seq {row[0]})"
        return None

    def close(self) -> None:
        if self._marks is not None:
            self._marks.close()
        self.conn.close()


class _Transaction:
    """`with store._write() as conn:` BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error
    (sqlite3 errors raised as StoreError). A class, not a generator: it wraps every step."""

    __slots__ = ("conn", "path")

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path

    def __enter__(self) -> sqlite3.Connection:
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreError(f"cannot write to {self.path}: {exc}; retry when the database is free") from exc
        return self.conn

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        conn = self.conn
        if exc is None:
            try:
                conn.execute("COMMIT")
                return
            except BaseException as failed:
                exc = failed
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise StoreError(f"cannot write to {self.path}: {exc}") from exc
        if kind is None:
            raise exc  # COMMIT itself failed with something other than a sqlite3 error


def _connect(path: Path, busy_timeout_s: float, *, immutable: bool = False) -> sqlite3.Connection:
    from urllib.parse import quote  # here: only a read-only directory needs it

    target = f"file:{quote(str(path.absolute()))}?immutable=1" if immutable else path
    try:
        return sqlite3.connect(target, isolation_level=None, timeout=busy_timeout_s, check_same_thread=False,
                               uri=immutable)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open database {path}: {exc}") from exc


def _is_busy(exc: Exception) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


def chain_hash(previous: str, content: tuple[Any, ...]) -> str:
    """sha256 over the previous row's hash and this row's stored values (response included).

    The values are hashed as their Python repr: unambiguous for the SQL types (text, integer,
    real, NULL, and a BLOB someone planted), and one C call instead of re-encoding the JSON
    columns. The first row chains to sha256 of the run id, so rows cannot move between runs.
    """
    digest = _sha256()(previous.encode())
    digest.update(repr(content).encode())
    hexdigest: str = digest.hexdigest()
    return hexdigest


def first_link(run_id: str) -> str:
    """What a run's first row chains to: sha256 of its id, so rows cannot move between runs."""
    return chain_hash("", (run_id,))


@cache
def _sha256() -> Callable[[bytes], Any]:
    """hashlib's sha256, imported on first use: `orch runs`/`log`/`show` never hash."""
    from hashlib import sha256

    return sha256


def _last_chain(conn: sqlite3.Connection, run_id: str) -> str:
    row = conn.execute("SELECT chain FROM transitions WHERE run_id = ? ORDER BY seq DESC LIMIT 1",
                       (run_id,)).fetchone()
    return row[0] if row else first_link(run_id)


def _chain_unchained_rows(conn: sqlite3.Connection) -> None:
    """Rows written before the audit chain existed get one when the schema is upgraded."""
    runs = [r[0] for r in conn.execute("SELECT DISTINCT run_id FROM transitions WHERE chain = ''")]
    for run_id in runs:
        previous = first_link(run_id)
        for row in conn.execute(f"SELECT {_CHAINED_COLUMNS} FROM transitions WHERE run_id = ? "
                                "ORDER BY seq", (run_id,)).fetchall():
            previous = chain_hash(previous, tuple(row))
            conn.execute("UPDATE transitions SET chain = ? WHERE run_id = ? AND seq = ?",
                         (previous, run_id, row[1]))


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    """Statements separated by ';' inside the caller's transaction (executescript would commit)."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def _usage(row: dict[str, Any]) -> Usage:
    return Usage(input_tokens=row["input_tokens"], output_tokens=row["output_tokens"],
                 cache_read_tokens=row["cache_read_tokens"], cache_write_tokens=row["cache_write_tokens"])


def _transition(row: dict[str, Any], attempts: list[Attempt]) -> TransitionRecord:
    return TransitionRecord(
        run_id=row["run_id"], seq=row["seq"], from_state=row["from_state"], to_state=row["to_state"],
        decision=row["decision"], reason=row["reason"], attempt=row["attempt"],
        started_at=row["started_at"], latency_ms=row["latency_ms"], source=row["source"],
        output=_load(row["output"], "run", row["run_id"], "seq", row["seq"], "output"),
        error=row["error"], request=_load(row["request"], "run", row["run_id"], "seq", row["seq"], "request"),
        response=_load(row["response"], "run", row["run_id"], "seq", row["seq"], "response"),
        request_id=row["request_id"], usage=_usage(row),
        cost_usd=row["cost_usd"], request_hash=row["request_hash"], in_doubt=bool(row["in_doubt"]),
        attempts=attempts,
    )


def _create_private(path: Path) -> None:
    """Create the database file readable by its owner only; SQLite gives -wal/-shm the same mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)
