"""Fast variants of the reliability suites (tests/reliability/, deselected by default): one
small case of each behaviour those suites check that no other test in the default suite
checks, with the same assertions (the trial functions live in helpers.py) on fewer trials.
The suites themselves keep their counts and figures: run them with `-m "slow or reliability"`."""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from statemachine_orch import SQLiteStore
from statemachine_orch.testing import FakeMessagesAPI, error

from .helpers import (
    CANARY_KEY,
    CASES,
    OPERATIONS,
    QUOTE,
    ROUTER,
    Answers,
    Cell,
    CLIResult,
    EnvOrch,
    Figures,
    Kill,
    Matrix,
    Orch,
    QuotingAPI,
    Spec,
    Tamper,
    answer_every_state,
    assert_refused,
    code_loading_check,
    code_loading_scan_self_check,
    copy_row,
    corrupted_run_trial,
    database_files,
    delete,
    disk_full_trial,
    edit,
    forged_error_line_trial,
    forged_lines_trial,
    fuzz_trial,
    hostile_run_ids_trial,
    in_parallel,
    integrity,
    interleaved_writers_example,
    leaks,
    lock_between_steps_trial,
    many_writers_trial,
    move,
    nesting_trial,
    new_database_trial,
    newer_schema_trial,
    orch_against,
    oversized_stdin_trial,
    pausing_machine,
    planted_pickle_trial,
    property_example,
    read_only_database_trial,
    renumber,
    router_input,
    run_corpus,
    seed_runs,
    shown_in_doubt,
    snapshot_copy,
    specs,
    sql_text_check,
    stale_owner_trial,
    steps,
    stop_during_a_python_step,
    stop_past_the_grace,
    stop_within_the_grace,
    v1_upgrade_trial,
    verdicts,
    write_lock_trial,
    write_machine,
)

# --------------------------------------------------------------------------- crash matrix (test_crash_matrix.py)

# Four of the six kill points: before any step, in flight (killed from outside while the
# server holds the call), inside the commit of a paid step, and after the last commit.
FAST_KILLS = (Kill("run_created", 1), Kill("in_flight", 3), Kill("mid_commit", 2), Kill("after_commit", 5))


def test_sigkill_at_four_kill_points_then_resume(orch: EnvOrch, answers: Answers, tmp_path: Path) -> None:
    matrix = Matrix(orch, answers, *write_machine(tmp_path))
    reference = matrix.reference()
    with ThreadPoolExecutor(max_workers=2) as pool:
        trials = list(pool.map(matrix.trial, range(1, len(FAST_KILLS) + 1), FAST_KILLS))

    assert [line for t in trials for line in t.problems(reference)] == []
    assert [t.flagged for t in trials] == [[], [4], [], []]  # the re-sent draft call; facts' answer was kept
    assert [t.repaid for t in trials] == [0, 1, 0, 0]
    audit = orch("audit", "verify")
    assert audit.code == 0, audit.stdout + audit.stderr
    assert f"{len(trials) + 1} run(s) checked, 0 with a broken log" in audit.stdout
    assert integrity(orch.db) == "ok"
    shown_in_doubt(orch, trials[1])


# --------------------------------------------------------------------------- SIGTERM (test_sigterm.py)


def test_sigterm_finishes_a_call_within_the_grace_and_abandons_one_past_it(
        orch: EnvOrch, answers: Answers, tmp_path: Path) -> None:
    matrix = Matrix(orch, answers, *write_machine(tmp_path))
    reference = matrix.reference()
    figures = Figures("fast")
    stop_within_the_grace(matrix, reference, "facts", "finish-facts", figures)
    stop_past_the_grace(matrix, reference, "draft", "abandon-draft", figures)
    assert (figures.values["steps_finished_within_grace"], figures.values["calls_abandoned"]) == (1, 1)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_sigterm_during_a_python_step_stops_before_the_next_step(
        orch: EnvOrch, answers: Answers, tmp_path: Path, kind: str) -> None:
    machine = pausing_machine(tmp_path, kind)
    stop_during_a_python_step(orch, answers, tmp_path, machine, f"pause-{kind}", Figures("fast"))


# --------------------------------------------------------------------------- races (test_races.py)
# Two resumes of one run: test_crash.py (one round in the default suite).
# A slow call never lets a second process take the run: test_crash.py, a second resume exits 3.


def test_an_owner_that_lost_its_run_writes_nothing(tmp_path: Path) -> None:
    stale_owner_trial(tmp_path)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=OPERATIONS)
def test_interleaved_writers_only_land_the_current_owners_writes(tmp_path: Path,
                                                                 operations: list[tuple[str, str]]) -> None:
    interleaved_writers_example(tmp_path, operations)


