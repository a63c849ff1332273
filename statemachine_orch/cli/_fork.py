"""`orch fork RUN_ID --at SEQ|STATE ...`: a new run from a stored run's snapshot before one of
its steps, with what-if changes, driven to its end (`Engine.fork`, engine/_fork.py)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from ..definition._loader import load_machine
from ..engine._fork import fork_point, refuse_to_fork
from ..engine._ids import check_run_id, new_run_id
from ..errors import UsageError
from ..types import TransitionRecord
from ._drive import _drive, _report_result, engine_for, model_for
from ._options import at_file, with_store
from ._render import one_line

_FIELDS = (("prompt", "--prompt"), ("system", "--system"), ("model", "--model"), ("max_tokens", "--max-tokens"))


def cmd_fork(args: argparse.Namespace) -> int:
    if args.fork_id is not None:
        check_run_id(args.fork_id)
    at: int | str = int(args.at) if args.at.isdecimal() else args.at
    overrides = overrides_of(args)
    changes = dict(assignment(text, "--set", json_value) for text in args.set or ())
    parent, log = with_store(args, lambda store: store.load_run(args.run_id, verified=True))
    refuse_to_fork(parent)  # before its machine is loaded: a map item's has no module of its own
    loaded = load_machine(args.machine or parent.machine_ref)
    seq, state = fork_point(parent, log, at, loaded.machine)
    before = [row for row in log if row.committed and row.seq < seq]
    model, options, banner, fake = model_for(args.offline or parent.options.get("offline"), loaded.machine,
                                             [(parent, before)])  # offline: each state's answers go on from there
    run_id = args.fork_id or new_run_id()
    if fake is not None:
        fake.inputs[run_id] = {**parent.input, **{k: v for k, v in changes.items() if k in parent.input}}
    result = _drive(args, run_id, banner, create=False, result=loaded.machine.result,
                    open_run=lambda store, kill: engine_for(args, store, model, kill).fork(
                        args.run_id, loaded.machine, at=at, overrides=overrides, set=changes, label=args.label,
                        run_id=run_id, options=options))
    rows = with_store(args, lambda store: store.transitions(run_id))
    counts = fork_counts(rows)
    line = (f"forked from {args.run_id} at seq {seq} ({state}): {counts['inherited']} step(s) inherited, "
            f"{counts['reused']} reused, {counts['paid']} paid")
    if not args.json:
        print(line)
    return _report_result(result, args, extra={"fork": {"from": args.run_id, "at": seq, "state": state,
                                                        "label": args.label, **counts}})


def fork_counts(rows: Sequence[TransitionRecord]) -> dict[str, int]:
    """A fork's steps by where their answers came from: inherited (before the fork point),
    reused (the parent's answer, free), paid (a model call made)."""
    return {"inherited": sum(r.source == "inherited" for r in rows), "reused": sum(r.source == "reused" for r in rows),
            "paid": sum(bool(r.call_requests()) for r in rows)}


def overrides_of(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The overrides the flags give, by state: `--prompt STATE=TEXT|@FILE`, `--system` alike,
    `--model STATE=M`, `--max-tokens STATE=N`."""
    overrides: dict[str, dict[str, Any]] = {}
    for field, flag in _FIELDS:
        for text in getattr(args, field) or ():
            state, value = assignment(text, flag, whole_number if field == "max_tokens" else str)
            if field in ("prompt", "system") and value.startswith("@"):  # the text of a file
                value = at_file(value[1:], flag)
            overrides.setdefault(state, {})[field] = value
    return overrides


def assignment(text: str, flag: str, convert: Any) -> tuple[str, Any]:
    """(name, converted value) of `NAME=VALUE`; a UsageError naming the flag when it is not one."""
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise UsageError(f"{flag} {text!r} is not NAME=VALUE", fix=f"write {flag} NAME=VALUE")
    try:
        return name, convert(value)
    except ValueError as exc:
        raise UsageError(f"{flag} {name}: {exc}", fix=f"write {flag} {name}=VALUE") from None


def json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise ValueError(f"{one_line(text, 60)!r} is not JSON (quote text: '\"...\"')") from None




def whole_number(text: str) -> int:
    if not text.isdecimal() or int(text) < 1:
        raise ValueError(f"{text!r} is not a number of tokens (1 or more)")
    return int(text)

