"""Group commit: the steps of concurrent runs share transactions, each step is durable when its
await returns, and one failed write in a group fails alone."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest

from statemachine_orch import (
    Engine,
    Hook,
    Machine,
    OwnershipLostError,
    PythonState,
    RunRecord,
    SQLiteStore,
    StepContext,
    StoreError,
    TransitionRecord,
)
from statemachine_orch.store._owner import Owner

from .helpers import me, new_run, row

RUNS, STEPS = 40, 3


def machine() -> Machine:
    async def work(ctx: StepContext) -> str:
        await asyncio.sleep(0.01)  # every run's step ends at about the same time
        return f"{ctx.run_id}:{ctx.state}"

    return Machine("grouped", [PythonState(f"s{k}", run=work) for k in range(STEPS)])


class DurableOnReturn(Hook):
    """After each commit, read the row back on another connection: it must be there."""

    def __init__(self, db: Path) -> None:
        self.reader = sqlite3.connect(db)
        self.seen: list[tuple[str, int]] = []

    def after_commit(self, record: RunRecord, step: TransitionRecord) -> None:
        found = self.reader.execute("SELECT count(*) FROM transitions WHERE run_id = ? AND seq = ?",
                                    (step.run_id, step.seq)).fetchone()[0]
        assert found == 1, f"step {step.seq} of {step.run_id} was not committed when its await returned"
        self.seen.append((step.run_id, step.seq))


def test_concurrent_runs_share_commits_and_every_step_is_durable_on_return(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    store = SQLiteStore(db)
    check = DurableOnReturn(db)
    engine = Engine(store, hooks=[check])

    grouped = machine()

    async def go() -> list[str]:
        results = await asyncio.gather(*(engine.arun(grouped, run_id=f"r{i}") for i in range(RUNS)))
        return [r.status.value for r in results]

    statuses = asyncio.run(go())
    transactions, writes = store.commit_stats
    asyncio.run(store.close())
    assert statuses == ["completed"] * RUNS
    assert len(check.seen) == RUNS * STEPS
    assert writes == RUNS * (1 + STEPS)  # each run's creation and its steps (the last one ends it)
    assert transactions < writes / 4  # grouped: far fewer transactions (fsyncs) than writes
    count = sqlite3.connect(db).execute("SELECT count(*) FROM transitions").fetchone()[0]
    assert count == RUNS * STEPS


def test_a_lone_run_commits_each_write_on_its_own(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "one.db")
    result = Engine(store).run(machine(), run_id="alone")
    assert result.status.value == "completed"
    assert store.commit_stats == (1 + STEPS, 1 + STEPS)


def test_a_failed_write_in_a_group_fails_alone(tmp_path: Path) -> None:
    """Two appends in one group: the one whose owner lost the run raises, the other commits."""
    store = SQLiteStore(tmp_path / "f.db")
    owner, stranger = me(), Owner.for_this_process()

    async def go() -> list[object]:
        await store.create_run(new_run("run-1"), owner)
        await store.create_run(new_run("run-2"), owner)
        before = store.commit_stats[0]
        outcomes = await asyncio.gather(store.append(row(1), owner),
                                        store.append(row(1, run_id="run-2"), stranger),
                                        return_exceptions=True)
        assert store.commit_stats[0] == before + 1  # both in one transaction
        return outcomes

    ok, refused = asyncio.run(go())
    assert ok is None
    assert isinstance(refused, OwnershipLostError)
    log = asyncio.run(store.transitions("run-1"))
    assert [r.seq for r in log] == [1]
    assert asyncio.run(store.transitions("run-2")) == []
    asyncio.run(store.close())


def test_a_cancelled_writer_still_waits_for_its_write(tmp_path: Path) -> None:
    """A writer cancelled while its write is queued returns only after the write committed,
    then raises the cancellation: it never believes undone a write that landed."""
    store = SQLiteStore(tmp_path / "c.db")
    owner = me()

    async def go() -> None:
        await store.create_run(new_run("run-1"), owner)
        task = asyncio.ensure_future(store.append(row(1), owner))
        await asyncio.sleep(0)  # queued, not yet flushed
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert [r.seq for r in await store.transitions("run-1")] == [1]

    asyncio.run(go())
    asyncio.run(store.close())


def _create_t(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS t (x)")


def _insert(conn: sqlite3.Connection, x: int, pause_s: float = 0.0) -> None:
    time.sleep(pause_s)  # a slow disk, or a lock another process holds
    conn.execute("INSERT INTO t VALUES (?)", (x,))


def _rows(db: Path) -> int:
    with closing(sqlite3.connect(db)) as conn:
        count: int = conn.execute("SELECT count(*) FROM t").fetchone()[0]
        return count


def test_a_ctrl_c_inside_a_commit_does_not_stop_later_writes_or_close(tmp_path: Path) -> None:
    """Ctrl-C raised inside a lone commit reaches the event loop, and its writer hears a
    StoreError; the writes after it still commit and the store still closes (it once left the
    queue waiting for a flush that never came)."""
    store = SQLiteStore(tmp_path / "k.db")

    def interrupted(conn: sqlite3.Connection) -> None:
        _create_t(conn)
        raise KeyboardInterrupt

    loop = asyncio.new_event_loop()
    try:
        first = loop.create_task(store._writes.write(interrupted))
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(first)
        loop.run_until_complete(asyncio.sleep(0))
        assert isinstance(first.exception(), StoreError)

        async def later() -> None:
            await asyncio.wait_for(store._writes.write(_create_t), 5)
            await asyncio.wait_for(store._writes.write(_insert, 1), 5)
            await asyncio.wait_for(store.close(), 5)

        loop.run_until_complete(later())
    finally:
        loop.close()
    assert _rows(tmp_path / "k.db") == 1


def test_a_writer_cancelled_twice_still_waits_for_its_own_write(tmp_path: Path) -> None:
    db = tmp_path / "c2.db"
    store = SQLiteStore(db)

    async def go() -> int:
        await store._writes.write(_create_t)
        a = asyncio.ensure_future(store._writes.write(_insert, 1, 0.3))
        b = asyncio.ensure_future(store._writes.write(_insert, 2, 0.3))  # two at once: a group, in the worker
        await asyncio.sleep(0.1)
        a.cancel()
        await asyncio.sleep(0.05)
        a.cancel()  # a grace timer, then asyncio.run's clean-up
        with pytest.raises(asyncio.CancelledError):
            await a
        seen = _rows(db)  # when the cancelled writer is told it stopped
        await b
        await store.close()
        return seen

    assert asyncio.run(go()) == 2


def test_a_cancelled_writer_waits_for_its_own_write_not_for_everyone_elses(tmp_path: Path) -> None:
    """Other runs writing on and on do not hold up a cancelled writer: it waits for its own
    write only (it once waited until the whole queue went quiet)."""
    store = SQLiteStore(tmp_path / "s.db", synchronous="NORMAL")
    done = asyncio.Event

    async def go() -> int:
        stop = done()
        await store._writes.write(_create_t)

        async def busy() -> None:
            while not stop.is_set():
                await store._writes.write(_insert, 0)

        others = [asyncio.ensure_future(busy()) for _ in range(4)]
        await asyncio.sleep(0.05)
        victim = asyncio.ensure_future(store._writes.write(_insert, 1))
        await asyncio.sleep(0)
        victim.cancel()
        finished, _ = await asyncio.wait([victim], timeout=5)
        still_busy = sum(not o.done() for o in others)  # the others had not stopped when it returned
        stop.set()
        assert finished and victim.cancelled()
        await asyncio.gather(*others)
        await store.close()
        return still_busy

    assert asyncio.run(go()) == 4


def test_a_closed_store_refuses_writes(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "closed.db")
    asyncio.run(store.close())
    with pytest.raises(StoreError, match="is closed"):
        asyncio.run(store.create_run(new_run("late"), me()))
