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

import ast
import json
import os
import pickle
import re
import sqlite3
import stat
import subprocess
import threading
from collections.abc import Mapping
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import statemachine_orch
from statemachine_orch import CorruptRunError
from statemachine_orch.testing import FakeMessagesAPI, Reply, error

from ..helpers import (
    CANARY_KEY,
    ROUTER,
    CLIResult,
    Figures,
    Orch,
    in_parallel,
    one_error_line,
    orch_against,
    orch_command,
    query,
    requests_for,
    router_input,
    run_count,
    stored_log,
    stored_status,
    write,
)

PACKAGE = Path(statemachine_orch.__file__).parent


# --------------------------------------------------------------------------- no code-executing deserializer

DESERIALIZERS = frozenset({"pickle", "_pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle",
                           "jsonpickle", "joblib", "yaml"})
CODE_LOADERS = frozenset({"importlib", "runpy"})
UNSAFE_BUILTINS = frozenset({"eval", "exec", "compile", "__import__", "execfile"})
CODE_RUNNING_METHODS = frozenset({"exec_module", "import_module", "run_path", "run_module", "unsafe_load",
                                  "full_load"})

# (module, what) -> why it is acceptable
ALLOWED_CODE_LOADING = {
    ("loader.py", "import importlib"): "loading the machine module the user names is the point of `orch run`",
    ("loader.py", "import importlib.util"): "as above: spec_from_file_location for path/to/machine.py",
    ("loader.py", "call exec_module"): "runs that machine module (a .py file the user passed, or stored with "
                                       "the run by `orch run`), never a value read from a row's JSON",
    ("loader.py", "call import_module"): "imports a dotted machine module, as above",
    ("__init__.py", "from importlib import"): "lazy public names: imports the package's own submodules",
}


def _root(func: ast.Attribute) -> str:
    """`pickle` for pickle.loads(...), `yaml` for yaml.load(...)."""
    return ast.unparse(func.value)


def code_loading_sites(source: str) -> list[str]:
    """Imports of deserializers and code loaders, and calls that run or unpickle code, in one module."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names
                      if a.name.split(".")[0] in DESERIALIZERS | CODE_LOADERS]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in DESERIALIZERS | CODE_LOADERS:
            found.append(f"from {node.module} import")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in UNSAFE_BUILTINS:
                found.append(f"call {func.id}")
            elif isinstance(func, ast.Attribute) and func.attr in CODE_RUNNING_METHODS:
                found.append(f"call {func.attr}")
            elif isinstance(func, ast.Attribute) and _root(func).split(".")[0] in DESERIALIZERS:
                found.append(f"call {_root(func)}.{func.attr}")
    return found


def test_the_package_uses_no_code_executing_deserializer(figures: Figures) -> None:
    found = {(path.name, site) for path in sorted(PACKAGE.glob("*.py"))
             for site in code_loading_sites(path.read_text(encoding="utf-8"))}
    figures["modules_scanned"] = len(list(PACKAGE.glob("*.py")))
    figures["code_loading_sites_found"] = len(found)
    figures["code_loading_sites_not_allowed"] = sorted(map(str, found - set(ALLOWED_CODE_LOADING)))
    assert found - set(ALLOWED_CODE_LOADING) == set()
    assert set(ALLOWED_CODE_LOADING) <= found  # the allowlist is not stale, and the scan sees them


def test_the_scan_would_see_each_kind_of_code_loading() -> None:
    source = ("import pickle\nfrom yaml import load\nimport marshal as m\nx = eval('1')\n"
              "y = pickle.loads(b'')\nz = json.loads('1')\nexec('pass')\n")
    assert code_loading_sites(source) == [
        "import pickle", "from yaml import", "import marshal", "call eval", "call pickle.loads", "call exec"]


# --------------------------------------------------------------------------- a pickle planted in a run
# test_storage_faults.py plants one in runs.input and one in transitions.output and checks
# that the other runs are unaffected; here one goes into every JSON column a run is read from.

FILING_MACHINE = """
from statemachine_orch import Machine, PythonState


def file(ctx):
    raise RuntimeError("the filing office is closed")  # so the run stops, resumable, at seq 2


