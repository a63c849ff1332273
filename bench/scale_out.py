"""Scale-out on PostgreSQL (issue 14): 1 -> 2 -> 4 `orch worker` processes on one host against
the loopback fake answering every call after 200 ms (target: >= 3.5x the steps/s of one worker
at 4), and the per-step cost of the PostgreSQL store against the SQLite store.

    .venv/bin/python bench/scale_out.py [--runs 192] [--workers 1,2,4] [--concurrency 8] [--answer-ms 200]
        [--modes warm,cold] [--overhead-runs 100] [--reps 5] [--dsn DSN] [--json]

1. Throughput: RUNS runs of a 3-LLM-state machine are queued with `orch enqueue`, then W
   `orch worker --concurrency C` processes (the real command, the real SDK over HTTP to the
   fake) drive them until every run is completed; a fresh database per W. Each worker's
   concurrency is the constraint (C slots, each busy 200 ms per step), so W workers should
   give W x the steps/s. Two ways of timing it, each reported with its own ratios:
   - warm: the W workers are started on an empty queue and wait until each one LISTENs; the
     runs, queued beforehand on a parked queue, are moved to theirs in one UPDATE (with the
     NOTIFY that `orch enqueue` sends), and the clock runs from that commit until the
     database says every run is completed. Start-up is outside the clock, so this is the
     throughput the workers sustain; its ratios are the ones judged against the target.
   - cold: the runs are queued first, then the W `orch worker --until-idle` processes are
     started, and the clock runs from their start until the last one exits: interpreter
     start and imports (about 2 s of CPU each, on 2 cores shared by W of them) included.
   The default RUNS (192) is a multiple of 4 x 8 slots, so no worker count ends on a part-full
   wave. Every run must be completed, and the fake must have been asked each (run, state)
   exactly once: the counts are in the JSON (requests, duplicates, missing).
   CPU per step is reported for the workers (warm: over the timed window only), the server
   (when this script started it: its processes' CPU read from /proc) and this process
   (the fake and the poller).
2. Per-step overhead: the same machine driven in this process by the engine with a model that
   answers at once (and bills, so each call is marked in flight and its answer kept, as with
   the API), and a machine of three Python states (one write per step: the store's cost
   alone); sequentially (one run at a time) and with OVERHEAD_CONCURRENCY runs at once; on no
   store (the engine alone), SQLite (a file, synchronous=FULL and NORMAL) and PostgreSQL.
   The backends are interleaved rep by rep; medians of REPS. µs per durable step is wall
   time / steps; CPU per step is this process's, plus the server's where it is known.

PostgreSQL: --dsn, else ORCH_TEST_PG_DSN, else this script starts two throwaway servers with
.ci/postgres.sh (and stops them): `pg` with that script's settings (fsync, synchronous_commit
and full_page_writes off: a test server) and `pg_durable` with them on (ALTER SYSTEM, as a
production server runs); the throughput runs on `pg_durable`. A server given by DSN is used
as it is, for everything (its settings are read back into the JSON), and there is no
`pg_durable` row.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import resource
import secrets
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from batch_throughput import MACHINE, STATES  # the same machine as issue 13's benchmark (bench/ is on the path)
from psycopg import sql
from pydantic import BaseModel

from statemachine_orch import Completion, Engine, LLMRequest, Machine, PythonState, RunStatus, SQLiteStore
from statemachine_orch.definition._loader import load_machine
from statemachine_orch.llm._client import completion_from_response
from statemachine_orch.llm._offline import loopback_server
from statemachine_orch.store._open import open_store
from statemachine_orch.store.postgres._pool import NOTIFY_CHANNEL
from statemachine_orch.testing import CapturedRequest, FakeMessagesAPI, Reply

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "postgres.sh"
QUEUE, PARKED = "bench", "parked"
DURABLE = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
SHOWN = ("server_version", "fsync", "synchronous_commit", "full_page_writes", "wal_sync_method", "shared_buffers")
TICK = os.sysconf("SC_CLK_TCK")
TARGET_4X = 3.5


def say(line: str) -> None:
    print(f"scale_out.py: {line}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- servers


@dataclass
class Server:
    """A PostgreSQL server: its DSN, and where this script started it, its data directory."""

    name: str
    dsn: str
    directory: Path | None = None  # None: given by DSN (not ours: its CPU is not read, its settings not changed)
    made: list[str] = field(default_factory=list)

    def database(self) -> str:
        """A new empty database on the server: its DSN."""
        name = f"bench_{secrets.token_hex(5)}"
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self.made.append(name)
        return urlunsplit(urlsplit(self.dsn)._replace(path=f"/{name}"))

    def drop_databases(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for name in self.made:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        self.made.clear()

    def settings(self) -> dict[str, str]:
        with psycopg.connect(self.dsn) as conn:
            return {name: str(conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()[0])
                    for name in SHOWN}

    def cpu_s(self) -> float | None:
        """CPU seconds of the server's processes so far (the postmaster, the children it reaped,
        and the live ones: backends, WAL writer, checkpointer...); None for a server given by DSN."""
        if self.directory is None:
            return None
        try:
            postmaster = int((self.directory / "data" / "postmaster.pid").read_text().split()[0])
            fields = _stat(postmaster)
        except (OSError, ValueError, IndexError):
            return None
        total = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    child = _stat(int(entry.name))
                except (OSError, IndexError):
                    continue
                if int(child[1]) == postmaster:
                    total += int(child[11]) + int(child[12])
        return total / TICK


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat from field 3 on (after the command name): state, ppid, ..., utime is [11]."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()


def process_cpu_s(pid: int) -> float:
    try:
        fields = _stat(pid)
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


@contextlib.contextmanager
def servers(dsn: str | None) -> Iterator[dict[str, Server]]:
    """{"pg": ..., "pg_durable": ...} of our own throwaway servers, or {"pg": the one given}."""
    if dsn:
        if urlsplit(dsn).scheme not in ("postgresql", "postgres"):
            raise SystemExit(f"scale_out.py: --dsn {dsn!r} is not a postgresql:// URL (orch --db needs one)")
        given = Server("pg", dsn)
        try:
            yield {"pg": given}
        finally:
            given.drop_databases()
        return
    started: list[Server] = []
    stop_on_term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops them
    try:
        for name in ("pg", "pg_durable"):
            directory = Path(tempfile.mkdtemp(prefix=f"orch-bench-{name}-"))  # the system's: root runs it as postgres
            directory.rmdir()
            out = subprocess.run(["bash", str(SCRIPT), "start", str(directory)], capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"scale_out.py: .ci/postgres.sh start failed:\n{out.stderr.strip()}")
            started.append(Server(name, out.stdout.strip(), directory))
        durable = started[1]
        with psycopg.connect(durable.dsn, autocommit=True) as conn:
            for setting, value in DURABLE.items():
                conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(setting), sql.Literal(value)))
            conn.execute("SELECT pg_reload_conf()")
        for _ in range(100):  # the reload is asynchronous: wait until a new session sees it
            if all(durable.settings()[k] == v for k, v in DURABLE.items()):
                break
            time.sleep(0.05)
        else:
            raise SystemExit(f"scale_out.py: {durable.dsn} did not take {DURABLE}: {durable.settings()}")
        yield {server.name: server for server in started}
    finally:
        for server in started:
            subprocess.run(["bash", str(SCRIPT), "stop", str(server.directory)], capture_output=True)
        signal.signal(signal.SIGTERM, stop_on_term)


# --------------------------------------------------------------------------- 1. throughput


@contextlib.contextmanager
def serving(fake: FakeMessagesAPI, *, nodelay: bool) -> Iterator[str]:
    """`fake.serve()`, with TCP_NODELAY on the fake's sockets when `nodelay`: its handler writes
    the headers and the body in two sends, so with Nagle's algorithm on, the body waits for the
    client's delayed ACK (about 40 ms on Linux) and every answer comes that much late."""
    server = loopback_server(fake, "127.0.0.1", 0)
    server.RequestHandlerClass.disable_nagle_algorithm = nodelay  # a class of this server's own
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
    if fake.errors:
        raise fake.errors[0]


