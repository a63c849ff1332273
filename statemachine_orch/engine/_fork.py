"""Forks: a new run from a stored run's snapshot before one of its steps, with what-if changes.

A fork inherits its parent's committed steps before the fork point: copies of them start its
log as `inherited` rows (outputs, decisions and reasons kept; no request, answer or cost: those
stay the parent's, counted once there), written with the fork's run row in one transaction. From
the fork point on it runs as any run does, with its overrides (stored with it, so a resume,
a replay or a worker applies them again), except that an LLM state about to call the model
first looks at the parent's step at the same position along the path: the same state with an
identical request reuses that answer (`reused`: no call, no cost). Only the steps whose request
changed are paid. The parent is never modified.

Positions count committed steps (a failed step and the one that retried it are one step): the
n-th committed step of a fork answers for the n-th of its parent, and a child run of the fork
for the parent's child run of the same place. A parent's inherited step is followed to the run
that answered it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..definition._machine import Machine
from ..definition._overrides import (
    OPTION,
    StateOverride,
    overrides_json,
    parse_overrides,
    stored_overrides,
    with_overrides,
)
from ..errors import RunNotFoundError, UsageError
from ..store._contract import Store
from ..types import Budget, RunRecord, RunStatus, TransitionRecord, Usage, output_json
from ._fsm import Compiled
from ._outputs import json_data, restore_output
from ._snapshot import Snapshot, fresh, snapshot

Overrides = Mapping[str, StateOverride | Mapping[str, Any]]
"""What-if changes by state name: a `StateOverride`, or its fields as a dict."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ForkPlan:
    """What a fork is made of, checked against its parent before anything is stored."""

    machine: Machine  # with the fork's overrides (its parent's, the new ones over them)
    input: dict[str, Any]  # the parent's, with `set` applied to its fields
    options: dict[str, Any]  # "fork" (from, at, state, label, set) and the merged "overrides"
    budget: Budget  # the parent's
    rows: list[TransitionRecord]  # the parent's committed steps before the fork point, `set` applied

    def inherit(self, run_id: str) -> list[TransitionRecord]:
        """The fork's first log rows: the parent's steps, renumbered from 1, neither run nor paid here."""
        return [replace(row, run_id=run_id, seq=seq, source="inherited", latency_ms=0.0, request=None,
                        response=None, request_id=None, usage=Usage(), cost_usd=0.0, request_hash=None,
                        in_doubt=False, attempts=[]) for seq, row in enumerate(self.rows, 1)]


async def plan_fork(store: Store, parent: str, machine: Machine, *, at: int | str, overrides: Overrides | None,
                    set: Mapping[str, Any] | None, label: str | None) -> ForkPlan:
    """The fork of run `parent` at `at` (a seq of its log, or a state: its first committed
    step), or UsageError saying why there can be none. The parent is read verified."""
    record, log = await store.load_run(parent, verified=True)
    seq, state = fork_point(record, log, at, machine)
    given = parse_overrides(overrides or {}, where="overrides")
    merged = merge_overrides(stored_overrides(record.options), given)
    variant = with_overrides(machine, merged)
    rows = [row for row in log if row.committed and row.seq < seq]
    input, rows = _apply_set(variant, dict(record.input), rows, dict(set or {}))
    options: dict[str, Any] = {"fork": {"from": parent, "at": seq, "state": state, "label": label,
                                        "set": dict(set or {})}}
    if merged:
        options[OPTION] = overrides_json(merged)
    return ForkPlan(machine=variant, input=input, options=options, budget=Budget.of_run(record.options), rows=rows)


def merge_overrides(under: Mapping[str, StateOverride], over: Mapping[str, StateOverride]) -> dict[str, StateOverride]:
    """`over` over `under` (a fork's over its parent's), field by field; `params` and `on` merge."""
    merged = dict(under)
    for state, change in over.items():
        fields = merged[state].model_dump(exclude_none=True) if state in merged else {}
        for name, value in change.model_dump(exclude_none=True).items():
            fields[name] = {**fields[name], **value} if name in ("params", "on") and name in fields else value
        merged[state] = StateOverride(**fields)
    return merged


def refuse_to_fork(record: RunRecord, machine: Machine | None = None) -> None:
    """Refuse a child run (its parent's fork forks it too), or a run of another machine than `machine`."""
    if record.parent is not None:
        above = record.parent
        raise UsageError(f"run {record.run_id} is a child run of run {above.run_id} (state {above.state}); only "
                         "top-level runs are forked", fix=f"fork run {above.run_id}")
    if machine is not None and record.machine != machine.name:
        raise UsageError(f"run {record.run_id} is a run of machine '{record.machine}', not '{machine.name}'",
                         fix="pass the machine it ran")


