"""statemachine_orch row for the engine-overhead anchors (../shared/bench-anchors/common.py).

The workload goes through the real engine: a machine of LLM states named out0..outN (the
`transitions` FSM, the guard, the transition table, the step records), with an in-process
model client instead of HTTP (`fake_llm` / `fake_llm_async` give the answers):
  A: no persistence (NullStore), tracing off            -> bench_orch.py
     the same with structlog JSON lines to a file       -> ORCH_BENCH_TRACE=1 (+ ORCH_BENCH_TRACE_FILE)
  B: SQLiteStore, one commit per transition with the audit row, the output, the LLM call
     record and the snapshot; synchronous=NORMAL like the floor (ORCH_BENCH_SYNC=FULL for ours)
  C: 1000 concurrent runs of 5 steps, each call awaiting 50 ms, no persistence
  D: C on a SQLiteStore with synchronous=FULL: the engine awaits each transition's commit
     before the next step starts (verify_D counts the committed log rows)
Run through the harness: see bench/README.md.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import structlog
from common import STEPS_A, STEPS_C, fake_llm, fake_llm_async, main, pkg_version, report_D, route_of

from statemachine_orch import (
    Completion,
    Engine,
    FlowDecision,
    LLMRequest,
    LLMState,
    Machine,
    SQLiteStore,
    StepContext,
    Usage,
    guard,
)
from statemachine_orch.trace._tracer import Tracer, stream_logger

SYNC = os.environ.get("ORCH_BENCH_SYNC", "NORMAL").upper()
TRACE = os.environ.get("ORCH_BENCH_TRACE") == "1"


@guard(FlowDecision.CONTINUE, FlowDecision.TERMINATE)
def route(output: str, ctx: StepContext) -> FlowDecision:
    return FlowDecision.CONTINUE if route_of(output) == "continue" else FlowDecision.TERMINATE


def workflow(steps: int) -> Machine:
    return Machine("bench", [LLMState(f"out{k}", prompt=f"step {k}", max_tokens=16, guard=route)
                             for k in range(steps)])


_USAGE = Usage(input_tokens=3, output_tokens=2)  # every answer's; the engine only reads it


def _completion(text: str) -> Completion:
    return Completion(text=text, data=None, stop_reason="end_turn", usage=_USAGE, request_id=None,
                      response={"content": [{"type": "text", "text": text}]})


class InstantModel:
    """The fake LLM of modes A and B: answers at once."""

    async def complete(self, request: LLMRequest) -> Completion:
        return _completion(fake_llm(int(request.state[3:])))


class SlowModel:
    """The fake LLM of mode C: every answer takes 50 ms."""

    async def complete(self, request: LLMRequest) -> Completion:
        return _completion(await fake_llm_async(int(request.state[3:])))


_SINKS: list[Any] = []  # one trace file per process, appended to by every rep


def _hooks() -> list[Tracer]:
    """The JSON-lines tracer when traced, else no hooks at all."""
    if not TRACE:
        return []
    if not _SINKS:
        _SINKS.append(open(os.environ.get("ORCH_BENCH_TRACE_FILE", os.devnull), "a"))
    return [Tracer(stream_logger(_SINKS[0], json=True))]


def _runs(machine: Machine, engine: Engine):
    """The harness's run_once: run i of `machine` under the id the harness (and verify_D) expects."""

    async def run_once(i: int) -> dict[str, str]:
        return (await engine.arun(machine, run_id=f"run-{i}")).outputs

    return run_once


def make_A():
    return _runs(workflow(STEPS_A), Engine(None, model=InstantModel(), hooks=_hooks()))


def make_B(db_path: str):
    store = SQLiteStore(db_path, synchronous=SYNC)  # type: ignore[arg-type]
    return _runs(workflow(STEPS_A), Engine(store, model=InstantModel())), lambda: asyncio.run(store.close())


def make_C():
    return _runs(workflow(STEPS_C), Engine(None, model=SlowModel()))


_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")  # PRAGMA synchronous's values by number
_COMMITS: list[str] = []  # mode D: "COMMITs/runs" of each rep (the last one is the probe pass), shown in d_info


def make_D(db_path: str):
    """C on a file store at synchronous=FULL. The COMMITs are counted through the store's tracer,
    so the result shows whether runs share commits (group commit) or pay one fsync each."""
    tally = {"commits": 0, "runs": 0}

    def count(sql: str, params: object) -> None:
        tally["commits"] += sql == "COMMIT"

    store = SQLiteStore(db_path, synchronous="FULL", tracer=count)
    tally["commits"] = 0  # the schema's; from here on, a run's creation and its steps'
    sync, journal = (store.conn.execute(f"PRAGMA {name}").fetchone()[0] for name in ("synchronous", "journal_mode"))
    report_D(synchronous=f"{_SYNCHRONOUS[sync]} ({sync}, read back from the store's connection)",
             journal_mode=journal)
    run_once = _runs(workflow(STEPS_C), Engine(store, model=SlowModel()))

    async def counted(i: int) -> dict[str, str]:
        tally["runs"] += 1
        return await run_once(i)

    async def close() -> None:
        await store.close()
        _COMMITS.append(f"{tally['commits']}/{tally['runs']}")
        report_D(commits_per_runs=_COMMITS)

    return counted, close


def verify_D(db_path: str, runs: Iterable[int]) -> dict[int, int]:
    """{i: distinct states of run-<i> with a committed transition row}, read-only (a failed step's row has no
    to_state)."""
    conn = sqlite3.connect(Path(db_path).absolute().as_uri() + "?mode=ro", uri=True)
    try:
        counts = dict(conn.execute("SELECT run_id, count(DISTINCT from_state) FROM transitions "
                                   "WHERE to_state IS NOT NULL GROUP BY run_id"))
    finally:
        conn.close()
    return {i: counts.get(f"run-{i}", 0) for i in runs}


if __name__ == "__main__":
    structlog.get_logger()  # imports settled before the harness reads RSS
    name = "statemachine_orch" + (" traced" if TRACE else "") + (" FULL" if SYNC == "FULL" else "")
    main(name, pkg_version("statemachine-orch"), make_A=make_A, make_B=make_B, make_C=make_C, make_D=make_D,
         verify_D=verify_D,
         notes={"B": f"SQLiteStore, WAL + synchronous={SYNC}, one transaction per transition",
                "A": "NullStore" + (", structlog JSON lines to a file" if TRACE else ", tracing off"),
                "C": "NullStore, 1000 runs under asyncio.gather",
                "D": "SQLiteStore, WAL + synchronous=FULL; one transaction per transition (log row, output, LLM "
                     "request and response, audit chain hash, run totals), committed before the next step; "
                     "commits shared across runs only if the store groups them (commits_per_runs)"})
    sys.exit(0)
