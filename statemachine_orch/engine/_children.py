"""Child runs: the run a machine state starts, and one run per item of a map state.

A child is a run like any other, stored with the run, state and item that started it
(`Parent`): durable step by step, continued where it stopped, replayed from its own log. Its id
says where it belongs, `PARENT.S.N.I` (the parent's S-th state, the N-th output that state
commits, item I), so a parent resumed after a crash finds each child again: a finished one is
read back, never run twice; an unfinished one continues. Children are owned by their parent's
owner and share its budget ledger.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..definition._machine import Machine
from ..definition._states import State
from ..errors import RunNotFoundError, StepError, UsageError
from ..types import (
    Budget,
    Parent,
    RunRecord,
    RunResult,
    RunStatus,
    TransitionRecord,
    Usage,
    child_run_id,
    now_iso,
    output_json,
)
from ._fsm import Compiled
from ._ids import check_run_id
from ._inputs import validate_input
from ._run import Run
from ._snapshot import fresh, snapshot


@dataclass(slots=True, kw_only=True)
class ChildResult:
    """How a child run ended, and what it cost in all (its earlier processes included)."""

    run_id: str
    status: RunStatus
    output: Any  # its result (`Machine.result`), as stored
    usage: Usage
    cost_usd: float | None
    error: str | None


def child_id(parent: Run, state: State, slot: int, item: int) -> str:
    """The id of a child run: where it belongs in its parent (see the module docstring)."""
    run_id = child_run_id(parent.run_id, list(parent.machine.by_name).index(state.name), slot, item)
    try:
        check_run_id(run_id)
    except Exception:
        raise StepError(f"child run id {run_id!r} is longer than 64 characters: machines nest too deeply",
                        fix="nest fewer machine or map states", run_id=parent.run_id, state=state.name) from None
    return run_id


def refuse_child(record: RunRecord) -> None:
    """A child run is driven by its parent only (as its owner, within its budget): refuse it."""
    if record.parent is not None:
        p = record.parent
        raise UsageError(f"run {record.run_id} is a child of run {p.run_id} (state {p.state}, item {p.item})",
                         fix=f"resume {p.run_id}, which continues it")


def result_of(machine: Machine, record: RunRecord, log: list[TransitionRecord]) -> ChildResult:
    """A stored child run's result, read from its log."""
    return _child_result(RunResult.from_log(record, log, result=machine.result))


def _child_result(result: RunResult) -> ChildResult:
    return ChildResult(run_id=result.run_id, status=result.status, output=output_json(result.output),
                       usage=result.usage, cost_usd=result.cost_usd, error=result.error)


async def drive_child(parent: Run, state: State, slot: int, item: int, compiled: Compiled, input: Any
                      ) -> ChildResult:
    """Run child `item` of `state` to its end: read back if it finished, continued if it
    started, else started; a failed child is tried again from its failed step."""
    machine = compiled.machine
    run_id = child_id(parent, state, slot, item)
    store = parent.ports.store
    budget = Budget(max_cost_usd=parent.budget.max_cost_usd, max_tokens=parent.budget.max_tokens)
    reuse = None if parent.reuse is None else parent.reuse.child(run_id[len(parent.run_id):])  # a fork's child
    try:
        record, log = await store.load_run(run_id, verified=True)
    except RunNotFoundError:
        context_input, stored, values = validate_input(machine, input)
        now = now_iso()
        record = RunRecord(run_id=run_id, machine=machine.name, machine_ref=machine.ref,
                           machine_hash=machine.source_hash, input=stored, status=RunStatus.RUNNING,
                           created_at=now, updated_at=now,
                           options={"budget": budget.to_json(), **machine.result_option},
                           parent=Parent(parent.run_id, state.name, item))
        await store.create_run(record, parent.owner)
        run = Run(compiled, record, parent.owner, parent.ports, input=context_input, input_values=values,
                  snap=fresh(machine.initial), budget=budget, ledger=parent.spent, reuse=reuse)
        resumed = False
    else:
        if record.status.finished:
            done = result_of(machine, record, log)
            parent.spent.add(done.usage.paid_tokens, done.cost_usd)  # paid before this step: not in the ledger yet
            return done
        snapshot(compiled, record, log)  # refuse an incompatible run before claiming it
        record, log = await store.claim_run(run_id, parent.owner, options={**record.options,
                                                                            "budget": budget.to_json()})
        context_input, _, values = validate_input(machine, record.input)
        snap = snapshot(compiled, record, log)
        parent.spent.add(snap.usage.paid_tokens, snap.cost_usd)  # paid in an earlier process: not in the ledger yet
        run = Run(compiled, record, parent.owner, parent.ports, input=context_input, input_values=values,
                  snap=snap, seq=log[-1].seq if log else 0, budget=budget, ledger=parent.spent, reuse=reuse)
        resumed = True
    for hook in parent.ports.hooks.run_started:
        hook(record, resumed=resumed, machine_hash=machine.source_hash)
    parent.children_running.add(run)
    try:
        return _child_result(await run.run_to_end())
    finally:
        parent.children_running.discard(run)
