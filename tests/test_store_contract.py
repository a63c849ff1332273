"""The store contract: what the engine and the CLI may rely on from any backend.

Every test runs against every backend in `BACKENDS` (name -> a function of the pytest request
giving a factory(tmp_path) that returns an opened store; a second call on the same tmp_path
opens the same database, as a second process would). PostgreSQL runs on a real server
(`pg_server`, tests/postgres.py). The store port is async: each test is a plain function
whose `async def scenario(store)` runs on one event loop (`on_store(scenario)`), the store opened and closed inside it.
SQLite-only guarantees are in tests/test_store.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statemachine_orch import (
    OwnershipLostError,
    RunBusyError,
    RunExistsError,
    RunFinishedError,
    RunNotFoundError,
    RunStatus,
    Store,
    open_store,
)
from statemachine_orch.store._owner import Owner
from statemachine_orch.store.postgres._store import PostgresStore
from statemachine_orch.store.sqlite._store import SQLiteStore
from statemachine_orch.types import Attempt, Parent, RunRecord, Usage, now_iso

from .helpers import dead_owner, me, new_run, row

StoreFactory = Callable[[Path], Store]


def _sqlite(request: pytest.FixtureRequest) -> StoreFactory:
    return lambda tmp: open_store(tmp / "contract.db")


def _postgres(request: pytest.FixtureRequest) -> StoreFactory:
    """One schema per test directory, in the session's database on a real server (`pg_server`)."""
    server: str = request.getfixturevalue("pg_server")
    return lambda tmp: open_store(server, schema="t" + hashlib.sha1(str(tmp).encode()).hexdigest()[:16])


BACKENDS: dict[str, Callable[[pytest.FixtureRequest], StoreFactory]] = {"sqlite": _sqlite, "postgres": _postgres}

Scenario = Callable[[Store], Awaitable[None]]


async def opened(factory: StoreFactory, where: Path, scenario: Scenario) -> None:
    """`scenario(store)` on a store opened here, closed whatever happens."""
    store = factory(where)
    try:
        await scenario(store)
    finally:
        await store.close()


async def abandoned(factory: StoreFactory, where: Path, run: RunRecord) -> tuple[Owner, str]:
    """Create `run` as another process would, which then dies holding it: (its owner, the
    start of the reason a takeover records)."""
    other = factory(where)
    if isinstance(other, SQLiteStore):  # an owner whose process has exited, judged by its pid
        gone = dead_owner()
        await other.create_run(run, gone)
        await other.close()
        return gone, "its process is gone"
    assert isinstance(other, PostgresStore)
    owner = me()
    await other.create_run(run, owner)
    await crash(other)
    return owner, "its lease expired at "


async def crash(store: PostgresStore) -> None:
    """What a killed process leaves: its lease runs out unrenewed (here, at once)."""
    async with store._conn() as conn:
        await conn.execute("UPDATE workers SET expires_at = clock_timestamp() - interval '1 second' "
                           "WHERE key = %s", (store.lease.key,))
    store.lease.key = None  # so that closing does not end the lease (a dead process ends nothing)
    await store.close()


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> StoreFactory:
    return BACKENDS[request.param](request)


@pytest.fixture
def on_store(backend: StoreFactory, tmp_path: Path) -> Callable[[Scenario], None]:
    """`on_store(scenario)`: run the scenario on a fresh store of the backend, on one event loop."""
    return lambda scenario: asyncio.run(opened(backend, tmp_path, scenario))


# --------------------------------------------------------------------------- records


def failed_call(number: int, **overrides: Any) -> Attempt:
    fields: dict[str, Any] = dict(number=number, started_at=now_iso(), kind="transient",
                                  error=f"overloaded ({number})", status_code=529, request_id=f"req-{number}",
                                  delay_s=0.5 * number, usage=Usage(), cost_usd=0.0,
                                  request={"model": "m", "messages": [number]}, response=None)
    fields.update(overrides)
    return Attempt(**fields)


def at(day: int, second: int = 0) -> str:
    return f"2026-01-{day:02d}T00:00:{second:02d}.000000Z"


# --------------------------------------------------------------------------- create, append, load


