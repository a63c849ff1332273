"""The engine: starts and resumes runs of machines against the ports it is given.

`Engine(store, model=..., hooks=[...])` holds no global state: the store (`open_store` makes
one from a path or URL), the model client and the hooks come in; nothing here imports an
adapter. Each machine is compiled once (`_fsm`), each run is a `Run` (`_run`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel

from ..definition._machine import Machine
from ..definition._overrides import stored_overrides, with_overrides
from ..errors import MachineChangedError, UsageError
from ..hooks import Hook, HookCalls
from ..llm._client import ModelClient
from ..llm._prices import PriceTable
from ..store._contract import NullStore, Store
from ..store._owner import Owner
from ..store._queue import queue_of
from ..types import Budget, RunRecord, RunResult, RunStatus, TransitionRecord, now_iso
from ._batch import Batch, BatchResult, Input, numbered
from ._children import drive_child, refuse_child
from ._fork import Overrides, ParentAnswers, plan_fork
from ._fsm import Compiled, compile_machine
from ._ids import check_run_id, new_run_id
from ._inputs import validate_input
from ._llm_step import PythonOverride
from ._replay import replay_run
from ._review import Decided, PendingReview, decide, iso_after
from ._run import Ports, Run
from ._snapshot import fresh, snapshot

T = TypeVar("T")


class Engine:
    """Drives runs of machines against a store, a model client and hooks. No global state.

    `store` None keeps nothing (`NullStore`); `model` may be None for machines without LLM
    states. `hooks` see every run's lifecycle (tracing, metrics, notifications)."""

    def __init__(
        self,
        store: Store | None = None,
        *,
        model: ModelClient | None = None,
        hooks: Iterable[Hook] = (),
        prices: PriceTable | None = None,
        python_override: PythonOverride | None = None,
    ) -> None:
        if isinstance(store, (str, bytes)) or hasattr(store, "__fspath__"):
            raise UsageError(f"Engine() takes a store, not the path {store!r}",
                             fix=f"pass open_store({store!r})")
        self.store: Store = store if store is not None else NullStore()
        self.model = model
        self.hooks = tuple(hooks)
        self.prices = prices or PriceTable()
        self._ports = Ports(store=self.store, model=model, prices=self.prices, hooks=HookCalls(self.hooks),
                            python_override=python_override, children=drive_child)
        self._compiled: dict[int, Compiled] = {}
        self._loop: asyncio.Runner | None = None

    def compiled(self, machine: Machine, *, to_run: bool = True) -> Compiled:
        """The machine compiled (once per engine); `to_run`: refused unless this engine can
        run it (a machine with LLM states needs a model client; queueing one does not)."""
        if to_run and self.model is None and machine.calls_a_model:
            raise UsageError(f"machine '{machine.name}' has LLM states, but the engine has no model client",
                             fix="pass Engine(store, model=AnthropicModel())")
        found = self._compiled.get(id(machine))
        if found is None or found.machine is not machine:
            found = self._compiled[id(machine)] = compile_machine(machine)
        return found

    async def start(
        self,
        machine: Machine,
        input: Mapping[str, Any] | BaseModel | None = None,
        *,
        run_id: str | None = None,
        machine_ref: str | None = None,
        options: dict[str, Any] | None = None,
        budget: Budget | None = None,
        batch: str | None = None,
        experiment: str | None = None,
        arm: str | None = None,
    ) -> Run:
        """Validate the input (a dict, or an instance of the machine's `input_model`), persist a
        new run (owned by this process, of `batch` if given, of `experiment` and its `arm` if
        given) and return it unstarted.

        `budget` overrides the machine's `Budget` limit by limit; the result is stored with
        the run, so a resume keeps it unless given a new one.
        """
        machine = with_overrides(machine, stored_overrides(options or {}))
        compiled = self.compiled(machine)
        record, context_input, values, effective = self._new_record(
            machine, input, RunStatus.RUNNING, run_id=run_id, machine_ref=machine_ref, options=options, budget=budget,
            batch=batch, experiment=experiment, arm=arm)
        owner = Owner.for_this_process()
        await self.store.create_run(record, owner)
        for hook in self._ports.hooks.run_started:
            hook(record, resumed=False, machine_hash=machine.source_hash)
        return Run(compiled, record, owner, self._ports, input=context_input, input_values=values,
                   snap=fresh(machine.initial), budget=effective)

    def _new_record(self, machine: Machine, input: Mapping[str, Any] | BaseModel | None, status: RunStatus, *,
                    run_id: str | None, machine_ref: str | None, options: dict[str, Any] | None,
                    budget: Budget | None, batch: str | None = None, experiment: str | None = None,
                    arm: str | None = None) -> tuple[RunRecord, Any, dict[str, Any], Budget]:
        """A new run's record (its input validated), with the input as the context sees it, its
        values and the run's effective budget."""
        if run_id is not None:
            check_run_id(run_id)
        context_input, stored, values = validate_input(machine, input)
        effective = (machine.budget or Budget()).merged(budget)
        options = dict(options or {})
        if effective != Budget():
            options["budget"] = effective.to_json()
        options.update(machine.result_option)  # what `orch show` reads without loading the machine
        now = now_iso()
        record = RunRecord(
            run_id=run_id or new_run_id(), machine=machine.name,
            machine_ref=machine_ref or machine.ref, machine_hash=machine.source_hash,
            input=stored, status=status, created_at=now, updated_at=now, options=options, batch=batch,
            experiment=experiment, arm=arm,
        )
        return record, context_input, values, effective

    async def enqueue(self, machine: Machine, input: Mapping[str, Any] | BaseModel | None = None, *,
                      queue: str = "default", run_id: str | None = None, machine_ref: str | None = None,
                      options: dict[str, Any] | None = None, budget: Budget | None = None) -> RunRecord:
        """Store a run of `machine` as pending in `queue`, for an `orch worker` that has loaded
        this version of the machine to claim (the store must have a queue: PostgreSQL)."""
        self.compiled(with_overrides(machine, stored_overrides(options or {})), to_run=False)
        target = queue_of(self.store)
        record, *_ = self._new_record(machine, input, RunStatus.PENDING, run_id=run_id, machine_ref=machine_ref,
                                      options=options, budget=budget)
        await target.enqueue(record, queue)
        return record

    async def attach(self, run_id: str, machine: Machine, *, budget: Budget | None = None,
                     allow_changed: bool = False, take_over: bool = False,
                     options: Mapping[str, Any] | None = None, to_run: bool = True) -> Run:
        """Claim a stored run (its owner must be gone) and rebuild it from its log.

        `take_over` claims it also from an owner that cannot be proven alive or gone (one
        recorded by an older version on another host); the takeover is recorded with the run.

        A `budget` given here replaces the stored one limit by limit (raise a limit to resume
        a run that stopped with `budget_exceeded`) and is stored with the run, as are
        `options` (over the stored ones: say, offline answers from here on). If the
        machine's source changed since the run started, its recorded steps are replayed on
        the new code first; a divergence refuses the resume unless `allow_changed`. A run
        whose rows fail its audit chain is refused (`TamperedRunError`), and so is a child run
        (`UsageError`): its parent's resume continues it, within the parent's budget.
        `to_run=False` claims it only to commit what needs no model client (a review's decision).
        """
        record, log = await self.store.load_run(run_id, verified=True)
        machine = with_overrides(machine, stored_overrides(record.options))
        compiled = self.compiled(machine, to_run=to_run)
        refuse_child(record)
        snapshot(compiled, record, log)  # refuse an incompatible run before claiming it
        if record.machine_hash != machine.source_hash and not allow_changed:
            report = await replay_run(self.store, run_id, machine, prices=self.prices, compiled=compiled)
            if report.divergence is not None:
                raise MachineChangedError(
                    f"machine '{machine.name}' changed since run {run_id} started and its recorded "
                    f"steps no longer replay ({report.divergence.describe()})", run_id=run_id)
        owner = Owner.for_this_process()
        effective = Budget.of_run(record.options).merged(budget)
        stored = {**record.options, **(options or {})}
        if budget is not None:
            stored["budget"] = effective.to_json()
        changed = budget is not None or bool(options)
        record, log = await self.store.claim_run(run_id, owner, options=stored if changed else None,
                                                 take_over=take_over)
        return self.adopt(machine, record, log, owner, budget=effective, to_run=to_run)

    async def fork(self, parent: str, machine: Machine, *, at: int | str, overrides: Overrides | None = None,
                   set: Mapping[str, Any] | None = None, label: str | None = None, run_id: str | None = None,
                   options: dict[str, Any] | None = None) -> Run:
        """A new run from stored run `parent`'s snapshot before its step `at` (a seq, or a state:
        its first committed step), with `overrides` (by state, over the parent's own) and `set`
        (input fields, or outputs of states run before `at`, replaced); returned unstarted.
        Its earlier steps are inherited, not run; later ones reuse the parent's answer to an
        identical request at the same position, free (`_fork`). `options` are stored with it."""
        plan = await plan_fork(self.store, parent, machine, at=at, overrides=overrides, set=set, label=label)
        record, _, _, effective = self._new_record(plan.machine, plan.input, RunStatus.RUNNING, run_id=run_id,
                                                   machine_ref=None, options={**plan.options, **(options or {})},
                                                   budget=plan.budget)
        record.forked_from = parent
        log = plan.inherit(record.run_id)
        snapshot(self.compiled(plan.machine), record, log)  # refuse a fork its machine cannot go on with, unstored
        owner = Owner.for_this_process()
        await self.store.create_run(record, owner, log=log)  # the run and its inherited steps together
        return self.adopt(plan.machine, record, log, owner, budget=effective, resumed=False)

    async def arun_fork(self, parent: str, machine: Machine, *, at: int | str, **options: Any) -> RunResult:
        """Fork a run (`fork`) and drive the fork to its end."""
        run = await self.fork(parent, machine, at=at, **options)
        return await run.run_to_end()

    def run_fork(self, parent: str, machine: Machine, *, at: int | str, **options: Any) -> RunResult:
        """Synchronous `arun_fork`."""
        return self._sync(self.arun_fork(parent, machine, at=at, **options))

    def adopt(self, machine: Machine, record: RunRecord, log: list[TransitionRecord], owner: Owner, *,
              budget: Budget | None = None, resumed: bool = True, to_run: bool = True) -> Run:
        """The `Run` of a run `owner` has just claimed (`record` and `log` as the claim read
        them), ready to go on from its last committed step; `budget`: the stored one if None."""
        machine = with_overrides(machine, stored_overrides(record.options))
        compiled = self.compiled(machine, to_run=to_run)
        context_input, _, values = validate_input(machine, record.input)
        run = Run(compiled, record, owner, self._ports, input=context_input, input_values=values,
                  snap=snapshot(compiled, record, log), seq=log[-1].seq if log else 0,
                  budget=budget if budget is not None else Budget.of_run(record.options),
                  reuse=ParentAnswers.of(self.store, record))
        for hook in self._ports.hooks.run_started:
            hook(record, resumed=resumed, machine_hash=machine.source_hash)
        return run

    async def arun(self, machine: Machine, input: Mapping[str, Any] | BaseModel | None = None,
                   **options: Any) -> RunResult:
        """Start a run and drive it to its end (completed, terminated or failed)."""
        run = await self.start(machine, input, **options)
        return await run.run_to_end()

    async def aresume(self, run_id: str, machine: Machine, *, budget: Budget | None = None,
                      allow_changed: bool = False, take_over: bool = False) -> RunResult:
        """Continue a stored run from its last committed step."""
        run = await self.attach(run_id, machine, budget=budget, allow_changed=allow_changed, take_over=take_over)
        return await run.run_to_end()

    async def apending(self, *, machine: str | None = None, expiring: float | None = None) -> list[PendingReview]:
        """The runs waiting for a review (of one machine), soonest deadline first; `expiring`
        (seconds): only those whose deadline falls within that time (or has passed)."""
        waiting = await self.store.list_runs(status=RunStatus.WAITING, machine=machine, limit=None)
        horizon = iso_after(expiring) if expiring is not None else None
        found = [PendingReview.of(await self.store.get_run(summary.run_id)) for summary in waiting]
        return sorted((p for p in found if p is not None and (
            horizon is None or (p.deadline is not None and p.deadline <= horizon))),
            key=lambda p: (p.deadline is None, p.deadline or "", p.asked_at, p.run_id))

    async def areview(self, run_id: str, machine: Machine, *, decision: str, data: Any = None,
                      note: str | None = None, by: str | None = None, resume: bool = False,
                      allow_changed: bool = False, take_over: bool = False) -> Decided:
        """Commit a decision for a run waiting at a review state, checked first (the run is
        waiting, the decision is one the state allows, `data` fits its model), with `by` (else
        $ORCH_ACTOR, else the OS user) in the audited row; the state's guard maps it to a
        FlowDecision. Then the run is `pending` until resumed or, with `resume`, goes on here.
        A second decision raises `ReviewDecidedError`, and so does one after the deadline (the
        state's `on_timeout` is applied instead). `allow_changed` and `take_over` claim the run
        as `attach` does."""
        return await decide(self, run_id, machine, decision=decision, data=data, note=note, by=by, resume=resume,
                            allow_changed=allow_changed, take_over=take_over)

    def pending(self, *, machine: str | None = None, expiring: float | None = None) -> list[PendingReview]:
        """Synchronous `apending`."""
        return self._sync(self.apending(machine=machine, expiring=expiring))

    def review(self, run_id: str, machine: Machine, *, decision: str, data: Any = None, note: str | None = None,
               by: str | None = None, resume: bool = False, allow_changed: bool = False,
               take_over: bool = False) -> Decided:
        """Synchronous `areview`."""
        return self._sync(self.areview(run_id, machine, decision=decision, data=data, note=note, by=by,
                                       resume=resume, allow_changed=allow_changed, take_over=take_over))

    def batch(self, machine: Machine, inputs: Iterable[Input] | Mapping[int, Input], *, batch_id: str | None = None,
              concurrency: int = 8, **options: Any) -> Batch:
        """A batch of runs of `machine`, one per input (numbered 1, 2, ... or by the mapping's
        keys), `concurrency` at a time; `await batch.run()` drives it. Running the same
        `batch_id` again resumes it (`_batch`). `options`: machine_ref, options, budget,
        on_progress, experiment and arm."""
        return Batch(self, machine, numbered(inputs), batch_id=batch_id, concurrency=concurrency, **options)

    async def arun_many(self, machine: Machine, inputs: Iterable[Input] | Mapping[int, Input], *,
                        batch_id: str | None = None, concurrency: int = 8, **options: Any) -> BatchResult:
        """Run (or resume) a batch to its end: see `batch`."""
        return await self.batch(machine, inputs, batch_id=batch_id, concurrency=concurrency, **options).run()

    def run_many(self, machine: Machine, inputs: Iterable[Input] | Mapping[int, Input], *,
                 batch_id: str | None = None, concurrency: int = 8, **options: Any) -> BatchResult:
        """Synchronous `arun_many`."""
        return self._sync(self.arun_many(machine, inputs, batch_id=batch_id, concurrency=concurrency, **options))

    def run(self, machine: Machine, input: Mapping[str, Any] | BaseModel | None = None,
            **options: Any) -> RunResult:
        """Synchronous `arun`, on an event loop this engine keeps for its lifetime."""
        return self._sync(self.arun(machine, input, **options))

    def resume(self, run_id: str, machine: Machine, *, budget: Budget | None = None,
               allow_changed: bool = False, take_over: bool = False) -> RunResult:
        """Synchronous `aresume`."""
        return self._sync(self.aresume(run_id, machine, budget=budget, allow_changed=allow_changed,
                                       take_over=take_over))

    def _sync(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            coro.close()
            raise UsageError("Engine.run()/resume()/close() called inside an event loop",
                             fix="await engine.arun()/aresume()/aclose() instead")
        if self._loop is None:
            self._loop = asyncio.Runner()
        return self._loop.run(coro)

    async def aclose(self) -> None:
        """Close the store."""
        await self.store.close()

    def close(self) -> None:
        """Close the store and this engine's event loop."""
        self._sync(self.aclose())
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
