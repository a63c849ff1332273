"""A/B experiments (`orch ab`, engine/_experiment.py, cli/_ab_report.py): a machine whose right
answers are known for each arm, run offline as a paired experiment, against a real SQLite file
and the real SDK talking to the fake Messages API. Arm A (the machine as it is) answers 5 of
10 questions right, arm B (another model and prompt) 8 of 10, so the true difference of the
rate of completed runs, and of `result:correct`, is 0.3: the report's counts, rates, Wilson
intervals, wins, ties and losses are known, and its bootstrap interval must contain 0.3."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from statemachine_orch import Engine, FlowDecision, LLMState, Machine, PythonState, UsageError, guard, open_store
from statemachine_orch.cli._ab import read_arms
from statemachine_orch.cli._ab_report import ArmRun, build_report, check_metric, read_experiment, report_lines
from statemachine_orch.cli._stats import wilson
from statemachine_orch.definition._overrides import StateOverride, parse_overrides
from statemachine_orch.engine._batch import BatchResult
from statemachine_orch.engine._experiment import Experiment, Settings, plan
from statemachine_orch.testing import CapturedRequest, FakeMessagesAPI, Reply, error

from .helpers import Orch, one_error_line, query, write

HAIKU = "claude-haiku-4-5"
B_PROMPT = "Answer yes or no: {question}"
QUESTIONS = [{"q": q, "question": f"question {q}?", "expected": "yes"} for q in range(1, 11)]


def right(q: int, model: str) -> bool:
    """Arm A's model gets questions 1-5 right, arm B's (haiku) questions 3-10."""
    return q >= 3 if model == HAIKU else q <= 5


def grade(ctx: Any) -> dict[str, bool]:
    return {"correct": ctx.outputs["answer"].strip() == ctx.input["expected"]}


@guard(FlowDecision.CONTINUE, FlowDecision.TERMINATE)
def graded(output: dict[str, bool], ctx: Any) -> Any:
    return FlowDecision.CONTINUE if output["correct"] else FlowDecision.TERMINATE.because("wrong answer")


QUIZ_SOURCE = '''
from statemachine_orch import FlowDecision, LLMState, Machine, PythonState, guard


def grade(ctx):
    return {"correct": ctx.outputs["answer"].strip() == ctx.input["expected"]}


@guard(FlowDecision.CONTINUE, FlowDecision.TERMINATE)
def graded(output, ctx):
    return FlowDecision.CONTINUE if output["correct"] else FlowDecision.TERMINATE.because("wrong answer")


machine = Machine("quiz", input_vars={"question": lambda d: d["question"]}, result="grade", states=[
    LLMState("answer", prompt="Answer in one word: {question}", max_tokens=20),
    PythonState("grade", run=grade, needs=["answer"], guard=graded),
])
'''


def quiz() -> Machine:
    return Machine("quiz", input_vars={"question": lambda d: d["question"]}, result="grade", source_file="quiz.py",
                   states=[LLMState("answer", prompt="Answer in one word: {question}", max_tokens=20),
                           PythonState("grade", run=grade, needs=["answer"], guard=graded)])


ARMS: dict[str, dict[str, StateOverride]] = {
    "A": {}, "B": parse_overrides({"answer": {"model": HAIKU, "prompt": B_PROMPT}}, where="b.toml")}


class Answering:
    """The fake's answers: right or wrong by the question and the model asked; a run id in
    `fail` gets a 400 (a failed step) once."""

    def __init__(self) -> None:
        self.fail: set[str] = set()

    def __call__(self, request: CapturedRequest) -> str | Reply:
        if request.run_id in self.fail:
            self.fail.discard(request.run_id)
            return error(400, "scripted failure")
        found = re.search(r"question (\d+)", request.prompt)
        assert found, request.prompt
        return "yes" if right(int(found.group(1)), request.body["model"]) else "no"


@pytest.fixture
def answering() -> Answering:
    return Answering()


@pytest.fixture
def fake(answering: Answering) -> FakeMessagesAPI:
    return FakeMessagesAPI(default=answering, per_run=True)


@pytest.fixture
def engine(tmp_path: Path, fake: FakeMessagesAPI) -> Iterator[Engine]:
    with Engine(open_store(tmp_path / "orch.db"), model=fake.model()) as engine:
        yield engine


def experiment(engine: Engine, *, arms: Mapping[str, Mapping[str, StateOverride]] = ARMS, exp: str = "E",
               inputs: Mapping[int, Any] | None = None, **settings: Any) -> dict[str, BatchResult]:
    numbered = inputs if inputs is not None else dict(enumerate(QUESTIONS, 1))
    return asyncio.run(Experiment(engine, quiz(), arms, numbered, experiment_id=exp, concurrency=4,
                                  settings=Settings(arms=tuple(arms), **settings)).run())


def report(engine: Engine, exp: str = "E", metric: str = "completed") -> dict[str, Any]:
    runs = asyncio.run(read_experiment(engine.store, exp, results=metric.startswith("result:")))
    return build_report(runs, experiment=exp, metric=metric)


def rate(k: int, n: int) -> dict[str, Any]:
    low, high = wilson(k, n)
    return {"count": k, "rate": k / n, "low": low, "high": high}


# --------------------------------------------------------------------------- a paired experiment


def test_a_paired_experiment_with_known_outcomes_reports_them_and_the_true_difference(
        engine: Engine, fake: FakeMessagesAPI, tmp_path: Path) -> None:
    results = experiment(engine)

    assert {arm: len(r.results) for arm, r in results.items()} == {"A": 10, "B": 10}
    got = report(engine)
    assert (got["assign"], got["paired"], got["baseline"], got["metric"], got["better"]) == (
        "paired", True, "A", "completed", "higher")
    a, b = got["arms"]
    assert (a["arm"], a["runs"], b["arm"], b["runs"]) == ("A", 10, "B", 10)
    assert a["statuses"] == {"completed": rate(5, 10), "terminated": rate(5, 10)}
    assert b["statuses"] == {"completed": rate(8, 10), "terminated": rate(2, 10)}
    # Wilson 95 % for 5/10 and 8/10, as published calculators give them
    assert (a["statuses"]["completed"]["low"], a["statuses"]["completed"]["high"]) == pytest.approx((0.2366, 0.7634),
                                                                                                   abs=1e-4)
    assert (b["statuses"]["completed"]["low"], b["statuses"]["completed"]["high"]) == pytest.approx((0.4902, 0.9433),
                                                                                                   abs=1e-4)
    assert a["decisions"] == {"answer": {"continue": 10}, "grade": {"continue": 5, "terminate": 5}}
    assert b["decisions"] == {"answer": {"continue": 10}, "grade": {"continue": 8, "terminate": 2}}
    assert b["paths"] == [{"path": ["answer", "grade"], "status": "completed", "count": 8, "share": 0.8},
                          {"path": ["answer", "grade"], "status": "terminated", "count": 2, "share": 0.2}]
    assert a["tokens"]["input"] > 0 and a["cost_usd"]["unknown"] == 0
    assert b["cost_usd"]["mean"] < a["cost_usd"]["mean"]  # haiku is the cheaper model
    assert a["latency_ms"]["p50"] <= a["latency_ms"]["p90"]
    (versus,) = got["comparisons"]
    # B wins questions 6-10, ties 3-5, loses 1-2: a difference of (5 - 2) / 10
    assert (versus["arm"], versus["baseline"], versus["pairs"], versus["inputs"], versus["skipped"]) == (
        "B", "A", 10, 10, 0)
    assert (versus["wins"], versus["ties"], versus["losses"]) == (5, 3, 2)
    assert versus["mean_difference"] == pytest.approx(0.3)
    interval = versus["interval"]
    assert interval["low"] < 0.3 < interval["high"]
    assert (interval["level"], interval["resamples"], interval["seed"]) == (0.95, 10_000, 0)
    assert report(engine)["comparisons"] == got["comparisons"]  # the seed fixes the interval
    assert got["warnings"] == [f"arm {arm} has 10 run(s), fewer than 30: its intervals are wide and only roughly "
                               "right" for arm in "AB"]
    # the same difference on the result's `correct`; on cost B wins every pair
    correct = report(engine, metric="result:correct")["comparisons"][0]
    assert (correct["wins"], correct["ties"], correct["losses"], correct["mean_difference"]) == (
        5, 3, 2, pytest.approx(0.3))
    assert correct["interval"]["low"] < 0.3 < correct["interval"]["high"]
    cost = report(engine, metric="cost")
    assert cost["better"] == "lower" and cost["comparisons"][0]["wins"] == 10
    # each run carries its experiment and arm, and asked as its arm says
    rows = query(tmp_path / "orch.db", "SELECT run_id, batch_id, experiment, arm, options FROM runs ORDER BY run_id")
    assert sorted(r["run_id"] for r in rows) == sorted(f"E.{arm}-{n}" for arm in "AB" for n in range(1, 11))
    for row in rows:
        arm = row["run_id"][2]
        assert (row["batch_id"], row["experiment"], row["arm"]) == (f"E.{arm}", "E", arm)
        options = json.loads(row["options"])
        assert options["experiment"] == {"arms": ["A", "B"], "assign": "paired", "seed": 0, "repeat": 1}
        assert options.get("overrides", {}) == ({} if arm == "A" else {"answer": {"model": HAIKU,
                                                                                  "prompt": B_PROMPT}})
    asked = {(r.run_id[:3], r.body["model"], r.prompt.startswith("Answer yes or no")) for r in fake.requests}
    assert asked == {("E.A", "claude-sonnet-5-5", False), ("E.B", HAIKU, True)}
    text = "\n".join(report_lines(got))
    assert "B vs A on completed (higher is better), 10 pair(s) over 10 input(s): 5 win(s), 3 tie(s), 2 loss(es)" in text
    assert "5 (50.0%) [23.7%, 76.3%]" in text and "8 (80.0%) [49.0%, 94.3%]" in text


def test_a_rerun_resumes_a_failed_run_as_its_arm_and_calls_nothing_committed_again(
        engine: Engine, fake: FakeMessagesAPI, answering: Answering) -> None:
    answering.fail = {"E.B-7"}
    first = experiment(engine)
    assert first["B"].results[7].status.value == "failed"
    calls = len(fake.requests)

    again = experiment(engine)

    assert [(r.run_id, r.body["model"], r.prompt) for r in fake.requests[calls:]] == [
        ("E.B-7", HAIKU, "Answer yes or no: question 7?")]  # with arm B's overrides, once
    assert again["B"].results[7].status.value == "completed"
    assert (again["A"].progress.already_done, again["B"].progress.already_done) == (10, 9)
    experiment(engine)
    assert len(fake.requests) == calls + 1
    assert report(engine)["comparisons"][0]["wins"] == 5


def test_a_rerun_with_other_arms_or_settings_is_refused_before_anything_runs(
        engine: Engine, fake: FakeMessagesAPI) -> None:
    experiment(engine)
    calls = len(fake.requests)
    other = {"A": {}, "B": parse_overrides({"answer": {"model": "claude-opus-4-5"}}, where="c.toml")}
    with pytest.raises(UsageError, match="arm B of experiment E was started with other overrides"):
        experiment(engine, arms=other)
    with pytest.raises(UsageError, match=r"started with other arms or settings \(arms A, B, assign paired, seed 0"):
        experiment(engine, repeat=2)
    with pytest.raises(UsageError, match="other arms or settings"):
        experiment(engine, arms={**ARMS, "C": {}})
    assert len(fake.requests) == calls


def test_an_arm_whose_batch_id_holds_a_plain_batch_is_refused_and_a_batch_over_an_arm_too(
        engine: Engine, fake: FakeMessagesAPI) -> None:
    """`orch batch --batch-id E.B` then `orch ab --experiment E`: arm B took the plain batch's
    runs (the machine as it is, no arm) as its own, already done, and reported none of them."""
    numbered = dict(enumerate(QUESTIONS, 1))
    engine.run_many(quiz(), numbered, batch_id="E.B")
    calls, before = len(fake.requests), query_runs(engine)
    with pytest.raises(UsageError, match=r"batch E.B holds runs of a plain batch \(run E.B-\d+\), not of arm B of "
                                         r"experiment E; use a new experiment id"):
        experiment(engine)
    assert (len(fake.requests), query_runs(engine)) == (calls, before)  # arm A started nothing either
    experiment(engine, exp="F")
    with pytest.raises(UsageError, match=r"batch F.A holds runs of arm A of experiment F \(run F.A-\d+\), not of a "
                                         r"plain batch; use a new batch id"):
        engine.run_many(quiz(), numbered, batch_id="F.A")


def query_runs(engine: Engine) -> list[tuple[str, str | None]]:
    return sorted((s.run_id, s.arm) for s in engine._sync(engine.store.list_runs(limit=None)))


def test_hash_assignment_sends_each_value_to_one_arm_for_good(engine: Engine, fake: FakeMessagesAPI) -> None:
    users = [{**question, "user": f"u{question['q'] % 4}"} for question in QUESTIONS]
    results = experiment(engine, inputs=dict(enumerate(users, 1)), assign="hash:user")
    arm_of = {users[n - 1]["user"]: arm for arm, r in results.items() for n in r.results}
    assert sum(len(r.results) for r in results.values()) == 10  # each input ran once, in one arm
    assert all(arm_of[users[n - 1]["user"]] == arm for arm, r in results.items() for n in r.results)
    assert set(arm_of.values()) == {"A", "B"}
    calls = len(fake.requests)
    again = experiment(engine, inputs=dict(enumerate(users, 1)), assign="hash:user")  # a rerun: the same arms
    assert {arm: sorted(r.results) for arm, r in again.items()} == {arm: sorted(r.results) for arm, r in
                                                                    results.items()}
    assert len(fake.requests) == calls
    got = report(engine)
    assert (got["paired"], got["comparisons"]) == (False, [])
    assert "not paired (hash:user)" in "\n".join(report_lines(got))


# --------------------------------------------------------------------------- assignment


def test_plan_numbers_runs_alike_in_every_arm() -> None:
    inputs = {1: {"u": "x"}, 2: {"u": "y"}, 4: {"u": "z"}}  # line 3 was bad
    runs = plan(inputs, Settings(arms=("A", "B"), repeat=2))
    assert runs == {arm: {1: inputs[1], 2: inputs[1], 3: inputs[2], 4: inputs[2], 7: inputs[4], 8: inputs[4]}
                    for arm in "AB"}


def test_hash_and_random_assignment_are_stable() -> None:
    inputs = {n: {"user": f"user-{n % 7}"} for n in range(1, 101)}
    by_hash = plan(inputs, Settings(arms=("A", "B", "C"), assign="hash:user"))
    arm_of = {data["user"]: arm for arm, runs in by_hash.items() for data in runs.values()}
    assert len(arm_of) == 7 and sum(map(len, by_hash.values())) == 100  # one arm per user, whatever its line
    moved = {n: inputs[101 - n] for n in inputs}  # the file reversed: every user keeps its arm
    assert {data["user"]: arm for arm, runs in plan(moved, Settings(arms=("A", "B", "C"), assign="hash:user")).items()
            for data in runs.values()} == arm_of
    assert plan(inputs, Settings(arms=("A", "B", "C"), assign="hash:user")) == by_hash
    by_seed = plan(inputs, Settings(arms=("A", "B"), assign="random", seed=5))
    assert plan(inputs, Settings(arms=("A", "B"), assign="random", seed=5)) == by_seed
    assert plan(inputs, Settings(arms=("A", "B"), assign="random", seed=6)) != by_seed
    assert 30 < len(by_seed["A"]) < 70 and sorted([*by_seed["A"], *by_seed["B"]]) == list(range(1, 101))
    fewer = {n: data for n, data in inputs.items() if n != 50}  # a line dropped moves no other line
    assert plan(fewer, Settings(arms=("A", "B"), assign="random", seed=5)) == {
        arm: {n: d for n, d in runs.items() if n != 50} for arm, runs in by_seed.items()}
    with pytest.raises(UsageError, match="input 3 has no field 'user' to assign an arm by"):
        plan({1: {"user": 1}, 2: {"user": 2}, 3: {}}, Settings(arms=("A", "B"), assign="hash:user"))


@pytest.mark.parametrize(("settings", "message"), [
    ({"arms": ("A",)}, "at least 2 arms, not 1"),
    ({"arms": ("A", "A")}, "arm 'A' is given twice"),
    ({"arms": ("A", "B c")}, "arm name 'B c' is not valid"),
    ({"arms": ("A", "B"), "assign": "hash:"}, "assignment 'hash:' is not known"),
    ({"arms": ("A", "B"), "assign": "round-robin"}, "use one of paired, hash:FIELD, random"),
    ({"arms": ("A", "B"), "repeat": 0}, "repeat 0 is not a number of runs"),
])
def test_bad_settings_are_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        Settings(**settings)


# --------------------------------------------------------------------------- arms


@pytest.mark.parametrize(("content", "message"), [
    ("[answr]\nmodel = 'x'\n", "arm B (b.toml): machine 'quiz' has no state 'answr' to override; name one of "
                               "answer, grade"),
    ("[answer]\nprompt = 'Hi {nope}'\n", "arm B (b.toml): quiz.py: state 'answer': prompt uses {nope}"),
    ("[grade]\nmodel = 'x'\n", "arm B (b.toml): state 'grade' of machine 'quiz' makes no model call"),
    ("[answer\n", "arm B (b.toml): not valid TOML"),
    ("[answer]\nmodle = 'x'\n", "arm B (b.toml): state 'answer': modle: Extra inputs are not permitted"),
    ("[grade.on]\n'branch:x' = 'nowhere'\n", "transition branch:x -> unknown target 'nowhere'"),
])
def test_a_bad_arm_file_is_refused_naming_the_file_and_the_state(tmp_path: Path, content: str, message: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "b.toml", content)
    with pytest.raises(UsageError) as caught:
        read_arms(["A", "B=@b.toml"], quiz())
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_arms_are_read_from_toml_and_an_empty_file_is_a_control_arm(tmp_path: Path) -> None:
    b = write(tmp_path / "b.toml", f'[answer]\nmodel = "{HAIKU}"\nparams = {{temperature = 0.7}}\n'
                                   '[grade.on]\n"terminate" = "__end__"\n')
    empty = write(tmp_path / "c.toml", "")
    arms = read_arms(["A", f"B=@{b}", f"C=@{empty}"], quiz())
    assert list(arms) == ["A", "B", "C"] and arms["A"] == arms["C"] == {}
    assert arms["B"]["answer"].model == HAIKU and arms["B"]["answer"].params == {"temperature": 0.7}
    assert arms["B"]["grade"].on == {"terminate": "__end__"}
    for specs, message in ((["A"], "at least 2 arms, got 1"), (["A", "A"], "arm 'A' is given twice"),
                           (["A", f"B={b}"], "an arm's overrides come from a file"),
                           (["A", "B=@missing.toml"], "arm B (missing.toml): cannot read it")):
        with pytest.raises(UsageError, match=re.escape(message)):
            read_arms(specs, quiz())


# --------------------------------------------------------------------------- the report's arithmetic


def runs_of(arm: str, statuses: list[str], **fields: Any) -> list[ArmRun]:
    return [ArmRun(arm=arm, machine="m", number=n, status=status, path=("s",), **fields)
            for n, status in enumerate(statuses, 1)]


def test_thirty_runs_an_arm_give_no_warning_and_repeats_pair_by_input() -> None:
    settings = {"arms": ["A", "B"], "assign": "paired", "seed": 0, "repeat": 3}
    runs = runs_of("A", ["completed"] * 15 + ["failed"] * 15, settings=settings) + runs_of(
        "B", ["completed"] * 30, settings=settings)
    got = build_report(runs, experiment="X")
    assert got["warnings"] == []
    (versus,) = got["comparisons"]
    assert (versus["pairs"], versus["inputs"], versus["wins"], versus["ties"]) == (30, 10, 15, 15)
    assert versus["mean_difference"] == 0.5 and versus["interval"]["excludes_zero"]
    assert got["arms"][0]["statuses"] == {"completed": rate(15, 30), "failed": rate(15, 30)}


def test_lower_wins_for_cost_and_pairs_without_a_value_are_left_out() -> None:
    a = runs_of("A", ["completed"] * 3, cost_usd=0.02, result={"score": 1})
    b = runs_of("B", ["completed"] * 3, cost_usd=0.01, result={"other": 1})
    b[0].cost_usd = None  # a call of unknown price
    b[1].result = {"score": True}
    cost = build_report(a + b, experiment="X", metric="cost")["comparisons"][0]
    assert (cost["pairs"], cost["skipped"], cost["wins"], cost["mean_difference"]) == (2, 1, 2, pytest.approx(-0.01))
    score = build_report(a + b, experiment="X", metric="result:score")
    assert (score["comparisons"][0]["pairs"], score["comparisons"][0]["ties"]) == (1, 1)
    assert score["arms"][1]["metric"] == {"mean": 1.0, "runs": 1}
    assert build_report(a + b, experiment="X", metric="cost")["arms"][1]["cost_usd"]["unknown"] == 1
    for metric in ("completed", "cost", "tokens", "latency", "result:score"):
        assert check_metric(metric) == metric
    for bad in ("speed", "result:", "Completed"):
        with pytest.raises(UsageError, match="is not known"):
            check_metric(bad)


def test_an_arm_that_got_no_input_is_reported_empty() -> None:
    settings = {"arms": ["A", "B"], "assign": "hash:user", "seed": 0, "repeat": 1}
    got = build_report(runs_of("A", ["completed", "failed"], settings=settings), experiment="X")
    assert [(a["arm"], a["runs"]) for a in got["arms"]] == [("A", 2), ("B", 0)]
    assert got["arms"][1]["statuses"]["completed"] == {"count": 0, "rate": None, "low": 0.0, "high": 1.0}
    assert got["arms"][1]["cost_usd"]["mean"] is None and got["comparisons"] == []
    assert "B    0     -" in "\n".join(report_lines(got))
    assert got["warnings"][1].startswith("arm B has 0 run(s)")


# --------------------------------------------------------------------------- the command


def answers_file(path: Path) -> Path:
    """Offline answers: for question q, arm A's model and arm B's (haiku) as `right` says."""
    rules = [{"when": {"q": q}, "answers": {"answer": "yes" if right(q, "") else "no",
                                            f"answer@{HAIKU}": "yes" if right(q, HAIKU) else "no"}}
             for q in range(1, 11)]
    return write(path, json.dumps({"by_input": rules}))


def test_orch_ab_runs_reports_and_resumes_an_experiment(tmp_path: Path) -> None:
    machine = write(tmp_path / "quiz.py", QUIZ_SOURCE)
    inputs = write(tmp_path / "quiz.jsonl", "".join(json.dumps(q) + "\n" for q in QUESTIONS))
    arm_b = write(tmp_path / "b.toml", f'[answer]\nmodel = "{HAIKU}"\nprompt = "{B_PROMPT}"\n')
    answers = answers_file(tmp_path / "answers.json")
    orch = Orch(tmp_path / "orch.db", cwd=tmp_path)
    command = ["ab", machine, "--arm", "A", "--arm", f"B=@{arm_b}", "--inputs", inputs, "--offline", answers,
               "--experiment", "quiz-1"]

    first = orch.ok(*command)

    assert "batch quiz-1.A: 10 completed (0 before)" in first.stdout
    assert "batch quiz-1.B: 10 completed (0 before)" in first.stdout
    assert "report with: orch ab report quiz-1" in first.stdout
    assert "experiment quiz-1: 20/20 done" in first.stderr
    shown = orch("ab", "report", "quiz-1", "--json")
    assert shown.code == 0
    got = json.loads(shown.stdout)
    assert [(a["arm"], a["statuses"]) for a in got["arms"]] == [
        ("A", {"completed": rate(5, 10), "terminated": rate(5, 10)}),
        ("B", {"completed": rate(8, 10), "terminated": rate(2, 10)})]
    versus = got["comparisons"][0]
    assert (versus["wins"], versus["ties"], versus["losses"]) == (5, 3, 2)
    assert versus["interval"]["low"] < 0.3 < versus["interval"]["high"]
    assert shown.stderr.count("orch: warning: arm ") == 2 and "fewer than 30" in shown.stderr
    text = orch.ok("ab", "report", "quiz-1", "--metric", "result:correct").stdout
    assert "B vs A on result:correct (higher is better)" in text and "mean difference +0.300" in text

    again = orch.ok(*command, "--json")  # the same experiment again: read back, nothing asked

    summary = json.loads(again.stdout)
    assert {arm: (s["already_done"], s["completed"], s["failed"]) for arm, s in summary["arms"].items()} == {
        "A": (10, 10, 0), "B": (10, 10, 0)}
    assert query(tmp_path / "orch.db", "SELECT count(*) AS n FROM transitions")[0]["n"] == 40
    missing = orch("ab", "report", "nope")
    assert missing.code == 2
    assert one_error_line(missing) == ("orch: error: no runs of experiment 'nope' are stored in this database; "
                                       "check the id (`orch ab` prints it), or pass --db PATH")


def test_orch_ab_refuses_a_bad_arm_before_anything_is_stored(tmp_path: Path) -> None:
    machine = write(tmp_path / "quiz.py", QUIZ_SOURCE)
    inputs = write(tmp_path / "quiz.jsonl", json.dumps(QUESTIONS[0]) + "\n")
    write(tmp_path / "b.toml", "[answr]\nmodel = 'x'\n")
    result = Orch(tmp_path / "orch.db", cwd=tmp_path)("ab", machine, "--arm", "A", "--arm", "B=@b.toml",
                                                      "--inputs", inputs, "--offline")
    assert result.code == 2
    assert one_error_line(result) == ("orch: error: arm B (b.toml): machine 'quiz' has no state 'answr' to override; "
                                      "name one of answer, grade")
    assert not (tmp_path / "orch.db").exists()
