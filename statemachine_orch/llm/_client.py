"""The model port: what the engine asks of a model client, and what it gets back.

Requests and answers are Messages API bodies: the request is what gets sent and stored, the
answer's `response` is the response body as the API returned it. `completion_from_response`
reads one back, so a stored answer (step cache, replay) is served exactly like a fresh one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..types import Attempt, RetryPolicy, Usage

CHARS_PER_TOKEN_ESTIMATE = 3  # conservative: English averages nearer 4 characters per token
TRANSIENT_KINDS = frozenset({"transient", "timeout", "connection", "malformed"})
"""Attempt kinds worth retrying, and that may go to a state's fallback once retries run out."""


@dataclass(slots=True, kw_only=True)
class LLMRequest:
    """One Messages API request as the engine sees it. `body` is what gets sent and stored;
    clients must not modify it (the body of a prompt without placeholders is shared by every
    call of its state)."""

    run_id: str
    state: str
    body: dict[str, Any]
    tool_name: str | None = None
    timeout_s: float | None = None
    retry: RetryPolicy | None = None  # None: the model client's own policy
    attempts: list[Attempt] = field(default_factory=list)  # the client appends each failed try


@dataclass(slots=True, kw_only=True)
class Completion:
    """A model answer: `text` or, for structured output, the tool input in `data`."""

    text: str
    data: dict[str, Any] | None
    stop_reason: str | None
    usage: Usage
    request_id: str | None
    response: dict[str, Any]


class ModelClient(Protocol):
    """The seam between the engine and a model provider (Anthropic, offline answers, replay).

    `complete` returns an answer or raises `LLMError`, appending every failed try to
    `request.attempts` as it happens. A client whose calls cost money has `bills = True`: the
    engine then marks each step's call in flight before sending it, so a crash mid-call is
    known at resume.
    """

    async def complete(self, request: LLMRequest) -> Completion: ...


def completion_from_response(
    response: dict[str, Any], tool_name: str | None, request_id: str | None
) -> Completion:
    """Read text, tool input, stop reason and usage out of a Messages API response body."""
    text_parts: list[str] = []
    data: dict[str, Any] | None = None
    for block in response.get("content") or []:
        if block.get("type") == "text":
            text_parts.append(block.get("text", ""))
        elif block.get("type") == "tool_use" and tool_name and block.get("name") == tool_name:
            data = block.get("input") if isinstance(block.get("input"), dict) else None
    usage = response.get("usage") or {}
    return Completion(
        text="".join(text_parts),
        data=data,
        stop_reason=response.get("stop_reason"),
        usage=Usage(
            input_tokens=token_count(usage.get("input_tokens")),
            output_tokens=token_count(usage.get("output_tokens")),
            cache_read_tokens=token_count(usage.get("cache_read_input_tokens")),
            cache_write_tokens=token_count(usage.get("cache_creation_input_tokens")),
        ),
        request_id=request_id,
        response=response,
    )


def token_count(value: Any) -> int:
    """A usage count as best it can be read: a whole number of 0 or more, or a string of
    digits; anything else (missing, null, a word, negative) counts 0. The response itself is
    stored as it came, so what the API sent stays there to see."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 100:
        value = int(value)
    return value if type(value) is int and value >= 0 else 0


def estimate_input_tokens(body: dict[str, Any]) -> int:
    """The input tokens a request body may count, before the API says: its JSON at 3 characters a
    token, on the high side so a budget or a rate limit is not overrun; the call's usage corrects it."""
    return math.ceil(len(json.dumps(body, ensure_ascii=False)) / CHARS_PER_TOKEN_ESTIMATE)
