"""Helpers shared by the test modules: paths, the `orch` command, database reads, scripted
answers, and the machinery of the reliability suites (tests/reliability/) that their fast
variants in the default suite use too. Test modules import from here, never from each other or
from a conftest.py; fixtures live in the conftest.py files."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import pytest

from statemachine_orch import Engine, PriceTable, RunStatus, SQLiteStore, Tracer
from statemachine_orch.loader import Loaded, load_machine
from statemachine_orch.sqlite_store import APPLICATION_ID
from statemachine_orch.testing import CapturedRequest, FakeMessagesAPI, Reply, error
from statemachine_orch.types import RunRecord, TransitionRecord, Usage, now_iso

K = TypeVar("K")
R = TypeVar("R")

# --------------------------------------------------------------------------- paths and constants

ROOT = Path(__file__).resolve().parent.parent


MACHINES = ROOT / "machines"


CANARY_KEY = "sk-ant-api03-CANARY-" + "x" * 40  # must never appear in logs or the database


SCHEMA_V1 = Path(__file__).parent / "data" / "schema_v1.sql"  # as version 1 shipped; never regenerate

CLOSED_PORT = "http://127.0.0.1:9"  # nothing listens there: any API call fails at once


REPORT = MACHINES / "report.py"


REPORT_INPUT = MACHINES / "report_input.json"


ROUTER = MACHINES / "support_router.py"


REPORT_STATES = ("data_validation", "trend_analysis", "risk_assessment", "recommendations",
                 "executive_summary")


ROUTER_STATES = ("sentiment_analysis", "standard_reply", "upsell", "support")
WAIT_S = 60.0  # generous bound on waiting for a request or a process (the reliability suites)


# --------------------------------------------------------------------------- the `orch` command


@dataclass
class CLIResult:
    code: int
    stdout: str
    stderr: str


def orch_command() -> list[str]:
    script = Path(sys.executable).parent / "orch"
    return [str(script)] if script.exists() else [sys.executable, "-m", "statemachine_orch.cli"]


def run_orch(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
             input: str | None = None, timeout: float = 60) -> CLIResult:
    """Run the real `orch` console script in a subprocess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run(orch_command() + list(args), cwd=cwd, env=full_env, input=input,
                          capture_output=True, text=True, timeout=timeout)
    return CLIResult(proc.returncode, proc.stdout, proc.stderr)


@dataclass
class Orch:
    """The `orch` command against one database, with the SDK pointed at `base_url`.

    Commands get the canary API key (CANARY_KEY); with `key=False` they get whatever the
    environment holds (a test that removed the key from it).
    """

    db: Path
    base_url: str = CLOSED_PORT
    cwd: Path | None = None
    key: bool = True
    started: list[subprocess.Popen[str]] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        env = {"ANTHROPIC_BASE_URL": self.base_url}
        if self.key:
            env["ANTHROPIC_API_KEY"] = CANARY_KEY
        return env

    def argv(self, args: Sequence[str | Path]) -> list[str]:
        return ["--db", str(self.db), *map(str, args)]

    def __call__(self, *args: str | Path) -> CLIResult:
        return run_orch(*self.argv(args), cwd=self.cwd, env=self.env())

    def ok(self, *args: str | Path) -> CLIResult:
        result = self(*args)
        command = " ".join(map(str, args))
        assert result.code == 0, f"orch {command} exited {result.code}:\n{result.stderr}"
        return result

    def json(self, *args: str | Path) -> Any:
        return json.loads(self.ok(*args, "--json").stdout)

    def log(self, run_id: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.ok("log", run_id, "--json").stdout.splitlines()]

    def start(self, *args: str | Path) -> subprocess.Popen[str]:
        """Start `orch` without waiting (stdout and stderr captured); `stop_all` cleans up."""
        env = dict(os.environ)
        env.update(self.env())
        proc = subprocess.Popen(orch_command() + self.argv(args), cwd=self.cwd, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.started.append(proc)
        return proc

    @staticmethod
    def finish(proc: subprocess.Popen[str], timeout: float = 60) -> CLIResult:
        stdout, stderr = proc.communicate(timeout=timeout)
        return CLIResult(proc.returncode, stdout, stderr)

    def stop_all(self) -> None:
        """Kill the processes this helper started that are still running (teardown)."""
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=30)


