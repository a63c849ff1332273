"""Batches through the Python API (`Engine.batch`, `Engine.run_many`, `Engine.arun_many`): one
machine over many inputs, each input a durable run `BATCH-N` tagged with its batch, against a
real SQLite file and the real SDK talking to the fake Messages API in process. Running a batch
id again resumes it: finished runs are read back, unfinished ones resumed without re-requesting
a committed step, changed inputs refused."""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from statemachine_orch import (
    BatchProgress,
    BatchResult,
    Engine,
    Hook,
    LLMState,
    Machine,
    PythonState,
    RunStatus,
    UsageError,
    load_machine,
    open_store,
)
from statemachine_orch.testing import CapturedRequest, FakeMessagesAPI

from .helpers import ROUTER, query, step_calls

TOPICS = ["owls", "tides", "moss", "granite", "kites"]


def three_steps(fail_once: set[str] | None = None) -> Machine:
    """draft (LLM) -> check (Python) -> polish (LLM); `check` raises once for each topic in
    `fail_once`, leaving that run failed after its draft was committed."""
    pending = set(fail_once or ())

    def check(ctx: Any) -> int:
        topic = ctx.input["topic"]
        if topic in pending:
            pending.discard(topic)
            raise RuntimeError(f"{topic} is not ready yet")
        return len(str(ctx.outputs["draft"]))

    return Machine("three", input_vars={"topic": lambda data: data["topic"]}, source_file="three.py", states=[
        LLMState("draft", prompt="Draft a note on {topic}.", max_tokens=50),
        PythonState("check", run=check, needs=["draft"]),
        LLMState("polish", prompt="Polish: {draft}", needs=["draft"], max_tokens=50),
    ])


def topics(*names: str) -> list[dict[str, str]]:
    return [{"topic": name} for name in names or TOPICS]


def by_run(request: CapturedRequest) -> str:
    """An answer naming the state and the run that asked."""
    return f"{request.state} for {request.run_id}"


@pytest.fixture
def fake() -> FakeMessagesAPI:
    return FakeMessagesAPI(default=by_run, per_run=True)


@pytest.fixture
def engine(tmp_path: Path, fake: FakeMessagesAPI) -> Iterator[Engine]:
    with Engine(open_store(tmp_path / "orch.db"), model=fake.model()) as engine:
        yield engine


def batch_of(engine: Engine, batch_id: str) -> list[str]:
    return sorted(s.run_id for s in asyncio.run(engine.store.list_runs(batch=batch_id, limit=None)))


# --------------------------------------------------------------------------- one pass