def test_create_load_and_append_round_trip(on_store: Callable[[Scenario], None]) -> None:
    async def scenario(store: Store) -> None:
        owner, run = me(), new_run()
        await store.create_run(run, owner)
        await store.append(row(1), owner)
        await store.append(row(2, from_state="b", to_state="__end__"), owner, status=RunStatus.COMPLETED)
        loaded, log = await store.load_run("run-1")
        assert loaded.input == run.input and loaded.options == run.options
        assert loaded.status is RunStatus.COMPLETED and loaded.owner is None  # a final status ends ownership
        assert [r.seq for r in log] == [1, 2]
        assert log[0] == row(1, started_at=log[0].started_at)

    on_store(scenario)


def test_get_run_returns_the_stored_run(on_store: Callable[[Scenario], None]) -> None:
    async def scenario(store: Store) -> None:
        owner, run = me(), new_run(created_at=at(1), updated_at=at(1), input={"text": "héllo ✓", "n": 2.5})
        await store.create_run(run, owner)
        assert await store.get_run("run-1") == replace(run, owner=owner.token)
        with pytest.raises(RunNotFoundError) as missing:
            await store.get_run("run-2")
        assert missing.value.run_id == "run-2"
        with pytest.raises(RunNotFoundError):
            await store.load_run("run-2")

    on_store(scenario)


def test_duplicate_run_id_is_refused(on_store: Callable[[Scenario], None]) -> None:
    async def scenario(store: Store) -> None:
        await store.create_run(new_run(input={"first": True}), me())
        with pytest.raises(RunExistsError, match="already exists") as taken:
            await store.create_run(new_run(input={"second": True}), me())
        assert taken.value.run_id == "run-1"
        assert (await store.get_run("run-1")).input == {"first": True}  # the first run is untouched

    on_store(scenario)


def test_run_ids_are_bound_not_interpolated(on_store: Callable[[Scenario], None]) -> None:
    async def scenario(store: Store) -> None:
        await store.create_run(new_run(created_at=at(1)), me())
        with pytest.raises(RunNotFoundError):
            await store.load_run("x' OR 1=1--")
        with pytest.raises(RunNotFoundError):
            await store.get_run("run-1' --")
        assert await store.run_ids("m' OR '1'='1") == []
        quoted = "it's; DROP TABLE runs; --"
        await store.create_run(new_run(quoted, created_at=at(2)), me())
        assert (await store.get_run(quoted)).run_id == quoted
        assert await store.run_ids() == ["run-1", quoted]

    on_store(scenario)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=40)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@pytest.mark.parametrize("name", sorted(BACKENDS))
@settings(max_examples=60, deadline=None)
@given(output=json_values, reason=st.text(st.characters(exclude_characters="\x00"), max_size=60),
       attempt=st.integers(1, 10), tokens=st.tuples(*[st.integers(0, 10**7)] * 4), data=json_values)
def test_rows_round_trip_unchanged(name: str, request: pytest.FixtureRequest,
                                   tmp_path_factory: pytest.TempPathFactory, output: Any,
                                   reason: str, attempt: int, tokens: tuple[int, int, int, int],
                                   data: Any) -> None:
    async def scenario(store: Store) -> None:
        owner = me()
        await store.create_run(new_run(input={"data": data}), owner)
        written = row(1, output=output, reason=reason, attempt=attempt,
                      usage=Usage(input_tokens=tokens[0], output_tokens=tokens[1],
                                  cache_read_tokens=tokens[2], cache_write_tokens=tokens[3]))
        await store.append(written, owner)
        run, log = await store.load_run("run-1")
        assert log == [written] and run.input == {"data": data}

    asyncio.run(opened(BACKENDS[name](request), tmp_path_factory.mktemp("example"), scenario))


def test_nul_in_text_columns_is_stored_escaped_and_the_chain_holds(on_store: Callable[[Scenario], None]) -> None:
    """PostgreSQL's TEXT cannot hold NUL: every backend stores it as the escape `\\x00`, the
    same on both, so a row hashes alike in either and a copied run still verifies."""
    async def scenario(store: Store) -> None:
        owner = me()
        await store.create_run(new_run(), owner)
        await store.append(row(1, reason="a\x00b", error="e\x00"), owner)
        _, log = await store.load_run("run-1", verified=True)
        assert (log[0].reason, log[0].error) == ("a\\x00b", "e\\x00")
        assert await store.verify_chain("run-1") is None

    on_store(scenario)


