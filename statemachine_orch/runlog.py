"""What a run's log adds up to: its totals and the state it resumes at.

Plain functions over `TransitionRecord`s, kept apart from `snapshot` so that reading
commands (`orch log`, `orch show`) need neither the machine nor pydantic.
"""

from __future__ import annotations

from .types import TransitionRecord, Usage


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


def resume_point(log: list[TransitionRecord], initial: str) -> tuple[str, int]:
    """(state to run next, its attempt number), read off the last log row: the snapshot."""
    if not log:
        return initial, 1
    last = log[-1]
    if last.to_state is None:  # the last step failed: that state runs again
        return last.from_state, last.attempt + 1
    if last.to_state == last.from_state:
        return last.to_state, last.attempt + 1
    return last.to_state, 1
