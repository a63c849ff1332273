"""What the offline fake sends back: Messages API bodies (a message, its server-sent-event
stream, an error) and placeholder values that fit a structured answer's schema."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ._offline_limits import prompt_tokens

if TYPE_CHECKING:
    from ._offline import Reply


def example_for_schema(schema: dict[str, Any], defs: dict[str, Any] | None = None) -> Any:
    """A small value that satisfies a pydantic-generated JSON schema (for placeholder answers)."""
    defs = defs if defs is not None else schema.get("$defs", {})
    if "$ref" in schema:
        return example_for_schema(defs.get(schema["$ref"].split("/")[-1], {}), defs)
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            return example_for_schema(schema[key][0], defs)
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    if "default" in schema:
        return schema["default"]
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        return {name: example_for_schema(props[name], defs) for name in schema.get("required", props)}
    if kind == "array":
        return []
    if kind == "integer":
        return int(schema.get("minimum", 0))
    if kind == "number":
        return float(schema.get("minimum", 0))
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return "example"


def message_body(request: dict[str, Any], reply: Reply, number: int) -> dict[str, Any]:
    if reply.data is not None:
        tools = request.get("tools") or [{}]
        name = (request.get("tool_choice") or {}).get("name") or tools[0].get("name", "tool")
        content: list[dict[str, Any]] = [{"type": "tool_use", "id": f"toolu_fake_{number:06d}",
                                          "name": name, "input": reply.data}]
        stop = reply.stop_reason or "tool_use"
        out_chars = len(json.dumps(reply.data))
    else:
        text = reply.text or ""
        content = [{"type": "text", "text": text}]
        stop = reply.stop_reason or "end_turn"
        out_chars = len(text)
    return {
        "id": f"msg_fake_{number:06d}", "type": "message", "role": "assistant",
        "model": request.get("model", "unknown"), "content": content, "stop_reason": stop,
        "stop_sequence": None,
        "usage": {"input_tokens": reply.input_tokens if reply.input_tokens is not None
                  else prompt_tokens(request),
                  "output_tokens": reply.output_tokens if reply.output_tokens is not None
                  else max(1, out_chars // 4),
                  "cache_read_input_tokens": reply.cache_read_tokens,
                  "cache_creation_input_tokens": reply.cache_write_tokens},
    }


def streamed_body(message: dict[str, Any]) -> tuple[int, dict[str, str], bytes, None]:
    """The message as the Messages API streams it (`"stream": true`): server-sent events, its
    usage in `message_start` but for the output tokens, which `message_delta` brings."""
    usage = message["usage"]
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {**usage, "output_tokens": 1}}
    events: list[dict[str, Any]] = [{"type": "message_start", "message": start}]
    for index, block in enumerate(message["content"]):
        if block["type"] == "tool_use":
            empty, delta = {**block, "input": {}}, {"type": "input_json_delta",
                                                    "partial_json": json.dumps(block["input"])}
        else:
            empty, delta = {**block, "text": ""}, {"type": "text_delta", "text": block["text"]}
        events += [{"type": "content_block_start", "index": index, "content_block": empty},
                   {"type": "content_block_delta", "index": index, "delta": delta},
                   {"type": "content_block_stop", "index": index}]
    events += [{"type": "message_delta", "usage": {"output_tokens": usage["output_tokens"]},
                "delta": {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]}},
               {"type": "message_stop"}]
    body = "".join(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n" for event in events)
    return 200, {"content-type": "text/event-stream"}, body.encode(), None


def json_body(status: int, payload: dict[str, Any]) -> tuple[int, dict[str, str], bytes, None]:
    return status, {"content-type": "application/json"}, json.dumps(payload).encode(), None
