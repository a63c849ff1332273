"""What-if changes to a machine's states for some runs: a fork's or an experiment arm's.

An override changes what an LLM state asks (prompt, system, model, max_tokens, params) or
where a state's decisions lead (`on`, its branch table), by state name. The changed machine
is validated like any other, so an override naming an unknown state or template variable is
refused with the usual message. A run made with overrides stores them (`options["overrides"]`)
and every later touch (resume, replay, a worker) applies them again; the machine's code hash
stays the code's: overrides are recorded apart from it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import UsageError
from ..types import END, decision_from_value
from ._machine import Machine
from ._states import LLMState

OPTION = "overrides"  # the run option that holds them


class StateOverride(BaseModel):
    """The changes to one state; a field left out keeps the state's own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str | None = None
    system: str | None = None
    model: str | None = None
    max_tokens: int | None = Field(default=None, gt=0)
    params: dict[str, Any] | None = None  # merged over the state's own params
    on: dict[str, str] | None = None  # decision value ("continue", "branch:x") -> target, over the state's own

    @property
    def asks_differently(self) -> bool:
        """Whether it changes the request an LLM state sends."""
        return any(v is not None for v in (self.prompt, self.system, self.model, self.max_tokens, self.params))


Overrides = Mapping[str, StateOverride]


def parse_overrides(data: Any, *, where: str) -> dict[str, StateOverride]:
    """Overrides from JSON data (`{"state": {"prompt": ...}}`); `where` names their source in
    the one-line error (a file, an option) that refuses anything else."""
    if not isinstance(data, Mapping) or not all(isinstance(k, str) for k in data):
        raise UsageError(f"{where}: overrides must be a table of state names", fix='write {"state": {"model": "..."}}')
    parsed = {}
    for state, changes in data.items():
        try:
            parsed[state] = StateOverride.model_validate(changes)
        except ValidationError as exc:
            problem = exc.errors()[0]
            field = ".".join(map(str, problem["loc"])) or "value"
            raise UsageError(f"{where}: state '{state}': {field}: {problem['msg']}",
                             fix="use prompt, system, model, max_tokens, params or on") from None
    return parsed


def overrides_json(overrides: Overrides) -> dict[str, Any]:
    """As stored with a run: each state's changes, the unset fields left out."""
    return {state: o.model_dump(exclude_none=True) for state, o in sorted(overrides.items()) if
            o.model_dump(exclude_none=True)}


def stored_overrides(options: Mapping[str, Any]) -> dict[str, StateOverride]:
    """The overrides a run was made with (none: {})."""
    return parse_overrides(options.get(OPTION) or {}, where="the run's stored overrides")


def with_overrides(machine: Machine, overrides: Overrides) -> Machine:
    """`machine` with `overrides` applied (itself when there are none); each variant is built
    and validated once per machine. Given a variant, the overrides apply to its base machine."""
    machine = machine.__dict__.get("_base", machine)
    if not overrides:
        return machine
    key = json.dumps(overrides_json(overrides), sort_keys=True)
    variants: dict[str, Machine] = machine.__dict__.setdefault("_variants", {})
    if key not in variants:
        variants[key] = _build(machine, overrides)
    return variants[key]


def _target(machine: Machine, name: str) -> str:
    """A transition's target as an override names it: "END" (the name of the constant, as
    the refusal of an unknown target suggests it) is the end, unless a state is so named."""
    return END if name == "END" and name not in machine.by_name else name


def _build(machine: Machine, overrides: Overrides) -> Machine:
    unknown = sorted(set(overrides) - set(machine.by_name))
    if unknown:
        raise UsageError(f"machine '{machine.name}' has no state {', '.join(map(repr, unknown))} to override",
                         fix=f"name one of {', '.join(machine.by_name)}")
    states = []
    for state in machine.states:
        change = overrides.get(state.name)
        if change is None:
            states.append(state)
            continue
        fields: dict[str, Any] = {}
        if change.asks_differently:
            if not isinstance(state, LLMState):
                raise UsageError(f"state '{state.name}' of machine '{machine.name}' makes no model call, so its "
                                 "prompt, system, model, max_tokens and params cannot be overridden",
                                 fix="override only `on` for it")
            fields = {name: value for name in ("prompt", "system", "model", "max_tokens")
                      if (value := getattr(change, name)) is not None}
            if change.params is not None:
                fields["params"] = {**state.params, **change.params}
        if change.on is not None:
            try:
                fields["on"] = {**state.on, **{decision_from_value(k): _target(machine, v)
                                               for k, v in change.on.items()}}
            except ValueError as exc:
                raise UsageError(f"state '{state.name}': {exc}",
                                 fix="name decisions as continue, skip, retry, branch_a, branch_b, terminate or "
                                     "branch:NAME") from None
        states.append(replace(state, **fields))
    variant = Machine(machine.name, states, model=machine.model, input_model=machine.input_model,
                      input_vars=machine.input_vars, max_branch_depth=machine.max_branch_depth,
                      description=machine.description, retry_policy=machine.retry_policy, budget=machine.budget,
                      context_tokens=machine.context_tokens, source_file=machine.source_file, result=machine.result)
    variant.module = machine.module
    variant.__dict__["_base"] = machine
    variant._ref = machine.ref
    variant.__dict__["source_hash"] = machine.source_hash  # the code's hash: overrides are stored apart
    return variant
