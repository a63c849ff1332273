"""The `orch` command line: wiring only (parse, load, call the engine/store, print).

Exit codes: 0 completed or terminated by a guard (replay: matches); 1 the run failed,
recorded and resumable (replay: diverged); 2 usage, definition or input error, nothing
run or stored; 3 the run is busy in another process; 130 interrupted.
Errors are one line on stderr; `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .errors import DefinitionError, OrchError, UsageError
from .prices import PriceTable
from .render import (
    as_block,
    attempt_row,
    calls_of,
    indent,
    log_row,
    one_line,
    print_table,
    snapshot_view,
    totals,
    totals_line,
    usd,
)
from .sqlite_store import SQLiteStore
from .types import RunStatus, TransitionRecord

DEFAULT_DB = "orch.db"


class Interrupted(Exception):
    """Ctrl-C stopped a run; the message says what is stored and how to continue."""



# --------------------------------------------------------------------------- helpers


def open_store(args: argparse.Namespace, *, create: bool) -> SQLiteStore:
    path = args.db or os.environ.get("ORCH_DB") or DEFAULT_DB
    sync = (args.sync or os.environ.get("ORCH_SYNC") or "full").upper()
    if sync not in ("FULL", "NORMAL"):
        raise UsageError(f"--sync {sync.lower()!r} is not supported; use full or normal")
    busy = os.environ.get("ORCH_BUSY_TIMEOUT")
    try:
        busy_s = float(busy) if busy else 30.0
    except ValueError:
        raise UsageError(f"ORCH_BUSY_TIMEOUT={busy!r} is not a number of seconds") from None
    return SQLiteStore(path, synchronous=sync, create=create, busy_timeout_s=busy_s)  # type: ignore[arg-type]


def _read_prices(args: argparse.Namespace) -> PriceTable:
    path = args.prices or os.environ.get("ORCH_PRICES")
    if not path:
        return PriceTable()
    try:
        return PriceTable.load(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot use price file {path}: {exc}") from None


# --------------------------------------------------------------------------- commands


def cmd_log(args: argparse.Namespace) -> int:
    store = open_store(args, create=False)
    try:
        _, rows = store.load_run(args.run_id)
    finally:
        store.close()
    if args.attempts:
        return _print_attempts(rows, args)
    if args.json:
        for row in rows:
            print(json.dumps(log_row(row)))  # ASCII: no line separator can split a JSON line
        return 0
    print_table(
        [(r.seq, r.from_state, r.to_state or "-", r.decision or "-", r.attempt,
          f"{r.latency_ms:.1f}", r.usage.input_tokens, r.usage.output_tokens, usd(r.cost_usd),
          calls_of(r), r.source + ("!" if r.in_doubt else ""), one_line(r.error or r.reason))
         for r in rows],
        ["seq", "from_state", "to_state", "decision", "attempt", "latency_ms", "in", "out", "cost",
         "calls", "source", "reason / error"],
    )
    print(totals_line(rows))
    if any(r.in_doubt for r in rows):
        print("! in doubt: the step re-sent a call that was in flight when an earlier process died; "
              "that call may have been paid twice")
    return 0


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
    store = open_store(args, create=False)
    try:
        runs = store.list_runs(machine=args.machine, status=args.status, limit=args.limit)
        totals = store.machine_totals(sorted({r.machine for r in runs}))
    finally:
        store.close()
    if args.json:
        print(json.dumps([
            {"run_id": r.run_id, "machine": r.machine, "status": r.status, "started_at": r.created_at,
             "updated_at": r.updated_at, "steps": r.steps, "input_tokens": r.input_tokens,
             "output_tokens": r.output_tokens, "tokens": r.input_tokens + r.output_tokens,
             "cost_usd": r.cost_usd, "error": r.error, "stale": r.stale}
            for r in runs]))
        return 0
    print_table(
        [(r.run_id, r.machine, r.status + (" (owner gone: resume it)" if r.stale else ""),
          r.created_at[:19].replace("T", " "), r.steps, r.input_tokens + r.output_tokens,
          usd(r.cost_usd), one_line(r.error, 60)) for r in runs],
        ["run_id", "machine", "status", "started", "steps", "tokens", "cost", "error"],
    )
    for t in totals:
        print(f"machine {t.machine}: {t.runs} run(s), {t.steps} step(s), "
              f"{t.input_tokens + t.output_tokens} tokens, {usd(t.cost_usd)}, "
              f"{t.cache_hits} cache hit(s)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    store = open_store(args, create=False)
    try:
        record, rows = store.load_run(args.run_id)
    finally:
        store.close()
    outputs = {r.from_state: r.output for r in rows if r.to_state is not None}
    snapshot = snapshot_view(record, rows)
    if args.json:
        print(json.dumps({
            "run_id": record.run_id, "machine": record.machine, "machine_ref": record.machine_ref,
            "machine_hash": record.machine_hash, "created_at": record.created_at,
            "updated_at": record.updated_at, "options": record.options, "input": record.input,
            "outputs": outputs, "snapshot": snapshot, "totals": totals(rows)}, ensure_ascii=False))
        return 0
    print(f"run {record.run_id}  machine {record.machine}  status {record.status.value}")
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
    print(totals_line(rows))
    print("snapshot:")
    for key, value in snapshot.items():
        if key == "pending_answer" and value is not None:
            print("  pending_answer (paid; its guard failed, resume re-runs the guard on it):")
            print(indent(as_block(value), 4))
        elif key != "pending_answer":
            print(f"  {key}: {'-' if value is None else value}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Check the hash chain of one run's log, or of every run's."""
    store = open_store(args, create=False)
    try:
        run_ids = [args.run_id] if args.run_id else store.all_run_ids()
        if args.run_id:
            store.get_run(args.run_id)
        problems = {run_id: store.verify_chain(run_id) for run_id in run_ids}
    finally:
        store.close()
    for run_id, problem in problems.items():
        print(f"run {run_id}: {'ok' if problem is None else 'TAMPERED: ' + problem}")
    broken = sum(problem is not None for problem in problems.values())
    print(f"{len(problems)} run(s) checked, {broken} with a broken log")
    return 1 if broken else 0


