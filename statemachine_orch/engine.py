"""The engine: compiles a `Machine` into a `transitions` FSM and drives runs step by step.

One step = run the current state (LLM call or Python function), let its guard pick a
decision, apply the FSM transition named after that decision, and commit the log row. The
`transitions` machine owns the position: its triggers are the decisions, its conditions
bound RETRY (`retry_limit`) and cycles (`max_visits`), and its `after_state_change`
callback keeps the attempt and visit counters (`Compiled.move` applies them per step).
Nothing is held in a transaction across a model call; the row is written after the step
completes, in one transaction.

`Run.step()` is the unit; `Run.run_to_end()` and `Engine.arun()` are loops over it.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import secrets
import time
from collections.abc import Coroutine, Mapping
from time import perf_counter
from types import MappingProxyType
from typing import Any

from .definition import LLMState, Machine, PythonState, State
from .errors import (
    BudgetExceededError,
    CorruptRunError,
    GuardError,
    OrchError,
    OwnershipLostError,
    RetryLimitError,
    RunError,
    StepError,
    UsageError,
    VisitLimitError,
)
from .faults import ARMED, kill_point
from .fsm import Compiled, Plan, Position, compile_machine
from .inputs import validate_input
from .llm_step import BudgetRoute, LLMStep, PythonOverride, Spent
from .ownership import Owner
from .prices import PriceTable
from .snapshot import (
    RunResult,
    Snapshot,
    output_json,
    restore_output,
    snapshot,
)
from .sqlite_store import SQLiteStore
from .store import NullStore, Store
from .trace import Tracer
from .types import (
    END,
    Branch,
    Budget,
    FlowDecision,
    ModelClient,
    RunRecord,
    RunStatus,
    StepContext,
    TransitionRecord,
    Usage,
    Verdict,
    now_iso,
)

_NO_OUTPUT = object()
_NO_NEEDS: Mapping[str, Any] = MappingProxyType({})
_NO_LIMITS = Budget()
_context = tuple.__new__
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_REASON_LIMIT = 500
_CONTINUE = FlowDecision.CONTINUE.value
_TERMINATE = FlowDecision.TERMINATE.value


def new_run_id() -> str:
    """Time-ordered, 26 characters (like ULID): ms timestamp + 80 random bits, Crockford base32."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(secrets.token_bytes(10), "big")
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    chars = []
    for _ in range(26):
        chars.append(alphabet[value & 31])
        value >>= 5
    return "".join(reversed(chars))


