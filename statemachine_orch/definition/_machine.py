"""Machine definitions: a named list of states, validated as a whole when constructed.

A machine is declared once at module level::

    machine = Machine("report", states=[
        LLMState("data_validation", prompt="Validate ...: {raw_data}", max_tokens=500),
        LLMState("trend_analysis", prompt="... {data_validation}", needs=["data_validation"]),
    ], input_vars={"raw_data": as_json})

Construction builds the transition table (`_table.py`) and the machines of the states that
run child runs (a machine of one state for a map state's `each=` state or a parallel branch),
validates the whole definition (`_validation.py`) and raises one `DefinitionError` listing
every problem, each naming the module, the state and the fix.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from functools import cached_property
from operator import itemgetter
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ..errors import DefinitionError
from ..types import Budget, Result, RetryPolicy
from ._problems import Problems
from ._source import code_hash
from ._states import LLMState, MachineState, MapState, ParallelState, PythonState, ReviewState, State
from ._table import TransitionTable, build_table
from ._templates import Template
from ._validation import validate

DEFAULT_MODEL = "claude-sonnet-5-5"
DEFAULT_MAX_BRANCH_DEPTH = 3
DEFAULT_CONTEXT_TOKENS = 200_000  # the smallest context of current models; inputs beyond it fail early


def _caller_module() -> tuple[str | None, str | None]:
    """(module name, file) of the code that constructed the Machine."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:
        return None, None
    return frame.f_globals.get("__name__"), frame.f_globals.get("__file__")


def _child_machines(machine: Machine, state: State, problems: Problems) -> tuple[Machine, ...]:
    """The machines whose runs a state starts: a machine state's child, a map state's `each`
    (for an LLM or Python state, a machine of that one state, whose input is the item:
    `{item}`, or the fields of `item_model`), a machine of one state per parallel branch
    (whose input is the run's input values and the outputs the branch needs)."""
    if isinstance(state, MachineState):
        if not isinstance(state.machine, Machine):
            problems.add(state.name, f"machine={state.machine!r} is not a Machine", "pass the child Machine")
            return ()
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


class Machine:
    """A validated finite state machine of LLM and Python states."""

    def __init__(
        self,
        name: str,
        states: Iterable[State],
        *,
        model: str = DEFAULT_MODEL,
        input_model: type[BaseModel] | None = None,
        input_vars: Mapping[str, Callable[[Any], Any]] | None = None,
        max_branch_depth: int = DEFAULT_MAX_BRANCH_DEPTH,
        description: str | None = None,
        retry_policy: RetryPolicy | None = None,
        budget: Budget | None = None,
        context_tokens: int = DEFAULT_CONTEXT_TOKENS,
        source_file: str | None = None,
        result: Result | None = None,
    ) -> None:
        self.name = name
        self.context_tokens = context_tokens
        self.retry_policy = retry_policy
        self.budget = budget
        self.states: tuple[State, ...] = tuple(states)
        self.model = model
        self.input_model = input_model
        self.input_vars: dict[str, Callable[[Any], Any]] = dict(input_vars or {})
        self.max_branch_depth = max_branch_depth
        self.description = description
        self.result = result
        self.module, caller_file = _caller_module()
        self.source_file = source_file or caller_file
        self._ref: str | None = None
        self.by_name: dict[str, State] = {
            s.name: s for s in self.states if isinstance(s, State) and isinstance(s.name, str)}
        self.branch_of: dict[str, str] = {  # a parallel state's branch -> that state: outputs read by name
            b.name: s.name for s in self.states if isinstance(s, ParallelState)
            and isinstance(s.branches, (list, tuple)) for b in s.branches if isinstance(b, State)}
        table, table_problems = build_table(self)
        self.transitions: TransitionTable = table
        self.children: dict[str, tuple[Machine, ...]] = {}  # state -> the machines of its child runs
        for state in self.by_name.values():
            machines = _child_machines(self, state, table_problems)
            if machines:
                self.children[state.name] = machines
            for gate in {s.name for m in machines for c in m.family() for s in c.states if isinstance(s, ReviewState)}:
                table_problems.add(state.name, f"its child runs would wait at review state '{gate}', and a child run "
                                   "cannot wait for a review", "put the review state in this machine")
        problems = validate(self, table, table_problems)
        if problems:
            raise DefinitionError(problems)

    @property
    def initial(self) -> str:
        return self.states[0].name

    @property
    def input_names(self) -> frozenset[str]:
        model = self.input_model
        fields = set(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else set()
        return frozenset(fields | set(self.input_vars))

    @cached_property
    def source_hash(self) -> str:
        """sha256 of the defining module's source and the project modules it imports, as
        loaded (`_source.code_hash`); stored with each run to detect edits."""
        package = getattr(sys.modules.get(self.module or ""), "__package__", None) or ""
        return code_hash(self.source_file, package=package,
                         fallback=repr([(s.name, type(s).__name__) for s in self.states]).encode())

    @cached_property
    def _where(self) -> str:
        return str(Path(self.source_file).resolve()) if self.source_file else (self.module or "?")

    @property
    def ref(self) -> str:
        """How to load this machine again: `path/to/module.py:attribute` (stored with each run)."""
        if self._ref is not None:
            return self._ref
        module = sys.modules.get(self.module or "")
        attr = next((k for k, v in vars(module).items() if v is self), None) if module else None
        where = self._where
        if not attr:
            spec = getattr(module, "__spec__", None)
            if not getattr(spec, "_initializing", False):
                self._ref = where  # the module is loaded and does not name it: it never will
            return where  # still importing: it may bind the machine yet, so look again next time
        self._ref = f"{where}:{attr}"
        return self._ref

    def family(self) -> Iterator[Machine]:
        """This machine and every machine its child runs run (machine and map states), nested."""
        yield self
        for children in self.children.values():
            for child in children:
                yield from child.family()

    @property
    def calls_a_model(self) -> bool:
        """Whether its runs call the Messages API: it or a machine of its family has an LLM state."""
        return any(isinstance(s, LLMState) for m in self.family() for s in m.states)

    @property
    def result_option(self) -> dict[str, Any]:
        """The run option that says what a run answers, for readers that do not load the machine
        (`orch show`): `{"result": state}` or `{"result": {"function": name}}`; `{}` when none
        is declared."""
        if self.result is None:
            return {}
        return {"result": self.result if isinstance(self.result, str)
                else {"function": getattr(self.result, "__qualname__", repr(self.result))}}

    @property
    def table(self) -> Mapping[str, Mapping[str, str]]:
        """state -> decision value -> target, the defaults included."""
        return self.transitions.targets

    @property
    def decisions(self) -> Mapping[str, frozenset[str]]:
        """state -> the decisions it may take."""
        return self.transitions.decisions

    @property
    def templates(self) -> Mapping[str, tuple[Template, Template | None]]:
        """LLM state -> its parsed (prompt, system) templates."""
        return self.transitions.templates

    def edges(self, state: str) -> dict[str, str]:
        """decision value -> target, for the decisions this state can actually take."""
        return self.transitions.edges(state)

    def __repr__(self) -> str:
        return f"Machine({self.name!r}, states={[s.name for s in self.states]})"
