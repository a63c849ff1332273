"""`orch batch` through the real command: a JSON-lines file of inputs run N at a time, each a
durable run `BATCH-LINE`; bad lines reported by number (`--strict` refuses the file); `--out`
results in input order; progress as a tqdm bar on a terminal and plain lines otherwise; a
SIGKILL or a Ctrl-C in the middle, then the same command again, finishes every input without
paying a committed step twice; `orch batch status`, `orch runs --batch`."""

from __future__ import annotations

import json
import shlex
import signal
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from statemachine_orch.testing import CapturedRequest, FakeMessagesAPI, Reply

from .helpers import (
    MACHINES,
    ROUTER,
    CLIResult,
    EnvOrch,
    Orch,
    database_fingerprint,
    offline_environment,
    one_error_line,
    query,
    run_count,
    run_orch,
    snapshot_copy,
    step_calls,
    tty_stderr,
    wait_until_delivered,
    write,
)

ROUTER_BATCH = MACHINES / "support_router_batch.jsonl"

# machines/support_router.offline.json: its by_input rules send each line of the batch file its own way
ROUTER_PATHS = [["sentiment_analysis", branch] for branch in
                ("support", "upsell", "standard_reply", "support", "upsell", "standard_reply")]

THREE_STEPS = '''
from statemachine_orch import LLMState, Machine

machine = Machine("three", input_vars={"topic": lambda data: data["topic"]}, states=[
    LLMState("outline", prompt="Outline a note on {topic}.", max_tokens=50),
    LLMState("draft", prompt="Draft it from {outline}", needs=["outline"], max_tokens=50),
    LLMState("summary", prompt="Summarise {draft}", needs=["draft"], max_tokens=50),
])
'''

STEPS = ("outline", "draft", "summary")


def by_run(request: CapturedRequest) -> str:
    return f"{request.state} for {request.run_id}"


@pytest.fixture
def fake() -> FakeMessagesAPI:
    """Every request answered, naming its state and run (served to `orch` by the conftest's fixture)."""
    return FakeMessagesAPI(default=by_run)


def three_steps(tmp_path: Path, inputs: int) -> tuple[Path, Path]:
    """The three-step machine and a JSON-lines file of `inputs` topics."""
    lines = "".join(json.dumps({"topic": f"topic {n}"}) + "\n" for n in range(1, inputs + 1))
    return write(tmp_path / "three.py", THREE_STEPS), write(tmp_path / "topics.jsonl", lines)


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def skipped(result: CLIResult) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("orch: skipped")]


def committed_steps(db: Path) -> set[tuple[str, str]]:
    return {(r["run_id"], r["from_state"]) for r in query(
        db, "SELECT run_id, from_state FROM transitions WHERE to_state IS NOT NULL")}


def resume_command(stdout: str) -> list[str]:
    """The arguments of the `resume with: orch ...` line of a batch's summary, without `orch`."""
    (line,) = [line for line in stdout.splitlines() if line.startswith("resume with: ")]
    argv = shlex.split(line.removeprefix("resume with: "))
    assert argv[0] == "orch", line
    return argv[1:]


# --------------------------------------------------------------------------- the routing batch, offline


@dataclass
class RouterBatch:
    db: Path
    out: Path
    first: CLIResult


@pytest.fixture(scope="module")
def router_batch(tmp_path_factory: pytest.TempPathFactory) -> RouterBatch:
    """machines/support_router_batch.jsonl run once, offline, as batch B (the tests read copies)."""
    folder = tmp_path_factory.mktemp("router")
    db, out = folder / "orch.db", folder / "res.jsonl"
    with offline_environment():
        first = Orch(db)("batch", ROUTER, "--inputs", ROUTER_BATCH, "--offline", "--batch-id", "B", "--out", out)
    return RouterBatch(db, out, first)


