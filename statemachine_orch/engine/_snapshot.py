"""A stored run read back: the snapshot a resume continues from.

The position is rebuilt by firing, over the log, the same triggers that moved the run; a
failed row's state runs again and its answer, if it had one, is `pending`: judged again,
not paid for again. The step after the last row may have got further in the process that
stopped (`unfinished`, from the run's in-flight mark). Nothing here writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from ..types import END, RunRecord, TransitionRecord, Usage, total_cost, total_usage
from ._fsm import Compiled
from ._outputs import named_outputs, restore_output
from ._position import Position
from ._progress import Unfinished, unfinished


@dataclass(slots=True, kw_only=True)
class Snapshot:
    """A run rebuilt from its log: what resume continues from."""

    position: Position
    outputs: dict[str, Any]
    history: dict[str, list[Any]]  # state -> its committed outputs, oldest first
    path: list[str]
    usage: Usage
    cost_usd: float | None  # None when a paid call had no known price
    seconds: float
    pending: TransitionRecord | None  # a paid answer its guard failed on
    unfinished: Unfinished | None = None  # how far the next step got before its process stopped


def fresh(initial: str) -> Snapshot:
    """A run that has not taken a step."""
    return Snapshot(position=Position(initial), outputs={}, history={}, path=[], usage=Usage(), cost_usd=0.0,
                    seconds=0.0, pending=None)


def snapshot(compiled: Compiled, record: RunRecord, log: list[TransitionRecord]) -> Snapshot:
    """Rebuild a run from its log, or explain (UsageError) why `compiled`'s machine cannot continue it."""
    machine = compiled.machine
    rid = record.run_id
    if record.status.finished:
        raise UsageError(f"run {rid} is already {record.status.value}; nothing to resume")
    if record.machine != machine.name:
        raise UsageError(f"run {rid} belongs to machine '{record.machine}', not '{machine.name}'; "
                         "pass the right machine")
    position = Position(machine.initial)
    outputs: dict[str, Any] = {}
    history: dict[str, list[Any]] = {}
    path: list[str] = []
    for row in log:
        for name in (row.from_state, row.to_state):
            if name is not None and name != END and name not in machine.by_name:
                raise UsageError(f"run {rid} passed through state '{name}', which machine "
                                 f"'{machine.name}' no longer defines; restore the state to resume it")
        if row.from_state != position.state:
            raise UsageError(f"run {rid}: step {row.seq} ran '{row.from_state}' where the log leads to "
                             f"'{position.state}'; the log is not this run's, restore it from a backup")
        if not row.committed:
            position.failed()
        elif machine.edges(row.from_state).get(row.decision or "") != row.to_state:
            raise UsageError(f"run {rid}: step {row.seq} went from '{row.from_state}' to '{row.to_state}' on "
                             f"{row.decision}, which machine '{machine.name}' no longer routes that way; "
                             "restore that transition to resume it")
        else:
            compiled.fire(position, row.decision or "", replay=True)
        if row.output is None and not row.committed:
            continue
        try:
            output = restore_output(machine.by_name[row.from_state], row.output)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"run {rid}: the stored output of '{row.from_state}' (seq {row.seq}) "
                             f"{exc}; restore the output model to resume it") from None
        if row.committed:
            for name, value in named_outputs(machine.by_name[row.from_state], output):
                outputs[name] = value
                history.setdefault(name, []).append(value)
            path.append(row.from_state)
    if position.state == END:
        raise UsageError(f"run {rid} already reached its end; nothing to resume")
    last = log[-1] if log else None
    pending = last if last is not None and not last.committed and last.output is not None else None
    return Snapshot(position=position, outputs=outputs, history=history, path=path, usage=total_usage(log),
                    cost_usd=total_cost(log), seconds=sum(row.latency_ms for row in log) / 1000.0,
                    pending=pending, unfinished=unfinished(record.in_flight, run_id=rid,
                                                           seq=last.seq + 1 if last else 1, state=position.state))
