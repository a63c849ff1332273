"""Review gates: a run waits at a `ReviewState`, a person's decision is committed as its step,
nothing before it runs again, the deadline's `on_timeout` applies when the run is next touched,
and replay uses the recorded decision (real SQLite files, the SDK against the loopback fake)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
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
    LLMState,
    Machine,
    MachineChangedError,
    MachineState,
    PythonState,
    Review,
    ReviewDecidedError,
    ReviewState,
    RunNotFoundError,
    RunStatus,
    UsageError,
    Worker,
    open_store,
    replay_run,
)
from statemachine_orch.testing import FakeMessagesAPI

from .helpers import EnvOrch, one_error_line, orch_against, write


class Headline(BaseModel):
    title: str


def publish(ctx: Any) -> str:
    review = ctx.outputs["approve"]
    return f"published {review.data['title'] if review.data else 'as drafted'}"


def gated(**gate: Any) -> Machine:
    """draft (a model call) -> approve (a review) -> publish; `revise` goes back to the draft."""
    gate = {"needs": ["draft"], "data": Headline, "decisions": ("approve", "reject", "revise"),
            "on": {Branch("revise"): "draft"}, **gate}
    escalates = str(gate.get("on_timeout", "")).startswith("escalate:")
    return Machine("gated", [
        LLMState("draft", prompt="Write a headline.", max_tokens=50, max_visits=3),
        ReviewState("approve", **gate),
        PythonState("publish", run=publish, needs=["approve"], on={FlowDecision.CONTINUE: END}),
        *([PythonState("escalated", run=lambda ctx: "sent to the editor")] if escalates else []),
    ], source_file=__file__)


GATE_SOURCE = """
from pydantic import BaseModel
from statemachine_orch import END, FlowDecision, LLMState, Machine, PythonState, ReviewState

class Headline(BaseModel):
    title: str

