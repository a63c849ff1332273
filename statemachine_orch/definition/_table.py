"""Building a machine's transition table: a pure function of its states.

Each state starts from the seed's defaults (CONTINUE to the next state, SKIP over it, RETRY to
itself, TERMINATE to the end), `on=` overrides and extends them, and its guard's `@guard(...)`
declaration closes the set of decisions it may take. Prompt templates are parsed here too:
what an LLM state renders is part of what it is. Whatever stops the table from being built
is returned as a problem; `_validation` reports everything else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..types import END, Branch, FlowDecision
from ._problems import Problems
from ._states import DeclaredGuard, LLMState, State
from ._templates import Template

if TYPE_CHECKING:
    from ._machine import Machine


@dataclass(frozen=True, slots=True, kw_only=True)
class TransitionTable:
    """A machine's transitions: for each state, every decision's target, the decisions it may
    take, and its parsed templates. `complete` is False when a problem left a hole in it."""

    targets: Mapping[str, Mapping[str, str]]  # state -> decision value -> target (defaults included)
    decisions: Mapping[str, frozenset[str]]  # state -> the decisions it may take
    templates: Mapping[str, tuple[Template, Template | None]]  # LLM state -> (prompt, system)
    complete: bool

    def edges(self, state: str) -> dict[str, str]:
        """decision value -> target, for the decisions this state can actually take."""
        targets = self.targets[state]
        return {d: targets[d] for d in self.decisions[state] if d in targets}


def decision_value(key: object) -> str | None:
    """The value of a decision (`FlowDecision` or `Branch`), None for anything else."""
    if isinstance(key, (FlowDecision, Branch)):
        return key.value
    return None


def build_table(machine: Machine) -> tuple[TransitionTable, Problems]:
    """The transition table of `machine`'s states, and what kept it from being whole."""
    problems = Problems(machine)
    targets: dict[str, dict[str, str]] = {}
    decisions: dict[str, frozenset[str]] = {}
    templates: dict[str, tuple[Template, Template | None]] = {}
    states = [s for s in machine.states if isinstance(s, State) and isinstance(s.name, str)]
    names = [s.name for s in states]
    for index, state in enumerate(states):
        targets[state.name] = _targets(state, names[index + 1:], machine, problems)
        decisions[state.name] = _decisions(state, targets[state.name], problems)
        if isinstance(state, LLMState):
            parsed = _templates(state, problems)
            if parsed is not None:
                templates[state.name] = parsed
    table = TransitionTable(targets=targets, decisions=decisions, templates=templates, complete=not problems)
    return table, problems


def _targets(state: State, following: list[str], machine: Machine, problems: Problems) -> dict[str, str]:
    targets = {
        FlowDecision.CONTINUE.value: following[0] if following else END,
        FlowDecision.SKIP.value: following[1] if len(following) > 1 else END,
        FlowDecision.RETRY.value: state.name,
        FlowDecision.TERMINATE.value: END,
    }
    for key, target in state.on.items():
        value = decision_value(key)
        if value is None:
            problems.add(state.name, f"on= key {key!r} is not a decision", "use FlowDecision.X or Branch('name')")
        elif target != END and target not in machine.by_name:
            problems.add(state.name, f"transition {value} -> unknown target {target!r}",
                         f"use one of {[s.name for s in machine.states]} or END")
        else:
            targets[value] = target
    return targets


def _decisions(state: State, targets: dict[str, str], problems: Problems) -> frozenset[str]:
    """What the state may decide: CONTINUE without a guard, its declared set with `@guard(...)`,
    every decision of its table with an undeclared guard; plus its `on_budget` and
    `on_exhausted` decisions."""
    g = state.guard
    allowed: set[str] = {FlowDecision.CONTINUE.value}
    if g is not None and not callable(g):
        problems.add(state.name, "guard is not callable", "pass a function (output, ctx) -> FlowDecision")
    elif isinstance(g, DeclaredGuard):
        allowed = set()
        for d in g.decisions:
            value = decision_value(d)
            if value is None:
                problems.add(state.name, f"guard declares {d!r}, which is not a decision",
                             "declare FlowDecision.X or Branch('name') values")
            elif value not in targets:
                problems.add(state.name, f"guard may return {value} but no transition handles it",
                             f"add on={{{_decision_repr(d)}: '<target state>'}}")
            else:
                allowed.add(value)
    elif g is not None:
        allowed = set(targets)
    for label, taken in fallback_decisions(state).items():
        value = decision_value(taken)
        if value is None or value not in targets:
            shown = _decision_repr(taken) if value is not None else repr(taken)
            problems.add(state.name, f"{label}={shown} has no transition",
                         f"use a decision with an on= entry, e.g. {label}=Branch('give_up') with "
                         "on={Branch('give_up'): '<target state>'}")
        else:
            allowed.add(value)
    return frozenset(allowed)


def fallback_decisions(state: State) -> dict[str, FlowDecision | Branch]:
    """The decisions the engine takes for the state without its guard: `on_budget` when the
    budget cannot cover a call, `on_exhausted` when a loop bound blocks the guard's decision."""
    taken: dict[str, FlowDecision | Branch] = {}
    if isinstance(state, LLMState) and state.on_budget is not None:
        taken["on_budget"] = state.on_budget
    if state.on_exhausted is not None:
        taken["on_exhausted"] = state.on_exhausted
    return taken


def _templates(state: LLMState, problems: Problems) -> tuple[Template, Template | None] | None:
    bad = [label for label, text in (("prompt", state.prompt), ("system", state.system))
           if not isinstance(text, str) and not (label == "system" and text is None)]
    for label in bad:
        problems.add(state.name, f"{label} is not a string", f"pass the {label} template as a str")
    if bad:
        return None
    return Template.parse(state.prompt), Template.parse(state.system) if state.system else None


def _decision_repr(d: FlowDecision | Branch) -> str:
    return f"FlowDecision.{d.name}" if isinstance(d, FlowDecision) else f"Branch({d.name!r})"
