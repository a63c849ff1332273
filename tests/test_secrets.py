"""The API key never leaves the process: not in output, traces, tracebacks or the database.

Every command runs with conftest's canary key, which the fake checks really reached it; the
database, its -wal and its -shm are read (while the writing process is still alive, for the
WAL) and must be private to their owner.
"""

from __future__ import annotations

import json
import stat
import threading
from collections.abc import Mapping
from pathlib import Path

import pytest

from statemachine_orch.testing import FakeMessagesAPI, Reply, error

from .helpers import (
    CANARY_KEY,
    MODEL,
    REPORT,
    REPORT_INPUT,
    REPORT_STATES,
    ROUTER,
    ROUTER_STATES,
    CLIResult,
    EnvOrch,
    Orch,
    resume_hint,
    router_input,
    script,
    write,
)

# the whole key, and fragments a truncated or reformatted copy would still contain
KEY_FRAGMENTS = (CANARY_KEY, "CANARY", CANARY_KEY[-16:])


class KeyCheckingAPI(FakeMessagesAPI):
    """The fake Messages API, also noting which API keys reached it (x-api-key or bearer)."""

    def __init__(self) -> None:
        super().__init__(default=None)
        self.keys: set[str | None] = set()

    def handle(self, method: str, path: str, headers: Mapping[str, str],
               body: bytes) -> tuple[int, dict[str, str], bytes, Reply | None]:
        lower = {k.lower(): v for k, v in headers.items()}
        bearer = lower.get("authorization", "").removeprefix("Bearer ")
        self.keys.add(lower.get("x-api-key") or bearer or None)
        return super().handle(method, path, headers, body)


@pytest.fixture
def fake() -> KeyCheckingAPI:
    return KeyCheckingAPI()


class Evidence:
    """Everything the key must not appear in, by where it came from."""

    def __init__(self) -> None:
        self.seen: dict[str, bytes] = {}

    def add(self, label: str, data: str | bytes) -> None:
        self.seen[f"{label} #{len(self.seen)}"] = data.encode() if isinstance(data, str) else data

    def command(self, label: str, result: CLIResult) -> CLIResult:
        self.add(f"{label} stdout", result.stdout)
        self.add(f"{label} stderr", result.stderr)
        return result

    def database(self, db: Path) -> dict[str, bytes]:
        """The database and whichever of its -wal/-shm exist now; each must be mode 0600."""
        found = {}
        for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            if path.exists():
                assert stat.S_IMODE(path.stat().st_mode) == 0o600, (path, oct(path.stat().st_mode))
                found[path.name] = path.read_bytes()
                self.add(path.name, found[path.name])
        return found

    def records(self, orch: Orch, run_id: str) -> None:
        self.command("show --json", orch.ok("show", run_id, "--json"))
        self.command("log --json", orch.ok("log", run_id, "--json"))

    def assert_no_key(self) -> None:
        assert self.seen
        leaks = [(label, fragment) for label, data in self.seen.items()
                 for fragment in KEY_FRAGMENTS if fragment.encode() in data]
        assert leaks == []


@pytest.fixture
def evidence() -> Evidence:
    return Evidence()


def test_a_report_run_with_console_trace_keeps_the_key_out_of_output_and_database(
        orch: Orch, fake: KeyCheckingAPI, evidence: Evidence) -> None:
    gate = threading.Event()
    replies = script(fake, REPORT_STATES)
    replies["executive_summary"].gate = gate
    proc = orch.start("run", REPORT, "--input", REPORT_INPUT, "--json")
    try:
        assert fake.wait_for("executive_summary", 1, timeout=30)
        live = evidence.database(orch.db)  # four steps committed, the writer still open
    finally:
        gate.set()
    assert set(live) == {"orch.db", "orch.db-wal", "orch.db-shm"}
    committed = live["orch.db"] + live["orch.db-wal"]
    assert all((replies[s].text or "").encode() in committed for s in REPORT_STATES[:4])
    result = evidence.command("run", Orch.finish(proc))
    assert result.code == 0, result.stderr
    assert "transition" in result.stderr and "run_finished" in result.stderr  # console trace
    run_id = json.loads(result.stdout)["run_id"]
    evidence.records(orch, run_id)
    evidence.database(orch.db)
    assert fake.keys == {CANARY_KEY}
    evidence.assert_no_key()


