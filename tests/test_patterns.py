"""The five cookbook patterns of machines/ (docs/patterns.md): each runs from the CLI on its
offline answers along the path they script and replays with zero calls; the paths those
answers do not take (a selection that names no team, an evaluation that never passes, FAIL)
and the orchestrator's task parser are checked in process."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from statemachine_orch import Engine, Machine, RunStatus, load_machine, open_store
from statemachine_orch.testing import FakeMessagesAPI

from .helpers import MACHINES, Orch, offline_environment, query, stored_log

PATHS = {
    "chain": ["extract", "to_percentages", "sort", "format_table"],
    "parallel": ["impact"],
    "route": ["classify", "account"],
    "optimize": ["generate", "evaluate", "generate", "evaluate"],
    "orchestrate": ["orchestrator", "workers", "synthesize"],
}


def offline_answers(name: str) -> dict[str, Any]:
    return dict(json.loads((MACHINES / f"{name}.offline.json").read_text(encoding="utf-8")))


def between(text: str, tag: str) -> str:
    """The text inside <tag>...</tag>, stripped."""
    return text.split(f"<{tag}>", 1)[1].split(f"</{tag}>", 1)[0].strip()


def pattern(name: str) -> Machine:
    return load_machine(str(MACHINES / f"{name}.py")).machine


@dataclass
class Ran:
    """The five patterns run once each from the CLI, offline, into one database (run id: the
    pattern's name), with a fake Messages API served to the commands that no request may reach."""

    orch: Orch
    db: Path
    fake: FakeMessagesAPI
    runs: dict[str, dict[str, Any]]

    def prompts(self, name: str) -> list[str]:
        """The user message of each step of run NAME that called the model."""
        return [json.loads(row["request"])["messages"][0]["content"]
                for row in stored_log(self.db, name) if row["request"]]


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ran]:
    db = tmp_path_factory.mktemp("patterns") / "orch.db"
    fake = FakeMessagesAPI(default=None)
    with offline_environment(), fake.serve() as url:
        orch = Orch(db, url)
        runs = {name: orch.json("run", MACHINES / f"{name}.py", "--input", MACHINES / f"{name}_input.json",
                                "--offline", "--run-id", name) for name in PATHS}
        yield Ran(orch, db, fake, runs)


@pytest.mark.parametrize("name", PATHS)
def test_each_pattern_runs_offline_along_its_path_and_replays_with_zero_calls(name: str, ran: Ran) -> None:
    run = ran.runs[name]
    assert (run["status"], run["path"], run["error"]) == ("completed", PATHS[name], None)
    replay = ran.orch.json("replay", name)
    assert (replay["matches"], replay["compared"], replay["recorded"]) == (True, len(PATHS[name]), len(PATHS[name]))
    assert ran.fake.requests == []  # offline runs, and a replay that called nobody: the served fake saw nothing


def test_the_chain_feeds_each_answer_to_the_next_step_and_answers_with_the_table(ran: Ran) -> None:
    answers = offline_answers("chain")
    assert ran.runs["chain"]["result"] == answers["format_table"]
    prompts = ran.prompts("chain")
    report = json.loads((MACHINES / "chain_input.json").read_text(encoding="utf-8"))["report"]
    assert prompts[0].endswith(f"    45%: revenue growth\nInput: {report}")
    for before, prompt in zip(list(answers.values())[:3], prompts[1:], strict=True):
        assert prompt.endswith(f"\nInput: {before}")


def test_parallel_runs_one_child_per_stakeholder_and_answers_with_the_list(ran: Ran) -> None:
    stakeholders = json.loads((MACHINES / "parallel_input.json").read_text(encoding="utf-8"))["stakeholders"]
    # which answer each item gets depends on the order its request arrives (test_offline.py)
    assert sorted(ran.runs["parallel"]["result"]) == sorted(offline_answers("parallel")["analyze_stakeholder"])
    children = query(ran.db, "SELECT item, status, input FROM runs WHERE parent_run_id = 'parallel' ORDER BY item")
    assert [(c["item"], c["status"], json.loads(c["input"])) for c in children] == [
        (i, "completed", {"item": s}) for i, s in enumerate(stakeholders)]


def test_route_takes_the_selected_teams_branch_with_the_reasoning_as_reason(ran: Ran) -> None:
    assert ran.runs["route"]["result"] == offline_answers("route")["account"]
    classify = stored_log(ran.db, "route")[0]
    assert classify["decision"] == "branch:account"
    assert classify["reason"].startswith("The user cannot log in and gets an 'invalid password' error")


def test_optimize_generates_again_with_every_earlier_response_and_the_latest_feedback(ran: Ran) -> None:
    answers = offline_answers("optimize")
    first, second = (between(a, "response") for a in answers["generate"])
    assert ran.runs["optimize"]["result"] == {"response": second, "evaluation": "PASS",
                                               "feedback": between(answers["evaluate"][1], "feedback")}
    assert [row["decision"] for row in stored_log(ran.db, "optimize")] == [
        "continue", "branch:improve", "continue", "continue"]
    prompts = ran.prompts("optimize")
    assert "Previous attempts" not in prompts[0] and prompts[0].endswith(
        "</response>\n\nTask: \n<user input>\nImplement a Stack with:\n1. push(x)\n2. pop()\n3. getMin()\n"
        "All operations should be O(1).\n</user input>\n")
    feedback = between(answers["evaluate"][0], "feedback")
    assert f"</response>\n\nPrevious attempts:\n- {first}\n\nFeedback: {feedback}\nTask: \n<user input>" in prompts[2]


