"""Who owns a run, judged the same way from anywhere on the host (issue 11, items 5, 6, 21).

An owner is alive while it holds its byte lock in `<db>-owners`; the kernel drops the lock when
the process dies. Pids and host names are not proof across PID and UTS namespaces (containers):
a resume from another namespace must neither take a live run over nor be locked out of a dead
one. Tests that need real namespaces run `unshare` (root); the others forge what another
namespace would see (a foreign pid, a foreign host name) in the stored owner.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from .helpers import (
    REPORT,
    REPORT_INPUT,
    REPORT_STATES,
    Answers,
    CLIResult,
    EnvOrch,
    kill_9,
    one_error_line,
    orch_command,
    query,
    stored_status,
    wait_for_arrival,
)

HELD = "trend_analysis"  # the step whose call is in flight while the other process tries


def _can_unshare(*flags: str) -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", *flags, "true"], capture_output=True).returncode == 0


needs_namespaces = pytest.mark.skipif(
    not _can_unshare("--pid", "--fork", "--mount-proc") or not _can_unshare("--uts", "--fork"),
    reason="needs unshare with PID and UTS namespaces (root); the forged-owner tests cover the same rule")


def start_in_namespace(orch: EnvOrch, flags: Sequence[str], args: Sequence[str | Path],
                       inner: str = "") -> subprocess.Popen[str]:
    """`orch ARGS` in new namespaces (`inner`: shell run first, inside them)."""
    env = {**os.environ, **orch.env()}
    command = " ".join(map(_quote, [*orch_command(), *orch.argv(args)]))
    proc = subprocess.Popen(["unshare", *flags, "sh", "-c", f"{inner}exec {command}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    orch.started.append(proc)
    return proc


def _quote(part: str | Path) -> str:
    return "'" + str(part).replace("'", "'\\''") + "'"


def owner_info(db: Path, run_id: str) -> dict[str, object]:
    (row,) = query(db, "SELECT owner_info FROM runs WHERE run_id = ?", run_id)
    info: dict[str, object] = json.loads(row["owner_info"])
    return info


def forge_owner(db: Path, run_id: str, **changes: object) -> None:
    """What a process in another namespace reads in the owner: another pid or host name."""
    info = {**owner_info(db, run_id), **changes}
    info = {k: v for k, v in info.items() if v is not None}
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE runs SET owner_info = ? WHERE run_id = ?", (json.dumps(info), run_id))


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def held_run(orch: EnvOrch, answers: Answers, run_id: str) -> subprocess.Popen[str]:
    """A run whose owner is alive, waiting for its HELD answer (`finish_and_check` lets it go)."""
    hold = answers.hold(run_id, HELD, answered=True)
    proc = orch.start("run", REPORT, "--input", REPORT_INPUT, "--run-id", run_id)
    wait_for_arrival(hold, proc)
    return proc


def killed_run(orch: EnvOrch, answers: Answers, run_id: str) -> None:
    """A run whose owner was SIGKILLed with its call in flight (so the run stays `running`)."""
    hold = answers.hold(run_id, HELD)
    proc = orch.start("run", REPORT, "--input", REPORT_INPUT, "--run-id", run_id)
    wait_for_arrival(hold, proc)
    kill_9(proc)
    answers.release(run_id)


def assert_busy(result: CLIResult, holder: str) -> None:
    assert result.code == 3, result.stderr
    line = one_error_line(result)
    assert "being driven by" in line and holder in line, line


def finish_and_check(orch: EnvOrch, answers: Answers, proc: subprocess.Popen[str], run_id: str) -> None:
    answers.release(run_id)
    done = EnvOrch.finish(proc)
    assert done.code == 0, done.stderr
    assert stored_status(orch.db, run_id) == "completed"
    assert answers.calls(run_id) == dict.fromkeys(REPORT_STATES, 1)  # nothing paid twice


# --------------------------------------------------------------------------- item 5: a live owner


def test_a_live_owner_whose_pid_looks_dead_keeps_its_run(orch: EnvOrch, answers: Answers) -> None:
    """A resume that cannot see the owner's pid (as from another PID namespace) must not take over."""
    proc = held_run(orch, answers, "live")
    forge_owner(orch.db, "live", pid=dead_pid(), started=None)
    try:
        assert_busy(orch("resume", "live"), "being driven by")
        assert owner_info(orch.db, "live")["lock"]  # the owner's lock decided, not its pid
    finally:
        finish_and_check(orch, answers, proc, "live")


