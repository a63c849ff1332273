"""`orch db copy SRC DST` (issue 14): a SQLite history copied into PostgreSQL (and back, and
into another SQLite file) value for value, so that every copied run verifies its audit chain in
the destination, reads, lists and replays there exactly as in the source, and a run that was in
progress resumes there. A second copy skips what is there; an interrupted one is finished by
running it again. A tampered source run is copied as it is and reported (exit 1); a run the
destination cannot hold is left out whole and reported.

One SQLite history (module fixture) holds runs of every kind: completed (`orch run --offline`
of machines/report.py), retried calls (a 529, then an answer), failed (a 400), a call in doubt
(killed in flight, resumed), a run killed between steps (`running`, stale) and one killed while
its call was in flight (its in-flight mark stored), a map and a sub-machine with their child
runs, a batch of six, and a run keyed with ORCH_AUDIT_KEY. Each test copies it (or a copy of
the file, when it edits it) into a PostgreSQL database of its own (`pg_dsn`)."""

from __future__ import annotations

import io
import json
import signal
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from contextlib import closing, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

from statemachine_orch.cli import main
from statemachine_orch.store._chain import canonical
from statemachine_orch.store.postgres._pool import redacted
from statemachine_orch.store.sqlite._schema import SCHEMA_VERSION
from statemachine_orch.testing import FakeMessagesAPI, Reply, error

from . import postgres
from .helpers import (
    MACHINES,
    REPORT,
    REPORT_INPUT,
    ROOT,
    ROUTER,
    CLIResult,
    Orch,
    kill_9,
    offline_environment,
    one_error_line,
    orch_command,
    query,
    run_orch,
    write,
)

KEY = "copy-test-audit-key"
TABLES = ("runs", "transitions", "attempts", "takeovers")
LEASE_COLUMNS = {"queue": None, "holder": None, "lease_epoch": 0}  # PostgreSQL's own; never copied

MACHINE_MODULE = '''
from pydantic import BaseModel

from statemachine_orch import LLMState, Machine, MachineState, MapState, PythonState


class Topic(BaseModel):
    topic: str


flaky = Machine("flaky", [
    LLMState("shaky", prompt="Draft about {topic}", max_tokens=50),
    LLMState("polish", prompt="Polish: {shaky}", needs=["shaky"], max_tokens=50),
], input_model=Topic)

refused = Machine("refused", [LLMState("refuse", prompt="Refuse {topic}", max_tokens=50)], input_model=Topic)

slow = Machine("slow", [LLMState("slow", prompt="Say it about {topic}.", max_tokens=300)], input_model=Topic)

stuck = Machine("stuck", [LLMState("stuck", prompt="Say more about {topic}.", max_tokens=300)], input_model=Topic)

writer = Machine("writer", [
    LLMState("draft", prompt="Draft about {topic}"),
    LLMState("edit", prompt="Edit: {draft}", needs=["draft"]),
], input_model=Topic, result="draft")

fan = Machine("fan", [
    MapState("work", items=lambda ctx: ["a", "b", "c"], concurrency=2,
             each=LLMState("worker", prompt="Item {item}", max_tokens=50)),
    MachineState("write", machine=writer, input=lambda ctx: {"topic": "owls"}),
    PythonState("summary", needs=["work"], run=lambda ctx: " | ".join(ctx.outputs["work"])),
], input_model=Topic)
'''


@dataclass
class History:
    """The module's SQLite history, the fake that served its calls (still serving) and its machines."""

    db: Path
    fake: FakeMessagesAPI
    base_url: str
    machines: Path
    topic: Path

    def on(self, db: str | Path) -> Orch:
        """`orch --db DB` (a path or a postgresql:// URL) with the fake as the API."""
        return Orch(db, self.base_url)  # a URL too: str(db) is all Orch does with it

    def run_ids(self, db: Path | None = None) -> list[str]:
        return [row["run_id"] for row in query(db or self.db, "SELECT run_id FROM runs ORDER BY created_at, run_id")]