machine = Machine("filing", states=[
    PythonState("fetch", run=lambda ctx: {"amount": ctx.input["amount"]}),
    PythonState("file", run=file, needs=["fetch"]),
])
"""


class Trap:
    """Unpickling this opens (creates) `marker`: proof that a payload ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (self.marker, "w")


@dataclass(frozen=True)
class Cell:
    """Where a payload is planted: a run's row, its last log row (seq 2), or a failed attempt of it."""

    table: str
    column: str
    protocol: int  # 0: ASCII pickle stored as TEXT; 5: binary pickle stored as a BLOB

    @property
    def run_id(self) -> str:
        return f"planted-{self.table}-{self.column}-p{self.protocol}"

    @property
    def named(self) -> tuple[str, ...]:
        """What the refusal must name besides the run: the row (seq) and the column."""
        column = {"in_flight": "in-flight mark"}.get(self.column, self.column)
        return (column,) if self.table == "runs" else ("seq 2", column)


CELLS = [Cell(table, column, protocol) for table, column in (
    ("runs", "input"), ("runs", "options"), ("runs", "in_flight"),
    ("transitions", "output"), ("transitions", "request"), ("transitions", "response"),
    ("attempts", "request"), ("attempts", "response")) for protocol in (0, 5)]


def plant(db: Path, source_run: str, cell: Cell, payload: bytes) -> None:
    """Copy `source_run` as `cell.run_id` and put the payload in the cell (as an attacker with
    write access to the file would)."""
    value: str | bytes = payload.decode("ascii") if cell.protocol == 0 else payload
    with closing(sqlite3.connect(db)) as conn, conn:
        for table in ("runs", "transitions"):
            columns = [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]
            rest = ", ".join(c for c in columns if c != "run_id")
            conn.execute(f"INSERT INTO {table} (run_id, {rest}) SELECT ?, {rest} FROM {table} "
                         "WHERE run_id = ?", (cell.run_id, source_run))
        if cell.table == "attempts":
            conn.execute("INSERT INTO attempts (run_id, seq, attempt, state, started_at, kind, error, "
                         f"{cell.column}) VALUES (?, 2, 1, 'file', '2026-01-01T00:00:00Z', 'transient', "
                         "'overloaded', ?)", (cell.run_id, value))
        else:
            where = "run_id = ?" + (" AND seq = 2" if cell.table == "transitions" else "")
            conn.execute(f"UPDATE {cell.table} SET {cell.column} = ? WHERE {where}", (value, cell.run_id))


def cell_value(db: Path, cell: Cell) -> Any:
    where = "run_id = ?" + (" AND seq = 2" if cell.table != "runs" else "")
    return query(db, f"SELECT {cell.column} FROM {cell.table} WHERE {where}", cell.run_id)[0][0]


def test_a_pickle_planted_in_a_stored_run_is_refused_and_never_run(tmp_path: Path, figures: Figures) -> None:
    machine = write(tmp_path / "filing.py", FILING_MACHINE)
    marker = tmp_path / "payload-ran"
    payloads = {protocol: pickle.dumps(Trap(marker), protocol=protocol) for protocol in (0, 5)}
    for payload in payloads.values():  # the payloads are armed: unpickling them does run code
        pickle.loads(payload)
        assert marker.exists()
        marker.unlink()
    db = tmp_path / "orch.db"
    cli = Orch(db)
    failed = cli("run", machine, "--input", write(tmp_path / "in.json", '{"amount": 12}'), "--run-id", "kept")
    assert failed.code == 1, failed.stderr
    for cell in CELLS:
        plant(db, "kept", cell, payloads[cell.protocol])
    planted = {cell: cell_value(db, cell) for cell in CELLS}

    jobs = {(cell, "resume"): ["resume", cell.run_id] for cell in CELLS}  # resume reads the snapshot
    replayed = Cell("transitions", "response", 5)  # replay serves recorded responses
    jobs[(replayed, "replay")] = ["replay", replayed.run_id]
    results = in_parallel({key: (lambda args=args: cli(*args)) for key, args in jobs.items()})
    untouched = cli("show", "kept", "--json")

    refused = {key for key, r in results.items() if r.code == CorruptRunError.exit_code and r.stdout == ""
               and len(r.stderr.splitlines()) == 1 and key[0].run_id in r.stderr
               and all(part in r.stderr for part in key[0].named)}
    figures["pickle_payloads_planted"] = len(CELLS)
    figures["commands_on_planted_runs"] = len(jobs)
    figures["refused_naming_run_row_and_column"] = len(refused)
    figures["payloads_executed"] = int(marker.exists())
    assert not marker.exists()
    assert CorruptRunError.exit_code != 0
    for (cell, command), result in results.items():
        line = one_error_line(result)
        assert result.code == CorruptRunError.exit_code, (cell, command, result.stderr)
        assert "is not valid JSON" in line and cell.run_id in line, line
        assert all(part in line for part in cell.named), (cell, line)
    assert {cell: cell_value(db, cell) for cell in CELLS} == planted  # nothing overwrote them
    assert {stored_status(db, cell.run_id) for cell in CELLS} == {"failed"}  # none was claimed
    assert untouched.code == 0 and json.loads(untouched.stdout)["input"] == {"amount": 12}


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

