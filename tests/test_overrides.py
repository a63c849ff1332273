"""What-if overrides: a validated variant of a machine, stored with the run that uses it and
applied again whenever that run is touched (resume, replay)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from statemachine_orch import (
    Branch,
    DefinitionError,
    Engine,
    FlowDecision,
    LLMState,
    Machine,
    PythonState,
    RunStatus,
    UsageError,
    guard,
    open_store,
    replay_run,
)
from statemachine_orch.definition._overrides import overrides_json, parse_overrides, with_overrides
from statemachine_orch.testing import FakeMessagesAPI


@guard(FlowDecision.CONTINUE, Branch("short"))
def by_length(output: str, ctx: object) -> FlowDecision | Branch:
    return Branch("short") if len(output) < 5 else FlowDecision.CONTINUE


def machine() -> Machine:
    return Machine("what_if", [
        LLMState("ask", prompt="Say hi.", max_tokens=20, guard=by_length, on={Branch("short"): "short"}),
        PythonState("long", run=lambda ctx: "long", on={FlowDecision.CONTINUE: "__end__"}),
        PythonState("short", run=lambda ctx: "short"),
    ], source_file=__file__)


def test_a_variant_changes_only_what_it_names_and_keeps_the_code_hash() -> None:
    base = machine()
    changes = parse_overrides({"ask": {"model": "claude-haiku-4-5", "max_tokens": 7, "params": {"temperature": 0}}},
                              where="arm.toml")
    variant = with_overrides(base, changes)
    ask = variant.by_name["ask"]
    assert (ask.model, ask.max_tokens, ask.params, ask.prompt) == ("claude-haiku-4-5", 7, {"temperature": 0}, "Say hi.")
    assert base.by_name["ask"].model is None  # the machine itself is untouched
    assert (variant.source_hash, variant.ref, variant.name) == (base.source_hash, base.ref, base.name)
    assert with_overrides(base, changes) is variant and with_overrides(variant, changes) is variant
    assert with_overrides(base, {}) is base
    assert overrides_json(changes) == {"ask": {"model": "claude-haiku-4-5", "max_tokens": 7,
                                               "params": {"temperature": 0}}}


@pytest.mark.parametrize(("data", "error", "message"), [
    ({"nope": {"model": "m"}}, UsageError, "machine 'what_if' has no state 'nope' to override"),
    ({"ask": {"modle": "m"}}, UsageError, "arm.toml: state 'ask': modle: Extra inputs are not permitted"),
    ({"ask": {"max_tokens": 0}}, UsageError, "max_tokens: Input should be greater than 0"),
    ({"long": {"prompt": "x"}}, UsageError, "state 'long' of machine 'what_if' makes no model call"),
    ({"ask": {"prompt": "Hi {nobody}"}}, DefinitionError, "prompt uses {nobody}"),
    ({"ask": {"on": {"branch:short": "nowhere"}}}, DefinitionError, "unknown target 'nowhere'"),
    ({"ask": {"on": {"sideways": "long"}}}, UsageError, "state 'ask': 'sideways' is not a valid FlowDecision"),
    (["ask"], UsageError, "overrides must be a table of state names"),
])
def test_a_bad_override_is_refused_naming_where_and_how_to_fix(data: object, error: type[Exception],
                                                              message: str) -> None:
    with pytest.raises(error, match=message.replace("{", r"\{").replace("}", r"\}")):
        with_overrides(machine(), parse_overrides(data, where="arm.toml"))


def test_an_override_routes_to_the_end_as_its_error_message_says() -> None:
    """The refusal of an unknown target says "use one of [...] or END", but an arm file's
    `continue = "END"` was refused the same way: END is a Python name, "__end__" its value."""
    variant = with_overrides(machine(), parse_overrides({"short": {"on": {"continue": "END"}}}, where="arm.toml"))
    assert variant.by_name["short"].on[FlowDecision.CONTINUE] == "__end__"


def test_a_run_started_with_overrides_keeps_them_on_resume_and_replay(db_path: Path) -> None:
    fake = FakeMessagesAPI({"ask": ["hello there", "hello there"]})
    base = machine()
    changes = {"overrides": overrides_json(parse_overrides(
        {"ask": {"prompt": "Say hello."}, "long": {"on": {"continue": "short"}}}, where="test"))}

    async def scenario() -> None:
        async with Engine(open_store(db_path), model=fake.model()) as engine:
            run = await engine.start(base, run_id="r1", options=changes)
            await run.step()
            run.request_stop()
            stopped = await run.run_to_end()
            assert (stopped.status, stopped.path) == (RunStatus.INTERRUPTED, ["ask"])
            done = await engine.aresume("r1", base)  # given the base machine: the stored overrides apply
            assert done.path == ["ask", "long", "short"]
            assert (await replay_run(engine.store, "r1", base)).divergence is None
            plain = await engine.arun(base, run_id="r2")
            assert plain.path == ["ask", "long"]  # the base table ends after `long`

    asyncio.run(scenario())
    assert [r.body["messages"][0]["content"] for r in fake.requests][:1] == ["Say hello."]
    assert fake.requests[1].body["messages"][0]["content"] == "Say hi."