class Run:
    """One run driven by this process, which owns it in the store until it stops."""

    def __init__(
        self,
        engine: Engine,
        compiled: Compiled,
        record: RunRecord,
        owner: Owner,
        *,
        input: Any,
        input_values: dict[str, Any],
        snap: Snapshot,
        seq: int = 0,
        budget: Budget | None = None,
    ) -> None:
        self.engine = engine
        self.machine = compiled.machine
        self._compiled = compiled
        self._plans = compiled.plans
        self._tracer = engine.tracer if engine.tracer.on else None
        self.record = record
        self.run_id = record.run_id
        self.owner = owner
        self.input = input
        self._input_values = input_values
        self._pos = snap.position
        self.seq = seq
        self.outputs: dict[str, Any] = snap.outputs
        self.path: list[str] = snap.path
        self.usage = snap.usage
        self.spent = Spent(snap.cost_usd or 0.0, self.usage, snap.seconds)
        self.cost_known = snap.cost_usd is not None
        self.budget = budget or _NO_LIMITS
        self._pending = snap.pending
        in_flight = record.in_flight or {}
        doubt = in_flight.get("seq") if isinstance(in_flight.get("seq"), int) else None
        self._llm = LLMStep(run_id=record.run_id, machine=compiled.machine, tools=compiled.tools,
                            bodies=compiled.bodies,
                            model=lambda: engine.model, store=engine.store, prices=engine.prices,
                            budget=self.budget, python_override=engine.python_override, owner=owner,
                            in_doubt_seq=doubt if doubt is not None and doubt > seq else None)
        self.status = RunStatus.RUNNING
        self.error: str | None = None
        self._broken: BaseException | None = None
        self._stop: str | None = None
        self._task: asyncio.Task[Any] | None = None
        self._grace: asyncio.TimerHandle | None = None

    @property
    def state(self) -> str:
        """The state that runs next (END once the run is over)."""
        return self._pos.state

    @property
    def done(self) -> bool:
        return self.status is not RunStatus.RUNNING

    def result(self) -> RunResult:
        return RunResult(run_id=self.run_id, machine=self.machine.name, status=self.status,
                         path=list(self.path), outputs=dict(self.outputs), usage=self.usage,
                         cost_usd=self.spent.cost_usd if self.cost_known else None, error=self.error)

    # ------------------------------------------------------------------ one step

    async def step(self) -> TransitionRecord:
        """Run the current state, decide, move, commit. Failures are recorded, not raised."""
        plan, rec, ctx, work = self._begin()
        try:
            output = await work
        except RunError as exc:
            return self._finish(plan, rec, ctx, _NO_OUTPUT, exc)
        return self._finish(plan, rec, ctx, output, None)

    def _begin(self) -> tuple[Plan, TransitionRecord, StepContext, Coroutine[Any, Any, Any]]:
        """The step's record and context, and its work as a coroutine (not yet started)."""
        if self._broken is not None:
            raise UsageError(f"run {self.run_id} stopped after a store error; resume it") from self._broken
        if self.status is not RunStatus.RUNNING:
            raise UsageError(f"run {self.run_id} is {self.status.value}; nothing left to step")
        pos = self._pos
        name = pos.state
        plan = self._plans[name]
        state = plan.state
        # run_id, seq, from_state, to_state, decision, reason, attempt, started_at, latency_ms
        # (the start, until the step ends), source
        rec = TransitionRecord(self.run_id, self.seq + 1, name, None, None, None, pos.attempt, now_iso(),
                               perf_counter(), plan.source)
        needs = state.needs
        outputs = self.outputs
        ctx = _context(StepContext, (self.run_id, name, pos.attempt, self.input,  # StepContext(...) sans a frame
                                     {n: outputs[n] for n in needs} if needs else _NO_NEEDS))
        if self._pending is None and self.budget.max_seconds is None:
            return plan, rec, ctx, self._run_state(state, rec, ctx)
        return plan, rec, ctx, self._execute(state, rec, ctx)

    def _finish(self, plan: Plan, rec: TransitionRecord, ctx: StepContext, output: Any,
                failure: RunError | None) -> TransitionRecord:
        """Judge the output, move, commit the record and account for it."""
        state = plan.state
        status: RunStatus | None = None
        if failure is None:
            try:
                if type(output) is BudgetRoute:
                    assert isinstance(state, LLMState) and state.on_budget is not None
                    rec.source = "budget"
                    decision, reason = state.on_budget.value, output.reason
                    output = None
                else:
                    rec.output = output if type(output) is str else output_json(output)
                    decision, reason = self._judge(plan, output, ctx)
                rec.decision = decision
                note = rec.reason
                rec.reason = (reason if note is None else f"{reason} [{note}]")[:_REASON_LIMIT]
                if not self._compiled.move(self._pos, plan.moves[decision]):
                    raise self._blocked(plan, decision)
                rec.to_state = self._pos.state
            except RunError as exc:
                failure = exc
        if failure is not None:
            status = RunStatus.BUDGET_EXCEEDED if isinstance(failure, BudgetExceededError) else RunStatus.FAILED
            rec.error = f"{type(failure).__name__}: {' '.join(str(failure).split())}"  # always one line
        rec.latency_ms = (perf_counter() - rec.latency_ms) * 1000.0
        if rec.to_state == END:
            status = RunStatus.TERMINATED if rec.decision == _TERMINATE else RunStatus.COMPLETED
        if ARMED:
            kill_point("after_response")
        try:
            self.engine.store.append(rec, self.owner, status=status, error=rec.error)
        except BaseException as exc:
            self._broken = exc
            if not isinstance(exc, OwnershipLostError):
                self._release_quietly(RunStatus.INTERRUPTED, f"store error: {exc}")
            raise
        if ARMED:
            kill_point("after_commit")
        self.seq = rec.seq
        self.usage.add(rec.usage)
        spent = self.spent
        if rec.cost_usd is None:
            self.cost_known = False
        spent.cost_usd += rec.cost_usd or 0.0
        spent.seconds += rec.latency_ms / 1000.0
        if rec.to_state is not None:
            self.outputs[state.name] = output
            self.path.append(state.name)
        elif output is not _NO_OUTPUT:
            self._pending = rec  # a paid answer the guard failed on: resume re-judges it
        if status is not None:
            self.status = status
            self.error = rec.error
        if self._tracer is not None:
            self._tracer.transition(rec, self.machine.name)
        return rec

    async def _execute(self, state: State, rec: TransitionRecord, ctx: StepContext) -> Any:
        """A recorded answer to re-judge, or the state's output within what is left of the run's
        wall-clock budget (`step` runs the state directly when neither applies)."""
        if self._pending is not None:
            return self._reuse_pending(state, rec)
        limit = self.budget.max_seconds
        assert limit is not None
        left = limit - self.spent.seconds
        if left <= 0:
            raise BudgetExceededError(
                f"the run has been active {self.spent.seconds:.1f}s, its max_seconds is {limit:g}; "
                "raise it and resume", run_id=self.run_id, state=state.name)
        try:
            async with asyncio.timeout(left):
                return await self._run_state(state, rec, ctx)
        except TimeoutError:
            raise BudgetExceededError(
                f"state '{state.name}' was stopped when the run reached max_seconds={limit:g}; "
                "raise it and resume", run_id=self.run_id, state=state.name) from None

    def _run_state(self, state: State, rec: TransitionRecord, ctx: StepContext) -> Coroutine[Any, Any, Any]:
        """The state's work, as a coroutine the caller awaits (no frame of its own)."""
        if isinstance(state, LLMState):
            return self._llm.execute(state, rec, ctx, self._values, self.spent)
        return self._call_python(state, ctx)

    def _reuse_pending(self, state: State, rec: TransitionRecord) -> Any:
        """Re-run the guard on an answer that was already paid for, instead of calling again."""
        pending = self._pending
        assert pending is not None
        self._pending = None
        rec.source = "recorded"
        rec.request = pending.request
        rec.response = pending.response
        rec.request_id = pending.request_id
        return restore_output(state, pending.output)

    def _values(self, names: tuple[str, ...]) -> dict[str, Any]:
        outputs = self.outputs
        values = self._input_values
        return {n: outputs[n] if n in outputs else values[n] for n in names}

    async def _call_python(self, state: State, ctx: StepContext) -> Any:
        assert isinstance(state, PythonState)
        override = self.engine.python_override
        try:
            if override is not None:
                result = override(state, ctx)
            else:
                result = state.run(ctx)
                if inspect.isawaitable(result):
                    result = await result
        except OrchError:
            raise
        except Exception as exc:
            raise StepError(f"{type(exc).__name__}: {exc}", run_id=self.run_id,
                            state=state.name) from exc
        try:
            return restore_output(state, result)
        except (TypeError, ValueError) as exc:
            raise StepError(f"returned a value that cannot be stored: {exc}", run_id=self.run_id,
                            state=state.name) from None

    def _judge(self, plan: Plan, output: Any, ctx: StepContext) -> tuple[str, str]:
        """(decision value, reason) from the state's guard, or GuardError."""
        g = plan.guard
        if g is None:
            return _CONTINUE, "no guard: continue"
        try:
            result: Any = g(output, ctx)
        except Exception as exc:
            raise GuardError(f"guard {plan.guard_name} raised {type(exc).__name__}: {exc}",
                             run_id=self.run_id, state=plan.state.name) from exc
        reason = ""
        if isinstance(result, Verdict):
            result, reason = result.decision, str(result.reason)
        try:
            decision = plan.allowed.get(result)
        except TypeError:  # unhashable, so not a decision
            decision = None
        if decision is None:
            raise self._not_allowed(plan, result)
        return decision, reason or f"{plan.guard_name} saw {_excerpt(output)} -> {decision}"

    def _not_allowed(self, plan: Plan, result: Any) -> GuardError:
        allowed = sorted(plan.allowed.values())
        if isinstance(result, (FlowDecision, Branch)):
            return GuardError(
                f"guard {plan.guard_name} returned {result.value}, which state '{plan.state.name}' has no "
                f"transition for (allowed: {allowed}); add it to on={{...}} and @guard(...)",
                run_id=self.run_id, state=plan.state.name)
        if inspect.isawaitable(result) and hasattr(result, "close"):
            result.close()
        return GuardError(
            f"guard {plan.guard_name} returned {_excerpt(result)}, which is not a decision; return a "
            f"FlowDecision or Branch (allowed here: {allowed})", run_id=self.run_id, state=plan.state.name)

    def _blocked(self, plan: Plan, decision: str) -> RunError:
        """Why the FSM refused the transition: a retry or visit limit."""
        state = plan.state
        target = plan.moves[decision].dest
        if target == state.name:
            return RetryLimitError(
                f"state '{state.name}' decided {decision} (back to itself) after attempt "
                f"{self._pos.attempt}, but its retry_limit is {state.retry_limit}; raise retry_limit "
                "or route the failure", run_id=self.run_id, state=state.name)
        return VisitLimitError(
            f"state '{target}' reached max_visits={self.machine.by_name[target].max_visits}; "
            "raise max_visits or break the loop", run_id=self.run_id, state=state.name)

    # ------------------------------------------------------------------ whole run

    def request_stop(self, grace_s: float = 30.0) -> None:
        """Stop before the next step (SIGTERM). A step in progress gets `grace_s` seconds to
        finish and commit; after that its call is abandoned and the run left resumable.

        Safe to call from a signal handler: the flag is set at once, so even a step that never
        yields to the event loop (a plain Python state) is the last one to run."""
        if self._stop is not None:
            return
        self._stop = "stopped on request; resume to continue"
        task = self._task
        if task is not None and not task.done():
            task.get_loop().call_soon_threadsafe(self._arm_grace, grace_s)

    def _arm_grace(self, grace_s: float) -> None:
        task = self._task
        if task is not None and not task.done():
            self._grace = task.get_loop().call_later(grace_s, task.cancel)

    async def run_to_end(self) -> RunResult:
        self._task = asyncio.current_task()
        try:
            while self.status is RunStatus.RUNNING:
                if self._stop is not None:
                    self._release_quietly(RunStatus.INTERRUPTED, self._stop)
                    break
                await self.step()
        except (KeyboardInterrupt, asyncio.CancelledError):
            if self._broken is None:
                self._release_quietly(RunStatus.INTERRUPTED, self._stop or "interrupted; resume to continue")
            if self._stop is None or self._task is None:
                raise
            self._task.uncancel()  # our own grace period ran out: a stop, not a cancellation
        finally:
            if self._grace is not None:
                self._grace.cancel()
        result = self.result()
        if self._tracer is not None:
            self._tracer.run_finished(self.run_id, self.machine.name, self.status.value, steps=len(self.path),
                                      usage=self.usage, cost_usd=result.cost_usd, error=self.error)
        return result

    def _release_quietly(self, status: RunStatus, error: str) -> None:
        try:
            self.engine.store.release(self.run_id, self.owner, status, error)
        except OrchError:
            pass  # the owner check on resume treats a dead process as gone anyway
        self.status = status
        self.error = error