def fake_round_trip_ms(nodelay: bool, calls: int = 20) -> float:
    """The median time of one call through the SDK to a fake that answers at once."""
    import anthropic

    fake = FakeMessagesAPI(default="ok")
    samples = []
    with serving(fake, nodelay=nodelay) as url:
        client = anthropic.Anthropic(base_url=url, api_key="bench-key-not-secret", max_retries=0)
        for _ in range(calls + 1):
            started = time.perf_counter()
            client.messages.create(model="claude-bench", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
            samples.append((time.perf_counter() - started) * 1000)
        client.close()
    return round(statistics.median(samples[1:]), 2)


def orch(dsn: str, *args: str, env: dict[str, str] | None = None, **popen: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "statemachine_orch.cli", "--db", dsn, *args],
                            env={**os.environ, **(env or {})}, **popen)


def checked(process: subprocess.Popen[bytes], what: str) -> None:
    _, err = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"scale_out.py: {what} exited {process.returncode}: {(err or b'').decode()[-2000:]}")


def enqueue(dsn: str, folder: Path, runs: int, queue: str) -> None:
    path = folder / "inputs.jsonl"
    path.write_text("".join(json.dumps({"text": f"ticket {n}: the order arrived late"}) + "\n" for n in range(runs)))
    checked(orch(dsn, "enqueue", str(folder / "tickets.py"), "--inputs", str(path), "--run-id", "bench",
                 "--queue", queue, "--json", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), "orch enqueue")