def test_a_routing_batch_takes_a_branch_per_input_and_writes_results_in_input_order(
        router_batch: RouterBatch) -> None:
    first = router_batch.first
    assert first.code == 0, first.stderr
    assert first.stdout.startswith("batch B: 6 completed (0 before), 0 failed, 0 interrupted, 0 not started; ")
    assert "resume with" not in first.stdout
    results = jsonl(router_batch.out)
    assert [(r["line"], r["run_id"], r["status"], r["path"]) for r in results] == [
        (n, f"B-{n}", "completed", path) for n, path in enumerate(ROUTER_PATHS, 1)]
    offline = json.loads((MACHINES / "support_router.offline.json").read_text(encoding="utf-8"))
    assert results[0]["result"] == offline["support"]  # line 1 has no rule of its own
    assert results[3]["result"] == offline["by_input"][4]["answers"]["support"]  # line 4's own answer
    assert results[4]["result"] == offline["by_input"][1]["answers"]["upsell"]
    assert all(r["outputs"]["sentiment_analysis"] in ("positive", "negative", "neutral") for r in results)
    assert {r["run_id"]: r["batch_id"] for r in query(router_batch.db, "SELECT run_id, batch_id FROM runs")} == {
        f"B-{n}": "B" for n in range(1, 7)}


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(router_batch: RouterBatch) -> None:
    lines = [line for line in router_batch.first.stderr.splitlines() if line.startswith("batch B: ")]
    assert lines[0].startswith("batch B: 0/6 done, 0 ok, 0 failed, 0 running, ")  # at the start
    assert lines[-1].startswith("batch B: 6/6 done, 6 ok, 0 failed, 0 running, ")  # at the end
    assert "\r" not in router_batch.first.stderr and "%|" not in router_batch.first.stderr  # no bar


def test_batch_status_and_runs_list_the_batch(router_batch: RouterBatch, tmp_path: Path) -> None:
    cli = Orch(snapshot_copy(router_batch.db, tmp_path / "orch.db"))
    status = cli.ok("batch", "status", "B").stdout.splitlines()
    assert status[0] == "batch B: 6 run(s): 6 completed"
    assert status[1].endswith(", 12 step(s)") and len(status) == 2  # no failures table
    counts = cli.json("batch", "status", "B")
    assert (counts["runs"], counts["statuses"], counts["steps"], counts["failures"]) == (6, {"completed": 6}, 12, [])
    assert counts["input_tokens"] == sum(r["input_tokens"] for r in jsonl(router_batch.out)) > 0
    listed = cli.json("runs", "--batch", "B")
    assert sorted(r["run_id"] for r in listed) == [f"B-{n}" for n in range(1, 7)]
    assert {r["status"] for r in listed} == {"completed"}
    assert cli.json("runs", "--batch", "B-1") == []  # a run id is not a batch


def test_the_same_batch_again_reads_every_run_back_and_changes_nothing(
        router_batch: RouterBatch, tmp_path: Path) -> None:
    db = snapshot_copy(router_batch.db, tmp_path / "orch.db")
    before = database_fingerprint(db)
    again = Orch(db)("batch", ROUTER, "--inputs", ROUTER_BATCH, "--offline", "--batch-id", "B",
                     "--out", tmp_path / "again.jsonl")
    assert again.code == 0, again.stderr
    assert again.stdout.startswith("batch B: 6 completed (6 before), 0 failed, 0 interrupted, 0 not started; ")
    assert database_fingerprint(db) == before
    assert [(r["line"], r["path"], r["result"]) for r in jsonl(tmp_path / "again.jsonl")] == [
        (r["line"], r["path"], r["result"]) for r in jsonl(router_batch.out)]


