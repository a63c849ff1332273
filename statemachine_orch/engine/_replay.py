"""Replay: re-drive a machine, as its code stands now, on the answers recorded for a run.

The real engine runs with two stand-ins: a model client that serves the recorded
responses (and never touches the network) and a store that, instead of writing, compares
every new log row with the recorded one. Python states get their recorded outputs, so a
replay never repeats a tool call's side effects. Only committed transitions are compared:
a failed step that was later resumed is history, not behaviour.

The first difference stops the replay: a changed request (prompt, system, model, tokens),
a different decision or target, or a step that now fails.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any

from ..definition._machine import Machine
from ..definition._overrides import stored_overrides, with_overrides
from ..definition._states import LLMState, PythonState, State
from ..errors import InputError, LLMError, OrchError, RunNotFoundError
from ..hooks import HookCalls
from ..llm._client import Completion, LLMRequest, completion_from_response
from ..llm._prices import PriceTable
from ..store._contract import NullStore, Store
from ..store._owner import Owner
from ..types import Attempt, Budget, RunStatus, StepContext, TransitionRecord
from ._children import ChildResult, child_id, result_of
from ._fork import replay_start
from ._fsm import Compiled, compile_machine
from ._inputs import validate_input
from ._run import Ports, Run


@dataclass(frozen=True, slots=True)
class Divergence:
    seq: int
    state: str
    kind: str  # "request" | "decision" | "target" | "state" | "error" | "ended" | "input"
    recorded: str
    replayed: str

    def describe(self) -> str:
        return (f"seq {self.seq}, state {self.state}: {self.kind} differs: "
                f"recorded {self.recorded}, replayed {self.replayed}")

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "state": self.state, "kind": self.kind,
                "recorded": self.recorded, "replayed": self.replayed}


@dataclass(frozen=True, slots=True)
class ReplayReport:
    run_id: str
    machine: str
    status: str  # the recorded run's status
    compared: int  # transitions replayed and found equal
    recorded: int  # committed transitions in the recording
    divergence: Divergence | None

    @property
    def matches(self) -> bool:
        return self.divergence is None

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "machine": self.machine, "status": self.status,
                "matches": self.matches, "compared": self.compared, "recorded": self.recorded,
                "divergence": self.divergence.to_json() if self.divergence else None}


class _Diverged(OrchError):
    def __init__(self, divergence: Divergence) -> None:
        super().__init__(divergence.describe())
        self.divergence = divergence


class _RecordingEnds(OrchError):
    """The recording stops here (the run was still in flight or failed at this point)."""

    def __init__(self) -> None:
        super().__init__("the recording ends here")


class _Cursor:
    """The committed rows of the recording, consumed as the replay reaches them."""

    def __init__(self, rows: list[TransitionRecord]) -> None:
        self.rows = rows
        self.index = 0
        self._calls: list[tuple[dict[str, Any] | None, Attempt | None, TransitionRecord | None]] = []
        self._calls_of = -1

    def current(self, state: str) -> TransitionRecord:
        if self.index >= len(self.rows):
            raise _RecordingEnds()
        row = self.rows[self.index]
        if row.from_state != state:
            raise _Diverged(Divergence(row.seq, state, "state", row.from_state, state))
        return row

    def next_call(self, state: str) -> tuple[dict[str, Any] | None, Attempt | None, TransitionRecord | None]:
        """The next model call the recorded step made: (request, failed attempt | None, answer row)."""
        row = self.current(state)
        if self._calls_of != self.index:
            self._calls_of = self.index
            self._calls = [(a.request, None if a.response is not None else a,
                            _answer_row(row, a) if a.response is not None else None)
                           for a in row.attempts  # a call in doubt recorded no answer: nothing to serve
                           if a.kind != "in_doubt" and (a.response is not None or a.delay_s is None)]
            if row.response is not None:
                self._calls.append((row.request, None, row))
        if not self._calls:
            raise _Diverged(Divergence(row.seq, state, "request", "no recorded call", "a model call"))
        return self._calls.pop(0)

    def advance(self) -> None:
        self.index += 1


def _answer_row(row: TransitionRecord, attempt: Attempt) -> TransitionRecord:
    """An invalid answer that was re-asked, as a row the recorded model can serve."""
    return TransitionRecord(run_id=row.run_id, seq=row.seq, from_state=row.from_state, to_state=None,
                            decision=None, reason=None, attempt=row.attempt, started_at=attempt.started_at,
                            latency_ms=0.0, source="llm", request=attempt.request,
                            response=attempt.response, request_id=attempt.request_id,
                            usage=attempt.usage)


class _RecordedModel:
    """Serves each step's recorded calls in order; a changed request is a divergence."""

    def __init__(self, cursor: _Cursor) -> None:
        self.cursor = cursor

    async def complete(self, request: LLMRequest) -> Completion:
        recorded, failure, answer = self.cursor.next_call(request.state)
        seq = self.cursor.rows[self.cursor.index].seq
        if recorded != request.body:
            raise _Diverged(Divergence(seq, request.state, "request",
                                       *_request_difference(recorded or {}, request.body)))
        if failure is not None:
            raise LLMError(f"recorded failure: {failure.error}", kind="transient",
                           status_code=failure.status_code, request_id=failure.request_id,
                           run_id=request.run_id, state=request.state)
        assert answer is not None and answer.response is not None
        completion = completion_from_response(answer.response, request.tool_name, answer.request_id)
        completion.usage = answer.usage
        return completion


