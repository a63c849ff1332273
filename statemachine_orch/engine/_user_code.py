"""The user code a run calls (Python states, guards, fallback functions), called so that it can
be stopped.

Synchronous code holds the event loop: neither `asyncio.timeout` nor a cancelled task reaches it
before it returns. So while it runs in the main thread, a real-time timer (SIGALRM) raises into
it when the state's `timeout` runs out, when the grace of a stop request (SIGTERM) runs out, or at
once on `interrupt()` (Ctrl-C). Awaited code is bounded by `asyncio.timeout` and stopped by
cancellation at its next await. In another thread synchronous code cannot be stopped: it is
judged against its timeout when it returns.

Whatever the code raises itself, `SystemExit`, `KeyboardInterrupt` and `CancelledError`
included, becomes a `CodeError`, as does running out of time: the step records it as a failure.
A stop or an interrupt raised into the code comes out as `CancelledError` or
`KeyboardInterrupt`, which stop the run, never as a failure of the step.
"""

from __future__ import annotations

import asyncio
import inspect
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any, Literal

REPEAT_S = 0.5  # code that swallows what was raised into it gets it again this often
_MAIN = threading.main_thread().ident

Ending = Literal["timeout", "stop", "interrupt"]


class CodeError(Exception):
    """User code raised `cause`, or ran out of its `timeout` (`cause` None)."""

    def __init__(self, cause: BaseException | None, timeout: float | None = None) -> None:
        self.cause = cause
        self.timeout = timeout
        super().__init__(self.raised if cause is not None else f"ran out of its timeout={timeout}s")

    @property
    def raised(self) -> str:
        """What the code raised, as `Type: message`, on one line."""
        cause = self.cause
        text = " ".join(str(cause).split())
        return f"{type(cause).__name__}: {text}" if text else type(cause).__name__

    def message(self, raiser: str, late: str) -> str:
        """`raiser` followed by what the code raised, or: `late` did not finish in time."""
        if self.cause is not None:
            return f"{raiser}{self.raised}"
        return f"{late} did not finish within its timeout={self.timeout:g}s"


class _Raised(BaseException):
    """What the timer raises into synchronous user code (not an Exception: `except Exception`
    in the code does not swallow it)."""


@dataclass(slots=True)
class _Section:
    """One synchronous call of user code in progress in the main thread."""

    owner: UserCode
    timeout_at: float | None
    ended_by: Ending | None = None  # what was raised into the code
    previous: Any = None  # the SIGALRM handler ours replaced, while ours is installed
    installed: bool = False


_current: _Section | None = None  # the main thread's section in progress


class UserCode:
    """Calls one run's user code; `stop_after()` and `interrupt()` reach the code that is running."""

    def __init__(self) -> None:
        self._stop: tuple[float, Ending] | None = None  # (monotonic deadline, why)

    async def call(self, fn: Callable[..., Any], *args: Any, timeout: float | None) -> Any:
        """`fn(*args)`, awaited when it returns an awaitable, within `timeout` seconds."""
        started = time.monotonic()
        result = self.run(fn, *args, timeout=timeout)
        if not inspect.isawaitable(result):
            return result
        left = None if timeout is None else timeout - (time.monotonic() - started)
        try:
            async with asyncio.timeout(left) as limit:
                return await result
        except TimeoutError as exc:
            raise (CodeError(None, timeout) if limit.expired() else CodeError(exc)) from exc
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the run is being stopped, not failed by the code
            raise CodeError(exc) from exc
        except BaseException as exc:
            raise CodeError(exc) from exc

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float | None) -> Any:
        """`fn(*args)` called synchronously, stoppable as the module docstring says."""
        global _current
        if threading.get_ident() != _MAIN:
            return _judged_on_return(fn, args, timeout)
        outer = _current
        section = _current = _Section(self, None if timeout is None else time.monotonic() + timeout)
        try:
            if timeout is not None or self._stop is not None:
                _arm(section)
            result = fn(*args)
        except BaseException as exc:
            raise _outcome(section, exc, timeout) from exc
        finally:
            _current = outer
            if section.installed:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, section.previous)
        if section.ended_by is not None:  # the code swallowed what was raised into it
            raise _outcome(section, None, timeout)
        return result

    def stop_after(self, grace_s: float) -> None:
        """A stop was requested: code running now or later is stopped `grace_s` seconds from now.
        Call it in the main thread (a signal handler)."""
        self._stop = (time.monotonic() + grace_s, "stop")
        self._reach()

    def interrupt(self) -> bool:
        """Raise KeyboardInterrupt into this run's synchronous code if it is running now (from
        a SIGINT handler); False when none is, so the caller handles the signal itself."""
        section = _current
        if section is None or section.owner is not self or threading.get_ident() != _MAIN:
            return False
        self._stop = (time.monotonic(), "interrupt")
        self._reach()
        return True

    def _reach(self) -> None:
        section = _current
        if section is not None and section.owner is self and threading.get_ident() == _MAIN:
            _arm(section)


def _arm(section: _Section) -> None:
    """Set the timer for the section's earliest deadline, installing our handler first."""
    stop = section.owner._stop
    due = min(at for at in (section.timeout_at, stop[0] if stop else None) if at is not None)
    if not section.installed:
        section.previous = signal.signal(signal.SIGALRM, _alarm)
        section.installed = True
    signal.setitimer(signal.ITIMER_REAL, max(due - time.monotonic(), 1e-4), REPEAT_S)


def _alarm(signum: int, frame: FrameType | None) -> None:
    """SIGALRM: raise into the section's code if one of its deadlines has passed. Never into
    this module's own frames (entering or leaving a section): the timer repeats."""
    section = _current
    if section is None or (frame is not None and frame.f_globals.get("__name__") == __name__):
        return
    now = time.monotonic()
    stop = section.owner._stop
    if stop is not None and now >= stop[0]:
        section.ended_by = stop[1]
    elif section.timeout_at is not None and now >= section.timeout_at:
        section.ended_by = "timeout"
    else:
        return
    raise _Raised()


def _outcome(section: _Section, exc: BaseException | None, timeout: float | None) -> BaseException:
    """What the run makes of what came out of a section (see the module docstring)."""
    ended_by = section.ended_by
    if ended_by == "interrupt":
        return KeyboardInterrupt()
    if ended_by == "stop":
        return asyncio.CancelledError()
    return CodeError(None if ended_by == "timeout" else exc, timeout)


def _judged_on_return(fn: Callable[..., Any], args: tuple[Any, ...], timeout: float | None) -> Any:
    started = time.monotonic()
    try:
        result = fn(*args)
    except BaseException as exc:
        raise CodeError(exc) from exc
    if timeout is not None and time.monotonic() - started > timeout:
        if inspect.isawaitable(result) and hasattr(result, "close"):
            result.close()
        raise CodeError(None, timeout)
    return result
