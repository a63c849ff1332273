"""Test-only kill points: `ORCH_KILL_AT=point[:n]` SIGKILLs this process the n-th time (default
first) it reaches `point`. Callers on the hot path test `ARMED` first: unset, a kill point
costs one global lookup.

Points, in the order a step reaches them: `run_created` (the run row is committed, no step
has run), `before_request` (the request is built, nothing sent, no in-flight mark written),
`after_response` (the answer arrived, nothing committed), `mid_commit` (inside the step's
transaction, before COMMIT), `after_commit` (the step is committed, the next not begun).
"While the request is in flight" is reached from outside: the fake server kills on arrival.
"""

from __future__ import annotations

import os
import signal

POINTS = ("run_created", "before_request", "after_response", "mid_commit", "after_commit")

_spec = os.environ.get("ORCH_KILL_AT") or None
ARMED = _spec is not None
_target, _, _nth = (_spec or "").partition(":")
_remaining = int(_nth) if _nth.isdigit() else 1


def kill_point(name: str) -> None:
    if _spec is None:
        return
    _reached(name)


def _reached(name: str) -> None:
    global _remaining
    if name != _target:
        return
    _remaining -= 1
    if _remaining <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
