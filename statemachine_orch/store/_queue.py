"""The queue port: runs stored to be driven later by `orch worker` processes (a store that
serves many hosts, PostgreSQL, implements it; `queue_of` finds it on a store).

A queued run waits as `pending` with no owner. A worker claims the oldest one of its queue
whose machine version it has loaded, or one whose holder's lease expired (a takeover, recorded
with the run), and owns it as any resuming process does: every write is fenced on its claim.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ..errors import UsageError
from ..types import RunRecord, TransitionRecord
from ._contract import Store
from ._owner import Owner


@dataclass(slots=True, kw_only=True)
class WorkerInfo:
    """A live process holding a lease in the database (`orch workers`)."""

    name: str  # "worker" for `orch worker`, "run" for any other process driving runs
    host: str
    pid: int
    queue: str | None
    machines: list[str]
    started_at: str
    heartbeat_age_s: float
    expires_in_s: float
    stopping: bool
    runs: list[str] = field(default_factory=list)


@runtime_checkable
class RunQueue(Protocol):
    """Queued runs and the workers that claim them."""

    async def enqueue(self, run: RunRecord, queue: str) -> None:
        """Store `run` as pending in `queue` and wake the idle workers (`RunExistsError` when the
        id is taken)."""

    async def claim_next(self, owner: Owner, *, queue: str, machine_hashes: Collection[str],
                         machines: Collection[str] = ()) -> tuple[RunRecord, list[TransitionRecord]] | None:
        """Claim the oldest claimable run of `queue` whose machine hash is one of `machine_hashes`
        (or whose machine is one of `machines`, whatever its version), with its log; None when
        there is none. Runs another worker is claiming are skipped, not waited for."""

    async def wait_for_work(self, timeout_s: float) -> None:
        """Return when a run is queued or handed back, or after `timeout_s` (the polling fallback)."""

    async def workers(self) -> list[WorkerInfo]:
        """The live processes holding leases, oldest first, each with the runs it drives."""

    def name_this_process(self, name: str, *, queue: str | None, machines: list[str]) -> None:
        """How `orch workers` lists this process (before it holds its first run)."""

    async def set_stopping(self) -> None:
        """Show this process as stopping (shutting down gracefully) in `orch workers`."""


def queue_of(store: Store) -> RunQueue:
    """The store's queue, or a usage error saying which store has one."""
    if not isinstance(store, RunQueue):
        raise UsageError(f"{store.where} has no run queue: queued runs and workers need PostgreSQL",
                         fix="point --db (or ORCH_DB) at a postgresql:// database")
    return store
