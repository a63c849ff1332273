"""Child runs through the real `orch`: `show` lists a run's children and names a child's
parent, `log` lists the children under the step that started them, `resume` refuses a child,
`replay` replays one alone, `graph` says which states fan out, and a SIGKILL in the middle of a
map state costs no finished item a second call."""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from statemachine_orch import Engine, Machine, MapState, ParallelState, PythonState, UsageError, open_store
from statemachine_orch.cli._render import mermaid
from statemachine_orch.testing import CapturedRequest, FakeMessagesAPI, Reply, error

from .helpers import EnvOrch, Orch, database_fingerprint, one_error_line, query, stored_log, write

FAN = '''
from pydantic import BaseModel
from statemachine_orch import LLMState, Machine, MachineState, MapState, PythonState

class Topic(BaseModel):
    topic: str

writer = Machine("writer", [
    LLMState("draft", prompt="Draft about {topic}"),
    LLMState("polish", prompt="Polish: {draft}", needs=["draft"]),
], input_model=Topic, result="draft")

machine = Machine("fan", [
    MapState("work", items=lambda ctx: ["a", "b", "c"], concurrency=2,
             each=LLMState("worker", prompt="Item {item}", max_tokens=50)),
    MachineState("write", machine=writer, input=lambda ctx: {"topic": "owls"}),
    PythonState("summary", needs=["work"], run=lambda ctx: " | ".join(ctx.outputs["work"])),
])
'''

FAN_GRAPH = """stateDiagram-v2
    [*] --> work
    work --> write: continue
    write --> summary: continue
    summary --> [*]: continue
    state "work (map: each=worker, concurrency 2)" as work
    state "write (machine: writer)" as write
    classDef children stroke-width:3px
    class work,write children"""


def answer_by_prompt(fake: FakeMessagesAPI, fail_once: str | None = None) -> None:
    """Answer each request `answer to PROMPT`; the first request with prompt `fail_once` gets a 400."""
    def respond(request: CapturedRequest) -> Reply:
        if request.prompt == fail_once and sum(r.prompt == fail_once for r in fake.requests) == 1:
            return error(400, "bad item")
        return Reply(text=f"answer to {request.prompt}")

    fake.default = respond


@pytest.fixture
def fan(tmp_path: Path) -> str:
    return f"{write(tmp_path / 'fan.py', FAN)}:machine"


def test_show_lists_a_runs_children_which_runs_does_not(orch: Orch, fake: FakeMessagesAPI, fan: str) -> None:
    answer_by_prompt(fake)
    assert orch.json("run", fan, "--run-id", "fan")["status"] == "completed"
    assert [r["run_id"] for r in orch.json("runs")] == ["fan"]
    assert "fan." not in orch.ok("runs").stdout

    shown = orch.ok("show", "fan").stdout
    table = shown[shown.index("child runs:"):].splitlines()
    assert [line.split()[:5] for line in table[1:]] == [
        ["run_id", "state", "item", "status", "steps"],
        ["fan.0.1.0", "work", "0", "completed", "1"], ["fan.0.1.1", "work", "1", "completed", "1"],
        ["fan.0.1.2", "work", "2", "completed", "1"], ["fan.1.1.0", "write", "0", "completed", "2"]]
    as_json = orch.json("show", "fan")
    assert as_json["parent"] is None
    children = as_json["children"]
    assert [(c["run_id"], c["machine"], c["state"], c["item"], c["status"], c["steps"]) for c in children] == [
        *[(f"fan.0.1.{i}", "fan__worker", "work", i, "completed", 1) for i in range(3)],
        ("fan.1.1.0", "writer", "write", 0, "completed", 2)]
    assert sum(c["cost_usd"] for c in children) == pytest.approx(as_json["totals"]["cost_usd"])


def test_show_of_a_child_names_its_parent_and_its_machines_declared_result(
        orch: Orch, fake: FakeMessagesAPI, fan: str) -> None:
    """The sub-machine declares result="draft": its run answers the draft (as the parent's
    `write` output does), not the polish its last state committed."""
    answer_by_prompt(fake)
    parent = orch.json("run", fan, "--run-id", "fan")
    shown = orch.json("show", "fan.1.1.0")
    assert shown["result"] == parent["outputs"]["write"] == "answer to Draft about owls"
    assert shown["parent"] == {"run_id": "fan", "state": "write", "item": 0}
    assert shown["children"] == []
    text = orch.ok("show", "fan.1.1.0").stdout.splitlines()
    assert text[1] == "  child of run fan (state write, item 0)"
    assert text[text.index("result:") + 1] == "  answer to Draft about owls"


