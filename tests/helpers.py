"""Helpers shared by the test modules: paths, the `orch` command, database reads, scripted
answers, and the machinery of the reliability suites (tests/reliability/) that their fast
variants in the default suite use too. Test modules import from here, never from each other or
from a conftest.py; fixtures live in the conftest.py files."""

from __future__ import annotations

import ast
import asyncio
import ctypes
import hashlib
import json
import multiprocessing
import os
import pickle
import random
import re
import resource
import shutil
import signal
import socket
import sqlite3
import string
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytest
from hypothesis import assume
from hypothesis import strategies as st
from pydantic import BaseModel

import statemachine_orch
from statemachine_orch import (
    END,
    Branch,
    CorruptRunError,
    DefinitionError,
    Engine,
    FlowDecision,
    Hook,
    InvalidOutput,
    LLMState,
    Loaded,
    Machine,
    Owner,
    OwnershipLostError,
    PriceTable,
    PythonState,
    RunRecord,
    RunStatus,
    SQLiteStore,
    StepContext,
    StoreError,
    TransitionRecord,
    Usage,
    guard,
    load_machine,
    replay_run,
)
from statemachine_orch.engine._snapshot import snapshot
from statemachine_orch.store.sqlite._schema import APPLICATION_ID, SCHEMA_VERSION
from statemachine_orch.testing import CapturedRequest, FakeMessagesAPI, Reply, error
from statemachine_orch.types import now_iso

K = TypeVar("K")
R = TypeVar("R")

# --------------------------------------------------------------------------- paths and constants

ROOT = Path(__file__).resolve().parent.parent


MACHINES = ROOT / "machines"


EXAMPLE_MACHINES = sorted(p for p in MACHINES.glob("*.py") if not p.name.startswith("_"))  # not __init__.py


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


def tty_stderr(args: Sequence[str | Path], env: Mapping[str, str], *, columns: int = 120,
               timeout: float = 60) -> tuple[int, str, str]:
    """(exit code, stdout, what reached the terminal) of `orch ARGS` whose stderr is a terminal
    (a pseudo-terminal `columns` wide) and whose stdout is a pipe."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    seen: list[bytes] = []

    def read_terminal() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the terminal's last writer has gone
                return
            if not chunk:
                return
            seen.append(chunk)

    reader = threading.Thread(target=read_terminal, daemon=True)
    try:
        proc = subprocess.Popen(orch_command() + [str(a) for a in args], env={**os.environ, **env},
                                stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, text=True)
        os.close(slave)
        slave = -1
        reader.start()
        stdout, _ = proc.communicate(timeout=timeout)
        reader.join(timeout=timeout)
    finally:
        if slave != -1:
            os.close(slave)
        os.close(master)
    return proc.returncode, stdout, b"".join(seen).decode("utf-8", "replace")


@contextmanager
def offline_environment() -> Iterator[None]:
    """tests/conftest.py's offline environment, for module-scoped fixtures (set up before it applies)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ANTHROPIC_BASE_URL", CLOSED_PORT)
        env.setenv("ANTHROPIC_API_KEY", CANARY_KEY)
        for name in ("ANTHROPIC_AUTH_TOKEN", "ORCH_DB", "ORCH_SYNC", "ORCH_AUDIT_KEY"):
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


class VirtualTime:
    """A clock that moves only when the model (or its rate limiter) sleeps: total-time limits and
    rate limits without waiting."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


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


def me() -> Owner:
    """An owner token of this (live) process."""
    return Owner.for_this_process()


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
# A paid call was made and its answer never arrived: a resume must send it again. (An answer
# that arrived is kept before anything judges it: a kill after_response or mid_commit re-pays nothing.)
IN_FLIGHT_POINTS = ("in_flight",)

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
    """The stored log, each row with `in_doubt_usd`: the part of its cost that is calls in doubt
    (in flight when a process died, counted at their worst case)."""
    doubts = {r["seq"]: r["usd"] for r in query(
        db, "SELECT seq, sum(cost_usd) AS usd FROM attempts WHERE run_id = ? AND kind = 'in_doubt' GROUP BY seq",
        run_id)}
    return [{**dict(row), "in_doubt_usd": doubts.get(row["seq"], 0.0)} for row in stored_log(db, run_id)]


def comparable(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The log without timestamps and call bookkeeping (see NOT_COMPARED), each row's cost
    without its calls in doubt (they depend on when the process died)."""
    out = []
    for row in log:
        kept = {k: v for k, v in row.items() if k not in NOT_COMPARED}
        doubt = kept.pop("in_doubt_usd", 0.0)
        if kept["cost_usd"] is not None:
            kept["cost_usd"] = round(kept["cost_usd"] - doubt, 12)
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
    calls_recorded: int  # what the run's log counts as calls once resumed

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
        expect("calls in the log against requests at the fake", self.calls_recorded,
               sum(self.calls_after.values()))
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
                     found[0]["status"] if found else None, integrity(db), recorded_calls(db, run_id))


def recorded_calls(db: Path, run_id: str) -> int:
    """The model calls a run's log counts (the `calls` of `orch log`): its attempts, calls in
    doubt included, and the answers its rows hold."""
    (found,) = query(db, "SELECT (SELECT count(*) FROM attempts WHERE run_id = ?1) + (SELECT count(*) "
                         "FROM transitions WHERE run_id = ?1 AND source IN ('llm', 'fallback') "
                         "AND response IS NOT NULL) AS n", run_id)
    return int(found["n"])


def shown_in_doubt(orch: Orch, trial: Trial) -> None:
    """`orch log` shows the flagged step as source "llm!", with the note; --json as in_doubt."""
    (seq,) = trial.flagged
    as_json = orch.log(trial.run_id)
    assert [row["seq"] for row in as_json if row["in_doubt"]] == [seq]
    table = orch.ok("log", trial.run_id).stdout.splitlines()
    row = next(line.split() for line in table[1:] if line.split()[0] == str(seq))
    assert "llm!" in row, table
    assert sum("llm!" in line for line in table) == 1, table
    assert table[-1].startswith("! in doubt: the step re-sent a call that was in flight"), table


# --------------------------------------------------------------------------- seeded report runs


@cache
def report() -> Loaded:
    """machines/report.py as `orch` loads it (its ref is what a resume loads it from)."""
    return load_machine(str(REPORT))


def answer_every_state(fake: FakeMessagesAPI) -> FakeMessagesAPI:
    """Every state gets `answer(state)` (the `fake` fixture answers unscripted states with 400)."""
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
    engine = Engine(SQLiteStore(db), model=seed.model())

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


def step_calls(requests: Sequence[CapturedRequest]) -> Counter[tuple[str, str]]:
    """Requests per (run id, state): a step asked twice counts 2."""
    return Counter((r.run_id or "", r.state or "") for r in list(requests))


def tally(states: Sequence[str]) -> Counter[str]:
    return Counter(states)


def run_row(db: Path, run_id: str) -> dict[str, Any]:
    (found,) = query(db, "SELECT status, error, owner, owner_info, in_flight, updated_at FROM runs "
                         "WHERE run_id = ?", run_id)
    return dict(found)


def everything(db: Path, run_id: str) -> tuple[dict[str, Any], list[tuple[Any, ...]]]:
    return run_row(db, run_id), [tuple(r) for r in stored_log(db, run_id)]


# --------------------------------------------------------------------------- SIGTERM


LONG_GRACE = "60"  # longer than any step here takes once released


SHORT_GRACE = "0.2"  # shorter than the held call, which is held until the process has exited


STOP_WAIT_S = 20.0  # the short grace must end the process well within this (not the default 30 s)


STOPPED = "stopped on request; resume to continue"


PAUSING_MACHINES = '''
import asyncio
import time
from pathlib import Path

from statemachine_orch import LLMState, Machine, PythonState

WAIT_S = 60.0


def arrive(ctx):
    """Count this run of the step, say it has started, and return the file that lets it go on."""
    folder = Path(ctx.input["folder"])
    with open(folder / "pause.runs", "a", encoding="utf-8") as runs:
        runs.write(ctx.run_id + "\\n")
    (folder / "pause.reached").touch()
    return folder / "pause.go"


def pause_sync(ctx):
    go, deadline = arrive(ctx), time.monotonic() + WAIT_S
    while not go.exists():
        if time.monotonic() > deadline:
            raise TimeoutError("nobody let the pause go on")
        time.sleep(0.01)
    return "went on"


async def pause_async(ctx):
    go, deadline = arrive(ctx), time.monotonic() + WAIT_S
    while not go.exists():
        if time.monotonic() > deadline:
            raise TimeoutError("nobody let the pause go on")
        await asyncio.sleep(0.01)
    return "went on"


def pausing(name, pause):
    return Machine(name, states=[
        LLMState("before", prompt="Say something first.", max_tokens=50),
        PythonState("pause", run=pause),
        LLMState("after", prompt="Now say it {pause}.", needs=["pause"], max_tokens=50),
    ])


paused_sync = pausing("paused_sync", pause_sync)
paused_async = pausing("paused_async", pause_async)
'''


PAUSING_STATES = ("before", "pause", "after")


def wait_until_delivered(proc: subprocess.Popen[str], sig: int) -> None:
    """Until `sig` is no longer pending for the process: its handler has received it, so
    the stop is requested before anything the test releases after this point can be read."""
    bit = 1 << (sig - 1)
    deadline = time.monotonic() + WAIT_S
    while True:
        status = dict(line.split(":", 1) for line in
                      Path(f"/proc/{proc.pid}/status").read_text().splitlines() if ":" in line)
        assert int(status["SigCgt"], 16) & bit, f"orch does not handle signal {sig}"
        if not (int(status["SigPnd"], 16) | int(status["ShdPnd"], 16)) & bit:
            return
        assert time.monotonic() < deadline, f"signal {sig} still pending after {WAIT_S}s"
        time.sleep(0.01)


