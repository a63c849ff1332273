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
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..definition._loader import load_machine
from ..definition._machine import Machine
from ..definition._paths import MachinePath, machine_paths, taken
from ..engine._children import refuse_child
from ..engine._engine import Engine
from ..engine._fsm import Compiled, compile_machine
from ..engine._ids import check_run_id, new_run_id
from ..engine._inputs import validate_input
from ..engine._replay import ReplayReport, replay_run
from ..engine._run import Run
from ..errors import InputError, OrchError, UsageError
from ..hooks import Hook
from ..llm._client import ModelClient
from ..store._contract import Store
from ..trace._tracer import Tracer, stream_logger
from ..types import Budget, Result, RunRecord, RunResult, RunStatus, TransitionRecord, check_amount
from ._faults import KillPoints
from ._options import Interrupted, cli_store, with_store
from ._render import mermaid, one_line, print_table, usd

if TYPE_CHECKING:
    from ..llm._limiter import RateLimits
    from ..llm._offline import FakeMessagesAPI

OFFLINE_BANNER = ("OFFLINE: answers come from {source} through the anthropic SDK and a local fake "
                  "Messages API; no API call is made")
MAX_INPUT_BYTES = 64 * 1024 * 1024
EXIT_STOPPED = 143  # 128 + SIGTERM: stopped on request, the run saved and resumable