def test_a_routing_batch_takes_each_inputs_branch_and_reports_progress(engine: Engine, fake: FakeMessagesAPI,
                                                                       tmp_path: Path) -> None:
    router = load_machine(str(ROUTER)).machine
    fake.default = None  # an unscripted state answers 400: the test notices
    fake.on("sentiment_analysis", "neutral").on("standard_reply", "a standard reply")
    fake.on("upsell", "an upsell").on("support", "a support reply")
    fake.on_input({"text": "I love it"}, {"sentiment_analysis": "positive"})
    fake.on_input({"text": "It broke"}, {"sentiment_analysis": "negative", "support": "sorry it broke"})
    inputs = [{"text": "I love it"}, {"text": "It broke"}, {"txt": "no text field"}, {"text": "Where is it?"},
              {"text": "I love it"}]
    fake.inputs.update({f"R-{n}": data for n, data in enumerate(inputs, 1)})
    seen: list[tuple[int, int, int, int, int]] = []

    def on_progress(p: BatchProgress) -> None:
        assert p.total == 5 and p.batch_id == "R"
        seen.append((p.finished, p.completed, p.failed, p.not_started, p.running))

    result = engine.run_many(router, inputs, batch_id="R", concurrency=2, on_progress=on_progress)

    assert result.batch_id == "R" and not result.stopped
    assert {n: (r.run_id, r.status, r.path, r.output) for n, r in result.results.items()} == {
        1: ("R-1", RunStatus.COMPLETED, ["sentiment_analysis", "upsell"], "an upsell"),
        2: ("R-2", RunStatus.COMPLETED, ["sentiment_analysis", "support"], "sorry it broke"),
        4: ("R-4", RunStatus.COMPLETED, ["sentiment_analysis", "standard_reply"], "a standard reply"),
        5: ("R-5", RunStatus.COMPLETED, ["sentiment_analysis", "upsell"], "an upsell"),
    }
    assert list(result.errors) == [3]
    assert "input does not match Ticket" in result.errors[3] and "text" in result.errors[3]
    assert query(tmp_path / "orch.db", "SELECT count(*) AS n FROM runs WHERE run_id = 'R-3'")[0]["n"] == 0
    p = result.progress
    assert (p.completed, p.failed, p.not_started, p.interrupted, p.running, p.already_done) == (4, 0, 1, 0, 0, 0)
    assert p.usage.input_tokens > 0 and p.usage.output_tokens > 0
    # the callback saw every change: the finished count climbs one input at a time to the total
    finished = [s[0] for s in seen]
    assert finished == sorted(finished) and finished[0] == 0 and finished[-1] == 5
    assert sorted(set(finished)) == [0, 1, 2, 3, 4, 5]
    assert seen[-1] == (5, 4, 0, 1, 0)
    assert max(s[4] for s in seen) <= 2  # never more runs at once than the concurrency
    assert fake.calls() == 8
    assert step_calls(fake.requests) == Counter({(f"R-{n}", s): 1 for n in (1, 2, 4, 5)
                                                 for s in ["sentiment_analysis", result.results[n].path[1]]})
    assert {r["run_id"]: r["batch_id"] for r in query(tmp_path / "orch.db", "SELECT run_id, batch_id FROM runs")} == {
        "R-1": "R", "R-2": "R", "R-4": "R", "R-5": "R"}


def test_inputs_given_as_a_mapping_keep_their_numbers(engine: Engine) -> None:
    result = engine.run_many(three_steps(), {7: {"topic": "owls"}, 3: {"topic": "moss"}}, batch_id="M")
    assert list(result.results) == [3, 7]
    assert {n: r.run_id for n, r in result.results.items()} == {3: "M-3", 7: "M-7"}
    assert result.results[7].outputs["polish"] == "polish for M-7"
    assert batch_of(engine, "M") == ["M-3", "M-7"]


@pytest.mark.parametrize("keys", [[0, 1], [-2], [True], ["1"]])
def test_mapping_numbers_start_at_1(engine: Engine, keys: list[Any]) -> None:
    with pytest.raises(UsageError, match="numbered from 1"):
        engine.batch(three_steps(), {k: {"topic": "owls"} for k in keys}, batch_id="M")


def test_without_a_batch_id_one_is_generated_and_names_the_runs(engine: Engine) -> None:
    result = asyncio.run(engine.arun_many(three_steps(), topics("owls", "moss")))
    assert result.batch_id
    assert [r.run_id for r in result.results.values()] == [f"{result.batch_id}-1", f"{result.batch_id}-2"]
    assert all(r.status is RunStatus.COMPLETED for r in result.results.values())
    assert batch_of(engine, result.batch_id) == [f"{result.batch_id}-1", f"{result.batch_id}-2"]


@pytest.mark.parametrize("concurrency", [0, -1, True, 1.5, "2"])
def test_concurrency_is_a_whole_number_of_at_least_one(engine: Engine, fake: FakeMessagesAPI, tmp_path: Path,
                                                       concurrency: Any) -> None:
    with pytest.raises(UsageError, match="concurrency"):
        engine.batch(three_steps(), topics(), batch_id="C", concurrency=concurrency)
    with pytest.raises(UsageError, match="concurrency"):
        engine.run_many(three_steps(), topics(), batch_id="C", concurrency=concurrency)
    assert fake.calls() == 0
    assert query(tmp_path / "orch.db", "SELECT run_id FROM runs") == []


