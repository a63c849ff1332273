"""Security checks beyond tests/test_secrets.py, with the real `orch` processes, the real SDK
over loopback HTTP and real SQLite files:

- the API key stays out of everything even when the server quotes it back in an error;
- no code-executing deserializer in the package, and a pickle planted in a stored run is
  refused without being run;
- input values and model answers are never parsed as templates (the template syntax itself
  is in the bad-inputs corpus: corpus/machines/template_*.py);
- hostile run ids reach every command as bound parameters only; SQL text is built from
  constants;
- the database files are private even under umask 000;
- control characters in inputs, answers and guard reasons cannot forge trace events, log rows
  or error lines.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from statemachine_orch.testing import FakeMessagesAPI, Reply, error

from ..helpers import (
    CANARY_KEY,
    QUOTE,
    ROUTER,
    SECRETS,
    TOKEN_CANARY,
    CLIResult,
    Figures,
    Orch,
    QuotingAPI,
    code_loading_check,
    code_loading_scan_self_check,
    database_files,
    forged_error_line_trial,
    forged_lines_trial,
    hostile_run_ids_trial,
    leaks,
    orch_against,
    orch_command,
    planted_pickle_trial,
    router_input,
    sql_text_check,
    write,
)

# --------------------------------------------------------------------------- no code-executing deserializer


def test_the_package_uses_no_code_executing_deserializer(figures: Figures) -> None:
    code_loading_check(figures)


def test_the_scan_would_see_each_kind_of_code_loading() -> None:
    code_loading_scan_self_check()


# --------------------------------------------------------------------------- a pickle planted in a run


def test_a_pickle_planted_in_a_stored_run_is_refused_and_never_run(tmp_path: Path, figures: Figures) -> None:
    planted_pickle_trial(tmp_path, figures)


# --------------------------------------------------------------------------- templates

ECHO_MACHINE = """
from statemachine_orch import LLMState, Machine

machine = Machine("echoes", input_vars={"text": lambda data: data["text"]}, states=[
    LLMState("first", prompt="Repeat: {text}", max_tokens=50),
    LLMState("second", prompt="Compare {first} with {text}", needs=["first"], max_tokens=50),
])
"""
TEMPLATE_INPUT = ("{text} {first} {second} {text.__class__.__init__.__globals__} {0} {} {{text}} "
                  "{text!r} {text:>99} %(text)s ${text} {")
TEMPLATE_ANSWER = "{text.__class__.__init__.__globals__[os]} {second} {{first}} }"


def test_inputs_and_model_answers_are_never_parsed_as_templates(db_path: Path, tmp_path: Path) -> None:
    machine = write(tmp_path / "echoes.py", ECHO_MACHINE)
    fake = FakeMessagesAPI(default=None)
    fake.on("first", TEMPLATE_ANSWER).on("second", "same")
    with orch_against(fake, db_path) as cli:
        result = cli.json("run", machine, "--input", write(tmp_path / "in.json", json.dumps({"text": TEMPLATE_INPUT})))
    assert result["status"] == "completed"
    assert [r.prompt for r in fake.requests] == [
        f"Repeat: {TEMPLATE_INPUT}", f"Compare {TEMPLATE_ANSWER} with {TEMPLATE_INPUT}"]
    assert result["outputs"]["first"] == TEMPLATE_ANSWER


# --------------------------------------------------------------------------- run ids and SQL


def test_hostile_run_ids_are_only_ever_values(tmp_path: Path, figures: Figures) -> None:
    hostile_run_ids_trial(tmp_path, figures)


def test_sql_text_is_built_from_constants_only() -> None:
    sql_text_check()


# --------------------------------------------------------------------------- private files

GATED_MACHINE = """
from statemachine_orch import LLMState, Machine, PythonState