def test_a_router_run_with_json_trace_keeps_the_key_out_of_output_and_database(
        orch: Orch, fake: KeyCheckingAPI, evidence: Evidence, tmp_path: Path) -> None:
    fake.on("sentiment_analysis", "positive")
    script(fake, ROUTER_STATES[1:])
    result = evidence.command("run", orch("--log-json", "run", ROUTER, "--input",
                                          router_input(tmp_path), "--json"))
    assert result.code == 0, result.stderr
    events = [json.loads(line)["event"] for line in result.stderr.splitlines()]
    assert events.count("transition") == 2 and events[-1] == "run_finished"
    evidence.records(orch, json.loads(result.stdout)["run_id"])
    evidence.database(orch.db)
    assert fake.keys == {CANARY_KEY}
    evidence.assert_no_key()


def test_failed_runs_and_debug_tracebacks_keep_the_key_out(
        orch: Orch, fake: KeyCheckingAPI, evidence: Evidence, tmp_path: Path) -> None:
    fake.on("data_validation", error(401, "invalid x-api-key"))
    fake.on("sentiment_analysis", error(400, "max_tokens: too small"))
    rejected = evidence.command("401", orch("--debug", "run", REPORT, "--input", REPORT_INPUT))
    assert rejected.code == 1, rejected.stderr
    unauthorised = resume_hint(rejected.stdout)
    assert "401" in rejected.stdout
    invalid = evidence.command("400", orch("--log-json", "--debug", "run", ROUTER, "--input",
                                           router_input(tmp_path)))
    assert invalid.code == 1, invalid.stderr
    assert "400" in invalid.stdout
    empty = write(tmp_path / "empty.json", "{}")
    for args in (["resume", "NO_SUCH_RUN"], ["run", ROUTER, "--input", empty]):
        refused = evidence.command("refused", orch("--debug", *args))
        assert refused.code == 2
        assert "Traceback (most recent call last)" in refused.stderr
    evidence.records(orch, unauthorised)
    evidence.database(orch.db)
    assert fake.keys == {CANARY_KEY}
    assert fake.calls() == 2
    evidence.assert_no_key()


# --------------------------------------------------------------------------- a key echoed in answers

SHORT_KEY = "k3y-7ch"  # 7 characters: not shaped like a key, so only knowing it can blank it
ECHO_MACHINE = f'''
from pydantic import BaseModel
from statemachine_orch import LLMState, Machine, RetryPolicy


class Note(BaseModel):
    note: str
    n: int


machine = Machine("echo", model={MODEL!r}, retry_policy=RetryPolicy(max_attempts=2, initial_delay_s=0, jitter=0),
                  states=[LLMState("say", prompt="Say it.", max_tokens=50),
                          LLMState("form", prompt="Fill it.", output=Note, max_tokens=50)])
'''


@pytest.mark.parametrize("key", [CANARY_KEY, SHORT_KEY], ids=["canary", "short"])
def test_a_key_echoed_in_successful_answers_is_kept_out_of_everything(
        orch: EnvOrch, fake: KeyCheckingAPI, evidence: Evidence, tmp_path: Path, key: str) -> None:
    """The server quotes the key in an error, a text answer, an invalid structured answer
    (re-asked, kept in the attempt log) and the valid one (#11.8)."""
    fake.on("say", error(529, f"busy; your key {key}", headers={"retry-after-ms": "0"}), f"the key is {key}!")
    fake.on("form", {"note": key, "n": "many"}, {"note": f"again {key}", "n": 1})
    keyed = orch.with_env(ANTHROPIC_API_KEY=key)
    machine = write(tmp_path / "echo.py", ECHO_MACHINE)
    console = evidence.command("run", keyed("run", machine, "--run-id", "echo"))
    assert console.code == 0, console.stderr
    assert fake.keys == {key}
    as_json = evidence.command("run --json", keyed("--log-json", "run", machine, "--run-id", "again", "--json"))
    assert json.loads(as_json.stdout)["outputs"] == {"say": "the key is [REDACTED]!",
                                                     "form": {"note": "again [REDACTED]", "n": 1}}
    for run_id in ("echo", "again"):
        evidence.command("show --json", keyed.ok("show", run_id, "--json"))
        evidence.command("log --json", keyed.ok("log", run_id, "--json"))
    attempts = evidence.command("attempts", keyed.ok("log", "echo", "--attempts", "--json"))
    assert len(attempts.stdout.splitlines()) == 2  # the 529 and the invalid answer, re-asked
    evidence.database(orch.db)
    leaks = [label for label, data in evidence.seen.items() if key.encode() in data]
    assert leaks == []
