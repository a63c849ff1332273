"""The paths of a machine's transition table (`orch paths`): every route from the initial state
to the end, each state visited at most its `max_visits` times, so that a machine's untested
routes can be listed beside the ones its recorded runs took.

A path is the sequence of states that run, with a state that runs again right after itself
(RETRY, or any decision routed to itself: bounded by `retry_limit`) written once, and how it
ends: `completed` (a decision led to the end) or `terminated` (TERMINATE did). A run's path is
read from its log the same way (`taken`), so the two compare directly. A cycle through several
states is walked as often as its bounds allow (validation makes sure every such cycle has one).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ..types import END, FlowDecision
from ._machine import Machine

MachinePath = tuple[tuple[str, ...], str]
"""(the states that run, consecutive repeats written once; "completed" or "terminated")."""


@dataclass(frozen=True, slots=True)
class Paths:
    """A machine's paths, shortest first; `complete` is False when the walk stopped at `limit`."""

    paths: tuple[MachinePath, ...]
    complete: bool


def machine_paths(machine: Machine, *, limit: int = 1000) -> Paths:
    """Every path of `machine` (see the module docstring), at most `limit` of them."""
    found: list[MachinePath] = []
    visits: dict[str, int] = {}

    def walk(state: str, route: list[str]) -> Iterator[MachinePath]:
        visits[state] = visits.get(state, 0) + 1
        route.append(state)
        for decision, target in sorted(machine.edges(state).items()):
            if target == END:
                yield tuple(route), "terminated" if decision == FlowDecision.TERMINATE.value else "completed"
            elif target != state and visits.get(target, 0) < (machine.by_name[target].max_visits or 1 << 30):
                yield from walk(target, route)
        route.pop()
        visits[state] -= 1

    complete = True
    for path in walk(machine.initial, []):
        if path not in found:
            if len(found) == limit:
                complete = False
                break
            found.append(path)
    return Paths(tuple(sorted(found, key=lambda p: (len(p[0]), p))), complete=complete)


def taken(states: Iterable[str], status: str) -> MachinePath:
    """The path a finished run took: the states of its committed steps in order (`status`:
    completed or terminated), written as `machine_paths` writes paths."""
    route: list[str] = []
    for state in states:
        if not route or route[-1] != state:
            route.append(state)
    return tuple(route), status
