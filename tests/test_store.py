"""SQLite-specific guarantees of the store; the contract every backend serves is
tests/test_store_contract.py; both build their records with tests/helpers.py.

The store is async: each test drives it with `asyncio.run` (one event loop per call or per
scenario), and reads the file directly through `sqlite3` where the guarantee is about the file.
"""

from __future__ import annotations

import asyncio
import sqlite3
import stat
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from statemachine_orch import (
    RunBusyError,
    RunStatus,
    SchemaVersionError,
    SQLiteStore,
    StoreError,
    UsageError,
)
from statemachine_orch.store.sqlite._schema import SCHEMA_VERSION
from statemachine_orch.types import RunRecord, Usage

from .helpers import create_v1_schema, dead_owner, me, new_run, row


def close(store: SQLiteStore) -> None:
    asyncio.run(store.close())


# --------------------------------------------------------------------------- the file


def test_wal_full_by_default_and_normal_on_request(tmp_path: Path) -> None:
    full = SQLiteStore(tmp_path / "a.db")
    normal = SQLiteStore(tmp_path / "b.db", synchronous="NORMAL")
    try:
        assert full.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert full.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert normal.conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    finally:
        close(full)
        close(normal)
    with pytest.raises(UsageError):
        SQLiteStore(tmp_path / "c.db", synchronous="OFF")  # type: ignore[arg-type]


def test_database_files_are_private(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "p.db")
    try:
        asyncio.run(store.create_run(new_run(), me()))
        for suffix in ("", "-wal", "-shm"):
            path = tmp_path / f"p.db{suffix}"
            assert path.exists(), suffix
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, suffix
    finally:
        close(store)


def test_newer_schema_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    close(SQLiteStore(path))
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(SchemaVersionError, match="upgrade statemachine_orch"):
        SQLiteStore(path)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    finally:
        conn.close()


def test_foreign_and_corrupt_files_are_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE notes (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="another application's tables"):
        SQLiteStore(foreign)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="not a usable SQLite database"):
        SQLiteStore(garbage)
    assert garbage.read_bytes() == b"this is not a database" * 100