def test_concurrency_1_runs_one_input_at_a_time(engine: Engine) -> None:
    running: list[int] = []
    result = engine.run_many(three_steps(), topics(), batch_id="one", concurrency=1,
                             on_progress=lambda p: running.append(p.running))
    assert result.progress.completed == 5
    assert max(running) == 1


# --------------------------------------------------------------------------- running a batch again


def test_a_finished_batch_run_again_is_read_back_without_a_request(engine: Engine, fake: FakeMessagesAPI) -> None:
    first = engine.run_many(three_steps(), topics(), batch_id="B", concurrency=3)
    assert first.progress.completed == 5 and fake.calls() == 10
    again = engine.run_many(three_steps(), topics(), batch_id="B", concurrency=3)
    assert fake.calls() == 10  # not one new request
    p = again.progress
    assert (p.total, p.completed, p.already_done, p.failed, p.not_started) == (5, 5, 5, 0, 0)
    assert again.errors == {}
    assert {n: (r.run_id, r.status, r.path, r.outputs) for n, r in again.results.items()} == {
        n: (r.run_id, r.status, r.path, r.outputs) for n, r in first.results.items()}
    assert p.usage == first.progress.usage and p.cost_usd == pytest.approx(first.progress.cost_usd)


def test_a_rerun_resumes_only_the_unfinished_run_and_requests_no_committed_step_again(
        engine: Engine, fake: FakeMessagesAPI, tmp_path: Path) -> None:
    machine = three_steps(fail_once={"moss"})  # input 3
    first = engine.run_many(machine, topics(), batch_id="B", concurrency=2)
    assert {n: r.status for n, r in first.results.items()} == {
        1: RunStatus.COMPLETED, 2: RunStatus.COMPLETED, 3: RunStatus.FAILED, 4: RunStatus.COMPLETED,
        5: RunStatus.COMPLETED}
    assert first.results[3].path == ["draft"] and "moss is not ready yet" in (first.results[3].error or "")
    assert (first.progress.completed, first.progress.failed) == (4, 1)
    before = step_calls(fake.requests)
    assert before[("B-3", "draft")] == 1 and before[("B-3", "polish")] == 0

    again = engine.run_many(machine, topics(), batch_id="B", concurrency=2)
    assert all(r.status is RunStatus.COMPLETED for r in again.results.values())
    assert (again.progress.completed, again.progress.already_done, again.progress.failed) == (5, 4, 0)
    after = step_calls(fake.requests)
    assert after - before == Counter({("B-3", "polish"): 1})  # only the resumed run's missing step
    assert after == Counter({(f"B-{n}", s): 1 for n in range(1, 6) for s in ("draft", "polish")})
    assert again.results[3].outputs == {"draft": "draft for B-3", "check": len("draft for B-3"),
                                        "polish": "polish for B-3"}
    # the failed attempt stays in the log, before the resumed steps
    log = query(tmp_path / "orch.db", "SELECT from_state, to_state FROM transitions WHERE run_id = 'B-3' "
                                      "ORDER BY seq")
    assert [(r["from_state"], r["to_state"]) for r in log] == [
        ("draft", "check"), ("check", None), ("check", "polish"), ("polish", "__end__")]


