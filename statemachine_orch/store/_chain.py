"""The audit chain, for every backend: each log row stores a hash over its values, its failed attempts and the
previous row's hash; a run's first row chains to the run row's own hash (its anchor).

Editing, inserting or removing a row, an attempt or the run's identity breaks the chain from
there on; rows cut from the end are found against the run's record of its last step
(`runs.last_seq`). Version 2 hashes canonical JSON of the values as SQLite gives them back,
so any language can verify it and no float formatting can break it (docs/storage.md#the-audit-chain
defines it byte for byte); with an audit key it is an HMAC, which someone who can write the
file cannot recompute. Version 1 (runs created before schema version 6) hashed the Python
repr of a log row's values only; such runs are verified, and continued, as they were.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cache
from typing import Any

from ..errors import AuditKeyError
from ._rows import json_encoder

LEGACY, CANONICAL = 1, 2
RUN_FIELDS = ("run_id", "machine", "machine_ref", "machine_hash", "input", "created_at", "chain_version",
              "chain_key")
PARENT_FIELDS = ("parent_run_id", "parent_state", "item")  # hashed too, for a child run only
BATCH_FIELDS = ("batch_id",)  # hashed too, for a run of a batch only
LINEAGE_FIELDS = ("forked_from", "experiment", "arm")  # each hashed too, when set
ROW_COLUMNS = ("run_id", "seq", "from_state", "to_state", "decision", "reason", "attempt", "started_at",
               "latency_ms", "source", "input_tokens", "output_tokens", "cache_read_tokens",
               "cache_write_tokens", "cost_usd", "error", "output", "request", "response", "request_id",
               "request_hash", "in_doubt")
ATTEMPT_COLUMNS = ("run_id", "seq", "attempt", "state", "started_at", "kind", "status_code", "request_id",
                   "delay_s", "error", "input_tokens", "output_tokens", "cache_read_tokens",
                   "cache_write_tokens", "cost_usd", "request", "response")
CHAINED_COLUMNS = ", ".join(ROW_COLUMNS)
CHAINED_ATTEMPT_COLUMNS = ", ".join(ATTEMPT_COLUMNS)
_KEY_ID_MESSAGE = b"statemachine_orch audit key id"
_AS_IS = frozenset({str, int, type(None)})


def canonical(value: Any) -> str:
    """Canonical JSON of values as SQLite gives them back: no whitespace, keys sorted, a REAL as
    its IEEE 754 bits, a BLOB as hex, text escaped as RFC 8785 (JCS) escapes it (as
    pydantic-core's encoder does, several times faster than the json module's)."""
    return json_encoder()(_typed(value)).decode()


def _typed(value: Any) -> Any:
    """`value` with what JSON cannot say exactly tagged, and object keys in order."""
    kind = type(value)
    if kind in _AS_IS:
        return value
    if kind is dict:
        return {k: v if type(v) in _AS_IS else _typed(v) for k, v in sorted(value.items())}
    if kind is list:
        return [_typed(v) for v in value]
    if kind is float:
        return {"real": struct.pack(">d", value).hex()}
    if kind is bytes:
        return {"blob": value.hex()}
    if kind is bool:
        return int(value)
    raise TypeError(f"a stored value cannot be a {kind.__name__}")


class AuditKey:
    """The hash of one store's chains: HMAC-SHA256 under the audit key, or SHA-256 without one.

    `id` (16 hex digits, stored with each keyed run) tells which key a run needs, without
    revealing it."""

    __slots__ = ("_secret", "id")

    def __init__(self, secret: str | None) -> None:
        self._secret = secret.encode() if secret else None
        self.id = self.digest(_KEY_ID_MESSAGE)[:16] if secret else None

    def digest(self, message: bytes) -> str:
        if self._secret is None:
            plain: str = _hashlib().sha256(message).hexdigest()
            return plain
        keyed: str = _hmac()(self._secret, message, "sha256").hexdigest()
        return keyed

    def anchor(self, run: Mapping[str, Any]) -> str:
        """What a version-2 run's first row chains to: the hash of the run row's identity (and,
        for a child run, of its parent's, for a run of a batch, of its batch, for a fork or an
        experiment's run, of its lineage; any other run hashes as before these existed)."""
        names: tuple[str, ...] = RUN_FIELDS + PARENT_FIELDS if run.get("parent_run_id") is not None else RUN_FIELDS
        if run.get("batch_id") is not None:
            names += BATCH_FIELDS
        names += tuple(name for name in LINEAGE_FIELDS if run.get(name) is not None)
        return self.digest(canonical({name: run[name] for name in names}).encode())

    def link(self, version: int, previous: str, row: Mapping[str, Any], attempts: Sequence[Mapping[str, Any]]
             ) -> str:
        """A row's chain value (`row`: the ROW_COLUMNS in order; `attempts`: its attempts rows)."""
        if version == LEGACY:
            return legacy_hash(previous, tuple(row.values()))
        return self.digest((previous + canonical({**row, "attempts": list(attempts)})).encode())

    def check(self, run_id: str, key_id: str | None) -> None:
        """Refuse a run chained under another key than this one, or keyless while there is a key:
        its hashes cannot be checked (or, keyless, could have been rewritten by anyone)."""
        if key_id == self.id:
            return
        fix = "set ORCH_AUDIT_KEY to the key the run was written with"
        if key_id is None:
            raise AuditKeyError(f"run {run_id} has a keyless audit chain but an audit key is set: anyone "
                                "who could write the file could have rewritten it", run_id=run_id,
                                fix="read runs written without a key with ORCH_AUDIT_KEY unset")
        if self.id is None:
            raise AuditKeyError(f"run {run_id} has a keyed audit chain (HMAC-SHA256, key id {key_id}), which "
                                "cannot be verified without its key", run_id=run_id, fix=fix)
        raise AuditKeyError(f"run {run_id} was chained with another audit key (key id {key_id}; the key set "
                            f"has id {self.id})", run_id=run_id, fix=fix)


def legacy_hash(previous: str, content: tuple[Any, ...]) -> str:
    """Version 1: sha256 over the previous hash and the Python repr of the row's values."""
    digest = _hashlib().sha256(previous.encode())
    digest.update(repr(content).encode())
    hexdigest: str = digest.hexdigest()
    return hexdigest


def legacy_first_link(run_id: str) -> str:
    """What a version-1 run's first row chains to: a hash of its id."""
    return legacy_hash("", (run_id,))


@cache
def _hashlib() -> Any:
    """hashlib, imported on first use: `orch runs` and `log` never hash."""
    import hashlib

    return hashlib


@cache
def _hmac() -> Callable[..., Any]:
    import hmac

    return hmac.new


def chain_start(run_id: str, run: Mapping[str, Any] | None, key: AuditKey) -> tuple[int, str]:
    """(version, the link a run's first row chains to) for the run row `run` (its columns by
    name: a file of an older version has no chain columns, so version 1), if this key may use it."""
    version: int = (run or {}).get("chain_version", LEGACY)
    key.check(run_id, (run or {}).get("chain_key"))
    if version == CANONICAL and run is not None:
        return version, key.anchor(run)
    return version, legacy_first_link(run_id)


def verify_log(run_id: str, run: Mapping[str, Any] | None, rows: Iterable[Sequence[Any]],
               attempts: Iterable[Sequence[Any]], key: AuditKey) -> str | None:
    """None when the run's row and log are intact, else what is wrong and at which row
    (`AuditKeyError` when this key cannot check them). `rows`: the log's CHAINED_COLUMNS and
    chain, by seq; `attempts`: the CHAINED_ATTEMPT_COLUMNS of its failed calls, by seq and attempt."""
    version, previous = chain_start(run_id, run, key)
    if version not in (LEGACY, CANONICAL):
        return f"the runs row names audit chain version {version}, which this statemachine_orch does not know"
    if version == CANONICAL and run is not None and previous != run["chain_anchor"]:
        return ("the runs row does not match its hash: its id, machine, machine_ref, machine_hash, input, "
                "created_at or chain fields were edited")
    by_seq: dict[int, list[dict[str, Any]]] = {}
    if version == CANONICAL:
        for values in attempts:
            by_seq.setdefault(values[1], []).append(dict(zip(ATTEMPT_COLUMNS, values, strict=True)))
    expected_seq = 1
    for values in rows:
        row, stored = dict(zip(ROW_COLUMNS, values[:-1], strict=True)), values[-1]
        seq = row["seq"]
        if seq != expected_seq:
            what = "missing (deleted)" if seq > expected_seq else "duplicated"
            return f"row seq {expected_seq} is {what}: the log jumps to seq {seq}"
        previous = key.link(version, previous, row, by_seq.get(seq, []))
        if previous != stored:
            return (f"row seq {seq} does not match its hash: it or one of its attempts was edited, or it was "
                    "inserted, or a row before it was removed")
        expected_seq += 1
    # the log's end against the run's own record of it: rows cut from the end leave a
    # consistent chain, but not the seq the run row was last advanced to
    last = expected_seq - 1
    recorded = None if run is None else run.get("last_seq")
    if recorded is not None and recorded > last:
        return (f"row seq {last + 1} is missing (deleted): the run was advanced to seq {recorded}, "
                f"its log ends at seq {last}")
    if recorded is not None and recorded < last:
        return f"row seq {recorded + 1} was added after the run's last recorded step (seq {recorded})"
    return None
