"""What every `orch` command shares: the store named by --db/ORCH_DB, the price table, Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..errors import UsageError
from ..llm._prices import PriceTable
from ..store._contract import Store
from ..store._open import open_store

DEFAULT_DB = "orch.db"
T = TypeVar("T")


class Interrupted(Exception):
    """Ctrl-C stopped a run; the message says what is stored and how to continue."""


def cli_store(args: argparse.Namespace, *, create: bool, tracer: Callable[[str, object], None] | None = None
              ) -> Store:
    """The store --db (else ORCH_DB, else orch.db) names, with --sync and ORCH_BUSY_TIMEOUT."""
    target = args.db or os.environ.get("ORCH_DB") or DEFAULT_DB
    sync = (args.sync or os.environ.get("ORCH_SYNC") or "full").upper()
    if sync not in ("FULL", "NORMAL"):
        raise UsageError(f"--sync {sync.lower()!r} is not supported", fix="use full or normal")
    busy = os.environ.get("ORCH_BUSY_TIMEOUT")
    try:
        busy_s = float(busy) if busy else 30.0
    except ValueError:
        raise UsageError(f"ORCH_BUSY_TIMEOUT={busy!r} is not a number of seconds") from None
    return open_store(target, synchronous=sync, create=create, busy_timeout_s=busy_s, tracer=tracer)


def with_store(args: argparse.Namespace, work: Callable[[Store], Awaitable[T]], *, create: bool = False) -> T:
    """`work(store)` on the command's store, closed afterwards."""

    async def go() -> T:
        store = cli_store(args, create=create)
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(go())


def read_prices(args: argparse.Namespace) -> PriceTable:
    path = args.prices or os.environ.get("ORCH_PRICES")
    if not path:
        return PriceTable()
    try:
        return PriceTable.load(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot use price file {path}: {exc}") from None