def test_create_run_with_its_first_steps_lands_whole_or_not_at_all(on_store: Callable[[Scenario], None]) -> None:
    """A fork's run row and the steps it inherits are one write: chained and counted as
    `append` would, or, when any of them is refused, none of it (not even the run)."""
    async def scenario(store: Store) -> None:
        owner = me()
        inherited = [row(1, source="inherited", request=None, response=None, request_id=None, usage=Usage(),
                         cost_usd=0.0),
                     row(2, from_state="b", to_state="c", source="inherited", request=None, response=None,
                         request_id=None, usage=Usage(), cost_usd=0.0)]
        await store.create_run(new_run(forked_from="run-0"), owner, log=inherited)
        await store.append(row(3, from_state="c", to_state="__end__"), owner, status=RunStatus.COMPLETED)
        run, log = await store.load_run("run-1", verified=True)
        assert log == [*inherited, row(3, from_state="c", to_state="__end__", started_at=log[2].started_at)]
        assert (run.status, run.forked_from) == (RunStatus.COMPLETED, "run-0")
        assert await store.verify_chain("run-1") is None
        (listed,) = await store.list_runs(forked_from="run-0")
        assert (listed.run_id, listed.steps, listed.input_tokens, listed.output_tokens) == ("run-1", 3, 3, 4)

        with pytest.raises(OwnershipLostError):  # step 2 missing: the log is refused, and the run with it
            await store.create_run(new_run("run-2"), owner, log=[row(1, run_id="run-2"), row(3, run_id="run-2")])
        with pytest.raises(RunNotFoundError):
            await store.get_run("run-2")
        await store.create_run(new_run("run-2"), owner)  # nothing of it was left behind
        assert await store.transitions("run-2") == []

    on_store(scenario)


# --------------------------------------------------------------------------- the fence


def test_append_is_fenced_on_the_owner(on_store: Callable[[Scenario], None]) -> None:
    async def scenario(store: Store) -> None:
        await store.create_run(new_run(), me())
        with pytest.raises(OwnershipLostError):
            await store.append(row(1, attempts=[failed_call(1)]), me())  # a different token
        assert await store.transitions("run-1") == []
        assert await store.attempts("run-1") == []

    on_store(scenario)


def test_append_is_fenced_on_the_sequence(on_store: Callable[[Scenario], None]) -> None:
    async def scenario(store: Store) -> None:
        owner = me()
        await store.create_run(new_run(), owner)
        await store.append(row(1), owner)
        with pytest.raises(OwnershipLostError, match="already has step 1"):
            await store.append(row(1, output="other"), owner)
        assert [r.output for r in await store.transitions("run-1")] == ["out"]

    on_store(scenario)


def test_append_refuses_a_step_that_is_not_the_next_one(on_store: Callable[[Scenario], None]) -> None:
    """The contract: `append` fails unless `record.seq` is the run's next step, so a skipped
    step can never be written (the log would read as tampered: a row missing)."""
    async def scenario(store: Store) -> None:
        owner = me()
        await store.create_run(new_run(), owner)
        await store.append(row(1), owner)
        with pytest.raises(OwnershipLostError):
            await store.append(row(3), owner)  # step 2 was never written
        assert [r.seq for r in await store.transitions("run-1")] == [1]
        assert await store.verify_chain("run-1") is None

    on_store(scenario)


def test_status_change_and_row_land_together(on_store: Callable[[Scenario], None]) -> None:
    async def scenario(store: Store) -> None:
        owner = me()
        await store.create_run(new_run(), owner)
        with pytest.raises(OwnershipLostError):
            await store.append(row(1, to_state="__end__"), me(), status=RunStatus.COMPLETED)
        run, log = await store.load_run("run-1")
        assert (run.status, run.owner, log) == (RunStatus.RUNNING, owner.token, [])
        # and with the right owner, both land
        await store.append(row(1, to_state=None, decision=None, error="E"), owner, status=RunStatus.FAILED,
                           error="E")
        run, log = await store.load_run("run-1")
        assert (run.status, run.error, run.owner, [r.seq for r in log]) == (RunStatus.FAILED, "E", None, [1])

    on_store(scenario)


