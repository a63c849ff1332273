"""Model calls as the real `orch` process makes them: the real SDK, the fake Messages API served
on loopback, real SQLite files (issue 11: items 11, 14, 15, 20, 22). An answer that is not JSON
is retried, malformed usage is read without a warning, the SDK's import is not on a run's
clock, and a call too long to make unstreamed is streamed and recorded like any other.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from statemachine_orch import LLMRequest, RetryPolicy
from statemachine_orch.testing import FakeMessagesAPI, Reply

from .helpers import MODEL, EnvOrch, Orch, orch_against, query, reply, write

QUICK = RetryPolicy(max_attempts=3, initial_delay_s=0.01, multiplier=1.0, jitter=0.0)

MACHINES = f'''
from pydantic import BaseModel
from statemachine_orch import LLMState, Machine, RetryPolicy


class Plan(BaseModel):
    steps: list[str]


notes = Machine("notes", model={MODEL!r}, retry_policy={QUICK!r}, states=[
    LLMState("draft", prompt="Draft a note.", max_tokens=100),
])

long = Machine("long", model={MODEL!r}, states=[
    LLMState("draft", prompt="Draft a note.", max_tokens=100),
    LLMState("essay", prompt="Write at length.", max_tokens=64000),
    LLMState("plan", prompt="Plan it.", max_tokens=64000, output=Plan),
])
'''

NOT_JSON = {"text/html": b"<html><body>502 Bad Gateway</body></html>",
            "application/json": b'{"id": "msg_cut_off", "content": [{"ty'}


class Rewriting(FakeMessagesAPI):
    """The fake Messages API, but the first answers' bodies are replaced by `bodies`, in order,
    (content type, body) each, as a proxy or a broken server might answer with status 200."""

    def __init__(self, *bodies: tuple[str, bytes]) -> None:
        super().__init__(default=None)
        self.bodies = list(bodies)

    def handle(self, method: str, path: str, headers: Mapping[str, str],
               body: bytes) -> tuple[int, dict[str, str], bytes, Reply | None]:
        status, out, data, answer = super().handle(method, path, headers, body)
        if self.bodies:
            content_type, data = self.bodies.pop(0)
            status, out = 200, {**out, "content-type": content_type}
        return status, out, data, answer


@pytest.fixture
def machines(tmp_path: Path) -> Path:
    return write(tmp_path / "calls.py", MACHINES)


def attempts(orch: Orch, run_id: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in orch.ok("log", run_id, "--attempts", "--json").stdout.splitlines()]


# --------------------------------------------------------------------------- 11: a 200 that is not JSON


def test_an_answer_that_is_not_json_is_a_malformed_response_and_retried(db_path: Path, machines: Path) -> None:
    fake = Rewriting(*NOT_JSON.items())  # an HTML page, then a body cut short, both with status 200
    fake.on("draft", reply("a note", input_tokens=40, output_tokens=4))
    with orch_against(fake, db_path) as orch:
        result = orch.json("run", f"{machines}:notes", "--run-id", "garbled")
        tries = attempts(orch, "garbled")
    assert (result["status"], result["outputs"]) == ("completed", {"draft": "a note"})
    assert fake.calls("draft") == 3
    assert [(a["kind"], a["status_code"], a["request_id"], a["delay_s"]) for a in tries] == [
        ("malformed", 200, f"req_fake_00000{n}", QUICK.backoff(n)) for n in (1, 2)]
    for attempt in tries:
        assert attempt["error"].startswith("the Messages API answered 200 with a body that is not a message")
        assert "refused" not in attempt["error"] and "max_tokens" not in attempt["error"]


# --------------------------------------------------------------------------- 15: malformed usage


def test_malformed_usage_is_read_without_a_warning_and_the_run_goes_on(db_path: Path, machines: Path) -> None:
    message = {"id": "msg_odd", "type": "message", "role": "assistant", "model": MODEL,
               "content": [{"type": "text", "text": "a note"}], "stop_reason": "end_turn",
               "usage": {"input_tokens": "40", "output_tokens": None, "cache_read_input_tokens": "lots"}}
    fake = Rewriting(("application/json", json.dumps(message).encode()))
    with orch_against(fake, db_path) as orch:
        run = orch("-q", "run", f"{machines}:notes", "--run-id", "odd", "--json")
        assert run.code == 0, run.stderr
        (row,) = orch.log("odd")
    assert run.stderr == ""  # no pydantic serializer warning: under -q, nothing at all
    assert json.loads(run.stdout)["outputs"] == {"draft": "a note"}
    assert (row["input_tokens"], row["output_tokens"], row["cache_read_tokens"]) == (40, 0, 0)
    (stored,) = query(db_path, "SELECT response FROM transitions WHERE run_id = 'odd'")
    assert json.loads(stored["response"])["usage"] == {  # kept as it came (nulls left out, as ever)
        "input_tokens": "40", "cache_read_input_tokens": "lots"}


# --------------------------------------------------------------------------- 14, 20: the SDK's import


SLOW_SDK = """
import importlib.util, sys, time
from pathlib import Path

