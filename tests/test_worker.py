"""Queued runs and workers on a real PostgreSQL server (`pg_dsn`), in process: enqueue, claim,
versions, hand-back on stop, takeovers from an expired lease, the lease's fence and the
schema's version. The subprocess fault and lease trials are in tests/reliability/test_workers.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from statemachine_orch import (
    Engine,
    LeaseLostError,
    Machine,
    OwnershipLostError,
    PostgresStore,
    PythonState,
    RunStatus,
    SchemaVersionError,
    StoreError,
    UsageError,
    Worker,
    open_store,
)
from statemachine_orch.store._owner import Owner
from statemachine_orch.store.postgres import _schema

from .helpers import me, new_run, row


def counting_machine(tmp_path: Path, version: str, *, gate: asyncio.Event | None = None,
                     calls: list[str] | None = None) -> Machine:
    """Three Python steps; `version` is its source (so its hash); `gate` holds step two open;
    `calls` records each step run as (run id, state)."""
    source = tmp_path / f"counter_{version}.py"
    source.write_text(f"# version {version}\n")

    def step(name: str) -> Callable[[Any], Awaitable[str]]:
        async def run(ctx: Any) -> str:
            if calls is not None:
                calls.append(f"{ctx.run_id}:{name}")
            if name == "two" and gate is not None:
                await gate.wait()
            return f"{name} of {ctx.input['n']}"
        return run

    return Machine("counter", states=[PythonState(n, run=step(n)) for n in ("one", "two", "three")],
                   source_file=str(source))


def on_pg(dsn: str, scenario: Callable[[PostgresStore], Awaitable[None]], **options: Any) -> None:
    async def go() -> None:
        store = open_store(dsn, **options)
        assert isinstance(store, PostgresStore)
        try:
            await scenario(store)
        finally:
            await store.close()

    asyncio.run(go())


def test_queued_runs_are_claimed_once_each_and_completed_by_concurrent_workers(pg_dsn: str, tmp_path: Path) -> None:
    calls: list[str] = []
    machine = counting_machine(tmp_path, "1", calls=calls)

    async def scenario(store: PostgresStore) -> None:
        engine = Engine(store)
        ids = [(await engine.enqueue(machine, {"n": n}, run_id=f"q-{n}")).run_id for n in range(12)]
        assert {r.status for r in await store.list_runs()} == {RunStatus.PENDING}
        other = open_store(pg_dsn)  # a second worker process, as far as the database can tell
        try:
            stats = await asyncio.gather(Worker(engine, [machine], concurrency=3, poll_s=0.2).run(until_idle=True),
                                         Worker(Engine(other), [machine], concurrency=3, poll_s=0.2).run(
                                             until_idle=True))
        finally:
            await other.close()
        assert sum(s.claimed for s in stats) == sum(s.completed for s in stats) == 12
        assert all(s.claimed > 0 for s in stats)  # both took part
        assert sorted(calls) == sorted(f"{rid}:{state}" for rid in ids for state in ("one", "two", "three"))
        for rid in ids:
            record, log = await store.load_run(rid, verified=True)
            assert record.status is RunStatus.COMPLETED and [r.seq for r in log] == [1, 2, 3]
            assert record.takeovers == []

    on_pg(pg_dsn, scenario)


def test_a_worker_claims_only_the_machine_versions_it_loaded_unless_it_migrates(pg_dsn: str, tmp_path: Path) -> None:
    old, new = counting_machine(tmp_path, "1"), counting_machine(tmp_path, "2")
    assert old.source_hash != new.source_hash

    async def scenario(store: PostgresStore) -> None:
        await Engine(store).enqueue(old, {"n": 1}, run_id="old-1")
        engine = Engine(store)
        idle = await Worker(engine, [new], poll_s=0.2).run(until_idle=True)
        assert idle.claimed == 0 and (await store.get_run("old-1")).status is RunStatus.PENDING
        migrated = await Worker(engine, [new], poll_s=0.2, migrate=True).run(until_idle=True)
        assert (migrated.claimed, migrated.completed) == (1, 1)
        assert (await store.get_run("old-1")).status is RunStatus.COMPLETED

    on_pg(pg_dsn, scenario)


def test_a_stopped_worker_hands_its_runs_back_and_another_finishes_them(pg_dsn: str, tmp_path: Path) -> None:
    calls: list[str] = []

    async def scenario(store: PostgresStore) -> None:
        gate = asyncio.Event()
        machine = counting_machine(tmp_path, "1", gate=gate, calls=calls)
        engine = Engine(store)
        for n in range(2):
            await engine.enqueue(machine, {"n": n}, run_id=f"h-{n}")
        first = Worker(engine, [machine], concurrency=2, poll_s=0.2)
        going = asyncio.create_task(first.run())
        while sum(call.endswith(":two") for call in calls) < 2:  # both runs are inside step two
            await asyncio.sleep(0.01)
        live = await store.workers()
        assert [(w.name, sorted(w.runs)) for w in live] == [("worker", ["h-0", "h-1"])]
        first.request_stop(grace_s=30)
        gate.set()  # the steps in progress finish within the grace period, and commit
        stats = await going
        assert (stats.claimed, stats.handed_back) == (2, 2)
        for n in range(2):
            run, log = await store.load_run(f"h-{n}")
            assert run.status is RunStatus.PENDING and [r.from_state for r in log] == ["one", "two"]
        assert [w.stopping for w in await store.workers()] == [True]  # the lease ends when the store closes
        before = len(calls)
        other = open_store(pg_dsn)
        try:
            second = await Worker(Engine(other), [machine], poll_s=0.2).run(until_idle=True)
        finally:
            await other.close()
        assert (second.claimed, second.completed) == (2, 2)
        # nothing committed ran again: only step three, once per run
        assert sorted(calls[before:]) == ["h-0:three", "h-1:three"]

    on_pg(pg_dsn, scenario)


async def expire(store: PostgresStore) -> None:
    """Make the store's lease run out now, as if its process had been frozen past its TTL."""
    async with store._conn() as conn:
        await conn.execute("UPDATE workers SET expires_at = clock_timestamp() - interval '1 second' WHERE key = %s",
                           (store.lease.key,))


