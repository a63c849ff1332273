"""Forks (`Engine.fork`, `orch fork`, `orch runs --tree`): a new run from a stored run's snapshot
before one of its steps. Steps before the fork point are inherited (not run, not paid), later
ones reuse the parent's answer to an identical request at the same position (free); only the
changed steps are paid. In process on real SQLite files and the real SDK against the fake
Messages API (which counts every request), and the real `orch` for the command line."""

from __future__ import annotations

import asyncio
import io
import json
import re
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from statemachine_orch import (
    Engine,
    Hook,
    InputError,
    LLMState,
    Machine,
    MapState,
    Parent,
    PythonState,
    RunRecord,
    RunStatus,
    SQLiteStore,
    TransitionRecord,
    Usage,
    UsageError,
    open_store,
    replay_run,
)
from statemachine_orch.cli import main
from statemachine_orch.testing import CapturedRequest, FakeMessagesAPI, Reply

from .helpers import MODEL, REPORT, REPORT_INPUT, Orch, cost_of, me, new_run, reply, stored_rows

UNIT = reply("x", input_tokens=100, output_tokens=20)  # every answer's usage: each call costs the same
UNIT_USAGE = Usage(input_tokens=100, output_tokens=20)


class Topic(BaseModel):
    topic: str
    audience: str = "engineers"


def echo(request: CapturedRequest) -> Reply:
    """An answer that depends on the request: a changed prompt gets a changed answer."""
    return Reply(text=f"[{request.state}] {request.prompt}"[:300], input_tokens=100, output_tokens=20)


def chain() -> Machine:
    """a -> b -> c -> d -> words: b and d read a's answer through b; c reads only a."""
    return Machine("forkable", [
        LLMState("a", prompt="Write about {topic}.", max_tokens=100),
        LLMState("b", prompt="Expand for {audience}: {a}", needs=["a"], max_tokens=100),
        LLMState("c", prompt="Critique: {a}", needs=["a"], max_tokens=100),
        LLMState("d", prompt="Summarise: {b}", needs=["b"], max_tokens=100),
        PythonState("words", run=lambda ctx: len(str(ctx.outputs["d"]).split()), needs=["d"]),
    ], model=MODEL, input_model=Topic)


@pytest.fixture
def api() -> FakeMessagesAPI:
    return FakeMessagesAPI(default=echo)


@pytest.fixture
def engine(db_path: Path, api: FakeMessagesAPI) -> Iterator[Engine]:
    with Engine(open_store(db_path), model=api.model()) as eng:
        yield eng


@pytest.fixture
def parent(engine: Engine, api: FakeMessagesAPI) -> str:
    result = engine.run(chain(), {"topic": "tents"}, run_id="p")
    assert result.status is RunStatus.COMPLETED and api.calls() == 4
    return "p"


def loaded(engine: Engine, run_id: str) -> tuple[RunRecord, list[TransitionRecord]]:
    return engine._sync(engine.store.load_run(run_id, verified=True))


def sources(engine: Engine, run_id: str) -> list[str]:
    return [row.source for row in loaded(engine, run_id)[1]]


# --------------------------------------------------------------------------- inherited, reused, paid


def test_a_fork_with_nothing_changed_makes_no_call(engine: Engine, api: FakeMessagesAPI, parent: str) -> None:
    before = api.calls()
    result = engine.run_fork(parent, chain(), at=2, run_id="f")
    assert api.calls() == before  # not one request
    assert (result.status, result.cost_usd, result.usage.paid_tokens) == (RunStatus.COMPLETED, 0.0, 0)
    assert result.outputs == loaded_outputs(engine, parent)
    assert sources(engine, "f") == ["inherited", "reused", "reused", "reused", "python"]
    record, log = loaded(engine, "f")
    assert record.forked_from == parent and record.options["fork"] == {
        "from": parent, "at": 2, "state": "b", "label": None, "set": {}}
    assert "overrides" not in record.options
    assert log[1].reason is not None and log[1].reason.endswith("[reused from run p seq 2]")
    assert log[0].request is None and log[0].response is None  # inherited: the parent's, not copied
    assert log[1].response == loaded(engine, parent)[1][1].response  # reused: the parent's answer, recorded


def loaded_outputs(engine: Engine, run_id: str) -> dict[str, Any]:
    return {row.from_state: row.output for row in loaded(engine, run_id)[1] if row.committed}


