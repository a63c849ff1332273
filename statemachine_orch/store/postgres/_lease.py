"""This process's lease in a PostgreSQL database: the row that says it is alive.

Every process that drives runs in the database has one `workers` row, and each run it owns
names that row (`runs.holder`). A heartbeat thread pushes the row's expiry on every TTL/3,
on a connection of its own, by the database's clock only (no host clock is compared with
another). A run whose holder's row has expired (or is gone) is abandoned: another process may
claim it, and its old owner can no longer commit to it, since every write is fenced on a live
lease. An expired lease is never renewed: a process that was paused or cut off past its TTL
finds its lease lost, drops the runs it held (`LeaseLostError` on their next write) and takes a
new lease for any run it starts afterwards.

The heartbeat is a thread, not a task, so that user code holding the event loop (a long
synchronous step) does not cost its run the lease: the process is alive, and so is its lease.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from .._owner import identity

RENEW = ("UPDATE workers SET heartbeat_at = clock_timestamp(), expires_at = clock_timestamp() + "
         "make_interval(secs => ttl_s) WHERE key = %s AND expires_at > clock_timestamp()")
# true while the holder named by `runs.holder` has a live lease (used in every fence)
HOLDER_ALIVE = "EXISTS (SELECT 1 FROM workers w WHERE w.key = runs.holder AND w.expires_at > clock_timestamp())"


class Lease:
    """One process's lease (see the module docstring); `key` is None until it holds a run."""

    def __init__(self, connect: Callable[[], Any], ttl_s: float) -> None:
        self._connect = connect
        self.ttl_s = ttl_s
        self.key: str | None = None
        self.lost: set[str] = set()  # keys whose lease expired before it was renewed
        self.name = "run"  # what `orch workers` calls this process; a worker names itself
        self.queue: str | None = None
        self.machines: list[str] = []
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._registering: asyncio.Lock | None = None
        self._renewed = 0.0  # time.monotonic() of the key's last registration or renewal

    async def hold(self, conn: Any) -> str:
        """The live key, registered now (on `conn`, in autocommit) if this process holds none;
        runs started at once wait for one registration, so they all name the lease renewed.

        A key not renewed for half its TTL (this process was paused: the heartbeat did not run)
        is renewed here first, or, expired, given up for a new one: a run is never claimed
        under a lease that is already dead."""
        key = self.key
        if key is not None and time.monotonic() - self._renewed < self.ttl_s / 2:
            return key
        if self._registering is None:
            self._registering = asyncio.Lock()
        async with self._registering:
            key = self.key
            if key is not None and (await conn.execute(RENEW, (key,))).rowcount:
                self._renewed = time.monotonic()
                return key
            if key is not None:
                self.drop(key)
            return await self._register(conn)

    def drop(self, key: str) -> None:
        """Give up `key`, found expired: the next run takes a new lease."""
        with self._guard:
            if self.key == key:
                self.key = None
                self.lost.add(key)

    async def _register(self, conn: Any) -> str:
        key = os.urandom(12).hex()
        host, pid, _, _ = identity(os.getpid())
        await conn.execute(
            "INSERT INTO workers (key, name, host, pid, queue, machines, expires_at, ttl_s) "
            "VALUES (%s, %s, %s, %s, %s, %s, clock_timestamp() + make_interval(secs => %s), %s)",
            (key, self.name, host, pid, self.queue, json.dumps(self.machines), self.ttl_s, self.ttl_s))
        # rows of processes long gone: their runs (if any) are claimable whether or not the row is there
        await conn.execute("DELETE FROM workers WHERE expires_at < clock_timestamp() - interval '1 hour'")
        with self._guard:
            self.key, self._renewed = key, time.monotonic()
            if self._thread is None:
                self._thread = threading.Thread(target=self._beat, name="orch-lease", daemon=True)
                self._thread.start()
        return key

    def _beat(self) -> None:
        conn = None
        try:
            while not self._stop.wait(self.ttl_s / 3):
                key = self.key
                if key is None:
                    continue
                try:
                    if conn is None or conn.closed:
                        conn = self._connect()
                    renewed = conn.execute(RENEW, (key,)).rowcount
                except Exception:  # the server is unreachable: try again next beat, within the TTL
                    conn = None
                    continue
                if renewed:
                    self._renewed = time.monotonic()
                else:
                    self.drop(key)
        finally:
            if conn is not None:
                conn.close()

    async def release(self, conn: Any) -> None:
        """End the lease (the process stops): runs still naming it become claimable at once."""
        self._stop.set()
        with self._guard:
            key, self.key = self.key, None
        if key is not None:
            await conn.execute("DELETE FROM workers WHERE key = %s", (key,))

    def join(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