def test_a_changed_line_is_not_rerun(router_batch: RouterBatch, tmp_path: Path) -> None:
    db = snapshot_copy(router_batch.db, tmp_path / "orch.db")
    lines = ROUTER_BATCH.read_text(encoding="utf-8").splitlines()
    lines[1] = json.dumps({"text": "Actually, I hate the tent."})
    changed = write(tmp_path / "changed.jsonl", "\n".join(lines) + "\n")
    before = database_fingerprint(db)
    again = Orch(db)("batch", ROUTER, "--inputs", changed, "--offline", "--batch-id", "B",
                     "--out", tmp_path / "again.jsonl")
    assert again.code == 1
    assert again.stdout.startswith("batch B: 5 completed (5 before), 0 failed, 0 interrupted, 1 not started; ")
    assert "  line 2: - not started: input 2 is not the input run B-2 was started with" in again.stdout
    assert database_fingerprint(db) == before
    line_2 = jsonl(tmp_path / "again.jsonl")[1]
    assert (line_2["status"], line_2["run_id"]) == ("not_started", None)
    assert "run B-2" in line_2["error"]


def test_json_prints_one_object_and_no_progress_and_quiet_prints_nothing(tmp_path: Path) -> None:
    cli = Orch(tmp_path / "orch.db")
    as_json = cli("batch", ROUTER, "--inputs", ROUTER_BATCH, "--offline", "--batch-id", "J", "--json")
    assert as_json.code == 0, as_json.stderr
    assert as_json.stderr == ""  # no banner, no progress
    summary = json.loads(as_json.stdout)
    assert {k: summary[k] for k in ("batch_id", "total", "completed", "failed", "not_started", "interrupted",
                                    "already_done", "stopped", "errors", "failures")} == {
        "batch_id": "J", "total": 6, "completed": 6, "failed": 0, "not_started": 0, "interrupted": 0,
        "already_done": 0, "stopped": False, "errors": {}, "failures": {}}
    quiet = cli("-q", "batch", ROUTER, "--inputs", ROUTER_BATCH, "--offline", "--batch-id", "Q")
    assert (quiet.code, quiet.stdout, quiet.stderr) == (0, "", "")
    assert run_count(tmp_path / "orch.db") == 12


def test_on_a_terminal_progress_is_a_live_bar(tmp_path: Path) -> None:
    cli = Orch(tmp_path / "orch.db")
    code, stdout, bar = tty_stderr(cli.argv(["batch", ROUTER, "--inputs", ROUTER_BATCH, "--offline",
                                             "--batch-id", "T"]), cli.env())
    assert code == 0, bar
    assert stdout.startswith("batch T: 6 completed (0 before)")
    assert "\r" in bar and "6/6" in bar and "100%" in bar
    assert "run/s" in bar or "s/run" in bar  # tqdm's rate
    assert "6 ok, 0 failed, 0 running" in bar  # the counts beside it
    assert "batch T: 6/6 done" not in bar  # not the plain lines


# --------------------------------------------------------------------------- bad lines


BAD_LINES = "\n".join([
    json.dumps({"text": "I love the new tent! Set up in five minutes and stayed dry all weekend."}),
    "not json",
    '["an", "array"]',
    json.dumps({"txt": "the wrong field"}),
    "   ",
    json.dumps({"text": "Do you ship to Canada, and how long does it usually take?"}),
]) + "\n"


def test_bad_lines_are_reported_by_number_and_the_good_ones_run(tmp_path: Path) -> None:
    inputs = write(tmp_path / "mixed.jsonl", BAD_LINES)
    db, out = tmp_path / "orch.db", tmp_path / "res.jsonl"
    result = Orch(db)("batch", ROUTER, "--inputs", inputs, "--offline", "--batch-id", "M", "--out", out)
    assert result.code == 1
    bad = skipped(result)
    assert [line.split(":")[1] for line in bad] == [f" skipped line {n} of {inputs}" for n in (2, 3, 4)]
    assert "Expecting value: line 1 column 1" in bad[0]
    assert "one JSON object, not list" in bad[1]
    assert "input does not match Ticket" in bad[2] and "text" in bad[2]
    assert "Traceback" not in result.stderr
    assert result.stdout.startswith("batch M: 2 completed (0 before), 0 failed, 0 interrupted, 3 not started; ")
    assert [line.split(":")[0] for line in result.stdout.splitlines()[1:]] == [
        "paths", "  line 2", "  line 3", "  line 4"]
    assert sorted(r["run_id"] for r in query(db, "SELECT run_id FROM runs")) == ["M-1", "M-6"]
    assert [(r["line"], r["run_id"], r["status"]) for r in jsonl(out)] == [
        (1, "M-1", "completed"), (2, None, "not_started"), (3, None, "not_started"), (4, None, "not_started"),
        (6, "M-6", "completed")]
    assert [r["path"][1] for r in jsonl(out) if r["status"] == "completed"] == ["upsell", "standard_reply"]
    assert all(r["error"].startswith("bad line: ") for r in jsonl(out) if r["status"] == "not_started")


