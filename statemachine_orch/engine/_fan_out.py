"""A run's child runs, as its steps start and join them: a machine, map or parallel state's
(driven `concurrency` at a time), and those a Python state starts through `ctx.run_child`.

A step's children are its slot's: the N-th output its state commits, so a step that failed
and runs again finds the same children (`_children` names them). Their tokens and cost are
their own rows' and already in the budget ledger; the step that joins them carries their sum,
and a failed step carries none of it (each counted once, by whichever step commits them).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..definition._machine import Machine
from ..definition._states import MachineState, MapState, ParallelState, State
from ..errors import BudgetExceededError, StepError
from ..types import ItemError, RunStatus, StepContext, TransitionRecord, Usage, output_json
from ._outputs import restore_output

if TYPE_CHECKING:
    from ._children import ChildResult
    from ._run import ChildDriver, Run


class FanOut:
    """The child runs of one run's steps, and their tokens and cost joined into the step in
    progress (`joined`, None while it has none)."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.joined: tuple[Usage, float] | None = None

    async def output(self, state: MachineState | MapState | ParallelState, step: TransitionRecord,
                     ctx: StepContext) -> Any:
        """The output of a machine, map or parallel state: its child runs, `concurrency` at a
        time, each driven to its end (`_children.drive_child`); the items' outputs in item order (a parallel
        state's by branch name). The step's usage and
        cost are the children's, in all, once they join: a failed step carries none (its
        children keep theirs, and a resume continues them)."""
        run = self.run
        drive = self._driver(state)
        slot = self._slot(state)
        if isinstance(state, MachineState):
            inputs = [None if state.input is None else await run.call_user(state, "input", state.input, ctx)]
        elif isinstance(state, ParallelState):
            given = {name: output_json(value) for name, value in run.input_values.items()}
            inputs = [{**given, **{n: output_json(run.outputs[n]) for n in branch.needs}} for branch in state.branches]
        else:
            items = await run.call_user(state, "items", state.items, ctx)
            try:
                items = list(items)
            except TypeError:
                raise StepError(f"items() returned {type(items).__name__}, not a list", fix="return a list of items",
                                run_id=run.run_id, state=state.name) from None
            wrap = state.item_model is None and not isinstance(state.each, Machine)
            inputs = [{"item": output_json(item)} if wrap else item for item in items]
        gate = asyncio.Semaphore(state.concurrency if isinstance(state, MapState) else len(inputs))

        async def one(item: int, child_input: Any) -> ChildResult | None:
            async with gate:
                if run.stopping:
                    return None  # stopping: items not started yet stay so
                return await drive(run, state, slot, item, run.compiled.child_of(state.name, item), child_input)

        tasks: list[asyncio.Task[ChildResult | None]] = []
        try:
            async with asyncio.TaskGroup() as group:  # what a child raises stops the others
                tasks += [group.create_task(one(i, child_input)) for i, child_input in enumerate(inputs)]
        except BaseExceptionGroup as raised:  # the lowest item's, as one error (a store error, a divergence)
            lowest = next((t.exception() for t in tasks if t.done() and not t.cancelled() and t.exception()), None)
            raise (lowest or raised.exceptions[0]) from None
        if run.stopping:  # the children stopped with the run: a resume continues them
            raise asyncio.CancelledError()
        results = [result for result in (task.result() for task in tasks) if result is not None]
        failed = [(i, r) for i, r in enumerate(results) if r.status not in (RunStatus.COMPLETED, RunStatus.TERMINATED)]
        over = next((r for _, r in failed if r.status is RunStatus.BUDGET_EXCEEDED), None)
        if over is not None:
            raise BudgetExceededError(f"child run {over.run_id} stopped: {over.error}", run_id=run.run_id,
                                      state=state.name)
        if failed and (not isinstance(state, MapState) or state.on_item_error == "fail"):
            i, first = failed[0]
            raise StepError(f"{len(failed)} of {len(results)} child run(s) did not finish; the first, item {i} "
                            f"(run {first.run_id}), is {first.status.value}: {first.error}",
                            fix="resume the run: finished items are kept, the others continue",
                            run_id=run.run_id, state=state.name)
        for r in results:
            self.join(step, r)
        if isinstance(state, MachineState):
            return restore_output(state, results[0].output)
        if isinstance(state, ParallelState):
            return restore_output(state, {b.name: r.output for b, r in zip(state.branches, results, strict=True)})
        outputs = restore_output(state, [
            ItemError(item=i, run_id=r.run_id, status=r.status.value, error=r.error or "").to_json()
            if (i, r) in failed else r.output for i, r in enumerate(results)])
        if state.reduce is None or failed:
            return outputs
        return restore_output(state, await run.call_user(state, "reduce", state.reduce, outputs))

    def join(self, step: TransitionRecord, child: ChildResult) -> None:
        """A child's tokens and cost into the step that started it (they are in the budget
        ledger already: the child added each of its steps as it committed)."""
        step.usage.add(child.usage)
        step.cost_usd = None if step.cost_usd is None or child.cost_usd is None else step.cost_usd + child.cost_usd
        usage, usd = self.joined or (Usage(), 0.0)
        usage.add(child.usage)
        self.joined = usage, usd + (child.cost_usd or 0.0)

    def unjoin(self, step: TransitionRecord) -> None:
        """A failed step carries none of its children's tokens and cost: they keep them, and
        the step that joins them once they all finish carries them (each counted once)."""
        if self.joined is not None:
            usage, usd = self.joined
            step.usage.subtract(usage)
            if step.cost_usd is not None:
                step.cost_usd = max(step.cost_usd - usd, 0.0)
            self.joined = None

    def starter(self, state: State, step: TransitionRecord) -> Callable[[Any, Any], Awaitable[Any]]:
        """`ctx.run_child` for a Python state's step: the n-th child it starts is item n of the
        step's slot, so a resume that runs the state again finds each child again."""
        run = self.run
        slot = self._slot(state)
        started = 0

        async def run_child(machine: Machine, input: Any = None) -> Any:
            nonlocal started
            item, started = started, started + 1
            result = await self._driver(state)(run, state, slot, item, run.compiled.child(machine), input)
            self.join(step, result)
            if result.status not in (RunStatus.COMPLETED, RunStatus.TERMINATED):
                raise StepError(f"child run {result.run_id} is {result.status.value}: {result.error}",
                                fix="resume the run: the child continues where it stopped", run_id=run.run_id,
                                state=state.name)
            return result.output

        return run_child

    def settle(self) -> tuple[int, float]:
        """The tokens and cost the committed step joined from its children (0 for most steps)."""
        if self.joined is None:
            return 0, 0.0
        (usage, usd), self.joined = self.joined, None
        return usage.paid_tokens, usd

    def _slot(self, state: State) -> int:
        """The slot of `state`'s step in progress: the output number it is to commit."""
        return len(self.run.history.get(state.name, ())) + 1

    def _driver(self, state: State) -> ChildDriver:
        drive = self.run.ports.children
        if drive is None:
            raise StepError("this engine cannot run child runs", run_id=self.run.run_id, state=state.name)
        return drive