def test_an_expired_lease_fences_every_write_and_its_run_is_taken_over(pg_dsn: str) -> None:
    async def scenario(store: PostgresStore) -> None:
        owner = me()
        await store.create_run(new_run(), owner)
        await store.append(row(1), owner)
        await expire(store)
        assert (await store.get_run("run-1")).stale
        for write in (store.append(row(2), owner), store.mark_in_flight("run-1", owner, seq=2, state="b"),
                      store.keep_answer("run-1", owner, seq=2, state="b", progress={"answer": 1})):
            with pytest.raises(LeaseLostError, match="lease of this process on run run-1 expired"):
                await write
        other = open_store(pg_dsn)
        assert isinstance(other, PostgresStore)
        try:
            claimed, log = await other.claim_run("run-1", me())
            (takeover,) = claimed.takeovers
            assert takeover.why.startswith("its lease expired at ") and f"pid {owner.pid}" in takeover.previous
            assert [r.seq for r in log] == [1] and claimed.in_flight is None
            with pytest.raises(OwnershipLostError, match="taken over"):  # and no longer only "expired"
                await store.append(row(2), owner)
        finally:
            await other.close()
        assert [r.seq for r in await store.transitions("run-1")] == [1]

    on_pg(pg_dsn, scenario)


def test_a_worker_takes_over_a_queued_run_whose_holder_died(pg_dsn: str, tmp_path: Path) -> None:
    machine = counting_machine(tmp_path, "1")

    async def scenario(store: PostgresStore) -> None:
        await Engine(store).enqueue(machine, {"n": 7}, run_id="dead-1")
        crashed = open_store(pg_dsn)
        assert isinstance(crashed, PostgresStore)
        holder = Owner.for_this_process()
        record, log = await crashed.claim_next(holder, queue="default", machine_hashes=[machine.source_hash]) or (
            None, [])
        assert record is not None and record.run_id == "dead-1" and log == []
        await crashed.append(row(1, run_id="dead-1", from_state="one", to_state="two", source="python", output="x",
                                 request=None, response=None, request_id=None), holder)
        await expire(crashed)
        crashed.lease.key = None  # a dead process ends nothing: its lease just runs out
        await crashed.close()
        stats = await Worker(Engine(store), [machine], poll_s=0.2).run(until_idle=True)
        assert (stats.claimed, stats.took_over, stats.completed) == (1, 1, 1)
        run, log = await store.load_run("dead-1", verified=True)
        assert run.status is RunStatus.COMPLETED and [r.from_state for r in log] == ["one", "two", "three"]
        assert [t.why.split(" at ")[0] for t in run.takeovers] == ["its lease expired"]

    on_pg(pg_dsn, scenario)