def test_orchestrate_works_each_parsed_task_and_synthesizes_the_drafts(ran: Ran) -> None:
    result = ran.runs["orchestrate"]["result"]
    descriptions = re.findall(r"<description>(.*?)</description>", offline_answers("orchestrate")["orchestrator"])
    assert [(w["type"], w["description"]) for w in result["worker_results"]] == list(zip(
        ["formal", "conversational", "hybrid"], descriptions, strict=True))  # whole: no stray ">" or "<"
    # which draft each task gets depends on the order its request arrives (test_offline.py)
    assert sorted(w["result"] for w in result["worker_results"]) == sorted(
        between(a, "response") for a in offline_answers("orchestrate")["worker"])
    assert result["final"] == between(offline_answers("orchestrate")["synthesize"], "response")
    children = query(ran.db, "SELECT status FROM runs WHERE parent_run_id = 'orchestrate'")
    assert [c["status"] for c in children] == ["completed"] * 3
    assert ran.prompts("orchestrate")[-1].count("<draft style=") == 3


# --------------------------------------------------------------------------- the other paths, in process


@pytest.fixture
def engine(db_path: Path, fake: FakeMessagesAPI) -> Iterator[Engine]:
    with Engine(open_store(db_path), model=fake.model()) as eng:
        yield eng


TICKET = {"ticket": "Subject: Refund\nMessage: I was charged twice."}


def test_route_asks_again_for_a_selection_that_names_no_team(engine: Engine, fake: FakeMessagesAPI) -> None:
    fake.on("classify", "<reasoning>money</reasoning><selection>Sales</selection>",
            "<reasoning>a charge</reasoning><selection>Billing</selection>")
    fake.on("billing", "Billing Support Response: refunded.")
    result = engine.run(pattern("route"), TICKET)
    assert (result.status, result.path, result.output) == (
        RunStatus.COMPLETED, ["classify", "billing"], "Billing Support Response: refunded.")
    reask = fake.requests[1].body["messages"]
    assert "select one of billing, technical, account, product" in json.dumps(reask)


def test_route_ends_terminated_with_the_reason_when_no_team_is_selected(
        engine: Engine, fake: FakeMessagesAPI, db_path: Path) -> None:
    fake.on("classify", "<reasoning>unclear</reasoning><selection>sales</selection>")
    result = engine.run(pattern("route"), TICKET)
    assert (result.status, result.path, result.output) == (RunStatus.TERMINATED, ["classify"], None)
    (row,) = stored_log(db_path, result.run_id)
    assert row["reason"].startswith("no team selected: parse failed: ValueError: <selection> is 'sales', not a team")
    assert fake.calls("classify") == 2  # the answer and its one re-ask


GENERATED = "<thoughts>t</thoughts><response>code</response>"


def test_optimize_ends_with_the_last_attempt_when_it_never_passes(
        engine: Engine, fake: FakeMessagesAPI, db_path: Path) -> None:
    fake.on("generate", GENERATED)
    fake.on("evaluate", "<evaluation>NEEDS_IMPROVEMENT</evaluation><feedback>more tests</feedback>")
    result = engine.run(pattern("optimize"), {"task": "a stack"})
    assert result.status is RunStatus.COMPLETED
    assert result.path == ["generate", "evaluate"] * 3
    assert result.output == {"response": "code", "evaluation": "NEEDS_IMPROVEMENT", "feedback": "more tests"}
    assert stored_log(db_path, result.run_id)[-1]["reason"] == (
        "branch:improve blocked ('generate' reached max_visits=3): on_exhausted -> continue; "
        "NEEDS_IMPROVEMENT on attempt 3: more tests")


def test_optimize_terminates_on_fail(engine: Engine, fake: FakeMessagesAPI) -> None:
    fake.on("generate", GENERATED)
    fake.on("evaluate", "<evaluation>fail</evaluation><feedback>wrong language</feedback>")
    result = engine.run(pattern("optimize"), {"task": "a stack"})
    assert (result.status, result.path) == (RunStatus.TERMINATED, ["generate", "evaluate"])
    assert result.output == {"response": "code", "evaluation": "FAIL", "feedback": "wrong language"}


def test_the_orchestrators_parser_reads_the_tags_not_fixed_offsets() -> None:
    parse = pattern("orchestrate").by_name["orchestrator"].parse
    assert parse is not None
    plan = parse("<analysis>two ways</analysis>\n<tasks>\n  <task>\n  <type>formal</type>\n"
                 "  <description>Precise</description>\n  </task>\n"
                 "  <task><description>No type,\non two lines</description></task>\n</tasks>")
    assert plan == {"analysis": "two ways", "tasks": [{"type": "formal", "description": "Precise"},
                                                     {"type": "default", "description": "No type,\non two lines"}]}
    with pytest.raises(ValueError, match="holds no <task>"):
        parse("<analysis>a</analysis><tasks></tasks>")
    with pytest.raises(ValueError, match="no <description> section"):
        parse("<analysis>a</analysis><tasks><task><type>formal</type></task></tasks>")
