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
from transitions import State as FSMState

from .definition import LLMState, Machine, State
from .states import DeclaredGuard
from .types import END, Decision, Guard, decision_from_value


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
    """One FSM transition as the hot path applies it: its target (name and `transitions`
    state object) and its conditions."""

    dest: str
    target: FSMState
    checks: tuple[Check, ...]


@dataclass(slots=True, frozen=True)
class Plan:
    """What a step of one state needs, resolved when the machine is compiled."""

    state: State
    source: str  # the log's `source` for a normal answer: "llm" | "python"
    guard: Guard | None  # the function itself (unwrapped from @guard)
    guard_name: str  # as default reasons and errors name it
    allowed: dict[Decision, str]  # what the guard may return -> its value
    moves: dict[str, Move]  # decision value -> the transition it fires


@dataclass(slots=True)
class Compiled:
    """A machine as the engine runs it: its FSM, a plan per state, output tools, built once;
    the request body of each LLM state whose prompts have no placeholders, built at its first call."""

    machine: Machine
    fsm: FSM
    plans: dict[str, Plan] = field(default_factory=dict)
    tools: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    bodies: dict[str, dict[str, Any]] = field(default_factory=dict)  # request bodies of static prompts

    def move(self, pos: Position, move: Move) -> bool:
        """Apply one of the FSM's transitions (`plans[pos.state].moves[decision]`) to `pos`;
        False when a condition blocks it.

        The same outcome as firing the trigger (`fsm.events[decision].trigger(pos)`), without
        its per-call dispatch: the transition was looked up when the machine was compiled,
        its conditions run directly, and `set_state` moves the model.
        """
        for check in move.checks:
            if not check(pos):
                return False
        source = pos.state
        self.fsm.set_state(move.target, model=pos)
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
    checks: dict[tuple[str, str], tuple[Check, ...]] = {}
    for state in machine.states:
        for decision, target in machine.edges(state.name).items():
            found: list[Check] = []
            if target == state.name:
                found.append(_below_retry_limit(state.retry_limit or 1))
            elif target != END:
                bound = machine.by_name[target].max_visits
                if bound:
                    found.append(_below_visit_limit(target, bound))
            checks[state.name, decision] = tuple(found)
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
    compiled = Compiled(machine, fsm)
    for state in machine.states:
        guard = state.guard
        compiled.plans[state.name] = Plan(
            state=state, source="llm" if isinstance(state, LLMState) else "python",
            guard=guard.fn if isinstance(guard, DeclaredGuard) else guard,
            guard_name=getattr(guard, "__name__", type(guard).__name__),
            allowed={decision_from_value(value): value for value in machine.decisions[state.name]},
            moves={decision: Move(target, fsm.get_state(target), checks[state.name, decision])
                   for decision, target in machine.edges(state.name).items()})
        if isinstance(state, LLMState) and state.output is not None:
            name = f"submit_{state.name}"[:64]
            compiled.tools[state.name] = (name, {
                "name": name,
                "description": f"Submit the {state.name} result as {state.output.__name__}.",
                "input_schema": state.output.model_json_schema(),
            })
    return compiled
