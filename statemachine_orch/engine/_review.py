"""Review gates in a run: waiting for a person's decision, and committing it.

A run that reaches a `ReviewState` with no decision to commit stores its pending review and
the status `waiting` in one transaction (`Store.release(..., review=)`) and stops: nothing is
paid while it waits and nothing before it runs again. A decision (`Engine.review`, `orch
review`) or, once the deadline has passed, the state's `on_timeout` (as `system:timeout`) is
committed as the state's step, its guard mapping it to a FlowDecision. The pending review is
that row's request, so the audit chain holds what the reviewer was shown beside what they
decided.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ..definition._overrides import stored_overrides, with_overrides
from ..definition._states import ESCALATE, Review, ReviewState
from ..errors import ReviewDecidedError, StepError, UsageError
from ..types import RunRecord, RunResult, RunStatus, StepContext, TransitionRecord, now_iso
from ._outputs import first_error, json_data

if TYPE_CHECKING:
    from ..definition._machine import Machine
    from ._engine import Engine
    from ._run import Run

TIMEOUT_ACTOR = "system:timeout"


class Waiting(Exception):
    """Raised by a review state's step that has no decision to commit: the run waits."""

    def __init__(self, review: dict[str, Any]) -> None:
        self.review = review


def reviewer(given: str | None) -> str:
    """Who decides: `given` (`--as`), else $ORCH_ACTOR, else the OS user; never a `system:`
    name, which says that the engine decided (`system:timeout`)."""
    name = given.strip() if given and given.strip() else os.environ.get("ORCH_ACTOR", "").strip()
    if name.lower().startswith("system:"):
        raise UsageError(f"reviewer {name!r} is a name the engine keeps for itself (a decision it takes, as "
                         f"{TIMEOUT_ACTOR})", fix="name the person who decides (--as USER or $ORCH_ACTOR)")
    if name:
        return name
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name known to the OS (a container without one)
        return f"uid:{os.getuid()}"


def iso_after(seconds: float) -> str:
    """The UTC time `seconds` from now, written as `now_iso` writes times (so they compare as text);
    the last moment of the year 9999 when it would fall after that (in effect: never)."""
    try:
        when = datetime.now(UTC) + timedelta(seconds=seconds)
    except OverflowError:
        when = datetime.max.replace(tzinfo=UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True, kw_only=True)
class PendingReview:
    """A run waiting for a review, as `orch pending` lists it."""

    run_id: str
    machine: str
    state: str
    seq: int
    asked_at: str
    deadline: str | None
    on_timeout: str | None
    decisions: tuple[str, ...]
    payload: Any
    data_schema: dict[str, Any] | None

    @classmethod
    def of(cls, record: RunRecord) -> PendingReview | None:
        review = record.review
        if record.status is not RunStatus.WAITING or not review:
            return None
        return cls(run_id=record.run_id, machine=record.machine, state=review["state"], seq=review["seq"],
                   asked_at=review["asked_at"], deadline=review.get("deadline"),
                   on_timeout=review.get("on_timeout"), decisions=tuple(review["decisions"]),
                   payload=review.get("payload"), data_schema=review.get("data_schema"))

    @property
    def expired(self) -> bool:
        return self.deadline is not None and self.deadline <= now_iso()

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "machine": self.machine, "state": self.state, "seq": self.seq,
                "asked_at": self.asked_at, "deadline": self.deadline, "expired": self.expired,
                "on_timeout": self.on_timeout, "decisions": list(self.decisions), "payload": self.payload,
                "data_schema": self.data_schema}


@dataclass(slots=True, kw_only=True)
class Decided:
    """What `Engine.review` committed: the review row, and the run's result when it went on."""

    run_id: str
    review: Review
    row: TransitionRecord
    status: RunStatus  # the run's status afterwards
    result: RunResult | None = None  # with `resume`: where the run ended up

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "state": self.row.from_state, "seq": self.row.seq,
                **self.review.model_dump(mode="json"), "flow_decision": self.row.decision,
                "next_state": self.row.to_state, "status": self.status.value,
                "result": self.result.to_json() if self.result is not None else None}


