"""The store port: everything the engine and the CLI ask of a place where runs live.

Every method is a coroutine, so a store never blocks the event loop while it waits (for a lock,
a disk or a server): the runs sharing the loop go on. tests/test_store_contract.py is the
contract, run against every backend.

The engine's writes are fenced: `append`, `mark_in_flight`, `keep_answer` and `release` fail with
`OwnershipLostError` (and change nothing) unless `owner` still owns the run, and `append` also
unless `record.seq` is the run's next step. `claim_run` takes a run over only from an owner
proven gone (or, with `take_over=True`, one that cannot be proven alive), and records the
takeover with the run. `append` is atomic: the log row, its failed
attempts, the run's totals and, when given, its new status land together or not at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import OwnershipLostError, RunNotFoundError
from ..types import Attempt, Parent, RunRecord, RunStatus, TransitionRecord
from ._owner import Owner


@dataclass(slots=True, kw_only=True)
class RunSummary:
    """One run as listed: identity, status and totals."""

    run_id: str
    machine: str
    status: RunStatus
    created_at: str
    updated_at: str
    steps: int
    input_tokens: int
    output_tokens: int
    cost_usd: float | None  # calls in doubt included, at their worst case
    error: str | None
    stale: bool = False  # marked running, but its owning process is gone: resume it
    in_doubt_calls: int = 0  # calls in flight when a process died: they may have been paid
    in_doubt_usd: float | None = 0.0  # their worst case, part of cost_usd
    parent: Parent | None = None  # a child run's: the run, state and item that started it
    forked_from: str | None = None  # a fork's: the run it was forked from
    experiment: str | None = None  # an experiment's run: the experiment and its arm
    arm: str | None = None


LINEAGE_COLUMNS = "forked_from, experiment, arm"  # the RunSummary fields stores of schema 9 / 2 on have


def run_filters(*, machine: str | None, status: RunStatus | None, batch: str | None, experiment: str | None,
                forked_from: str | None) -> list[tuple[str, Any]]:
    """(column, value) of each filter `list_runs` was given, as the runs table holds them."""
    given = (("batch_id", batch), ("machine", machine or None), ("status", status and RunStatus(status).value),
             ("experiment", experiment), ("forked_from", forked_from))
    return [(column, value) for column, value in given if value is not None]


@dataclass(slots=True, kw_only=True)
class MachineTotals:
    """Totals over every stored run of one machine."""

    machine: str
    runs: int
    steps: int
    input_tokens: int
    output_tokens: int
    cost_usd: float | None  # calls in doubt included, at their worst case
    cache_hits: int
    in_doubt_calls: int = 0
    in_doubt_usd: float | None = 0.0


class Store(Protocol):
    """Runs, their transition logs and their ownership (see the module docstring)."""

    where: str
    """The database, as messages name it (a path or URL, without credentials)."""

    schema_versions: tuple[int, int]
    """(the schema version found when the store was opened, 0 for none; the version now)."""

    # ------------------------------------------------------------------ the engine's writes

    async def create_run(self, run: RunRecord, owner: Owner, *, log: Sequence[TransitionRecord] = ()) -> None:
        """Persist a new run, owned by `owner`, before its first step runs (`RunExistsError`
        when the id is taken); with `log`, its first steps (seq 1, 2, ...: a fork's inherited
        ones) chained and counted as `append` does, in the same transaction: the run exists with
        all of them or not at all."""

    async def claim_run(self, run_id: str, owner: Owner, *, options: dict[str, Any] | None = None,
                        take_over: bool = False) -> tuple[RunRecord, list[TransitionRecord]]:
        """Take over a stored run whose owner is gone (`RunBusyError` when it lives, or may
        live and `take_over` is false; `RunFinishedError` when the run is over), replacing its
        options if given; return it with its log. A takeover from an owner that had not
        released the run is recorded in `RunRecord.takeovers`."""

    async def append(self, record: TransitionRecord, owner: Owner, *, status: RunStatus | None = None,
                     error: str | None = None) -> None:
        """Commit one log row and, if it changes, the run's status (a final status also ends
        the ownership), in one transaction."""

    async def mark_in_flight(self, run_id: str, owner: Owner, *, seq: int, state: str,
                             progress: dict[str, Any] | None = None) -> None:
        """Record, before a paid call is sent, that step `seq` has a call in flight; `progress`
        (JSON data, kept in `RunRecord.in_flight` beside `seq`, `state` and `at`) is what the
        step paid for so far."""

    async def keep_answer(self, run_id: str, owner: Owner, *, seq: int, state: str,
                          progress: dict[str, Any]) -> None:
        """Record, in place of the in-flight mark, that the answer to step `seq`'s call arrived
        (`progress`: the step with its answer), before anything judges it."""

    async def release(self, run_id: str, owner: Owner, status: RunStatus, error: str | None, *,
                      review: dict[str, Any] | None = None) -> None:
        """Give up ownership, leaving the run in `status` (an interrupted or failed run; a
        waiting run stores its pending `review` in the same transaction, `RunRecord.review`)."""

    # ------------------------------------------------------------------ reading

    async def get_run(self, run_id: str) -> RunRecord:
        """The run (`RunNotFoundError` when there is none)."""

    async def load_run(self, run_id: str, *, verified: bool = False) -> tuple[RunRecord, list[TransitionRecord]]:
        """The run and its log as of one moment, without taking ownership; `verified`: only if
        they pass the run's audit chain, else `TamperedRunError` (or `AuditKeyError` when the
        chain needs another key)."""

    async def transitions(self, run_id: str) -> list[TransitionRecord]:
        """The run's log, oldest first, each row with its failed attempts."""

    async def attempts(self, run_id: str) -> list[tuple[int, Attempt]]:
        """(seq, attempt) for every failed model call of the run, in order."""

    async def find_cached(self, request_hash: str) -> TransitionRecord | None:
        """An earlier committed step whose model call had exactly this request (the step cache)."""

    async def list_runs(self, *, machine: str | None = None, status: RunStatus | None = None,
                        limit: int | None = 50, before: str | None = None, parent: str | None = None,
                        batch: str | None = None, experiment: str | None = None,
                        forked_from: str | None = None) -> list[RunSummary]:
        """Top-level runs newest first (at most `limit`; None: all), optionally of one machine,
        status, batch, experiment, or forked from one run; `before` (a run id) pages on to the
        runs created before that one.
        `parent` (a run id): that run's child runs instead, each with its `parent`, in the order
        their ids place them (`child_place`)."""

    async def machine_totals(self, machines: list[str]) -> list[MachineTotals]:
        """Runs, committed steps, paid tokens, cost and cache hits of each named machine."""

    async def run_ids(self, machine: str | None = None) -> list[str]:
        """Every run id (of one machine), oldest first."""

    async def verify_chain(self, run_id: str) -> str | None:
        """None when the run's row, log and attempts are intact, else which row was edited,
        inserted or removed (`AuditKeyError` when the chain needs another key)."""

    async def close(self) -> None:
        """Release connections; the store is not used afterwards."""


