"""Stored values and rows: JSON text in, records out (anything but JSON is refused)."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from typing import Any

from ...errors import CorruptRunError
from ...types import Attempt, TransitionRecord, Usage


def dump(value: Any) -> str | None:
    """Compact JSON text, non-ASCII kept; pydantic-core's encoder (models included) is several
    times faster than the json module's for the request and response on every row."""
    if value is None:
        return None
    return _encoder()(value).decode()


@cache
def _encoder() -> Callable[[Any], bytes]:
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
