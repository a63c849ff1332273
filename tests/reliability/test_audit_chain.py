"""The tamper-evident audit log: every transition row's `chain` is a hash over the previous
row's chain, the row's stored values (response included) and its failed attempts; a run's
first row chains to the hash of the run's identity (docs/storage.md#the-audit-chain).
`orch audit verify [RUN_ID]` recomputes the chains and names the first bad row of each run
(the runs row, or a seq): exit 0 when all are intact, 1 otherwise.

One database is recorded by the real `orch` (plain, retried, fallback, cache-hit, guard-failed
then resumed, over-budget then resumed runs). Each tamper case edits a copy of it the way
someone with write access to the file could, and the audit must name the right row.

What a chain alone cannot show, and the code does not claim (docs/cli.md, `orch audit`):
rows cut off the END of a log leave a shorter consistent chain (the run's status and step
count show it instead; tested below); a run whose rows are all deleted has nothing to check;
anyone who can write the file can also recompute every later hash when the chain is not
keyed (tests/test_audit.py shows a keyed chain refusing that). Those are measured and recorded
as figures, not asserted.
"""

from __future__ import annotations

import json
import re
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest

from statemachine_orch.store._chain import (
    ATTEMPT_COLUMNS,
    CANONICAL,
    CHAINED_ATTEMPT_COLUMNS,
    CHAINED_COLUMNS,
    ROW_COLUMNS,
    AuditKey,
)
from statemachine_orch.testing import CapturedRequest, FakeMessagesAPI, Reply, ScriptEntry, error

from ..helpers import (
    CLIResult,
    Figures,
    Orch,
    Tamper,
    copy_row,
    delete,
    edit,
    in_parallel,
    move,
    offline_environment,
    query,
    renumber,
    snapshot_copy,
    steps,
    stored_log,
    v1_upgrade_trial,
    verdicts,
    write,
)

MODEL = "claude-sonnet-5-5"
FALLBACK_MODEL = "claude-haiku-4-5"
LEDGER_MACHINE = f"""
from pathlib import Path
from statemachine_orch import FlowDecision, LLMState, Machine, PythonState, RetryPolicy, guard

APPROVED = Path(__file__).with_name("approved.marker")


@guard(FlowDecision.CONTINUE)
def approved(output, ctx):
    if ctx.run_id == "guarded" and not APPROVED.exists():
        raise RuntimeError("approval marker missing")
    return FlowDecision.CONTINUE.because("approved")


machine = Machine("ledger", model={MODEL!r}, input_vars={{"text": lambda data: data["text"]}},
                  retry_policy=RetryPolicy(max_attempts=2, initial_delay_s=0.0, jitter=0.0), states=[
    LLMState("draft", prompt="Draft an entry for: {{text}}", max_tokens=64, cache=True,
             fallback={FALLBACK_MODEL!r}),
    PythonState("measure", run=lambda ctx: {{"chars": len(ctx.outputs["draft"])}}, needs=["draft"]),
    LLMState("review", prompt="Review: {{draft}}", needs=["draft"], max_tokens=64, guard=approved),
    LLMState("summary", prompt="Summarise: {{review}}", needs=["review"], max_tokens=64),
])
"""
# run id -> (input text, extra `orch run` options), all started at once
FIRST_RUNS = {"plain": ("a tent", []), "retried": ("a stove", []), "fallback": ("a lamp", []),
              "guarded": ("a tarp", []), "over-budget": ("a map", ["--max-cost", "0.00001"])}
# (run id, state, model) -> the failures its calls get before an answer
FAILURES: dict[tuple[str, str, str], list[Reply]] = {
    ("retried", "draft", MODEL): [error(529, "Overloaded")],
    ("fallback", "draft", MODEL): [error(529, "Overloaded"), error(529, "Overloaded")],
}
RUNS = ("plain", "retried", "fallback", "guarded", "over-budget", "cached")


def second_round(machine: Path, inputs: dict[str, Path]) -> dict[str, list[str | Path]]:
    """After the approval marker exists: a cache hit on "plain"'s request, and two resumes."""
    return {"cached": ["run", machine, "--input", inputs["plain"], "--run-id", "cached"],
            "guarded": ["resume", "guarded"],
            "over-budget": ["resume", "over-budget", "--max-cost", "10"]}


