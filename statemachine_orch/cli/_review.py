"""`orch pending` and `orch review`: the runs waiting at a review state, and their decisions."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from typing import Any

from ..definition._loader import load_machine
from ..engine._engine import Engine
from ..engine._review import Decided, PendingReview
from ..errors import UsageError
from ..store._contract import Store
from ..types import RunStatus, now_iso
from ._drive import _report_result, engine_for, result_code, resumed
from ._faults import KillPoints
from ._options import at_file, cli_store, with_store
from ._render import one_line, print_table

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def seconds_of(text: str, flag: str) -> float:
    """A duration as `90s`, `30m`, `2h` or `1d` (a bare number is seconds)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if found is None:
        raise UsageError(f"{flag} {text!r} is not a duration", fix="write it as 90s, 30m, 2h or 1d")
    return float(found.group(1)) * _UNITS[found.group(2) or "s"]


def cmd_pending(args: argparse.Namespace) -> int:
    expiring = seconds_of(args.expiring, "--expiring") if args.expiring else None

    async def read(store: Store) -> list[PendingReview]:
        return await Engine(store).apending(machine=args.machine, expiring=expiring)

    pending = with_store(args, read)
    if args.json:
        print(json.dumps([p.to_json() for p in pending], ensure_ascii=False))
        return 0
    if not pending:
        print("no run is waiting for a review")
        return 0
    now = now_iso()
    print_table([(p.run_id, p.machine, p.state, p.asked_at[:19], _deadline(p, now), "|".join(p.decisions),
                  one_line(json.dumps(p.payload, ensure_ascii=False), 60)) for p in pending],
                ["run_id", "machine", "state", "waiting since", "deadline", "decisions", "shown"])
    print(f"{len(pending)} waiting; decide with: orch review RUN_ID --decision "
          f"{'|'.join(pending[0].decisions)} (orch show RUN_ID shows all it waits on)")
    return 0


def _deadline(p: PendingReview, now: str) -> str:
    if p.deadline is None:
        return "none"
    return f"{p.deadline[:19]} ({'EXPIRED: ' if p.deadline <= now else ''}then {p.on_timeout})"


def _data(given: str | None) -> Any:
    """--data as JSON, given inline or as @file."""
    if given is None:
        return None
    text, where = given, "--data"
    if given.startswith("@"):
        where = given[1:]
        text = at_file(where, "--data")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except ValueError as exc:
        raise UsageError(f"{where} is not JSON: {exc}", fix="give --data '{\"key\": \"value\"}' or --data @file.json"
                         ) from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def cmd_review(args: argparse.Namespace) -> int:
    data = _data(args.data)
    record = with_store(args, lambda store: store.get_run(args.run_id))
    loaded = load_machine(args.machine or record.machine_ref)

    kill = KillPoints.from_env()

    async def decide() -> Decided:
        store = cli_store(args, create=False, tracer=kill.trace_sql if kill is not None else None)
        try:
            return await engine_for(args, store, None, kill).areview(
                args.run_id, loaded.machine, decision=args.decision, data=data, note=args.note, by=args.as_actor,
                allow_changed=args.allow_changed, take_over=args.take_over)
        finally:
            await store.close()

    decided = asyncio.run(decide())
    if not args.json:
        row, review = decided.row, decided.review
        print(f"run {decided.run_id}: {review.decision} by {review.by} at {review.at} -> "
              + (f"{row.decision} -> {row.to_state}" if row.committed else f"not taken: {row.error}")
              + f" (status {decided.status.value})")
        if decided.status is RunStatus.PENDING and not args.resume:
            print(f"go on with: orch resume {decided.run_id}  (or a worker of its queue claims it)")
    if args.resume and decided.status is RunStatus.PENDING:
        result = resumed(args)
        if not args.json:
            return _report_result(result, args)
        decided.result, decided.status = result, result.status
    if args.json:  # the decision, with where --resume took the run: one object
        print(json.dumps(decided.to_json(), ensure_ascii=False))
    if decided.result is not None:
        return result_code(decided.result)
    return 0 if decided.row.committed else 1
