"""Validation of a whole machine: every problem found, one line each, with its fix.

Reports only: the transition table is built first (`_table.build_table`, which reports what
keeps it from being built), then this checks names, each state's fields, guards, templates
and limits, and, when the table is whole, the graph: reachability, needs that run first,
bounded loops and branching depth.
"""

from __future__ import annotations

import inspect
import keyword
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from ..types import END, Budget, FlowDecision, RetryPolicy
from ._problems import Problems
from ._states import (
    ESCALATE,
    DeclaredGuard,
    LLMState,
    MachineState,
    MapState,
    ParallelState,
    PythonState,
    Review,
    ReviewState,
    State,
)
from ._table import TransitionTable, decision_value, fallback_decisions

if TYPE_CHECKING:
    from ._machine import Machine

RESERVED_NAMES = frozenset({END, "END"})


def validate(machine: Machine, table: TransitionTable, table_problems: Problems) -> list[str]:
    """Every problem of `machine`, one line each: `table_problems` (what kept its `table` from
    being built) once its names are sound, and all the others."""
    return _Validator(machine, table, table_problems).run()


class _Validator:
    """Collects the problems of a definition whose table is built."""

    def __init__(self, machine: Machine, table: TransitionTable, table_problems: Problems) -> None:
        self.m = machine
        self.table = table
        self.table_problems = table_problems
        self.problems = Problems(machine)
        self.add = self.problems.add

    def run(self) -> list[str]:
        m = self.m
        if not isinstance(m.name, str) or not m.name.isidentifier():
            self.add(None, f"machine name {m.name!r} is not an identifier", "use letters, digits and _")
        if not m.states:
            self.add(None, "has no states", "pass at least one LLMState or PythonState in states=[...]")
            return self.problems
        if m.input_model is not None and not (
            isinstance(m.input_model, type) and issubclass(m.input_model, BaseModel)
        ):
            self.add(None, "input_model is not a pydantic model class", "pass a BaseModel subclass")
        for var in m.input_vars:
            if not var.isidentifier() or var in m.by_name:
                self.add(None, f"input_vars key {var!r} is not a free identifier", "rename it")
        if m.max_branch_depth < 0:
            self.add(None, "max_branch_depth is negative", "use 0 or more")
        if m.retry_policy is not None and not isinstance(m.retry_policy, RetryPolicy):
            self.add(None, "retry_policy is not a RetryPolicy", "pass RetryPolicy(max_attempts=...)")
        if m.budget is not None and not isinstance(m.budget, Budget):
            self.add(None, "budget is not a Budget", "pass Budget(max_cost_usd=...)")
        before = len(self.problems)
        self._names()
        if len(self.problems) > before:
            return self.problems  # later checks need unique, valid names
        for state in m.states:
            self._state(state)
        self._result()
        if not self.table.complete:
            return self.problems  # graph checks need a whole transition table
        self._reachability()
        self._needs_dominate()
        self._needs_can_run_first()
        self._cycles()
        self._branch_depth()
        return self.problems

    def _names(self) -> None:
        seen: set[str] = set()
        for state in self.m.states:
            if not isinstance(state, State) or type(state) is State:
                self.add(None, f"{state!r} is not an LLMState or PythonState", "wrap it in one")
                continue
            name = state.name
            if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
                self.add(str(name), "name is not a Python identifier", "use letters, digits and _")
            elif name in RESERVED_NAMES:
                self.add(name, "name is reserved", f"rename it (reserved: {sorted(RESERVED_NAMES)})")
            elif name in seen:
                self.add(name, "is declared twice", "give each state a unique name")
            seen.add(name)
        for branch, owner in self.m.branch_of.items():
            if not isinstance(branch, str) or not branch.isidentifier() or keyword.iskeyword(branch):
                self.add(owner, f"branch name {branch!r} is not a Python identifier", "use letters, digits and _")
            elif branch in seen or branch in RESERVED_NAMES:
                self.add(owner, f"branch name '{branch}' is taken (by a state or another branch)",
                         "give each branch a name no state or branch has")
            seen.add(branch)

    def _state(self, state: State) -> None:
        m = self.m
        self.problems.take(self.table_problems, state.name)
        names = [s.name for s in m.states]
        table = self.table.targets[state.name]
        allowed = self.table.decisions[state.name]
        declared_on = [value for key, value in ((k, decision_value(k)) for k in state.on)
                       if value is not None and value in table and table[value] == state.on[key]]
        fallbacks = {decision_value(d) for d in fallback_decisions(state).values()}
        g = state.guard
        if g is None:
            unused = [d for d in declared_on if d != FlowDecision.CONTINUE.value and d not in fallbacks]
            if unused:
                self.add(state.name, f"has transitions for {unused} but no guard to choose them "
                         "(without a guard a state always continues)",
                         "add guard= or remove those on= entries")
        elif callable(g):
            self._guard_signature(state.name, g.fn if isinstance(g, DeclaredGuard) else g)
            if isinstance(g, DeclaredGuard):
                unused = [d for d in declared_on if d not in allowed and d not in fallbacks]
                if unused:
                    self.add(state.name, f"has transitions for {unused}, which its guard never returns",
                             "add them to @guard(...) or remove those on= entries")

        loops = sorted(d for d in allowed if table.get(d) == state.name)
        if loops and (not isinstance(state.retry_limit, int) or state.retry_limit < 1):
            self.add(state.name, f"its guard may loop back to it ({', '.join(loops)}) but retry_limit "
                     "is not a positive number", "set retry_limit=3 (the most runs in a row)")
        if state.max_visits is not None and (not isinstance(state.max_visits, int) or state.max_visits < 1):
            self.add(state.name, "max_visits must be a positive integer", "set max_visits=N or leave it None")
        if state.output is not None and not (
            isinstance(state.output, type) and issubclass(state.output, BaseModel)
        ):
            self.add(state.name, "output is not a pydantic model class", "pass a BaseModel subclass")
        if state.timeout is not None and not (isinstance(state.timeout, (int, float)) and state.timeout > 0):
            self.add(state.name, f"timeout={state.timeout!r} is not a positive number of seconds",
                     "set timeout=60 or leave it None")
        for need in state.needs:
            if need == state.name:
                self.add(state.name, "needs itself",
                         "remove it from needs (needs_if_ran=[...] reads its output of an earlier visit)")
            elif need not in m.by_name and need not in m.branch_of:
                self.add(state.name, f"needs unknown state {need!r}", f"use one of {names}")
        for need in state.needs_if_ran:
            if need not in m.by_name:
                self.add(state.name, f"needs_if_ran names unknown state {need!r}", f"use one of {names}")
            elif need in state.needs:
                self.add(state.name, f"names {need!r} in both needs and needs_if_ran",
                         "keep it in needs if it always runs first, else in needs_if_ran")
        if state.on_exhausted is not None and table.get(decision_value(state.on_exhausted) or "") == state.name:
            self.add(state.name, "on_exhausted leads back to the state itself, which its retry_limit blocks",
                     "route on_exhausted out of the loop, e.g. on_exhausted=FlowDecision.CONTINUE")
        if isinstance(state, LLMState):
            self._llm_state(state)
        elif isinstance(state, PythonState) and not callable(state.run):
            self.add(state.name, "run= is not callable", "pass a function (ctx) -> output")
        elif isinstance(state, (MachineState, MapState, ParallelState)):
            self._child_state(state)
        elif isinstance(state, ReviewState):
            self._review_state(state)

    def _review_state(self, state: ReviewState) -> None:
        names = state.decisions
        if not names or not all(isinstance(d, str) and d.replace("_", "a").replace("-", "a").isalnum()
                                for d in names) or len(set(names)) != len(names):
            self.add(state.name, f"decisions={list(names)!r} is not a list of distinct names "
                     "(letters, digits, _ and -)", "e.g. decisions=('approve', 'reject', 'revise')")
        elif ESCALATE in names:
            self.add(state.name, f"'{ESCALATE}' is the decision on_timeout='escalate:<state>' takes",
                     "name the reviewer's decision otherwise")
        deadline = state.deadline_s
        if deadline is not None and not (isinstance(deadline, (int, float)) and deadline > 0):
            self.add(state.name, f"deadline={state.deadline!r} is not a positive number of seconds",
                     "set deadline=3600 or deadline=timedelta(hours=1)")
        timeout = state.on_timeout
        if timeout is not None and deadline is None:
            self.add(state.name, f"on_timeout={timeout!r} never applies without a deadline",
                     "set deadline= too, or remove on_timeout")
        elif timeout is not None and state.escalates_to is None and timeout not in names:
            self.add(state.name, f"on_timeout={timeout!r} is not one of its decisions {list(names)}",
                     "use one of them, or 'escalate:<state>'")
        if state.data is not None and not (isinstance(state.data, type) and issubclass(state.data, BaseModel)):
            self.add(state.name, "data is not a pydantic model class", "pass a BaseModel subclass")
        if not (isinstance(state.output, type) and issubclass(state.output, Review)):
            self.add(state.name, "output= of a review state is the reviewer's Review", "remove output=")
        self._one_argument(state.name, "show", state.show, "def show(ctx) -> dict")

    def _child_state(self, state: MachineState | MapState | ParallelState) -> None:
        """A state whose work is child runs: a machine state's child, a map state's items."""
        if state.output is not None:
            self.add(state.name, "output= checks an answer, and this state's output is its child runs' results",
                     "set output= on the child machine's states (or the each= state)")
        if isinstance(state, MachineState):
            self._one_argument(state.name, "input", state.input, "def child_input(ctx) -> dict")
            return
        if isinstance(state, ParallelState):
            for branch in state.branches if isinstance(state.branches, (list, tuple)) else ():
                missing = [n for n in getattr(branch, "needs", ()) if n not in state.needs]
                if missing:
                    self.add(state.name, f"its branch '{branch.name}' needs {missing}, which the state does not",
                             f"add {missing} to needs=[...] of state '{state.name}' too")
            return
        self._one_argument(state.name, "items", state.items, "def items(ctx) -> list")
        self._one_argument(state.name, "reduce", state.reduce, "def reduce(outputs: list) -> value")
        if not isinstance(state.concurrency, int) or isinstance(state.concurrency, bool) or state.concurrency < 1:
            self.add(state.name, f"concurrency={state.concurrency!r} is not a positive integer",
                     "set concurrency=4 (items run at once)")
        self._fail_or_guard(state, "on_item_error", state.on_item_error, "judge the failed items",
                            "add guard= that checks for ItemError in the outputs")
        if state.item_model is not None and not (
            isinstance(state.item_model, type) and issubclass(state.item_model, BaseModel)
        ):
            self.add(state.name, "item_model is not a pydantic model class", "pass a BaseModel subclass")
        each = state.each
        if isinstance(each, State) and (each.needs or each.needs_if_ran):
            self.add(state.name, f"its each= state '{each.name}' has needs, but an item reads only its item",
                     "put what each item needs into the items (items=lambda ctx: [...])")

    def _one_argument(self, state: str, field: str, fn: Any, shape: str) -> None:
        """`fn` is None or a function of one argument."""
        if fn is not None and not (callable(fn) and _takes(fn, 1)):
            self.add(state, f"{field}= is not a function of one argument", f"define it as {shape}")

    def _fail_or_guard(self, state: State, field: str, value: Any, judged: str, fix: str) -> None:
        """A `field` that is "fail" or "guard", and a guard to judge `judged` with "guard"."""
        if value not in ("fail", "guard"):
            self.add(state.name, f"{field}={value!r} is not 'fail' or 'guard'",
                     f"use {field}='guard' to {judged}, or leave the default")
        elif value == "guard" and state.guard is None:
            self.add(state.name, f"{field}='guard' needs a guard to {judged}", fix)

    def _guard_signature(self, state: str, fn: Callable[..., Any]) -> None:
        if not _takes(fn, 2):
            self.add(state, "guard does not take (output, context)",
                     "define it as def my_guard(output, ctx) -> FlowDecision")

    def _result(self) -> None:
        result = self.m.result
        if result is None:
            return
        if isinstance(result, str):
            if result not in self.m.by_name:
                self.add(None, f"result names unknown state {result!r}",
                         f"use one of {[s.name for s in self.m.states]}")
        elif not callable(result):
            self.add(None, "result is neither a state name nor a function",
                     "pass result='state_name' or result=lambda outputs: ...")
        elif not _takes(result, 1):
            self.add(None, "result function does not take (outputs)",
                     "define it as def result(outputs) -> value")

    def _llm_state(self, state: LLMState) -> None:
        m = self.m
        self._fail_or_guard(state, "on_invalid", state.on_invalid, "route InvalidOutput",
                            "add guard= that checks isinstance(output, InvalidOutput)")
        if not isinstance(state.repairs, int) or state.repairs < 0:
            self.add(state.name, f"repairs={state.repairs!r} is not a count", "use 0 or more re-asks")
        if state.retry_policy is not None and not isinstance(state.retry_policy, RetryPolicy):
            self.add(state.name, "retry_policy is not a RetryPolicy", "pass RetryPolicy(max_attempts=...)")
        params = state.params
        managed = {"model", "max_tokens", "messages", "system", "tools", "tool_choice"}
        if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
            self.add(state.name, "params is not a mapping of Messages API parameter names",
                     "pass params={'stop_sequences': [...]}")
        elif managed & set(params):
            self.add(state.name, f"params sets {sorted(managed & set(params))}, which the state "
                     "itself controls", "use the LLMState fields (model=, max_tokens=, system=, output=)")
        fb = state.fallback
        if fb is not None and not ((isinstance(fb, str) and fb) or callable(fb)):
            self.add(state.name, "fallback is neither a model name nor a function",
                     "pass fallback='claude-haiku-4-5' or fallback=lambda ctx: ...")
        elif callable(fb) and not isinstance(fb, str) and not _takes(fb, 1):
            self.add(state.name, "fallback function does not take (ctx)",
                     "define it as def my_fallback(ctx) -> output")
        if state.parse is not None:
            if state.output is not None:
                self.add(state.name, "sets both output= and parse=",
                         "keep output= for a structured answer (a tool call) or parse= for a text answer")
            elif not callable(state.parse) or not _takes(state.parse, 1):
                self.add(state.name, "parse is not a function of one argument (the answer's text)",
                         "pass parse=xml_tags('response') or def my_parse(text) -> value")
        own = self._vars(state)
        parsed = self.table.templates.get(state.name)
        if parsed is None:
            return  # not strings: reported when the table was built
        if not (state.model or m.model):
            self.add(state.name, "has no model", "set model= on the state or the machine")
        if not isinstance(state.max_tokens, int) or state.max_tokens < 1:
            self.add(state.name, f"max_tokens={state.max_tokens!r} is not a positive integer",
                     "set max_tokens to the answer's budget, e.g. 500")
        prompt, system = parsed
        available = m.input_names | set(state.needs) | set(state.needs_if_ran)
        available |= own
        for label, tpl in (("prompt", prompt), ("system", system)):
            if tpl is None:
                continue
            for problem in tpl.problems:
                self.add(state.name, f"{label} {problem}", "edit the template")
            for name in dict.fromkeys(tpl.names):
                if name in available:
                    continue
                if name in m.by_name:
                    fix = f"add {name!r} to needs=[...] (it must run before this state)"
                else:
                    fix = ("add the field to input_model or input_vars, compute it with "
                           f"vars={{{name!r}: lambda ctx: ...}}, or fix the spelling")
                self.add(state.name, f"{label} uses {{{name}}}, which no input field, needed state or "
                         "vars= entry provides", fix)
        used = set(prompt.names) | set(system.names if system is not None else ())
        for name in sorted(own - used):
            self.add(state.name, f"vars key {name!r} is used by neither prompt nor system",
                     f"use {{{name}}} in a template or remove the entry")

    def _vars(self, state: LLMState) -> set[str]:
        """The names `state.vars` provides to its templates (its sound entries)."""
        m = self.m
        if not isinstance(state.vars, Mapping):
            self.add(state.name, "vars is not a mapping", "pass vars={'name': lambda ctx: ...}")
            return set()
        names = set()
        for name, fn in state.vars.items():
            if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
                self.add(state.name, f"vars key {name!r} is not an identifier", "use letters, digits and _")
                continue
            if name in m.input_names or name in m.by_name:
                what = "state" if name in m.by_name else "input field"
                self.add(state.name, f"vars key {name!r} shadows the {what} of that name", "rename it")
            elif not callable(fn) or not _takes(fn, 1):
                self.add(state.name, f"vars[{name!r}] is not a function of one argument (the step's context)",
                         f"pass vars={{{name!r}: lambda ctx: ...}}")
            names.add(name)
        return names

    # ------------------------------------------------------------------ graph checks

    def _reachable(self, start: str, blocked: str | None = None) -> set[str]:
        seen = {start}
        todo = [start]
        while todo:
            for target in self.table.edges(todo.pop()).values():
                if target != END and target != blocked and target not in seen:
                    seen.add(target)
                    todo.append(target)
        return seen

    def _reachability(self) -> None:
        reachable = self._reachable(self.m.initial)
        for state in self.m.states:
            if state.name not in reachable:
                self.add(state.name, "is unreachable from the initial state",
                         "route a decision to it (on={...}) or remove it")

    def _needs_dominate(self) -> None:
        for state in self.m.states:
            for need in state.needs:
                maker = self.m.branch_of.get(need, need)  # a branch's output is made by its parallel state
                if maker == self.m.initial or maker not in self.m.by_name or maker == state.name:
                    continue
                if state.name in self._reachable(self.m.initial, blocked=maker) or state.name == self.m.initial:
                    self.add(state.name, f"can run before {need!r}, whose output it needs",
                             f"make every path to it pass through {need!r}, or drop it from needs")

    def _needs_can_run_first(self) -> None:
        """A `needs_if_ran` state must run before this one on some path (or its output would
        never be there to read): reachable from the start, with this state reachable after it."""
        start = self._reachable(self.m.initial)
        for state in self.m.states:
            for need in state.needs_if_ran:
                if need not in self.m.by_name or need not in start:
                    continue
                after = set().union(*(self._reachable(t) for t in self.table.edges(need).values() if t != END))
                if state.name not in after:
                    self.add(state.name, f"reads {need!r} (needs_if_ran), which no path runs before it",
                             f"route a path through {need!r} to {state.name!r}, or drop it from needs_if_ran")

    def _cycles(self) -> None:
        """Every cycle through two or more states needs a state with max_visits (self-loops are
        bounded by retry_limit)."""
        for component in _strongly_connected(self.m, self.table):
            if len(component) < 2:
                continue
            if not any(self.m.by_name[s].max_visits for s in component):
                loop = " -> ".join(sorted(component))
                self.add(sorted(component)[0], f"states {loop} form a loop with no bound",
                         "set max_visits=N on one of them")

    def _branch_depth(self) -> None:
        m = self.m
        branching = {
            s.name for s in m.states
            if len({t for t in self.table.edges(s.name).values() if t not in (s.name, END)}) > 1
        }
        deepest: tuple[int, list[str]] = (0, [])

        def walk(node: str, path: list[str], depth: int) -> None:
            nonlocal deepest
            if node in branching:
                depth += 1
            if depth > deepest[0]:
                deepest = (depth, [*path, node])
            for target in set(self.table.edges(node).values()):
                if target != END and target not in path and target != node:
                    walk(target, [*path, node], depth)

        walk(m.initial, [], 0)
        if deepest[0] > max(m.max_branch_depth, 0):
            last = deepest[1][-1]
            self.add(last, f"branching depth {deepest[0]} exceeds the limit {m.max_branch_depth} "
                     f"(path {' -> '.join(deepest[1])})",
                     "flatten the branches, declare the decisions each guard really returns "
                     "with @guard(...), or raise Machine(max_branch_depth=...)")


def _takes(fn: Callable[..., Any], count: int) -> bool:
    """Whether `fn` can be called with `count` positional arguments (True when it has no
    signature to inspect, as some builtins: trust it)."""
    try:
        inspect.signature(fn).bind(*[None] * count)
    except TypeError:
        return False
    except ValueError:
        return True
    return True


def _strongly_connected(m: Machine, table: TransitionTable) -> list[set[str]]:
    """Tarjan's algorithm over the machine's reachable edges."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in table.edges(v).values():
            if w == END:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp: set[str] = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            out.append(comp)

    for s in m.states:
        if s.name not in index:
            visit(s.name)
    return out
