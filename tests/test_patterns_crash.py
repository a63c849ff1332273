"""The five cookbook patterns of machines/ (docs/patterns.md) survive a SIGKILL in the middle of
their run: `orch run` dies right after a commit (ORCH_KILL_AT=after_commit:N, which child runs'
commits reach too), `orch resume` finishes the run with the result an unkilled run gives, no
step committed before the kill is paid again (only a call in flight at the kill is sent twice),
and the run replays with zero calls and verifies.

The runs talk to the loopback fake, not to `--offline` answers (those are given inside the
killed process): the test counts every request itself, by run (the `x-orch-run` header: a map
item is a child run of its own) and state. The fake answers each pattern's offline answers, as
`orch --offline` does, and the same request sent again the answer it got the first time, so
that a killed run can end as the unkilled one does. In the map patterns the kill lands inside
the map step, with items committed and at least one item's request in flight (held at the fake
until the process is dead)."""

from __future__ import annotations

import json
import signal
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from statemachine_orch import Engine, RunStatus, load_machine, open_store
from statemachine_orch.testing import CapturedRequest, FakeMessagesAPI, Reply, load_script

from .helpers import MACHINES, EnvOrch, query, stored_log

Key = tuple[str, str]  # (run id, state)


@dataclass(frozen=True)
class Kill:
    """Where a pattern's run dies: after its `nth` commit (a child run's counts). In a map
    pattern, inside `map_state`: the items before `lead` are answered (and committed) first, the
    others are held at the fake, in flight, until the process is dead."""

    nth: int
    map_state: str | None = None
    lead: int = 0


KILLS = {
    "chain": Kill(2),  # extract and to_percentages committed; sort not begun
    "parallel": Kill(2, "impact", lead=2),  # stakeholders 0 and 1 committed; 2 (and maybe 3) in flight
    "route": Kill(1),  # classify committed, the branch taken; the team's answer not begun
    "optimize": Kill(2),  # generate and evaluate (NEEDS_IMPROVEMENT) committed; generate again not begun
    "orchestrate": Kill(2, "workers", lead=1),  # orchestrator and worker 0 committed; workers 1 and 2 in flight
}


def child_item(run_id: str) -> int | None:
    """The item number of a map item's child run (`PARENT.S.N.I`); None for a top-level run."""
    parts = run_id.split(".")
    return int(parts[-1]) if len(parts) == 4 else None


class SameAnswers:
    """The fake's responder for one pattern: its offline answers, a state's in order of its
    distinct requests in the run, a map item's the one at its item number (as `--offline`
    gives them); a request sent again gets the answer it got the first time. With `lead`, until
    `killed` is set: the map items from `lead` on are held until then, and the items before it
    wait for the first held one's request to arrive (so that it is in flight at the kill)."""

    def __init__(self, name: str, lead: int | None = None) -> None:
        script = load_script(str(MACHINES / f"{name}.offline.json"))
        self.answers = {state: entry if isinstance(entry, list) else [entry] for state, entry in script.items()}
        self.lead = lead
        self.sent: defaultdict[Key, list[str]] = defaultdict(list)  # distinct request bodies, in arrival order
        self.held_arrived = threading.Event()
        self.killed = threading.Event()

    def __call__(self, request: CapturedRequest) -> Reply:
        run_id, state = request.run_id or "", request.state or ""
        body = json.dumps(request.body, sort_keys=True)
        sent = self.sent[run_id, state]
        if body not in sent:
            sent.append(body)
        item = child_item(run_id)
        answers = self.answers[state]
        entry = answers[min((item or 0) + sent.index(body), len(answers) - 1)]
        reply = Reply(text=entry) if isinstance(entry, str) else entry
        assert isinstance(reply, Reply)
        if item is None or self.lead is None or self.killed.is_set():
            return reply
        if item < self.lead:
            return replace(reply, gate=self.held_arrived)
        self.held_arrived.set()
        return replace(reply, gate=self.killed)


def paid_steps(db: Path) -> Counter[Key]:
    """The committed steps that called the model, per (run, state), over every run in `db`."""
    return Counter((row["run_id"], row["from_state"])
                   for row in query(db, "SELECT run_id, from_state FROM transitions WHERE request IS NOT NULL"))


def requested(fake: FakeMessagesAPI) -> Counter[Key]:
    return Counter((r.run_id or "", r.state or "") for r in list(fake.requests))