TINY_MACHINE = """
from statemachine_orch import Machine, PythonState

machine = Machine("tiny", states=[PythonState("only", run=lambda ctx: "done")])
"""
# If spliced into SQL text, the second one would select the stored run "kept".
HOSTILE_IDS = ("x' OR 1=1--", "kept'--", "%")
ID_COMMANDS = (("show",), ("log",), ("resume",), ("replay",), ("audit", "verify"))
BAD_NEW_IDS = ("x' OR 1=1--", "a" * 65, "run\nforged")


def database_fingerprint(db: Path) -> list[tuple[Any, ...]]:
    return [tuple(row) for table in ("runs", "transitions", "attempts")
            for row in query(db, f"SELECT * FROM {table} ORDER BY 1, 2")]


def test_hostile_run_ids_are_only_ever_values(tmp_path: Path, figures: Figures) -> None:
    machine = write(tmp_path / "tiny.py", TINY_MACHINE)
    cli = Orch(tmp_path / "orch.db")
    cli.ok("run", machine, "--run-id", "kept")
    before = database_fingerprint(cli.db)
    jobs: dict[tuple[str, ...], list[str | Path]] = {
        (*command, run_id): [*command, run_id] for command in ID_COMMANDS
        for run_id in HOSTILE_IDS if command[0] in ("show", "audit") or run_id != "%"}
    jobs.update({("run", run_id): ["run", machine, "--run-id", run_id] for run_id in BAD_NEW_IDS})
    jobs[("runs", "--machine")] = ["runs", "--machine", HOSTILE_IDS[0], "--json"]
    jobs[("run", "longest")] = ["run", machine, "--run-id", "A" * 64]
    results = in_parallel({key: (lambda args=args: cli(*args)) for key, args in jobs.items()})
    figures["hostile_ids_tried"] = len(set(HOSTILE_IDS) | set(BAD_NEW_IDS))
    figures["commands_run_with_them"] = len(jobs) - 1  # all but the longest valid id

    assert results.pop(("run", "longest")).code == 0  # the longest valid id is accepted
    assert json.loads(results.pop(("runs", "--machine")).stdout) == []
    for key, result in results.items():
        assert result.code == 2, (key, result.stderr)
        line = one_error_line(result)
        expected = "is not valid" if key[0] == "run" else "no run"
        assert expected in line and repr(key[-1]) in line, (key, line)
    after = database_fingerprint(cli.db)
    assert [row for row in after if "A" * 64 not in row] == before
    assert run_count(cli.db) == 2


# Parts of SQL text that are not literal, and why each is safe.
ALLOWED_SQL_PARTS = {
    "_APPEND": "constant INSERT with ? placeholders",
    "_APPEND_ATTEMPT": "constant INSERT with ? placeholders",
    "_SET_STATUS": "constant UPDATE with ? placeholders",
    "_STEP": "constant UPDATE with numbered ? placeholders",
    "sql": "list_runs: constant fragments joined with ? placeholders; the values go in params",
    "statement": "_run_script: the module's own schema, migration and view scripts",
    "_CHAINED_COLUMNS": "a constant list of column names",
    "SCHEMA_VERSION": "an int constant",
    "APPLICATION_ID": "an int constant",
    "synchronous": "checked to be 'FULL' or 'NORMAL' before the connection is made",
    "part": "machine_totals: a constant SELECT with one '?' per machine name, used twice",
    "_ADVANCE": "constant UPDATE with :named placeholders",
}


