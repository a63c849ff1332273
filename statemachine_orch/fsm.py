"""A machine compiled into a `transitions` FSM: the position of a run lives in it.

Triggers are the decision values ("continue", "branch:escalate", ...), one transition per
(state, decision) the state can take. Conditions enforce the loop bounds: every
self-transition needs attempt < `retry_limit`, every transition into a `max_visits` state
needs visits < `max_visits`. `after_state_change` keeps those counters. Built once per
machine and shared by all its runs; each run's `Position` is the FSM's model.

A step applies the FSM's transition with `Compiled.move` (its conditions, `set_state`, the
counters): the same result as firing the trigger, at a fraction of `Event.trigger`'s cost
in logging and callback dispatch (see docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transitions import Machine as FSM

from .definition import LLMState, Machine
from .types import END


class Position:
    """The `transitions` model of one run: current state plus the counters its conditions read."""

    __slots__ = ("attempt", "state", "visits")

    def __init__(self, state: str, attempt: int, visits: dict[str, int]) -> None:
        self.state = state
        self.attempt = attempt
        self.visits = visits


def advance(pos: Position, source: str, dest: str) -> None:
    """The counters after a move: attempt +1 on a self-transition, else 1 and a visit to `dest`."""
    if dest == source:
        pos.attempt += 1
    else:
        pos.attempt = 1
        pos.visits[dest] = pos.visits.get(dest, 0) + 1


def _after_state_change(event: Any) -> None:
    advance(event.model, event.transition.source, event.transition.dest)


Check = Callable[[Position], bool]


@dataclass(slots=True, frozen=True)
class Move:
    """One FSM transition as the hot path applies it: its target and its conditions."""

    dest: str
    checks: tuple[Check, ...]


@dataclass(slots=True)
class Compiled:
    """A machine as the engine runs it: its FSM, output tools and input names, built once."""

    machine: Machine
    fsm: FSM
    moves: dict[tuple[str, str], Move] = field(default_factory=dict)
    tools: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)

    def move(self, pos: Position, decision: str) -> bool:
        """Apply the FSM's transition for `decision` to `pos`; False when a condition blocks it.

        The same outcome as firing the trigger (`fsm.events[decision].trigger(pos)`), without
        its per-call dispatch: the transition is looked up once, its conditions run directly,
        and `set_state` moves the model.
        """
        source = pos.state
        move = self.moves[source, decision]
        for check in move.checks:
            if not check(pos):
                return False
        self.fsm.set_state(move.dest, model=pos)
        advance(pos, source, move.dest)
        return True


def _below_retry_limit(limit: int) -> Check:
    """Condition on a self-transition (RETRY or routed): the state ran fewer than `limit` times."""
    return lambda pos: pos.attempt < limit


def _below_visit_limit(target: str, bound: int) -> Check:
    """Condition on a transition into a `max_visits` state."""
    return lambda pos: pos.visits.get(target, 0) < bound


def _on_event(check: Check) -> Callable[[Any], bool]:
    return lambda event: check(event.model)


def compile_machine(machine: Machine) -> Compiled:
    transitions: list[dict[str, Any]] = []
    moves: dict[tuple[str, str], Move] = {}
    for state in machine.states:
        for decision, target in machine.edges(state.name).items():
            found: list[Check] = []
            if target == state.name:
                found.append(_below_retry_limit(state.retry_limit or 1))
            elif target != END:
                bound = machine.by_name[target].max_visits
                if bound:
                    found.append(_below_visit_limit(target, bound))
            moves[state.name, decision] = Move(target, tuple(found))
            transitions.append({"trigger": decision, "source": state.name, "dest": target,
                                "conditions": [_on_event(check) for check in found]})
    fsm = FSM(
        model=None,
        states=[s.name for s in machine.states] + [END],
        transitions=transitions,
        initial=machine.initial,
        auto_transitions=False,
        send_event=True,
        ignore_invalid_triggers=False,
        after_state_change=[_after_state_change],
    )
    compiled = Compiled(machine, fsm, moves)
    for state in machine.states:
        if isinstance(state, LLMState) and state.output is not None:
            name = f"submit_{state.name}"[:64]
            compiled.tools[state.name] = (name, {
                "name": name,
                "description": f"Submit the {state.name} result as {state.output.__name__}.",
                "input_schema": state.output.model_json_schema(),
            })
    return compiled
