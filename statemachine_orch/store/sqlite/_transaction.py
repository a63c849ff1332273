"""Transactions that never wait on the event loop: a lock held elsewhere is `Busy` (nothing
was done) and the store retries the work in a worker thread (`_group` for writes)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
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
            raise write_error(self.store.where, exc) from exc
        if kind is None:
            raise exc  # COMMIT itself failed with something other than a sqlite3 error


def write_error(where: str, exc: sqlite3.Error) -> StoreError:
    return StoreError(f"cannot write to {where}: {exc}", where=where)


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


def while_busy(action: Callable[[], T], timeout_s: float) -> T:
    """Run `action` (opening work: switching to WAL, creating or upgrading the schema),
    retrying while another opener holds the file, up to `timeout_s`; return what it returns."""
    deadline, delay = time.monotonic() + timeout_s, 0.001
    while True:
        try:
            return action()
        except (sqlite3.OperationalError, StoreError) as exc:
            if not is_busy(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def connect(path: Path, where: str, *, immutable: bool, busy_timeout_s: float, wait: bool,
            synchronous: str) -> sqlite3.Connection:
    """A connection in WAL mode that waits for locks up to `busy_timeout_s`, or (`wait` False)
    not at all; `immutable` opens a file in a directory we cannot write, for reading."""
    from urllib.parse import quote  # here: only a read-only directory needs it

    target = f"file:{quote(str(path.absolute()))}?immutable=1" if immutable else path
    try:
        conn = sqlite3.connect(target, isolation_level=None, timeout=busy_timeout_s if wait else 0,
                               check_same_thread=False, uri=immutable)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open database {where}: {exc}", where=where) from exc
    try:
        if not immutable:
            while_busy(lambda: conn.execute("PRAGMA journal_mode=WAL"), busy_timeout_s)
        conn.execute(f"PRAGMA synchronous={synchronous}")
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StoreError(f"{where} is not a usable SQLite database: {exc}", where=where) from exc
    return conn