def test_a_changed_prompt_at_the_end_pays_that_step_only(engine: Engine, api: FakeMessagesAPI,
                                                         parent: str) -> None:
    before = api.calls()
    result = engine.run_fork(parent, chain(), at="c", overrides={"d": {"prompt": "In one line: {b}"}})
    assert [r.state for r in api.requests[before:]] == ["d"]
    assert sources(engine, result.run_id) == ["inherited", "inherited", "reused", "llm", "python"]
    assert result.cost_usd == pytest.approx(cost_of(UNIT))
    assert result.outputs["d"].startswith("[d] In one line:")


def test_a_changed_answer_upstream_pays_only_the_steps_whose_request_changed(
        engine: Engine, api: FakeMessagesAPI, parent: str) -> None:
    before = api.calls()
    result = engine.run_fork(parent, chain(), at="a", overrides={"a": {"prompt": "Write a poem about {topic}."}})
    # a's answer changed, so b and c (which read it) and d (which reads b) asked again
    assert [r.state for r in api.requests[before:]] == ["a", "b", "c", "d"]
    before = api.calls()
    # b's prompt changed, but its answer feeds only d: c is reused, d is paid
    engine.run_fork(parent, chain(), at="b", run_id="g", overrides={"b": {"prompt": "Expand: {a}"}})
    assert [r.state for r in api.requests[before:]] == ["b", "d"]
    assert sources(engine, "g") == ["inherited", "llm", "reused", "llm", "python"]
    assert result.steps == 5


def test_cost_is_counted_once_on_the_parent(engine: Engine, api: FakeMessagesAPI, parent: str) -> None:
    fork = engine.run_fork(parent, chain(), at=3, overrides={"d": {"model": "claude-haiku-4-5"}})
    parent_cost = sum(row.cost_usd or 0.0 for row in loaded(engine, parent)[1])
    paid = sum(engine.prices.cost(str(r.body["model"]), UNIT_USAGE) or 0.0 for r in api.requests)
    assert fork.cost_usd is not None and parent_cost + fork.cost_usd == pytest.approx(paid)
    assert fork.cost_usd == pytest.approx(engine.prices.cost("claude-haiku-4-5", UNIT_USAGE) or -1)
    assert all(row.cost_usd == 0.0 and row.usage.paid_tokens == 0 for row in loaded(engine, fork.run_id)[1]
               if row.source in ("inherited", "reused"))


def test_set_replaces_an_input_field_or_an_inherited_output(engine: Engine, api: FakeMessagesAPI,
                                                            parent: str) -> None:
    before = api.calls()
    fork = engine.run_fork(parent, chain(), at=2, set={"audience": "children"}, run_id="kids")
    assert [r.state for r in api.requests[before:]] == ["b", "d"]  # a is inherited, c does not read it
    record, log = loaded(engine, "kids")
    assert record.input == {"topic": "tents", "audience": "children"}
    assert record.options["fork"]["set"] == {"audience": "children"}
    assert "for children" in fork.outputs["b"]
    before = api.calls()
    engine.run_fork(parent, chain(), at=2, set={"a": "Tents are shelters."}, run_id="set-a")
    assert [r.state for r in api.requests[before:]] == ["b", "c", "d"]
    _, log = loaded(engine, "set-a")
    assert (log[0].source, log[0].output) == ("inherited", "Tents are shelters.")
    assert "Tents are shelters." in str(log[1].request)


def test_a_fork_of_a_fork_merges_the_overrides_and_reuses_through_its_parent(
        engine: Engine, api: FakeMessagesAPI, parent: str) -> None:
    engine.run_fork(parent, chain(), at="d", run_id="f1", overrides={"d": {"prompt": "Short: {b}"}}, label="short")
    before = api.calls()
    f2 = engine.run_fork("f1", chain(), at=1, run_id="f2", overrides={"d": {"max_tokens": 50}}, label="tight")
    record, log = loaded(engine, "f2")
    assert record.options["overrides"] == {"d": {"prompt": "Short: {b}", "max_tokens": 50}}
    assert [r.state for r in api.requests[before:]] == ["d"]  # a, b, c through f1 from p; d asks anew
    assert [row.reason.split("[")[-1] for row in log[:3] if row.reason] == [
        "reused from run p seq 1]", "reused from run p seq 2]", "reused from run p seq 3]"]
    assert f2.outputs["d"].startswith("[d] Short:")