def test_mark_in_flight_is_fenced_on_the_owner(on_store: Callable[[Scenario], None]) -> None:
    async def scenario(store: Store) -> None:
        owner = me()
        await store.create_run(new_run(), owner)
        with pytest.raises(OwnershipLostError):
            await store.mark_in_flight("run-1", me(), seq=1, state="a")
        assert (await store.get_run("run-1")).in_flight is None
        await store.mark_in_flight("run-1", owner, seq=1, state="a")
        mark = (await store.get_run("run-1")).in_flight
        assert mark is not None and (mark["seq"], mark["state"]) == (1, "a") and mark["at"]
        await store.append(row(1), owner)
        await store.mark_in_flight("run-1", owner, seq=2, state="b")
        mark = (await store.get_run("run-1")).in_flight
        assert mark is not None and (mark["seq"], mark["state"]) == (2, "b")
        await store.append(row(2, from_state="b", to_state="__end__"), owner, status=RunStatus.COMPLETED)
        with pytest.raises(OwnershipLostError):  # the run is over: nobody owns it
            await store.mark_in_flight("run-1", owner, seq=3, state="c")
        with pytest.raises(OwnershipLostError):
            await store.mark_in_flight("missing", owner, seq=1, state="a")

    on_store(scenario)


def test_the_in_flight_mark_keeps_progress_and_then_the_answer_fenced_on_the_owner(
        on_store: Callable[[Scenario], None]) -> None:
    paid = {"attempts": [{"kind": "invalid_output", "text": "caf\u00e9 \ud800"}]}  # a lone surrogate too
    answer = {"answer": {"text": "the reply", "tokens": 2**70}}

    async def scenario(store: Store) -> None:
        owner = me()
        await store.create_run(new_run(), owner)
        await store.mark_in_flight("run-1", owner, seq=1, state="a", progress=paid)
        mark = (await store.get_run("run-1")).in_flight
        assert mark is not None and (mark["seq"], mark["state"], mark["attempts"]) == (1, "a", paid["attempts"])
        with pytest.raises(OwnershipLostError, match="the answer was paid but not kept"):
            await store.keep_answer("run-1", me(), seq=1, state="a", progress=answer)
        await store.keep_answer("run-1", owner, seq=1, state="a", progress=answer)
        mark = (await store.get_run("run-1")).in_flight
        assert mark is not None and (mark["seq"], mark["answer"]) == (1, answer["answer"]) and mark["at"]
        assert "attempts" not in mark  # the answer's mark replaces the one before the call

    on_store(scenario)


# --------------------------------------------------------------------------- ownership: claim and release


def test_claim_requires_the_owner_to_be_gone(on_store: Callable[[Scenario], None]) -> None:
    async def scenario(store: Store) -> None:
        owner = me()
        await store.create_run(new_run(), owner)
        await store.append(row(1), owner)
        with pytest.raises(RunBusyError, match="being driven by pid"):
            await store.claim_run("run-1", me())  # `owner` lives (it is this process) and has not let go
        await store.release("run-1", owner, RunStatus.FAILED, "boom")
        assert (await store.get_run("run-1")).error == "boom"
        other = me()
        claimed, log = await store.claim_run("run-1", other)
        assert (claimed.status, claimed.error, claimed.owner) == (RunStatus.RUNNING, None, other.token)
        assert claimed.options == {"offline": "auto"}  # no options given: kept
        assert [r.seq for r in log] == [1] and log == await store.transitions("run-1")
        with pytest.raises(OwnershipLostError):
            await store.append(row(2), owner)  # the first owner is fenced out
        await store.append(row(2), other)
        assert [r.seq for r in await store.transitions("run-1")] == [1, 2]

    on_store(scenario)


def test_a_takeover_from_a_gone_owner_is_recorded(backend: StoreFactory, tmp_path: Path) -> None:
    async def scenario(store: Store) -> None:
        gone, why = await abandoned(backend, tmp_path, new_run())
        assert (await store.get_run("run-1")).stale
        owner = me()
        claimed, _ = await store.claim_run("run-1", owner)
        (takeover,) = claimed.takeovers
        assert gone.describe() in takeover.previous and takeover.why.startswith(why)
        assert f"pid {os.getpid()}" in takeover.by
        await store.release("run-1", owner, RunStatus.INTERRUPTED, None)
        claimed, _ = await store.claim_run("run-1", me())  # from a released run: no takeover
        assert len(claimed.takeovers) == 1 and not claimed.stale

    asyncio.run(opened(backend, tmp_path, scenario))