def statuses(conn: psycopg.Connection[Any]) -> Counter[str]:
    return Counter(dict(conn.execute("SELECT status, count(*) FROM orch.runs GROUP BY status").fetchall()))


def stopped_line(log: Path) -> dict[str, int]:
    """The numbers of the worker's last line ("stopped: 40 claimed (0 taken over), 40 completed, ...")."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("orch worker: stopped:")]
    if not lines:
        return {}
    words = lines[-1].replace("(", "").replace(")", "").replace(",", "").split()
    return {words[i + 1]: int(words[i]) for i in range(len(words) - 1) if words[i].isdigit()}


def throughput_pass(server: Server, folder: Path, *, mode: str, workers: int, runs: int, concurrency: int,
                    answer_s: float, poll_s: float, nodelay: bool, jitter_s: float) -> dict[str, Any]:
    """One worker count, one mode, a fresh database: the figures and the checks."""
    dsn = server.database()
    draw = random.Random(workers)

    def answer(request: CapturedRequest) -> Reply:
        return Reply(text="ok", hold_s=answer_s + draw.uniform(-jitter_s, jitter_s) if jitter_s else answer_s)

    fake = FakeMessagesAPI(default=answer)
    steps = runs * len(STATES)
    logs = [folder / f"worker-{mode}-{workers}-{n}.log" for n in range(workers)]
    procs: list[subprocess.Popen[bytes]] = []
    ready: list[float] = []
    conn = psycopg.connect(dsn, autocommit=True)
    try:
        with serving(fake, nodelay=nodelay) as url:
            env = {"ANTHROPIC_BASE_URL": url, "ANTHROPIC_API_KEY": "bench-key-not-secret"}
            command = ["worker", str(folder / "tickets.py"), "--queue", QUEUE, "--concurrency", str(concurrency),
                       "--poll", str(poll_s), *(["--until-idle"] if mode == "cold" else [])]
            enqueue(dsn, folder, runs, PARKED if mode == "warm" else QUEUE)
            children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
            self_before, server_before = time.process_time(), server.cpu_s()
            launched = time.monotonic()
            procs = [orch(dsn, *command, env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb")) for log in logs]
            if mode == "cold":  # the clock runs from the launch until the last worker exits
                started = launched
                for proc in procs:
                    proc.wait()
                finished = time.monotonic()
                self_cpu, server_after = time.process_time() - self_before, server.cpu_s()
                children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
                worker_cpu = (children_after.ru_utime - children_before.ru_utime
                              + children_after.ru_stime - children_before.ru_stime)
            else:  # from the commit that hands the parked runs to the listening workers until all are completed
                ready = wait_until_listening(conn, procs, logs, launched)
                cpu_before = [process_cpu_s(p.pid) for p in procs]
                self_before, server_before = time.process_time(), server.cpu_s()
                with conn.transaction():
                    conn.execute("UPDATE orch.runs SET queue = %s WHERE queue = %s", (QUEUE, PARKED))
                    conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, QUEUE))
                started = time.monotonic()
                while (found := statuses(conn))["completed"] < runs:
                    if any(p.poll() is not None for p in procs) or set(found) - {"completed", "running", "pending"}:
                        break  # a worker died or a run failed: reported below, not waited for
                    time.sleep(0.02)
                finished = time.monotonic()
                worker_cpu = sum(process_cpu_s(p.pid) for p in procs) - sum(cpu_before)
                self_cpu, server_after = time.process_time() - self_before, server.cpu_s()
                for proc in procs:
                    proc.send_signal(signal.SIGTERM)
                for proc in procs:
                    proc.wait(timeout=60)
        found = statuses(conn)
        committed = conn.execute("SELECT count(*) FROM orch.transitions WHERE to_state IS NOT NULL").fetchone()[0]
    finally:
        conn.close()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    asked = Counter((r.run_id, r.state) for r in fake.requests)
    expected = {(f"bench-{n}", state) for n in range(1, runs + 1) for state in STATES}
    wall = finished - started
    ideal = steps * answer_s / (workers * concurrency)
    server_cpu = None if server_before is None or server_after is None else server_after - server_before
    return {
        "workers": workers, "wall_s": round(wall, 3), "steps_per_s": round(steps / wall, 2),
        "ideal_s": round(ideal, 3), "efficiency": round(ideal / wall, 4),
        "runs": runs, "completed": found["completed"], "statuses": dict(found), "steps_committed": committed,
        "requests": len(fake.requests), "duplicates": sum(n - 1 for n in asked.values() if n > 1),
        "missing": len(expected - set(asked)), "unexpected": len(set(asked) - expected),
        "exit_codes": [p.returncode for p in procs],
        "completed_per_worker": [stopped_line(log).get("completed") for log in logs],
        "startup_s": [round(t - launched, 2) for t in ready] if ready else None,
        # CPU per step: warm, over the timed window only; cold, the whole commands (start-up included)
        "worker_cpu_ms_per_step": round(worker_cpu / steps * 1000, 3),
        "server_cpu_ms_per_step": None if server_cpu is None else round(server_cpu / steps * 1000, 3),
        "bench_cpu_ms_per_step": round(self_cpu / steps * 1000, 3),
    }


def wait_until_listening(conn: psycopg.Connection[Any], procs: list[subprocess.Popen[bytes]], logs: list[Path],
                         launched: float, timeout_s: float = 120.0) -> list[float]:
    """Wait until every worker printed its banner and the database has as many LISTENing
    sessions as workers; each one's seconds from launch to its banner."""
    ready: dict[int, float] = {}
    while time.monotonic() - launched < timeout_s:
        for n, log in enumerate(logs):
            if n not in ready and "serving queue" in log.read_text(errors="replace"):
                ready[n] = time.monotonic()
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise SystemExit(f"scale_out.py: a worker exited {dead[0].returncode} before work arrived: "
                             + logs[procs.index(dead[0])].read_text(errors="replace")[-2000:])
        if len(ready) == len(procs):
            listening = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                     "AND query LIKE 'LISTEN %%'").fetchone()[0]
            if listening >= len(procs):
                return [ready[n] for n in range(len(procs))]
        time.sleep(0.02)
    raise SystemExit(f"scale_out.py: the workers were not listening after {timeout_s:g} s")


