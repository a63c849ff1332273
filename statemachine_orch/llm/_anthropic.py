"""Anthropic Messages API adapter: `messages.create` through the official SDK, with our retries.

The client is configured by the SDK's own environment (`ANTHROPIC_API_KEY`,
`ANTHROPIC_BASE_URL`) unless one is passed in. The SDK's retries are switched off
(`max_retries=0`): `retry.py` is the one retry layer, so every attempt is seen and
returned as an `Attempt`. Only the request body is ever stored; the key travels in a
header the SDK builds, and a server that quotes it back (in an answer or an error) has it
blanked here, before anything stores, prints or judges the answer.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from .._redact import longest_first, redact, redact_values, secrets_from_env
from ..errors import LLMError, NoCredentialsError
from ..types import Attempt, AttemptKind, RetryPolicy, now_iso
from ._client import TRANSIENT_KINDS, Completion, LLMRequest, completion_from_response
from ._retry import next_delay, should_retry

if TYPE_CHECKING:
    import anthropic

SPEND_LIMIT_CODES = frozenset({"enforced_spend_limit_reached", "contract_spend_limit_reached",
                               "linked_organization_spend_limit_reached"})
Sleep = Callable[[float], Awaitable[None]]


class AnthropicModel:
    """`ModelClient` backed by `anthropic.AsyncAnthropic`; `sleep`/`clock` are injectable for tests."""

    bills = True  # its calls may cost money: the engine marks each one in flight before sending

    def __init__(
        self,
        client: anthropic.AsyncAnthropic | None = None,
        *,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # one retry layer: a client passed in with its own retries gets them switched off
        self._client = client if client is None or client.max_retries == 0 else client.with_options(
            max_retries=0)
        self.retry = retry or RetryPolicy()
        self._timeout = timeout
        self._sleep = sleep
        self._clock = clock

    @property
    def client(self) -> anthropic.AsyncAnthropic:
        if self._client is None:
            import anthropic  # imported on first use: it costs most of the CLI's start-up time

            kwargs: dict[str, Any] = {"max_retries": 0}
            if self._timeout is not None:
                kwargs["timeout"] = self._timeout
            self._client = anthropic.AsyncAnthropic(**kwargs)
        return self._client

    @staticmethod
    def check_credentials() -> None:
        """Fail before anything is stored when no credentials are configured."""
        if not (os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("ANTHROPIC_AUTH_TOKEN")):
            raise NoCredentialsError()

    async def complete(self, request: LLMRequest) -> Completion:
        """One answer, retrying transient failures; each failed try is appended to
        `request.attempts` as it happens, then LLMError when the retries are used up."""
        import anthropic

        policy = request.retry or self.retry
        client = self.client
        body = request.body
        # everything beyond the three required fields goes through as the API spells it, so
        # any Messages API parameter works (and an unknown one is the API's 400, not a TypeError)
        required = {"model": body["model"], "max_tokens": body["max_tokens"], "messages": body["messages"]}
        extra: dict[str, Any] = {"extra_headers": {"x-orch-run": request.run_id,
                                                   "x-orch-state": request.state},
                                 "extra_body": {k: v for k, v in body.items() if k not in required}}
        if request.timeout_s is not None:
            extra["timeout"] = request.timeout_s
        attempts = request.attempts  # shared, so a step stopped mid-retry still logs its tries
        secrets = longest_first([client.api_key, client.auth_token, *secrets_from_env()])
        began = self._clock()
        number = 0
        while True:
            number += 1
            started_at = now_iso()
            status: int | None = None
            headers: Mapping[str, str] | None = None
            request_id: str | None = None
            kind: AttemptKind
            try:
                message = await client.messages.create(**required, **extra)
            except asyncio.CancelledError:
                attempts.append(Attempt(number=number, started_at=started_at, kind="cancelled",
                                        error="abandoned in flight when the step was stopped; it may "
                                        "have been billed", request=body))
                raise
            except anthropic.APIStatusError as exc:
                status, headers, request_id = exc.status_code, exc.response.headers, exc.request_id
                kind = "spend_limit" if _is_spend_limit(exc) else (
                    "transient" if should_retry(status, headers) else "deterministic")
                error = f"Messages API returned {status}: {_error_text(exc)}"
            except anthropic.APITimeoutError:
                limit = f"{request.timeout_s:g}s (the state's timeout=)" if request.timeout_s else (
                    "the client's default")
                kind, error = "timeout", f"Messages API request timed out after {limit}"
            except anthropic.APIConnectionError as exc:
                kind, error = "connection", f"cannot reach the Messages API: {exc}"
            except ValueError as exc:  # the SDK refuses, e.g. a call too long to make unstreamed
                kind, error = "deterministic", (
                    f"the SDK refused the request: {' '.join(str(exc).split())[:300]}; set timeout= "
                    "(seconds) on the state or lower its max_tokens")
            else:
                response = redact_values(message.model_dump(mode="json", exclude_none=True), secrets)
                return completion_from_response(response, request.tool_name, message._request_id)
            delay, why = (next_delay(policy, number, self._clock() - began, headers)
                          if kind in TRANSIENT_KINDS else (None, "not retriable"))
            error = redact(error, secrets)  # a server may quote the credentials it refused
            attempts.append(Attempt(number=number, started_at=started_at, kind=kind, error=error,
                                    status_code=status, request_id=request_id, delay_s=delay,
                                    request=request.body))
            if delay is None:
                final = "transient" if kind in TRANSIENT_KINDS else kind
                if final == "transient":
                    error = (f"{error} (gave up after {number} attempt{'s' if number > 1 else ''}: "
                             f"{why})")
                raise LLMError(error, kind=final, status_code=status,
                               request_id=request_id, run_id=request.run_id, state=request.state)
            await self._sleep(delay)


def _is_spend_limit(exc: anthropic.APIStatusError) -> bool:
    """A 429 (or 402) for an exhausted spend limit: retrying cannot help."""
    return exc.status_code == 402 or getattr(exc, "error_code", None) in SPEND_LIMIT_CODES


def _error_text(exc: anthropic.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return f"{error.get('type', 'error')}: {error['message']}"
    return str(exc.message)
