"""The `orch` command line: parse, dispatch, and word errors for a terminal.

Exit codes: 0 completed or terminated by a guard (replay: matches); 1 the run failed,
recorded and resumable (replay: diverged, or a run could not be read); 2 usage, definition
or input error, nothing run or stored; 3 the run is busy in another process; 130 interrupted.
Errors are one line on stderr; `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.resources
import io
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .. import __version__
from ..errors import (
    DatabaseNotFoundError,
    DefinitionError,
    ForeignDatabaseError,
    InputError,
    MachineChangedError,
    NoCredentialsError,
    OrchError,
    RunExistsError,
    RunNotFoundError,
    TamperedRunError,
    UsageError,
)
from ..types import RunStatus
from ._options import DEFAULT_DB, Interrupted, read_settings
from ._read import cmd_audit, cmd_diff, cmd_log, cmd_runs, cmd_show
from ._render import one_line

# --------------------------------------------------------------------------- parser


def _driving(name: str) -> Callable[[argparse.Namespace], int]:
    """Commands that load machines and drive runs live in `_drive` (or, named "_module.cmd", in
    that module), so that the reading commands (`runs`, `log`, `show`, `audit`) start without
    the engine, pydantic or structlog."""

    def call(args: argparse.Namespace) -> int:
        module, _, function = name.rpartition(".")
        where = importlib.import_module(f".{module or '_drive'}", __package__)
        command: Callable[[argparse.Namespace], int] = getattr(where, function)
        return command(args)

    return call


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the report machine offline, print its log, replay it, then a routing batch: each an
    `orch` command. The machines, their inputs and their answers ship with the package
    (`statemachine_orch.examples`, machines/ in a checkout), so the demo runs from any directory."""
    examples = importlib.resources.files("statemachine_orch.examples")
    files = [examples / name for name in ("report.py", "report_input.json", "support_router.py",
                                          "support_router_batch.jsonl")]
    if not all(isinstance(f, Path) and f.is_file() for f in files):
        raise UsageError(f"orch demo cannot find the example machines in {examples}",
                         fix="reinstall statemachine-orch")
    machine_file, input_file, router_file, tickets_file = map(str, files)
    from ..engine._ids import new_run_id

    run_id = "demo-" + new_run_id()
    base = [flag for flag, on in (("--log-json", args.log_json), ("--quiet", args.quiet),
                                  ("--debug", args.debug)) if on]
    base += [part for option, value in (("--db", args.db), ("--sync", args.sync),
                                        ("--prices", args.prices)) if value
             for part in (option, value)]
    batch_id = "demo-batch-" + run_id.removeprefix("demo-")
    for step in (["run", machine_file, "--input", input_file, "--offline", "--run-id", run_id],
                 ["log", run_id],
                 ["replay", run_id],
                 ["batch", router_file, "--inputs", tickets_file, "--offline", "--batch-id", batch_id,
                  "--concurrency", "3"]):
        print(f"\n$ orch {' '.join(base + step)}", flush=True)
        code = main(base + step)
        sys.stdout.flush()
        if code:
            return code
    print(f"\nDone. Next: orch show {run_id}   orch batch status {batch_id}   orch graph {machine_file}")
    return 0


def _offline_option(p: argparse.ArgumentParser, when: str = "") -> None:
    p.add_argument("--offline", nargs="?", const="auto", metavar="SCRIPT",
                   help=f"answer {when}from a scripted fake Messages API (default script: MACHINE.offline.json)")


def _rate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rpm", type=int, metavar="N", help="at most N requests per minute (default: the API's)")
    p.add_argument("--input-tpm", type=int, metavar="N", help="at most N input tokens per minute (default: the API's)")
    p.add_argument("--output-tpm", type=int, metavar="N",
                   help="at most N output tokens per minute (default: the API's)")


def _budget_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-cost", type=float, metavar="USD",
                   help="stop (status budget_exceeded) before a call that could take the run past USD")
    p.add_argument("--max-tokens", type=int, metavar="N",
                   help="stop before a call that could take the run's paid tokens past N")
    p.add_argument("--max-seconds", type=float, metavar="S",
                   help="stop when the run has been active S seconds (wall clock, across resumes)")


