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
import re
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from statemachine_orch.testing import FakeMessagesAPI

from ..helpers import (
    CLIResult,
    Figures,
    Orch,
    in_parallel,
    offline_environment,
    one_error_line,
    orch_command,
    query,
    run_count,
    stored_log,
    write,
)

CORPUS = Path(__file__).parent / "corpus"
TARGET = CORPUS / "target.py"
WORKERS = 4  # orch processes at a time: each is short, and other suites share the cores

# What the single `orch: error: ...` line must say for each case (a test checks that every
# corpus file is listed here, so a new case cannot be added without its expectation).
EXPECTED: dict[str, str] = {
    # the module itself
    "machines/syntax_error.py": "syntax error",
    "machines/imports_a_missing_module.py": "ModuleNotFoundError",
    "machines/raises_while_importing.py": "RuntimeError: settings.toml is missing",
    "machines/defines_no_machine.py": "defines no Machine",
    "machines/defines_two_machines.py": "defines several machines",
    # machine and state names
    "machines/no_states.py": "has no states",
    "machines/machine_name_not_an_identifier.py": "is not an identifier",
    "machines/state_is_a_plain_string.py": "is not an LLMState or PythonState",
    "machines/duplicate_state_names.py": "state 'fetch': is declared twice",
    "machines/state_named_like_the_end.py": "name is reserved",
    # the transition table and the graph
    "machines/dangling_transition.py": "unknown target 'nowhere'",
    "machines/transition_key_not_a_decision.py": "on= key 'retry' is not a decision",
    "machines/transitions_without_a_guard.py": "no guard to choose them",
    "machines/unreachable_state.py": "state 'archive': is unreachable",
    "machines/unbounded_cycle.py": "form a loop with no bound",
    "machines/retry_without_a_retry_limit.py": "retry_limit",
    "machines/max_visits_zero.py": "max_visits must be a positive integer",
    "machines/needs_an_unknown_state.py": "needs unknown state 'validate'",
    "machines/needs_a_later_state.py": "can run before 'store'",
    # guards whose answers could not be handled
    "machines/guard_decision_without_a_transition.py": "may return branch_b but no transition handles it",
    "machines/guard_declares_a_string.py": "which is not a decision",
    "machines/guard_with_the_wrong_signature.py": "guard does not take (output, context)",
    "machines/guard_not_callable.py": "guard is not callable",
    # states
    "machines/run_not_callable.py": "run= is not callable",
    "machines/output_not_a_pydantic_model.py": "output is not a pydantic model class",
    "machines/input_model_not_a_pydantic_model.py": "input_model is not a pydantic model class",
    "machines/prompt_not_a_string.py": "prompt is not a string",
    "machines/params_override_the_model.py": "which the state itself controls",
    "machines/on_budget_without_a_transition.py": "has no transition",
    "machines/fallback_with_the_wrong_signature.py": "fallback function does not take (ctx)",
    # prompt templates
    "machines/template_attribute_traversal.py": "'{text.__class__.__init__.__globals__}'; only plain",
    "machines/template_indexing.py": "only plain {name} placeholders",
    "machines/template_conversion.py": "conversion or format spec",
    "machines/template_format_spec.py": "conversion or format spec",
    "machines/template_unclosed_brace.py": "template is malformed",
    # not JSON at all
    "inputs/not_json_truncated.json": "not valid JSON",
    "inputs/not_json_single_quotes.json": "not valid JSON",
    "inputs/not_json_trailing_comma.json": "not valid JSON",
    "inputs/not_json_two_documents.json": "not valid JSON",
    "inputs/empty_file.json": "not valid JSON",
    "inputs/raw_control_character_in_string.json": "not valid JSON",
    # JSON's grammar, but not values JSON can store (refusing them is what matters; the
    # wording is the fix's to choose, so only "input" is required of the line)
    "inputs/nan_is_not_json.json": "input",
    "inputs/infinity_is_not_json.json": "input",
    "inputs/number_overflowing_to_infinity.json": "input",
    "inputs/integer_with_5000_digits.json": "input",
    "inputs/escaped_lone_surrogate.json": "input",
    # not an object, or not the machine's input model
    "inputs/top_level_array.json": "must be a JSON object",
    "inputs/top_level_string.json": "must be a JSON object",
    "inputs/top_level_null.json": "must be a JSON object",
    "inputs/wrong_type_text_is_a_number.json": "text: Input should be a valid string",
    "inputs/wrong_type_count_is_a_word.json": "count: Input should be a valid integer",
    "inputs/wrong_type_tags_is_a_string.json": "tags: Input should be a valid list",
    "inputs/missing_required_field.json": "text: Field required",
    # not UTF-8
    "inputs/not_utf8_utf16_with_bom.json": "not UTF-8",
    "inputs/not_utf8_overlong_slash.json": "not UTF-8",
    "inputs/not_utf8_encoded_surrogate.json": "not UTF-8",
    # too much
    "inputs/deeply_nested_100000_levels.gen.json": "nested too deeply",
    "inputs/oversized_100_mb.gen.json": "larger than 64 MB",
    "inputs/beyond_the_model_context.gen.json": "more than fits in the model's context",
}


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Case:
    """One corpus file."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.relative_to(CORPUS).as_posix()

    @property
    def kind(self) -> str:
        return "machine" if self.path.parent.name == "machines" else "input"

    @property
    def run_id(self) -> str:
        """A run id of its own, so a request that got through names the case that let it."""
        return "case-" + re.sub(r"[^A-Za-z0-9._-]", "-", self.path.name)[:58]

    def args(self, workdir: Path) -> list[str | Path]:
        """`orch run` for this case: the machine as it is, or the target fed this input."""
        if self.kind == "machine":
            return ["run", self.path, "--run-id", self.run_id]
        return ["run", TARGET, "--input", self.input_file(workdir), "--run-id", self.run_id]

    def input_file(self, workdir: Path) -> Path:
        if not self.path.name.endswith(".gen.json"):
            return self.path
        return generate(self.path, workdir / self.path.name.replace(".gen.json", ".json"))


def generate(recipe: Path, target: Path) -> Path:
    """Write the input a `*.gen.json` recipe describes, a megabyte at a time."""
    with target.open("w", encoding="utf-8") as out:
        for text, times in json.loads(recipe.read_text(encoding="utf-8"))["parts"]:
            per_write = max(1, 2**20 // len(text))
            for done in range(0, times, per_write):
                out.write(text * min(per_write, times - done))
    return target


CASES = [Case(p) for p in sorted((CORPUS / "machines").glob("*.py")) + sorted((CORPUS / "inputs").iterdir())]
VALID_INPUT = {"text": "a tent for four", "count": 2, "tags": ["camping"], "scores": [0.5]}


@dataclass
class Outcome:
    result: CLIResult
    db: Path
    requests: int  # requests the fake Messages API received for this run id

    @property
    def runs_stored(self) -> int:
        return run_count(self.db)

    @property
    def rows_stored(self) -> int:
        return len(query(self.db, "SELECT seq FROM transitions"))


@dataclass
class Corpus:
    outcomes: dict[str, Outcome]
    control: Outcome  # a valid input to the same target: shows calls do get through
    requests: int  # every request the fake received, for any run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corpus]:
    """Every case (and the control) run once, a few `orch` processes at a time."""
    fake = FakeMessagesAPI(default=None)
    fake.on("summarise", "A four-person tent, two of them.")
    workdir = tmp_path_factory.mktemp("corpus")
    valid = write(workdir / "valid_order.json", json.dumps(VALID_INPUT))
    jobs: dict[str, tuple[Path, str, list[str | Path]]] = {}
    for case in CASES:
        home = workdir / case.run_id
        home.mkdir()
        jobs[case.name] = (home / "orch.db", case.run_id, case.args(home))
    control_db = workdir / "control.db"
    jobs["control"] = (control_db, "control", ["run", TARGET, "--input", valid, "--run-id", "control"])
    with offline_environment(), fake.serve() as url:
        results = in_parallel({name: (lambda db=db, args=args: Orch(db, url)(*args))
                               for name, (db, _, args) in jobs.items()})
    for generated in workdir.glob("*/*.json"):  # inputs made from recipes, up to 100 MB each
        generated.unlink()

    def outcome(name: str) -> Outcome:
        db, run_id, _ = jobs[name]
        return Outcome(results[name], db, sum(r.run_id == run_id for r in fake.requests))

    yield Corpus({case.name: outcome(case.name) for case in CASES}, outcome("control"), fake.calls())


# --------------------------------------------------------------------------- the corpus


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
    outcome = corpus.outcomes[case.name]
    result = outcome.result
    assert result.code == 2, f"exit {result.code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert EXPECTED[case.name] in one_error_line(result)
    assert result.stdout == ""
    assert outcome.requests == 0
    assert (outcome.runs_stored, outcome.rows_stored) == (0, 0)


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
    big = generate(CORPUS / "inputs" / "oversized_100_mb.gen.json", tmp_path / "big.json")
    db = tmp_path / "orch.db"
    try:
        with big.open("rb") as stdin:
            proc = subprocess.run([*orch_command(), "--db", str(db), "run", str(TARGET), "--input", "-"],
                                  stdin=stdin, capture_output=True, text=True, timeout=120)
    finally:
        big.unlink()
    result = CLIResult(proc.returncode, proc.stdout, proc.stderr)
    assert result.code == 2, result.stderr
    assert "stdin is larger than 64 MB" in one_error_line(result)
    assert run_count(db) == 0


# --------------------------------------------------------------------------- nesting near the limit

ECHO_MACHINE = """
from statemachine_orch import Machine, PythonState

