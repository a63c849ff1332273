"""Structured events through structlog, as a lifecycle hook: one `transition` event per log row.

Event names are fixed: `run_started`, `run_resumed`, `transition`, `run_finished`,
`machine_changed`. `Tracer()` logs through `structlog.get_logger()`, so an application's own
structlog configuration (and `structlog.testing.capture_logs()`) applies; the CLI builds a
private logger (`stream_logger`) instead of configuring structlog globally. Every renderer
blanks API keys before a line is written.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, MutableMapping
from json import JSONEncoder
from typing import Any, TextIO

import structlog
from pydantic_core import to_json

from .._redact import KEY_PATTERN, longest_first, redact, secrets_from_env
from ..hooks import Hook
from ..types import RunRecord, RunResult, TransitionRecord, now_iso

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ascii_json = JSONEncoder(separators=(",", ":"), default=repr).encode  # ASCII: no U+2028 splits a line


def redact_secrets(secrets: Iterable[str] = ()) -> structlog.types.Processor:
    """A processor that blanks API keys (the given values and anything shaped like one)."""
    known = longest_first(secrets)
    # one search per value; most values hold no secret and are left as they are
    suspect = re.compile("|".join([*map(re.escape, known), KEY_PATTERN.pattern])).search

    def scrub(value: str) -> str:
        return redact(value, known) if suspect(value) else value

    def processor(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in event.items():
            if isinstance(value, str):
                event[key] = scrub(value)
            elif isinstance(value, (dict, list, tuple)):
                event[key] = scrub(repr(value))
        return event

    return processor


def _line_scrubber(secrets: Iterable[str]) -> Callable[[str], str]:
    """Blanks API keys in a rendered JSON line: substring checks over the line instead of a
    regular expression per value. Each known secret is looked for as written and as JSON
    escapes it; anything shaped like a key starts with "sk-ant-"."""
    forms = longest_first(form for s in secrets if s for form in (s, _ascii_json(s)[1:-1]))

    def scrub(line: str) -> str:
        if "sk-ant-" in line or (forms and any(form in line for form in forms)):
            return redact(line, forms)
        return line

    return scrub


def _escape_controls(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Console lines: a value with a newline or escape code cannot forge a second line."""
    for key, value in event.items():
        if isinstance(value, str) and _CONTROL.search(value):
            event[key] = _CONTROL.sub(lambda m: repr(m.group())[1:-1], value)
    return event


def _timestamp(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """ISO 8601 UTC, as the database stores times (TimeStamper builds a datetime per event)."""
    event["timestamp"] = now_iso()
    return event


def _ascii_line(event: MutableMapping[str, Any], default: Callable[[Any], Any]) -> str:
    """`JSONRenderer`'s serializer: pydantic-core encodes (several times faster than `json`);
    `json` takes the rare event with non-ASCII text, so no U+2028 can split a line (nor a
    lone surrogate, which pydantic-core cannot encode, stop it)."""
    try:
        line = to_json(event, fallback=default).decode()
    except ValueError:
        return _ascii_json(event)
    return line if line.isascii() else _ascii_json(event)


def _scrub_line(scrub: Callable[[str], str]) -> structlog.types.Processor:
    """After rendering: blank API keys in the JSON line."""

    def processor(_: Any, __: str, line: Any) -> Any:
        return scrub(line)

    return processor


class _LineWriter(structlog.WriteLogger):
    """Writes each line without flushing: the stream's own buffering decides (stderr is
    line-buffered; a file is flushed as it fills and when closed)."""

    def msg(self, message: str) -> None:
        self._write(message + "\n")

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def stream_logger(stream: TextIO, *, json: bool) -> Any:
    """A private structlog logger writing to `stream`: console lines, or JSON lines if asked."""
    processors: list[structlog.types.Processor]
    if json:
        processors = [structlog.processors.add_log_level, _timestamp,
                      structlog.processors.JSONRenderer(serializer=_ascii_line),
                      _scrub_line(_line_scrubber(secrets_from_env()))]
    else:
        processors = [structlog.processors.add_log_level, _timestamp, redact_secrets(secrets_from_env()),
                      _escape_controls, structlog.dev.ConsoleRenderer(colors=stream.isatty())]
    return structlog.wrap_logger(
        _LineWriter(stream),
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    ).bind()  # bound once, not re-bound on every event


class Tracer(Hook):
    """A hook that turns run lifecycle events into structlog events.

    `Tracer()` logs through `structlog.get_logger("statemachine_orch")`, so an application's
    structlog configuration applies; `Tracer(logger)` through the logger given."""

    __slots__ = ("_log",)

    def __init__(self, logger: Any | None = None) -> None:
        self._log = logger if logger is not None else structlog.get_logger("statemachine_orch")

    def run_started(self, run: RunRecord, *, resumed: bool, machine_hash: str) -> None:
        self._log.info("run_resumed" if resumed else "run_started", run_id=run.run_id, machine=run.machine,
                       machine_hash=machine_hash[:12])
        if resumed and machine_hash != run.machine_hash:
            self._log.warning(
                "machine_changed", run_id=run.run_id, machine=run.machine, recorded_hash=run.machine_hash[:12],
                current_hash=machine_hash[:12],
                hint=f"the machine's source changed since the run started; `orch replay {run.run_id}` "
                "shows whether recorded steps still route the same way")

    def after_commit(self, run: RunRecord, step: TransitionRecord) -> None:
        u = step.usage
        extra: dict[str, Any] = {}  # fields only a failing step has
        if step.attempts:
            extra["failed_attempts"] = len(step.attempts)
        if step.error is not None:
            extra["error"] = step.error
        (self._log.info if step.error is None else self._log.error)(
            "transition", run_id=step.run_id, machine=run.machine, seq=step.seq, from_state=step.from_state,
            to_state=step.to_state, decision=step.decision, attempt=step.attempt,
            latency_ms=round(step.latency_ms, 3), tokens=u.input_tokens + u.output_tokens,
            input_tokens=u.input_tokens, output_tokens=u.output_tokens, cost_usd=step.cost_usd,
            source=step.source, **extra)

    def run_finished(self, run: RunRecord, result: RunResult) -> None:
        u = result.usage
        self._log.info("run_finished", run_id=result.run_id, machine=result.machine, status=result.status.value,
                       steps=result.steps, tokens=u.input_tokens + u.output_tokens, cost_usd=result.cost_usd,
                       error=result.error)
