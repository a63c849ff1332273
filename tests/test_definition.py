"""Definition time: every validation rule, its exact problem line, and the transition table.

A problem line has the shape `<module file>: state '<name>': <problem>; fix: <fix>` (or
`machine '<name>'` for machine-level problems). Machines here are built inline, so the module
part is this file, shown relative to the current directory as definition.py shows it.
"""

from __future__ import annotations

from pathlib import Path
from string import Formatter
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from statemachine_orch import (
    END,
    Branch,
    DefinitionError,
    FlowDecision,
    LLMState,
    Machine,
    PythonState,
    State,
    StepContext,
    guard,
    load_machine,
)
from statemachine_orch.types import decision_from_value

from .helpers import (
    EXAMPLE_MACHINES,
    MACHINES,
    shown,
)

DEFAULT_KEYS = {"continue", "skip", "retry", "terminate"}


class Ticket(BaseModel):
    text: str


# --------------------------------------------------------------------------- helpers


def state_line(state: str, problem: str, fix: str, *, where: str | Path = __file__) -> str:
    return f"{shown(where)}: state '{state}': {problem}; fix: {fix}"


def machine_line(problem: str, fix: str, *, name: str = "m", where: str | Path = __file__) -> str:
    return f"{shown(where)}: machine '{name}': {problem}; fix: {fix}"


def problems_of(*states: Any, name: str = "m", **options: Any) -> list[str]:
    """Build Machine(name, states) here (so this file is its module) and return its problems."""
    with pytest.raises(DefinitionError) as info:
        Machine(name, states, **options)
    return info.value.problems


def noop(ctx: StepContext) -> None:
    return None


def step(name: str, **kw: Any) -> PythonState:
    return PythonState(name, run=noop, **kw)


def ask(name: str, prompt: str = "Go.", **kw: Any) -> LLMState:
    return LLMState(name, prompt=prompt, **kw)


def always_continue(output: Any, ctx: StepContext) -> FlowDecision:
    return FlowDecision.CONTINUE


def declared(*decisions: Any) -> Any:
    """A guard declaring `decisions` (its body is never called at definition time)."""
    return guard(*decisions)(always_continue)


BRANCHING = declared(FlowDecision.CONTINUE, FlowDecision.BRANCH_A)


# --------------------------------------------------------------------------- the line shape


def test_one_problem_is_the_whole_message() -> None:
    with pytest.raises(DefinitionError) as info:
        Machine("m", [step("a", max_visits=0)])
    line = state_line("a", "max_visits must be a positive integer", "set max_visits=N or leave it None")
    assert info.value.problems == [line]
    assert str(info.value) == line
    assert info.value.exit_code == 2


