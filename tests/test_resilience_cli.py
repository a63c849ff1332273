"""Resilience and cost end to end: the real `orch` process, the real SDK, the fake Messages API
served on loopback, and real SQLite files.

The `orch` process really sleeps between retries, so the machines here retry after 10 ms and
the fake asks for at most 20 ms (`retry-after-ms`). Assertions are on the delays recorded in
the attempt log, never on wall time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from statemachine_orch import PriceTable, RetryPolicy
from statemachine_orch.testing import FakeMessagesAPI, disconnect, error, timeout

from .helpers import (
    MODEL,
    Orch,
    cost_of,
    query,
    reply,
    stored_status,
    write,
)

QUICK = RetryPolicy(max_attempts=4, initial_delay_s=0.01, multiplier=1.0, jitter=0.0)
STATE_TIMEOUT_S = 0.3
HOLD_S = 1.0  # how long the fake holds a connection it will not answer (> STATE_TIMEOUT_S)

MACHINES = f'''
from statemachine_orch import LLMState, Machine, RetryPolicy

notes = Machine("notes", model={MODEL!r}, retry_policy={QUICK!r}, states=[
    LLMState("draft", prompt="Draft a note.", max_tokens=50),
    LLMState("expand", prompt="Expand: {{draft}}", needs=["draft"], max_tokens=20000),
])

patient = Machine("patient", model={MODEL!r}, retry_policy={QUICK!r}, states=[
    LLMState("wait", prompt="Take your time.", max_tokens=50, timeout={STATE_TIMEOUT_S!r}),
])

lookup = Machine("lookup", model={MODEL!r}, input_vars={{"q": lambda data: data["q"]}}, states=[
    LLMState("find", prompt="Look up {{q}}.", max_tokens=50, cache=True),
])
'''

ATTEMPT_FIELDS = ("seq", "state", "attempt", "kind", "status_code", "request_id", "delay_s")


DRAFT = reply("a short draft", input_tokens=400, output_tokens=50)
EXPAND = reply("a longer text", input_tokens=900, output_tokens=300)


@pytest.fixture
def machines(tmp_path: Path) -> Path:
    return write(tmp_path / "resilient.py", MACHINES)


def attempts(orch: Orch, run_id: str) -> list[tuple[Any, ...]]:
    """`orch log RUN_ID --attempts --json`, as (seq, state, attempt, kind, status, request id, slept)."""
    lines = orch.ok("log", run_id, "--attempts", "--json").stdout.splitlines()
    return [tuple(json.loads(line)[f] for f in ATTEMPT_FIELDS) for line in lines]


def test_log_attempts_shows_every_failed_call_with_its_delay(orch: Orch, fake: FakeMessagesAPI,
                                                             machines: Path) -> None:
    fake.on("draft", error(429, "slow down", headers={"retry-after-ms": "20"}), error(529, "busy"),
            disconnect(), DRAFT)
    fake.on("expand", EXPAND)
    result = orch.json("run", f"{machines}:notes", "--run-id", "noisy")
    assert (result["status"], result["path"]) == ("completed", ["draft", "expand"])
    assert fake.calls("draft") == 4
    assert attempts(orch, "noisy") == [
        (1, "draft", 1, "transient", 429, "req_fake_000001", 0.02),  # the server's retry-after-ms
        (1, "draft", 2, "transient", 529, "req_fake_000002", QUICK.backoff(2)),
        (1, "draft", 3, "connection", None, None, QUICK.backoff(3)),
    ]

    table = orch.ok("log", "noisy", "--attempts").stdout.splitlines()
    assert table[0].split() == ["seq", "state", "attempt", "kind", "status", "request_id", "slept_s",
                                "error"]
    assert [line.split()[:7] for line in table[1:4]] == [
        ["1", "draft", "1", "transient", "429", "req_fake_000001", "0.02"],
        ["1", "draft", "2", "transient", "529", "req_fake_000002", "0.01"],
        ["1", "draft", "3", "connection", "-", "-", "0.01"],
    ]
    assert "rate_limit_error: slow down" in table[1]
    assert table[4:] == ["3 failed attempt(s) in 2 step(s)"]
    assert [(row["from_state"], row["calls"]) for row in orch.log("noisy")] == [
        ("draft", 4), ("expand", 1)]


def test_max_cost_stops_the_run_and_a_resume_with_more_completes_it(
        orch: Orch, fake: FakeMessagesAPI, machines: Path) -> None:
    fake.on("draft", DRAFT)
    fake.on("expand", EXPAND)
    stopped = orch("-q", "run", f"{machines}:notes", "--run-id", "capped", "--max-cost", "0.05")
    assert stopped.code == 1, stopped.stderr
    summary, reason, hint = stopped.stdout.splitlines()
    assert summary.startswith("run capped budget_exceeded after 1 step(s): draft")
    assert reason.startswith("error: BudgetExceededError: budget exceeded before calling expand: cost:")
    assert reason.endswith("> max_cost_usd $0.0500; raise the limit and resume")
    assert hint == ("resume with: orch resume capped and a raised --max-cost, --max-tokens or "
                    "--max-seconds")
    assert stored_status(orch.db, "capped") == "budget_exceeded"
    assert fake.calls("expand") == 0

    resumed = orch.json("resume", "capped", "--max-cost", "1")
    assert (resumed["status"], resumed["path"]) == ("completed", ["draft", "expand"])
    assert (fake.calls("draft"), fake.calls("expand")) == (1, 1)  # the committed draft is not resent
    assert resumed["cost_usd"] == pytest.approx(cost_of(DRAFT, EXPAND, prices=PriceTable()))
    assert orch.json("show", "capped")["options"]["budget"] == {"max_cost_usd": 1.0}


PRICE_FILE = {MODEL: {"input": 30.0, "output": 150.0}}


@pytest.mark.parametrize("via", ["--prices", "ORCH_PRICES"])
def test_a_price_file_changes_the_reported_cost(orch: Orch, fake: FakeMessagesAPI, machines: Path,
                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                via: str) -> None:
    prices_path = write(tmp_path / "prices.json", json.dumps(PRICE_FILE))
    fake.on("draft", DRAFT)
    fake.on("expand", EXPAND)
    listed = orch.json("run", f"{machines}:notes", "--run-id", "list-price")
    if via == "--prices":
        priced = orch.json("--prices", str(prices_path), "run", f"{machines}:notes", "--run-id", "own")
    else:
        monkeypatch.setenv("ORCH_PRICES", str(prices_path))
        priced = orch.json("run", f"{machines}:notes", "--run-id", "own")
        monkeypatch.delenv("ORCH_PRICES")

    default, custom = PriceTable(), PriceTable.load(prices_path)
    assert listed["cost_usd"] == pytest.approx(cost_of(DRAFT, EXPAND, prices=default))
    assert priced["cost_usd"] == pytest.approx(cost_of(DRAFT, EXPAND, prices=custom))
    assert cost_of(DRAFT, EXPAND, prices=custom) == pytest.approx(10 * cost_of(DRAFT, EXPAND, prices=default))
    assert [row["cost_usd"] for row in orch.log("own")] == pytest.approx(
        [cost_of(DRAFT, prices=custom), cost_of(EXPAND, prices=custom)])
    runs = {r["run_id"]: r["cost_usd"] for r in orch.json("runs")}
    assert runs == pytest.approx({"own": priced["cost_usd"], "list-price": listed["cost_usd"]})


def test_a_state_timeout_on_a_held_connection_is_retried_as_timeout_attempts(
        orch: Orch, fake: FakeMessagesAPI, machines: Path) -> None:
    fake.on("wait", timeout(hold_s=HOLD_S), timeout(hold_s=HOLD_S),
            reply("there you are", input_tokens=50, output_tokens=5))
    result = orch.json("run", f"{machines}:patient", "--run-id", "held")
    assert (result["status"], result["outputs"]) == ("completed", {"wait": "there you are"})
    assert fake.calls("wait") == 3
    assert attempts(orch, "held") == [(1, "wait", n, "timeout", None, None, QUICK.backoff(n))
                                      for n in (1, 2)]


def test_x_should_retry_false_is_not_retried_and_the_run_resumes(orch: Orch, fake: FakeMessagesAPI,
                                                                 machines: Path) -> None:
    fake.on("draft", error(503, "down for maintenance", headers={"x-should-retry": "false"}), DRAFT)
    fake.on("expand", EXPAND)
    failed = orch("-q", "run", f"{machines}:notes", "--run-id", "told")
    assert failed.code == 1, failed.stderr
    assert ("error: LLMError: Messages API returned 503: api_error: down for maintenance"
            in failed.stdout.splitlines())
    assert fake.calls("draft") == 1
    assert attempts(orch, "told") == [(1, "draft", 1, "deterministic", 503, "req_fake_000001", None)]
    assert stored_status(orch.db, "told") == "failed"

    resumed = orch.json("resume", "told")
    assert resumed["status"] == "completed"
    assert (fake.calls("draft"), fake.calls("expand")) == (2, 1)


def test_cache_hits_show_in_the_log_runs_and_show_and_replay(orch: Orch, fake: FakeMessagesAPI,
                                                            machines: Path, tmp_path: Path) -> None:
    found = reply("42", input_tokens=120, output_tokens=8)
    fake.on("find", found)
    data = write(tmp_path / "q.json", json.dumps({"q": "the answer"}))
    for run_id in ("paid", "free"):
        assert orch.json("run", f"{machines}:lookup", "--input", data, "--run-id", run_id)[
            "outputs"] == {"find": "42"}
    assert fake.calls() == 1  # the second run sent nothing

    (row,) = orch.log("free")
    assert (row["source"], row["calls"], row["cost_usd"]) == ("cache", 0, 0.0)
    assert (row["input_tokens"], row["output_tokens"]) == (0, 0)
    assert "cache hit: same request as run paid seq 1" in row["reason"]
    totals = orch.json("show", "free")["totals"]
    assert (totals["calls"], totals["cache_hits"], totals["cost_usd"]) == (0, 1, 0.0)
    assert orch.ok("log", "free").stdout.splitlines()[-1] == (
        "total: 1 step(s), 0 in / 0 out tokens (0 cache read, 0 cache write), $0.0000, 0 call(s), "
        "1 cache hit(s)")
    tokens = found.input_tokens + found.output_tokens  # type: ignore[operator]
    assert orch.ok("runs").stdout.splitlines()[-1] == (
        f"machine lookup: 2 run(s), 2 step(s), {tokens} tokens, "
        f"${cost_of(found, prices=PriceTable()):.4f}, 1 cache hit(s)")
    assert [r["source"] for r in query(orch.db, "SELECT source FROM transitions ORDER BY run_id")] == [
        "cache", "llm"]  # "free" sorts before "paid"

    replayed = orch("replay", "free")
    assert replayed.code == 0, replayed.stdout + replayed.stderr
    assert "replay free: matches the recording (1 transition(s), no API calls)" in replayed.stdout
    assert fake.calls() == 1