def sql_parts(source: str) -> list[str]:
    """The non-literal parts of the SQL text given to execute/executemany/executescript/query
    (and the store's own `_query`)."""
    parts = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("execute", "executemany", "executescript", "query", "_query") and node.args):
            continue
        sql = node.args[0]
        if isinstance(sql, ast.JoinedStr):
            parts += [ast.unparse(v.value) for v in sql.values if isinstance(v, ast.FormattedValue)]
        elif not (isinstance(sql, ast.Constant) and isinstance(sql.value, str)):
            parts.append(ast.unparse(sql))
    return parts


def test_sql_text_is_built_from_constants_only() -> None:
    stores = [path for path in sorted(PACKAGE.glob("*.py"))
              if re.search(r"^import sqlite3|^import sqlite_utils", path.read_text(encoding="utf-8"), re.M)]
    assert [p.name for p in stores] == ["sqlite_store.py"]
    found = {part for path in stores for part in sql_parts(path.read_text(encoding="utf-8"))}
    assert found - set(ALLOWED_SQL_PARTS) == set()
    assert set(ALLOWED_SQL_PARTS) <= found  # not stale
    assert sql_parts("c.execute(f'SELECT * FROM runs WHERE run_id = {run_id}')") == ["run_id"]


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

TOKEN_CANARY = "orch-test-bearer-CANARY-" + "t" * 24  # an auth token not shaped like sk-ant-...
SECRETS = (CANARY_KEY, TOKEN_CANARY)
FRAGMENTS = (*SECRETS, "CANARY", CANARY_KEY[-16:], TOKEN_CANARY[-16:])
QUOTE = "<credentials>"


class QuotingAPI(FakeMessagesAPI):
    """The fake Messages API, but error messages quote the credentials it received, as some
    proxies and gateways do: `<credentials>` in a scripted message becomes those headers."""

    def __init__(self) -> None:
        super().__init__(default=None)
        self.received: set[str] = set()

    def handle(self, method: str, path: str, headers: Mapping[str, str],
               body: bytes) -> tuple[int, dict[str, str], bytes, Reply | None]:
        lower = {k.lower(): v for k, v in headers.items()}
        credentials = " ".join(lower[h] for h in ("x-api-key", "authorization") if h in lower)
        self.received.update(s for s in SECRETS if s in credentials)
        status, out, data, reply = super().handle(method, path, headers, body)
        return status, out, data.replace(QUOTE.encode(), json.dumps(credentials)[1:-1].encode()), reply


def leaks(seen: Mapping[str, bytes]) -> list[tuple[str, str]]:
    return [(where, fragment) for where, data in seen.items() for fragment in FRAGMENTS
            if fragment.encode() in data]


def database_files(db: Path, label: str) -> dict[str, bytes]:
    return {f"{label} {p.name}": p.read_bytes() for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")) if p.exists()}


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

FORGER_MACHINE = """
from pydantic import BaseModel, field_validator
from statemachine_orch import FlowDecision, LLMState, Machine, PythonState, guard


class Ticket(BaseModel):
    text: str
    tag: str = "billing"

    @field_validator("tag")
    @classmethod
    def known_tag(cls, value):
        if value not in ("billing", "shipping"):
            raise ValueError(f"unknown tag {value}")
        return value


@guard(FlowDecision.CONTINUE)
def quote_answer(output, ctx):
    return FlowDecision.CONTINUE.because(f"model said: {output}")


def file_ticket(ctx):
    raise ValueError(f"cannot file {ctx.input.text} / {ctx.outputs['answer']}")


machine = Machine("forger", input_model=Ticket, states=[
    LLMState("answer", prompt="Answer: {text}", max_tokens=64, guard=quote_answer),
    PythonState("file", run=file_ticket, needs=["answer"]),
])
"""
# A fake event line, a fake JSON event, cursor movement, a terminal title, NUL, BEL, CR and
# the Unicode line separators, each of which some reader treats as the end of a line.
FORGED = ('\n2026-01-01T00:00:00.000000Z [info     ] run_finished  status=completed run_id=forged\r'
          '\x1b[2K\x1b[1A\x1b]0;owned\x07\x00{"event": "run_finished", "status": "completed"}'
          '\u2028\u2029\x85\x0b\x0c\x1c end')
# The answer forges a table row within the 80 characters `orch log` shows, and splits a JSON
# row for readers that end lines at Unicode line separators (str.splitlines, many editors).
ANSWER = "fine\x1b[1G\x1b[2K2    file  __end__ continue\r\u2028" + FORGED
UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x85\u2028\u2029]")  # all but \t and \n
CONSOLE_EVENT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z \[(?:debug|info|warning|error)\s*\] (\w+) ")
EVENTS = ["run_started", "transition", "transition", "run_finished"]


