"""Property tests: random machines and guard outcomes against a reference model of the table.

The reference model is the transition table read as plain data: defaults (CONTINUE next,
SKIP the one after, RETRY itself, TERMINATE end), `on=` overrides, the closed set of each
guard, `retry_limit` on self-loops and `max_visits` on entries. The engine (the
`transitions` FSM, the store, the snapshot and replay) must agree with it step for step.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from statemachine_orch import (
    END,
    Branch,
    DefinitionError,
    Engine,
    FlowDecision,
    Machine,
    PythonState,
    RunStatus,
    SQLiteStore,
    StepContext,
    guard,
)
from statemachine_orch.replay import replay_run
from statemachine_orch.snapshot import snapshot
from statemachine_orch.trace import Tracer

from ..helpers import (
    Figures,
    scaled,
)

EXAMPLES = scaled(60, 600)
DECISIONS = [FlowDecision.CONTINUE, FlowDecision.SKIP, FlowDecision.RETRY, FlowDecision.TERMINATE,
             FlowDecision.BRANCH_A, Branch("other")]


@dataclass
class Spec:
    """A random machine as plain data, the input of both the engine and the reference."""

    names: list[str]
    declared: list[list[Any]]  # decisions each state's guard declares
    branch_targets: list[dict[str, str]]  # decision value -> target, for the branch decisions
    retry_limits: list[int]
    max_visits: list[int]
    script: list[Any]  # the decisions the guards return, in order (the last repeats)


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    n = draw(st.integers(2, 6))
    names = [f"s{i}" for i in range(n)]
    targets = st.sampled_from([*names, END])
    declared, branch_targets = [], []
    for _ in names:
        extra = draw(st.lists(st.sampled_from(DECISIONS[1:]), unique_by=lambda d: d.value, max_size=4))
        declared.append([FlowDecision.CONTINUE, *extra])
        branch_targets.append({d.value: draw(targets) for d in extra if d in (FlowDecision.BRANCH_A,)
                               or isinstance(d, Branch)})
    return Spec(
        names=names, declared=declared, branch_targets=branch_targets,
        retry_limits=[draw(st.integers(1, 3)) for _ in names],
        max_visits=[draw(st.integers(1, 3)) for _ in names],
        # mostly decisions some state declares, sometimes one it does not (a closed-set error)
        script=draw(st.lists(st.sampled_from([*DECISIONS, *[FlowDecision.CONTINUE] * 3,
                                              FlowDecision.RETRY, FlowDecision.BRANCH_A]),
                             min_size=1, max_size=16)),
    )


class Script:
    """Hands the guards their decisions in order; the last one repeats."""

    def __init__(self, decisions: list[Any]) -> None:
        self.decisions = decisions
        self.used = 0

    def next(self) -> Any:
        decision = self.decisions[min(self.used, len(self.decisions) - 1)]
        self.used += 1
        return decision


def build(spec: Spec, script: Script) -> Machine | None:
    states = []
    for i, name in enumerate(spec.names):
        decide = guard(*spec.declared[i])(lambda output, ctx: script.next())
        on = {d: spec.branch_targets[i][d.value] for d in spec.declared[i] if d.value in spec.branch_targets[i]}
        states.append(PythonState(name, run=_output, guard=decide, on=on, retry_limit=spec.retry_limits[i],
                                  max_visits=spec.max_visits[i]))
    try:
        return Machine("prop", states, max_branch_depth=10, source_file="properties.py")
    except DefinitionError:
        return None  # e.g. an unreachable state: not a machine this property is about


def _output(ctx: StepContext) -> str:
    return f"{ctx.state}#{ctx.attempt}"


def reference(spec: Spec, machine: Machine, steps: int = 64) -> tuple[list[str], str]:
    """(states run, final status) from the table alone."""
    script = Script(spec.script)
    state, attempt, visits = machine.initial, 1, {machine.initial: 1}
    path: list[str] = []
    for _ in range(steps):
        decision = script.next().value
        if decision not in machine.decisions[state]:
            return path, "failed"
        target = machine.table[state][decision]
        if target == state:
            if attempt >= machine.by_name[state].retry_limit:  # type: ignore[operator]
                return path, "failed"
        elif target != END and visits.get(target, 0) >= (machine.by_name[target].max_visits or 10**9):
            return path, "failed"
        path.append(state)
        if target == END:
            return path, "terminated" if decision == "terminate" else "completed"
        if target == state:
            attempt += 1
        else:
            attempt = 1
            visits[target] = visits.get(target, 0) + 1
        state = target
    return path, "running"


async def drive(engine: Engine, machine: Machine, db: SQLiteStore | None) -> tuple[Any, int]:
    """Run step by step; with a store, check after every step that the snapshot is the run."""
    run = await engine.start(machine)
    checked = 0
    while not run.done and len(run.path) < 64:
        await run.step()
        if db is not None and not run.done:
            record, log = db.load_run(run.run_id)
            snap = snapshot(machine, record, log)
            assert (snap.position.state, snap.position.attempt, snap.position.visits) == (
                run.state, run._pos.attempt, run._pos.visits)
            assert (snap.outputs, snap.path) == (run.outputs, run.path)
            checked += 1
    return run, checked


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                     HealthCheck.filter_too_much])
@given(spec=specs())
def test_the_engine_follows_the_reference_table(spec: Spec, tmp_path: Path, figures: Figures) -> None:
    script = Script(spec.script)
    machine = build(spec, script)
    assume(machine is not None)
    assert machine is not None
    expected_path, expected_status = reference(spec, machine)
    assume(expected_status != "running")
    db_path = tmp_path / f"{id(spec)}.db"
    store = SQLiteStore(db_path)
    try:
        engine = Engine(store, tracer=Tracer.null())
        run, checked = asyncio.run(drive(engine, machine, store))
        assert run.path == expected_path
        assert run.status.value == expected_status
        script.used = 0
        report = asyncio.run(replay_run(store, run.run_id, build(spec, script)))  # type: ignore[arg-type]
        assert report.matches and report.compared == len(run.path)
        assert store.verify_chain(run.run_id) is None
    finally:
        store.close()
    figures.add("machines", 1)
    figures.add("steps_compared", len(run.path))
    figures.add("snapshots_compared", checked)
    figures.add("replays_matched", 1)
    figures.add("failed_runs", int(run.status is RunStatus.FAILED))
