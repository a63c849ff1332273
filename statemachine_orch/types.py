"""Shared vocabulary: decisions, statuses, records and the seams adapters plug into.

Nothing here does I/O. Records are slotted dataclasses because the engine builds one per
transition on its hot path; they are plain data, JSON-friendly, never pickled. The three
built on every step (`TransitionRecord`, `LLMRequest`, `Completion`) also take positional
arguments: keyword parsing costs as much as the rest of their construction.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from time import time_ns
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeAlias

if TYPE_CHECKING:
    from .retry import RetryPolicy

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
    COMPLETED = "completed"
    TERMINATED = "terminated"
    FAILED = "failed"
    BUDGET_EXCEEDED = "budget_exceeded"
    INTERRUPTED = "interrupted"

    @property
    def finished(self) -> bool:
        return self in (RunStatus.COMPLETED, RunStatus.TERMINATED)


class StepContext(NamedTuple):
    """What a guard or Python step may read: the run input and the outputs it declared in `needs`.

    Read-only; a named tuple because the engine builds one per step (a quarter of the cost of
    a frozen dataclass)."""

    run_id: str
    state: str
    attempt: int
    input: Any
    outputs: Mapping[str, Any]


Guard: TypeAlias = Callable[[Any, StepContext], "Decision | Verdict"]
"""`(output, context) -> FlowDecision | Branch | Verdict`."""

StepFunction: TypeAlias = Callable[[StepContext], Any | Awaitable[Any]]
"""A plain Python state: `(context) -> output`, sync or async; the output must be JSON-able."""


# --------------------------------------------------------------------------- model calls


@dataclass(slots=True, kw_only=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0

    def add(self, other: Usage) -> None:
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cache_read_tokens += other.cache_read_tokens
        self.cache_write_tokens += other.cache_write_tokens


@dataclass(slots=True, kw_only=True)
class Attempt:
    """One model call that did not give the step its answer: the seed's failure_log row.

    `kind` is "transient" (retried), "deterministic" (not retried), "timeout",
    "connection", "invalid_output", "refusal", "truncated" or "spend_limit". A call that got
    a response (an invalid answer) keeps it, so replay can serve it again.
    """

    number: int
    started_at: str
    kind: str
    error: str
    status_code: int | None = None
    request_id: str | None = None
    delay_s: float | None = None  # slept before the next attempt
    usage: Usage = field(default_factory=Usage)
    cost_usd: float | None = None
    request: dict[str, Any] | None = None
    response: dict[str, Any] | None = None


@dataclass(slots=True)
class LLMRequest:
    """One Messages API request as the engine sees it. `body` is what gets sent and stored;
    clients must not modify it (the body of a prompt without placeholders is shared by every
    call of its state)."""

    run_id: str
    state: str
    body: dict[str, Any]
    tool_name: str | None = None
    timeout_s: float | None = None
    retry: RetryPolicy | None = None  # None: the model client's own policy
    attempts: list[Attempt] = field(default_factory=list)  # the client appends each failed try


@dataclass(slots=True)
class Completion:
    """A model answer: `text` or, for structured output, the tool input in `data`."""

    text: str
    data: dict[str, Any] | None
    stop_reason: str | None
    usage: Usage
    request_id: str | None
    response: dict[str, Any]


@dataclass(frozen=True, slots=True)
class InvalidOutput:
    """What a guard sees (with `on_invalid="guard"`) when no valid answer came back.

    `kind` is "invalid_output" (schema or format still wrong after re-asks), "refusal",
    "truncated" (stop_reason max_tokens) or "empty" (no text at all). It is never a valid
    answer: route on it.
    """

    kind: str
    error: str
    text: str = ""
    data: Any = None

    def to_json(self) -> dict[str, Any]:
        return {INVALID_MARKER: {"kind": self.kind, "error": self.error, "text": self.text,
                                 "data": self.data}}


INVALID_MARKER = "__orch_invalid_output__"


@dataclass(frozen=True, slots=True, kw_only=True)
class Budget:
    """Limits of one run: money, paid tokens and active wall-clock time (None: no limit).

    Money and tokens are checked before every model call against what was spent plus the
    call's worst case (estimated input plus its max_tokens).
    """

    max_cost_usd: float | None = None
    max_tokens: int | None = None
    max_seconds: float | None = None

    def to_json(self) -> dict[str, float | int]:
        return {k: v for k, v in (("max_cost_usd", self.max_cost_usd), ("max_tokens", self.max_tokens),
                                  ("max_seconds", self.max_seconds)) if v is not None}

    @classmethod
    def of_run(cls, options: Mapping[str, Any]) -> Budget:
        """The budget stored in a run's options (none: no limits)."""
        return cls(**options.get("budget", {}))

    def merged(self, other: Budget | None) -> Budget:
        """This budget with `other`'s limits taking precedence where set."""
        if other is None:
            return self
        return Budget(
            max_cost_usd=other.max_cost_usd if other.max_cost_usd is not None else self.max_cost_usd,
            max_tokens=other.max_tokens if other.max_tokens is not None else self.max_tokens,
            max_seconds=other.max_seconds if other.max_seconds is not None else self.max_seconds,
        )


class ModelClient(Protocol):
    """The seam between the engine and a model provider (Anthropic, recorded answers...).

    A client whose calls cost money sets `bills = True`: the engine then writes an in-flight
    mark before each step's first call, so a crash mid-call is known at resume.
    """

    async def complete(self, request: LLMRequest) -> Completion: ...


# --------------------------------------------------------------------------- records


@dataclass(slots=True)
class TransitionRecord:
    """One row of the transition log: a state ran and the machine moved (or the step failed).

    `to_state` and `decision` are None when the step failed; `output` is kept whenever the
    step produced one, so a paid answer survives a failing guard.
    """

    run_id: str
    seq: int
    from_state: str
    to_state: str | None
    decision: str | None
    reason: str | None
    attempt: int
    started_at: str
    latency_ms: float
    source: str  # "llm" | "python" | "recorded" | "cache" | "fallback" | "budget"
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
    in_flight: dict[str, Any] | None = None  # {"seq", "state", "at"} of the last paid call sent