def console_events(stderr: str) -> list[str]:
    """Event names, one per line; a line that is not an event fails the match."""
    events = []
    for line in stderr.split("\n")[:-1]:
        found = CONSOLE_EVENT.match(line)
        assert found, repr(line)
        events.append(found.group(1))
    return events


def json_events(stderr: str) -> list[str]:
    return [json.loads(line)["event"] for line in stderr.split("\n")[:-1]]


def rows_seen_by_splitlines(text: str) -> list[dict[str, Any]]:
    """The JSON objects a reader finds that splits lines with str.splitlines()."""
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return [row for row in rows if isinstance(row, dict)]


def test_control_characters_cannot_forge_trace_events_or_log_rows(tmp_path: Path, figures: Figures) -> None:
    machine = write(tmp_path / "forger.py", FORGER_MACHINE)
    ticket = write(tmp_path / "ticket.json", json.dumps({"text": "help" + FORGED}))
    fake = FakeMessagesAPI(default=None)
    fake.on("answer", ANSWER)
    with orch_against(fake, tmp_path / "orch.db") as cli:
        console = cli("run", machine, "--input", ticket, "--run-id", "console")
        as_json = cli("--log-json", "run", machine, "--input", ticket, "--run-id", "json")
        table = cli.ok("log", "console")
        rows = cli.ok("log", "console", "--json")
    outputs = {"console trace": console.stderr, "json trace": as_json.stderr, "log table": table.stdout,
               "log json": rows.stdout}
    figures["outputs_checked"] = len(outputs)
    figures["outputs_with_raw_control_characters"] = sorted(k for k, v in outputs.items() if UNSAFE.search(v))
    figures["log_json_rows_seen_by_splitlines"] = len(rows_seen_by_splitlines(rows.stdout))

    assert (console.code, as_json.code) == (1, 1), console.stderr + as_json.stderr
    assert fake.calls("answer") == 2 and FORGED in requests_for(fake, "answer")[0].prompt
    first, failure = stored_log(cli.db, "console")
    assert first["reason"] == f"model said: {ANSWER}"  # stored exactly as the guard gave it
    assert failure["error"].startswith("StepError: ValueError: cannot file help")
    assert console_events(console.stderr) == EVENTS
    assert json_events(as_json.stderr) == EVENTS
    assert [json.loads(line)["seq"] for line in rows.stdout.split("\n")[:-1]] == [1, 2]
    assert [row["seq"] for row in rows_seen_by_splitlines(rows.stdout)] == [1, 2]
    table_lines = table.stdout.split("\n")[:-1]
    assert len(table_lines) == 4 and table_lines[-1].startswith("total:")  # header, 2 rows, total
    assert [line.split()[0] for line in table_lines[1:3]] == ["1", "2"]
    assert {k: UNSAFE.findall(v) for k, v in outputs.items() if UNSAFE.search(v)} == {}


def test_control_characters_in_a_refused_input_cannot_forge_error_lines(tmp_path: Path) -> None:
    machine = write(tmp_path / "forger.py", FORGER_MACHINE)
    bad_tag = write(tmp_path / "bad_tag.json", json.dumps({"text": "help", "tag": "other" + FORGED}))
    refused = Orch(tmp_path / "orch.db")("run", machine, "--input", bad_tag)
    assert refused.code == 2
    assert "unknown tag other" in one_error_line(refused)
    assert UNSAFE.findall(refused.stderr) == []
    assert run_count(tmp_path / "orch.db") == 0
