"""Transactions that never wait on the event loop: a lock held elsewhere is `Busy` (nothing
was done) and the store retries the work in a worker thread (`_group` for writes)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ...errors import StoreError

if TYPE_CHECKING:
    from ._store import SQLiteStore

T = TypeVar("T")


class Busy(Exception):
    """Another connection holds the lock this call needs."""


class Transaction:
    """`with Transaction(store, conn):` BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error.

    A lock held elsewhere is `Busy` (nothing was done) unless the connection already waited
    for it (`waited`); other sqlite3 errors are `StoreError`s."""

    __slots__ = ("conn", "store", "waited")

    def __init__(self, store: SQLiteStore, conn: sqlite3.Connection, *, waited: bool = False) -> None:
        self.store = store
        self.conn = conn
        self.waited = waited

    def __enter__(self) -> sqlite3.Connection:
        try:
            self.store._sql(self.conn, "BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if is_busy(exc) and not self.waited:
                raise Busy() from exc
            raise StoreError(f"cannot write to {self.store.where}: {exc}", where=self.store.where,
                             fix="retry when the database is free") from exc
        return self.conn

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        conn = self.conn
        if exc is None:
            try:
                self.store._sql(conn, "COMMIT")
                return
            except BaseException as failed:
                exc = failed
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise StoreError(f"cannot write to {self.store.where}: {exc}", where=self.store.where) from exc
        if kind is None:
            raise exc  # COMMIT itself failed with something other than a sqlite3 error


def busy_as(work: Callable[..., T], conn: sqlite3.Connection, *args: Any) -> T:
    """`work(conn, *args)`, a lock held elsewhere raised as `Busy`."""
    try:
        return work(conn, *args)
    except sqlite3.OperationalError as exc:
        if is_busy(exc):
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise Busy() from exc
        raise


def is_busy(exc: Exception) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


def while_busy(action: Callable[[], object], timeout_s: float) -> None:
    """Run `action` (opening work: switching to WAL, creating or upgrading the schema),
    retrying while another opener holds the file, up to `timeout_s`."""
    deadline, delay = time.monotonic() + timeout_s, 0.001
    while True:
        try:
            action()
            return
        except (sqlite3.OperationalError, StoreError) as exc:
            if not is_busy(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
