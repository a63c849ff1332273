"""`orch batch`: one machine over every input of a JSON-lines file, in one process and one
event loop, `--concurrency` runs at a time (`Engine.batch`); `orch batch status ID`.

Input N (its line number) is run `BATCH-N`, so the same command with the same `--batch-id`
resumes the batch. Bad lines are reported by number and the others run (`--strict`: nothing
runs). Ctrl-C or SIGTERM stops starting runs and lets the steps in flight commit; a second
Ctrl-C abandons them (each is left resumable).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from ..definition._loader import load_machine
from ..definition._machine import Machine
from ..engine._batch import BatchProgress, BatchResult, batch_run_id
from ..engine._engine import Engine
from ..engine._ids import check_run_id, new_run_id
from ..engine._inputs import validate_input
from ..errors import InputError, UsageError
from ..hooks import Hook
from ..llm._limiter import RateLimits
from ..store._contract import RunSummary, Store
from ..trace._tracer import Tracer, stream_logger
from ..types import RunRecord, RunStatus, TransitionRecord
from ._drive import EXIT_STOPPED, budget_of, model_for, not_json, run_family
from ._faults import KillPoints
from ._options import Interrupted, cli_store, with_store
from ._progress import Progress
from ._render import one_line, print_table, usd

MAX_SHOWN = 20  # bad lines and failures listed one by one; the rest are counted
MAX_PATHS = 5  # the most common paths the finished runs took, in the summary


def read_inputs(path: str, machine: Machine) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
    """(input by line number, problem by line number) of a JSON-lines file: each non-blank line
    one JSON object that the machine's input model accepts."""
    try:
        handle = sys.stdin if path == "-" else open(path, encoding="utf-8-sig")  # a BOM is not part of line 1
    except OSError as exc:
        raise InputError(f"cannot read inputs {path}: {exc.strerror or exc}") from None
    inputs: dict[int, dict[str, Any]] = {}
    problems: dict[int, str] = {}
    with handle:
        try:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    data = json.loads(line.strip(), parse_constant=not_json)
                    if not isinstance(data, dict):
                        raise ValueError(f"a line is one JSON object, not {type(data).__name__}")
                    validate_input(machine, data)
                except (ValueError, RecursionError, InputError) as exc:
                    problems[number] = one_line(str(exc), 200)
                else:
                    inputs[number] = data
        except UnicodeDecodeError as exc:
            raise InputError(f"inputs {path} are not UTF-8 (byte {exc.start}); re-encode them as UTF-8") from None
    return inputs, problems


def check_batch_args(args: argparse.Namespace, command: str, extra: str | None, usage: str) -> None:
    """The checks `orch batch` and `orch ab` share, made before a machine is loaded. `extra`: a
    second positional argument, which only their `status`/`report` subcommand takes."""
    if extra is not None:
        raise UsageError(f"unexpected argument {extra!r}", fix=usage)
    if not args.inputs:
        raise UsageError(f"orch {command} needs --inputs FILE.jsonl (one JSON object per line)")
    if args.concurrency < 1:
        raise UsageError(f"--concurrency {args.concurrency} is not a number of runs", fix="give 1 or more")


def cmd_batch(args: argparse.Namespace) -> int:
    if args.machine == "status":
        return cmd_batch_status(args)
    check_batch_args(args, "batch", args.batch_id_or_nothing,
                     "orch batch MACHINE --inputs FILE [--batch-id ID], or orch batch status ID")
    budget = budget_of(args)
    loaded = load_machine(args.machine)
    inputs, bad = checked_inputs(args, loaded.machine)
    batch_id = args.batch_id or new_run_id()
    try:
        check_run_id(batch_run_id(batch_id, max(inputs)))
    except UsageError:
        raise UsageError(f"--batch-id {batch_id!r} is not valid", fix="use letters, digits, '.', '_' or '-', short "
                         "enough that ID-LINE is at most 64 characters") from None
    result = drive(args, loaded.machine, ("batch", batch_id), {batch_id: inputs}, rerun=_rerun_command(args, batch_id),
                   job=lambda engine, options, on_progress: engine.batch(
                       loaded.machine, inputs, batch_id=batch_id, concurrency=args.concurrency,
                       machine_ref=loaded.ref, options=options, budget=budget, on_progress=on_progress))
    for number in bad:
        result.errors[number] = f"bad line: {bad[number]}"
    code = _report(result, args, rerun=_rerun_command(args, batch_id))
    if args.out:
        _write_results(args.out, result, sorted({*inputs, *bad}))
    return code