def test_claim_replaces_the_options_when_given(on_store: Callable[[Scenario], None]) -> None:
    async def scenario(store: Store) -> None:
        owner = me()
        await store.create_run(new_run(), owner)
        await store.release("run-1", owner, RunStatus.INTERRUPTED, None)
        claimed, _ = await store.claim_run("run-1", me(), options={"budget": {"max_tokens": 10}})
        assert claimed.options == {"budget": {"max_tokens": 10}}
        assert (await store.get_run("run-1")).options == {"budget": {"max_tokens": 10}}

    on_store(scenario)


def test_claim_refuses_finished_and_missing_runs(on_store: Callable[[Scenario], None]) -> None:
    async def scenario(store: Store) -> None:
        owner = me()
        await store.create_run(new_run(), owner)
        await store.append(row(1, to_state="__end__"), owner, status=RunStatus.COMPLETED)
        await store.create_run(new_run("run-2"), owner)
        await store.append(row(1, run_id="run-2", to_state="__end__", decision="terminate"), owner,
                           status=RunStatus.TERMINATED)
        with pytest.raises(RunFinishedError, match="already completed"):
            await store.claim_run("run-1", me())
        with pytest.raises(RunFinishedError, match="already terminated"):
            await store.claim_run("run-2", me())
        with pytest.raises(RunNotFoundError):
            await store.claim_run("nope", me())
        run = await store.get_run("run-1")
        assert (run.status, run.owner) == (RunStatus.COMPLETED, None)  # the refused claims changed nothing

    on_store(scenario)


def test_release_stores_the_status_and_ends_the_ownership(on_store: Callable[[Scenario], None]) -> None:
    async def scenario(store: Store) -> None:
        first = me()
        await store.create_run(new_run(), first)
        await store.append(row(1), first)
        await store.release("run-1", first, RunStatus.INTERRUPTED, "stopped by SIGTERM")
        run = await store.get_run("run-1")
        assert (run.status, run.error, run.owner) == (RunStatus.INTERRUPTED, "stopped by SIGTERM", None)
        with pytest.raises(OwnershipLostError):
            await store.append(row(2), first)
        # `first` belongs to this very process, which is alive: released, its run is free anyway
        second = me()
        claimed, _ = await store.claim_run("run-1", second)
        assert claimed.owner == second.token
        # a release by an owner that no longer owns the run changes nothing
        await store.release("run-1", first, RunStatus.FAILED, "too late")
        run = await store.get_run("run-1")
        assert (run.status, run.error, run.owner) == (RunStatus.RUNNING, None, second.token)

    on_store(scenario)


def test_a_waiting_run_keeps_its_pending_review_until_another_is_stored(on_store: Callable[[Scenario], None]) -> None:
    async def scenario(store: Store) -> None:
        owner = me()
        await store.create_run(new_run(), owner)
        await store.append(row(1), owner)
        review = {"seq": 2, "state": "gate", "payload": {"text": "caf\u00e9 \u2603"}, "deadline": None}
        await store.release("run-1", owner, RunStatus.WAITING, None, review=review)
        waiting = await store.get_run("run-1")
        assert (waiting.status, waiting.owner, waiting.review) == (RunStatus.WAITING, None, review)
        assert [r.run_id for r in await store.list_runs(status=RunStatus.WAITING)] == ["run-1"]
        claimed, _ = await store.claim_run("run-1", me())
        assert claimed.review == review  # the claimer (a reviewer, a worker) reads what was asked
        assert await store.verify_chain("run-1") is None  # the review is not part of the chain

    on_store(scenario)


def test_lineage_is_stored_anchored_in_the_chain_and_filtered_on(on_store: Callable[[Scenario], None]) -> None:
    async def scenario(store: Store) -> None:
        owner = me()
        await store.create_run(new_run("p"), owner)
        await store.create_run(new_run("f", forked_from="p"), owner)
        await store.create_run(new_run("x", experiment="e1", arm="B"), owner)
        fork, arm = await store.get_run("f"), await store.get_run("x")
        assert (fork.forked_from, arm.experiment, arm.arm) == ("p", "e1", "B")
        assert [r.run_id for r in await store.list_runs(forked_from="p")] == ["f"]
        assert [(r.run_id, r.arm) for r in await store.list_runs(experiment="e1")] == [("x", "B")]
        for run_id in ("p", "f", "x"):
            await store.append(row(1, run_id=run_id), owner)
            assert await store.verify_chain(run_id) is None

    on_store(scenario)


# --------------------------------------------------------------------------- reading the log


