"""A machine compiled into a `transitions` FSM: its triggers fire every move of every run.

Triggers are the decision values ("continue", "branch:escalate", ...), one transition per
(state, decision) the state can take. Conditions enforce the loop bounds: a self-transition
needs attempt < `retry_limit`, a transition into a `max_visits` state needs visits <
`max_visits`. The `after_state_change` callback keeps the counters (`Position.moved`). The FSM
is built once per machine and shared by its runs; each run's `Position` is the model a
trigger moves. Resuming fires the same triggers over the log (`replay=True`: what was
committed stands, whatever the bounds say now).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from transitions import EventData
from transitions import Machine as FSM

from ..definition._machine import Machine
from ..definition._states import DeclaredGuard, LLMState, MachineState, MapState, ParallelState, ReviewState, State
from ..types import END, Decision, Guard, Source, decision_from_value
from ._position import Position


@dataclass(slots=True, frozen=True)
class Plan:
    """What a step of one state needs, resolved when the machine is compiled."""

    state: State
    source: Source  # the log's `source` for a normal answer: "llm" | "python"
    guard: Guard | None  # the function itself (unwrapped from @guard)
    guard_name: str  # as default reasons and errors name it
    allowed: dict[Decision, str]  # what the guard may return -> its value


@dataclass(slots=True)
class Compiled:
    """A machine as the engine runs it: its FSM, a plan per state and output tools, built once;
    the request body of each LLM state whose prompts have no placeholders, built at its first call."""

    machine: Machine
    fsm: FSM
    plans: dict[str, Plan] = field(default_factory=dict)
    tools: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    bodies: dict[str, dict[str, Any]] = field(default_factory=dict)
    children: dict[str, tuple[Compiled, ...]] = field(default_factory=dict)  # as `Machine.children`
    started: dict[int, Compiled] = field(default_factory=dict)  # machines Python states run as children

    def child_of(self, state: str, item: int) -> Compiled:
        """The machine of child `item` of `state`: a parallel state's branch, else the one machine."""
        machines = self.children[state]
        return machines[item] if len(machines) > 1 else machines[0]

    def child(self, machine: Machine) -> Compiled:
        """`machine` compiled, for the child runs a Python state starts (`ctx.run_child`)."""
        found = self.started.get(id(machine))
        if found is None or found.machine is not machine:
            found = self.started[id(machine)] = compile_machine(machine)
        return found

    def fire(self, position: Position, decision: str, *, replay: bool = False) -> bool:
        """Fire the trigger named after `decision` on `position`; False when a loop bound
        blocks the move (never when `replay`-ing a committed one)."""
        return bool(self.fsm.events[decision].trigger(position, replay=replay))


def _moved(event: EventData) -> None:
    transition = event.transition
    assert transition is not None and transition.dest is not None  # every transition here has a target
    cast(Position, event.model).moved(transition.source, transition.dest)


def _below_retry_limit(limit: int) -> Callable[[EventData], bool]:
    return lambda event: event.kwargs["replay"] or cast(Position, event.model).attempt < limit


def _below_visit_limit(target: str, bound: int) -> Callable[[EventData], bool]:
    return lambda event: event.kwargs["replay"] or cast(Position, event.model).visits.get(target, 0) < bound


def compile_machine(machine: Machine) -> Compiled:
    transitions: list[dict[str, Any]] = []
    for state in machine.states:
        for decision, target in machine.edges(state.name).items():
            conditions = []
            if target == state.name:
                conditions.append(_below_retry_limit(state.retry_limit or 1))
            elif target != END and machine.by_name[target].max_visits:
                conditions.append(_below_visit_limit(target, machine.by_name[target].max_visits or 0))
            transitions.append({"trigger": decision, "source": state.name, "dest": target,
                                "conditions": conditions})
    fsm = FSM(model=None, states=[s.name for s in machine.states] + [END], transitions=transitions,
              initial=machine.initial, auto_transitions=False, send_event=True,
              ignore_invalid_triggers=False, after_state_change=[_moved])
    compiled = Compiled(machine, fsm, children={name: tuple(compile_machine(child) for child in children)
                                                for name, children in machine.children.items()})
    for state in machine.states:
        guard = state.guard
        compiled.plans[state.name] = Plan(
            state=state, source="llm" if isinstance(state, LLMState) else
            "child" if isinstance(state, (MachineState, MapState, ParallelState)) else
            "review" if isinstance(state, ReviewState) else "python",
            guard=guard.fn if isinstance(guard, DeclaredGuard) else guard,
            guard_name=getattr(guard, "__name__", type(guard).__name__),
            allowed={decision_from_value(value): value for value in machine.decisions[state.name]})
        if isinstance(state, LLMState) and state.output is not None:
            name = f"submit_{state.name}"[:64]
            compiled.tools[state.name] = (name, {
                "name": name,
                "description": f"Submit the {state.name} result as {state.output.__name__}.",
                "input_schema": state.output.model_json_schema(),
            })
    return compiled
