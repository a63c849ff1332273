"""`orch ab report EXP`: an experiment's runs, arm by arm, and what tells the arms apart.

`read_experiment` reads the runs (`ArmRun`: what the report needs of each) from a store;
`build_report` is pure: per arm the runs, the rate of each status with its Wilson 95 %
interval, the decisions per state, the paths, tokens, cost and latency; in a paired
experiment, each arm against the first (the baseline) on one metric: wins, ties, losses and
a paired bootstrap 95 % interval of the mean difference. `report_lines` prints it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..engine._experiment import SETTINGS
from ..errors import OrchError, UsageError
from ..store._contract import Store
from ..types import Result, RunResult, RunStatus
from ._render import aligned
from ._stats import mean, paired_bootstrap, percentile, wilson

FEW_RUNS = 30  # fewer runs than this in an arm: the report warns that its figures are rough
METRICS = ("completed", "cost", "tokens", "latency", "result:KEY")
LOWER_WINS = frozenset({"cost", "tokens", "latency"})


@dataclass(slots=True, kw_only=True)
class ArmRun:
    """One run of an experiment, as the report reads it."""

    arm: str
    machine: str
    number: int | None  # its run number (`EXP.ARM-N`): runs of the same number pair up
    status: str  # a stale run (its process gone) counts as interrupted
    path: tuple[str, ...]  # the states it committed, in order
    decisions: tuple[tuple[str, str], ...] = ()  # (state, decision) of each committed step
    latency_ms: float = 0.0  # the sum over its steps
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = 0.0  # None: a call of unknown price
    result: Any = None  # what it answers (`orch show`'s result)
    settings: Mapping[str, Any] | None = None  # the experiment's, stored with the run


def check_metric(metric: str) -> str:
    if metric in METRICS[:-1] or (metric.startswith("result:") and len(metric) > len("result:")):
        return metric
    raise UsageError(f"--metric {metric!r} is not known", fix=f"use one of {', '.join(METRICS)}")


async def read_experiment(store: Store, experiment: str, *, results: bool = False) -> list[ArmRun]:
    """The experiment's runs, each with its log read; `results`: with what each answers (a
    machine that declares its result by a function is loaded once to compute it)."""
    declared: dict[str, Result | None] = {}
    runs = []
    for summary in await store.list_runs(experiment=experiment, limit=None):
        record, log = await store.load_run(summary.run_id)
        committed = [row for row in log if row.committed]
        number = summary.run_id.rsplit("-", 1)[-1]
        runs.append(ArmRun(
            arm=summary.arm or "?", machine=summary.machine, number=int(number) if number.isdigit() else None,
            status=RunStatus.INTERRUPTED.value if summary.stale else summary.status.value,
            path=tuple(row.from_state for row in committed),
            decisions=tuple((row.from_state, str(row.decision)) for row in committed),
            latency_ms=math.fsum(row.latency_ms for row in log), input_tokens=summary.input_tokens,
            output_tokens=summary.output_tokens, cost_usd=summary.cost_usd,
            result=_result_of(record, log, declared) if results else None, settings=record.options.get(SETTINGS)))
    return runs


def _result_of(record: Any, log: Any, declared: dict[str, Result | None]) -> Any:
    """What the run answers, as `orch show` computes it (None when it cannot be computed)."""
    stored = record.options.get("result")
    try:
        if isinstance(stored, dict):  # a function of the machine's: load the machine, once
            if record.machine_ref not in declared:
                from ..definition._loader import load_machine  # here: only such a result needs the machine

                declared[record.machine_ref] = load_machine(record.machine_ref).machine.result
            stored = declared[record.machine_ref]
        return RunResult.from_log(record, log, result=stored).output
    except OrchError:
        declared[record.machine_ref] = None
        return None


def metric_value(run: ArmRun, metric: str) -> float | None:
    """The run's value of `metric` (None when it has none: a cost of unknown price, a result
    without that key, or not a number)."""
    if metric == "completed":
        return 1.0 if run.status == RunStatus.COMPLETED.value else 0.0
    if metric == "cost":
        return run.cost_usd
    if metric == "tokens":
        return float(run.input_tokens + run.output_tokens)
    if metric == "latency":
        return run.latency_ms
    value = run.result.get(metric[len("result:"):]) if isinstance(run.result, Mapping) else None
    if isinstance(value, bool):
        return float(value)
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


# --------------------------------------------------------------------------- the report


def build_report(runs: Sequence[ArmRun], *, experiment: str, metric: str = "completed") -> dict[str, Any]:
    """The report of an experiment's runs (see the module docstring), as JSON data."""
    stored = next((r.settings for r in runs if isinstance(r.settings, Mapping)), None) or {}
    by_arm: dict[str, list[ArmRun]] = {str(arm): [] for arm in stored.get("arms", [])}
    for run in sorted(runs, key=lambda r: (r.arm, r.number or 0)):
        by_arm.setdefault(run.arm, []).append(run)
    repeat = int(stored.get("repeat", 1))
    numbers = [{r.number for r in arm_runs} for arm_runs in by_arm.values()]
    paired = stored.get("assign") == "paired" or (not stored and all(n == numbers[0] for n in numbers))
    seed = int(stored.get("seed", 0))
    statuses = [s.value for s in RunStatus if any(r.status == s.value for r in runs)]
    arms = [_arm(name, arm_runs, statuses, metric) for name, arm_runs in by_arm.items()]
    baseline = next(iter(by_arm))
    comparisons = [_compare(by_arm[baseline], arm_runs, baseline=baseline, arm=name, metric=metric, seed=seed,
                            repeat=repeat) for name, arm_runs in list(by_arm.items())[1:]] if paired else []
    warnings = [f"arm {a['arm']} has {a['runs']} run(s), fewer than {FEW_RUNS}: its intervals are wide and only "
                "roughly right" for a in arms if a["runs"] < FEW_RUNS]
    return {"experiment": experiment, "machines": sorted({r.machine for r in runs}),
            "assign": stored.get("assign", "paired" if paired else "unknown"), "seed": seed, "repeat": repeat,
            "paired": paired, "baseline": baseline, "metric": metric,
            "better": "lower" if metric in LOWER_WINS else "higher", "statuses": statuses, "arms": arms,
            "comparisons": comparisons, "warnings": warnings}