def test_transitions_carry_their_failed_attempts_in_order(on_store: Callable[[Scenario], None]) -> None:
    async def scenario(store: Store) -> None:
        owner = me()
        await store.create_run(new_run(), owner)
        first = [failed_call(1), failed_call(2, kind="invalid_output", status_code=None, request=None,
                                                response={"id": "bad", "content": [{"text": "nope"}]},
                                                usage=Usage(input_tokens=9, output_tokens=2), cost_usd=0.01)]
        await store.append(row(1, to_state=None, decision=None, error="gave up", attempts=first), owner)
        await store.append(row(2, attempts=[]), owner)
        request = {"model": "m", "messages": ["same body"]}
        third = [failed_call(1, request=request), failed_call(2, kind="timeout", request=request)]
        await store.append(row(3, request=request, attempts=third), owner)
        log = await store.transitions("run-1")
        assert [r.seq for r in log] == [1, 2, 3]
        assert (log[0].attempts, log[1].attempts, log[2].attempts) == (first, [], third)
        assert log[0].committed is False and log[0].error == "gave up"
        assert await store.attempts("run-1") == [(1, first[0]), (1, first[1]), (3, third[0]), (3, third[1])]
        assert await store.attempts("other") == []
        _, loaded = await store.load_run("run-1")
        assert loaded == log

    on_store(scenario)


def test_find_cached_serves_only_committed_model_answers(on_store: Callable[[Scenario], None]) -> None:
    async def scenario(store: Store) -> None:
        owner = me()
        await store.create_run(new_run(), owner)
        served = row(1, request_hash="h-llm", output={"answer": 42})
        await store.append(served, owner)
        await store.append(row(2, to_state=None, decision=None, error="guard failed", request_hash="h-failed"),
                           owner)
        await store.append(row(3, source="python", request=None, response=None, request_id=None,
                               request_hash="h-python"), owner)
        await store.append(row(4, response=None, request_hash="h-no-response"), owner)
        fallback = row(5, source="fallback", request_hash="h-fallback", output="fallback answer")
        await store.append(fallback, owner)
        await store.append(row(6, source="cache", request_hash="h-cache"), owner)
        assert await store.find_cached("h-llm") == served
        assert await store.find_cached("h-fallback") == fallback
        for not_served in ("h-failed", "h-python", "h-no-response", "h-cache", "h-unknown"):
            assert await store.find_cached(not_served) is None, not_served

    on_store(scenario)


def test_verify_chain_passes_an_intact_log(backend: StoreFactory, tmp_path: Path) -> None:
    """Also when the log was written by two store instances (a resume in another process)."""
    async def scenario() -> None:
        first, second = backend(tmp_path), backend(tmp_path)
        try:
            owner = me()
            await first.create_run(new_run(), owner)
            assert await first.verify_chain("run-1") is None  # no rows yet
            await first.append(row(1, attempts=[failed_call(1)]), owner)
            await first.append(row(2, to_state=None, decision=None, error="E"), owner, status=RunStatus.FAILED,
                               error="E")
            other = me()
            await second.claim_run("run-1", other)
            await second.append(row(3, output={"k": [1, 2]}), other)
            await second.append(row(4, to_state="__end__"), other, status=RunStatus.COMPLETED)
            assert await first.verify_chain("run-1") is None
            assert await second.verify_chain("run-1") is None
            assert await first.load_run("run-1", verified=True) == await second.load_run("run-1")
        finally:
            await first.close()
            await second.close()

    asyncio.run(scenario())


# --------------------------------------------------------------------------- listing and totals


def test_list_runs_is_newest_first_with_totals(on_store: Callable[[Scenario], None]) -> None:
    async def scenario(store: Store) -> None:
        owner = me()
        for n in range(3):
            await store.create_run(new_run(f"run-{n}", created_at=at(n + 1)), owner)
        await store.append(row(1, run_id="run-1", cost_usd=0.25), owner)
        await store.append(row(2, run_id="run-1", to_state=None, decision=None, error="E", cost_usd=0.5), owner,
                           status=RunStatus.FAILED, error="E")
        runs = await store.list_runs()
        assert [r.run_id for r in runs] == ["run-2", "run-1", "run-0"]
        failed = runs[1]
        assert (failed.machine, failed.status, failed.created_at, failed.error) == ("m", RunStatus.FAILED, at(2), "E")
        assert (failed.steps, failed.input_tokens, failed.output_tokens, failed.cost_usd) == (1, 6, 8, 0.75)
        assert (runs[0].steps, runs[0].input_tokens, runs[0].cost_usd, runs[0].stale) == (0, 0, 0.0, False)

    on_store(scenario)


