"""The offline model: a scripted stand-in for the Messages API that the real `anthropic` SDK talks to.

`orch run --offline` answers from it, and `statemachine_orch.testing` builds its test kit on it::

    fake = FakeMessagesAPI({"sentiment_analysis": "positive", "upsell": "Try Pro!"})
    engine = Engine(store, model=fake.model())               # in-process, over an httpx transport
    with fake.serve() as base_url: ...                      # or a loopback HTTP server
    assert fake.calls("upsell") == 1

Answers are scripted per state (the engine tags each request with `x-orch-state`), or per
"state@model" to answer one model differently (a fallback); a list is served in order and
its last answer repeats, except that the items of a map state (child runs `PARENT.S.N.I`,
whose requests may arrive in any order) take them in item order: item I's first call gets
the I-th answer after those the state had given when the map began. With `per_run=True` (a
batch) each top-level run goes down the lists on its own, so concurrent runs cannot take each
other's answers. `on_input(when, answers)` answers the runs whose input (`inputs[run_id]`)
has the fields `when` names with those answers first. Unscripted states get `default`: "auto"
writes a labelled placeholder (or a schema-shaped object for structured output), None
answers 400 so a test notices. Every request is captured without its auth headers.
`_answer_files.answering_fake` builds one from a JSON answer file (its `by_input` rules too), for `orch --offline`.
`rate_limits=` enforces the API's rate limits on `clock` (`_offline_limits.py`).
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anthropic
import httpx2

from ..types import RunRecord, TransitionRecord, child_place
from ._anthropic import AnthropicModel
from ._fake_wire import example_for_schema, json_body, message_body, streamed_body
from ._limiter import RateLimits
from ._offline_limits import ServerLimits

_SECRET_HEADERS = frozenset({"x-api-key", "authorization"})
LISTEN_BACKLOG = socket.SOMAXCONN  # the served fake's pending-connection queue


@dataclass(kw_only=True)
class Reply:
    """One scripted answer: text, a tool call (`data`), or an HTTP error (`status` >= 400).
    With neither text nor data it is the placeholder answer (say, `Reply(hold_s=5)`: late)."""

    text: str | None = None
    data: dict[str, Any] | None = None
    stop_reason: str | None = None
    status: int = 200
    error_type: str = "api_error"
    message: str = "scripted error"
    error_code: str | None = None  # error.details.error_code, e.g. "enforced_spend_limit_reached"
    headers: dict[str, str] = field(default_factory=dict)
    gate: threading.Event | None = None  # block the answer until the event is set
    fault: str | None = None  # "timeout" or "disconnect": no HTTP answer at all
    hold_s: float = 0.0  # wait this long before answering (or failing)
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0


def timeout(hold_s: float = 0.0) -> Reply:
    """No answer: the request is held `hold_s` seconds (served: make it longer than the client's
    timeout), then fails with a read timeout in process, or is dropped when served."""
    return Reply(fault="timeout", hold_s=hold_s)


def disconnect() -> Reply:
    """The connection is closed without any response (a reset mid-request)."""
    return Reply(fault="disconnect")


def error(status: int, message: str = "scripted error", *, error_type: str | None = None,
          headers: Mapping[str, str] | None = None, error_code: str | None = None) -> Reply:
    """An HTTP error answer, shaped like the API's error body (with `error_code` in its details)."""
    types = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 429: "rate_limit_error", 529: "overloaded_error"}
    return Reply(status=status, message=message, error_type=error_type or types.get(status, "api_error"),
                 headers=dict(headers or {}), error_code=error_code)


@dataclass
class CapturedRequest:
    state: str | None
    run_id: str | None
    body: dict[str, Any]
    headers: dict[str, str]

    @property
    def prompt(self) -> str:
        """The text of the first user message."""
        content = self.body["messages"][0]["content"]
        return content if isinstance(content, str) else json.dumps(content)


ScriptEntry = str | dict[str, Any] | Reply | list[Any]