def wait_for_file(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not path.exists():
        assert proc.poll() is None, f"orch exited {proc.returncode} before {path.name} appeared"
        assert time.monotonic() < deadline, f"{path.name} did not appear in {WAIT_S}s"
        time.sleep(0.01)


@dataclass
class Stopped:
    """One SIGTERMed run: what the stopped process left, and what `orch resume` made of it."""

    stopped: CLIResult
    before: list[dict[str, Any]]
    calls_before: Counter[str]
    status_before: str
    resumed: CLIResult
    after: list[dict[str, Any]]
    calls_after: Counter[str]
    status_after: str

    @property
    def result(self) -> dict[str, Any]:
        return dict(json.loads(self.stopped.stdout))

    @property
    def committed(self) -> list[str]:
        return [row["from_state"] for row in self.before if row["to_state"]]

    @property
    def resent(self) -> int:
        """Requests the resume sent for steps the stopped process had committed."""
        return sum(self.calls_after[s] - self.calls_before[s] for s in self.committed)

    def assert_stopped(self, committed: list[str]) -> None:
        """Exit 143, run `interrupted` with exactly `committed` stored, resumable."""
        assert self.stopped.code == 143, (self.stopped.code, self.stopped.stderr)
        assert (self.result["status"], self.result["error"]) == ("interrupted", STOPPED)
        assert self.result["path"] == committed
        assert self.status_before == "interrupted"
        assert [row["from_state"] for row in self.before] == committed  # no failed row either
        assert self.resumed.code == 0, self.resumed.stderr
        assert self.status_after == "completed"
        assert self.resent == 0
        assert self.after[:len(self.before)] == self.before  # nothing committed was lost


def stop_and_resume(orch: Orch, answers: Answers, run_id: str, proc: subprocess.Popen[str], *,
                    timeout: float = WAIT_S) -> Stopped:
    """Wait for the signalled process to exit, then resume its run; both observed."""
    stopped = Orch.finish(proc, timeout=timeout)
    before, calls_before = rows(orch.db, run_id), answers.calls(run_id)
    status_before = stored_status(orch.db, run_id)
    resumed = orch("-q", "resume", run_id, "--json")
    return Stopped(stopped, before, calls_before, status_before, resumed, rows(orch.db, run_id),
                   answers.calls(run_id), stored_status(orch.db, run_id))


def record(figures: Figures, trial: Stopped) -> None:
    """Add one trial's numbers (before its assertions, so a failure still shows them)."""
    figures.add("trials")
    figures.add("exit_143", trial.stopped.code == 143)
    figures.add("runs_interrupted", trial.status_before == "interrupted")
    figures.add("runs_completed_after_resume", trial.resumed.code == 0 and trial.status_after == "completed")
    figures.add("committed_steps_resent", trial.resent)
    figures.add("calls_flagged_in_doubt", len(flagged_seqs(trial.after)))
    figures.add("repaid_calls", sum(n - 1 for n in trial.calls_after.values() if n > 1))


def stop_within_the_grace(matrix: Matrix, reference: list[dict[str, Any]], state: str, run_id: str,
                          figures: Figures) -> None:
    """SIGTERM while `state`'s call is held; its answer arrives after the stop was requested.
    The step finishes and commits, no later step starts, `orch` exits 143; resume completes."""
    orch, answers = matrix.orch, matrix.answers
    hold = answers.hold(run_id, state, answered=True)
    proc = matrix.start(run_id, orch.with_env(ORCH_STOP_GRACE=LONG_GRACE))
    try:
        wait_for_arrival(hold, proc)
        proc.send_signal(signal.SIGTERM)
        wait_until_delivered(proc, signal.SIGTERM)
    finally:
        answers.release(run_id)  # the answer arrives after the stop was requested
    trial = stop_and_resume(orch, answers, run_id, proc)
    record(figures, trial)
    figures.add("steps_finished_within_grace", state in trial.committed)

    done = list(STATES[:STATES.index(state) + 1])  # the held step finished and committed
    trial.assert_stopped(done)
    assert trial.calls_before == Counter(s for s in done if s in LLM_STATES), (
        f"{run_id}: a step was started after SIGTERM")
    assert trial.calls_after == Counter(LLM_STATES)
    assert flagged_seqs(trial.after) == []  # the call was answered and committed: no doubt
    assert (difference := log_difference(trial.after, reference)) is None, difference


def stop_past_the_grace(matrix: Matrix, reference: list[dict[str, Any]], state: str, run_id: str,
                        figures: Figures) -> None:
    """SIGTERM while `state`'s call is held past a short grace: the call is abandoned, nothing
    is committed for it, `orch` exits 143; resume sends it again, flagged in doubt."""
    orch, answers = matrix.orch, matrix.answers
    hold = answers.hold(run_id, state)
    proc = matrix.start(run_id, orch.with_env(ORCH_STOP_GRACE=SHORT_GRACE))
    try:
        wait_for_arrival(hold, proc)
        proc.send_signal(signal.SIGTERM)
        trial = stop_and_resume(orch, answers, run_id, proc, timeout=STOP_WAIT_S)
    finally:
        answers.release(run_id)  # only now: the call was still held when orch gave up on it
    record(figures, trial)
    figures.add("calls_abandoned", state not in trial.committed)

    seq = STATES.index(state) + 1
    done = list(STATES[:seq - 1])  # nothing committed for the abandoned step
    trial.assert_stopped(done)
    assert trial.calls_before == Counter(s for s in STATES[:seq] if s in LLM_STATES)
    assert trial.calls_after == Counter(LLM_STATES) + Counter([state])  # re-sent once
    assert flagged_seqs(trial.after) == [seq], f"{run_id}: the re-sent call is not in doubt"
    assert (difference := log_difference(trial.after, reference)) is None, difference


def pausing_machine(tmp_path: Path, kind: str) -> str:
    """The PAUSING_MACHINES machine whose Python step pauses `kind` ("sync" or "async")."""
    return f"{write(tmp_path / 'pausing.py', PAUSING_MACHINES)}:paused_{kind}"


def stop_during_a_python_step(orch: EnvOrch, answers: Answers, tmp_path: Path, machine: str, run_id: str,
                              figures: Figures) -> None:
    """SIGTERM while a Python step runs: it finishes and commits, the next step never starts,
    `orch` exits 143; resume runs only the rest."""
    folder = tmp_path / run_id
    folder.mkdir()
    data = write(tmp_path / f"{run_id}.json", json.dumps({"folder": str(folder)}))
    patient = orch.with_env(ORCH_STOP_GRACE=LONG_GRACE)
    proc = patient.start("-q", "run", machine, "--input", data, "--run-id", run_id, "--json")
    wait_for_file(folder / "pause.reached", proc)
    proc.send_signal(signal.SIGTERM)
    wait_until_delivered(proc, signal.SIGTERM)
    (folder / "pause.go").touch()
    trial = stop_and_resume(orch, answers, run_id, proc)
    record(figures, trial)
    figures.add("steps_started_after_sigterm", trial.calls_before["after"])

    trial.assert_stopped(["before", "pause"])
    assert trial.calls_before == Counter(["before"]), "a step was started after SIGTERM"
    assert trial.calls_after == Counter(["before", "after"])
    assert (folder / "pause.runs").read_text().split() == [run_id]  # not run again
    assert [r["from_state"] for r in trial.after] == list(PAUSING_STATES)
    assert flagged_seqs(trial.after) == []


# --------------------------------------------------------------------------- storage faults


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


def file_size_limit(limit: int) -> ChildHook:
    """`ulimit -f`: writes past `limit` bytes fail with EFBIG (SIGXFSZ ignored, not fatal)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def in_flight_ahead(db: Path, run_id: str) -> dict[str, Any] | None:
    """The in-flight mark of a step after the run's last row, if there is one: a call was made
    (its answer kept with the mark when `answered`)."""
    mark: dict[str, Any] | None = json.loads(run_row(db, run_id)["in_flight"] or "null")
    (last,) = query(db, "SELECT count(*) AS n FROM transitions WHERE run_id = ?", run_id)
    return mark if mark and mark["seq"] > last["n"] else None


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
    ahead = in_flight_ahead(db, run_id)  # a call made whose answer was not committed
    kept = ahead is not None and ahead["answered"]  # ... but kept: resume commits it, no call
    figures.add("answers_kept_past_a_failed_commit", kept)
    unanswered = ahead["state"] if ahead is not None and not kept else None  # resume sends it again
    recorded = tally(committed_states(db, run_id) + ([ahead["state"]] if ahead else []))
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


class LockAfterStep(Hook):
    """A hook that, once step `seq` is committed, has another connection take the write lock
    (as another process would) before the run's next step starts."""

    def __init__(self, db: Path, seq: int) -> None:
        self.seq = seq
        self.holder = sqlite3.connect(db, isolation_level=None)

    def after_commit(self, run: RunRecord, step: TransitionRecord) -> None:
        if step.seq == self.seq:
            self.holder.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        self.holder.execute("ROLLBACK")


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
#          does `orch audit verify` see it: the hash chain covers the log rows and the run's
#          identity, input included, not the machine's source file)
REFUSALS = {
    "truncated_output": (1, f"run {VICTIM} seq 2 output is not valid JSON", True, True),
    "pickle_text_input": (1, f"run {VICTIM} input is not valid JSON", True, True),
    "pickle_blob_output": (1, f"run {VICTIM} seq 1 output is not valid JSON", True, True),
    "broken_chain": (1, f"run {VICTIM}", False, True),
    "changed_machine": (2, f"changed since run {VICTIM} started", False, False),
}


def read_only_database_trial(
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


def write_lock_trial(orch: Orch, fake: FakeMessagesAPI, figures: Figures,
                     commands: Sequence[str] = ("resume", "run")) -> None:
    """Another connection holds the write lock past ORCH_BUSY_TIMEOUT: each of `commands`
    ("resume" a failed run, "run" a new one) stops with a "retry" error before any call, and
    succeeds once the lock is gone."""
    seed_runs(orch.db, {"failed": REPORT_STATES[1]})
    argv = {"resume": ("resume", "failed"), "run": ("run", REPORT, "--input", REPORT_INPUT, "--run-id", "new")}
    with write_lock(orch.db):
        refused = {name: orch_as(orch, *argv[name], env=LOCK_TIMEOUT) for name in commands}
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

    for name in commands:  # the retry the error asked for
        assert orch.json(*argv[name])["status"] == "completed"
    assert requested_states(fake.requests, "failed") == tally(REPORT_STATES[1:] if "resume" in commands else ())
    assert requested_states(fake.requests, "new") == tally(REPORT_STATES if "run" in commands else ())


def lock_between_steps_trial(
        db_path: Path, fake: FakeMessagesAPI, figures: Figures) -> None:
    """Another connection takes the write lock right after step 1 commits (in process, busy
    timeout 0.3 s): the run stops with a "retry" StoreError before step 2's call, and the same
    run completes once the lock is gone, nothing in doubt."""
    fake.default = lambda request: f"answer for {request.state}"
    tracer = LockAfterStep(db_path, seq=1)
    engine = Engine(SQLiteStore(db_path, busy_timeout_s=0.3), model=fake.model(), hooks=[tracer])

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


def corrupted_run_trial(
        orch: Orch, fake: FakeMessagesAPI, tmp_path: Path, kind: str, figures: Figures) -> None:
    """The victim run damaged as `kind` says (see `corrupt`, `REFUSALS`): its resume (and, for
    unreadable JSON, log and show) refused with one line, audit verify flags it iff the chain
    covers the damage, no call made, nothing written; the other runs in the file read and
    resume as before, and no planted pickle runs."""
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


def newer_schema_trial(
        orch: Orch, fake: FakeMessagesAPI, figures: Figures) -> None:
    """A database stamped with a newer schema version: every command (reads, replay, resume,
    run) exits 2 with one line saying to upgrade, makes no call and leaves the file as it was."""
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


# --------------------------------------------------------------------------- races on one database


def dead_owner() -> Owner:
    """The identity of a process on this host that has exited (as a killed `orch` leaves)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return Owner(os.urandom(8).hex(), socket.gethostname(), proc.pid, None, None)


OPERATIONS = st.lists(st.tuples(st.sampled_from(["a", "b"]),
                                st.sampled_from(["claim", "append", "mark", "release"])),
                      min_size=1, max_size=12)


_EXAMPLES = iter(range(10**9))


PROCESSES = 8


IN_PROCESS_RUNS = 100


def hold_first_answers(fake: FakeMessagesAPI, gate: threading.Event) -> None:
    """Every run's first answer waits for `gate`, so all runs commit together once it opens."""

    def reply(request: CapturedRequest) -> Reply:
        scripted = answer(request.state or "")
        if request.state == REPORT_STATES[0]:
            scripted.gate = gate
        return scripted

    fake.default = reply


async def drive_in_process(db: Path, fake: FakeMessagesAPI, gate: threading.Event,
                           run_ids: Sequence[str], total_first_calls: int) -> list[Any]:
    """`run_ids` as concurrent runs of one Engine; opens `gate` once every first call arrived."""
    engine = Engine(SQLiteStore(db), model=fake.model())

    async def open_gate_when_all_wait() -> None:
        arrived = await asyncio.to_thread(fake.wait_for, REPORT_STATES[0], total_first_calls,
                                          WAIT_S)
        gate.set()
        assert arrived, f"only {fake.calls(REPORT_STATES[0])} first calls arrived"

    try:
        runs = [engine.arun(report().machine, {"run": run_id}, run_id=run_id,
                            machine_ref=report().ref) for run_id in run_ids]
        opener = asyncio.create_task(open_gate_when_all_wait())
        results = await asyncio.gather(*runs, return_exceptions=True)
        await opener  # its assertion, if not every first call arrived
        return results
    finally:
        gate.set()
        await engine.aclose()


def open_when_all_are_ready(path: Path, ready: Any, errors: Any) -> None:
    """One process opening (creating) the database the moment all its peers are ready."""
    ready.wait()
    try:
        asyncio.run(SQLiteStore(path).close())
    except Exception as exc:  # reported to the parent, which counts them
        errors.put(f"{type(exc).__name__}: {exc}".replace(str(path), "DB"))


def stale_owner_trial(tmp_path: Path) -> None:
    """Two stores on one file: once the run is taken over, every write of its old (dead)
    owner is refused (append, the final append, the in-flight mark) or a no-op (release)."""
    db = tmp_path / "fence.db"
    old, new = dead_owner(), dead_owner()
    stale, current = SQLiteStore(db), SQLiteStore(db)  # two processes' connections
    try:
        asyncio.run(stale.create_run(new_run("r"), old))
        asyncio.run(stale.append(row(1, run_id="r"), old))
        asyncio.run(current.claim_run("r", new))  # `old` is dead: its run is taken over
        asyncio.run(current.append(row(2, run_id="r"), new))
        before = everything(db, "r")

        with pytest.raises(OwnershipLostError, match="taken over"):
            asyncio.run(stale.append(row(3, run_id="r"), old))
        with pytest.raises(OwnershipLostError, match="taken over"):
            asyncio.run(stale.append(row(3, run_id="r", to_state="__end__"), old, status=RunStatus.COMPLETED))
        with pytest.raises(OwnershipLostError):
            asyncio.run(stale.append(row(2, run_id="r", output="the stale answer"), old))
        with pytest.raises(OwnershipLostError, match="no call was made"):
            asyncio.run(stale.mark_in_flight("r", old, seq=3, state="b"))
        asyncio.run(stale.release("r", old, RunStatus.FAILED, "the stale process gave up"))
        assert everything(db, "r") == before

        with pytest.raises(OwnershipLostError, match="already has step 2"):
            asyncio.run(current.append(row(2, run_id="r", output="twice"), new))
        asyncio.run(current.append(row(3, run_id="r", to_state="__end__"), new, status=RunStatus.COMPLETED))
        assert [r[1] for r in everything(db, "r")[1]] == [1, 2, 3]
        assert asyncio.run(current.verify_chain("r")) is None
    finally:
        asyncio.run(stale.close())
        asyncio.run(current.close())


def interleaved_writers_example(tmp_path: Path,
                                                                 operations: list[tuple[str, str]]
                                                                 ) -> None:
    """Two processes' stores on one file, in any order: a write lands iff its owner holds the run."""
    db = tmp_path / "interleaved.db"
    run_id = f"r{next(_EXAMPLES)}"
    owners = {"a": dead_owner(), "b": dead_owner()}
    stores = {name: SQLiteStore(db) for name in owners}
    try:
        asyncio.run(stores["a"].create_run(new_run(run_id), owners["a"]))
        holder: str | None = "a"  # the model: who owns the run, how many rows it has
        rows, marked = 0, None
        for who, operation in operations:
            store, owner = stores[who], owners[who]
            if operation == "claim":  # every owner here is dead, so a claim always takes over
                asyncio.run(store.claim_run(run_id, owner))
                holder = who
                continue
            if operation == "release":
                asyncio.run(store.release(run_id, owner, RunStatus.INTERRUPTED, f"{who} stopped"))
                holder = None if holder == who else holder
                continue
            try:
                if operation == "append":
                    asyncio.run(store.append(row(rows + 1, run_id=run_id), owner))
                else:
                    asyncio.run(store.mark_in_flight(run_id, owner, seq=rows + 1, state="a"))
            except OwnershipLostError:
                assert holder != who, f"{who} owns {run_id} but its {operation} was refused"
            else:
                assert holder == who, f"{who} does not own {run_id} but its {operation} landed"
                if operation == "append":
                    rows += 1
                else:
                    marked = rows + 1
        record, log = asyncio.run(stores["a"].load_run(run_id))
        assert [r.seq for r in log] == list(range(1, rows + 1))
        assert (record.in_flight or {}).get("seq") == marked
        assert (record.status is RunStatus.RUNNING) == (holder is not None)
        assert asyncio.run(stores["b"].verify_chain(run_id)) is None
    finally:
        for store in stores.values():
            asyncio.run(store.close())


def many_writers_trial(orch: Orch, fake: FakeMessagesAPI, figures: Figures, rounds: int = 1,
                       processes: int = PROCESSES, in_process_runs: int = IN_PROCESS_RUNS) -> None:
    """Per round, `processes` `orch run` processes plus `in_process_runs` runs of one Engine on
    one file, their first answers held so that all commit together: nothing lost, no "database
    is locked", every chain intact."""
    locked, lost, problems = 0, 0, []
    for round_ in range(rounds):
        gate = threading.Event()
        hold_first_answers(fake, gate)
        waiting = fake.calls(REPORT_STATES[0])
        procs = {f"proc-{round_}-{n}": orch.start("run", REPORT, "--input", REPORT_INPUT,
                                                   "--run-id", f"proc-{round_}-{n}")
                 for n in range(processes)}  # round 0: they also race to create the database
        in_process = [f"inproc-{round_}-{n:03d}" for n in range(in_process_runs)]
        try:
            if fake.wait_for(REPORT_STATES[0], waiting + processes, timeout=WAIT_S):
                results = asyncio.run(drive_in_process(orch.db, fake, gate, in_process,
                                                       waiting + processes + in_process_runs))
            else:  # a process failed before its first call: its output says why
                results = [RuntimeError("not started: a process failed")] * len(in_process)
        finally:
            gate.set()
        finished = {run_id: Orch.finish(proc, timeout=WAIT_S) for run_id, proc in procs.items()}

        for run_id, result in finished.items():
            locked += "database is locked" in result.stderr
            if result.code != 0 or f"run {run_id} completed" not in result.stdout:
                problems.append(f"{run_id}: exit {result.code}: {result.stderr[-500:]}")
        for run_id, outcome in zip(in_process, results, strict=True):
            if isinstance(outcome, BaseException):
                locked += "database is locked" in str(outcome)
                problems.append(f"{run_id}: {type(outcome).__name__}: {outcome}")
            elif outcome.status is not RunStatus.COMPLETED:
                problems.append(f"{run_id}: {outcome.status.value}: {outcome.error}")
        for run_id in [*finished, *in_process]:  # a lost transition: answered, never stored
            stored, called = committed_states(orch.db, run_id), requested_states(fake.requests, run_id)
            lost += (called - tally(stored)).total()
            if called != tally(stored):
                problems.append(f"{run_id}: calls {dict(called)}, stored {stored}")

    runs = processes + in_process_runs
    (count,) = query(orch.db, "SELECT count(*) AS n FROM transitions")
    figures["rounds"] = rounds
    figures["processes_per_round"] = processes
    figures["in_process_runs_per_round"] = in_process_runs
    figures["runs"] = rounds * runs
    figures["transitions_committed"] = count["n"]
    figures["database_locked_errors"] = locked
    figures["lost_transitions"] = lost
    figures["failed_runs"] = len(problems)

    assert (problems, locked, lost) == ([], 0, 0)
    statuses = Counter(r["status"] for r in query(orch.db, "SELECT status FROM runs"))
    assert statuses == {"completed": rounds * runs}
    assert count["n"] == rounds * runs * len(REPORT_STATES)
    audit = orch("audit", "verify")
    assert audit.code == 0 and audit.stdout.splitlines()[-1] == (
        f"{rounds * runs} run(s) checked, 0 with a broken log"), audit.stdout[-2000:]
    assert integrity(orch.db) == "ok"


def new_database_trial(tmp_path: Path, figures: Figures, trials: int) -> None:
    """What every first `orch run` does on a new file, by 8 processes released together,
    `trials` times."""
    context = multiprocessing.get_context("fork")
    failures = Counter[str]()
    for n in range(trials):
        path, ready, errors = tmp_path / f"new-{n}.db", context.Barrier(PROCESSES), context.Queue()
        openers = [context.Process(target=open_when_all_are_ready, args=(path, ready, errors))
                   for _ in range(PROCESSES)]
        for opener in openers:
            opener.start()
        for opener in openers:
            opener.join(WAIT_S)
            assert opener.exitcode == 0
        while not errors.empty():
            failures[errors.get()] += 1
        assert integrity(path) == "ok"
    figures["trials"] = trials
    figures["processes_per_trial"] = PROCESSES
    figures["opens_failed"] = failures.total()
    assert failures == {}, f"{failures.total()} of {trials * PROCESSES} opens failed"


# --------------------------------------------------------------------------- security


PACKAGE = Path(statemachine_orch.__file__).parent


DESERIALIZERS = frozenset({"pickle", "_pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle",
                           "jsonpickle", "joblib", "yaml"})


CODE_LOADERS = frozenset({"importlib", "runpy"})


UNSAFE_BUILTINS = frozenset({"eval", "exec", "compile", "__import__", "execfile"})


CODE_RUNNING_METHODS = frozenset({"exec_module", "import_module", "run_path", "run_module", "unsafe_load",
                                  "full_load"})


# (module, what) -> why it is acceptable
ALLOWED_CODE_LOADING = {
    ("definition/_loader.py", "import importlib"): "loading the machine module the user names is the point "
                                                   "of `orch run`",
    ("definition/_loader.py", "import importlib.util"): "as above: spec_from_file_location for path/to/machine.py",
    ("definition/_loader.py", "call exec_module"): "runs that machine module (a .py file the user passed, or "
                                                   "stored with the run by `orch run`), never a value read from "
                                                   "a row's JSON",
    ("definition/_loader.py", "call import_module"): "imports a dotted machine module, as above",
    ("__init__.py", "from importlib import"): "lazy public names: imports the package's own submodules",
    ("cli/_main.py", "import importlib"): "lazy commands: imports the CLI's own submodules (`_drive`, `_batch`, "
                                          "`_review`...) named in the parser table, never a user value",
    ("cli/_main.py", "call import_module"): "as above: a relative import of one of the CLI's own modules",
    ("cli/_main.py", "import importlib.resources"): "`orch demo` finds the example files that ship with the "
                                                    "package; reads paths, loads no code",
}


def _root(func: ast.Attribute) -> str:
    """`pickle` for pickle.loads(...), `yaml` for yaml.load(...)."""
    return ast.unparse(func.value)


def code_loading_sites(source: str) -> list[str]:
    """Imports of deserializers and code loaders, and calls that run or unpickle code, in one module."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names
                      if a.name.split(".")[0] in DESERIALIZERS | CODE_LOADERS]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in DESERIALIZERS | CODE_LOADERS:
            found.append(f"from {node.module} import")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in UNSAFE_BUILTINS:
                found.append(f"call {func.id}")
            elif isinstance(func, ast.Attribute) and func.attr in CODE_RUNNING_METHODS:
                found.append(f"call {func.attr}")
            elif isinstance(func, ast.Attribute) and _root(func).split(".")[0] in DESERIALIZERS:
                found.append(f"call {_root(func)}.{func.attr}")
    return found


# test_storage_faults.py plants one in runs.input and one in transitions.output and checks
# that the other runs are unaffected; planted_pickle_trial puts one into every JSON column a
# run is read from.
FILING_MACHINE = """
from statemachine_orch import Machine, PythonState


def file(ctx):
    raise RuntimeError("the filing office is closed")  # so the run stops, resumable, at seq 2


machine = Machine("filing", states=[
    PythonState("fetch", run=lambda ctx: {"amount": ctx.input["amount"]}),
    PythonState("file", run=file, needs=["fetch"]),
])
"""


class Trap:
    """Unpickling this opens (creates) `marker`: proof that a payload ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (self.marker, "w")


@dataclass(frozen=True)
class Cell:
    """Where a payload is planted: a run's row, its last log row (seq 2), or a failed attempt of it."""

    table: str
    column: str
    protocol: int  # 0: ASCII pickle stored as TEXT; 5: binary pickle stored as a BLOB

    @property
    def run_id(self) -> str:
        return f"planted-{self.table}-{self.column}-p{self.protocol}"

    @property
    def named(self) -> tuple[str, ...]:
        """What the refusal must name besides the run: the row (seq) and the column."""
        column = {"in_flight": "in-flight mark"}.get(self.column, self.column)
        return (column,) if self.table == "runs" else ("seq 2", column)


CELLS = [Cell(table, column, protocol) for table, column in (
    ("runs", "input"), ("runs", "options"), ("runs", "in_flight"),
    ("transitions", "output"), ("transitions", "request"), ("transitions", "response"),
    ("attempts", "request"), ("attempts", "response")) for protocol in (0, 5)]


def plant(db: Path, source_run: str, cell: Cell, payload: bytes) -> None:
    """Copy `source_run` as `cell.run_id` and put the payload in the cell (as an attacker with
    write access to the file would)."""
    value: str | bytes = payload.decode("ascii") if cell.protocol == 0 else payload
    with closing(sqlite3.connect(db)) as conn, conn:
        for table in ("runs", "transitions"):
            columns = [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]
            rest = ", ".join(c for c in columns if c != "run_id")
            conn.execute(f"INSERT INTO {table} (run_id, {rest}) SELECT ?, {rest} FROM {table} "
                         "WHERE run_id = ?", (cell.run_id, source_run))
        if cell.table == "attempts":
            conn.execute("INSERT INTO attempts (run_id, seq, attempt, state, started_at, kind, error, "
                         f"{cell.column}) VALUES (?, 2, 1, 'file', '2026-01-01T00:00:00Z', 'transient', "
                         "'overloaded', ?)", (cell.run_id, value))
        else:
            where = "run_id = ?" + (" AND seq = 2" if cell.table == "transitions" else "")
            conn.execute(f"UPDATE {cell.table} SET {cell.column} = ? WHERE {where}", (value, cell.run_id))


def cell_value(db: Path, cell: Cell) -> Any:
    where = "run_id = ?" + (" AND seq = 2" if cell.table != "runs" else "")
    return query(db, f"SELECT {cell.column} FROM {cell.table} WHERE {where}", cell.run_id)[0][0]


TINY_MACHINE = """
from statemachine_orch import Machine, PythonState

machine = Machine("tiny", states=[PythonState("only", run=lambda ctx: "done")])
"""


# If spliced into SQL text, the second one would select the stored run "kept".
HOSTILE_IDS = ("x' OR 1=1--", "kept'--", "%")


ID_COMMANDS = (("show",), ("log",), ("resume",), ("replay",), ("audit", "verify"))


BAD_NEW_IDS = ("x' OR 1=1--", "a" * 65, "run\nforged")


def stored_rows(db: Path, run_id: str) -> list[TransitionRecord]:
    """A run's log as the store reads it back."""
    async def read() -> list[TransitionRecord]:
        store = SQLiteStore(db, create=False)
        try:
            return await store.transitions(run_id)
        finally:
            await store.close()

    return asyncio.run(read())


def database_fingerprint(db: Path) -> list[tuple[Any, ...]]:
    return [tuple(row) for table in ("runs", "transitions", "attempts")
            for row in query(db, f"SELECT * FROM {table} ORDER BY 1, 2")]


# Parts of SQL text that are not literal, and why each is safe.
ALLOWED_SQL_PARTS = {
    "RENEW": "PostgreSQL: the lease's constant UPDATE with %s placeholders",
    "MIGRATIONS[step]": "PostgreSQL: the schema module's own migration scripts",
    "_TABLES": "PostgreSQL: the schema module's own schema script",
    "quoted(schema)": "PostgreSQL: the schema's name, checked to be a plain identifier, double-quoted",
    "INSERT_RUN": "PostgreSQL: constant INSERT with %s placeholders",
    "HOLDER_FOR_UPDATE": "PostgreSQL: constant SELECT with a %s placeholder",
    "DOUBTS_BY_MACHINE": "PostgreSQL: constant SELECT with = ANY(%s)",
    "MACHINE_TOTALS": "PostgreSQL: constant SELECT with = ANY(%s)",
    "MARK": "PostgreSQL: constant UPDATE with %s placeholders",
    "NEXT_IN_QUEUE": "PostgreSQL: constant SELECT ... FOR UPDATE SKIP LOCKED with %s placeholders",
    "NOTIFY_CHANNEL": "PostgreSQL: the constant LISTEN channel name",
    "STALE": "PostgreSQL: a constant column expression",
    "TAKE": "PostgreSQL: constant UPDATE with %s placeholders",
    "WORKERS": "PostgreSQL: constant SELECT without parameters",
    "APPEND": "constant INSERT with ? placeholders",
    "APPEND_ATTEMPT": "constant INSERT with ? placeholders",
    "SET_STATUS": "constant UPDATE with ? placeholders",
    "STEP": "constant UPDATE with numbered ? placeholders",
    "ADVANCE": "constant UPDATE with :named placeholders",
    "sql": "list_runs: constant fragments joined with ? placeholders; the values go in params",
    "part": "machine_totals: a constant SELECT with one '?' per machine name, used twice",
    "IN_DOUBT_BY_MACHINE": "machine_totals: a constant SELECT ending in IN, followed by `marks`",
    "marks": "machine_totals: one '?' per machine name",
    "statement": "run_script: the schema module's own schema, migration and view scripts",
    "table": "PRAGMA table_info of the tables a new database has (names from the schema script)",
    "CHAINED_COLUMNS": "a constant list of column names",
    "CHAINED_ATTEMPT_COLUMNS": "a constant list of column names",
    "SCHEMA_VERSION": "an int constant",
    "APPLICATION_ID": "an int constant",
    "copy_sql": "orch db copy (store/_copy.py): what its Side.query/executemany are given: a literal, or one of "
                "select_sql and insert_sql",
    "select_sql": "orch db copy: a SELECT of the copied columns (names read from both databases' catalogs, "
                  "double-quoted) from one of the four constant run tables (TABLES), the run id a placeholder",
    "insert_sql": "orch db copy: an INSERT into one of the four constant run tables (TABLES) of the copied columns "
                  "(double-quoted), every value a placeholder",
    "synchronous": "the store's setting, checked to be 'FULL' or 'NORMAL' before any connection is made, or "
                   "'OFF' for the in-flight marks' connection",
}


def sql_parts(source: str) -> list[str]:
    """The non-literal parts of the SQL text given to execute/executemany/executescript/query
    (and the store's own `_sql`, `_sql_many` and `_query`, whose first argument is the connection)."""
    parts = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        position = {"execute": 0, "executemany": 0, "executescript": 0, "query": 0, "_sql": 1, "_sql_many": 1,
                    "_query": 1}.get(node.func.attr)
        if position is None or len(node.args) <= position:
            continue
        sql = node.args[position]
        if isinstance(sql, ast.JoinedStr):
            parts += [ast.unparse(v.value) for v in sql.values if isinstance(v, ast.FormattedValue)]
        elif not (isinstance(sql, ast.Constant) and isinstance(sql.value, str)):
            parts.append(ast.unparse(sql))
    return parts


TOKEN_CANARY = "orch-test-bearer-CANARY-" + "t" * 24  # an auth token not shaped like sk-ant-...


SECRETS = (CANARY_KEY, TOKEN_CANARY)


FRAGMENTS = (*SECRETS, "CANARY", CANARY_KEY[-16:], TOKEN_CANARY[-16:])


QUOTE = "<credentials>"


class QuotingAPI(FakeMessagesAPI):
    """The fake Messages API, but error messages quote the credentials it received, as some
    proxies and gateways do: `<credentials>` in a scripted message becomes those headers."""

    def __init__(self) -> None:
        super().__init__(default=None)
        self.received: set[str] = set()

    def handle(self, method: str, path: str, headers: Mapping[str, str],
               body: bytes) -> tuple[int, dict[str, str], bytes, Reply | None]:
        lower = {k.lower(): v for k, v in headers.items()}
        credentials = " ".join(lower[h] for h in ("x-api-key", "authorization") if h in lower)
        self.received.update(s for s in SECRETS if s in credentials)
        status, out, data, reply = super().handle(method, path, headers, body)
        return status, out, data.replace(QUOTE.encode(), json.dumps(credentials)[1:-1].encode()), reply


def leaks(seen: Mapping[str, bytes]) -> list[tuple[str, str]]:
    return [(where, fragment) for where, data in seen.items() for fragment in FRAGMENTS
            if fragment.encode() in data]


def database_files(db: Path, label: str) -> dict[str, bytes]:
    return {f"{label} {p.name}": p.read_bytes() for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")) if p.exists()}


FORGER_MACHINE = """
from pydantic import BaseModel, field_validator
from statemachine_orch import FlowDecision, LLMState, Machine, PythonState, guard


class Ticket(BaseModel):
    text: str
    tag: str = "billing"

    @field_validator("tag")
    @classmethod
    def known_tag(cls, value):
        if value not in ("billing", "shipping"):
            raise ValueError(f"unknown tag {value}")
        return value


@guard(FlowDecision.CONTINUE)
def quote_answer(output, ctx):
    return FlowDecision.CONTINUE.because(f"model said: {output}")


def file_ticket(ctx):
    raise ValueError(f"cannot file {ctx.input.text} / {ctx.outputs['answer']}")


machine = Machine("forger", input_model=Ticket, states=[
    LLMState("answer", prompt="Answer: {text}", max_tokens=64, guard=quote_answer),
    PythonState("file", run=file_ticket, needs=["answer"]),
])
"""


# A fake event line, a fake JSON event, cursor movement, a terminal title, NUL, BEL, CR and
# the Unicode line separators, each of which some reader treats as the end of a line.
FORGED = ('\n2026-01-01T00:00:00.000000Z [info     ] run_finished  status=completed run_id=forged\r'
          '\x1b[2K\x1b[1A\x1b]0;owned\x07\x00{"event": "run_finished", "status": "completed"}'
          '\u2028\u2029\x85\x0b\x0c\x1c end')


# The answer forges a table row within the 80 characters `orch log` shows, and splits a JSON
# row for readers that end lines at Unicode line separators (str.splitlines, many editors).
ANSWER = "fine\x1b[1G\x1b[2K2    file  __end__ continue\r\u2028" + FORGED


UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x85\u2028\u2029]")  # all but \t and \n


CONSOLE_EVENT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z \[(?:debug|info|warning|error)\s*\] (\w+) ")


EVENTS = ["run_started", "transition", "transition", "run_finished"]


def console_events(stderr: str) -> list[str]:
    """Event names, one per line; a line that is not an event fails the match."""
    events = []
    for line in stderr.split("\n")[:-1]:
        found = CONSOLE_EVENT.match(line)
        assert found, repr(line)
        events.append(found.group(1))
    return events


def json_events(stderr: str) -> list[str]:
    return [json.loads(line)["event"] for line in stderr.split("\n")[:-1]]


def rows_seen_by_splitlines(text: str) -> list[dict[str, Any]]:
    """The JSON objects a reader finds that splits lines with str.splitlines()."""
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return [row for row in rows if isinstance(row, dict)]


def code_loading_check(figures: Figures) -> None:
    """No module of the package imports a deserializer or code loader, or calls code-running
    functions, outside ALLOWED_CODE_LOADING (and every allowed site is still there)."""
    found = {(path.relative_to(PACKAGE).as_posix(), site) for path in sorted(PACKAGE.rglob("*.py"))
             for site in code_loading_sites(path.read_text(encoding="utf-8"))}
    figures["modules_scanned"] = len(list(PACKAGE.rglob("*.py")))
    figures["code_loading_sites_found"] = len(found)
    figures["code_loading_sites_not_allowed"] = sorted(map(str, found - set(ALLOWED_CODE_LOADING)))
    assert found - set(ALLOWED_CODE_LOADING) == set()
    assert set(ALLOWED_CODE_LOADING) <= found  # the allowlist is not stale, and the scan sees them


def code_loading_scan_self_check() -> None:
    """The scan of `code_loading_check` sees each kind of site it looks for."""
    source = ("import pickle\nfrom yaml import load\nimport marshal as m\nx = eval('1')\n"
              "y = pickle.loads(b'')\nz = json.loads('1')\nexec('pass')\n")
    assert code_loading_sites(source) == [
        "import pickle", "from yaml import", "import marshal", "call eval", "call pickle.loads", "call exec"]


def planted_pickle_trial(tmp_path: Path, figures: Figures, cells: Sequence[Cell] = CELLS) -> None:
    """A pickle payload planted in each of `cells` of a copy of a failed run: `orch resume` (and
    `orch replay`, for the transitions.response cell) refuse it naming the row and column, and
    never unpickle it."""
    machine = write(tmp_path / "filing.py", FILING_MACHINE)
    marker = tmp_path / "payload-ran"
    payloads = {protocol: pickle.dumps(Trap(marker), protocol=protocol) for protocol in (0, 5)}
    for payload in payloads.values():  # the payloads are armed: unpickling them does run code
        pickle.loads(payload)
        assert marker.exists()
        marker.unlink()
    db = tmp_path / "orch.db"
    cli = Orch(db)
    failed = cli("run", machine, "--input", write(tmp_path / "in.json", '{"amount": 12}'), "--run-id", "kept")
    assert failed.code == 1, failed.stderr
    for cell in cells:
        plant(db, "kept", cell, payloads[cell.protocol])
    planted = {cell: cell_value(db, cell) for cell in cells}

    jobs = {(cell, "resume"): ["resume", cell.run_id] for cell in cells}  # resume reads the snapshot
    replayed = Cell("transitions", "response", 5)  # replay serves recorded responses
    if replayed in cells:
        jobs[(replayed, "replay")] = ["replay", replayed.run_id]
    results = in_parallel({key: (lambda args=args: cli(*args)) for key, args in jobs.items()})
    untouched = cli("show", "kept", "--json")

    refused = {key for key, r in results.items() if r.code == CorruptRunError.exit_code and r.stdout == ""
               and len(r.stderr.splitlines()) == 1 and key[0].run_id in r.stderr
               and all(part in r.stderr for part in key[0].named)}
    figures["pickle_payloads_planted"] = len(cells)
    figures["commands_on_planted_runs"] = len(jobs)
    figures["refused_naming_run_row_and_column"] = len(refused)
    figures["payloads_executed"] = int(marker.exists())
    assert not marker.exists()
    assert CorruptRunError.exit_code != 0
    for (cell, command), result in results.items():
        line = one_error_line(result)
        assert result.code == CorruptRunError.exit_code, (cell, command, result.stderr)
        assert "is not valid JSON" in line and cell.run_id in line, line
        assert all(part in line for part in cell.named), (cell, line)
    assert {cell: cell_value(db, cell) for cell in cells} == planted  # nothing overwrote them
    assert {stored_status(db, cell.run_id) for cell in cells} == {"failed"}  # none was claimed
    assert untouched.code == 0 and json.loads(untouched.stdout)["input"] == {"amount": 12}


def hostile_run_ids_trial(tmp_path: Path, figures: Figures, commands: Sequence[tuple[str, ...]] = ID_COMMANDS,
                          hostile: Sequence[str] = HOSTILE_IDS, bad_new: Sequence[str] = BAD_NEW_IDS) -> None:
    """Each of `commands` given each `hostile` run id, and `orch run --run-id` each `bad_new`
    one: refused with one line naming the id as a value (exit 2), the database unchanged."""
    machine = write(tmp_path / "tiny.py", TINY_MACHINE)
    cli = Orch(tmp_path / "orch.db")
    cli.ok("run", machine, "--run-id", "kept")
    before = database_fingerprint(cli.db)
    jobs: dict[tuple[str, ...], list[str | Path]] = {
        (*command, run_id): [*command, run_id] for command in commands
        for run_id in hostile if command[0] in ("show", "audit") or run_id != "%"}
    jobs.update({("run", run_id): ["run", machine, "--run-id", run_id] for run_id in bad_new})
    jobs[("runs", "--machine")] = ["runs", "--machine", hostile[0], "--json"]
    jobs[("run", "longest")] = ["run", machine, "--run-id", "A" * 64]
    results = in_parallel({key: (lambda args=args: cli(*args)) for key, args in jobs.items()})
    figures["hostile_ids_tried"] = len(set(hostile) | set(bad_new))
    figures["commands_run_with_them"] = len(jobs) - 1  # all but the longest valid id

    assert results.pop(("run", "longest")).code == 0  # the longest valid id is accepted
    assert json.loads(results.pop(("runs", "--machine")).stdout) == []
    for key, result in results.items():
        assert result.code == 2, (key, result.stderr)
        line = one_error_line(result)
        expected = "is not valid" if key[0] == "run" else "no run"
        assert expected in line and repr(key[-1]) in line, (key, line)
    after = database_fingerprint(cli.db)
    assert [row for row in after if "A" * 64 not in row] == before
    assert run_count(cli.db) == 2


def sql_text_check() -> None:
    """Only the store backends talk SQL (the modules that import sqlite3, sqlite_utils or
    psycopg, and the PostgreSQL SQL modules), and the non-literal parts of their SQL text are
    the constants in ALLOWED_SQL_PARTS (and the scan sees an f-string value)."""
    stores = [path for path in sorted(PACKAGE.rglob("*.py"))
              if re.search(r"^\s*import (sqlite3|sqlite_utils|psycopg)", path.read_text(encoding="utf-8"), re.M)
              or (path.parent.name == "postgres" and path.name != "__init__.py")]
    assert [p.relative_to(PACKAGE).as_posix() for p in stores] == [
        "store/_copy.py", "store/_open.py", "store/postgres/_lease.py", "store/postgres/_pool.py",
        "store/postgres/_schema.py",
        "store/postgres/_statements.py", "store/postgres/_store.py",
        "store/sqlite/_chain.py", "store/sqlite/_group.py", "store/sqlite/_schema.py",
        "store/sqlite/_store.py", "store/sqlite/_transaction.py"]
    found = {part for path in stores for part in sql_parts(path.read_text(encoding="utf-8"))}
    assert found - set(ALLOWED_SQL_PARTS) == set()
    assert set(ALLOWED_SQL_PARTS) <= found  # not stale
    assert sql_parts("c.execute(f'SELECT * FROM runs WHERE run_id = {run_id}')") == ["run_id"]


def forged_lines_trial(tmp_path: Path, figures: Figures) -> None:
    """Control characters and line separators in an input and an answer (see FORGED, ANSWER):
    stored as given, but no trace line (console or JSON), `orch log` row or JSON row is forged
    and no raw control character is printed."""
    machine = write(tmp_path / "forger.py", FORGER_MACHINE)
    ticket = write(tmp_path / "ticket.json", json.dumps({"text": "help" + FORGED}))
    fake = FakeMessagesAPI(default=None)
    fake.on("answer", ANSWER)
    with orch_against(fake, tmp_path / "orch.db") as cli:
        console = cli("run", machine, "--input", ticket, "--run-id", "console")
        as_json = cli("--log-json", "run", machine, "--input", ticket, "--run-id", "json")
        table = cli.ok("log", "console")
        rows = cli.ok("log", "console", "--json")
    outputs = {"console trace": console.stderr, "json trace": as_json.stderr, "log table": table.stdout,
               "log json": rows.stdout}
    figures["outputs_checked"] = len(outputs)
    figures["outputs_with_raw_control_characters"] = sorted(k for k, v in outputs.items() if UNSAFE.search(v))
    figures["log_json_rows_seen_by_splitlines"] = len(rows_seen_by_splitlines(rows.stdout))

    assert (console.code, as_json.code) == (1, 1), console.stderr + as_json.stderr
    assert fake.calls("answer") == 2 and FORGED in requests_for(fake, "answer")[0].prompt
    first, failure = stored_log(cli.db, "console")
    # stored as the guard gave it, but for NUL, which no backend's TEXT keeps: as its escape \x00
    assert first["reason"] == f"model said: {ANSWER}".replace("\x00", "\\x00")
    assert failure["error"].startswith("StepError: ValueError: cannot file help")
    assert console_events(console.stderr) == EVENTS
    assert json_events(as_json.stderr) == EVENTS
    assert [json.loads(line)["seq"] for line in rows.stdout.split("\n")[:-1]] == [1, 2]
    assert [row["seq"] for row in rows_seen_by_splitlines(rows.stdout)] == [1, 2]
    table_lines = table.stdout.split("\n")[:-1]
    assert len(table_lines) == 4 and table_lines[-1].startswith("total:")  # header, 2 rows, total
    assert [line.split()[0] for line in table_lines[1:3]] == ["1", "2"]
    assert {k: UNSAFE.findall(v) for k, v in outputs.items() if UNSAFE.search(v)} == {}


def forged_error_line_trial(tmp_path: Path) -> None:
    """An input refused for a value holding control characters: one error line, none printed."""
    machine = write(tmp_path / "forger.py", FORGER_MACHINE)
    bad_tag = write(tmp_path / "bad_tag.json", json.dumps({"text": "help", "tag": "other" + FORGED}))
    refused = Orch(tmp_path / "orch.db")("run", machine, "--input", bad_tag)
    assert refused.code == 2
    assert "unknown tag other" in one_error_line(refused)
    assert UNSAFE.findall(refused.stderr) == []
    assert run_count(tmp_path / "orch.db") == 0


# --------------------------------------------------------------------------- bad definitions and inputs

CORPUS = Path(__file__).parent / "reliability" / "corpus"


TARGET = CORPUS / "target.py"


# What the single `orch: error: ...` line must say for each case (a test checks that every
# corpus file is listed here, so a new case cannot be added without its expectation).
EXPECTED: dict[str, str] = {
    # the module itself
    "machines/syntax_error.py": "syntax error",
    "machines/imports_a_missing_module.py": "ModuleNotFoundError",
    "machines/raises_while_importing.py": "RuntimeError: settings.toml is missing",
    "machines/defines_no_machine.py": "defines no Machine",
    "machines/defines_two_machines.py": "defines several machines",
    # machine and state names
    "machines/no_states.py": "has no states",
    "machines/machine_name_not_an_identifier.py": "is not an identifier",
    "machines/state_is_a_plain_string.py": "is not an LLMState or PythonState",
    "machines/duplicate_state_names.py": "state 'fetch': is declared twice",
    "machines/state_named_like_the_end.py": "name is reserved",
    # the transition table and the graph
    "machines/dangling_transition.py": "unknown target 'nowhere'",
    "machines/transition_key_not_a_decision.py": "on= key 'retry' is not a decision",
    "machines/transitions_without_a_guard.py": "no guard to choose them",
    "machines/unreachable_state.py": "state 'archive': is unreachable",
    "machines/unbounded_cycle.py": "form a loop with no bound",
    "machines/retry_without_a_retry_limit.py": "retry_limit",
    "machines/max_visits_zero.py": "max_visits must be a positive integer",
    "machines/needs_an_unknown_state.py": "needs unknown state 'validate'",
    "machines/needs_a_later_state.py": "can run before 'store'",
    # guards whose answers could not be handled
    "machines/guard_decision_without_a_transition.py": "may return branch_b but no transition handles it",
    "machines/guard_declares_a_string.py": "which is not a decision",
    "machines/guard_with_the_wrong_signature.py": "guard does not take (output, context)",
    "machines/guard_not_callable.py": "guard is not callable",
    # states
    "machines/run_not_callable.py": "run= is not callable",
    "machines/output_not_a_pydantic_model.py": "output is not a pydantic model class",
    "machines/input_model_not_a_pydantic_model.py": "input_model is not a pydantic model class",
    "machines/prompt_not_a_string.py": "prompt is not a string",
    "machines/params_override_the_model.py": "which the state itself controls",
    "machines/on_budget_without_a_transition.py": "has no transition",
    "machines/fallback_with_the_wrong_signature.py": "fallback function does not take (ctx)",
    # prompt templates
    "machines/template_attribute_traversal.py": "'{text.__class__.__init__.__globals__}'; only plain",
    "machines/template_indexing.py": "only plain {name} placeholders",
    "machines/template_conversion.py": "conversion or format spec",
    "machines/template_format_spec.py": "conversion or format spec",
    "machines/template_unclosed_brace.py": "template is malformed",
    # not JSON at all
    "inputs/not_json_truncated.json": "not valid JSON",
    "inputs/not_json_single_quotes.json": "not valid JSON",
    "inputs/not_json_trailing_comma.json": "not valid JSON",
    "inputs/not_json_two_documents.json": "not valid JSON",
    "inputs/empty_file.json": "not valid JSON",
    "inputs/raw_control_character_in_string.json": "not valid JSON",
    # JSON's grammar, but not values JSON can store (refusing them is what matters; the
    # wording is the fix's to choose, so only "input" is required of the line)
    "inputs/nan_is_not_json.json": "input",
    "inputs/infinity_is_not_json.json": "input",
    "inputs/number_overflowing_to_infinity.json": "input",
    "inputs/integer_with_5000_digits.json": "input",
    "inputs/escaped_lone_surrogate.json": "input",
    # not an object, or not the machine's input model
    "inputs/top_level_array.json": "must be a JSON object",
    "inputs/top_level_string.json": "must be a JSON object",
    "inputs/top_level_null.json": "must be a JSON object",
    "inputs/wrong_type_text_is_a_number.json": "text: Input should be a valid string",
    "inputs/wrong_type_count_is_a_word.json": "count: Input should be a valid integer",
    "inputs/wrong_type_tags_is_a_string.json": "tags: Input should be a valid list",
    "inputs/missing_required_field.json": "text: Field required",
    # not UTF-8
    "inputs/not_utf8_utf16_with_bom.json": "not UTF-8",
    "inputs/not_utf8_overlong_slash.json": "not UTF-8",
    "inputs/not_utf8_encoded_surrogate.json": "not UTF-8",
    # too much
    "inputs/deeply_nested_100000_levels.gen.json": "nested too deeply",
    "inputs/oversized_100_mb.gen.json": "larger than 64 MB",
    "inputs/beyond_the_model_context.gen.json": "more than fits in the model's context",
}


@dataclass(frozen=True)
class Case:
    """One corpus file."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.relative_to(CORPUS).as_posix()

    @property
    def kind(self) -> str:
        return "machine" if self.path.parent.name == "machines" else "input"

    @property
    def run_id(self) -> str:
        """A run id of its own, so a request that got through names the case that let it."""
        return "case-" + re.sub(r"[^A-Za-z0-9._-]", "-", self.path.name)[:58]

    def args(self, workdir: Path) -> list[str | Path]:
        """`orch run` for this case: the machine as it is, or the target fed this input."""
        if self.kind == "machine":
            return ["run", self.path, "--run-id", self.run_id]
        return ["run", TARGET, "--input", self.input_file(workdir), "--run-id", self.run_id]

    def input_file(self, workdir: Path) -> Path:
        if not self.path.name.endswith(".gen.json"):
            return self.path
        return generate(self.path, workdir / self.path.name.replace(".gen.json", ".json"))


def generate(recipe: Path, target: Path) -> Path:
    """Write the input a `*.gen.json` recipe describes, a megabyte at a time."""
    with target.open("w", encoding="utf-8") as out:
        for text, times in json.loads(recipe.read_text(encoding="utf-8"))["parts"]:
            per_write = max(1, 2**20 // len(text))
            for done in range(0, times, per_write):
                out.write(text * min(per_write, times - done))
    return target


CASES = [Case(p) for p in sorted((CORPUS / "machines").glob("*.py")) + sorted((CORPUS / "inputs").iterdir())]


VALID_INPUT = {"text": "a tent for four", "count": 2, "tags": ["camping"], "scores": [0.5]}


@dataclass
class Outcome:
    result: CLIResult
    db: Path
    requests: int  # requests the fake Messages API received for this run id

    @property
    def runs_stored(self) -> int:
        return run_count(self.db)

    @property
    def rows_stored(self) -> int:
        return len(query(self.db, "SELECT seq FROM transitions"))


@dataclass
class Corpus:
    outcomes: dict[str, Outcome]
    control: Outcome  # a valid input to the same target: shows calls do get through
    requests: int  # every request the fake received, for any run


NESTING_MACHINE = """
from statemachine_orch import Machine, PythonState

machine = Machine("echo", states=[PythonState("echo", run=lambda ctx: ctx.input)])
"""


DEPTHS = range(950, 1010, 5)  # around Python's default recursion limit of 1000


def run_corpus(cases: Sequence[Case], workdir: Path) -> Corpus:
    """Each case (and a control: a valid input to the target) run once by `orch run`, a few
    processes at a time, each with a database of its own, against one served fake."""
    fake = FakeMessagesAPI(default=None)
    fake.on("summarise", "A four-person tent, two of them.")
    valid = write(workdir / "valid_order.json", json.dumps(VALID_INPUT))
    jobs: dict[str, tuple[Path, str, list[str | Path]]] = {}
    for case in cases:
        home = workdir / case.run_id
        home.mkdir()
        jobs[case.name] = (home / "orch.db", case.run_id, case.args(home))
    control_db = workdir / "control.db"
    jobs["control"] = (control_db, "control", ["run", TARGET, "--input", valid, "--run-id", "control"])
    with offline_environment(), fake.serve() as url:
        results = in_parallel({name: (lambda db=db, args=args: Orch(db, url)(*args))
                               for name, (db, _, args) in jobs.items()})
    for generated in workdir.glob("*/*.json"):  # inputs made from recipes, up to 100 MB each
        generated.unlink()

    def outcome(name: str) -> Outcome:
        db, run_id, _ = jobs[name]
        return Outcome(results[name], db, sum(r.run_id == run_id for r in fake.requests))

    return Corpus({case.name: outcome(case.name) for case in cases}, outcome("control"), fake.calls())


def assert_refused(case: Case, outcome: Outcome) -> None:
    """Exit 2, the expected one line, nothing on stdout, no request, nothing stored."""
    result = outcome.result
    assert result.code == 2, f"exit {result.code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert EXPECTED[case.name] in one_error_line(result)
    assert result.stdout == ""
    assert outcome.requests == 0
    assert (outcome.runs_stored, outcome.rows_stored) == (0, 0)


def oversized_stdin_trial(tmp_path: Path) -> None:
    """A 100 MB input on stdin: refused (exit 2) before it is all read, nothing stored."""
    big = generate(CORPUS / "inputs" / "oversized_100_mb.gen.json", tmp_path / "big.json")
    db = tmp_path / "orch.db"
    try:
        with big.open("rb") as stdin:
            proc = subprocess.run([*orch_command(), "--db", str(db), "run", str(TARGET), "--input", "-"],
                                  stdin=stdin, capture_output=True, text=True, timeout=120)
    finally:
        big.unlink()
    result = CLIResult(proc.returncode, proc.stdout, proc.stderr)
    assert result.code == 2, result.stderr
    assert "stdin is larger than 64 MB" in one_error_line(result)
    assert run_count(db) == 0


def nesting_trial(tmp_path: Path, depths: Sequence[int] = DEPTHS) -> None:
    """Each depth either runs (and is stored) or is refused as an input error; an internal
    error (exit 1, "RecursionError") would mean the depth check depends on stack depth."""
    machine = write(tmp_path / "echo.py", NESTING_MACHINE)

    def attempt(depth: int) -> tuple[CLIResult, Path]:
        db = tmp_path / f"depth-{depth}.db"
        data = write(tmp_path / f"depth-{depth}.json", '{"data": ' + "[" * depth + "]" * depth + "}")
        return Orch(db)("run", machine, "--input", data, "--run-id", f"depth-{depth}"), db

    outcomes = in_parallel({depth: (lambda depth=depth: attempt(depth)) for depth in depths})
    crashed = {depth: result.stderr for depth, (result, _) in outcomes.items() if result.code not in (0, 2)}
    assert crashed == {}
    for result, db in outcomes.values():
        if result.code == 2:
            assert "nested too deeply" in one_error_line(result)
            assert run_count(db) == 0
        else:
            assert run_count(db) == 1


# --------------------------------------------------------------------------- the audit chain


def snapshot_copy(source: Path, target: Path) -> Path:
    """A consistent copy of a database (WAL included), through SQLite's backup API."""
    with closing(sqlite3.connect(source)) as src, closing(sqlite3.connect(target)) as dst:
        src.backup(dst)
    return target


AUDIT_LINE = re.compile(r"run (\S+): (ok|TAMPERED: (.*))")


def verdicts(result: CLIResult) -> dict[str, int | None]:
    """run id -> the seq `orch audit verify` names as its first bad row (None: ok)."""
    found: dict[str, int | None] = {}
    for line in result.stdout.splitlines():
        match = AUDIT_LINE.fullmatch(line)
        if match:
            named = re.search(r"\brow seq (\d+)\b", match.group(3) or "")
            found[match.group(1)] = None if match.group(2) == "ok" else int(named.group(1)) if named else -1
    return found


V1_ROWS = (("old", 1, "a", "b", "continue", "first"), ("old", 2, "b", "__end__", "continue", "second"))


Tamper = Callable[[sqlite3.Connection], None]


def edit(run_id: str, seq: int, assignment: str, *values: object) -> Tamper:
    def apply(conn: sqlite3.Connection) -> None:
        conn.execute(f"UPDATE transitions SET {assignment} WHERE run_id = ? AND seq = ?", (*values, run_id, seq))
    return apply


def delete(run_id: str, seq: int) -> Tamper:
    return lambda conn: conn.execute("DELETE FROM transitions WHERE run_id = ? AND seq = ?", (run_id, seq))


def renumber(run_id: str, from_seq: int, by: int) -> Tamper:
    """Shift the seq of rows from `from_seq` on (through negatives, so no two rows clash)."""
    def apply(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE transitions SET seq = -seq WHERE run_id = ? AND seq >= ?", (run_id, from_seq))
        conn.execute("UPDATE transitions SET seq = ? - seq WHERE run_id = ? AND seq < 0", (by, run_id))
    return apply


def copy_row(run_id: str, seq: int, *, to_run: str | None = None, to_seq: int, reason: str | None = None) -> Tamper:
    """Insert a copy of a row elsewhere (its chain value copied too, as a forger would)."""
    def apply(conn: sqlite3.Connection) -> None:
        conn.row_factory = sqlite3.Row
        row = dict(conn.execute("SELECT * FROM transitions WHERE run_id = ? AND seq = ?", (run_id, seq)).fetchone())
        row.update(run_id=to_run or run_id, seq=to_seq, reason=reason or row["reason"])
        conn.execute(f"INSERT INTO transitions ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                     list(row.values()))
    return apply


def move(run_id: str, seq: int, to_run: str) -> Tamper:
    """Give a row another run id (rows swap runs this way)."""
    return edit(run_id, seq, "run_id = ?", to_run)


def steps(*tampers: Tamper) -> Tamper:
    def apply(conn: sqlite3.Connection) -> None:
        for tamper in tampers:
            tamper(conn)
    return apply


def v1_upgrade_trial(tmp_path: Path) -> None:
    """Rows written by schema version 1 (no chain) are chained when the file is upgraded: audit
    verify passes, then names an edited old row."""
    db = tmp_path / "v1.db"
    with closing(sqlite3.connect(db)) as conn, conn:
        create_v1_schema(conn)
        conn.execute("INSERT INTO runs (run_id, machine, machine_ref, machine_hash, input, status, created_at, "
                     "updated_at) VALUES ('old', 'm', 'm.py', 'h', '{}', 'completed', 't', 't')")
        conn.executemany("INSERT INTO transitions (run_id, seq, from_state, to_state, decision, reason, attempt, "
                         "started_at, latency_ms, source) VALUES (?, ?, ?, ?, ?, ?, 1, 't', 1.0, 'python')", V1_ROWS)
    cli = Orch(db)
    upgraded = cli("audit", "verify")
    assert (upgraded.code, verdicts(upgraded)) == (0, {"old": None})
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE transitions SET reason = 'edited' WHERE seq = 2")
    edited = cli("audit", "verify", "old")
    assert (edited.code, verdicts(edited)) == (1, {"old": 2})


# --------------------------------------------------------------------------- model-output fuzzing


FUZZ_SEED = 20261124


NEAR_MISSES = ["terminate ", " continue", "TERMINATE", "Continue.", "branch_a ", "branch:escalate ",
               "retry!", "skip\n", "positive", "POSITIVE!!", "neg ative", "negative?", "neutral-ish",
               "branch:", "branch:../etc", "branch:escalate\x00", "continue\u200b", "ｃｏｎｔｉｎｕｅ"]


class Verdict(BaseModel):
    verdict: Literal["approve", "reject"]
    confidence: float


@guard(FlowDecision.BRANCH_A, FlowDecision.BRANCH_B, FlowDecision.CONTINUE)
def by_label(output: str, ctx: StepContext) -> FlowDecision:
    text = output.lower()
    if "positive" in text:
        return FlowDecision.BRANCH_A
    if "negative" in text:
        return FlowDecision.BRANCH_B
    return FlowDecision.CONTINUE


@guard(FlowDecision.CONTINUE, FlowDecision.TERMINATE, FlowDecision.SKIP)
def strict_parse(output: str, ctx: StepContext) -> FlowDecision:
    return FlowDecision(output)  # junk raises: a recorded GuardError, never a transition


@guard(Branch("escalate"), FlowDecision.CONTINUE)
def named_branch(output: str, ctx: StepContext) -> Any:
    return Branch(output[len("branch:"):]) if output.startswith("branch:") else FlowDecision.CONTINUE


@guard(FlowDecision.BRANCH_A, FlowDecision.BRANCH_B, FlowDecision.RETRY)
def on_verdict(output: Any, ctx: StepContext) -> FlowDecision:
    if isinstance(output, InvalidOutput):
        return FlowDecision.RETRY
    return FlowDecision.BRANCH_A if output.verdict == "approve" else FlowDecision.BRANCH_B


FUZZ_ROUTER = Machine("router", source_file="fuzz_router.py", states=[
    LLMState("label", prompt="Classify.", max_tokens=50, guard=by_label,
             on={FlowDecision.BRANCH_A: "parse", FlowDecision.BRANCH_B: "name"}),
    LLMState("parse", prompt="Decide.", max_tokens=50, guard=strict_parse),
    LLMState("name", prompt="Name a branch.", max_tokens=50, guard=named_branch,
             on={Branch("escalate"): "tail", FlowDecision.CONTINUE: END}),
    LLMState("tail", prompt="Wrap up.", max_tokens=50),
])


FUZZ_VERDICT = Machine("verdict", source_file="fuzz_verdict.py", states=[
    LLMState("judge", prompt="Judge.", max_tokens=50, output=Verdict, repairs=1, on_invalid="guard",
             guard=on_verdict, retry_limit=2, on={FlowDecision.BRANCH_A: "approved", FlowDecision.BRANCH_B: END}),
    LLMState("approved", prompt="Approved.", max_tokens=50),
])


def garbage(rng: random.Random) -> str:
    alphabet = string.printable + "\x00\x1b\x7f\u202e\ud7ff\u3000é漢"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))


def text_answer(rng: random.Random) -> Reply:
    kind = rng.choices(["near", "garbage", "huge", "control", "empty", "refusal", "truncated"],
                       weights=[40, 30, 3, 10, 7, 5, 5])[0]
    if kind == "near":
        return Reply(text=rng.choice(NEAR_MISSES))
    if kind == "garbage":
        return Reply(text=garbage(rng))
    if kind == "huge":
        return Reply(text=rng.choice(NEAR_MISSES) * rng.randint(2_000, 20_000))
    if kind == "control":
        return Reply(text=rng.choice(NEAR_MISSES) + "\r\n\x1b[2J" + garbage(rng))
    if kind == "empty":
        return Reply(text=rng.choice(["", " ", "\n\t"]))
    return Reply(text=rng.choice(NEAR_MISSES), stop_reason="refusal" if kind == "refusal" else "max_tokens")


def verdict_answer(rng: random.Random) -> Reply:
    kind = rng.choices(["valid", "outside", "wrong_type", "missing", "extra", "text", "refusal"],
                       weights=[25, 25, 15, 10, 10, 10, 5])[0]
    if kind == "valid":
        return Reply(data={"verdict": rng.choice(["approve", "reject"]), "confidence": rng.random()})
    if kind == "outside":
        return Reply(data={"verdict": rng.choice(["maybe", "APPROVE", "approve ", "", "terminate"]),
                           "confidence": 0.5})
    if kind == "wrong_type":
        return Reply(data={"verdict": rng.choice([1, None, ["approve"], {"x": 1}]), "confidence": "high"})
    if kind == "missing":
        return Reply(data={"confidence": 0.1})
    if kind == "extra":
        return Reply(data={"verdict": "reject", "confidence": 0.9, "__class__": "x", "extra": [1] * 5})
    if kind == "text":
        return Reply(text=garbage(rng))
    return Reply(text="no", stop_reason=rng.choice(["refusal", "max_tokens"]))


def fuzz_drive(machine: Machine, answers: Callable[[random.Random], Reply], runs: int, rng: random.Random,
          db: Path, figures: Figures) -> list[str]:
    fake = FakeMessagesAPI(default=lambda request: answers(rng))
    store = SQLiteStore(db, synchronous="NORMAL")

    async def all_runs() -> list[str]:
        engine = Engine(store, model=fake.model())
        ids = []
        for _ in range(runs):
            result = await engine.arun(machine)
            ids.append(result.run_id)
        return ids

    try:
        return asyncio.run(all_runs())
    finally:
        asyncio.run(store.close())
        figures.add("generated_answers", fake.calls())


def fuzz_check(machine: Machine, db: Path, run_ids: list[str], figures: Figures) -> None:
    """Every stored step of `run_ids` is a declared transition to the table's target, or a
    recorded error without one; refusals, truncated and empty answers only reach a guard as
    InvalidOutput."""
    store = SQLiteStore(db)
    try:
        for run_id in run_ids:
            run = asyncio.run(store.get_run(run_id))
            assert run.status.value in ("completed", "terminated", "failed"), run
            for row in asyncio.run(store.transitions(run_id)):
                figures.add("steps_checked")
                stop = (row.response or {}).get("stop_reason")
                text = "".join(b.get("text", "") for b in (row.response or {}).get("content", []))
                if row.to_state is None:
                    assert row.error, row  # no transition: an explicit recorded error
                    assert row.decision is None or row.error.startswith(("RetryLimitError", "VisitLimitError"))
                    figures.add("recorded_errors")
                    continue
                assert row.decision in machine.decisions[row.from_state], row
                assert row.to_state == machine.table[row.from_state][row.decision], row
                figures.add("declared_transitions")
                if row.response is not None and (stop in ("refusal", "max_tokens") or (not text.strip()
                                                 and stop != "tool_use")):
                    # only a guard that routes InvalidOutput may act on it, never on its text
                    assert isinstance(row.output, dict) and "__orch_invalid_output__" in row.output, row
                    figures.add("invalid_outcomes_routed")
    finally:
        asyncio.run(store.close())


def fuzz_trial(tmp_path: Path, figures: Figures, answers: int) -> None:
    """At least `answers` generated answers through both machines (seeded): every step is a
    declared transition or a recorded error, and invalid outcomes only reach a guard that routes
    InvalidOutput."""
    rng = random.Random(FUZZ_SEED)
    figures["seed"] = FUZZ_SEED
    for machine, generated in ((FUZZ_ROUTER, text_answer), (FUZZ_VERDICT, verdict_answer)):
        db = tmp_path / f"{machine.name}.db"
        run_ids = fuzz_drive(machine, generated, answers // 3, rng, db, figures)
        fuzz_check(machine, db, run_ids, figures)
    assert figures.values["generated_answers"] >= answers
    figures["crashes"] = 0  # any crash would have failed this test before this line


# --------------------------------------------------------------------------- property tests


PROPERTY_DECISIONS = [FlowDecision.CONTINUE, FlowDecision.SKIP, FlowDecision.RETRY, FlowDecision.TERMINATE,
                      FlowDecision.BRANCH_A, Branch("other")]


@dataclass
class Spec:
    """A random machine as plain data, the input of both the engine and the reference_path."""

    names: list[str]
    declared: list[list[Any]]  # decisions each state's guard declares
    branch_targets: list[dict[str, str]]  # decision value -> target, for the branch decisions
    retry_limits: list[int]
    max_visits: list[int]
    script: list[Any]  # the decisions the guards return, in order (the last repeats)


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    n = draw(st.integers(2, 6))
    names = [f"s{i}" for i in range(n)]
    targets = st.sampled_from([*names, END])
    declared, branch_targets = [], []
    for _ in names:
        extra = draw(st.lists(st.sampled_from(PROPERTY_DECISIONS[1:]), unique_by=lambda d: d.value, max_size=4))
        declared.append([FlowDecision.CONTINUE, *extra])
        branch_targets.append({d.value: draw(targets) for d in extra if d in (FlowDecision.BRANCH_A,)
                               or isinstance(d, Branch)})
    return Spec(
        names=names, declared=declared, branch_targets=branch_targets,
        retry_limits=[draw(st.integers(1, 3)) for _ in names],
        max_visits=[draw(st.integers(1, 3)) for _ in names],
        # mostly decisions some state declares, sometimes one it does not (a closed-set error)
        script=draw(st.lists(st.sampled_from([*PROPERTY_DECISIONS, *[FlowDecision.CONTINUE] * 3,
                                              FlowDecision.RETRY, FlowDecision.BRANCH_A]),
                             min_size=1, max_size=16)),
    )


class Script:
    """Hands the guards their decisions in order; the last one repeats."""

    def __init__(self, decisions: list[Any]) -> None:
        self.decisions = decisions
        self.used = 0

    def next(self) -> Any:
        decision = self.decisions[min(self.used, len(self.decisions) - 1)]
        self.used += 1
        return decision


def build_machine(spec: Spec, script: Script) -> Machine | None:
    states = []
    for i, name in enumerate(spec.names):
        decide = guard(*spec.declared[i])(lambda output, ctx: script.next())
        on = {d: spec.branch_targets[i][d.value] for d in spec.declared[i] if d.value in spec.branch_targets[i]}
        states.append(PythonState(name, run=_step_output, guard=decide, on=on, retry_limit=spec.retry_limits[i],
                                  max_visits=spec.max_visits[i]))
    try:
        return Machine("prop", states, max_branch_depth=10, source_file="properties.py")
    except DefinitionError:
        return None  # e.g. an unreachable state: not a machine this property is about


def _step_output(ctx: StepContext) -> str:
    return f"{ctx.state}#{ctx.attempt}"


def reference_path(spec: Spec, machine: Machine, steps: int = 64) -> tuple[list[str], str]:
    """(states run, final status) from the table alone."""
    script = Script(spec.script)
    state, attempt, visits = machine.initial, 1, {machine.initial: 1}
    path: list[str] = []
    for _ in range(steps):
        decision = script.next().value
        if decision not in machine.decisions[state]:
            return path, "failed"
        target = machine.table[state][decision]
        if target == state:
            if attempt >= machine.by_name[state].retry_limit:  # type: ignore[operator]
                return path, "failed"
        elif target != END and visits.get(target, 0) >= (machine.by_name[target].max_visits or 10**9):
            return path, "failed"
        path.append(state)
        if target == END:
            return path, "terminated" if decision == "terminate" else "completed"
        if target == state:
            attempt += 1
        else:
            attempt = 1
            visits[target] = visits.get(target, 0) + 1
        state = target
    return path, "running"


async def drive_stepwise(engine: Engine, machine: Machine, db: SQLiteStore | None) -> tuple[Any, int]:
    """Run step by step; with a store, check after every step that the snapshot is the run."""
    run = await engine.start(machine)
    checked = 0
    while not run.done and len(run.path) < 64:
        await run.step()
        if db is not None and not run.done:
            record, log = await db.load_run(run.run_id)
            snap = snapshot(engine.compiled(machine), record, log)
            assert (snap.position.state, snap.position.attempt, snap.position.visits) == (
                run.state, run.position.attempt, run.position.visits)
            assert (snap.outputs, snap.path) == (run.outputs, run.path)
            checked += 1
    return run, checked


def property_example(spec: Spec, tmp_path: Path, figures: Figures) -> None:
    """One random machine (`spec`): the engine's path and status equal the reference model's,
    every snapshot equals the live run, replay matches and the chain verifies."""
    script = Script(spec.script)
    machine = build_machine(spec, script)
    assume(machine is not None)
    assert machine is not None
    expected_path, expected_status = reference_path(spec, machine)
    assume(expected_status != "running")
    db_path = tmp_path / f"{id(spec)}.db"
    store = SQLiteStore(db_path)
    try:
        engine = Engine(store)
        run, checked = asyncio.run(drive_stepwise(engine, machine, store))
        assert run.path == expected_path
        assert run.status.value == expected_status
        script.used = 0
        report = asyncio.run(replay_run(store, run.run_id, build_machine(spec, script)))  # type: ignore[arg-type]
        assert report.matches and report.compared == len(run.path)
        assert asyncio.run(store.verify_chain(run.run_id)) is None
    finally:
        asyncio.run(store.close())
    figures.add("machines", 1)
    figures.add("steps_compared", len(run.path))
    figures.add("snapshots_compared", checked)
    figures.add("replays_matched", 1)
    figures.add("failed_runs", int(run.status is RunStatus.FAILED))
