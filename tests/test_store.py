"""Store contract (run against every backend) plus SQLite-specific guarantees."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from statemachine_orch import (
    OwnershipLostError,
    RunBusyError,
    RunNotFoundError,
    RunStatus,
    SchemaVersionError,
    SQLiteStore,
    StoreError,
    UsageError,
)
from statemachine_orch.ownership import Owner
from statemachine_orch.sqlite_store import SCHEMA_VERSION
from statemachine_orch.types import RunRecord, Usage

from .helpers import (
    create_v1_schema,
    new_run,
    row,
)

StoreFactory = Callable[[Path], Any]
BACKENDS: dict[str, StoreFactory] = {"sqlite": lambda tmp: SQLiteStore(tmp / "contract.db")}


@pytest.fixture(params=sorted(BACKENDS))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    backend = BACKENDS[request.param](tmp_path)
    yield backend
    backend.close()


def me() -> Owner:
    return Owner.for_this_process()


# --------------------------------------------------------------------------- contract


def test_create_load_and_append_round_trip(store: Any) -> None:
    owner = me()
    run = new_run()
    store.create_run(run, owner)
    store.append(row(1), owner)
    store.append(row(2, from_state="b", to_state="__end__"), owner, status=RunStatus.COMPLETED)
    loaded, log = store.load_run("run-1")
    assert loaded.input == run.input and loaded.options == run.options
    assert loaded.status is RunStatus.COMPLETED and loaded.owner is None
    assert [r.seq for r in log] == [1, 2]
    assert log[0] == row(1, started_at=log[0].started_at)


def test_append_is_fenced_on_the_owner(store: Any) -> None:
    owner = me()
    store.create_run(new_run(), owner)
    with pytest.raises(OwnershipLostError):
        store.append(row(1), me())  # a different token
    assert store.load_run("run-1")[1] == []


def test_append_is_fenced_on_the_sequence(store: Any) -> None:
    owner = me()
    store.create_run(new_run(), owner)
    store.append(row(1), owner)
    with pytest.raises(OwnershipLostError, match="already has step 1"):
        store.append(row(1, output="other"), owner)
    assert [r.output for r in store.load_run("run-1")[1]] == ["out"]


def test_status_change_and_row_land_together(store: Any) -> None:
    owner = me()
    store.create_run(new_run(), owner)
    with pytest.raises(OwnershipLostError):
        store.append(row(1), me(), status=RunStatus.COMPLETED)
    assert store.load_run("run-1")[0].status is RunStatus.RUNNING


def test_claim_requires_a_dead_owner(store: Any) -> None:
    owner = me()
    store.create_run(new_run(), owner)
    with pytest.raises(RunBusyError, match="being driven by pid"):
        store.claim_run("run-1", me())
    store.release("run-1", owner, RunStatus.FAILED, "boom")
    assert store.load_run("run-1")[0].error == "boom"
    claimed, _ = store.claim_run("run-1", me())
    assert claimed.status is RunStatus.RUNNING and claimed.error is None


def test_claim_refuses_finished_and_missing_runs(store: Any) -> None:
    owner = me()
    store.create_run(new_run(), owner)
    store.append(row(1, to_state="__end__"), owner, status=RunStatus.COMPLETED)
    with pytest.raises(UsageError, match="already completed"):
        store.claim_run("run-1", me())
    with pytest.raises(RunNotFoundError):
        store.claim_run("nope", me())


def test_duplicate_run_id_is_refused(store: Any) -> None:
    store.create_run(new_run(), me())
    with pytest.raises(UsageError, match="already exists"):
        store.create_run(new_run(), me())


def test_run_ids_are_bound_not_interpolated(store: Any) -> None:
    store.create_run(new_run(), me())
    with pytest.raises(RunNotFoundError):
        store.load_run("x' OR 1=1--")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=40)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(output=json_values, reason=st.text(max_size=60), attempt=st.integers(1, 10),
       tokens=st.tuples(*[st.integers(0, 10**7)] * 4), data=json_values)
def test_rows_round_trip_unchanged(tmp_path: Path, output: Any, reason: str, attempt: int,
                                   tokens: tuple[int, int, int, int], data: Any) -> None:
    path = tmp_path / f"rt-{os.urandom(4).hex()}.db"
    store = SQLiteStore(path)
    try:
        owner = me()
        store.create_run(new_run(input={"data": data}), owner)
        written = row(1, output=output, reason=reason, attempt=attempt,
                      usage=Usage(input_tokens=tokens[0], output_tokens=tokens[1],
                                  cache_read_tokens=tokens[2], cache_write_tokens=tokens[3]))
        store.append(written, owner)
        run, log = store.load_run("run-1")
        assert log == [written] and run.input == {"data": data}
    finally:
        store.close()


# --------------------------------------------------------------------------- SQLite specifics


def test_wal_full_by_default_and_normal_on_request(tmp_path: Path) -> None:
    full = SQLiteStore(tmp_path / "a.db")
    normal = SQLiteStore(tmp_path / "b.db", synchronous="NORMAL")
    assert full.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert full.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert normal.conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    with pytest.raises(UsageError):
        SQLiteStore(tmp_path / "c.db", synchronous="OFF")  # type: ignore[arg-type]


def test_database_files_are_private(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "p.db")
    store.create_run(new_run(), me())
    for suffix in ("", "-wal", "-shm"):
        path = tmp_path / f"p.db{suffix}"
        assert path.exists(), suffix
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, suffix


def test_newer_schema_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    SQLiteStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(SchemaVersionError, match="upgrade statemachine_orch"):
        SQLiteStore(path)
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1


def test_foreign_and_corrupt_files_are_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE notes (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="another application's tables"):
        SQLiteStore(foreign)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="not a usable SQLite database"):
        SQLiteStore(garbage)
    assert garbage.read_bytes() == b"this is not a database" * 100


def test_read_commands_do_not_create_a_database(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no database"):
        SQLiteStore(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()


def test_list_runs_is_newest_first_with_totals(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "l.db")
    owner = me()
    for n in range(3):
        store.create_run(new_run(f"run-{n}", created_at=f"2026-01-0{n + 1}T00:00:00Z"), owner)
    store.append(row(1, run_id="run-1"), owner)
    store.append(row(2, run_id="run-1", to_state=None, decision=None, error="E"), owner,
                 status=RunStatus.FAILED, error="E")
    runs = store.list_runs()
    assert [r.run_id for r in runs] == ["run-2", "run-1", "run-0"]
    failed = runs[1]
    assert (failed.status, failed.steps, failed.input_tokens, failed.output_tokens) == ("failed", 1, 6, 8)
    assert [r.run_id for r in store.list_runs(status="failed")] == ["run-1"]
    assert len(store.list_runs(limit=2)) == 2


def test_views_present_calls_outputs_and_totals(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "v.db")
    owner = me()
    store.create_run(new_run(), owner)
    store.append(row(1), owner)
    store.append(row(2, source="python", request=None, response=None, request_id=None,
                     usage=Usage()), owner)
    db = store.db
    assert [r["seq"] for r in db.query("SELECT seq FROM llm_calls")] == [1]
    assert [r["seq"] for r in db.query("SELECT seq FROM step_outputs")] == [1, 2]
    totals = next(db.query("SELECT * FROM run_totals"))
    assert (totals["steps"], totals["input_tokens"], totals["output_tokens"]) == (2, 3, 4)


def test_a_version_1_database_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path)
    create_v1_schema(conn)
    conn.execute("INSERT INTO runs (run_id, machine, machine_ref, machine_hash, input, status, "
                 "created_at, updated_at) VALUES ('old', 'm', 'm.py', 'h', '{}', 'completed', '2020-01-01T00:00:00Z', "
                 "'2020-01-01T00:00:00Z')")
    conn.execute("INSERT INTO transitions (run_id, seq, from_state, to_state, decision, attempt, "
                 "started_at, latency_ms, source, input_tokens, output_tokens, output) "
                 "VALUES ('old', 1, 'a', '__end__', 'continue', 1, 't', 1.0, 'python', 5, 7, '1')")
    conn.commit()
    conn.close()
    store = SQLiteStore(path)
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    _, log = store.load_run("old")
    # tokens from before costs were recorded: the cost is unknown, not zero
    assert [(r.seq, r.output, r.cost_usd, r.attempts) for r in log] == [(1, 1, None, [])]
    old = store.list_runs()[0]
    assert (old.steps, old.input_tokens, old.output_tokens, old.cost_usd) == (1, 5, 7, None)  # carried over
    owner = me()
    store.create_run(new_run("new"), owner)
    store.append(row(1, run_id="new", attempts=[]), owner)
    assert [r.run_id for r in store.list_runs()] == ["new", "old"]
    [totals] = store.machine_totals(["m"])
    assert (totals.runs, totals.steps, totals.input_tokens, totals.output_tokens) == (2, 2, 5 + 3, 7 + 4)


def test_machine_totals_match_the_rows_whatever_the_runs_status(tmp_path: Path) -> None:
    """Finished runs are summed from their index, the others from their rows: together they
    must equal a plain sum over the runs table, an unpriced step anywhere making cost NULL."""
    store, owner = SQLiteStore(tmp_path / "orch.db"), me()
    for run_id, status, cost in [("done", RunStatus.COMPLETED, 0.5), ("stopped", RunStatus.TERMINATED, 0.25),
                                 ("broken", RunStatus.FAILED, 0.125), ("live", None, 1.0)]:
        store.create_run(new_run(run_id), owner)
        store.append(row(1, run_id=run_id, cost_usd=cost), owner)
        store.append(row(2, run_id=run_id, to_state="__end__" if status else "b", cost_usd=cost), owner,
                     status=status)
    store.create_run(new_run("other", machine="n"), owner)
    store.append(row(1, run_id="other"), owner, status=RunStatus.COMPLETED)

    def plain() -> tuple[Any, ...]:
        return tuple(store.conn.execute(
            "SELECT count(*), sum(steps), sum(input_tokens), sum(output_tokens), "
            "CASE WHEN sum(cost_usd IS NULL) > 0 THEN NULL ELSE sum(cost_usd) END, sum(cache_hits) "
            "FROM runs WHERE machine = 'm'").fetchone())

    [totals] = store.machine_totals(["m"])
    assert (totals.runs, totals.steps, totals.input_tokens, totals.output_tokens, totals.cost_usd,
            totals.cache_hits) == plain() == (4, 8, 24, 32, 3.75, 0)
    store.create_run(new_run("unpriced"), owner)
    store.append(row(1, run_id="unpriced", cost_usd=None), owner, status=RunStatus.COMPLETED)
    [totals] = store.machine_totals(["m"])
    assert (totals.runs, totals.cost_usd) == plain()[::4] == (5, None)
    plan = " ".join(r[3] for r in store.conn.execute(
        "EXPLAIN QUERY PLAN SELECT sum(steps) FROM runs WHERE machine IN (?) AND status IN ('completed', "
        "'terminated') GROUP BY machine", ["m"]))
    assert "COVERING INDEX runs_finished_totals" in plan


def test_load_run_reads_the_row_and_the_log_as_of_one_moment(tmp_path: Path) -> None:
    """A step another process commits between the two reads must not show up in only one."""
    path = tmp_path / "orch.db"
    writer, owner = SQLiteStore(path), me()
    writer.create_run(new_run(), owner)
    writer.append(row(1), owner)

    class Interleaved(SQLiteStore):
        def get_run(self, run_id: str) -> RunRecord:
            record = super().get_run(run_id)
            writer.append(row(2, to_state="__end__"), owner, status=RunStatus.COMPLETED)  # meanwhile
            return record

    record, log = Interleaved(path).load_run("run-1")
    assert (record.status, [r.seq for r in log]) == (RunStatus.RUNNING, [1])
    record, log = writer.load_run("run-1")
    assert (record.status, [r.seq for r in log]) == (RunStatus.COMPLETED, [1, 2])