@contextmanager
def offline_environment() -> Iterator[None]:
    """conftest's offline environment, for module-scoped fixtures (set up before it applies)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ANTHROPIC_BASE_URL", CLOSED_PORT)
        env.setenv("ANTHROPIC_API_KEY", CANARY_KEY)
        for name in ("ANTHROPIC_AUTH_TOKEN", "ORCH_DB", "ORCH_SYNC"):
            env.delenv(name, raising=False)
        yield


@contextmanager
def orch_against(fake: FakeMessagesAPI, db: Path) -> Iterator[Orch]:
    """`Orch` on `db` with the fake served on loopback; kills leftover processes on exit."""
    with fake.serve() as url:
        cli = Orch(db, url)
        try:
            yield cli
        finally:
            cli.stop_all()


# --------------------------------------------------------------------------- scripted answers


def answer(state: str) -> Reply:
    """A recognisable answer for `state`, with usage numbers of its own."""
    n = sum(map(ord, state))
    return Reply(text=f"<<{state} answer {n}>>", input_tokens=n % 997 + 100,
                 output_tokens=n % 89 + 10)


def script(fake: FakeMessagesAPI, states: Sequence[str],
           before: Mapping[str, Sequence[Reply]] | None = None) -> dict[str, Reply]:
    """Script `answer(state)` for each state, after the replies in `before[state]`."""
    replies = {}
    for state in states:
        replies[state] = answer(state)
        fake.on(state, *(before or {}).get(state, ()), replies[state])
    return replies


def requests_for(fake: FakeMessagesAPI, state: str) -> list[CapturedRequest]:
    return [r for r in fake.requests if r.state == state]


MODEL = "claude-sonnet-5-5"


PRICES = PriceTable()  # what the engine uses when given no price table


def reply(text: str = "fine", *, input_tokens: int = 100, output_tokens: int = 20,
          **options: Any) -> Reply:
    """A scripted answer with usage numbers of its own (text, or tool input via data=)."""
    return Reply(text=None if "data" in options else text, input_tokens=input_tokens,
                 output_tokens=output_tokens, **options)


def usage_of(*replies: Reply) -> Usage:
    """The usage the API reports for these scripted answers, added up."""
    total = Usage()
    for r in replies:
        total.add(Usage(input_tokens=r.input_tokens or 0, output_tokens=r.output_tokens or 0,
                        cache_read_tokens=r.cache_read_tokens, cache_write_tokens=r.cache_write_tokens))
    return total


def cost_of(*replies: Reply, model: str = MODEL, prices: PriceTable = PRICES) -> float:
    """What the price table charges for these answers, one call each."""
    costs = [prices.cost(model, usage_of(r)) for r in replies]
    assert None not in costs, f"no price for {model}"
    return sum(c for c in costs if c is not None)


# --------------------------------------------------------------------------- files and databases


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def query(db: Path, sql: str, *params: Any) -> list[sqlite3.Row]:
    """Rows from the database file, or none when the file does not exist."""
    if not db.exists():
        return []
    with closing(sqlite3.connect(db)) as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute(sql, params).fetchall()


def run_count(db: Path) -> int:
    return len(query(db, "SELECT run_id FROM runs"))


def stored_log(db: Path, run_id: str) -> list[sqlite3.Row]:
    """The run's transition rows as stored (where `orch log` itself is not under test)."""
    return query(db, "SELECT * FROM transitions WHERE run_id = ? ORDER BY seq", run_id)


def stored_status(db: Path, run_id: str) -> str:
    (row,) = query(db, "SELECT status FROM runs WHERE run_id = ?", run_id)
    return str(row["status"])


def integrity(db: Path) -> str:
    with closing(sqlite3.connect(db)) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


def create_v1_schema(conn: sqlite3.Connection) -> None:
    """An empty database of schema version 1, for the upgrade tests."""
    conn.executescript(SCHEMA_V1.read_text())
    conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
    conn.execute("PRAGMA user_version=1")


def new_run(run_id: str = "run-1", **overrides: Any) -> RunRecord:
    now = now_iso()
    fields: dict[str, Any] = dict(run_id=run_id, machine="m", machine_ref="/x/m.py:machine",
                                  machine_hash="ab" * 32, input={"q": [1, "two", None]},
                                  status=RunStatus.RUNNING, created_at=now, updated_at=now,
                                  options={"offline": "auto"})
    fields.update(overrides)
    return RunRecord(**fields)


