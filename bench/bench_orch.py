"""statemachine_orch row for the engine-overhead anchors (../shared/bench-anchors/common.py).

The workload goes through the real engine: a machine of LLM states named out0..outN (the
`transitions` FSM, the guard, the transition table, the step records), with an in-process
model client instead of HTTP (`fake_llm` / `fake_llm_async` give the answers):
  A: no persistence (NullStore), tracing off            -> bench_orch.py
     the same with structlog JSON lines to a file       -> ORCH_BENCH_TRACE=1 (+ ORCH_BENCH_TRACE_FILE)
  B: SQLiteStore, one commit per transition with the audit row, the output, the LLM call
     record and the snapshot; synchronous=NORMAL like the floor (ORCH_BENCH_SYNC=FULL for ours)
  C: 1000 concurrent runs of 5 steps, each call awaiting 50 ms, no persistence
Run through the harness: see bench/README.md.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import structlog
from common import STEPS_A, STEPS_C, fake_llm, fake_llm_async, main, pkg_version, route_of

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


def make_A():
    machine = workflow(STEPS_A)
    engine = Engine(None, model=InstantModel(), hooks=_hooks())

    async def run_once(i: int) -> dict[str, str]:
        return (await engine.arun(machine, run_id=f"run-{i}")).outputs

    return run_once


def make_B(db_path: str):
    machine = workflow(STEPS_A)
    store = SQLiteStore(db_path, synchronous=SYNC)  # type: ignore[arg-type]
    engine = Engine(store, model=InstantModel())

    async def run_once(i: int) -> dict[str, str]:
        return (await engine.arun(machine, run_id=f"run-{i}")).outputs

    return run_once, lambda: asyncio.run(store.close())


def make_C():
    machine = workflow(STEPS_C)
    engine = Engine(None, model=SlowModel())

    async def run_once(i: int) -> dict[str, str]:
        return (await engine.arun(machine, run_id=f"run-{i}")).outputs

    return run_once


if __name__ == "__main__":
    structlog.get_logger()  # imports settled before the harness reads RSS
    name = "statemachine_orch" + (" traced" if TRACE else "") + (" FULL" if SYNC == "FULL" else "")
    main(name, pkg_version("statemachine-orch"), make_A=make_A, make_B=make_B, make_C=make_C,
         notes={"B": f"SQLiteStore, WAL + synchronous={SYNC}, one transaction per transition",
                "A": "NullStore" + (", structlog JSON lines to a file" if TRACE else ", tracing off"),
                "C": "NullStore, 1000 runs under asyncio.gather"})
    sys.exit(0)
