"""Storage faults: the real `orch` process against a database it cannot (fully) write.

- Disk full (`ulimit -f` in the child, SIGXFSZ ignored, so a write fails with EFBIG): the
  transaction rolls back, the run is parked and resumable, and no call is made without its
  record (a committed row, or the in-flight mark a resume flags).
- A read-only database (file, or file and directory): reads work, writes fail cleanly.
- Another process holding the write lock past the busy timeout: a "retry" error before any
  call.
- A corrupted run (truncated JSON, planted pickles, a broken hash chain, a changed machine):
  that run is refused with one line, the other runs in the file are unaffected.
- A database written by a newer schema: refused, file untouched.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import json
import os
import pickle
import random
import resource
import shutil
import signal
import sqlite3
import subprocess
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest

from statemachine_orch import Engine, SQLiteStore, StoreError, Tracer
from statemachine_orch.loader import load_machine
from statemachine_orch.sqlite_store import SCHEMA_VERSION
from statemachine_orch.testing import FakeMessagesAPI
from statemachine_orch.types import TransitionRecord

from ..helpers import (
    REPORT,
    REPORT_INPUT,
    REPORT_STATES,
    WAIT_S,
    CLIResult,
    Figures,
    Orch,
    committed_states,
    everything,
    integrity,
    one_error_line,
    orch_command,
    query,
    report,
    requested_states,
    run_row,
    scaled,
    seed_runs,
    tally,
)

ChildHook = Callable[[], None]


def orch_as(orch: Orch, *args: str | Path, env: Mapping[str, str] | None = None,
            preexec: ChildHook | None = None) -> CLIResult:
    """`orch ARGS` as `Orch` runs it, with more environment and a hook run in the child
    between fork and exec (a resource limit, dropped capabilities)."""
    proc = subprocess.run(orch_command() + orch.argv(args), env={**os.environ, **orch.env(), **(env or {})},
                          preexec_fn=preexec, capture_output=True, text=True, timeout=WAIT_S)
    return CLIResult(proc.returncode, proc.stdout, proc.stderr)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listed(orch: Orch) -> dict[str, dict[str, Any]]:
    return {run["run_id"]: run for run in orch.json("runs")}


# --------------------------------------------------------------------------- disk full


def file_size_limit(limit: int) -> ChildHook:
    """`ulimit -f`: writes past `limit` bytes fail with EFBIG (SIGXFSZ ignored, not fatal)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


SMALLEST_LIMIT, LARGEST_LIMIT = 28 * 1024, 100 * 1024  # from "cannot even open" to "completes"


def limits(rng: random.Random, count: int) -> list[int]:
    """`count` file-size limits spread over the range (one per slice, at a random point in it),
    so the write that fails moves through opening, creating the run, marks and commits."""
    width = (LARGEST_LIMIT - SMALLEST_LIMIT) / count
    return [int(SMALLEST_LIMIT + width * (n + rng.random())) for n in range(count)]


def in_flight_ahead(db: Path, run_id: str) -> str | None:
    """The state of the call marked in flight after the run's last row, if there is one."""
    mark = json.loads(run_row(db, run_id)["in_flight"] or "null")
    (last,) = query(db, "SELECT count(*) AS n FROM transitions WHERE run_id = ?", run_id)
    return mark["state"] if mark and mark["seq"] > last["n"] else None


def park_kind(orch: Orch, run_id: str) -> str:
    """How a run whose store failed is left: "interrupted" with the store error recorded, or
    "running" with its owner gone (what `orch runs` tells the user to resume)."""
    run = listed(orch)[run_id]
    if run["status"] == "interrupted":
        assert run["error"].startswith("store error: cannot write to "), run
        return "parked_interrupted"
    assert (run["status"], run["stale"]) == ("running", True), run
    return "parked_owner_gone"


