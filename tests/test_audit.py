"""The audit chain as documented (docs/storage.md#the-audit-chain): canonical JSON that another
language can hash (#11.7), covering the run row and the failed attempts, checked by `show`,
`replay` and `resume`, and keyed with ORCH_AUDIT_KEY so that writing the file is not enough
to rewrite a run (#11.9).

`DocumentedChain` is a verifier written from that page alone: no json module, no
statemachine_orch import, as a verifier in another language would be.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import sqlite3
import struct
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from statemachine_orch import RunStatus, SQLiteStore
from statemachine_orch.testing import FakeMessagesAPI, error
from statemachine_orch.types import Attempt, Usage

from .helpers import MODEL, ROOT, EnvOrch, me, new_run, one_error_line, query, row, verdicts, write

KEY = "correct horse battery staple"
ODD_TEXT = 'quote " backslash \\ tab \t line\nbell \x07 del \x7f sep \u2028 caf\u00e9 \U0001f600'
MACHINE = f'''
from statemachine_orch import LLMState, Machine, PythonState, RetryPolicy

machine = Machine("ledger", model={MODEL!r}, input_vars={{"text": lambda data: data["text"]}},
                  retry_policy=RetryPolicy(max_attempts=2, initial_delay_s=0.0, jitter=0.0), states=[
    LLMState("draft", prompt="Draft an entry for: {{text}}", max_tokens=64),
    PythonState("measure", run=lambda ctx: {{"chars": len(ctx.outputs["draft"]), "ratio": 0.1}},
                needs=["draft"]),
    LLMState("review", prompt="Review: {{draft}}", needs=["draft"], max_tokens=64),
])
'''
RUN_FIELDS = ("run_id", "machine", "machine_ref", "machine_hash", "input", "created_at", "chain_version",
              "chain_key")
PARENT_FIELDS = ("parent_run_id", "parent_state", "item")  # a child run's anchor covers them too
FAN_OUT = """
from statemachine_orch import Machine, MapState, PythonState