def _excerpt(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Engine:
    """Drives runs of machines against a store, a model client and a tracer. No global state."""

    def __init__(
        self,
        store: Store | str | os.PathLike[str] | None = None,
        *,
        model: ModelClient | None = None,
        tracer: Tracer | None = None,
        prices: PriceTable | None = None,
        python_override: PythonOverride | None = None,
    ) -> None:
        if store is None:
            store = NullStore()
        elif isinstance(store, (str, os.PathLike)):
            store = SQLiteStore(store)
        self.store: Store = store
        self._model = model
        self.tracer = tracer if tracer is not None else Tracer.default()
        self.prices = prices or PriceTable()
        self.python_override = python_override
        self._compiled: dict[int, Compiled] = {}
        self._loop: asyncio.Runner | None = None

    @property
    def model(self) -> ModelClient:
        if self._model is None:
            from .llm import AnthropicModel

            self._model = AnthropicModel()
        return self._model

    def compiled(self, machine: Machine) -> Compiled:
        found = self._compiled.get(id(machine))
        if found is None or found.machine is not machine:
            found = self._compiled[id(machine)] = compile_machine(machine)
        return found

    async def start(
        self,
        machine: Machine,
        input: Mapping[str, Any] | None = None,
        *,
        run_id: str | None = None,
        machine_ref: str | None = None,
        options: dict[str, Any] | None = None,
        budget: Budget | None = None,
    ) -> Run:
        """Validate the input, persist a new run (owned by this process) and return it unstarted.

        `budget` overrides the machine's `Budget` limit by limit; the result is stored with
        the run, so a resume keeps it unless given a new one.
        """
        compiled = self.compiled(machine)
        if run_id is not None and not _RUN_ID.fullmatch(run_id):
            raise UsageError(f"run id {run_id!r} is not valid; use 1-64 letters, digits, '.', '_' or '-'")
        context_input, stored, values = validate_input(machine, input)
        effective = (machine.budget or _NO_LIMITS).merged(budget)
        options = dict(options or {})
        if effective != _NO_LIMITS:
            options["budget"] = effective.to_json()
        now = now_iso()
        record = RunRecord(
            run_id=run_id or new_run_id(), machine=machine.name,
            machine_ref=machine_ref or machine.ref, machine_hash=machine.source_hash,
            input=stored, status=RunStatus.RUNNING, created_at=now, updated_at=now, options=options,
        )
        owner = Owner.for_this_process()
        self.store.create_run(record, owner)
        if ARMED:
            kill_point("run_created")
        self.tracer.run_started(record)
        snap = Snapshot(Position(machine.initial, 1, {machine.initial: 1}), {}, [], Usage(), 0.0,
                        0.0, None)
        return Run(self, compiled, record, owner, input=context_input, input_values=values,
                   snap=snap, budget=effective)

    async def attach(self, run_id: str, machine: Machine, *, budget: Budget | None = None,
                     allow_changed: bool = False) -> Run:
        """Claim a stored run (its owner must be gone) and rebuild it from its log.

        A `budget` given here replaces the stored one limit by limit (raise a limit to resume
        a run that stopped with `budget_exceeded`) and is stored with the run. If the
        machine's source changed since the run started, its recorded steps are replayed on
        the new code first; a divergence refuses the resume unless `allow_changed`.
        """
        compiled = self.compiled(machine)
        record, log = self.store.load_run(run_id)
        snapshot(machine, record, log)  # refuse an incompatible or tampered run before claiming it
        problem = self.store.verify_chain(run_id)
        if problem is not None:
            raise CorruptRunError(f"run {run_id} cannot be resumed: its transition log fails the audit "
                                  f"chain ({problem}); restore the database from a backup")
        if record.machine_hash != machine.source_hash and not allow_changed:
            await self._check_still_compatible(record, machine)
        owner = Owner.for_this_process()
        effective = Budget.of_run(record.options).merged(budget)
        options = None
        if budget is not None:
            options = {**record.options, "budget": effective.to_json()}
        record, log = self.store.claim_run(run_id, owner, options=options)
        context_input, _, values = validate_input(machine, record.input)
        snap = snapshot(machine, record, log)
        run = Run(self, compiled, record, owner, input=context_input, input_values=values, snap=snap,
                  seq=log[-1].seq if log else 0, budget=effective)
        self.tracer.run_started(record, resumed=True, machine_hash=machine.source_hash)
        if record.machine_hash != machine.source_hash:
            self.tracer.machine_changed(run_id, machine.name, record.machine_hash, machine.source_hash)
        return run

    async def _check_still_compatible(self, record: RunRecord, machine: Machine) -> None:
        from .replay import replay_run  # replay drives an engine of its own

        report = await replay_run(self.store, record.run_id, machine, prices=self.prices)
        if report.divergence is not None:
            raise UsageError(
                f"machine '{machine.name}' changed since run {record.run_id} started and its recorded "
                f"steps no longer replay ({report.divergence.describe()}); fix the machine, or resume "
                "anyway with --allow-changed (allow_changed=True)")

    async def arun(self, machine: Machine, input: Mapping[str, Any] | None = None,
                   **options: Any) -> RunResult:
        """Start a run and drive it to its end (completed, terminated or failed)."""
        run = await self.start(machine, input, **options)
        return await run.run_to_end()

    async def aresume(self, run_id: str, machine: Machine, *, budget: Budget | None = None,
                      allow_changed: bool = False) -> RunResult:
        """Continue a stored run from its last committed step."""
        run = await self.attach(run_id, machine, budget=budget, allow_changed=allow_changed)
        return await run.run_to_end()

    def run(self, machine: Machine, input: Mapping[str, Any] | None = None,
            **options: Any) -> RunResult:
        """Synchronous `arun`, on an event loop this engine keeps for its lifetime."""
        return self._sync(self.arun(machine, input, **options))

    def resume(self, run_id: str, machine: Machine, *, budget: Budget | None = None,
               allow_changed: bool = False) -> RunResult:
        """Synchronous `aresume`."""
        return self._sync(self.aresume(run_id, machine, budget=budget, allow_changed=allow_changed))

    def _sync(self, coro: Coroutine[Any, Any, RunResult]) -> RunResult:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            coro.close()
            raise UsageError("Engine.run()/resume() called inside an event loop; await "
                             "engine.arun()/aresume() instead")
        if self._loop is None:
            self._loop = asyncio.Runner()
        return self._loop.run(coro)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.close()
            self._loop = None
        close = getattr(self.store, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

