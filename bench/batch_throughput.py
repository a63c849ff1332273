"""`orch batch` against a rate-limited API (issue 13): 10,000 inputs x 3 LLM steps, the
loopback fake answering each call after 50 ms and enforcing 3,000 requests per minute with
the API's `anthropic-ratelimit-*` headers, as the real one does.

    .venv/bin/python bench/batch_throughput.py [--inputs 10000] [--rpm 3000] [--concurrency 32] [--json]

Two phases, each the real `orch batch` command in a subprocess, through the real SDK:
1. throughput: the rate-limited batch. Reported: the request rate against the limit (the
   requests beyond the fake's first minute's worth, which its full bucket lets through at
   once, over the whole run), the 429s the fake sent, the command's peak RSS and its CPU
   time (user + system, start-up included) per step.
2. crash: the same batch (no rate limit, no delay), SIGKILLed once the fake has answered half
   of its calls, then run again with the same batch id. Reported: the committed steps that
   were requested again (must be 0) and the steps in flight at the kill that were.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from statemachine_orch import RateLimits
from statemachine_orch.testing import CapturedRequest, FakeMessagesAPI, Reply

ROOT = Path(__file__).resolve().parent.parent
STATES = ("classify", "draft", "polish")
MACHINE = '''from statemachine_orch import LLMState, Machine
from pydantic import BaseModel

class Ticket(BaseModel):
    text: str

machine = Machine("tickets", input_model=Ticket, states=[
    LLMState("classify", prompt="Classify: {text}", max_tokens=16),
    LLMState("draft", prompt="Draft a reply to: {text}", max_tokens=32),
    LLMState("polish", prompt="Polish: {draft}", needs=["draft"], max_tokens=32),
])
'''


def orch(folder: Path, url: str, inputs: Path, concurrency: int, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "ANTHROPIC_BASE_URL": url, "ANTHROPIC_API_KEY": "bench-key-not-secret"}
    command = [sys.executable, "-m", "statemachine_orch.cli", "--db", str(folder / "bench.db"), "batch",
               str(folder / "tickets.py"), "--inputs", str(inputs), "--concurrency", str(concurrency),
               "--batch-id", "bench", "--json", *extra]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = process.communicate()
    if process.returncode not in (0, -signal.SIGKILL):
        raise SystemExit(f"orch batch exited {process.returncode}: {err.strip()[-2000:]}")
    return json.loads(out) if out.strip() else {}


def setup(folder: Path, inputs: int) -> Path:
    (folder / "tickets.py").write_text(MACHINE)
    path = folder / "inputs.jsonl"
    path.write_text("".join(json.dumps({"text": f"ticket {n}: the order arrived late"}) + "\n"
                            for n in range(inputs)))
    return path


def throughput(inputs: int, rpm: int, concurrency: int, delay_s: float) -> dict[str, Any]:
    stamps: list[float] = []

    def answer(request: CapturedRequest) -> Reply:
        stamps.append(time.monotonic())
        return Reply(text="ok", hold_s=delay_s)

    fake = FakeMessagesAPI(default=answer, rate_limits=RateLimits(requests_per_minute=rpm))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory() as tmp, fake.serve() as url:
        folder = Path(tmp)
        started = time.monotonic()
        summary = finish(orch(folder, url, setup(folder, inputs), concurrency))
        wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    steps = inputs * len(STATES)
    # the fake's bucket starts full, a minute's worth: the rate is what came beyond it, over the whole run
    stamps.sort()
    beyond = len(stamps) - rpm
    rate = beyond / (stamps[-1] - stamps[0]) * 60 if beyond > 0 and len(stamps) > 1 else None
    return {"inputs": inputs, "steps": steps, "requests": len(stamps), "completed": summary.get("completed"),
            "wall_s": round(wall, 2), "rpm_limit": rpm, "rpm_beyond_the_first_minute": rate and round(rate, 1),
            "rpm_fraction_of_limit": rate and round(rate / rpm, 4), "rejected_429": fake.rejected,
            "peak_rss_mb": round(after.ru_maxrss / 1024, 1),
            "cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 2),
            "cpu_ms_per_step": round(((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
                                     / steps * 1000, 3)}


def crash(inputs: int, concurrency: int) -> dict[str, Any]:
    """Kill the batch once half of its calls are answered, run it again: what was requested twice."""
    half = inputs * len(STATES) // 2
    victim: list[subprocess.Popen[str]] = []
    killed = threading.Event()

    def answer(request: CapturedRequest) -> Reply:
        if len(fake.requests) >= half and not killed.is_set():
            killed.set()
            victim[0].send_signal(signal.SIGKILL)
        return Reply(text="ok")

    fake = FakeMessagesAPI(default=answer)
    with tempfile.TemporaryDirectory() as tmp, fake.serve() as url:
        folder = Path(tmp)
        path = setup(folder, inputs)
        victim.append(orch(folder, url, path, concurrency))
        finish(victim[0])
        with sqlite3.connect(folder / "bench.db") as db:
            committed = {(run, state) for run, state in db.execute(
                "SELECT run_id, from_state FROM transitions WHERE to_state IS NOT NULL")}
        summary = finish(orch(folder, url, path, concurrency))
    asked = Counter((r.run_id, r.state) for r in fake.requests)
    return {"killed_after_requests": half, "committed_before_kill": len(committed),
            "completed_after_rerun": summary.get("completed"),
            "committed_steps_requested_again": sum(1 for step in committed if asked[step] > 1),
            "in_flight_steps_requested_again": sum(1 for step, n in asked.items() if n > 1 and step not in committed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=10_000)
    parser.add_argument("--rpm", type=int, default=3_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--delay-ms", type=float, default=50.0)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    figures = {"throughput": throughput(args.inputs, args.rpm, args.concurrency, args.delay_ms / 1000),
               "crash": crash(args.inputs, args.concurrency)}
    if args.json:
        print(json.dumps(figures))
        return
    for phase, values in figures.items():
        print(f"{phase}: " + ", ".join(f"{k}={v}" for k, v in values.items()))


if __name__ == "__main__":
    main()
