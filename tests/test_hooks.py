"""Lifecycle hooks: what each point sees, in which order, and what a failing hook leaves behind."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from statemachine_orch import (
    Engine,
    Hook,
    LLMState,
    Machine,
    PythonState,
    RunRecord,
    RunResult,
    RunStatus,
    TransitionRecord,
    open_store,
)
from statemachine_orch.testing import FakeMessagesAPI


def machine() -> Machine:
    return Machine("hooked", [LLMState("ask", prompt="Say hi.", max_tokens=20),
                              PythonState("shout", run=lambda ctx: "HI", needs=["ask"])])


def stored_seqs(db: Path, run_id: str) -> list[int]:
    with sqlite3.connect(db) as conn:
        return [seq for (seq,) in conn.execute("SELECT seq FROM transitions WHERE run_id = ? ORDER BY seq",
                                               (run_id,))]


class Recorder(Hook):
    """Notes every call, with the log rows stored at that moment."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.calls: list[tuple[Any, ...]] = []

    def run_started(self, run: RunRecord, *, resumed: bool, machine_hash: str) -> None:
        self.calls.append(("run_started", resumed, machine_hash == run.machine_hash))

    def before_step(self, run: RunRecord, step: TransitionRecord) -> None:
        self.calls.append(("before_step", step.seq, step.from_state, step.source, step.to_state))

    def after_output(self, run: RunRecord, step: TransitionRecord, output: Any) -> None:
        self.calls.append(("after_output", step.seq, output, stored_seqs(self.db, run.run_id)))

    def after_commit(self, run: RunRecord, step: TransitionRecord) -> None:
        self.calls.append(("after_commit", step.seq, step.to_state, stored_seqs(self.db, run.run_id)))

    def run_finished(self, run: RunRecord, result: RunResult) -> None:
        self.calls.append(("run_finished", result.status, result.path))


def test_hooks_see_each_stage_in_order_and_a_commit_only_once_it_is_durable(db_path: Path) -> None:
    fake = FakeMessagesAPI({"ask": "hi"})
    recorder = Recorder(db_path)
    with Engine(open_store(db_path), model=fake.model(), hooks=[recorder]) as engine:
        result = engine.run(machine())
    assert result.status is RunStatus.COMPLETED
    assert recorder.calls == [
        ("run_started", False, True),
        ("before_step", 1, "ask", "llm", None),
        ("after_output", 1, "hi", []),  # the answer arrived; nothing is committed yet
        ("after_commit", 1, "shout", [1]),
        ("before_step", 2, "shout", "python", None),
        ("after_output", 2, "HI", [1]),
        ("after_commit", 2, "__end__", [1, 2]),
        ("run_finished", RunStatus.COMPLETED, ["ask", "shout"]),
    ]


def test_only_the_methods_a_hook_overrides_are_called_and_hooks_run_in_the_order_given(db_path: Path) -> None:
    seen: list[str] = []

    class First(Hook):
        def after_commit(self, run: RunRecord, step: TransitionRecord) -> None:
            seen.append(f"first {step.seq}")

    class Second(Hook):
        def after_commit(self, run: RunRecord, step: TransitionRecord) -> None:
            seen.append(f"second {step.seq}")

    first = First()
    first.before_step = lambda *_: pytest.fail("an instance attribute is not an override")  # type: ignore[method-assign]
    with Engine(open_store(db_path), model=FakeMessagesAPI({"ask": "hi"}).model(),
                hooks=[first, Second()]) as engine:
        engine.run(machine())
    assert seen == ["first 1", "second 1", "first 2", "second 2"]


def test_a_hook_that_raises_stops_the_run_resumably_and_a_resume_pays_nothing_twice(db_path: Path) -> None:
    class Boom(Hook):
        def before_step(self, run: RunRecord, step: TransitionRecord) -> None:
            if step.from_state == "shout":
                raise RuntimeError("metrics backend down")

    fake = FakeMessagesAPI({"ask": "hi"})
    with Engine(open_store(db_path), model=fake.model(), hooks=[Boom()]) as engine:
        with pytest.raises(RuntimeError, match="metrics backend down"):
            engine.run(machine(), run_id="boom")
    with sqlite3.connect(db_path) as conn:
        status, error = conn.execute("SELECT status, error FROM runs WHERE run_id = 'boom'").fetchone()
    assert status == "interrupted" and "RuntimeError: metrics backend down" in error
    assert stored_seqs(db_path, "boom") == [1]  # the committed step stays committed
    recorder = Recorder(db_path)
    with Engine(open_store(db_path), model=fake.model(), hooks=[recorder]) as engine:
        resumed = engine.resume("boom", machine())
    assert resumed.status is RunStatus.COMPLETED and resumed.path == ["ask", "shout"]
    assert fake.calls("ask") == 1  # the paid answer was not asked for again
    assert recorder.calls[0] == ("run_started", True, True)


def test_hooks_see_async_runs_too(db_path: Path) -> None:
    recorder = Recorder(db_path)

    async def two_runs() -> list[RunResult]:
        async with Engine(open_store(db_path), model=FakeMessagesAPI({"ask": "hi"}).model(),
                          hooks=[recorder]) as engine:
            return list(await asyncio.gather(engine.arun(machine()), engine.arun(machine())))

    results = asyncio.run(two_runs())
    assert [r.status for r in results] == [RunStatus.COMPLETED] * 2
    assert sum(call[0] == "after_commit" for call in recorder.calls) == 4
    assert sum(call[0] == "run_finished" for call in recorder.calls) == 2