def row(seq: int, **overrides: Any) -> TransitionRecord:
    fields: dict[str, Any] = dict(run_id="run-1", seq=seq, from_state="a", to_state="b",
                                  decision="continue", reason="r", attempt=1, started_at=now_iso(),
                                  latency_ms=1.5, source="llm", output="out",
                                  request={"model": "m", "messages": []},
                                  response={"id": "msg", "content": []}, request_id="req",
                                  usage=Usage(input_tokens=3, output_tokens=4))
    fields.update(overrides)
    return TransitionRecord(**fields)


# --------------------------------------------------------------------------- what a command printed


def one_error_line(result: CLIResult) -> str:
    """The single `orch: error: ...` line a refused command prints, without a traceback."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("orch: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def resume_hint(stdout: str) -> str:
    """The run id from the `resume with: orch resume RUN_ID` hint of a failed run."""
    found = re.search(r"^resume with: orch resume (\S+)$", stdout, re.MULTILINE)
    assert found, stdout
    return found.group(1)


def router_input(tmp_path: Path, text: str = "I love the new tent!") -> Path:
    return write(tmp_path / "ticket.json", json.dumps({"text": text}))


def shown(path: str | Path) -> str:
    """The module part of a problem line: relative to cwd when under it, else as given."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------- reliability: scale and figures


FULL = os.environ.get("ORCH_RELIABILITY") == "full"


def scaled(ci: int, full: int) -> int:
    """A trial count: `ci` in the default (CI) run, `full` with ORCH_RELIABILITY=full."""
    return full if FULL else ci


class Figures:
    """Numbers a suite measured, kept under the suite's name."""

    def __init__(self, suite: str) -> None:
        self.suite = suite
        self.values: dict[str, Any] = {}

    def __setitem__(self, key: str, value: Any) -> None:
        self.values[key] = value

    def add(self, key: str, amount: int = 1) -> None:
        self.values[key] = self.values.get(key, 0) + amount