DELAY_S, MARKER = float(sys.argv[1]), Path(sys.argv[2])


class SlowSDK:
    '''`import anthropic` takes DELAY_S seconds longer; MARKER gets the time it finished.'''

    def find_spec(self, name, path=None, target=None):
        if name != "anthropic":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            time.sleep(DELAY_S)
            MARKER.write_text(repr(time.time()))

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, SlowSDK())
from statemachine_orch.cli import main

sys.exit(main(sys.argv[3:]))
"""
IMPORT_DELAY_S = 5.0
MAX_SECONDS = 4.0  # less than the import takes, far more than the call does


def test_the_sdk_is_imported_before_the_run_clock_starts(orch: EnvOrch, fake: FakeMessagesAPI,
                                                         machines: Path, tmp_path: Path) -> None:
    """A deliberately slow `import anthropic` (as under load) counts neither in the first
    step's latency nor against --max-seconds: the SDK is imported when the model is built."""
    fake.on("draft", "a note")
    wrapper, marker = write(tmp_path / "slow_sdk.py", SLOW_SDK), tmp_path / "imported"
    proc = subprocess.run(
        [sys.executable, str(wrapper), str(IMPORT_DELAY_S), str(marker),
         *orch.argv(["-q", "run", f"{machines}:notes", "--run-id", "timed", "--max-seconds", str(MAX_SECONDS),
                     "--json"])],
        env={**os.environ, **orch.env()}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["status"] == "completed"
    (row,) = orch.log("timed")
    step_started = datetime.fromisoformat(row["started_at"]).timestamp()
    assert step_started >= float(marker.read_text())  # the import was over before the step began


# --------------------------------------------------------------------------- 22: streaming


def test_a_call_too_long_to_send_unstreamed_is_streamed_and_recorded_like_any_other(
        orch: EnvOrch, fake: FakeMessagesAPI, machines: Path) -> None:
    same = reply("a long answer", input_tokens=300, output_tokens=40_000, cache_read_tokens=7)
    fake.on("draft", same).on("essay", same).on("plan", {"steps": ["outline", "write"]})
    result = orch.json("run", f"{machines}:long", "--run-id", "long")
    assert result["status"] == "completed", result
    assert result["outputs"] == {"draft": "a long answer", "essay": "a long answer",
                                 "plan": {"steps": ["outline", "write"]}}
    assert [r.body.get("stream") for r in fake.requests] == [None, True, True]

    rows = {r["from_state"]: r for r in query(
        orch.db, "SELECT from_state, response, request_id, input_tokens, output_tokens, cache_read_tokens "
                 "FROM transitions WHERE run_id = 'long'")}
    draft, essay = json.loads(rows["draft"]["response"]), json.loads(rows["essay"]["response"])
    assert essay["id"] == "msg_fake_000002"
    assert {**essay, "id": draft["id"]} == draft  # the same JSON as the unstreamed answer's
    assert [tuple(rows[s])[2:] for s in ("draft", "essay")] == [
        ("req_fake_000001", 300, 40_000, 7), ("req_fake_000002", 300, 40_000, 7)]
    plan = json.loads(rows["plan"]["response"])
    assert [(b["type"], b["input"]) for b in plan["content"]] == [("tool_use", {"steps": ["outline", "write"]})]


@pytest.mark.parametrize(("model", "max_tokens"), [(MODEL, 21_333), (MODEL, 21_334), (MODEL, 128_000),
                                                   ("claude-opus-4-0", 8_192), ("claude-opus-4-0", 8_193)])
def test_every_call_the_sdk_refuses_to_send_unstreamed_is_streamed(model: str, max_tokens: int) -> None:
    """Pinned against the SDK's own rule, so an SDK upgrade that changes it fails here."""
    fake = FakeMessagesAPI(default="auto")
    messages = [{"role": "user", "content": "Hello"}]
    try:
        asyncio.run(fake.client().messages.create(model=model, max_tokens=max_tokens, messages=messages))
        refused = False
    except ValueError as exc:
        assert "Streaming is required" in str(exc)
        refused = True
    request = LLMRequest(run_id="r", state="s", body={"model": model, "max_tokens": max_tokens, "messages": messages})
    completion = asyncio.run(fake.model().complete(request))
    assert completion.text == "[offline placeholder answer for s]"
    streamed = fake.requests[-1].body.get("stream") is True
    assert streamed or not refused
