"""Every `orch` command on a PostgreSQL URL behaves as on a SQLite file: the same runs, logs,
results, replays, audits and exit codes (the real `orch` in subprocesses, a real server)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest

from statemachine_orch.store.postgres._schema import SCHEMA_VERSION as PG_SCHEMA_VERSION

from .helpers import MACHINES, Orch, one_error_line, run_orch

REPORT, REPORT_INPUT = MACHINES / "report.py", MACHINES / "report_input.json"
ROUTER, TICKETS = MACHINES / "support_router.py", MACHINES / "support_router_batch.jsonl"
TIMING = ("started_at", "latency_ms", "at", "created_at", "updated_at")


def comparable(value: Any) -> Any:
    """A command's JSON without its timings (they differ from run to run, not by store)."""
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


def lines(text: str) -> list[Any]:
    return [comparable(json.loads(line)) for line in text.splitlines()]


@pytest.mark.slow  # about 45 s of subprocesses: the long suite
def test_every_command_gives_the_same_answers_on_postgresql_as_on_sqlite(pg_dsn: str, tmp_path: Path) -> None:
    seen: dict[str, dict[str, Any]] = {}
    for name, db in (("sqlite", tmp_path / "orch.db"), ("postgres", pg_dsn)):
        cli = Orch(db)  # type: ignore[arg-type]  # a URL where a path goes: --db takes either
        run = json.loads(cli.ok("run", REPORT, "--input", REPORT_INPUT, "--offline", "--run-id", "r1",
                                "--json").stdout)
        over = cli("run", REPORT, "--input", REPORT_INPUT, "--offline", "--run-id", "r2", "--max-tokens", "600",
                   "--json")
        resumed = cli("resume", "r2", "--max-tokens", "100000", "--json")
        batch = cli("batch", ROUTER, "--inputs", TICKETS, "--offline", "--batch-id", "b", "--json")
        seen[name] = {
            "run": comparable(run), "over_budget": (over.code, comparable(json.loads(over.stdout))),
            "resumed": (resumed.code, comparable(json.loads(resumed.stdout))),
            "log": lines(cli.ok("log", "r1", "--json").stdout),
            "show": comparable(cli.json("show", "r2")),
            "runs": comparable(cli.json("runs")),
            "replay": cli.json("replay", "r1"),
            "audit": cli.ok("audit", "verify").stdout,
            "batch": (batch.code, comparable({k: v for k, v in json.loads(batch.stdout).items() if k != "seconds"})),
            "status": comparable(cli.json("batch", "status", "b")),
            "missing": (cli("log", "nope").code, "no run 'nope'" in cli("log", "nope").stderr),
            "busy": cli("resume", "r1").code,  # finished: nothing to resume
        }
    assert seen["postgres"]["over_budget"][0] == 1 and seen["postgres"]["resumed"][0] == 0
    assert seen["postgres"]["batch"][0] == 0 and seen["postgres"]["replay"]["matches"]
    assert seen["postgres"]["missing"] == (2, True)
    assert seen["postgres"] == seen["sqlite"]


def test_a_bad_url_is_one_line_without_the_password_and_nothing_is_created(tmp_path: Path) -> None:
    cli = Orch("postgresql://orch:s3cret-pw@127.0.0.1:9/none")  # type: ignore[arg-type]
    for args in (["runs"], ["run", str(REPORT), "--input", str(REPORT_INPUT), "--offline"], ["workers"]):
        result = cli(*args)
        line = one_error_line(result)
        assert result.code == 1 and "cannot open postgresql://orch@127.0.0.1:9/none" in line, line
        assert "s3cret-pw" not in result.stderr + result.stdout
    assert list(tmp_path.iterdir()) == []


def test_enqueue_and_worker_refuse_a_sqlite_file(tmp_path: Path) -> None:
    cli = Orch(tmp_path / "orch.db")
    for args in (["enqueue", REPORT, "--input", REPORT_INPUT], ["workers"],
                 ["worker", REPORT, "--offline", "--until-idle"]):
        result = cli(*args)
        assert result.code == 2 and "need PostgreSQL" in one_error_line(result), result.stderr


def test_enqueue_a_file_of_inputs_then_a_worker_drains_the_queue(pg_dsn: str, tmp_path: Path) -> None:
    cli = Orch(pg_dsn)  # type: ignore[arg-type]
    assert cli.ok("db", "migrate").stdout.strip().endswith(f"schema created at version {PG_SCHEMA_VERSION}")
    assert cli.ok("db", "migrate").stdout.strip().endswith("already current")
    queued = cli.json("enqueue", ROUTER, "--inputs", TICKETS, "--run-id", "t", "--queue", "support")
    assert queued == {"queue": "support", "runs": [{"run_id": f"t-{n}", "queued": True} for n in range(1, 7)]}
    again = cli.json("enqueue", ROUTER, "--inputs", TICKETS, "--run-id", "t", "--queue", "support")
    assert [entry["queued"] for entry in again["runs"]] == [False] * 6  # queued once, whatever is rerun
    assert {r["status"] for r in cli.json("runs")} == {"pending"}
    idle = cli.ok("worker", ROUTER, "--offline", "--until-idle", "--poll", "0.2")  # the default queue is empty
    assert "0 claimed" in idle.stderr
    worked = cli.ok("-q", "worker", ROUTER, "--offline", "--until-idle", "--poll", "0.2", "--queue", "support",
                    "--concurrency", "3")
    assert worked.stderr == ""
    runs = cli.json("runs")
    assert sorted(r["run_id"] for r in runs) == [f"t-{n}" for n in range(1, 7)]
    assert {r["status"] for r in runs} == {"completed"} and cli.ok("audit", "verify").stdout.count(": ok") == 6
    assert cli.json("workers") == []  # a worker that stopped ended its lease


def test_bad_lines_queue_nothing(pg_dsn: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(TICKETS.read_text() + "not json\n")
    cli = Orch(pg_dsn)  # type: ignore[arg-type]
    result = cli("enqueue", ROUTER, "--inputs", bad)
    assert result.code == 2 and "nothing was queued" in one_error_line(result)
    with psycopg.connect(pg_dsn) as conn:  # refused before the database was even touched
        assert conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'orch'").fetchone() == (0,)


@pytest.mark.parametrize("url", ["postgres://", "postgresql://"])
def test_both_url_schemes_name_postgresql_and_reading_creates_nothing(pg_dsn: str, url: str) -> None:
    dsn = pg_dsn.replace("postgresql://", url, 1)
    unmade = run_orch("--db", dsn, "runs")
    assert unmade.code == 2 and "orch db migrate" in one_error_line(unmade)
    assert "created" in run_orch("--db", dsn, "db", "migrate").stdout
    result = run_orch("--db", dsn, "runs", "--json")
    assert result.code == 0 and json.loads(result.stdout) == [], result.stderr
