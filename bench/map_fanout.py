"""A map state's fan-out against its ideal (issue 12): 100 items, `concurrency=10`, each item
one LLM call answered after 50 ms, every item a durable child run in a SQLite file
(synchronous=FULL, our default). The ideal is 10 waves of 50 ms: the ratio says what the
engine and the store add. Also reported: the Python memory the run allocates per item
(tracemalloc peak over the run, divided by the items).

    .venv/bin/python bench/map_fanout.py [--items 100] [--concurrency 10] [--delay-ms 50] [--repeat 5]

The model is an in-process client that bills (so each call is marked in flight and its
answer kept, as with the real API), not HTTP: the SDK's own cost is not what this measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from statemachine_orch import Completion, Engine, LLMRequest, LLMState, Machine, MapState, SQLiteStore, Usage


class DelayedModel:
    """Answers every call after `delay_s`, as a model that bills."""

    bills = True

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    async def complete(self, request: LLMRequest) -> Completion:
        await asyncio.sleep(self.delay_s)
        text = "done"
        return Completion(text=text, data=None, stop_reason="end_turn", usage=Usage(input_tokens=12, output_tokens=3),
                          request_id=None, response={"content": [{"type": "text", "text": text}]})


def fan_out(items: int, concurrency: int) -> Machine:
    return Machine("fan_out", [
        MapState("work", items=lambda ctx: range(items), concurrency=concurrency,
                 each=LLMState("worker", prompt="Item {item}", max_tokens=16)),
    ])


async def one(items: int, concurrency: int, delay_s: float, folder: Path, trace_memory: bool) -> tuple[float, int]:
    """(seconds for the whole run, peak bytes allocated during it)."""
    machine = fan_out(items, concurrency)
    store = SQLiteStore(folder / f"bench-{time.monotonic_ns()}.db")
    engine = Engine(store, model=DelayedModel(delay_s))
    engine.compiled(machine)
    if trace_memory:
        tracemalloc.start()
    started = time.perf_counter()
    result = await engine.arun(machine)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] if trace_memory else 0
    if trace_memory:
        tracemalloc.stop()
    await engine.aclose()
    assert result.status.value == "completed" and len(result.outputs["work"]) == items, result
    return seconds, peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--delay-ms", type=float, default=50.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    delay_s = args.delay_ms / 1000.0
    ideal = -(-args.items // args.concurrency) * delay_s
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        asyncio.run(one(args.concurrency, args.concurrency, delay_s, folder, False))  # warm up
        times = [asyncio.run(one(args.items, args.concurrency, delay_s, folder, False))[0]
                 for _ in range(args.repeat)]
        _, peak = asyncio.run(one(args.items, args.concurrency, delay_s, folder, True))
    median = statistics.median(times)
    report = {"items": args.items, "concurrency": args.concurrency, "delay_ms": args.delay_ms,
              "ideal_s": ideal, "median_s": round(median, 4), "ratio_to_ideal": round(median / ideal, 3),
              "runs": len(times), "peak_bytes_per_item": peak // args.items}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"map state, {args.items} items, concurrency {args.concurrency}, {args.delay_ms:g} ms answers: "
              f"median {median:.3f} s over {len(times)} runs = {median / ideal:.2f}x the ideal "
              f"({ideal:.2f} s); {peak // args.items / 1024:.1f} KiB allocated per item at peak")
    return 0


if __name__ == "__main__":
    sys.exit(main())