def throughput(server: Server, *, modes: list[str], workers: list[int], runs: int, concurrency: int,
               answer_s: float, poll_s: float, reps: int, nodelay: bool, jitter_s: float = 0.0) -> dict[str, Any]:
    """Every worker count in every mode, `reps` times (the worker counts interleaved within a rep):
    each pass, the median steps/s per worker count, and the speed-ups of the medians."""
    result: dict[str, Any] = {"server": server.name, "settings": server.settings(), "runs": runs,
                              "steps_per_run": len(STATES), "concurrency": concurrency,
                              "answer_ms": answer_s * 1000, "jitter_ms": jitter_s * 1000, "reps": reps,
                              "fake_nodelay": nodelay,
                              "fake_round_trip_ms": {"nodelay": fake_round_trip_ms(True),
                                                     "as_served_by_fake_serve": fake_round_trip_ms(False)},
                              "modes": {}}
    with tempfile.TemporaryDirectory(prefix="orch-scale-out-") as tmp:
        folder = Path(tmp)
        (folder / "tickets.py").write_text(MACHINE)
        for mode in modes:
            passes = []
            for rep in range(reps):
                for count in workers:
                    say(f"throughput, {mode}, rep {rep + 1}/{reps}: {count} worker(s), {runs} runs")
                    passes.append({"rep": rep + 1, **throughput_pass(
                        server, folder, mode=mode, workers=count, runs=runs, concurrency=concurrency,
                        answer_s=answer_s, poll_s=poll_s, nodelay=nodelay, jitter_s=jitter_s)})
            median = {count: statistics.median(p["steps_per_s"] for p in passes if p["workers"] == count)
                      for count in workers}
            base = workers[0]
            result["modes"][mode] = {
                "passes": passes,
                "steps_per_s": {str(count): round(value, 2) for count, value in median.items()},
                "efficiency": {str(count): round(statistics.median(p["efficiency"] for p in passes
                                                                   if p["workers"] == count), 4)
                               for count in workers},
                "speedup": {f"{count}/{base}": round(median[count] / median[base], 3) for count in workers[1:]},
                "speedup_per_rep": [{f"{count}/{base}": round(
                    next(p for p in passes if p["rep"] == rep + 1 and p["workers"] == count)["steps_per_s"]
                    / next(p for p in passes if p["rep"] == rep + 1 and p["workers"] == base)["steps_per_s"], 3)
                    for count in workers[1:]} for rep in range(reps)],
            }
    every = [p for m in result["modes"].values() for p in m["passes"]]
    result["all_completed"] = all(p["completed"] == p["runs"] and p["steps_committed"] == p["runs"] * len(STATES)
                                  and p["exit_codes"] == [0] * p["workers"] for p in every)
    result["no_duplicates"] = all(p["duplicates"] == 0 and p["missing"] == 0 and p["unexpected"] == 0 for p in every)
    four = result["modes"].get("warm", {}).get("speedup", {}).get(f"4/{workers[0]}") if workers[0] == 1 else None
    result["target"] = {"speedup_4_over_1": TARGET_4X, "measured": four,
                        "met": None if four is None else four >= TARGET_4X}
    return result


