"""OpenAI schemas of tau2 tools, computed once per tool per process.

tau2 builds a pydantic model for every tool on each `get_tools()` call and a JSON schema on each `openai_schema`
access (~1.5 ms per tool, 30 user tools in telecom): too slow to repeat for every episode on the rollout loop.
"""

from __future__ import annotations

import threading
from typing import Any

_CACHE: dict[tuple[str, str, str], dict[str, Any]] = {}
_LOCK = threading.Lock()


def tool_schemas(tools: list[Any] | None) -> list[dict[str, Any]] | None:
    """The tools' OpenAI schemas (shared dicts: treat them as read-only)."""
    if not tools:
        return None
    out = []
    for tool in tools:
        key = (tool.name, getattr(tool, "short_desc", ""), getattr(tool, "long_desc", ""))
        schema = _CACHE.get(key)
        if schema is None:
            schema = tool.openai_schema
            with _LOCK:
                _CACHE[key] = schema
        out.append(schema)
    return out
