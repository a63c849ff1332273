"""Where a run is, and the one rule for its counters. Light: reading commands use it too."""

from __future__ import annotations

from collections.abc import Iterable

from ..types import TransitionRecord


class Position:
    """Where a run is: the state that runs next, its attempt number, and the visits per state.

    The one owner of the counter rule: a move back to the same state is another attempt,
    a move to another state is a first attempt and a visit there; a failed step is tried again."""

    __slots__ = ("attempt", "state", "visits")

    def __init__(self, state: str, attempt: int = 1, visits: dict[str, int] | None = None) -> None:
        self.state = state
        self.attempt = attempt
        self.visits = visits if visits is not None else {state: 1}

    def moved(self, source: str, dest: str) -> None:
        if dest == source:
            self.attempt += 1
        else:
            self.attempt = 1
            self.visits[dest] = self.visits.get(dest, 0) + 1

    def failed(self) -> None:
        self.attempt += 1

    @classmethod
    def after(cls, log: Iterable[TransitionRecord], initial: str) -> Position:
        """The position a log leads to, read without the machine (for reading commands)."""
        position = cls(initial)
        for row in log:
            if row.to_state is None:
                position.failed()
            else:
                position.state = row.to_state
                position.moved(row.from_state, row.to_state)
        return position
