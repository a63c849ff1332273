"""Group commit: the writes of many runs that arrive close together share one transaction, so
one fsync makes them all durable, and each writer's await returns only once its own write is.

A write joins the queue; the first one into an empty queue schedules a flush for the event
loop's next turn, by which time every run that was ready has queued its own. A flush of one
write commits it there and then on the store's connection (a lone run pays no thread hop). A
flush of several, or of one that finds the file locked by another process, commits them in a
worker thread on a connection that waits for the lock: the event loop goes on running the
other runs while the disk syncs, and what they write meanwhile is the next group.

Each write runs inside a SAVEPOINT, so one that fails (a fenced write whose run was taken
over) is undone alone and raises to its own writer while the others commit. A COMMIT that
fails fails every write of its group. Only one flush runs at a time, so a run's writes (each
awaited before the next) land in order.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ...errors import StoreError
from ._transaction import Busy, Transaction, write_error

if TYPE_CHECKING:
    from ._store import SQLiteStore

Work = Callable[..., Any]
Write = tuple[Work, tuple[Any, ...], "asyncio.Future[Any]"]


class Written(asyncio.Future[Any]):
    """A write's outcome, which cancelling its writer does not cancel: a queued write cannot be
    called back, so a cancelled writer hears of its cancellation once its write has ended (the
    task sees the refusal and raises CancelledError when this future is done), and never
    believes undone a write that may still commit."""

    def cancel(self, msg: Any | None = None) -> bool:
        return False


class GroupCommit:
    """The queue of one connection's writes (see the module docstring). `here()` is the
    connection a lone write uses on the event loop's thread (it never waits for a lock);
    `connect()` opens the worker thread's own, which does."""

    def __init__(self, store: SQLiteStore, here: Callable[[], sqlite3.Connection],
                 connect: Callable[[], sqlite3.Connection]) -> None:
        self._store = store
        self._here = here
        self._connect = connect
        self._worker: sqlite3.Connection | None = None
        self._queue: list[Write] = []
        self._flushing = False  # a flush is scheduled or running
        self._drained: asyncio.Future[None] | None = None  # what `drain` waits for, made when it does
        self._closed = False
        self.commits = 0  # transactions committed, and the writes they held: the grouping, measured
        self.writes = 0

    async def write(self, work: Work, *args: Any) -> Any:
        """`work(conn, *args)` committed (with whatever else is queued); its return value.

        A writer cancelled meanwhile still waits for its write to end before the cancellation
        is raised (`Written`)."""
        if self._closed:
            raise StoreError(f"{self._store.where} is closed", where=self._store.where)
        loop = asyncio.get_running_loop()
        future = Written(loop=loop)
        self._queue.append((work, args, future))
        if not self._flushing:
            self._flushing = True
            loop.call_soon(self._flush)
        return await future

    async def drain(self) -> None:
        """Wait until every queued write is committed (or failed)."""
        while self._flushing:
            if self._drained is None:
                self._drained = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._drained)

    def close(self) -> None:
        """No more writes (call after `drain`)."""
        self._closed = True
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def _flush(self) -> None:
        """Commit the queue: alone here, or as a group in the worker thread. Whatever happens,
        every write of it is answered and the next flush scheduled: a write never waits on a
        flush that will not come."""
        group, self._queue = self._queue, []
        try:
            if len(group) == 1 and self._alone(group[0]):
                self._next()
                return
            done = asyncio.get_running_loop().run_in_executor(None, self._commit, group)
        except BaseException as exc:  # Ctrl-C in a lone commit, a worker that cannot start
            where = self._store.where
            answer = exc if isinstance(exc, Exception) else StoreError(
                f"interrupted while writing to {where}; the write may have been committed", where=where)
            self._answer(group, [(False, answer)] * len(group))
            self._next()
            raise
        done.add_done_callback(lambda finished: self._deliver(group, finished))

    def _alone(self, write: Write) -> bool:
        """Commit one write here on the event loop's thread; False (nothing done) when the file
        is locked and it has to wait in the worker thread instead."""
        work, args, future = write
        try:
            conn = self._here()
            with Transaction(self._store, conn):
                value = work(conn, *args)
        except Busy:
            return False
        except Exception as exc:
            future.set_exception(exc)
            return True
        future.set_result(value)
        self._count(1)
        return True

    def _commit(self, group: list[Write]) -> list[tuple[bool, Any]]:
        """The worker thread's part: every write of the group in one transaction, each inside
        its own savepoint. (ok, value or exception) per write."""
        if self._worker is None:
            self._worker = self._connect()
        conn, sql = self._worker, self._store._sql
        outcomes: list[tuple[bool, Any]] = []
        with Transaction(self._store, conn, waited=True):
            for work, args, _ in group:
                sql(conn, "SAVEPOINT write")
                try:
                    outcomes.append((True, work(conn, *args)))
                except Exception as exc:
                    sql(conn, "ROLLBACK TO write")
                    outcomes.append((False, self._as_store_error(exc)))
                sql(conn, "RELEASE write")
        return outcomes

    def _as_store_error(self, exc: Exception) -> Exception:
        return write_error(self._store.where, exc) if isinstance(exc, sqlite3.Error) else exc

    def _deliver(self, group: list[Write], finished: asyncio.Future[list[tuple[bool, Any]]]) -> None:
        try:
            outcomes = finished.result()
        except BaseException as exc:  # BEGIN or COMMIT failed: none of the group is written
            outcomes = [(False, exc)] * len(group)
        else:
            self._count(len(group))
        try:
            self._answer(group, outcomes)
        finally:
            self._next()

    @staticmethod
    def _answer(group: list[Write], outcomes: list[tuple[bool, Any]]) -> None:
        for (_, _, future), (ok, value) in zip(group, outcomes, strict=True):
            if future.done():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def _count(self, writes: int) -> None:
        self.commits += 1
        self.writes += writes

    def _next(self) -> None:
        if self._queue:
            asyncio.get_running_loop().call_soon(self._flush)
            return
        self._flushing = False
        if self._drained is not None:
            self._drained.set_result(None)
            self._drained = None
