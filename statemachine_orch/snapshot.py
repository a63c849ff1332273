"""A stored run read back: the snapshot a resume continues from, and a run's result.

The snapshot is the run's row plus its log: the next state and attempt come from the last
log row, outputs from the committed rows (a failed row's answer is `pending`, to be judged
again rather than paid for again). Nothing here writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from .definition import Machine, State
from .errors import UsageError
from .fsm import Position
from .runlog import resume_point, total_cost, total_usage
from .types import END, INVALID_MARKER, InvalidOutput, RunRecord, RunStatus, TransitionRecord, Usage


@dataclass(slots=True, kw_only=True)
class RunResult:
    """Where a run ended up."""

    run_id: str
    machine: str
    status: RunStatus
    path: list[str]
    outputs: dict[str, Any]
    usage: Usage
    cost_usd: float | None = None
    error: str | None = None

    @property
    def steps(self) -> int:
        return len(self.path)

    @classmethod
    def from_log(cls, record: RunRecord, log: list[TransitionRecord]) -> RunResult:
        """The result of a stored run, read back from its log."""
        usage = total_usage(log)
        committed = [row for row in log if row.to_state is not None]
        return cls(run_id=record.run_id, machine=record.machine, status=record.status,
                   path=[row.from_state for row in committed],
                   outputs={row.from_state: row.output for row in committed}, usage=usage,
                   cost_usd=total_cost(log), error=record.error)

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "machine": self.machine, "status": self.status.value,
            "path": self.path, "steps": self.steps, "error": self.error,
            "input_tokens": self.usage.input_tokens, "output_tokens": self.usage.output_tokens,
            "cache_read_tokens": self.usage.cache_read_tokens,
            "cache_write_tokens": self.usage.cache_write_tokens, "cost_usd": self.cost_usd,
            "outputs": {k: output_json(v) for k, v in self.outputs.items()},
        }


@dataclass(slots=True)
class Snapshot:
    """A run rebuilt from its log: what resume continues from."""

    position: Position
    outputs: dict[str, Any]
    path: list[str]
    usage: Usage
    cost_usd: float | None  # None when a paid call had no known price
    seconds: float
    pending: TransitionRecord | None


def snapshot(machine: Machine, record: RunRecord, log: list[TransitionRecord]) -> Snapshot:
    """Rebuild a run from its log, or explain (UsageError) why `machine` cannot continue it."""
    rid = record.run_id
    if record.status.finished:
        raise UsageError(f"run {rid} is already {record.status.value}; nothing to resume")
    if record.machine != machine.name:
        raise UsageError(f"run {rid} belongs to machine '{record.machine}', not '{machine.name}'; "
                         "pass the right machine")
    outputs: dict[str, Any] = {}
    path: list[str] = []
    visits = {machine.initial: 1}
    usage = Usage()
    seconds = 0.0
    for row in log:
        usage.add(row.usage)
        seconds += row.latency_ms / 1000.0
        for name in (row.from_state, row.to_state):
            if name is not None and name != END and name not in machine.by_name:
                raise UsageError(f"run {rid} passed through state '{name}', which machine "
                                 f"'{machine.name}' no longer defines; restore the state to resume it")
        if row.to_state is None and row.output is None:
            continue
        try:
            output = restore_output(machine.by_name[row.from_state], row.output)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"run {rid}: the stored output of '{row.from_state}' (seq {row.seq}) "
                             f"{exc}; restore the output model to resume it") from None
        if row.to_state is None:
            continue
        outputs[row.from_state] = output
        path.append(row.from_state)
        if row.to_state != row.from_state:
            visits[row.to_state] = visits.get(row.to_state, 0) + 1
    state, attempt = resume_point(log, machine.initial)
    if state == END:
        raise UsageError(f"run {rid} already reached its end; nothing to resume")
    last = log[-1] if log else None
    pending = last if last is not None and last.to_state is None and last.output is not None else None
    return Snapshot(Position(state, attempt, visits), outputs, path, usage, total_cost(log), seconds,
                    pending)


def restore_output(state: State, value: Any) -> Any:
    """Outputs as a resumed run would see them: validated model, InvalidOutput, or JSON data."""
    if isinstance(value, dict) and INVALID_MARKER in value and len(value) == 1:
        return InvalidOutput(**value[INVALID_MARKER])
    if isinstance(value, InvalidOutput):
        return value
    if state.output is not None:
        if isinstance(value, state.output):
            return value
        try:
            return state.output.model_validate(value)
        except ValidationError as exc:
            raise ValueError(f"does not match {state.output.__name__}: {first_error(exc)}") from None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return json.loads(json.dumps(value, allow_nan=False))


def output_json(value: Any) -> Any:
    """How an output is stored: models and InvalidOutput as JSON, the rest as it is."""
    if isinstance(value, InvalidOutput):
        return value.to_json()
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value


def first_error(exc: ValidationError, whole: str = "value") -> str:
    """`loc.path: message` of the first error (`whole` when it is about the value itself)."""
    first = exc.errors()[0]
    return f"{'.'.join(str(p) for p in first['loc']) or whole}: {first['msg']}"
