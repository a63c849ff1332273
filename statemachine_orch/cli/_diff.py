"""`orch diff`: two runs' logs side by side, the first divergence marked. Pure: no I/O.

`compare` aligns the logs by position (every row in seq order, failed steps included) and
builds the report `--json` prints; `text_report` and `markdown_report` word it for a terminal
and for a CI comment. Every piece of stored text passes through `one_line`, so an output's
control characters (escape sequences) reach a terminal escaped, never raw.
"""

from __future__ import annotations

import difflib
import json
import re
from itertools import zip_longest
from typing import Any

from ..types import TransitionRecord, total_cost, total_usage
from ._render import aligned, one_line, usd

DIFF_CONTEXT = 2  # lines of context around a changed line in a text diff
DIFF_LINES = 40  # at most this many lines of one output's diff; the rest is counted
LINE_WIDTH = 200  # a diff line longer than this is cut
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

Pair = tuple[TransitionRecord | None, TransitionRecord | None]


# --------------------------------------------------------------------------- alignment


def align(rows_a: list[TransitionRecord], rows_b: list[TransitionRecord]) -> list[Pair]:
    """The two logs by position: every row in seq order; a path that ended is None."""
    return list(zip_longest(sorted(rows_a, key=_seq), sorted(rows_b, key=_seq)))


def _seq(row: TransitionRecord) -> int:
    return row.seq


def differences(a: TransitionRecord | None, b: TransitionRecord | None) -> list[str]:
    """What differs at one aligned position: `path` (one run has no step there), `state`
    (another state ran, or moved elsewhere), `decision` (another decision, or one step
    failed), `output`. Tokens, cost and latency are not differences of the path."""
    if a is None or b is None:
        return [] if a is b else ["path"]
    found = []
    if (a.from_state, a.to_state) != (b.from_state, b.to_state):
        found.append("state")
    if a.decision != b.decision or (a.error is None) != (b.error is None):
        found.append("decision")
    if not _same_value(a.output, b.output):
        found.append("output")
    return found


def _same_value(a: Any, b: Any) -> bool:
    """Equal as JSON: `1 == 1.0 == True` in Python, not in a stored output."""
    return type(a) is type(b) and a == b if not isinstance(a, dict | list) else _canonical(a) == _canonical(b)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def first_divergence(pairs: list[Pair]) -> int | None:
    """The 1-based position of the first aligned step that differs, None when none does."""
    return next((n for n, (a, b) in enumerate(pairs, 1) if differences(a, b)), None)


# --------------------------------------------------------------------------- output diffs


def json_diff(a: Any, b: Any, path: str = "$") -> list[str]:
    """Where two JSON values differ, one line per difference: `$.items[2].name: "x" -> "y"`,
    `$.key: added 1`, `$.key: removed 1`, `$.items[3]: added {...}`."""
    if isinstance(a, dict) and isinstance(b, dict):
        lines: list[str] = []
        for key in list(a) + [k for k in b if k not in a]:
            where = path + (f".{key}" if _IDENTIFIER.match(str(key)) else f"[{json.dumps(str(key))}]")
            if key not in b:
                lines.append(f"{where}: removed {_json(a[key])}")
            elif key not in a:
                lines.append(f"{where}: added {_json(b[key])}")
            else:
                lines += json_diff(a[key], b[key], where)
        return lines
    if isinstance(a, list) and isinstance(b, list):
        lines = []
        for i, (x, y) in enumerate(zip_longest(a, b, fillvalue=_MISSING)):
            if y is _MISSING:
                lines.append(f"{path}[{i}]: removed {_json(x)}")
            elif x is _MISSING:
                lines.append(f"{path}[{i}]: added {_json(y)}")
            else:
                lines += json_diff(x, y, f"{path}[{i}]")
        return lines
    return [] if _same_value(a, b) else [f"{path}: {_json(a)} -> {_json(b)}"]


_MISSING = object()


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=repr)