# --------------------------------------------------------------------------- 2. per-step overhead


class Ticket(BaseModel):
    text: str


class InstantModel:
    """Answers at once with a Messages API-shaped body; bills, so the engine marks each call in
    flight and keeps its answer before the step commits, as with the API."""

    bills = True

    def __init__(self) -> None:
        self.calls = 0

    async def complete(self, request: LLMRequest) -> Completion:
        self.calls += 1
        response = {"id": f"msg_{self.calls:024x}", "type": "message", "role": "assistant",
                    "model": request.body["model"], "content": [{"type": "text", "text": f"{request.state}: ok"}],
                    "stop_reason": "end_turn", "usage": {"input_tokens": 12, "output_tokens": 3}}
        return completion_from_response(response, request.tool_name, f"req_{self.calls:024x}")


def python_machine() -> Machine:
    def step(ctx: Any) -> dict[str, Any]:
        return {"state": ctx.state, "text": f"{ctx.input.text}: ok"}

    return Machine("tickets_py", input_model=Ticket, states=[PythonState(name, run=step) for name in STATES])


BACKENDS = ("none", "sqlite_full", "sqlite_normal", "pg", "pg_durable")


async def overhead_async(stores: dict[str, Any], cpu: dict[str, Any], machines: dict[str, Machine], *, runs: int,
                         concurrency: int, reps: int, warmup: int) -> list[dict[str, Any]]:
    engines = {name: Engine(store, model=InstantModel()) for name, store in stores.items()}
    samples: dict[tuple[str, str, str], list[tuple[float, float, float | None]]] = {}
    counter = [0]

    async def drive(engine: Engine, machine: Machine, count: int, at_once: int) -> None:
        gate = asyncio.Semaphore(at_once)

        async def one() -> None:
            counter[0] += 1
            run_id = f"r{counter[0]}"
            async with gate:
                result = await engine.arun(machine, {"text": f"ticket {counter[0]}"}, run_id=run_id)
            if result.status is not RunStatus.COMPLETED:
                raise SystemExit(f"scale_out.py: run {run_id} ended {result.status.value}: {result.error}")

        if at_once == 1:
            for _ in range(count):
                await one()
        else:
            await asyncio.gather(*(one() for _ in range(count)))

    for engine in engines.values():  # warm-up: pools opened, statements prepared, caches filled
        for machine in machines.values():
            await drive(engine, machine, warmup, min(concurrency, warmup))
    for rep in range(reps):
        say(f"per-step overhead, rep {rep + 1}/{reps}")
        for machine_name, machine in machines.items():
            for drive_name, at_once in (("sequential", 1), ("concurrent", concurrency)):
                for name, engine in engines.items():
                    server = cpu.get(name)
                    server_before = server.cpu_s() if server is not None else None
                    cpu_before, started = time.process_time(), time.perf_counter()
                    await drive(engine, machine, runs, at_once)
                    wall, client = time.perf_counter() - started, time.process_time() - cpu_before
                    server_s = None if server_before is None else server.cpu_s() - server_before
                    samples.setdefault((machine_name, drive_name, name), []).append((wall, client, server_s))
    for engine in engines.values():
        await engine.aclose()
    steps = runs * len(STATES)
    rows = []
    for (machine_name, drive_name, name), values in samples.items():
        walls = [w / steps * 1e6 for w, _, _ in values]
        clients = [c / steps * 1e6 for _, c, _ in values]
        servers_ = [s / steps * 1e6 for _, _, s in values if s is not None]
        rows.append({"machine": machine_name, "drive": drive_name, "backend": name,
                     "us_per_step": round(statistics.median(walls), 1), "samples_us": [round(w, 1) for w in walls],
                     "client_cpu_us_per_step": round(statistics.median(clients), 1),
                     "server_cpu_us_per_step": round(statistics.median(servers_), 1) if servers_ else None})
    return rows


