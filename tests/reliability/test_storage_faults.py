"""Storage faults: the real `orch` process against a database it cannot (fully) write.

- Disk full (`ulimit -f` in the child, SIGXFSZ ignored, so a write fails with EFBIG): the
  transaction rolls back, the run is parked and resumable, and no call is made without its
  record (a committed row, or the in-flight mark a resume flags).
- A read-only database (file, or file and directory): reads work, writes fail cleanly.
- Another process holding the write lock past the busy timeout: a "retry" error before any
  call.
- A corrupted run (truncated JSON, planted pickles, a broken hash chain, a changed machine):
  that run is refused with one line, the other runs in the file are unaffected.
- A database written by a newer schema: refused, file untouched.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from statemachine_orch import SQLiteStore
from statemachine_orch.testing import FakeMessagesAPI

from ..helpers import (
    REFUSALS,
    Figures,
    Orch,
    corrupted_run_trial,
    disk_full_trial,
    lock_between_steps_trial,
    newer_schema_trial,
    read_only_database_trial,
    scaled,
    write_lock_trial,
)

# --------------------------------------------------------------------------- disk full


SMALLEST_LIMIT, LARGEST_LIMIT = 28 * 1024, 100 * 1024  # from "cannot even open" to "completes"


def limits(rng: random.Random, count: int) -> list[int]:
    """`count` file-size limits spread over the range (one per slice, at a random point in it),
    so the write that fails moves through opening, creating the run, marks and commits."""
    width = (LARGEST_LIMIT - SMALLEST_LIMIT) / count
    return [int(SMALLEST_LIMIT + width * (n + rng.random())) for n in range(count)]


def test_disk_full_at_a_write_parks_the_run_and_no_call_goes_unrecorded(
        orch: Orch, fake: FakeMessagesAPI, tmp_path: Path, figures: Figures) -> None:
    seed = random.randrange(2**32)
    print(f"disk-full seed {seed}")
    trials = limits(random.Random(seed), scaled(5, 60))
    figures["trials"] = len(trials)
    figures["seed"] = seed
    figures["limits_bytes"] = [min(trials), max(trials)]
    for n, limit in enumerate(trials):
        db = tmp_path / f"full-{n}.db"
        asyncio.run(SQLiteStore(db).close())  # the schema exists: the limit hits the WAL during the run
        disk_full_trial(Orch(db, orch.base_url), fake, f"full-{n}", limit, figures)
    figures["faults_injected"] = len(trials) - figures.values.get("completed_within_limit", 0)


# --------------------------------------------------------------------------- read-only


@pytest.mark.parametrize("schema", ["current", "version_3"])
@pytest.mark.parametrize("what", ["file", "file_and_directory"])
def test_a_read_only_database_is_still_read_and_refuses_writes_cleanly(
        orch: Orch, fake: FakeMessagesAPI, tmp_path: Path, what: str, schema: str, figures: Figures) -> None:
    read_only_database_trial(orch, fake, tmp_path, what, schema, figures)


# --------------------------------------------------------------------------- a held write lock


def test_a_write_lock_held_past_the_busy_timeout_stops_before_any_call(
        orch: Orch, fake: FakeMessagesAPI, figures: Figures) -> None:
    write_lock_trial(orch, fake, figures)


def test_a_lock_taken_between_steps_stops_before_the_next_call_and_the_run_retries(
        db_path: Path, fake: FakeMessagesAPI, figures: Figures) -> None:
    lock_between_steps_trial(db_path, fake, figures)


# --------------------------------------------------------------------------- corrupted runs


@pytest.mark.parametrize("kind", sorted(REFUSALS))
def test_a_corrupted_run_is_refused_and_the_other_runs_are_unaffected(
        orch: Orch, fake: FakeMessagesAPI, tmp_path: Path, kind: str, figures: Figures) -> None:
    corrupted_run_trial(orch, fake, tmp_path, kind, figures)


# --------------------------------------------------------------------------- newer schema


def test_a_database_from_a_newer_schema_is_refused_and_left_untouched(
        orch: Orch, fake: FakeMessagesAPI, figures: Figures) -> None:
    newer_schema_trial(orch, fake, figures)
