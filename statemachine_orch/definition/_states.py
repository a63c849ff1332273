"""The states a machine is made of, and the `guard` decorator that declares what a guard returns.

`LLMState` wraps one Messages API call, `PythonState` one Python function, `MachineState` a
child run of another machine, `MapState` one child run per item of a list, `ParallelState` one
child run per branch, `ReviewState` a person's decision (the run waits for it); all share the
guard, the `on=` overrides of the transition table, the loop bounds (and `on_exhausted`, the
decision taken when one stops a loop), what the state reads of earlier states (`needs`,
`needs_if_ran`) and the `timeout` of `State`.
`timeout` has one meaning everywhere: the most seconds any one call made for the state may
take, be it a Messages API request, a Python state's function, a fallback function or the
state's guard.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from pydantic import BaseModel

from ..types import Branch, Decision, FlowDecision, Guard, RetryPolicy, StepContext, StepFunction, Verdict

if TYPE_CHECKING:
    from ._machine import Machine

G = TypeVar("G", bound=Callable[..., Any])


@dataclass(frozen=True)
class DeclaredGuard(Generic[G]):
    """A guard with the closed set of decisions it may return (made by `@guard(...)`)."""

    fn: G
    decisions: frozenset[Decision]

    def __call__(self, output: Any, context: Any) -> Any:
        return self.fn(output, context)

    @property
    def __name__(self) -> str:  # used in default reasons and error messages
        return getattr(self.fn, "__name__", repr(self.fn))


def guard(*decisions: Decision) -> Callable[[G], DeclaredGuard[G]]:
    """Declare the decisions a guard may return; validation checks each has a transition."""

    def wrap(fn: G) -> DeclaredGuard[G]:
        return DeclaredGuard(fn, frozenset(decisions))

    return wrap


@dataclass(frozen=True)
class State:
    """Fields shared by every kind of state."""

    name: str
    _: KW_ONLY
    needs: Sequence[str] = ()
    needs_if_ran: Sequence[str] = ()  # read when they ran before (a loop's feedback): absent otherwise
    guard: Guard | None = None
    on: Mapping[Decision, str] = field(default_factory=dict)
    retry_limit: int | None = 3  # the most runs in a row (RETRY or any decision routed to itself)
    max_visits: int | None = None
    on_exhausted: Decision | None = None  # taken when a loop bound blocks the guard's decision
    output: type[BaseModel] | None = None
    timeout: float | None = None  # seconds any one call for the state may take: a request, its function, its guard

    def __post_init__(self) -> None:
        object.__setattr__(self, "needs", tuple(self.needs))
        object.__setattr__(self, "needs_if_ran", tuple(self.needs_if_ran))
        object.__setattr__(self, "on", dict(self.on))


@dataclass(frozen=True)
class LLMState(State):
    """A state that makes one Messages API call with a rendered prompt.

    `params` are further Messages API parameters sent as they are (for example
    `{"stop_sequences": ["END"], "thinking": {...}, "metadata": {...}}`).

    Failure handling: transient API errors are retried by `retry_policy` (else the
    machine's, else the model client's); an answer that fails `output` is re-asked
    `repairs` times with the validation error; a still-invalid, refused or truncated answer
    fails the step, or with `on_invalid="guard"` reaches the guard as `InvalidOutput`.
    `fallback` (a model name or a function of the context) answers when retries run out.
    Text answers: `parse` (a function of the text, e.g. `xml_tags(...)`) makes the output;
    what it raises makes the answer invalid, re-asked as above.
    Prompt values: `vars` maps a placeholder to a function of the step's `StepContext`, so
    templates stay plain `{name}` (a var is computed again on resume and replay: keep it a
    function of the context alone).
    Cost: `cache=True` serves an identical earlier request from the database for free;
    `prompt_cache=True` marks the system prompt for Anthropic prompt caching; `on_budget`
    is the decision taken, without calling, when the run's budget cannot cover the call.
    """

    _: KW_ONLY
    prompt: str
    system: str | None = None
    model: str | None = None
    max_tokens: int = 1024
    params: Mapping[str, Any] = field(default_factory=dict)
    retry_policy: RetryPolicy | None = None
    repairs: int = 1
    on_invalid: Literal["fail", "guard"] = "fail"
    fallback: str | Callable[[StepContext], Any] | None = None
    parse: Callable[[str], Any] | None = None
    vars: Mapping[str, Callable[[StepContext], Any]] = field(default_factory=dict)
    cache: bool = False
    prompt_cache: bool = False
    on_budget: Decision | None = None


@dataclass(frozen=True)
class PythonState(State):
    """A state that runs a Python function (a computation or a tool call)."""

    _: KW_ONLY
    run: StepFunction


@dataclass(frozen=True)
class MachineState(State):
    """A state that runs another machine to its end as a child run and takes its result as
    output. `input(ctx)` builds the child's input from this run's context (default: none).

    The child is a run of its own, durable step by step: a resume of this run continues it
    where it stopped, and replay checks its steps. Its tokens and cost count in this run."""

    _: KW_ONLY
    machine: Machine
    input: Callable[[StepContext], Any] | None = None


@dataclass(frozen=True)
class MapState(State):
    """A state that runs `each` once per item of `items(ctx)`, each item a child run, up to
    `concurrency` at a time; its output is the items' outputs in item order (`reduce`d, if
    given). `each` is an `LLMState` or `PythonState` (which reads the item as `{item}`, or the
    fields of `item_model` when given, and `ctx.input`) or a `Machine` (the item is its input).

    A finished item is never run again: a crash after 7 of 10 items re-runs the other 3.
    `on_item_error="fail"` fails the step when an item fails (a resume retries the failed
    items only); `"guard"` hands the guard the list with an `ItemError` in each failed slot."""

    _: KW_ONLY
    items: Callable[[StepContext], Iterable[Any]]
    each: LLMState | PythonState | Machine
    item_model: type[BaseModel] | None = None
    concurrency: int = 4
    on_item_error: Literal["fail", "guard"] = "fail"
    reduce: Callable[[list[Any]], Any] | None = None


@dataclass(frozen=True)
class ParallelState(State):
    """A state that runs its `branches` (LLM or Python states that do not depend on each
    other) at once, each a child run, and joins them: its output is `{branch name: output}`,
    and each branch's output can also be read by its own name (in `needs` and templates of
    later states). A branch reads the run's input and the outputs it `needs`, which the
    parallel state must need too.

    Each branch is durable on its own: a crash re-runs only the unfinished ones."""

    _: KW_ONLY
    branches: Sequence[LLMState | PythonState]


class Review(BaseModel):
    """A review state's output: what the reviewer decided (`by` is who: `--as`, $ORCH_ACTOR or
    the OS user; `system:timeout` when the deadline passed), with their data and note."""

    decision: str
    by: str
    at: str
    data: Any = None
    note: str | None = None


ESCALATE = "escalate"  # the decision `on_timeout="escalate:<state>"` takes (routed to that state)


def review_decision(name: str) -> Decision:
    """What the default guard makes of a reviewer's decision: approve continues, reject
    terminates, any other is the branch of its name (escalate: the timeout's escalation)."""
    return {"approve": FlowDecision.CONTINUE, "reject": FlowDecision.TERMINATE}.get(name, Branch(name))


def review_guard(review: Review, ctx: StepContext) -> Verdict:
    """The default guard of a review state (`review_decision`), with who decided as its reason."""
    note = f": {review.note}" if review.note else ""
    return review_decision(review.decision).because(f"{review.decision} by {review.by}{note}")


@dataclass(frozen=True)
class ReviewState(State):
    """A pause for a person's decision at a state boundary: no model call. Reached, the run
    stores the pending review (`show(ctx)`, by default the outputs it `needs`; the allowed
    `decisions`; the `data` model the reviewer's data must fit; the deadline) and waits;
    `orch review` / `Engine.review` commits the decision as this state's step, and its guard
    (by default `review_guard`) maps it to a FlowDecision. Nothing before it runs again.

    `deadline` (seconds or a timedelta) with `on_timeout`: "reject" (the default), "approve",
    another of `decisions`, or "escalate:<state>" (a branch to that state), applied as
    `system:timeout` when the run is next touched (resume, batch, worker) after the deadline."""

    _: KW_ONLY
    show: Callable[[StepContext], Any] | None = None
    decisions: Sequence[str] = ("approve", "reject")
    data: type[BaseModel] | None = None
    deadline: float | timedelta | None = None
    on_timeout: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "decisions", tuple(self.decisions))
        if self.deadline is not None and self.on_timeout is None:
            object.__setattr__(self, "on_timeout", "reject")
        if self.output is None:
            object.__setattr__(self, "output", Review)
        escalation = self.escalates_to
        if escalation is not None and Branch(ESCALATE) not in self.on:
            object.__setattr__(self, "on", {**self.on, Branch(ESCALATE): escalation})
        if self.guard is None:
            taken = [*self.decisions, *([ESCALATE] if escalation is not None else [])]
            object.__setattr__(self, "guard", DeclaredGuard(review_guard, frozenset(
                review_decision(d) for d in taken if isinstance(d, str))))

    @property
    def escalates_to(self) -> str | None:
        """The state `on_timeout="escalate:<state>"` leads to (None: it does not escalate)."""
        timeout = self.on_timeout
        return timeout.removeprefix("escalate:") if isinstance(timeout, str) and timeout.startswith(
            "escalate:") else None

    @property
    def deadline_s(self) -> float | None:
        deadline = self.deadline
        return deadline.total_seconds() if isinstance(deadline, timedelta) else deadline
