"""The `orch` commands that only read the store: log, runs, show, audit, diff.

They load neither machines nor the engine, so they start fast (`show` loads a run's machine
only when the machine declares its result by a function: nothing else can compute it).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import asdict
from typing import Any

from ..errors import AuditKeyError, OrchError
from ..store._contract import MachineTotals, RunSummary, Store
from ..types import RunRecord, RunResult, RunStatus, TransitionRecord, child_place
from ._diff import compare, markdown_report, text_report
from ._lineage import cmd_tree
from ._options import with_store
from ._render import (
    aligned,
    as_block,
    attempt_row,
    calls_of,
    child_row,
    cost_text,
    indent,
    log_row,
    one_line,
    placed,
    print_table,
    snapshot_view,
    status_text,
    totals,
    totals_line,
    usd,
)


def cmd_log(args: argparse.Namespace) -> int:
    _, rows, children = with_store(args, lambda store: _with_children(store, args.run_id))
    if args.attempts:
        return _print_attempts(rows, args)
    started = _started(rows, children)
    if args.json:
        for row in rows:
            view = log_row(row)
            if row.seq in started:
                view["children"] = [child_row(c) for c in started[row.seq]]
            print(json.dumps(view))  # ASCII: no line separator can split a JSON line
        return 0
    header, *lines = aligned(
        [["seq", "from_state", "to_state", "decision", "attempt", "latency_ms", "in", "out", "cost",
          "calls", "source", "reason / error"]]
        + [(r.seq, r.from_state, r.to_state or "-", r.decision or "-", r.attempt,
            f"{r.latency_ms:.1f}", r.usage.input_tokens, r.usage.output_tokens, usd(r.cost_usd),
            calls_of(r), r.source + ("!" if r.in_doubt else ""), one_line(r.error or r.reason))
           for r in rows])
    print(header)
    under = " " * header.index("from_state")
    for row, line in zip(rows, lines, strict=True):
        print(line)
        for item in _item_lines(started.get(row.seq, [])):
            print(under + item)
    print(totals_line(rows))
    if any(r.in_doubt for r in rows):
        print("! in doubt: the step re-sent a call that was in flight when an earlier process died; "
              "that call may have been paid twice")
    return 0


async def _with_children(store: Store, run_id: str, *, verified: bool = False
                         ) -> tuple[RunRecord, list[TransitionRecord], list[RunSummary]]:
    record, rows = await store.load_run(run_id, verified=verified)
    return record, rows, await store.list_runs(parent=run_id)


def _started(rows: list[TransitionRecord], children: list[RunSummary]) -> dict[int, list[RunSummary]]:
    """seq -> the child runs its step started: those of its state and of the output it was to
    commit (the N of their ids). A failed step and the one that retried it share them."""
    started: dict[int, list[RunSummary]] = {}
    committed: Counter[str] = Counter()
    for row in rows:
        if row.source == "child":
            slot = committed[row.from_state] + 1
            started[row.seq] = [c for c in children
                                if placed(c).state == row.from_state and child_place(c.run_id)[1] == slot]
        committed[row.from_state] += row.committed
    return started


def _item_lines(children: list[RunSummary]) -> list[str]:
    """A log row's child runs, one line each: item, run id, status, cost and error."""
    return aligned([(f"item {placed(c).item}", c.run_id, status_text(c.status, c.stale),
                     cost_text(c.cost_usd, c.in_doubt_calls, c.in_doubt_usd), one_line(c.error, 60))
                    for c in children])


