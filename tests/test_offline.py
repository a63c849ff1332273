"""The offline model itself: the fake Messages API's loopback server, its responders, and the
answer files `orch --offline` reads. Driven through the real SDK (in process and over loopback
HTTP) and the real `orch` process."""

from __future__ import annotations

import http.client
import json
import select
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from statemachine_orch import Engine, LLMState, Machine, RunStatus, open_store
from statemachine_orch.llm._offline import loopback_server
from statemachine_orch.testing import CapturedRequest, FakeMessagesAPI, Reply

from .helpers import Orch, write

ONE_STATE = '''
from statemachine_orch import LLMState, Machine

machine = Machine("one", states=[LLMState("ask", prompt="Say something.", max_tokens=50)])
'''

CLIENTS = 50


class Refused(Exception):
    """A responder's own error."""


def refuse(request: CapturedRequest) -> str:
    raise Refused(f"no answer for {request.state}")


def one_state() -> Machine:
    return Machine("one", states=[LLMState("ask", prompt="Say something.", max_tokens=50)])


# --------------------------------------------------------------------------- a responder that raises


def test_a_responder_that_raises_fails_the_served_test_with_its_own_error(tmp_path: Path) -> None:
    fake = FakeMessagesAPI(default=refuse)
    machine = write(tmp_path / "one.py", ONE_STATE)
    with pytest.raises(Refused, match="no answer for ask"), fake.serve() as url:
        result = Orch(tmp_path / "orch.db", url)("run", machine, "--json")
        assert fake.calls("ask") == 1  # answered once, not retried as a dropped connection
        assert result.code == 1
        error = json.loads(result.stdout)["error"]
        assert "500" in error and "Refused: no answer for ask" in error
    assert len(fake.errors) == 1 and isinstance(fake.errors[0], Refused)


def test_a_responder_that_raises_in_process_fails_the_run_once_naming_it(tmp_path: Path) -> None:
    fake = FakeMessagesAPI(default=refuse)
    with Engine(open_store(tmp_path / "orch.db"), model=fake.model()) as engine:
        result = engine.run(one_state())
    assert result.status is RunStatus.FAILED
    assert "Refused: no answer for ask" in (result.error or "")
    assert fake.calls("ask") == 1 and fake.slept == []
    assert [type(e) for e in fake.errors] == [Refused]


# --------------------------------------------------------------------------- many clients at once


def _connected(clients: list[socket.socket], within_s: float) -> int:
    """How many of the non-blocking `clients` finished connecting (waiting at most `within_s`)."""
    pending, done = list(clients), 0
    deadline = time.monotonic() + within_s
    while pending and time.monotonic() < deadline:
        _, writable, _ = select.select([], pending, [], 0.1)
        for sock in writable:
            pending.remove(sock)
            done += sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    return done


def _ask(sock: socket.socket, port: int) -> int:
    sock.setblocking(True)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.sock = sock
    body = json.dumps({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    conn.request("POST", "/v1/messages", body, {"content-type": "application/json", "x-orch-state": "ask"})
    return conn.getresponse().status


def test_fifty_clients_that_connect_while_the_server_is_busy_are_all_answered() -> None:
    """The kernel holds connections until the server accepts them: a listen backlog of 5 left
    the others waiting for a SYN retry (seconds each), or failing, under load."""
    fake = FakeMessagesAPI({"ask": "fine"})
    server = loopback_server(fake, "127.0.0.1", 0)  # listening, not yet accepting: a busy server
    port = server.server_address[1]
    clients = [socket.socket() for _ in range(CLIENTS)]
    try:
        for sock in clients:
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
        connected = _connected(clients, within_s=5.0)
    finally:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert connected == CLIENTS
        statuses = [0] * CLIENTS

        def ask(i: int) -> None:
            statuses[i] = _ask(clients[i], port)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert statuses == [200] * CLIENTS and fake.calls("ask") == CLIENTS
    finally:
        server.shutdown()
        server.server_close()
        for sock in clients:
            sock.close()


# --------------------------------------------------------------------------- a client that leaves


def _handlers_done() -> None:
    """Wait for the fake's request threads (socketserver names them after their target)."""
    for thread in threading.enumerate():
        if "process_request_thread" in thread.name:
            thread.join(30)


def test_a_client_that_leaves_mid_answer_prints_no_traceback(capfd: pytest.CaptureFixture[str]) -> None:
    gate = threading.Event()
    fake = FakeMessagesAPI({"ask": Reply(text="x" * 4_000_000, gate=gate)})
    with fake.serve() as url:
        port = int(url.rsplit(":", 1)[1])
        sock = socket.create_connection(("127.0.0.1", port))
        body = b'{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}'
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-orch-state: ask\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        assert fake.wait_for("ask")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # killed mid-answer: the connection is reset
        gate.set()
        _handlers_done()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Error" not in err, err
