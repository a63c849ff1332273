"""What every `orch` command shares: the store named by --db/ORCH_DB, the price table, the
numeric settings from the environment, Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from ..errors import UsageError
from ..llm._prices import PriceTable
from ..store._contract import Store
from ..store._open import open_store
from ..types import check_amount

DEFAULT_DB = "orch.db"
DEFAULT_BUSY_TIMEOUT_S = 30.0  # how long a write waits for another process's lock
DEFAULT_STOP_GRACE_S = 30.0  # SIGTERM: how long a step in progress may take to finish
DEFAULT_LEASE_TTL_S = 30.0  # PostgreSQL: how long a process's runs stay its own without a heartbeat
T = TypeVar("T")


class Interrupted(Exception):
    """Ctrl-C stopped a run; the message says what is stored and how to continue."""


def cli_store(args: argparse.Namespace, *, create: bool, tracer: Callable[[str, object], None] | None = None,
              upgrade: bool = False, target: str | None = None) -> Store:
    """The store --db (else ORCH_DB, else orch.db) names, or `target` (`orch db copy`), with --sync,
    ORCH_BUSY_TIMEOUT and ORCH_LEASE_TTL (each backend takes the settings it has); `upgrade`:
    `orch db migrate`."""
    if target is None:
        target = args.db if args.db is not None else os.environ.get("ORCH_DB") or DEFAULT_DB
    sync = (args.sync or os.environ.get("ORCH_SYNC") or "full").upper()
    if sync not in ("FULL", "NORMAL"):
        raise UsageError(f"--sync {sync.lower()!r} is not supported", fix="use full or normal")
    return open_store(target, synchronous=sync, create=create, busy_timeout_s=args.busy_timeout_s,
                      tracer=tracer, lease_ttl_s=args.lease_ttl_s, upgrade=upgrade)


def with_store(args: argparse.Namespace, work: Callable[[Store], Awaitable[T]], *, create: bool = False) -> T:
    """`work(store)` on the command's store, closed afterwards."""

    async def go() -> T:
        store = cli_store(args, create=create)
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(go())


def at_file(path: str, flag: str) -> str:
    """The text of the file `FLAG @PATH` names (a byte order mark dropped), or a one-line UsageError."""
    if not path:
        raise UsageError(f"{flag} @ names no file", fix=f"give {flag} @path/to/file")
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise UsageError(f"cannot read {flag} file {path}: {exc.strerror or exc}",
                         fix="check the path after the @") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{flag} file {path} is not UTF-8 text: {exc.reason} at byte {exc.start}",
                         fix="save it as UTF-8") from None


def read_settings(args: argparse.Namespace) -> None:
    """Read what every command may use once, before it runs: a bad price file or setting is a
    usage error whatever the command, and stops it before anything is stored."""
    args.price_table = _read_prices(args)
    args.busy_timeout_s = env_seconds("ORCH_BUSY_TIMEOUT", DEFAULT_BUSY_TIMEOUT_S)
    args.stop_grace_s = env_seconds("ORCH_STOP_GRACE", DEFAULT_STOP_GRACE_S)
    args.lease_ttl_s = env_seconds("ORCH_LEASE_TTL", DEFAULT_LEASE_TTL_S)


def _read_prices(args: argparse.Namespace) -> PriceTable:
    path = args.prices or os.environ.get("ORCH_PRICES")
    if not path:
        return PriceTable()
    try:
        return PriceTable.load(path)
    except (OSError, ValueError, UsageError) as exc:
        raise UsageError(f"cannot use price file {path}: {exc}") from None


def env_seconds(name: str, default: float) -> float:
    """The environment variable `name` as a number of seconds, `default` when unset or empty."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not a number of seconds",
                         fix=f"set a number, or unset it for the default ({default:g})") from None
    check_amount(name, value)
    return value
