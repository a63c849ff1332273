"""The offline model itself: the fake Messages API's loopback server, its responders, and the
answer files `orch --offline` reads. Driven through the real SDK (in process and over loopback
HTTP) and the real `orch` process."""

from __future__ import annotations

import http.client
import json
import math
import select
import signal
import socket
import sqlite3
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import anthropic
import pytest

from statemachine_orch import AnthropicModel, Engine, LLMState, Machine, MapState, RunStatus, open_store
from statemachine_orch.llm._offline import loopback_server
from statemachine_orch.testing import CapturedRequest, FakeMessagesAPI, Reply, disconnect, error, load_script, timeout

from .helpers import WAIT_S, EnvOrch, Orch, one_error_line, query, run_count, write

NOTES = '''
from pydantic import BaseModel

from statemachine_orch import LLMState, Machine


class Note(BaseModel):
    title: str


machine = Machine("notes", states=[
    LLMState("ask", prompt="Say something.", max_tokens=50),
    LLMState("extract", prompt="A title for: {ask}", needs=["ask"], max_tokens=50, output=Note),
])
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
    with pytest.raises(Refused, match="no answer for ask"), fake.serve() as url:
        client = anthropic.AsyncAnthropic(base_url=url, api_key="test-key-not-secret")
        with Engine(open_store(tmp_path / "orch.db"), model=AnthropicModel(client)) as engine:
            result = engine.run(one_state())
        assert fake.calls("ask") == 1  # answered once, not retried as a dropped connection
        assert result.status is RunStatus.FAILED
        assert "500" in (result.error or "") and "Refused: no answer for ask" in (result.error or "")
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


def _handlers_done(before: set[threading.Thread]) -> None:
    """Wait for the fake's request threads started since `before` (socketserver names them
    after their target)."""
    for thread in set(threading.enumerate()) - before:
        if "process_request_thread" in thread.name:
            thread.join(30)


def test_a_client_that_leaves_mid_answer_prints_no_traceback(capfd: pytest.CaptureFixture[str]) -> None:
    gate = threading.Event()
    fake = FakeMessagesAPI({"ask": Reply(text="x" * 4_000_000, gate=gate)})
    before = set(threading.enumerate())
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
        _handlers_done(before)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Error" not in err, err


# --------------------------------------------------------------------------- answer files


def answers_file(tmp_path: Path, answers: dict[str, Any], name: str = "answers.json") -> Path:
    return write(tmp_path / name, json.dumps(answers))


def notes(tmp_path: Path) -> Path:
    return write(tmp_path / "notes.py", NOTES)


def test_an_answer_file_naming_an_unknown_state_is_refused(tmp_path: Path) -> None:
    answers = answers_file(tmp_path, {"ask": "hello", "extarct": {"json": {"title": "Hi"}}})
    result = Orch(tmp_path / "orch.db")("run", notes(tmp_path), "--offline", answers)
    assert result.code == 2, result.stderr
    line = one_error_line(result)
    assert str(answers) in line and "'extarct'" in line and "ask, extract" in line
    assert run_count(tmp_path / "orch.db") == 0


def test_a_state_at_model_key_is_checked_by_its_state(tmp_path: Path) -> None:
    good = {"ask@claude-haiku-4-5": "hello", "extract": {"json": {"title": "Hi"}}}
    assert set(load_script(str(answers_file(tmp_path, good)), states=["ask", "extract"])) == set(good)
    with pytest.raises(ValueError, match="'asks'"):
        load_script(str(answers_file(tmp_path, {"asks@claude-haiku-4-5": "hello"})), states=["ask"])


def test_every_kind_of_answer_is_read_as_the_python_kit_builds_it(tmp_path: Path) -> None:
    answers = answers_file(tmp_path, {"ask": [
        "text", {"text": "late", "delay": 1.5}, {"json": {"title": "Hi"}},
        {"error": 529}, {"error": 429, "message": "slow down", "headers": {"retry-after": "2"}},
        {"fault": "timeout", "delay": 2}, {"fault": "disconnect"}, {"delay": 3}]})
    assert load_script(str(answers)) == {"ask": [
        "text", Reply(text="late", hold_s=1.5), Reply(data={"title": "Hi"}),
        error(529), error(429, "slow down", headers={"retry-after": "2"}),
        timeout(hold_s=2), disconnect(), Reply(hold_s=3)]}


@pytest.mark.parametrize("entry, problem", [
    ({"txet": "hello"}, "'txet'"),
    ({"text": "a", "json": {}}, "one of"),
    ({"text": 5}, "text"),
    ({"json": "not an object"}, "json"),
    ({"error": "529"}, "error"),
    ({"error": 200}, "error"),
    ({"fault": "crash"}, "fault"),
    ({"delay": -1}, "delay"),
    ({"delay": math.inf}, "delay"),
    ({"text": "a", "message": "only for errors"}, "'message'"),
    ([["nested"]], '["nested"]'),
    (5, "5"),
])
def test_a_malformed_answer_is_refused_naming_it(tmp_path: Path, entry: Any, problem: str) -> None:
    answers = answers_file(tmp_path, {"ask": entry})
    with pytest.raises(ValueError, match="ask") as refused:
        load_script(str(answers))
    assert problem in str(refused.value) and str(answers) in str(refused.value)


def test_errors_in_an_answer_file_fail_the_run_and_each_resume_goes_on_down_the_lists(tmp_path: Path) -> None:
    """Four 529s use up the retries of `ask`; two invalid answers use up the re-ask of `extract`.
    Each resume gets the next answer of the list, not the first one again."""
    answers = answers_file(tmp_path, {
        "ask": [{"error": 529}, {"error": 529, "message": "busy"}, {"error": 500}, {"error": 529}, "hello"],
        "extract": [{"json": {"name": "x"}}, {"json": {"name": "y"}}, {"json": {"title": "Hi"}}]})
    cli = Orch(tmp_path / "orch.db")
    first = cli("run", notes(tmp_path), "--offline", answers, "--json")
    assert first.code == 1, first.stderr
    run_id = json.loads(first.stdout)["run_id"]
    assert "gave up after 4 attempts" in json.loads(first.stdout)["error"]
    second = cli("resume", run_id, "--json")
    assert second.code == 1 and "answer does not match Note" in json.loads(second.stdout)["error"]
    resumed = cli.json("resume", run_id)
    assert (resumed["status"], resumed["outputs"]) == ("completed", {"ask": "hello", "extract": {"title": "Hi"}})
    assert [row["calls"] for row in cli.log(run_id)] == [4, 1, 2, 1]


def _in_flight(db: Path) -> bool:
    try:
        return bool(query(db, "SELECT run_id FROM runs WHERE in_flight IS NOT NULL"))
    except sqlite3.OperationalError:  # the schema is still being created
        return False


def _wait_for_a_call_in_flight(db: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not _in_flight(db) and proc.poll() is None:
        assert time.monotonic() < deadline, "no call went out"
        time.sleep(0.02)


def test_a_delay_in_an_answer_file_lets_the_cli_alone_show_a_stop_and_a_resume(tmp_path: Path) -> None:
    answers = answers_file(tmp_path, {"ask": [{"delay": 20, "text": "slow"}, "hello"],
                                      "extract": {"json": {"title": "Hello"}}})
    db = tmp_path / "orch.db"
    cli = EnvOrch(db)
    proc = cli.with_env(ORCH_STOP_GRACE="0").start("run", notes(tmp_path), "--offline", answers, "--run-id", "slow-1")
    try:
        _wait_for_a_call_in_flight(db, proc)
        proc.send_signal(signal.SIGTERM)  # stop it while the delayed answer is awaited
        assert Orch.finish(proc).code == 143
    finally:
        cli.stop_all()
    resumed = cli.json("resume", "slow-1")  # the stopped call took the slow answer: the next one now
    assert (resumed["status"], resumed["outputs"]["ask"]) == ("completed", "hello")


# --------------------------------------------------------------------------- orch resume --offline


def test_resume_offline_finishes_a_live_run_without_a_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeMessagesAPI({"extract": {"title": "Live"}}, default=None)  # "ask" gets a 400
    with fake.serve() as url:
        live = Orch(tmp_path / "orch.db", url)("run", notes(tmp_path), "--json")
    assert live.code == 1, live.stderr
    run_id = json.loads(live.stdout)["run_id"]
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    keyless = Orch(tmp_path / "orch.db", key=False)
    refused = keyless("resume", run_id)
    assert refused.code == 2 and "--offline" in one_error_line(refused)

    answers = answers_file(tmp_path, {"ask": "hello", "extract": {"json": {"title": "Offline"}}})
    resumed = keyless.json("resume", run_id, "--offline", answers)
    assert (resumed["status"], resumed["outputs"]) == ("completed", {"ask": "hello", "extract": {"title": "Offline"}})
    (stored,) = query(tmp_path / "orch.db", "SELECT options FROM runs")
    assert json.loads(stored["options"]) == {"offline": str(answers)}  # later resumes stay offline
    assert fake.calls() == 1


# --------------------------------------------------------------------------- answer files and map states

MAPPED = '''
from statemachine_orch import LLMState, Machine, MapState