def test_module_part_is_relative_to_cwd_when_under_it(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "flows" / "bad.py"
    bad = [step("a", max_visits=0)]
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    outside = problems_of(*bad, source_file=str(source))
    monkeypatch.chdir(tmp_path)
    inside = problems_of(*bad, source_file=str(source))
    fix = "set max_visits=N or leave it None"
    assert outside == [f"{source}: state 'a': max_visits must be a positive integer; fix: {fix}"]
    assert inside == [f"flows/bad.py: state 'a': max_visits must be a positive integer; fix: {fix}"]


def test_source_file_defaults_to_the_constructing_module() -> None:
    machine = Machine("m", [step("a")])
    assert machine.source_file == __file__
    assert machine.module == __name__


# --------------------------------------------------------------------------- all problems at once


def test_every_state_problem_is_reported_in_one_error() -> None:
    with pytest.raises(DefinitionError) as info:
        Machine("m", [
            ask("a", prompt="{x.__class__} {missing}", max_tokens=0),
            step("b", needs=["ghost"], output=dict),
            step("c", guard="yes"),
        ], input_vars={"x": str})
    expected = [
        state_line("a", "max_tokens=0 is not a positive integer",
                   "set max_tokens to the answer's budget, e.g. 500"),
        state_line("a", "prompt template uses '{x.__class__}'; only plain {name} placeholders are "
                   "allowed (no attribute access, indexing or positions)", "edit the template"),
        state_line("a", "prompt uses {missing}, which no input field, needed state or vars= entry provides",
                   "add the field to input_model or input_vars, compute it with "
                   "vars={'missing': lambda ctx: ...}, or fix the spelling"),
        state_line("b", "output is not a pydantic model class", "pass a BaseModel subclass"),
        state_line("b", "needs unknown state 'ghost'", "use one of ['a', 'b', 'c']"),
        state_line("c", "guard is not callable", "pass a function (output, ctx) -> FlowDecision"),
    ]
    assert info.value.problems == expected
    assert str(info.value) == "6 problems:\n" + "\n".join(expected)


def test_graph_problems_are_reported_together() -> None:
    problems = problems_of(
        step("a", guard=BRANCHING, on={FlowDecision.BRANCH_A: "c"}),
        step("b", guard=BRANCHING, on={FlowDecision.BRANCH_A: "a"}),
        step("c", needs=["b"], on={FlowDecision.CONTINUE: END}),
        step("orphan"),
    )
    assert problems == [
        state_line("orphan", "is unreachable from the initial state",
                   "route a decision to it (on={...}) or remove it"),
        state_line("c", "can run before 'b', whose output it needs",
                   "make every path to it pass through 'b', or drop it from needs"),
        state_line("a", "states a -> b form a loop with no bound", "set max_visits=N on one of them"),
    ]


def test_machine_level_problem_does_not_hide_state_problems() -> None:
    problems = problems_of(ask("a", max_tokens=0), input_model=dict)
    assert problems == [
        machine_line("input_model is not a pydantic model class", "pass a BaseModel subclass"),
        state_line("a", "max_tokens=0 is not a positive integer",
                   "set max_tokens to the answer's budget, e.g. 500"),
    ]


def test_state_problem_does_not_hide_graph_problems() -> None:
    # max_tokens says nothing about the transition table, so the graph checks can still run
    problems = problems_of(ask("a", max_tokens=0), ask("b", on={FlowDecision.CONTINUE: END}), ask("c"))
    assert problems == [
        state_line("a", "max_tokens=0 is not a positive integer",
                   "set max_tokens to the answer's budget, e.g. 500"),
        state_line("c", "is unreachable from the initial state",
                   "route a decision to it (on={...}) or remove it"),
    ]


# --------------------------------------------------------------------------- machine-level rules


def test_no_states() -> None:
    assert problems_of() == [
        machine_line("has no states", "pass at least one LLMState or PythonState in states=[...]")]


def test_machine_name_must_be_an_identifier() -> None:
    assert problems_of(step("a"), name="my machine") == [
        machine_line("machine name 'my machine' is not an identifier", "use letters, digits and _",
                     name="my machine")]


@pytest.mark.parametrize("item", ["a", State("a")], ids=["str", "bare State"])
def test_states_must_be_llm_or_python_states(item: Any) -> None:
    assert problems_of(step("ok"), item) == [
        machine_line(f"{item!r} is not an LLMState or PythonState", "wrap it in one")]


@pytest.mark.parametrize("var", ["not valid", "a"])
def test_input_vars_keys_must_be_free_identifiers(var: str) -> None:
    assert problems_of(step("a"), input_vars={var: str}) == [
        machine_line(f"input_vars key {var!r} is not a free identifier", "rename it")]


def test_input_model_must_be_a_pydantic_model_class() -> None:
    assert problems_of(step("a"), input_model=Ticket(text="an instance")) == [
        machine_line("input_model is not a pydantic model class", "pass a BaseModel subclass")]


def test_max_branch_depth_must_not_be_negative() -> None:
    assert problems_of(step("a"), max_branch_depth=-1) == [
        machine_line("max_branch_depth is negative", "use 0 or more")]


def test_a_model_is_required() -> None:
    assert problems_of(ask("a"), model="") == [
        state_line("a", "has no model", "set model= on the state or the machine")]
    Machine("m", [ask("a", model="claude-haiku-4-5")], model="")  # the state's own model suffices


# --------------------------------------------------------------------------- state names


def test_duplicate_state_names() -> None:
    assert problems_of(step("a"), step("b"), step("a")) == [
        state_line("a", "is declared twice", "give each state a unique name")]


@pytest.mark.parametrize("name", ["END", END])
def test_reserved_state_names(name: str) -> None:
    assert problems_of(step("a"), step(name)) == [
        state_line(name, "name is reserved", "rename it (reserved: ['END', '__end__'])")]


@pytest.mark.parametrize("name", ["class", "None", "lambda", "two words", "1st", "a-b", ""])
def test_state_names_must_be_identifiers_and_not_keywords(name: str) -> None:
    assert problems_of(step("a"), step(name)) == [
        state_line(name, "name is not a Python identifier", "use letters, digits and _")]


# --------------------------------------------------------------------------- transitions


def test_unknown_transition_target() -> None:
    assert problems_of(step("a", on={FlowDecision.CONTINUE: "nowhere"}), step("b")) == [
        state_line("a", "transition continue -> unknown target 'nowhere'",
                   "use one of ['a', 'b'] or END")]


@pytest.mark.parametrize("key", ["continue", "branch:x", None, 1])
def test_on_key_must_be_a_decision(key: Any) -> None:
    assert problems_of(step("a", guard=always_continue, on={key: END})) == [
        state_line("a", f"on= key {key!r} is not a decision", "use FlowDecision.X or Branch('name')")]


@pytest.mark.parametrize(
    "decision",
    [FlowDecision.BRANCH_A, FlowDecision.BRANCH_B, Branch("escalate"),
     # a state without a guard always continues, so these overrides can never be taken either
     FlowDecision.SKIP, FlowDecision.RETRY, FlowDecision.TERMINATE],
    ids=str,
)
def test_on_entries_without_a_guard(decision: Any) -> None:
    assert problems_of(step("a", on={decision: "b"}), step("b")) == [
        state_line("a", f"has transitions for [{decision.value!r}] but no guard to choose them "
                   "(without a guard a state always continues)",
                   "add guard= or remove those on= entries")]


def test_continue_override_needs_no_guard() -> None:
    machine = Machine("m", [step("a", max_visits=3), step("b", on={FlowDecision.CONTINUE: "a"})])
    assert machine.edges("b") == {"continue": "a"}


@pytest.mark.parametrize(
    ("decision", "spelled"),
    [(FlowDecision.BRANCH_A, "FlowDecision.BRANCH_A"), (FlowDecision.BRANCH_B, "FlowDecision.BRANCH_B"),
     (Branch("escalate"), "Branch('escalate')")],
    ids=str,
)
def test_declared_decision_without_a_transition(decision: Any, spelled: str) -> None:
    problems = problems_of(step("a", guard=declared(FlowDecision.CONTINUE, decision)), step("b"))
    assert problems == [
        state_line("a", f"guard may return {decision.value} but no transition handles it",
                   f"add on={{{spelled}: '<target state>'}}")]


def test_guard_may_only_declare_decisions() -> None:
    assert problems_of(step("a", guard=declared(FlowDecision.CONTINUE, "skip"))) == [
        state_line("a", "guard declares 'skip', which is not a decision",
                   "declare FlowDecision.X or Branch('name') values")]


def test_unreachable_state() -> None:
    problems = problems_of(step("a"), step("b", on={FlowDecision.CONTINUE: END}), step("c"))
    assert problems == [
        state_line("c", "is unreachable from the initial state",
                   "route a decision to it (on={...}) or remove it")]


def test_an_undeclared_decision_is_reported_and_its_target_unreachable() -> None:
    # the guard declares CONTINUE only, so the BRANCH_A edge to c can never be taken
    problems = problems_of(
        step("a", guard=declared(FlowDecision.CONTINUE), on={FlowDecision.BRANCH_A: "c"}),
        step("b", on={FlowDecision.CONTINUE: END}),
        step("c"),
    )
    assert problems == [
        state_line("a", "has transitions for ['branch_a'], which its guard never returns",
                   "add them to @guard(...) or remove those on= entries"),
        state_line("c", "is unreachable from the initial state",
                   "route a decision to it (on={...}) or remove it"),
    ]


# --------------------------------------------------------------------------- guards


def test_guard_must_be_callable() -> None:
    assert problems_of(step("a", guard="always")) == [
        state_line("a", "guard is not callable", "pass a function (output, ctx) -> FlowDecision")]


def _needs_three(output: Any, ctx: Any, extra: Any) -> FlowDecision:
    return FlowDecision.CONTINUE


@pytest.mark.parametrize(
    "bad_guard",
    [lambda output: FlowDecision.CONTINUE,
     lambda: FlowDecision.CONTINUE,
     _needs_three,
     guard(FlowDecision.CONTINUE)(lambda output: FlowDecision.CONTINUE)],
    ids=["one argument", "no arguments", "three required arguments", "declared, one argument"],
)
def test_guard_must_take_output_and_context(bad_guard: Any) -> None:
    assert problems_of(step("a", guard=bad_guard)) == [
        state_line("a", "guard does not take (output, context)",
                   "define it as def my_guard(output, ctx) -> FlowDecision")]


@pytest.mark.parametrize(
    "good_guard",
    [always_continue, lambda *args: FlowDecision.CONTINUE,
     lambda output, ctx, extra=None: FlowDecision.CONTINUE, declared(FlowDecision.CONTINUE)],
    ids=["(output, ctx)", "*args", "optional third", "declared"],
)
def test_guards_callable_with_output_and_context_are_accepted(good_guard: Any) -> None:
    Machine("m", [step("a", guard=good_guard)])


@pytest.mark.parametrize("retry_limit", [None, 0, -1])
@pytest.mark.parametrize(
    "may_retry", [declared(FlowDecision.CONTINUE, FlowDecision.RETRY), always_continue],
    ids=["declared RETRY", "undeclared guard"],
)
def test_retry_needs_a_positive_retry_limit(may_retry: Any, retry_limit: int | None) -> None:
    assert problems_of(step("a", guard=may_retry, retry_limit=retry_limit)) == [
        state_line("a", "its guard may loop back to it (retry) but retry_limit is not a positive "
                   "number", "set retry_limit=3 (the most runs in a row)")]


def test_a_branch_back_to_the_same_state_is_bounded_like_retry() -> None:
    looping = declared(FlowDecision.CONTINUE, FlowDecision.BRANCH_A)
    assert problems_of(step("a", guard=looping, on={FlowDecision.BRANCH_A: "a"}, retry_limit=None)) == [
        state_line("a", "its guard may loop back to it (branch_a) but retry_limit is not a positive "
                   "number", "set retry_limit=3 (the most runs in a row)")]


def test_retry_limit_none_is_fine_when_the_state_cannot_retry() -> None:
    machine = Machine("m", [
        step("a", retry_limit=None),
        step("b", retry_limit=None, guard=declared(FlowDecision.CONTINUE)),
        step("c", guard=declared(FlowDecision.CONTINUE, FlowDecision.RETRY), retry_limit=1),
    ])
    assert machine.edges("c") == {"continue": END, "retry": "c"}  # a RETRY self-loop needs no max_visits


# --------------------------------------------------------------------------- needs


def test_needs_unknown_state() -> None:
    assert problems_of(step("a"), step("b", needs=["a", "ghost"])) == [
        state_line("b", "needs unknown state 'ghost'", "use one of ['a', 'b']")]


def test_needs_itself() -> None:
    assert problems_of(step("a"), step("b", needs=["b"])) == [
        state_line("b", "needs itself",
                   "remove it from needs (needs_if_ran=[...] reads its output of an earlier visit)")]


@pytest.mark.parametrize(
    ("states", "who", "needed"),
    [
        # a branches straight to c, skipping b
        ([step("a", guard=BRANCHING, on={FlowDecision.BRANCH_A: "c"}), step("b"),
          step("c", needs=["b"])], "c", "b"),
        # SKIP from a jumps over b
        ([step("a", guard=declared(FlowDecision.CONTINUE, FlowDecision.SKIP)), step("b"),
          step("c", needs=["b"])], "c", "b"),
        # the initial state runs before everything else
        ([step("a", needs=["b"]), step("b")], "a", "b"),
    ],
    ids=["branch skips it", "SKIP jumps it", "initial state"],
)
def test_a_state_that_can_run_before_a_state_it_needs(states: list[State], who: str,
                                                        needed: str) -> None:
    assert problems_of(*states) == [
        state_line(who, f"can run before {needed!r}, whose output it needs",
                   f"make every path to it pass through {needed!r}, or drop it from needs")]


def test_needs_satisfied_on_every_path() -> None:
    Machine("m", [
        step("a", guard=declared(FlowDecision.CONTINUE, FlowDecision.SKIP)),
        step("b"),
        step("c", needs=["a"]),  # the initial state dominates every state
        step("d", needs=["a", "c"]),  # both a->b->c->d and a->c->d pass through c
    ])


# --------------------------------------------------------------------------- loops


def _two_state_loop(**bounds: int) -> list[State]:
    return [
        step("draft", max_visits=bounds.get("draft")),
        step("review", max_visits=bounds.get("review"), guard=BRANCHING,
             on={FlowDecision.BRANCH_A: "draft"}),
    ]


def test_a_loop_without_max_visits() -> None:
    assert problems_of(*_two_state_loop()) == [
        state_line("draft", "states draft -> review form a loop with no bound",
                   "set max_visits=N on one of them")]


@pytest.mark.parametrize("bounded", ["draft", "review"])
def test_a_loop_with_max_visits_on_one_state_is_accepted(bounded: str) -> None:
    machine = Machine("m", _two_state_loop(**{bounded: 2}))
    assert machine.edges("review") == {"continue": END, "branch_a": "draft"}


@pytest.mark.parametrize("max_visits", [0, -1])
def test_max_visits_must_be_positive(max_visits: int) -> None:
    assert problems_of(step("a", max_visits=max_visits)) == [
        state_line("a", "max_visits must be a positive integer", "set max_visits=N or leave it None")]


# --------------------------------------------------------------------------- branching depth


def ladder(depth: int, *, side: str | None = "side") -> list[State]:
    """`depth` branching states in a row, each may divert to `side` (None: end the run early)."""
    diverge = {FlowDecision.BRANCH_A: side or END}
    rungs: list[State] = [step(f"s{i}", guard=BRANCHING, on=diverge) for i in range(depth)]
    return rungs + [step("last", on={FlowDecision.CONTINUE: END})] + ([step(side)] if side else [])


def depth_line(depth: int, limit: int) -> str:
    path = " -> ".join(f"s{i}" for i in range(depth))
    return state_line(f"s{depth - 1}", f"branching depth {depth} exceeds the limit {limit} (path {path})",
                      "flatten the branches, declare the decisions each guard really returns "
                      "with @guard(...), "
                      "or raise Machine(max_branch_depth=...)")


def test_branching_depth_default_limit_is_three() -> None:
    Machine("m", ladder(3))
    assert problems_of(*ladder(4)) == [depth_line(4, 3)]


@pytest.mark.parametrize(("depth", "limit"), [(3, 2), (1, 0), (6, 5)])
def test_branching_depth_limit_is_configurable(depth: int, limit: int) -> None:
    assert problems_of(*ladder(depth), max_branch_depth=limit) == [depth_line(depth, limit)]
    Machine("m", ladder(depth), max_branch_depth=depth)


def test_early_exits_are_not_branches() -> None:
    # a state whose only alternative is to end the run (BRANCH_A -> END, TERMINATE) does not branch
    Machine("m", ladder(5, side=None), max_branch_depth=0)
    Machine("m", [step(f"s{i}", guard=declared(FlowDecision.CONTINUE, FlowDecision.TERMINATE))
                  for i in range(5)], max_branch_depth=0)


def test_an_undeclared_guard_counts_as_a_branch() -> None:
    # without @guard(...), the guard may return any decision in the table: CONTINUE and SKIP
    # lead to different states, so each of s0..s3 branches
    states = [step(f"s{i}", guard=always_continue) for i in range(4)] + [step("last"), step("tail")]
    assert problems_of(*states) == [depth_line(4, 3)]


# --------------------------------------------------------------------------- models and budgets


@pytest.mark.parametrize("output", [dict, Ticket(text="an instance"), "Ticket"], ids=repr)
def test_output_must_be_a_pydantic_model_class(output: Any) -> None:
    assert problems_of(step("a", output=output)) == [
        state_line("a", "output is not a pydantic model class", "pass a BaseModel subclass")]


@pytest.mark.parametrize("max_tokens", [0, -5])
def test_max_tokens_must_be_positive(max_tokens: int) -> None:
    assert problems_of(ask("a", max_tokens=max_tokens)) == [
        state_line("a", f"max_tokens={max_tokens} is not a positive integer",
                   "set max_tokens to the answer's budget, e.g. 500")]


def test_python_state_run_must_be_callable() -> None:
    assert problems_of(PythonState("a", run="noop")) == [  # type: ignore[arg-type]
        state_line("a", "run= is not callable", "pass a function (ctx) -> output")]


# --------------------------------------------------------------------------- templates


def test_placeholder_not_provided_by_any_input() -> None:
    problems = problems_of(ask("a", prompt="Summarise {txt}, then {txt} again"), input_model=Ticket)
    assert problems == [  # reported once, however often it is used
        state_line("a", "prompt uses {txt}, which no input field, needed state or vars= entry provides",
                   "add the field to input_model or input_vars, compute it with "
                   "vars={'txt': lambda ctx: ...}, or fix the spelling")]


def test_placeholder_naming_a_state_missing_from_needs() -> None:
    problems = problems_of(ask("a"), ask("b", prompt="Improve: {a}"))
    assert problems == [
        state_line("b", "prompt uses {a}, which no input field, needed state or vars= entry provides",
                   "add 'a' to needs=[...] (it must run before this state)")]


def test_system_template_is_checked_too() -> None:
    assert problems_of(ask("a", system="You answer about {topic}.")) == [
        state_line("a", "system uses {topic}, which no input field, needed state or vars= entry provides",
                   "add the field to input_model or input_vars, compute it with "
                   "vars={'topic': lambda ctx: ...}, or fix the spelling")]


def test_placeholders_from_input_model_input_vars_and_needs_are_accepted() -> None:
    machine = Machine("m", [
        ask("a", prompt="{text}"),
        ask("b", prompt="{text} {raw} {a}", system="Context: {raw}", needs=["a"]),
    ], input_model=Ticket, input_vars={"raw": str})
    assert machine.templates["b"][0].names == ("text", "raw", "a")


def _malformed(source: str) -> str:
    try:
        list(Formatter().parse(source))
    except ValueError as exc:
        return f"template is malformed ({exc}); write {{{{ and }}}} for literal braces"
    raise AssertionError(f"{source!r} is well formed")


ONLY_PLAIN = "only plain {name} placeholders are allowed (no attribute access, indexing or positions)"


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("{x.__class__}", f"template uses '{{x.__class__}}'; {ONLY_PLAIN}"),
        ("{x.__class__.__mro__}", f"template uses '{{x.__class__.__mro__}}'; {ONLY_PLAIN}"),
        ("{x[0]}", f"template uses '{{x[0]}}'; {ONLY_PLAIN}"),
        ("{}", f"template uses a positional {{}}; {ONLY_PLAIN}"),
        ("{0}", f"template uses '{{0}}'; {ONLY_PLAIN}"),
        ("{x!r}", "placeholder '{x}' has a conversion or format spec; use plain {x}"),
        ("{x:>10}", "placeholder '{x}' has a conversion or format spec; use plain {x}"),
        ("{x!s:{x}}", "placeholder '{x}' has a conversion or format spec; use plain {x}"),
        ("text {x", _malformed("text {x")),
        ("text } x", _malformed("text } x")),
        ("{x}}", _malformed("{x}}")),
    ],
)
@pytest.mark.parametrize("label", ["prompt", "system"])
def test_only_plain_placeholders(label: str, template: str, problem: str) -> None:
    texts: dict[str, Any] = {"prompt": "{x}", "system": None} | {label: template}
    problems = problems_of(ask("a", **texts), input_vars={"x": str})
    assert problems == [state_line("a", f"{label} {problem}", "edit the template")]