machine = Machine("fan_out", states=[
    MapState("pieces", items=lambda ctx: ["x", "y"], each=PythonState("piece", run=lambda ctx: ctx.input["item"])),
])
"""
ROW_COLUMNS = ("run_id", "seq", "from_state", "to_state", "decision", "reason", "attempt", "started_at",
               "latency_ms", "source", "input_tokens", "output_tokens", "cache_read_tokens",
               "cache_write_tokens", "cost_usd", "error", "output", "request", "response", "request_id",
               "request_hash", "in_doubt")
ATTEMPT_COLUMNS = ("run_id", "seq", "attempt", "state", "started_at", "kind", "status_code", "request_id",
                   "delay_s", "error", "input_tokens", "output_tokens", "cache_read_tokens",
                   "cache_write_tokens", "cost_usd", "request", "response")


# --------------------------------------------------------------------------- the verifier from the doc

ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def canonical(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return '{"real":"' + struct.pack(">d", value).hex() + '"}'
    if isinstance(value, bytes):
        return '{"blob":"' + value.hex() + '"}'
    if isinstance(value, str):
        return '"' + "".join(ESCAPES.get(c) or (c if c >= " " else f"\\u{ord(c):04x}") for c in value) + '"'
    if isinstance(value, list):
        return "[" + ",".join(canonical(v) for v in value) + "]"
    return "{" + ",".join(canonical(k) + ":" + canonical(value[k]) for k in sorted(value)) + "}"


class DocumentedChain:
    """Recomputes every run's anchor and row hashes as docs/storage.md says."""

    def __init__(self, db: Path, key: str | None = None) -> None:
        self.db = db
        self.key = key.encode() if key else None

    def h(self, message: str) -> str:
        if self.key is None:
            return hashlib.sha256(message.encode()).hexdigest()
        return hmac.new(self.key, message.encode(), hashlib.sha256).hexdigest()

    @staticmethod
    def identity(run: sqlite3.Row) -> tuple[str, ...]:
        names = RUN_FIELDS + PARENT_FIELDS if run["parent_run_id"] is not None else RUN_FIELDS
        return names + tuple(name for name in ("batch_id", "forked_from", "experiment", "arm")
                             if run[name] is not None)

    def key_id(self) -> str:
        return self.h("statemachine_orch audit key id")[:16]

    def check(self) -> dict[str, int]:
        """run id -> rows verified; fails at the first value that differs."""
        checked = {}
        with closing(sqlite3.connect(self.db)) as conn:
            conn.row_factory = sqlite3.Row
            for run in conn.execute("SELECT * FROM runs").fetchall():
                assert run["chain_version"] == 2
                assert run["chain_key"] == (self.key_id() if self.key else None)
                link = self.h(canonical({name: run[name] for name in self.identity(run)}))
                assert link == run["chain_anchor"], run["run_id"]
                rows = conn.execute("SELECT * FROM transitions WHERE run_id = ? ORDER BY seq",
                                    (run["run_id"],)).fetchall()
                for r in rows:
                    attempts = conn.execute("SELECT * FROM attempts WHERE run_id = ? AND seq = ? ORDER BY attempt",
                                            (r["run_id"], r["seq"])).fetchall()
                    fields = {name: r[name] for name in ROW_COLUMNS}
                    fields["attempts"] = [{name: a[name] for name in ATTEMPT_COLUMNS} for a in attempts]
                    link = self.h(link + canonical(fields))
                    assert link == r["chain"], (r["run_id"], r["seq"])
                checked[run["run_id"]] = len(rows)
        return checked

    def rechain(self, run_id: str) -> None:
        """Recompute a run's anchor and hashes over its current values, as a forger would."""
        with closing(sqlite3.connect(self.db)) as conn, conn:
            conn.row_factory = sqlite3.Row
            run = conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            link = self.h(canonical({name: run[name] for name in self.identity(run)}))
            conn.execute("UPDATE runs SET chain_anchor = ? WHERE run_id = ?", (link, run_id))
            for r in conn.execute("SELECT * FROM transitions WHERE run_id = ? ORDER BY seq", (run_id,)).fetchall():
                attempts = conn.execute("SELECT * FROM attempts WHERE run_id = ? AND seq = ? ORDER BY attempt",
                                        (run_id, r["seq"])).fetchall()
                fields = {name: r[name] for name in ROW_COLUMNS}
                fields["attempts"] = [{name: a[name] for name in ATTEMPT_COLUMNS} for a in attempts]
                link = self.h(link + canonical(fields))
                conn.execute("UPDATE transitions SET chain = ? WHERE run_id = ? AND seq = ?", (link, run_id, r["seq"]))


def sql(db: Path, statement: str, *params: Any) -> None:
    with closing(sqlite3.connect(db)) as conn, conn:
        assert conn.execute(statement, params).rowcount >= 1


# --------------------------------------------------------------------------- recorded runs


def record(orch: EnvOrch, fake: FakeMessagesAPI, tmp_path: Path, *run_ids: str) -> None:
    """Runs of the ledger machine by the real `orch`: the first call of each run fails once (529)."""
    machine = write(tmp_path / "ledger.py", MACHINE)
    data = write(tmp_path / "in.json", '{"text": "a tent, caf\\u00e9"}')
    for run_id in run_ids:
        fake.on("draft", error(529, "Overloaded", headers={"retry-after-ms": "0"}), ODD_TEXT)
        fake.on("review", "fine")
        orch.ok("run", machine, "--input", data, "--run-id", run_id)
        assert len(query(orch.db, "SELECT * FROM attempts WHERE run_id = ?", run_id)) == 1