def disk_full_trial(cli: Orch, fake: FakeMessagesAPI, run_id: str, limit: int,
                    figures: Figures) -> None:
    """`orch run` under a file-size limit, then checks (and counts, in `figures`) how it ended."""
    db = cli.db
    failed = orch_as(cli, "-q", "run", REPORT, "--input", REPORT_INPUT, "--run-id", run_id,
                     preexec=file_size_limit(limit))
    ok = integrity(db) == "ok"
    figures.add("integrity_failures", int(not ok))
    what = f"limit {limit}: exit {failed.code}: {failed.stderr[-400:]}"
    assert ok, what
    if failed.code == 0:
        figures.add("completed_within_limit")
        assert requested_states(fake.requests, run_id) == tally(REPORT_STATES), what
        return
    assert failed.code == 1, what
    line = one_error_line(failed)
    assert str(db) in line and "disk I/O error" in line, what
    if not query(db, "SELECT run_id FROM runs"):  # no run row: nothing stored, nothing sent
        figures.add("failed_at_open" if "is not a usable SQLite database" in line
                    else "failed_at_create")
        figures.add("calls_without_a_record", requested_states(fake.requests, run_id).total())
        assert requested_states(fake.requests, run_id) == {}, what
        return

    figures.add("failed_at_in_flight_mark" if line.endswith("; no call was made")
                else "failed_at_commit")
    unanswered = in_flight_ahead(db, run_id)  # a call made whose answer was not committed
    recorded = tally(committed_states(db, run_id) + ([unanswered] if unanswered else []))
    figures.add("calls_without_a_record", (requested_states(fake.requests, run_id) - recorded).total())
    assert requested_states(fake.requests, run_id) == recorded, what
    figures.add(park_kind(cli, run_id))

    resumed = cli("resume", run_id, "--json")  # the limit lifted
    assert resumed.code == 0, f"{what}\nresume: {resumed.stderr}"
    figures.add("resumed_after_fault")
    assert json.loads(resumed.stdout)["path"] == list(REPORT_STATES)
    assert requested_states(fake.requests, run_id) == tally(
        [*REPORT_STATES, *([unanswered] if unanswered else [])]), what
    doubted = [r["from_state"] for r in query(db, "SELECT from_state FROM transitions "
                                                  "WHERE run_id = ? AND in_doubt = 1", run_id)]
    figures.add("in_doubt_flagged", len(doubted))
    assert doubted == ([unanswered] if unanswered else []), what
    assert cli("audit", "verify", run_id).code == 0


def test_disk_full_at_a_write_parks_the_run_and_no_call_goes_unrecorded(
        orch: Orch, fake: FakeMessagesAPI, tmp_path: Path, figures: Figures) -> None:
    seed = random.randrange(2**32)
    print(f"disk-full seed {seed}")
    trials = limits(random.Random(seed), scaled(5, 60))
    figures["trials"] = len(trials)
    figures["seed"] = seed
    figures["limits_bytes"] = [min(trials), max(trials)]
    for n, limit in enumerate(trials):
        db = tmp_path / f"full-{n}.db"
        SQLiteStore(db).close()  # the schema exists: the limit hits the WAL during the run
        disk_full_trial(Orch(db, orch.base_url), fake, f"full-{n}", limit, figures)
    figures["faults_injected"] = len(trials) - figures.values.get("completed_within_limit", 0)


# --------------------------------------------------------------------------- read-only


