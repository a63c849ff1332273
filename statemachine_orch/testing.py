"""A test kit for machines: the offline model (a scripted Messages API that the real `anthropic`
SDK talks to) and a capture of the trace events a run emits.

    fake = FakeMessagesAPI({"sentiment_analysis": "positive", "upsell": "Try Pro!"})
    with capture_trace() as (tracer, events):
        Engine(open_store(tmp_path / "t.db"), model=fake.model(), hooks=[tracer]).run(machine, data)
    assert fake.calls("upsell") == 1 and events[-1]["event"] == "run_finished"
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import structlog
from structlog.testing import LogCapture

from .llm._answer_files import answering_fake, load_script
from .llm._offline import (
    CapturedRequest,
    FakeMessagesAPI,
    Reply,
    ScriptEntry,
    disconnect,
    error,
    timeout,
)
from .trace._tracer import Tracer

__all__ = ["CapturedRequest", "FakeMessagesAPI", "Reply", "ScriptEntry", "answering_fake", "capture_trace",
           "disconnect", "error", "load_script", "timeout"]


@contextmanager
def capture_trace() -> Iterator[tuple[Tracer, list[MutableMapping[str, Any]]]]:
    """A tracer (a hook for `Engine(hooks=[...])`) whose events land in a list: each a dict with
    the event name under "event" and the level under "log_level"."""
    capture = LogCapture()
    logger = structlog.wrap_logger(None, processors=[capture],
                                   wrapper_class=structlog.make_filtering_bound_logger(0))
    yield Tracer(logger), capture.entries