class Responder:
    """Answers each request by run: the scripted failures first, then a recognisable text."""

    def __init__(self) -> None:
        self.served: dict[tuple[str, str, str], int] = {}

    def __call__(self, request: CapturedRequest) -> ScriptEntry:
        key = (request.run_id or "", request.state or "", request.body["model"])
        count = self.served[key] = self.served.get(key, 0) + 1
        failures = FAILURES.get(key, [])
        return failures[count - 1] if count <= len(failures) else f"{key[1]} of {key[0]} by {key[2]}"


@dataclass(frozen=True)
class Recorded:
    db: Path
    first: dict[str, CLIResult]
    then: dict[str, CLIResult]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Recorded:
    home = tmp_path_factory.mktemp("ledger")
    machine = write(home / "ledger.py", LEDGER_MACHINE)
    inputs = {run_id: write(home / f"{run_id}.json", json.dumps({"text": text}))
              for run_id, (text, _) in FIRST_RUNS.items()}
    fake = FakeMessagesAPI(default=Responder())
    with offline_environment(), fake.serve() as url:
        cli = Orch(home / "orch.db", url)
        first = in_parallel({run_id: (lambda run_id=run_id, extra=extra: cli(
            "run", machine, "--input", inputs[run_id], "--run-id", run_id, *extra))
            for run_id, (_, extra) in FIRST_RUNS.items()})
        (home / "approved.marker").touch()
        then = in_parallel({name: (lambda args=args: cli(*args))
                            for name, args in second_round(machine, inputs).items()})
    return Recorded(home / "orch.db", first, then)


# --------------------------------------------------------------------------- untouched logs


def test_the_recorded_runs_cover_resumes_retries_fallbacks_and_cache_hits(recorded: Recorded) -> None:
    assert {k: r.code for k, r in recorded.first.items()} == {
        "plain": 0, "retried": 0, "fallback": 0, "guarded": 1, "over-budget": 1}
    assert {k: r.code for k, r in recorded.then.items()} == {"cached": 0, "guarded": 0, "over-budget": 0}
    db = recorded.db
    sources = {run_id: [row["source"] for row in stored_log(db, run_id)] for run_id in RUNS}
    assert sources["fallback"][0] == "fallback" and sources["cached"][0] == "cache"
    assert "recorded" in sources["guarded"]  # the failed guard's answer, judged again on resume
    assert stored_log(db, "over-budget")[0]["error"].startswith("BudgetExceededError")
    assert len(query(db, "SELECT * FROM attempts WHERE run_id = 'retried'")) == 1
    assert {row["status"] for row in query(db, "SELECT status FROM runs")} == {"completed"}


def test_audit_verify_passes_every_untouched_run(recorded: Recorded) -> None:
    cli = Orch(recorded.db)
    every = cli("audit", "verify")
    assert every.code == 0, every.stdout + every.stderr
    assert verdicts(every) == dict.fromkeys(RUNS)
    assert every.stdout.splitlines()[-1] == f"{len(RUNS)} run(s) checked, 0 with a broken log"
    one = cli("audit", "verify", "guarded")
    assert (one.code, verdicts(one)) == (0, {"guarded": None})


def test_a_database_upgraded_from_version_1_chains_its_old_rows(tmp_path: Path) -> None:
    v1_upgrade_trial(tmp_path)


# --------------------------------------------------------------------------- tampering


RUNS_ROW = -1  # what `verdicts` gives for the runs row: it names no seq


@dataclass(frozen=True)
class TamperCase:
    name: str
    apply: Tamper
    first_bad: dict[str, int]  # run id -> the row audit must name; other runs must stay ok