def test_enqueue_needs_a_store_with_a_queue(tmp_path: Path) -> None:
    machine = counting_machine(tmp_path, "1")

    async def scenario() -> None:
        store = open_store(tmp_path / "orch.db")
        try:
            with pytest.raises(UsageError, match="queued runs and workers need PostgreSQL"):
                await Engine(store).enqueue(machine, {"n": 1})
            assert await store.run_ids() == []
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_newer_schema_is_refused_and_an_older_one_upgraded_only_on_request(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    on_pg(pg_dsn, lambda store: store.create_run(new_run(), me()))
    now = _schema.SCHEMA_VERSION
    monkeypatch.setattr(_schema, "SCHEMA_VERSION", now + 1)
    monkeypatch.setitem(_schema.MIGRATIONS, now, "ALTER TABLE runs ADD COLUMN note TEXT")
    older = rf"older than this statemachine_orch's \({now + 1}\).*orch db migrate"
    with pytest.raises(SchemaVersionError, match=older):
        open_store(pg_dsn)
    upgraded = open_store(pg_dsn, upgrade=True)
    assert upgraded.schema_versions == (now, now + 1)
    asyncio.run(upgraded.close())

    async def read(store: PostgresStore) -> None:
        assert [r.run_id for r in await store.list_runs()] == ["run-1"]  # kept through the upgrade
    on_pg(pg_dsn, read)
    monkeypatch.setattr(_schema, "SCHEMA_VERSION", now)
    with pytest.raises(SchemaVersionError, match="newer than this statemachine_orch's"):
        open_store(pg_dsn)


def test_a_version_1_schema_is_migrated_to_the_columns_and_indexes_of_a_new_one(pg_dsn: str) -> None:
    """Version 1 (issue 14) had no review, fork or experiment columns and claimed no waiting runs."""
    on_pg(pg_dsn, lambda store: store.create_run(new_run(), me()))

    def shape(conn: psycopg.Connection[Any]) -> tuple[list[Any], list[Any]]:
        columns = conn.execute("SELECT column_name, data_type, collation_name FROM information_schema.columns "
                               "WHERE table_schema = 'orch' AND table_name = 'runs' ORDER BY ordinal_position")
        indexes = conn.execute("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'orch' ORDER BY 1")
        return columns.fetchall(), indexes.fetchall()

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        new = shape(conn)
        conn.execute("SET search_path TO orch")
        conn.execute("DROP INDEX runs_forks, runs_by_experiment, runs_claimable")
        conn.execute("ALTER TABLE runs DROP COLUMN review, DROP COLUMN forked_from, DROP COLUMN experiment, "
                     "DROP COLUMN arm")
        conn.execute("CREATE INDEX runs_claimable ON runs (queue, created_at, run_id) "
                     "WHERE queue IS NOT NULL AND status IN ('pending', 'running')")
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    with pytest.raises(SchemaVersionError, match="orch db migrate"):
        open_store(pg_dsn)
    upgraded = open_store(pg_dsn, upgrade=True)
    assert upgraded.schema_versions == (1, 2)
    asyncio.run(upgraded.close())
    with psycopg.connect(pg_dsn) as conn:
        assert shape(conn) == new

    async def read(store: PostgresStore) -> None:
        assert [r.run_id for r in await store.list_runs()] == ["run-1"]
    on_pg(pg_dsn, read)


def test_runs_started_at_once_share_one_lease_that_the_heartbeat_keeps(pg_dsn: str, tmp_path: Path) -> None:
    """Eight runs started together (a batch) all name the one lease this process renews: with a
    1-second TTL and steps longer than it, none loses its run."""
    source = tmp_path / "slow.py"
    source.write_text("# slow\n")

    async def slow(ctx: Any) -> str:
        await asyncio.sleep(0.8)
        return "done"

    machine = Machine("slow", states=[PythonState("a", run=slow), PythonState("b", run=slow)],
                      source_file=str(source))

    async def scenario(store: PostgresStore) -> None:
        await asyncio.gather(*(store.run_ids() for _ in range(8)))  # connections ready: the starts race
        result = await Engine(store).arun_many(machine, [{}] * 8, batch_id="b", concurrency=8)
        assert [r.status for r in result.results.values()] == [RunStatus.COMPLETED] * 8, result.errors
        async with store._conn() as conn:
            holders = await (await conn.execute("SELECT count(*) FROM workers")).fetchone()
        assert holders == (1,)

    on_pg(pg_dsn, scenario, lease_ttl_s=1.0)


def test_an_idle_worker_is_woken_by_a_queued_run_not_by_its_poll(pg_dsn: str, tmp_path: Path) -> None:
    machine = counting_machine(tmp_path, "1")

    async def scenario(store: PostgresStore) -> None:
        worker = Worker(Engine(store), [machine], poll_s=3600)  # polling alone would take an hour
        going = asyncio.create_task(worker.run())
        while not (await store.workers()):  # the worker holds its lease once it has looked for work
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # (it is waiting now, LISTENing)
        other = open_store(pg_dsn)
        try:
            await Engine(other).enqueue(machine, {"n": 1}, run_id="woken")
        finally:
            await other.close()
        while (await store.get_run("woken")).status is not RunStatus.COMPLETED:
            await asyncio.sleep(0.01)
        worker.request_stop()
        assert (await asyncio.wait_for(going, 30)).completed == 1

    on_pg(pg_dsn, scenario)


def test_a_claim_is_never_made_under_a_lease_that_already_expired(pg_dsn: str, tmp_path: Path) -> None:
    """A process paused past its TTL claims under a new lease, not its dead one (whose first
    write would fail and leave the run to be taken over from itself)."""
    machine = counting_machine(tmp_path, "1")

    async def scenario(store: PostgresStore) -> None:
        engine = Engine(store)
        for n in range(2):
            await engine.enqueue(machine, {"n": n}, run_id=f"p-{n}")
        first = Owner.for_this_process()
        assert await store.claim_next(first, queue="default", machine_hashes=[machine.source_hash]) is not None
        dead = store.lease.key
        await expire(store)  # paused: the heartbeat thread has not noticed yet
        owner = Owner.for_this_process()
        claimed = await store.claim_next(owner, queue="default", machine_hashes=[machine.source_hash])
        assert claimed is not None
        record, log = claimed
        assert store.lease.key not in (None, dead) and dead in store.lease.lost
        # the oldest claimable run is the one the dead lease held: taken over, under the new lease
        assert (record.run_id, record.owner, log) == ("p-0", owner.token, [])
        assert [t.why.split(" at ")[0] for t in record.takeovers] == ["its lease expired"]
        await store.append(row(1, run_id="p-0", from_state="one", to_state="two", source="python", output="x",
                               request=None, response=None, request_id=None), owner)  # it owns what it claimed
        with pytest.raises(OwnershipLostError):
            await store.append(row(1, run_id="p-0", from_state="one", to_state="two"), first)

    on_pg(pg_dsn, scenario)


def test_a_worker_outlives_a_database_it_cannot_reach_for_a_while(pg_dsn: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    machine = counting_machine(tmp_path, "1")
    events: list[tuple[str, str]] = []

    async def scenario(store: PostgresStore) -> None:
        await Engine(store).enqueue(machine, {"n": 1}, run_id="later")
        real, failures = store.claim_next, iter([True, True])

        async def flaky(*args: Any, **kwargs: Any) -> Any:
            if next(failures, False):
                raise StoreError("cannot reach the database: connection refused", where=store.where)
            return await real(*args, **kwargs)

        monkeypatch.setattr(store, "claim_next", flaky)
        worker = Worker(Engine(store), [machine], poll_s=0.05, on_event=lambda k, r, d: events.append((k, r)))
        going = asyncio.create_task(worker.run())
        while (await store.get_run("later")).status is not RunStatus.COMPLETED:
            await asyncio.sleep(0.01)
        worker.request_stop()
        assert (await going).completed == 1
        assert events[:3] == [("waiting", ""), ("waiting", ""), ("claimed", "later")]

    on_pg(pg_dsn, scenario)


def test_a_worker_refuses_a_run_whose_log_was_tampered_with(pg_dsn: str, tmp_path: Path) -> None:
    machine = counting_machine(tmp_path, "1")

    async def scenario(store: PostgresStore) -> None:
        engine = Engine(store)
        await engine.enqueue(machine, {"n": 1}, run_id="edited")
        owner = Owner.for_this_process()
        assert await store.claim_next(owner, queue="default", machine_hashes=[machine.source_hash]) is not None
        await store.append(row(1, run_id="edited", from_state="one", to_state="two", source="python", output="x",
                               request=None, response=None, request_id=None), owner)
        await store.release("edited", owner, RunStatus.PENDING, "handed back")
        async with store._conn() as conn:
            await conn.execute("UPDATE transitions SET output = '\"y\"' WHERE run_id = 'edited'")
        stats = await Worker(engine, [machine], poll_s=0.2).run(until_idle=True)
        assert (stats.claimed, stats.failed, stats.completed) == (1, 1, 0)
        run, log = await store.load_run("edited")
        assert run.status is RunStatus.FAILED and "does not match its hash" in (run.error or "")
        assert len(log) == 1  # nothing ran on the edited log

    on_pg(pg_dsn, scenario)