machine = Machine("gated", [
    LLMState("draft", prompt="Write a headline.", max_tokens=50),
    ReviewState("approve", needs=["draft"], data=Headline, deadline=3600),
    PythonState("publish", run=lambda ctx: ctx.outputs["approve"].data["title"], needs=["approve"]),
])
"""


def stored(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, params).fetchall()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_run_waits_at_the_gate_and_goes_on_after_approval_without_running_anything_again(db_path: Path) -> None:
    fake = FakeMessagesAPI({"draft": "Cats rule"})
    machine = gated(show=lambda ctx: {"headline": ctx.outputs["draft"], "visit": ctx.visit})

    async def scenario() -> None:
        async with Engine(open_store(db_path), model=fake.model()) as engine:
            first = await engine.arun(machine, run_id="r1")
            assert (first.status, first.path) == (RunStatus.WAITING, ["draft"])
            [pending] = await engine.apending()
            assert (pending.run_id, pending.state, pending.seq, pending.payload) == (
                "r1", "approve", 2, {"headline": "Cats rule", "visit": 1})
            assert pending.decisions == ("approve", "reject", "revise") and pending.deadline is None
            assert pending.data_schema == Headline.model_json_schema()
            decided = await engine.areview("r1", machine, decision="approve", data={"title": "Cats rule!"},
                                           note="shorter is better", by="ann")
            assert (decided.row.decision, decided.row.to_state, decided.status) == (
                "continue", "publish", RunStatus.PENDING)
            assert await engine.apending() == []
            done = await engine.aresume("r1", machine)
        assert (done.status, done.path) == (RunStatus.COMPLETED, ["draft", "approve", "publish"])
        assert done.outputs["publish"] == "published Cats rule!"
        assert done.outputs["approve"] == Review(decision="approve", by="ann", at=decided.review.at,
                                                 data={"title": "Cats rule!"}, note="shorter is better")

    run(scenario())
    assert fake.calls("draft") == 1  # the draft was paid once: nothing re-ran on approval
    (source, request, reason), = stored(db_path, "SELECT source, request, reason FROM transitions "
                                                 "WHERE run_id = 'r1' AND seq = 2")
    assert source == "review" and reason == "approve by ann: shorter is better"
    assert json.loads(request)["payload"] == {"headline": "Cats rule", "visit": 1}  # what was shown, chained


def test_a_second_decision_says_who_decided_first_and_changes_nothing(db_path: Path) -> None:
    machine = gated()

    async def scenario() -> None:
        async with Engine(open_store(db_path), model=FakeMessagesAPI({"draft": "x"}).model()) as engine:
            await engine.arun(machine, run_id="r1")
            first = await engine.areview("r1", machine, decision="reject", by="ann")
            assert first.status is RunStatus.TERMINATED
            log = await engine.store.transitions("r1")
            with pytest.raises(ReviewDecidedError, match=rf"already decided by ann at {first.review.at} \(reject\)"):
                await engine.areview("r1", machine, decision="approve", data={"title": "t"}, by="bob")
            assert await engine.store.transitions("r1") == log
            assert await engine.store.verify_chain("r1") is None

    run(scenario())


def test_a_bad_decision_or_data_is_refused_before_anything_is_written(db_path: Path) -> None:
    machine = gated()

    async def scenario() -> None:
        async with Engine(open_store(db_path), model=FakeMessagesAPI({"draft": "x"}).model()) as engine:
            await engine.arun(machine, run_id="r1")
            before = await engine.store.get_run("r1")
            with pytest.raises(UsageError, match=r"'maybe' is not a decision .* use one of: approve, reject, revise"):
                await engine.areview("r1", machine, decision="maybe")
            with pytest.raises(UsageError, match="does not fit Headline: title: Field required"):
                await engine.areview("r1", machine, decision="approve", data={"name": "x"})
            after = await engine.store.get_run("r1")
            assert (after.status, after.review, after.updated_at) == (RunStatus.WAITING, before.review,
                                                                      before.updated_at)
            with pytest.raises(RunNotFoundError, match="no run 'nope'"):
                await engine.areview("nope", machine, decision="approve")

    run(scenario())


class Score(BaseModel):
    score: float


@pytest.mark.slow  # in the default run: test_a_bad_decision_or_data_is_refused_before_anything_is_written
def test_review_data_that_is_not_json_is_refused_and_the_run_waits_on(db_path: Path, tmp_path: Path) -> None:
    """NaN or Infinity (which `json.loads` accepts) were stored as null, silently; an object
    that is not JSON data failed after the run was claimed, leaving it `running` and gone from
    `pending`. Both are refused before anything is written, the run still waiting."""
    plain = gated(data=None)
    scored = gated(data=Score)

    async def scenario() -> None:
        async with Engine(open_store(db_path), model=FakeMessagesAPI({"draft": "x"}).model()) as engine:
            for run_id, machine in (("r1", plain), ("r2", scored)):
                await engine.arun(machine, run_id=run_id)
            before = [await engine.store.get_run(r) for r in ("r1", "r2")]
            for run_id, machine, data in (("r1", plain, float("nan")), ("r1", plain, {"x": [float("inf")]}),
                                          ("r1", plain, object()), ("r2", scored, {"score": float("nan")}),
                                          ("r2", scored, {"score": "NaN"})):
                with pytest.raises(UsageError, match="the review data is not JSON data"):
                    await engine.areview(run_id, machine, decision="approve", data=data)
            assert [await engine.store.get_run(r) for r in ("r1", "r2")] == before
            assert [p.run_id for p in await engine.apending()] == ["r1", "r2"]
            decided = await engine.areview("r2", scored, decision="approve", data={"score": 0.5})
            assert decided.review.data == {"score": 0.5}

    run(scenario())
    source = write(tmp_path / "gate.py", GATE_SOURCE)
    with orch_against(FakeMessagesAPI({"draft": "x"}), tmp_path / "cli.db") as cli:
        cli.ok("-q", "run", source, "--run-id", "r1")
        bad = cli("-q", "review", "r1", "--decision", "approve", "--data", '{"title": NaN}')
        assert bad.code == 2 and "--data is not JSON: NaN is not allowed" in one_error_line(bad)
        for given, message in ((write(tmp_path / "latin1.json", b'{"title": "caf\xe9"}'), "is not UTF-8 text"),
                               ("", "--data @ names no file")):
            bad = cli("-q", "review", "r1", "--decision", "approve", "--data", f"@{given}")
            assert bad.code == 2 and message in one_error_line(bad), bad.stderr  # was an internal error
        assert cli.json("pending")[0]["run_id"] == "r1"
        bom = write(tmp_path / "bom.json", '\ufeff{"title": "Cats"}')  # as some editors save it
        cli.ok("-q", "review", "r1", "--decision", "approve", "--data", f"@{bom}")


def test_a_decision_on_a_changed_machine_is_taken_with_allow_changed(db_path: Path, tmp_path: Path) -> None:
    """`orch review --allow-changed` was accepted and ignored: a run whose machine changed so
    that its recorded steps no longer replay could never be decided (a resume waits again)."""
    machine = gated()
    changed = Machine("gated", gated(guard=lambda review, ctx: FlowDecision.CONTINUE).states,  # no revise now
                      source_file=str(write(tmp_path / "changed.py", "# another version\n")))

    async def scenario() -> None:
        async with Engine(open_store(db_path), model=FakeMessagesAPI({"draft": "x"}).model()) as engine:
            await engine.arun(machine, run_id="r1")
            await engine.areview("r1", machine, decision="revise", resume=True)  # a second visit now waits
            with pytest.raises(MachineChangedError, match="no longer replay"):
                await engine.areview("r1", changed, decision="approve")
            assert (await engine.store.get_run("r1")).status is RunStatus.WAITING
            decided = await engine.areview("r1", changed, decision="approve", allow_changed=True)
            assert (decided.row.decision, decided.status) == ("continue", RunStatus.PENDING)

    run(scenario())
    source = write(tmp_path / "gate.py", GATE_SOURCE)
    with orch_against(FakeMessagesAPI({"draft": "x"}), tmp_path / "cli.db") as cli:
        cli.ok("-q", "run", source, "--run-id", "r1")
        write(source, GATE_SOURCE.replace("import END,", "import guard, END,").replace(
            'LLMState("draft",', 'LLMState("draft", guard=guard(FlowDecision.CONTINUE, FlowDecision.TERMINATE)('
                                 'lambda o, ctx: FlowDecision.TERMINATE),'))
        refused = cli("-q", "review", "r1", "--decision", "approve", "--data", '{"title": "t"}')
        assert refused.code == 2 and "resume anyway with --allow-changed" in one_error_line(refused)
        cli.ok("-q", "review", "r1", "--decision", "approve", "--data", '{"title": "t"}', "--allow-changed")
        assert cli.json("show", "r1")["snapshot"]["next_state"] == "publish"


def test_a_person_cannot_decide_as_the_system(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--as system:timeout` wrote an audit row saying the timeout policy decided what a person did."""
    machine = gated()

    async def scenario() -> None:
        async with Engine(open_store(db_path), model=FakeMessagesAPI({"draft": "x"}).model()) as engine:
            await engine.arun(machine, run_id="r1")
            before = await engine.store.get_run("r1")
            with pytest.raises(UsageError, match="reviewer 'system:timeout' is a name the engine keeps for itself"):
                await engine.areview("r1", machine, decision="reject", by="system:timeout")
            monkeypatch.setenv("ORCH_ACTOR", " System:cron")
            with pytest.raises(UsageError, match=r"reviewer 'System:cron' .*; name the person who decides"):
                await engine.areview("r1", machine, decision="reject")
            assert await engine.store.get_run("r1") == before

    run(scenario())