@pytest.mark.parametrize("key", [None, KEY], ids=["keyless", "keyed"])
def test_a_verifier_written_from_the_docs_verifies_every_run(
        orch: EnvOrch, fake: FakeMessagesAPI, tmp_path: Path, key: str | None) -> None:
    cli = orch.with_env(ORCH_AUDIT_KEY=key) if key else orch
    record(cli, fake, tmp_path, "a", "b")
    cli.ok("run", write(tmp_path / "fan_out.py", FAN_OUT), "--run-id", "c")  # with two child runs
    assert DocumentedChain(orch.db, key).check() == {"a": 3, "b": 3, "c": 1, "c.0.1.0": 1, "c.0.1.1": 1}
    assert cli.ok("audit", "verify").stdout.splitlines()[-1] == "5 run(s) checked, 0 with a broken log"
    assert all(KEY.encode() not in path.read_bytes() for path in orch.db.parent.glob("orch.db*"))


def test_floats_sqlite_reshapes_and_counts_beyond_64_bits_keep_the_chain_whole(tmp_path: Path) -> None:
    """NaN is stored as NULL and -0.0 as 0.0: the hash is over what SQLite gives back."""
    store = SQLiteStore(tmp_path / "orch.db")
    odd = Attempt(number=1, started_at="t", kind="transient", error="529", delay_s=-0.0, cost_usd=float("nan"),
                  usage=Usage(input_tokens=2**70))

    owner = me()

    async def record_and_verify() -> str | None:
        await store.create_run(new_run(), owner)
        await store.append(row(1, latency_ms=-0.0, cost_usd=float("nan"), attempts=[odd]), owner)
        await store.append(row(2, latency_ms=1e300, cost_usd=float("inf"), usage=Usage(output_tokens=2**64)), owner)
        await store.append(row(3, latency_ms=0.1 + 0.2, cost_usd=5e-324), owner, status=RunStatus.COMPLETED)
        return await store.verify_chain("run-1")

    try:
        assert asyncio.run(record_and_verify()) is None
    finally:
        asyncio.run(store.close())
    assert DocumentedChain(tmp_path / "orch.db").check() == {"run-1": 3}


def test_a_version_5_database_keeps_verifying(orch: EnvOrch) -> None:
    """Runs chained before the canonical form (Python reprs, chain version 1) verify as before."""
    with closing(sqlite3.connect(orch.db)) as conn:
        conn.executescript((ROOT / "tests" / "data" / "chain_v5.sql").read_text())
    audit = orch("audit", "verify")
    assert (audit.code, verdicts(audit)) == (0, {"old-a": None, "old-b": None}), audit.stdout + audit.stderr
    assert orch.json("show", "old-a")["outputs"]["measure"] == {"chars": 14, "ratio": 0.1}
    sql(orch.db, "UPDATE transitions SET reason = 'edited' WHERE run_id = 'old-b' AND seq = 2")
    audit = orch("audit", "verify")
    assert (audit.code, verdicts(audit)) == (1, {"old-a": None, "old-b": 2})
    assert orch("show", "old-b").code == 1


# --------------------------------------------------------------------------- forgeries


FORGERIES: dict[str, tuple[Callable[[Path], None], str]] = {
    "a forged answer": (lambda db: sql(db, "UPDATE transitions SET response = replace(response, 'fine', 'approved'), "
                                          "output = '\"approved\"' WHERE run_id = 'a' AND seq = 3"), "row seq 3"),
    "a forged input": (lambda db: sql(db, "UPDATE runs SET input = '{\"text\": \"a yacht\"}' WHERE run_id = 'a'"),
                       "runs row"),
    "another machine to import": (lambda db: sql(db, "UPDATE runs SET machine_ref = '/tmp/evil.py:machine' "
                                                     "WHERE run_id = 'a'"), "runs row"),
    "a forged failed attempt": (lambda db: sql(db, "UPDATE attempts SET error = 'fine' WHERE run_id = 'a'"),
                                "row seq 1"),
}