def fork_point(record: RunRecord, log: list[TransitionRecord], at: int | str, machine: Machine) -> tuple[int, str]:
    """(seq, state) of the step a fork of `record` at `at` runs anew, once `refuse_to_fork` lets it be forked."""
    refuse_to_fork(record, machine)
    rid = record.run_id
    if isinstance(at, bool) or not isinstance(at, (int, str)):
        raise UsageError(f"fork point {at!r} is neither a seq nor a state name", fix="pass at=3 or at='state'")
    if isinstance(at, int):
        row = next((r for r in log if r.seq == at), None)
        if row is None:
            raise UsageError(f"run {rid} has no step {at} (its steps are " + (f"1 to {log[-1].seq})" if log else
                                                                                "none)"),
                             fix=f"fork at a seq that `orch log {rid}` lists, or at a state")
        return at, row.from_state
    if at not in machine.by_name:
        raise UsageError(f"machine '{machine.name}' has no state '{at}'",
                         fix=f"fork at a seq, or at one of {', '.join(machine.by_name)}")
    ran = [r for r in log if r.from_state == at]
    if not ran:
        path = " -> ".join(r.from_state for r in log if r.committed) or "no steps"
        raise UsageError(f"state '{at}' never ran in run {rid} (its path: {path})",
                         fix="fork at a state it ran, or at a seq")
    return next((r for r in ran if r.committed), ran[0]).seq, at


def _apply_set(machine: Machine, input: dict[str, Any], rows: list[TransitionRecord],
               changes: dict[str, Any]) -> tuple[dict[str, Any], list[TransitionRecord]]:
    """The input and inherited rows with `changes` made: a state's latest inherited output, or
    an input field (a state's name wins over a field's)."""
    fields = list(machine.input_model.model_fields) if machine.input_model is not None else list(input)
    for key, value in changes.items():
        try:
            json_data(value)  # a pydantic model is JSON data
        except (TypeError, ValueError):
            raise UsageError(f"cannot set '{key}' to {_excerpt(value)}: it is not JSON data",
                             fix="give a JSON value (NaN and Infinity are not)") from None
        latest = next((i for i in range(len(rows) - 1, -1, -1) if rows[i].from_state == key), None)
        if latest is not None:
            try:
                output = output_json(restore_output(machine.by_name[key], value))
            except (TypeError, ValueError) as exc:
                raise UsageError(f"cannot set the output of state '{key}' to {_excerpt(value)}: {exc}",
                                 fix="give a value of the state's output type, as JSON") from None
            rows[latest] = replace(rows[latest], output=output)
        elif key in fields:
            input[key] = value
        else:
            states = sorted({row.from_state for row in rows})
            raise UsageError(f"cannot set '{key}': it is neither an input field ({', '.join(fields) or 'none'}) nor "
                             f"a state run before the fork point ({', '.join(states) or 'none'})",
                             fix="set one of those")
    return input, rows


def _excerpt(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def replay_start(compiled: Compiled, record: RunRecord, log: list[TransitionRecord]) -> tuple[Snapshot, int]:
    """(snapshot, seq) a replay of `record` starts from: a fork's after its inherited steps
    (they are its parent's; replaying the parent checks them), any other run's from nothing."""
    inherited = [row for row in log if row.source == "inherited"]
    if not inherited:
        return fresh(compiled.machine.initial), 0
    running = replace(record, status=RunStatus.RUNNING, in_flight=None)
    return snapshot(compiled, running, inherited), inherited[-1].seq


def first_request(row: TransitionRecord) -> dict[str, Any] | None:
    """The request a step's first model call sent (a re-ask or a fallback sends another)."""
    return next((a.request for a in row.attempts if a.request is not None), row.request)


class ParentAnswers:
    """The answers a fork's LLM states may take instead of calling: its parent's committed steps by
    position along the path, or, for a child run of the fork, those of the parent's child run
    of the same place (`suffix`: `.S.N.I`, as child run ids end). An inherited step is followed
    to the run that answered it; each log is loaded once, when a step first asks."""

    def __init__(self, store: Store, parent: str, *, suffix: str = "",
                 runs: dict[str, tuple[str | None, list[TransitionRecord] | None]] | None = None) -> None:
        self.store = store
        self.parent = parent
        self.suffix = suffix
        self._runs = {} if runs is None else runs  # run -> (its parent, its committed steps; None: no such run)

    @classmethod
    def of(cls, store: Store, record: RunRecord) -> ParentAnswers | None:
        """A fork's (None for any other run)."""
        return cls(store, record.forked_from) if record.forked_from and record.parent is None else None

    def child(self, suffix: str) -> ParentAnswers:
        """The answers of this run's child run `suffix`, at the same place in the parent's."""
        return ParentAnswers(self.store, self.parent, suffix=self.suffix + suffix, runs=self._runs)

    async def answer(self, position: int, state: str, body: dict[str, Any]) -> tuple[TransitionRecord, str] | None:
        """The parent's step at `position` (0: the first) if it ran `state` with this same request
        and kept its answer, with the note that says where it came from; else None."""
        run_id: str | None = self.parent
        while run_id is not None:
            above, rows = await self._load(run_id)
            if self.suffix:
                rows = (await self._load(run_id + self.suffix))[1]
                if rows is None:  # that run inherited the step that started this child: on to its parent
                    run_id = above
                    continue
            found = rows[position] if rows is not None and position < len(rows) else None
            if found is None or found.from_state != state:
                return None
            if found.source != "inherited":
                if found.response is None or first_request(found) != body:
                    return None
                return found, f"reused from run {found.run_id} seq {found.seq}"
            run_id = above
        return None

    async def _load(self, run_id: str) -> tuple[str | None, list[TransitionRecord] | None]:
        if run_id not in self._runs:
            try:
                record, log = await self.store.load_run(run_id, verified=True)
            except RunNotFoundError:  # deleted since, or never started there: nothing to reuse
                self._runs[run_id] = (None, None)
            else:
                self._runs[run_id] = (record.forked_from, [row for row in log if row.committed])
        return self._runs[run_id]