def _resume_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--machine", metavar="MACHINE", help="load the machine from here instead of its stored path")
    p.add_argument("--allow-changed", action="store_true",
                   help="resume even if the changed machine no longer replays the recorded steps")
    p.add_argument("--take-over", action="store_true",
                   help="claim the run from an owner that cannot be proven alive (recorded by an older "
                        "version on another host) once you know it is gone; the takeover is recorded")
    _offline_option(p, "from here on ")
    _budget_options(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", default=argparse.SUPPRESS,
                        help=f"SQLite database file or postgresql:// URL (env ORCH_DB; default {DEFAULT_DB})")
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
        """`fn` by name: a command of `_drive`, imported only when that command runs."""
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(func=_driving(fn) if isinstance(fn, str) else fn)
        return p

    p = command("run", "cmd_run", "start a run of a machine and drive it to its end")
    p.add_argument("machine", metavar="MACHINE", help="path/to/file.py or dotted.module, optionally :attr")
    p.add_argument("--input", metavar="FILE", help="JSON object input file, or - for stdin")
    _offline_option(p)
    _budget_options(p)
    p.add_argument("--run-id", metavar="ID",
                   help="use this run id (letters, digits, . _ -; at most 64) instead of a generated one")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")

    p = command("batch", "_batch.cmd_batch", "run a machine over every input of a JSON-lines file, N runs at a time; "
                                      "`orch batch status ID` reports a batch")
    p.add_argument("machine", metavar="MACHINE", help="path/to/file.py or dotted.module (or `status`)")
    p.add_argument("batch_id_or_nothing", metavar="ID", nargs="?", help="with `status`: the batch id")
    p.add_argument("--inputs", metavar="FILE", help="JSON lines, one input object per line (- for stdin)")
    p.add_argument("--concurrency", type=int, default=8, metavar="N", help="runs at a time (default 8)")
    p.add_argument("--batch-id", metavar="ID",
                   help="name the batch (runs are ID-LINE); the same id again resumes the batch")
    p.add_argument("--out", metavar="FILE", help="write one JSON result line per input, in input order")
    p.add_argument("--strict", action="store_true", help="refuse the whole file if any line is bad")
    p.add_argument("--rpm", type=int, metavar="N", help="at most N requests per minute (default: the API's limit, "
                                                        "read from its headers)")
    p.add_argument("--input-tpm", type=int, metavar="N", help="at most N input tokens per minute (default: the API's)")
    p.add_argument("--output-tpm", type=int, metavar="N",
                   help="at most N output tokens per minute (default: the API's)")
    _offline_option(p)
    _budget_options(p)
    p.add_argument("--json", action="store_true", help="no progress; print the summary as one JSON object")

    p = command("ab", "_ab.cmd_ab", "an A/B experiment: run a machine over the inputs once per arm (each a file of "
                                    "overrides); `orch ab report EXP` compares the arms")
    p.add_argument("machine", metavar="MACHINE", help="path/to/file.py or dotted.module (or `report`)")
    p.add_argument("experiment_or_nothing", metavar="EXP", nargs="?", help="with `report`: the experiment id")
    p.add_argument("--arm", action="append", metavar="NAME[=@FILE]",
                   help="an arm: NAME alone is the machine as it is; NAME=@FILE.toml its overrides (give 2 or more)")
    p.add_argument("--inputs", metavar="FILE", help="JSON lines, one input object per line (- for stdin)")
    p.add_argument("--repeat", type=int, default=1, metavar="N", help="run each input N times in each of its arms")
    p.add_argument("--assign", default="paired", metavar="HOW",
                   help="paired (every input in every arm; default), hash:FIELD (each input to one arm by a "
                        "hash of FIELD) or random (each input to one arm, drawn with --seed)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed of --assign random and of the report's bootstrap (default 0)")
    p.add_argument("--experiment", metavar="ID",
                   help="name the experiment (runs are ID.ARM-N); the same id again resumes it")
    p.add_argument("--concurrency", type=int, default=8, metavar="N",
                   help="runs at a time, shared among the arms (default 8)")
    p.add_argument("--strict", action="store_true", help="refuse the whole file if any line is bad")
    _rate_options(p)
    _offline_option(p)
    _budget_options(p)
    p.add_argument("--metric", default="completed", metavar="M",
                   help="report: compare paired runs on completed (default), cost, tokens, latency or result:KEY")
    p.add_argument("--json", action="store_true", help="no progress; print the summary (report: the report) as JSON")

    p = command("resume", "cmd_resume", "continue a failed, interrupted or crashed run")
    p.add_argument("run_id", metavar="RUN_ID")
    _resume_options(p)

    p = command("pending", "_review.cmd_pending", "list the runs waiting at a review state for a decision")
    p.add_argument("--machine", metavar="NAME", help="only runs of this machine name")
    p.add_argument("--expiring", metavar="DURATION",
                   help="only reviews whose deadline falls within DURATION (90s, 30m, 2h, 1d) or has passed")
    p.add_argument("--json", action="store_true", help="print a JSON array")

    p = command("review", "_review.cmd_review", "decide a run waiting at a review state; the state's guard maps "
                                               "the decision to the run's next step")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--decision", required=True, metavar="NAME",
                   help="approve, reject or another decision the review state allows")
    p.add_argument("--data", metavar="JSON|@FILE", help="the reviewer's data, checked against the state's data model")
    p.add_argument("--note", metavar="TEXT", help="a note kept with the decision (the audit log's reason)")
    p.add_argument("--as", dest="as_actor", metavar="USER",
                   help="who decides (default: $ORCH_ACTOR, else the OS user)")
    p.add_argument("--resume", action="store_true", help="go on with the run here once decided")
    _resume_options(p)

    p = command("fork", "_fork.cmd_fork", "start a run from a stored run's snapshot before one of its steps, with "
                                          "what-if changes, reusing the stored answers to unchanged requests")
    p.add_argument("run_id", metavar="RUN_ID", help="the run to fork (it is never modified)")
    p.add_argument("--at", required=True, metavar="SEQ|STATE",
                   help="the step the fork runs anew: a seq of the run's log, or a state (its first step)")
    p.add_argument("--machine", metavar="MACHINE", help="load the machine from here instead of the run's stored path")
    p.add_argument("--prompt", action="append", metavar="STATE=TEXT|@FILE", help="a new prompt template for STATE")
    p.add_argument("--system", action="append", metavar="STATE=TEXT|@FILE", help="a new system prompt for STATE")
    p.add_argument("--model", action="append", metavar="STATE=MODEL", help="another model for STATE")
    p.add_argument("--max-tokens", action="append", metavar="STATE=N", help="another max_tokens for STATE")
    p.add_argument("--set", action="append", metavar="KEY=JSON",
                   help="replace an input field, or the output of a state run before the fork point")
    p.add_argument("--label", metavar="TEXT", help="a label for the fork (`orch runs --tree` shows it)")
    p.add_argument("--run-id", dest="fork_id", metavar="ID", help="the fork's run id instead of a generated one")
    _offline_option(p)
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
    p.add_argument("--before", metavar="RUN_ID", help="the page after this run: runs created before it")
    p.add_argument("--batch", metavar="ID", help="only the runs of this batch (`orch batch`)")
    p.add_argument("--tree", metavar="RUN_ID", help="the lineage of a run instead: its first ancestor and every "
                                                    "fork from it down, as a tree")
    p.add_argument("--json", action="store_true", help="print a JSON array")

    p = command("show", cmd_show, "print a run's input, outputs and snapshot")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("audit", cmd_audit, "verify the tamper-evident hash chain of transition logs")
    p.add_argument("action", choices=["verify"], help="verify: recompute every row's hash")
    p.add_argument("run_id", metavar="RUN_ID", nargs="?", help="one run (default: every run)")

    p = command("diff", cmd_diff, "compare two runs step by step; exit 1 when their paths, decisions or outputs differ")
    p.add_argument("run_a", metavar="RUN_A")
    p.add_argument("run_b", metavar="RUN_B")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print the report as one JSON object")
    form.add_argument("--md", action="store_true", help="print a Markdown report (for a CI comment)")

    p = command("graph", "cmd_graph", "print a machine as a Mermaid state diagram")
    p.add_argument("machine", metavar="MACHINE")

    p = command("paths", "cmd_paths", "list the paths of a machine's transition table and, with --runs, which "
                                      "of them recorded runs took")
    p.add_argument("machine", metavar="MACHINE")
    p.add_argument("--runs", action="store_true", help="count the finished runs of --db that took each path")
    p.add_argument("--limit", type=int, default=1000, metavar="N", help="list at most N paths (default 1000)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("validate", "cmd_validate", "check a machine definition (exit 0 valid, 2 invalid)")
    p.add_argument("machine", metavar="MACHINE")

    p = command("enqueue", "_workers.cmd_enqueue", "queue runs of a machine for `orch worker` processes "
                                                   "(PostgreSQL)")
    p.add_argument("machine", metavar="MACHINE", help="path/to/file.py or dotted.module, optionally :attr")
    p.add_argument("--input", metavar="FILE", help="JSON object input file, or - for stdin")
    p.add_argument("--inputs", metavar="FILE", help="JSON lines, one run's input per line (- for stdin)")
    p.add_argument("--queue", default="default", metavar="NAME", help="the queue (default: default)")
    p.add_argument("--run-id", metavar="ID", help="the run's id (with --inputs: ID-LINE); an id queued before "
                                                  "is left as it is, so enqueueing again queues nothing twice")
    _budget_options(p)
    p.add_argument("--json", action="store_true", help="print the queued run ids as JSON")

    p = command("worker", "_workers.cmd_worker", "claim queued runs of the given machines and drive them, until "
                                                 "SIGTERM or Ctrl-C (PostgreSQL)")
    p.add_argument("machines", metavar="MACHINE", nargs="+", help="the machine modules this worker serves: it "
                                                                  "claims only runs of these versions")
    p.add_argument("--queue", default="default", metavar="NAME", help="the queue (default: default)")
    p.add_argument("--concurrency", type=int, default=4, metavar="N", help="runs at a time (default 4)")
    p.add_argument("--poll", type=float, default=2.0, metavar="S",
                   help="look for work every S seconds even when not woken (default 2)")
    p.add_argument("--migrate", action="store_true",
                   help="also claim runs started by other versions of these machines, if their log replays")
    p.add_argument("--until-idle", action="store_true", help="stop once nothing is left to claim")
    _rate_options(p)
    _offline_option(p)

    p = command("workers", "_workers.cmd_workers", "list the live workers of a shared database, their runs and "
                                                   "heartbeats")
    p.add_argument("--json", action="store_true", help="print a JSON array")

    p = command("db", "_workers.cmd_db", "database upkeep: `migrate` creates or upgrades the schema of --db; "
                                         "`copy SRC DST` copies every run of one database into another")
    p.add_argument("action", choices=["migrate", "copy"],
                   help="migrate: create or upgrade the schema of --db; copy: copy the runs of SRC that DST lacks")
    p.add_argument("source", metavar="SRC", nargs="?",
                   help="copy: the database to copy from, a SQLite file or a postgresql:// URL")
    p.add_argument("destination", metavar="DST", nargs="?",
                   help="copy: the database to copy into (created when missing), a SQLite file or a postgresql:// URL")
    p.add_argument("--json", action="store_true", help="copy: print the report as one JSON object")

    command("demo", cmd_demo, "run the report machine offline, show its log and replay it, then a routing batch")
    return parser


def worded(error: OrchError) -> str:
    """The error with its fix in the command line's terms (flags and commands) where it has one."""
    fix = error.fix
    if isinstance(error, DatabaseNotFoundError):
        fix = "start a run first or pass --db PATH"
    elif isinstance(error, ForeignDatabaseError):
        fix = "use a new file with --db"
    elif isinstance(error, RunNotFoundError) and fix is None:
        fix = "list runs with `orch runs`"
    elif isinstance(error, RunExistsError):
        fix = f"resume it with `orch resume {error.run_id}` or choose another id"
    elif isinstance(error, MachineChangedError):
        fix = "fix the machine, or resume anyway with --allow-changed (allow_changed=True)"
    elif isinstance(error, NoCredentialsError):
        fix = "export it to call the API, or add --offline to run on scripted answers"
    elif isinstance(error, InputError) and error.model is not None:
        fix = f"fix the input file to match {error.model}"
    elif isinstance(error, TamperedRunError):
        fix = f"`orch audit verify {error.run_id}` checks it; restore the database from a backup"
    return f"{error.what}; {fix}" if fix else error.what


def _refuse_empty_ids(args: argparse.Namespace) -> None:
    """An empty id (an unset shell variable, most often) is a mistake, never "no id": read as
    none, `orch audit verify ""` would check every run and `run --run-id ""` pick its own id."""
    if "" in (getattr(args, name, None) for name in ("run_id", "before", "run_a", "run_b", "tree", "fork_id")):
        raise UsageError("the run id is empty", fix="give a run id (`orch runs` lists them)")
    if "" in (getattr(args, name, None) for name in ("batch_id", "batch", "batch_id_or_nothing")):
        raise UsageError("the batch id is empty", fix="give a batch id (`orch batch` prints it)")
    if "" in (getattr(args, name, None) for name in ("experiment", "experiment_or_nothing")):
        raise UsageError("the experiment id is empty", fix="give an experiment id (`orch ab` prints it)")


def _print_traceback() -> None:
    import traceback  # here: only --debug shows one

    traceback.print_exc()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("db", "sync", "prices", "log_json", "quiet", "debug"):
        if not hasattr(args, name):
            setattr(args, name, None)
    if isinstance(sys.stdout, io.TextIOWrapper):  # a stored lone surrogate prints as \ud800, not an error
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        _refuse_empty_ids(args)
        read_settings(args)
        return int(args.func(args))
    except OrchError as exc:
        if args.debug:
            _print_traceback()
        # one line per problem; values quoted in a message cannot add lines or escape codes
        lines = exc.problems if isinstance(exc, DefinitionError) else [worded(exc)]
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