def checked_inputs(args: argparse.Namespace, machine: Machine) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
    """The inputs of --inputs by line number, and the bad lines' problems (each said on stderr;
    with --strict, any refuses the file); refused when no line is good."""
    inputs, bad = read_inputs(args.inputs, machine)
    where = "stdin" if args.inputs == "-" else args.inputs
    if bad and args.strict:
        first = min(bad)
        raise InputError(f"{len(bad)} bad line(s) in {where}, nothing was run; line {first}: {bad[first]}",
                         fix="fix them, or drop --strict to run the good lines")
    for number in sorted(bad)[:MAX_SHOWN]:
        print(f"orch: skipped line {number} of {where}: {bad[number]}", file=sys.stderr)
    if len(bad) > MAX_SHOWN:
        print(f"orch: ... and {len(bad) - MAX_SHOWN} more bad line(s)", file=sys.stderr)
    if not inputs:
        raise InputError(f"{where} has no input to run", fix="give one JSON object per line")
    return inputs, bad


T_co = TypeVar("T_co", covariant=True)
R = TypeVar("R")


class Job(Protocol[T_co]):
    """A batch or an experiment: run it, stop it (`stopping`)."""

    async def run(self) -> T_co: ...

    def request_stop(self, grace_s: float) -> None: ...

    def interrupt(self) -> bool: ...


def drive(args: argparse.Namespace, machine: Machine, name: tuple[str, str],
          batches: Mapping[str, Mapping[int, Mapping[str, Any]]], *, rerun: str,
          job: Callable[[Engine, dict[str, Any], Callable[[BatchProgress], None] | None], Job[R]]) -> R:
    """Run `job` (a batch, or an experiment's batches: `batches`, their inputs by number) on the
    command's store and model, with progress on stderr and Ctrl-C or SIGTERM stopping it cleanly;
    `name` ("batch", ID) says what stopped in the message that gives `rerun`."""
    kill = KillPoints.from_env()
    quiet = bool(args.quiet or args.json)
    log_json = bool(args.log_json) or os.environ.get("ORCH_LOG_JSON", "") not in ("", "0")
    show = None if quiet or log_json else Progress(sys.stderr, name[1], noun=name[0])

    async def go() -> R:
        store = cli_store(args, create=True, tracer=kill.trace_sql if kill is not None else None)
        try:
            earlier = [run for batch_id in batches for run in await _unfinished(store, batch_id)]
            stored = next((record.options.get("offline") for record, _ in earlier if record.options.get("offline")),
                          None)
            model, options, banner, fake = model_for(args.offline or stored, machine, earlier, per_run=True,
                                                     rate_limits=rate_limits(args, online=not (args.offline or stored)))
            if fake is not None:
                fake.inputs.update({batch_run_id(batch_id, n): data for batch_id, inputs in batches.items()
                                    for n, data in inputs.items()})
            if banner and not quiet:
                print(banner, file=sys.stderr)
            hooks: list[Hook] = [] if kill is None else [kill]
            if log_json and not args.quiet:
                hooks.append(Tracer(stream_logger(sys.stderr, json=True)))
            engine = Engine(store, model=model, hooks=hooks, prices=args.price_table)
            running = job(engine, options, show.update if show else None)
            with stopping(running, args.stop_grace_s, quiet):
                return await running.run()
        finally:
            await store.close()

    try:
        return asyncio.run(go())
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; {name[0]} {name[1]} is saved: resume it with `{rerun}`") from None
    finally:
        if show is not None:
            show.close()


def rate_limits(args: argparse.Namespace, *, online: bool) -> RateLimits | None:
    """The flags' limits; online, a batch always waits for the API's own (read from its
    headers), so many runs at once do not meet a wall of 429s."""
    given = {"--rpm": args.rpm, "--input-tpm": args.input_tpm, "--output-tpm": args.output_tpm}
    for flag, value in given.items():
        if value is not None and value < 1:
            raise UsageError(f"{flag} {value} is not a limit", fix=f"give {flag} a whole number >= 1, or leave it out")
    if not online and all(v is None for v in given.values()):
        return None
    return RateLimits(requests_per_minute=args.rpm, input_tokens_per_minute=args.input_tpm,
                      output_tokens_per_minute=args.output_tpm)