class Desk:
    """A run's review steps: the decision it is to commit next (`Run.decide`), else a wait."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.decision: Review | None = None

    async def output(self, state: ReviewState, step: TransitionRecord, ctx: StepContext) -> Review:
        """The decision to commit as this step (the pending review becomes its request), or
        `Waiting` with the review to store."""
        pending = self.pending(state.name, step.seq)
        review = self.decision or _timed_out(state, pending)
        if review is None:
            raise Waiting(pending or await self._ask(state, step, ctx))
        self.decision = None
        step.request = pending
        return review

    def pending(self, state: str, seq: int) -> dict[str, Any] | None:
        """The review stored for step `seq` of `state`, if this run is waiting (or was) for it."""
        review = self.run.record.review
        return review if review and review.get("seq") == seq and review.get("state") == state else None

    async def _ask(self, state: ReviewState, step: TransitionRecord, ctx: StepContext) -> dict[str, Any]:
        """A new pending review: what the reviewer is shown, may decide and must give, and when it times out."""
        if state.show is not None:
            payload = await self.run.call_user(state, "show", state.show, ctx)
        else:
            payload = {name: ctx.outputs.get(name) for name in state.needs}
        try:
            payload = json_data(payload)
        except (TypeError, ValueError) as exc:
            raise StepError(f"show() returned a value that cannot be stored: {exc}", run_id=self.run.run_id,
                            state=state.name) from None
        deadline = state.deadline_s
        return {"seq": step.seq, "state": state.name, "asked_at": now_iso(), "payload": payload,
                "decisions": list(state.decisions),
                "data_schema": state.data.model_json_schema() if state.data is not None else None,
                "deadline": iso_after(deadline) if deadline is not None else None, "on_timeout": state.on_timeout}


def _timed_out(state: ReviewState, pending: dict[str, Any] | None) -> Review | None:
    """The `on_timeout` decision once the pending review's deadline has passed, else None."""
    deadline = (pending or {}).get("deadline")
    if deadline is None or deadline > now_iso() or state.on_timeout is None:
        return None
    decision = ESCALATE if state.escalates_to is not None else state.on_timeout
    return Review(decision=decision, by=TIMEOUT_ACTOR, at=now_iso(), note=f"no decision by the deadline {deadline}")


def checked_review(state: ReviewState, pending: PendingReview, *, decision: str, data: Any, note: str | None,
                   by: str | None) -> Review:
    """The reviewer's decision, validated before anything is written: allowed, and its data (when
    given) fits the state's data model."""
    if decision not in state.decisions:
        raise UsageError(f"'{decision}' is not a decision review state '{state.name}' of run {pending.run_id} "
                         f"allows", fix=f"use one of: {', '.join(state.decisions)}")
    data = _json_data(data)
    if state.data is not None and data is not None:
        try:
            data = _json_data(state.data.model_validate(data))
        except ValidationError as exc:
            raise UsageError(f"the review data does not fit {state.data.__name__}: {first_error(exc)}",
                             fix=f"give --data as JSON matching {state.data.__name__}") from None
    return Review(decision=decision, by=reviewer(by), at=now_iso(), data=data, note=note)


def _json_data(data: Any) -> Any:
    """`data` as it is stored (`json_data`), refused before anything is written when it is not JSON data."""
    try:
        return json_data(data, by_alias=False)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"the review data is not JSON data: {exc}",
                         fix="give a JSON object, list, string, finite number, true, false or null") from None


def already_decided(record: RunRecord, log: list[TransitionRecord]) -> ReviewDecidedError | None:
    """Why a run that is no longer waiting cannot take a decision: its review was decided."""
    review = record.review or {}
    row = next((r for r in log if r.seq == review.get("seq") and r.from_state == review.get("state")
                and r.committed and r.source == "review"), None)
    if row is None or not isinstance(row.output, dict):
        return None
    return ReviewDecidedError(f"run {record.run_id}'s review at '{row.from_state}' was already decided by "
                              f"{row.output.get('by')} at {row.output.get('at')} ({row.output.get('decision')})",
                              run_id=record.run_id)


async def decide(engine: Engine, run_id: str, machine: Machine, *, decision: str, data: Any = None,
                 note: str | None = None, by: str | None = None, resume: bool = False, allow_changed: bool = False,
                 take_over: bool = False) -> Decided:
    """Commit a reviewer's decision for a waiting run (see `Engine.areview`)."""
    record, log = await engine.store.load_run(run_id, verified=True)
    pending = PendingReview.of(record)
    if pending is None:
        raise already_decided(record, log) or UsageError(
            f"run {run_id} is not waiting for a review (it is {record.status.value})",
            fix="`orch pending` lists the runs that are")
    state = with_overrides(machine, stored_overrides(record.options)).by_name.get(pending.state)
    if not isinstance(state, ReviewState):
        raise UsageError(f"machine '{machine.name}' has no review state '{pending.state}', which run {run_id} "
                         "waits at", fix="review it with the machine that started it")
    review = checked_review(state, pending, decision=decision, data=data, note=note, by=by)
    run = await engine.attach(run_id, machine, to_run=resume, allow_changed=allow_changed, take_over=take_over)
    if run.state != pending.state or run.seq + 1 != pending.seq:  # another reviewer's decision came first
        await run.hand_back()
        _, log = await engine.store.load_run(run_id)
        raise already_decided(run.record, log) or UsageError(f"run {run_id} moved on while this review was given")
    expired = pending.expired
    if not expired:
        run.decide(review)
    row = await run.step()
    if run.status is RunStatus.RUNNING and not (resume and not expired):
        await run.hand_back()
    if expired:
        raise ReviewDecidedError(f"run {run_id}'s review at '{pending.state}' expired at {pending.deadline}, so "
                                 f"its on_timeout ({state.on_timeout}) was applied as {TIMEOUT_ACTOR}",
                                 run_id=run_id)
    result = await run.run_to_end() if resume and run.status is RunStatus.RUNNING else None
    return Decided(run_id=run_id, review=review, row=row, status=run.status, result=result)
