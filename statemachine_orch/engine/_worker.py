"""A worker: claims queued runs and drives them, `concurrency` at a time, until stopped (`orch worker`).

Many workers on many hosts share one queue through the store (`store._queue`): each claim
takes one run, with a new owner token, and every write of that run is fenced on the claim.
An idle worker waits for the store to say that work arrived (LISTEN/NOTIFY in PostgreSQL),
and polls every `poll_s` anyway: a run whose holder died is never announced, it just becomes
claimable when its lease expires.

A worker claims only runs of the machine versions it has loaded (their source hash), so a
deploy never moves a run in flight onto changed code; `migrate=True` also claims runs of
other versions of the same machines, which are replayed on this version first and refused
(left `interrupted`, with the divergence) where it no longer fits their log.

`request_stop(grace_s)`: claim nothing more; each run stops before its next step (a step in
progress gets `grace_s` to commit) and is handed back as `pending`, which wakes another worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..definition._machine import Machine
from ..errors import OrchError, OwnershipLostError, StoreError, TamperedRunError, UsageError
from ..store._owner import Owner
from ..store._queue import RunQueue, queue_of
from ..types import RunRecord, RunStatus, TransitionRecord, now_iso
from ._replay import replay_run

if TYPE_CHECKING:
    from ._engine import Engine
    from ._run import Run

WorkerEvent = Callable[[str, str, str], None]
"""`on_event(kind, run_id, detail)`: claimed, took_over, completed, failed, handed_back, lost,
refused, awaiting_review (the run reached a review state), or waiting (the database could not
be reached to claim; run_id empty)."""


@dataclass(slots=True)
class WorkerStats:
    """What a worker did, by what became of the runs it claimed."""

    claimed: int = 0
    took_over: int = 0  # claimed from a holder whose lease had expired
    completed: int = 0  # completed or terminated
    failed: int = 0  # failed, over budget or stopped by an error: resumable
    handed_back: int = 0  # given back as pending when the worker stopped
    lost: int = 0  # its lease expired or another process took the run: dropped, not written
    refused: int = 0  # another version of the machine whose log no longer replays (`migrate`)
    waiting: int = 0  # reached a review state: left waiting for a decision (`orch review`)


class Worker:
    """Claims and drives queued runs (see the module docstring)."""

    def __init__(self, engine: Engine, machines: Sequence[Machine], *, queue: str = "default", concurrency: int = 4,
                 poll_s: float = 2.0, migrate: bool = False, on_event: WorkerEvent | None = None) -> None:
        if not machines:
            raise UsageError("a worker needs at least one machine to run", fix="name the machine modules it serves")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise UsageError(f"concurrency={concurrency!r} is not a whole number of runs >= 1", fix="give 1 or more")
        for machine in machines:
            engine.compiled(machine)  # a machine the engine cannot run is refused before anything is claimed
        self.engine, self.queue, self.concurrency, self.poll_s = engine, queue, concurrency, poll_s
        self._versions = {machine.source_hash: machine for machine in machines}
        self._by_name = {machine.name: machine for machine in machines} if migrate else {}
        self.on_event = on_event
        self.stats = WorkerStats()
        self._running: dict[str, Run] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop: float | None = None
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self, *, until_idle: bool = False) -> WorkerStats:
        """Work until `request_stop` (or, with `until_idle`, until the queue has nothing this
        worker can claim and no run of its own is going)."""
        store = queue_of(self.engine.store)
        store.name_this_process("worker", queue=self.queue,
                                machines=[f"{m.name}@{h[:12]}" for h, m in self._versions.items()])
        wake = self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        listener = asyncio.create_task(self._listen(store, wake))
        try:
            while self._stop is None:
                wake.clear()
                try:
                    await self._claim(store)
                except StoreError as exc:  # the database is away: the runs in flight go on; claim later
                    self._event("waiting", "", str(exc))
                    if until_idle and not self._tasks:
                        raise
                else:
                    if until_idle and not self._tasks:
                        break
                await wake.wait()
            if self._stop is not None:
                await store.set_stopping()
            while self._tasks:
                await asyncio.wait(set(self._tasks))
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
        return self.stats

    def request_stop(self, grace_s: float = 30.0) -> None:
        """Claim nothing more and hand the runs in flight back before their next step (see the
        module docstring). Safe in a signal handler, as `Run.request_stop` is."""
        self._stop = grace_s
        for run in list(self._running.values()):
            run.request_stop(grace_s, hand_back=True)
        if self._wake is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def interrupt(self) -> bool:
        """Ctrl-C into synchronous user code of a run in flight (see `Run.interrupt`)."""
        return any([run.interrupt() for run in list(self._running.values())])

    async def _listen(self, store: RunQueue, wake: asyncio.Event) -> None:
        while True:
            await store.wait_for_work(self.poll_s)
            wake.set()

    async def _claim(self, store: RunQueue) -> None:
        while len(self._tasks) < self.concurrency and self._stop is None:
            owner = Owner.for_this_process()
            asked = now_iso()  # a takeover this claim records is stamped after this
            claimed = await store.claim_next(owner, queue=self.queue, machine_hashes=self._versions,
                                             machines=self._by_name)
            if claimed is None:
                return
            task = asyncio.create_task(self._drive(*claimed, owner, asked))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _drive(self, record: RunRecord, log: list[TransitionRecord], owner: Owner, asked: str) -> None:
        run_id, stats = record.run_id, self.stats
        stats.claimed += 1
        if record.takeovers and record.takeovers[-1].at >= asked:
            stats.took_over += 1
            self._event("took_over", run_id, f"from {record.takeovers[-1].previous}: {record.takeovers[-1].why}")
        else:
            self._event("claimed", run_id, f"at step {len(log)}")
        try:
            if log and (problem := await self.engine.store.verify_chain(run_id)) is not None:
                raise TamperedRunError(run_id, problem, where=self.engine.store.where)  # as a resume refuses it
            machine = await self._machine_for(record, owner)
            if machine is None:
                return
            run = self.engine.adopt(machine, record, log, owner, resumed=bool(log))
            self._running[run_id] = run
            if self._stop is not None:  # asked to stop while this run was being claimed
                run.request_stop(self._stop, hand_back=True)
            result = await run.run_to_end()
        except OwnershipLostError as exc:
            stats.lost += 1
            self._event("lost", run_id, str(exc))
            return
        except TamperedRunError as exc:
            await self.engine.store.release(run_id, owner, RunStatus.FAILED, str(exc))
            stats.failed += 1
            self._event("failed", run_id, str(exc))
            return
        except Exception as exc:  # a store error, a hook: the run stopped (resumable); the worker goes on
            stats.failed += 1
            self._event("failed", run_id, str(exc) if isinstance(exc, OrchError) else f"{type(exc).__name__}: {exc}")
            return
        finally:
            self._running.pop(run_id, None)
            if self._wake is not None:
                self._wake.set()  # a slot is free
        if result.status.finished:
            stats.completed += 1
            self._event("completed", run_id, result.status.value)
        elif result.status is RunStatus.PENDING:
            stats.handed_back += 1
            self._event("handed_back", run_id, f"at step {len(result.path)}")
        elif result.status is RunStatus.WAITING:
            stats.waiting += 1
            self._event("awaiting_review", run_id, f"at step {len(result.path) + 1}")
        else:
            stats.failed += 1
            self._event("failed", run_id, result.error or result.status.value)

    async def _machine_for(self, record: RunRecord, owner: Owner) -> Machine | None:
        """The loaded machine for a claimed run; another version's run (`migrate`) only if its
        log replays on this version, else it is left `interrupted` with the divergence."""
        machine = self._versions.get(record.machine_hash)
        if machine is not None:
            return machine
        machine = self._by_name[record.machine]
        report = await replay_run(self.engine.store, record.run_id, machine, prices=self.engine.prices,
                                  compiled=self.engine.compiled(machine))
        if report.divergence is None:
            return machine
        why = (f"machine '{machine.name}' changed since the run started and its recorded steps no longer replay "
               f"({report.divergence.describe()})")
        await self.engine.store.release(record.run_id, owner, RunStatus.INTERRUPTED, why)
        self.stats.refused += 1
        self._event("refused", record.run_id, why)
        return None

    def _event(self, kind: str, run_id: str, detail: str) -> None:
        if self.on_event is not None:
            self.on_event(kind, run_id, detail)
