"""`orch diff RUN_A RUN_B`: two real runs compared step by step (the real `orch` against the
fake Messages API or its offline scripts), and the pure functions of cli/_diff.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from statemachine_orch.cli._diff import align, compare, first_divergence, json_diff, output_diff, text_diff
from statemachine_orch.limits import Usage
from statemachine_orch.testing import FakeMessagesAPI, error
from statemachine_orch.types import TransitionRecord

from .helpers import ANSWER, MACHINES, ROUTER, UNSAFE, Orch, orch_against, write

EXTRACT = MACHINES / "extract.py"
EXTRACT_INPUT = MACHINES / "extract_input.json"
HAPPY = "I love the new tent! Set up in five minutes and stayed dry all weekend."


# --------------------------------------------------------------------------- end to end


def routed(tmp_path: Path, *answers: tuple[str, str, str]) -> Orch:
    """A database with one support_router run per (run id, sentiment answer, reply answer)."""
    fake = FakeMessagesAPI(default=None)
    ticket = write(tmp_path / "ticket.json", json.dumps({"text": HAPPY}))
    with orch_against(fake, tmp_path / "orch.db") as orch:
        for run_id, sentiment, reply in answers:
            fake.on("sentiment_analysis", sentiment)
            fake.on({"positive": "upsell", "negative": "support"}.get(sentiment, "standard_reply"), reply)
            orch.ok("-q", "run", ROUTER, "--input", ticket, "--run-id", run_id)
        return orch


def test_identical_runs_are_the_same(tmp_path: Path) -> None:
    orch = routed(tmp_path, ("a", "positive", "Thanks!"), ("b", "positive", "Thanks!"))
    report = orch.json("diff", "a", "b")
    assert (report["same"], report["first_divergence"]) == (True, None)
    assert [s["differs"] for s in report["steps"]] == [[], []]
    assert [s["a"]["state"] for s in report["steps"]] == ["sentiment_analysis", "upsell"]
    assert report["totals"]["steps"] == {"a": 2, "b": 2, "delta": 0}
    text = orch.ok("diff", "a", "b").stdout
    assert text.splitlines()[-1].startswith("same path, decisions and outputs")
    assert ">>" not in text


def test_different_routing_exits_1_at_the_routing_step(tmp_path: Path) -> None:
    orch = routed(tmp_path, ("a", "positive", "Thanks!"), ("b", "negative", "Sorry!"))
    result = orch("diff", "a", "b", "--json")
    assert result.code == 1, result.stderr
    report = json.loads(result.stdout)
    first = report["first_divergence"]
    assert report["same"] is False
    assert first["position"] == 1 and first["what"] == ["state", "decision", "output"]
    assert (first["a"]["decision"], first["b"]["decision"]) == ("branch_a", "branch_b")
    assert (first["a"]["to_state"], first["b"]["to_state"]) == ("upsell", "support")
    assert "sentiment negative" in first["b"]["reason"]
    assert report["steps"][0]["output_diff"] == ["@@ -1 +1 @@", "-positive", "+negative"]
    assert (report["steps"][1]["a"]["state"], report["steps"][1]["b"]["state"]) == ("upsell", "support")
    totals = report["totals"]
    for key in ("input_tokens", "output_tokens", "latency_ms"):
        assert totals[key]["delta"] == pytest.approx(totals[key]["b"] - totals[key]["a"])

    text = orch("diff", "a", "b")
    assert text.code == 1
    marked = [line for line in text.stdout.splitlines() if line.startswith(">>")]
    assert len(marked) == 1 and "branch_a / branch_b" in marked[0]
    assert "-positive" in text.stdout and "+negative" in text.stdout
    assert text.stdout.splitlines()[-1] == "the runs differ: first at step 1 (state, decision, output)"


@pytest.mark.slow  # in the default run: the routing and output differences
def test_a_failed_step_is_a_step_with_its_error(tmp_path: Path) -> None:
    fake = FakeMessagesAPI(default=None)
    ticket = write(tmp_path / "ticket.json", json.dumps({"text": HAPPY}))
    with orch_against(fake, tmp_path / "orch.db") as orch:
        fake.on("sentiment_analysis", "positive", "positive").on("upsell", "Thanks!", error(400, "bad \x1b[2J"))
        orch.ok("-q", "run", ROUTER, "--input", ticket, "--run-id", "a")
        assert orch("-q", "run", ROUTER, "--input", ticket, "--run-id", "b").code == 1
    result = orch("diff", "a", "b", "--json")
    assert result.code == 1
    first = json.loads(result.stdout)["first_divergence"]
    assert first["position"] == 2 and "decision" in first["what"]
    assert (first["a"]["decision"], first["b"]["decision"], first["b"]["to_state"]) == ("continue", None, None)
    assert "400" in first["b"]["error"]
    text = orch("diff", "a", "b").stdout
    assert "continue / -" in text and not UNSAFE.search(text)


def test_output_and_tokens_differences(tmp_path: Path) -> None:
    orch = routed(tmp_path, ("a", "positive", "line one\nline two\nline three"),
                  ("b", "positive", "line one\nline 2\nline three"))
    result = orch("diff", "a", "b", "--json")
    assert result.code == 1
    report = json.loads(result.stdout)
    assert report["first_divergence"]["position"] == 2 and report["first_divergence"]["what"] == ["output"]
    assert report["steps"][1]["output_diff"] == ["@@ -1,3 +1,3 @@", " line one", "-line two", "+line 2",
                                                 " line three"]


def extract_script(tmp_path: Path, name: str, change: dict[str, Any]) -> Path:
    answers = json.loads((MACHINES / "extract.offline.json").read_text())
    answers["extract_invoice"]["json"].update(change)
    return write(tmp_path / name, json.dumps(answers))


def test_a_structured_output_difference_is_a_json_diff(tmp_path: Path) -> None:
    orch = Orch(tmp_path / "orch.db")
    orch.ok("-q", "run", EXTRACT, "--input", EXTRACT_INPUT, "--offline", "--run-id", "a")
    items = json.loads((MACHINES / "extract.offline.json").read_text())["extract_invoice"]["json"]["line_items"]
    items[2] = {**items[2], "description": "Dry bag 30L"}
    orch.ok("-q", "run", EXTRACT, "--input", EXTRACT_INPUT, "--run-id", "b",
            "--offline", extract_script(tmp_path, "b.json", {"line_items": items, "vendor": "Alpine Supply"}))
    result = orch("diff", "a", "b", "--json")
    assert result.code == 1
    report = json.loads(result.stdout)
    assert report["first_divergence"]["position"] == 1 and report["first_divergence"]["what"] == ["output"]
    assert report["steps"][0]["output_diff"] == ['$.vendor: "Alpine Supply Co." -> "Alpine Supply"',
                                                 '$.line_items[2].description: "Dry bag 20L" -> "Dry bag 30L"']
    assert '$.line_items[2].description: "Dry bag 20L" -> "Dry bag 30L"' in orch("diff", "a", "b").stdout


@pytest.mark.slow  # in the default run: the text and --json reports
def test_markdown_report(tmp_path: Path) -> None:
    orch = routed(tmp_path, ("a", "positive", "Thanks!"), ("b", "negative", "Sorry ```x``` !"))
    result = orch("diff", "a", "b", "--md")
    assert result.code == 1
    lines = result.stdout.splitlines()
    assert lines[0] == "## orch diff: `a` vs `b`"
    assert "**the runs differ: first at step 1 (state, decision, output)**" in lines
    table = [line for line in lines if line.startswith("| ")]
    assert table[0].startswith("| first | pos | state |") and table[1].startswith("| --- |")
    assert table[2].startswith("| >> | 1 | sentiment_analysis | upsell / support |")
    start = lines.index("### step 2 output (upsell / support)")
    assert lines[start + 2] == "````diff"  # longer than any run of backticks in the diff
    assert lines.index("````", start + 3) > start + 3
    assert "### totals" in lines and "| total | A | B | B - A |" in lines
    assert orch("diff", "a", "b", "--md", "--json").code == 2


@pytest.mark.slow  # in the default run: test_reliability_fast.py's control characters
def test_control_characters_never_reach_the_terminal(tmp_path: Path) -> None:
    orch = routed(tmp_path, ("a", "positive", "Thanks!"), ("b", "positive", ANSWER))
    for form in ([], ["--md"], ["--json"]):
        result = orch("diff", "a", "b", *form)
        assert result.code == 1
        assert not UNSAFE.search(result.stdout), form
    assert "\\x1b" in orch("diff", "a", "b").stdout


def test_a_missing_run_is_exit_2_in_one_line(tmp_path: Path) -> None:
    orch = routed(tmp_path, ("a", "positive", "Thanks!"))
    for args in (("a", "nope"), ("nope", "a")):
        result = orch("diff", *args)
        assert result.code == 2 and result.stdout == ""
        assert result.stderr.splitlines() == ["orch: error: no run 'nope' in " + str(orch.db)
                                              + "; list runs with `orch runs`"]
    assert orch("diff", "a", "").code == 2


# --------------------------------------------------------------------------- the pure functions


def row(seq: int, state: str, to: str | None, decision: str | None, output: Any = None, **kw: Any) -> TransitionRecord:
    return TransitionRecord(run_id="r", seq=seq, from_state=state, attempt=1, started_at="", source="llm",
                            to_state=to, decision=decision, output=output, **kw)


def test_json_diff_paths() -> None:
    a = {"items": [{"name": "x", "n": 1}, 2], "gone": True, "same": [1], "odd key": 1}
    b = {"items": [{"name": "y", "n": 1}, 2, 3], "new": None, "same": [1], "odd key": 1.0}
    assert json_diff(a, b) == ['$.items[0].name: "x" -> "y"', "$.items[2]: added 3", "$.gone: removed true",
                               '$["odd key"]: 1 -> 1.0', "$.new: added null"]
    assert json_diff([1, 2], [1]) == ["$[1]: removed 2"]
    assert json_diff({"a": 1}, [1]) == ['$: {"a": 1} -> [1]']
    assert json_diff({"a": {"b": 1}}, {"a": {"b": 1}}) == []


def test_text_diff_and_cap() -> None:
    assert text_diff("a\nb\nc", "a\nB\nc") == ["@@ -1,3 +1,3 @@", " a", "-b", "+B", " c"]
    many_a = "\n".join(f"line {i}" for i in range(100))
    many_b = "\n".join(f"row {i}" for i in range(100))
    lines = output_diff(row(1, "s", "t", "continue", many_a), row(1, "s", "t", "continue", many_b), limit=10)
    assert len(lines) == 11 and lines[-1] == "... 191 more lines"
    assert output_diff(row(1, "s", "t", "c", {"a": 1}), row(1, "s", "t", "c", {"a": 1})) == []
    assert output_diff(row(1, "s", "t", "c", "x"), None) == ["@@ -1 +0,0 @@", "-x"]


def test_alignment_and_divergence() -> None:
    failed = row(1, "s", None, None, "bad", error="GuardError: no")
    a = [row(2, "s", "t", "continue", "ok"), failed, row(3, "t", "__end__", "continue")]
    b = [row(1, "s", "t", "continue", "bad"), row(2, "s", "t", "continue", "ok")]
    pairs = align(a, b)
    assert [(x and x.seq, y and y.seq) for x, y in pairs] == [(1, 1), (2, 2), (3, None)]
    assert first_divergence(pairs) == 1
    report = compare(a, b)
    assert report["first_divergence"]["what"] == ["state", "decision"]
    assert report["first_divergence"]["a"]["error"] == "GuardError: no"
    assert report["steps"][2]["differs"] == ["path"] and report["steps"][2]["b"] is None
    assert report["totals"]["steps"] == {"a": 3, "b": 2, "delta": -1}


def test_usage_differences_alone_are_the_same_path() -> None:
    a = [row(1, "s", "__end__", "continue", "x", usage=Usage(input_tokens=10), cost_usd=0.01, latency_ms=5.0)]
    b = [row(1, "s", "__end__", "continue", "x", usage=Usage(input_tokens=12), cost_usd=None, latency_ms=7.5)]
    report = compare(a, b)
    assert report["same"] is True and report["usage_differs"] is True
    assert report["totals"]["input_tokens"] == {"a": 10, "b": 12, "delta": 2}
    assert report["totals"]["cost_usd"] == {"a": 0.01, "b": None, "delta": None}
    assert report["totals"]["latency_ms"]["delta"] == 2.5
    assert compare(a, a)["usage_differs"] is False


def test_diff_starts_without_the_engine_stack(tmp_path: Path) -> None:
    """Like `orch log`: reading two logs imports neither the engine nor pydantic."""
    import subprocess
    import sys

    orch = routed(tmp_path, ("a", "positive", "Thanks!"), ("b", "negative", "Sorry!"))
    heavy = ["pydantic", "structlog", "anthropic", "statemachine_orch.engine._engine", "statemachine_orch.definition"]
    code = ("import contextlib, io, sys, statemachine_orch.cli._main as c\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    code = c.main(['--db', {str(orch.db)!r}, 'diff', 'a', 'b'])\n"
            f"print(code, [m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1 []"
