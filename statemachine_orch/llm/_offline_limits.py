"""The offline Messages API's rate limits: the server's side of the buckets `_limiter.py` keeps.

Per model class, three token buckets (requests, input tokens, output tokens per minute), each
a minute's worth, refilled continuously, full at the start. A request that one bucket cannot
afford is answered 429 with `retry-after` (whole seconds until it could be, as the API sends)
and takes nothing. One that can takes a request, its input tokens and its `max_tokens`; when
answered, the output tokens it did not use are given back and its input is corrected to its
usage (cache writes count, cache reads do not). Every answer, 429s included, carries the
`anthropic-ratelimit-{requests,input-tokens,output-tokens}-{limit,remaining,reset}` headers of
the limits set (`reset`: RFC 3339, when the bucket is full again).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from ._client import token_count
from ._limiter import HEADER_NAMES, RateLimits, TokenBucket, model_class, refill_all

Response = tuple[int, dict[str, str], bytes, None]


def prompt_tokens(request: dict[str, Any]) -> int:
    """The input tokens the fake counts for a request: its messages and system prompt, 4 characters a token."""
    return max(1, (len(json.dumps(request.get("messages", []))) + len(str(request.get("system", "")))) // 4)


class ServerLimits:
    """The fake's rate limits (none set: every request is admitted, no headers are added)."""

    def __init__(self, limits: RateLimits, clock: Callable[[], float]) -> None:
        self.limits = limits
        self._clock = clock
        self._lanes: dict[str, tuple[TokenBucket, ...]] = {}
        self._lock = threading.Lock()
        self.rejected = 0  # the 429s sent

    def admit(self, request: dict[str, Any]) -> Response | None:
        """None when the request is admitted (and charged); else its 429 answer."""
        if self.limits == RateLimits():
            return None
        model = str(request.get("model"))
        cost = (1, prompt_tokens(request), token_count(request.get("max_tokens")))
        with self._lock:
            buckets = self._buckets(model)
            wait = max(bucket.wait(amount) for bucket, amount in zip(buckets, cost, strict=True))
            if wait == 0:
                for bucket, amount in zip(buckets, cost, strict=True):
                    bucket.add(-amount)
                return None
            self.rejected += 1
            headers = self._headers(buckets)
        body = {"type": "error", "error": {"type": "rate_limit_error", "message": (
            f"this request would exceed the rate limit of the {model_class(model)} model class")}}
        headers.update({"content-type": "application/json", "retry-after": str(math.ceil(wait))})
        return 429, headers, json.dumps(body).encode(), None

    def answered(self, request: dict[str, Any], usage: dict[str, Any] | None) -> dict[str, str]:
        """Correct an admitted request's charge to its `usage` (None: an error answer, no output),
        and the headers its answer carries."""
        if self.limits == RateLimits():
            return {}
        charged = prompt_tokens(request)
        used = (charged if usage is None else token_count(usage.get("input_tokens"))
                + token_count(usage.get("cache_creation_input_tokens")),
                0 if usage is None else token_count(usage.get("output_tokens")))
        with self._lock:
            _, inputs, outputs = buckets = self._buckets(str(request.get("model")))
            inputs.add(charged - used[0])
            outputs.add(token_count(request.get("max_tokens")) - used[1])
            return self._headers(buckets)

    def _buckets(self, model: str) -> tuple[TokenBucket, ...]:
        now = self._clock()
        buckets = self._lanes.get(model_class(model))
        if buckets is None:
            buckets = self._lanes[model_class(model)] = tuple(
                TokenBucket(value, now) for value in self.limits.as_tuple())
        refill_all(buckets, now)
        return buckets

    @staticmethod
    def _headers(buckets: tuple[TokenBucket, ...]) -> dict[str, str]:
        headers = {}
        for name, bucket in zip(HEADER_NAMES, buckets, strict=True):
            if bucket.capacity is None:
                continue
            full_in = (bucket.capacity - bucket.level) / (bucket.capacity / 60)
            reset = datetime.now(UTC) + timedelta(seconds=full_in)
            headers[f"anthropic-ratelimit-{name}-limit"] = str(int(bucket.capacity))
            headers[f"anthropic-ratelimit-{name}-remaining"] = str(max(0, math.floor(bucket.level)))
            headers[f"anthropic-ratelimit-{name}-reset"] = reset.isoformat(timespec="seconds").replace("+00:00", "Z")
        return headers
