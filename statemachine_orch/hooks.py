"""Lifecycle hooks: the one seam through which the engine tells the outside what happens to a run.

Tracing (the structlog events of `Tracer`), the kill points of the crash tests, metrics and
notifications are all hooks. A hook subclasses `Hook` and overrides the methods it needs; the
engine calls only those, in the order the hooks were given, inside the run's own task.

For one step the order is: `before_step` (nothing has run), the state runs, `after_output` (only
when it produced an output; a paid answer is kept with the run, not yet committed), the guard judges and the
machine moves, the row commits, `after_commit` (the row is durable, a failed step's too).

A hook that raises stops the run as a crash would: what is committed stays committed, the run
is left interrupted, and a resume continues from its last committed step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .types import RunRecord, RunResult, TransitionRecord


class Hook:
    """Override any of these methods; the defaults do nothing and are never called."""

    def run_started(self, run: RunRecord, *, resumed: bool, machine_hash: str) -> None:
        """A run was created (its row is committed, no step has run) or claimed to be resumed.

        `machine_hash` is the hash of the code driving it now (`run.machine_hash`: the code it
        started with)."""

    def before_step(self, run: RunRecord, step: TransitionRecord) -> None:
        """A step begins. `step` holds its seq, state (`from_state`), attempt and `source`
        ("llm" for a state that calls the model, "python" for a Python state)."""

    def after_output(self, run: RunRecord, step: TransitionRecord, output: Any) -> None:
        """The state produced `output` (for an LLM state, a paid answer, already kept with the
        run so that a resume does not pay for it again); not judged, not committed."""

    def after_commit(self, run: RunRecord, step: TransitionRecord) -> None:
        """The step's row is committed: `step` is what the log now holds."""

    def run_finished(self, run: RunRecord, result: RunResult) -> None:
        """The run stopped: finished, failed, over budget or interrupted (`result.status`)."""


class HookCalls:
    """For each hook point, the methods the engine calls: those the hooks override."""

    __slots__ = ("after_commit", "after_output", "before_step", "run_finished", "run_started")

    def __init__(self, hooks: Iterable[Hook] = ()) -> None:
        hooks = tuple(hooks)
        self.run_started: tuple[Callable[..., None], ...] = _overriding(hooks, "run_started")
        self.before_step: tuple[Callable[[RunRecord, TransitionRecord], None], ...] = _overriding(
            hooks, "before_step")
        self.after_output: tuple[Callable[[RunRecord, TransitionRecord, Any], None], ...] = _overriding(
            hooks, "after_output")
        self.after_commit: tuple[Callable[[RunRecord, TransitionRecord], None], ...] = _overriding(
            hooks, "after_commit")
        self.run_finished: tuple[Callable[[RunRecord, RunResult], None], ...] = _overriding(
            hooks, "run_finished")


def _overriding(hooks: tuple[Hook, ...], point: str) -> tuple[Callable[..., None], ...]:
    return tuple(getattr(hook, point) for hook in hooks
                 if getattr(type(hook), point, None) not in (None, getattr(Hook, point)))