def test_an_inherited_step_is_followed_to_the_run_that_answered_it(engine: Engine, api: FakeMessagesAPI,
                                                                  parent: str) -> None:
    engine.run_fork(parent, chain(), at=2, set={"a": "Tents."}, run_id="f1")
    before = api.calls()
    engine.run_fork("f1", chain(), at=1, run_id="f2")  # a: f1 inherited it (and set it): p answered it
    # b, c and d now read p's answer, not f1's "Tents.": f1, the parent, asked otherwise there
    assert [r.state for r in api.requests[before:]] == ["b", "c", "d"]
    assert sources(engine, "f2") == ["reused", "llm", "llm", "llm", "python"]
    assert loaded(engine, "f2")[1][0].reason.endswith("[reused from run p seq 1]")  # type: ignore[union-attr]
    engine.run_fork("f1", chain(), at=2, run_id="f3")  # from f1's b on, f1's own answers are reused
    assert sources(engine, "f3") == ["inherited", "reused", "reused", "reused", "python"]


class Groups(BaseModel):
    groups: list[str]


def fan_out() -> Machine:
    """A map state (a child run per group), then a summary of its outputs."""
    return Machine("fan", [
        MapState("impact", items=lambda ctx: ctx.input.groups, concurrency=2,
                 each=LLMState("analyze", prompt="Impact on {item}?", max_tokens=100)),
        LLMState("summary", prompt="Summarise: {impact}", needs=["impact"], max_tokens=100),
    ], model=MODEL, input_model=Groups)


def test_the_child_runs_of_a_fork_reuse_those_of_its_parent(engine: Engine, api: FakeMessagesAPI) -> None:
    engine.run(fan_out(), {"groups": ["staff", "customers", "suppliers"]}, run_id="m")
    before = api.calls()
    same = engine.run_fork("m", fan_out(), at=1, run_id="m-same")
    assert (api.calls() - before, same.cost_usd) == (0, 0.0)
    assert sources(engine, "m-same.0.1.1") == ["reused"]
    more = engine.run_fork("m", fan_out(), at=1, run_id="m-more", set={"groups": ["staff", "investors", "suppliers"]})
    assert [r.state for r in api.requests[before:]] == ["analyze", "summary"]  # the changed item, and the summary
    assert "investors" in api.requests[before].prompt
    assert [sources(engine, f"m-more.0.1.{item}") for item in range(3)] == [["reused"], ["llm"], ["reused"]]
    assert more.cost_usd == pytest.approx(2 * cost_of(UNIT))


# --------------------------------------------------------------------------- stored as any run


def test_a_fork_verifies_replays_and_resumes_reusing(engine: Engine, api: FakeMessagesAPI, parent: str,
                                                     db_path: Path) -> None:
    class Crash(Hook):
        def after_commit(self, record: RunRecord, step: TransitionRecord) -> None:
            if record.run_id == "f" and step.seq == 3:
                raise RuntimeError("crash after step 3")

    with Engine(open_store(db_path), model=api.model(), hooks=[Crash()]) as crashing:
        with pytest.raises(RuntimeError):
            crashing.run_fork(parent, chain(), at=2, run_id="f", overrides={"c": {"max_tokens": 99}})
        assert crashing._sync(crashing.store.get_run("f")).status is RunStatus.INTERRUPTED
    assert sources(engine, "f") == ["inherited", "reused", "llm"]
    before = api.calls()
    result = engine.resume("f", chain())
    assert (result.status, api.calls() - before) == (RunStatus.COMPLETED, 0)  # d reused after the resume
    assert sources(engine, "f") == ["inherited", "reused", "llm", "reused", "python"]
    assert engine._sync(engine.store.verify_chain("f")) is None
    report = engine._sync(replay_of(engine, "f"))
    assert report.matches and report.compared == 4  # the fork's own steps; the inherited one is the parent's


async def replay_of(engine: Engine, run_id: str) -> Any:
    return await replay_run(engine.store, run_id, chain())


def test_the_fork_and_its_inherited_steps_are_stored_together(db_path: Path, api: FakeMessagesAPI,
                                                               parent: str) -> None:
    """A store that fails between two inherited rows leaves no fork at all (nothing a resume
    could pay for again), and the parent as it was."""
    inserted: list[Any] = []

    def fail_at_the_second_inherited_row(sql: str, params: Any) -> None:
        if sql.startswith("INSERT INTO transitions") and params[0] == "broken":
            inserted.append(params)
            if len(inserted) == 2:
                raise OSError("disk gone")

    before = stored_rows(db_path, parent)
    store = SQLiteStore(db_path, tracer=fail_at_the_second_inherited_row)
    with Engine(store, model=api.model()) as failing, pytest.raises(Exception, match="disk gone"):
        failing.run_fork(parent, chain(), at=4, run_id="broken")
    assert len(inserted) == 2
    with Engine(open_store(db_path), model=api.model()) as engine:
        assert [r.run_id for r in engine._sync(engine.store.list_runs())] == [parent]
        assert engine._sync(engine.store.transitions("broken")) == []
        assert stored_rows(db_path, parent) == before
        assert engine.run_fork(parent, chain(), at=4, run_id="broken").status is RunStatus.COMPLETED


