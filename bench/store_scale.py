"""Store scale: a database of N recorded 10-step runs, and how fast the read commands answer on it.

The issue's target: `orch runs` (first page), `orch log RUN_ID` and `orch show RUN_ID` each
answer in <= 100 ms with 100,000 runs stored. Each command is timed twice: in process
(`statemachine_orch.cli.main`, the query and rendering cost) and as a whole command in a
subprocess (what a user waits for, interpreter start and imports included; `python -c pass`
and the import of the CLI are timed alone for reference). Each command is then run once more
with the SQL it sends captured, and every statement is timed alone and shown with its
EXPLAIN QUERY PLAN, so a slow command names its slow query.

The rows are written through the real code path, not synthesised: the real Engine and
SQLiteStore (synchronous=NORMAL), a 10-state machine with a guard, and an in-process model
that bills like AnthropicModel (so the in-flight mark is written before each call) and answers
with Messages API-shaped responses. Sizes, indexes and the audit chain are therefore those of
real runs; only the network is missing. All runs belong to one machine, the worst case for the
per-machine totals of `orch runs`. created_at values are the real commit times, spread over the
build. 100,000 runs (1,000,000 transition rows) take a few minutes on 2 cores.

    .venv/bin/python bench/store_scale.py [--runs 100000] [--db PATH] [--reps 7]

--db keeps the database at PATH, and reuses it without building when PATH already exists.
Prints one JSON object on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

from pydantic import BaseModel

from statemachine_orch import (
    Completion,
    Engine,
    FlowDecision,
    LLMRequest,
    LLMState,
    Machine,
    RunStatus,
    SQLiteStore,
    StepContext,
    cli,
    guard,
)
from statemachine_orch.llm._client import completion_from_response

STEPS = 10
TARGET_MS = 100.0
TICKET = ("The nightly export to the data warehouse failed three times this week with a timeout after 30 "
          "minutes. We need the March numbers for the board meeting on Friday: can the job be re-run by hand "
          "or split into smaller batches?")


class Ticket(BaseModel):
    text: str


@guard(FlowDecision.CONTINUE, FlowDecision.TERMINATE)
def answered(output: str, ctx: StepContext) -> FlowDecision:
    return FlowDecision.CONTINUE if output else FlowDecision.TERMINATE


MACHINE = Machine("triage", input_model=Ticket, states=[
    LLMState(f"step{k}", prompt=f"Step {k} of the triage. Ticket: {{text}}", max_tokens=256, guard=answered)
    for k in range(STEPS)])


class BillingModel:
    """Answers at once, with a body shaped like a Messages API response; bills like AnthropicModel,
    so the engine writes the in-flight mark before every call as it does for real calls."""

    bills = True

    def __init__(self) -> None:
        self.calls = 0

    async def complete(self, request: LLMRequest) -> Completion:
        self.calls += 1
        text = (f"{request.state}: the export times out on the March batch; splitting it by region keeps "
                "each part under the limit.")
        response = {
            "id": f"msg_{self.calls:024x}", "type": "message", "role": "assistant",
            "model": request.body["model"], "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 87, "output_tokens": 31, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": 0, "service_tier": "standard"},
        }
        return completion_from_response(response, request.tool_name, f"req_{self.calls:024x}")


def build(db: Path, runs: int) -> float:
    """Record `runs` runs through the real engine; returns the seconds it took."""
    engine = Engine(SQLiteStore(db, synchronous="NORMAL"), model=BillingModel())
    t0 = time.perf_counter()
    with engine:
        for i in range(runs):
            result = engine.run(MACHINE, {"text": TICKET})
            if result.status is not RunStatus.COMPLETED:
                raise RuntimeError(f"run {result.run_id} ended {result.status.value}: {result.error}")
            if (i + 1) % max(1, runs // 10) == 0:
                elapsed = time.perf_counter() - t0
                print(f"built {i + 1}/{runs} runs, {elapsed:.0f} s", file=sys.stderr, flush=True)
    return time.perf_counter() - t0


def storage(db: Path) -> dict[str, Any]:
    """File bytes (WAL checkpointed into the file) per transition row, and how much of it is payload."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        runs = conn.execute("SELECT count(*) FROM runs").fetchone()[0]
        steps, payload = conn.execute(
            "SELECT count(*), total(length(CAST(output AS BLOB))) + total(length(CAST(request AS BLOB))) "
            "+ total(length(CAST(response AS BLOB))) FROM transitions").fetchone()
    size = sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())
    return {"runs": runs, "transitions": steps, "db_bytes": size, "bytes_per_step": round(size / steps, 1),
            "payload_bytes_per_step": round(payload / steps, 1)}