class _ComparingStore(NullStore):
    """Takes the engine's writes and checks each against the recorded row instead."""

    def __init__(self, cursor: _Cursor) -> None:
        self.cursor = cursor

    async def find_cached(self, request_hash: str) -> TransitionRecord | None:
        """A step served from the cache when recorded is served from its recorded answer."""
        if self.cursor.index < len(self.cursor.rows):
            row = self.cursor.rows[self.cursor.index]
            if row.source == "cache" and row.request_hash == request_hash:
                return row
        return None

    async def append(self, record: TransitionRecord, owner: Owner, *, status: RunStatus | None = None,
                     error: str | None = None) -> None:
        row = self.cursor.current(record.from_state)
        seq = row.seq
        if record.to_state is None:
            raise _Diverged(Divergence(seq, row.from_state, "error",
                                       f"{row.decision} -> {row.to_state}", record.error or "failure"))
        if record.decision != row.decision:
            raise _Diverged(Divergence(seq, row.from_state, "decision", str(row.decision),
                                       str(record.decision)))
        if record.to_state != row.to_state:
            raise _Diverged(Divergence(seq, row.from_state, "target", str(row.to_state),
                                       str(record.to_state)))
        self.cursor.advance()


def _request_difference(recorded: dict[str, Any], replayed: dict[str, Any]) -> tuple[str, str]:
    for key in sorted(set(recorded) | set(replayed)):
        a, b = recorded.get(key), replayed.get(key)
        if a == b:
            continue
        if key == "messages" and isinstance(a, list) and isinstance(b, list):
            return _text_difference("prompt", _prompt_text(a), _prompt_text(b))
        if key == "system" and isinstance(a, str) and isinstance(b, str):
            return _text_difference("system", a, b)
        return f"{key}={json.dumps(a)[:200]}", f"{key}={json.dumps(b)[:200]}"
    return "request", "request"


def _prompt_text(messages: list[Any]) -> str:
    parts = [m.get("content") for m in messages if isinstance(m, dict)]
    return "\n".join(p if isinstance(p, str) else json.dumps(p) for p in parts)


def _text_difference(label: str, a: str, b: str) -> tuple[str, str]:
    """The first differing line of two texts, as (recorded, replayed)."""
    for number, (old, new) in enumerate(zip_longest(a.splitlines(), b.splitlines()), 1):
        if old != new:
            return (f"{label} line {number} {json.dumps((old or '')[:160])}",
                    f"{label} line {number} {json.dumps((new or '')[:160])}")
    return label, label


async def replay_run(store: Store, run_id: str, machine: Machine, *, prices: PriceTable | None = None,
                     compiled: Compiled | None = None) -> ReplayReport:
    """Replay one stored run against `machine` as defined now, with its stored budget and
    `prices` (give the table the run was made with). Writes nothing; a run that fails its
    audit chain is refused (`TamperedRunError`), never replayed."""
    record, log = await store.load_run(run_id, verified=True)
    variant = with_overrides(machine, stored_overrides(record.options))  # a fork's or an arm's changes
    if variant is not machine:
        machine, compiled = variant, None
    committed = [row for row in log if row.committed and row.source != "inherited"]  # a fork's: its parent's
    cursor = _Cursor(committed)

    def recorded_output(state: PythonState | LLMState, ctx: StepContext) -> Any:
        return cursor.current(state.name).output

    def report(divergence: Divergence | None) -> ReplayReport:
        return ReplayReport(run_id, record.machine, record.status.value, cursor.index,
                            len(committed), divergence)

    if record.machine != machine.name:
        return report(Divergence(0, "-", "machine", record.machine, machine.name))
    async def recorded_child(parent: Run, state: State, slot: int, item: int, compiled_child: Compiled,
                             input: Any) -> ChildResult:
        """A child run as recorded, replayed on its machine as it is now: a divergence in it is
        the parent's, at the step that started it."""
        seq = cursor.current(state.name).seq
        run_id = child_id(parent, state, slot, item)
        child = compiled_child.machine
        try:
            child_record, child_log = await store.load_run(run_id, verified=True)
        except RunNotFoundError:
            raise _Diverged(Divergence(seq, state.name, "item", "no such item recorded",
                                       f"item {item} (run {run_id})")) from None
        given = validate_input(child, input)[1]
        if given != child_record.input:
            raise _Diverged(Divergence(seq, state.name, "item",
                                       f"item {item} input {json.dumps(child_record.input)[:200]}",
                                       f"item {item} input {json.dumps(given)[:200]}"))
        inner = await replay_run(store, run_id, child, prices=prices, compiled=compiled_child)
        if inner.divergence is not None:
            raise _Diverged(Divergence(seq, state.name, "item", f"item {item} (run {run_id}) as recorded",
                                       inner.divergence.describe()))
        return result_of(child, child_record, child_log)

    ports = Ports(store=_ComparingStore(cursor), model=_RecordedModel(cursor), prices=prices or PriceTable(),
                  hooks=HookCalls(), python_override=recorded_output, children=recorded_child)
    try:
        context_input, _, values = validate_input(machine, record.input)
        compiled = compiled or compile_machine(machine)
        snap, seq = replay_start(compiled, record, log)
        run = Run(compiled, record, Owner.for_this_process(), ports, input=context_input, input_values=values,
                  snap=snap, seq=seq, budget=Budget.of_run(record.options))
        while not run.done:
            await run.step()
    except _Diverged as exc:
        return report(exc.divergence)
    except _RecordingEnds:
        return report(None)
    except InputError as exc:
        return report(Divergence(0, "-", "input", "valid input", str(exc)))
    except OrchError as exc:
        return report(Divergence(cursor.index + 1, "-", "error", "a replayable run", str(exc)))
    if cursor.index < len(committed):
        row = committed[cursor.index]
        return report(Divergence(row.seq, row.from_state, "ended", f"continues with {row.from_state}",
                                 "run ended"))
    return report(None)