class FakeMessagesAPI:
    """A stand-in for `POST /v1/messages` with scripted answers and request capture."""

    def __init__(
        self,
        script: Mapping[str, ScriptEntry] | None = None,
        *,
        default: str | Callable[[CapturedRequest], ScriptEntry] | None = "auto",
        per_run: bool = False,
        rate_limits: RateLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._script: dict[str, list[Reply]] = {}
        self.per_run = per_run
        self.inputs: dict[str, Mapping[str, Any]] = {}  # run id -> its input, for the `on_input` rules
        self._rules: list[tuple[dict[str, Any], frozenset[str]]] = []  # (when, the keys it answers)
        self._served: dict[Any, int] = {}  # per answer key, or (key, top-level run) with per_run
        self._bases: dict[tuple[str, str], int] = {}  # (key, a map step's children) -> answers given before
        self._run_calls: dict[tuple[str, str], int] = {}  # (key, child run) -> its calls so far
        self.default = default
        self.requests: list[CapturedRequest] = []
        self.slept: list[float] = []  # backoff delays an AnthropicModel from model() asked for
        self.errors: list[Exception] = []  # what responders raised, in order
        self._lock = threading.Condition()
        self.limits = ServerLimits(rate_limits or RateLimits(), clock)  # on `clock`: a test's virtual one
        for state, entry in (script or {}).items():
            self.on(state, *(entry if isinstance(entry, list) else [entry]))

    # ------------------------------------------------------------------ scripting

    def on(self, state: str, *answers: ScriptEntry) -> FakeMessagesAPI:
        """Queue answers for a state: str (text), dict (tool input), or Reply."""
        self._script.setdefault(state, []).extend(_as_reply(a) for a in answers)
        return self

    def on_input(self, when: Mapping[str, Any], answers: Mapping[str, ScriptEntry]) -> FakeMessagesAPI:
        """Answer the runs whose input has every field of `when` (equal values) from `answers`
        ({"state" or "state@model": answer(s)}) before the general script; the first rule
        that matches and answers a state wins."""
        rule = len(self._rules)
        for key, entry in answers.items():
            self.on(f"{key}#{rule}", *(entry if isinstance(entry, list) else [entry]))
        self._rules.append((dict(when), frozenset(answers)))
        return self

    def calls(self, state: str | None = None) -> int:
        """How many requests arrived (for one state, or in all)."""
        with self._lock:
            return sum(1 for r in self.requests if state is None or r.state == state)

    @property
    def rejected(self) -> int:
        """How many requests `rate_limits` refused with a 429 (they are not in `requests`)."""
        return self.limits.rejected

    def wait_for(self, state: str, count: int = 1, timeout: float = 10.0) -> bool:
        """Block until `count` requests for `state` arrived (server mode, for kill tests)."""
        with self._lock:
            return self._lock.wait_for(
                lambda: sum(1 for r in self.requests if r.state == state) >= count, timeout)

    # ------------------------------------------------------------------ answering

    def answer(self, method: str, path: str, headers: Mapping[str, str],
               body: bytes) -> tuple[int, dict[str, str], bytes, Reply | None]:
        """`handle`, where a responder that raises is the test's own error, not the API's: it
        is kept in `errors` (and raised again when `serve()` ends) and answered with a 500
        that carries its traceback and tells the client not to retry."""
        try:
            return self.handle(method, path, headers, body)
        except Exception as exc:
            with self._lock:
                self.errors.append(exc)
            trace = "".join(traceback.format_exception(exc))
            status, hdrs, data, _ = json_body(500, {"type": "error", "error": {
                "type": "api_error",
                "message": f"the FakeMessagesAPI responder raised {type(exc).__name__}: {exc}\n{trace}"}})
            hdrs["x-should-retry"] = "false"
            return status, hdrs, data, None

    def handle(self, method: str, path: str, headers: Mapping[str, str],
               body: bytes) -> tuple[int, dict[str, str], bytes, Reply | None]:
        """Answer one HTTP request: (status, headers, body, the reply used)."""
        if method != "POST" or not path.split("?")[0].endswith("/v1/messages"):
            return json_body(404, {"type": "error", "error": {"type": "not_found_error",
                                                          "message": f"{method} {path} not found"}})
        try:
            payload = json.loads(body)
        except ValueError:
            return json_body(400, {"type": "error", "error": {"type": "invalid_request_error",
                                                          "message": "body is not JSON"}})
        refused = self.limits.admit(payload)
        if refused is not None:
            return refused
        lower = {k.lower(): v for k, v in headers.items()}
        captured = CapturedRequest(
            state=lower.get("x-orch-state"), run_id=lower.get("x-orch-run"), body=payload,
            headers={k: v for k, v in lower.items() if k not in _SECRET_HEADERS},
        )
        with self._lock:
            self.requests.append(captured)
            number = len(self.requests)
            reply = self._next_reply(captured)
            self._lock.notify_all()
        if reply.status >= 400:
            problem: dict[str, Any] = {"type": reply.error_type, "message": reply.message}
            if reply.error_code:
                problem["details"] = {"error_code": reply.error_code}
            status, hdrs, data, _ = json_body(reply.status, {"type": "error", "error": problem})
            hdrs.update(self.limits.answered(payload, None) | reply.headers)
            hdrs["request-id"] = f"req_fake_{number:06d}"
            return status, hdrs, data, reply
        answer = message_body(payload, reply, number)
        status, hdrs, data, _ = streamed_body(answer) if payload.get("stream") else json_body(200, answer)
        hdrs.update(self.limits.answered(payload, answer["usage"]) | reply.headers)
        hdrs["request-id"] = f"req_fake_{number:06d}"
        return status, hdrs, data, reply

    def already_served(self, runs: Sequence[tuple[RunRecord, Sequence[TransitionRecord]]]) -> FakeMessagesAPI:
        """Count the calls stored runs made as served (a run, then its child runs), so that
        resuming it goes on down each state's answers where it left them: its failed attempts,
        the calls that answered, and the calls its in-flight mark says the unfinished step made
        when its process stopped (ahead of the log): the attempts kept in it, and the call that
        answered or was in flight."""
        with self._lock:
            for record, log in runs:
                if record.parent is None:  # its input picks its `on_input` answers
                    self.inputs.setdefault(record.run_id, record.input)
                for state, model in _calls_of(log, record.in_flight or {}):
                    self._position(self._key(state, model, record.run_id), record.run_id)
        return self

    def _position(self, key: str, run_id: str | None) -> int:
        """Which of `key`'s answers the next call of `run_id` takes (and count it served): the
        next one; for a map item's first call, the one at its item number (see the module
        docstring); its later calls (retries, re-asks) take the next one after all given."""
        counter = (key, _top_level(run_id)) if self.per_run else key
        served = self._served.get(counter, 0)
        position = served
        child = _child_item(run_id)
        if child is not None:
            slot, item = child
            base = self._bases.setdefault((key, slot), served)
            calls = self._run_calls.get((key, str(run_id)), 0)
            self._run_calls[key, str(run_id)] = calls + 1
            if calls == 0:
                position = base + item
        self._served[counter] = max(served, position + 1)
        return position

    def _key(self, state: str, model: Any, run_id: str | None) -> str:
        """Whose answers a request gets: the first `on_input` rule's that matches the run's
        input and answers it, else the script's; "state@model" when scripted (a fallback
        model's), else "state"."""
        given = self.inputs.get(_top_level(run_id), {}) if self._rules else {}
        for rule, (when, keys) in enumerate(self._rules):
            if all(k in given and given[k] == v for k, v in when.items()):
                for key in (f"{state}@{model}", state):
                    if key in keys:
                        return f"{key}#{rule}"
        key = f"{state}@{model}"
        return key if key in self._script else state

    def _next_reply(self, request: CapturedRequest) -> Reply:
        reply = self._scripted(request)
        if reply.text is None and reply.data is None and reply.status < 400 and reply.fault is None:
            placeholder = _auto_reply(request)  # only a delay or a gate was scripted
            return replace(reply, text=placeholder.text, data=placeholder.data)
        return reply

    def _scripted(self, request: CapturedRequest) -> Reply:
        key = self._key(request.state or "", request.body.get("model"), request.run_id)
        queue = self._script.get(key)
        if queue:
            return queue[min(self._position(key, request.run_id), len(queue) - 1)]
        if callable(self.default):
            return _as_reply(self.default(request))
        if self.default == "auto":
            return _auto_reply(request)
        if isinstance(self.default, str):
            return Reply(text=self.default)
        return error(400, f"no scripted answer for state {request.state!r}")

    # ------------------------------------------------------------------ plumbing

    def transport(self) -> httpx2.MockTransport:
        async def handler(request: httpx2.Request) -> httpx2.Response:
            status, headers, body, reply = self.answer(
                request.method, request.url.raw_path.decode(), dict(request.headers), request.content)
            if reply is not None and reply.gate is not None:
                while not reply.gate.is_set():
                    await asyncio.sleep(0.005)
            if reply is not None and reply.hold_s:
                await asyncio.sleep(reply.hold_s)
            if reply is not None and reply.fault == "timeout":
                raise httpx2.ReadTimeout("scripted read timeout", request=request)
            if reply is not None and reply.fault == "disconnect":
                raise httpx2.RemoteProtocolError("scripted disconnect: no response", request=request)
            return httpx2.Response(status, headers=headers, content=body)

        return httpx2.MockTransport(handler)

    def client(self) -> anthropic.AsyncAnthropic:
        """A real SDK client whose HTTP goes to this fake, in process."""
        return anthropic.AsyncAnthropic(
            api_key="fake-key-not-secret", base_url="http://fake-messages-api.invalid",
            max_retries=0, http_client=httpx2.AsyncClient(transport=self.transport()),
        )

    def model(self, **options: Any) -> AnthropicModel:
        """An AnthropicModel on this fake; `options` (retry, sleep, clock...) go to it.

        By default backoff does not wait: each delay is appended to `slept` instead, so tests
        of retry behaviour run instantly and can assert the delays. Not with `rate_limits=`: a
        limiter waits for real unless given a `sleep` with the `clock` it moves.
        """
        if "rate_limits" not in options:
            options.setdefault("sleep", self._sleep)
        return AnthropicModel(self.client(), **options)

    async def _sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        await asyncio.sleep(0)

    @contextmanager
    def serve(self, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
        """Serve the fake on loopback HTTP for other processes; yields the base URL. The first
        exception a responder raised in the block is raised again when the block ends."""
        server = loopback_server(self, host, port)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        raised = len(self.errors)
        try:
            yield f"http://{host}:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()
        if len(self.errors) > raised:  # the block ended well, but a responder failed in it
            raise self.errors[raised]


def loopback_server(fake: FakeMessagesAPI, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server answering for `fake`, listening but not yet serving (`serve_forever`)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # headers and body go out in two writes: without TCP_NODELAY the body waits for the
        # client's delayed ACK, about 40 ms added to every answer
        disable_nagle_algorithm = True

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length)
            status, headers, data, reply = fake.answer(
                "POST", self.path, {k: v for k, v in self.headers.items()}, body)
            if reply is not None and reply.gate is not None:
                reply.gate.wait(60)
            if reply is not None and reply.hold_s:
                time.sleep(reply.hold_s)
            if reply is not None and reply.fault:
                self.close_connection = True  # drop the connection with no response
                return
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            return None

    return _LoopbackServer((host, port), Handler)


class _LoopbackServer(ThreadingHTTPServer):
    """Room in the listen backlog for many clients at once (the default 5 left the others
    waiting seconds for a SYN retry while the server was busy), handler threads that do not
    keep a process alive, and no traceback for a client that left before its answer."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # the client is gone (killed mid-answer): nobody is left to tell
        super().handle_error(request, client_address)


def _calls_of(log: Sequence[TransitionRecord], mark: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(state, model) of each call a stored run made, those of its in-flight mark included."""
    calls = [(row.from_state, (body or {}).get("model")) for row in log for body in row.call_requests()]
    if isinstance(mark.get("seq"), int) and mark["seq"] > (log[-1].seq if log else 0):
        kept = mark.get("step")
        attempts = kept.get("attempts") if isinstance(kept, dict) else None
        calls.extend([(str(mark.get("state")), None)] * (len(attempts or []) + 1))
    return calls


def _child_item(run_id: str | None) -> tuple[str, int] | None:
    """(the map step's children, item number) of a child run's id (`child_run_id`), else None."""
    try:
        _, _, item = child_place(run_id or "")
    except ValueError:  # not a child run's id
        return None
    return (run_id or "").rsplit(".", 1)[0], item


def _top_level(run_id: str | None) -> str:
    """The top-level run a (child) run belongs to."""
    while (child := _child_item(run_id)) is not None:
        run_id = child[0].rsplit(".", 2)[0]
    return run_id or ""


def _as_reply(entry: ScriptEntry) -> Reply:
    if isinstance(entry, Reply):
        return entry
    if isinstance(entry, str):
        return Reply(text=entry)
    if isinstance(entry, dict):
        return Reply(data=entry)
    raise TypeError(f"cannot script {entry!r}; use str, dict or Reply")


def _auto_reply(request: CapturedRequest) -> Reply:
    tools = request.body.get("tools") or []
    if tools:
        return Reply(data=example_for_schema(tools[0].get("input_schema") or {}))
    return Reply(text=f"[offline placeholder answer for {request.state or 'this step'}]")