machine = Machine("mapped", states=[
    MapState("each", items=lambda ctx: ["a", "b", "c", "d", "e", "f"], concurrency=CONCURRENCY,
             each=LLMState("w", prompt="Do {item}", max_tokens=50)),
])
'''


def mapped(tmp_path: Path, concurrency: int) -> Path:
    return write(tmp_path / "mapped.py", MAPPED.replace("CONCURRENCY", str(concurrency)))


def test_the_items_of_a_map_state_take_the_answers_of_the_list_in_item_order(tmp_path: Path) -> None:
    """Items running at once should get the answers of a list (a file's, as `orch --offline`
    builds the fake from it) in item order, as they do one at a time: otherwise an answer file
    cannot script per-item answers (machines/parallel.offline.json). Which request arrives first
    is a race, so the run is repeated: each time about half of them come out of order."""
    machine = Machine("mapped", states=[MapState("each", items=lambda ctx: list("abcdef"), concurrency=3,
                                                 each=LLMState("w", prompt="Do {item}", max_tokens=50))])
    script = load_script(str(answers_file(tmp_path, {"w": [f"did {item}" for item in "abcdef"]})))
    for attempt in range(10):
        with Engine(open_store(tmp_path / f"{attempt}.db"), model=FakeMessagesAPI(script).model()) as engine:
            assert engine.run(machine).output == [f"did {item}" for item in "abcdef"]


def test_a_resumed_map_state_goes_on_down_the_answer_list(tmp_path: Path) -> None:
    """One item at a time: item 2 fails on its 400 and the step fails; the resume should give it
    the next answer of the list ("did c"), as it does for a state of the run itself."""
    answers = answers_file(tmp_path, {"w": ["did a", "did b", {"error": 400}, "did d", "did e", "did f", "did c"]})
    cli = Orch(tmp_path / "orch.db")
    failed = cli("run", mapped(tmp_path, 1), "--offline", answers, "--run-id", "m1", "--json")
    assert failed.code == 1 and "item 2" in json.loads(failed.stdout)["error"]
    resumed = cli.json("resume", "m1")
    assert resumed["result"] == [f"did {item}" for item in "abcdef"]
