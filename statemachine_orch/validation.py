"""Validation of a whole machine: every problem found, one line each, with its fix.

Checks names, each state's transition table, guards, templates and limits, then the graph:
reachability, needs that run first, bounded loops and branching depth. Filling in the
transition table (the seed's defaults plus `on=`) happens here too, since checking it is
building it.
"""

from __future__ import annotations

import inspect
import keyword
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from .retry import RetryPolicy
from .states import DeclaredGuard, LLMState, PythonState, State
from .templates import Template
from .types import END, Branch, Budget, Decision, FlowDecision

if TYPE_CHECKING:
    from .definition import Machine

RESERVED_NAMES = frozenset({END, "END"})


def validate(machine: Machine) -> list[str]:
    """Every problem of `machine`, one line each; fills in its table, decisions and templates."""
    return _Validator(machine).run()


def _decision_value(key: object) -> str | None:
    if isinstance(key, (FlowDecision, Branch)):
        return key.value
    return None


class _Validator:
    """Collects every problem of a definition; also fills in the machine's transition table."""

    def __init__(self, machine: Machine) -> None:
        self.m = machine
        self.problems: list[str] = []
        self.table_broken = False
        where = machine.source_file
        if where:
            try:
                where = str(Path(where).resolve().relative_to(Path.cwd()))
            except ValueError:
                pass
        self.where = where or "<unknown module>"

    def add(self, state: str | None, problem: str, fix: str) -> None:
        subject = f"state '{state}'" if state is not None else f"machine '{self.m.name}'"
        self.problems.append(f"{self.where}: {subject}: {problem}; fix: {fix}")

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
            m.input_model = None
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
        for index, state in enumerate(m.states):
            self._state(index, state)
        if self.table_broken:
            return self.problems  # graph checks need a sound transition table
        self._reachability()
        self._needs_dominate()
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

    def _state(self, index: int, state: State) -> None:
        m = self.m
        names = [s.name for s in m.states]
        following = names[index + 1:]
        defaults = {
            FlowDecision.CONTINUE.value: following[0] if following else END,
            FlowDecision.SKIP.value: following[1] if len(following) > 1 else END,
            FlowDecision.RETRY.value: state.name,
            FlowDecision.TERMINATE.value: END,
        }
        table = dict(defaults)
        declared_on: list[str] = []
        for key, target in state.on.items():
            value = _decision_value(key)
            if value is None:
                self.add(state.name, f"on= key {key!r} is not a decision",
                         "use FlowDecision.X or Branch('name')")
                self.table_broken = True
                continue
            if target != END and target not in m.by_name:
                self.add(state.name, f"transition {value} -> unknown target {target!r}",
                         f"use one of {names} or END")
                self.table_broken = True
                continue
            table[value] = target
            declared_on.append(value)
        m.table[state.name] = table

        g = state.guard
        allowed: set[str] = {FlowDecision.CONTINUE.value}
        on_budget = (_decision_value(state.on_budget)
                     if isinstance(state, LLMState) and state.on_budget is not None else None)
        if g is None:
            unused = [d for d in declared_on if d not in (FlowDecision.CONTINUE.value, on_budget)]
            if unused:
                self.add(state.name, f"has transitions for {unused} but no guard to choose them "
                         "(without a guard a state always continues)",
                         "add guard= or remove those on= entries")
        elif not callable(g):
            self.add(state.name, "guard is not callable", "pass a function (output, ctx) -> FlowDecision")
            self.table_broken = True
        else:
            self._guard_signature(state.name, g.fn if isinstance(g, DeclaredGuard) else g)
            if isinstance(g, DeclaredGuard):
                allowed = self._declared(state.name, g, table)
                unused = [d for d in declared_on if d not in allowed and d != on_budget]
                if unused:
                    self.add(state.name, f"has transitions for {unused}, which its guard never returns",
                             "add them to @guard(...) or remove those on= entries")
            else:
                allowed = set(table)
        if isinstance(state, LLMState) and state.on_budget is not None:
            value = on_budget
            if value is None or value not in table:
                self.add(state.name, f"on_budget={state.on_budget!r} has no transition",
                         "use a decision with an on= entry, e.g. on_budget=Branch('cheap') with "
                         "on={Branch('cheap'): 'cheaper_state'}")
                self.table_broken = True
            else:
                allowed.add(value)
        m.decisions[state.name] = frozenset(allowed)

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
        for need in state.needs:
            if need == state.name:
                self.add(state.name, "needs itself", "remove it from needs")
            elif need not in m.by_name:
                self.add(state.name, f"needs unknown state {need!r}", f"use one of {names}")
        if isinstance(state, LLMState):
            self._llm_state(state)
        elif isinstance(state, PythonState) and not callable(state.run):
            self.add(state.name, "run= is not callable", "pass a function (ctx) -> output")

    def _guard_signature(self, state: str, fn: Callable[..., Any]) -> None:
        try:
            inspect.signature(fn).bind(None, None)
        except TypeError:
            self.add(state, "guard does not take (output, context)",
                     "define it as def my_guard(output, ctx) -> FlowDecision")
        except ValueError:
            pass  # no signature to inspect (some builtins): trust it

    def _declared(self, state: str, g: DeclaredGuard[Any], table: dict[str, str]) -> set[str]:
        allowed: set[str] = set()
        for d in g.decisions:
            value = _decision_value(d)
            if value is None:
                self.add(state, f"guard declares {d!r}, which is not a decision",
                         "declare FlowDecision.X or Branch('name') values")
                self.table_broken = True
            elif value not in table:
                self.add(state, f"guard may return {value} but no transition handles it",
                         f"add on={{{_decision_repr(d)}: '<target state>'}}")
                self.table_broken = True
            else:
                allowed.add(value)
        return allowed

    def _llm_state(self, state: LLMState) -> None:
        m = self.m
        if state.on_invalid not in ("fail", "guard"):
            self.add(state.name, f"on_invalid={state.on_invalid!r} is not 'fail' or 'guard'",
                     "use on_invalid='guard' to route invalid answers, or leave the default")
        elif state.on_invalid == "guard" and state.guard is None:
            self.add(state.name, "on_invalid='guard' needs a guard to route InvalidOutput",
                     "add guard= that checks isinstance(output, InvalidOutput)")
        if not isinstance(state.repairs, int) or state.repairs < 0:
            self.add(state.name, f"repairs={state.repairs!r} is not a count", "use 0 or more re-asks")
        if state.timeout is not None and not (isinstance(state.timeout, (int, float)) and state.timeout > 0):
            self.add(state.name, f"timeout={state.timeout!r} is not a positive number of seconds",
                     "set timeout=60 or leave it None")
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
        elif callable(fb) and not isinstance(fb, str):
            try:
                inspect.signature(fb).bind(None)
            except TypeError:
                self.add(state.name, "fallback function does not take (ctx)",
                         "define it as def my_fallback(ctx) -> output")
            except ValueError:
                pass
        bad = [label for label, text in (("prompt", state.prompt), ("system", state.system))
               if not isinstance(text, str) and not (label == "system" and text is None)]
        for label in bad:
            self.add(state.name, f"{label} is not a string", f"pass the {label} template as a str")
        if bad:
            return
        m.templates[state.name] = (
            Template.parse(state.prompt), Template.parse(state.system) if state.system else None)
        if not (state.model or m.model):
            self.add(state.name, "has no model", "set model= on the state or the machine")
        if not isinstance(state.max_tokens, int) or state.max_tokens < 1:
            self.add(state.name, f"max_tokens={state.max_tokens!r} is not a positive integer",
                     "set max_tokens to the answer's budget, e.g. 500")
        prompt, system = m.templates[state.name]
        available = m.input_names | set(state.needs)
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
                    fix = "add the field to input_model or input_vars, or fix the spelling"
                self.add(state.name, f"{label} uses {{{name}}}, which no input field or needed state provides", fix)

    # ------------------------------------------------------------------ graph checks

    def _reachable(self, start: str, blocked: str | None = None) -> set[str]:
        seen = {start}
        todo = [start]
        while todo:
            for target in self.m.edges(todo.pop()).values():
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
                if need == self.m.initial or need not in self.m.by_name or need == state.name:
                    continue
                if state.name in self._reachable(self.m.initial, blocked=need) or state.name == self.m.initial:
                    self.add(state.name, f"can run before {need!r}, whose output it needs",
                             f"make every path to it pass through {need!r}, or drop it from needs")

    def _cycles(self) -> None:
        """Every cycle through two or more states needs a state with max_visits (self-loops are
        bounded by retry_limit)."""
        for component in _strongly_connected(self.m):
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
            if len({t for t in m.edges(s.name).values() if t not in (s.name, END)}) > 1
        }
        deepest: tuple[int, list[str]] = (0, [])

        def walk(node: str, path: list[str], depth: int) -> None:
            nonlocal deepest
            if node in branching:
                depth += 1
            if depth > deepest[0]:
                deepest = (depth, [*path, node])
            for target in set(m.edges(node).values()):
                if target != END and target not in path and target != node:
                    walk(target, [*path, node], depth)

        walk(m.initial, [], 0)
        if deepest[0] > max(m.max_branch_depth, 0):
            last = deepest[1][-1]
            self.add(last, f"branching depth {deepest[0]} exceeds the limit {m.max_branch_depth} "
                     f"(path {' -> '.join(deepest[1])})",
                     "flatten the branches, declare the decisions each guard really returns "
                     "with @guard(...), or raise Machine(max_branch_depth=...)")


def _decision_repr(d: Decision) -> str:
    return f"FlowDecision.{d.name}" if isinstance(d, FlowDecision) else f"Branch({d.name!r})"


def _strongly_connected(m: Machine) -> list[set[str]]:
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
        for w in m.edges(v).values():
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
