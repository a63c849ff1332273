"""Many runs of one machine: a batch (`Engine.batch`, `Engine.run_many`, `orch batch`).

Each input is a normal durable run with the id `BATCH-N` (N the input's number, from 1),
tagged with the batch, so running the same batch again resumes it: a finished run is read
back, an unfinished one resumed (nothing committed is paid twice), a missing one started. An
input that differs from its stored run's is refused, not rerun: the file changed. The runs go
`concurrency` at a time on one event loop; the store groups their commits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from ..definition._machine import Machine
from ..errors import OrchError, UsageError
from ..limits import Budget, Usage
from ..types import RunResult, RunStatus
from ._ids import check_run_id, new_run_id
from ._inputs import validate_input

if TYPE_CHECKING:
    from ._engine import Engine
    from ._run import Run

Input = Mapping[str, Any] | BaseModel | None


def batch_run_id(batch_id: str, number: int) -> str:
    """The run id of input `number` (from 1) of a batch."""
    return f"{batch_id}-{number}"


@dataclass(slots=True, kw_only=True)
class BatchProgress:
    """A batch's counts as it goes (the argument of `on_progress`)."""

    batch_id: str
    total: int
    completed: int = 0  # completed or terminated by a guard, now or before (`already_done`)
    failed: int = 0  # failed or over budget: resumable by running the batch again
    not_started: int = 0  # refused before a run existed (bad input, changed input, busy run)
    interrupted: int = 0  # stopped mid-run (Ctrl-C, SIGTERM): resumable
    waiting: int = 0  # paused at a review state (`orch review`, then run the batch again)
    running: int = 0
    already_done: int = 0  # finished before this call, read back
    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0
    started: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> int:
        return self.completed + self.failed + self.not_started + self.interrupted + self.waiting

    def to_json(self) -> dict[str, Any]:
        return {"batch_id": self.batch_id, "total": self.total, "completed": self.completed, "failed": self.failed,
                "not_started": self.not_started, "interrupted": self.interrupted, "waiting": self.waiting,
                "running": self.running,
                "already_done": self.already_done, "input_tokens": self.usage.input_tokens,
                "output_tokens": self.usage.output_tokens, "cost_usd": round(self.cost_usd, 6),
                "seconds": round(time.monotonic() - self.started, 3)}


@dataclass(slots=True, kw_only=True)
class BatchResult:
    """What a batch did: each input's run result, or why it could not run, by input number."""

    batch_id: str
    results: dict[int, RunResult]
    errors: dict[int, str]
    progress: BatchProgress
    stopped: bool = False  # stopped on request before every input had run: run it again to go on


