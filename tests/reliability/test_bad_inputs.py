"""Bad definitions and inputs: every case in corpus/ is refused by the real `orch run` with one
error line and exit 2, before any call reaches the Messages API, and nothing is stored.

    corpus/machines/*.py  one malformed machine module per file, named for what is wrong
    corpus/inputs/*       one malformed input per file, fed to the valid corpus/target.py; a
                          `*.gen.json` file is the recipe of an input too big to keep in the
                          repository: {"parts": [[text, times], ...]}, each text repeated in turn

Every case runs as its own `orch` process (a few at a time) against the fake Messages API
served on loopback, with its own database file; requests are told apart by the case's run id.
A guard returning junk is not a definition error: it is a failed step at run time (exit 1),
tested at the end with the nesting depths around Python's recursion limit.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from statemachine_orch.testing import FakeMessagesAPI

from ..helpers import (
    CASES,
    EXPECTED,
    Case,
    Corpus,
    Figures,
    Orch,
    assert_refused,
    in_parallel,
    nesting_trial,
    oversized_stdin_trial,
    query,
    run_corpus,
    stored_log,
    write,
)

# --------------------------------------------------------------------------- the corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corpus]:
    """Every case (and the control) run once, a few `orch` processes at a time."""
    yield run_corpus(CASES, tmp_path_factory.mktemp("corpus"))


def test_the_corpus_covers_the_issue_and_every_file_has_an_expectation() -> None:
    names = [case.name for case in CASES]
    assert sorted(EXPECTED) == sorted(names)
    assert len(names) >= 30
    kinds = Counter(case.kind for case in CASES)
    assert kinds["machine"] >= 15 and kinds["input"] >= 15
    named_in_the_issue = ("syntax_error", "no_states", "duplicate_state_names", "dangling_transition",
                          "unreachable_state", "unbounded_cycle", "guard_", "wrong_type_", "not_json_",
                          "deeply_nested", "not_utf8_", "oversized_100_mb", "beyond_the_model_context")
    assert [k for k in named_in_the_issue if not any(k in name for name in names)] == []


def test_a_valid_input_to_the_target_reaches_the_api(corpus: Corpus) -> None:
    """The control: without it, "no request arrived" could mean the fake was never reachable."""
    control = corpus.control
    assert control.result.code == 0, control.result.stderr
    assert control.requests == 1
    assert control.runs_stored == 1
    assert [row["from_state"] for row in stored_log(control.db, "control")] == ["summarise"]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_a_bad_case_is_refused_with_one_line_and_exit_2_before_any_call(case: Case, corpus: Corpus) -> None:
    assert_refused(case, corpus.outcomes[case.name])


def test_corpus_figures(corpus: Corpus, figures: Figures) -> None:
    outcomes = corpus.outcomes
    refused = [name for name, o in outcomes.items()
               if o.result.code == 2 and o.requests == 0 and o.runs_stored == 0
               and EXPECTED[name] in o.result.stderr and len(o.result.stderr.splitlines()) == 1]
    figures["corpus_size"] = len(outcomes)
    figures["cases_by_kind"] = dict(Counter(case.kind for case in CASES))
    figures["exit_codes_seen"] = {str(code): n for code, n in
                                  sorted(Counter(o.result.code for o in outcomes.values()).items())}
    figures["refused_as_required"] = len(refused)
    figures["not_refused_as_required"] = sorted(set(outcomes) - set(refused))
    figures["runs_stored_by_bad_inputs"] = sum(o.runs_stored for o in outcomes.values())
    figures["databases_created_by_bad_inputs"] = sum(o.db.exists() for o in outcomes.values())
    figures["requests_at_fake_from_bad_inputs"] = sum(o.requests for o in outcomes.values())
    figures["requests_at_fake_from_control"] = corpus.control.requests
    assert sorted(set(outcomes) - set(refused)) == []
    assert sum(o.runs_stored for o in outcomes.values()) == 0
    assert corpus.requests == corpus.control.requests  # nothing but the control reached the fake


def test_an_oversized_input_on_stdin_is_refused_too(tmp_path: Path) -> None:
    oversized_stdin_trial(tmp_path)


# --------------------------------------------------------------------------- nesting near the limit


def test_nesting_around_the_recursion_limit_is_stored_or_refused_never_a_crash(tmp_path: Path) -> None:
    nesting_trial(tmp_path)


# --------------------------------------------------------------------------- a guard returning junk

JUNK_GUARD_MACHINE = """
from statemachine_orch import FlowDecision, LLMState, Machine, guard

JUNK = {"none": None, "string": "continue", "undeclared": FlowDecision.BRANCH_B}


@guard(FlowDecision.CONTINUE)
def classify_guard(output, ctx):
    return JUNK[ctx.input["junk"]]


machine = Machine("junk_guard", states=[
    LLMState("classify", prompt="Classify this ticket.", max_tokens=20, guard=classify_guard),
    LLMState("reply", prompt="Reply to this ticket.", max_tokens=20),
])
"""
JUNK = ("none", "string", "undeclared")  # test_engine.py covers more kinds in process


def test_a_guard_returning_junk_at_run_time_is_a_recorded_error_never_a_transition(
        tmp_path: Path, figures: Figures) -> None:
    machine = write(tmp_path / "junk_guard.py", JUNK_GUARD_MACHINE)
    fake = FakeMessagesAPI(default=None)
    fake.on("classify", "billing").on("reply", "We are on it.")
    db = tmp_path / "orch.db"
    inputs = {junk: write(tmp_path / f"{junk}.json", json.dumps({"junk": junk})) for junk in JUNK}
    with fake.serve() as url:
        results = in_parallel({junk: (lambda junk=junk: Orch(db, url)(
            "run", machine, "--input", inputs[junk], "--run-id", f"junk-{junk}")) for junk in JUNK})
    rows = {junk: stored_log(db, f"junk-{junk}") for junk in JUNK}
    figures["junk_guard_runs"] = len(JUNK)
    figures["junk_guard_exit_codes"] = sorted({r.code for r in results.values()})
    figures["junk_guard_transitions_taken"] = sum(1 for log in rows.values() for row in log if row["to_state"])
    for junk, result in results.items():
        assert result.code == 1, (junk, result.stderr)
        (row,) = rows[junk]
        assert (row["from_state"], row["to_state"], row["decision"]) == ("classify", None, None), junk
        assert row["error"].startswith("GuardError: guard classify_guard returned"), row["error"]
        assert json.loads(row["output"]) == "billing"  # the paid answer is kept for a resume
        assert query(db, "SELECT status FROM runs WHERE run_id = ?", f"junk-{junk}")[0]["status"] == "failed"
        assert f"resume with: orch resume junk-{junk}" in result.stdout
    assert (fake.calls("classify"), fake.calls("reply")) == (len(JUNK), 0)
