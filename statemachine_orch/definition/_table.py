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
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from ..errors import DefinitionError
from ..types import END, Branch, FlowDecision
from ._problems import Problems
from ._states import DeclaredGuard, LLMState, MachineState, MapState, ParallelState, PythonState, State
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
    children: Mapping[str, tuple[Machine, ...]]  # machine, map state -> its child runs' machine; parallel: one a branch
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
    children: dict[str, tuple[Machine, ...]] = {}
    states = [s for s in machine.states if isinstance(s, State) and isinstance(s.name, str)]
    names = [s.name for s in states]
    for index, state in enumerate(states):
        targets[state.name] = _targets(state, names[index + 1:], machine, problems)
        decisions[state.name] = _decisions(state, targets[state.name], problems)
        if isinstance(state, LLMState):
            parsed = _templates(state, problems)
            if parsed is not None:
                templates[state.name] = parsed
        machines = _child_machines(machine, state, problems)
        if machines:
            children[state.name] = machines
    table = TransitionTable(targets=targets, decisions=decisions, templates=templates, children=children,
                            complete=not problems)
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


def _child_machines(machine: Machine, state: State, problems: Problems) -> tuple[Machine, ...]:
    """The machines whose runs a state starts: a machine state's child, a map state's `each`
    (for an LLM or Python state, a machine of that one state, whose input is the item:
    `{item}`, or the fields of `item_model`), a machine of one state per parallel branch
    (whose input is the run's input values and the outputs the branch needs)."""
    from ._machine import Machine  # a machine is made of states; these are made here

    if isinstance(state, MachineState):
        return (state.machine,)
    if isinstance(state, ParallelState):
        names = tuple(machine.input_names)
        built = [_one_state(machine, state, branch, {n: itemgetter(n) for n in (*branch.needs, *names)}, None,
                            problems) for branch in _branches(state, problems)]
        return tuple(m for m in built if m is not None) if all(built) else ()
    if not isinstance(state, MapState):
        return ()
    each = state.each
    if isinstance(each, Machine):
        return (each,)
    if not isinstance(each, (LLMState, PythonState)):
        problems.add(state.name, f"each={each!r} is not an LLMState, a PythonState or a Machine", "pass one of them")
        return ()
    if each.needs or each.needs_if_ran:
        return ()  # an item reads only its item: reported by validation
    child = _one_state(machine, state, each, None if state.item_model else {"item": itemgetter("item")},
                       state.item_model, problems)
    return () if child is None else (child,)


def _branches(state: ParallelState, problems: Problems) -> list[LLMState | PythonState]:
    branches = list(state.branches) if isinstance(state.branches, (list, tuple)) else []
    if not branches or not all(isinstance(b, (LLMState, PythonState)) for b in branches):
        problems.add(state.name, "branches= is not a list of LLMState and PythonState",
                     "pass branches=[LLMState(...), LLMState(...)]")
        return []
    return branches


def _one_state(machine: Machine, state: State, inner: LLMState | PythonState, input_vars: dict[str, Any] | None,
               input_model: Any, problems: Problems) -> Machine | None:
    """A machine of `inner` alone (its needs come in as input), for `state`'s child runs; its
    problems are said of `state`."""
    from dataclasses import replace

    from ._machine import Machine

    try:
        child = Machine(f"{machine.name}__{inner.name}", [replace(inner, needs=())], model=machine.model,
                        input_model=input_model, input_vars=input_vars, retry_policy=machine.retry_policy,
                        context_tokens=machine.context_tokens, source_file=machine.source_file)
    except DefinitionError as exc:
        problems.adopt(exc.problems, inner.name, state.name,
                       "branch" if isinstance(state, ParallelState) else "each= state")
        return None
    child.module = machine.module
    return child


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