def test_read_commands_do_not_create_a_database(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no database"):
        SQLiteStore(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()


def test_close_releases_both_connections_and_the_wal(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    store, owner = SQLiteStore(path), me()
    asyncio.run(store.create_run(new_run(), owner))
    asyncio.run(store.mark_in_flight("run-1", owner, seq=1, state="a"))  # opens the marks connection
    assert Path(f"{path}-wal").exists()
    close(store)
    with pytest.raises(sqlite3.ProgrammingError):
        store.conn.execute("SELECT 1")
    assert not Path(f"{path}-wal").exists()  # the last connection closed: checkpointed and removed


# --------------------------------------------------------------------------- the schema


def test_views_present_calls_outputs_and_totals(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "v.db")
    owner = me()

    async def scenario() -> None:
        await store.create_run(new_run(), owner)
        await store.append(row(1), owner)
        await store.append(row(2, source="python", request=None, response=None, request_id=None,
                               usage=Usage()), owner)

    try:
        asyncio.run(scenario())
        db = store.db
        assert [r["seq"] for r in db.query("SELECT seq FROM llm_calls")] == [1]
        assert [r["seq"] for r in db.query("SELECT seq FROM step_outputs")] == [1, 2]
        totals = next(db.query("SELECT * FROM run_totals"))
        assert (totals["steps"], totals["input_tokens"], totals["output_tokens"]) == (2, 3, 4)
    finally:
        close(store)


def test_a_version_1_database_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path)
    create_v1_schema(conn)
    conn.execute("INSERT INTO runs (run_id, machine, machine_ref, machine_hash, input, status, "
                 "created_at, updated_at) VALUES ('old', 'm', 'm.py', 'h', '{}', 'completed', '2020-01-01T00:00:00Z', "
                 "'2020-01-01T00:00:00Z')")
    conn.execute("INSERT INTO transitions (run_id, seq, from_state, to_state, decision, attempt, "
                 "started_at, latency_ms, source, input_tokens, output_tokens, output) "
                 "VALUES ('old', 1, 'a', '__end__', 'continue', 1, 't', 1.0, 'python', 5, 7, '1')")
    conn.commit()
    conn.close()
    store = SQLiteStore(path)

    async def scenario() -> None:
        assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        _, log = await store.load_run("old")
        # tokens from before costs were recorded: the cost is unknown, not zero
        assert [(r.seq, r.output, r.cost_usd, r.attempts) for r in log] == [(1, 1, None, [])]
        assert await store.verify_chain("old") is None  # the old rows were chained by the upgrade
        [old] = await store.list_runs()
        assert (old.steps, old.input_tokens, old.output_tokens, old.cost_usd) == (1, 5, 7, None)  # carried over
        owner = me()
        await store.create_run(new_run("new"), owner)
        await store.append(row(1, run_id="new", attempts=[]), owner)
        assert [r.run_id for r in await store.list_runs()] == ["new", "old"]
        [totals] = await store.machine_totals(["m"])
        assert (totals.runs, totals.steps, totals.input_tokens, totals.output_tokens) == (2, 2, 5 + 3, 7 + 4)

    try:
        asyncio.run(scenario())
    finally:
        close(store)


def schema_of(path: Path) -> dict[str, Any]:
    """Everything that defines a database's schema, normalized: per table its columns
    (order, type, NOT NULL, default, pk), indexes, foreign keys and table kind; per index its
    columns, uniqueness, origin and WHERE; per view and trigger its SQL; and the pragmas that
    mark the file."""
    conn = sqlite3.connect(path)
    try:
        def pragma(name: str, arg: str) -> list[tuple[Any, ...]]:
            return [tuple(r) for r in conn.execute(f"SELECT * FROM pragma_{name}(?)", (arg,))]

        def squeeze(sql: str | None) -> str:
            return " ".join((sql or "").split())

        objects: dict[str, Any] = {}
        for kind, name, table, sql in conn.execute(
                "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"):
            if kind == "table":
                objects[f"table {name}"] = {
                    "columns": pragma("table_xinfo", name),
                    "indexes": sorted(r[1:] for r in pragma("index_list", name)),  # (name, unique, origin, partial)
                    "foreign keys": pragma("foreign_key_list", name),
                    "kind": pragma("table_list", name),  # (schema, name, type, ncol, without rowid, strict)
                }
            elif kind == "index":
                _, _, where = squeeze(sql).partition(" WHERE ")  # a partial index's condition, else ""
                objects[f"index {name}"] = {"on": table, "columns": pragma("index_xinfo", name), "where": where}
            else:  # views and triggers are kept as their SQL text
                objects[f"{kind} {name}"] = {"on": table, "sql": squeeze(sql)}
        objects["pragmas"] = conn.execute(
            "SELECT (SELECT user_version FROM pragma_user_version), "
            "(SELECT application_id FROM pragma_application_id)").fetchone()
        return objects
    finally:
        conn.close()


def test_a_migrated_database_has_the_schema_of_a_fresh_one(tmp_path: Path) -> None:
    fresh, migrated = tmp_path / "fresh.db", tmp_path / "migrated.db"
    close(SQLiteStore(fresh))
    conn = sqlite3.connect(migrated)
    create_v1_schema(conn)
    conn.commit()
    conn.close()
    close(SQLiteStore(migrated))  # upgrades version 1 to the current one
    expected, found = schema_of(fresh), schema_of(migrated)
    assert sorted(found) == sorted(expected)  # the same tables, indexes, views and triggers
    for name in expected:
        assert found[name] == expected[name], name


# --------------------------------------------------------------------------- locks and the event loop


WRITES = ["create_run", "append", "mark_in_flight", "release"]


@pytest.mark.parametrize("write", WRITES)
def test_a_locked_database_does_not_block_the_event_loop(tmp_path: Path, write: str) -> None:
    """While another connection holds the write lock, a write waits off the event loop: a
    ticker task on the same loop goes on, and the write lands once the lock is released."""
    path = tmp_path / "locked.db"
    store, owner = SQLiteStore(path, busy_timeout_s=60.0), me()
    asyncio.run(store.create_run(new_run("run-1"), owner))
    asyncio.run(store.append(row(1), owner))
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    released = threading.Event()

    def release_the_lock() -> None:
        blocker.execute("COMMIT")
        released.set()

    writes: dict[str, Callable[[], Awaitable[None]]] = {
        "create_run": lambda: store.create_run(new_run("run-2"), me()),
        "append": lambda: store.append(row(2), owner),
        "mark_in_flight": lambda: store.mark_in_flight("run-1", owner, seq=2, state="b"),
        "release": lambda: store.release("run-1", owner, RunStatus.INTERRUPTED, "stopped"),
    }

    async def scenario() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0)  # the ticker is running
        blocker.execute("BEGIN IMMEDIATE")  # the write lock, held by another connection
        timer = threading.Timer(0.3, release_the_lock)  # a thread: it does not need the event loop
        timer.start()
        try:
            before = ticks
            await writes[write]()
            during = ticks - before
            assert released.is_set()  # the write waited for the lock rather than failing or skipping it
        finally:
            timer.join()
            ticking.cancel()
        return during

    try:
        ticks_while_waiting = asyncio.run(scenario())
        assert ticks_while_waiting >= 5  # the loop went on while the write waited
        run, log = asyncio.run(store.load_run("run-1"))
        landed: dict[str, Callable[[], bool]] = {
            "create_run": lambda: asyncio.run(store.get_run("run-2")).status is RunStatus.RUNNING,
            "append": lambda: [r.seq for r in log] == [1, 2],
            "mark_in_flight": lambda: run.in_flight is not None and run.in_flight["seq"] == 2,
            "release": lambda: (run.status, run.error, run.owner) == (RunStatus.INTERRUPTED, "stopped", None),
        }
        assert landed[write]()
        assert asyncio.run(store.verify_chain("run-1")) is None
    finally:
        blocker.close()
        close(store)


# --------------------------------------------------------------------------- liveness, totals, reads


def test_a_run_whose_owner_process_exited_is_stale_and_claimable(tmp_path: Path) -> None:
    """Liveness is judged from this host's process table: a dead owner is seen at once."""
    store, gone = SQLiteStore(tmp_path / "s.db"), dead_owner()

    async def scenario() -> None:
        await store.create_run(new_run("orphan", created_at="2026-01-02T00:00:00Z"), gone)
        await store.append(row(1, run_id="orphan"), gone)
        await store.create_run(new_run("alive", created_at="2026-01-01T00:00:00Z"), me())
        assert [(r.run_id, r.stale) for r in await store.list_runs()] == [("orphan", True), ("alive", False)]
        heir = me()
        claimed, log = await store.claim_run("orphan", heir)
        assert (claimed.owner, [r.seq for r in log]) == (heir.token, [1])
        assert [(r.run_id, r.stale) for r in await store.list_runs()] == [("orphan", False), ("alive", False)]

    try:
        asyncio.run(scenario())
    finally:
        close(store)


def test_machine_totals_match_the_rows_whatever_the_runs_status(tmp_path: Path) -> None:
    """Finished runs are summed from their index, the others from their rows: together they
    must equal a plain sum over the runs table, an unpriced step anywhere making cost NULL."""
    store, owner = SQLiteStore(tmp_path / "orch.db"), me()

    def plain() -> tuple[Any, ...]:
        return tuple(store.conn.execute(
            "SELECT count(*), sum(steps), sum(input_tokens), sum(output_tokens), "
            "CASE WHEN sum(cost_usd IS NULL) > 0 THEN NULL ELSE sum(cost_usd) END, sum(cache_hits) "
            "FROM runs WHERE machine = 'm'").fetchone())

    async def scenario() -> None:
        for run_id, status, cost in [("done", RunStatus.COMPLETED, 0.5), ("stopped", RunStatus.TERMINATED, 0.25),
                                     ("broken", RunStatus.FAILED, 0.125), ("live", None, 1.0)]:
            await store.create_run(new_run(run_id), owner)
            await store.append(row(1, run_id=run_id, cost_usd=cost), owner)
            await store.append(row(2, run_id=run_id, to_state="__end__" if status else "b", cost_usd=cost),
                               owner, status=status)
        await store.create_run(new_run("other", machine="n"), owner)
        await store.append(row(1, run_id="other"), owner, status=RunStatus.COMPLETED)
        [totals] = await store.machine_totals(["m"])
        assert (totals.runs, totals.steps, totals.input_tokens, totals.output_tokens, totals.cost_usd,
                totals.cache_hits) == plain() == (4, 8, 24, 32, 3.75, 0)
        await store.create_run(new_run("unpriced"), owner)
        await store.append(row(1, run_id="unpriced", cost_usd=None), owner, status=RunStatus.COMPLETED)
        [totals] = await store.machine_totals(["m"])
        assert (totals.runs, totals.cost_usd) == plain()[::4] == (5, None)

    try:
        asyncio.run(scenario())
        plan = " ".join(r[3] for r in store.conn.execute(
            "EXPLAIN QUERY PLAN SELECT sum(steps) FROM runs WHERE machine IN (?) AND status IN ('completed', "
            "'terminated') GROUP BY machine", ["m"]))
        assert "COVERING INDEX runs_finished_totals" in plan
    finally:
        close(store)


def test_load_run_reads_the_row_and_the_log_as_of_one_moment(tmp_path: Path) -> None:
    """A step another process commits between the two reads must not show up in only one."""
    path = tmp_path / "orch.db"
    writer, owner = SQLiteStore(path), me()
    asyncio.run(writer.create_run(new_run(), owner))
    asyncio.run(writer.append(row(1), owner))

    class Interleaved(SQLiteStore):
        """Another process's step commits right after the run row is read."""

        def _get_run(self, conn: sqlite3.Connection, run_id: str) -> RunRecord:
            record = super()._get_run(conn, run_id)
            with ThreadPoolExecutor(1) as other_process:  # its own event loop, in its own thread
                other_process.submit(asyncio.run, writer.append(row(2, to_state="__end__"), owner,
                                                                status=RunStatus.COMPLETED)).result()
            return record

    reader = Interleaved(path)
    try:
        record, log = asyncio.run(reader.load_run("run-1"))
        assert (record.status, [r.seq for r in log]) == (RunStatus.RUNNING, [1])
        record, log = asyncio.run(writer.load_run("run-1"))
        assert (record.status, [r.seq for r in log]) == (RunStatus.COMPLETED, [1, 2])
    finally:
        close(reader)
        close(writer)


def test_take_over_claims_only_an_owner_that_cannot_be_judged(tmp_path: Path) -> None:
    """SQLite's own: an owner recorded by an older version on another host cannot be judged (a
    lease would judge it), so only --take-over claims it."""
    async def scenario() -> None:
        store = SQLiteStore(tmp_path / "orch.db")
        try:
            foreign = replace(dead_owner(), host="another-host")  # no lock key, another host: unknown
            await store.create_run(new_run(), foreign)
            with pytest.raises(RunBusyError, match="--take-over"):
                await store.claim_run("run-1", me())
            claimed, _ = await store.claim_run("run-1", me(), take_over=True)
            assert [t.why for t in claimed.takeovers] == ["declared gone with --take-over"]
            await store.create_run(new_run("run-2"), me())
            with pytest.raises(RunBusyError):
                await store.claim_run("run-2", me(), take_over=True)  # a live owner: never
            assert (await store.get_run("run-2")).takeovers == []
        finally:
            await store.close()

    asyncio.run(scenario())
