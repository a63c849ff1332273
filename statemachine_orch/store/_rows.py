"""Stored values and rows, for every backend: records in as rows a database holds exactly,
JSON text out as records (anything but JSON is refused).

A paid answer must be stored whatever it holds: text with a lone surrogate (which UTF-8, so
a TEXT column, cannot hold) is stored with it escaped, and counts beyond 64-bit integers
saturate in their columns (the response's JSON keeps them exact). A row is built as the
database will give it back (TEXT, 64-bit INTEGER, double REAL, in SQLite and PostgreSQL alike),
so the audit chain hashes the same values when it is written and when it is verified.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from typing import Any

from ..errors import CorruptRunError
from ..types import Attempt, Parent, RunRecord, RunStatus, Takeover, TransitionRecord, Usage

INT64_MAX = 2**63 - 1


def dump(value: Any) -> str | None:
    """Compact JSON text, non-ASCII kept; pydantic-core's encoder (models included) is several
    times faster than the json module's for the request and response on every row. A value
    holding a lone surrogate is written all-ASCII instead, the surrogate as its `\\ud800`
    escape, which `load` turns back into the same string."""
    if value is None:
        return None
    try:
        return json_encoder()(value).decode()
    except ValueError:  # pydantic-core cannot encode a lone surrogate as UTF-8
        from pydantic_core import to_jsonable_python

        return json.dumps(to_jsonable_python(value), separators=(",", ":"))


def text(value: str | None) -> str | None:
    """Plain text as every backend can hold it: a lone surrogate is written as its escape
    (`\\ud800`), and NUL (which PostgreSQL's TEXT refuses) as `\\x00`."""
    if value is None:
        return value
    if "\x00" in value:
        value = value.replace("\x00", "\\x00")
    if value.isascii():
        return value
    return value.encode("utf-8", "backslashreplace").decode()


def integer(value: int) -> int:
    """A count as an INTEGER column holds it: beyond 64 bits it saturates."""
    return max(-INT64_MAX - 1, min(value, INT64_MAX))


def real(value: float | None) -> float | None:
    """A number as a REAL column gives it back: NaN is NULL, -0.0 is 0.0."""
    if value is None or value != value:
        return None
    return float(value) + 0.0


def run_identity(run: RunRecord, chain_version: int, chain_key: str | None) -> dict[str, Any]:
    """The `runs` columns a new run's audit chain is anchored to, as they are stored."""
    parent = run.parent
    return {"run_id": run.run_id, "machine": run.machine, "machine_ref": run.machine_ref,
            "machine_hash": run.machine_hash, "input": dump(run.input), "created_at": run.created_at,
            "chain_version": chain_version, "chain_key": chain_key,
            "parent_run_id": parent and parent.run_id, "parent_state": parent and parent.state,
            "item": parent and parent.item, "batch_id": run.batch, "forked_from": run.forked_from,
            "experiment": run.experiment, "arm": run.arm}


def run_of(row: dict[str, Any], *, stale: bool, takeovers: list[Takeover]) -> RunRecord:
    """The run a `runs` row holds (its columns by name: a file of an older version lacks some)."""
    run_id = row["run_id"]
    return RunRecord(
        run_id=run_id, machine=row["machine"], machine_ref=row["machine_ref"], machine_hash=row["machine_hash"],
        input=load(row["input"], "run", run_id, "input"), status=RunStatus(row["status"]),
        created_at=row["created_at"], updated_at=row["updated_at"], error=row["error"],
        options=load(row["options"], "run", run_id, "options") or {}, owner=row["owner"],
        in_flight=load(row["in_flight"], "run", run_id, "in-flight mark"), stale=stale, takeovers=takeovers,
        parent=Parent(row["parent_run_id"], row["parent_state"], row["item"]) if row.get("parent_run_id") else None,
        batch=row.get("batch_id"), review=load(row.get("review"), "run", run_id, "pending review"),
        forked_from=row.get("forked_from"), experiment=row.get("experiment"), arm=row.get("arm"))


def transition_row(r: TransitionRecord, request: str | None) -> dict[str, Any]:
    """The `transitions` row of a record, in column order, as SQLite will give it back
    (`request`: the record's request as `dump` wrote it)."""
    u = r.usage
    return {
        "run_id": r.run_id, "seq": r.seq, "from_state": r.from_state, "to_state": r.to_state,
        "decision": text(r.decision), "reason": text(r.reason), "attempt": r.attempt,
        "started_at": r.started_at, "latency_ms": real(r.latency_ms), "source": r.source,
        "input_tokens": integer(u.input_tokens), "output_tokens": integer(u.output_tokens),
        "cache_read_tokens": integer(u.cache_read_tokens), "cache_write_tokens": integer(u.cache_write_tokens),
        "cost_usd": real(r.cost_usd), "error": text(r.error), "output": dump(r.output), "request": request,
        "response": dump(r.response), "request_id": text(r.request_id), "request_hash": r.request_hash,
        "in_doubt": int(r.in_doubt),
    }


def attempt_rows(r: TransitionRecord, request: str | None) -> list[dict[str, Any]]:
    """The `attempts` rows of a record's failed calls, in column order (`request`: as for
    `transition_row`; most attempts carry the step's own request, encoded once)."""
    return [{
        "run_id": r.run_id, "seq": r.seq, "attempt": a.number, "state": r.from_state,
        "started_at": a.started_at, "kind": a.kind, "status_code": a.status_code,
        "request_id": text(a.request_id), "delay_s": real(a.delay_s), "error": text(a.error),
        "input_tokens": integer(a.usage.input_tokens), "output_tokens": integer(a.usage.output_tokens),
        "cache_read_tokens": integer(a.usage.cache_read_tokens),
        "cache_write_tokens": integer(a.usage.cache_write_tokens), "cost_usd": real(a.cost_usd),
        "request": request if a.request is r.request else dump(a.request), "response": dump(a.response),
    } for a in r.attempts]


@cache
def json_encoder() -> Callable[[Any], bytes]:
    """pydantic-core's `to_json`, imported on the first write: reading commands never load it."""
    from pydantic_core import to_json

    return to_json


def load(text: str | None, *where: object) -> Any:
    """A stored JSON value; anything else (truncated JSON, a pickle, binary junk) is refused.

    `where` names the value ("run", id, "seq", 2, "output"), joined only if it is refused."""
    if text is None:
        return None
    try:
        if not isinstance(text, str):
            raise ValueError(f"a {type(text).__name__} value where JSON text belongs")
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        what = " ".join(map(str, where)) or "a stored value"
        raise CorruptRunError(f"{what} is not valid JSON ({str(exc)[:80]}); this run "
                              "cannot be read or resumed (other runs are unaffected)",
                              fix="restore the database from a backup") from None


def usage_of(row: dict[str, Any]) -> Usage:
    return Usage(input_tokens=row["input_tokens"], output_tokens=row["output_tokens"],
                 cache_read_tokens=row["cache_read_tokens"], cache_write_tokens=row["cache_write_tokens"])


def attempt_of(row: dict[str, Any], run_id: str) -> Attempt:
    """The failed call an `attempts` row holds (its columns by name)."""
    where = ("run", run_id, "seq", row["seq"], "attempt", row["attempt"])
    return Attempt(number=row["attempt"], started_at=row["started_at"], kind=row["kind"], error=row["error"],
                   status_code=row["status_code"], request_id=row["request_id"], delay_s=row["delay_s"],
                   usage=usage_of(row), cost_usd=row["cost_usd"], request=load(row["request"], *where, "request"),
                   response=load(row["response"], *where, "response"))


def transition_of(row: dict[str, Any], attempts: list[Attempt]) -> TransitionRecord:
    return TransitionRecord(
        run_id=row["run_id"], seq=row["seq"], from_state=row["from_state"], to_state=row["to_state"],
        decision=row["decision"], reason=row["reason"], attempt=row["attempt"],
        started_at=row["started_at"], latency_ms=row["latency_ms"], source=row["source"],
        output=load(row["output"], "run", row["run_id"], "seq", row["seq"], "output"),
        error=row["error"], request=load(row["request"], "run", row["run_id"], "seq", row["seq"], "request"),
        response=load(row["response"], "run", row["run_id"], "seq", row["seq"], "response"),
        request_id=row["request_id"], usage=usage_of(row),
        cost_usd=row["cost_usd"], request_hash=row["request_hash"], in_doubt=bool(row["in_doubt"]),
        attempts=attempts,
    )