def overhead(pg: dict[str, Server], *, runs: int, concurrency: int, reps: int, warmup: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="orch-overhead-") as tmp:
        folder = Path(tmp)
        (folder / "tickets.py").write_text(MACHINE)
        machines = {"llm": load_machine(str(folder / "tickets.py")).machine, "python": python_machine()}
        stores: dict[str, Any] = {"none": None,
                                  "sqlite_full": SQLiteStore(folder / "full.db", synchronous="FULL"),
                                  "sqlite_normal": SQLiteStore(folder / "normal.db", synchronous="NORMAL")}
        for name, server in pg.items():
            stores[name] = open_store(server.database())
        rows = asyncio.run(overhead_async(stores, {n: s for n, s in pg.items()}, machines, runs=runs,
                                          concurrency=concurrency, reps=reps, warmup=warmup))
    by = {(r["machine"], r["drive"], r["backend"]): r for r in rows}
    ratios: dict[str, dict[str, float | None]] = {}
    pairs = (("pg/sqlite_normal", "pg", "sqlite_normal"), ("pg/sqlite_full", "pg", "sqlite_full"),
             ("pg_durable/sqlite_full", "pg_durable", "sqlite_full"),
             ("pg_durable/sqlite_normal", "pg_durable", "sqlite_normal"))
    for machine_name in ("llm", "python"):
        for drive_name in ("sequential", "concurrent"):
            key = f"{machine_name}/{drive_name}"
            ratios[key] = {}
            for label, a, b in pairs:
                top, bottom = by.get((machine_name, drive_name, a)), by.get((machine_name, drive_name, b))
                if top and bottom:
                    ratios[key][label] = round(top["us_per_step"] / bottom["us_per_step"], 3)
                    base = by[(machine_name, drive_name, "none")]["us_per_step"]
                    store_a, store_b = top["us_per_step"] - base, bottom["us_per_step"] - base
                    ratios[key][label + " (store share)"] = round(store_a / store_b, 3) if store_b > 0 else None
    return {"runs": runs, "steps_per_run": len(STATES), "concurrency": concurrency, "reps": reps, "warmup": warmup,
            "settings": {name: server.settings() for name, server in pg.items()}, "rows": rows, "ratios": ratios}


# --------------------------------------------------------------------------- main