def test_two_processes_and_twenty_runs_in_one_process_share_one_file(orch: EnvOrch, fake: FakeMessagesAPI) -> None:
    many_writers_trial(orch, fake, Figures("fast"), rounds=1, processes=2, in_process_runs=20)


def test_processes_creating_one_new_database_at_once_all_open_it(tmp_path: Path) -> None:
    new_database_trial(tmp_path, Figures("fast"), trials=10)


# --------------------------------------------------------------------------- storage faults (test_storage_faults.py)

# File-size limits that cut the report run short at different writes: here 40 KB fails at a
# call's in-flight mark, 50 KB at the commit of a paid call. Whichever write fails (it may
# differ with another SQLite), disk_full_trial checks what must hold for it.
DISK_FULL_LIMITS = (40 * 1024, 50 * 1024)


@pytest.mark.parametrize("limit", DISK_FULL_LIMITS)
def test_disk_full_at_a_write_parks_the_run_and_no_call_goes_unrecorded(
        orch: EnvOrch, fake: FakeMessagesAPI, tmp_path: Path, limit: int) -> None:
    db = tmp_path / "full.db"
    asyncio.run(SQLiteStore(db).close())  # the schema exists: the limit hits the WAL during the run
    figures = Figures("fast")
    disk_full_trial(Orch(db, orch.base_url), answer_every_state(fake), "full", limit, figures)
    assert "completed_within_limit" not in figures.values  # the limit did cut the run short


def test_a_read_only_database_is_still_read_and_refuses_writes_cleanly(
        orch: EnvOrch, fake: FakeMessagesAPI, tmp_path: Path) -> None:
    read_only_database_trial(orch, answer_every_state(fake), tmp_path, "file_and_directory", "version_3",
                             Figures("fast"))


def test_a_write_lock_held_past_the_busy_timeout_stops_a_resume_before_any_call(
        orch: EnvOrch, fake: FakeMessagesAPI) -> None:
    write_lock_trial(orch, answer_every_state(fake), Figures("fast"), commands=("resume",))


def test_a_lock_taken_between_steps_stops_before_the_next_call_and_the_run_retries(
        db_path: Path, fake: FakeMessagesAPI) -> None:
    lock_between_steps_trial(db_path, fake, Figures("fast"))


@pytest.mark.parametrize("kind", ["truncated_output", "changed_machine"])
def test_a_corrupted_run_is_refused_and_the_other_runs_are_unaffected(
        orch: EnvOrch, fake: FakeMessagesAPI, tmp_path: Path, kind: str) -> None:
    corrupted_run_trial(orch, answer_every_state(fake), tmp_path, kind, Figures("fast"))


def test_a_database_from_a_newer_schema_is_refused_and_left_untouched(orch: EnvOrch, fake: FakeMessagesAPI) -> None:
    newer_schema_trial(orch, fake, Figures("fast"))


# --------------------------------------------------------------------------- security (test_security.py)
# Templates never re-parsed: test_templates.py. Private files: test_store.py.


def test_the_package_uses_no_code_executing_deserializer_or_sql_built_from_values() -> None:
    code_loading_scan_self_check()
    code_loading_check(Figures("fast"))
    sql_text_check()


def test_a_pickle_planted_in_a_stored_run_is_refused_and_never_run(tmp_path: Path) -> None:
    cells = [Cell("runs", "input", 0), Cell("runs", "in_flight", 5), Cell("transitions", "response", 5),
             Cell("attempts", "request", 0)]
    planted_pickle_trial(tmp_path, Figures("fast"), cells)


def test_hostile_run_ids_are_only_ever_values(tmp_path: Path) -> None:
    hostile_run_ids_trial(tmp_path, Figures("fast"), commands=[("show",), ("resume",)], hostile=["kept'--"],
                          bad_new=["x' OR 1=1--", "run\nforged"])


def test_a_key_quoted_back_by_the_server_is_kept_out_of_output_and_database(tmp_path: Path) -> None:
    fake = QuotingAPI()
    fake.on("sentiment_analysis",
            error(529, f"overloaded; request had {QUOTE}", headers={"retry-after-ms": "0"}), "positive")
    fake.on("upsell", "Thanks! Try the footprint.")
    with orch_against(fake, tmp_path / "orch.db") as cli:
        run = cli("--debug", "run", ROUTER, "--input", router_input(tmp_path), "--run-id", "keyed")
        attempts = cli.ok("log", "keyed", "--attempts", "--json")
    assert run.code == 0, run.stderr
    assert fake.received == {CANARY_KEY}  # the server got the key and quoted it back
    assert "overloaded; request had" in attempts.stdout  # the quoting error was kept, the key not
    seen = {"run stdout": run.stdout.encode(), "run stderr": run.stderr.encode(),
            "log --attempts": attempts.stdout.encode(), **database_files(cli.db, "final")}
    assert leaks(seen) == []