TAMPER_CASES = [
    TamperCase("edit a middle row's reason", edit("plain", 2, "reason = 'approved by the CFO'"), {"plain": 2}),
    TamperCase("edit the first row's model output", edit("fallback", 1, "output = '\"a lamp, cheaper\"'"),
               {"fallback": 1}),
    TamperCase("edit a stored response", edit("retried", 1, "response = replace(response, 'draft of', 'draft by')"),
               {"retried": 1}),
    TamperCase("edit a row's token counts", edit("cached", 3, "input_tokens = input_tokens + 1000"), {"cached": 3}),
    TamperCase("edit the last row's decision and target", edit(
        "over-budget", 5, "decision = 'terminate', to_state = '__end__', reason = 'stopped'"), {"over-budget": 5}),
    TamperCase("erase a failed row's error", edit("guarded", 3, "error = NULL"), {"guarded": 3}),
    TamperCase("re-serialise a JSON value without changing it",
               edit("plain", 1, "request = replace(request, ',\"', ', \"')"), {"plain": 1}),
    TamperCase("overwrite a row's chain with its predecessor's", edit(
        "retried", 2, "chain = (SELECT chain FROM transitions WHERE run_id = 'retried' AND seq = 1)"),
        {"retried": 2}),
    TamperCase("insert a forged row mid-log, renumbering the rest",
               steps(renumber("plain", 3, +1), copy_row("plain", 2, to_seq=3, reason="forged approval")),
               {"plain": 3}),
    TamperCase("append a forged row after the last", copy_row("fallback", 4, to_seq=5, reason="one more"),
               {"fallback": 5}),
    TamperCase("delete a middle row", delete("cached", 2), {"cached": 2}),
    TamperCase("delete a middle row and renumber the rest",
               steps(delete("over-budget", 2), renumber("over-budget", 3, -1)), {"over-budget": 2}),
    TamperCase("swap two rows of a run", steps(edit("guarded", 1, "seq = -1"), edit("guarded", 2, "seq = 1"),
                                               edit("guarded", -1, "seq = 2")), {"guarded": 1}),
    TamperCase("move a row to the end of another run",
               steps(copy_row("retried", 2, to_run="plain", to_seq=5), delete("retried", 2)),
               {"retried": 2, "plain": 5}),
    TamperCase("swap rows between two runs",
               steps(move("plain", 3, "swap"), move("cached", 3, "plain"), move("swap", 3, "cached")),
               {"plain": 3, "cached": 3}),
    TamperCase("cut the last row", delete("plain", 4), {"plain": 4}),
    TamperCase("delete every row of a run", lambda conn: conn.execute(
        "DELETE FROM transitions WHERE run_id = 'fallback'"), {"fallback": 1}),
    TamperCase("edit the first row of every run", steps(*(edit(run_id, 1, "latency_ms = latency_ms + 1")
                                                        for run_id in RUNS)), dict.fromkeys(RUNS, 1)),
    TamperCase("edit a run's input", lambda conn: conn.execute(
        "UPDATE runs SET input = '{\"text\": \"a yacht\"}' WHERE run_id = 'plain'"), {"plain": RUNS_ROW}),
    TamperCase("point a run at other code", lambda conn: conn.execute(
        "UPDATE runs SET machine_ref = '/tmp/other.py:machine' WHERE run_id = 'cached'"), {"cached": RUNS_ROW}),
    TamperCase("edit a failed attempt", lambda conn: conn.execute(
        "UPDATE attempts SET error = 'fine' WHERE run_id = 'retried'"), {"retried": 1}),
]


def tampered_copy(recorded: Recorded, workdir: Path, name: str, tamper: Tamper) -> Path:
    db = snapshot_copy(recorded.db, workdir / (re.sub(r"\W+", "-", name) + ".db"))
    with closing(sqlite3.connect(db)) as conn, conn:
        tamper(conn)
    return db


@dataclass(frozen=True)
class Audited:
    every: CLIResult  # orch audit verify
    one: CLIResult | None  # orch audit verify RUN_ID, where the case tampered with several runs


@pytest.fixture(scope="module")
def audited(recorded: Recorded, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Audited]:
    workdir = tmp_path_factory.mktemp("tampered")

    def audit(case: TamperCase) -> Audited:
        cli = Orch(tampered_copy(recorded, workdir, case.name, case.apply))
        several = len(case.first_bad) > 1
        return Audited(cli("audit", "verify"), cli("audit", "verify", next(iter(case.first_bad))) if several else None)

    with offline_environment():
        return in_parallel({case.name: (lambda case=case: audit(case)) for case in TAMPER_CASES})