def text_diff(a: str, b: str, context: int = DIFF_CONTEXT) -> list[str]:
    """A unified diff of two texts (`-` run A, `+` run B), without the file header lines."""
    lines = difflib.unified_diff(a.splitlines(), b.splitlines(), "A", "B", n=context, lineterm="")
    return [line for line in lines if not line.startswith(("--- ", "+++ "))]


def output_diff(a: TransitionRecord | None, b: TransitionRecord | None, limit: int = DIFF_LINES) -> list[str]:
    """How the outputs of one aligned step differ: a JSON diff when both are structured, else a
    text diff; cut after `limit` lines with "... N more lines". Empty when they are equal."""
    x, y = (None if r is None else r.output for r in (a, b))
    if _same_value(x, y):
        return []
    if isinstance(x, dict | list) and isinstance(y, dict | list):
        lines = json_diff(x, y)
    else:
        lines = text_diff(_as_text(x), _as_text(y))
    if len(lines) > limit:
        lines = [*lines[:limit], f"... {len(lines) - limit} more lines"]
    return lines


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False, default=repr)


# --------------------------------------------------------------------------- the report


def compare(rows_a: list[TransitionRecord], rows_b: list[TransitionRecord]) -> dict[str, Any]:
    """The report `orch diff --json` prints: `same`, `first_divergence`, `steps`, `totals`."""
    pairs = align(rows_a, rows_b)
    steps = [_step(n, a, b) for n, (a, b) in enumerate(pairs, 1)]
    first = first_divergence(pairs)
    divergence = None
    if first is not None:
        step = steps[first - 1]
        divergence = {"position": first, "a": step["a"], "b": step["b"], "what": step["differs"]}
    sums = totals(rows_a, rows_b)
    return {"same": first is None, "first_divergence": divergence, "steps": steps, "totals": sums,
            "usage_differs": first is None and any(t["delta"] not in (0, None) for t in sums.values())}


def _step(position: int, a: TransitionRecord | None, b: TransitionRecord | None) -> dict[str, Any]:
    return {"position": position, "a": _side(a), "b": _side(b), "differs": differences(a, b),
            "output_diff": output_diff(a, b)}


