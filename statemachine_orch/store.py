"""The store interface the engine writes through, and a store that keeps nothing.

The engine needs four verbs. Every implementation must make `append` atomic (the log row
and, when given, the run's new status land together or not at all) and fenced (it fails
with `OwnershipLostError` unless `owner` still owns the run and `seq` is the next one).
SQLite implements it now (`sqlite_store.SQLiteStore`); PostgreSQL will implement the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from .errors import RunNotFoundError
from .ownership import Owner
from .types import RunRecord, RunStatus, TransitionRecord


class Store(Protocol):
    def create_run(self, run: RunRecord, owner: Owner) -> None:
        """Persist a new run, owned by `owner`, before its first step runs."""

    def load_run(self, run_id: str) -> tuple[RunRecord, list[TransitionRecord]]:
        """The run and its log, read without taking ownership."""

    def claim_run(self, run_id: str, owner: Owner, *, options: dict[str, Any] | None = None
                  ) -> tuple[RunRecord, list[TransitionRecord]]:
        """Take ownership of a stored run whose owner is gone (replacing its options if given);
        return it with its log."""

    def append(
        self,
        record: TransitionRecord,
        owner: Owner,
        *,
        status: RunStatus | None = None,
        error: str | None = None,
    ) -> None:
        """Commit one log row (and the run's new status, if it changes) in one transaction."""

    def release(self, run_id: str, owner: Owner, status: RunStatus, error: str | None) -> None:
        """Give up ownership, leaving the run in `status` (used when a run is interrupted)."""

    def find_cached(self, request_hash: str) -> TransitionRecord | None:
        """An earlier successful model call with this exact request, for the step cache."""

    def mark_in_flight(self, run_id: str, owner: Owner, seq: int, state: str) -> None:
        """Record, before a paid call is sent, that step `seq` has a call in flight (fenced)."""

    def verify_chain(self, run_id: str) -> str | None:
        """None when the run's log is intact, else which row was edited, inserted or removed."""


@dataclass(slots=True, kw_only=True)
class RunSummary:
    """One line of `orch runs`."""

    run_id: str
    machine: str
    status: str
    created_at: str
    updated_at: str
    steps: int
    input_tokens: int
    output_tokens: int
    cost_usd: float | None
    error: str | None
    stale: bool = False  # marked running, but its owning process is gone: resume it


@dataclass(slots=True, kw_only=True)
class MachineTotals:
    """Totals over every stored run of one machine."""

    machine: str
    runs: int
    steps: int
    input_tokens: int
    output_tokens: int
    cost_usd: float | None
    cache_hits: int


class NullStore:
    """Keeps nothing: for in-memory runs (benchmarks, dry runs) that need no durability."""

    def create_run(self, run: RunRecord, owner: Owner) -> None:
        return None

    def load_run(self, run_id: str) -> tuple[RunRecord, list[TransitionRecord]]:
        raise RunNotFoundError(f"run {run_id!r} was not persisted (no store)")

    def claim_run(self, run_id: str, owner: Owner, *, options: dict[str, Any] | None = None
                  ) -> tuple[RunRecord, list[TransitionRecord]]:
        raise RunNotFoundError(f"run {run_id!r} cannot be resumed: it was not persisted (no store)")

    def append(
        self,
        record: TransitionRecord,
        owner: Owner,
        *,
        status: RunStatus | None = None,
        error: str | None = None,
    ) -> None:
        return None

    def release(self, run_id: str, owner: Owner, status: RunStatus, error: str | None) -> None:
        return None

    def find_cached(self, request_hash: str) -> TransitionRecord | None:
        return None

    def mark_in_flight(self, run_id: str, owner: Owner, seq: int, state: str) -> None:
        return None

    def verify_chain(self, run_id: str) -> str | None:
        return None
