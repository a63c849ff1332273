"""The benchmark scripts keep working: bench_orch.py in every mode, store_scale.py, map_fanout.py,
batch_throughput.py, scale_out.py (with a PostgreSQL server: the pg_server fixture), sweep.py's page.

bench_orch.py imports `common` from the peers' bench anchors (../shared/bench-anchors), which a
fresh checkout may not have. So it always runs here against a minimal stand-in `common` (the
same names, tiny counts, every run's outputs returned for checking), and also against the real
common.py when the anchors are there (skipped with a reason otherwise). No timing is asserted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from .helpers import (
    ROOT,
)

BENCH = ROOT / "bench"
ANCHORS = ROOT.parent / "shared" / "bench-anchors"
RUNS = 3

STAND_IN = '''"""Stand-in for the bench anchors' common.py, written by tests/test_bench.py."""
import argparse
import asyncio
import inspect
import json
import os
import sys
from importlib.metadata import version

STEPS_A = 10
STEPS_C = 5


def fake_llm(step):
    return "reply-%d" % step


async def fake_llm_async(step):
    await asyncio.sleep(0.001)
    return "reply-%d" % step


def route_of(reply):
    return "continue" if reply else "stop"


def pkg_version(dist):
    return version(dist)


_D_INFO = {}


def report_D(**facts):
    _D_INFO.update(facts)


async def _maybe_await(x):
    return await x if inspect.isawaitable(x) else x


async def durable(make_D, runs, db_path):
    """Mode D as the harness runs it: built, run concurrently and closed inside one event loop."""
    run_once, close = await _maybe_await(make_D(db_path))
    outputs = await asyncio.gather(*(run_once(i) for i in range(runs)))
    await _maybe_await(close())
    return list(outputs)