def _side(row: TransitionRecord | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {"seq": row.seq, "state": row.from_state, "to_state": row.to_state, "decision": row.decision,
            "reason": row.reason, "error": row.error, "output": row.output,
            "input_tokens": row.usage.input_tokens, "output_tokens": row.usage.output_tokens,
            "cost_usd": row.cost_usd, "latency_ms": round(row.latency_ms, 3)}


def totals(rows_a: list[TransitionRecord], rows_b: list[TransitionRecord]) -> dict[str, dict[str, Any]]:
    """Steps (log rows, failed ones included), tokens, cost (None when a price is unknown) and
    latency of each run, with the delta B - A (None when either side is None)."""
    def of(rows: list[TransitionRecord]) -> dict[str, Any]:
        usage = total_usage(rows)
        return {"steps": len(rows), "input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
                "cost_usd": total_cost(rows), "latency_ms": round(sum(r.latency_ms for r in rows), 3)}

    x, y = of(rows_a), of(rows_b)
    result: dict[str, dict[str, Any]] = {}
    for key in x:
        delta = None if x[key] is None or y[key] is None else y[key] - x[key]
        if isinstance(delta, float):
            delta = round(delta, 6 if key == "cost_usd" else 3)
        result[key] = {"a": x[key], "b": y[key], "delta": delta}
    return result


def verdict(report: dict[str, Any]) -> str:
    """One line: the same or not, and where they part."""
    first = report["first_divergence"]
    if first is None:
        return "same path, decisions and outputs" + (
            " (tokens, cost or latency differ)" if report["usage_differs"] else "")
    return f"the runs differ: first at step {first['position']} ({', '.join(first['what'])})"


# --------------------------------------------------------------------------- wording


def _pair(step: dict[str, Any], key: str) -> str:
    values = ["-" if side is None else _cell(side[key]) for side in (step["a"], step["b"])]
    return values[0] if values[0] == values[1] else f"{values[0]} / {values[1]}"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return one_line(str(value), 60)


def _cost_pair(step: dict[str, Any]) -> str:
    values = ["-" if side is None else usd(side["cost_usd"]) for side in (step["a"], step["b"])]
    return values[0] if values[0] == values[1] else f"{values[0]} / {values[1]}"


def _reason_pair(step: dict[str, Any]) -> str:
    values = ["-" if side is None else one_line(side["error"] or side["reason"], 50) for side in (step["a"], step["b"])]
    return values[0] if values[0] == values[1] else f"{values[0]} / {values[1]}"


def _table(report: dict[str, Any]) -> list[list[str]]:
    first = report["first_divergence"]
    rows = [["", "pos", "state", "to_state", "decision", "in", "out", "cost", "latency_ms", "differs",
             "reason / error"]]
    for step in report["steps"]:
        mark = ">>" if first is not None and step["position"] == first["position"] else ""
        rows.append([mark, str(step["position"]), _pair(step, "state"), _pair(step, "to_state"),
                     _pair(step, "decision"), _pair(step, "input_tokens"), _pair(step, "output_tokens"),
                     _cost_pair(step), _pair(step, "latency_ms"), ",".join(step["differs"]) or "-",
                     _reason_pair(step)])
    return rows


def _total_lines(report: dict[str, Any]) -> list[list[str]]:
    rows = [["total", "A", "B", "B - A"]]
    for key, t in report["totals"].items():
        if key == "cost_usd":
            a, b = usd(t["a"]), usd(t["b"])
            delta = "?" if t["delta"] is None else f"{t['delta']:+.4f}"
        elif key == "latency_ms":
            a, b = f"{t['a']:.1f}", f"{t['b']:.1f}"
            delta = f"{t['delta']:+.1f}"
        else:
            a, b = str(t["a"]), str(t["b"])
            delta = f"{t['delta']:+.1f}" if isinstance(t["delta"], float) else f"{t['delta']:+d}"
        rows.append([key, a, b, delta])
    return rows


def _diff_lines(step: dict[str, Any]) -> list[str]:
    return [one_line(line, LINE_WIDTH) or " " for line in step["output_diff"]]


def text_report(report: dict[str, Any], run_a: str, run_b: str) -> str:
    """The default report: the aligned table, the output diffs of the steps that differ, totals."""
    lines = [f"A: run {one_line(run_a)}", f"B: run {one_line(run_b)}", ""]
    lines += aligned(_table(report))
    for step in report["steps"]:
        if step["output_diff"]:
            lines += ["", f"step {step['position']} output ({_pair(step, 'state')}):"]
            lines += ["  " + line for line in _diff_lines(step)]
    lines += ["", *aligned(_total_lines(report)), "", verdict(report)]
    return "\n".join(lines)


def markdown_report(report: dict[str, Any], run_a: str, run_b: str) -> str:
    """A Markdown report for a CI comment: a table, fenced diffs, totals."""
    def row(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("\\", "\\\\").replace("|", "\\|") or " " for c in cells) + " |"

    header, *body = _table(report)
    header[0] = "first"
    lines = [f"## orch diff: `{_code(run_a)}` vs `{_code(run_b)}`", "", f"**{verdict(report)}**", "",
             row(header), row(["---"] * len(header)), *(row(r) for r in body)]
    for step in report["steps"]:
        if step["output_diff"]:
            diff = _diff_lines(step)
            fence = "`" * max([3, *(len(run) + 1 for line in diff for run in re.findall("`+", line))])
            lines += ["", f"### step {step['position']} output ({_code(_pair(step, 'state'))})", "",
                      fence + "diff", *diff, fence]
    totals_header, *totals_body = _total_lines(report)
    lines += ["", "### totals", "", row(totals_header), row(["---"] * 4), *(row(r) for r in totals_body)]
    return "\n".join(lines) + "\n"


def _code(text: str) -> str:
    return one_line(text, 120).replace("`", "'")