# --------------------------------------------------------------------------- parser


def _driving(name: str) -> Callable[[argparse.Namespace], int]:
    """Commands that load machines and drive runs live in `cli_drive`, so that the reading
    commands (`runs`, `log`, `show`, `audit`) start without the engine, pydantic or structlog."""

    def call(args: argparse.Namespace) -> int:
        from . import cli_drive

        command: Callable[[argparse.Namespace], int] = getattr(cli_drive, name)
        return command(args)

    return call


def _budget_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-cost", type=float, metavar="USD",
                   help="stop (status budget_exceeded) before a call that could take the run past USD")
    p.add_argument("--max-tokens", type=int, metavar="N",
                   help="stop before a call that could take the run's paid tokens past N")
    p.add_argument("--max-seconds", type=float, metavar="S",
                   help="stop when the run has been active S seconds (wall clock, across resumes)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", default=argparse.SUPPRESS,
                        help=f"SQLite database file (env ORCH_DB; default {DEFAULT_DB})")
    common.add_argument("--sync", choices=["full", "normal"], default=argparse.SUPPRESS,
                        help="SQLite synchronous mode: full survives power loss (default), normal is faster")
    common.add_argument("--prices", metavar="FILE", default=argparse.SUPPRESS,
                        help="JSON price overrides, USD per million tokens (env ORCH_PRICES)")
    common.add_argument("--log-json", action="store_true", default=argparse.SUPPRESS,
                        help="trace events as JSON lines on stderr (env ORCH_LOG_JSON=1)")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no trace events")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks for errors")

    parser = argparse.ArgumentParser(
        prog="orch", parents=[common],
        description="Run LLM workflows as durable, auditable, replayable state machines.")
    parser.add_argument("--version", action="version", version=f"orch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, fn: Callable[[argparse.Namespace], int] | str, help: str) -> argparse.ArgumentParser:
        """`fn` by name: a command of `cli_drive`, imported only when that command runs."""
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(func=_driving(fn) if isinstance(fn, str) else fn)
        return p

    p = command("run", "cmd_run", "start a run of a machine and drive it to its end")
    p.add_argument("machine", metavar="MACHINE", help="path/to/file.py or dotted.module, optionally :attr")
    p.add_argument("--input", metavar="FILE", help="JSON object input file, or - for stdin")
    p.add_argument("--offline", nargs="?", const="auto", metavar="SCRIPT",
                   help="answer from a scripted fake Messages API (default script: MACHINE.offline.json)")
    _budget_options(p)
    p.add_argument("--run-id", metavar="ID",
                   help="use this run id (letters, digits, . _ -; at most 64) instead of a generated one")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")

    p = command("resume", "cmd_resume", "continue a failed, interrupted or crashed run")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--machine", metavar="MACHINE", help="load the machine from here instead of its stored path")
    p.add_argument("--allow-changed", action="store_true",
                   help="resume even if the changed machine no longer replays the recorded steps")
    _budget_options(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")

    p = command("replay", "cmd_replay", "re-drive recorded runs on their recorded answers (no API calls)")
    p.add_argument("run_id", metavar="RUN_ID", nargs="?")
    p.add_argument("--machine", metavar="MACHINE", help="replay against this machine instead of the stored one")
    p.add_argument("--all", metavar="MACHINE", help="replay every stored run of MACHINE and summarise")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = command("log", cmd_log, "print a run's transition log, with tokens and cost")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--attempts", action="store_true",
                   help="show every failed model call instead (kind, status, request id, delay slept)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    p = command("runs", cmd_runs, "list runs, newest first")
    p.add_argument("--machine", metavar="NAME", help="only runs of this machine name")
    p.add_argument("--status", choices=[s.value for s in RunStatus], help="only runs with this status")
    p.add_argument("--limit", type=int, default=50, help="at most this many runs (default 50)")
    p.add_argument("--json", action="store_true", help="print a JSON array")

    p = command("show", cmd_show, "print a run's input, outputs and snapshot")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("audit", cmd_audit, "verify the tamper-evident hash chain of transition logs")
    p.add_argument("action", choices=["verify"], help="verify: recompute every row's hash")
    p.add_argument("run_id", metavar="RUN_ID", nargs="?", help="one run (default: every run)")

    p = command("graph", "cmd_graph", "print a machine as a Mermaid state diagram")
    p.add_argument("machine", metavar="MACHINE")

    p = command("validate", "cmd_validate", "check a machine definition (exit 0 valid, 2 invalid)")
    p.add_argument("machine", metavar="MACHINE")

    command("demo", "cmd_demo", "run the report machine offline, then show its log and replay it")
    return parser


def _print_traceback() -> None:
    import traceback  # here: only --debug shows one

    traceback.print_exc()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("db", "sync", "prices", "log_json", "quiet", "debug"):
        if not hasattr(args, name):
            setattr(args, name, None)
    try:
        args.price_table = _read_prices(args)  # read once; a bad file is an error whatever the command
        return int(args.func(args))
    except OrchError as exc:
        if args.debug:
            _print_traceback()
        # one line per problem; values quoted in a message cannot add lines or escape codes
        lines = exc.problems if isinstance(exc, DefinitionError) else [str(exc)]
        for line in lines or [type(exc).__name__]:
            print(f"orch: error: {one_line(str(line), 10_000)}", file=sys.stderr)
        return exc.exit_code
    except Interrupted as exc:
        print(f"orch: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("orch: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `orch runs | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except Exception as exc:  # a bug: still one line unless --debug
        if args.debug:
            _print_traceback()
        print(f"orch: internal error: {type(exc).__name__}: {one_line(str(exc), 500)} (rerun with "
              "--debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