def killed_in_flight(cli: Orch, fake: FakeMessagesAPI, machine: str, state: str, run_id: str, topic: Path) -> None:
    proc = cli.start("-q", "run", machine, "--input", topic, "--run-id", run_id)
    assert fake.wait_for(state, 1, timeout=30), f"no request for {state}"
    kill_9(proc)
    proc.communicate()


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Iterator[History]:
    here = tmp_path_factory.mktemp("history")
    machines = write(here / "copied.py", MACHINE_MODULE)
    topic = write(here / "topic.json", json.dumps({"topic": "owls"}))
    fake = FakeMessagesAPI()  # every state unscripted below gets an automatic answer
    slow_gate, stuck_gate = threading.Event(), threading.Event()
    fake.on("shaky", error(529, headers={"retry-after": "0"}), Reply(text="a shaky draft"))
    fake.on("refuse", error(400, "not this one"))
    fake.on("slow", Reply(gate=slow_gate, fault="disconnect"), Reply(text="said slowly", input_tokens=30,
                                                                       output_tokens=4))
    fake.on("stuck", Reply(gate=stuck_gate, fault="disconnect"), Reply(text="unstuck", input_tokens=31,
                                                                         output_tokens=5))
    with offline_environment(), fake.serve() as url:
        db = here / "orch.db"
        cli = Orch(db, url)
        report = ("run", REPORT, "--input", REPORT_INPUT, "--offline")
        cli.ok("-q", *report, "--run-id", "report")
        assert run_orch(*cli.argv(["-q", *report, "--run-id", "crashed"]),
                        env={"ORCH_KILL_AT": "after_commit:2"}).code == -signal.SIGKILL
        cli.ok("-q", "run", f"{machines}:flaky", "--input", topic, "--run-id", "flaky")
        assert cli("-q", "run", f"{machines}:refused", "--input", topic, "--run-id", "refused").code == 1
        try:
            killed_in_flight(cli, fake, f"{machines}:slow", "slow", "doubt", topic)
            killed_in_flight(cli, fake, f"{machines}:stuck", "stuck", "inflight", topic)
        finally:
            slow_gate.set()
            stuck_gate.set()
        cli.ok("-q", "resume", "doubt")
        cli.ok("-q", "run", f"{machines}:fan", "--input", topic, "--run-id", "fan")
        cli.ok("-q", "batch", ROUTER, "--inputs", MACHINES / "support_router_batch.jsonl", "--offline",
               "--batch-id", "tickets", "--concurrency", "2")
        assert run_orch(*cli.argv(["-q", *report, "--run-id", "keyed"]), env={"ORCH_AUDIT_KEY": KEY}).code == 0
        yield History(db, fake, url, machines, topic)


@pytest.fixture
def own_history(history: History, tmp_path: Path) -> History:
    """A copy of the history's file, for a test that changes it."""
    target = tmp_path / "own.db"
    with closing(sqlite3.connect(history.db)) as source, closing(sqlite3.connect(target)) as copy:
        source.backup(copy)
    return History(target, history.fake, history.base_url, history.machines, history.topic)


def copy(src: str | Path, dst: str | Path, *options: str, env: dict[str, str] | None = None) -> CLIResult:
    return run_orch("db", "copy", str(src), str(dst), *options, env=env)


def outcomes(result: CLIResult) -> dict[str, str]:
    """run id -> what `orch db copy` said of it."""
    said = {}
    for line in result.stdout.splitlines()[:-1]:
        run, _, what = line.partition(": ")
        said[run.removeprefix("run ")] = what
    return said


def tables(db: str | Path) -> dict[str, list[str]]:
    """Every row of the four run tables as the audit chain sees values (canonical JSON: an INTEGER
    that came back as a REAL would differ), by table, in a fixed order; PostgreSQL's lease
    columns left out once checked to hold their defaults."""
    found: dict[str, list[str]] = {}
    for table in TABLES:
        if isinstance(db, Path):
            rows = [dict(row) for row in query(db, f"SELECT * FROM {table}")]
        else:
            with closing(postgres.connect(db)) as conn:
                cursor = conn.execute(f"SELECT * FROM orch.{table}")
                names = [column.name for column in cursor.description or ()]
                rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
            for row in rows:
                for name, default in LEASE_COLUMNS.items():
                    if name in row:
                        assert row.pop(name) == default, (table, name)
        found[table] = sorted(canonical(row) for row in rows)
    return found


def same_output(history: History, dsn: str, run_id: str, *command: str) -> str:
    """`orch COMMAND` on the SQLite history and on the PostgreSQL copy: the same exit and stdout.
    Run in this process (`cli.main`): the reading commands, well over a hundred of them."""
    outputs = []
    for db in (str(history.db), dsn):
        printed, said = io.StringIO(), io.StringIO()
        with pytest.MonkeyPatch.context() as env, redirect_stdout(printed), redirect_stderr(said):
            if run_id == "keyed":
                env.setenv("ORCH_AUDIT_KEY", KEY)
            outputs.append((main(["--db", db, *command]), printed.getvalue()))
    assert outputs[1] == outputs[0], command
    return outputs[1][1]


# --------------------------------------------------------------------------- SQLite -> PostgreSQL