async def _unfinished(store: Store, batch_id: str) -> list[tuple[RunRecord, list[TransitionRecord]]]:
    """The unfinished runs of a batch run before, each with its child runs: their calls took
    offline answers already."""
    runs: list[tuple[RunRecord, list[TransitionRecord]]] = []
    for summary in await store.list_runs(batch=batch_id, limit=None):
        if not summary.status.finished:
            runs += await run_family(store, summary.run_id)
    return runs


class Stoppable(Protocol):
    def request_stop(self, grace_s: float) -> None: ...

    def interrupt(self) -> bool: ...


class stopping:
    """Ctrl-C or SIGTERM while a batch (or a worker) runs: the first stops it cleanly (no new
    runs; steps in flight finish within the grace period), a second Ctrl-C abandons the steps
    in flight."""

    def __init__(self, batch: Stoppable, grace_s: float, quiet: bool) -> None:
        self.batch, self.grace_s, self.quiet = batch, grace_s, quiet
        self.asked = False

    def __enter__(self) -> None:
        self.previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        if callable(self.previous[0]):  # SIGINT ignored by whoever started us (nohup, `&`) stays so
            signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def __exit__(self, *exc: object) -> None:
        if callable(self.previous[0]):
            signal.signal(signal.SIGINT, self.previous[0])
        signal.signal(signal.SIGTERM, self.previous[1])

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.asked and signum == signal.SIGINT:
            if not self.batch.interrupt():
                signal.default_int_handler(signum, frame)
            return
        self.asked = True
        self.batch.request_stop(self.grace_s)  # first: the notice below may fail
        if not self.quiet:  # os.write: the signal may have come in the middle of a write to stderr
            os.write(2, (f"\norch: stopping: no new runs; the steps in flight finish (up to {self.grace_s:g}s)"
                         + ("; Ctrl-C again to abandon them" if signum == signal.SIGINT else "") + "\n").encode())


def _rerun_command(args: argparse.Namespace, batch_id: str) -> str:
    parts = ["orch", "batch", args.machine, "--inputs", args.inputs, "--batch-id", batch_id]
    if args.db:
        parts[1:1] = ["--db", args.db]
    if args.offline:
        parts += ["--offline"] + ([] if args.offline == "auto" else [args.offline])
    return shlex.join(parts)


def _write_results(path: str, result: BatchResult, numbers: Sequence[int]) -> None:
    """One JSON line per input, in input order: its run's result, why it did not run, or (a
    stopped batch) that it was not reached."""
    lines: dict[int, dict[str, Any]] = {n: {"line": n, "run_id": None, "status": "not_run", "error": None}
                                        for n in numbers}
    lines.update({n: {"line": n, "run_id": r.run_id, **r.to_json()} for n, r in result.results.items()})
    lines.update({n: {"line": n, "run_id": None, "status": "not_started", "error": e}
                  for n, e in result.errors.items()})
    try:
        with open(path, "w", encoding="utf-8") as out:
            for number in sorted(lines):
                out.write(json.dumps(lines[number], ensure_ascii=False) + "\n")
    except OSError as exc:
        raise UsageError(f"cannot write results to {path}: {exc.strerror or exc}") from None


def _report(result: BatchResult, args: argparse.Namespace, *, rerun: str) -> int:
    """The summary; exit 0 when every input completed (or waits for review), 143 when stopped, else 1."""
    p = result.progress
    if args.json:
        print(json.dumps(summary_json(result), ensure_ascii=False))
    elif not args.quiet:
        print_summary(result)
        if p.waiting:
            print(f"review the waiting runs (orch pending), then go on with: {rerun}")
        elif p.completed < p.total:
            print(f"resume with: {rerun}")
    return exit_code(result)


def summary_json(result: BatchResult) -> dict[str, Any]:
    failed = {str(n): r.error for n, r in result.results.items()
              if not r.status.finished and r.status is not RunStatus.WAITING}
    return {**result.progress.to_json(), "not_started": len(result.errors), "stopped": result.stopped,
            "errors": {str(n): e for n, e in result.errors.items()}, "failures": failed}