def test_list_runs_filters_by_machine_and_status(on_store: Callable[[Scenario], None]) -> None:
    async def scenario(store: Store) -> None:
        owner = me()
        plan = [("a1", "alpha", RunStatus.COMPLETED), ("b1", "beta", RunStatus.FAILED),
                ("a2", "alpha", RunStatus.FAILED), ("b2", "beta", None), ("a3", "alpha", None)]
        for day, (run_id, machine, status) in enumerate(plan, start=1):
            await store.create_run(new_run(run_id, machine=machine, created_at=at(day)), owner)
            if status is not None:
                await store.append(row(1, run_id=run_id, to_state="__end__"), owner, status=status)

        async def ids(**filters: Any) -> list[str]:
            return [r.run_id for r in await store.list_runs(**filters)]

        assert await ids(machine="alpha") == ["a3", "a2", "a1"]
        assert await ids(status=RunStatus.FAILED) == ["a2", "b1"]
        assert await ids(status=RunStatus.RUNNING) == ["a3", "b2"]
        assert await ids(machine="beta", status=RunStatus.FAILED) == ["b1"]
        assert await ids(machine="gamma") == []
        assert await ids(machine="alpha", status=RunStatus.TERMINATED) == []
        assert all(r.machine == "alpha" for r in await store.list_runs(machine="alpha"))

    on_store(scenario)