def in_parallel(jobs: Mapping[K, Callable[[], R]], workers: int = 4) -> dict[K, R]:
    """Each job's result, the jobs run a few at a time (each one mostly waits on a process;
    4 at a time by default: each is short, and other suites share the cores)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {key: pool.submit(job) for key, job in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


# --------------------------------------------------------------------------- the crash matrix (also SIGTERM)

CRASH_MATRIX_MACHINE = '''
from statemachine_orch import LLMState, Machine, PythonState


def tally(ctx):
    """Bookkeeping between the calls (deterministic, no API call): words per answer so far."""
    return {name: len(str(text).split()) for name, text in sorted(ctx.outputs.items())}


machine = Machine("crash_matrix", input_vars={"topic": lambda data: data["topic"]}, states=[
    LLMState("outline", prompt="Outline a short note on {topic}.", max_tokens=300),
    LLMState("facts", prompt="List the facts this outline needs: {outline}", needs=["outline"],
             max_tokens=400),
    PythonState("tally", run=tally, needs=["outline", "facts"]),
    LLMState("draft", prompt="Draft the note from {outline} and {facts} (sizes so far: {tally}).",
             needs=["outline", "facts", "tally"], max_tokens=800),
    LLMState("summary", prompt="Summarise in one line: {draft}", needs=["draft"], max_tokens=200),
])
'''


STATES = ("outline", "facts", "tally", "draft", "summary")


LLM_STATES = ("outline", "facts", "draft", "summary")


CRASH_MATRIX_INPUT = {"topic": "durable state machines"}

POINTS = ("run_created", "before_request", "in_flight", "after_response", "mid_commit",
          "after_commit")
# A paid call was made and its step not committed: a resume must send it again.
IN_FLIGHT_POINTS = ("in_flight", "after_response", "mid_commit")

# "Timestamps and attempts aside": a crashed-and-resumed log must equal an uninterrupted run's
# log in every column except these. Timestamps: started_at and latency_ms (and the hash
# chain, which covers them). Attempts: which HTTP call answered the step (request_id, and the
# message id inside the response) and in_doubt, the flag that the step's call was sent twice
# (checked on its own). The FSM's `attempt` counter is compared: a crash is not a retry.
# Failed-attempt rows are not compared either; a re-sent call adds no transition row.
NOT_COMPARED = ("run_id", "started_at", "latency_ms", "chain", "request_id", "in_doubt")


@dataclass
class EnvOrch(Orch):
    """`Orch` whose commands also get `extra` environment variables (ORCH_KILL_AT, ...)."""

    extra: Mapping[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return {**super().env(), **self.extra}

    def with_env(self, **extra: str) -> EnvOrch:
        """The same `orch` with more variables; its processes are still cleaned up by this one."""
        return replace(self, extra={**self.extra, **extra})


def reliability_seed() -> int:
    """ORCH_RELIABILITY_SEED, else a fresh one; printed so a failing run can be replayed."""
    given = os.environ.get("ORCH_RELIABILITY_SEED")
    seed = int(given) if given else random.SystemRandom().randrange(2**32)
    print(f"reliability seed: {seed} (replay with ORCH_RELIABILITY_SEED={seed})")
    return seed


def write_machine(tmp_path: Path) -> tuple[Path, Path]:
    """The 5-state machine module and its input file."""
    return (write(tmp_path / "crash_matrix.py", CRASH_MATRIX_MACHINE),
            write(tmp_path / "crash_matrix_input.json", json.dumps(CRASH_MATRIX_INPUT)))


@dataclass
class Hold:
    """A request held at the server until released; then answered, or dropped unanswered."""

    state: str
    answered: bool = False
    arrived: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


class Answers:
    """The fake's answers for every run: `answer(state)`, except that a held run's first
    request for its held state waits until released (see `Hold`)."""

    def __init__(self, fake: FakeMessagesAPI) -> None:
        self.fake = fake
        self._holds: dict[str, Hold] = {}
        fake.default = self._reply

    def hold(self, run_id: str, state: str, *, answered: bool = False) -> Hold:
        hold = self._holds[run_id] = Hold(state, answered)
        return hold

    def release(self, run_id: str) -> None:
        hold = self._holds.pop(run_id, None)
        if hold is not None:
            hold.release.set()

    def release_all(self) -> None:
        for run_id in list(self._holds):
            self.release(run_id)

    def _reply(self, request: CapturedRequest) -> Reply:
        hold = self._holds.get(request.run_id or "")
        if hold is not None and hold.state == request.state and not hold.arrived.is_set():
            hold.arrived.set()
            if hold.answered:
                return replace(answer(hold.state), gate=hold.release)
            return Reply(gate=hold.release, fault="disconnect")
        return answer(request.state or "")

    def calls(self, run_id: str) -> Counter[str]:
        """Requests that reached the server for `run_id`, per state."""
        return Counter(r.state or "" for r in list(self.fake.requests) if r.run_id == run_id)


def wait_for_arrival(hold: Hold, proc: subprocess.Popen[str]) -> None:
    """Until the held request reached the server (or the process ended without sending it)."""
    for _ in range(int(WAIT_S / 0.05)):
        if hold.arrived.wait(0.05) or proc.poll() is not None:
            break
    assert hold.arrived.is_set(), f"no {hold.state} request arrived (exit {proc.poll()})"


def kill_9(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=WAIT_S)


def rows(db: Path, run_id: str) -> list[dict[str, Any]]:
    return [dict(row) for row in stored_log(db, run_id)]


def comparable(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The log without timestamps and call bookkeeping (see NOT_COMPARED)."""
    out = []
    for row in log:
        kept = {k: v for k, v in row.items() if k not in NOT_COMPARED}
        if kept.get("response"):
            kept["response"] = {k: v for k, v in json.loads(kept["response"]).items() if k != "id"}
        out.append(kept)
    return out


def log_difference(log: list[dict[str, Any]], reference: list[dict[str, Any]]) -> str | None:
    """Where a log differs from the reference, timestamps and attempts aside (None: equal)."""
    got, wanted = comparable(log), reference
    if len(got) != len(wanted):
        return (f"{len(got)} rows {[r['from_state'] for r in got]}, expected {len(wanted)} "
                f"{[r['from_state'] for r in wanted]}")
    for row, expected in zip(got, wanted, strict=True):
        for key, value in expected.items():
            if row.get(key) != value:
                return f"seq {expected['seq']} {key}: {row.get(key)!r}, expected {value!r}"
    return None


def flagged_seqs(log: list[dict[str, Any]]) -> list[int]:
    return [row["seq"] for row in log if row["in_doubt"]]