def main(name, version, *, make_A=None, make_B=None, make_C=None, make_D=None, verify_D=None, notes=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", required=True)
    ap.add_argument("--runs", type=int, default=3)
    args, _ = ap.parse_known_args()
    db_path = os.path.join(os.environ["BENCH_DB_DIR"], "bench.sqlite")
    result = {"lib": name, "version": version, "mode": args.mode, "note": (notes or {}).get(args.mode)}
    if args.mode == "D":  # with the real harness's keys for what verify_D reads back
        result["outputs"] = asyncio.run(durable(make_D, args.runs, db_path))
        counts = verify_D(db_path, range(args.runs))
        result.update(steps_verified=sum(min(n, STEPS_C) for n in counts.values()),
                      steps_expected=args.runs * STEPS_C, d_info=_D_INFO)
        json.dump(result, sys.stdout)
        return
    close = None
    if args.mode == "A":
        run_once = make_A()
    elif args.mode == "B":
        run_once, close = make_B(db_path)
    else:
        run_once = make_C()

    async def one(i):
        return await run_once(i) if inspect.iscoroutinefunction(run_once) else run_once(i)

    async def drive():
        if args.mode == "C":
            return list(await asyncio.gather(*(one(i) for i in range(args.runs))))
        return [await one(i) for i in range(args.runs)]

    result["outputs"] = asyncio.run(drive())
    if close is not None:
        close()
    json.dump(result, sys.stdout)
'''

CASES = {  # id -> (mode, environment)
    "A": ("A", {}),
    "A-traced": ("A", {"ORCH_BENCH_TRACE": "1"}),
    "B-normal": ("B", {}),
    "B-full": ("B", {"ORCH_BENCH_SYNC": "FULL"}),
    "C": ("C", {}),
    "D": ("D", {}),
}


@pytest.fixture(params=["stand-in", "anchors"])
def common_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A folder with a `common` module for bench_orch.py to import."""
    if request.param == "anchors":
        if not (ANCHORS / "common.py").is_file():
            pytest.skip(f"no bench anchors at {ANCHORS}; only the stand-in common ran")
        return ANCHORS
    folder = tmp_path / "stand_in"
    folder.mkdir()
    (folder / "common.py").write_text(STAND_IN)
    return folder


def run_bench_orch(common: Path, mode: str, env: dict[str, str], tmp_path: Path) -> dict[str, Any]:
    """bench_orch.py as run_all.py runs it, with tiny counts; its JSON line."""
    full_env = {**os.environ, **env, "PYTHONPATH": str(common), "BENCH_DB_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_orch.py"), "--mode", mode, "--runs", str(RUNS), "--reps", "1",
         "--warmup", "1"],
        cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("case", CASES)
def test_bench_orch_runs_every_step(case: str, common_dir: Path, tmp_path: Path) -> None:
    mode, env = CASES[case]
    trace = tmp_path / "trace.jsonl"
    if "ORCH_BENCH_TRACE" in env:
        env = {**env, "ORCH_BENCH_TRACE_FILE": str(trace)}
    result = run_bench_orch(common_dir, mode, env, tmp_path)

    assert result["mode"] == mode
    assert "error" not in result and "skipped" not in result
    if common_dir == ANCHORS:  # the real harness checked every run's outputs itself
        if mode in "CD":
            assert result["wall_s"] > 0 and result["peak_rss_mb"] > 0
        else:
            assert result["us_per_step"] > 0 and all(s > 0 for s in result["samples_us_per_step"])
        if mode == "D":  # and read every step back, also while the runs went on (the probe)
            assert result["d_flags"] == [] and result["durable_before_next_step"]
    else:
        steps = 5 if mode in "CD" else 10
        assert result["outputs"] == [{f"out{k}": f"reply-{k}" for k in range(steps)}] * RUNS
        if mode == "B":
            with sqlite3.connect(tmp_path / "bench.sqlite") as conn:
                assert conn.execute("SELECT count(*) FROM transitions").fetchone()[0] == RUNS * steps
    if mode == "B":
        assert f"synchronous={env.get('ORCH_BENCH_SYNC', 'NORMAL')}" in result["note"]
    if mode == "D":
        assert result["steps_verified"] == result["steps_expected"] == RUNS * 5
        assert result["d_info"]["synchronous"].startswith("FULL (2,") and result["d_info"]["journal_mode"] == "wal"
        assert "commits_per_runs" in result["d_info"]
    if "ORCH_BENCH_TRACE" in env:
        events = [json.loads(line)["event"] for line in trace.read_text().splitlines()]
        assert events.count("transition") >= 10 and events.count("transition") % 10 == 0


def test_map_fanout_reports_its_ratio_to_the_ideal_and_memory_per_item() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "map_fanout.py"), "--items", "6", "--concurrency", "3", "--delay-ms", "1",
         "--repeat", "1", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (result["items"], result["concurrency"], result["ideal_s"]) == (6, 3, 0.002)
    assert result["median_s"] > 0 and result["ratio_to_ideal"] > 0 and result["peak_bytes_per_item"] > 0


def test_batch_throughput_reports_its_figures_and_no_committed_step_requested_twice() -> None:
    """`orch batch` against the rate-limited fake, tiny: the figures are there, every run completes,
    and the batch killed half-way and run again requests no committed step twice."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / "batch_throughput.py"), "--inputs", "12", "--rpm", "600", "--concurrency", "4",
         "--delay-ms", "1", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    throughput, crash = figures["throughput"], figures["crash"]
    assert (throughput["completed"], throughput["requests"], throughput["rejected_429"]) == (12, 36, 0)
    assert throughput["peak_rss_mb"] > 0 and throughput["cpu_ms_per_step"] > 0
    assert crash["completed_after_rerun"] == 12 and crash["committed_before_kill"] > 0
    assert crash["committed_steps_requested_again"] == 0


def test_the_batch_section_judges_the_targets(sweep: ModuleType) -> None:
    page, _ = sweep.render(INFO, RESULTS, STORE, FANOUT, BATCH, quick=False, notes="", command="c", raw="r")
    section = page.split("## orch batch against a rate limit")[1].split("\n## ")[0]
    assert "2950 requests/min (98.3% of 3000)" in section
    assert section.count("| met |") == 4 and "NOT met" not in section
    slow = {**BATCH, "throughput": {**BATCH["throughput"], "rpm_fraction_of_limit": 0.5,
                                    "rpm_beyond_the_first_minute": 1500.0}}
    page, _ = sweep.render(INFO, RESULTS, STORE, FANOUT, slow, quick=False, notes="", command="c", raw="r")
    assert "NOT met" in page.split("## orch batch against a rate limit")[1].split("\n## ")[0]


@pytest.mark.slow  # starts two servers and eight workers: the long suite
def test_scale_out_reports_speedups_and_per_step_costs_with_no_step_requested_twice(pg_server: str) -> None:
    """`orch worker` processes against the fake on PostgreSQL, tiny: the figures are there, every
    run of every pass completes and the fake was asked each (run, step) once; the per-step costs
    have a row per machine, drive and store."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / "scale_out.py"), "--dsn", pg_server, "--runs", "4", "--workers", "1,2",
         "--concurrency", "2", "--answer-ms", "1", "--poll", "0.5", "--overhead-runs", "2",
         "--overhead-concurrency", "2", "--reps", "1", "--warmup", "1", "--json"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])

    assert figures["postgres"]["pg"]["given_by_dsn"] is True and "fsync" in figures["postgres"]["pg"]
    throughput = figures["throughput"]
    assert throughput["all_completed"] is True and throughput["no_duplicates"] is True
    assert throughput["fake_round_trip_ms"]["nodelay"] > 0
    for mode in ("warm", "cold"):
        figures_of_mode = throughput["modes"][mode]
        assert set(figures_of_mode["steps_per_s"]) == {"1", "2"} and figures_of_mode["speedup"]["2/1"] > 0
        for one in figures_of_mode["passes"]:
            assert (one["completed"], one["steps_committed"], one["requests"]) == (4, 12, 12)
            assert (one["duplicates"], one["missing"], one["unexpected"]) == (0, 0, 0)
            assert one["exit_codes"] == [0] * one["workers"] and sum(one["completed_per_worker"]) == 4
            assert one["steps_per_s"] > 0 and one["worker_cpu_ms_per_step"] > 0
    assert throughput["target"]["measured"] is None  # no 4 workers here

    overhead = figures["overhead"]
    backends = ("none", "sqlite_full", "sqlite_normal", "pg")  # no pg_durable on a server given by DSN
    assert {(r["machine"], r["drive"], r["backend"]) for r in overhead["rows"]} == {
        (machine, drive, backend) for machine in ("llm", "python") for drive in ("sequential", "concurrent")
        for backend in backends}
    assert all(r["us_per_step"] > 0 and r["client_cpu_us_per_step"] >= 0 for r in overhead["rows"])
    assert overhead["ratios"]["llm/sequential"]["pg/sqlite_full"] > 0


def test_store_scale_reports_sizes_and_every_command(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "store_scale.py"), "--runs", "20", "--reps", "1", "--db", str(tmp_path / "s.db")],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    assert (result["runs"], result["transitions"]) == (20, 200)
    assert result["bytes_per_step"] > 0 and 0 < result["payload_bytes_per_step"] < result["bytes_per_step"]
    assert set(result["commands"]) == {"runs", "log", "show"}
    for command in result["commands"].values():
        assert command["in_process"]["median_ms"] > 0 and command["process"]["median_ms"] > 0
        assert command["queries"] and all(q["plan"] for q in command["queries"])
    assert result["startup"]["python_start"]["median_ms"] > 0 and result["import_ms"]["total"] > 0


# --------------------------------------------------------------------------- sweep.py's page


@pytest.fixture(scope="module")
def sweep() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sweep", BENCH / "sweep.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(key: str, mode: str, label: str | None = None, **values: Any) -> dict[str, Any]:
    return {"key": key, "label": label or key, "mode": mode, "version": "1", **values}


RESULTS = [
    _row("floor", "A", us_per_step=0.5, ratio_to_floor=1.0),
    _row("floor", "B", us_per_step=40.0, ratio_to_floor=1.0),
    _row("langgraph", "A", error="boom"),
    _row("burr", "A", us_per_step=50.0, ratio_to_floor=100.0),
    _row("burr", "B", "burr [B: WAL+sync=NORMAL]", us_per_step=130.0, ratio_to_floor=3.25),
    _row("transitions", "A", us_per_step=20.0, ratio_to_floor=40.0),
    _row("orch", "A", us_per_step=10.0, ratio_to_floor=20.0),
    _row("orch", "B", us_per_step=60.0, ratio_to_floor=1.5),
    _row("orch", "C", wall_s=0.3, ratio_to_ideal=1.2, peak_rss_mb=70.0, rss_before_c_mb=40.0),
    _row("orch_full", "A", skipped="same as the orch row: only B persists"),
    _row("orch_full", "B", us_per_step=500.0, ratio_to_floor=12.5),
    _row("orch_traced", "A", us_per_step=11.0, ratio_to_floor=22.0, trace_bytes=2**20),
]
DURABLE = {"ratio_to_ideal": 1.0, "peak_rss_mb": 60.0, "rss_before_d_mb": 40.0, "runs": 1000, "reps": 3,
           "steps_per_run": 5, "steps_verified": 5000, "steps_expected": 5000, "probe": {"ok": 200, "runs": 50},
           "durable_before_next_step": True, "d_flags": []}
RESULTS_D = [
    _row("floor", "D", **{**DURABLE, "wall_s": 0.35, "ratio_to_floor_wall": 1.0}),
    _row("floor", "D", "floor [D: naive, 1 commit per step]", **{**DURABLE, "wall_s": 1.4, "ratio_to_floor_wall": 4.0}),
    _row("burr", "D", **{**DURABLE, "wall_s": 1.505, "ratio_to_floor_wall": 4.3}),
    _row("pydantic-graph-v1", "D", **{**DURABLE, "wall_s": 9.0, "ratio_to_floor_wall": 25.7, "steps_verified": 1000,
                                      "d_flags": ["MISSING STEPS in 3 of 3 reps"]}),
    _row("pydantic-graph-v1", "D", "pydantic-graph-v1 [D: 100 runs only]", **{**DURABLE, "wall_s": 2.6, "runs": 100}),
    _row("dbos", "D", error="boom in D"),
    _row("orch", "D", **{**DURABLE, "wall_s": 0.3675, "ratio_to_floor_wall": 1.05}),
]
STORE = {"error": "store_scale.py exited 1"}
FANOUT = {"items": 100, "concurrency": 10, "delay_ms": 50.0, "ideal_s": 0.5, "median_s": 0.7, "ratio_to_ideal": 1.4,
          "runs": 5, "peak_bytes_per_item": 5120}
BATCH: dict[str, Any] = {
    "throughput": {"inputs": 10000, "steps": 30000, "requests": 30000, "completed": 10000, "wall_s": 560.0,
                   "rpm_limit": 3000, "rpm_beyond_the_first_minute": 2950.0, "rpm_fraction_of_limit": 0.9833,
                   "rejected_429": 0, "peak_rss_mb": 120.0, "cpu_s": 90.0, "cpu_ms_per_step": 3.0},
    "crash": {"killed_after_requests": 15000, "committed_before_kill": 14980, "completed_after_rerun": 10000,
              "committed_steps_requested_again": 0, "in_flight_steps_requested_again": 20}}
INFO = {"cpu": "cpu", "cores": 2, "python": "3.11.7", "sqlite": "3.40.1", "os": "Linux", "date": "2026-01-01 00:00 UTC",
        "load_average": [1.0, 1.0, 1.0], "commit": "abc1234"}


def _scale_pass(workers: int, steps_per_s: float) -> dict[str, Any]:
    return {"rep": 1, "workers": workers, "steps_per_s": steps_per_s, "efficiency": steps_per_s / (40.0 * workers),
            "runs": 192, "completed": 192, "requests": 576, "duplicates": 0, "missing": 0,
            "worker_cpu_ms_per_step": 5.0, "server_cpu_ms_per_step": 2.0, "bench_cpu_ms_per_step": 0.8}


SCALE: dict[str, Any] = {
    "machine": {"date": "2026-01-01 00:00 UTC", "commit": "abc1234", "cores": 2, "load_average": [1.0, 1.0, 1.0],
                "load_average_end": [2.0, 1.5, 1.0]},
    "postgres": {"pg": {"given_by_dsn": False, "server_version": "15", "fsync": "off", "synchronous_commit": "off",
                        "full_page_writes": "off"},
                 "pg_durable": {"given_by_dsn": False, "server_version": "15", "fsync": "on",
                                "synchronous_commit": "on", "full_page_writes": "on"}},
    "throughput": {
        "server": "pg_durable", "runs": 192, "steps_per_run": 3, "concurrency": 8, "answer_ms": 200.0, "reps": 1,
        "all_completed": True, "no_duplicates": True,
        "target": {"speedup_4_over_1": 3.5, "measured": 3.6, "met": True},
        "modes": {"warm": {"passes": [_scale_pass(1, 36.0), _scale_pass(2, 70.0), _scale_pass(4, 129.6)],
                           "steps_per_s": {"1": 36.0, "2": 70.0, "4": 129.6},
                           "efficiency": {"1": 0.9, "2": 0.875, "4": 0.81},
                           "speedup": {"2/1": 1.944, "4/1": 3.6}, "speedup_per_rep": [{"2/1": 1.944, "4/1": 3.6}]}}},
    "overhead": {
        "runs": 100, "steps_per_run": 3, "concurrency": 16, "reps": 5,
        "rows": [{"machine": "llm", "drive": "sequential", "backend": b, "us_per_step": us,
                  "client_cpu_us_per_step": us / 2, "server_cpu_us_per_step": None if b[:2] != "pg" else 300.0}
                 for b, us in (("none", 120.0), ("sqlite_full", 800.0), ("sqlite_normal", 330.0), ("pg", 1600.0),
                               ("pg_durable", 1700.0))],
        "ratios": {"llm/sequential": {"pg/sqlite_normal": 4.848, "pg/sqlite_full": 2.0,
                                      "pg_durable/sqlite_full": 2.125}}},
}


def test_the_scale_out_section_judges_the_speedup(sweep: ModuleType) -> None:
    page, _ = sweep.render(INFO, RESULTS, STORE, FANOUT, BATCH, quick=False, notes="", command="c", raw="r",
                           scale=SCALE)
    section = page.split("## PostgreSQL and workers (issue 14)")[1].split("\n## ")[0]
    assert "at commit abc1234" in section and "`pg_durable` (PostgreSQL 15, fsync=on" in section
    assert "| 4 | 129.6 | 3.60x | 81% | - | - | - | 5.00 / 2.00 / 0.80 |" in section
    assert "| warm: steps/s of 4 workers / 1 worker | 3.60x | >= 3.5x | met |" in section
    assert "| 576/576 runs completed in 3 passes; 1728 requests, 0 duplicate(s), 0 missing | all, none | met |" \
        in section
    assert "| llm, sequential | 120 (60) | 800 (400) | 330 (165) | 1600 (800 + 300) | 1700 (850 + 300) | 4.85x | " \
           "2.00x | 2.12x |" in section
    slow = {**SCALE, "throughput": {**SCALE["throughput"], "target": {"speedup_4_over_1": 3.5, "measured": 3.2,
                                                                      "met": False}}}
    page, _ = sweep.render(INFO, RESULTS, STORE, FANOUT, BATCH, quick=False, notes="", command="c", raw="r",
                           scale=slow)
    assert "| 3.20x | >= 3.5x | **NOT met** |" in page
    page, _ = sweep.render(INFO, RESULTS, STORE, FANOUT, BATCH, quick=False, notes="", command="c", raw="r")
    assert "scale_out.py failed: not run" in page
    light = {**SCALE["throughput"], "concurrency": 4, "target": {"speedup_4_over_1": 3.5, "measured": 3.64,
                                                                 "met": True}}
    page, _ = sweep.render(INFO, RESULTS, STORE, FANOUT, BATCH, quick=False, notes="", command="c", raw="r",
                           scale={**SCALE, "light": light})
    assert "| warm, `--concurrency 4`: steps/s of 4 workers / 1 worker | 3.64x | >= 3.5x | met |" in page


def test_the_page_judges_every_target(sweep: ModuleType) -> None:
    page, ratios = sweep.render(INFO, RESULTS, STORE, FANOUT, BATCH, quick=False, notes=sweep.NOTES_DEFAULT,
                                command="cmd", raw="r")

    assert "| A: orch / transitions | 0.50x | <= 0.75x | met |" in page
    assert "| A: orch / every peer (the slowest ratio) | 0.50x (vs transitions) | < 1.00x each | met |" in page
    assert "| A: tracing overhead, orch_traced / orch | +10.0 % | <= +20 % | met |" in page
    assert "| B: orch (synchronous=NORMAL) / floor | 1.50x | <= 2.0x | met |" in page
    assert "| C: orch wall / ideal 0.25 s | 1.20x | <= 1.25x | met |" in page
    assert "| C: orch peak RSS | 70 MB | <= 60 MB | **NOT met** |" in page
    assert "| burr [B: WAL+sync=NORMAL] | 130 | 0.46x | 3.85x |" in page
    assert "ERROR: boom" in page and "n/a same as the orch row" in page and "store_scale.py failed" in page
    assert ratios["B_full_vs_floor"] == pytest.approx(12.5)
    assert "**1.40x the ideal** (0.50 s: 10 waves); target <= 1.2x **NOT met**" in page
    assert "Memory allocated per item at peak: 5.0 KiB." in page


def test_the_page_judges_mode_d_apart_from_a_b_c(sweep: ModuleType) -> None:
    page, ratios = sweep.render(INFO, RESULTS + RESULTS_D, STORE, FANOUT, BATCH, quick=False, notes=sweep.NOTES_DEFAULT,
                                command="cmd", raw="r")
    results_table = page[page.index("## Results"):page.index("## Targets")]
    durable = page[page.index("## Mode D"):page.index("## Store scale")]

    assert "0.35 s" not in results_table and "1.40 s" not in results_table  # the D floors
    expected = [
        "| floor | 1 | 0.35 s (1.00x) | 1.00x | 60 (40) | 5000/5000 (200/200) | none |",
        "| pydantic-graph-v1 | 1 | 9.00 s (1.00x) | 25.70x | 60 (40) | 1000/5000 (200/200) | MISSING",
        "| dbos | 1 | ERROR: boom in D | | | | |",
        "| D: orch wall / group-commit floor | 1.05x | <= 1.10x | met |",
        "| D: every peer / orch, x floor (the closest) | 4.10x (vs burr) | >= 4.00x each | met |",
        "| D: orch peak RSS | 60 MB | <= 80 MB | met |",
        "| D: orch steps verified | 5000/5000, probe 200/200, 0 flag(s) | all, no flag | met |",
        "| D: orch wall / naive floor (one fsync per step) | 0.26x | - |  |",
        "| pydantic-graph-v1 [D: 100 runs only] | - | - | n/a (no result) |",
        "| dbos | - | - | n/a (no result) |",
    ]
    assert [line for line in expected if line not in durable] == []
    assert ratios["D_peers_over_orch"]["pydantic-graph-v1"] == pytest.approx(25.7 / 1.05)
    assert ratios["D_all_steps_verified"] is True and ratios["B_full_vs_floor"] == pytest.approx(12.5)


def test_mode_d_fails_on_a_missing_step_or_a_close_peer(sweep: ModuleType) -> None:
    slower = [_row("orch", "D", **{**DURABLE, "wall_s": 0.42, "ratio_to_floor_wall": 1.2, "steps_verified": 4999,
                                   "d_flags": ["MISSING STEPS in 1 of 3 reps"]}) if r["key"] == "orch" else r
              for r in RESULTS_D]
    page, ratios = sweep.render(INFO, RESULTS + slower, STORE, FANOUT, BATCH, quick=False, notes="", command="c",
                                raw="r")

    assert "| D: orch wall / group-commit floor | 1.20x | <= 1.10x | **NOT met** |" in page
    assert "| D: every peer / orch, x floor (the closest) | 3.58x (vs burr) | >= 4.00x each | **NOT met** |" in page
    assert "| D: orch steps verified | 4999/5000, probe 200/200, 1 flag(s) | all, no flag | **NOT met** |" in page
    assert ratios["D_all_steps_verified"] is False


def test_the_sweep_runs_the_harness_again_in_mode_d_with_the_persisting_rows(sweep: ModuleType, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def run_all(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        mode = "D" if "--modes" in cmd else "A"
        Path(cmd[cmd.index("--out") + 1]).write_text(json.dumps([_row("orch", mode, wall_s=1.0)]))
        return subprocess.CompletedProcess(cmd, 1 if mode == "D" else 0)

    monkeypatch.setattr(sweep.subprocess, "run", run_all)
    results, code = sweep.run_peers(tmp_path, tmp_path, tmp_path, quick=True)

    assert [r["mode"] for r in results] == ["A", "D"] and code == 1
    abc, durable = calls
    assert "--modes" not in abc and "--quick" in abc and abc.count("--extra") == 1 + len(sweep.VARIANTS)
    assert durable[4:] == ["--quick", "--modes", "D", "--only", *sweep.D_ROWS,
                           "--extra", f"orch={sys.executable}:{sweep.BENCH_ORCH}"]


def test_the_notes_block_survives_a_rewrite(sweep: ModuleType, tmp_path: Path) -> None:
    page = tmp_path / "performance.md"
    first, _ = sweep.render(INFO, RESULTS, STORE, FANOUT, BATCH, quick=True, notes=sweep.kept_notes(page),
                             command="c", raw="r")
    page.write_text(first.replace("_Written by hand", "The engine spends its time in X.\n\n_Written by hand"))

    second, _ = sweep.render(INFO, RESULTS, STORE, FANOUT, BATCH, quick=True, notes=sweep.kept_notes(page),
                             command="c", raw="r")
    assert second.count("The engine spends its time in X.") == 1
    assert second.count(sweep.NOTES_OPEN) == 1 and "QUICK run" in second


def test_missing_anchor_venvs_are_one_line_with_the_fix(sweep: ModuleType, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "run_all.py").write_text("")
    monkeypatch.setenv("BENCH_VENV_DIR", str(tmp_path / "venvs"))
    with pytest.raises(SystemExit) as exit_info:
        sweep.locate(sweep.build_parser().parse_args(["--anchors", str(tmp_path)]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert f"BENCH_VENV_DIR={tmp_path / 'venvs'} {tmp_path / 'setup.sh'}" in err
