"""End to end: the real `orch` console script, the real anthropic SDK, the fake Messages API
served on loopback HTTP, and real SQLite files in tmp_path.

The helpers at the top (`Orch`, `answer`, `script`, ...) are shared with test_crash.py and
test_secrets.py.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from statemachine_orch import SQLiteStore
from statemachine_orch.testing import CapturedRequest, FakeMessagesAPI, Reply, error

from .helpers import (
    CLOSED_PORT,
    MACHINES,
    REPORT,
    REPORT_INPUT,
    REPORT_STATES,
    ROUTER,
    ROUTER_STATES,
    CLIResult,
    Orch,
    offline_environment,
    one_error_line,
    query,
    requests_for,
    resume_hint,
    router_input,
    run_count,
    run_orch,
    script,
    stored_log,
    stored_status,
    write,
)

EXTRACT = MACHINES / "extract.py"
EXTRACT_INPUT = MACHINES / "extract_input.json"
SEED_MAX_TOKENS = {"data_validation": 500, "trend_analysis": 1000, "risk_assessment": 800,
                   "recommendations": 1000, "executive_summary": 600}
LOG_FIELDS = {"run_id", "seq", "from_state", "to_state", "decision", "reason", "attempt",
              "started_at", "latency_ms", "input_tokens", "output_tokens"}


# --------------------------------------------------------------------------- helpers


def committed(log: list[dict[str, Any]]) -> list[str]:
    """The states whose step committed a transition, in log order."""
    return [row["from_state"] for row in log if row["to_state"] is not None]


# --------------------------------------------------------------------------- the seed report


@dataclass
class Recorded:
    orch: Orch
    report: dict[str, Any]
    router: dict[str, Any]
    replies: dict[str, Reply]
    requests: list[CapturedRequest]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recorded]:
    """One report run, then one support_router run, in one database (read-only for tests)."""
    tmp = tmp_path_factory.mktemp("recorded")
    fake = FakeMessagesAPI(default=None)
    replies = script(fake, REPORT_STATES + ROUTER_STATES[1:])
    fake.on("sentiment_analysis", "positive")
    with offline_environment(), fake.serve() as url:
        cli = Orch(tmp / "orch.db", url)
        report = cli.json("run", REPORT, "--input", REPORT_INPUT)
        router = cli.json("run", ROUTER, "--input", router_input(tmp))
    yield Recorded(Orch(cli.db), report, router, replies, list(fake.requests))


def test_report_run_completes_the_five_seed_states_in_order(recorded: Recorded) -> None:
    result = recorded.report
    assert result["status"] == "completed"
    assert result["path"] == list(REPORT_STATES)
    assert re.fullmatch(r"[0-9A-Z]{26}", result["run_id"])
    assert result["outputs"] == {s: recorded.replies[s].text for s in REPORT_STATES}
    replies = [recorded.replies[s] for s in REPORT_STATES]
    assert result["input_tokens"] == sum(r.input_tokens or 0 for r in replies)
    assert result["output_tokens"] == sum(r.output_tokens or 0 for r in replies)


def test_report_sends_one_request_per_state_with_the_seed_budgets(recorded: Recorded) -> None:
    report_requests = [r for r in recorded.requests if r.run_id == recorded.report["run_id"]]
    assert [r.state for r in report_requests] == list(REPORT_STATES)
    assert len(recorded.requests) == len(REPORT_STATES) + 2  # plus the router's two calls
    assert {r.state: r.body["max_tokens"] for r in report_requests} == SEED_MAX_TOKENS
    raw_data = json.loads(REPORT_INPUT.read_text(encoding="utf-8"))
    first = report_requests[0].prompt
    assert raw_data["company"] in first and raw_data["notes"] in first


def test_later_report_prompts_contain_the_answers_they_depend_on(recorded: Recorded) -> None:
    run_id = recorded.report["run_id"]
    prompts = {r.state: r.prompt for r in recorded.requests if r.run_id == run_id}
    text = {s: recorded.replies[s].text or "" for s in REPORT_STATES}
    assert text["data_validation"] in prompts["trend_analysis"]
    assert text["trend_analysis"] in prompts["risk_assessment"]
    for needed in ("trend_analysis", "risk_assessment"):
        assert text[needed] in prompts["recommendations"]
    for needed in ("trend_analysis", "risk_assessment", "recommendations"):
        assert text[needed] in prompts["executive_summary"]
    assert text["executive_summary"] not in "".join(prompts.values())


def test_log_json_is_one_consistent_object_per_transition(recorded: Recorded) -> None:
    run_id = recorded.report["run_id"]
    rows = recorded.orch.log(run_id)
    assert len(rows) == len(REPORT_STATES)
    for seq, (row, state) in enumerate(zip(rows, REPORT_STATES, strict=True), 1):
        assert LOG_FIELDS <= set(row), LOG_FIELDS - set(row)
        reply = recorded.replies[state]
        assert (row["run_id"], row["seq"], row["from_state"]) == (run_id, seq, state)
        assert (row["decision"], row["attempt"], row["error"]) == ("continue", 1, None)
        assert row["reason"]
        assert row["input_tokens"] == reply.input_tokens
        assert row["output_tokens"] == reply.output_tokens
        assert row["latency_ms"] > 0
        assert row["source"] == "llm"
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", row["started_at"])
    for row, following in itertools.pairwise(rows):
        assert row["to_state"] == following["from_state"]
    assert rows[-1]["to_state"] not in REPORT_STATES and rows[-1]["to_state"]
    assert [r["started_at"] for r in rows] == sorted(r["started_at"] for r in rows)


def test_runs_json_lists_runs_newest_first_with_steps_and_tokens(recorded: Recorded) -> None:
    runs = recorded.orch.json("runs")
    assert isinstance(runs, list)
    assert [r["run_id"] for r in runs] == [recorded.router["run_id"], recorded.report["run_id"]]
    for listed, result in zip(runs, (recorded.router, recorded.report), strict=True):
        assert listed["machine"] == result["machine"]
        assert listed["status"] == "completed"
        assert listed["steps"] == len(result["path"])
        assert listed["input_tokens"] == result["input_tokens"]
        assert listed["output_tokens"] == result["output_tokens"]
        assert listed["tokens"] == result["input_tokens"] + result["output_tokens"]
    assert runs[0]["started_at"] >= runs[1]["started_at"]


def test_show_json_has_input_outputs_and_snapshot(recorded: Recorded) -> None:
    run_id = recorded.report["run_id"]
    shown = recorded.orch.json("show", run_id)
    assert shown["run_id"] == run_id
    assert shown["machine"] == "report"
    assert shown["input"] == json.loads(REPORT_INPUT.read_text(encoding="utf-8"))
    assert shown["outputs"] == {s: recorded.replies[s].text for s in REPORT_STATES}
    snapshot = shown["snapshot"]
    assert snapshot["status"] == "completed"
    assert snapshot["seq"] == len(REPORT_STATES)
    assert snapshot["next_state"] is None
    assert snapshot["owned"] is False
    assert snapshot["error"] is None


def test_replay_needs_neither_network_nor_key(recorded: Recorded,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    offline = Orch(recorded.orch.db, CLOSED_PORT, key=False)
    run_id = recorded.report["run_id"]
    replayed = offline("replay", run_id)
    assert replayed.code == 0, replayed.stderr
    matches = f"replay {run_id}: matches the recording ({len(REPORT_STATES)} transition(s)"
    assert matches in replayed.stdout


# --------------------------------------------------------------------------- routing machines


@pytest.mark.parametrize(("sentiment", "path"), [
    ("positive", ["sentiment_analysis", "upsell"]),
    ("negative", ["sentiment_analysis", "support"]),
    ("neutral", ["sentiment_analysis", "standard_reply"]),
])
def test_support_router_follows_the_sentiment(orch: Orch, fake: FakeMessagesAPI, tmp_path: Path,
                                              sentiment: str, path: list[str]) -> None:
    fake.on("sentiment_analysis", f"Sentiment: {sentiment}. The customer wrote about a tent.")
    replies = script(fake, ROUTER_STATES[1:])
    result = orch.json("run", ROUTER, "--input", router_input(tmp_path))
    assert (result["status"], result["path"]) == ("completed", path)
    assert result["outputs"][path[-1]] == replies[path[-1]].text
    assert [r.state for r in fake.requests] == path
    assert "I love the new tent!" in fake.requests[1].prompt
    decision = stored_log(orch.db, result["run_id"])[0]
    assert decision["to_state"] == path[1]
    assert sentiment in decision["reason"]


def test_extract_offline_uses_the_offline_script(db_path: Path) -> None:
    result = Orch(db_path)("run", EXTRACT, "--input", EXTRACT_INPUT, "--offline", "--json")
    assert result.code == 0, result.stderr
    assert "OFFLINE" in result.stderr and "extract.offline.json" in result.stderr
    out = json.loads(result.stdout)
    invoice = json.loads((MACHINES / "extract.offline.json").read_text())["extract_invoice"]["json"]
    assert (out["status"], out["path"]) == ("completed", ["extract_invoice", "check_totals"])
    assert out["outputs"]["extract_invoice"] == invoice
    assert out["outputs"]["check_totals"] == {
        "computed_total": invoice["total"], "stated_total": invoice["total"], "consistent": True}


def test_extract_branches_to_review_note_when_totals_disagree(orch: Orch,
                                                              fake: FakeMessagesAPI) -> None:
    invoice = {"vendor": "Fjord Tools AS", "invoice_number": "FT-77", "date": "2026-02-01",
               "currency": "NOK", "line_items": [
                   {"description": "Axe", "quantity": 2, "unit_price": 30.0},
                   {"description": "Saw", "quantity": 1, "unit_price": 40.0}],
               "total": 120.0}
    fake.on("extract_invoice", invoice)
    note = script(fake, ["review_note"])["review_note"]
    result = orch.json("run", EXTRACT, "--input", EXTRACT_INPUT)
    assert result["status"] == "completed"
    assert result["path"] == ["extract_invoice", "check_totals", "review_note"]
    assert result["outputs"]["extract_invoice"] == invoice
    assert result["outputs"]["check_totals"] == {
        "computed_total": 100.0, "stated_total": 120.0, "consistent": False}
    assert result["outputs"]["review_note"] == note.text
    extract_request, review_request = fake.requests
    assert extract_request.body["tool_choice"]["type"] == "tool"
    assert "FT-77" in review_request.prompt and "120" in review_request.prompt
    check = stored_log(orch.db, result["run_id"])[1]
    assert (check["from_state"], check["decision"], check["to_state"]) == (
        "check_totals", "branch_a", "review_note")
    assert check["source"] == "python"
    assert "100" in check["reason"] and "120" in check["reason"]


# --------------------------------------------------------------------------- exit codes 0 and 1

TERMINATING_MACHINE = '''
from statemachine_orch import FlowDecision, Machine, PythonState, guard

@guard(FlowDecision.TERMINATE, FlowDecision.CONTINUE)
def stop_when_told(output, ctx):
    if output["stop"]:
        return FlowDecision.TERMINATE.because("the input says stop")
    return FlowDecision.CONTINUE.because("the input says go on")

machine = Machine("stopper", states=[
    PythonState("check", run=lambda ctx: {"stop": ctx.input["stop"]}, guard=stop_when_told),
    PythonState("work", run=lambda ctx: "worked"),
])
'''

RAISING_MACHINE = '''
from statemachine_orch import Machine, PythonState

def fetch(ctx):
    raise ConnectionError("ledger service unavailable")

machine = Machine("exploding", states=[PythonState("fetch", run=fetch)])
'''


def test_a_guard_that_terminates_ends_the_run_with_exit_0(db_path: Path, tmp_path: Path) -> None:
    machine = write(tmp_path / "stopper.py", TERMINATING_MACHINE)
    data = write(tmp_path / "in.json", json.dumps({"stop": True}))
    result = Orch(db_path)("run", machine, "--input", data, "--json")
    assert result.code == 0, result.stderr
    out = json.loads(result.stdout)
    assert (out["status"], out["path"], out["error"]) == ("terminated", ["check"], None)
    (row,) = stored_log(db_path, out["run_id"])
    assert (row["from_state"], row["decision"], row["reason"]) == (
        "check", "terminate", "the input says stop")
    assert stored_status(db_path, out["run_id"]) == "terminated"


def test_a_python_state_that_raises_fails_the_run_with_exit_1(db_path: Path,
                                                              tmp_path: Path) -> None:
    cli = Orch(db_path)
    result = cli("run", write(tmp_path / "exploding.py", RAISING_MACHINE))
    assert result.code == 1, result.stderr
    run_id = resume_hint(result.stdout)
    assert "ledger service unavailable" in result.stdout
    (row,) = cli.log(run_id)
    assert (row["from_state"], row["to_state"], row["decision"]) == ("fetch", None, None)
    assert "ConnectionError" in row["error"] and "ledger service unavailable" in row["error"]
    assert stored_status(db_path, run_id) == "failed"


def test_resume_after_an_api_error_does_not_resend_committed_steps(orch: Orch,
                                                                   fake: FakeMessagesAPI) -> None:
    replies = script(fake, REPORT_STATES, before={
        "risk_assessment": [error(400, "prompt is too long for this model")]})
    failed = orch("run", REPORT, "--input", REPORT_INPUT)
    assert failed.code == 1, failed.stderr
    run_id = resume_hint(failed.stdout)
    log = orch.log(run_id)
    assert committed(log) == ["data_validation", "trend_analysis"]
    assert (log[-1]["from_state"], log[-1]["to_state"]) == ("risk_assessment", None)
    assert "400" in log[-1]["error"] and "prompt is too long" in log[-1]["error"]
    assert stored_status(orch.db, run_id) == "failed"

    resumed = orch.json("resume", run_id)
    assert (resumed["status"], resumed["path"]) == ("completed", list(REPORT_STATES))
    assert resumed["outputs"] == {s: replies[s].text for s in REPORT_STATES}
    assert {s: fake.calls(s) for s in REPORT_STATES} == {
        "data_validation": 1, "trend_analysis": 1, "risk_assessment": 2, "recommendations": 1,
        "executive_summary": 1}
    first, second = requests_for(fake, "risk_assessment")
    assert first.body == second.body  # rebuilt from the stored trend_analysis answer
    rows = stored_log(orch.db, run_id)
    assert [row["seq"] for row in rows] == list(range(1, len(REPORT_STATES) + 2))
    assert [row["from_state"] for row in rows if row["to_state"]] == list(REPORT_STATES)
    assert stored_status(orch.db, run_id) == "completed"


GUARDED_MACHINE = '''
from pathlib import Path
from statemachine_orch import FlowDecision, LLMState, Machine, guard

APPROVAL = Path(__file__).with_name("approved.marker")

@guard(FlowDecision.CONTINUE)
def needs_approval(output, ctx):
    if not APPROVAL.exists():
        raise RuntimeError("approval marker missing")
    return FlowDecision.CONTINUE.because("approved")

machine = Machine("approval", states=[
    LLMState("draft", prompt="Draft a haiku about state machines.", max_tokens=64,
             guard=needs_approval),
    LLMState("polish", prompt="Polish this draft: {draft}", needs=["draft"], max_tokens=64),
])
'''


def test_a_guard_error_keeps_the_paid_answer_and_resume_rejudges_it(
        orch: Orch, fake: FakeMessagesAPI, tmp_path: Path) -> None:
    machine = write(tmp_path / "approval.py", GUARDED_MACHINE)
    replies = script(fake, ["draft", "polish"])
    failed = orch("run", machine)
    assert failed.code == 1, failed.stderr
    run_id = resume_hint(failed.stdout)
    assert "approval marker missing" in failed.stdout
    (stored,) = stored_log(orch.db, run_id)
    assert (stored["from_state"], stored["to_state"]) == ("draft", None)
    assert json.loads(stored["output"]) == replies["draft"].text
    assert replies["draft"].text in stored["response"]
    assert stored_status(orch.db, run_id) == "failed"

    (tmp_path / "approved.marker").touch()
    resumed = orch.json("resume", run_id)
    assert (resumed["status"], resumed["path"]) == ("completed", ["draft", "polish"])
    assert (fake.calls("draft"), fake.calls("polish")) == (1, 1)
    assert (replies["draft"].text or "-") in requests_for(fake, "polish")[0].prompt
    failure, rejudged, polish = orch.log(run_id)
    assert (failure["seq"], failure["from_state"], failure["to_state"], failure["source"]) == (
        1, "draft", None, "llm")
    assert "GuardError" in failure["error"] and "approval marker missing" in failure["error"]
    assert failure["output_tokens"] == replies["draft"].output_tokens
    assert (rejudged["seq"], rejudged["from_state"], rejudged["to_state"], rejudged["source"]) == (
        2, "draft", "polish", "recorded")
    assert (rejudged["decision"], rejudged["error"]) == ("continue", None)
    assert (polish["seq"], polish["from_state"], polish["source"]) == (3, "polish", "llm")


# --------------------------------------------------------------------------- exit code 2

INVALID_MACHINE = '''
from statemachine_orch import LLMState, Machine

machine = Machine("broken", states=[
    LLMState("ask", prompt="Summarise {nowhere}", max_tokens=50),
])
'''


UsageCase = Callable[[Path, Path], list[str | Path]]


def _unknown_run(command: str) -> UsageCase:
    def args(tmp: Path, db: Path) -> list[str | Path]:
        asyncio.run(SQLiteStore(db).close())  # a database that exists but holds no such run
        return [command, "NO_SUCH_RUN"]

    return args


USAGE_ERRORS: dict[str, tuple[UsageCase, str]] = {
    "unknown machine file": (
        lambda tmp, db: ["run", tmp / "no_such_machine.py"], "no such file"),
    "invalid machine": (
        lambda tmp, db: ["run", write(tmp / "broken.py", INVALID_MACHINE)], "{nowhere}"),
    "input not JSON": (
        lambda tmp, db: ["run", REPORT, "--input", write(tmp / "in.json", '{"quarters": [1,')],
        "not valid JSON"),
    "input not an object": (
        lambda tmp, db: ["run", REPORT, "--input", write(tmp / "in.json", "[1, 2, 3]")],
        "must be a JSON object"),
    "input not UTF-8": (
        lambda tmp, db: ["run", ROUTER, "--input",
                         write(tmp / "in.json", '{"text": "café"}'.encode("latin-1"))],
        "not UTF-8"),
    "input fails the input model": (
        lambda tmp, db: ["run", ROUTER, "--input", write(tmp / "in.json", "{}")], "Ticket"),
    **{f"{command} of an unknown run": (_unknown_run(command), "NO_SUCH_RUN")
       for command in ("log", "show", "resume", "replay")},
    "log without a database": (lambda tmp, db: ["log", "NO_SUCH_RUN"], ""),
}


@pytest.fixture(scope="module")
def refused(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[CLIResult, Path]]:
    """Each usage-error case's result and database, the cases run at once (a start is ~1 s)."""
    started = {}
    with offline_environment():
        for case, (make_args, _) in USAGE_ERRORS.items():
            tmp = tmp_path_factory.mktemp("refused")
            cli = Orch(tmp / "orch.db")
            started[case] = (cli, cli.start(*make_args(tmp, cli.db)))
        return {case: (cli.finish(proc), cli.db) for case, (cli, proc) in started.items()}


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_definition_and_input_errors_exit_2_with_one_line(
        case: str, refused: dict[str, tuple[CLIResult, Path]]) -> None:
    result, db = refused[case]
    assert result.code == 2, (result.code, result.stderr)
    assert USAGE_ERRORS[case][1] in one_error_line(result)
    assert result.stdout == ""
    assert run_count(db) == 0