def test_a_reviewer_branch_loops_back_and_the_next_visit_waits_again(db_path: Path) -> None:
    fake = FakeMessagesAPI({"draft": ["first try", "second try"]})
    machine = gated()

    async def scenario() -> None:
        async with Engine(open_store(db_path), model=fake.model()) as engine:
            await engine.arun(machine, run_id="r1")
            revised = await engine.areview("r1", machine, decision="revise", note="too long", resume=True)
            assert revised.result is not None and revised.result.status is RunStatus.WAITING
            [pending] = await engine.apending()
            assert (pending.seq, pending.payload) == (4, {"draft": "second try"})
            done = await engine.areview("r1", machine, decision="approve", data={"title": "ok"}, resume=True)
        assert done.result is not None and done.result.path == ["draft", "approve", "draft", "approve", "publish"]

    run(scenario())
    assert fake.calls("draft") == 2


def test_the_deadline_applies_on_timeout_when_the_run_is_next_touched(db_path: Path) -> None:
    machine = gated(deadline=0.3, on_timeout="escalate:escalated")

    async def scenario() -> None:
        async with Engine(open_store(db_path), model=FakeMessagesAPI({"draft": "x"}).model()) as engine:
            await engine.arun(machine, run_id="r1")
            early = await engine.aresume("r1", machine)  # touched before the deadline: it waits on
            assert early.status is RunStatus.WAITING
            await asyncio.sleep(0.35)
            assert (await engine.apending())[0].expired
            late = await engine.aresume("r1", machine)
            assert late.path == ["draft", "approve", "escalated"] and late.status is RunStatus.COMPLETED
            gate = late.outputs["approve"]
            assert (gate.decision, gate.by) == ("escalate", "system:timeout")
            assert (await replay_run(engine.store, "r1", machine)).divergence is None

    run(scenario())