@needs_namespaces
def test_a_resume_from_another_pid_namespace_cannot_take_a_live_run(orch: EnvOrch, answers: Answers) -> None:
    proc = held_run(orch, answers, "live")
    try:
        other = EnvOrch.finish(start_in_namespace(orch, ["--pid", "--fork", "--mount-proc"],
                                                  ["resume", "live"]))
        assert_busy(other, f"pid {proc.pid}")
        assert answers.calls("live")[HELD] == 1  # the in-flight call was not sent again
    finally:
        finish_and_check(orch, answers, proc, "live")


# --------------------------------------------------------------------------- item 6: a dead owner elsewhere


def test_a_dead_owner_under_another_host_name_is_taken_over_and_audited(
        orch: EnvOrch, answers: Answers) -> None:
    killed_run(orch, answers, "dead")
    forge_owner(orch.db, "dead", host="container-7")
    listed = {r["run_id"]: r for r in orch.json("runs")}
    assert listed["dead"]["stale"] is True
    resumed = orch.json("resume", "dead")
    assert resumed["status"] == "completed"
    shown = orch.json("show", "dead")
    (takeover,) = shown["takeovers"]
    assert "container-7" in takeover["previous"] and takeover["why"] == "its liveness lock was free"
    assert f"@{os.uname().nodename} pid " in takeover["by"]
    assert "taken over at" in orch.ok("show", "dead").stdout


@needs_namespaces
def test_an_owner_killed_in_another_uts_namespace_is_taken_over(orch: EnvOrch, answers: Answers) -> None:
    hold = answers.hold("elsewhere", HELD)
    proc = start_in_namespace(orch, ["--uts", "--fork", "--kill-child"],
                              ["run", REPORT, "--input", REPORT_INPUT, "--run-id", "elsewhere"],
                              inner="hostname other-host && ")
    wait_for_arrival(hold, proc)
    assert owner_info(orch.db, "elsewhere")["host"] == "other-host"
    kill_9(proc)
    answers.release("elsewhere")
    assert orch.json("resume", "elsewhere")["status"] == "completed"
    (takeover,) = orch.json("show", "elsewhere")["takeovers"]
    assert "other-host" in takeover["previous"]


def test_take_over_claims_a_run_whose_old_owner_cannot_be_judged(orch: EnvOrch, answers: Answers) -> None:
    """An owner recorded without a lock key (an older version) on another host: assumed alive,
    until the user says it is gone; `--take-over` never overrides a proven-live owner."""
    killed_run(orch, answers, "legacy")
    forge_owner(orch.db, "legacy", host="old-host", lock=None)
    refused = orch("resume", "legacy")
    assert_busy(refused, "old-host")
    assert "--take-over" in one_error_line(refused)
    resumed = orch.json("resume", "legacy", "--take-over")
    assert resumed["status"] == "completed"
    (takeover,) = orch.json("show", "legacy")["takeovers"]
    assert takeover["why"] == "declared gone with --take-over"


def test_take_over_never_claims_a_live_owner(orch: EnvOrch, answers: Answers) -> None:
    proc = held_run(orch, answers, "busy")
    try:
        assert_busy(orch("resume", "busy", "--take-over"), f"pid {proc.pid}")
    finally:
        finish_and_check(orch, answers, proc, "busy")
    assert orch.json("show", "busy")["takeovers"] == []


# --------------------------------------------------------------------------- item 21: one truth


def test_show_and_runs_agree_that_a_killed_owner_is_gone(orch: EnvOrch, answers: Answers) -> None:
    killed_run(orch, answers, "gone")
    (listed,) = orch.json("runs")
    shown = orch.json("show", "gone")
    assert listed["stale"] is True
    assert shown["snapshot"]["owned"] is False
    assert "owner gone: resume it" in orch.ok("show", "gone").stdout


def test_a_live_owner_is_owned_in_show_and_not_stale_in_runs(orch: EnvOrch, answers: Answers) -> None:
    proc = held_run(orch, answers, "alive")
    try:
        (listed,) = orch.json("runs")
        assert listed["stale"] is False
        assert orch.json("show", "alive")["snapshot"]["owned"] is True
    finally:
        finish_and_check(orch, answers, proc, "alive")


def test_the_owners_file_is_private(orch: EnvOrch, answers: Answers) -> None:
    proc = held_run(orch, answers, "mode")
    try:
        owners = Path(f"{orch.db}-owners")
        assert owners.exists() and owners.stat().st_mode & 0o077 == 0
    finally:
        finish_and_check(orch, answers, proc, "mode")
