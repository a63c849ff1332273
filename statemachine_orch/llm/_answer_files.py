"""Offline answer files: the JSON that `orch run --offline` and `orch resume --offline` read,
spelling the same answers (texts, structured answers, errors, faults, delays) as the Python
kit's `Reply` builders in `_offline`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from dataclasses import replace
from typing import Any

from ._offline import FakeMessagesAPI, Reply, ScriptEntry, disconnect, error, timeout

Rule = tuple[dict[str, Any], dict[str, ScriptEntry]]  # (input fields to match, answers)


def answering_fake(path: str, *, states: Collection[str] | None = None, per_run: bool = False) -> FakeMessagesAPI:
    """The fake Messages API a JSON answer file describes (`load_script`), its "by_input" rules
    included."""
    script, rules = _read(path, states)
    fake = FakeMessagesAPI(script, default="auto", per_run=per_run)
    for when, answers in rules:
        fake.on_input(when, answers)
    return fake


def load_script(path: str, *, states: Collection[str] | None = None) -> dict[str, ScriptEntry]:
    """Read a JSON answer file: {"state" or "state@model": an answer or a list of answers}.

    An answer is a string (its text) or an object with one of "text", "json" (a structured
    answer), "error" (an HTTP status, with optional "message" and "headers") or "fault"
    ("timeout" or "disconnect"), and optionally "delay" (seconds to wait first); "delay"
    alone is the placeholder answer, late. Given the machine's `states`, any other name is
    refused: a misspelt one would leave its state on placeholders. A problem is a
    ValueError naming the file.

    The key "by_input" holds a list of rules, {"when": {input field: value}, "answers": {...}}:
    a run whose input has those field values takes its answers from the first rule that
    has one for the state (`answering_fake` reads them; this returns the general answers).
    """
    return _read(path, states)[0]


def _read(path: str, states: Collection[str] | None) -> tuple[dict[str, ScriptEntry], list[Rule]]:
    with open(path, encoding="utf-8") as handle:
        try:
            raw = json.load(handle)
        except ValueError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: an answer file is a JSON object of state -> answer(s)")
    rules = [_rule(path, number, rule, states) for number, rule in enumerate(raw.pop("by_input", []) or [], 1)]
    return _answers(path, raw, states), rules


def _rule(path: str, number: int, rule: Any, states: Collection[str] | None) -> Rule:
    where = f"{path}: by_input rule {number}"
    if not isinstance(rule, dict) or set(rule) != {"when", "answers"}:
        raise ValueError(f'{where} must be an object with "when" and "answers"')
    when, answers = rule["when"], rule["answers"]
    if not isinstance(when, dict) or not when:
        raise ValueError(f'{where}: "when" must be an object of input fields and the values to match')
    if not isinstance(answers, dict):
        raise ValueError(f'{where}: "answers" must be an object of state -> answer(s)')
    return when, _answers(where, answers, states)


def _answers(path: str, raw: dict[str, Any], states: Collection[str] | None) -> dict[str, ScriptEntry]:
    script: dict[str, ScriptEntry] = {}
    for key, entry in raw.items():
        state = key.split("@", 1)[0]
        if states is not None and state not in states:
            raise ValueError(f"{path}: {state!r} is not a state of the machine (its states: "
                             f"{', '.join(states)}); fix the name")
        try:
            script[key] = [_from_json(e) for e in entry] if isinstance(entry, list) else _from_json(entry)
        except ValueError as exc:
            raise ValueError(f"{path}: {key}: {exc}") from None
    return script


_KINDS = ("text", "json", "error", "fault")
_FAULTS = {"timeout": timeout, "disconnect": disconnect}


def _from_json(entry: Any) -> str | Reply:
    """One answer of an answer file, as the Python kit spells it."""
    if isinstance(entry, str):
        return entry
    if not isinstance(entry, dict):
        raise ValueError(f"{json.dumps(entry)} is not an answer: use a string or an object with one of "
                         f"{', '.join(_KINDS)}")
    kinds = [k for k in _KINDS if k in entry]
    if len(kinds) > 1:
        raise ValueError(f"an answer has one of {', '.join(_KINDS)}, not {' and '.join(kinds)}")
    kind = kinds[0] if kinds else None
    allowed = (*kinds, "delay", *(("message", "headers") if kind == "error" else ()))
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
        expected = ", ".join(allowed if kind else (*_KINDS, "delay"))
        raise ValueError(f"unknown key {unknown[0]!r} (an answer has {expected})")
    delay = entry.get("delay", 0)
    if isinstance(delay, bool) or not isinstance(delay, int | float) or not math.isfinite(delay) or delay < 0:
        raise ValueError(f"delay {delay!r} is not a number of seconds >= 0")
    value = entry.get(kind)
    if kind == "text" and not isinstance(value, str):
        raise ValueError("text must be a string")
    if kind == "json" and not isinstance(value, dict):
        raise ValueError("json must be an object (the tool input of a structured answer)")
    if kind == "error":
        return replace(_error_from_json(value, entry.get("message", "scripted error"), entry.get("headers", {})),
                       hold_s=delay)
    if kind == "fault":
        if value not in _FAULTS:
            raise ValueError(f"fault {value!r} is not one of {', '.join(_FAULTS)}")
        return replace(_FAULTS[value](), hold_s=delay)
    return Reply(text=value if kind == "text" else None, data=value if kind == "json" else None, hold_s=delay)


def _error_from_json(status: Any, message: Any, headers: Any) -> Reply:
    if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
        raise ValueError(f"error {status!r} is not an HTTP error status (400 to 599)")
    if not isinstance(message, str):
        raise ValueError("message must be a string")
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise ValueError('headers must be an object of strings, e.g. {"retry-after": "2"}')
    return error(status, message, headers=headers)
