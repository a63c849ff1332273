"""`orch ab`: an A/B experiment, one machine over a JSON-lines file of inputs once per arm,
each arm a TOML file of overrides (`engine/_experiment.py`); `orch ab report EXP`
(`_ab_report`).

Built on `orch batch`: each arm is the batch `EXP.ARM`, driven, shown and stopped as one
(`_batch.drive`), so the same command with the same `--experiment` resumes it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tomllib
from collections.abc import Sequence
from typing import Any

from ..definition._loader import load_machine
from ..definition._machine import Machine
from ..definition._overrides import StateOverride, parse_overrides
from ..engine._batch import BatchResult, batch_run_id
from ..engine._experiment import Experiment, Settings, arm_batch_id, arm_machine, check_arm_name, plan
from ..engine._ids import check_run_id, new_run_id
from ..errors import UsageError
from ._ab_report import build_report, check_metric, read_experiment, report_lines
from ._batch import check_batch_args, checked_inputs, drive, exit_code, print_summary, summary_json
from ._drive import EXIT_STOPPED, budget_of
from ._options import with_store


def cmd_ab(args: argparse.Namespace) -> int:
    if args.machine == "report":
        return cmd_ab_report(args)
    check_batch_args(args, "ab", args.experiment_or_nothing,
                     "orch ab MACHINE --arm A --arm B=@b.toml --inputs FILE, or orch ab report EXP")
    budget = budget_of(args)
    loaded = load_machine(args.machine)
    arms = read_arms(args.arm or [], loaded.machine)
    settings = Settings(arms=tuple(arms), assign=args.assign, seed=args.seed, repeat=args.repeat)
    inputs, bad = checked_inputs(args, loaded.machine)
    runs = plan(inputs, settings)  # an input without the field to hash is refused before anything runs
    experiment = args.experiment or new_run_id()
    batches = {arm_batch_id(experiment, arm): arm_runs for arm, arm_runs in runs.items()}
    try:
        for batch_id, arm_runs in batches.items():
            check_run_id(batch_run_id(batch_id, max(arm_runs, default=1)))
    except UsageError:
        raise UsageError(f"--experiment {experiment!r} is not valid", fix="use letters, digits, '.', '_' or '-', "
                         "short enough that ID.ARM-N is at most 64 characters") from None
    rerun = _rerun_command(args, experiment)
    results = drive(args, loaded.machine, ("experiment", experiment), batches, rerun=rerun,
                    job=lambda engine, options, on_progress: Experiment(
                        engine, loaded.machine, arms, inputs, experiment_id=experiment, settings=settings,
                        concurrency=args.concurrency, machine_ref=loaded.ref, options=options, budget=budget,
                        on_progress=on_progress))
    return _summary(experiment, settings, results, len(bad), args, rerun=rerun)


def read_arms(specs: Sequence[str], machine: Machine) -> dict[str, dict[str, StateOverride]]:
    """Each `--arm NAME[=@FILE]`'s overrides (none: the control arm), read and applied to the
    machine: an arm that does not make a valid machine is refused, naming its file."""
    arms: dict[str, dict[str, StateOverride]] = {}
    for spec in specs:
        name, given, source = spec.partition("=")
        check_arm_name(name)
        if given and not source.startswith("@"):
            raise UsageError(f"--arm {spec!r}: an arm's overrides come from a file",
                             fix=f"write --arm {name}=@FILE.toml (or --arm {name} for the machine as it is)")
        if name in arms:
            raise UsageError(f"arm {name!r} is given twice", fix="give each arm a name of its own")
        where = f"arm {name} ({source[1:]})" if given else f"arm {name}"
        arms[name] = parse_overrides(_toml(source[1:], where), where=where) if given else {}
        arm_machine(machine, arms[name], label=where)
    if len(arms) < 2:
        raise UsageError(f"orch ab needs at least 2 arms, got {len(arms)}",
                         fix="give --arm A (the machine as it is) and --arm B=@b.toml")
    return arms


def _toml(path: str, where: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise UsageError(f"{where}: cannot read it: {exc.strerror or exc}", fix="check the path after the @") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{where}: not valid TOML: {exc}",
                         fix='write one table per state, e.g. [draft] then model = "claude-haiku-4-5"') from None


def _rerun_command(args: argparse.Namespace, experiment: str) -> str:
    parts = ["orch", "ab", args.machine, *(f"--arm={spec}" for spec in args.arm), "--inputs", args.inputs,
             "--experiment", experiment]
    if args.db:
        parts[1:1] = ["--db", args.db]
    if args.assign != "paired":
        parts += ["--assign", args.assign]
    if args.seed:
        parts += ["--seed", str(args.seed)]
    if args.repeat != 1:
        parts += ["--repeat", str(args.repeat)]
    if args.offline:
        parts += ["--offline"] + ([] if args.offline == "auto" else [args.offline])
    return shlex.join(parts)


def _summary(experiment: str, settings: Settings, results: dict[str, BatchResult], bad_lines: int,
             args: argparse.Namespace, *, rerun: str) -> int:
    """Each arm's batch summary; exit 0 when every run of every arm finished, 143 when stopped, else 1."""
    codes = [exit_code(result) for result in results.values()]
    code = EXIT_STOPPED if EXIT_STOPPED in codes else 1 if any(codes) or bad_lines else 0
    if args.json:
        print(json.dumps({"experiment": experiment, **settings.to_json(), "bad_lines": bad_lines,
                          "arms": {arm: summary_json(result) for arm, result in results.items()}},
                         ensure_ascii=False))
        return code
    if args.quiet:
        return code
    print(f"experiment {experiment}: arms {', '.join(settings.arms)}; {settings.assign}, repeat {settings.repeat}"
          + (f", seed {settings.seed}" if settings.assign == "random" else ""))
    for result in results.values():
        print_summary(result, unit="run")
    print(f"report with: orch ab report {experiment}" + (f" --db {shlex.quote(args.db)}" if args.db else ""))
    if any(r.progress.waiting for r in results.values()):
        print(f"review the waiting runs (orch pending), then go on with: {rerun}")
    elif any(r.progress.completed < r.progress.total for r in results.values()):
        print(f"resume with: {rerun}")
    return code


def cmd_ab_report(args: argparse.Namespace) -> int:
    experiment = args.experiment_or_nothing
    if not experiment:
        raise UsageError("orch ab report needs an experiment id", fix="orch ab report EXP (`orch ab` prints it)")
    metric = check_metric(args.metric)
    runs = with_store(args, lambda store: read_experiment(store, experiment, results=metric.startswith("result:")))
    if not runs:
        raise UsageError(f"no runs of experiment {experiment!r} are stored in this database",
                         fix="check the id (`orch ab` prints it), or pass --db PATH")
    report = build_report(runs, experiment=experiment, metric=metric)
    for warning in report["warnings"]:
        print(f"orch: warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        print("\n".join(report_lines(report)))
    return 0
