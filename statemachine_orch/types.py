"""Shared vocabulary: decisions, statuses, and the records the engine writes and stores keep.

Nothing here does I/O. Records are keyword-only dataclasses: plain data, JSON-friendly,
never pickled.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from time import time_ns
from types import MappingProxyType
from typing import Any, Literal, NamedTuple, TypeAlias

from .errors import DefinitionError, UsageError
from .limits import Budget as Budget
from .limits import RetryPolicy as RetryPolicy
from .limits import Usage as Usage
from .limits import check_amount as check_amount

_second: dict[int, str] = {}  # the current second's "YYYY-MM-DDTHH:MM:SS." (one entry)


def now_iso() -> str:
    """UTC now as stored: ISO 8601 with microseconds and a Z, e.g. 2026-11-24T07:16:46.327481Z.

    The part up to the second is formatted once per second: this runs on every step."""
    now = time_ns()
    whole = now // 1_000_000_000
    prefix = _second.get(whole)
    if prefix is None:
        _second.clear()
        prefix = _second[whole] = datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
    return f"{prefix}{now // 1000 % 1_000_000:06d}Z"


END = "__end__"
"""Pseudo-state that ends a run; use it as a transition target."""


class FlowDecision(Enum):
    """What a guard decided after a state ran; the transition table maps it to a next state."""

    CONTINUE = "continue"
    SKIP = "skip"
    RETRY = "retry"
    BRANCH_A = "branch_a"
    BRANCH_B = "branch_b"
    TERMINATE = "terminate"

    def because(self, reason: str) -> Verdict:
        """This decision together with the reason the guard wants in the audit log."""
        return Verdict(self, reason)


@dataclass(frozen=True, slots=True)
class Branch:
    """A named branch, for machines that need more than BRANCH_A and BRANCH_B."""

    name: str

    @property
    def value(self) -> str:
        return f"branch:{self.name}"

    def because(self, reason: str) -> Verdict:
        return Verdict(self, reason)

    def __str__(self) -> str:
        return self.value


Decision: TypeAlias = FlowDecision | Branch


@dataclass(frozen=True, slots=True)
class Verdict:
    """A decision with the guard's own explanation (`FlowDecision.SKIP.because("...")`)."""

    decision: Decision
    reason: str


def decision_from_value(value: str) -> Decision:
    """Inverse of `Decision.value`, for reading decisions back from the log."""
    if value.startswith("branch:"):
        return Branch(value[len("branch:"):])
    return FlowDecision(value)


class RunStatus(str, Enum):  # noqa: UP042 (str mixin: statuses compare equal to their text)
    """Lifecycle of a run. Only `running` can be advanced; failed/interrupted can be resumed."""

    RUNNING = "running"
    PENDING = "pending"  # queued for a worker (`orch enqueue`), or handed back by one
    WAITING = "waiting"  # paused at a review state until someone decides (`orch review`)
    COMPLETED = "completed"
    TERMINATED = "terminated"
    FAILED = "failed"
    BUDGET_EXCEEDED = "budget_exceeded"
    INTERRUPTED = "interrupted"

    @property
    def finished(self) -> bool:
        return self in (RunStatus.COMPLETED, RunStatus.TERMINATED)


class StepContext(NamedTuple):
    """What a guard or Python step may read: the run input, the latest outputs of the states
    it declared in `needs` (and, those that ran, in `needs_if_ran`), and what earlier visits
    of a loop produced (`history`). `attempt` counts the runs of this state in a row,
    `visit` the times the run has entered it (1 the first time)."""

    run_id: str
    state: str
    attempt: int
    input: Any
    outputs: Mapping[str, Any]
    visit: int = 1
    past: Mapping[str, Sequence[Any]] = MappingProxyType({})
    starter: Callable[..., Awaitable[Any]] | None = None  # a Python state's: what `run_child` calls

    async def run_child(self, machine: Any, input: Any = None) -> Any:
        """Run `machine` to its end as a child run of this step (from an async Python state)
        and return its result (`Machine(result=...)`, as stored: JSON data). The n-th child a
        step starts is its item n: a resume that runs the state again reads a finished child
        back and continues an unfinished one, so no committed step of it is paid twice. Its
        tokens and cost count in this step; a child that does not finish fails the step
        (`StepError`)."""
        if self.starter is None:
            raise UsageError("only a Python state's step can start child runs",
                             fix="call ctx.run_child(...) from an async PythonState, or use MachineState")
        return await self.starter(machine, input)

    def history(self, state: str) -> list[Any]:
        """The outputs `state` committed so far in this run, oldest first (the one being
        judged now is not among them: it is committed after its guard)."""
        try:
            return list(self.past[state])
        except KeyError:  # a context built by hand, with no history
            return []


Guard: TypeAlias = Callable[[Any, StepContext], "Decision | Verdict"]
"""`(output, context) -> FlowDecision | Branch | Verdict`."""

