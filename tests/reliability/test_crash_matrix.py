"""Crash matrix: SIGKILL the real `orch run` at every kill point, then `orch resume` it.

Each trial picks a kill point and a step at random (seeded: the seed is printed and recorded
in the figures; set ORCH_RELIABILITY_SEED to replay one), runs a 5-state machine against one
fake Messages API served on loopback, kills the process there, resumes the run and measures
what the issue asks: runs completed, runs missing, `PRAGMA integrity_check`, committed steps
lost or called again (requests counted per run and state at the server), calls flagged in
doubt against calls re-sent, and the final log against an uninterrupted run's log. All
trials share one database, several at a time, so each also shows other runs are unaffected.

Kill points, in the order a step reaches them (statemachine_orch/faults.py): `run_created`,
`before_request`, `in_flight` (from outside: the fake holds the request, the test kills the
process), `after_response`, `mid_commit` (inside the step's transaction), `after_commit`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from statemachine_orch.testing import CapturedRequest, FakeMessagesAPI, Reply

from ..conftest import CLIResult
from ..test_cli import Orch, answer, orch_against, query, stored_log, stored_status, write
from ..test_crash import integrity
from .conftest import Figures, scaled

pytestmark = pytest.mark.slow

WAIT_S = 60.0  # generous bound on any wait for a process or a request
WORKERS = 3  # trials run at once against the one database

MACHINE = '''
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
INPUT = {"topic": "durable state machines"}

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


# --------------------------------------------------------------------------- shared helpers


@dataclass
class EnvOrch(Orch):
    """`Orch` whose commands also get `extra` environment variables (ORCH_KILL_AT, ...)."""

    extra: Mapping[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return {**super().env(), **self.extra}

    def with_env(self, **extra: str) -> EnvOrch:
        """The same `orch` with more variables; its processes are still cleaned up by this one."""
        return replace(self, extra={**self.extra, **extra})


@pytest.fixture(name="orch")
def orch_fixture(fake: FakeMessagesAPI, db_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EnvOrch]:
    """`EnvOrch` on `db_path`, the fake served to it (test_sigterm.py uses it too)."""
    for name in ("ORCH_KILL_AT", "ORCH_STOP_GRACE", "ORCH_BUSY_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)  # only the processes that are meant to get them
    with orch_against(fake, db_path) as cli:
        yield EnvOrch(cli.db, cli.base_url, started=cli.started)


def reliability_seed() -> int:
    """ORCH_RELIABILITY_SEED, else a fresh one; printed so a failing run can be replayed."""
    given = os.environ.get("ORCH_RELIABILITY_SEED")
    seed = int(given) if given else random.SystemRandom().randrange(2**32)
    print(f"reliability seed: {seed} (replay with ORCH_RELIABILITY_SEED={seed})")
    return seed


def write_machine(tmp_path: Path) -> tuple[Path, Path]:
    """The 5-state machine module and its input file."""
    return (write(tmp_path / "crash_matrix.py", MACHINE),
            write(tmp_path / "crash_matrix_input.json", json.dumps(INPUT)))


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


@pytest.fixture(name="answers")
def answers_fixture(fake: FakeMessagesAPI) -> Iterator[Answers]:
    served = Answers(fake)
    try:
        yield served
    finally:
        served.release_all()


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


# --------------------------------------------------------------------------- the matrix


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


def plan(rng: random.Random, trials: int) -> list[Kill]:
    """Points spread evenly over the trials (shuffled), each at a random step."""
    points = [POINTS[i % len(POINTS)] for i in range(trials)]
    rng.shuffle(points)
    kills = []
    for point in points:
        steps = (1 if point == "run_created"
                 else len(LLM_STATES) if point in ("before_request", "in_flight") else len(STATES))
        kills.append(Kill(point, rng.randint(1, steps)))
    return kills


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


def test_sigkill_at_every_kill_point_then_resume(
        orch: EnvOrch, answers: Answers, tmp_path: Path, figures: Figures) -> None:
    seed = reliability_seed()
    rng = random.Random(seed)
    kills = plan(rng, scaled(30, 240))
    matrix = Matrix(orch, answers, *write_machine(tmp_path))
    reference = matrix.reference()

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        trials = list(pool.map(matrix.trial, range(1, len(kills) + 1), kills))

    listed = {r["run_id"]: r["status"] for r in orch.json("runs", "--limit", str(len(trials) + 10))}
    audit = orch("audit", "verify")
    figures["seed"] = seed
    figures["trials"] = len(trials)
    for point in POINTS:
        figures[f"kills_{point}"] = sum(t.kill.point == point for t in trials)
    figures["kills_at_in_flight_points"] = sum(t.kill.point in IN_FLIGHT_POINTS for t in trials)
    figures["runs_completed_after_resume"] = sum(t.completed for t in trials)
    figures["runs_missing"] = sum(t.run_id not in listed for t in trials)
    figures["integrity_checks"] = 2 * len(trials)
    figures["integrity_failures"] = sum(t.integrity_failures for t in trials)
    figures["committed_steps_lost"] = sum(t.lost for t in trials)
    figures["committed_steps_recalled"] = sum(t.recalled for t in trials)
    figures["calls_flagged_in_doubt"] = sum(len(t.flagged) for t in trials)
    figures["repaid_calls"] = sum(t.repaid for t in trials)
    figures["final_logs_differing"] = sum(log_difference(t.after, reference) is not None
                                          for t in trials)
    figures["audit_verify_exit"] = audit.code

    problems = [line for t in trials for line in t.problems(reference)]
    assert not problems, f"seed {seed}:\n" + "\n".join(problems)
    assert set(POINTS) == {t.kill.point for t in trials}
    assert listed == dict.fromkeys([t.run_id for t in trials] + ["reference"], "completed")
    assert figures.values["calls_flagged_in_doubt"] <= figures.values["kills_at_in_flight_points"]
    assert figures.values["calls_flagged_in_doubt"] == figures.values["repaid_calls"] == sum(
        t.kill.repaid for t in trials)
    assert audit.code == 0, audit.stdout + audit.stderr
    assert f"{len(trials) + 1} run(s) checked, 0 with a broken log" in audit.stdout
    assert integrity(orch.db) == "ok"
    shown_in_doubt(orch, next(t for t in trials if t.flagged))


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
