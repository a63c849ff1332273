"""Keeping secrets out of text and stored values: the configured credentials, whatever their
length, and anything shaped like an Anthropic key.

Used wherever text from outside may quote a key back: an answer or an API error (the model
adapter blanks them before anything stores or prints them), a trace event, a log line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

KEY_PATTERN = re.compile(r"sk-ant-[A-Za-z0-9_\-]{8,}")
SECRET_ENV_VARS = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ORCH_AUDIT_KEY")
MASK = "[REDACTED]"


def secrets_from_env() -> list[str]:
    return [v for v in (os.environ.get(name) for name in SECRET_ENV_VARS) if v]


def longest_first(secrets: Iterable[str | None]) -> list[str]:
    """The non-empty secrets, a secret that contains another blanked before it."""
    return sorted({s for s in secrets if s}, key=len, reverse=True)


def redact(text: str, secrets: Iterable[str] | None = None) -> str:
    """`text` with API keys blanked: the given values (default: the credentials in the
    environment) and anything shaped like an Anthropic key."""
    for secret in longest_first(secrets_from_env() if secrets is None else secrets):
        text = text.replace(secret, MASK)
    return KEY_PATTERN.sub(MASK, text)


def redact_values(value: Any, secrets: list[str]) -> Any:
    """A JSON value (an API answer) with each of `secrets` (from `longest_first`) blanked in
    every string, object keys included; the rest of the value is left as it is."""
    if isinstance(value, str):
        for secret in secrets:
            if secret in value:
                value = value.replace(secret, MASK)
        return value
    if isinstance(value, dict):
        return {redact_values(k, secrets): redact_values(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_values(v, secrets) for v in value]
    return value
