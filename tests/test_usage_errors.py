"""Bad input and misconfiguration get one clear line, exit 2, before anything is stored (issue 11:
items 7a, 10, 12, 13, 18): the real `orch` process, the real SDK, the fake Messages API served
on loopback, real SQLite files. What the Python API does with the same mistakes is here too.
"""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from statemachine_orch import (
    AnthropicModel,
    Engine,
    InputError,
    Machine,
    Price,
    PriceTable,
    PythonState,
    RunStatus,
    SQLiteStore,
    UsageError,
    open_store,
)
from statemachine_orch.testing import FakeMessagesAPI
from statemachine_orch.types import Budget

from .helpers import (
    CANARY_KEY,
    MODEL,
    REPORT,
    ROUTER,
    CLIResult,
    EnvOrch,
    Orch,
    offline_environment,
    one_error_line,
    run_count,
    seed_runs,
    write,
)

NOTES = f'''
from statemachine_orch import LLMState, Machine

notes = Machine("notes", model={MODEL!r}, states=[LLMState("draft", prompt="Draft a note.", max_tokens=50)])
'''

# module code that ends the interpreter or escapes `except Exception` while being imported
STOPPING_MODULES = {
    "exits": "import sys\nsys.exit(0)\n",
    "interrupts": "raise KeyboardInterrupt\n",
    "raises_a_base_exception": "class Halt(BaseException):\n    pass\n\nraise Halt('not today')\n",
}

Args = Callable[[Path], list[str | Path]]


def notes(tmp: Path) -> Path:
    return write(tmp / "notes.py", NOTES)


def stopping(name: str) -> Args:
    return lambda tmp: ["validate", write(tmp / f"{name}.py", STOPPING_MODULES[name])]


def with_db(command: str) -> Args:
    """`command` on a module that calls sys.exit(0), against an existing (empty) database."""
    def args(tmp: Path) -> list[str | Path]:
        asyncio.run(SQLiteStore(tmp / "orch.db").close())
        module = write(tmp / "exits.py", STOPPING_MODULES["exits"])
        return [command, module] if command != "replay" else ["replay", "--all", module]
    return args


def dotted(tmp: Path) -> list[str | Path]:
    """`orch validate halting`, run where halting.py is."""
    write(tmp / "halting.py", STOPPING_MODULES["raises_a_base_exception"])
    return ["validate", "halting"]


def price_file(entry: dict[str, Any]) -> Args:
    return lambda tmp: ["--prices", write(tmp / "prices.json", json.dumps({MODEL: entry})),
                        "run", notes(tmp), "--run-id", "priced"]


def budget(flag: str, value: str) -> Args:
    return lambda tmp: ["run", notes(tmp), "--run-id", "limited", flag, value]


def plain_run(tmp: Path) -> list[str | Path]:
    return ["run", notes(tmp), "--run-id", "plain"]


# case -> (arguments, extra environment, what the one line must say)
REFUSED: dict[str, tuple[Args, dict[str, str], str]] = {
    # 7a: limits, prices and numeric settings that are NaN, infinite, negative or not numbers
    # (each rule once here: the Python tests below try more values)
    **{f"{flag} {value}": (budget(flag, value), {}, f"{flag} is {shown}; use a finite number, 0 or more")
       for flag, value, shown in (("--max-cost", "nan", "nan"), ("--max-tokens", "-5", "-5"),
                                  ("--max-seconds", "inf", "inf"))},
    "price NaN": (price_file({"input": math.nan, "output": 15}), {}, f"price of '{MODEL}' (input) is nan"),
    "ORCH_STOP_GRACE=abc": (plain_run, {"ORCH_STOP_GRACE": "abc"}, "ORCH_STOP_GRACE='abc' is not a number"),
    "ORCH_BUSY_TIMEOUT=-1": (plain_run, {"ORCH_BUSY_TIMEOUT": "-1"}, "ORCH_BUSY_TIMEOUT is -1.0"),
    "ORCH_KILL_AT=after_commit:x": (plain_run, {"ORCH_KILL_AT": "after_commit:x"},
                                    "ORCH_KILL_AT='after_commit:x'"),
    # 10: a machine module that exits or raises a BaseException while it is imported
    **{f"validate {name}": (stopping(name), {}, f"{name}.py: importing the module raised {raised}")
       for name, raised in zip(STOPPING_MODULES, ("SystemExit (sys.exit(0))", "KeyboardInterrupt; fix the module",
                                                  "Halt: not today"), strict=True)},
    "graph exits": (with_db("graph"), {}, "exits.py: importing the module"),
    "replay --all exits": (with_db("replay"), {}, "exits.py: importing the module"),
    "validate a dotted module that raises": (dotted, {}, "halting: importing the module raised Halt: not today"),
    # 12: a key that no HTTP header can carry
    "key with a trailing CR": (plain_run, {"ANTHROPIC_API_KEY": CANARY_KEY + "\r"},
                               "ANTHROPIC_API_KEY has a carriage return"),
    # 13: no database a resume could reach, and empty run ids
    "--db :memory:": (lambda tmp: ["--db", ":memory:", *plain_run(tmp)], {}, "':memory:'"),
    "--run-id ''": (lambda tmp: ["run", notes(tmp), "--run-id", ""], {}, "the run id is empty"),
    # 18: the command line (only) says which file to fix
    "input file fails the input model": (
        lambda tmp: ["run", ROUTER, "--input", write(tmp / "in.json", "{}")], {}, "fix the input file"),
}


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[FakeMessagesAPI, str]]:
    fake = FakeMessagesAPI(default=None)
    fake.on("draft", "a note")
    with offline_environment(), fake.serve() as url:
        yield fake, url


