"""The `orch` commands of a shared database: enqueue, worker, workers, db (migrate, copy).

Queued runs wait in the store (PostgreSQL) until an `orch worker` that has loaded their
machine claims them (`engine._worker`); `orch workers` lists the live ones. docs/scale-out.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from typing import TYPE_CHECKING, Any

from ..definition._loader import load_machine
from ..engine._engine import Engine
from ..engine._worker import Worker
from ..errors import DatabaseNotFoundError, InputError, OrchError, RunExistsError, SchemaVersionError, UsageError
from ..store._contract import Store
from ..store._queue import queue_of
from ._batch import rate_limits, read_inputs, stopping
from ._drive import _read_input, budget_of, engine_for, model_for
from ._options import cli_store, with_store
from ._render import one_line, print_table

if TYPE_CHECKING:
    from ..store._copy import CopyReport


def cmd_enqueue(args: argparse.Namespace) -> int:
    """Queue one run (--input) or one per line (--inputs), for workers to claim."""
    budget = budget_of(args)
    loaded = load_machine(args.machine)
    if args.inputs and args.input:
        raise UsageError("give --input or --inputs, not both")
    if args.inputs:
        inputs, bad = read_inputs(args.inputs, loaded.machine)
        if bad:
            first = min(bad)
            raise InputError(f"{len(bad)} bad line(s) in {args.inputs}, nothing was queued; line {first}: "
                             f"{bad[first]}", fix="fix them and enqueue again")
        ids = {n: f"{args.run_id}-{n}" if args.run_id else None for n in inputs}
    else:
        inputs, ids = {1: _read_input(args.input)}, {1: args.run_id}

    async def go(store: Store) -> list[dict[str, Any]]:
        engine = Engine(store, model=None)  # its enqueue refuses a store without a queue before storing
        queued = []
        for number, data in inputs.items():
            try:
                record = await engine.enqueue(loaded.machine, data, queue=args.queue, run_id=ids[number],
                                              machine_ref=loaded.ref, budget=budget)
            except RunExistsError as exc:  # enqueued before (the same --run-id): not twice
                queued.append({"run_id": exc.run_id, "queued": False})
                continue
            queued.append({"run_id": record.run_id, "queued": True})
        return queued

    queued = with_store(args, go, create=True)
    if args.json:
        print(json.dumps({"queue": args.queue, "runs": queued}))
    else:
        for entry in queued:
            print(entry["run_id"] if entry["queued"] else f"{entry['run_id']} (already queued, left as it is)")
        fresh = sum(entry["queued"] for entry in queued)
        print(f"{fresh} run(s) of {loaded.machine.name} queued on {args.queue!r}", file=sys.stderr)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Claim and drive queued runs of the given machines until SIGTERM or Ctrl-C."""
    if args.concurrency < 1:
        raise UsageError(f"--concurrency {args.concurrency} is not a number of runs", fix="give 1 or more")
    if not args.poll > 0:
        raise UsageError(f"--poll {args.poll} is not a number of seconds", fix="give a number above 0")
    machines = [load_machine(ref) for ref in args.machines]
    first = next((loaded.machine for loaded in machines if loaded.machine.calls_a_model), machines[0].machine)
    model, _, banner, _ = model_for(args.offline, first, per_run=True,
                                    rate_limits=rate_limits(args, online=not args.offline))

    def say(line: str) -> None:
        if not args.quiet:
            print(f"orch worker: {line}", file=sys.stderr, flush=True)

    async def go() -> int:
        store = cli_store(args, create=False)
        try:
            queue_of(store)  # refused before the worker says anything
            engine = engine_for(args, store, model, None)
            worker = Worker(engine, [loaded.machine for loaded in machines], queue=args.queue,
                            concurrency=args.concurrency, poll_s=args.poll, migrate=args.migrate,
                            on_event=lambda kind, run_id, detail: say(f"{kind} {run_id}: {one_line(detail, 300)}"))
            if banner:
                say(banner)
            say(f"serving queue {args.queue!r} on {store.where} with "
                + ", ".join(loaded.machine.name for loaded in machines) + f", {args.concurrency} at a time")
            with stopping(worker, args.stop_grace_s, bool(args.quiet)):
                stats = await worker.run(until_idle=args.until_idle)
        finally:
            await store.close()
        say(f"stopped: {stats.claimed} claimed ({stats.took_over} taken over), {stats.completed} completed, "
            f"{stats.failed} failed, {stats.handed_back} handed back, {stats.lost} lost, {stats.refused} refused, "
            f"{stats.waiting} waiting for review")
        return 0

    return asyncio.run(go())