def _arm(name: str, runs: Sequence[ArmRun], statuses: Sequence[str], metric: str) -> dict[str, Any]:
    n = len(runs)
    counts = Counter(r.status for r in runs)
    decisions: dict[str, Counter[str]] = {}
    for run in runs:
        for state, decision in run.decisions:
            decisions.setdefault(state, Counter())[decision] += 1
    paths = Counter((r.path, r.status) for r in runs)
    costs = [r.cost_usd for r in runs if r.cost_usd is not None]
    latencies = [r.latency_ms for r in runs]
    values = [v for r in runs if (v := metric_value(r, metric)) is not None]
    return {
        "arm": name, "runs": n,
        "statuses": {s: {"count": counts[s], "rate": counts[s] / n if n else None,
                         **dict(zip(("low", "high"), wilson(counts[s], n), strict=True))} for s in statuses},
        "decisions": {state: dict(c.most_common()) for state, c in decisions.items()},
        "paths": [{"path": list(path), "status": status, "count": k, "share": k / n}
                  for (path, status), k in sorted(paths.items(), key=lambda item: (-item[1], item[0]))],
        "tokens": {"input": sum(r.input_tokens for r in runs), "output": sum(r.output_tokens for r in runs),
                   "input_mean": mean([r.input_tokens for r in runs]),
                   "output_mean": mean([r.output_tokens for r in runs])},
        "cost_usd": {"total": math.fsum(costs), **_spread(costs), "unknown": n - len(costs)},
        "latency_ms": _spread(latencies),
        "metric": {"mean": mean(values), "runs": len(values)},
    }


def _spread(values: Sequence[float]) -> dict[str, float | None]:
    return {"mean": mean(values), "p50": percentile(values, 50), "p90": percentile(values, 90)}