@pytest.fixture(scope="module")
def refused(served: tuple[FakeMessagesAPI, str], tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, tuple[CLIResult, Path]]:
    """Each case's result and working directory (which holds its database, orch.db), all
    started at once (a start is about a second)."""
    started = {}
    for case, (make_args, env, _) in REFUSED.items():
        home = tmp_path_factory.mktemp("refused")
        cli = EnvOrch(home / "orch.db", served[1], cwd=home, extra=env)
        started[case] = (home, cli, cli.start(*make_args(home)))
    return {case: (cli.finish(proc), home) for case, (home, cli, proc) in started.items()}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_with_one_line_and_exit_2_before_anything_is_stored(
        case: str, refused: dict[str, tuple[CLIResult, Path]]) -> None:
    result, home = refused[case]
    assert result.code == 2, (result.code, result.stdout, result.stderr)
    line = one_error_line(result)
    assert REFUSED[case][2] in line
    assert result.stdout == ""
    assert run_count(home / "orch.db") == 0
    assert not (home / ":memory:").exists()
    assert "CANARY" not in result.stderr


def test_no_refused_command_reached_the_api(refused: dict[str, tuple[CLIResult, Path]],
                                            served: tuple[FakeMessagesAPI, str]) -> None:
    assert served[0].calls() == 0


# --------------------------------------------------------------------------- 7a from Python


@pytest.mark.parametrize("limits", [{"max_cost_usd": math.nan}, {"max_cost_usd": -1.0}, {"max_tokens": -5},
                                    {"max_seconds": math.inf}, {"max_seconds": -0.5}])
def test_a_budget_limit_must_be_a_finite_amount(limits: dict[str, float]) -> None:
    ((name, value),) = limits.items()
    with pytest.raises(UsageError, match=f"^{name} is {value!r}; use a finite number, 0 or more$"):
        Budget(**limits)
    assert Budget(max_cost_usd=0.0, max_tokens=0, max_seconds=0.0).to_json() == {
        "max_cost_usd": 0.0, "max_tokens": 0, "max_seconds": 0.0}


@pytest.mark.parametrize(("price", "says"), [(Price(math.nan, 15.0), "(input) is nan"),
                                             (Price(3.0, math.inf), "(output) is inf"),
                                             (Price(3.0, 15.0, cache_read=-0.3), "(cache_read) is -0.3")])
def test_a_price_must_be_a_finite_amount(price: Price, says: str) -> None:
    with pytest.raises(UsageError, match=r"price of 'mine' " + says.replace("(", r"\(").replace(")", r"\)")):
        PriceTable({"mine": price})
    with pytest.raises(UsageError, match="price of 'mine'"):
        PriceTable().merged({"mine": price})


# --------------------------------------------------------------------------- 12 from Python


@pytest.mark.parametrize(("key", "says"), [(CANARY_KEY + "\r", "a carriage return at character 61 of 61"),
                                           (CANARY_KEY + "\n", "a line feed at character 61"),
                                           ("\t" + CANARY_KEY, "a tab at character 1"),
                                           (CANARY_KEY[:9] + "\x7f" + CANARY_KEY[9:], "a control character")])
