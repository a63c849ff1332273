"""An A/B experiment (`orch ab`): the same machine over the same inputs, once per arm, each arm
a set of overrides (`definition/_overrides.py`).

Each arm is a batch (`_batch`) with the id `EXP.ARM`, whose runs carry the experiment and
the arm and are made with the arm's overrides. Input line L's repeat r (of R) is run number
`(L - 1) * R + r` in every arm it goes to, so the same number is the same input and repeat
in every arm: runs pair by number. Where inputs go (`plan`): every input to every arm
("paired"), or each input to one arm, by a sha256 of one of its fields ("hash:FIELD": the same
value always goes to the same arm) or by `random.Random(seed)` ("random"). The arms run side by
side, the concurrency shared among them, so time-dependent conditions (the API's latency, its
rate limits) fall on every arm alike. Running the same experiment id again resumes it, as a
batch resumes; with other arms or settings it is refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from ..definition._machine import Machine
from ..definition._overrides import OPTION, Overrides, overrides_json, with_overrides
from ..errors import DefinitionError, UsageError
from ..limits import Budget, Usage
from ._batch import Batch, BatchProgress, BatchResult, Input

if TYPE_CHECKING:
    from ._engine import Engine

SETTINGS = "experiment"  # the run option that holds the experiment's settings (`Settings.to_json`)
ASSIGNMENTS = ("paired", "hash:FIELD", "random")
_ARM = re.compile(r"[A-Za-z0-9_-]+")
In = TypeVar("In", bound=Input)


def check_arm_name(name: str) -> None:
    if not _ARM.fullmatch(name):
        raise UsageError(f"arm name {name!r} is not valid", fix="name an arm with letters, digits, '_' or '-'")


def arm_batch_id(experiment: str, arm: str) -> str:
    """The batch id of an arm's runs."""
    return f"{experiment}.{arm}"


def run_number(line: int, repeat: int, repeats: int) -> int:
    """The run number (from 1) of input `line`'s `repeat`-th run (both from 1), of `repeats`."""
    return (line - 1) * repeats + repeat


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """How an experiment spreads its inputs: stored with each of its runs, and checked when it
    is run again."""

    arms: tuple[str, ...]  # in the order given: the first is the report's baseline
    assign: str = "paired"  # "paired", "hash:FIELD" or "random"
    seed: int = 0
    repeat: int = 1

    def __post_init__(self) -> None:
        if len(self.arms) < 2:
            raise UsageError(f"an experiment needs at least 2 arms, not {len(self.arms)}",
                             fix="give a control arm and at least one other")
        for name in self.arms:
            check_arm_name(name)
        twice = sorted({a for a in self.arms if self.arms.count(a) > 1})
        if twice:
            raise UsageError(f"arm {twice[0]!r} is given twice", fix="give each arm a name of its own")
        if self.assign not in ("paired", "random") and not (self.assign.startswith("hash:") and self.assign[5:]):
            raise UsageError(f"assignment {self.assign!r} is not known", fix=f"use one of {', '.join(ASSIGNMENTS)}")
        if isinstance(self.repeat, bool) or not isinstance(self.repeat, int) or self.repeat < 1:
            raise UsageError(f"repeat {self.repeat!r} is not a number of runs", fix="give 1 or more")

    @property
    def paired(self) -> bool:
        return self.assign == "paired"

    def to_json(self) -> dict[str, Any]:
        return {"arms": list(self.arms), "assign": self.assign, "seed": self.seed, "repeat": self.repeat}


def plan(inputs: Mapping[int, In], settings: Settings) -> dict[str, dict[int, In]]:
    """Each arm's runs: run number -> input (`run_number`), by `settings.assign` (see the module
    docstring). `inputs` are numbered by line; a random assignment draws once for every line up
    to the last, so a line dropped or added at the end moves no other line's arm."""
    arms = settings.arms
    runs: dict[str, dict[int, In]] = {arm: {} for arm in arms}
    draws = random.Random(settings.seed)
    chosen = {line: draws.randrange(len(arms)) for line in range(1, max(inputs, default=0) + 1)}
    for line, data in sorted(inputs.items()):
        if settings.paired:
            targets: Sequence[str] = arms
        elif settings.assign == "random":
            targets = [arms[chosen[line]]]
        else:
            targets = [arms[_hashed(data, settings.assign[5:], line) % len(arms)]]
        for arm in targets:
            for repeat in range(1, settings.repeat + 1):
                runs[arm][run_number(line, repeat, settings.repeat)] = data
    return runs