def engine_for(args: argparse.Namespace, store: Store, model: ModelClient | None,
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
        data = json.loads(text, parse_constant=not_json)
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


def not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON number")


def _read_file(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(MAX_INPUT_BYTES + 1)


def model_for(offline: str | None, machine: Machine,
              runs: Sequence[tuple[RunRecord, Sequence[TransitionRecord]]] = (), *, per_run: bool = False,
              rate_limits: RateLimits | None = None
              ) -> tuple[ModelClient | None, dict[str, Any], str | None, FakeMessagesAPI | None]:
    """The model client for a run, the run options that let a resume pick the same one, the
    banner that labels an offline run, and the offline fake (None when online).

    Offline, a real SDK client talks to the fake Messages API in process; its answers come
    from SCRIPT, else MACHINE.offline.json beside the module, else labelled placeholders.
    The calls a resumed run and its child runs (`runs`) already made took their answers: each
    state goes on down its list from there. `per_run`: each run down its own lists (a batch).
    `rate_limits`: the client waits for the Messages API's limits (`RateLimiter`).
    """
    if not machine.calls_a_model:
        return None, {}, None, None
    if not offline:
        from ..llm._anthropic import AnthropicModel

        AnthropicModel.check_credentials()
        return AnthropicModel(rate_limits=rate_limits), {}, None, None
    from ..llm._answer_files import answering_fake
    from ..llm._offline import FakeMessagesAPI

    script_path = offline
    if offline == "auto":
        beside = Path(machine.source_file or "machine").with_suffix(".offline.json")
        script_path = str(beside) if beside.is_file() else "auto"
    if script_path == "auto":
        fake = FakeMessagesAPI(default="auto", per_run=per_run)
    else:
        try:
            fake = answering_fake(script_path, states=[s.name for m in machine.family() for s in m.states],
                                  per_run=per_run)
        except OSError as exc:
            raise UsageError(f"cannot use offline answers {script_path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise UsageError(f"cannot use offline answers {exc}") from None
        fake.already_served(runs)
        script_path = str(Path(script_path).resolve())
    banner = OFFLINE_BANNER.format(source=script_path if script_path != "auto" else "placeholders")
    model = fake.model() if rate_limits is None else fake.model(rate_limits=rate_limits)
    return model, {"offline": script_path}, banner, fake


def _drive(args: argparse.Namespace, run_id: str, banner: str | None, *, create: bool, result: Result | None,
           open_run: Callable[[Store, KillPoints | None], Awaitable[Run]]) -> RunResult:
    """Open the store and the run, label it if offline, drive it to its end; on Ctrl-C report
    what is stored (`result`: the machine's declared result)."""
    kill = KillPoints.from_env()

    async def go() -> RunResult:
        store = _store(args, create=create, kill=kill)
        on_sigint = signal.getsignal(signal.SIGINT)  # asyncio.run's: it cancels this task
        try:
            run = await open_run(store, kill)
            if banner:
                print(banner, file=sys.stderr)
            grace = args.stop_grace_s
            # plain handlers, not loop.add_signal_handler: they must act even while synchronous
            # user code (a guard, a Python state) holds the loop, and reach into that code
            signal.signal(signal.SIGTERM, lambda *_: run.request_stop(grace))
            if callable(on_sigint):
                signal.signal(signal.SIGINT, lambda signum, frame: run.interrupt() or on_sigint(signum, frame))
            return await run.run_to_end()
        finally:
            if callable(on_sigint):
                signal.signal(signal.SIGINT, on_sigint)
            await store.close()

    try:
        return asyncio.run(go())
    except KeyboardInterrupt:
        try:
            record, log = with_store(args, lambda store: store.load_run(run_id))
        except OrchError:
            raise Interrupted("interrupted before the run was stored; nothing to resume") from None
        if record.status.finished:
            return RunResult.from_log(record, log, result=result)
        raise Interrupted(f"interrupted; run {run_id} is saved: resume it with "
                          f"`orch resume {run_id}`") from None


def _report_result(result: RunResult, args: argparse.Namespace, *, extra: dict[str, Any] | None = None) -> int:
    """Print the result (with `extra` keys in its JSON); exit code 0 finished or waiting for a
    review, 1 failed or over budget, 143 stopped by SIGTERM."""
    if args.json:
        print(json.dumps({**result.to_json(), **(extra or {})}, ensure_ascii=False))
    else:
        path = " -> ".join(result.path) or "(no steps)"
        paid = (f"{result.usage.input_tokens} in / {result.usage.output_tokens} out tokens, "
                f"{usd(result.cost_usd)}")
        print(f"run {result.run_id} {result.status.value} after {result.steps} step(s): {path} "
              f"({paid})")
        if result.status is RunStatus.WAITING:
            print(f"waiting for a review (orch pending); decide with: orch review {result.run_id} --decision ...")
        elif not result.status.finished:
            print(f"error: {result.error}")
            print(f"resume with: orch resume {result.run_id}"
                  + (" and a raised --max-cost, --max-tokens or --max-seconds"
                     if result.status is RunStatus.BUDGET_EXCEEDED else ""))
    return result_code(result)


def result_code(result: RunResult) -> int:
    """The exit code of a driven run: 0 finished or waiting for a review, 1 failed or over
    budget, 143 stopped by SIGTERM."""
    if result.status is RunStatus.INTERRUPTED:
        return EXIT_STOPPED
    return 0 if result.status.finished or result.status is RunStatus.WAITING else 1


def budget_of(args: argparse.Namespace) -> Budget | None:
    """The budget the flags give (None: none), each limit checked under its flag's name."""
    limits = {"--max-cost": args.max_cost, "--max-tokens": args.max_tokens, "--max-seconds": args.max_seconds}
    for flag, value in limits.items():
        check_amount(flag, value)
    budget = Budget(max_cost_usd=args.max_cost, max_tokens=args.max_tokens, max_seconds=args.max_seconds)
    return budget if budget.to_json() else None


def cmd_run(args: argparse.Namespace) -> int:
    budget = budget_of(args)
    if args.run_id is not None:
        check_run_id(args.run_id)
    loaded = load_machine(args.machine)
    data = _read_input(args.input)
    validate_input(loaded.machine, data)  # bad input: refused before a database is even created
    model, options, banner, fake = model_for(args.offline, loaded.machine)
    run_id = args.run_id or new_run_id()
    if fake is not None:
        fake.inputs[run_id] = data  # for answers by input
    result = _drive(args, run_id, banner, create=True, result=loaded.machine.result,
                    open_run=lambda store, kill: engine_for(args, store, model, kill).start(
                        loaded.machine, data, run_id=run_id, machine_ref=loaded.ref, options=options, budget=budget))
    return _report_result(result, args)


def _verified_run(store: Store, run_id: str) -> Awaitable[tuple[RunRecord, list[TransitionRecord]]]:
    """The run, refused unless it passes its audit chain: its stored machine_ref is imported next."""
    return store.load_run(run_id, verified=True)


async def run_family(store: Store, run_id: str) -> list[tuple[RunRecord, list[TransitionRecord]]]:
    """The run (refused unless it passes its audit chain) and its child runs, nested, each
    with its log: what a resume continues."""
    runs = [await store.load_run(run_id, verified=True)]
    for child in await store.list_runs(parent=run_id):
        runs += await run_family(store, child.run_id)
    return runs


def cmd_resume(args: argparse.Namespace) -> int:
    return _report_result(resumed(args), args)


def resumed(args: argparse.Namespace) -> RunResult:
    """`orch resume`'s run, driven to where it stops (`orch review --resume` drives it too)."""
    budget = budget_of(args)
    family = with_store(args, lambda store: run_family(store, args.run_id))
    record = family[0][0]
    refuse_child(record)  # before its machine is loaded: a map item's has no module of its own
    loaded = load_machine(args.machine or record.machine_ref)
    model, options, banner, _ = model_for(args.offline or record.options.get("offline"), loaded.machine, family)
    result = _drive(args, args.run_id, banner, create=False, result=loaded.machine.result,
                    open_run=lambda store, kill: engine_for(
        args, store, model, kill).attach(args.run_id, loaded.machine, budget=budget,
                                         allow_changed=args.allow_changed, take_over=args.take_over,
                                         options=options if args.offline else None))
    return result


def cmd_replay(args: argparse.Namespace) -> int:
    if not args.all and not args.run_id:
        raise UsageError("give a RUN_ID, or --all MACHINE to replay every run of a machine")

    async def replay(store: Store) -> int:
        if args.all:
            loaded = load_machine(args.all)
            outcomes: dict[str, ReplayReport | str] = {}
            for rid in await store.run_ids(loaded.machine.name):
                try:
                    outcomes[rid] = await replay_run(store, rid, loaded.machine, prices=args.price_table)
                except OrchError as exc:  # a damaged run: said at once, and the others still replayed
                    outcomes[rid] = str(exc)
                    print(f"orch: error: cannot replay run {rid}: {one_line(str(exc), 10_000)}", file=sys.stderr)
            return _print_replay_summary(outcomes, loaded.machine.name, args)
        record, _ = await _verified_run(store, args.run_id)
        compiled = await _compiled_for(store, record, args.machine)
        return _print_replay(await replay_run(store, args.run_id, compiled.machine, prices=args.price_table,
                                              compiled=compiled), args)

    return with_store(args, replay)


async def _compiled_for(store: Store, record: RunRecord, given: str | None) -> Compiled:
    """The machine a run is replayed on: a top-level run's from `given`, else from where it is
    stored; a child run's is found in its parent's, down the state that started it (a map
    item's machine is made from its map state, and has no module of its own)."""
    if record.parent is None:
        return compile_machine(load_machine(given or record.machine_ref).machine)
    place = record.parent
    parent, _ = await _verified_run(store, place.run_id)
    machine = await _compiled_for(store, parent, given)
    try:
        return machine.child_of(place.state, place.item)
    except (KeyError, IndexError):
        raise UsageError(f"machine '{machine.machine.name}' no longer runs run {record.run_id} "
                         f"(state {place.state}, item {place.item})",
                         fix=f"replay run {place.run_id}, or pass --machine") from None


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


def _print_replay_summary(outcomes: dict[str, ReplayReport | str], machine: str,
                          args: argparse.Namespace) -> int:
    """The report of `replay --all`: each run's, a run that could not be read by its error.
    Exit 1 when any diverged or could not be read."""
    reports = [o for o in outcomes.values() if isinstance(o, ReplayReport)]
    unreadable = {rid: o for rid, o in outcomes.items() if isinstance(o, str)}
    diverged = [r for r in reports if not r.matches]
    if args.json:
        print(json.dumps({"machine": machine, "runs": len(outcomes), "matching": len(reports) - len(diverged),
                          "diverged": len(diverged), "unreadable": len(unreadable),
                          "reports": [r.to_json() for r in reports],
                          "unreadable_runs": [{"run_id": rid, "error": e} for rid, e in unreadable.items()]}))
    else:
        print_table(
            [(rid, "-", "UNREADABLE", "-", one_line(o, 60)) if isinstance(o, str) else
             (rid, o.status, "match" if o.matches else "DIVERGED", f"{o.compared}/{o.recorded}",
              o.divergence.describe() if o.divergence else "")
             for rid, o in outcomes.items()],
            ["run_id", "status", "result", "compared", "first divergence"],
        )
        print(f"{len(outcomes)} run(s) of {machine}: {len(reports) - len(diverged)} matching, "
              f"{len(diverged)} diverged" + (f", {len(unreadable)} unreadable" if unreadable else ""))
    return 1 if diverged or unreadable else 0


def cmd_graph(args: argparse.Namespace) -> int:
    print(mermaid(load_machine(args.machine).machine))
    return 0


def cmd_paths(args: argparse.Namespace) -> int:
    """The paths of a machine's transition table, and with --runs how many finished runs took each."""
    if args.limit < 1:
        raise UsageError(f"--limit {args.limit} is not a number of paths", fix="give 1 or more")
    machine = load_machine(args.machine).machine
    found = machine_paths(machine, limit=args.limit)
    runs: Counter[MachinePath] = Counter()
    unfinished = 0

    async def read(store: Store) -> None:
        nonlocal unfinished
        for summary in await store.list_runs(machine=machine.name, limit=None):
            if not summary.status.finished:
                unfinished += 1
                continue
            log = await store.transitions(summary.run_id)
            runs[taken([row.from_state for row in log if row.committed], summary.status.value)] += 1

    if args.runs:
        with_store(args, read)
    other = {path: n for path, n in runs.items() if path not in found.paths}
    if args.json:
        print(json.dumps({"machine": machine.name, "complete": found.complete, "paths": [
            {"states": list(states), "end": end, **({"runs": runs[(states, end)]} if args.runs else {})}
            for states, end in found.paths],
            **({"other_runs": [{"states": list(s), "end": e, "runs": n} for (s, e), n in other.items()],
                "unfinished_runs": unfinished} if args.runs else {})}))
        return 0
    print_table([(n, " -> ".join(states), end, *([runs[(states, end)] or "UNTESTED"] if args.runs else []))
                 for n, (states, end) in enumerate(found.paths, 1)],
                ["#", "path", "end", *(["runs"] if args.runs else [])])
    more = "" if found.complete else f" (the first {args.limit}: raise --limit for the rest)"
    line = f"machine '{machine.name}': {len(found.paths)} path(s){more}"
    if args.runs:
        untested = sum(1 for path in found.paths if not runs[path])
        line += (f"; {len(found.paths) - untested} taken by {sum(runs.values()) - sum(other.values())} finished "
                 f"run(s), {untested} untested")
        line += f"; {sum(other.values())} run(s) took a path not listed" if other else ""
        line += f"; {unfinished} run(s) not finished, not counted" if unfinished else ""
    print(line)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    machine = load_machine(args.machine).machine
    edges = sum(len(machine.edges(s.name)) for s in machine.states)
    print(f"ok: machine '{machine.name}' ({len(machine.states)} states, {edges} transitions)")
    return 0