PR_CAPBSET_DROP = 24  # prctl(2)
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def honour_file_modes() -> None:
    """Child hook: as root, give up the capabilities that ignore file modes (they are not
    regained at exec), so a read-only file is read-only for `orch` too. A no-op otherwise."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {cap}) failed")


@contextmanager
def read_only(db: Path, *, directory: bool) -> Iterator[None]:
    db.chmod(0o444)
    if directory:
        db.parent.chmod(0o555)
    try:
        yield
    finally:
        db.parent.chmod(0o755)
        db.chmod(0o600)


@pytest.mark.parametrize("schema", ["current", "version_3"])
@pytest.mark.parametrize("what", ["file", "file_and_directory"])
def test_a_read_only_database_is_still_read_and_refuses_writes_cleanly(
        orch: Orch, fake: FakeMessagesAPI, tmp_path: Path, what: str, schema: str, figures: Figures) -> None:
    """Also a file of schema version 3, which cannot be upgraded here: what version 4 adds
    (two indexes) only makes queries faster, so it is read as it is."""
    db = tmp_path / "shelf" / "orch.db"
    cli = Orch(db, orch.base_url)
    seed_runs(db, {"done": None, "failed": REPORT_STATES[2]})
    if schema == "version_3":
        with sqlite3.connect(db) as conn:
            conn.executescript("DROP INDEX runs_finished_totals; DROP INDEX runs_unfinished; "
                               "PRAGMA user_version = 3;")
    before = sha256(db)
    with read_only(db, directory=what == "file_and_directory"):
        reads = {
            "runs": orch_as(cli, "runs", "--json", preexec=honour_file_modes),
            "log": orch_as(cli, "log", "done", "--json", preexec=honour_file_modes),
            "show": orch_as(cli, "show", "done", "--json", preexec=honour_file_modes),
            "audit": orch_as(cli, "audit", "verify", preexec=honour_file_modes),
        }
        writes = {
            "resume": orch_as(cli, "resume", "failed", preexec=honour_file_modes),
            "run": orch_as(cli, "run", REPORT, "--input", REPORT_INPUT, "--run-id", "new",
                           preexec=honour_file_modes),
        }
    unchanged = sha256(db) == before
    figures["reads_ok"] = sum(r.code == 0 for r in reads.values())
    figures["reads_tried"] = len(reads)
    figures["writes_refused"] = sum(r.code == 1 for r in writes.values())
    figures["writes_tried"] = len(writes)
    figures["calls_made"] = len(fake.requests)
    figures["database_changed"] = not unchanged

    problems = [f"orch {name}: exit {r.code}: {r.stderr.strip()}" for name, r in reads.items()
                if r.code != 0]
    assert problems == []
    assert {run["run_id"] for run in json.loads(reads["runs"].stdout)} == {"done", "failed"}
    assert [json.loads(line)["from_state"] for line in reads["log"].stdout.splitlines()] == list(
        REPORT_STATES)
    assert json.loads(reads["show"].stdout)["snapshot"]["status"] == "completed"
    assert reads["audit"].stdout.splitlines()[-1] == "2 run(s) checked, 0 with a broken log"
    for name, refused in writes.items():
        assert refused.code == 1, f"orch {name}: exit {refused.code}: {refused.stderr}"
        line = one_error_line(refused)
        assert str(db) in line and "readonly database" in line, line
    assert fake.requests == []

    assert unchanged and integrity(db) == "ok"
    assert run_row(db, "failed")["status"] == "failed"
    assert query(db, "SELECT run_id FROM runs WHERE run_id = 'new'") == []
    assert cli.json("resume", "failed")["status"] == "completed"  # writable again: it goes on


# --------------------------------------------------------------------------- a held write lock


LOCK_TIMEOUT = {"ORCH_BUSY_TIMEOUT": "0.5"}


@contextmanager
def write_lock(db: Path) -> Iterator[None]:
    """Another process's connection holding the database's write lock."""
    with closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")


def test_a_write_lock_held_past_the_busy_timeout_stops_before_any_call(
        orch: Orch, fake: FakeMessagesAPI, figures: Figures) -> None:
    seed_runs(orch.db, {"failed": REPORT_STATES[1]})
    with write_lock(orch.db):
        refused = {
            "resume": orch_as(orch, "resume", "failed", env=LOCK_TIMEOUT),
            "run": orch_as(orch, "run", REPORT, "--input", REPORT_INPUT, "--run-id", "new",
                           env=LOCK_TIMEOUT),
        }
        calls_while_locked = len(fake.requests)
    figures["commands_refused"] = sum(r.code == 1 for r in refused.values())
    figures["commands_tried"] = len(refused)
    figures["calls_before_refusal"] = calls_while_locked
    figures["busy_timeout_s"] = float(LOCK_TIMEOUT["ORCH_BUSY_TIMEOUT"])

    for name, result in refused.items():
        assert result.code == 1, f"orch {name}: exit {result.code}: {result.stderr}"
        line = one_error_line(result)
        assert str(orch.db) in line and "retry when the database is free" in line, line
    assert calls_while_locked == 0
    assert run_row(orch.db, "failed")["status"] == "failed"
    assert query(orch.db, "SELECT run_id FROM runs WHERE run_id = 'new'") == []

    assert orch.json("resume", "failed")["status"] == "completed"  # the retry the error asked for
    assert orch.json("run", REPORT, "--input", REPORT_INPUT, "--run-id", "new")["status"] == "completed"
    assert requested_states(fake.requests, "failed") == tally(REPORT_STATES[1:])
    assert requested_states(fake.requests, "new") == tally(REPORT_STATES)


class LockAfterStep(Tracer):
    """A tracer that, once step `seq` is committed, has another connection take the write lock
    (as another process would) before the run's next step starts."""

    def __init__(self, db: Path, seq: int) -> None:
        super().__init__(None)
        self.seq = seq
        self.holder = sqlite3.connect(db, isolation_level=None)

    def transition(self, rec: TransitionRecord, machine: str) -> None:
        if rec.seq == self.seq:
            self.holder.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        self.holder.execute("ROLLBACK")


