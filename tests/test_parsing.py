"""Text answers parsed into outputs (issue 12, item 6): `xml_tags`, and `LLMState(parse=...)`
through the real SDK, the in-process fake Messages API and real SQLite files. A parse error is
an invalid answer: re-asked, recorded, paid for, then failing the step or reaching the guard.
The parsed value is the stored output: a resume, a cache hit and a replay give it back."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from statemachine_orch import (
    END,
    Branch,
    DefinitionError,
    Engine,
    FlowDecision,
    Hook,
    InvalidOutput,
    LLMState,
    Machine,
    PythonState,
    RunRecord,
    RunStatus,
    StepContext,
    TransitionRecord,
    UsageError,
    open_store,
    replay_run,
    xml_tags,
)
from statemachine_orch.testing import FakeMessagesAPI

from .helpers import MODEL, cost_of, query, reply, usage_of

TAGGED = "<thoughts>\n  B is cheaper.\n</thoughts>\n<response>B</response>"
PARSED = {"thoughts": "B is cheaper.", "response": "B"}
UNTAGGED = "I would pick B."
NO_TAGS = ("parse failed: ValueError: the answer has no <thoughts> or <response> section; "
           "answer with <thoughts>...</thoughts> <response>...</response>")


class Choice(BaseModel):
    response: str


class Spy:
    """A guard that records what it is shown; raises once when `fail_first`."""

    def __init__(self, *, fail_first: bool = False) -> None:
        self.seen: list[Any] = []
        self.fail_first = fail_first

    def __call__(self, output: Any, ctx: StepContext) -> Any:
        self.seen.append(output)
        if self.fail_first and len(self.seen) == 1:
            raise RuntimeError("guard bug")
        if isinstance(output, InvalidOutput):
            return Branch("manual")
        return FlowDecision.CONTINUE


def picking(*, guard: Any = None, use: str = "Act on: {pick}", **options: Any) -> Machine:
    """`pick` answers in tags, `use` reads the parsed answer from its prompt."""
    options = {"parse": xml_tags("thoughts", "response"), **options}
    return Machine("picking", model=MODEL, states=[
        LLMState("pick", prompt="Pick A or B.", guard=guard, **options),
        LLMState("use", prompt=use, needs=["pick"]),
    ])


@pytest.fixture
def engine(db_path: Path, fake: FakeMessagesAPI) -> Iterator[Engine]:
    with Engine(open_store(db_path), model=fake.model()) as started:
        yield started


def rows(engine: Engine, run_id: str) -> list[TransitionRecord]:
    return asyncio.run(engine.store.transitions(run_id))


# --------------------------------------------------------------------------- xml_tags


def test_xml_tags_reads_each_section_stripped() -> None:
    parse = xml_tags("thoughts", "response")
    assert parse(f"Sure.\n{TAGGED}\nThanks!") == PARSED
    assert parse('<response kind="final">\nB\n</response><thoughts>x</thoughts>') == {
        "thoughts": "x", "response": "B"}  # any order; attributes on the opening tag
    assert parse("<thoughts>1</thoughts><thoughts>2</thoughts><response>r</response>")["thoughts"] == "1"


def test_xml_tags_names_the_missing_section_and_what_to_answer() -> None:
    with pytest.raises(ValueError) as raised:
        xml_tags("thoughts", "response")("<thoughts>only this</thoughts>")
    assert str(raised.value) == ("the answer has no <response> section; answer with "
                                 "<thoughts>...</thoughts> <response>...</response>")


def test_xml_tags_optional_sections_are_none_when_missing() -> None:
    assert xml_tags("thoughts", "response", required=["response"])("<response>B</response>") == {
        "thoughts": None, "response": "B"}
    assert xml_tags("feedback", required="feedback")("<feedback>ok</feedback>") == {"feedback": "ok"}
    assert xml_tags("a", "b", required=False)("neither") == {"a": None, "b": None}


@pytest.mark.parametrize(("names", "required", "message"), [
    ((), True, "xml_tags() needs tag names, got none"),
    (("ok", "no spaces"), True, "xml_tags() needs tag names, got ['no spaces']"),
    (("a",), ["b"], "xml_tags(required=...) names ['b'], which are not among its tags"),
])
def test_xml_tags_refuses_what_it_cannot_parse(names: tuple[str, ...], required: Any, message: str) -> None:
    with pytest.raises(UsageError) as raised:
        xml_tags(*names, required=required)
    assert raised.value.what == message


# --------------------------------------------------------------------------- parse in a step


def test_a_parsed_answer_is_the_output_the_guard_the_next_prompt_and_the_log_see(
        engine: Engine, fake: FakeMessagesAPI, db_path: Path) -> None:
    fake.on("pick", reply(TAGGED)).on("use", reply("done"))
    spy = Spy()
    result = engine.run(picking(guard=spy))
    assert result.status is RunStatus.COMPLETED
    assert spy.seen == [PARSED] and result.outputs["pick"] == PARSED
    assert fake.requests[-1].prompt == f"Act on: {json.dumps(PARSED)}"
    (stored,) = query(db_path, "SELECT output FROM transitions WHERE from_state = 'pick'")
    assert json.loads(stored["output"]) == PARSED  # an object, not the text


def test_an_answer_the_parse_rejects_is_reasked_with_the_error_then_passes(
        engine: Engine, fake: FakeMessagesAPI) -> None:
    untagged, tagged = reply(UNTAGGED, input_tokens=40, output_tokens=5), reply(TAGGED, input_tokens=90)
    fake.on("pick", untagged, tagged).on("use", reply("done"))
    spy = Spy()
    result = engine.run(picking(guard=spy))
    assert result.status is RunStatus.COMPLETED and spy.seen == [PARSED]
    assert fake.calls("pick") == 2

    pick, _ = rows(engine, result.run_id)
    (rejected,) = pick.attempts
    assert (rejected.kind, rejected.error, rejected.request_id) == ("invalid_output", NO_TAGS, "req_fake_000001")
    assert rejected.response is not None and rejected.response["content"][0]["text"] == UNTAGGED
    first, second = (r.body for r in fake.requests[:2])
    assert (rejected.request, pick.request) == (first, second)
    assert second["messages"][1:] == [
        {"role": "assistant", "content": rejected.response["content"]},
        {"role": "user", "content": f"That answer was not valid: {NO_TAGS}. Answer again, in the format "
                                    "the instructions ask for."}]
    assert "tool" not in json.dumps(second["messages"][2])  # a text answer is not told to call a tool
    assert (rejected.usage, rejected.cost_usd) == (usage_of(untagged), pytest.approx(cost_of(untagged)))
    assert pick.usage == usage_of(untagged, tagged)  # both calls paid for and counted
    assert pick.cost_usd == pytest.approx(cost_of(untagged, tagged))


def test_an_answer_still_unparsed_after_the_repairs_fails_the_step(engine: Engine, fake: FakeMessagesAPI) -> None:
    fake.on("pick", reply(UNTAGGED))
    result = engine.run(picking(repairs=2))
    assert (result.status, result.error) == (RunStatus.FAILED, f"LLMError: {NO_TAGS}")
    assert fake.calls("pick") == 3
    (pick,) = rows(engine, result.run_id)
    assert [a.kind for a in pick.attempts] == ["invalid_output"] * 2
    assert pick.output is None and pick.response is not None  # the last answer kept for the audit


def test_with_on_invalid_guard_an_unparsed_answer_reaches_the_guard(engine: Engine, fake: FakeMessagesAPI) -> None:
    fake.on("pick", reply(UNTAGGED)).on("manual", reply("handled"))
    spy = Spy()
    machine = Machine("picking", model=MODEL, states=[
        LLMState("pick", prompt="Pick A or B.", parse=xml_tags("thoughts", "response"), repairs=1,
                 on_invalid="guard", guard=spy, on={Branch("manual"): "manual", FlowDecision.CONTINUE: END}),
        LLMState("manual", prompt="Pick by hand."),
    ])
    result = engine.run(machine)
    assert (result.status, result.path) == (RunStatus.COMPLETED, ["pick", "manual"])
    assert spy.seen == [InvalidOutput("invalid_output", NO_TAGS, UNTAGGED, None)]
    assert fake.calls("pick") == 2


def test_a_parse_that_returns_what_cannot_be_stored_fails_the_step_naming_it(
        engine: Engine, fake: FakeMessagesAPI) -> None:
    fake.on("pick", reply(TAGGED))
    machine = Machine("odd", model=MODEL, states=[LLMState("pick", prompt="Pick.", parse=lambda text: {text})])
    result = engine.run(machine)
    assert result.status is RunStatus.FAILED
    assert result.error == ("StepError: parse of state 'pick' returned a value that cannot be stored: Object of "
                            "type set is not JSON serializable; return JSON data (a dict, list, str, number) "
                            "or a pydantic model")
    assert fake.calls("pick") == 1  # a parser's bug is not re-asked


# --------------------------------------------------------------------------- resume, cache, replay


def test_a_parsed_output_comes_back_as_data_on_resume(engine: Engine, fake: FakeMessagesAPI) -> None:
    fake.on("pick", reply(TAGGED))
    seen: list[Any] = []

    def act(ctx: StepContext) -> str:
        seen.append(ctx.outputs["pick"])
        if len(seen) == 1:
            raise RuntimeError("tool down")
        return "acted"

    machine = Machine("acting", model=MODEL, states=[
        LLMState("pick", prompt="Pick.", parse=xml_tags("thoughts", "response")),
        PythonState("act", run=act, needs=["pick"]),
    ])
    failed = engine.run(machine)
    assert failed.status is RunStatus.FAILED
    resumed = engine.resume(failed.run_id, machine)
    assert resumed.status is RunStatus.COMPLETED
    assert seen == [PARSED, PARSED] and resumed.outputs["pick"] == PARSED  # a dict, never its text
    assert fake.calls("pick") == 1


def test_a_parsed_answer_whose_guard_failed_is_judged_again_on_resume(engine: Engine, fake: FakeMessagesAPI) -> None:
    fake.on("pick", reply(TAGGED)).on("use", reply("done"))
    spy = Spy(fail_first=True)
    failed = engine.run(picking(guard=spy))
    assert failed.status is RunStatus.FAILED
    resumed = engine.resume(failed.run_id, picking(guard=spy))
    assert resumed.status is RunStatus.COMPLETED
    assert spy.seen == [PARSED, PARSED] and fake.calls("pick") == 1
    assert rows(engine, failed.run_id)[1].source == "recorded"


def test_a_pending_answer_goes_through_the_parse_as_it_is_on_resume(engine: Engine, fake: FakeMessagesAPI) -> None:
    fake.on("pick", reply(TAGGED)).on("use", reply("done"))
    spy = Spy()

    def choosing(output: Any, ctx: StepContext) -> Any:
        spy.seen.append(output)
        return FlowDecision.CONTINUE if output["choice"] == "B" else FlowDecision.TERMINATE

    failed = engine.run(picking(guard=choosing))  # the guard wants a key the parse does not give
    assert (failed.status, spy.seen) == (RunStatus.FAILED, [PARSED])
    rejecting = picking(guard=choosing, parse=xml_tags("verdict"))
    refused = engine.resume(failed.run_id, rejecting)  # the paid answer lacks <verdict>: unusable, no re-ask
    assert (refused.status, fake.calls("pick")) == (RunStatus.FAILED, 1)
    assert refused.error == ("LLMError: parse failed: ValueError: the answer has no <verdict> section; "
                             "answer with <verdict>...</verdict>")

    fake.on("pick", reply(TAGGED))
    failed = engine.run(picking(guard=choosing), run_id="fixed")
    fixed = picking(guard=choosing, parse=lambda text: {"choice": xml_tags("response")(text)["response"]})
    resumed = engine.resume("fixed", fixed)
    assert resumed.status is RunStatus.COMPLETED
    assert spy.seen[-1] == {"choice": "B"} and resumed.outputs["pick"] == {"choice": "B"}
    assert fake.calls("pick") == 2  # one per run: the resume parsed the paid answer again


def test_a_parsed_answer_kept_before_its_process_stopped_is_committed_on_resume(
        db_path: Path, fake: FakeMessagesAPI) -> None:
    class Stop(Hook):
        def after_output(self, run: RunRecord, step: TransitionRecord, output: Any) -> None:
            raise RuntimeError("process stopping")

    fake.on("pick", reply(TAGGED)).on("use", reply("done"))
    with Engine(open_store(db_path), model=fake.model(), hooks=[Stop()]) as engine:
        with pytest.raises(RuntimeError):
            engine.run(picking(), run_id="kept")
    spy = Spy()
    with Engine(open_store(db_path), model=fake.model()) as engine:
        resumed = engine.resume("kept", picking(guard=spy))
    assert resumed.status is RunStatus.COMPLETED
    assert spy.seen == [PARSED] and resumed.outputs["pick"] == PARSED
    assert fake.calls("pick") == 1  # the kept answer was not asked for again


def test_a_cache_hit_goes_through_the_parse(engine: Engine, fake: FakeMessagesAPI) -> None:
    fake.on("pick", reply("<response>B</response>"), reply(TAGGED))
    lenient = xml_tags("thoughts", "response", required=["response"])
    spy = Spy()

    def cached(parse: Any) -> Machine:
        return Machine("cached", model=MODEL, states=[LLMState("pick", prompt="Pick.", parse=parse, cache=True,
                                                                guard=spy)])

    engine.run(cached(lenient))
    hit = engine.run(cached(lenient))
    assert fake.calls("pick") == 1 and rows(engine, hit.run_id)[0].source == "cache"
    assert spy.seen == [{"thoughts": None, "response": "B"}] * 2  # parsed, not the cached text

    strict = engine.run(cached(xml_tags("thoughts", "response")))  # the cached answer lacks <thoughts>
    assert fake.calls("pick") == 2 and rows(engine, strict.run_id)[0].source == "llm"
    assert spy.seen[-1] == PARSED


def test_a_reasked_parsed_run_replays_with_no_calls(engine: Engine, fake: FakeMessagesAPI) -> None:
    fake.on("pick", reply(UNTAGGED), reply(TAGGED)).on("use", reply("done"))
    result = engine.run(picking())
    calls = fake.calls()
    report = asyncio.run(replay_run(engine.store, result.run_id, picking()))
    assert (report.matches, report.compared) == (True, 2)
    assert fake.calls() == calls  # the recorded answers, the rejected one too, were served again
    changed = asyncio.run(replay_run(engine.store, result.run_id, picking(use="Act now on: {pick}")))
    assert changed.divergence is not None and changed.divergence.kind == "request"  # it compares, too


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(("options", "problem", "fix"), [
    ({"parse": str.strip, "output": Choice}, "sets both output= and parse=",
     "keep output= for a structured answer (a tool call) or parse= for a text answer"),
    ({"parse": "xml"}, "parse is not a function of one argument (the answer's text)",
     "pass parse=xml_tags('response') or def my_parse(text) -> value"),
    ({"parse": lambda text, strict: text}, "parse is not a function of one argument (the answer's text)",
     "pass parse=xml_tags('response') or def my_parse(text) -> value"),
])
def test_parse_is_checked_when_the_machine_is_defined(options: dict[str, Any], problem: str, fix: str) -> None:
    with pytest.raises(DefinitionError) as raised:
        Machine("m", model=MODEL, states=[LLMState("a", prompt="Go.", **options)])
    assert [p.split(": ", 1)[1] for p in raised.value.problems
            if "parse" in p] == [f"state 'a': {problem}; fix: {fix}"]
