"""A paid answer is stored as it arrived, whatever it holds (#11.2): text SQLite's UTF-8 cannot
hold (a lone surrogate) and usage counts beyond SQLite's 64-bit integers. The real `orch`, the
real SDK, the fake Messages API on loopback, a real SQLite file."""

from __future__ import annotations

import json
from pathlib import Path

from statemachine_orch.testing import FakeMessagesAPI, Reply, error

from .helpers import MODEL, Orch, query, write

INT64_MAX = 2**63 - 1
HALF_A_PAIR = "half a pair \ud800 and an emoji \U0001f600"  # a lone surrogate: not UTF-8
HUGE = 2**70

MACHINE = f'''
from statemachine_orch import LLMState, Machine

machine = Machine("odd", model={MODEL!r}, states=[
    LLMState("draft", prompt="Draft.", max_tokens=50),
    LLMState("count", prompt="Count.", max_tokens=50),
    LLMState("final", prompt="Finish.", max_tokens=50),
])
'''


def stored(db: Path, state: str, column: str) -> object:
    (row,) = query(db, f"SELECT {column} FROM transitions WHERE run_id = 'odd' AND from_state = ?", state)
    return row[0]


def test_answers_sqlite_cannot_hold_are_stored_losslessly_and_never_paid_again(
        orch: Orch, fake: FakeMessagesAPI, tmp_path: Path) -> None:
    machine = write(tmp_path / "odd.py", MACHINE)
    fake.on("draft", HALF_A_PAIR)
    fake.on("count", Reply(text="many", input_tokens=HUGE, output_tokens=HUGE + 1))
    fake.on("final", error(400, "not yet \udfff"), "done")  # an error message with one too

    failed = orch("--log-json", "run", machine, "--run-id", "odd")
    assert failed.code == 1, failed.stderr  # the 400 at "final", after two committed steps
    assert "internal error" not in failed.stderr
    assert json.loads(str(stored(orch.db, "draft", "output"))) == HALF_A_PAIR
    assert json.loads(str(stored(orch.db, "draft", "response")))["content"][0]["text"] == HALF_A_PAIR
    usage = json.loads(str(stored(orch.db, "count", "response")))["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (HUGE, HUGE + 1)  # exact, in the JSON
    assert stored(orch.db, "count", "input_tokens") == INT64_MAX  # the column saturates
    assert "not yet \\udfff" in str(stored(orch.db, "final", "error"))  # plain text: escaped
    assert "not yet \\udfff" in failed.stderr.splitlines()[-1]  # the JSON trace's last event

    resumed = orch("resume", "odd")
    assert resumed.code == 0, resumed.stderr
    assert (fake.calls("draft"), fake.calls("count"), fake.calls("final")) == (1, 1, 2)

    shown = orch.ok("show", "odd", "--json")
    assert json.loads(shown.stdout)["outputs"] == {"draft": HALF_A_PAIR, "count": "many", "final": "done"}
    assert "\\ud800" in orch.ok("show", "odd").stdout  # printed escaped, never a traceback
    assert orch.ok("audit", "verify", "odd").stdout.startswith("run odd: ok")
    assert "matches the recording" in orch.ok("replay", "odd").stdout