def each_request(fake: FakeMessagesAPI) -> Counter[tuple[str, str, str]]:
    """How many times each request (run, state, body) was sent."""
    return Counter((r.run_id or "", r.state or "", json.dumps(r.body, sort_keys=True)) for r in list(fake.requests))


@dataclass
class Unkilled:
    path: list[str]
    result: Any
    requests: set[tuple[str, str, str]]  # (run, state, body) of each distinct request


def unkilled_run(name: str, tmp_path: Path) -> Unkilled:
    """The pattern run to its end in process, with the same answers and run id, in a database
    of its own."""
    fake = FakeMessagesAPI(default=SameAnswers(name))
    given = json.loads((MACHINES / f"{name}_input.json").read_text(encoding="utf-8"))
    machine = load_machine(str(MACHINES / f"{name}.py")).machine
    with Engine(open_store(tmp_path / "unkilled.db"), model=fake.model()) as engine:
        result = engine.run(machine, given, run_id=name)
    assert result.status is RunStatus.COMPLETED, result
    assert set(each_request(fake).values()) == {1}
    return Unkilled(list(result.path), json.loads(json.dumps(result.output)), set(each_request(fake)))


@pytest.mark.slow
@pytest.mark.parametrize("name", KILLS)
def test_a_pattern_killed_after_a_commit_resumes_to_the_same_result_paying_no_committed_step_twice(
        name: str, orch: EnvOrch, fake: FakeMessagesAPI, tmp_path: Path) -> None:
    kill = KILLS[name]
    unkilled = unkilled_run(name, tmp_path)
    served = fake.default = SameAnswers(name, kill.lead if kill.map_state else None)

    killed = orch.with_env(ORCH_KILL_AT=f"after_commit:{kill.nth}").start(
        "run", MACHINES / f"{name}.py", "--input", MACHINES / f"{name}_input.json", "--run-id", name, "--json")
    try:
        assert killed.wait(timeout=60) == -signal.SIGKILL, killed.communicate()
    finally:
        served.killed.set()  # answer what was held (to nobody)
    killed.communicate()
    before, sent_before = requested(fake), each_request(fake)
    committed = paid_steps(orch.db)
    assert len(query(orch.db, "SELECT 1 FROM transitions")) == kill.nth  # died after the nth commit
    in_flight = before - committed  # sent, never committed
    if kill.map_state is None:
        assert before == committed and not in_flight
    else:  # killed inside the map step: `lead` items committed, a held one (at least) in flight
        assert kill.map_state not in [row["from_state"] for row in stored_log(orch.db, name)]
        items = query(orch.db, "SELECT item FROM runs WHERE parent_run_id = ? AND status = 'completed' "
                               "ORDER BY item", name)
        assert [row["item"] for row in items] == list(range(kill.lead))
        assert served.held_arrived.is_set() and in_flight
        assert all(item is not None and item >= kill.lead for item in (child_item(run) for run, _ in in_flight))
    assert all(count == 1 for count in in_flight.values())  # at most one call per run in flight
    assert len({run for run, _ in in_flight}) == len(in_flight)

    resumed = orch.json("resume", name)
    assert (resumed["status"], resumed["path"], resumed["error"]) == ("completed", unkilled.path, None)
    assert resumed["result"] == unkilled.result
    after = requested(fake)
    final = paid_steps(orch.db)
    # every committed step was paid once; the calls in flight at the kill, twice
    assert after == final + in_flight, (after, final, in_flight)
    sent = each_request(fake)
    assert {request: sent[request] for request in sent_before if request[:2] in committed} == {
        request: 1 for request in sent_before if request[:2] in committed}  # not sent again after the kill
    # the unkilled run's requests, each sent once but those in flight at the kill, sent twice
    assert set(sent) == unkilled.requests
    assert {request: count for request, count in sent.items() if count != 1} == {
        request: 2 for request in sent if request[:2] in in_flight}

    paid = len(fake.requests)
    replay = orch.json("replay", name)
    assert (replay["matches"], replay["compared"], replay["recorded"]) == (True, len(unkilled.path),
                                                                           len(unkilled.path))
    assert len(fake.requests) == paid
    runs = len(query(orch.db, "SELECT 1 FROM runs"))
    assert orch.ok("audit", "verify").stdout.endswith(f"\n{runs} run(s) checked, 0 with a broken log\n")