def test_log_lists_each_child_under_the_step_that_started_it(orch: Orch, fake: FakeMessagesAPI, fan: str) -> None:
    answer_by_prompt(fake, fail_once="Item b")
    failed = orch("run", fan, "--run-id", "fan")
    assert failed.code == 1, failed.stderr
    lines = orch.ok("log", "fan").stdout.splitlines()
    column = lines[0].index("from_state")
    assert lines[1].startswith("1    work        -")
    assert [line[column:].split()[:4] for line in lines[2:5]] == [
        ["item", "0", "fan.0.1.0", "completed"], ["item", "1", "fan.0.1.1", "failed"],
        ["item", "2", "fan.0.1.2", "completed"]]
    assert "LLMError" in lines[3] and lines[5].startswith("total:")

    assert orch.json("resume", "fan")["status"] == "completed"
    log = orch.log("fan")
    assert [(row["seq"], row["from_state"], row["source"]) for row in log] == [
        (1, "work", "child"), (2, "work", "child"), (3, "write", "child"), (4, "summary", "python")]
    # the failed step and the one that retried it started the same children (shown as they are now)
    assert [[(c["item"], c["run_id"], c["status"]) for c in row["children"]] for row in log[:2]] == [
        [(0, "fan.0.1.0", "completed"), (1, "fan.0.1.1", "completed"), (2, "fan.0.1.2", "completed")]] * 2
    assert [(c["run_id"], c["steps"]) for c in log[2]["children"]] == [("fan.1.1.0", 2)]
    assert "children" not in log[3]
    assert log[1]["cost_usd"] == pytest.approx(sum(c["cost_usd"] for c in log[1]["children"]))


def test_a_map_state_over_no_items_lists_no_children(orch: Orch, tmp_path: Path) -> None:
    empty = write(tmp_path / "empty.py", "from statemachine_orch import Machine, MapState, PythonState\n"
                  "machine = Machine('none', [MapState('nothing', items=lambda ctx: [],"
                  " each=PythonState('one', run=lambda ctx: 1))])\n")
    orch.ok("run", empty, "--run-id", "none")
    assert [line.split()[:3] for line in orch.ok("log", "none").stdout.splitlines()[1:]] == [
        ["1", "nothing", "__end__"], ["total:", "1", "step(s),"]]
    assert orch.log("none")[0]["children"] == []
    assert orch.json("show", "none")["children"] == []
    assert "child runs:" not in orch.ok("show", "none").stdout


def test_resume_refuses_a_child_run_and_writes_nothing(orch: Orch, fake: FakeMessagesAPI, fan: str) -> None:
    answer_by_prompt(fake, fail_once="Item b")
    assert orch("run", fan, "--run-id", "fan").code == 1
    before = database_fingerprint(orch.db)
    refused = orch("resume", "fan.0.1.1")
    assert refused.code == 2, refused.stderr
    assert one_error_line(refused) == ("orch: error: run fan.0.1.1 is a child of run fan (state work, item 1); "
                                       "resume fan, which continues it")
    assert refused.stdout == ""
    assert database_fingerprint(orch.db) == before
    assert [r.prompt for r in fake.requests].count("Item b") == 1


def test_the_engine_refuses_to_resume_a_child_run(db_path: Path) -> None:
    def item(ctx: Any) -> Any:
        if ctx.input["item"] == 1:
            raise ValueError("not this one")
        return ctx.input["item"]

    each = PythonState("one", run=item)
    machine = Machine("squares", [MapState("square", items=lambda ctx: range(3), each=each)])
    with Engine(open_store(db_path)) as engine:
        failed = engine.run(machine)
        child = machine.children["square"][0]
        with pytest.raises(UsageError, match=rf"run {failed.run_id}\.0\.1\.1 is a child of run {failed.run_id} "
                                             rf"\(state square, item 1\); resume {failed.run_id}, which continues it"):
            engine.resume(f"{failed.run_id}.0.1.1", child)
    assert query(db_path, "SELECT status FROM runs WHERE run_id = ?", f"{failed.run_id}.0.1.1")[0][0] == "failed"