def cmd_workers(args: argparse.Namespace) -> int:
    """The live workers (and other processes driving runs) of a shared database."""
    found = with_store(args, lambda store: queue_of(store).workers())
    if args.json:
        print(json.dumps([{"name": w.name, "host": w.host, "pid": w.pid, "queue": w.queue, "machines": w.machines,
                           "started_at": w.started_at, "heartbeat_age_s": round(w.heartbeat_age_s, 3),
                           "expires_in_s": round(w.expires_in_s, 3), "stopping": w.stopping, "runs": w.runs}
                          for w in found]))
        return 0
    print_table([(w.name + (" (stopping)" if w.stopping else ""), w.host, w.pid, w.queue or "-",
                  ", ".join(w.machines) or "-", f"{w.heartbeat_age_s:.1f}s", f"{w.expires_in_s:.1f}s",
                  len(w.runs), ", ".join(w.runs[:3]) + (" ..." if len(w.runs) > 3 else ""))
                 for w in found],
                ["worker", "host", "pid", "queue", "machines", "heartbeat", "expires in", "runs", "run ids"])
    print(f"{len(found)} live process(es)")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    if args.action == "copy":
        return _copy(args)
    if args.source is not None:
        raise UsageError(f"orch db {args.action} takes no SRC or DST", fix="it works on --db (or ORCH_DB)")
    if args.action == "migrate":
        return _migrate(args)
    raise UsageError(f"unknown action {args.action!r}")


def _migrate(args: argparse.Namespace) -> int:
    """Create or upgrade the schema of --db explicitly (PostgreSQL is never upgraded on its own,
    since workers of the older version may still be using it; a SQLite file is, when opened)."""
    store = cli_store(args, create=True, upgrade=True)
    asyncio.run(store.close())
    before, now = store.schema_versions
    if before == now:
        print(f"{store.where}: schema version {now}, already current")
    elif not before:
        print(f"{store.where}: schema created at version {now}")
    else:
        print(f"{store.where}: schema upgraded from version {before} to {now}")
    return 0


_SAID = {"copied": "copied", "skipped": "skipped (already in DST)", "differs": "skipped (already in DST)",
         "failed": "NOT COPIED", "tampered": "copied, TAMPERED", "unverified": "copied, UNVERIFIED"}


def _copy(args: argparse.Namespace) -> int:
    """Copy every run of SRC that DST lacks, value for value (`store._copy`); exit 1 when a run
    could not be copied or fails its audit chain in DST, else 2 when one could not be verified
    with the audit key set, else 0."""
    from ..store._copy import copy_runs

    if args.db is not None:
        raise UsageError("orch db copy names its databases as SRC and DST, not with --db",
                         fix="orch db copy SRC DST")
    if not args.source or not args.destination:
        raise UsageError("orch db copy needs SRC and DST", fix="orch db copy SRC DST (a SQLite file or a "
                                                                "postgresql:// URL each)")

    def said(run_id: str, outcome: str, why: str | None) -> None:
        if not args.json:
            print(f"run {run_id}: {_SAID[outcome]}" + (f": {one_line(why, 10_000)}" if why else ""), flush=True)

    async def go() -> CopyReport:
        async with contextlib.AsyncExitStack() as opened:
            source = _copy_side(args, args.source, "SRC")
            opened.push_async_callback(source.close)
            destination = _copy_side(args, args.destination, "DST")
            opened.push_async_callback(destination.close)
            return await copy_runs(source, destination, on_run=said)

    report = asyncio.run(go())
    if args.json:
        print(json.dumps({"source": report.source, "destination": report.destination, "copied": report.copied,
                          "skipped": report.skipped, "differing": report.differing, "failed": report.failed,
                          "tampered": report.tampered, "unverified": report.unverified}))
    else:
        print(f"{len(report.copied) + len(report.tampered) + len(report.unverified)} run(s) copied from "
              f"{report.source} to {report.destination}, {len(report.skipped)} skipped (already there)"
              + "".join(f", {len(runs)} {what}" for runs, what in (
                  (report.failed, "not copied"), (report.tampered, "failing their audit chain"),
                  (report.unverified, "not verified (audit key)"), (report.differing, "differing from SRC"))
                  if runs))
    return 1 if report.failed or report.tampered else 2 if report.unverified else 0


def _copy_side(args: argparse.Namespace, target: str, role: str) -> Store:
    """The store SRC or DST names (DST is created when missing); an error opening it says which it is."""
    try:
        return cli_store(args, create=role == "DST", target=target)
    except DatabaseNotFoundError as exc:
        raise UsageError(f"SRC: no database at {exc.where}",
                         fix="give an existing SQLite file or a postgresql:// URL as SRC") from None
    except SchemaVersionError as exc:
        if role == "SRC" and "has no statemachine_orch schema" in exc.what:  # an empty PostgreSQL database
            raise UsageError(f"SRC: {exc.what}, so no runs to copy", fix="check SRC") from None
        exc.what = f"{role}: {exc.what}"
        raise
    except OrchError as exc:
        exc.what = f"{role}: {exc.what}"
        raise