StepFunction: TypeAlias = Callable[[StepContext], Any | Awaitable[Any]]
"""A plain Python state: `(context) -> output`, sync or async; the output must be JSON-able."""

Result: TypeAlias = "str | Callable[[Mapping[str, Any]], Any]"
"""What a run answers (`Machine(result=...)`): a state's name (its latest committed output), or
`(outputs) -> value` over the latest committed output of each state that ran, as stored (JSON
data: a model's output as its dict), so it gives the same value live, resumed and read back."""

Source: TypeAlias = Literal["llm", "python", "recorded", "cache", "fallback", "budget", "child", "review",
                            "inherited", "reused"]
"""Where a step's output came from: a model call, a Python state, an answer recorded before a
failed guard, the step cache, a fallback, nowhere (the budget routed the step), child runs
(a machine or map state: the row's usage and cost are theirs, rolled up), a reviewer (a review
state's decision, or its timeout), or, in a fork, the run it was forked from: a step before the
fork point copied from it ("inherited", not run), or its answer to the identical request at the
same position ("reused", not paid)."""

AttemptKind: TypeAlias = Literal["transient", "deterministic", "timeout", "connection", "malformed",
                                 "spend_limit", "invalid_output", "refusal", "truncated", "empty", "cancelled",
                                 "in_doubt"]
"""Why a model call did not give its step the answer ("in_doubt": it was in flight when its
process died, so it may have been paid; it is counted at its worst case)."""

OutputProblem: TypeAlias = Literal["invalid_output", "refusal", "truncated", "empty"]
"""Why an answer that arrived is not usable."""


@dataclass(frozen=True, slots=True)
class InvalidOutput:
    """What a guard sees (with `on_invalid="guard"`) when no valid answer came back.

    `kind` is "invalid_output" (schema or format still wrong after re-asks), "refusal",
    "truncated" (stop_reason max_tokens) or "empty" (no text at all). It is never a valid
    answer: route on it.
    """

    kind: OutputProblem
    error: str
    text: str = ""
    data: Any = None

    def to_json(self) -> dict[str, Any]:
        return {INVALID_MARKER: {"kind": self.kind, "error": self.error, "text": self.text,
                                 "data": self.data}}


INVALID_MARKER = "__orch_invalid_output__"


@dataclass(frozen=True, slots=True, kw_only=True)
class ItemError:
    """A map state's item whose child run did not finish, in its slot of the output list
    (with `on_item_error="guard"`): the guard decides what to do without it."""

    item: int
    run_id: str
    status: str
    error: str

    def to_json(self) -> dict[str, Any]:
        return {ITEM_ERROR_MARKER: {"item": self.item, "run_id": self.run_id, "status": self.status,
                                    "error": self.error}}


ITEM_ERROR_MARKER = "__orch_item_error__"


# --------------------------------------------------------------------------- records


@dataclass(slots=True, kw_only=True)
class Attempt:
    """One model call that did not give the step its answer: the seed's failure_log row.

    A call that got a response (an invalid answer) keeps it, so replay can serve it again.
    """

    number: int
    started_at: str
    kind: AttemptKind
    error: str
    status_code: int | None = None
    request_id: str | None = None
    delay_s: float | None = None  # slept before the next attempt
    usage: Usage = field(default_factory=Usage)
    cost_usd: float | None = None
    request: dict[str, Any] | None = None
    response: dict[str, Any] | None = None


@dataclass(slots=True, kw_only=True)
class TransitionRecord:
    """One row of the transition log: a state ran and the machine moved (or the step failed).

    `to_state` and `decision` are None when the step failed; `output` is kept whenever the
    step produced one, so a paid answer survives a failing guard.
    """

    run_id: str
    seq: int
    from_state: str
    attempt: int
    started_at: str
    source: Source
    to_state: str | None = None
    decision: str | None = None
    reason: str | None = None
    latency_ms: float = 0.0
    output: Any = None
    error: str | None = None
    request: dict[str, Any] | None = None
    response: dict[str, Any] | None = None
    request_id: str | None = None
    usage: Usage = field(default_factory=Usage)
    cost_usd: float | None = 0.0  # None: a paid call whose model has no known price
    request_hash: str | None = None  # set for states with a step cache
    in_doubt: bool = False  # re-sent a call that was in flight when a process died: maybe paid twice
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def committed(self) -> bool:
        """The step moved the machine (False: it failed and its state runs again on resume)."""
        return self.to_state is not None

    def call_requests(self) -> list[dict[str, Any] | None]:
        """The request of each model call the step made: its failed attempts, then the call that
        answered (none for a cache hit, a recorded answer, a Python state or a fallback function)."""
        answered = self.source in ("llm", "fallback") and self.response is not None
        return [a.request for a in self.attempts] + ([self.request] if answered else [])


