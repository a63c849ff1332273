"""Retrying model calls: small pure functions over a `RetryPolicy`.

The SDK's own retries are switched off (`max_retries=0`) so this is the only retry layer
and every attempt is seen, logged and counted. Transient failures (429, 529, 5xx, 408,
timeouts, connection resets) back off exponentially with jitter, honour `retry-after` /
`retry-after-ms`, and stop at a number of attempts or a total time; `x-should-retry`
from the server overrides the status-code rule either way.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping

from ..types import RetryPolicy

RETRIABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
NO_RETRY = RetryPolicy(max_attempts=1)


def retry_after(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds the server asked us to wait (`retry-after-ms`, `retry-after` seconds or date)."""
    if not headers:
        return None
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        return max(0.0, float(lower["retry-after-ms"]) / 1000)
    except (KeyError, TypeError, ValueError):
        pass
    value = lower.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    parsed = email.utils.parsedate_tz(value)
    if parsed is None:
        return None
    return max(0.0, float(email.utils.mktime_tz(parsed)) - (time.time() if now is None else now))


def should_retry(status: int | None, headers: Mapping[str, str] | None) -> bool:
    """Whether a failed attempt is transient. `status` None means no response (timeout, reset)."""
    hint = {k.lower(): v for k, v in (headers or {}).items()}.get("x-should-retry")
    if hint == "true":
        return True
    if hint == "false":
        return False
    return status is None or status in RETRIABLE_STATUS or status >= 500


def next_delay(policy: RetryPolicy, attempt: int, elapsed_s: float,
               headers: Mapping[str, str] | None) -> tuple[float | None, str]:
    """(seconds to wait before the next attempt, or None when the policy is exhausted; why).

    The server's `retry-after` wins over our backoff; either way, a wait that would take the
    call past `max_total_s` ends the retries instead of sleeping into the limit.
    """
    if attempt >= policy.max_attempts:
        return None, f"max_attempts={policy.max_attempts} reached"
    hinted = retry_after(headers)
    delay = hinted if hinted is not None else policy.backoff(attempt)
    if elapsed_s + delay > policy.max_total_s:
        asked = "the server asked to wait" if hinted is not None else "the next backoff is"
        return None, (f"{asked} {delay:g}s, which would pass max_total_s={policy.max_total_s:g} "
                      f"after {elapsed_s:.1f}s")
    return delay, "retrying"
