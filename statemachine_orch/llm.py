"""Anthropic Messages API adapter: one `messages.create` per LLM state, through the official SDK.

The client is configured by the SDK's own environment (`ANTHROPIC_API_KEY`,
`ANTHROPIC_BASE_URL`) unless one is passed in. Only the request body is ever stored; the
key travels in a header the SDK builds and never reaches a record or a log.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .errors import LLMError, UsageError
from .types import Completion, LLMRequest, Usage

if TYPE_CHECKING:
    import anthropic

DEFAULT_MAX_RETRIES = 2
TRANSIENT_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504, 529})


class AnthropicModel:
    """`ModelClient` backed by `anthropic.AsyncAnthropic`."""

    def __init__(
        self,
        client: anthropic.AsyncAnthropic | None = None,
        *,
        max_retries: int = DEFAULT_MAX_RETRIES,
        timeout: float | None = None,
    ) -> None:
        self._client = client
        self._max_retries = max_retries
        self._timeout = timeout

    @property
    def client(self) -> anthropic.AsyncAnthropic:
        if self._client is None:
            import anthropic  # imported on first use: it costs most of the CLI's start-up time

            kwargs: dict[str, Any] = {"max_retries": self._max_retries}
            if self._timeout is not None:
                kwargs["timeout"] = self._timeout
            self._client = anthropic.AsyncAnthropic(**kwargs)
        return self._client

    @staticmethod
    def check_credentials() -> None:
        """Fail before anything is stored when no credentials are configured."""
        if not (os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("ANTHROPIC_AUTH_TOKEN")):
            raise UsageError(
                "ANTHROPIC_API_KEY is not set; export it to call the API, or add --offline "
                "to run on scripted answers"
            )

    async def complete(self, request: LLMRequest) -> Completion:
        import anthropic

        try:
            message = await self.client.messages.create(
                **request.body,
                extra_headers={"x-orch-run": request.run_id, "x-orch-state": request.state},
            )
        except anthropic.APIStatusError as exc:
            kind = "transient" if exc.status_code in TRANSIENT_STATUS else "deterministic"
            raise LLMError(
                f"Messages API returned {exc.status_code}: {_error_text(exc)}",
                kind=kind, status_code=exc.status_code, request_id=exc.request_id,
                run_id=request.run_id, state=request.state,
            ) from None
        except anthropic.APITimeoutError:
            raise LLMError("Messages API request timed out", kind="transient",
                           run_id=request.run_id, state=request.state) from None
        except anthropic.APIConnectionError as exc:
            raise LLMError(f"cannot reach the Messages API: {exc}", kind="transient",
                           run_id=request.run_id, state=request.state) from None
        response = message.model_dump(mode="json", exclude_none=True)
        return completion_from_response(response, request.tool_name, message._request_id)


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
            input_tokens=int(usage.get("input_tokens") or 0),
            output_tokens=int(usage.get("output_tokens") or 0),
            cache_read_tokens=int(usage.get("cache_read_input_tokens") or 0),
            cache_write_tokens=int(usage.get("cache_creation_input_tokens") or 0),
        ),
        request_id=request_id,
        response=response,
    )


def _error_text(exc: anthropic.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return f"{error.get('type', 'error')}: {error['message']}"
    return str(exc.message)