@pytest.mark.parametrize("case", TAMPER_CASES, ids=lambda case: case.name)
def test_audit_names_the_first_tampered_row_of_each_run(case: TamperCase, audited: dict[str, Audited]) -> None:
    every, one = audited[case.name].every, audited[case.name].one
    assert every.code == 1, every.stdout + every.stderr
    assert verdicts(every) == {run_id: case.first_bad.get(run_id) for run_id in RUNS}
    assert every.stdout.splitlines()[-1] == f"{len(RUNS)} run(s) checked, {len(case.first_bad)} with a broken log"
    if one is not None:  # one run of several: only that run is checked and reported
        first = next(iter(case.first_bad))
        assert (one.code, verdicts(one)) == (1, {first: case.first_bad[first]})


# --------------------------------------------------------------------------- what a chain cannot show


def test_rows_cut_off_the_end_are_named_from_the_runs_last_seq(recorded: Recorded, tmp_path: Path) -> None:
    """The chain of a shortened log is consistent; the run row's last_seq is what shows the cut."""
    db = tampered_copy(recorded, tmp_path, "cut the tail", delete("plain", 4))
    cli = Orch(db)
    audit = cli("audit", "verify", "plain")
    assert (audit.code, verdicts(audit)) == (1, {"plain": 4})
    assert "advanced to seq 4, its log ends at seq 3" in audit.stdout


def rechain(run_id: str, from_seq: int) -> Tamper:
    """Recompute every hash from `from_seq` on, as anyone who can write the file can (keyless)."""
    def apply(conn: sqlite3.Connection) -> None:
        chain = conn.execute("SELECT chain FROM transitions WHERE run_id = ? AND seq = ?",
                             (run_id, from_seq - 1)).fetchone()[0]
        for values in conn.execute(f"SELECT {CHAINED_COLUMNS} FROM transitions WHERE run_id = ? "
                                   "AND seq >= ? ORDER BY seq", (run_id, from_seq)).fetchall():
            row = dict(zip(ROW_COLUMNS, values, strict=True))
            attempts = [dict(zip(ATTEMPT_COLUMNS, a, strict=True)) for a in conn.execute(
                f"SELECT {CHAINED_ATTEMPT_COLUMNS} FROM attempts WHERE run_id = ? AND seq = ? ORDER BY attempt",
                (run_id, row["seq"]))]
            chain = AuditKey(None).link(CANONICAL, chain, row, attempts)
            conn.execute("UPDATE transitions SET chain = ? WHERE run_id = ? AND seq = ?", (chain, run_id, row["seq"]))
    return apply


OUTSIDE_THE_CHAIN = {
    "edit a row and recompute the later hashes": steps(edit("plain", 2, "reason = 'approved by the CFO'"),
                                                        rechain("plain", 2)),
}


def test_audit_figures(recorded: Recorded, audited: dict[str, Audited], tmp_path: Path, figures: Figures) -> None:
    detected = [case.name for case in TAMPER_CASES if audited[case.name].every.code == 1
                and verdicts(audited[case.name].every) == {r: case.first_bad.get(r) for r in RUNS}]
    outside = {name: Orch(tampered_copy(recorded, tmp_path, name, tamper))("audit", "verify")
               for name, tamper in OUTSIDE_THE_CHAIN.items()}
    figures["runs_recorded"] = len(RUNS)
    figures["rows_recorded"] = len(query(recorded.db, "SELECT seq FROM transitions"))
    figures["tamper_cases_total"] = len(TAMPER_CASES)
    figures["tamper_cases_detected_at_the_right_row"] = len(detected)
    figures["tamper_cases_missed"] = sorted({case.name for case in TAMPER_CASES} - set(detected))
    figures["outside_the_chain_detected"] = {name: result.code == 1 for name, result in outside.items()}
    assert len(detected) == len(TAMPER_CASES)
    assert all(result.code in (0, 1) for result in outside.values())  # measured, never a crash