def print_summary(result: BatchResult, *, unit: str = "line") -> None:
    """A batch's counts, the commonest paths of its finished runs, and what did not finish
    (by `unit` number: its input's line)."""
    p = result.progress
    waiting = f"{p.waiting} waiting for review, " if p.waiting else ""
    print(f"batch {result.batch_id}: {p.completed} completed ({p.already_done} before), {p.failed} failed, "
          f"{p.interrupted} interrupted, {waiting}{len(result.errors)} not started; {p.usage.input_tokens} in / "
          f"{p.usage.output_tokens} out tokens, {usd(p.cost_usd)}")
    paths = Counter(" -> ".join(r.path) for r in result.results.values() if r.status.finished)
    if paths:
        print("paths: " + ", ".join(f"{n} x {path or '(no steps)'}" for path, n in paths.most_common(MAX_PATHS))
              + (f", and {len(paths) - MAX_PATHS} more" if len(paths) > MAX_PATHS else ""))
    failures = [(n, r.run_id, r.status.value, r.error) for n, r in result.results.items()
                if not r.status.finished and r.status not in (RunStatus.INTERRUPTED, RunStatus.WAITING)]
    failures += [(n, "-", "not started", e) for n, e in result.errors.items()]
    for number, run_id, status, error in sorted(failures)[:MAX_SHOWN]:
        print(f"  {unit} {number}: {run_id} {status}: {one_line(error, 160)}")
    if len(failures) > MAX_SHOWN:
        print(f"  ... and {len(failures) - MAX_SHOWN} more (orch batch status {result.batch_id})")


def exit_code(result: BatchResult) -> int:
    """143 when stopped (resumable), 0 when every input completed (or was terminated by a guard,
    or waits for review), else 1."""
    p = result.progress
    if result.stopped or p.interrupted:
        return EXIT_STOPPED
    return 0 if p.completed + p.waiting == p.total and not result.errors else 1


# --------------------------------------------------------------------------- orch batch status


def cmd_batch_status(args: argparse.Namespace) -> int:
    batch_id = args.batch_id_or_nothing
    if not batch_id:
        raise UsageError("orch batch status needs a batch id", fix="orch batch status ID (`orch runs` shows ids)")
    runs: list[RunSummary] = with_store(args, lambda store: store.list_runs(batch=batch_id, limit=None))
    if not runs:
        raise UsageError(f"no runs of batch {batch_id!r} are stored in this database",
                         fix="check the id, or pass --db PATH")
    counts = batch_counts(runs)
    failures = sorted((r for r in runs if r.error and not r.status.finished), key=_input_number)
    if args.json:
        print(json.dumps({**counts, "failures": [{"run_id": r.run_id, "status": r.status.value, "error": r.error}
                                                 for r in failures]}, ensure_ascii=False))
        return 0
    by_status = ", ".join(f"{n} {status}" for status, n in counts["statuses"].items())
    print(f"batch {batch_id}: {counts['runs']} run(s): {by_status}")
    print(f"{counts['input_tokens']} in / {counts['output_tokens']} out tokens, {usd(counts['cost_usd'])}, "
          f"{counts['steps']} step(s)")
    if failures:
        print_table([(r.run_id, r.status.value, one_line(r.error, 100)) for r in failures[:MAX_SHOWN]],
                    ["run_id", "status", "first error"])
        if len(failures) > MAX_SHOWN:
            print(f"... and {len(failures) - MAX_SHOWN} more (orch runs --batch {batch_id} --json)")
    return 0


def batch_counts(runs: Sequence[RunSummary]) -> dict[str, Any]:
    """A batch's totals: runs by status (a stale run counts as interrupted), steps, tokens, cost."""
    statuses: dict[str, int] = {}
    for run in runs:
        status = RunStatus.INTERRUPTED.value if run.stale else run.status.value
        statuses[status] = statuses.get(status, 0) + 1
    costs = [r.cost_usd for r in runs]
    return {"runs": len(runs), "statuses": dict(sorted(statuses.items())), "steps": sum(r.steps for r in runs),
            "input_tokens": sum(r.input_tokens for r in runs), "output_tokens": sum(r.output_tokens for r in runs),
            "cost_usd": None if None in costs else sum(c or 0.0 for c in costs)}


def _input_number(run: RunSummary) -> tuple[int, str]:
    number = run.run_id.rsplit("-", 1)[-1]
    return (int(number), run.run_id) if number.isdigit() else (0, run.run_id)
