"""The engine through the real SDK (in-process httpx transport) and real SQLite files."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from statemachine_orch import (
    END,
    Branch,
    Budget,
    Engine,
    FlowDecision,
    InputError,
    LLMState,
    Machine,
    Owner,
    PythonState,
    RunBusyError,
    RunStatus,
    SQLiteStore,
    StepContext,
    UsageError,
    guard,
    open_store,
)
from statemachine_orch.llm._retry import NO_RETRY
from statemachine_orch.testing import FakeMessagesAPI, Reply, capture_trace, error

from .helpers import (
    MACHINES,
    stored_rows,
)


def load(name: str) -> Machine:
    from statemachine_orch import load_machine

    return load_machine(str(MACHINES / f"{name}.py")).machine


def scripted_guard(*decisions: Any) -> Callable[[Any, StepContext], Any]:
    """A guard that returns the given decisions in order (the last one repeats)."""
    seen: list[int] = []

    def decide(output: Any, ctx: StepContext) -> Any:
        seen.append(1)
        return decisions[min(len(seen), len(decisions)) - 1]

    return decide


def four_states(first_guard: Any, *, on: dict[Any, str] | None = None, retry_limit: int = 3) -> Machine:
    return Machine("four", [
        LLMState("a", prompt="A", guard=first_guard, on=on or {}, retry_limit=retry_limit),
        LLMState("b", prompt="B"),
        LLMState("c", prompt="C"),
        LLMState("d", prompt="D"),
        LLMState("x", prompt="X", on={FlowDecision.CONTINUE: END}),
    ] if on else [
        LLMState("a", prompt="A", guard=first_guard, retry_limit=retry_limit),
        LLMState("b", prompt="B"),
        LLMState("c", prompt="C"),
        LLMState("d", prompt="D"),
    ])


@pytest.fixture
def engine(db_path: Path, fake: FakeMessagesAPI) -> Iterator[Engine]:
    fake.default = "auto"
    with Engine(open_store(db_path), model=fake.model()) as eng:
        yield eng


def log_of(engine: Engine, run_id: str) -> list[Any]:
    store = engine.store
    assert isinstance(store, SQLiteStore)
    return asyncio.run(store.transitions(run_id))


# --------------------------------------------------------------------------- decisions


@pytest.mark.parametrize(
    ("decisions", "path", "status"),
    [
        ((FlowDecision.CONTINUE,), ["a", "b", "c", "d"], RunStatus.COMPLETED),
        ((FlowDecision.SKIP,), ["a", "c", "d"], RunStatus.COMPLETED),
        ((FlowDecision.RETRY, FlowDecision.CONTINUE), ["a", "a", "b", "c", "d"], RunStatus.COMPLETED),
        ((FlowDecision.TERMINATE,), ["a"], RunStatus.TERMINATED),
    ],
)
def test_default_transitions(engine: Engine, decisions: tuple[FlowDecision, ...], path: list[str],
                             status: RunStatus) -> None:
    result = engine.run(four_states(scripted_guard(*decisions)))
    assert result.status is status
    assert result.path == path


def test_skip_from_the_last_but_one_state_ends_the_run(engine: Engine) -> None:
    machine = Machine("tail", [
        LLMState("a", prompt="A"),
        LLMState("b", prompt="B", guard=scripted_guard(FlowDecision.SKIP)),
        LLMState("c", prompt="C"),
    ])
    assert engine.run(machine).path == ["a", "b"]


@pytest.mark.parametrize(
    ("decision", "target"),
    [(FlowDecision.BRANCH_A, "c"), (FlowDecision.BRANCH_B, "d"), (Branch("escalate"), "x")],
)
def test_branches_follow_the_table(engine: Engine, decision: Any, target: str) -> None:
    on = {FlowDecision.BRANCH_A: "c", FlowDecision.BRANCH_B: "d", Branch("escalate"): "x"}
    result = engine.run(four_states(scripted_guard(decision), on=on))
    assert result.path[:2] == ["a", target]
    rows = log_of(engine, result.run_id)
    assert (rows[0].decision, rows[0].to_state) == (decision.value, target)


def test_retry_attempts_are_counted_and_bounded(engine: Engine) -> None:
    result = engine.run(four_states(scripted_guard(FlowDecision.RETRY), retry_limit=3))
    assert result.status is RunStatus.FAILED
    rows = log_of(engine, result.run_id)
    assert [(r.from_state, r.to_state, r.attempt) for r in rows] == [
        ("a", "a", 1), ("a", "a", 2), ("a", None, 3)]
    assert rows[-1].error is not None and rows[-1].error.startswith("RetryLimitError")
    assert rows[-1].decision == "retry"


def test_a_branch_back_to_the_same_state_is_bounded_by_retry_limit(engine: Engine) -> None:
    machine = Machine("self_loop", [
        LLMState("work", prompt="w", retry_limit=2, guard=scripted_guard(FlowDecision.BRANCH_A),
                 on={FlowDecision.BRANCH_A: "work"}),
    ])
    result = engine.run(machine)
    assert result.status is RunStatus.FAILED
    assert result.path == ["work"]
    assert "RetryLimitError: state 'work' decided branch_a (back to itself) after attempt 2" in (
        result.error or "")


def test_loop_bounded_by_max_visits(engine: Engine) -> None:
    machine = Machine("loop", [
        LLMState("draft", prompt="draft", max_visits=2),
        LLMState("review", prompt="review", guard=scripted_guard(FlowDecision.BRANCH_A),
                 on={FlowDecision.BRANCH_A: "draft"}),
    ])
    result = engine.run(machine)
    assert result.status is RunStatus.FAILED
    assert result.path == ["draft", "review", "draft"]
    assert "VisitLimitError" in (result.error or "")


@pytest.mark.parametrize(
    ("returned", "message"),
    [("continue", "not a decision"), (None, "not a decision"),
     (FlowDecision.BRANCH_A, "has no transition for")],
)
def test_guard_outside_the_closed_set_is_a_recorded_error(engine: Engine, returned: Any,
                                                          message: str) -> None:
    result = engine.run(four_states(lambda output, ctx: returned))
    assert result.status is RunStatus.FAILED
    rows = log_of(engine, result.run_id)
    assert len(rows) == 1 and rows[0].to_state is None and rows[0].decision is None
    assert rows[0].error is not None and rows[0].error.startswith("GuardError") and message in rows[0].error
    assert rows[0].output is not None  # the paid answer is kept


def test_declared_guard_may_not_return_an_undeclared_decision(engine: Engine) -> None:
    @guard(FlowDecision.CONTINUE)
    def only_continue(output: str, ctx: StepContext) -> FlowDecision:
        return FlowDecision.SKIP

    result = engine.run(four_states(only_continue))
    assert result.status is RunStatus.FAILED
    assert "skip" in (result.error or "")


def test_reason_records_what_the_guard_saw(engine: Engine, fake: FakeMessagesAPI) -> None:
    fake.on("a", "looks fine")
    result = engine.run(four_states(lambda o, c: FlowDecision.CONTINUE.because(f"saw {o!r}")))
    first = log_of(engine, result.run_id)[0]
    assert first.reason == "saw 'looks fine'"
    default = engine.run(four_states(lambda o, c: FlowDecision.CONTINUE))
    assert "'looks fine'" in (log_of(engine, default.run_id)[0].reason or "")


# --------------------------------------------------------------------------- the seed's machines


def test_report_dependencies_reach_later_prompts(engine: Engine, fake: FakeMessagesAPI) -> None:
    answers = {s: f"<<{s} answer>>" for s in
               ["data_validation", "trend_analysis", "risk_assessment", "recommendations",
                "executive_summary"]}
    for state, text in answers.items():
        fake.on(state, text)
    result = engine.run(load("report"), {"sales": [1, 2, 3]})
    assert result.status is RunStatus.COMPLETED
    assert result.path == list(answers)
    by_state = {r.state: r for r in fake.requests}
    assert [r.body["max_tokens"] for r in fake.requests] == [500, 1000, 800, 1000, 600]
    assert '"sales"' in by_state["data_validation"].prompt
    assert answers["data_validation"] in by_state["trend_analysis"].prompt
    assert answers["trend_analysis"] in by_state["risk_assessment"].prompt
    summary = by_state["executive_summary"].prompt
    assert all(answers[s] in summary for s in ("trend_analysis", "risk_assessment", "recommendations"))
    assert result.outputs["executive_summary"] == answers["executive_summary"]


def test_structured_output_is_validated_through_tool_use(engine: Engine, fake: FakeMessagesAPI) -> None:
    invoice = {"vendor": "V", "invoice_number": "1", "date": "2026-01-01", "currency": "EUR",
               "line_items": [{"description": "x", "quantity": 2, "unit_price": 5}], "total": 11}
    fake.on("extract_invoice", invoice)
    fake.on("review_note", "please check")
    result = engine.run(load("extract"), {"text": "invoice"})
    assert result.path == ["extract_invoice", "check_totals", "review_note"]
    extracted = result.outputs["extract_invoice"]
    assert isinstance(extracted, BaseModel) and extracted.total == 11  # type: ignore[attr-defined]
    request = fake.requests[0].body
    assert request["tool_choice"] == {"type": "tool", "name": "submit_extract_invoice"}
    assert request["tools"][0]["input_schema"]["title"] == "Invoice"
    assert result.outputs["check_totals"] == {"computed_total": 10.0, "stated_total": 11.0,
                                              "consistent": False}


@pytest.mark.parametrize(
    ("reply", "kind"),
    [(Reply(data={"vendor": "only"}), "does not match Invoice"),
     (Reply(text="no tool call"), "did not call"),
     (Reply(text="I can't", stop_reason="refusal"), "refused"),
     (Reply(data={}, stop_reason="max_tokens"), "cut off at max_tokens=1000")],
)
def test_unusable_answers_fail_the_step_with_the_response_kept(engine: Engine, fake: FakeMessagesAPI,
                                                                reply: Reply, kind: str) -> None:
    fake.on("extract_invoice", reply)
    result = engine.run(load("extract"), {"text": "invoice"})
    assert result.status is RunStatus.FAILED
    row = log_of(engine, result.run_id)[0]
    assert kind in (row.error or "")
    assert row.response is not None and row.request_id is not None and row.output is None


def test_api_error_is_recorded_with_status_and_request_id(engine: Engine, fake: FakeMessagesAPI) -> None:
    fake.on("a", error(400, "prompt is too long"))
    result = engine.run(four_states(None))
    assert result.status is RunStatus.FAILED
    row = log_of(engine, result.run_id)[0]
    assert row.error == ("LLMError: Messages API returned 400: invalid_request_error: prompt is too long")
    assert row.request is not None and row.response is None


def test_python_states_sync_and_async(engine: Engine) -> None:
    async def double(ctx: StepContext) -> dict[str, int]:
        await asyncio.sleep(0)
        return {"n": ctx.outputs["count"]["n"] * 2}

    machine = Machine("py", [
        PythonState("count", run=lambda ctx: {"n": len(ctx.input["items"])}),
        PythonState("double", run=double, needs=["count"]),
    ])
    result = engine.run(machine, {"items": [1, 2, 3]})
    assert result.outputs == {"count": {"n": 3}, "double": {"n": 6}}
    assert [r.source for r in log_of(engine, result.run_id)] == ["python", "python"]


def test_python_state_output_must_be_json(engine: Engine) -> None:
    machine = Machine("bad_output", [PythonState("p", run=lambda ctx: {"when": object()})])
    result = engine.run(machine)
    assert result.status is RunStatus.FAILED
    assert "cannot be stored" in (result.error or "")


def test_input_model_rejects_bad_input_and_stores_nothing(engine: Engine, db_path: Path) -> None:
    with pytest.raises(InputError, match="input does not match Ticket: text: Field required"):
        engine.run(load("support_router"), {"txt": "hi"})
    with pytest.raises(InputError, match="must be a JSON object"):
        engine.run(load("support_router"), [1, 2])  # type: ignore[arg-type]
    assert sqlite3.connect(db_path).execute("SELECT count(*) FROM runs").fetchone()[0] == 0


def test_sync_entry_point_refuses_a_running_loop(engine: Engine) -> None:
    async def inside() -> None:
        engine.run(four_states(None))

    with pytest.raises(UsageError, match=r"await engine\.arun"):
        asyncio.run(inside())


# --------------------------------------------------------------------------- durability and resume


def test_every_transition_is_committed_with_output_request_and_usage(engine: Engine, db_path: Path,
                                                                     fake: FakeMessagesAPI) -> None:
    fake.on("a", "alpha")
    result = engine.run(four_states(None))
    conn = sqlite3.connect(db_path)
    rows = conn.execute("SELECT seq, from_state, to_state, output, request, response, request_id, "
                        "input_tokens, output_tokens FROM transitions WHERE run_id = ? ORDER BY seq",
                        (result.run_id,)).fetchall()
    assert [r[:3] for r in rows] == [(1, "a", "b"), (2, "b", "c"), (3, "c", "d"), (4, "d", END)]
    assert json.loads(rows[0][3]) == "alpha"
    assert json.loads(rows[0][4])["messages"][0]["content"] == "A"
    assert json.loads(rows[0][5])["content"][0]["text"] == "alpha"
    assert rows[0][6] == "req_fake_000001"
    response_usage = json.loads(rows[0][5])["usage"]
    assert (rows[0][7], rows[0][8]) == (response_usage["input_tokens"], response_usage["output_tokens"])
    status, owner = conn.execute("SELECT status, owner FROM runs WHERE run_id = ?",
                                 (result.run_id,)).fetchone()
    assert (status, owner) == ("completed", None)


def test_guard_error_keeps_the_paid_answer_and_resume_rejudges_it(db_path: Path,
                                                                  fake: FakeMessagesAPI) -> None:
    fake.on("a", "the answer")
    broken = {"on": True}

    def flaky(output: str, ctx: StepContext) -> FlowDecision:
        if broken["on"]:
            raise RuntimeError("bug in guard")
        return FlowDecision.CONTINUE

    machine = four_states(flaky)
    fake.default = "auto"
    with Engine(open_store(db_path), model=fake.model()) as engine:
        failed = engine.run(machine)
        assert failed.status is RunStatus.FAILED
        assert "GuardError: guard flaky raised RuntimeError: bug in guard" == failed.error
        broken["on"] = False
        resumed = engine.resume(failed.run_id, machine)
    assert resumed.status is RunStatus.COMPLETED
    assert fake.calls("a") == 1  # the guard re-ran on the recorded answer: no second call
    rows = stored_rows(db_path, failed.run_id)
    assert [(r.seq, r.from_state, r.to_state, r.source, r.attempt) for r in rows[:2]] == [
        (1, "a", None, "llm", 1), (2, "a", "b", "recorded", 2)]
    assert rows[1].output == "the answer" and rows[1].response == rows[0].response
    assert rows[1].usage.input_tokens == 0  # not paid again
    assert resumed.path == ["a", "b", "c", "d"]


def test_resume_after_failure_does_not_resend_committed_steps(db_path: Path,
                                                              fake: FakeMessagesAPI) -> None:
    fake.default = "auto"
    fake.on("c", error(500, "boom"), "recovered")
    machine = four_states(None)
    with Engine(open_store(db_path), model=fake.model(retry=NO_RETRY)) as engine:
        failed = engine.run(machine)
        assert failed.status is RunStatus.FAILED and failed.path == ["a", "b"]
        resumed = engine.resume(failed.run_id, machine)
    assert resumed.status is RunStatus.COMPLETED
    assert resumed.path == ["a", "b", "c", "d"]
    assert resumed.outputs["c"] == "recovered"
    assert [fake.calls(s) for s in "abcd"] == [1, 1, 2, 1]


def test_resume_refuses_finished_and_foreign_runs(engine: Engine) -> None:
    done = engine.run(four_states(None))
    with pytest.raises(UsageError, match="already completed"):
        engine.resume(done.run_id, four_states(None))
    failing = engine.run(Machine("other", [PythonState("p", run=lambda ctx: 1 / 0)]))
    with pytest.raises(UsageError, match="belongs to machine 'other'"):
        engine.resume(failing.run_id, four_states(None))


def test_a_live_owner_blocks_a_second_driver_and_a_dead_one_does_not(db_path: Path,
                                                                     fake: FakeMessagesAPI) -> None:
    fake.default = "auto"
    machine = four_states(None)
    with Engine(open_store(db_path), model=fake.model()) as first:
        run = asyncio.run(first.start(machine))  # owned by this (live) process, not finished
        with Engine(open_store(db_path), model=fake.model()) as second:
            with pytest.raises(RunBusyError, match=f"pid {run.owner.pid}"):
                second.resume(run.run_id, machine)
            # pretend the owner died: a pid that cannot exist on this host
            dead = Owner("dead-token", run.owner.host, 2**22 + 1, run.owner.boot_id, None)
            conn = sqlite3.connect(db_path)
            with conn:
                conn.execute("UPDATE runs SET owner = ?, owner_info = ? WHERE run_id = ?",
                             (dead.token, dead.info_json(), run.run_id))
            result = second.resume(run.run_id, machine)
    assert result.status is RunStatus.COMPLETED
    assert result.path == ["a", "b", "c", "d"]


def test_trace_emits_one_transition_event_per_log_row(db_path: Path, fake: FakeMessagesAPI) -> None:
    fake.default = "auto"
    machine = Machine("two", [LLMState("a", prompt="A"), PythonState("b", run=lambda ctx: "ok")])
    with capture_trace() as (tracer, events):
        with Engine(open_store(db_path), model=fake.model(), hooks=[tracer]) as engine:
            result = engine.run(machine)
    assert [e["event"] for e in events] == ["run_started", "transition", "transition", "run_finished"]
    transitions = [e for e in events if e["event"] == "transition"]
    rows = stored_rows(db_path, result.run_id)
    for event, row in zip(transitions, rows, strict=True):
        assert {k: event[k] for k in ("run_id", "machine", "seq", "from_state", "to_state", "decision",
                                      "attempt", "input_tokens", "output_tokens")} == {
            "run_id": row.run_id, "machine": "two", "seq": row.seq, "from_state": row.from_state,
            "to_state": row.to_state, "decision": row.decision, "attempt": row.attempt,
            "input_tokens": row.usage.input_tokens, "output_tokens": row.usage.output_tokens}
        assert event["tokens"] == row.usage.input_tokens + row.usage.output_tokens
        assert event["latency_ms"] >= 0
    assert events[-1]["status"] == "completed" and events[-1]["steps"] == 2


def test_many_concurrent_runs_in_one_process_share_one_database(db_path: Path,
                                                                fake: FakeMessagesAPI) -> None:
    fake.default = "auto"
    machine = four_states(None)

    async def main() -> list[Any]:
        async with Engine(open_store(db_path), model=fake.model()) as engine:
            return await asyncio.gather(*(engine.arun(machine) for _ in range(50)))

    results = asyncio.run(main())
    assert {r.status for r in results} == {RunStatus.COMPLETED}
    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT count(*) FROM transitions").fetchone()[0] == 50 * 4
    assert conn.execute("SELECT count(DISTINCT run_id) FROM runs").fetchone()[0] == 50


def test_an_exhausted_budget_routes_to_the_declared_branch_without_calling(
        db_path: Path, fake: FakeMessagesAPI) -> None:
    fake.default = "auto"
    machine = Machine("budgeted", [
        LLMState("deep", prompt="Go deep", max_tokens=4000, on_budget=Branch("cheap"),
                 on={Branch("cheap"): "quick", FlowDecision.CONTINUE: END}),
        LLMState("quick", prompt="Be brief", max_tokens=50),
    ])
    with Engine(open_store(db_path), model=fake.model()) as engine:
        result = engine.run(machine, budget=Budget(max_tokens=1000))
    assert result.status is RunStatus.COMPLETED and result.path == ["deep", "quick"]
    assert fake.calls("deep") == 0 and fake.calls("quick") == 1
    first = stored_rows(db_path, result.run_id)[0]
    assert (first.source, first.decision, first.to_state) == ("budget", "branch:cheap", "quick")
    assert first.reason is not None and "max_tokens 1000" in first.reason


def test_an_empty_answer_is_never_taken_as_output(engine: Engine, fake: FakeMessagesAPI) -> None:
    fake.on("a", "   ")
    result = engine.run(four_states(lambda output, ctx: FlowDecision.CONTINUE))
    assert result.status is RunStatus.FAILED
    row = log_of(engine, result.run_id)[0]
    assert row.error == "LLMError: the model returned an empty answer"
    assert row.decision is None and row.response is not None



@pytest.mark.parametrize("module", ["report", "support_router", "extract"])
def test_firing_a_decision_moves_by_the_table_and_the_counter_rule(module: str) -> None:
    """Every trigger of the compiled FSM moves to the table's target, counts an attempt on a
    self-loop and a visit elsewhere, and is refused at a loop bound (never when replaying)."""
    from statemachine_orch import load_machine
    from statemachine_orch.engine._fsm import compile_machine
    from statemachine_orch.engine._position import Position

    compiled = compile_machine(load_machine(str(MACHINES / f"{module}.py")).machine)
    machine = compiled.machine
    compared = 0
    for source in machine.by_name:
        for decision, dest in machine.edges(source).items():
            for attempt in (1, 2, 3, 5):
                for visits in (0, 1, 2, 4):
                    for replay in (False, True):
                        position = Position(source, attempt, {name: visits for name in machine.by_name})
                        limit = machine.by_name[source].retry_limit or 1
                        bound = machine.by_name[dest].max_visits if dest in machine.by_name else None
                        blocked = not replay and (attempt >= limit if dest == source
                                                  else bool(bound) and visits >= (bound or 0))
                        moved = compiled.fire(position, decision, replay=replay)
                        expected_visits = {name: visits for name in machine.by_name}
                        if dest != source and not blocked:
                            expected_visits[dest] = expected_visits.get(dest, 0) + 1
                        expected = ((False, source, attempt) if blocked else
                                    (True, dest, attempt + 1 if dest == source else 1))
                        assert (moved, position.state, position.attempt) == expected, (source, decision)
                        assert position.visits == expected_visits, (source, decision, attempt, visits)
                        compared += 1
    assert compared >= 16 * 3 * 2


def test_a_prompt_without_placeholders_is_built_once_and_a_template_per_call(fake: FakeMessagesAPI) -> None:
    """A static prompt's body is built once per machine and shared (nothing modifies it); a
    prompt with placeholders gets its own body, rendered from each run's values."""
    fake.default = "auto"
    machine = Machine("bodies", [LLMState("fixed", prompt="Same {{every}} time", system="Be brief", max_tokens=50),
                                 LLMState("filled", prompt="About {topic}", max_tokens=50)],
                      input_vars={"topic": lambda data: data["topic"]})
    engine = Engine(None, model=fake.model())

    async def two_runs() -> list[list[Any]]:
        found = []
        for topic in ("cats", "dogs"):
            run = await engine.start(machine, {"topic": topic})
            found.append([await run.step(), await run.step()])
        return found

    (fixed_1, filled_1), (fixed_2, filled_2) = asyncio.run(two_runs())
    assert fixed_1.request is fixed_2.request
    assert fixed_1.request == {"model": machine.model, "max_tokens": 50, "system": "Be brief",
                               "messages": [{"role": "user", "content": "Same {every} time"}]}
    assert [r.request["messages"][0]["content"] for r in (filled_1, filled_2)] == ["About cats", "About dogs"]
    sent = [(r.state, r.body["messages"][0]["content"]) for r in fake.requests]
    assert sent == [("fixed", "Same {every} time"), ("filled", "About cats"),
                    ("fixed", "Same {every} time"), ("filled", "About dogs")]


def test_an_engine_takes_ports_not_paths_and_needs_a_model_only_for_llm_states(db_path: Path) -> None:
    with pytest.raises(UsageError, match=r"pass open_store\("):
        Engine(str(db_path))  # type: ignore[arg-type]
    python_only = Machine("py", [PythonState("p", run=lambda ctx: 1)])
    llm = Machine("llm", [LLMState("a", prompt="A")])
    with Engine(open_store(db_path)) as engine:
        assert engine.run(python_only).status is RunStatus.COMPLETED
        with pytest.raises(UsageError, match="no model client"):
            engine.run(llm)