@pytest.mark.slow  # the module's history takes about 30 s to build: the long suite
def test_a_copied_history_verifies_reads_and_replays_in_postgresql_as_in_sqlite(
        history: History, pg_dsn: str) -> None:
    before = tables(history.db)
    copied = copy(history.db, pg_dsn)
    run_ids = history.run_ids()
    assert len(run_ids) == 18 and {"fan.0.1.2", "fan.1.1.0", "tickets-6"} <= set(run_ids)
    # without the key, the keyed run cannot be verified (so exit 2, as `orch audit verify` would)
    assert copied.code == 2, copied.stdout + copied.stderr
    said = outcomes(copied)
    assert list(said) == run_ids
    assert {run: what for run, what in said.items() if what != "copied"} == {
        "keyed": said["keyed"]} and said["keyed"].startswith("copied, UNVERIFIED: run keyed has a keyed audit chain")
    assert copied.stdout.splitlines()[-1] == (
        f"18 run(s) copied from {history.db} to {postgres_where(pg_dsn)}, 0 skipped (already there), "
        "1 not verified (audit key)")

    # value for value: every column of every row, types included; the source unchanged
    assert tables(pg_dsn) == before == tables(history.db)

    audit = same_output(history, pg_dsn, "", "audit", "verify")
    assert audit.splitlines()[-1] == "18 run(s) checked, 0 with a broken log, 1 not verified"
    assert run_orch("--db", pg_dsn, "audit", "verify", "keyed", env={"ORCH_AUDIT_KEY": KEY}).code == 0

    assert len(json.loads(same_output(history, pg_dsn, "", "runs", "--json", "--limit", "1000"))) == 14
    same_output(history, pg_dsn, "", "runs")
    same_output(history, pg_dsn, "", "batch", "status", "tickets", "--json")
    for run_id in run_ids:
        same_output(history, pg_dsn, run_id, "log", run_id, "--json")
        same_output(history, pg_dsn, run_id, "log", run_id, "--attempts", "--json")
        same_output(history, pg_dsn, run_id, "show", run_id, "--json")
    assert [json.loads(line)["kind"] for line in same_output(
        history, pg_dsn, "doubt", "log", "doubt", "--attempts", "--json").splitlines()] == ["in_doubt"]
    assert json.loads(same_output(history, pg_dsn, "flaky", "log", "flaky", "--attempts", "--json"))["kind"] \
        == "transient"
    for run_id in ("report", "flaky", "refused", "doubt", "fan", "tickets-1", "keyed"):
        assert "matches the recording" in same_output(history, pg_dsn, run_id, "replay", run_id)


def postgres_where(dsn: str) -> str:
    """How messages name a PostgreSQL database (without a password)."""
    return redacted(dsn)


@pytest.mark.slow  # the module's history takes about 30 s to build: the long suite
def test_a_run_in_progress_in_sqlite_resumes_in_postgresql(history: History, pg_dsn: str) -> None:
    assert copy(history.db, pg_dsn).code == 2
    pg = history.on(pg_dsn)
    listed = {run["run_id"]: run for run in pg.json("runs", "--limit", "1000")}
    assert (listed["crashed"]["status"], listed["crashed"]["stale"]) == ("running", True)
    assert (listed["inflight"]["status"], listed["inflight"]["stale"]) == ("running", True)

    resumed = pg.json("-q", "resume", "crashed", "--offline")
    assert (resumed["status"], resumed["steps"]) == ("completed", 5)
    (takeover,) = pg.json("show", "crashed")["takeovers"]
    assert takeover["why"] == "it held no lease here (a run copied from another database)"
    assert takeover["previous"].startswith("pid ")

    calls = history.fake.calls("stuck")
    resumed = pg.json("-q", "resume", "inflight")  # its in-flight mark came along: the call is in doubt
    assert (resumed["status"], resumed["outputs"]) == ("completed", {"stuck": "unstuck"})
    assert history.fake.calls("stuck") == calls + 1
    (row,) = pg.log("inflight")
    assert row["in_doubt"] is True
    assert pg.ok("audit", "verify", "crashed").stdout.endswith("1 run(s) checked, 0 with a broken log\n")
    assert pg.ok("audit", "verify", "inflight").stdout.endswith("1 run(s) checked, 0 with a broken log\n")
    assert {row[0] for row in query(history.db, "SELECT status FROM runs WHERE run_id IN ('crashed', 'inflight')")} \
        == {"running"}  # the source is left as it was


# --------------------------------------------------------------------------- again, and interrupted


