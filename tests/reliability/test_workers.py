"""`orch worker` processes sharing one PostgreSQL queue, under faults (issue 14).

Every worker here is the real `orch worker` in a process of its own, against a real PostgreSQL
server on loopback (`pg_dsn`), its model calls going through the real SDK to one fake Messages
API (`Recorder`). Each worker process gets its own ANTHROPIC_BASE_URL, `BASE/TAG` (the SDK posts
to `/TAG/v1/messages`), so the fake knows which process sent each request; the engine's
`x-orch-run` and `x-orch-state` headers say for which run and step; the fake's `request-id`
(`req_fake_N`, the N-th request) is what a committed row stores as its `request_id`, so every
committed step names the one request whose answer it holds.

- `test_workers_survive_kills_and_freezes`: 4 workers, 200 queued runs of a 5-call machine,
  at least 20 workers SIGKILLed (and replaced) or SIGSTOPped past their lease then SIGCONTed;
  every run completes, no committed step is asked again, every request beyond a step's
  committed one is a call in flight at a fault and recorded in doubt, every run that changed
  hands has its takeover audited, every log verifies.
- `test_a_frozen_worker_past_its_lease_commits_nothing`: a worker frozen with an answer held
  at the fake is taken over; resumed, it writes nothing, reports the run lost, and takes a new
  lease for the next run it claims. In process: `PostgresStore.append` after the lease expired.
- `test_sigterm_hands_the_runs_back`: a SIGTERMed worker claims nothing more, commits the steps
  in flight, hands the runs back as `pending`, ends its lease, exits 0; another completes them.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from statemachine_orch import LeaseLostError
from statemachine_orch.store.postgres._store import PostgresStore
from statemachine_orch.testing import CapturedRequest, FakeMessagesAPI, Reply

from ..helpers import (
    CANARY_KEY,
    WAIT_S,
    Figures,
    me,
    new_run,
    orch_command,
    reliability_seed,
    row,
    run_orch,
    scaled,
    wait_until_delivered,
    write,
)

MACHINE = '''
"""Five model calls in a row; every prompt carries the run's topic."""
from statemachine_orch import LLMState, Machine

