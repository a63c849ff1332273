"""Keeping API keys out of text: the credentials in the environment, and anything shaped like a key.

Used wherever text from outside may quote a key back (an API error, a trace event, a log line).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

KEY_PATTERN = re.compile(r"sk-ant-[A-Za-z0-9_\-]{8,}")
SECRET_ENV_VARS = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN")
MIN_SECRET_LENGTH = 8  # a shorter value would blank ordinary text


def secrets_from_env() -> list[str]:
    return [v for v in (os.environ.get(name) for name in SECRET_ENV_VARS) if v]


def worth_hiding(secrets: Iterable[str]) -> list[str]:
    """The secrets long enough to look for."""
    return [s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH]


def redact(text: str, secrets: Iterable[str] | None = None) -> str:
    """`text` with API keys blanked: the given values (default: the SDK's credential
    environment variables) and anything shaped like an Anthropic key."""
    for secret in worth_hiding(secrets_from_env() if secrets is None else secrets):
        text = text.replace(secret, "[REDACTED]")
    return KEY_PATTERN.sub("[REDACTED]", text)