def _print_attempts(rows: list[TransitionRecord], args: argparse.Namespace) -> int:
    """Every model call that did not answer its step (the failure log), oldest first."""
    attempts = [(row, a) for row in rows for a in row.attempts]
    if args.json:
        for row, a in attempts:
            print(json.dumps(attempt_row(row, a)))
        return 0
    print_table(
        [(row.seq, row.from_state, a.number, a.kind, a.status_code or "-", a.request_id or "-",
          "-" if a.delay_s is None else f"{a.delay_s:.2f}", one_line(a.error, 70))
         for row, a in attempts],
        ["seq", "state", "attempt", "kind", "status", "request_id", "slept_s", "error"],
    )
    print(f"{len(attempts)} failed attempt(s) in {len(rows)} step(s)")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    if args.tree:
        return cmd_tree(args)

    async def read(store: Store) -> tuple[list[RunSummary], list[MachineTotals]]:
        status = RunStatus(args.status) if args.status else None
        runs = await store.list_runs(machine=args.machine, status=status, limit=args.limit, before=args.before,
                                     batch=args.batch)
        return runs, await store.machine_totals(sorted({r.machine for r in runs}))

    runs, totals = with_store(args, read)
    if args.json:
        print(json.dumps([
            {"run_id": r.run_id, "machine": r.machine, "status": r.status.value, "started_at": r.created_at,
             "updated_at": r.updated_at, "steps": r.steps, "input_tokens": r.input_tokens,
             "output_tokens": r.output_tokens, "tokens": r.input_tokens + r.output_tokens,
             "cost_usd": r.cost_usd, "in_doubt_calls": r.in_doubt_calls, "in_doubt_usd": r.in_doubt_usd,
             "error": r.error, "stale": r.stale}
            for r in runs]))
        return 0
    print_table(
        [(r.run_id, r.machine, status_text(r.status, r.stale),
          r.created_at[:19].replace("T", " "), r.steps, r.input_tokens + r.output_tokens,
          cost_text(r.cost_usd, r.in_doubt_calls, r.in_doubt_usd, of_it=""), one_line(r.error, 60))
         for r in runs],
        ["run_id", "machine", "status", "started", "steps", "tokens", "cost", "error"],
    )
    for t in totals:
        print(f"machine {t.machine}: {t.runs} run(s), {t.steps} step(s), "
              f"{t.input_tokens + t.output_tokens} tokens, {cost_text(t.cost_usd, t.in_doubt_calls, t.in_doubt_usd)}, "
              f"{t.cache_hits} cache hit(s)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    record, rows, children = with_store(args, lambda store: _with_children(store, args.run_id, verified=True))
    outputs = {r.from_state: r.output for r in rows if r.committed}
    snapshot = snapshot_view(record, rows)
    result = _result(record, rows)
    if args.json:
        print(json.dumps({
            "run_id": record.run_id, "machine": record.machine, "machine_ref": record.machine_ref,
            "machine_hash": record.machine_hash, "created_at": record.created_at,
            "updated_at": record.updated_at, "options": record.options, "input": record.input,
            "outputs": outputs, "result": result, "snapshot": snapshot, "totals": totals(rows),
            "takeovers": [asdict(t) for t in record.takeovers],
            "parent": asdict(record.parent) if record.parent else None, "forked_from": record.forked_from,
            "children": [child_row(c) for c in children],
            "review": record.review if record.status is RunStatus.WAITING else None}, ensure_ascii=False))
        return 0
    print(f"run {record.run_id}  machine {record.machine}  status {status_text(record.status, record.stale)}")
    if record.parent is not None:
        p = record.parent
        print(f"  child of run {p.run_id} (state {p.state}, item {p.item})")
    if record.forked_from is not None:
        fork = record.options.get("fork") or {}
        print(f"  forked from run {record.forked_from} at seq {fork.get('at')} ({fork.get('state')})"
              + (f", label {one_line(fork['label'], 60)}" if fork.get("label") else "")
              + (f"; overrides {json.dumps(record.options['overrides'])}" if record.options.get("overrides") else "")
              + (f"; set {json.dumps(fork['set'])}" if fork.get("set") else ""))
    print(f"  created {record.created_at}  updated {record.updated_at}")
    print(f"  machine {record.machine_ref}  (source sha256 {record.machine_hash[:12]})")
    if record.options.get("offline"):
        print(f"  offline answers: {record.options['offline']}")
    print("input:")
    print(indent(as_block(record.input)))
    print("outputs:")
    for state, output in outputs.items():
        print(f"  {state}:")
        print(indent(as_block(output), 4))
    print("result:")
    print(indent(as_block(result)))
    print(totals_line(rows))
    print("snapshot:")
    for key, value in snapshot.items():
        if key == "pending_answer" and value is not None:
            print("  pending_answer (paid; its guard failed, resume re-runs the guard on it):")
            print(indent(as_block(value), 4))
        elif key != "pending_answer":
            print(f"  {key}: {'-' if value is None else value}")
    if children:
        print("child runs:")
        print(indent("\n".join(aligned(
            [["run_id", "state", "item", "status", "steps", "tokens", "cost", "error"]]
            + [(c.run_id, placed(c).state, placed(c).item,
                status_text(c.status, c.stale), c.steps, c.input_tokens + c.output_tokens,
                cost_text(c.cost_usd, c.in_doubt_calls, c.in_doubt_usd, of_it=""), one_line(c.error, 60))
               for c in children]))))
    for t in record.takeovers:
        print(f"taken over at {t.at} by {t.by} from {t.previous} ({t.why})")
    if record.status is RunStatus.WAITING and record.review:
        _print_review(record.run_id, record.review)
    return 0


def _print_review(run_id: str, review: dict[str, Any]) -> None:
    """What a waiting run's reviewer is asked: shown, allowed, the data model, the deadline."""
    deadline = review.get("deadline")
    print(f"waiting for a review at {review['state']} (step {review['seq']}) since {review['asked_at']}"
          + (f", deadline {deadline} (then {review.get('on_timeout')})" if deadline else ", no deadline"))
    print(indent(as_block(review.get("payload"))))
    if review.get("data_schema"):
        print("  data (--data) must fit:")
        print(indent(as_block(review["data_schema"]), 4))
    print(f"decide with: orch review {run_id} --decision {'|'.join(review['decisions'])}")


def _result(record: RunRecord, rows: list[TransitionRecord]) -> Any:
    """What the run answers (`RunResult.output`), by the declaration stored when it started. A
    function of the machine's is computed by loading the machine; if that fails, None, said."""
    declared = record.options.get("result")
    try:
        if isinstance(declared, dict):
            from ..definition._loader import load_machine

            declared = load_machine(record.machine_ref).machine.result
        return RunResult.from_log(record, rows, result=declared).output
    except OrchError as exc:
        print(f"orch: warning: result not computed: {one_line(str(exc), 300)}", file=sys.stderr)
        return None


def cmd_audit(args: argparse.Namespace) -> int:
    """Check the hash chain of one run, or of every run: exit 1 when one is broken, else 2
    when one could not be checked with the audit key set (none, or another)."""
    async def check(store: Store) -> dict[str, str | AuditKeyError | None]:
        if args.run_id:
            await store.get_run(args.run_id)
        run_ids = [args.run_id] if args.run_id else await store.run_ids()
        verdicts: dict[str, str | AuditKeyError | None] = {}
        for run_id in run_ids:
            try:
                verdicts[run_id] = await store.verify_chain(run_id)
            except AuditKeyError as exc:
                verdicts[run_id] = exc
        return verdicts

    verdicts = with_store(args, check)
    for run_id, verdict in verdicts.items():
        if isinstance(verdict, AuditKeyError):
            print(f"run {run_id}: UNVERIFIED: {one_line(str(verdict), 10_000)}")
        else:
            print(f"run {run_id}: {'ok' if verdict is None else 'TAMPERED: ' + verdict}")
    broken = sum(isinstance(v, str) for v in verdicts.values())
    unverified = sum(isinstance(v, AuditKeyError) for v in verdicts.values())
    print(f"{len(verdicts)} run(s) checked, {broken} with a broken log"
          + (f", {unverified} not verified" if unverified else ""))
    return 1 if broken else 2 if unverified else 0


def cmd_diff(args: argparse.Namespace) -> int:
    """Two runs' paths side by side: exit 0 when their paths, decisions and outputs are the
    same, 1 when they differ (a missing run: 2, as everywhere)."""
    async def read(store: Store) -> tuple[list[TransitionRecord], list[TransitionRecord]]:
        _, rows_a = await store.load_run(args.run_a)
        _, rows_b = await store.load_run(args.run_b)
        return rows_a, rows_b

    rows_a, rows_b = with_store(args, read)
    report = compare(rows_a, rows_b)
    if args.json:
        print(json.dumps({"run_a": args.run_a, "run_b": args.run_b, **report}))  # ASCII: no raw control text
    elif args.md:
        print(markdown_report(report, args.run_a, args.run_b), end="")
    else:
        print(text_report(report, args.run_a, args.run_b))
    return 0 if report["same"] else 1