machine = Machine("echo", states=[PythonState("echo", run=lambda ctx: ctx.input)])
"""
DEPTHS = range(950, 1010, 5)  # around Python's default recursion limit of 1000


def test_nesting_around_the_recursion_limit_is_stored_or_refused_never_a_crash(tmp_path: Path) -> None:
    """Each depth either runs (and is stored) or is refused as an input error; an internal
    error (exit 1, "RecursionError") would mean the depth check depends on stack depth."""
    machine = write(tmp_path / "echo.py", ECHO_MACHINE)

    def attempt(depth: int) -> tuple[CLIResult, Path]:
        db = tmp_path / f"depth-{depth}.db"
        data = write(tmp_path / f"depth-{depth}.json", '{"data": ' + "[" * depth + "]" * depth + "}")
        return Orch(db)("run", machine, "--input", data, "--run-id", f"depth-{depth}"), db

    outcomes = in_parallel({depth: (lambda depth=depth: attempt(depth)) for depth in DEPTHS})
    crashed = {depth: result.stderr for depth, (result, _) in outcomes.items() if result.code not in (0, 2)}
    assert crashed == {}
    for result, db in outcomes.values():
        if result.code == 2:
            assert "nested too deeply" in one_error_line(result)
            assert run_count(db) == 0
        else:
            assert run_count(db) == 1


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
