"""Anthropic Messages API adapter: `messages.create` through the official SDK, with our retries.

The client is configured by the SDK's own environment (`ANTHROPIC_API_KEY`,
`ANTHROPIC_BASE_URL`) unless one is passed in. The SDK's retries are switched off
(`max_retries=0`): `retry.py` is the one retry layer, so every attempt is seen and
returned as an `Attempt`. Only the request body is ever stored; the key travels in a
header the SDK builds, and a server that quotes it back (in an answer or an error) has it
blanked here, before anything stores, prints or judges the answer.

A call whose `max_tokens` is above `STREAM_ABOVE_TOKENS` is streamed (`messages.stream`):
the SDK refuses to send unstreamed a call it expects to take more than 10 minutes (an hour
per 128,000 output tokens, so above 21,333, and above 8,192 for the Opus 4.0 and 4.1 ids).
The streamed message is recorded exactly as an unstreamed one: same JSON, usage, request id.

With `rate_limits=`, every attempt first waits its turn in a `RateLimiter` shared by all the
client's calls (`_limiter.py`); a 429 then pauses that line for its retry-after instead of
sleeping this call alone, so N calls refused at once wait once, together.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from .._redact import longest_first, redact, redact_values, secrets_from_env
from ..errors import LLMError, NoCredentialsError, UsageError
from ..types import Attempt, AttemptKind, RetryPolicy, Usage, now_iso
from ._client import TRANSIENT_KINDS, Completion, LLMRequest, completion_from_response, estimate_input_tokens
from ._limiter import Permit, RateLimiter, RateLimits
from ._retry import next_delay, should_retry

if TYPE_CHECKING:
    import anthropic
    from anthropic.types import Message

SPEND_LIMIT_CODES = frozenset({"enforced_spend_limit_reached", "contract_spend_limit_reached",
                               "linked_organization_spend_limit_reached"})
STREAM_ABOVE_TOKENS = 8_192  # every call the SDK would refuse unstreamed is above this
Sleep = Callable[[float], Awaitable[None]]
Answer = tuple["Message", str | None, Mapping[str, str]]  # the message, its request id, the response headers
_CHARACTERS = {"\r": "a carriage return", "\n": "a line feed", "\t": "a tab", " ": "a space"}


class MalformedAnswer(Exception):
    """A successful HTTP status whose body is not a Messages API message (a proxy's HTML page,
    a body cut short): retried like a dropped connection."""

    def __init__(self, why: str, *, status: int, request_id: str | None) -> None:
        super().__init__(why)
        self.status = status
        self.request_id = request_id


class AnthropicModel:
    """`ModelClient` backed by `anthropic.AsyncAnthropic`; `sleep`/`clock` are injectable for tests.

    `rate_limits`: None, no limiter; `RateLimits(...)`, a `RateLimiter` of this client's own,
    on its `clock` and `sleep` (limits left None are read from the API's headers); a
    `RateLimiter`, used as given (shared with other clients).
    """

    bills = True  # its calls may cost money: the engine marks each one in flight before sending

    def __init__(
        self,
        client: anthropic.AsyncAnthropic | None = None,
        *,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        rate_limits: RateLimits | RateLimiter | None = None,
    ) -> None:
        # The SDK is imported here, not at the first call: it takes seconds under load, which
        # would land in that call's latency and on its run's max_seconds clock.
        import anthropic

        if client is None:
            kwargs: dict[str, Any] = {"max_retries": 0}
            if timeout is not None:
                kwargs["timeout"] = timeout
            client = anthropic.AsyncAnthropic(**kwargs)
        elif client.max_retries != 0:  # one retry layer: a client's own retries are switched off
            client = client.with_options(max_retries=0)
        _check_sendable("ANTHROPIC_API_KEY", client.api_key)
        _check_sendable("ANTHROPIC_AUTH_TOKEN", client.auth_token)
        self.client = client
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._clock = clock
        self.limiter = (RateLimiter(rate_limits, clock=clock, sleep=sleep) if isinstance(rate_limits, RateLimits)
                        else rate_limits)

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
        body = request.body
        # everything beyond the three required fields goes through as the API spells it, so
        # any Messages API parameter works (and an unknown one is the API's 400, not a TypeError)
        required = {"model": body["model"], "max_tokens": body["max_tokens"], "messages": body["messages"]}
        extra: dict[str, Any] = {"extra_headers": {"x-orch-run": request.run_id,
                                                   "x-orch-state": request.state},
                                 "extra_body": {k: v for k, v in body.items() if k not in required}}
        if request.timeout_s is not None:
            extra["timeout"] = request.timeout_s
        send = self._stream if required["max_tokens"] > STREAM_ABOVE_TOKENS else self._create
        attempts = request.attempts  # shared, so a step stopped mid-retry still logs its tries
        secrets = longest_first([self.client.api_key, self.client.auth_token, *secrets_from_env()])
        model, estimate = required["model"], estimate_input_tokens(body) if self.limiter else 0
        permit = await self._acquire(model, estimate, required["max_tokens"])
        began = self._clock()  # the policy's time is the retrying's: a wait in line before the first try is not
        number = 0
        while True:
            number += 1
            started_at = now_iso()
            status: int | None = None
            headers: Mapping[str, str] | None = None
            request_id: str | None = None
            kind: AttemptKind
            try:
                message, request_id, headers = await send(required, extra)
                # no serializer warnings: a malformed usage count is read as best it can be
                # (completion_from_response) and stored as it came
                response = redact_values(message.model_dump(mode="json", exclude_none=True, warnings=False),
                                         secrets)
                completion = completion_from_response(response, request.tool_name, request_id)
            except asyncio.CancelledError:
                self._end(permit, model, None)
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
            except MalformedAnswer as exc:
                status, request_id = exc.status, exc.request_id
                kind, error = "malformed", (f"the Messages API answered {status} with a body that is not a "
                                            f"message: {' '.join(str(exc).split())[:300]}")
            except Exception:  # not the API's answer: a bug here or in the SDK, raised as it is
                self._end(permit, model, headers)
                raise
            else:
                self._end(permit, model, headers, completion.usage)
                return completion
            self._end(permit, model, headers, refused=status == 429)
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
            if self.limiter is not None and status == 429:
                self.limiter.pause(model, delay)  # every call of the model's class waits it out, once
            else:
                await self._sleep(delay)
            permit = await self._acquire(model, estimate, required["max_tokens"])

    async def _acquire(self, model: str, estimate: int, max_tokens: int) -> Permit | None:
        """The call's turn in the rate limiter's line (None: no limiter)."""
        return None if self.limiter is None else await self.limiter.acquire(model, estimate, max_tokens)

    def _end(self, permit: Permit | None, model: str, headers: Mapping[str, str] | None,
             usage: Usage | None = None, *, refused: bool = False) -> None:
        """Tell the limiter how the call ended: the answer's headers, its usage (None: it failed),
        whether it was refused (a 429)."""
        if permit is None or self.limiter is None:
            return
        if usage is None:
            permit.release(refused=refused)
        else:
            permit.settle(usage)
        if headers is not None:
            self.limiter.observe(model, headers, sent_at=permit.granted_at)

    async def _create(self, required: dict[str, Any], extra: dict[str, Any]) -> Answer:
        """The answer to one unstreamed call, its request id and its headers."""
        import anthropic

        raw = await self.client.messages.with_raw_response.create(**required, **extra)
        try:
            message = await raw.parse()
        except ValueError as exc:  # the body is not JSON
            raise MalformedAnswer(str(exc), status=raw.status_code, request_id=raw.request_id) from None
        if not isinstance(message, anthropic.types.Message):  # e.g. text/html: the SDK hands back text
            raise MalformedAnswer(f"a {raw.headers.get('content-type')} body", status=raw.status_code,
                                  request_id=raw.request_id)
        return message, raw.request_id, raw.headers

    async def _stream(self, required: dict[str, Any], extra: dict[str, Any]) -> Answer:
        """The answer to one streamed call, as its final message, its request id and its headers."""
        final: Message | None = None
        async with self.client.messages.stream(**required, **extra) as stream:
            try:
                async for event in stream:
                    if event.type == "message_stop":
                        final = event.message
            except (ValueError, RuntimeError) as exc:  # events that are not JSON, or out of order
                raise MalformedAnswer(str(exc), status=stream.response.status_code,
                                      request_id=stream.request_id) from None
        if final is None:
            raise MalformedAnswer("the stream ended before the message did",
                                  status=stream.response.status_code, request_id=stream.request_id)
        return final, stream.request_id, stream.response.headers


def _check_sendable(name: str, credential: str | None) -> None:
    """Refuse a credential that no HTTP header can carry or that cannot be right (whitespace or
    control characters: a line ending copied with the key, most often), naming where, never
    echoing it. Sent, it fails every call as a connection error, and each is retried."""
    for position, char in enumerate(credential or "", 1):
        if char.isspace() or not char.isprintable():
            what = _CHARACTERS.get(char, "a whitespace character" if char.isspace() else "a control character")
            raise UsageError(f"{name} has {what} at character {position} of {len(credential or '')}",
                             fix="set it again without it")


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
