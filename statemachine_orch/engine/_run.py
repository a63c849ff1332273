"""One run driven by this process: `step()` runs a state, judges its output, moves, commits.

A step reads top to bottom: the state produces an output (a model answer, a Python value, a
recorded answer to judge again), its guard judges it, the decision's trigger moves the
`transitions` FSM, and the row is committed in one store transaction. A paid answer is kept
with the run's in-flight mark as it arrives, before any user code sees it. A failure of the
state or its guard, whatever it raised, is committed as a failed row (the run stops,
resumable); it is not raised. User code is called so that a timeout, a stop or Ctrl-C reaches
it (`_user_code`). Hooks see each stage (`hooks.Hook`). `run_to_end()` is a loop over `step()`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING, Any, cast

from ..definition._states import (
    LLMState,
    MachineState,
    MapState,
    ParallelState,
    PythonState,
    Review,
    ReviewState,
    State,
)
from ..errors import (
    BudgetExceededError,
    OrchError,
    OwnershipLostError,
    RetryLimitError,
    RunError,
    StepError,
    UsageError,
    VisitLimitError,
)
from ..hooks import HookCalls
from ..llm._client import ModelClient
from ..llm._prices import PriceTable
from ..store._contract import Store
from ..store._owner import Owner
from ..types import (
    END,
    Budget,
    FlowDecision,
    RunRecord,
    RunResult,
    RunStatus,
    StepContext,
    TransitionRecord,
    now_iso,
    output_json,
    run_output,
)
from ._context import History, context
from ._fan_out import FanOut
from ._fork import ParentAnswers
from ._fsm import Compiled, Plan
from ._guard_call import ask_guard
from ._llm_step import BudgetRoute, LLMStep, PythonOverride, Spent
from ._outputs import named_outputs, restore_output
from ._review import Desk, Waiting
from ._snapshot import Snapshot
from ._user_code import CodeError, UserCode

if TYPE_CHECKING:
    from ._children import ChildResult

_NO_OUTPUT = object()
_REASON_LIMIT = 500
_KEPT = ("source", "started_at", "request", "response", "request_id", "usage", "cost_usd", "request_hash",
         "in_doubt", "attempts", "reason")  # what a step takes over from its own answer kept before a stop


@dataclass(frozen=True, slots=True, kw_only=True)
class Ports:
    """What a run talks to outside itself, given by the engine (the run imports no adapter)."""

    store: Store
    model: ModelClient | None  # None: the machine has no LLM state to call it
    prices: PriceTable
    hooks: HookCalls
    python_override: PythonOverride | None = None
    children: ChildDriver | None = None  # runs a machine or map state's child runs (None: it cannot)


ChildDriver = Callable[["Run", State, int, int, Compiled, Any], Awaitable["ChildResult"]]
"""`(parent, state, slot, item, machine, input) -> ChildResult`: drives one child run of
`machine` to its end (`_children.drive_child`; replay reads the recorded child instead)."""


class Run:
    """One run driven by this process, which owns it in the store until it stops."""

    def __init__(self, compiled: Compiled, record: RunRecord, owner: Owner, ports: Ports, *,
                 input: Any, input_values: dict[str, Any], snap: Snapshot, seq: int = 0,
                 budget: Budget | None = None, ledger: Spent | None = None, reuse: ParentAnswers | None = None) -> None:
        """`ledger`: a child run's parent's budget ledger, which it shares (a top-level run
        has its own); `reuse`: answers its LLM states may take instead of calling (a fork's parent's)."""
        self.machine = compiled.machine
        self.record = record
        self.run_id = record.run_id
        self.owner = owner
        self.input = input
        self.seq = seq
        self.position = snap.position
        self.outputs: dict[str, Any] = snap.outputs
        self.history: dict[str, list[Any]] = snap.history  # state -> its committed outputs, oldest first
        self.path: list[str] = snap.path
        self.usage = snap.usage
        self.cost_usd = snap.cost_usd or 0.0  # the run's own, its children's rolled up as they join
        self.cost_known = snap.cost_usd is not None
        self.spent = ledger or Spent(cost_usd=self.cost_usd, tokens=self.usage.paid_tokens, seconds=snap.seconds)
        self.is_child = ledger is not None
        self.reuse = reuse
        self.budget = budget or Budget()
        self.status = RunStatus.RUNNING
        self.error: str | None = None
        self.compiled = compiled
        self.ports = ports
        self._hooks = ports.hooks
        self.input_values = input_values
        self._code = UserCode()
        self._past = History(self.history, self.machine.by_name, record.run_id)
        left = snap.unfinished
        self._pending = left.step if left is not None and left.answered else snap.pending
        self._llm = LLMStep(run_id=record.run_id, compiled=compiled, ports=ports, budget=self.budget,
                            owner=owner, code=self._code, left=left if left is not None and not left.answered
                            else None, reuse=reuse)
        self.children_running: set[Run] = set()  # this run's child runs being driven now: a stop reaches them
        self._fan_out = FanOut(self)
        self._desk = Desk(self)
        self._broken: BaseException | None = None
        self._stop: str | None = None
        self._stopped_as = RunStatus.INTERRUPTED  # what a stop leaves the run as (`request_stop`)
        self._task: asyncio.Task[Any] | None = None
        self._grace: asyncio.TimerHandle | None = None

    @property
    def state(self) -> str:
        """The state that runs next (END once the run is over)."""
        return self.position.state

    @property
    def stopping(self) -> bool:
        """A stop was requested: no new step (or child run) starts."""
        return self._stop is not None

    @property
    def done(self) -> bool:
        return self.status is not RunStatus.RUNNING

    def result(self) -> RunResult:
        return RunResult(run_id=self.run_id, machine=self.machine.name, status=self.status,
                         path=list(self.path), outputs=dict(self.outputs), usage=self.usage,
                         cost_usd=self.cost_usd if self.cost_known else None, error=self.error,
                         output=run_output(self.machine.result, self.outputs, self.path))

    # ------------------------------------------------------------------ one step

    async def step(self) -> TransitionRecord:
        """Run the current state, judge its output, move, commit; return the committed row."""
        self._check_can_step()
        plan = self.compiled.plans[self.position.state]
        step = TransitionRecord(run_id=self.run_id, seq=self.seq + 1, from_state=plan.state.name,
                                attempt=self.position.attempt, started_at=now_iso(), source=plan.source)
        started = perf_counter()
        for hook in self._hooks.before_step:
            hook(self.record, step)
        position = self.position
        ctx = context(self.run_id, plan.state, step.attempt, self.input, self.outputs,
                      position.visits.get(position.state, 1), self._past,
                      self._fan_out.starter(plan.state, step) if plan.source == "python" else None)
        output: Any = _NO_OUTPUT
        status: RunStatus | None = None
        try:
            output = await self._produce(plan, step, ctx)
            step.decision = self._judge(plan, step, output, ctx)
            step.decision = self._move(plan, step, step.decision)
            step.to_state = self.position.state
        except Waiting as waiting:  # a review state with no decision yet: nothing to commit
            await self._wait(waiting.review)
            return step
        except RunError as failure:
            status = RunStatus.BUDGET_EXCEEDED if isinstance(failure, BudgetExceededError) else RunStatus.FAILED
            step.error = f"{type(failure).__name__}: {' '.join(str(failure).split())}"  # always one line
            self._fan_out.unjoin(step)
        step.latency_ms = (perf_counter() - started) * 1000.0
        if step.to_state == END:
            status = RunStatus.TERMINATED if step.decision == FlowDecision.TERMINATE.value else RunStatus.COMPLETED
        await self._commit(step, status)
        self._account(plan.state, step, output, status)
        for hook in self._hooks.after_commit:
            hook(self.record, step)
        return step

    def decide(self, review: Review) -> None:
        """Commit `review` as the next step, which must be its review state's (`Engine.review`)."""
        self._desk.decision = review

    async def hand_back(self) -> None:
        """Give the run up as `pending`, to go on later (a resume, or a worker of its queue)."""
        await self.ports.store.release(self.run_id, self.owner, RunStatus.PENDING, None)
        self.status, self.error = RunStatus.PENDING, None

    async def _wait(self, review: dict[str, Any]) -> None:
        """Store the pending review and the status `waiting` (one transaction), and stop."""
        try:
            await self.ports.store.release(self.run_id, self.owner, RunStatus.WAITING, None, review=review)
        except Exception as exc:
            self._broken = exc
            raise
        self.record.review = review
        self.status, self.error = RunStatus.WAITING, None

    def _check_can_step(self) -> None:
        if self._broken is not None:
            raise UsageError(f"run {self.run_id} stopped after a store error",
                             fix="resume it") from self._broken
        if self.status is not RunStatus.RUNNING:
            raise UsageError(f"run {self.run_id} is {self.status.value}; nothing left to step")

    async def _produce(self, plan: Plan, step: TransitionRecord, ctx: StepContext) -> Any:
        """The state's output: a recorded answer to judge again, or the state run (within what
        is left of the run's wall-clock budget). Hooks see it before it is judged."""
        state = plan.state
        if self._pending is not None:
            output = self._reuse_pending(state, step)
        else:
            output = await self._within_time_budget(state, step, ctx)
        if type(output) is BudgetRoute:
            return output
        step.output = output if type(output) is str else output_json(output)
        if step.response is not None and step.source in ("llm", "fallback"):
            await self._llm.keep(step)  # paid: kept before any hook or guard sees it
        for hook in self._hooks.after_output:
            hook(self.record, step, output)
        return output

    async def _run_state(self, state: State, step: TransitionRecord, ctx: StepContext) -> Any:
        if isinstance(state, LLMState):
            return await self._llm.execute(state, step, ctx, self._values, self.spent, position=len(self.path))
        if isinstance(state, (MachineState, MapState, ParallelState)):
            return await self._fan_out.output(state, step, ctx)
        override = self.ports.python_override  # replay: the recorded output (a review: its recorded decision)
        if isinstance(state, ReviewState) and override is None:
            return await self._desk.output(state, step, ctx)
        assert isinstance(state, (PythonState, ReviewState))
        try:
            result = await (self._code.call(override, state, ctx, timeout=None) if override is not None
                            else self._code.call(cast(PythonState, state).run, ctx, timeout=state.timeout))
        except CodeError as err:
            if isinstance(err.cause, OrchError):
                raise err.cause from None
            raise StepError(err.message("", f"state '{state.name}'"), run_id=self.run_id,
                            state=state.name) from err.cause
        try:
            return restore_output(state, result)
        except (TypeError, ValueError) as exc:
            raise StepError(f"returned a value that cannot be stored: {exc}", run_id=self.run_id,
                            state=state.name) from None

    async def call_user(self, state: State, what: str, fn: Callable[[Any], Any], arg: Any) -> Any:
        """`fn(arg)`, user code of `state` other than its main function (a map state's `items`,
        a machine state's `input`): what it raises fails the step, naming it."""
        try:
            return await self._code.call(fn, arg, timeout=state.timeout)
        except CodeError as err:
            if isinstance(err.cause, OrchError):
                raise err.cause from None
            raise StepError(err.message(f"{what}() raised ", f"{what}() of state '{state.name}'"),
                            run_id=self.run_id, state=state.name) from err.cause

    async def _within_time_budget(self, state: State, step: TransitionRecord, ctx: StepContext) -> Any:
        """The state run, stopped when the run reaches its `max_seconds`."""
        limit = self.budget.max_seconds
        if limit is None:
            return await self._run_state(state, step, ctx)
        left = limit - self.spent.seconds
        if left <= 0:
            raise BudgetExceededError(
                f"the run has been active {self.spent.seconds:.1f}s, its max_seconds is {limit:g}",
                fix="raise it and resume", run_id=self.run_id, state=state.name)
        try:
            async with asyncio.timeout(left):
                return await self._run_state(state, step, ctx)
        except TimeoutError:
            raise BudgetExceededError(
                f"state '{state.name}' was stopped when the run reached max_seconds={limit:g}",
                fix="raise it and resume", run_id=self.run_id, state=state.name) from None

    def _reuse_pending(self, state: State, step: TransitionRecord) -> Any:
        """An answer already paid for: judged again, not asked again. One its guard failed on
        is logged as `recorded`; this step's own answer, kept before its process stopped, is
        logged as it arrived (usage, cost and attempts included: they were never committed).
        A text answer is parsed again by the state's `parse` as it stands now."""
        pending = self._pending
        assert pending is not None
        self._pending = None
        if pending.seq == step.seq:
            for name in _KEPT:
                setattr(step, name, getattr(pending, name))
        else:
            step.source = "recorded"
            step.request = pending.request
            step.response = pending.response
            step.request_id = pending.request_id
        if isinstance(state, LLMState) and state.parse is not None and step.response is not None:
            return self._llm.parse_again(state, step)
        return restore_output(state, pending.output)

    def _values(self, names: tuple[str, ...]) -> dict[str, Any]:
        """A template's values: outputs, else input values; a `needs_if_ran` state that has
        not run renders as empty text (validation lets no other name be missing)."""
        outputs = self.outputs
        values = self.input_values
        return {n: outputs[n] if n in outputs else values.get(n, "") for n in names}

    def _judge(self, plan: Plan, step: TransitionRecord, output: Any, ctx: StepContext) -> str:
        """The decision (its value) for `output`, with the reason noted in the step."""
        if type(output) is BudgetRoute:
            state = plan.state
            assert isinstance(state, LLMState) and state.on_budget is not None
            step.source = "budget"
            decision, reason = state.on_budget.value, output.reason
        elif plan.guard is None:
            decision, reason = FlowDecision.CONTINUE.value, "no guard: continue"
        else:
            decision, reason = ask_guard(plan, output, ctx, self._code, self.run_id)
        note = step.reason  # what the LLM step noted (a cache hit, a fallback)
        step.reason = (reason if note is None else f"{reason} [{note}]")[:_REASON_LIMIT]
        return decision

    def _move(self, plan: Plan, step: TransitionRecord, decision: str) -> str:
        """Fire the decision's trigger and return the decision taken. A loop bound that blocks
        it takes the state's `on_exhausted` decision instead (the reason says why), or, with
        none declared, fails the step."""
        if self.compiled.fire(self.position, decision):
            return decision
        state = plan.state
        target = self.machine.table[state.name][decision]
        if target == state.name:
            blocked: RunError = RetryLimitError(
                f"state '{state.name}' decided {decision} (back to itself) after attempt "
                f"{self.position.attempt}, but its retry_limit is {state.retry_limit}",
                fix="raise retry_limit, route the failure or set on_exhausted=", run_id=self.run_id,
                state=state.name)
            why = f"retry_limit={state.retry_limit} reached"
        else:
            bound = self.machine.by_name[target].max_visits
            blocked = VisitLimitError(f"state '{target}' reached max_visits={bound}",
                                      fix="raise max_visits, break the loop or set on_exhausted=",
                                      run_id=self.run_id, state=state.name)
            why = f"'{target}' reached max_visits={bound}"
        exhausted = state.on_exhausted
        if exhausted is None or exhausted.value == decision or not self.compiled.fire(self.position,
                                                                                      exhausted.value):
            raise blocked
        step.reason = f"{decision} blocked ({why}): on_exhausted -> {exhausted.value}; {step.reason}"[
            :_REASON_LIMIT]
        return exhausted.value

    async def _commit(self, step: TransitionRecord, status: RunStatus | None) -> None:
        try:
            await self.ports.store.append(step, self.owner, status=status, error=step.error)
        except Exception as exc:
            self._broken = exc
            if not isinstance(exc, OwnershipLostError):
                await self._release_quietly(RunStatus.INTERRUPTED, f"store error: {exc}")
            raise

    def _account(self, state: State, step: TransitionRecord, output: Any, status: RunStatus | None) -> None:
        """What the committed step changes in the run: seq, totals, outputs and path, status."""
        self.seq = step.seq
        self.usage.add(step.usage)
        if step.cost_usd is None:
            self.cost_known = False
        self.cost_usd += step.cost_usd or 0.0
        ledgered_tokens, ledgered_usd = self._llm.take_ledgered()  # its answers are in the ledger already
        tokens, usd = step.usage.paid_tokens - ledgered_tokens, (step.cost_usd or 0.0) - ledgered_usd
        if self._fan_out.joined is not None:  # children added theirs to the ledger as they committed
            joined_tokens, joined_usd = self._fan_out.settle()
            tokens, usd = tokens - joined_tokens, usd - joined_usd
        self.spent.add(tokens, usd)
        if not self.is_child:  # a child's time is its parent's step's
            self.spent.seconds += step.latency_ms / 1000.0
        if step.committed:
            value = None if type(output) is BudgetRoute else output
            history = self.history
            if type(state) is ParallelState:
                for name, each in named_outputs(state, value):
                    self.outputs[name] = each
                    history.setdefault(name, []).append(each)
            else:
                self.outputs[state.name] = value
                history.setdefault(state.name, []).append(value)
            self.path.append(state.name)
        elif output is not _NO_OUTPUT and type(output) is not BudgetRoute:
            self._pending = step  # a paid answer the guard failed on: a resume judges it again
        if status is not None:
            self.status = status
            self.error = step.error

    # ------------------------------------------------------------------ whole run

    def request_stop(self, grace_s: float = 30.0, *, hand_back: bool = False) -> None:
        """Stop before the next step (SIGTERM). A step in progress gets `grace_s` seconds to
        finish and commit; after that its call is abandoned, or its guard or Python state
        stopped, and the run left resumable: `interrupted`, or with `hand_back` `pending`, for
        another worker to claim at once (a worker shutting down).

        Safe to call from a signal handler (in the main thread, to reach synchronous code): the
        flag is set at once, so even a step that never yields to the event loop (a plain Python
        state) is the last one to run."""
        if self._stop is not None:
            return
        self._stop = "stopped on request; resume to continue"
        if hand_back:
            self._stop, self._stopped_as = "handed back by a worker that stopped", RunStatus.PENDING
        self._code.stop_after(grace_s)  # user code holding the event loop: no loop timer reaches it
        for child in list(self.children_running):
            child.request_stop(grace_s)
        task = self._task
        if task is not None and not task.done():
            task.get_loop().call_soon_threadsafe(self._arm_grace, grace_s)

    def interrupt(self) -> bool:
        """Ctrl-C: raise KeyboardInterrupt into the run's synchronous user code (a guard or a
        Python state holding the event loop), if it is running now; False when none is, and the
        caller stops the run its usual way (cancelling its task). For a SIGINT handler."""
        return self._code.interrupt() or any(child.interrupt() for child in list(self.children_running))

    def _arm_grace(self, grace_s: float) -> None:
        task = self._task
        if task is not None and not task.done():
            self._grace = task.get_loop().call_later(grace_s, task.cancel)

    async def run_to_end(self) -> RunResult:
        self._task = asyncio.current_task()
        try:
            while self.status is RunStatus.RUNNING:
                if self._stop is not None:
                    await self._release_quietly(self._stopped_as, self._stop)
                    break
                await self.step()
        except (KeyboardInterrupt, asyncio.CancelledError):
            if self._broken is None:
                await self._release_quietly(self._stopped_as, self._stop or "interrupted; resume to continue")
            if self._stop is None or self._task is None:
                raise
            self._task.uncancel()  # our own grace period ran out: a stop, not a cancellation
        except Exception as exc:
            # a store error leaves the run owned: this Run may go on once the store is free (and
            # a dead owner's run is resumable anyway); a hook or a bug stops it as a crash would, said
            if self._broken is None and not isinstance(exc, OrchError):
                await self._release_quietly(RunStatus.INTERRUPTED, f"stopped by {type(exc).__name__}: "
                                            f"{' '.join(str(exc).split())}; resume to continue")
            raise
        finally:
            if self._grace is not None:
                self._grace.cancel()
        result = self.result()
        for hook in self._hooks.run_finished:
            hook(self.record, result)
        return result

    async def _release_quietly(self, status: RunStatus, error: str) -> None:
        try:
            await self.ports.store.release(self.run_id, self.owner, status, error)
        except OrchError:
            pass  # the owner check on resume treats a dead process as gone anyway
        self.status = status
        self.error = error