def test_request_stop_starts_no_more_runs_and_a_rerun_finishes_without_paying_twice(
        tmp_path: Path, fake: FakeMessagesAPI) -> None:
    machine = three_steps()

    async def stop_then_rerun() -> tuple[BatchResult, Counter[tuple[str, str]], list[str], BatchResult]:
        async with Engine(open_store(tmp_path / "orch.db"), model=fake.model()) as engine:
            batch = engine.batch(machine, topics(), batch_id="S", concurrency=2)

            def stop_at_the_second_runs_draft(request: CapturedRequest) -> str:
                if (request.run_id, request.state) == ("S-2", "draft"):
                    batch.request_stop(30.0)  # the step in flight finishes; nothing after it starts
                return by_run(request)

            fake.default = stop_at_the_second_runs_draft
            stopped = await batch.run()
            before = step_calls(fake.requests)
            stored = sorted(s.run_id for s in await engine.store.list_runs(batch="S"))
            fake.default = by_run
            return stopped, before, stored, await engine.arun_many(machine, topics(), batch_id="S", concurrency=2)

    stopped, before, stored, again = asyncio.run(stop_then_rerun())

    assert stopped.stopped
    assert stopped.results[2].status is RunStatus.INTERRUPTED
    assert stopped.results[2].path == ["draft"]  # the step in flight committed, then the run stopped
    assert "stopped on request" in (stopped.results[2].error or "")
    started = set(stopped.results)
    assert started <= {1, 2, 3}  # at most one input was opened after the stop
    assert stored == sorted(f"S-{n}" for n in started)  # the others were never started
    p = stopped.progress
    assert p.finished == len(started) < p.total and p.running == 0
    assert p.interrupted == sum(r.status is RunStatus.INTERRUPTED for r in stopped.results.values()) >= 1

    assert not again.stopped
    assert [r.status for r in again.results.values()] == [RunStatus.COMPLETED] * 5
    after = step_calls(fake.requests)
    assert after == Counter({(f"S-{n}", s): 1 for n in range(1, 6) for s in ("draft", "polish")})
    assert all(after[step] == 1 for step in before)  # nothing asked before was asked again


def test_a_batch_stopped_while_every_input_was_running_says_it_stopped(
        engine: Engine, fake: FakeMessagesAPI) -> None:
    batch = engine.batch(three_steps(), topics("owls"), batch_id="T", concurrency=1)

    def stop_at_the_first_request(request: CapturedRequest) -> str:
        batch.request_stop(30.0)
        return by_run(request)

    fake.default = stop_at_the_first_request
    result = asyncio.run(batch.run())  # the engine's loop has not run: this one is the only one
    assert result.results[1].status is RunStatus.INTERRUPTED  # holds: the run stopped after its draft
    assert result.progress.completed < result.progress.total  # holds: there is work left
    assert result.stopped  # "stopped on request before every input had run: run it again to go on"


def test_a_changed_input_is_refused_naming_its_run_and_nothing_is_rerun(
        engine: Engine, fake: FakeMessagesAPI, tmp_path: Path) -> None:
    machine = three_steps(fail_once={"moss"})
    engine.run_many(machine, topics(), batch_id="B")
    calls = fake.calls()
    changed = topics("owls", "TIDES", "MOSS", "granite", "kites")  # 2 completed, 3 failed: both changed

    again = engine.run_many(machine, changed, batch_id="B")
    assert sorted(again.errors) == [2, 3]
    assert "input 2 is not the input run B-2 was started with" in again.errors[2]
    assert "input 3 is not the input run B-3 was started with" in again.errors[3]
    assert sorted(again.results) == [1, 4, 5]
    assert (again.progress.not_started, again.progress.already_done) == (2, 3)
    assert fake.calls() == calls  # the failed run B-3 was not resumed on its new input
    stored = {r["run_id"]: (r["input"], r["status"]) for r in query(
        tmp_path / "orch.db", "SELECT run_id, input, status FROM runs WHERE run_id IN ('B-2', 'B-3')")}
    assert stored == {"B-2": ('{"topic":"tides"}', "completed"), "B-3": ('{"topic":"moss"}', "failed")}


# --------------------------------------------------------------------------- the store


