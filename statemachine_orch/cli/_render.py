"""How the CLI prints runs, logs, attempts, snapshots and machines: tables and JSON shapes."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..engine._position import Position
from ..store._contract import RunSummary
from ..types import END, Attempt, Parent, RunRecord, RunStatus, TransitionRecord, total_cost, total_usage

if TYPE_CHECKING:
    from ..definition._machine import Machine
    from ..definition._states import State


def print_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
    print("\n".join(aligned([headers, *rows])))


def aligned(rows: Sequence[Sequence[Any]]) -> list[str]:
    """Rows as lines of left-aligned columns, two spaces apart (None an empty cell)."""
    cells = [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(map(len, column)) for column in zip(*cells, strict=True)]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]


def one_line(text: str | None, limit: int = 80) -> str:
    """Text for one terminal line: whitespace runs become a space, control characters (escape
    sequences, U+2028...) are shown escaped, long text is cut."""
    if not text:
        return ""
    flat = _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), " ".join(text.split()))
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def usd(value: float | None) -> str:
    return "?" if value is None else f"${value:.4f}"


def cost_text(cost: float | None, in_doubt_calls: int, in_doubt_usd: float | None, *, of_it: str = " of it") -> str:
    """A cost total, saying how much of it is the worst case of calls in doubt."""
    return usd(cost) + (f" (up to {usd(in_doubt_usd)}{of_it} in doubt)" if in_doubt_calls else "")


def log_row(row: TransitionRecord) -> dict[str, Any]:
    u = row.usage
    return {
        "run_id": row.run_id, "seq": row.seq, "from_state": row.from_state, "to_state": row.to_state,
        "decision": row.decision, "reason": row.reason, "attempt": row.attempt,
        "started_at": row.started_at, "latency_ms": round(row.latency_ms, 3),
        "input_tokens": u.input_tokens, "output_tokens": u.output_tokens,
        "cache_read_tokens": u.cache_read_tokens, "cache_write_tokens": u.cache_write_tokens,
        "cost_usd": row.cost_usd, "calls": calls_of(row), "source": row.source,
        "request_id": row.request_id, "in_doubt": row.in_doubt, "error": row.error,
    }


def child_row(child: RunSummary) -> dict[str, Any]:
    """A child run as `orch show` and `orch log` list it: where it belongs, how it ended."""
    return {"run_id": child.run_id, "machine": child.machine, "state": placed(child).state,
            "item": placed(child).item, "status": child.status.value, "stale": child.stale, "steps": child.steps,
            "input_tokens": child.input_tokens, "output_tokens": child.output_tokens, "cost_usd": child.cost_usd,
            "in_doubt_calls": child.in_doubt_calls, "in_doubt_usd": child.in_doubt_usd, "error": child.error}


def placed(child: RunSummary) -> Parent:
    """Where a listed child run belongs (`Store.list_runs(parent=...)` says it for each)."""
    assert child.parent is not None
    return child.parent


def calls_of(row: TransitionRecord) -> int:
    """Model calls the step made: its failed attempts plus the one that answered."""
    return len(row.call_requests())


def attempt_row(row: TransitionRecord, a: Attempt) -> dict[str, Any]:
    return {"run_id": row.run_id, "seq": row.seq, "state": row.from_state, "attempt": a.number,
            "started_at": a.started_at, "kind": a.kind, "status_code": a.status_code,
            "request_id": a.request_id, "delay_s": a.delay_s, "input_tokens": a.usage.input_tokens,
            "output_tokens": a.usage.output_tokens, "cost_usd": a.cost_usd, "error": a.error}


def status_text(status: RunStatus, stale: bool) -> str:
    return status.value + (" (owner gone: resume it)" if stale else "")


def totals_line(rows: list[TransitionRecord]) -> str:
    t = totals(rows)
    doubt = t["in_doubt_calls"]
    return (f"total: {t['steps']} step(s), {t['input_tokens']} in / {t['output_tokens']} out tokens "
            f"({t['cache_read_tokens']} cache read, {t['cache_write_tokens']} cache write), "
            f"{cost_text(t['cost_usd'], doubt, t['in_doubt_usd'])}, {t['calls']} call(s)"
            f"{f' ({doubt} in doubt)' if doubt else ''}, {t['cache_hits']} cache hit(s)"
            + "".join(f", {n} {source}" for source in ("inherited", "reused")
                      if (n := sum(r.source == source for r in rows))))


def snapshot_view(record: RunRecord, rows: list[TransitionRecord]) -> dict[str, Any]:
    position = Position.after(rows, rows[0].from_state if rows else "")  # the first row ran the initial state
    state, attempt = position.state, position.attempt
    last = rows[-1] if rows else None
    pending = last.output if last is not None and last.to_state is None else None
    return {"status": record.status.value, "next_state": None if state in ("", END) else state,
            "attempt": attempt, "seq": last.seq if last else 0, "owned": record.owner is not None and not record.stale,
            "error": record.error, "pending_answer": pending}


def totals(rows: list[TransitionRecord]) -> dict[str, Any]:
    """A run's totals. `cost_usd` includes the calls in doubt (in flight when a process died)
    at their worst case, `in_doubt_usd` says how much of it that is."""
    usage = total_usage(rows)
    doubts = [a.cost_usd for r in rows for a in r.attempts if a.kind == "in_doubt"]
    return {"steps": sum(1 for r in rows if r.to_state), "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens, "cache_read_tokens": usage.cache_read_tokens,
            "cache_write_tokens": usage.cache_write_tokens, "cost_usd": total_cost(rows),
            "calls": sum(calls_of(r) for r in rows), "cache_hits": sum(r.source == "cache" for r in rows),
            "in_doubt_calls": len(doubts), "in_doubt_usd": None if None in doubts else sum(doubts)}


def as_block(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False)


def indent(text: str, width: int = 2) -> str:
    return "\n".join(" " * width + line for line in text.splitlines())


def mermaid(machine: Machine) -> str:
    """A `stateDiagram-v2`: an edge per decision; a state that starts child runs is labelled
    with what it runs (state diagrams have no subroutine shape) and drawn with a thick border."""
    lines = ["stateDiagram-v2", f"    [*] --> {machine.initial}"]
    for state in machine.states:
        for decision, target in sorted(machine.edges(state.name).items()):
            lines.append(f"    {state.name} --> {'[*]' if target == END else target}: {decision}")
    fanning = {name: _fans_out(machine.by_name[name]) for name in machine.children}
    lines += [f'    state "{name} ({label})" as {name}' for name, label in fanning.items()]
    if fanning:
        lines += ["    classDef children stroke-width:3px", f"    class {','.join(fanning)} children"]
    return "\n".join(lines)


def _fans_out(state: State) -> str:
    """What a machine, map or parallel state runs, as its label says it."""
    from ..definition._states import MachineState, MapState, ParallelState  # here: `show` and `log` load no definitions

    if isinstance(state, MapState):
        return f"map: each={state.each.name}, concurrency {state.concurrency}"
    if isinstance(state, ParallelState):
        return f"parallel: {', '.join(b.name for b in state.branches)}"
    assert isinstance(state, MachineState)
    return f"machine: {state.machine.name}"
