"""Outputs as a run sees them: validated models, `InvalidOutput`, or plain JSON data."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import to_jsonable_python

from ..definition._states import MapState, ParallelState, State
from ..types import INVALID_MARKER, ITEM_ERROR_MARKER, InvalidOutput, ItemError


def restore_output(state: State, value: Any) -> Any:
    """`value` as `state`'s output: its `output` model validated, a stored InvalidOutput
    rebuilt, a map state's items each as its each= state's output, anything else as JSON data
    (ValueError/TypeError when it is none of these)."""
    if isinstance(value, dict) and len(value) == 1:
        if INVALID_MARKER in value:
            return InvalidOutput(**value[INVALID_MARKER])
        if ITEM_ERROR_MARKER in value:
            return ItemError(**value[ITEM_ERROR_MARKER])
    if isinstance(value, (InvalidOutput, ItemError)):
        return value
    if isinstance(state, MapState) and isinstance(state.each, State) and state.reduce is None and type(value) is list:
        return [restore_output(state.each, item) for item in value]
    if isinstance(state, ParallelState) and type(value) is dict:
        return {b.name: restore_output(b, value.get(b.name)) for b in state.branches}
    if state.output is not None:
        if isinstance(value, state.output):
            return value
        try:
            return state.output.model_validate(value)
        except ValidationError as exc:
            raise ValueError(f"does not match {state.output.__name__}: {first_error(exc)}") from None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return json.loads(json.dumps(value, allow_nan=False))


def json_data(value: Any, *, by_alias: bool = True) -> Any:
    """`value` as it is stored: plain JSON data (a model dumped); ValueError or TypeError when it
    is not JSON data, NaN and Infinity included (stored, they would read back as null)."""
    return json.loads(json.dumps(to_jsonable_python(value, by_alias=by_alias), allow_nan=False))


def named_outputs(state: State, output: Any) -> Iterator[tuple[str, Any]]:
    """The outputs a committed step makes readable by name: the state's own, and each branch's
    of a parallel state."""
    yield state.name, output
    if isinstance(state, ParallelState) and isinstance(output, dict):
        for branch in state.branches:
            yield branch.name, output.get(branch.name)


def first_error(exc: ValidationError, whole: str = "value") -> str:
    """`loc.path: message` of the first error (`whole` when it is about the value itself)."""
    first = exc.errors()[0]
    return f"{'.'.join(str(p) for p in first['loc']) or whole}: {first['msg']}"