machine = Machine("gated", states=[
    PythonState("prepare", run=lambda ctx: "ready"),
    LLMState("wait", prompt="Say when.", max_tokens=20),
])
"""


def test_database_files_are_private_even_under_umask_000(tmp_path: Path) -> None:
    machine = write(tmp_path / "gated.py", GATED_MACHINE)
    db = tmp_path / "new" / "nested" / "orch.db"  # directories that do not exist yet
    gate = threading.Event()
    fake = FakeMessagesAPI(default=None)
    fake.on("wait", Reply(text="now", gate=gate))
    with fake.serve() as url:
        env = {**os.environ, "ANTHROPIC_BASE_URL": url, "ANTHROPIC_API_KEY": CANARY_KEY}
        umask_000 = ["sh", "-c", 'umask 000 && exec "$@"', "sh"]
        proc = subprocess.Popen([*umask_000, *orch_command(), "--db", str(db), "run", str(machine)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert fake.wait_for("wait", 1, timeout=60)
            live = {path.name: stat.S_IMODE(path.stat().st_mode)
                    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm"))}
        finally:
            gate.set()
            _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert live == {"orch.db": 0o600, "orch.db-wal": 0o600, "orch.db-shm": 0o600}
    leftovers = {p.name: stat.S_IMODE(p.stat().st_mode) for p in db.parent.iterdir()}
    assert set(leftovers.values()) == {0o600}, leftovers


# --------------------------------------------------------------------------- the key, quoted back


def test_a_key_quoted_back_by_the_server_is_kept_out_of_everything(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, figures: Figures) -> None:
    fake = QuotingAPI()
    gate = threading.Event()
    fake.on("sentiment_analysis",
            error(529, f"overloaded; request had {QUOTE}", headers={"retry-after-ms": "0"}), "positive")
    fake.on("upsell", Reply(text="Thanks! Try the footprint.", gate=gate))
    seen: dict[str, bytes] = {}

    def keep(label: str, result: CLIResult) -> CLIResult:
        seen[f"{label} stdout"], seen[f"{label} stderr"] = result.stdout.encode(), result.stderr.encode()
        return result

    with orch_against(fake, tmp_path / "orch.db") as cli:
        # 1. the API key; console trace; a retried 529 that quotes it; files read while live
        proc = cli.start("--debug", "run", ROUTER, "--input", router_input(tmp_path), "--run-id", "keyed")
        try:
            assert fake.wait_for("upsell", 1, timeout=60)
            seen.update(database_files(cli.db, "live"))
        finally:
            gate.set()
        assert keep("keyed run", Orch.finish(proc)).code == 0
        # 2. an auth token instead; JSON trace; a 401 that quotes it, then a resume
        monkeypatch.delenv("ANTHROPIC_API_KEY")
        monkeypatch.setenv("ANTHROPIC_AUTH_TOKEN", TOKEN_CANARY)
        fake.on("sentiment_analysis@claude-sonnet-5-5", error(401, f"invalid credentials {QUOTE}"))
        token = Orch(cli.db, cli.base_url, key=False)
        for label, args in (("token run", ["run", ROUTER, "--input", router_input(tmp_path), "--run-id", "token"]),
                            ("token resume", ["resume", "token"])):
            assert keep(label, token("--log-json", "--debug", *args)).code == 1
        reads = [[command, run_id, *flags] for run_id in ("keyed", "token")
                 for command, *flags in (["show", "--json"], ["log", "--attempts", "--json"])]
        reads += [["show", "token"], ["log", "token"], ["runs", "--json"]]  # the text forms too
        for args in reads:
            keep(" ".join(args), token.ok(*args))
        traceback = keep("debug traceback", token("--debug", "resume", "keyed"))  # refused: finished
    assert traceback.code == 2 and "Traceback (most recent call last)" in traceback.stderr
    seen.update(database_files(cli.db, "final"))

    assert fake.received == set(SECRETS)  # both secrets reached the server, which quoted them
    quoted = [r for r in fake.requests if r.state == "sentiment_analysis"]
    assert len(quoted) == 4  # 529 then an answer, then 401 for the run and for the resume
    figures["places_checked"] = len(seen)
    figures["canary_hits"] = len({where for where, _ in leaks(seen)})  # places holding a fragment
    figures["canary_hit_places"] = sorted({where for where, _ in leaks(seen)})
    assert leaks(seen) == []


# --------------------------------------------------------------------------- forged log lines


def test_control_characters_cannot_forge_trace_events_or_log_rows(tmp_path: Path, figures: Figures) -> None:
    forged_lines_trial(tmp_path, figures)


def test_control_characters_in_a_refused_input_cannot_forge_error_lines(tmp_path: Path) -> None:
    forged_error_line_trial(tmp_path)
