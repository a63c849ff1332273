"""`orch paths`: the routes of a machine's transition table, loops bounded by their limits, and
which of them recorded runs took (issue 15.5)."""

from __future__ import annotations

import json
from pathlib import Path

from statemachine_orch import FlowDecision, Machine, PythonState, guard
from statemachine_orch.definition._loader import load_machine
from statemachine_orch.definition._paths import machine_paths, taken

from .helpers import MACHINES, Orch, one_error_line


def states_of(name: str) -> list[tuple[str, str]]:
    machine = load_machine(str(MACHINES / name)).machine
    return [(" -> ".join(states), end) for states, end in machine_paths(machine).paths]


def test_the_example_machines_paths_are_every_route_to_the_end() -> None:
    assert states_of("support_router.py") == [("sentiment_analysis -> standard_reply", "completed"),
                                              ("sentiment_analysis -> support", "completed"),
                                              ("sentiment_analysis -> upsell", "completed")]
    assert states_of("route.py") == [("classify", "terminated"), *((f"classify -> {team}", "completed")
                                                                   for team in ("account", "billing", "product",
                                                                                "technical"))]
    assert states_of("extract.py") == [("extract_invoice -> check_totals", "completed"),
                                       ("extract_invoice -> check_totals -> review_note", "completed")]
    # the evaluator-optimizer cycle, as often as generate's max_visits allows
    loops = states_of("optimize.py")
    assert {states.count("generate") for states, _ in loops} == {1, 2, 3} and len(loops) == 6
    assert len(states_of("report.py")) == 1


@guard(FlowDecision.CONTINUE, FlowDecision.BRANCH_A, FlowDecision.TERMINATE)
def judge(output: object, ctx: object) -> FlowDecision:
    return FlowDecision.CONTINUE


def test_a_cycle_is_walked_as_often_as_its_bound_and_retries_are_written_once() -> None:
    machine = Machine("cycle", states=[
        PythonState("draft", run=lambda ctx: "x", max_visits=2),
        PythonState("check", run=lambda ctx: "x", guard=judge, on={FlowDecision.BRANCH_A: "draft"}),
    ])
    found = machine_paths(machine)
    assert found.complete and [(" -> ".join(s), e) for s, e in found.paths] == [
        ("draft -> check", "completed"), ("draft -> check", "terminated"),
        ("draft -> check -> draft -> check", "completed"), ("draft -> check -> draft -> check", "terminated")]
    assert machine_paths(machine, limit=3).complete is False and len(machine_paths(machine, limit=3).paths) == 3
    assert taken(["draft", "draft", "check", "draft", "check"], "terminated") == (
        ("draft", "check", "draft", "check"), "terminated")


def test_runs_counts_the_finished_runs_on_each_path_and_names_the_untested_ones(tmp_path: Path) -> None:
    cli = Orch(tmp_path / "orch.db")
    cli.ok("-q", "batch", MACHINES / "support_router.py", "--inputs", MACHINES / "support_router_batch.jsonl",
           "--offline", "--batch-id", "b")
    over = cli("-q", "run", MACHINES / "support_router.py", "--input", MACHINES / "support_router_input.json",
               "--offline", "--max-tokens", "10")
    assert over.code == 1  # over budget: not finished, so not counted
    report = cli.json("paths", MACHINES / "support_router.py", "--runs")
    assert [(p["states"][-1], p["runs"]) for p in report["paths"]] == [("standard_reply", 2), ("support", 2),
                                                                       ("upsell", 2)]
    assert (report["other_runs"], report["unfinished_runs"]) == ([], 1)
    table = cli.ok("paths", MACHINES / "route.py", "--runs").stdout
    assert table.count("UNTESTED") == 5 and "5 path(s); 0 taken by 0 finished run(s), 5 untested" in table
    limited = cli.ok("paths", MACHINES / "route.py", "--limit", "2").stdout
    assert "2 path(s) (the first 2: raise --limit for the rest)" in limited


def test_runs_needs_an_existing_database(tmp_path: Path) -> None:
    result = Orch(tmp_path / "missing.db")("paths", MACHINES / "route.py", "--runs")
    assert result.code == 2 and "missing.db" in one_error_line(result)
    assert not (tmp_path / "missing.db").exists()
    assert json.loads(Orch(tmp_path / "missing.db").ok("paths", MACHINES / "route.py", "--json").stdout)["complete"]