def machine_info() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "?"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += " + uncommitted changes"
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    return {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit, "cpu": cpu,
            "cores": os.cpu_count(), "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
            "load_average": [round(load, 2) for load in os.getloadavg()]}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dsn", default=os.environ.get("ORCH_TEST_PG_DSN") or None,
                    help="a PostgreSQL server to use as it is (default ORCH_TEST_PG_DSN, else two throwaway ones)")
    ap.add_argument("--runs", type=int, default=192, help="runs queued per worker count (default 192 = 6 x 4 x 8)")
    ap.add_argument("--workers", default="1,2,4", help="worker counts, comma-separated (default 1,2,4)")
    ap.add_argument("--concurrency", type=int, default=8, help="--concurrency of each worker (default 8)")
    ap.add_argument("--answer-ms", type=float, default=200.0, help="the fake's delay before each answer")
    ap.add_argument("--jitter-ms", type=float, default=0.0,
                    help="each answer's delay drawn from answer-ms +/- this (default 0: the runs move in lock-step)")
    ap.add_argument("--poll", type=float, default=1.0, help="the workers' --poll (default 1 s)")
    ap.add_argument("--modes", default="warm,cold", help="throughput timings: warm, cold or both (default)")
    ap.add_argument("--fake-nagle", action="store_true",
                    help="serve the fake as FakeMessagesAPI.serve() does: no TCP_NODELAY (answers ~40 ms late)")
    ap.add_argument("--throughput-reps", type=int, default=1, help="reps of every worker count (default 1)")
    ap.add_argument("--throughput-server", choices=["pg", "pg_durable"],
                    help="which of our two servers the workers use (default pg_durable; a --dsn server is the one)")
    ap.add_argument("--overhead-runs", type=int, default=100, help="runs per backend, per rep (default 100)")
    ap.add_argument("--overhead-concurrency", type=int, default=16, help="runs at once when concurrent (default 16)")
    ap.add_argument("--reps", type=int, default=5, help="reps of the per-step overhead (default 5)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed runs per backend first (default 10)")
    ap.add_argument("--skip", choices=["throughput", "overhead"], action="append", default=[],
                    help="leave a part out")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - {"warm", "cold"}:
        raise SystemExit(f"scale_out.py: --modes {args.modes}: warm and/or cold")
    workers = [int(w) for w in args.workers.split(",") if w]
    figures: dict[str, Any] = {"machine": machine_info()}
    with servers(args.dsn) as pg:
        figures["postgres"] = {name: {"given_by_dsn": server.directory is None, **server.settings()}
                               for name, server in pg.items()}
        if "throughput" not in args.skip:
            server = pg.get(args.throughput_server or "pg_durable", pg["pg"])
            figures["throughput"] = throughput(server, modes=modes, workers=workers, runs=args.runs,
                                               concurrency=args.concurrency, answer_s=args.answer_ms / 1000,
                                               poll_s=args.poll, reps=args.throughput_reps,
                                               nodelay=not args.fake_nagle, jitter_s=args.jitter_ms / 1000)
        if "overhead" not in args.skip:
            figures["overhead"] = overhead(pg, runs=args.overhead_runs, concurrency=args.overhead_concurrency,
                                           reps=args.reps, warmup=args.warmup)
    figures["machine"]["load_average_end"] = [round(load, 2) for load in os.getloadavg()]
    if args.json:
        print(json.dumps(figures))
    else:
        print_figures(figures)
    checks = figures.get("throughput", {})
    return 0 if checks.get("all_completed", True) and checks.get("no_duplicates", True) else 1


def print_figures(figures: dict[str, Any]) -> None:
    t = figures.get("throughput")
    if t:
        print(f"throughput: {t['runs']} runs x {t['steps_per_run']} steps, {t['answer_ms']:g} ms answers, "
              f"--concurrency {t['concurrency']} per worker, server {t['server']}")
        for mode, m in t["modes"].items():
            for p in m["passes"]:
                print(f"  {mode} rep {p['rep']}, {p['workers']} worker(s): {p['steps_per_s']:.1f} steps/s "
                      f"({p['wall_s']:.2f} s, "
                      f"{p['efficiency']:.0%} of ideal), completed {p['completed']}/{p['runs']}, "
                      f"duplicates {p['duplicates']}, per worker {p['completed_per_worker']}, CPU ms/step "
                      f"workers {p['worker_cpu_ms_per_step']} server {p['server_cpu_ms_per_step']} "
                      f"bench {p['bench_cpu_ms_per_step']}")
            print(f"  {mode} median steps/s: {m['steps_per_s']}, speed-up: "
                  + ", ".join(f"{k} {v:.2f}x" for k, v in m["speedup"].items()))
    o = figures.get("overhead")
    if o:
        print(f"per-step overhead: {o['runs']} runs x {o['steps_per_run']} steps, median of {o['reps']}")
        for r in o["rows"]:
            print(f"  {r['machine']:6} {r['drive']:10} {r['backend']:13} {r['us_per_step']:8.1f} µs/step "
                  f"(client CPU {r['client_cpu_us_per_step']}, server CPU {r['server_cpu_us_per_step']})")
        for key, values in o["ratios"].items():
            print(f"  {key}: " + ", ".join(f"{k} {v}" for k, v in values.items()))


if __name__ == "__main__":
    sys.exit(main())