@dataclass(frozen=True)
class Kill:
    """Where a trial kills `orch run`: `point`, the `nth` time the process reaches it."""

    point: str
    nth: int

    @property
    def state(self) -> str | None:
        """The state whose step was in progress (None: killed before the first step)."""
        if self.point == "run_created":
            return None
        steps = LLM_STATES if self.point in ("before_request", "in_flight") else STATES
        return steps[self.nth - 1]

    @property
    def spec(self) -> str | None:
        """The ORCH_KILL_AT value (None for in_flight: that kill comes from outside)."""
        return None if self.point == "in_flight" else f"{self.point}:{self.nth}"

    @property
    def committed(self) -> int:
        """Steps committed when the process died."""
        if self.state is None:
            return 0
        return STATES.index(self.state) + (self.point == "after_commit")

    @property
    def repaid(self) -> bool:
        """A paid call was made and not committed, so the resume must send it again."""
        return self.point in IN_FLIGHT_POINTS and self.state in LLM_STATES

    @property
    def sent(self) -> int:
        """Requests that reached the server before the process died."""
        if self.state is None:
            return 0
        reached = STATES.index(self.state) + (self.point != "before_request")
        return sum(1 for s in STATES[:reached] if s in LLM_STATES)

    def __str__(self) -> str:
        return f"{self.point}:{self.nth} ({self.state or 'before the first step'})"


@dataclass
class Trial:
    """What one trial observed; `problems()` compares it with what must hold."""

    kill: Kill
    run_id: str
    killed: CLIResult
    before: list[dict[str, Any]]  # the stored log when the process had died
    calls_before: Counter[str]
    status_before: str
    integrity_at_kill: str
    resumed: CLIResult
    after: list[dict[str, Any]]
    calls_after: Counter[str]
    status_after: str | None
    integrity: str

    @property
    def completed(self) -> bool:
        return self.status_after == "completed"

    @property
    def lost(self) -> int:
        """Steps committed before the kill that are not in the final log exactly as they were."""
        return sum(1 for row in self.before if row["to_state"] and row not in self.after)

    @property
    def recalled(self) -> int:
        """Requests the resume sent for steps that were already committed."""
        done = {row["from_state"] for row in self.before if row["to_state"]}
        return sum(self.calls_after[s] - self.calls_before[s] for s in done)

    @property
    def repaid(self) -> int:
        """Calls sent more than once for one step (at most one per trial)."""
        return sum(n - 1 for n in self.calls_after.values() if n > 1)

    @property
    def flagged(self) -> list[int]:
        return flagged_seqs(self.after)

    @property
    def integrity_failures(self) -> int:
        return (self.integrity_at_kill != "ok") + (self.integrity != "ok")

    def problems(self, reference: list[dict[str, Any]]) -> list[str]:
        kill, found = self.kill, []

        def expect(what: str, seen: Any, wanted: Any) -> None:
            if seen != wanted:
                found.append(f"{what}: {seen!r}, expected {wanted!r}")

        expect("killed process exit", self.killed.code, -signal.SIGKILL)
        expect("steps committed at the kill", [r["seq"] for r in self.before],
               list(range(1, kill.committed + 1)))
        expect("requests before the kill", sum(self.calls_before.values()), kill.sent)
        finished_before = kill.committed == len(STATES)
        expect("status at the kill", self.status_before, "completed" if finished_before else "running")
        if finished_before:  # killed after the last commit: nothing is left to resume
            expect("resume of a completed run", (self.resumed.code,
                   "already completed" in self.resumed.stderr), (2, True))
        else:
            expect("resume exit", self.resumed.code, 0)
        expect("status after resume", self.status_after, "completed")
        expect("committed steps lost", self.lost, 0)
        expect("committed steps called again", self.recalled, 0)
        expected_calls = Counter({s: 1 for s in LLM_STATES})
        if kill.repaid:
            expected_calls[kill.state or ""] += 1
        expect("requests per state", dict(self.calls_after), dict(expected_calls))
        doubt = [STATES.index(kill.state or "") + 1] if kill.repaid else []
        expect("seqs flagged in doubt", self.flagged, doubt)
        expect("final log against the reference", log_difference(self.after, reference), None)
        expect("integrity_check after the kill, after resume", (self.integrity_at_kill,
               self.integrity), ("ok", "ok"))
        if found:
            found.insert(0, f"trial {self.run_id} killed at {kill}; resume stderr: "
                            f"{self.resumed.stderr.strip()[-300:]!r}")
        return found


