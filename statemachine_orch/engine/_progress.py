"""How far a run's unfinished step got, kept with its in-flight mark, so that a resume neither
loses nor pays again for what the step already paid.

Before each paid call the engine marks it in flight (`Store.mark_in_flight`) with the step so
far: the calls it paid for (answers re-asked as invalid) and the call being sent, priced at its
worst case. When the answer arrives, the mark gets the whole step, answer included, before any
user code (a hook, the guard) sees it. A resume reads the mark of the step after the last
committed row: an answer is judged and committed without a call; otherwise the step goes on
from its last paid answer, and the call that was in flight counts as an `in_doubt` attempt.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import CorruptRunError
from ..types import Attempt, TransitionRecord, Usage


@dataclass(slots=True, kw_only=True)
class Unfinished:
    """A step of a stopped process that got further than its last committed row."""

    step: TransitionRecord  # its paid attempts, usage and cost; its answer when `answered`
    answered: bool
    calling: Attempt | None  # the call in flight when the process stopped: it may have been paid


def sending(step: TransitionRecord, call: Attempt) -> dict[str, Any]:
    """The progress stored before `call` is sent (the request is rebuilt on resume, not stored)."""
    stored = _fields(step)
    del stored["request"]
    return {"step": stored, "answered": False, "calling": _fields(call)}


def answered(step: TransitionRecord) -> dict[str, Any]:
    """The progress stored when the step's answer arrived, before anything judges it."""
    return {"step": _fields(step), "answered": True, "calling": None}


def _fields(record: TransitionRecord | Attempt) -> dict[str, Any]:
    """The record as the mark's JSON holds it. Shallow (not `asdict`, which deep-copies the
    request and response on every paid call): the mark is encoded at once, nothing keeps it."""
    stored = {f.name: getattr(record, f.name) for f in fields(record)}
    stored["usage"] = asdict(record.usage)
    if isinstance(record, TransitionRecord):
        stored["attempts"] = [_fields(a) for a in record.attempts]
    return stored


def unfinished(mark: dict[str, Any] | None, *, run_id: str, seq: int, state: str) -> Unfinished | None:
    """What the in-flight `mark` says about step `seq` of `state` (None: nothing). A mark of
    an older version tells only that a call was in flight: a step with nothing paid yet."""
    if not mark or mark.get("seq") != seq or mark.get("state") != state:
        return None
    try:
        if "step" not in mark:
            return Unfinished(step=TransitionRecord(run_id=run_id, seq=seq, from_state=state, attempt=1,
                                                    started_at=mark["at"], source="llm"),
                              answered=False, calling=None)
        calling = mark["calling"]
        return Unfinished(step=_step(mark["step"]), answered=bool(mark["answered"]),
                          calling=None if calling is None else _attempt(calling))
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptRunError(f"run {run_id}: its in-flight mark is not one statemachine_orch writes "
                              f"({type(exc).__name__}: {exc}); it cannot be resumed",
                              fix="restore the database from a backup") from None


def _step(stored: dict[str, Any]) -> TransitionRecord:
    return TransitionRecord(**{**stored, "usage": Usage(**stored["usage"]),
                               "attempts": [_attempt(a) for a in stored["attempts"]]})


def _attempt(stored: dict[str, Any]) -> Attempt:
    return Attempt(**{**stored, "usage": Usage(**stored["usage"])})
