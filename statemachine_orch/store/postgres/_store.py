"""The PostgreSQL store: the store contract, a run queue and leases, for many processes on many hosts.

The tables mirror SQLite's (`_schema`), the rows and audit chains are the same (`store._rows`,
`store._chain`), so a run reads, replays and verifies alike in either, and `orch db copy`
moves one between them unchanged. What differs is ownership: a process proves it lives by
its lease (`_lease`), not by a lock on a local file, so owners on other hosts are judged too.
Every write is fenced on the run's owner token, its lease epoch (bumped at each claim) and a
live lease; a step's write also on its seq. Each write is one transaction on a pooled
connection; PostgreSQL groups concurrent commits itself.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from ...errors import (
    LeaseLostError,
    OwnershipLostError,
    RunBusyError,
    RunExistsError,
    RunFinishedError,
    RunNotFoundError,
    StoreError,
    TamperedRunError,
    UsageError,
)
from ...types import Attempt, Parent, RunRecord, RunStatus, Takeover, TransitionRecord, child_place, now_iso
from .._chain import CANONICAL, CHAINED_ATTEMPT_COLUMNS, CHAINED_COLUMNS, AuditKey, chain_start, verify_log
from .._contract import MachineTotals, RunSummary, out_of_order, run_filters
from .._owner import Owner, owner_from_json, who_am_i
from .._queue import WorkerInfo
from .._rows import attempt_of, attempt_rows, dump, run_identity, run_of, text, transition_of, transition_row
from ._lease import Lease
from ._pool import NOTIFY_CHANNEL, Borrowed, Pool, one_line, redacted
from ._schema import prepare, quoted
from ._statements import (
    APPEND_ATTEMPT,
    DOUBTS_BY_MACHINE,
    HOLDER_FOR_UPDATE,
    INSERT_RUN,
    MACHINE_TOTALS,
    MARK,
    NEXT_IN_QUEUE,
    SET_STATUS,
    STALE,
    STEP,
    SUMMARY,
    TAKE,
    WORKERS,
)

T = TypeVar("T")
SQLTracer = Callable[[str, Any], None]
_FINISHED = (RunStatus.COMPLETED.value, RunStatus.TERMINATED.value)
DEFAULT_LEASE_TTL_S = 30.0


class PostgresStore:
    """Runs in a PostgreSQL database, shared by processes on any number of hosts.

    `dsn`: a libpq connection string or postgresql:// URL. `schema`: the PostgreSQL schema
    holding the tables (created with them when missing and `create`). `lease_ttl_s`: how long
    this process's runs stay its own without a heartbeat (renewed every third of it).
    `audit_key` keys the audit chains as in SQLite (None: ORCH_AUDIT_KEY). A schema of an
    older version is refused unless `upgrade` (`orch db migrate`).
    """

    def __init__(self, dsn: str, *, schema: str = "orch", create: bool = True, upgrade: bool = False,
                 lease_ttl_s: float = DEFAULT_LEASE_TTL_S, pool_size: int = 10, audit_key: str | None = None,
                 tracer: SQLTracer | None = None) -> None:
        import psycopg

        if not schema.isidentifier() or not schema.isascii():
            raise UsageError(f"schema {schema!r} is not a plain identifier", fix="use letters, digits and _")
        if not lease_ttl_s > 0:
            raise UsageError(f"lease_ttl_s={lease_ttl_s!r} is not a positive number of seconds")
        self.dsn, self.schema, self.where = dsn, schema, redacted(dsn)
        self.tracer = tracer
        self._kwargs: dict[str, Any] = {"autocommit": True, "application_name": "orch",
                                        "options": f"-c search_path={quoted(schema)}"}
        self._audit = AuditKey(os.environ.get("ORCH_AUDIT_KEY") if audit_key is None else audit_key)
        self._chains: dict[str, tuple[int, str, int]] = {}  # run -> (seq, chain, version) of its last row here
        self._epochs: dict[str, int] = {}  # run -> the lease epoch of this process's claim on it
        self._pool = Pool(dsn, self._kwargs, pool_size, self.where)
        # the in-flight marks commit without waiting for their WAL flush, as SQLite writes them at
        # synchronous=OFF: a mark survives a killed process, and a server crash loses at most the
        # last few (a resume then sends that call again, as at-least-once allows)
        self._marks = Pool(dsn, {**self._kwargs, "options": self._kwargs["options"] + " -c synchronous_commit=off"},
                           pool_size, self.where)
        self.lease = Lease(self._pool.connect_sync, lease_ttl_s)
        try:
            with psycopg.connect(dsn, **{**self._kwargs, "options": ""}) as conn:
                versions = prepare(conn, schema, self.where, create=create, upgrade=upgrade)
        except psycopg.Error as exc:
            raise StoreError(f"cannot open {self.where}: {one_line(exc)}", where=self.where,
                             fix="check the DSN and that the server is up") from None
        self.schema_versions = versions  # (found, now): what `orch db migrate` did

    def connect_sync(self) -> Any:
        """A blocking connection of its own (not from the pool) to the store's database and schema."""
        return self._pool.connect_sync()

    # ------------------------------------------------------------------ the engine's writes

    async def create_run(self, run: RunRecord, owner: Owner, *, log: Sequence[TransitionRecord] = ()) -> None:
        async with self._conn() as conn:
            holder = await self.lease.hold(conn)
            async with conn.transaction() if log else _alone():  # the run and its first steps together
                link = await self._insert_run(conn, run, owner, holder, queue=None)
                self._epochs[run.run_id] = 1
                try:
                    for step in log:
                        link = await self._append(conn, step, owner, None, None, (CANONICAL, link))
                except BaseException:
                    self._epochs.pop(run.run_id, None)
                    raise
        self._chains[run.run_id] = (log[-1].seq if log else 0, link, CANONICAL)

    async def enqueue(self, run: RunRecord, queue: str) -> None:
        async with self._conn() as conn, conn.transaction():
            await self._insert_run(conn, run, None, None, queue=queue)
            await self._sql(conn, "SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, queue))

    async def _insert_run(self, conn: Any, run: RunRecord, owner: Owner | None, holder: str | None, *,
                          queue: str | None) -> str:
        import psycopg

        identity = run_identity(run, CANONICAL, self._audit.id)
        anchor = self._audit.anchor(identity)
        status = RunStatus.RUNNING if owner is not None else RunStatus.PENDING
        try:
            await self._sql(conn, INSERT_RUN, (
                *identity.values(), anchor, dump(run.options), status.value, text(run.error), run.updated_at,
                owner and owner.token, owner and owner.info_json(), holder, 1 if owner else 0, queue))
        except psycopg.errors.UniqueViolation:
            raise RunExistsError(run.run_id, where=self.where) from None
        return anchor

    async def claim_run(self, run_id: str, owner: Owner, *, options: dict[str, Any] | None = None,
                        take_over: bool = False) -> tuple[RunRecord, list[TransitionRecord]]:
        """As the contract says; an owner is judged by its lease alone (always proven alive or
        gone), so `take_over` changes nothing here."""
        async def named() -> str:
            return run_id

        async with self._conn() as conn:
            claimed = await self._claim(conn, owner, named, options)
        assert claimed is not None  # a named run is claimed or refused
        return claimed

    async def claim_next(self, owner: Owner, *, queue: str, machine_hashes: Collection[str],
                         machines: Collection[str] = ()) -> tuple[RunRecord, list[TransitionRecord]] | None:
        async def oldest() -> str | None:
            found = await (await self._sql(conn, NEXT_IN_QUEUE, (queue, list(machine_hashes), list(machines),
                                                                 now_iso()))).fetchone()
            return None if found is None else str(found[0])

        async with self._conn() as conn:
            return await self._claim(conn, owner, oldest, None)

    async def _claim(self, conn: Any, owner: Owner, which: Callable[[], Awaitable[str | None]],
                     options: dict[str, Any] | None) -> tuple[RunRecord, list[TransitionRecord]] | None:
        """Claim the run `which()` names (None: none) and read it and its log in the same
        transaction, so what the claimer gets is what it owns. Tried again, once, under a new
        lease when this process's own expired meanwhile (it was paused)."""
        for attempt in (1, 2):
            holder = await self.lease.hold(conn)
            try:
                async with conn.transaction():
                    run_id = await which()
                    if run_id is None:
                        return None
                    await self._take(conn, run_id, owner, holder, options)
                    return await self._get_run(conn, run_id), await self._transitions(conn, run_id)
            except LeaseLostError:
                self.lease.drop(holder)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _take(self, conn: Any, run_id: str, owner: Owner, holder: str, options: dict[str, Any] | None) -> None:
        """Claim the run for `owner` under the lease `holder`, recording a takeover from an
        owner whose lease expired (`RunBusyError` while it is live; `LeaseLostError`, and
        nothing written, when `holder` itself has expired)."""
        row = await (await self._sql(conn, HOLDER_FOR_UPDATE, (run_id,))).fetchone()
        if row is None:
            raise RunNotFoundError(run_id, where=self.where)
        status, current, info, lease, worker, expires, alive = row
        if status in _FINISHED:
            raise RunFinishedError(run_id, status)
        previous = owner_from_json(info)
        who = f"{worker + ' ' if worker and worker != 'run' else ''}{previous.describe() if previous else 'a process'}"
        if current is not None:
            if alive:
                raise RunBusyError(run_id, holder=f"{who} (its lease is live until {expires:%H:%M:%S %Z})")
            why = (f"its lease expired at {expires.isoformat()}" if expires else "its lease was ended" if lease
                   else "it held no lease here (a run copied from another database)")
            await self._sql(conn, "INSERT INTO takeovers (run_id, at, by_owner, previous, why) VALUES (%s, %s, %s, "
                                  "%s, %s)", (run_id, now_iso(), who_am_i(owner), who, why))
        epoch = await (await self._sql(conn, TAKE, {"now": now_iso(), "owner": owner.token, "info": owner.info_json(),
                                                   "holder": holder, "options": dump(options), "run_id": run_id})
                       ).fetchone()
        if epoch is None:
            raise LeaseLostError(f"the lease of this process expired before it could claim run {run_id}",
                                 where=self.where)
        self._epochs[run_id] = epoch[0]
        self._chains.pop(run_id, None)

    async def append(self, record: TransitionRecord, owner: Owner, *, status: RunStatus | None = None,
                     error: str | None = None) -> None:
        r = record
        final = status is not None and status is not RunStatus.RUNNING
        async with self._conn() as conn:
            previous = self._chains.get(r.run_id)
            version, link = (previous[2], previous[1]) if previous is not None and previous[0] == r.seq - 1 else (
                await self._last_link(conn, r.run_id))
            chain = await self._append(conn, r, owner, status, error, (version, link))
        if final:
            self._chains.pop(r.run_id, None)
            self._epochs.pop(r.run_id, None)
        else:
            self._chains[r.run_id] = (r.seq, chain, version)

    async def _append(self, conn: Any, r: TransitionRecord, owner: Owner, status: RunStatus | None,
                      error: str | None, previous: tuple[int, str]) -> str:
        """The row (chained to `previous`: (version, link)), its attempts and the run's totals (and
        status), fenced; returns the row's chain hash."""
        request = dump(r.request)
        row = transition_row(r, request)
        attempts = attempt_rows(r, request)
        chain = self._audit.link(previous[0], previous[1], row, attempts)
        params = {
            "seq": r.seq, "step": int(r.committed), "input_tokens": row["input_tokens"],
            "output_tokens": row["output_tokens"], "cache_hit": int(r.source == "cache"), "cost": row["cost_usd"],
            "status": status and status.value, "error": text(error), "now": now_iso(),
            "release": status is not None and status is not RunStatus.RUNNING,
            "run_id": r.run_id, "owner": owner.token, "epoch": self._epochs.get(r.run_id, -1),
            **{f"row_{name}": value for name, value in row.items()}, "row_chain": chain}
        async with conn.transaction() if attempts else _alone():  # one statement is a transaction
            if (await self._sql(conn, STEP, params)).rowcount != 1:
                raise await self._refused(conn, r.run_id, owner, f"step {r.seq} was not written", seq=r.seq)
            if attempts:
                await self._sql_many(conn, APPEND_ATTEMPT, [tuple(a.values()) for a in attempts])
        return chain

    async def _last_link(self, conn: Any, run_id: str) -> tuple[int, str]:
        version, first = chain_start(run_id, await self._run_row(conn, run_id), self._audit)
        last = await (await self._sql(conn, "SELECT chain FROM transitions WHERE run_id = %s ORDER BY seq DESC "
                                            "LIMIT 1", (run_id,))).fetchone()
        return version, last[0] if last else first

    async def _refused(self, conn: Any, run_id: str, owner: Owner, unwritten: str, *,
                       seq: int | None = None) -> OwnershipLostError:
        """Why a fenced write changed no row: the lease expired, the run was taken over, or
        (for a step) the run is not at step `seq - 1`."""
        found = await (await self._sql(conn, "SELECT r.owner, r.last_seq, r.lease_epoch, coalesce(w.expires_at > "
                                             "clock_timestamp(), false) FROM runs r LEFT JOIN workers w ON "
                                             "w.key = r.holder WHERE r.run_id = %s", (run_id,))).fetchone()
        if found is None or found[0] != owner.token or found[2] != self._epochs.get(run_id):
            return OwnershipLostError(f"run {run_id} was taken over by another process; {unwritten}",
                                      where=self.where)
        if not found[3]:
            return LeaseLostError(f"the lease of this process on run {run_id} expired (no heartbeat for "
                                  f"{self.lease.ttl_s:g} s: paused or cut off); {unwritten}", where=self.where,
                                  fix="another worker (or `orch resume`) continues the run")
        if seq is None:  # a mark or a release: refused on ownership and lease alone, both held
            return OwnershipLostError(f"run {run_id} could not be written; {unwritten}", where=self.where)
        return out_of_order(run_id, seq, found[1], self.where)

    async def mark_in_flight(self, run_id: str, owner: Owner, *, seq: int, state: str,
                             progress: dict[str, Any] | None = None) -> None:
        await self._mark(run_id, owner, {"seq": seq, "state": state, **(progress or {})}, "no call was made")

    async def keep_answer(self, run_id: str, owner: Owner, *, seq: int, state: str,
                          progress: dict[str, Any]) -> None:
        await self._mark(run_id, owner, {"seq": seq, "state": state, **progress},
                         "the answer was paid but not kept: a resume sends its call again")

    async def _mark(self, run_id: str, owner: Owner, mark: dict[str, Any], unwritten: str) -> None:
        """The in-flight mark (as in SQLite: ASCII JSON, fenced like every write)."""
        body = json.dumps({**mark, "at": now_iso()}, separators=(",", ":"))
        async with self._marks.borrow() as conn:
            updated = await self._sql(conn, MARK, (body, run_id, owner.token, self._epochs.get(run_id, -1)))
            if updated.rowcount != 1:
                raise await self._refused(conn, run_id, owner, unwritten)

    async def release(self, run_id: str, owner: Owner, status: RunStatus, error: str | None, *,
                      review: dict[str, Any] | None = None) -> None:
        """Give the run up in `status`; a run handed back as pending wakes the idle workers."""
        async with self._conn() as conn, conn.transaction():
            await self._sql(conn, SET_STATUS, {"status": status.value, "error": text(error), "now": now_iso(),
                                               "review": dump(review),
                                               "keep": status is RunStatus.RUNNING, "run_id": run_id,
                                               "owner": owner.token, "epoch": self._epochs.get(run_id, -1)})
            if status is RunStatus.PENDING:
                await self._sql(conn, "SELECT pg_notify(%s, (SELECT queue FROM runs WHERE run_id = %s))",
                                (NOTIFY_CHANNEL, run_id))
        if status is not RunStatus.RUNNING:
            self._chains.pop(run_id, None)
            self._epochs.pop(run_id, None)

    # ------------------------------------------------------------------ reading

    async def get_run(self, run_id: str) -> RunRecord:
        async with self._conn() as conn:
            return await self._get_run(conn, run_id)

    async def _get_run(self, conn: Any, run_id: str) -> RunRecord:
        rows = await self._query(conn, f"SELECT *, {STALE} FROM runs WHERE run_id = %s", (run_id,))
        if not rows:
            raise RunNotFoundError(run_id, where=self.where)
        takeovers = [Takeover(**t) for t in await self._query(
            conn, "SELECT at, by_owner AS by, previous, why FROM takeovers WHERE run_id = %s ORDER BY at", (run_id,))]
        return run_of(rows[0], stale=rows[0]["stale"], takeovers=takeovers)

    async def _run_row(self, conn: Any, run_id: str) -> dict[str, Any] | None:
        rows = await self._query(conn, "SELECT * FROM runs WHERE run_id = %s", (run_id,))
        return rows[0] if rows else None

    async def load_run(self, run_id: str, *, verified: bool = False) -> tuple[RunRecord, list[TransitionRecord]]:
        """The run and its log as of one moment (one REPEATABLE READ transaction)."""
        async with self._conn() as conn, conn.transaction():
            await self._sql(conn, "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            loaded = await self._get_run(conn, run_id), await self._transitions(conn, run_id)
            if verified:
                problem = await self._verify(conn, run_id)
                if problem is not None:
                    raise TamperedRunError(run_id, problem, where=self.where)
            return loaded

    async def transitions(self, run_id: str) -> list[TransitionRecord]:
        async with self._conn() as conn:
            return await self._transitions(conn, run_id)

    async def _transitions(self, conn: Any, run_id: str) -> list[TransitionRecord]:
        attempts: dict[int, list[Attempt]] = {}
        for seq, attempt in await self._attempts(conn, run_id):
            attempts.setdefault(seq, []).append(attempt)
        return [transition_of(row, attempts.get(row["seq"], [])) for row in await self._query(
            conn, "SELECT * FROM transitions WHERE run_id = %s ORDER BY seq", (run_id,))]

    async def attempts(self, run_id: str) -> list[tuple[int, Attempt]]:
        async with self._conn() as conn:
            return await self._attempts(conn, run_id)

    async def _attempts(self, conn: Any, run_id: str) -> list[tuple[int, Attempt]]:
        return [(row["seq"], attempt_of(row, run_id)) for row in await self._query(
            conn, "SELECT * FROM attempts WHERE run_id = %s ORDER BY seq, attempt", (run_id,))]

    async def find_cached(self, request_hash: str) -> TransitionRecord | None:
        async with self._conn() as conn:
            rows = await self._query(conn, "SELECT * FROM transitions WHERE request_hash = %s AND response IS NOT NULL "
                                           "AND to_state IS NOT NULL AND source IN ('llm', 'fallback') LIMIT 1",
                                     (request_hash,))
        return transition_of(rows[0], []) if rows else None

    async def list_runs(self, *, machine: str | None = None, status: RunStatus | None = None,
                        limit: int | None = 50, before: str | None = None, parent: str | None = None,
                        batch: str | None = None, experiment: str | None = None,
                        forked_from: str | None = None) -> list[RunSummary]:
        if parent is not None:
            children = await self._summaries(f"SELECT {SUMMARY}, parent_run_id, parent_state, item FROM runs "
                                             "WHERE parent_run_id = %s", [parent])
            return sorted(children, key=lambda child: child_place(child.run_id))
        filters = run_filters(machine=machine, status=status, batch=batch, experiment=experiment,
                              forked_from=forked_from)
        where = ["parent_run_id IS NULL", *(f"{column} = %s" for column, _ in filters)]
        params: list[Any] = [value for _, value in filters]
        if before:
            where.append("(created_at, run_id) < (SELECT created_at, run_id FROM runs WHERE run_id = %s)")
            params.append(before)
        sql = f"SELECT {SUMMARY} FROM runs WHERE {' AND '.join(where)} ORDER BY created_at DESC, run_id DESC LIMIT %s"
        return await self._summaries(sql, [*params, limit])

    async def _summaries(self, sql: str, params: list[Any]) -> list[RunSummary]:
        async with self._conn() as conn:
            rows = await self._query(conn, sql, params)
        summaries = []
        for row in rows:
            row["status"] = RunStatus(row["status"])
            if "parent_run_id" in row:
                row["parent"] = Parent(row.pop("parent_run_id"), row.pop("parent_state"), row.pop("item"))
            summaries.append(RunSummary(**row))
        return summaries

    async def machine_totals(self, machines: list[str]) -> list[MachineTotals]:
        if not machines:
            return []
        async with self._conn() as conn:
            doubts = {row.pop("machine"): row for row in await self._query(conn, DOUBTS_BY_MACHINE, (machines,))}
            return [MachineTotals(**row, **doubts.get(row["machine"], {}))
                    for row in await self._query(conn, MACHINE_TOTALS, (machines,))]

    async def run_ids(self, machine: str | None = None) -> list[str]:
        async with self._conn() as conn:
            if machine is None:
                cursor = await self._sql(conn, "SELECT run_id FROM runs ORDER BY created_at, run_id")
            else:
                cursor = await self._sql(conn, "SELECT run_id FROM runs WHERE machine = %s ORDER BY created_at, run_id",
                                         (machine,))
            return [row[0] for row in await cursor.fetchall()]

    async def verify_chain(self, run_id: str) -> str | None:
        async with self._conn() as conn, conn.transaction():
            await self._sql(conn, "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            return await self._verify(conn, run_id)

    async def _verify(self, conn: Any, run_id: str) -> str | None:
        rows = await (await self._sql(conn, f"SELECT {CHAINED_COLUMNS}, chain FROM transitions WHERE run_id = %s "
                                            "ORDER BY seq", (run_id,))).fetchall()
        attempts = await (await self._sql(conn, f"SELECT {CHAINED_ATTEMPT_COLUMNS} FROM attempts WHERE run_id = %s "
                                                "ORDER BY seq, attempt", (run_id,))).fetchall()
        return verify_log(run_id, await self._run_row(conn, run_id), rows, attempts, self._audit)

    # ------------------------------------------------------------------ the queue's other half

    async def wait_for_work(self, timeout_s: float) -> None:
        await self._pool.wait_for_notice(timeout_s)

    async def workers(self) -> list[WorkerInfo]:
        async with self._conn() as conn:
            rows = await self._query(conn, WORKERS)
        return [WorkerInfo(name=r["name"], host=r["host"], pid=r["pid"], queue=r["queue"],
                           machines=json.loads(r["machines"] or "[]"), started_at=r["started_at"].isoformat(),
                           heartbeat_age_s=r["heartbeat_age_s"], expires_in_s=r["expires_in_s"],
                           stopping=r["stopping"], runs=list(r["runs"])) for r in rows]

    def name_this_process(self, name: str, *, queue: str | None, machines: list[str]) -> None:
        self.lease.name, self.lease.queue, self.lease.machines = name, queue, machines

    async def set_stopping(self) -> None:
        if self.lease.key is not None:
            async with self._conn() as conn:
                await self._sql(conn, "UPDATE workers SET stopping = true WHERE key = %s", (self.lease.key,))

    async def close(self) -> None:
        """End this process's lease (the runs it still holds become claimable at once) and close."""
        try:
            if self.lease.key is not None:
                async with self._conn() as conn:
                    await self.lease.release(conn)
        finally:
            await asyncio.to_thread(self.lease.join)
            await self._pool.close()
            await self._marks.close()

    # ------------------------------------------------------------------ running statements

    def _conn(self) -> Borrowed:
        """A pooled connection (autocommit; `conn.transaction()` makes a transaction)."""
        return self._pool.borrow()

    async def _sql(self, conn: Any, sql: str, params: Any = None) -> Any:
        if self.tracer is not None:
            self.tracer(sql, params)
        return await conn.execute(sql, params)

    async def _sql_many(self, conn: Any, sql: str, rows: list[tuple[Any, ...]]) -> None:
        if self.tracer is not None:
            self.tracer(sql, rows)
        async with conn.cursor() as cursor:
            await cursor.executemany(sql, rows)

    async def _query(self, conn: Any, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        cursor = await self._sql(conn, sql, params)
        names = [column.name for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in await cursor.fetchall()]


@asynccontextmanager
async def _alone() -> AsyncIterator[None]:
    """No transaction around a single statement (autocommit makes it one)."""
    yield