def test_list_runs_pages_cover_every_run_once(on_store: Callable[[Scenario], None]) -> None:
    async def scenario(store: Store) -> None:
        owner = me()
        # several runs share a creation time: paging must still neither skip nor repeat one
        created = {f"r{n:02d}": at(1 + n // 3, second=n % 2) for n in range(11)}
        newest_first = sorted(created, key=lambda r: (created[r], r), reverse=True)
        for run_id in newest_first[::2] + newest_first[1::2]:  # created out of time order
            machine = "other" if run_id == "r05" else "paged"
            await store.create_run(new_run(run_id, machine=machine, created_at=created[run_id]), owner)
        assert [r.run_id for r in await store.list_runs(limit=100)] == newest_first
        assert [r.run_id for r in await store.list_runs(limit=4)] == newest_first[:4]

        async def pages(limit: int, **filters: Any) -> list[list[str]]:
            found: list[list[str]] = []
            page = await store.list_runs(limit=limit, **filters)
            while page:
                assert len(page) <= limit
                found.append([r.run_id for r in page])
                page = await store.list_runs(limit=limit, before=page[-1].run_id, **filters)
            return found

        for limit in (1, 3, 4, 11):
            found = await pages(limit)
            assert [run_id for page in found for run_id in page] == newest_first, limit
            assert all(len(page) == limit for page in found[:-1]), limit
        paged = [run_id for page in await pages(2, machine="paged") for run_id in page]
        assert paged == [r for r in newest_first if r != "r05"]
        assert await store.list_runs(before=newest_first[-1]) == []

    on_store(scenario)


def test_list_runs_of_a_parent_lists_its_children_in_the_order_it_started_them(
        on_store: Callable[[Scenario], None]) -> None:
    """Only a run's children, each with its `Parent`, ordered by state, output and item (as
    their ids `PARENT.S.N.I` place them: a map state run twice in a loop, item 10 after item 2),
    whatever order they were created in; other listings leave children out."""
    async def scenario(store: Store) -> None:
        owner = me()
        await store.create_run(new_run("p", created_at=at(1)), owner)
        await store.create_run(new_run("q", created_at=at(1, 1)), owner)
        places = [(1, 2, 0), (1, 1, 10), (0, 1, 0), (1, 1, 2), (1, 1, 0)]
        for second, (index, slot, item) in enumerate(places):
            state = "items" if index else "first"
            await store.create_run(new_run(f"p.{index}.{slot}.{item}", created_at=at(2, second),
                                           parent=Parent("p", state, item)), owner)
        await store.create_run(new_run("q.0.1.0", parent=Parent("q", "first", 0)), owner)
        children = await store.list_runs(parent="p")
        assert [c.run_id for c in children] == ["p.0.1.0", "p.1.1.0", "p.1.1.2", "p.1.1.10", "p.1.2.0"]
        assert [c.parent for c in children] == [Parent("p", "first", 0), Parent("p", "items", 0),
                                                Parent("p", "items", 2), Parent("p", "items", 10),
                                                Parent("p", "items", 0)]
        assert await store.list_runs(parent="p.0.1.0") == []
        assert [r.run_id for r in await store.list_runs()] == ["q", "p"]
        assert all(r.parent is None for r in await store.list_runs())

    on_store(scenario)


def test_machine_totals_sum_steps_tokens_cost_and_cache_hits(on_store: Callable[[Scenario], None]) -> None:
    async def scenario(store: Store) -> None:
        owner = me()
        await store.create_run(new_run("m-done"), owner)
        await store.append(row(1, run_id="m-done", cost_usd=0.5), owner)
        await store.append(row(2, run_id="m-done", source="cache", usage=Usage(), cost_usd=0.0), owner)
        await store.append(row(3, run_id="m-done", to_state="__end__", cost_usd=0.25), owner,
                           status=RunStatus.COMPLETED)
        await store.create_run(new_run("m-failed"), owner)
        await store.append(row(1, run_id="m-failed", to_state=None, decision=None, error="E",
                               usage=Usage(input_tokens=10, output_tokens=1), cost_usd=0.125), owner,
                           status=RunStatus.FAILED, error="E")
        await store.create_run(new_run("m-new"), owner)  # no step yet
        await store.create_run(new_run("n-1", machine="n"), owner)
        await store.append(row(1, run_id="n-1", cost_usd=0.5), owner)
        await store.append(row(2, run_id="n-1", cost_usd=None), owner)  # a model without a known price
        await store.append(row(3, run_id="n-1", source="cache", usage=Usage(), cost_usd=0.0), owner)

        totals = {t.machine: t for t in await store.machine_totals(["m", "n", "unknown"])}
        assert set(totals) == {"m", "n"}
        m, n = totals["m"], totals["n"]
        assert (m.runs, m.steps, m.input_tokens, m.output_tokens, m.cost_usd, m.cache_hits) == \
            (3, 3, 3 + 3 + 10, 4 + 4 + 1, 0.875, 1)
        assert (n.runs, n.steps, n.input_tokens, n.output_tokens, n.cost_usd, n.cache_hits) == \
            (1, 3, 6, 8, None, 1)
        [only_n] = await store.machine_totals(["n"])
        assert only_n == n
        assert await store.machine_totals([]) == []

    on_store(scenario)


def test_run_ids_are_oldest_first(on_store: Callable[[Scenario], None]) -> None:
    async def scenario(store: Store) -> None:
        owner = me()
        for run_id, machine, day in [("c", "m", 3), ("a", "n", 1), ("d", "m", 4), ("b", "m", 2), ("e", "n", 5)]:
            await store.create_run(new_run(run_id, machine=machine, created_at=at(day)), owner)
        assert await store.run_ids() == ["a", "b", "c", "d", "e"]
        assert await store.run_ids("m") == ["b", "c", "d"]
        assert await store.run_ids(machine="n") == ["a", "e"]
        assert await store.run_ids("nothing") == []

    on_store(scenario)


# --------------------------------------------------------------------------- closing


def test_close_keeps_every_write_for_the_next_opener(backend: StoreFactory, tmp_path: Path) -> None:
    owner, written = me(), row(1, attempts=[failed_call(1)])

    async def write(store: Store) -> None:
        await store.create_run(new_run(), owner)
        await store.append(written, owner)
        await store.mark_in_flight("run-1", owner, seq=2, state="b")

    async def read(store: Store) -> None:
        run, log = await store.load_run("run-1")
        assert (run.owner, log) == (owner.token, [written])
        assert run.in_flight is not None and run.in_flight["seq"] == 2
        assert await store.verify_chain("run-1") is None
        # SQLite: the owner is this process, still alive, so its token still writes. PostgreSQL:
        # ownership is the closed store's lease, which closing ended, so the run is claimed anew.
        writer = owner
        if isinstance(store, PostgresStore):
            writer = me()
            claimed, _ = await store.claim_run("run-1", writer)
            assert [t.why for t in claimed.takeovers] == ["its lease was ended"]
        await store.append(row(2, to_state="__end__"), writer, status=RunStatus.COMPLETED)
        assert (await store.get_run("run-1")).status is RunStatus.COMPLETED

    asyncio.run(opened(backend, tmp_path, write))
    asyncio.run(opened(backend, tmp_path, read))