class NullStore:
    """Keeps nothing: for in-memory runs (benchmarks, dry runs) that need no durability."""

    where = "memory (nothing is stored)"
    schema_versions = (0, 0)

    async def create_run(self, run: RunRecord, owner: Owner, *, log: Sequence[TransitionRecord] = ()) -> None:
        return None

    async def claim_run(self, run_id: str, owner: Owner, *, options: dict[str, Any] | None = None,
                        take_over: bool = False) -> tuple[RunRecord, list[TransitionRecord]]:
        raise self._gone(run_id)

    async def append(self, record: TransitionRecord, owner: Owner, *, status: RunStatus | None = None,
                     error: str | None = None) -> None:
        return None

    async def mark_in_flight(self, run_id: str, owner: Owner, *, seq: int, state: str,
                             progress: dict[str, Any] | None = None) -> None:
        return None

    async def keep_answer(self, run_id: str, owner: Owner, *, seq: int, state: str,
                          progress: dict[str, Any]) -> None:
        return None

    async def release(self, run_id: str, owner: Owner, status: RunStatus, error: str | None, *,
                      review: dict[str, Any] | None = None) -> None:
        return None

    async def get_run(self, run_id: str) -> RunRecord:
        raise self._gone(run_id)

    async def load_run(self, run_id: str, *, verified: bool = False) -> tuple[RunRecord, list[TransitionRecord]]:
        raise self._gone(run_id)

    async def transitions(self, run_id: str) -> list[TransitionRecord]:
        raise self._gone(run_id)

    async def attempts(self, run_id: str) -> list[tuple[int, Attempt]]:
        raise self._gone(run_id)

    async def find_cached(self, request_hash: str) -> TransitionRecord | None:
        return None

    async def list_runs(self, *, machine: str | None = None, status: RunStatus | None = None,
                        limit: int | None = 50, before: str | None = None, parent: str | None = None,
                        batch: str | None = None, experiment: str | None = None,
                        forked_from: str | None = None) -> list[RunSummary]:
        return []

    async def machine_totals(self, machines: list[str]) -> list[MachineTotals]:
        return []

    async def run_ids(self, machine: str | None = None) -> list[str]:
        return []

    async def verify_chain(self, run_id: str) -> str | None:
        return None

    async def close(self) -> None:
        return None

    def _gone(self, run_id: str) -> RunNotFoundError:
        return RunNotFoundError(run_id, where=self.where,
                                why=f"run {run_id!r} was not persisted (the engine has no store)")


def out_of_order(run_id: str, seq: int, last_seq: int, where: str) -> OwnershipLostError:
    """A step refused by the fence because the run is not at step `seq - 1` (backends share the wording)."""
    if seq <= last_seq:
        return OwnershipLostError(f"run {run_id} already has step {seq}: another process advanced it", where=where)
    return OwnershipLostError(f"run {run_id} is at step {last_seq}, so step {seq} cannot follow it", where=where)