def test_debug_adds_the_traceback(db_path: Path, tmp_path: Path) -> None:
    result = Orch(db_path)("--debug", "run", tmp_path / "no_such_machine.py")
    assert result.code == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("orch: error: ")
    assert not db_path.exists()


# --------------------------------------------------------------------------- API key handling


def test_offline_runs_without_an_api_key(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    cli = Orch(db_path, key=False)
    result = cli.json("run", REPORT, "--input", REPORT_INPUT, "--offline")
    offline = json.loads((MACHINES / "report.offline.json").read_text(encoding="utf-8"))
    assert (result["status"], result["path"]) == ("completed", list(REPORT_STATES))
    assert result["outputs"] == offline
    assert stored_status(db_path, result["run_id"]) == "completed"


def test_live_mode_without_an_api_key_exits_2_and_stores_nothing(
        db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    result = Orch(db_path, key=False)("run", REPORT, "--input", REPORT_INPUT)
    assert result.code == 2
    line = one_error_line(result)
    assert "ANTHROPIC_API_KEY" in line and "--offline" in line
    assert run_count(db_path) == 0


def test_demo_runs_logs_and_replays_offline_from_any_directory(tmp_path: Path) -> None:
    result = run_orch("demo", cwd=tmp_path)  # no machines/ here: the demo ships with the package
    assert result.code == 0, result.stderr
    (run,) = query(tmp_path / "orch.db", "SELECT run_id, status FROM runs WHERE batch_id IS NULL")
    assert run["status"] == "completed"
    assert f"replay {run['run_id']}: matches the recording" in result.stdout
    steps = query(tmp_path / "orch.db", "SELECT from_state FROM transitions WHERE run_id = ? ORDER BY seq",
                  run["run_id"])
    assert [row["from_state"] for row in steps] == list(REPORT_STATES)
    batch = query(tmp_path / "orch.db", "SELECT r.status, group_concat(t.from_state, ' ') AS path FROM runs r "
                                        "JOIN transitions t USING (run_id) WHERE r.batch_id IS NOT NULL "
                                        "GROUP BY r.run_id ORDER BY r.run_id")
    assert [row["status"] for row in batch] == ["completed"] * 6
    assert {row["path"].split()[-1] for row in batch} == {"upsell", "support", "standard_reply"}
    assert "6 completed (0 before)" in result.stdout
    assert "2 x sentiment_analysis -> upsell" in result.stdout and "2 x sentiment_analysis -> support" in result.stdout


# --------------------------------------------------------------------------- replay


def edit(machine: Path, old: str, new: str) -> None:
    source = machine.read_text(encoding="utf-8")
    assert source.count(old) == 1, old
    machine.write_text(source.replace(old, new), encoding="utf-8")


def _router_runs(orch: Orch, fake: FakeMessagesAPI, tmp_path: Path, machine: Path,
                 sentiments: Sequence[str]) -> list[str]:
    fake.on("sentiment_analysis", *sentiments)
    script(fake, ROUTER_STATES[1:])
    return [orch.json("run", machine, "--input", router_input(tmp_path))["run_id"]
            for _ in sentiments]


def test_replay_reports_where_an_edited_guard_diverges(
        orch: Orch, fake: FakeMessagesAPI, tmp_path: Path, machines_dir: Path) -> None:
    machine = machines_dir / "support_router.py"
    positive, negative = _router_runs(orch, fake, tmp_path, machine, ["positive", "negative"])
    before = orch("replay", "--all", machine)
    assert before.code == 0, before.stderr
    assert "2 run(s) of support_router: 2 matching, 0 diverged" in before.stdout

    edit(machine, 'FlowDecision.BRANCH_A.because("sentiment positive',
         'FlowDecision.BRANCH_B.because("sentiment positive')
    replayed = orch("replay", positive)
    assert replayed.code == 1, replayed.stderr
    assert "DIVERGED" in replayed.stdout
    where = r"seq 1\b.*sentiment_analysis.*branch_a.*branch_b"
    assert re.search(where, replayed.stdout), replayed.stdout
    assert negative not in replayed.stdout

    after = orch("replay", "--all", machine)
    assert after.code == 1
    assert "2 run(s) of support_router: 1 matching, 1 diverged" in after.stdout
    rows = {line.split()[0]: line for line in after.stdout.splitlines() if line.strip()}
    assert "DIVERGED" in rows[positive] and "branch_b" in rows[positive]
    assert "DIVERGED" not in rows[negative]
    assert fake.calls() == 4  # replays never call the API


def test_replay_reports_an_edited_prompt(orch: Orch, fake: FakeMessagesAPI, tmp_path: Path,
                                         machines_dir: Path) -> None:
    machine = machines_dir / "support_router.py"
    (run_id,) = _router_runs(orch, fake, tmp_path, machine, ["neutral"])
    edit(machine, "Classify sentiment as positive/negative/neutral:",
         "Label the sentiment (positive, negative or neutral):")
    replayed = orch("replay", run_id)
    assert replayed.code == 1, replayed.stderr
    assert "seq 1, state sentiment_analysis" in replayed.stdout
    assert "request differs" in replayed.stdout and "prompt" in replayed.stdout
    assert "Label the sentiment" in replayed.stdout


def test_reading_commands_start_without_the_engine_stack() -> None:
    """`orch runs/log/show/audit` must not import what only running machines needs (asyncio
    they do need: the store contract is async)."""
    import subprocess
    import sys

    heavy = ["pydantic", "structlog", "transitions", "anthropic", "sqlite_utils", "statemachine_orch.engine._run",
             "statemachine_orch.engine._engine", "statemachine_orch.engine._fsm", "statemachine_orch.definition"]
    code = ("import sys, statemachine_orch.cli._main as c; c.build_parser(); "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_public_name_resolves_lazily() -> None:
    import importlib

    import statemachine_orch

    names = [n for n in statemachine_orch.__all__ if n != "__version__"]
    assert sorted(names) == sorted(statemachine_orch._WHERE)
    for name in names:
        module = importlib.import_module(statemachine_orch._WHERE[name], "statemachine_orch")
        assert getattr(statemachine_orch, name) is getattr(module, name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        statemachine_orch.nope  # noqa: B018