def test_a_key_no_header_can_carry_is_refused_when_the_model_is_built(
        monkeypatch: pytest.MonkeyPatch, key: str, says: str) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", key)
    with pytest.raises(UsageError, match=f"ANTHROPIC_API_KEY has {says}") as refused:
        AnthropicModel()
    assert "CANARY" not in str(refused.value)
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    monkeypatch.setenv("ANTHROPIC_AUTH_TOKEN", "token\r")
    with pytest.raises(UsageError, match="ANTHROPIC_AUTH_TOKEN has a carriage return"):
        AnthropicModel()


# --------------------------------------------------------------------------- 13: empty ids, :memory:, replay --all


@pytest.fixture
def one_run(orch: EnvOrch, fake: FakeMessagesAPI, tmp_path: Path) -> EnvOrch:
    fake.on("draft", "a note")
    orch.ok("run", notes(tmp_path), "--run-id", "stored")
    return orch


def test_an_empty_run_id_is_refused_not_read_as_every_run(one_run: EnvOrch) -> None:
    commands = [("audit", "verify", ""), ("show", ""), ("log", ""), ("resume", ""), ("runs", "--before", "")]
    results = [one_run.finish(proc) for proc in [one_run.start(*args) for args in commands]]
    for result in results:
        assert result.code == 2, (result.stdout, result.stderr)
        assert "the run id is empty" in one_error_line(result)
        assert result.stdout == ""


def test_open_store_refuses_a_database_no_resume_could_reach(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for target in (":memory:", "sqlite:///:memory:", ""):
        with pytest.raises(UsageError, match="names no database file"):
            open_store(target)
    assert list(tmp_path.iterdir()) == []


def test_replay_all_reports_a_corrupted_run_and_goes_on_with_the_others(orch: Orch, tmp_path: Path) -> None:
    seed_runs(orch.db, {"first": None, "garbled": None, "last": None})
    with closing(sqlite3.connect(orch.db)) as conn, conn:
        conn.execute("UPDATE transitions SET output = 'garbage{' WHERE run_id = 'garbled' AND seq = 2")

    result = orch("replay", "--all", REPORT)
    assert result.code == 1, result.stdout + result.stderr
    assert one_error_line(result).startswith("orch: error: cannot replay run garbled: ")
    assert "garbled seq 2 output is not valid JSON" in result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[:3] for line in lines[1:-1]] == [
        ["first", "completed", "match"], ["garbled", "-", "UNREADABLE"], ["last", "completed", "match"]]
    assert lines[-1] == "3 run(s) of report: 2 matching, 0 diverged, 1 unreadable"

    summary = orch("replay", "--all", REPORT, "--json")
    assert summary.code == 1
    report = json.loads(summary.stdout)
    assert (report["runs"], report["matching"], report["diverged"], report["unreadable"]) == (3, 2, 0, 1)
    assert [r["run_id"] for r in report["reports"]] == ["first", "last"]
    (problem,) = report["unreadable_runs"]
    assert problem["run_id"] == "garbled" and "not valid JSON" in problem["error"]


# --------------------------------------------------------------------------- 18: the input model's own instance


class Ticket(BaseModel):
    text: str
    priority: int = 1


class Other(BaseModel):
    text: str


echo = Machine("echo", input_model=Ticket, states=[PythonState("echo", run=lambda ctx: ctx.input.text)])


def test_the_input_models_own_instance_is_accepted_from_python(tmp_path: Path) -> None:
    with Engine(open_store(tmp_path / "orch.db")) as engine:
        result = engine.run(echo, Ticket(text="my tent leaks", priority=3))
        record, _ = asyncio.run(_load(tmp_path / "orch.db", result.run_id))
    assert (result.status, result.outputs) == (RunStatus.COMPLETED, {"echo": "my tent leaks"})
    assert record.input == {"text": "my tent leaks", "priority": 3}  # stored as a dict input would be


async def _load(db: Path, run_id: str) -> Any:
    store = open_store(db)
    try:
        return await store.load_run(run_id)
    finally:
        await store.close()


@pytest.mark.parametrize(("data", "says"), [({"priority": 2}, "input does not match Ticket"),
                                            (Other(text="x"), "must be a JSON object or a Ticket, got Other"),
                                            (["a list"], "must be a JSON object or a Ticket, got list")])
def test_an_input_error_from_python_names_no_input_file(tmp_path: Path, data: Any, says: str) -> None:
    with Engine(open_store(tmp_path / "orch.db")) as engine, pytest.raises(InputError) as refused:
        engine.run(echo, data)
    assert says in str(refused.value)
    assert "input file" not in str(refused.value)