def test_a_fork_on_postgresql_is_stored_and_reuses_alike(pg_dsn: str, api: FakeMessagesAPI) -> None:
    with Engine(open_store(pg_dsn), model=api.model()) as engine:
        engine.run(chain(), {"topic": "tents"}, run_id="p")
        before = api.calls()
        fork = engine.run_fork("p", chain(), at=3, run_id="f", overrides={"d": {"prompt": "Short: {b}"}})
        assert [r.state for r in api.requests[before:]] == ["d"]
        assert sources(engine, "f") == ["inherited", "inherited", "reused", "llm", "python"]
        assert fork.cost_usd == pytest.approx(cost_of(UNIT))
        assert engine._sync(engine.store.verify_chain("f")) is None
        (listed,) = engine._sync(engine.store.list_runs(forked_from="p"))
        assert (listed.run_id, listed.steps, listed.input_tokens) == ("f", 5, 100)


@pytest.mark.parametrize(("at", "options", "message"), [
    (9, {}, "run p has no step 9 (its steps are 1 to 5)"),
    (0, {}, "run p has no step 0"),
    ("nowhere", {}, "machine 'forkable' has no state 'nowhere'"),
    (2, {"overrides": {"zz": {"prompt": "x"}}}, "machine 'forkable' has no state 'zz' to override"),
    (2, {"overrides": {"words": {"prompt": "x"}}}, "state 'words' of machine 'forkable' makes no model call"),
    (2, {"set": {"b": "x"}}, "cannot set 'b': it is neither an input field (topic, audience) nor a state run "
                             "before the fork point (a)"),
    (2, {"set": {"topic": 3}}, "input does not match Topic: topic"),
    (2, {"set": {"a": float("nan")}}, "cannot set 'a' to NaN: it is not JSON data"),  # was stored as NaN
    (2, {"set": {"audience": float("inf")}}, "cannot set 'audience' to Infinity: it is not JSON data"),
])
def test_a_fork_that_cannot_be_made_is_refused_and_nothing_stored(engine: Engine, parent: str, at: Any,
                                                                  options: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError if message.startswith("input") else UsageError, match=re.escape(message)):
        engine.run_fork(parent, chain(), at=at, run_id="nope", **options)
    assert [r.run_id for r in engine._sync(engine.store.list_runs())] == [parent]


def test_only_top_level_runs_of_the_same_machine_are_forked(engine: Engine, parent: str) -> None:
    other = Machine("other", [LLMState("a", prompt="A")], model=MODEL)
    with pytest.raises(UsageError, match="run p is a run of machine 'forkable', not 'other'"):
        engine.run_fork(parent, other, at=1)
    engine._sync(engine.store.create_run(new_run("p.0.1.0", machine="forkable", parent=Parent("p", "a", 0)), me()))
    with pytest.raises(UsageError, match=r"is a child run of run p \(state a\); only top-level runs are forked"):
        engine.run_fork("p.0.1.0", chain(), at=1)


# --------------------------------------------------------------------------- the command line