def test_strict_refuses_a_file_with_a_bad_line_and_stores_nothing(tmp_path: Path) -> None:
    inputs = write(tmp_path / "mixed.jsonl", BAD_LINES)
    db, out = tmp_path / "orch.db", tmp_path / "res.jsonl"
    result = Orch(db)("batch", ROUTER, "--inputs", inputs, "--offline", "--batch-id", "S", "--strict",
                      "--out", out)
    assert result.code == 2
    line = one_error_line(result)
    assert f"3 bad line(s) in {inputs}, nothing was run; line 2: " in line
    assert not db.exists() and not out.exists()


def test_a_file_of_bad_lines_only_runs_nothing(tmp_path: Path) -> None:
    inputs = write(tmp_path / "bad.jsonl", '["an", "array"]\n')
    result = Orch(tmp_path / "orch.db")("batch", ROUTER, "--inputs", inputs, "--offline")
    assert result.code == 2
    assert skipped(result) == [f"orch: skipped line 1 of {inputs}: a line is one JSON object, not list"]
    assert result.stderr.splitlines()[-1].startswith(f"orch: error: {inputs} has no input to run")
    assert run_count(tmp_path / "orch.db") == 0


# --------------------------------------------------------------------------- refusals


def test_usage_errors_exit_2_with_one_line(router_batch: RouterBatch, tmp_path: Path) -> None:
    cli = Orch(snapshot_copy(router_batch.db, tmp_path / "orch.db"))
    unknown = cli("batch", "status", "NOPE")
    assert unknown.code == 2 and "no runs of batch 'NOPE'" in one_error_line(unknown)
    missing = Orch(tmp_path / "none.db")("batch", "status", "B")
    assert missing.code == 2 and "no database at" in one_error_line(missing)
    no_inputs = cli("batch", ROUTER)
    assert no_inputs.code == 2 and "--inputs" in one_error_line(no_inputs)
    no_id = cli("batch", "status")
    assert no_id.code == 2 and "needs a batch id" in one_error_line(no_id)
    for empty in (("batch", "status", ""), ("runs", "--batch", "")):  # an unset shell variable
        refused = cli(*empty)
        assert refused.code == 2 and "the batch id is empty" in one_error_line(refused)
    extra = cli("batch", ROUTER, "B")
    assert extra.code == 2 and "unexpected argument 'B'" in one_error_line(extra)
    assert not (tmp_path / "none.db").exists()


@pytest.mark.parametrize("flags", [["--concurrency", "0"], ["--batch-id", "no spaces allowed"], ["--batch-id", ""]])
def test_bad_flags_are_refused_before_a_database_is_created(tmp_path: Path, flags: list[str]) -> None:
    result = Orch(tmp_path / "orch.db")("batch", ROUTER, "--inputs", ROUTER_BATCH, "--offline", *flags)
    assert result.code == 2  # holds
    one_error_line(result)
    assert not (tmp_path / "orch.db").exists()


# --------------------------------------------------------------------------- failures and resuming


FAILING_ANSWERS = {
    "outline": "an outline",
    "draft": "a draft",
    "summary": "a summary",
    "by_input": [{"when": {"topic": "topic 2"}, "answers": {"draft": [{"error": 400, "message": "not today"},
                                                                      "a draft at last"]}}],
}