def test_replay_replays_a_child_alone_on_the_machine_its_parent_runs(
        orch: Orch, fake: FakeMessagesAPI, fan: str, tmp_path: Path) -> None:
    answer_by_prompt(fake)
    orch.json("run", fan, "--run-id", "fan")
    fake.requests.clear()
    for child, steps in (("fan.0.1.2", 1), ("fan.1.1.0", 2)):
        replayed = orch("replay", child)
        assert replayed.code == 0, replayed.stderr
        assert replayed.stdout == f"replay {child}: matches the recording ({steps} transition(s), no API calls)\n"
    changed = write(tmp_path / "changed.py", FAN.replace('"Item {item}"', '"Thing {item}"'))
    diverged = orch("replay", "fan.0.1.2", "--machine", f"{changed}:machine", "--json")
    assert diverged.code == 1, diverged.stderr
    assert json.loads(diverged.stdout)["divergence"]["kind"] == "request"
    gone = write(tmp_path / "gone.py", FAN.replace('"work"', '"labour"'))
    refused = orch("replay", "fan.0.1.2", "--machine", f"{gone}:machine")
    assert refused.code == 2
    assert one_error_line(refused) == ("orch: error: machine 'fan' no longer runs run fan.0.1.2 (state work, item 2); "
                                       "replay run fan, or pass --machine")
    assert fake.requests == []


def test_graph_says_which_states_start_child_runs(orch: Orch, fan: str) -> None:
    assert orch.ok("graph", fan).stdout == FAN_GRAPH + "\n"
    both = Machine("both", [ParallelState("sides", branches=[PythonState("pro", run=lambda ctx: 1),
                                                            PythonState("con", run=lambda ctx: 2)])])
    assert mermaid(both).splitlines()[-3:] == ['    state "sides (parallel: pro, con)" as sides',
                                               "    classDef children stroke-width:3px",
                                               "    class sides children"]


# --------------------------------------------------------------------------- the kill test

TEN_ITEMS = '''
from statemachine_orch import LLMState, Machine, MapState, PythonState

machine = Machine("ten", [
    MapState("work", items=lambda ctx: list(range(10)), concurrency=2,
             each=LLMState("worker", prompt="Item {item}", max_tokens=50)),
    PythonState("joined", needs=["work"], run=lambda ctx: ctx.outputs["work"]),
])
'''


def test_a_map_state_killed_halfway_resumes_without_paying_a_finished_item_twice(
        orch: EnvOrch, fake: FakeMessagesAPI, tmp_path: Path) -> None:
    """Ten items, two at a time; SIGKILL right after the fifth item's step commits. The resume
    reads the finished items back (never re-requested), re-sends only what was in flight, and
    runs the rest once each."""
    answer_by_prompt(fake)
    ten = write(tmp_path / "ten.py", TEN_ITEMS)
    items = [f"ten.0.1.{i}" for i in range(10)]
    killed = orch.with_env(ORCH_KILL_AT="after_commit:5").start("run", ten, "--run-id", "ten")
    assert killed.wait(timeout=60) == -signal.SIGKILL, killed.communicate()
    killed.communicate()
    done = {r["run_id"] for r in query(orch.db, "SELECT run_id FROM runs WHERE parent_run_id = 'ten' "
                                                 "AND status = 'completed'")}
    assert 5 <= len(done) < 10
    assert stored_log(orch.db, "ten") == []  # killed inside the map state's step
    before = Counter(r.run_id for r in fake.requests)
    assert all(before[item] == 1 for item in done)
    in_flight = {item for item in items if before[item] and item not in done}
    assert len(in_flight) <= 2

    resumed = orch.json("resume", "ten")
    assert (resumed["status"], resumed["path"]) == ("completed", ["work", "joined"])
    assert resumed["outputs"]["joined"] == [f"answer to Item {i}" for i in range(10)]
    after = Counter(r.run_id for r in fake.requests)
    assert set(after) == set(items)
    assert {item: after[item] for item in done} == dict.fromkeys(done, 1)
    assert {item: after[item] for item in set(items) - done - in_flight} == dict.fromkeys(
        set(items) - done - in_flight, 1)
    assert all(after[item] <= 2 for item in in_flight)
    children = query(orch.db, "SELECT run_id, status, item FROM runs WHERE parent_run_id = 'ten' ORDER BY item")
    assert [(c["run_id"], c["status"], c["item"]) for c in children] == [
        (item, "completed", i) for i, item in enumerate(items)]
    assert all([row["to_state"] for row in stored_log(orch.db, item)] == ["__end__"] for item in items)
    assert orch.ok("audit", "verify").stdout.endswith("11 run(s) checked, 0 with a broken log\n")
    assert [c["item"] for c in orch.log("ten")[0]["children"]] == list(range(10))