class Batch:
    """One pass over a batch's inputs (see the module docstring); `request_stop` stops it."""

    def __init__(self, engine: Engine, machine: Machine, inputs: Mapping[int, Input], *, batch_id: str | None = None,
                 concurrency: int = 8, machine_ref: str | None = None, options: dict[str, Any] | None = None,
                 budget: Budget | None = None, on_progress: Callable[[BatchProgress], None] | None = None,
                 experiment: str | None = None, arm: str | None = None) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise UsageError(f"concurrency={concurrency!r} is not a whole number of runs >= 1", fix="give 1 or more")
        self.batch_id = new_run_id() if batch_id is None else batch_id
        check_run_id(batch_run_id(self.batch_id, max(inputs, default=1)))
        engine.compiled(machine)  # a machine the engine cannot run is refused before anything starts
        self.engine, self.machine, self.inputs = engine, machine, inputs
        self.concurrency = concurrency
        self.machine_ref, self.options, self.budget = machine_ref, options, budget
        self.on_progress = on_progress
        self.experiment, self.arm = experiment, arm  # each run's, when the batch is an experiment's arm
        self.progress = BatchProgress(batch_id=self.batch_id, total=len(inputs))
        self.results: dict[int, RunResult] = {}
        self.errors: dict[int, str] = {}
        self._running: dict[int, Run] = {}
        self._stop: float | None = None  # the grace period given to runs in flight, once stopping

    async def run(self) -> BatchResult:
        known = await self.stored_runs()
        todo = iter(sorted(self.inputs.items()))
        self.progress.started = time.monotonic()  # the rate counts from here, not from building the batch
        self._report()
        await asyncio.gather(*(self._work(todo, known) for _ in range(min(self.concurrency, len(self.inputs)))))
        return BatchResult(batch_id=self.batch_id, results=dict(sorted(self.results.items())),
                           errors=dict(sorted(self.errors.items())), progress=self.progress,
                           stopped=self._stop is not None and (self.progress.finished < self.progress.total
                                                               or self.progress.interrupted > 0))

    async def stored_runs(self) -> dict[str, RunStatus]:
        """The status of each run of this batch stored before; UsageError when they are not its
        own (`orch batch --batch-id E.A` and arm A of experiment E would share the batch id)."""
        summaries = await self.engine.store.list_runs(batch=self.batch_id, limit=None)
        other = next((s for s in summaries if (s.experiment, s.arm) != (self.experiment, self.arm)), None)
        if other is not None:
            raise UsageError(f"batch {self.batch_id} holds runs of {_whose(other.experiment, other.arm)} (run "
                             f"{other.run_id}), not of {_whose(self.experiment, self.arm)}",
                             fix=f"use a new {'experiment' if self.experiment is not None else 'batch'} id")
        return {summary.run_id: summary.status for summary in summaries}

    def request_stop(self, grace_s: float = 30.0) -> None:
        """Start no more runs, and stop the ones in flight before their next step (a step in
        progress gets `grace_s` to finish and commit). Safe in a signal handler."""
        self._stop = grace_s
        for run in list(self._running.values()):
            run.request_stop(grace_s)

    def interrupt(self) -> bool:
        """Ctrl-C into synchronous user code of a run in flight (see `Run.interrupt`)."""
        return any([run.interrupt() for run in list(self._running.values())])

    async def _work(self, todo: Iterator[tuple[int, Input]], known: Mapping[str, RunStatus]) -> None:
        for number, data in todo:
            if self._stop is not None:
                return
            await self._one(number, data, known.get(batch_run_id(self.batch_id, number)))

    async def _one(self, number: int, data: Input, status: RunStatus | None) -> None:
        run_id = batch_run_id(self.batch_id, number)
        progress = self.progress
        try:
            if status is None:
                run = await self.engine.start(self.machine, data, run_id=run_id, batch=self.batch_id,
                                              machine_ref=self.machine_ref, options=self.options, budget=self.budget,
                                              experiment=self.experiment, arm=self.arm)
            else:
                # a finished run is read back with its log; an unfinished one's log is read by attach
                record, log = (await self.engine.store.load_run(run_id) if status.finished
                               else (await self.engine.store.get_run(run_id), []))
                if validate_input(self.machine, data)[1] != record.input:
                    raise UsageError(f"input {number} is not the input run {run_id} was started with",
                                     fix="the inputs changed since the batch began: use a new batch id")
                if record.status.finished:
                    progress.already_done += 1
                    self._finish(number, RunResult.from_log(record, log, result=self.machine.result))
                    return
                run = await self.engine.attach(run_id, self.machine, budget=self.budget)
        except Exception as exc:  # this input's alone: the batch goes on
            self.errors[number] = _why(exc)
            progress.not_started += 1
            self._report()
            return
        self._running[number] = run
        if self._stop is not None:  # asked to stop while this run was being opened
            run.request_stop(self._stop)
        progress.running += 1
        self._report()
        try:
            result = await run.run_to_end()
        except Exception as exc:  # the store, a hook: the run stopped (resumable), the batch goes on
            stopped = await self._stopped_by(run_id, exc)
            if stopped is None:
                self.errors[number] = _why(exc)
                progress.failed += 1
                self._report()
                return
            result = stopped
        finally:
            progress.running -= 1
            del self._running[number]
        self._finish(number, result)

    async def _stopped_by(self, run_id: str, exc: Exception) -> RunResult | None:
        """The result of a run that raised `exc`, as stored, with `exc` for its error (None when
        the store cannot tell)."""
        try:
            record, log = await self.engine.store.load_run(run_id)
        except Exception:
            return None
        result = RunResult.from_log(record, log, result=self.machine.result)
        result.error = _why(exc)
        return result

    def _finish(self, number: int, result: RunResult) -> None:
        progress = self.progress
        self.results[number] = result
        if result.status.finished:
            progress.completed += 1
        elif result.status is RunStatus.INTERRUPTED:
            progress.interrupted += 1
        elif result.status is RunStatus.WAITING:
            progress.waiting += 1
        else:
            progress.failed += 1
        progress.usage.add(result.usage)
        progress.cost_usd += result.cost_usd or 0.0
        self._report()

    def _report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.progress)


def _whose(experiment: str | None, arm: str | None) -> str:
    return f"arm {arm} of experiment {experiment}" if experiment is not None else "a plain batch"


def _why(exc: Exception) -> str:
    return str(exc) if isinstance(exc, OrchError) else f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def numbered(inputs: Iterable[Input] | Mapping[int, Input]) -> dict[int, Input]:
    """Inputs by number: a mapping's own numbers (>= 1), else 1, 2, ... in order."""
    if isinstance(inputs, Mapping):
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in inputs):
            raise UsageError("a batch's inputs are numbered from 1", fix="give a list, or number them 1, 2, ...")
        return dict(inputs)
    return dict(enumerate(inputs, 1))