def _compare(base: Sequence[ArmRun], other: Sequence[ArmRun], *, baseline: str, arm: str, metric: str, seed: int,
             repeat: int) -> dict[str, Any]:
    """`arm` against the baseline, pair by pair (runs of the same number): wins, ties, losses
    on `metric`, and the bootstrap interval of the mean difference (arm minus baseline) over
    inputs (`paired_bootstrap`: an input's repeats are drawn together)."""
    theirs = {r.number: metric_value(r, metric) for r in base if r.number is not None}
    sign = -1.0 if metric in LOWER_WINS else 1.0
    groups: dict[int, list[float]] = {}
    outcome: Counter[str] = Counter()
    skipped = 0
    for run in other:
        if run.number not in theirs:
            continue
        mine, base_value = metric_value(run, metric), theirs[run.number]
        if mine is None or base_value is None:
            skipped += 1
            continue
        difference = mine - base_value
        outcome["wins" if sign * difference > 0 else "losses" if sign * difference < 0 else "ties"] += 1
        groups.setdefault((run.number - 1) // repeat, []).append(difference)
    differences = [d for g in groups.values() for d in g]
    interval = paired_bootstrap(list(groups.values()), seed=seed)
    return {"arm": arm, "baseline": baseline, "metric": metric, "pairs": len(differences), "skipped": skipped,
            "inputs": len(groups), "wins": outcome["wins"], "ties": outcome["ties"], "losses": outcome["losses"],
            "mean_difference": mean(differences),
            "interval": None if interval is None else {
                "low": interval.low, "high": interval.high, "level": interval.level,
                "resamples": interval.resamples, "seed": interval.seed,
                "excludes_zero": interval.low > 0 or interval.high < 0}}


# --------------------------------------------------------------------------- as text


def report_lines(report: Mapping[str, Any]) -> list[str]:
    """The report for a terminal: a table per subject, then the comparisons."""
    metric, arms = report["metric"], report["arms"]
    baseline = report["baseline"]
    how = (f"{report['assign']}, repeat {report['repeat']}, seed {report['seed']}")
    lines = [f"experiment {report['experiment']} of {', '.join(report['machines'])}: {len(arms)} arm(s), baseline "
             f"{baseline}; {how}", ""]
    extra = metric != "completed"  # the mean of another metric, beside the rates
    lines += aligned([["arm", "runs", *report["statuses"], *([f"{metric} mean"] if extra else [])]]
                     + [[a["arm"], a["runs"], *(_rate(a["statuses"][s]) for s in report["statuses"]),
                         *([_number(a["metric"]["mean"], metric)] if extra else [])] for a in arms])
    lines += ["", *aligned([["arm", "in tokens", "out tokens", "cost mean", "cost p50", "cost p90", "latency mean",
                             "latency p50", "latency p90 (ms)"]]
                           + [[a["arm"], a["tokens"]["input"], a["tokens"]["output"],
                               *(_usd(a["cost_usd"][k]) for k in ("mean", "p50", "p90")),
                               *(_ms(a["latency_ms"][k]) for k in ("mean", "p50", "p90"))] for a in arms])]
    lines += ["", "decisions:"] + ["  " + line for line in aligned(
        [[a["arm"] if i == 0 else "", state, ", ".join(f"{d} {k}" for d, k in counts.items())]
         for a in arms for i, (state, counts) in enumerate(a["decisions"].items())])]
    lines += ["", "paths:"] + ["  " + line for line in aligned(
        [[a["arm"] if i == 0 else "", f"{p['count']} ({p['share']:.0%})",
          " -> ".join(p["path"]) or "(no steps)", p["status"]] for a in arms for i, p in enumerate(a["paths"])])]
    if not report["paired"]:
        lines += ["", f"not paired ({report['assign']}): each input ran in one arm, so there is no win/tie/loss "
                      "or paired interval; compare the rates and their intervals above"]
    for c in report["comparisons"]:
        lines += ["", f"{c['arm']} vs {c['baseline']} on {metric} ({report['better']} is better), "
                      f"{c['pairs']} pair(s) over {c['inputs']} input(s): {c['wins']} win(s), {c['ties']} tie(s), "
                      f"{c['losses']} loss(es)" + (f"; {c['skipped']} pair(s) without a value left out"
                                                    if c["skipped"] else "")]
        interval = c["interval"]
        if interval is not None:
            verdict = ("excludes 0: the arms differ" if interval["excludes_zero"]
                       else "includes 0: no difference shown")
            lines.append(f"  mean difference {_signed(c['mean_difference'], metric)}, {interval['level']:.0%} "
                         f"bootstrap interval [{_signed(interval['low'], metric)}, {_signed(interval['high'], metric)}]"
                         f" ({interval['resamples']} resamples, seed {interval['seed']}): {verdict}")
    return lines


def _rate(status: Mapping[str, Any]) -> str:
    if status["rate"] is None:
        return "-"
    return f"{status['count']} ({status['rate']:.1%}) [{status['low']:.1%}, {status['high']:.1%}]"


def _usd(value: float | None) -> str:
    """A run's cost: to the millionth of a dollar (a cheap call costs less than $0.0001)."""
    return "?" if value is None else f"${value:.6f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _number(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    return _usd(value) if metric == "cost" else f"{value:.1f}" if metric == "latency" else f"{value:.3f}"


def _signed(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    text = _usd(abs(value)) if metric == "cost" else f"{abs(value):.1f}" if metric == "latency" \
        else f"{abs(value):.3f}"
    return ("-" if value < 0 else "+") + text
