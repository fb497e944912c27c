"""The policy's text format for tool calls (Qwen3 / Hermes style) and a parser that never trusts the model.

An assistant turn is free text followed by zero or more blocks
    <tool_call>
    {"name": "get_customer_by_phone", "arguments": {"phone_number": "555-123-2002"}}
    </tool_call>
`format_tool_call` writes exactly what the chat template renders for a native `tool_calls` entry, so SFT rows and
rollout prompts agree token for token.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, Field

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_BLOCK_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


class ParsedCall(BaseModel):
    name: str
    arguments: dict[str, Any]


class ParsedTurn(BaseModel):
    """What one sampled assistant turn says: text, tool calls, or why it is malformed."""

    content: str = ""
    tool_calls: list[ParsedCall] = Field(default_factory=list)
    error: str | None = None


def format_tool_call(name: str, arguments: dict[str, Any]) -> str:
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def format_assistant_turn(content: str | None, tool_calls: list[dict[str, Any]] | None) -> str:
    """Text of an assistant turn as the chat template renders it (without the turn markers)."""
    parts = []
    if content:
        parts.append(content)
    for call in tool_calls or []:
        parts.append(format_tool_call(call["name"], call.get("arguments") or {}))
    return "\n".join(parts)


def _parse_call(raw: str, allowed_tools: set[str] | None) -> ParsedCall | str:
    try:
        payload = json.loads(raw)
    except json.JSONDecodeError as err:
        return f"the tool call is not valid JSON ({err.msg} at position {err.pos})"
    if not isinstance(payload, dict):
        return "the tool call must be a JSON object with 'name' and 'arguments'"
    name = payload.get("name")
    if not isinstance(name, str) or not name:
        return "the tool call has no 'name' string"
    arguments = payload.get("arguments", {})
    if isinstance(arguments, str):  # some models double-encode the arguments
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return f"the arguments of '{name}' are not a JSON object"
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return f"the arguments of '{name}' must be a JSON object"
    if allowed_tools is not None and name not in allowed_tools:
        return f"unknown tool '{name}'; available tools: {', '.join(sorted(allowed_tools))}"
    return ParsedCall(name=name, arguments=arguments)


def parse_assistant_text(
    text: str,
    allowed_tools: set[str] | None = None,
    max_tool_calls: int | None = None,
) -> ParsedTurn:
    """Split a sampled turn into text and tool calls; any defect becomes `error` (shown to the model), never raised."""
    blocks = list(_BLOCK_RE.finditer(text))
    unclosed = text.count(TOOL_CALL_OPEN) != len(blocks) or text.count(TOOL_CALL_CLOSE) != len(blocks)
    content = _BLOCK_RE.sub("", text).strip() if blocks else text.strip()
    if unclosed:
        return ParsedTurn(content=content, error="a <tool_call> block is not closed with </tool_call>")
    calls: list[ParsedCall] = []
    for block in blocks:
        parsed = _parse_call(block.group(1), allowed_tools)
        if isinstance(parsed, str):
            return ParsedTurn(content=content, error=parsed)
        calls.append(parsed)
    if max_tool_calls is not None and len(calls) > max_tool_calls:
        return ParsedTurn(
            content=content,
            tool_calls=calls,
            error=f"{len(calls)} tool calls in one turn; at most {max_tool_calls} allowed",
        )
    if not calls and not content:
        return ParsedTurn(error="the message is empty: write a reply or make a tool call")
    return ParsedTurn(content=content, tool_calls=calls)