def test_a_failed_run_is_listed_and_the_summary_says_how_to_resume(tmp_path: Path) -> None:
    machine, inputs = three_steps(tmp_path, 3)
    answers = write(tmp_path / "answers.json", json.dumps(FAILING_ANSWERS))
    cli = Orch(tmp_path / "orch.db")
    first = cli("batch", machine, "--inputs", inputs, "--offline", answers, "--batch-id", "F")
    assert first.code == 1
    assert first.stdout.startswith("batch F: 2 completed (0 before), 1 failed, 0 interrupted, 0 not started; ")
    assert "  line 2: F-2 failed: LLMError: Messages API returned 400: invalid_request_error: not today" \
        in first.stdout
    assert resume_command(first.stdout) == ["--db", str(tmp_path / "orch.db"), "batch", str(machine), "--inputs",
                                            str(inputs), "--batch-id", "F", "--offline", str(answers)]
    status = cli.json("batch", "status", "F")
    assert status["statuses"] == {"completed": 2, "failed": 1}
    assert [(f["run_id"], f["status"]) for f in status["failures"]] == [("F-2", "failed")]
    assert "F-2" in cli.ok("batch", "status", "F").stdout.splitlines()[-1]  # the failures table
    assert {r["run_id"]: r["status"] for r in cli.json("runs", "--batch", "F")} == {
        "F-1": "completed", "F-2": "failed", "F-3": "completed"}


def test_a_rerun_goes_on_down_an_input_rules_answers(tmp_path: Path) -> None:
    machine, inputs = three_steps(tmp_path, 3)
    answers = write(tmp_path / "answers.json", json.dumps(FAILING_ANSWERS))
    cli = Orch(tmp_path / "orch.db")
    assert cli("batch", machine, "--inputs", inputs, "--offline", answers, "--batch-id", "F").code == 1
    again = cli("batch", machine, "--inputs", inputs, "--offline", answers, "--batch-id", "F",
                "--out", tmp_path / "res.jsonl")
    assert again.code == 0, again.stdout  # F-2's draft takes the rule's second answer, not the 400 again
    assert jsonl(tmp_path / "res.jsonl")[1]["outputs"]["draft"] == "a draft at last"


def test_the_resume_hint_quotes_paths_with_spaces(tmp_path: Path) -> None:
    folder = tmp_path / "my batches"
    folder.mkdir()
    machine, inputs = three_steps(folder, 3)
    answers = write(folder / "answers.json", json.dumps(FAILING_ANSWERS))
    cli = Orch(folder / "orch.db")
    first = cli("batch", machine, "--inputs", inputs, "--offline", answers, "--batch-id", "F")
    assert first.code == 1  # holds: F-2 failed, so the summary says how to resume
    assert resume_command(first.stdout) == ["--db", str(folder / "orch.db"), "batch", str(machine), "--inputs",
                                            str(inputs), "--batch-id", "F", "--offline", str(answers)]


# --------------------------------------------------------------------------- kill and Ctrl-C