def test_list_runs_by_batch_returns_exactly_that_batchs_runs(tmp_path: Path) -> None:
    quick = Machine("quick", [PythonState("only", run=lambda ctx: ctx.input["n"] * 2)], source_file="quick.py")
    with Engine(open_store(tmp_path / "orch.db")) as engine:
        engine.run(quick, {"n": 0}, run_id="solo")
        engine.run_many(quick, [{"n": n} for n in range(3)], batch_id="B")
        engine.run_many(quick, [{"n": n} for n in range(2)], batch_id="B-1")  # runs B-1-1, B-1-2
        engine.run_many(quick, [{"n": n} for n in range(60)], batch_id="big", concurrency=16)
        store = engine.store

        assert batch_of(engine, "B") == ["B-1", "B-2", "B-3"]
        assert batch_of(engine, "B-1") == ["B-1-1", "B-1-2"]
        assert batch_of(engine, "nope") == []
        assert batch_of(engine, "big") == sorted(f"big-{n}" for n in range(1, 61))
        assert len(asyncio.run(store.list_runs(batch="big"))) == 50  # the default limit still applies
        newest_first = asyncio.run(store.list_runs(batch="B", limit=2))
        assert [s.run_id for s in newest_first] == ["B-3", "B-2"]
        assert asyncio.run(store.get_run("B-2")).batch == "B"
        assert asyncio.run(store.get_run("solo")).batch is None
        assert len(asyncio.run(store.list_runs(limit=None))) == 1 + 3 + 2 + 60  # still all of them


def test_the_audit_chain_covers_a_runs_batch(engine: Engine, tmp_path: Path) -> None:
    machine = three_steps()
    engine.run_many(machine, topics("owls", "moss", "kites"), batch_id="A")
    engine.run(machine, {"topic": "alone"}, run_id="alone")
    store = engine.store
    for run_id in ("A-1", "A-2", "A-3", "alone"):
        assert asyncio.run(store.verify_chain(run_id)) is None, run_id

    db = tmp_path / "orch.db"
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE runs SET batch_id = 'other' WHERE run_id = 'A-1'")  # moved to another batch
        conn.execute("UPDATE runs SET batch_id = NULL WHERE run_id = 'A-2'")  # taken out of its batch
        conn.execute("UPDATE runs SET batch_id = 'A' WHERE run_id = 'alone'")  # slipped into one
    for run_id in ("A-1", "A-2", "alone"):
        problem = asyncio.run(store.verify_chain(run_id))
        assert problem is not None and "runs row does not match its hash" in problem, run_id
    assert asyncio.run(store.verify_chain("A-3")) is None  # the untouched run still verifies


class FailsOnce(Hook):
    """A hook that raises once, after run `run_id` commits its first step (a metrics endpoint down)."""

    def __init__(self, run_id: str) -> None:
        self.run_id, self.raised = run_id, False

    def after_commit(self, record: Any, step: Any) -> None:
        if record.run_id == self.run_id and not self.raised:
            self.raised = True
            raise RuntimeError("metrics endpoint down")


def test_one_runs_exception_stops_that_run_only(tmp_path: Path, fake: FakeMessagesAPI) -> None:
    """A run that raises (a hook, the store) is stopped alone: the batch goes on, its result says
    why, and nothing is left running (it once aborted the batch and left the others going)."""
    with Engine(open_store(tmp_path / "h.db"), model=fake.model(), hooks=[FailsOnce("H-2")]) as engine:
        result = engine.run_many(three_steps(), topics(), batch_id="H", concurrency=3)
        statuses = {s.run_id: s.status for s in asyncio.run(engine.store.list_runs(batch="H", limit=None))}
    assert result.results[2].status is RunStatus.INTERRUPTED
    assert result.results[2].error == "RuntimeError: metrics endpoint down"
    assert [result.results[n].status for n in (1, 3, 4, 5)] == [RunStatus.COMPLETED] * 4
    assert statuses["H-2"] is RunStatus.INTERRUPTED and list(statuses.values()).count(RunStatus.COMPLETED) == 4


def test_an_empty_batch_id_is_refused(engine: Engine) -> None:
    with pytest.raises(UsageError, match="is not valid"):
        engine.batch(three_steps(), topics(), batch_id="")
