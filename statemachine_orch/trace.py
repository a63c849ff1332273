"""Structured events through structlog: exactly one `transition` event per log row.

Event names are fixed: `run_started`, `run_resumed`, `transition`, `run_finished`,
`machine_changed`. By default the tracer logs through `structlog.get_logger()`, so an
application's own structlog configuration (and `structlog.testing.capture_logs()`)
applies; the CLI builds a private logger instead of configuring structlog globally.
Every renderer runs `redact_secrets` last before rendering.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, MutableMapping
from json import JSONEncoder
from typing import Any, TextIO

import structlog
from pydantic_core import to_json

from .types import RunRecord, TransitionRecord, Usage, now_iso

_KEY_PATTERN = re.compile(r"sk-ant-[A-Za-z0-9_\-]{8,}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ascii_json = JSONEncoder(separators=(",", ":"), default=repr).encode  # ASCII: no U+2028 splits a line
SECRET_ENV_VARS = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN")


def redact(text: str, secrets: Iterable[str] | None = None) -> str:
    """`text` with API keys blanked: the given values (default: the SDK's credential
    environment variables) and anything shaped like an Anthropic key."""
    for secret in _worth_hiding(secrets_from_env() if secrets is None else secrets):
        text = text.replace(secret, "[REDACTED]")
    return _KEY_PATTERN.sub("[REDACTED]", text)


def _worth_hiding(secrets: Iterable[str]) -> list[str]:
    """The secrets long enough to look for (a short one would blank ordinary text)."""
    return [s for s in secrets if s and len(s) >= 8]


def redact_secrets(secrets: Iterable[str] = ()) -> structlog.types.Processor:
    """A processor that blanks API keys (the given values and anything shaped like one)."""
    known = _worth_hiding(secrets)
    # one search per value; most values hold no secret and are left as they are
    suspect = re.compile("|".join([*map(re.escape, known), _KEY_PATTERN.pattern])).search

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
    forms = sorted({form for s in _worth_hiding(secrets) for form in (s, _ascii_json(s)[1:-1])},
                   key=len, reverse=True)

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


def secrets_from_env() -> list[str]:
    return [v for v in (os.environ.get(name) for name in SECRET_ENV_VARS) if v]


def _json_lines(scrub: Callable[[str], str]) -> structlog.types.Processor:
    """Level, timestamp, JSON and redaction in one processor: a JSON event per transition is
    on the hot path, and each processor of a chain costs a call and a dict pass. Lines are
    ASCII; pydantic-core encodes (several times faster than `json`), `json` takes the rare
    event with non-ASCII text."""

    def render(_: Any, method: str, event: MutableMapping[str, Any]) -> str:
        event["level"] = method
        event["timestamp"] = now_iso()
        line = to_json(event, fallback=repr).decode()
        return scrub(line if line.isascii() else _ascii_json(event))

    return render


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
        processors = [_json_lines(_line_scrubber(secrets_from_env()))]
    else:
        processors = [structlog.processors.add_log_level, _timestamp, redact_secrets(secrets_from_env()),
                      _escape_controls, structlog.dev.ConsoleRenderer(colors=stream.isatty())]
    return structlog.wrap_logger(
        _LineWriter(stream),
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    ).bind()  # bound once, not re-bound on every event


class Tracer:
    """Turns engine happenings into structlog events; a Tracer(None) emits nothing."""

    __slots__ = ("_log",)

    def __init__(self, logger: Any | None) -> None:
        self._log = logger

    @property
    def on(self) -> bool:
        """False for a null tracer (no logger, methods not overridden): callers on the hot path
        may skip calling it."""
        return self._log is not None or type(self) is not Tracer

    @classmethod
    def default(cls) -> Tracer:
        return cls(structlog.get_logger("statemachine_orch"))

    @classmethod
    def null(cls) -> Tracer:
        return cls(None)

    def run_started(self, run: RunRecord, *, resumed: bool = False, machine_hash: str | None = None) -> None:
        """`machine_hash`: the code driving the run now (defaults to the hash it started with)."""
        if self._log is None:
            return
        self._log.info(
            "run_resumed" if resumed else "run_started",
            run_id=run.run_id, machine=run.machine, machine_hash=(machine_hash or run.machine_hash)[:12],
        )

    def transition(self, rec: TransitionRecord, machine: str) -> None:
        log = self._log
        if log is None:
            return
        u = rec.usage
        extra: dict[str, Any] = {}  # fields only a failing step has
        if rec.attempts:
            extra["failed_attempts"] = len(rec.attempts)
        if rec.error is not None:
            extra["error"] = rec.error
        (log.info if rec.error is None else log.error)(
            "transition", run_id=rec.run_id, machine=machine, seq=rec.seq, from_state=rec.from_state,
            to_state=rec.to_state, decision=rec.decision, attempt=rec.attempt,
            latency_ms=round(rec.latency_ms, 3), tokens=u.input_tokens + u.output_tokens,
            input_tokens=u.input_tokens, output_tokens=u.output_tokens, cost_usd=rec.cost_usd,
            source=rec.source, **extra)

    def run_finished(
        self, run_id: str, machine: str, status: str, *, steps: int, usage: Usage,
        cost_usd: float | None, error: str | None,
    ) -> None:
        if self._log is None:
            return
        self._log.info(
            "run_finished", run_id=run_id, machine=machine, status=status, steps=steps,
            tokens=usage.input_tokens + usage.output_tokens, cost_usd=cost_usd, error=error,
        )

    def machine_changed(self, run_id: str, machine: str, recorded: str, current: str) -> None:
        if self._log is None:
            return
        self._log.warning(
            "machine_changed", run_id=run_id, machine=machine, recorded_hash=recorded[:12],
            current_hash=current[:12],
            hint=f"the machine's source changed since the run started; `orch replay {run_id}` "
            "shows whether recorded steps still route the same way",
        )
