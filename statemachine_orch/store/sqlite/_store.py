"""The SQLite store: one file, WAL, one short transaction per transition.

`runs` holds one row per run (identity, input, status, owner and running totals); with the
run's last log row it is the resumable snapshot, so a transition writes one INSERT and one
UPDATE (the totals, fenced on the owner), never a snapshot copy. `transitions` is the
append-only log, `attempts` the failed model calls; the schema is in `_schema`, the audit
chain in `_chain`, the JSON of stored values in `_rows`, the lock handling in `_transaction`
(docs/storage.md).

Statements are plain SQL on `sqlite3`: the per-step write is a few prepared statements inside
one IMMEDIATE transaction, and reading commands start without importing sqlite-utils (which
serves the schema upgrades and `store.db`). A write never spans a network call.

Writes are group-committed (`_group`): the steps of many runs that finish close together share
one transaction and one fsync, and each step's await returns once its own row is durable.
Waiting never blocks the event loop. The store's own connection never waits for a lock: a
read (or a lone write) runs at once when the database is free (the common case); when another
connection holds the write lock, it waits in a worker thread on a connection of its own, up to
the busy timeout, while the event loop and the other runs on it go on.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from ...errors import (
    DatabaseNotFoundError,
    OwnershipLostError,
    RunBusyError,
    RunExistsError,
    RunFinishedError,
    RunNotFoundError,
    StoreError,
    UsageError,
)
from ...types import Attempt, Parent, RunRecord, RunStatus, Takeover, TransitionRecord, child_place, now_iso
from .._chain import CANONICAL, AuditKey
from .._contract import LINEAGE_COLUMNS, MachineTotals, RunSummary, out_of_order, run_filters
from .._owner import Owner, owner_from_json, who_am_i
from .._rows import attempt_of, attempt_rows, dump, run_identity, run_of, text, transition_of, transition_row
from ._chain import last_link, require_intact, verify
from ._group import GroupCommit
from ._liveness import hold, liveness, owners_file, stale
from ._schema import SCHEMA_VERSION, create_private, migrate
from ._statements import ADVANCE, APPEND, APPEND_ATTEMPT, IN_DOUBT_BY_MACHINE, IN_DOUBT_OF_RUN, SET_STATUS, STEP
from ._transaction import Busy, Transaction, busy_as, connect, while_busy

if TYPE_CHECKING:
    import sqlite_utils

Synchronous = Literal["FULL", "NORMAL"]
SQLTracer = Callable[[str, Any], None]
"""`tracer(sql, params)`, called before each statement the store executes (as in sqlite-utils)."""
T = TypeVar("T")
_FINISHED = (RunStatus.COMPLETED.value, RunStatus.TERMINATED.value)
_SUMMARY = ("run_id, machine, status, created_at, updated_at, error, owner_info, steps, input_tokens, output_tokens, "
            f"cost_usd, {IN_DOUBT_OF_RUN}")

class SQLiteStore:
    """The default store: a local SQLite file, safe for many processes on one machine.

    `synchronous="FULL"` (the default) makes each commit survive a power loss; "NORMAL"
    survives a crashed process only. `create=False` refuses a path with no database
    (`DatabaseNotFoundError`). `tracer(sql, params)` sees every statement before it runs.
    `audit_key` keys the audit chains it writes and checks (HMAC-SHA256; None: ORCH_AUDIT_KEY, "": none).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = "orch.db",
        *,
        synchronous: Synchronous = "FULL",
        busy_timeout_s: float = 30.0,
        create: bool = True,
        tracer: SQLTracer | None = None,
        audit_key: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.where = str(path)
        self._owners = owners_file(self.path)
        if synchronous not in ("FULL", "NORMAL"):
            raise UsageError(f"synchronous={synchronous!r} is not supported", fix="use 'FULL' or 'NORMAL'")
        if not self.path.exists():
            if not create:
                raise DatabaseNotFoundError(self.where)
            create_private(self.path)
        self.synchronous = synchronous
        self.busy_timeout_s = busy_timeout_s
        self.tracer = tracer
        self._audit = AuditKey(os.environ.get("ORCH_AUDIT_KEY") if audit_key is None else audit_key)
        self._chains: dict[str, tuple[int, str, int]] = {}  # run -> (seq, chain, version) of its last row here
        self._marks: sqlite3.Connection | None = None
        self._writes = GroupCommit(self, lambda: self.conn, lambda: self._connect(wait=True))
        self._mark_writes = GroupCommit(self, self._marks_connection, lambda: self._connect(wait=True, marks=True))
        # A closed WAL database in a directory we cannot write: SQLite could not create the
        # -shm file it needs even to read, so open it immutable (reads work, writes say read-only).
        self._immutable = not os.access(self.path.parent, os.W_OK) and not Path(f"{self.path}-wal").exists()
        conn = self.conn = self._connect(wait=False)
        try:
            found = while_busy(lambda: migrate(conn, self.where, lambda: Transaction(self, conn, waited=True)),
                               self.busy_timeout_s)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(f"{self.where} is not a usable SQLite database: {exc}", where=self.where) from exc
        except BaseException:
            conn.close()
            raise
        self.schema_versions = (found, SCHEMA_VERSION)  # (found, now): what opening it did
        # a file of an older version, opened read-only, lacks the columns of later features (and their runs)
        self._columns = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
        self._summary = _SUMMARY + (f", {LINEAGE_COLUMNS}" if "arm" in self._columns else "")

    @cached_property
    def db(self) -> sqlite_utils.Database:
        """The same connection as a `sqlite_utils.Database`, for your own queries and tools."""
        import sqlite_utils

        return sqlite_utils.Database(self.conn, execute_plugins=False, recursive_triggers=False)

    @property
    def commit_stats(self) -> tuple[int, int]:
        """(transactions committed, writes they held) by this store's durable writes: how well
        group commit grouped them."""
        return self._writes.commits, self._writes.writes

    # ------------------------------------------------------------------ the engine's writes

    async def create_run(self, run: RunRecord, owner: Owner, *, log: Sequence[TransitionRecord] = ()) -> None:
        link = await self._write(self._create_run, run, owner, log)
        self._chains[run.run_id] = (log[-1].seq if log else 0, link, CANONICAL)  # what the next step chains to

    def _create_run(self, conn: sqlite3.Connection, run: RunRecord, owner: Owner,
                    log: Sequence[TransitionRecord]) -> str:
        """The run row, with the anchor of its audit chain, and its first steps `log` (fenced as
        `append` fences them): the chain link the next step follows (returned)."""
        hold(self._owners, owner)
        identity = run_identity(run, CANONICAL, self._audit.id)
        anchor = self._audit.anchor(identity)
        try:
            self._sql(conn, "INSERT INTO runs (run_id, machine, machine_ref, machine_hash, input, created_at, "
                            "chain_version, chain_key, parent_run_id, parent_state, item, batch_id, forked_from, "
                            "experiment, arm, chain_anchor, options, status, error, updated_at, owner, owner_info) "
                            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                      (*identity.values(), anchor, dump(run.options), run.status.value, text(run.error),
                       run.updated_at, owner.token, owner.info_json()))
        except sqlite3.IntegrityError:
            raise RunExistsError(run.run_id, where=self.where) from None
        for step in log:
            anchor = self._append(conn, step, owner, None, None, False)[0]
        return anchor

    async def claim_run(self, run_id: str, owner: Owner, *, options: dict[str, Any] | None = None,
                        take_over: bool = False) -> tuple[RunRecord, list[TransitionRecord]]:
        await self._write(self._claim_run, run_id, owner, options, take_over)
        return await self.load_run(run_id)

    def _claim_run(self, conn: sqlite3.Connection, run_id: str, owner: Owner,
                   options: dict[str, Any] | None, take_over: bool) -> None:
        row = self._sql(conn, "SELECT status, owner, owner_info FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise RunNotFoundError(run_id, where=self.where)
        status, current, info = row
        if status in _FINISHED:
            raise RunFinishedError(run_id, status)
        hold(self._owners, owner)
        if current is not None:
            holder = owner_from_json(info)
            judged = "unknown" if holder is None else liveness(self._owners, holder)
            if judged == "alive" or (judged == "unknown" and not take_over):
                raise RunBusyError(run_id, holder=holder.describe() if holder else "an unknown process",
                                   proven=judged == "alive")
            why = ("its liveness lock was free" if holder is not None and holder.lock is not None
                   else "its process is gone" if judged == "gone" else "declared gone with --take-over")
            self._sql(conn, "INSERT INTO takeovers (run_id, at, by_owner, previous, why) VALUES (?,?,?,?,?)",
                      (run_id, now_iso(), who_am_i(owner), holder.describe() if holder else "an unknown process",
                       why))
        self._sql(conn, "UPDATE runs SET status = ?, error = NULL, updated_at = ?, owner = ?, owner_info = ?, "
                        "options = coalesce(?, options) WHERE run_id = ?",
                  (RunStatus.RUNNING.value, now_iso(), owner.token, owner.info_json(), dump(options), run_id))

    async def append(self, record: TransitionRecord, owner: Owner, *, status: RunStatus | None = None,
                     error: str | None = None) -> None:
        final = status is not None and status is not RunStatus.RUNNING
        chain, version = await self._write(self._append, record, owner, status, error, final)
        if final:
            self._chains.pop(record.run_id, None)  # the run is over here: keep no state for it
        else:
            self._chains[record.run_id] = (record.seq, chain, version)

    def _append(self, conn: sqlite3.Connection, r: TransitionRecord, owner: Owner, status: RunStatus | None,
                error: str | None, final: bool) -> tuple[str, int]:
        """The row, its attempts and the run's totals (and status); returns the row's chain hash
        and the run's chain version."""
        request = dump(r.request)  # retried attempts usually carry this same body: encoded once
        row = transition_row(r, request)
        attempts = attempt_rows(r, request)
        previous = self._chains.get(r.run_id)
        version, link = (previous[2], previous[1]) if previous is not None and previous[0] == r.seq - 1 else (
            last_link(conn, r.run_id, self._audit))
        chain = self._audit.link(version, link, row, attempts)
        if status is None:
            fenced = self._sql(conn, STEP, (r.seq, r.committed, row["input_tokens"], row["output_tokens"],
                                             r.source == "cache", row["cost_usd"], r.run_id, owner.token))
        else:
            fenced = self._sql(conn, ADVANCE, {
                "seq": r.seq, "step": r.committed, "input_tokens": row["input_tokens"],
                "output_tokens": row["output_tokens"], "cache_hit": r.source == "cache", "cost": row["cost_usd"],
                "status": status.value, "error": text(error), "now": now_iso(), "release": final,
                "run_id": r.run_id, "owner": owner.token})
        if fenced.rowcount != 1:
            raise self._not_appended(conn, r, owner)
        self._sql(conn, APPEND, (*row.values(), chain))
        if attempts:
            self._sql_many(conn, APPEND_ATTEMPT, [tuple(a.values()) for a in attempts])
        return chain, version

    def _not_appended(self, conn: sqlite3.Connection, r: TransitionRecord, owner: Owner) -> OwnershipLostError:
        """Why the fenced update changed no row: the run was taken over, or is not at step `seq - 1`."""
        found = self._sql(conn, "SELECT owner, last_seq FROM runs WHERE run_id = ?", (r.run_id,)).fetchone()
        if found is None or found[0] != owner.token:
            return OwnershipLostError(f"run {r.run_id} was taken over by another process; this process stopped "
                                      f"before writing step {r.seq}", where=self.where)
        return out_of_order(r.run_id, r.seq, found[1], self.where)

    async def mark_in_flight(self, run_id: str, owner: Owner, *, seq: int, state: str,
                             progress: dict[str, Any] | None = None) -> None:
        """Note, before a paid call is sent, that step `seq` has a call in flight (`progress`:
        what the step paid for so far).

        A resume that finds the mark ahead of the log knows the call may have been paid
        already and flags the step it re-sends (`in_doubt`). Written on a second connection
        with synchronous=OFF: it survives a killed process (not a power cut) for a fraction of
        a durable commit's cost. Fenced like every write: no mark, no call.
        """
        await self._write_mark(run_id, owner, {"seq": seq, "state": state, **(progress or {})},
                               "no call was made")

    async def keep_answer(self, run_id: str, owner: Owner, *, seq: int, state: str,
                          progress: dict[str, Any]) -> None:
        """Keep, in the in-flight mark, the answer that arrived for step `seq` (`progress`),
        before anything judges it. Written as the mark is."""
        await self._write_mark(run_id, owner, {"seq": seq, "state": state, **progress},
                               "the answer was paid but not kept: a resume sends its call again")

    async def _write_mark(self, run_id: str, owner: Owner, mark: dict[str, Any], unwritten: str) -> None:
        # ASCII JSON: whatever text an answer holds (a lone surrogate too) is kept as it arrived
        text = json.dumps({**mark, "at": now_iso()}, separators=(",", ":"))
        try:
            await self._write(self._mark, run_id, owner, text, unwritten, marks=True)
        except OwnershipLostError:
            raise
        except StoreError as exc:
            raise StoreError(f"{exc.what}; {unwritten}", where=self.where, fix=exc.fix) from exc

    def _mark(self, conn: sqlite3.Connection, run_id: str, owner: Owner, mark: str, unwritten: str) -> None:
        updated = self._sql(conn, "UPDATE runs SET in_flight = ? WHERE run_id = ? AND owner = ?",
                            (mark, run_id, owner.token)).rowcount
        if updated != 1:
            raise OwnershipLostError(f"run {run_id} was taken over by another process; {unwritten}",
                                     where=self.where)

    async def release(self, run_id: str, owner: Owner, status: RunStatus, error: str | None, *,
                      review: dict[str, Any] | None = None) -> None:
        await self._write(self._release, run_id, owner, status, error, review)
        self._chains.pop(run_id, None)

    def _release(self, conn: sqlite3.Connection, run_id: str, owner: Owner, status: RunStatus,
                 error: str | None, review: dict[str, Any] | None) -> None:
        keep = status is RunStatus.RUNNING
        self._sql(conn, SET_STATUS, (status.value, text(error), now_iso(), dump(review), keep, keep, run_id,
                                     owner.token))

    # ------------------------------------------------------------------ reading

    async def get_run(self, run_id: str) -> RunRecord:
        return await self._read(self._get_run, run_id)

    def _get_run(self, conn: sqlite3.Connection, run_id: str) -> RunRecord:
        rows = list(self._query(conn, "SELECT * FROM runs WHERE run_id = ?", [run_id]))
        if not rows:
            raise RunNotFoundError(run_id, where=self.where)
        row = rows[0]
        return run_of(row, stale=stale(self._owners, row["status"], row["owner_info"]),
                      takeovers=self._takeovers(conn, run_id))

    def _takeovers(self, conn: sqlite3.Connection, run_id: str) -> list[Takeover]:
        try:
            return [Takeover(**r) for r in self._query(
                conn, "SELECT at, by_owner AS by, previous, why FROM takeovers WHERE run_id = ? ORDER BY at",
                [run_id])]
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []  # a version 5 file read as it is (read-only): no takeover was recorded
            raise

    async def load_run(self, run_id: str, *, verified: bool = False) -> tuple[RunRecord, list[TransitionRecord]]:
        """The run row and its log as of one moment: read in one transaction, so a step that
        another process commits in between cannot show a finished log with a running row.
        `verified`: refuse them (`TamperedRunError`) unless they pass the run's audit chain."""
        return await self._read(self._load_run, run_id, verified)

    def _load_run(self, conn: sqlite3.Connection, run_id: str, verified: bool
                  ) -> tuple[RunRecord, list[TransitionRecord]]:
        self._sql(conn, "BEGIN")
        try:
            loaded = self._get_run(conn, run_id), self._transitions(conn, run_id)
            if verified:
                require_intact(conn, run_id, self._audit, self.where)
            return loaded
        finally:
            self._sql(conn, "COMMIT")

    async def transitions(self, run_id: str) -> list[TransitionRecord]:
        return await self._read(self._transitions, run_id)

    def _transitions(self, conn: sqlite3.Connection, run_id: str) -> list[TransitionRecord]:
        attempts: dict[int, list[Attempt]] = {}
        for seq, attempt in self._attempts(conn, run_id):
            attempts.setdefault(seq, []).append(attempt)
        return [transition_of(row, attempts.get(row["seq"], [])) for row in self._query(
            conn, "SELECT * FROM transitions WHERE run_id = ? ORDER BY seq", [run_id])]

    async def attempts(self, run_id: str) -> list[tuple[int, Attempt]]:
        return await self._read(self._attempts, run_id)

    def _attempts(self, conn: sqlite3.Connection, run_id: str) -> list[tuple[int, Attempt]]:
        return [(row["seq"], attempt_of(row, run_id)) for row in self._query(
            conn, "SELECT * FROM attempts WHERE run_id = ? ORDER BY seq, attempt", [run_id])]

    async def find_cached(self, request_hash: str) -> TransitionRecord | None:
        return await self._read(self._find_cached, request_hash)

    def _find_cached(self, conn: sqlite3.Connection, request_hash: str) -> TransitionRecord | None:
        for row in self._query(
                conn, "SELECT * FROM transitions WHERE request_hash = ? AND response IS NOT NULL "
                      "AND to_state IS NOT NULL AND source IN ('llm', 'fallback') LIMIT 1", [request_hash]):
            return transition_of(row, [])
        return None

    async def list_runs(self, *, machine: str | None = None, status: RunStatus | None = None,
                        limit: int | None = 50, before: str | None = None, parent: str | None = None,
                        batch: str | None = None, experiment: str | None = None,
                        forked_from: str | None = None) -> list[RunSummary]:
        if parent is not None:
            return await self._read(self._children_of, parent)
        filters = run_filters(machine=machine, status=status, batch=batch, experiment=experiment,
                              forked_from=forked_from)
        if not {column for column, _ in filters} <= self._columns:
            return []  # a file of an older version has no such runs (nor their columns)
        return await self._read(self._list_runs, filters, limit, before)

    def _children_of(self, conn: sqlite3.Connection, parent: str) -> list[RunSummary]:
        if "parent_run_id" not in self._columns:
            return []
        children = self._summaries(conn, f"SELECT {self._summary}, parent_run_id, parent_state, item FROM runs "
                                         "WHERE parent_run_id = ?", [parent])
        return sorted(children, key=lambda child: child_place(child.run_id))

    def _list_runs(self, conn: sqlite3.Connection, filters: list[tuple[str, Any]], limit: int | None,
                   before: str | None) -> list[RunSummary]:
        where = ["parent_run_id IS NULL"] if "parent_run_id" in self._columns else []
        where += [f"{column} = ?" for column, _ in filters]
        params: list[Any] = [value for _, value in filters]
        if before:
            where.append("(created_at, run_id) < (SELECT created_at, run_id FROM runs WHERE run_id = ?)")
            params.append(before)
        sql = (f"SELECT {self._summary} FROM runs "
               + ("WHERE " + " AND ".join(where) + " " if where else "")
               + "ORDER BY created_at DESC, run_id DESC LIMIT ?")
        params.append(-1 if limit is None else limit)  # SQLite: a negative limit is none
        return self._summaries(conn, sql, params)

    def _summaries(self, conn: sqlite3.Connection, sql: str, params: list[Any]) -> list[RunSummary]:
        summaries = []
        for row in self._query(conn, sql, params):
            gone = stale(self._owners, row["status"], row.pop("owner_info"))
            row["status"] = RunStatus(row["status"])
            if "parent_run_id" in row:
                row["parent"] = Parent(row.pop("parent_run_id"), row.pop("parent_state"), row.pop("item"))
            summaries.append(RunSummary(**row, stale=gone))
        return summaries

    async def machine_totals(self, machines: list[str]) -> list[MachineTotals]:
        return await self._read(self._machine_totals, machines)

    def _machine_totals(self, conn: sqlite3.Connection, machines: list[str]) -> list[MachineTotals]:
        if not machines:
            return []
        marks = ",".join("?" * len(machines))
        doubts = {row.pop("machine"): row for row in self._query(  # attempts are few: scanned
            conn, f"{IN_DOUBT_BY_MACHINE}({marks}) GROUP BY r.machine", machines)}
        # finished runs and the others apart: each WHERE matches one of the schema's totals indexes
        part = ("SELECT machine, count(*) AS runs, sum(steps) AS steps, sum(input_tokens) AS input_tokens, "
                "sum(output_tokens) AS output_tokens, sum(cost_usd IS NULL) AS unpriced, sum(cost_usd) AS cost_usd, "
                f"sum(cache_hits) AS cache_hits FROM runs WHERE machine IN ({marks}) AND status ")
        return [MachineTotals(**row, **doubts.get(row["machine"], {})) for row in self._query(
            conn, "SELECT machine, sum(runs) AS runs, sum(steps) AS steps, sum(input_tokens) AS input_tokens, "
                  "sum(output_tokens) AS output_tokens, "
                  "CASE WHEN sum(unpriced) > 0 THEN NULL ELSE sum(cost_usd) END AS cost_usd, "
                  f"sum(cache_hits) AS cache_hits FROM ({part}IN ('completed', 'terminated') GROUP BY machine "
                  f"UNION ALL {part}NOT IN ('completed', 'terminated') GROUP BY machine) "
                  "GROUP BY machine ORDER BY machine", [*machines, *machines])]

    async def run_ids(self, machine: str | None = None) -> list[str]:
        return await self._read(self._run_ids, machine)

    def _run_ids(self, conn: sqlite3.Connection, machine: str | None) -> list[str]:
        if machine is None:
            return [row[0] for row in self._sql(conn, "SELECT run_id FROM runs ORDER BY created_at, run_id")]
        return [row[0] for row in self._sql(
            conn, "SELECT run_id FROM runs WHERE machine = ? ORDER BY created_at, run_id", (machine,))]

    async def verify_chain(self, run_id: str) -> str | None:
        return await self._read(verify, run_id, self._audit)

    async def close(self) -> None:
        for writes in (self._writes, self._mark_writes):
            await writes.drain()
            writes.close()
        if self._marks is not None:
            self._marks.close()
        self.conn.close()

    # ------------------------------------------------------------------ running statements

    def _sql(self, conn: sqlite3.Connection, sql: str, params: Any = ()) -> sqlite3.Cursor:
        if self.tracer is not None:
            self.tracer(sql, params)
        return conn.execute(sql, params)

    def _sql_many(self, conn: sqlite3.Connection, sql: str, rows: list[tuple[Any, ...]]) -> None:
        if self.tracer is not None:
            self.tracer(sql, rows)
        conn.executemany(sql, rows)

    def _query(self, conn: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> Iterator[dict[str, Any]]:
        cursor = self._sql(conn, sql, params)
        names = [column[0] for column in cursor.description]
        for row in cursor:
            yield dict(zip(names, row, strict=True))

    async def _write(self, work: Callable[..., T], *args: Any, marks: bool = False) -> T:
        """`work(conn, *args)` committed, in one transaction with the other writes queued at the
        same time (`_group`); `marks` on the in-flight marks' connection."""
        written: T = await (self._mark_writes if marks else self._writes).write(work, *args)
        return written

    async def _read(self, work: Callable[..., T], *args: Any) -> T:
        """`work(conn, *args)`: here and now, or in a worker thread while the file is locked."""
        try:
            return busy_as(work, self.conn, *args)
        except Busy:
            return await asyncio.to_thread(self._waiting, work, args)

    def _waiting(self, work: Callable[..., T], args: tuple[Any, ...]) -> T:
        """`work` on a connection of its own that waits for the lock up to the busy timeout."""
        conn = self._connect(wait=True)
        try:
            return busy_as(work, conn, *args)
        except Busy as busy:
            raise StoreError(f"cannot read {self.where}: {busy.__cause__}", where=self.where,
                             fix="retry when the database is free") from busy.__cause__
        finally:
            conn.close()

    def _marks_connection(self) -> sqlite3.Connection:
        if self._marks is None:
            self._marks = self._connect(wait=False, marks=True)
        return self._marks

    def _connect(self, *, wait: bool, marks: bool = False) -> sqlite3.Connection:
        """A connection that waits for locks up to the busy timeout, or not at all; `marks`: with
        synchronous=OFF, for the in-flight marks."""
        return connect(self.path, self.where, immutable=self._immutable, busy_timeout_s=self.busy_timeout_s,
                       wait=wait, synchronous="OFF" if marks else self.synchronous)
