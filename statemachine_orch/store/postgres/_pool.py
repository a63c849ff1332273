"""Connections to one PostgreSQL database: a pool opened on first use, the listener of
LISTEN/NOTIFY, and database errors turned into `StoreError`s that name the database (never
its password)."""

from __future__ import annotations

import asyncio
from typing import Any

from ...errors import StoreError

NOTIFY_CHANNEL = "orch_work"


def redacted(dsn: str) -> str:
    """The DSN as messages may show it: no password."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        parts = conninfo_to_dict(dsn)
    except Exception:
        return "a PostgreSQL database (its DSN could not be parsed)"
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{parts.get('host', '')}{port}/{parts.get('dbname', '')}"


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


class Pool:
    """Autocommit connections to `dsn` with `kwargs` (`conn.transaction()` makes a transaction),
    at most `size` at once, opened on the running event loop the first time one is needed."""

    def __init__(self, dsn: str, kwargs: dict[str, Any], size: int, where: str) -> None:
        self.dsn, self.kwargs, self.size, self.where = dsn, kwargs, size, where
        self._opening: asyncio.Future[Any] | None = None
        self._listener: Any = None

    def connect_sync(self) -> Any:
        """A connection of its own, outside the pool (the lease's heartbeat thread)."""
        import psycopg

        return psycopg.connect(self.dsn, **self.kwargs)

    def borrow(self) -> Borrowed:
        return Borrowed(self)

    async def opened(self) -> Any:
        """The pool (one opening shared by every caller that needs it meanwhile)."""
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open())
        return await self._opening

    async def _open(self) -> Any:
        from psycopg_pool import AsyncConnectionPool

        pool = AsyncConnectionPool(self.dsn, kwargs=self.kwargs, min_size=1, max_size=self.size, open=False,
                                   name="orch")
        await pool.open(wait=True, timeout=30.0)
        return pool

    async def wait_for_notice(self, timeout_s: float) -> None:
        """Return at the next notice on NOTIFY_CHANNEL, or after `timeout_s`."""
        import psycopg

        try:
            if self._listener is None or self._listener.closed:
                self._listener = await psycopg.AsyncConnection.connect(self.dsn, **self.kwargs)
                await self._listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
            async for _ in self._listener.notifies(timeout=timeout_s, stop_after=1):
                break
        except psycopg.OperationalError:  # the server went away: poll, and listen again next time
            if self._listener is not None:
                await self._listener.close()
            await asyncio.sleep(min(timeout_s, 1.0))

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.close()
        if self._opening is not None:
            try:
                pool = await self._opening
            except Exception:  # it never opened (the server was away): nothing to close
                return
            await pool.close()


class Borrowed:
    """`async with pool.borrow() as conn`: a pooled connection, with database errors as
    `StoreError`s naming the database."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._borrowed: Any = None

    async def __aenter__(self) -> Any:
        import psycopg

        where = self._pool.where
        try:
            self._borrowed = (await self._pool.opened()).connection()
            return await self._borrowed.__aenter__()
        except (psycopg.Error, OSError, TimeoutError) as exc:
            raise StoreError(f"cannot reach {where}: {one_line(exc)}", where=where,
                             fix="check that the server is up and the DSN") from None

    async def __aexit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        import psycopg

        where = self._pool.where
        try:
            await self._borrowed.__aexit__(kind, exc, tb)
        except psycopg.Error as failed:
            raise StoreError(f"{where}: {one_line(failed)}", where=where) from None
        if isinstance(exc, psycopg.Error):
            raise StoreError(f"{where}: {one_line(exc)}", where=where) from exc