def orch_in_process(db: Path, *args: str | Path) -> tuple[int, str, str]:
    """`orch --db DB ARGS` run by `main` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["--db", str(db), "-q", *map(str, args)])
    return code, out.getvalue(), err.getvalue()


def test_orch_fork_offline_reuses_every_unchanged_answer(tmp_path: Path) -> None:
    """The docs' example: the report machine offline, forked with nothing changed (no call),
    then with a new prompt for its last state (that step paid), then a fork of that fork; the
    tree, the audit, a replay, the log, `show` and `diff` of forks."""
    db = tmp_path / "orch.db"

    def ok(*args: str | Path) -> str:
        code, out, err = orch_in_process(db, *args)
        assert code == 0, err
        return out

    ok("run", REPORT, "--input", REPORT_INPUT, "--offline", "--run-id", "report-1")
    code, out, err = orch_in_process(db, "fork", "report-1", "--at", "3", "--run-id", "same")
    assert code == 0 and out.splitlines()[0] == ("forked from report-1 at seq 3 (risk_assessment): 2 step(s) "
                                                 "inherited, 3 reused, 0 paid")
    assert "OFFLINE" in err  # on the parent's offline answers, since it ran on them
    prompt = tmp_path / "summary.txt"
    prompt.write_text("In two sentences: {recommendations}", encoding="utf-8")
    short = json.loads(ok("fork", "report-1", "--at", "recommendations", "--prompt", f"executive_summary=@{prompt}",
                          "--label", "short", "--run-id", "short", "--json"))
    assert (short["status"], short["fork"]) == ("completed", {
        "from": "report-1", "at": 4, "state": "recommendations", "label": "short", "inherited": 3, "reused": 1,
        "paid": 1})
    ok("fork", "short", "--at", "2", "--model", "risk_assessment=claude-haiku-4-5", "--run-id", "haiku")
    tree = ok("runs", "--tree", "short").splitlines()
    assert [line.split()[:2] for line in tree[1:5]] == [
        ["report-1", "-"], ["├─", "same"], ["└─", "short"], ["└─", "haiku"]]
    assert tree[3].endswith("<- this run") and "seq 4 (recommendations)" in tree[3] and " short " in tree[3]
    assert tree[-1].startswith("4 run(s) in the tree, 3 fork(s)")
    assert ok("audit", "verify").splitlines()[-1] == "4 run(s) checked, 0 with a broken log"
    assert "matches the recording (4 transition(s)" in ok("replay", "haiku")
    log = [json.loads(line) for line in ok("log", "haiku", "--json").splitlines()]
    assert [row["source"] for row in log] == ["inherited", "reused", "llm", "reused", "reused"]
    assert log[4]["reason"].endswith("[reused from run short seq 5]")
    shown = ok("show", "haiku")
    assert "forked from run short at seq 2 (trend_analysis)" in shown
    assert '"risk_assessment": {"model": "claude-haiku-4-5"}' in shown and "In two sentences" in shown
    assert orch_in_process(db, "diff", "report-1", "same")[0] == 0  # same path, decisions and outputs
    # and the real console script, once
    tree_json = json.loads(Orch(db).ok("runs", "--tree", "haiku", "--json").stdout)
    assert [(n["run_id"], n["depth"], n["asked"]) for n in tree_json] == [
        ("report-1", 0, False), ("same", 1, False), ("short", 1, False), ("haiku", 2, True)]


def test_orch_fork_refuses_bad_usage_in_one_line(tmp_path: Path) -> None:
    db = tmp_path / "orch.db"
    assert orch_in_process(db, "run", REPORT, "--input", REPORT_INPUT, "--offline", "--run-id", "r")[0] == 0
    for args, message in [
        (("--at", "7"), "run r has no step 7 (its steps are 1 to 5); fork at a seq that `orch log r` lists"),
        (("--at", "summary"), "machine 'report' has no state 'summary'; fork at a seq, or at one of data_validation"),
        (("--at", "²"), "machine 'report' has no state '²'"),  # a digit to str.isdigit, not to int()
        (("--at", "2", "--model", "summary=claude-haiku-4-5"), "machine 'report' has no state 'summary' to override"),
        (("--at", "2", "--set", "company=Acme"), "--set company: 'Acme' is not JSON"),
        (("--at", "2", "--prompt", "no equals sign"), "--prompt 'no equals sign' is not NAME=VALUE"),
        (("--at", "2", "--max-tokens", "trend_analysis=many"), "--max-tokens trend_analysis: 'many' is not a number"),
        (("--at", "2", "--max-tokens", "trend_analysis=²"), "--max-tokens trend_analysis: '²' is not a number"),
        (("--at", "2", "--set", "nope=1"), "cannot set 'nope': it is neither an input field (company, period"),
    ]:
        code, out, err = orch_in_process(db, "fork", "r", *args)
        assert (code, out) == (2, ""), (args, err)
        assert err.startswith(f"orch: error: {message}") and err.count("\n") == 1, (args, err)
    code, _, err = orch_in_process(db, "runs", "--tree", "nobody")
    assert code == 2 and err.startswith("orch: error: no run 'nobody'")
    code, out, _ = orch_in_process(db, "runs", "--tree", "r", "--json")
    assert json.loads(out) == [{"run_id": "r", "forked_from": None, "depth": 0, "label": None, "forked_at": None,
                                "fork_state": None, "status": "completed", "steps": 5,
                                "cost_usd": json.loads(out)[0]["cost_usd"], "asked": True}]
    assert [r.run_id for r in listed_runs(db)] == ["r"]  # nothing was stored by the refused forks


def listed_runs(db: Path) -> list[Any]:
    async def listed() -> list[Any]:
        store = open_store(db)
        try:
            return await store.list_runs()
        finally:
            await store.close()

    return asyncio.run(listed())