def _hashed(data: Input, field: str, line: int) -> int:
    """A stable number for the value of `field` in input `line`: the first 8 bytes of the sha256
    of its JSON (so "7" and 7 differ, and no process's hash seed matters)."""
    values = data.model_dump(mode="json") if isinstance(data, BaseModel) else data
    if not isinstance(values, Mapping) or field not in values:
        raise UsageError(f"input {line} has no field {field!r} to assign an arm by",
                         fix=f"give every input a {field!r}, or assign by another field")
    text = json.dumps(values[field], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def arm_machine(machine: Machine, overrides: Overrides, *, label: str) -> Machine:
    """`machine` with an arm's overrides, validated: a bad arm is refused, its error starting
    with `label` (the arm, and where its overrides come from)."""
    try:
        return with_overrides(machine, overrides)
    except DefinitionError as exc:
        more = f" (and {len(exc.problems) - 1} more)" if len(exc.problems) > 1 else ""
        raise UsageError(f"{label}: {exc.problems[0] if exc.problems else exc}{more}") from None
    except UsageError as exc:
        raise UsageError(f"{label}: {exc.what}", fix=exc.fix) from None


class Experiment:
    """One pass over an experiment's arms (see the module docstring); `request_stop` stops it."""

    def __init__(self, engine: Engine, machine: Machine, arms: Mapping[str, Overrides],
                 inputs: Mapping[int, Input], *, experiment_id: str, settings: Settings, concurrency: int = 8,
                 machine_ref: str | None = None, options: dict[str, Any] | None = None,
                 budget: Budget | None = None, on_progress: Callable[[BatchProgress], None] | None = None) -> None:
        if list(arms) != list(settings.arms):
            raise UsageError(f"the arms {', '.join(arms)} are not the settings' {', '.join(settings.arms)}",
                             fix="give the same arms, in the same order")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise UsageError(f"concurrency={concurrency!r} is not a whole number of runs >= 1", fix="give 1 or more")
        self.experiment_id, self.settings, self.engine, self.machine = experiment_id, settings, engine, machine
        self.on_progress = on_progress
        self.overrides = {arm: overrides_json(o) for arm, o in arms.items()}
        for arm, overrides in arms.items():  # every arm is refused before anything runs
            engine.compiled(arm_machine(machine, overrides, label=f"arm {arm}"))
        share = max(1, concurrency // len(arms))  # side by side: each arm its share of the concurrency
        self.batches = {arm: Batch(engine, machine, runs, batch_id=arm_batch_id(experiment_id, arm),
                                   concurrency=share, machine_ref=machine_ref, budget=budget,
                                   options={**(options or {}), OPTION: self.overrides[arm],
                                            SETTINGS: settings.to_json()},
                                   on_progress=self._report, experiment=experiment_id, arm=arm)
                        for arm, runs in plan(inputs, settings).items()}
        self.progress = BatchProgress(batch_id=experiment_id, total=sum(len(b.inputs) for b in self.batches.values()))

    async def run(self) -> dict[str, BatchResult]:
        """Each arm's batch result, once every arm has run (or stopped)."""
        await self._refuse_other_settings()
        self.progress.started = time.monotonic()
        results = await asyncio.gather(*(batch.run() for batch in self.batches.values()))
        return dict(zip(self.batches, results, strict=True))

    def request_stop(self, grace_s: float = 30.0) -> None:
        """Start no more runs in any arm (see `Batch.request_stop`). Safe in a signal handler."""
        for batch in self.batches.values():
            batch.request_stop(grace_s)

    def interrupt(self) -> bool:
        return any([batch.interrupt() for batch in self.batches.values()])

    async def _refuse_other_settings(self) -> None:
        """An experiment run before goes on only with the same arms, overrides and settings: its
        runs would not compare otherwise."""
        store = self.engine.store
        for batch in self.batches.values():  # an arm's batch id taken by an `orch batch`: refused
            await batch.stored_runs()
        seen: set[str] = set()
        for summary in await store.list_runs(experiment=self.experiment_id, limit=None):
            if summary.arm in seen:
                continue
            seen.add(str(summary.arm))
            if summary.machine != self.machine.name:
                raise UsageError(f"experiment {self.experiment_id} is one of machine '{summary.machine}', not "
                                 f"'{self.machine.name}'", fix="use a new experiment id")
            options = (await store.get_run(summary.run_id)).options
            if summary.arm not in self.overrides or options.get(SETTINGS) != self.settings.to_json():
                raise UsageError(f"experiment {self.experiment_id} was started with other arms or settings "
                                 f"({_described(options.get(SETTINGS))})",
                                 fix="run it again with the same arms and settings, or use a new experiment id")
            if options.get(OPTION, {}) != self.overrides[summary.arm]:
                raise UsageError(f"arm {summary.arm} of experiment {self.experiment_id} was started with other "
                                 "overrides", fix="restore its arm file, or use a new experiment id")

    def _report(self, _: BatchProgress) -> None:
        """Every arm's progress, summed into the experiment's."""
        total = self.progress
        arms = [batch.progress for batch in self.batches.values()]
        for name in ("completed", "failed", "not_started", "interrupted", "waiting", "running", "already_done"):
            setattr(total, name, sum(getattr(p, name) for p in arms))
        total.usage = Usage()
        for p in arms:
            total.usage.add(p.usage)
        total.cost_usd = sum(p.cost_usd for p in arms)
        if self.on_progress is not None:
            self.on_progress(total)


def _described(settings: Any) -> str:
    if not isinstance(settings, Mapping):
        return "none stored"
    return (f"arms {', '.join(map(str, settings.get('arms', [])))}, assign {settings.get('assign')}, "
            f"seed {settings.get('seed')}, repeat {settings.get('repeat')}")