def test_a_lock_taken_between_steps_stops_before_the_next_call_and_the_run_retries(
        db_path: Path, fake: FakeMessagesAPI, figures: Figures) -> None:
    fake.default = lambda request: f"answer for {request.state}"
    tracer = LockAfterStep(db_path, seq=1)
    engine = Engine(SQLiteStore(db_path, busy_timeout_s=0.3), model=fake.model(), tracer=tracer)

    async def drive() -> tuple[str, list[str | None], str]:
        """(the error while locked, the calls made by then, the status once retried)"""
        run = await engine.start(report().machine, {"run": 1}, run_id="locked",
                                 machine_ref=report().ref)
        with pytest.raises(StoreError) as stopped:
            await run.run_to_end()
        calls = [r.state for r in fake.requests]
        tracer.release()
        result = await run.run_to_end()  # the same run, retried once the lock is gone
        return str(stopped.value), calls, result.status.value

    try:
        message, calls_while_locked, status = asyncio.run(drive())
    finally:
        tracer.holder.close()
        engine.close()
    figures["calls_while_locked"] = len(calls_while_locked) - 1  # the first step's call came before
    figures["retried_to_completion"] = int(status == "completed")

    assert calls_while_locked == [REPORT_STATES[0]]  # no call for step 2 while it could not be marked
    assert "retry" in message, message
    assert status == "completed"
    assert [r.state for r in fake.requests] == list(REPORT_STATES)
    assert committed_states(db_path, "locked") == list(REPORT_STATES)
    assert query(db_path, "SELECT seq FROM transitions WHERE in_doubt = 1") == []


# --------------------------------------------------------------------------- corrupted runs