def test_control_characters_cannot_forge_trace_events_log_rows_or_error_lines(tmp_path: Path) -> None:
    forged_lines_trial(tmp_path, Figures("fast"))
    (tmp_path / "refused").mkdir()
    forged_error_line_trial(tmp_path / "refused")


# --------------------------------------------------------------------------- bad inputs (test_bad_inputs.py)
# A guard returning junk at run time: test_engine.py and test_cli.py.

FAST_CASES = [case for case in CASES if case.name in {
    "machines/syntax_error.py", "machines/imports_a_missing_module.py", "machines/unbounded_cycle.py",
    "machines/template_attribute_traversal.py", "machines/guard_with_the_wrong_signature.py",
    "inputs/not_json_trailing_comma.json", "inputs/not_utf8_utf16_with_bom.json",
    "inputs/integer_with_5000_digits.json", "inputs/deeply_nested_100000_levels.gen.json",
    "inputs/beyond_the_model_context.gen.json"}]


def test_bad_machines_and_inputs_are_refused_with_one_line_and_exit_2_before_any_call(tmp_path: Path) -> None:
    assert len(FAST_CASES) == 10
    corpus = run_corpus(FAST_CASES, tmp_path)
    assert (corpus.control.result.code, corpus.control.requests) == (0, 1), corpus.control.result.stderr
    for case in FAST_CASES:
        assert_refused(case, corpus.outcomes[case.name])
    assert corpus.requests == corpus.control.requests


def test_an_oversized_input_on_stdin_is_refused_too(tmp_path: Path) -> None:
    oversized_stdin_trial(tmp_path)


def test_nesting_around_the_recursion_limit_is_stored_or_refused_never_a_crash(tmp_path: Path) -> None:
    nesting_trial(tmp_path, depths=(950, 995, 1000, 1005))


# --------------------------------------------------------------------------- audit chain (test_audit_chain.py)

# Two completed report runs ("a", "b": five rows each), then one kind of tampering per copy:
# the run ids and the first row `orch audit verify` must name.
FAST_TAMPERING: dict[str, tuple[Tamper, dict[str, int]]] = {
    "edit a middle row": (edit("a", 2, "reason = 'approved by the CFO'"), {"a": 2}),
    "insert a forged row mid-log": (steps(renumber("a", 3, +1), copy_row("a", 2, to_seq=3, reason="forged")),
                                    {"a": 3}),
    "delete a row and renumber": (steps(delete("b", 2), renumber("b", 3, -1)), {"b": 2}),
    "swap rows between runs": (steps(move("a", 3, "swap"), move("b", 3, "a"), move("swap", 3, "b")),
                               {"a": 3, "b": 3}),
    "cut the last row": (delete("a", 5), {"a": 5}),
}


def test_audit_verify_passes_untouched_runs_and_names_the_first_tampered_row(tmp_path: Path) -> None:
    db = tmp_path / "orch.db"
    seed_runs(db, {"a": None, "b": None})
    untouched = Orch(db)("audit", "verify")
    assert (untouched.code, verdicts(untouched)) == (0, {"a": None, "b": None}), untouched.stdout

    def audit(name: str, tamper: Tamper) -> CLIResult:
        copy = snapshot_copy(db, tmp_path / f"{name.replace(' ', '-')}.db")
        with closing(sqlite3.connect(copy)) as conn, conn:
            tamper(conn)
        return Orch(copy)("audit", "verify")

    audited = in_parallel({name: (lambda name=name, tamper=tamper: audit(name, tamper))
                           for name, (tamper, _) in FAST_TAMPERING.items()})
    for name, (_, first_bad) in FAST_TAMPERING.items():
        result = audited[name]
        assert result.code == 1, (name, result.stdout + result.stderr)
        assert verdicts(result) == {run_id: first_bad.get(run_id) for run_id in ("a", "b")}, (name, result.stdout)
    assert "advanced to seq 5, its log ends at seq 4" in audited["cut the last row"].stdout


def test_a_database_upgraded_from_version_1_chains_its_old_rows(tmp_path: Path) -> None:
    v1_upgrade_trial(tmp_path)


# --------------------------------------------------------------------------- model output and the table
# (test_output_fuzz.py, test_properties.py)
# API faults (test_api_faults.py): test_resilience.py in process and test_resilience_cli.py.


def test_generated_answers_never_reach_an_undeclared_state(tmp_path: Path) -> None:
    fuzz_trial(tmp_path, Figures("fast"), answers=150)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.filter_too_much])
@given(spec=specs())
def test_the_engine_follows_the_reference_table(spec: Spec, tmp_path: Path) -> None:
    property_example(spec, tmp_path, Figures("fast"))