@dataclass(slots=True, kw_only=True)
class RunRecord:
    """The stored run: identity, input and status; its snapshot is this row plus its log."""

    run_id: str
    machine: str
    machine_ref: str
    machine_hash: str
    input: dict[str, Any]
    status: RunStatus
    created_at: str
    updated_at: str
    error: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    owner: str | None = None
    in_flight: dict[str, Any] | None = None  # {"seq", "state", "at", ...progress} of the last paid call
    stale: bool = False  # marked running, but its owning process is gone: resume it
    takeovers: list[Takeover] = field(default_factory=list)
    parent: Parent | None = None  # set on a child run: the run whose state started it
    batch: str | None = None  # set on a run of a batch (`Engine.run_many`, `orch batch`)
    review: dict[str, Any] | None = None  # while waiting: the pending review (`ReviewState`)
    forked_from: str | None = None  # set on a fork: the run it was forked from (`orch fork`)
    experiment: str | None = None  # set on a run of an A/B experiment (`orch ab`), with its arm
    arm: str | None = None


@dataclass(frozen=True, slots=True)
class Parent:
    """Where a child run comes from: the run and state that started it, and its item number
    (0 for a sub-machine state's one child; a map state's items count from 0)."""

    run_id: str
    state: str
    item: int


def child_run_id(parent: str, index: int, slot: int, item: int) -> str:
    """A child run's id, `PARENT.S.N.I`: its parent's S-th state (from 0), the N-th output that
    state commits (from 1; a state run again in a loop starts new children), item I. A parent
    resumed after a crash finds each child again by it."""
    return f"{parent}.{index}.{slot}.{item}"


def child_place(run_id: str) -> tuple[int, int, int]:
    """(S, N, I) of a child run's id (`child_run_id`): where it belongs in its parent."""
    index, slot, item = run_id.rsplit(".", 3)[1:]
    return int(index), int(slot), int(item)


@dataclass(slots=True, kw_only=True)
class Takeover:
    """A run claimed from an owner that had not released it (it died, or was declared gone)."""

    at: str
    by: str  # the new owner: user, host and pid
    previous: str  # the old owner: pid and host
    why: str  # how it was judged gone


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
    output: Any = None  # what the run answers (`run_output`); None while there is no such output

    @property
    def steps(self) -> int:
        return len(self.path)

    @classmethod
    def from_log(cls, record: RunRecord, log: list[TransitionRecord], *, result: Result | None = None) -> RunResult:
        """The result of a stored run, read back from its log; `result` is its machine's
        declaration (`Machine.result`), which only the machine knows."""
        committed = [row for row in log if row.committed]
        path = [row.from_state for row in committed]
        outputs = {row.from_state: row.output for row in committed}
        return cls(run_id=record.run_id, machine=record.machine, status=record.status, path=path,
                   outputs=outputs, usage=total_usage(log), cost_usd=total_cost(log), error=record.error,
                   output=run_output(result, outputs, path))

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "machine": self.machine, "status": self.status.value,
            "path": self.path, "steps": self.steps, "error": self.error,
            "input_tokens": self.usage.input_tokens, "output_tokens": self.usage.output_tokens,
            "cache_read_tokens": self.usage.cache_read_tokens,
            "cache_write_tokens": self.usage.cache_write_tokens, "cost_usd": self.cost_usd,
            "outputs": {k: output_json(v) for k, v in self.outputs.items()},
            "result": output_json(self.output),
        }


def run_output(result: Result | None, outputs: Mapping[str, Any], path: Sequence[str]) -> Any:
    """What a run answers: the latest output of the `result` state, or `result(outputs)` (a
    KeyError, an output it reads that does not exist yet, gives None; anything else it raises
    is a DefinitionError); without a declared result, the output of the state committed last.
    None while there is no such output."""
    if result is None:
        return outputs.get(path[-1]) if path else None
    if isinstance(result, str):
        return outputs.get(result)
    try:
        return result(MappingProxyType({name: output_json(value) for name, value in outputs.items()}))
    except KeyError:
        return None
    except Exception as exc:
        raised = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise DefinitionError([f"the result function {getattr(result, '__name__', result)} raised {raised}; fix: "
                               "make it answer for these outputs (each state's latest, as JSON data)"]) from exc


def output_json(value: Any) -> Any:
    """How an output is stored: models and InvalidOutput as JSON, the rest as it is."""
    if isinstance(value, (InvalidOutput, ItemError)):
        return value.to_json()
    if type(value) is list:  # a map state's outputs
        return [output_json(v) for v in value]
    model_dump = getattr(value, "model_dump", None)  # a pydantic model (not imported: readers stay light)
    if model_dump is not None and not isinstance(value, type):
        return model_dump(mode="json")
    return value


def total_usage(log: list[TransitionRecord]) -> Usage:
    usage = Usage()
    for row in log:
        usage.add(row.usage)
    return usage


def total_cost(log: list[TransitionRecord]) -> float | None:
    """Sum of the rows' costs; None when a paid call had no known price."""
    total = 0.0
    for row in log:
        if row.cost_usd is None:
            return None
        total += row.cost_usd
    return total