class Planted:
    """Unpickling this creates `marker`: a stand-in for a payload that runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def planted_pickle(marker: Path, protocol: int) -> bytes:
    payload = pickle.dumps(Planted(marker), protocol=protocol)
    probe = marker.with_name(marker.name + ".probe")
    pickle.loads(pickle.dumps(Planted(probe), protocol=protocol)).close()
    assert probe.exists(), "the planted payload would not run code: it proves nothing"
    probe.unlink()
    return payload


VICTIM, OTHERS = "victim", ("other-failed", "other-done")


def corrupt(kind: str, db: Path, machine_file: Path, marker: Path) -> None:
    """Damage the victim run the way `kind` says (the machine file is the victim's own copy)."""
    if kind == "changed_machine":
        source = machine_file.read_text()
        assert "Validate this data" in source
        machine_file.write_text(source.replace("Validate this data", "Check this data"))
        return
    params: tuple[Any, ...]
    if kind == "truncated_output":
        sql, params = ("UPDATE transitions SET output = substr(output, 1, length(output) / 2) "
                       "WHERE run_id = ? AND seq = 2", (VICTIM,))
    elif kind == "pickle_text_input":  # protocol 0 is ASCII: it fits a TEXT column
        sql, params = ("UPDATE runs SET input = ? WHERE run_id = ?",
                       (planted_pickle(marker, 0).decode("ascii"), VICTIM))
    elif kind == "pickle_blob_output":
        sql, params = ("UPDATE transitions SET output = ? WHERE run_id = ? AND seq = 1",
                       (planted_pickle(marker, pickle.HIGHEST_PROTOCOL), VICTIM))
    else:  # broken_chain: still valid JSON, but not what was recorded
        sql, params = ("UPDATE transitions SET output = ? WHERE run_id = ? AND seq = 1",
                       (json.dumps("a forged answer"), VICTIM))
    with closing(sqlite3.connect(db)) as conn, conn:
        assert conn.execute(sql, params).rowcount == 1


# kind -> (exit code of a refused resume, what its one line says, do log/show refuse too,
#          does `orch audit verify` see it: the hash chain covers the log rows, not the run row)
REFUSALS = {
    "truncated_output": (1, f"run {VICTIM} seq 2 output is not valid JSON", True, True),
    "pickle_text_input": (1, f"run {VICTIM} input is not valid JSON", True, False),
    "pickle_blob_output": (1, f"run {VICTIM} seq 1 output is not valid JSON", True, True),
    "broken_chain": (1, f"run {VICTIM}", False, True),
    "changed_machine": (2, f"changed since run {VICTIM} started", False, False),
}


@pytest.mark.parametrize("kind", sorted(REFUSALS))
def test_a_corrupted_run_is_refused_and_the_other_runs_are_unaffected(
        orch: Orch, fake: FakeMessagesAPI, tmp_path: Path, kind: str, figures: Figures) -> None:
    machine_file = shutil.copy(REPORT, tmp_path / "victim_report.py")
    seed_runs(orch.db, {VICTIM: REPORT_STATES[2]}, load_machine(str(machine_file)))
    seed_runs(orch.db, {OTHERS[0]: REPORT_STATES[1], OTHERS[1]: None})
    marker = tmp_path / "pickle-ran"
    corrupt(kind, orch.db, Path(machine_file), marker)
    victim_before = everything(orch.db, VICTIM)
    code, says, reads_refused, tampered = REFUSALS[kind]

    victim = {command: orch(command, VICTIM) for command in ("resume", "log", "show")}
    audit = orch("audit", "verify")
    others = {other: (orch("log", other).code, orch("show", other).code) for other in OTHERS}
    resumed_other = orch("resume", OTHERS[0], "--json")
    figures["victim_resume_exit"] = victim["resume"].code
    figures["victim_calls"] = requested_states(fake.requests, VICTIM).total()
    figures["other_runs_read_ok"] = sum(codes == (0, 0) for codes in others.values())
    figures["other_run_resumed"] = int(resumed_other.code == 0)
    figures["planted_code_ran"] = marker.exists()

    resumed = victim["resume"]
    assert resumed.code == code, f"exit {resumed.code}: {resumed.stdout}{resumed.stderr}"
    assert says in one_error_line(resumed)
    for command in ("log", "show"):
        read = victim[command]
        if reads_refused:
            assert read.code == 1 and says in one_error_line(read), read.stderr
        elif kind == "changed_machine":
            assert read.code == 0, read.stderr
    assert audit.code == int(tampered), audit.stdout + audit.stderr
    assert (f"run {VICTIM}: TAMPERED" in audit.stdout) == tampered, audit.stdout
    assert all(f"run {other}: ok" in audit.stdout for other in OTHERS), audit.stdout
    assert requested_states(fake.requests, VICTIM) == {}
    assert everything(orch.db, VICTIM) == victim_before

    assert set(listed(orch)) == {VICTIM, *OTHERS}
    assert others == dict.fromkeys(OTHERS, (0, 0))
    assert resumed_other.code == 0 and json.loads(resumed_other.stdout)["status"] == "completed"
    assert requested_states(fake.requests, OTHERS[0]) == tally(REPORT_STATES[1:])
    assert not marker.exists(), "reading the database ran the planted pickle"
    assert integrity(orch.db) == "ok"


# --------------------------------------------------------------------------- newer schema


def test_a_database_from_a_newer_schema_is_refused_and_left_untouched(
        orch: Orch, fake: FakeMessagesAPI, figures: Figures) -> None:
    seed_runs(orch.db, {"done": None, "failed": REPORT_STATES[3]})
    with closing(sqlite3.connect(orch.db)) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    before, files = sha256(orch.db), sorted(p.name for p in orch.db.parent.iterdir())
    commands = [("runs",), ("log", "done"), ("show", "done"), ("audit", "verify"),
                ("replay", "done"), ("resume", "failed"),
                ("run", REPORT, "--input", REPORT_INPUT, "--run-id", "new")]
    results = {command[0]: orch(*command) for command in commands}
    unchanged = sha256(orch.db) == before
    figures["commands_refused"] = sum(r.code == 2 for r in results.values())
    figures["commands_tried"] = len(commands)
    figures["database_changed"] = not unchanged

    for name, result in results.items():
        assert result.code == 2, f"orch {name}: exit {result.code}: {result.stderr}"
        line = one_error_line(result)
        assert f"schema version {SCHEMA_VERSION + 1}, newer than" in line, line
        assert "upgrade statemachine_orch" in line, line
    assert fake.requests == []
    assert unchanged
    assert sorted(p.name for p in orch.db.parent.iterdir()) == files