# --------------------------------------------------------------------------- valid machines


@pytest.mark.parametrize("path", EXAMPLE_MACHINES, ids=lambda p: p.name)
def test_seed_machines_validate(path: Path) -> None:
    machine = load_machine(str(path)).machine
    assert isinstance(machine, Machine)
    assert machine.name == path.stem
    assert set(machine.table) == {s.name for s in machine.states}


def test_default_transition_table() -> None:
    machine = Machine("m", [step("a"), step("b"), step("c")])
    assert machine.table == {
        "a": {"continue": "b", "skip": "c", "retry": "a", "terminate": END},
        "b": {"continue": "c", "skip": END, "retry": "b", "terminate": END},
        "c": {"continue": END, "skip": END, "retry": "c", "terminate": END},
    }
    assert [machine.edges(s) for s in "abc"] == [{"continue": "b"}, {"continue": "c"}, {"continue": END}]
    assert machine.initial == "a"


def test_on_entries_override_and_extend_the_table() -> None:
    machine = Machine("m", [
        step("a", guard=declared(FlowDecision.CONTINUE, FlowDecision.SKIP, Branch("x")),
             on={FlowDecision.SKIP: END, Branch("x"): "c"}),
        step("b", on={FlowDecision.CONTINUE: END}),
        step("c"),
    ])
    assert machine.table["a"] == {"continue": "b", "skip": END, "retry": "a", "terminate": END,
                                  "branch:x": "c"}
    assert machine.edges("a") == {"continue": "b", "skip": END, "branch:x": "c"}
    assert machine.edges("b") == {"continue": END}