@pytest.mark.slow  # the module's history takes about 30 s to build: the long suite
def test_a_second_copy_skips_every_run(history: History, pg_dsn: str) -> None:
    assert copy(history.db, pg_dsn).code == 2
    again = copy(history.db, pg_dsn, "--json")
    assert again.code == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["skipped"] == history.run_ids()
    assert (report["copied"], report["failed"], report["tampered"], report["unverified"], report["differing"]) == (
        [], {}, {}, {}, {})
    assert report["source"] == str(history.db)


@pytest.mark.slow  # the module's history takes about 30 s to build: the long suite
def test_an_interrupted_copy_leaves_whole_runs_and_finishes_when_run_again(history: History, pg_dsn: str) -> None:
    proc = subprocess.Popen([*orch_command(), "db", "copy", str(history.db), pg_dsn], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    kill_9(proc)
    proc.communicate()
    assert first.startswith("run report: copied")
    there = [run["run_id"] for run in json.loads(run_orch("--db", pg_dsn, "runs", "--json", "--limit", "1000")
                                                 .stdout)]
    assert "report" in there
    verified = run_orch("--db", pg_dsn, "audit", "verify")  # whatever is there is whole: it verifies
    assert " with a broken log" in verified.stdout and "TAMPERED" not in verified.stdout, verified.stdout

    finished = copy(history.db, pg_dsn)
    assert finished.code == 2, finished.stderr
    said = outcomes(finished)
    assert list(said) == history.run_ids()
    assert {what for what in said.values()} <= {"copied", "skipped (already in DST)"} | {said["keyed"]}
    assert tables(pg_dsn) == tables(history.db)


@pytest.mark.slow  # the module's history takes about 30 s to build: the long suite
def test_a_run_that_moved_on_in_sqlite_since_it_was_copied_is_skipped_and_reported(
        own_history: History, pg_dsn: str) -> None:
    assert copy(own_history.db, pg_dsn).code == 2
    own_history.on(own_history.db).ok("-q", "resume", "crashed", "--offline")
    again = copy(own_history.db, pg_dsn)
    assert again.code == 0, again.stderr
    assert outcomes(again)["crashed"] == (
        "skipped (already in DST): DST holds it running at step 2, SRC completed at step 5; it was left as "
        "DST holds it")
    assert again.stdout.splitlines()[-1].endswith(
        f", {len(own_history.run_ids())} skipped (already there), 1 differing from SRC")


# --------------------------------------------------------------------------- what cannot be copied as it should


@pytest.mark.slow  # the module's history takes about 30 s to build: the long suite
def test_a_tampered_source_run_is_copied_as_it_is_and_reported(own_history: History, pg_dsn: str) -> None:
    with closing(sqlite3.connect(own_history.db)) as conn, conn:
        conn.execute("UPDATE transitions SET reason = 'edited' WHERE run_id = 'report' AND seq = 2")
    copied = copy(own_history.db, pg_dsn)
    assert copied.code == 1, copied.stdout + copied.stderr
    assert outcomes(copied)["report"] == (
        "copied, TAMPERED: row seq 2 does not match its hash: it or one of its attempts was edited, or it was "
        "inserted, or a row before it was removed (so it does in SRC: copied as SRC holds it)")
    assert "1 failing their audit chain" in copied.stdout.splitlines()[-1]
    assert tables(pg_dsn) == tables(own_history.db)  # the evidence is kept, in DST too
    audit = run_orch("--db", pg_dsn, "audit", "verify", "report")
    assert (audit.code, audit.stdout.splitlines()[0]) == (
        1, "run report: TAMPERED: row seq 2 does not match its hash: it or one of its attempts was edited, or it was "
           "inserted, or a row before it was removed")


@pytest.mark.slow  # the module's history takes about 30 s to build: the long suite
def test_a_run_postgresql_cannot_hold_is_left_out_whole_and_the_rest_copied(own_history: History,
                                                                            pg_dsn: str) -> None:
    """A NUL in a text column (a file written before text was escaped for PostgreSQL) fails that
    run's transaction: none of its rows is there, and every other run is."""
    with closing(sqlite3.connect(own_history.db)) as conn, conn:
        conn.execute("UPDATE transitions SET error = 'a' || char(0) || 'b' WHERE run_id = 'refused'")
    copied = copy(own_history.db, pg_dsn)
    assert copied.code == 1, copied.stdout + copied.stderr
    said = outcomes(copied)
    assert said["refused"].startswith(f"NOT COPIED: DST {postgres_where(pg_dsn)} refused it: ")
    assert "NUL" in said["refused"]
    assert "1 not copied" in copied.stdout.splitlines()[-1]
    with closing(postgres.connect(pg_dsn)) as conn:
        assert [conn.execute(f"SELECT count(*) FROM orch.{table} WHERE run_id = 'refused'").fetchone()
                for table in TABLES] == [(0,)] * 4
        assert conn.execute("SELECT count(*) FROM orch.runs").fetchone() == (17,)


# --------------------------------------------------------------------------- other directions


@pytest.mark.slow  # the module's history takes about 30 s to build: the long suite
def test_postgresql_to_sqlite_and_sqlite_to_sqlite_copy_value_for_value(history: History, pg_dsn: str,
                                                                        tmp_path: Path) -> None:
    assert copy(history.db, pg_dsn).code == 2
    back, beside = tmp_path / "back.db", tmp_path / "beside.db"
    assert copy(pg_dsn, back).code == 2
    assert copy(history.db, beside).code == 2
    assert tables(back) == tables(beside) == tables(history.db)
    for db in (back, beside):
        assert run_orch("--db", str(db), "runs", "--json", "--limit", "1000").stdout == run_orch(
            "--db", str(history.db), "runs", "--json", "--limit", "1000").stdout
        assert run_orch("--db", str(db), "audit", "verify").stdout == run_orch(
            "--db", str(history.db), "audit", "verify").stdout


def test_an_old_sqlite_file_is_upgraded_when_opened_and_its_legacy_chains_verify_in_postgresql(
        tmp_path: Path, pg_dsn: str) -> None:
    """Runs chained before the canonical form (chain version 1, Python reprs) verify in PostgreSQL:
    the reprs of the values it gives back are SQLite's."""
    old = tmp_path / "v5.db"
    with closing(sqlite3.connect(old)) as conn:
        conn.executescript((ROOT / "tests" / "data" / "chain_v5.sql").read_text())
    copied = copy(old, pg_dsn)
    assert (copied.code, outcomes(copied)) == (0, {"old-a": "copied", "old-b": "copied"}), copied.stderr
    assert query(old, "PRAGMA user_version")[0][0] == SCHEMA_VERSION  # upgraded when opened, as by any command
    assert tables(pg_dsn) == tables(old)
    for db in (str(old), pg_dsn):
        assert run_orch("--db", db, "audit", "verify").stdout == (
            "run old-a: ok\nrun old-b: ok\n2 run(s) checked, 0 with a broken log\n")
    assert run_orch("--db", pg_dsn, "show", "old-a", "--json").stdout == run_orch(
        "--db", str(old), "show", "old-a", "--json").stdout


# --------------------------------------------------------------------------- refused


@pytest.mark.slow  # the module's history takes about 30 s to build: the long suite
def test_bad_arguments_are_refused_in_one_line(history: History, pg_dsn: str, tmp_path: Path) -> None:
    missing, new = tmp_path / "missing.db", tmp_path / "new.db"
    foreign = tmp_path / "foreign.db"
    with closing(sqlite3.connect(foreign)) as conn:
        conn.execute("CREATE TABLE t (x)")
    cases: dict[tuple[str, ...], tuple[int, str]] = {
        ("db", "copy", str(missing), str(new)): (
            2, f"orch: error: SRC: no database at {missing}; give an existing SQLite file or a postgresql:// URL "
               "as SRC"),
        ("db", "copy", pg_dsn, str(new)): (
            2, f"orch: error: SRC: {postgres_where(pg_dsn)} has no statemachine_orch schema 'orch', so no runs to "
               "copy; check SRC"),
        ("db", "copy", str(history.db), str(history.db)): (
            2, f"orch: error: SRC and DST are the same database ({history.db}); give another database as DST"),
        ("db", "copy", str(foreign), str(new)): (
            1, f"orch: error: SRC: {foreign} holds another application's tables; use a new file with --db"),
        ("db", "copy", str(history.db)): (
            2, "orch: error: orch db copy needs SRC and DST; orch db copy SRC DST (a SQLite file or a "
               "postgresql:// URL each)"),
        ("--db", str(history.db), "db", "copy", str(history.db), str(new)): (
            2, "orch: error: orch db copy names its databases as SRC and DST, not with --db; orch db copy SRC DST"),
        ("db", "migrate", str(history.db)): (
            2, "orch: error: orch db migrate takes no SRC or DST; it works on --db (or ORCH_DB)"),
    }
    for argv, (code, line) in cases.items():
        result = run_orch(*argv)
        assert (result.code, one_error_line(result)) == (code, line), argv
    assert not new.exists() and not missing.exists()

    copied = copy(history.db, pg_dsn)
    assert copied.code == 2
    same = copy(pg_dsn, pg_dsn)
    assert (same.code, one_error_line(same)) == (
        2, f"orch: error: SRC and DST are the same database ({postgres_where(pg_dsn)}); give another database as DST")
