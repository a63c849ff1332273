"""A machine compiled into a `transitions` FSM: the position of a run lives in it.

Triggers are the decision values ("continue", "branch:escalate", ...), one transition per
(state, decision) the state can take. Conditions enforce the loop bounds: every
self-transition needs attempt < `retry_limit`, every transition into a `max_visits` state
needs visits < `max_visits`. `after_state_change` keeps those counters. Built once per
machine and shared by all its runs; each run's `Position` is the FSM's model.
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


def _after_state_change(event: Any) -> None:
    pos = event.model
    transition = event.transition
    if transition.dest == transition.source:
        pos.attempt += 1
    else:
        pos.attempt = 1
        pos.visits[transition.dest] = pos.visits.get(transition.dest, 0) + 1


@dataclass(slots=True)
class Compiled:
    """A machine as the engine runs it: its FSM, output tools and input names, built once."""

    machine: Machine
    fsm: FSM
    tools: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)


def _below_retry_limit(limit: int) -> Callable[[Any], bool]:
    """Condition on a self-transition (RETRY or routed): the state ran fewer than `limit` times."""
    return lambda event: bool(event.model.attempt < limit)


def _below_visit_limit(target: str, bound: int) -> Callable[[Any], bool]:
    """Condition on a transition into a `max_visits` state."""
    return lambda event: bool(event.model.visits.get(target, 0) < bound)


def compile_machine(machine: Machine) -> Compiled:
    transitions: list[dict[str, Any]] = []
    for state in machine.states:
        for decision, target in machine.edges(state.name).items():
            conditions: list[Callable[[Any], bool]] = []
            if target == state.name:
                conditions.append(_below_retry_limit(state.retry_limit or 1))
            elif target != END and target != state.name:
                bound = machine.by_name[target].max_visits
                if bound:
                    conditions.append(_below_visit_limit(target, bound))
            transitions.append({"trigger": decision, "source": state.name, "dest": target,
                                "conditions": conditions})
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
    compiled = Compiled(machine, fsm)
    for state in machine.states:
        if isinstance(state, LLMState) and state.output is not None:
            name = f"submit_{state.name}"[:64]
            compiled.tools[state.name] = (name, {
                "name": name,
                "description": f"Submit the {state.name} result as {state.output.__name__}.",
                "input_schema": state.output.model_json_schema(),
            })
    return compiled