def test_pending_lists_by_machine_and_by_how_soon_the_deadline_falls(db_path: Path) -> None:
    async def scenario() -> None:
        async with Engine(open_store(db_path), model=FakeMessagesAPI({"draft": "x"}).model()) as engine:
            for run_id, deadline in (("soon", 600), ("later", 7200), ("never", None)):
                await engine.arun(gated(deadline=deadline), run_id=run_id)
            assert [p.run_id for p in await engine.apending()] == ["soon", "later", "never"]
            assert [p.run_id for p in await engine.apending(expiring=3600)] == ["soon"]
            assert [p.run_id for p in await engine.apending(expiring=3 * 3600)] == ["soon", "later"]
            assert await engine.apending(machine="other") == []
            assert len(await engine.apending(machine="gated")) == 3

    run(scenario())


def test_a_deadline_or_horizon_past_the_year_9999_is_never_rather_than_an_internal_error(db_path: Path,
                                                                                          tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Engine(open_store(db_path), model=FakeMessagesAPI({"draft": "x"}).model()) as engine:
            assert (await engine.arun(gated(deadline=1e15), run_id="far")).status is RunStatus.WAITING
            [pending] = await engine.apending(expiring=1e15)
            assert pending.deadline is not None and pending.deadline.startswith("9999-12-31") and not pending.expired

    run(scenario())
    source = write(tmp_path / "gate.py", GATE_SOURCE)
    with orch_against(FakeMessagesAPI({"draft": "x"}), tmp_path / "cli.db") as cli:
        cli.ok("-q", "run", source, "--run-id", "r1")
        assert [p["run_id"] for p in cli.json("pending", "--expiring", "99999999999d")] == ["r1"]


def test_a_decision_after_the_deadline_is_refused_and_the_timeout_is_applied_instead(db_path: Path) -> None:
    machine = gated(deadline=0.2)  # on_timeout defaults to reject

    async def scenario() -> None:
        async with Engine(open_store(db_path), model=FakeMessagesAPI({"draft": "x"}).model()) as engine:
            await engine.arun(machine, run_id="r1")
            time.sleep(0.25)
            with pytest.raises(ReviewDecidedError, match=r"expired at .* on_timeout \(reject\) was applied as "
                                                         "system:timeout"):
                await engine.areview("r1", machine, decision="approve", data={"title": "late"}, by="ann")
            record, log = await engine.store.load_run("r1", verified=True)
            assert record.status is RunStatus.TERMINATED
            assert (log[-1].from_state, log[-1].decision, log[-1].output["by"]) == (
                "approve", "terminate", "system:timeout")
            with pytest.raises(ReviewDecidedError, match="already decided by system:timeout"):
                await engine.areview("r1", machine, decision="approve", data={"title": "later"})

    run(scenario())


def test_replay_uses_the_recorded_decision_and_sees_a_changed_mapping(db_path: Path) -> None:
    machine = gated()

    async def scenario() -> None:
        async with Engine(open_store(db_path), model=FakeMessagesAPI({"draft": "x"}).model()) as engine:
            await engine.arun(machine, run_id="r1")
            await engine.areview("r1", machine, decision="approve", data={"title": "t"}, resume=True)
            assert (await replay_run(engine.store, "r1", machine)).compared == 3
            changed = gated(guard=lambda review, ctx: Branch("revise"))
            divergence = (await replay_run(engine.store, "r1", changed)).divergence
            assert divergence is not None and (divergence.seq, divergence.kind) == (2, "decision")

    run(scenario())


def test_the_reviewer_is_as_given_else_orch_actor_else_the_os_user(db_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    machine = gated()
    monkeypatch.setenv("ORCH_ACTOR", "ci-bot")

    async def scenario() -> list[str]:
        async with Engine(open_store(db_path), model=FakeMessagesAPI({"draft": "x"}).model()) as engine:
            by = []
            for run_id, given in (("a", None), ("b", "carol")):
                await engine.arun(machine, run_id=run_id)
                by.append((await engine.areview(run_id, machine, decision="reject", by=given)).review.by)
            monkeypatch.delenv("ORCH_ACTOR")
            await engine.arun(machine, run_id="c")
            by.append((await engine.areview("c", machine, decision="reject")).review.by)
            return by

    import getpass

    assert run(scenario()) == ["ci-bot", "carol", getpass.getuser()]


def test_a_batch_counts_waiting_runs_and_running_it_again_goes_on_after_review(db_path: Path) -> None:
    machine = gated()

    async def scenario() -> None:
        async with Engine(open_store(db_path), model=FakeMessagesAPI({"draft": "x"}).model()) as engine:
            first = await engine.arun_many(machine, [{}, {}, {}], batch_id="b")
            assert (first.progress.waiting, first.progress.completed) == (3, 0)
            await engine.areview("b-1", machine, decision="approve", data={"title": "one"})
            await engine.areview("b-2", machine, decision="reject")
            again = await engine.arun_many(machine, [{}, {}, {}], batch_id="b")
            assert (again.progress.completed, again.progress.waiting) == (2, 1)
            assert {n: r.status for n, r in again.results.items()} == {
                1: RunStatus.COMPLETED, 2: RunStatus.TERMINATED, 3: RunStatus.WAITING}

    run(scenario())


@pytest.mark.parametrize(("gate", "problem"), [
    ({"deadline": 60, "on_timeout": "maybe"}, "on_timeout='maybe' is not one of its decisions"),
    ({"on_timeout": "approve"}, "never applies without a deadline"),
    ({"on": {}}, "guard may return branch:revise but no transition handles it"),
    ({"deadline": 60, "on_timeout": "escalate:nowhere"}, "unknown target 'nowhere'"),
    ({"decisions": ("approve", "ok go")}, "is not a list of distinct names"),
    ({"deadline": -1}, "is not a positive number of seconds"),
])
def test_a_review_state_is_validated_with_the_fix(gate: dict[str, Any], problem: str) -> None:
    with pytest.raises(DefinitionError, match=problem):
        gated(**gate)


def test_the_cli_lists_decides_and_a_kill_after_the_decision_loses_nothing(tmp_path: Path) -> None:
    """`orch review --resume` killed right after the decision's commit: resuming goes on from the
    next state, the decision recorded once and the draft paid once."""
    source = write(tmp_path / "gate.py", GATE_SOURCE)
    fake = FakeMessagesAPI({"draft": "Cats rule"})
    with orch_against(fake, tmp_path / "orch.db") as cli:
        cli.ok("-q", "run", source, "--run-id", "r1")
        pending = cli.json("pending")
        assert [(p["run_id"], p["state"], p["payload"], p["expired"]) for p in pending] == [
            ("r1", "approve", {"draft": "Cats rule"}, False)]
        assert "decide with: orch review r1 --decision approve|reject" in cli.ok("show", "r1").stdout
        bad = cli("-q", "review", "r1", "--decision", "approve", "--data", '{"title": 7}')
        assert bad.code == 2 and "does not fit Headline" in one_error_line(bad)
        killed = EnvOrch(cli.db, cli.base_url, cli.cwd, extra={"ORCH_KILL_AT": "after_commit"})(
            "-q", "review", "r1", "--decision", "approve", "--data", '{"title": "Cats!"}', "--as", "ann", "--resume")
        assert killed.code == -9  # SIGKILLed once the decision was committed, before the next step began
        assert cli.json("show", "r1")["snapshot"]["next_state"] == "publish"
        again = cli("-q", "review", "r1", "--decision", "reject")
        assert again.code == 2 and "already decided by ann" in one_error_line(again)
        done = cli.json("resume", "r1")
        assert (done["status"], done["path"]) == ("completed", ["draft", "approve", "publish"])
        assert [row["source"] for row in cli.log("r1")] == ["llm", "review", "python"]
        assert "1 run(s) checked, 0 with a broken log" in cli.ok("audit", "verify").stdout
    assert fake.calls("draft") == 1



@pytest.mark.slow  # in the default run: the review CLI test with a kill after the decision
def test_review_json_with_resume_prints_the_decision_and_the_result_as_one_object(tmp_path: Path) -> None:
    """`--json --resume` printed nothing when the decision ended the run (reject), and only the
    run's result, without the decision, when it went on; the docs promise both as one object."""
    source = write(tmp_path / "gate.py", GATE_SOURCE)
    with orch_against(FakeMessagesAPI({"draft": "Cats rule"}), tmp_path / "orch.db") as cli:
        for run_id in ("r1", "r2"):
            cli.ok("-q", "run", source, "--run-id", run_id)
        rejected = cli.json("-q", "review", "r1", "--decision", "reject", "--as", "ann", "--resume")
        assert (rejected["decision"], rejected["by"], rejected["status"], rejected["result"]) == (
            "reject", "ann", "terminated", None)
        approved = cli.json("-q", "review", "r2", "--decision", "approve", "--data", '{"title": "Cats!"}', "--resume")
        assert (approved["decision"], approved["flow_decision"], approved["status"]) == (
            "approve", "continue", "completed")
        assert (approved["result"]["status"], approved["result"]["path"]) == (
            "completed", ["draft", "approve", "publish"])


def test_workers_leave_waiting_runs_and_take_them_up_after_review_or_past_the_deadline(
        pg_dsn: str, tmp_path: Path) -> None:
    drafted: list[str] = []

    def draft(ctx: Any) -> str:
        drafted.append(ctx.run_id)
        return f"draft {ctx.input['n']}"

    def gate_machine(name: str, deadline: float) -> Machine:
        return Machine(name, [PythonState("draft", run=draft),
                              ReviewState("approve", needs=["draft"], deadline=deadline),
                              PythonState("publish", run=lambda ctx: "published")],
                       source_file=str(write(tmp_path / f"{name}.py", f"# {name}\n")))

    slow, quick = gate_machine("slow_review", 3600), gate_machine("quick_review", 0.5)

    async def scenario() -> None:
        async with Engine(open_store(pg_dsn)) as engine:
            await engine.enqueue(slow, {"n": 1}, run_id="a")
            await engine.enqueue(quick, {"n": 2}, run_id="b")
            first = await Worker(engine, [slow, quick], poll_s=0.1).run(until_idle=True)
            assert first.waiting >= 1 and (await engine.store.get_run("a")).status is RunStatus.WAITING
            await engine.areview("a", slow, decision="approve", by="ann")
            assert (await engine.store.get_run("a")).status is RunStatus.PENDING
            await asyncio.sleep(0.6)  # b's deadline has passed: a worker applies its on_timeout
            await Worker(engine, [slow, quick], poll_s=0.1).run(until_idle=True)
            a, a_log = await engine.store.load_run("a", verified=True)
            b, b_log = await engine.store.load_run("b", verified=True)
            assert (a.status, [r.from_state for r in a_log]) == (RunStatus.COMPLETED, ["draft", "approve", "publish"])
            assert (b.status, b_log[-1].output["by"]) == (RunStatus.TERMINATED, "system:timeout")

    run(scenario())
    assert sorted(drafted) == ["a", "b"]  # each draft ran once: waiting and review re-ran nothing


def test_a_machine_whose_child_runs_would_wait_for_a_review_is_refused() -> None:
    inner = Machine("inner", [ReviewState("sign_off")], source_file=__file__)
    with pytest.raises(DefinitionError, match="state 'sub': its child runs would wait at review state 'sign_off'"):
        Machine("outer", [MachineState("sub", machine=inner)], source_file=__file__)