machine = Machine("five_calls", input_vars={"topic": lambda data: data["topic"]}, states=[
    LLMState("gather", prompt="Gather notes on {topic}.", max_tokens=64),
    LLMState("outline", prompt="Outline {topic} from: {gather}", needs=["gather"], max_tokens=64),
    LLMState("draft", prompt="Draft {topic} from: {outline}", needs=["outline"], max_tokens=64),
    LLMState("review", prompt="Review the draft on {topic}: {draft}", needs=["draft"], max_tokens=64),
    LLMState("summary", prompt="Summarise {topic}: {review}", needs=["review"], max_tokens=64),
])
'''

STATES = ("gather", "outline", "draft", "review", "summary")

RUNS = scaled(200, 400)
WORKERS = 4
CONCURRENCY = 3  # runs per worker at a time
FAULTS = scaled(26, 52)  # planned; at least MIN_FAULTS must land before the queue is done
MIN_FAULTS = scaled(20, 40)
MAX_FROZEN = 2  # workers frozen at once (the others go on)
FAULT_TTL_S = 3.0  # ORCH_LEASE_TTL of the fault test: a heartbeat every second
LEASE_TTL_S = 2.0  # of the lease and SIGTERM tests
POLL_S = "0.5"
DELAY_S = (0.02, 0.05)  # the fake answers after this long, so that faults land mid-step
BUDGET_S = 150.0  # the fault test's runs must all be completed within this
SETTLE_S = 10.0  # at the end, how long a worker just resumed may take to report its runs lost

LINE = re.compile(r"^orch worker: (claimed|took_over|completed|failed|handed_back|lost|refused) (\S+): (.*)$")
LEASE_EXPIRED = re.compile(r"its lease expired at (\S+)")
PREVIOUS_PID = re.compile(r"\bpid (\d+) on ")
BY_PID = re.compile(r"\bpid (\d+)$")
LOST_TO_TAKEOVER = ("run lease-1 was taken over by another process; the answer was paid but not kept: a resume sends "
                    "its call again")


def answer_text(run_id: str, state: str) -> str:
    return f"<<{state} for {run_id}>>"


def topic(n: int) -> str:
    return f"subject number {n}"


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# --------------------------------------------------------------------------- the fake and the database


@dataclass
class Seen:
    """What the fake noted about one request as it arrived."""

    sender: str  # the tag of the worker process that sent it
    run_id: str
    state: str
    committed: bool  # its step already had a committed row when it arrived
    wall: datetime


@dataclass
class Gate:
    arrived: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


class Recorder(FakeMessagesAPI):
    """The fake Messages API: `answer_text(run, state)` after a random short delay, except
    that the first request of a gated (run, state) waits for its gate. For every request it
    notes (in `seen`, parallel to `requests`) the worker that sent it and whether the step
    was committed when it arrived (read from the database right then)."""

    def __init__(self, dsn: str, seed: int, delay: tuple[float, float] = DELAY_S) -> None:
        import psycopg

        super().__init__(default=self._reply)
        self._db = psycopg.connect(dsn, autocommit=True)
        self._rng = random.Random(seed)
        self.delay = delay
        self.seen: list[Seen] = []
        self.topics: dict[str, str] = {}  # run id -> the topic its prompts must carry
        self.misrouted: list[str] = []
        self._gates: dict[tuple[str, str], Gate] = {}

    def close(self) -> None:
        self._db.close()

    def gate(self, run_id: str, state: str) -> Gate:
        gate = self._gates[run_id, state] = Gate()
        return gate

    def release_all(self) -> None:
        for gate in self._gates.values():
            gate.release.set()

    def answer(self, method: str, path: str, headers: Any, body: bytes) -> Any:
        tag = path.strip("/").split("/")[0]
        return super().answer(method, path, {**dict(headers), "x-test-sender": tag}, body)

    def _reply(self, request: CapturedRequest) -> Reply:  # under the fake's lock, just after `requests` grew
        run_id, state = request.run_id or "", request.state or ""
        found = self._db.execute(
            "SELECT EXISTS (SELECT 1 FROM orch.transitions WHERE run_id = %s AND from_state = %s "
            "AND to_state IS NOT NULL)", (run_id, state)).fetchone()
        committed = found is not None and found[0]
        self.seen.append(Seen(request.headers.get("x-test-sender", "?"), run_id, state, bool(committed),
                              datetime.now(UTC)))
        expected = self.topics.get(run_id)
        if expected is None or expected not in request.prompt:
            self.misrouted.append(f"{run_id}/{state}: {request.prompt[:80]!r}")
        gate = self._gates.get((run_id, state))
        if gate is not None and not gate.arrived.is_set():
            gate.arrived.set()
            return Reply(text=answer_text(run_id, state), gate=gate.release)
        return Reply(text=answer_text(run_id, state), hold_s=self._rng.uniform(*self.delay))

    def requests_of(self, run_id: str) -> Counter[str]:
        with self._lock:
            return Counter(s.state for s in self.seen if s.run_id == run_id)


class Db:
    """The test's own connection to the `orch` schema."""

    def __init__(self, dsn: str) -> None:
        import psycopg

        self.conn = psycopg.connect(dsn, autocommit=True)

    def rows(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        cursor = self.conn.execute(sql, params)
        names = [c.name for c in cursor.description or []]
        return [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]

    def value(self, sql: str, *params: Any) -> Any:
        found = self.conn.execute(sql, params).fetchone()
        return None if found is None else found[0]

    def completed(self) -> int:
        return int(self.value("SELECT count(*) FROM orch.runs WHERE status = 'completed'"))

    def status(self, run_id: str) -> str:
        return str(self.value("SELECT status FROM orch.runs WHERE run_id = %s", run_id))

    def held(self, pid: int) -> set[str]:
        """The runs held now under a live lease of the process `pid`."""
        return {r["run_id"] for r in self.rows(
            "SELECT r.run_id FROM orch.runs r JOIN orch.workers w ON w.key = r.holder WHERE w.pid = %s "
            "AND w.expires_at > clock_timestamp() AND r.status = 'running'", pid)}

    def being_claimed(self) -> set[str]:
        """The unfinished runs whose row some process has locked FOR UPDATE right now (a claim in
        progress): a KEY SHARE lock skips them (and waits for no UPDATE of a step)."""
        with self.conn.transaction():
            unfinished = {r["run_id"] for r in self.rows("SELECT run_id FROM orch.runs WHERE status IN "
                                                         "('pending', 'running')")}
            free = {r["run_id"] for r in self.rows("SELECT run_id FROM orch.runs WHERE status IN ('pending', "
                                                   "'running') FOR KEY SHARE SKIP LOCKED")}
        return unfinished - free

    def lease_expired(self, pid: int) -> bool:
        """No live lease of `pid` left (by the database's clock)."""
        return not self.value("SELECT count(*) FROM orch.workers WHERE pid = %s AND expires_at > clock_timestamp()",
                              pid)

    def snapshot(self, run_id: str) -> tuple[Any, ...]:
        """Everything stored about a run: its row, its log, its attempts, its takeovers."""
        return (self.rows("SELECT * FROM orch.runs WHERE run_id = %s", run_id),
                self.rows("SELECT * FROM orch.transitions WHERE run_id = %s ORDER BY seq", run_id),
                self.rows("SELECT * FROM orch.attempts WHERE run_id = %s ORDER BY seq, attempt", run_id),
                self.rows("SELECT * FROM orch.takeovers WHERE run_id = %s ORDER BY at", run_id))

    def close(self) -> None:
        self.conn.close()


def wait_until(what: str, check: Any, timeout: float = WAIT_S, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g}s"
        time.sleep(every)


# --------------------------------------------------------------------------- worker processes


@dataclass
class Fault:
    kind: str  # "kill" or "freeze"
    tag: str
    pid: int
    at: datetime
    held: set[str]  # the runs it held under a live lease when it stopped
    claiming: set[str] = field(default_factory=set)  # runs locked by a claim in progress then (any worker's)
    resumed: datetime | None = None


@dataclass
class WorkerProc:
    tag: str
    proc: subprocess.Popen[bytes]
    log: Path
    killed: bool = False
    frozen: Fault | None = None
    resume_at: float | None = None
    faults: list[Fault] = field(default_factory=list)
    code: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def events(self) -> list[tuple[str, str, str]]:
        return [m.groups() for line in self.output().splitlines() if (m := LINE.match(line))]  # type: ignore[misc]

    def stopped_state(self) -> str:
        return Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


class Pool:
    """`orch worker` processes against one database, each with its own tag; all are killed
    (frozen ones resumed first) when the test ends."""

    def __init__(self, dsn: str, base_url: str, machine: Path, folder: Path, ttl_s: float) -> None:
        self.dsn, self.base_url, self.machine, self.folder, self.ttl_s = dsn, base_url, machine, folder, ttl_s
        self.all: list[WorkerProc] = []

    def start(self, *options: str) -> WorkerProc:
        tag = f"w{len(self.all) + 1:02d}"
        log = self.folder / f"{tag}.log"
        env = {**os.environ, "ANTHROPIC_BASE_URL": f"{self.base_url}/{tag}", "ANTHROPIC_API_KEY": CANARY_KEY,
               "ORCH_LEASE_TTL": f"{self.ttl_s:g}"}
        with open(log, "wb") as out:
            proc = subprocess.Popen([*orch_command(), "--db", self.dsn, "worker", str(self.machine), "--poll", POLL_S,
                                     *options], env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        worker = WorkerProc(tag, proc, log)
        self.all.append(worker)
        return worker

    def by_tag(self) -> dict[str, WorkerProc]:
        return {w.tag: w for w in self.all}

    def live(self) -> list[WorkerProc]:
        return [w for w in self.all if not w.killed and w.proc.poll() is None]

    def stop(self, worker: WorkerProc, timeout: float = WAIT_S) -> int:
        """SIGTERM, and its exit code."""
        worker.proc.send_signal(signal.SIGTERM)
        worker.code = worker.proc.wait(timeout=timeout)
        return worker.code

    def cleanup(self) -> None:
        for worker in self.all:
            if worker.proc.poll() is None:
                os.kill(worker.pid, signal.SIGCONT)
                worker.proc.kill()
                worker.proc.wait(timeout=30)


@pytest.fixture
def setting(pg_dsn: str, tmp_path: Path) -> Iterator[tuple[Db, Path]]:
    db = Db(pg_dsn)
    try:
        yield db, write(tmp_path / "five_calls.py", MACHINE)
    finally:
        db.close()


def enqueue(dsn: str, machine: Path, tmp_path: Path, prefix: str, count: int, recorder: Recorder) -> list[str]:
    """`orch enqueue --inputs` of `count` runs PREFIX-1..PREFIX-count; their topics told to the fake."""
    inputs = write(tmp_path / f"{prefix}.jsonl", "".join(json.dumps({"topic": topic(n)}) + "\n"
                                                        for n in range(1, count + 1)))
    done = run_orch("--db", dsn, "enqueue", str(machine), "--inputs", str(inputs), "--run-id", prefix, "--json")
    assert done.code == 0, done.stderr
    ids = [entry["run_id"] for entry in json.loads(done.stdout)["runs"]]
    assert ids == [f"{prefix}-{n}" for n in range(1, count + 1)]
    recorder.topics.update({f"{prefix}-{n}": topic(n) for n in range(1, count + 1)})
    return ids


def audit(dsn: str, *run_ids: str) -> tuple[int, str]:
    done = run_orch("--db", dsn, "audit", "verify", *run_ids)
    return done.code, done.stdout + done.stderr


def pids_of(takeover: dict[str, Any]) -> tuple[int | None, int | None]:
    """(the pid of the process a takeover took the run from, the pid of the one that took it)."""
    previous, by = PREVIOUS_PID.search(takeover["previous"]), BY_PID.search(takeover["by_owner"])
    return (int(previous.group(1)) if previous else None), (int(by.group(1)) if by else None)


def committed_number(row_: dict[str, Any]) -> int:
    """The number N of the fake's request `req_fake_N` whose answer the row holds."""
    found = re.fullmatch(r"req_fake_(\d+)", row_["request_id"] or "")
    assert found, row_
    return int(found.group(1))


# --------------------------------------------------------------------------- 1. the fault test


def test_workers_survive_kills_and_freezes(setting: tuple[Db, Path], pg_dsn: str, tmp_path: Path,
                                           figures: Figures) -> None:
    """200 queued runs (400 with ORCH_RELIABILITY=full), 4 workers (3 runs each at a time), lease
    TTL 3 s, --poll 0.5, answers after 20-50 ms. Faults are paced by progress (one about every 6
    completed runs; seeded, the seed printed): a worker holding runs is picked at random and
    either SIGKILLed (a new worker replaces it) or SIGSTOPped and, once the database says its
    lease expired (and a random 0-1 s more, so that some runs were taken over by then and some
    not), SIGCONTed. At least 20 faults must land. Then:

    - every run is `completed` with the machine's 5 rows, each holding this run's answer for
      its state; `orch audit verify` passes for every run;
    - no committed step is asked again. The fake reads, as each request arrives, whether its
      step already has a committed row. None may, except a call that a frozen worker had marked
      in flight (for a run it held when it was stopped) and sent only once resumed: a call in
      flight at a freeze, whose twin was re-sent and recorded in doubt by the worker that took
      the run over (`late_sends_of_in_flight_calls`; they are also counted below);
    - at-least-once, and accounted for. A committed row names the one request whose answer it
      holds (`request_id` is the fake's `req_fake_N`). Every other request for that (run, step)
      must come from a worker that held the run when it was killed or frozen (a call in flight
      at its fault), and there may be no more of them than the row's `in_doubt` attempts (a
      taker records one for each call it finds in flight; a call marked but never sent is one
      too, so the bound is not an equality); `in_doubt` is set on exactly those rows;
    - every takeover is audited: its row says why ("its lease expired at T", T no later than the
      takeover, or "its lease was ended") and names, as the run's previous holder, a worker that
      was killed or frozen. A run's takeovers are at least its distinct holders (the workers that
      sent its requests or printed a claim of it) minus one; each run that a worker held at its
      fault and another worker finished has a takeover from that worker after the fault, so the
      takeovers are at least those runs;
    - a frozen worker, resumed, reports as lost each run it held and did not finish itself; no
      worker reports a run failed, handed back or refused; each one still running at the end
      exits 0 on SIGTERM;
    - a worker loses only runs it held (or was claiming) when it was frozen: a loss of any other
      run means it claimed that run under a lease that had already expired.
    """
    db, machine = setting
    seed = figures["seed"] = reliability_seed()
    rng = random.Random(seed)
    started = time.monotonic()
    recorder = Recorder(pg_dsn, seed)
    try:
        with recorder.serve() as url:
            ids = enqueue(pg_dsn, machine, tmp_path, "run", RUNS, recorder)
            pool = Pool(pg_dsn, url, machine, tmp_path, FAULT_TTL_S)
            try:
                for _ in range(WORKERS):
                    pool.start("--concurrency", str(CONCURRENCY))
                faults = inject_faults(db, pool, rng)
                finish(db, pool)
            finally:
                pool.cleanup()
                recorder.release_all()
        figures["seconds"] = round(time.monotonic() - started, 1)
        check_fault_run(db, pg_dsn, recorder, pool, faults, ids, figures)
    finally:
        recorder.close()


def inject_faults(db: Db, pool: Pool, rng: random.Random) -> list[Fault]:
    """Faults until every run is completed (see the test's docstring); they are returned."""
    kinds = ["kill", "freeze"] * (FAULTS // 2)
    rng.shuffle(kinds)
    spacing = RUNS * 0.8 / FAULTS
    faults: list[Fault] = []
    deadline = time.monotonic() + BUDGET_S
    while (done := db.completed()) < RUNS:
        assert time.monotonic() < deadline, f"{done} of {RUNS} runs completed in {BUDGET_S:g}s, {len(faults)} faults"
        resume_expired(db, pool, rng)
        if len(faults) < len(kinds) and done >= spacing * len(faults) + 2:
            fault = one_fault(db, pool, rng, kinds[len(faults)])
            if fault is not None:
                faults.append(fault)
        time.sleep(0.05)
    return faults


def one_fault(db: Db, pool: Pool, rng: random.Random, kind: str) -> Fault | None:
    """SIGKILL or SIGSTOP a worker holding runs, picked at random; None when none can be hit now."""
    frozen = [w for w in pool.all if w.frozen is not None]
    if kind == "freeze" and len(frozen) >= MAX_FROZEN:
        return None
    busy = [w for w in pool.live() if w.frozen is None and db.held(w.pid)]
    if not busy:
        return None
    victim = rng.choice(busy)
    if kind == "kill":
        os.kill(victim.pid, signal.SIGKILL)
        at = datetime.now(UTC)
        victim.proc.wait(timeout=WAIT_S)
        victim.killed = True
    else:
        os.kill(victim.pid, signal.SIGSTOP)
        at = datetime.now(UTC)
        wait_until(f"{victim.tag} stopped", lambda: victim.stopped_state() == "T", every=0.005)
    fault = Fault(kind, victim.tag, victim.pid, at, db.held(victim.pid), db.being_claimed())
    victim.faults.append(fault)
    if kind == "kill":
        pool.start("--concurrency", str(CONCURRENCY))
    else:
        victim.frozen = fault
    return fault


def resume_expired(db: Db, pool: Pool, rng: random.Random) -> None:
    """SIGCONT each frozen worker whose leases have all expired, a random 0-1 s after that was seen."""
    for worker in pool.all:
        if worker.frozen is None:
            continue
        if worker.resume_at is None:
            if db.lease_expired(worker.pid):
                worker.resume_at = time.monotonic() + rng.uniform(0.0, 1.0)
            continue
        if time.monotonic() >= worker.resume_at:
            worker.frozen.resumed = datetime.now(UTC)  # before: whatever it sends once resumed comes after
            os.kill(worker.pid, signal.SIGCONT)
            worker.frozen, worker.resume_at = None, None


def finish(db: Db, pool: Pool) -> None:
    """Resume the workers still frozen (once their lease expired), give each a moment to report
    the runs it held as lost (no more than SETTLE_S: a missing report is checked later), then
    SIGTERM every live worker."""
    resumed = []
    for worker in pool.all:
        if worker.frozen is not None:
            wait_until(f"{worker.tag}'s lease expiring", lambda w=worker: db.lease_expired(w.pid))
            worker.frozen.resumed = datetime.now(UTC)
            os.kill(worker.pid, signal.SIGCONT)
            resumed.append((worker, worker.frozen))
            worker.frozen = None
    deadline = time.monotonic() + SETTLE_S
    for worker, fault in resumed:
        while time.monotonic() < deadline and not fault.held <= {r for k, r, _ in worker.events() if k == "lost"}:
            time.sleep(0.05)
    for worker in pool.live():
        pool.stop(worker)


@dataclass
class Accounting:
    """Requests against committed rows (see the fault test's docstring)."""

    problems: list[str] = field(default_factory=list)
    extra: int = 0  # requests beyond each step's committed one
    late_sends: int = 0  # of those, sent by a resumed frozen worker after the step was committed
    duplicates: int = 0  # requests for a committed step that no fault explains
    in_doubt: int = 0  # in_doubt attempts in the committed rows
    other_attempts: int = 0
    finisher: dict[str, str] = field(default_factory=dict)  # run -> tag of the worker that finished it
    senders: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))


def account(db: Db, recorder: Recorder, pool: Pool, faults: list[Fault], ids: list[str]) -> Accounting:
    found = Accounting()
    seen = recorder.seen
    by_step: dict[tuple[str, str], list[int]] = defaultdict(list)
    for number, s in enumerate(seen, start=1):
        by_step[s.run_id, s.state].append(number)
        found.senders[s.run_id].add(s.sender)
    doubts = Counter((a["run_id"], a["seq"]) for a in db.rows("SELECT run_id, seq FROM orch.attempts "
                                                                 "WHERE kind = 'in_doubt'"))
    found.in_doubt = sum(doubts.values())
    found.other_attempts = int(db.value("SELECT count(*) FROM orch.attempts WHERE kind <> 'in_doubt'"))
    logs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in db.rows("SELECT run_id, seq, from_state, to_state, output, request_id, in_doubt FROM orch.transitions "
                     "ORDER BY run_id, seq"):
        logs[r["run_id"]].append(r)
    completed_by = {run_id: w.tag for w in pool.all for kind, run_id, _ in w.events() if kind == "completed"}
    for run_id in ids:
        log = logs[run_id]
        want = [(n + 1, s, STATES[n + 1] if n + 1 < len(STATES) else "__end__", answer_text(run_id, s))
                for n, s in enumerate(STATES)]
        got = [(r["seq"], r["from_state"], r["to_state"], json.loads(r["output"] or "null")) for r in log]
        if got != want:
            found.problems.append(f"{run_id}: log {got}, expected {want}")
            continue
        for r in log:
            step = (run_id, r["from_state"])
            number = committed_number(r)
            if number not in by_step[step]:
                found.problems.append(f"{run_id} seq {r['seq']}: holds request {number}, not one of this step's")
                continue
            others = [n for n in by_step[step] if n != number]
            found.extra += len(others)
            if len(others) > doubts[run_id, r["seq"]]:
                found.problems.append(f"{run_id} {r['from_state']}: {len(others)} requests beyond the committed one, "
                                      f"{doubts[run_id, r['seq']]} in doubt")
            if bool(r["in_doubt"]) != bool(doubts[run_id, r["seq"]]):
                found.problems.append(f"{run_id} seq {r['seq']}: in_doubt {r['in_doubt']}, "
                                      f"{doubts[run_id, r['seq']]} in_doubt attempts")
            for n in others:  # a call of a worker that held the run when it was killed or frozen
                s = seen[n - 1]
                if not any(f.tag == s.sender and run_id in f.held for f in faults):
                    found.problems.append(f"{run_id} {s.state}: request {n} from {s.sender}, which held the run at "
                                          f"none of its faults, is not the committed one ({number})")
            for n in by_step[step]:
                s = seen[n - 1]
                if not s.committed:
                    continue
                if n != number and any(f.tag == s.sender and f.kind == "freeze" and run_id in f.held and f.resumed
                                       and f.resumed <= s.wall for f in faults):
                    found.late_sends += 1  # marked in flight before the freeze, sent once resumed
                else:
                    found.duplicates += 1
                    found.problems.append(f"{run_id} {s.state}: request {n} from {s.sender} arrived after the step "
                                          f"was committed")
        found.finisher[run_id] = completed_by.get(run_id) or seen[committed_number(log[-1]) - 1].sender
    return found


def check_fault_run(db: Db, dsn: str, recorder: Recorder, pool: Pool, faults: list[Fault], ids: list[str],
                    figures: Figures) -> None:
    statuses = Counter(r["status"] for r in db.rows("SELECT status FROM orch.runs"))
    acc = account(db, recorder, pool, faults, ids)
    takeovers = db.rows("SELECT * FROM orch.takeovers ORDER BY at")
    by_pid = {w.pid: w.tag for w in pool.all}
    faulted_pids = {f.pid for f in faults}
    problems = list(acc.problems)
    problems += [f"misrouted request {m}" for m in recorder.misrouted]

    # every takeover audited, from a faulted worker, after its lease expired
    for t in takeovers:
        expired = LEASE_EXPIRED.fullmatch(t["why"])
        if not expired and t["why"] != "its lease was ended":
            problems.append(f"takeover of {t['run_id']}: why {t['why']!r}")
        if expired and parse_time(expired.group(1)) > parse_time(t["at"]):
            problems.append(f"takeover of {t['run_id']} at {t['at']} before the lease expired ({t['why']})")
        previous, by = pids_of(t)
        if previous is None or by not in by_pid:
            problems.append(f"takeover of {t['run_id']}: previous {t['previous']!r}, by {t['by_owner']!r}")
        elif previous not in faulted_pids:
            problems.append(f"takeover of {t['run_id']} from {by_pid.get(previous)} (pid {previous}), a worker "
                            f"never killed nor frozen")
    per_run = Counter(t["run_id"] for t in takeovers)
    claimers: dict[str, set[str]] = defaultdict(set)
    lost: dict[str, list[str]] = defaultdict(list)
    for w in pool.all:
        for kind, run_id, _ in w.events():
            if kind in ("claimed", "took_over"):
                claimers[run_id].add(w.tag)
            elif kind == "lost":
                lost[w.tag].append(run_id)
            elif kind != "completed":
                problems.append(f"{w.tag}: {kind} {run_id}")
    # a worker loses only runs it held (or was claiming) when it was frozen: any other loss is a
    # run it claimed after its lease had expired, or a heartbeat that stalled past the TTL
    excused: dict[str, set[str]] = defaultdict(set)
    for f in faults:
        if f.kind == "freeze":
            excused[f.tag] |= f.held | f.claiming
    unexplained = [(tag, run_id) for tag, runs in lost.items() for run_id in runs if run_id not in excused[tag]]
    claimed_late = [f"{tag} reported {run_id} lost, a run it neither held nor was claiming when it was frozen: "
                    f"it claimed it under its expired lease" for tag, run_id in unexplained]
    changed_hands = 0
    for run_id in ids:
        holders = acc.senders[run_id] | claimers[run_id]
        changed_hands += len(holders) > 1
        if per_run[run_id] < len(holders) - 1:
            problems.append(f"{run_id}: held by {sorted(holders)}, {per_run[run_id]} takeover(s) recorded")
    moved: set[str] = set()
    for f in faults:
        worker = pool.by_tag()[f.tag]
        for run_id in sorted(f.held):
            if acc.finisher.get(run_id) == f.tag:
                continue
            moved.add(run_id)
            if not any(t["run_id"] == run_id and f"pid {f.pid} on " in t["previous"] and parse_time(t["at"]) >= f.at
                       for t in takeovers):
                problems.append(f"{run_id}: held by {f.tag} at its {f.kind}, finished by {acc.finisher.get(run_id)}, "
                                f"no takeover from it recorded")
            if f.kind == "freeze" and not worker.killed and run_id not in lost[f.tag]:
                problems.append(f"{run_id}: held by {f.tag} when frozen, not reported lost by it")

    verified, said = audit(dsn)
    unfinished = [w.tag for w in pool.all if not w.killed and w.code != 0]
    figures["runs"] = len(ids)
    figures["workers_started"] = len(pool.all)
    figures["faults"] = len(faults)
    figures["kills"] = sum(f.kind == "kill" for f in faults)
    figures["freezes"] = sum(f.kind == "freeze" for f in faults)
    figures["runs_held_at_faults"] = sum(len(f.held) for f in faults)
    figures["runs_moved_by_faults"] = len(moved)
    figures["runs_changed_hands"] = changed_hands
    figures["takeovers"] = len(takeovers)
    figures["runs_reported_lost"] = sum(len(v) for v in lost.values())
    figures["losses_without_a_freeze"] = len(unexplained)
    figures["self_takeovers"] = sum(pids_of(t)[0] == pids_of(t)[1] for t in takeovers)
    figures["requests"] = len(recorder.seen)
    figures["requests_beyond_committed"] = acc.extra  # calls in flight at a fault, sent again
    figures["late_sends_of_in_flight_calls"] = acc.late_sends
    figures["in_doubt_attempts"] = acc.in_doubt
    figures["other_failed_attempts"] = acc.other_attempts
    figures["duplicates_of_committed_steps"] = acc.duplicates
    figures["audit_verify_exit"] = verified
    shown = f"\nfigures: {figures.values}"

    assert statuses == {"completed": RUNS}, f"statuses {dict(statuses)}{shown}"
    assert len(faults) >= MIN_FAULTS, f"only {len(faults)} faults landed{shown}"
    assert figures.values["kills"] and figures.values["freezes"], shown
    assert len(recorder.seen) == len(recorder.requests), shown
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems[:40]) + shown
    assert acc.duplicates == 0 and acc.other_attempts == 0, shown
    assert len(takeovers) >= len(moved), shown
    assert verified == 0 and f"{RUNS} run(s) checked, 0 with a broken log" in said, said[-2000:] + shown
    assert not unfinished, f"workers exiting non-zero: {[(t, pool.by_tag()[t].code) for t in unfinished]}{shown}"
    assert not claimed_late, "\n".join(claimed_late) + shown


# --------------------------------------------------------------------------- 2. the lease


def test_a_frozen_worker_past_its_lease_commits_nothing(setting: tuple[Db, Path], pg_dsn: str,
                                                        tmp_path: Path, figures: Figures) -> None:
    """Worker w01 (2 runs at a time) sends `lease-1`'s outline call, whose answer the fake holds,
    and is SIGSTOPped; w02 takes the run over only once w01's lease has expired (the takeover
    says so, after the expiry), sends the call again, flagged in doubt, and finishes the run;
    w02 stops. `lease-2` is queued, w01 is SIGCONTed and its held answer released: it commits
    nothing (everything stored about `lease-1` is as w02 left it; the log is the machine's 5
    steps, only the first from w01's requests; it verifies), reports `lease-1` lost, never
    renews its expired lease, and runs `lease-2` under a new lease: claimed once, never lost."""
    db, machine = setting
    recorder = Recorder(pg_dsn, 1)
    try:
        with recorder.serve() as url:
            enqueue(pg_dsn, machine, tmp_path, "lease", 1, recorder)
            pool = Pool(pg_dsn, url, machine, tmp_path, LEASE_TTL_S)
            try:
                held = recorder.gate("lease-1", "outline")
                first = pool.start("--concurrency", "2")
                wait_until("w01's outline request", held.arrived.is_set)
                old_key = db.value("SELECT holder FROM orch.runs WHERE run_id = 'lease-1'")
                os.kill(first.pid, signal.SIGSTOP)
                second = pool.start("--concurrency", "1")
                wait_until("lease-1 completed by w02", lambda: db.status("lease-1") == "completed")
                assert pool.stop(second) == 0, second.output()
                before = db.snapshot("lease-1")

                queued = run_orch("--db", pg_dsn, "enqueue", str(machine), "--run-id", "lease-2", "--input",
                                  str(write(tmp_path / "l2.json", json.dumps({"topic": topic(2)}))))
                assert queued.code == 0, queued.stderr
                recorder.topics["lease-2"] = topic(2)
                os.kill(first.pid, signal.SIGCONT)
                held.release.set()
                wait_until("w01 reporting lease-1 lost", lambda: ("lost", "lease-1") in
                           {(k, r) for k, r, _ in first.events()})
                wait_until("lease-2 completed", lambda: db.status("lease-2") == "completed")
                after = db.snapshot("lease-1")
                assert pool.stop(first) == 0, first.output()
            finally:
                pool.cleanup()
                recorder.release_all()
    finally:
        recorder.close()

    events = first.events()
    (run,), log, attempts, takeovers = after
    figures["rows_written_after_its_lease_expired"] = sum(len(a) - len(b) for a, b in zip(after, before, strict=True))
    assert after == before, "w01 wrote to lease-1 after its lease expired"
    assert [r["from_state"] for r in log] == list(STATES) and run["status"] == "completed"
    senders = [recorder.seen[committed_number(r) - 1].sender for r in log]
    assert senders == ["w01", "w02", "w02", "w02", "w02"], senders
    assert recorder.requests_of("lease-1") == Counter(STATES) + Counter(["outline"])  # re-sent once
    assert [(a["seq"], a["kind"]) for a in attempts] == [(2, "in_doubt")] and log[1]["in_doubt"] == 1
    (takeover,) = takeovers
    assert f"pid {first.pid} on " in takeover["previous"] and f"pid {second.pid}" in takeover["by_owner"]
    expired = LEASE_EXPIRED.fullmatch(takeover["why"])
    assert expired and parse_time(expired.group(1)) <= parse_time(takeover["at"]), takeover
    verified, said = audit(pg_dsn, "lease-1")
    assert verified == 0, said
    lost = [(run_id, why) for kind, run_id, why in events if kind == "lost"]
    assert ("lease-1", LOST_TO_TAKEOVER) in lost, f"w01 did not report lease-1 lost: {lost}"
    assert db.value("SELECT count(*) FROM orch.workers WHERE key = %s AND expires_at > clock_timestamp()",
                    old_key) == 0, "w01's expired lease was renewed"
    assert recorder.requests_of("lease-2") == Counter(STATES)
    # lease-2 was queued while w01 was frozen: w01 must claim it under a new lease, once, from pending
    lease_2 = [(kind, why) for kind, run_id, why in events if run_id == "lease-2"]
    takeovers_2 = db.rows("SELECT at, previous, why FROM orch.takeovers WHERE run_id = 'lease-2' ORDER BY at")
    assert (lease_2, takeovers_2) == ([("claimed", "at step 0"), ("completed", "completed")], []), (
        "w01, resumed, claimed lease-2 under its expired lease (the heartbeat thread had not yet dropped it), "
        "lost it at once and took it over from itself:\n" + "\n".join(f"  {k}: {w}" for k, w in lease_2)
        + "\ntakeovers of lease-2:\n" + "\n".join(f"  {t}" for t in takeovers_2))
    assert [r for r, _ in lost] == ["lease-1"], lost
    assert "stopped: 2 claimed (0 taken over), 1 completed, 0 failed, 0 handed back, 1 lost" in first.output()


def test_append_after_the_lease_expired_raises_and_writes_nothing(pg_dsn: str) -> None:
    """In process: once the store's lease row has expired, `append` (and `mark_in_flight`)
    raise LeaseLostError and leave the run as it was."""

    async def scenario() -> None:
        store = PostgresStore(pg_dsn, lease_ttl_s=30.0)
        try:
            owner = me()
            await store.create_run(new_run(), owner)
            await store.append(row(1), owner)
            async with store._conn() as conn:
                await conn.execute("UPDATE workers SET expires_at = clock_timestamp() - interval '1 s' WHERE key = %s",
                                   (store.lease.key,))
                before = await (await conn.execute("SELECT * FROM runs")).fetchall()
            with pytest.raises(LeaseLostError, match="lease of this process on run run-1 expired"):
                await store.append(row(2), owner)
            with pytest.raises(LeaseLostError):
                await store.mark_in_flight("run-1", owner, seq=2, state="a")
            async with store._conn() as conn:
                assert await (await conn.execute("SELECT * FROM runs")).fetchall() == before
            assert [r.seq for r in await store.transitions("run-1")] == [1]
            assert await store.attempts("run-1") == []
            assert await store.verify_chain("run-1") is None
        finally:
            await store.close()

    asyncio.run(scenario())


# --------------------------------------------------------------------------- 3. SIGTERM


def test_sigterm_hands_the_runs_back(setting: tuple[Db, Path], pg_dsn: str, tmp_path: Path,
                                     figures: Figures) -> None:
    """w01 (4 at a time) has the outline calls of `stop-1..3` held at the fake when SIGTERM
    reaches it; once it shows `stopping` (it claims no more), `stop-4` is queued and the answers
    released. The outline steps commit, the three runs are handed back `pending` (no owner, no
    holder), `stop-4` is left untouched, w01's lease row is gone and it exits 0. w02 then
    completes all four without asking any committed step again and without a takeover."""
    db, machine = setting
    recorder = Recorder(pg_dsn, 3)
    try:
        with recorder.serve() as url:
            ids = enqueue(pg_dsn, machine, tmp_path, "stop", 3, recorder)
            pool = Pool(pg_dsn, url, machine, tmp_path, LEASE_TTL_S)
            try:
                gates = [recorder.gate(run_id, "outline") for run_id in ids]
                first = pool.start("--concurrency", "4")
                for gate in gates:
                    wait_until("the outline requests", gate.arrived.is_set)
                first.proc.send_signal(signal.SIGTERM)
                wait_until_delivered(first.proc, signal.SIGTERM)  # type: ignore[arg-type]
                wait_until("w01 stopping", lambda: db.value("SELECT bool_or(stopping) FROM orch.workers WHERE pid = %s",
                                                             first.pid))
                done = run_orch("--db", pg_dsn, "enqueue", str(machine), "--run-id", "stop-4", "--input",
                                str(write(tmp_path / "s4.json", json.dumps({"topic": topic(4)}))))
                assert done.code == 0, done.stderr
                recorder.topics["stop-4"] = topic(4)
                recorder.release_all()
                first.code = first.proc.wait(timeout=WAIT_S)
                handed = {r["run_id"]: r for r in db.rows("SELECT * FROM orch.runs")}
                steps = {run_id: [r["from_state"] for r in db.rows(
                    "SELECT from_state FROM orch.transitions WHERE run_id = %s ORDER BY seq", run_id)]
                    for run_id in [*ids, "stop-4"]}
                listed = json.loads(run_orch("--db", pg_dsn, "runs", "--json").stdout)
                leases = db.rows("SELECT * FROM orch.workers WHERE pid = %s", first.pid)
                calls_before = {run_id: recorder.requests_of(run_id) for run_id in [*ids, "stop-4"]}

                second = pool.start("--concurrency", "4", "--until-idle")
                second.code = second.proc.wait(timeout=WAIT_S)
            finally:
                pool.cleanup()
                recorder.release_all()
    finally:
        recorder.close()

    figures["runs_handed_back"] = sum(handed[run_id]["status"] == "pending" for run_id in ids)
    output = first.output()
    assert first.code == 0, output
    assert "stopped: 3 claimed (0 taken over), 0 completed, 0 failed, 3 handed back, 0 lost" in output, output
    assert steps == {**{run_id: ["gather", "outline"] for run_id in ids}, "stop-4": []}, steps
    for run_id in ids:
        assert (handed[run_id]["status"], handed[run_id]["owner"], handed[run_id]["holder"]) == ("pending", None, None)
    assert handed["stop-4"]["status"] == "pending" and handed["stop-4"]["lease_epoch"] == 0
    assert {r["run_id"]: r["status"] for r in listed} == dict.fromkeys([*ids, "stop-4"], "pending")
    assert leases == [], leases
    assert calls_before == {**{run_id: Counter(["gather", "outline"]) for run_id in ids}, "stop-4": Counter()}

    assert second.code == 0, second.output()
    assert {r["run_id"]: r["status"] for r in db.rows("SELECT run_id, status FROM orch.runs")} == dict.fromkeys(
        [*ids, "stop-4"], "completed")
    for run_id in [*ids, "stop-4"]:
        assert recorder.requests_of(run_id) == Counter(STATES), (run_id, recorder.requests_of(run_id))
        log = db.rows("SELECT from_state, in_doubt FROM orch.transitions WHERE run_id = %s ORDER BY seq", run_id)
        assert [(r["from_state"], r["in_doubt"]) for r in log] == [(s, 0) for s in STATES]
    assert db.rows("SELECT * FROM orch.takeovers") == [] and db.rows("SELECT * FROM orch.attempts") == []
    assert [(k, r) for k, r, _ in second.events() if k == "claimed"] == [("claimed", r) for r in [*ids, "stop-4"]]
    verified, said = audit(pg_dsn)
    assert verified == 0 and "4 run(s) checked, 0 with a broken log" in said, said