def test_decisions_are_closed_sets() -> None:
    machine = Machine("m", [
        step("plain"),
        step("declared", guard=declared(FlowDecision.CONTINUE, FlowDecision.TERMINATE)),
        step("undeclared", guard=always_continue, on={FlowDecision.BRANCH_A: "plain"}, max_visits=2),
        step("last"),
    ])
    assert machine.decisions == {
        "plain": frozenset({"continue"}),
        "declared": frozenset({"continue", "terminate"}),
        "undeclared": frozenset(DEFAULT_KEYS | {"branch_a"}),
        "last": frozenset({"continue"}),
    }
    assert machine.edges("undeclared") == machine.table["undeclared"]
    assert machine.edges("declared") == {"continue": "undeclared", "terminate": END}


def test_support_router_edges() -> None:
    machine = load_machine(str(MACHINES / "support_router.py")).machine
    assert machine.edges("sentiment_analysis") == {
        "branch_a": "upsell", "branch_b": "support", "continue": "standard_reply"}
    assert {s: machine.edges(s) for s in ("standard_reply", "upsell", "support")} == {
        "standard_reply": {"continue": END}, "upsell": {"continue": END}, "support": {"continue": END}}


# --------------------------------------------------------------------------- decision values


def test_branch_value() -> None:
    assert Branch("escalate").value == "branch:escalate"
    assert str(Branch("escalate")) == "branch:escalate"


@pytest.mark.parametrize("decision", list(FlowDecision), ids=str)
def test_flow_decision_round_trip(decision: FlowDecision) -> None:
    assert decision_from_value(decision.value) is decision


@given(st.text())
def test_branch_round_trip(name: str) -> None:
    branch = Branch(name)
    assert decision_from_value(branch.value) == branch
