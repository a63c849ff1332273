"""The `orch` command line: wiring only (parse, load, call the engine/store, print).

Exit codes: 0 completed or terminated by a guard (replay: matches); 1 the run failed,
recorded and resumable (replay: diverged); 2 usage, definition or input error, nothing
run or stored; 3 the run is busy in another process; 130 interrupted.
Errors are one line on stderr; `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .definition import LLMState, Machine
from .engine import Engine, Run, new_run_id
from .errors import DefinitionError, InputError, OrchError, UsageError
from .inputs import validate_input
from .llm import AnthropicModel
from .loader import load_machine
from .prices import PriceTable
from .render import (
    as_block,
    attempt_row,
    calls_of,
    indent,
    log_row,
    mermaid,
    one_line,
    print_table,
    snapshot_view,
    totals,
    totals_line,
    usd,
)
from .replay import ReplayReport, replay_run
from .snapshot import RunResult
from .sqlite_store import SQLiteStore
from .trace import Tracer, stream_logger
from .types import Budget, ModelClient, RunStatus, TransitionRecord

DEFAULT_DB = "orch.db"


class Interrupted(Exception):
    """Ctrl-C stopped a run; the message says what is stored and how to continue."""

OFFLINE_BANNER = ("OFFLINE: answers come from {source} through the anthropic SDK and a local fake "
                  "Messages API; no API call is made")
MAX_INPUT_BYTES = 64 * 1024 * 1024
DEFAULT_STOP_GRACE_S = 30.0  # SIGTERM: how long a step in progress may take to finish
EXIT_STOPPED = 143  # 128 + SIGTERM: stopped on request, the run saved and resumable


# --------------------------------------------------------------------------- helpers


def _open_store(args: argparse.Namespace, *, create: bool) -> SQLiteStore:
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


def _tracer(args: argparse.Namespace) -> Tracer:
    if args.quiet:
        return Tracer.null()
    as_json = bool(args.log_json) or os.environ.get("ORCH_LOG_JSON", "") not in ("", "0")
    return Tracer(stream_logger(sys.stderr, json=as_json))


def _read_input(source: str | None) -> Any:
    if source is None:
        return {}
    try:
        raw = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1) if source == "-" else _read_file(source)
    except OSError as exc:
        raise InputError(f"cannot read input {source}: {exc.strerror or exc}") from None
    where = "stdin" if source == "-" else source
    if len(raw) > MAX_INPUT_BYTES:
        raise InputError(f"input {where} is larger than {MAX_INPUT_BYTES // 2**20} MB; pass less data")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"input {where} is not UTF-8 (byte {exc.start}); re-encode it as UTF-8") from None
    try:
        data = json.loads(text, parse_constant=_not_json)
    except json.JSONDecodeError as exc:
        raise InputError(f"input {where} is not valid JSON: {exc.msg} at line {exc.lineno} "
                         f"column {exc.colno}") from None
    except RecursionError:
        raise InputError(f"input {where} is nested too deeply; flatten it") from None
    except ValueError as exc:  # NaN/Infinity, integers too long to convert
        raise InputError(f"input {where} is not valid JSON: {one_line(str(exc), 120)}") from None
    if not isinstance(data, dict):
        raise InputError(f"input {where} must be a JSON object, got {type(data).__name__}; "
                         'wrap it, e.g. {"data": ...}')
    return data


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON number")


def _read_file(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(MAX_INPUT_BYTES + 1)


def _model_for(offline: str | None, machine: Machine) -> tuple[ModelClient, dict[str, Any], str | None]:
    """The model client for a run, the run options that let a resume pick the same one, and
    the banner that labels an offline run.

    Offline, a real SDK client talks to the fake Messages API in process; its answers come
    from SCRIPT, else MACHINE.offline.json beside the module, else labelled placeholders.
    """
    if not offline:
        if any(isinstance(s, LLMState) for s in machine.states):
            AnthropicModel.check_credentials()
        return AnthropicModel(), {}, None
    from .testing import FakeMessagesAPI, load_script

    script_path = offline
    if offline == "auto":
        beside = Path(machine.source_file or "machine").with_suffix(".offline.json")
        script_path = str(beside) if beside.is_file() else "auto"
    if script_path == "auto":
        fake = FakeMessagesAPI(default="auto")
    else:
        try:
            fake = FakeMessagesAPI(load_script(script_path), default="auto")
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot use offline script {script_path}: {exc}") from None
        script_path = str(Path(script_path).resolve())
    banner = OFFLINE_BANNER.format(source=script_path if script_path != "auto" else "placeholders")
    return fake.model(), {"offline": script_path}, banner


def _drive(store: SQLiteStore, run_id: str, banner: str | None,
           open_run: Callable[[], Awaitable[Run]]) -> RunResult:
    """Open the run, label it if offline, drive it to its end; on Ctrl-C report what is stored."""

    async def go() -> RunResult:
        run = await open_run()
        if banner:
            print(banner, file=sys.stderr)
        grace = float(os.environ.get("ORCH_STOP_GRACE") or DEFAULT_STOP_GRACE_S)
        # a plain handler, not loop.add_signal_handler: it must act even while a synchronous
        # step holds the loop, so that step is the last
        signal.signal(signal.SIGTERM, lambda *_: run.request_stop(grace))
        return await run.run_to_end()

    try:
        return asyncio.run(go())
    except KeyboardInterrupt:
        try:
            record, log = store.load_run(run_id)
        except OrchError:
            raise Interrupted("interrupted before the run was stored; nothing to resume") from None
        if record.status.finished:
            return RunResult.from_log(record, log)
        raise Interrupted(f"interrupted; run {run_id} is saved: resume it with "
                          f"`orch resume {run_id}`") from None


def _report_result(result: RunResult, args: argparse.Namespace) -> int:
    """Print the result; exit code 0 finished, 1 failed or over budget, 143 stopped by SIGTERM."""
    if args.json:
        print(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        path = " -> ".join(result.path) or "(no steps)"
        paid = (f"{result.usage.input_tokens} in / {result.usage.output_tokens} out tokens, "
                f"{usd(result.cost_usd)}")
        print(f"run {result.run_id} {result.status.value} after {result.steps} step(s): {path} "
              f"({paid})")
        if not result.status.finished:
            print(f"error: {result.error}")
            print(f"resume with: orch resume {result.run_id}"
                  + (" and a raised --max-cost, --max-tokens or --max-seconds"
                     if result.status is RunStatus.BUDGET_EXCEEDED else ""))
    if result.status is RunStatus.INTERRUPTED:
        return EXIT_STOPPED
    return 0 if result.status.finished else 1


def _budget(args: argparse.Namespace) -> Budget | None:
    budget = Budget(max_cost_usd=args.max_cost, max_tokens=args.max_tokens, max_seconds=args.max_seconds)
    return budget if budget.to_json() else None


def _prices(args: argparse.Namespace) -> PriceTable:
    path = args.prices or os.environ.get("ORCH_PRICES")
    if not path:
        return PriceTable()
    try:
        return PriceTable.load(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot use price file {path}: {exc}") from None


# --------------------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    loaded = load_machine(args.machine)
    data = _read_input(args.input)
    validate_input(loaded.machine, data)  # bad input: refused before a database is even created
    model, options, banner = _model_for(args.offline, loaded.machine)
    store = _open_store(args, create=True)
    engine = Engine(store, model=model, tracer=_tracer(args), prices=_prices(args))
    run_id = args.run_id or new_run_id()
    try:
        result = _drive(store, run_id, banner, lambda: engine.start(
            loaded.machine, data, run_id=run_id, machine_ref=loaded.ref, options=options,
            budget=_budget(args)))
    finally:
        store.close()
    return _report_result(result, args)


def cmd_resume(args: argparse.Namespace) -> int:
    store = _open_store(args, create=False)
    try:
        record = store.get_run(args.run_id)
        loaded = load_machine(args.machine or record.machine_ref)
        model, _, banner = _model_for(record.options.get("offline"), loaded.machine)
        engine = Engine(store, model=model, tracer=_tracer(args), prices=_prices(args))
        result = _drive(store, args.run_id, banner, lambda: engine.attach(
            args.run_id, loaded.machine, budget=_budget(args), allow_changed=args.allow_changed))
    finally:
        store.close()
    return _report_result(result, args)


def cmd_replay(args: argparse.Namespace) -> int:
    store = _open_store(args, create=False)
    try:
        if args.all:
            loaded = load_machine(args.all)
            run_ids = store.run_ids(loaded.machine.name)
            reports = [asyncio.run(replay_run(store, rid, loaded.machine, prices=_prices(args)))
                       for rid in run_ids]
            return _print_replay_summary(reports, loaded.machine.name, args)
        if not args.run_id:
            raise UsageError("give a RUN_ID, or --all MACHINE to replay every run of a machine")
        record = store.get_run(args.run_id)
        loaded = load_machine(args.machine or record.machine_ref)
        report = asyncio.run(replay_run(store, args.run_id, loaded.machine, prices=_prices(args)))
    finally:
        store.close()
    if args.json:
        print(json.dumps(report.to_json()))
    elif report.matches:
        print(f"replay {report.run_id}: matches the recording ({report.compared} transition(s), "
              f"no API calls)")
    else:
        assert report.divergence is not None
        print(f"replay {report.run_id}: DIVERGED at {report.divergence.describe()}")
    return 0 if report.matches else 1


def _print_replay_summary(reports: list[ReplayReport], machine: str, args: argparse.Namespace) -> int:
    diverged = [r for r in reports if not r.matches]
    if args.json:
        print(json.dumps({"machine": machine, "runs": len(reports), "matching": len(reports) - len(diverged),
                          "diverged": len(diverged), "reports": [r.to_json() for r in reports]}))
    else:
        print_table(
            [(r.run_id, r.status, "match" if r.matches else "DIVERGED",
              f"{r.compared}/{r.recorded}", r.divergence.describe() if r.divergence else "")
             for r in reports],
            ["run_id", "status", "result", "compared", "first divergence"],
        )
        print(f"{len(reports)} run(s) of {machine}: {len(reports) - len(diverged)} matching, "
              f"{len(diverged)} diverged")
    return 1 if diverged else 0


def cmd_log(args: argparse.Namespace) -> int:
    store = _open_store(args, create=False)
    try:
        store.get_run(args.run_id)
        rows = store.transitions(args.run_id)
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
    store = _open_store(args, create=False)
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
    store = _open_store(args, create=False)
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
    store = _open_store(args, create=False)
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


def cmd_graph(args: argparse.Namespace) -> int:
    print(mermaid(load_machine(args.machine).machine))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    machine = load_machine(args.machine).machine
    edges = sum(len(machine.edges(s.name)) for s in machine.states)
    print(f"ok: machine '{machine.name}' ({len(machine.states)} states, {edges} transitions)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    machine_file, input_file = "machines/report.py", "machines/report_input.json"
    if not Path(machine_file).is_file():
        raise UsageError("orch demo runs machines/report.py; run it from the statemachine_orch checkout")
    run_id = "demo-" + new_run_id()
    base = [flag for flag, on in (("--log-json", args.log_json), ("--quiet", args.quiet),
                                  ("--debug", args.debug)) if on]
    base += [part for option, value in (("--db", args.db), ("--sync", args.sync),
                                        ("--prices", args.prices)) if value
             for part in (option, value)]
    for step in (["run", machine_file, "--input", input_file, "--offline", "--run-id", run_id],
                 ["log", run_id],
                 ["replay", run_id]):
        print(f"\n$ orch {' '.join(base + step)}", flush=True)
        code = main(base + step)
        sys.stdout.flush()
        if code:
            return code
    print(f"\nDone. Next: orch show {run_id}   orch runs   orch graph {machine_file}")
    return 0


# --------------------------------------------------------------------------- parser


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

    def command(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(func=fn)
        return p

    p = command("run", cmd_run, "start a run of a machine and drive it to its end")
    p.add_argument("machine", metavar="MACHINE", help="path/to/file.py or dotted.module, optionally :attr")
    p.add_argument("--input", metavar="FILE", help="JSON object input file, or - for stdin")
    p.add_argument("--offline", nargs="?", const="auto", metavar="SCRIPT",
                   help="answer from a scripted fake Messages API (default script: MACHINE.offline.json)")
    _budget_options(p)
    p.add_argument("--run-id", metavar="ID",
                   help="use this run id (letters, digits, . _ -; at most 64) instead of a generated one")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")

    p = command("resume", cmd_resume, "continue a failed, interrupted or crashed run")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--machine", metavar="MACHINE", help="load the machine from here instead of its stored path")
    p.add_argument("--allow-changed", action="store_true",
                   help="resume even if the changed machine no longer replays the recorded steps")
    _budget_options(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")

    p = command("replay", cmd_replay, "re-drive recorded runs on their recorded answers (no API calls)")
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

    p = command("graph", cmd_graph, "print a machine as a Mermaid state diagram")
    p.add_argument("machine", metavar="MACHINE")

    p = command("validate", cmd_validate, "check a machine definition (exit 0 valid, 2 invalid)")
    p.add_argument("machine", metavar="MACHINE")

    command("demo", cmd_demo, "run the report machine offline, then show its log and replay it")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("db", "sync", "prices", "log_json", "quiet", "debug"):
        if not hasattr(args, name):
            setattr(args, name, None)
    try:
        _prices(args)  # a bad price file is an error whatever the command
        return int(args.func(args))
    except OrchError as exc:
        if args.debug:
            traceback.print_exc()
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
            traceback.print_exc()
        print(f"orch: internal error: {type(exc).__name__}: {one_line(str(exc), 500)} (rerun with "
              "--debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
