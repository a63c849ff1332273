"""Kill points for the crash tests: `ORCH_KILL_AT=point[:n]` SIGKILLs `orch` the n-th time
(default: the first) it reaches `point`.

Nothing in the engine or the store knows about them: they are a lifecycle hook plus the
SQLite store's statement tracer, which the CLI installs only when the variable is set.

Points, in the order a step reaches them: `run_created` (the run row is committed, no step
has run), `before_request` (an LLM state's step begins: nothing sent, no in-flight mark),
`after_response` (the state's output arrived and was kept, nothing committed), `mid_commit` (inside the
step's transaction, before COMMIT), `after_commit` (the step is committed, the next not begun).
"While the request is in flight" is reached from outside: the fake server kills on arrival.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from ..errors import UsageError
from ..hooks import Hook
from ..types import RunRecord, TransitionRecord

POINTS = ("run_created", "before_request", "after_response", "mid_commit", "after_commit")


class KillPoints(Hook):
    """SIGKILLs this process at the `nth` arrival at `point`."""

    def __init__(self, point: str, nth: int = 1) -> None:
        if point not in POINTS:
            raise UsageError(f"ORCH_KILL_AT={point!r} is not a kill point", fix=f"use one of {', '.join(POINTS)}")
        self.point = point
        self.remaining = nth
        self._appending = False

    @classmethod
    def from_env(cls) -> KillPoints | None:
        spec = os.environ.get("ORCH_KILL_AT")
        if not spec:
            return None
        point, colon, nth = spec.partition(":")
        if colon and not (nth.isascii() and nth.isdigit()):
            raise UsageError(f"ORCH_KILL_AT={spec!r} does not end in a count",
                             fix="use POINT or POINT:N, N the arrival to kill at (1 the first)")
        return cls(point, int(nth) if colon else 1)

    def reached(self, point: str) -> None:
        if point != self.point:
            return
        self.remaining -= 1
        if self.remaining <= 0:
            os.kill(os.getpid(), signal.SIGKILL)

    def run_started(self, run: RunRecord, *, resumed: bool, machine_hash: str) -> None:
        if not resumed:
            self.reached("run_created")

    def before_step(self, run: RunRecord, step: TransitionRecord) -> None:
        if step.source == "llm":
            self.reached("before_request")

    def after_output(self, run: RunRecord, step: TransitionRecord, output: Any) -> None:
        self.reached("after_response")

    def after_commit(self, run: RunRecord, step: TransitionRecord) -> None:
        self.reached("after_commit")

    def trace_sql(self, sql: str, params: Any) -> None:
        """The store's statement tracer: `mid_commit` is the COMMIT of a transaction that
        inserted a log row."""
        if sql.startswith("INSERT INTO transitions"):
            self._appending = True
        elif sql == "COMMIT" and self._appending:
            self._appending = False
            self.reached("mid_commit")
