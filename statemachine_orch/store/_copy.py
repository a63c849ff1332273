"""Copying a history from one store to another (`orch db copy SRC DST`), value for value.

A run is copied as its source stores it: its `runs` row (identity, status, error, owner, the
in-flight mark, totals, `last_seq`, the audit chain's version, key and anchor), its log rows with
their `chain` hashes, its failed attempts and its takeovers, each value as the source database
gives it back. SQLite and PostgreSQL give back the same Python types for every column (TEXT as
str, INTEGER and BIGINT as int, REAL and DOUBLE PRECISION as float), and the audit chain hashes
exactly those values (`_chain.canonical`), so a copied run verifies in the destination under the
key it verified with in the source. Nothing is re-encoded, re-hashed or re-keyed.

Each run is written in one transaction on the destination: all of it, or none. A run the
destination holds already is skipped, so a copy that was interrupted is finished by running it
again. Each copied run is then read back from the destination and compared with what the source
gave (in canonical form, so an INTEGER that came back as a REAL would count), and its audit chain
is verified by the destination store itself (`Store.verify_chain`).

The columns copied are the destination's that the source has too (read from each database's
catalog). The PostgreSQL store's run queue and leases (`queue`, `holder`, `lease_epoch`) are
never copied: they are the state of the processes of one database, not history. A copied run is
queued nowhere, and a `running` one holds no lease, so in PostgreSQL it reads as stale (its
owner is gone) and `orch resume` takes it over, recording the takeover.

The copy reads and writes on connections of its own, blocking (it is a command of its own).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import AuditKeyError, StoreError, UsageError
from ._chain import canonical
from ._contract import Store

if TYPE_CHECKING:
    from .postgres._store import PostgresStore
    from .sqlite._store import SQLiteStore

TABLES = ("runs", "transitions", "attempts", "takeovers")  # every table holding a run's history
_ORDER = {"runs": "", "transitions": " ORDER BY seq", "attempts": " ORDER BY seq, attempt", "takeovers": " ORDER BY at"}
LEASE_COLUMNS = frozenset({"queue", "holder", "lease_epoch"})  # a PostgreSQL database's own processes' state

Columns = dict[str, list[str]]  # table -> the columns copied, in the destination's order
Rows = dict[str, list[tuple[Any, ...]]]  # table -> one run's rows, in the copied columns' order
Outcome = Callable[[str, str, str | None], None]  # (run id, what happened, why)


@dataclass(slots=True, kw_only=True)
class CopyReport:
    """What a copy did, run by run (run ids, oldest first)."""

    source: str
    destination: str
    copied: list[str] = field(default_factory=list)  # written, read back identical and verified
    skipped: list[str] = field(default_factory=list)  # the destination held them already: left as they are
    differing: dict[str, str] = field(default_factory=dict)  # skipped runs the destination holds at another point
    failed: dict[str, str] = field(default_factory=dict)  # not copied (nothing of them was written): why
    tampered: dict[str, str] = field(default_factory=dict)  # copied, but failing their audit chain there: why
    unverified: dict[str, str] = field(default_factory=dict)  # copied, but their chain needs another audit key

    def record(self, run_id: str, outcome: str, why: str | None) -> None:
        if outcome == "copied":
            self.copied.append(run_id)
            return
        if outcome in ("skipped", "differs"):
            self.skipped.append(run_id)
        if outcome != "skipped":
            {"differs": self.differing, "failed": self.failed, "tampered": self.tampered,
             "unverified": self.unverified}[outcome][run_id] = why or outcome


async def copy_runs(source: Store, destination: Store, *, on_run: Outcome | None = None) -> CopyReport:
    """Copy every run of `source` that `destination` lacks (see the module docstring); `on_run`
    hears of each run as it is done: "copied", "skipped", "differs" (skipped, but the destination
    holds it at another step or status), "failed", "tampered" or "unverified", with why."""
    with contextlib.ExitStack() as sides:
        src = side(source, "SRC")
        sides.callback(src.close)
        dst = side(destination, "DST")
        sides.callback(dst.close)
        if src.identity() == dst.identity():
            raise UsageError(f"SRC and DST are the same database ({destination.where})",
                             fix="give another database as DST")
        columns = copied_columns(src, dst)
        report = CopyReport(source=source.where, destination=destination.where)
        held = dst.runs()
        for run_id, at in src.runs().items():
            outcome, why = await _copy_one(run_id, at, held.get(run_id), src, dst, columns, source, destination)
            report.record(run_id, outcome, why)
            if on_run is not None:
                on_run(run_id, outcome, why)
        return report


async def _copy_one(run_id: str, at: tuple[str, int], held: tuple[str, int] | None, src: Side, dst: Side,
                    columns: Columns, source: Store, destination: Store) -> tuple[str, str | None]:
    """(outcome, why) of copying one run (see `copy_runs`)."""
    if held is not None:
        if held == at:
            return "skipped", None
        return "differs", (f"DST holds it {_point(held)}, SRC {_point(at)}; it was left as DST holds it")
    rows = src.read(run_id, columns)
    if rows is None:  # deleted from the source since it was listed
        return "failed", "SRC no longer holds it"
    try:
        if not dst.write(run_id, columns, rows):
            return "skipped", None  # written meanwhile by another copy
    except NotCopied as exc:
        return "failed", str(exc)
    back = dst.read(run_id, columns)
    different = [table for table in TABLES
                 if _canonical_rows((back or {}).get(table, [])) != _canonical_rows(rows[table])]
    if different:
        return "tampered", (f"DST gives back other values than SRC holds in {', '.join(different)} "
                            "(the copy is not value for value)")
    try:
        problem = await destination.verify_chain(run_id)
    except AuditKeyError as exc:
        return "unverified", str(exc)
    if problem is None:
        return "copied", None
    try:
        before = await source.verify_chain(run_id)
    except AuditKeyError:
        before = None
    if before is None:
        return "tampered", f"{problem} (though it verifies in SRC)"
    return "tampered", f"{problem} (so it does in SRC: copied as SRC holds it)"


def _point(at: tuple[str, int]) -> str:
    return f"{at[0]} at step {at[1]}"


def _canonical_rows(rows: Sequence[tuple[Any, ...]]) -> list[str]:
    """The rows as the audit chain sees values (types included), in a fixed order."""
    return sorted(canonical(list(row)) for row in rows)


def copied_columns(src: Side, dst: Side) -> Columns:
    """Each table's columns to copy: the destination's that the source has too, but the lease
    columns. A source column the destination lacks (a newer source) refuses the copy."""
    columns: Columns = {}
    for table in TABLES:
        theirs, ours = src.columns(table), dst.columns(table)
        if not theirs or not ours:
            lacking = src if not theirs else dst
            raise StoreError(f"{lacking.where} has no {table} table", where=lacking.where,
                             fix="both must be statemachine_orch databases")
        lost = [name for name in theirs if name not in ours and name not in LEASE_COLUMNS]
        if lost:
            raise UsageError(f"{dst.where} has no column {', '.join(f'{table}.{n}' for n in lost)}, which "
                             f"{src.where} holds", fix="upgrade DST (`orch --db DST db migrate`) or statemachine_orch")
        columns[table] = [name for name in ours if name in theirs and name not in LEASE_COLUMNS]
    return columns


class NotCopied(Exception):
    """This run could not be written (a value the destination cannot hold); nothing of it was."""


class AlreadyThere(NotCopied):
    """Another process wrote this run meanwhile (another copy); nothing of it was written here."""


def quoted(name: str) -> str:
    """An identifier as SQL quotes it, in SQLite and PostgreSQL alike."""
    return '"' + name.replace('"', '""') + '"'


class Side:
    """One database of a copy: what it holds (catalog and runs), one run's rows read as of one
    moment, one run written in one transaction. `mark` is the driver's placeholder."""

    mark = "?"

    def __init__(self, store: Store, role: str) -> None:
        self.where = f"{role} {store.where}"

    # ------------------------------------------------------------------ each driver's own

    def identity(self) -> object:
        """Equal for two sides on the same database."""
        raise NotImplementedError

    def columns(self, table: str) -> list[str]:
        """The table's columns, in order (none: no such table)."""
        raise NotImplementedError

    def query(self, copy_sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def reading(self) -> contextlib.AbstractContextManager[None]:
        """A read-only transaction: the statements inside it see one moment of the database."""
        raise NotImplementedError

    def writing(self) -> contextlib.AbstractContextManager[None]:
        """A write transaction: committed at the end, rolled back on an error, which is `NotCopied`
        when the run's values are the problem (else a `StoreError`: the database is)."""
        raise NotImplementedError

    def executemany(self, copy_sql: str, rows: list[tuple[Any, ...]]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ the same SQL on both

    def select_sql(self, table: str, names: list[str]) -> str:
        """The columns `names` of one run's rows of `table` (one of TABLES), in their order."""
        return (f"SELECT {', '.join(map(quoted, names))} FROM {TABLES[TABLES.index(table)]} "
                f"WHERE run_id = {self.mark}{_ORDER[table]}")

    def insert_sql(self, table: str, names: list[str]) -> str:
        """A row of `table` (one of TABLES): the columns `names`, each value a placeholder."""
        return (f"INSERT INTO {TABLES[TABLES.index(table)]} ({', '.join(map(quoted, names))}) "
                f"VALUES ({', '.join([self.mark] * len(names))})")

    def runs(self) -> dict[str, tuple[str, int]]:
        """run id -> (status, last seq) of every run, oldest first."""
        with self.reading():
            return {run_id: (status, last_seq) for run_id, status, last_seq in self.query(
                "SELECT run_id, status, last_seq FROM runs ORDER BY created_at, run_id", ())}

    def read(self, run_id: str, columns: Columns) -> Rows | None:
        """The run's rows in every table (None when it has no `runs` row), as of one moment."""
        rows: Rows = {}
        with self.reading():
            for table in TABLES:
                select_sql = self.select_sql(table, columns[table])
                rows[table] = self.query(select_sql, (run_id,))
        return rows if rows["runs"] else None

    def write(self, run_id: str, columns: Columns, rows: Rows) -> bool:
        """Write the run's rows in one transaction; False (nothing written) when the run is here already."""
        try:
            with self.writing():
                select_sql = self.select_sql("runs", ["run_id"])
                if self.query(select_sql, (run_id,)):
                    raise AlreadyThere(run_id)
                for table in TABLES:
                    if rows[table]:
                        insert_sql = self.insert_sql(table, columns[table])
                        self.executemany(insert_sql, rows[table])
        except AlreadyThere:
            return False
        return True


def side(store: Store, role: str) -> Side:
    """The copy's side on `store`'s database (SQLite or PostgreSQL)."""
    from .postgres._store import PostgresStore
    from .sqlite._store import SQLiteStore

    if isinstance(store, SQLiteStore):
        return _SQLite(store, role)
    if isinstance(store, PostgresStore):
        return _Postgres(store, role)
    raise UsageError(f"{role} {store.where} is not a database runs can be copied from or to",
                     fix="give a SQLite file or a postgresql:// URL")


class _SQLite(Side):
    """Reads on the store's own connection (a file it opened immutable included); writes on one
    of their own that waits for the write lock up to the store's busy timeout."""

    def __init__(self, store: SQLiteStore, role: str) -> None:
        import sqlite3

        from .sqlite._schema import SCHEMA_VERSION

        super().__init__(store, role)
        self._store = store
        self._conn = store.conn
        self._writer: sqlite3.Connection | None = None
        version: int = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:  # a file of an older version that could not be upgraded (read-only)
            raise UsageError(f"{self.where} is at schema version {version} and could not be upgraded to "
                             f"{SCHEMA_VERSION} (it cannot be written)",
                             fix="copy the file to a writable directory and give that copy")

    def identity(self) -> object:
        import os

        stat = os.stat(self._store.path)
        return ("sqlite", stat.st_dev, stat.st_ino)

    def columns(self, table: str) -> list[str]:
        return [row[0] for row in self._conn.execute("SELECT name FROM pragma_table_info(?) ORDER BY cid",
                                                     (table,))]

    def query(self, copy_sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        import sqlite3

        conn = self._writer if self._writer is not None and self._writer.in_transaction else self._conn
        try:
            return conn.execute(copy_sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read {self.where}: {exc}", where=self.where) from exc

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        self._conn.execute("BEGIN")  # deferred: the first read fixes the snapshot (WAL)
        try:
            yield
        finally:
            self._conn.execute("COMMIT")

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        import sqlite3

        from .sqlite._transaction import connect

        if self._writer is None:
            store = self._store
            self._writer = connect(store.path, store.where, immutable=False, busy_timeout_s=store.busy_timeout_s,
                                   wait=True, synchronous=store.synchronous)
        writer = self._writer
        try:
            writer.execute("BEGIN IMMEDIATE")
            yield
            writer.execute("COMMIT")
        except BaseException as exc:
            if writer.in_transaction:
                writer.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError):  # locked, read-only, full: the database, not the run
                raise StoreError(f"cannot write to {self.where}: {exc}", where=self.where) from exc
            if isinstance(exc, sqlite3.Error):
                raise NotCopied(f"{self.where} refused it: {exc}") from exc
            raise

    def executemany(self, copy_sql: str, rows: list[tuple[Any, ...]]) -> None:
        assert self._writer is not None
        self._writer.executemany(copy_sql, rows)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class _Postgres(Side):
    """Reads and writes on a connection of its own to the store's database and schema."""

    mark = "%s"

    def __init__(self, store: PostgresStore, role: str) -> None:
        import psycopg

        super().__init__(store, role)
        try:
            self._conn = store.connect_sync()
        except psycopg.Error as exc:
            raise StoreError(f"cannot open {self.where}: {' '.join(str(exc).split())}", where=self.where,
                             fix="check the DSN and that the server is up") from None

    def identity(self) -> object:
        return ("postgresql", *self.query("SELECT inet_server_addr()::text, inet_server_port(), current_database(), "
                                         "current_schema()", ())[0])

    def columns(self, table: str) -> list[str]:
        return [row[0] for row in self.query("SELECT column_name FROM information_schema.columns WHERE "
                                            "table_schema = current_schema() AND table_name = %s "
                                            "ORDER BY ordinal_position", (table,))]

    def query(self, copy_sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        with self._server():
            found: list[tuple[Any, ...]] = self._conn.execute(copy_sql, params).fetchall()
        return found

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        with self._server(), self._conn.transaction():
            self._conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            yield

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        import psycopg

        try:
            with self._server(), self._conn.transaction():
                yield
        except psycopg.errors.UniqueViolation as exc:  # another copy wrote the run meanwhile
            raise AlreadyThere(str(exc)) from exc
        except (psycopg.Error, ValueError) as exc:  # a value PostgreSQL cannot hold (NUL in text, say)
            raise NotCopied(f"{self.where} refused it: {' '.join(str(exc).split())}") from exc

    @contextlib.contextmanager
    def _server(self) -> Iterator[None]:
        """Errors of the connection or the server (not of one run's values) as `StoreError`s."""
        import psycopg

        try:
            yield
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise StoreError(f"{self.where}: {' '.join(str(exc).split())}", where=self.where) from None

    def executemany(self, copy_sql: str, rows: list[tuple[Any, ...]]) -> None:
        with self._conn.cursor() as cursor:
            cursor.executemany(copy_sql, rows)

    def close(self) -> None:
        self._conn.close()