def middle_run(db: Path) -> str:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        (count,) = conn.execute("SELECT count(*) FROM runs").fetchone()
        (run_id,) = conn.execute("SELECT run_id FROM runs ORDER BY created_at LIMIT 1 OFFSET ?",
                                 (count // 2,)).fetchone()
    return str(run_id)


def _ms(samples: list[float]) -> dict[str, Any]:
    return {"median_ms": round(statistics.median(samples), 2), "samples_ms": [round(s, 2) for s in samples]}


def time_in_process(argv: list[str], reps: int) -> dict[str, Any]:
    """`cli.main(argv)` with stdout captured; one untimed call first (its time is `first_ms`)."""
    samples = []
    for _ in range(reps + 1):
        with contextlib.redirect_stdout(io.StringIO()):
            t0 = time.perf_counter()
            code = cli.main(argv)
            samples.append((time.perf_counter() - t0) * 1000)
        if code != 0:
            raise RuntimeError(f"orch {' '.join(argv)} exited {code}")
    return {"first_ms": round(samples[0], 2), **_ms(samples[1:])}


def orch_command() -> list[str]:
    script = Path(sys.executable).parent / "orch"
    return [str(script)] if script.exists() else [sys.executable, "-m", "statemachine_orch.cli"]


def time_process(cmd: list[str], reps: int) -> dict[str, Any]:
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True)
        samples.append((time.perf_counter() - t0) * 1000)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.decode()[-500:]}")
    return _ms(samples)


@contextlib.contextmanager
def captured_sql() -> Iterator[list[str]]:
    """Every SQL statement (parameters filled in) sent on the connections opened meanwhile."""
    statements: list[str] = []
    connect = sqlite3.connect

    def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn: sqlite3.Connection = connect(*args, **kwargs)
        conn.set_trace_callback(statements.append)
        return conn

    with mock.patch("sqlite3.connect", traced):
        yield statements


def explain(db: Path, argv: list[str], reps: int) -> list[dict[str, Any]]:
    """The queries `orch argv` sends, slowest first, each timed alone (median) with its query plan."""
    with captured_sql() as statements, contextlib.redirect_stdout(io.StringIO()):
        cli.main(argv)
    queries = list(dict.fromkeys(s for s in statements if s.lstrip().upper().startswith(("SELECT", "WITH"))))
    out = []
    with contextlib.closing(sqlite3.connect(db)) as conn:
        for sql in queries:
            plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql)]
            samples = []
            for _ in range(reps):
                t0 = time.perf_counter()
                conn.execute(sql).fetchall()
                samples.append((time.perf_counter() - t0) * 1000)
            out.append({"sql": sql, "times_sent": statements.count(sql),
                        "median_ms": round(statistics.median(samples), 3), "plan": plan})
    return sorted(out, key=lambda q: -q["median_ms"])


def measure(db: Path, reps: int) -> dict[str, Any]:
    run_id = middle_run(db)
    commands = {"runs": ["runs"], "log": ["log", run_id], "show": ["show", run_id]}
    results: dict[str, Any] = {}
    for name, args in commands.items():
        argv = ["--db", str(db), *args]
        in_process = time_in_process(argv, reps)
        process = time_process([*orch_command(), *argv], reps)
        results[name] = {
            "argv": args, "in_process": in_process, "process": process,
            "in_process_target_met": in_process["median_ms"] <= TARGET_MS,
            "process_target_met": process["median_ms"] <= TARGET_MS,
            "queries": explain(db, argv, reps),
        }
    startup = {
        "python_start": time_process([sys.executable, "-c", "pass"], reps),
        "python_import_cli": time_process([sys.executable, "-c", "import statemachine_orch.cli"], reps),
    }
    return {"run_id": run_id, "commands": results, "startup": startup, "import_ms": import_profile(reps)}


def import_profile(reps: int, top: int = 8) -> dict[str, float]:
    """Where the CLI's import time goes: `-X importtime` self times summed per top-level package,
    median over `reps` interpreters; the slowest `top` packages and the total."""
    runs = []
    for _ in range(reps):
        err = subprocess.run([sys.executable, "-X", "importtime", "-c", "import statemachine_orch.cli"],
                             capture_output=True, text=True, check=True).stderr
        per_package: dict[str, float] = {}
        for line in err.splitlines():
            fields = line.removeprefix("import time:").split("|")
            if len(fields) == 3 and fields[0].strip().isdigit():
                package = fields[2].strip().split(".")[0]
                per_package[package] = per_package.get(package, 0.0) + int(fields[0]) / 1000
        runs.append(per_package)
    medians = {p: statistics.median(r.get(p, 0.0) for r in runs) for p in set().union(*runs)}
    slowest = sorted(medians.items(), key=lambda kv: -kv[1])[:top]
    return {**{p: round(ms, 1) for p, ms in slowest},
            "total": round(statistics.median(sum(r.values()) for r in runs), 1)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=100_000, help="runs to record (default 100000)")
    ap.add_argument("--db", type=Path, help="keep the database here; reused without building if it exists")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions per command (default 7)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="store_scale_") as tmp:
        db: Path = args.db or Path(tmp) / "scale.db"
        build_s = None
        if db.exists():
            print(f"reusing {db} (not rebuilt)", file=sys.stderr)
        else:
            build_s = build(db, args.runs)
        sizes = storage(db)
        result = {
            "target_ms": TARGET_MS, "steps_per_run": STEPS, **sizes,
            "build_s": None if build_s is None else round(build_s, 2),
            "build_us_per_step": None if build_s is None else round(build_s / sizes["transitions"] * 1e6, 1),
            "db": str(db) if args.db else None,
            "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
            **measure(db, args.reps),
        }
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