class Matrix:
    """Runs trials of one machine against one database and one served fake."""

    def __init__(self, orch: EnvOrch, answers: Answers, machine: Path, data: Path) -> None:
        self.orch, self.answers, self.machine, self.data = orch, answers, machine, data

    def start(self, run_id: str, cli: Orch | None = None) -> subprocess.Popen[str]:
        return (cli or self.orch).start("-q", "run", self.machine, "--input", self.data,
                                        "--run-id", run_id, "--json")

    def reference(self) -> list[dict[str, Any]]:
        """An uninterrupted run's log, comparable."""
        done = Orch.finish(self.start("reference"), timeout=WAIT_S)
        assert done.code == 0, done.stderr
        assert self.answers.calls("reference") == Counter({s: 1 for s in LLM_STATES})
        log = rows(self.orch.db, "reference")
        assert [r["from_state"] for r in log] == list(STATES)
        assert flagged_seqs(log) == []
        return comparable(log)

    def trial(self, number: int, kill: Kill) -> Trial:
        run_id = f"t{number:03d}-{kill.point}-{kill.nth}"
        db = self.orch.db
        if kill.spec is None:
            hold = self.answers.hold(run_id, kill.state or "")
            proc = self.start(run_id)
            try:
                wait_for_arrival(hold, proc)
                kill_9(proc)
            finally:
                self.answers.release(run_id)
        else:
            proc = self.start(run_id, self.orch.with_env(ORCH_KILL_AT=kill.spec))
        killed = Orch.finish(proc, timeout=WAIT_S)
        before = rows(db, run_id)
        calls_before = self.answers.calls(run_id)
        status_before = stored_status(db, run_id)
        integrity_at_kill = integrity(db)
        resumed = self.orch("-q", "resume", run_id, "--json")
        found = query(db, "SELECT status FROM runs WHERE run_id = ?", run_id)
        return Trial(kill, run_id, killed, before, calls_before, status_before, integrity_at_kill,
                     resumed, rows(db, run_id), self.answers.calls(run_id),
                     found[0]["status"] if found else None, integrity(db))


# --------------------------------------------------------------------------- seeded report runs


@cache
def report() -> Loaded:
    """machines/report.py as `orch` loads it (its ref is what a resume loads it from)."""
    return load_machine(str(REPORT))


def answer_every_state(fake: FakeMessagesAPI) -> FakeMessagesAPI:
    """Every state gets `answer(state)` (the conftest fake answers unscripted states with 400)."""
    fake.default = lambda request: answer(request.state or "")
    return fake


def seed_runs(db: Path, fail_at: Mapping[str, str | None], loaded: Loaded | None = None
              ) -> FakeMessagesAPI:
    """Store one report run per id, in process, on a fake of its own: a run whose `fail_at`
    state is given fails there (a 400, not retried) and is resumable; None completes it.
    `loaded`: another copy of the report machine to run (default machines/report.py)."""
    chosen = loaded or report()

    def reply(request: CapturedRequest) -> Reply:
        if request.state == fail_at[request.run_id or ""]:
            return error(400, f"{request.state} is misconfigured")
        return answer(request.state or "")

    seed = FakeMessagesAPI(default=reply)
    engine = Engine(SQLiteStore(db), model=seed.model(), tracer=Tracer.null())

    async def drive() -> list[Any]:
        return await asyncio.gather(*(
            engine.arun(chosen.machine, {"run": run_id}, run_id=run_id, machine_ref=chosen.ref)
            for run_id in fail_at))

    try:
        results = asyncio.run(drive())
    finally:
        engine.close()
    expected = {run_id: RunStatus.COMPLETED if state is None else RunStatus.FAILED
                for run_id, state in fail_at.items()}
    assert {r.run_id: r.status for r in results} == expected
    return seed


def committed_states(db: Path, run_id: str) -> list[str]:
    """The states of the run's committed rows, in order, checking seq runs 1, 2, 3... unbroken."""
    rows = query(db, "SELECT seq, from_state, to_state FROM transitions WHERE run_id = ? ORDER BY seq",
                 run_id)
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1)), f"{run_id}: gap or duplicate"
    return [r["from_state"] for r in rows if r["to_state"] is not None]


def requested_states(requests: Sequence[CapturedRequest], run_id: str) -> Counter[str]:
    return Counter(r.state or "" for r in requests if r.run_id == run_id)


def tally(states: Sequence[str]) -> Counter[str]:
    return Counter(states)


def run_row(db: Path, run_id: str) -> dict[str, Any]:
    (found,) = query(db, "SELECT status, error, owner, owner_info, in_flight, updated_at FROM runs "
                         "WHERE run_id = ?", run_id)
    return dict(found)


def everything(db: Path, run_id: str) -> tuple[dict[str, Any], list[tuple[Any, ...]]]:
    return run_row(db, run_id), [tuple(r) for r in stored_log(db, run_id)]