@pytest.mark.parametrize("forgery", FORGERIES, ids=list(FORGERIES))
def test_show_replay_and_resume_refuse_a_run_that_fails_its_chain(
        orch: EnvOrch, fake: FakeMessagesAPI, tmp_path: Path, forgery: str) -> None:
    record(orch, fake, tmp_path, "a", "b")
    sql(orch.db, "UPDATE runs SET status = 'failed' WHERE run_id = 'a'")  # a run resume would take
    forge, named = FORGERIES[forgery]
    forge(orch.db)
    for command in ("show", "replay", "resume"):
        refused = orch(command, "a")
        line = one_error_line(refused)
        assert refused.code == 1 and named in line and "orch audit verify a" in line, (command, refused.stderr)
    audit = orch("audit", "verify")
    assert audit.code == 1 and "run a: TAMPERED" in audit.stdout and "run b: ok" in audit.stdout
    assert named in audit.stdout
    assert orch("show", "b").code == 0 and orch("replay", "b").code == 0
    assert fake.calls() == 6  # two runs of three calls (a 529 and two answers); none since


def test_a_keyed_chain_cannot_be_rewritten_without_its_key(
        orch: EnvOrch, fake: FakeMessagesAPI, tmp_path: Path) -> None:
    keyed = orch.with_env(ORCH_AUDIT_KEY=KEY)
    record(keyed, fake, tmp_path, "a", "b")
    assert keyed("audit", "verify").code == 0

    keyless = orch("audit", "verify")  # a verifier without the key: a clear refusal, not "tampered"
    assert keyless.code == 2 and "TAMPERED" not in keyless.stdout
    assert "run a: UNVERIFIED" in keyless.stdout and "ORCH_AUDIT_KEY" in keyless.stdout
    assert keyless.stdout.splitlines()[-1] == "2 run(s) checked, 0 with a broken log, 2 not verified"
    for cli, says in ((orch, "keyed"), (orch.with_env(ORCH_AUDIT_KEY="another key"), "another")):
        refused = cli("show", "a")
        assert refused.code == 2 and says in one_error_line(refused) and "ORCH_AUDIT_KEY" in one_error_line(refused)

    # someone who can write the file but has no key: edit a row, recompute the hashes without it
    sql(orch.db, "UPDATE transitions SET reason = 'approved by the CFO' WHERE run_id = 'a' AND seq = 2")
    DocumentedChain(orch.db, "a guessed key").rechain("a")
    audit = keyed("audit", "verify")
    assert (audit.code, verdicts(audit)) == (1, {"a": -1, "b": None})  # the runs row's anchor: another key
    # ... or make the run keyless and recompute it all: refused while the key is set
    sql(orch.db, "UPDATE runs SET chain_key = NULL WHERE run_id = 'b'")
    DocumentedChain(orch.db).rechain("b")
    assert orch("audit", "verify", "b").code == 0  # a keyless verifier cannot tell
    downgraded = keyed("show", "b")
    assert downgraded.code == 2 and "keyless" in one_error_line(downgraded)


def test_a_runs_lineage_is_anchored_so_rewriting_it_breaks_the_chain(tmp_path: Path) -> None:
    """A fork's `forked_from` and an experiment run's `experiment`/`arm` are hashed into its
    anchor (as the docs say, so the documented verifier agrees): moving a run to another
    lineage is caught."""
    db = tmp_path / "orch.db"

    async def scenario() -> None:
        store = SQLiteStore(db)
        owner = me()
        for run in (new_run("fork", forked_from="parent"), new_run("arm", experiment="e", arm="B"),
                    new_run("plain")):
            await store.create_run(run, owner)
            await store.append(row(1, run_id=run.run_id), owner)
        await store.close()

    asyncio.run(scenario())
    assert DocumentedChain(db, None).check() == {"fork": 1, "arm": 1, "plain": 1}
    sql(db, "UPDATE runs SET forked_from = 'another' WHERE run_id = 'fork'")
    sql(db, "UPDATE runs SET arm = 'A' WHERE run_id = 'arm'")
    sql(db, "UPDATE runs SET forked_from = 'parent' WHERE run_id = 'plain'")

    async def verify() -> dict[str, str | None]:
        store = SQLiteStore(db)
        try:
            return {run_id: await store.verify_chain(run_id) for run_id in ("fork", "arm", "plain")}
        finally:
            await store.close()

    assert all(why is not None for why in asyncio.run(verify()).values())
