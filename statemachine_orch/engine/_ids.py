"""Run ids: new ones, time-ordered, and the shape every id must have."""

from __future__ import annotations

import re
import secrets
import time

from ..errors import UsageError

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def new_run_id() -> str:
    """Time-ordered, 26 characters (like ULID): ms timestamp + 80 random bits, Crockford base32."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(secrets.token_bytes(10), "big")
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    chars = []
    for _ in range(26):
        chars.append(alphabet[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def check_run_id(run_id: str) -> None:
    """Refuse a run id that is not 1-64 letters, digits, '.', '_' or '-' (it names files and
    shows in commands, so it is only ever a plain word)."""
    if not _RUN_ID.fullmatch(run_id):
        raise UsageError(f"run id {run_id!r} is not valid", fix="use 1-64 letters, digits, '.', '_' or '-'")
