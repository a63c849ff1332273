"""The `orch` commands that load machines and drive runs: run, resume, replay, graph, validate.

Kept apart so the reading commands start fast; `_main` parses the arguments and dispatches
here. This is where the adapters are chosen and wired: the SQLite store, the Anthropic
client (or the offline model), the structlog tracer, the kill points of the crash tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from ..definition._loader import load_machine
from ..definition._machine import Machine
from ..definition._states import LLMState
from ..engine._engine import Engine, new_run_id
from ..engine._inputs import validate_input
from ..engine._replay import ReplayReport, replay_run
from ..engine._run import Run
from ..errors import InputError, OrchError, UsageError
from ..hooks import Hook
from ..llm._client import ModelClient
from ..store._contract import Store
from ..trace._tracer import Tracer, stream_logger
from ..types import Budget, RunRecord, RunResult, RunStatus, TransitionRecord
from ._faults import KillPoints
from ._options import Interrupted, cli_store, with_store
from ._render import mermaid, one_line, print_table, usd

OFFLINE_BANNER = ("OFFLINE: answers come from {source} through the anthropic SDK and a local fake "
                  "Messages API; no API call is made")
MAX_INPUT_BYTES = 64 * 1024 * 1024
DEFAULT_STOP_GRACE_S = 30.0  # SIGTERM: how long a step in progress may take to finish
EXIT_STOPPED = 143  # 128 + SIGTERM: stopped on request, the run saved and resumable


def _engine(args: argparse.Namespace, store: Store, model: ModelClient | None,
            kill: KillPoints | None) -> Engine:
    """The engine a driving command uses: its store and model, the tracer unless --quiet, and
    the crash tests' kill points when ORCH_KILL_AT asks for them."""
    hooks: list[Hook] = [] if kill is None else [kill]
    if not args.quiet:
        as_json = bool(args.log_json) or os.environ.get("ORCH_LOG_JSON", "") not in ("", "0")
        hooks.append(Tracer(stream_logger(sys.stderr, json=as_json)))
    return Engine(store, model=model, hooks=hooks, prices=args.price_table)


def _store(args: argparse.Namespace, *, create: bool, kill: KillPoints | None) -> Store:
    return cli_store(args, create=create, tracer=kill.trace_sql if kill is not None else None)


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


def _model_for(offline: str | None, machine: Machine, run: tuple[RunRecord, Sequence[TransitionRecord]] | None = None
               ) -> tuple[ModelClient | None, dict[str, Any], str | None]:
    """The model client for a run, the run options that let a resume pick the same one, and
    the banner that labels an offline run.

    Offline, a real SDK client talks to the fake Messages API in process; its answers come
    from SCRIPT, else MACHINE.offline.json beside the module, else labelled placeholders.
    The calls a resumed `run` already made took their answers: each state goes on down its
    list from there.
    """
    if not any(isinstance(s, LLMState) for s in machine.states):
        return None, {}, None
    if not offline:
        from ..llm._anthropic import AnthropicModel

        AnthropicModel.check_credentials()
        return AnthropicModel(), {}, None
    from ..llm._offline import FakeMessagesAPI, load_script

    script_path = offline
    if offline == "auto":
        beside = Path(machine.source_file or "machine").with_suffix(".offline.json")
        script_path = str(beside) if beside.is_file() else "auto"
    if script_path == "auto":
        fake = FakeMessagesAPI(default="auto")
    else:
        try:
            script = load_script(script_path, states=[state.name for state in machine.states])
        except OSError as exc:
            raise UsageError(f"cannot use offline answers {script_path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise UsageError(f"cannot use offline answers {exc}") from None
        fake = FakeMessagesAPI(script, default="auto")
        if run is not None:
            fake.already_served(run[1], in_flight=run[0].in_flight)
        script_path = str(Path(script_path).resolve())
    banner = OFFLINE_BANNER.format(source=script_path if script_path != "auto" else "placeholders")
    return fake.model(), {"offline": script_path}, banner


def _drive(args: argparse.Namespace, run_id: str, banner: str | None, *, create: bool,
           open_run: Callable[[Store, KillPoints | None], Awaitable[Run]]) -> RunResult:
    """Open the store and the run, label it if offline, drive it to its end; on Ctrl-C report
    what is stored."""
    kill = KillPoints.from_env()

    async def go() -> RunResult:
        store = _store(args, create=create, kill=kill)
        try:
            run = await open_run(store, kill)
            if banner:
                print(banner, file=sys.stderr)
            grace = float(os.environ.get("ORCH_STOP_GRACE") or DEFAULT_STOP_GRACE_S)
            # a plain handler, not loop.add_signal_handler: it must act even while a synchronous
            # step holds the loop, so that step is the last
            signal.signal(signal.SIGTERM, lambda *_: run.request_stop(grace))
            return await run.run_to_end()
        finally:
            await store.close()

    try:
        return asyncio.run(go())
    except KeyboardInterrupt:
        try:
            record, log = with_store(args, lambda store: store.load_run(run_id))
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


def cmd_run(args: argparse.Namespace) -> int:
    loaded = load_machine(args.machine)
    data = _read_input(args.input)
    validate_input(loaded.machine, data)  # bad input: refused before a database is even created
    model, options, banner = _model_for(args.offline, loaded.machine)
    run_id = args.run_id or new_run_id()
    result = _drive(args, run_id, banner, create=True, open_run=lambda store, kill: _engine(
        args, store, model, kill).start(loaded.machine, data, run_id=run_id, machine_ref=loaded.ref,
                                        options=options, budget=_budget(args)))
    return _report_result(result, args)


def cmd_resume(args: argparse.Namespace) -> int:
    record, log = with_store(args, lambda store: store.load_run(args.run_id))
    loaded = load_machine(args.machine or record.machine_ref)
    model, options, banner = _model_for(args.offline or record.options.get("offline"), loaded.machine,
                                        (record, log))
    result = _drive(args, args.run_id, banner, create=False, open_run=lambda store, kill: _engine(
        args, store, model, kill).attach(args.run_id, loaded.machine, budget=_budget(args),
                                         allow_changed=args.allow_changed,
                                         options=options if args.offline else None))
    return _report_result(result, args)


def cmd_replay(args: argparse.Namespace) -> int:
    if not args.all and not args.run_id:
        raise UsageError("give a RUN_ID, or --all MACHINE to replay every run of a machine")

    async def replay(store: Store) -> int:
        if args.all:
            loaded = load_machine(args.all)
            reports = [await replay_run(store, rid, loaded.machine, prices=args.price_table)
                       for rid in await store.run_ids(loaded.machine.name)]
            return _print_replay_summary(reports, loaded.machine.name, args)
        record = await store.get_run(args.run_id)
        loaded = load_machine(args.machine or record.machine_ref)
        return _print_replay(await replay_run(store, args.run_id, loaded.machine, prices=args.price_table), args)

    return with_store(args, replay)


def _print_replay(report: ReplayReport, args: argparse.Namespace) -> int:
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


def cmd_graph(args: argparse.Namespace) -> int:
    print(mermaid(load_machine(args.machine).machine))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    machine = load_machine(args.machine).machine
    edges = sum(len(machine.edges(s.name)) for s in machine.states)
    print(f"ok: machine '{machine.name}' ({len(machine.states)} states, {edges} transitions)")
    return 0