def test_a_batch_killed_halfway_finishes_on_the_same_command_without_paying_a_committed_step_twice(
        orch: EnvOrch, fake: FakeMessagesAPI, tmp_path: Path) -> None:
    """20 inputs of three LLM steps, four at a time; SIGKILL right after the 30th of 60 commits.
    The same command again reads the finished runs back, resumes the others, starts the rest."""
    machine, inputs = three_steps(tmp_path, 20)
    command = ["batch", machine, "--inputs", inputs, "--batch-id", "K", "--concurrency", "4"]
    killed = orch.with_env(ORCH_KILL_AT="after_commit:30").start(*command)
    assert Orch.finish(killed).code == -signal.SIGKILL
    committed = committed_steps(orch.db)
    before = step_calls(fake.requests)
    done = {r["run_id"] for r in query(orch.db, "SELECT run_id FROM runs WHERE status = 'completed'")}
    assert 30 <= len(committed) < 60
    assert all(before[step] == 1 for step in committed)
    in_flight = set(before) - committed
    assert len(in_flight) <= 4  # one step per run at a time, four runs at a time
    started = run_count(orch.db)
    assert len(done) < started <= 20
    status = orch.json("batch", "status", "K")  # the dead process's unfinished runs count as interrupted
    assert status["statuses"] == {"completed": len(done), "interrupted": started - len(done)}

    again = orch(*command)
    assert again.code == 0, again.stdout + again.stderr
    assert again.stdout.startswith(f"batch K: 20 completed ({len(done)} before), 0 failed, 0 interrupted, ")
    assert committed_steps(orch.db) == {(f"K-{n}", s) for n in range(1, 21) for s in STEPS}
    after = step_calls(fake.requests)
    assert set(after) == {(f"K-{n}", s) for n in range(1, 21) for s in STEPS}
    assert {step: after[step] for step in committed} == dict.fromkeys(committed, 1)
    assert all(after[step] <= 2 for step in in_flight)
    assert all(n == 1 for step, n in after.items() if step not in in_flight)
    assert orch.ok("audit", "verify").stdout.endswith("20 run(s) checked, 0 with a broken log\n")


def test_ctrl_c_stops_the_batch_and_the_hinted_command_finishes_it(
        orch: EnvOrch, fake: FakeMessagesAPI, tmp_path: Path) -> None:
    """Two runs hold their first answer; Ctrl-C; the answers arrive: each step commits, its run
    stops before the next, no other input starts, exit 143; the printed command finishes."""
    machine, inputs = three_steps(tmp_path, 8)
    gate = threading.Event()
    fake.default = lambda request: Reply(text=by_run(request), gate=gate) if request.state == "outline" \
        else by_run(request)
    proc = orch.start("batch", machine, "--inputs", inputs, "--batch-id", "C", "--concurrency", "2")
    try:
        assert fake.wait_for("outline", count=2, timeout=60)
        proc.send_signal(signal.SIGINT)
        wait_until_delivered(proc, signal.SIGINT)
    finally:
        gate.set()
    stopped = Orch.finish(proc)
    assert stopped.code == 143, stopped.stdout + stopped.stderr
    assert "orch: stopping: no new runs" in stopped.stderr and "Traceback" not in stopped.stderr
    assert stopped.stdout.startswith("batch C: 0 completed (0 before), 0 failed, 2 interrupted, 0 not started; ")
    runs = query(orch.db, "SELECT run_id, status FROM runs ORDER BY run_id")
    assert [(r["run_id"], r["status"]) for r in runs] == [("C-1", "interrupted"), ("C-2", "interrupted")]
    assert committed_steps(orch.db) == {("C-1", "outline"), ("C-2", "outline")}

    hinted = resume_command(stopped.stdout)
    assert hinted == orch.argv(["batch", machine, "--inputs", inputs, "--batch-id", "C"])
    finished = run_orch(*hinted, env=orch.env())
    assert finished.code == 0, finished.stdout + finished.stderr
    assert finished.stdout.startswith("batch C: 8 completed (0 before), 0 failed, 0 interrupted, 0 not started; ")
    assert step_calls(fake.requests) == Counter({(f"C-{n}", s): 1 for n in range(1, 9) for s in STEPS})



def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path: Path) -> None:
    """A file saved with a BOM (as some editors on Windows do) runs every line."""
    lines = ROUTER_BATCH.read_text(encoding="utf-8")
    inputs = tmp_path / "bom.jsonl"
    inputs.write_bytes(b"\xef\xbb\xbf" + lines.encode())
    with offline_environment():
        result = Orch(tmp_path / "orch.db")("batch", ROUTER, "--inputs", inputs, "--offline", "--batch-id", "M",
                                            "--strict", "-q")
    assert result.code == 0, result.stderr
    assert len(query(tmp_path / "orch.db", "SELECT run_id FROM runs")) == len(lines.splitlines())
