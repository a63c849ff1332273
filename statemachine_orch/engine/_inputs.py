"""The run input: validated against the machine's input model, and turned into template values."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from ..definition._machine import Machine
from ..errors import InputError
from ._outputs import first_error

CHARS_PER_TOKEN = 4  # a typical average: the check only stops inputs that clearly cannot fit
MAX_DEPTH = 256  # deeper JSON is refused before it can exhaust the recursion limit anywhere
_as_json = json.JSONEncoder(ensure_ascii=False, allow_nan=False).encode  # built once, used per run


def _depth(value: Any) -> int:
    """Nesting depth of lists and objects, without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, level = todo.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            if level > MAX_DEPTH:
                return level
            todo.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def validate_input(machine: Machine, data: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(input for contexts, input as stored, template values from the input) or InputError.

    An instance of the machine's input model is taken as its fields: checked as that dict
    would be, and stored as one, so a resume reads back what this run starts with."""
    input_model = machine.input_model
    if data is None:
        data = {}
    elif input_model is not None and isinstance(data, input_model):
        data = data.model_dump(mode="json")
    if not isinstance(data, dict):
        if input_model is None:
            raise InputError(f"run input must be a JSON object, got {type(data).__name__}",
                             fix='wrap it, e.g. {"data": ...}')
        raise InputError(f"run input must be a JSON object or a {input_model.__name__}, got {type(data).__name__}",
                         fix=f"pass a {input_model.__name__} or a dict of its fields", model=input_model.__name__)
    if data and _depth(data) > MAX_DEPTH:
        raise InputError(f"input is nested too deeply (more than {MAX_DEPTH} levels); flatten it")
    values: dict[str, Any] = {}
    if input_model is not None:
        try:
            model = input_model.model_validate(data)
        except ValidationError as exc:
            raise InputError(
                f"input does not match {input_model.__name__}: {first_error(exc, 'input')} "
                f"({exc.error_count()} error(s))", fix=f"pass an input that matches {input_model.__name__}",
                model=input_model.__name__) from None
        stored = model.model_dump(mode="json")
        values.update((name, getattr(model, name)) for name in input_model.model_fields)
        context_input: Any = model
    else:
        stored = data
        context_input = data
    for name, fn in machine.input_vars.items():
        try:
            values[name] = fn(context_input)
        except Exception as exc:
            raise InputError(f"input_vars[{name!r}] failed on this input: "
                             f"{type(exc).__name__}: {exc}; fix the input or the function") from None
    if not stored:
        return context_input, stored, values  # nothing to encode or to measure
    try:
        text = _as_json(stored)
        text.encode("utf-8")  # lone surrogates cannot be stored or sent
    except (TypeError, ValueError) as exc:
        raise InputError(f"input is not valid JSON data: {str(exc)[:200]}; fix the input") from None
    estimate = len(text) // CHARS_PER_TOKEN
    if estimate > machine.context_tokens:
        raise InputError(f"input is about {estimate:,} tokens, more than fits in the model's context "
                         f"({machine.context_tokens:,}); pass less data, or raise "
                         "Machine(context_tokens=...) for a larger model")
    return context_input, stored, values
