"""Async chat-completion clients for the user simulator and teacher agents: OpenAI-compatible servers and Gemini.

Both run on the caller's asyncio loop and never block it (aiohttp, or google-genai's async API); one client is meant
to be shared by every concurrent episode of a process. Failed attempts are retried by the recipe's one policy
(rollout.clients.retry: 408 / 429 / 5xx, timeouts, connection errors, Retry-After honoured); any other 4xx fails at
once. An unusable reply is asked again up to `max_reasks` times and then returned as is: an empty one (no text, no
tool calls), as tau2's `generate` does, and, when the caller passes `require_json_arguments=True`, one with tool-call
arguments that are not a JSON object. Each attempt is bounded by the policy's `timeout_s`, the attempts by its
`max_retries` and `max_reasks`; the engine bounds the whole turn.

The OpenAI-compatible client is written on aiohttp rather than the openai SDK: on the rollout benchmark the SDK cost
~4 ms more per user-simulator request and tripled the harness's CPU per episode, 73% instead of 92% of the LLM bound at
256 concurrent episodes (docs/benchmarks.md, "Chat client").

Tool-call arguments that are not a JSON object: tau2's `generate` would raise (json.loads). These clients keep the
call with `arguments={}` and the unparsed string in `ChatToolCall.raw_arguments`, so the caller decides (the user
simulator asks again, then fails; a teacher agent can show the model an error).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from typing import Any

import aiohttp
import orjson
from pydantic import BaseModel, Field

from rollout.clients.retry import Retryable, RetryPolicy, is_retryable_status, parse_retry_after, redact

logger = logging.getLogger(__name__)

_MAX_ERROR_BODY = 300
# The user simulator's defaults (TAU2_USER_TIMEOUT_S, TAU2_USER_MAX_RETRIES); a hosted API rate-limits in seconds.
CHAT_RETRY = RetryPolicy(max_retries=6, backoff_base_s=1.0, backoff_max_s=60.0, timeout_s=120.0)


class ChatToolCall(BaseModel):
    id: str
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    # The unparsed arguments, set only when they were not a JSON object (then `arguments` is {}).
    raw_arguments: str | None = None


class ChatCompletion(BaseModel):
    content: str | None = None
    tool_calls: list[ChatToolCall] = Field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    attempts: int = 1
    reasks: int = 0  # unusable replies asked again before this one

    def is_empty(self) -> bool:
        return not self.tool_calls and not (self.content or "").strip()

    def malformed_calls(self) -> list[ChatToolCall]:
        """Tool calls whose arguments were not a JSON object."""
        return [call for call in self.tool_calls if call.raw_arguments is not None]

    def problem(self, require_json_arguments: bool = False) -> str | None:
        """Why the reply cannot be used (None when it can)."""
        if self.is_empty():
            return "an empty reply (no text, no tool call)"
        broken = self.malformed_calls() if require_json_arguments else []
        if broken:
            shown = ", ".join(f"{call.name}({call.raw_arguments[:80]!r})" for call in broken)
            return f"tool call arguments that are not a JSON object: {shown}"
        return None


class ChatClientError(RuntimeError):
    """The request failed for good (retries exhausted or a non-retryable error). Never carries the API key."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _json_bytes(body: dict[str, Any]) -> bytes:
    """Request body as JSON: orjson (a user-simulator request with 30 tool schemas encodes ~8x faster), else json."""
    try:
        return orjson.dumps(body)
    except TypeError:  # e.g. an integer past 64 bits in extra_body: the json module takes it
        return json.dumps(body).encode()


def parse_arguments(raw: Any) -> tuple[dict[str, Any], str | None]:
    """Tool-call arguments as a dict; (`{}`, raw string) when they are not a JSON object."""
    if isinstance(raw, dict):
        return raw, None
    if raw is None or (isinstance(raw, str) and raw.strip() == ""):
        return {}, None  # some servers send "" for a call without parameters
    text = raw if isinstance(raw, str) else json.dumps(raw)
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return {}, text
    if not isinstance(value, dict):
        return {}, text
    return value, None


def _text_of(content: Any) -> str | None:
    """Message content as a string (some servers send a list of typed parts)."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def _json_arguments(call: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI API takes a call's `arguments` as a JSON string; SFT-style messages carry a dict."""
    function = dict(call["function"])
    if not isinstance(function.get("arguments"), str):
        function["arguments"] = json.dumps(function.get("arguments") or {}, ensure_ascii=False)
    return function


_WIRE_CALL_KEYS = {"id", "type", "function"}


def _wire_ready(message: dict[str, Any]) -> bool:
    """A message with tool calls already in the form clean_messages gives it (the user simulator's request list is
    cleaned as it grows, then passed whole to `complete` each turn)."""
    calls = message["tool_calls"]
    return (
        bool(calls)
        and message.get("content", "") is not None
        and all(call.keys() == _WIRE_CALL_KEYS and isinstance(call["function"].get("arguments"), str) for call in calls)
    )


def clean_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI wire form of messages built by tau2's `to_litellm_messages`, as litellm sends them: no `tool_calls:
    null`, no `content: null` beside tool calls; also without the extra top-level `name` tau2 puts in each call,
    which strict servers may reject."""
    cleaned = []
    for message in messages:
        if "tool_calls" not in message or _wire_ready(message):  # already clean: kept, not copied (O(new) a turn)
            cleaned.append(message)
            continue
        out = {k: v for k, v in message.items() if not (k == "tool_calls" and v is None)}
        if out.get("tool_calls"):
            if out.get("content") is None:
                out.pop("content", None)
            out["tool_calls"] = [
                {"id": call.get("id"), "type": call.get("type", "function"), "function": _json_arguments(call)}
                for call in out["tool_calls"]
            ]
        cleaned.append(out)
    return cleaned


def parse_openai_response(payload: dict[str, Any]) -> ChatCompletion:
    """One non-streaming `/chat/completions` response body → ChatCompletion (latency and attempts left at 0/1)."""
    choice = payload["choices"][0]
    message = choice.get("message") or {}
    calls = []
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        arguments, raw = parse_arguments(function.get("arguments"))
        calls.append(
            ChatToolCall(
                id=call.get("id") or f"call_{uuid.uuid4().hex[:24]}",
                name=function.get("name") or "",
                arguments=arguments,
                raw_arguments=raw,
            )
        )
    usage = payload.get("usage") or {}
    return ChatCompletion(
        content=_text_of(message.get("content")),
        tool_calls=calls,
        finish_reason=choice.get("finish_reason"),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
    )


class _ChatClient:
    """The re-ask loop around the retried attempts; subclasses implement one attempt (`_attempt`)."""

    model: str
    retry: RetryPolicy
    max_reasks: int
    _secret: str | None
    _target: str

    async def _attempt(self, request: dict[str, Any], timeout_s: float) -> ChatCompletion:
        raise NotImplementedError

    def _give_up(self, attempts: int, last: Retryable) -> ChatClientError:
        return ChatClientError(f"{self._target}: failed after {attempts} attempts: {last}", status=last.status)

    async def _complete(self, request: dict[str, Any], require_json_arguments: bool = False) -> ChatCompletion:
        started = time.monotonic()
        attempts = reasks = prompt_tokens = completion_tokens = 0
        while True:
            result, tries = await self.retry.run(lambda t: self._attempt(request, t), self._target, self._give_up)
            attempts += tries
            prompt_tokens += result.prompt_tokens
            completion_tokens += result.completion_tokens
            problem = result.problem(require_json_arguments)
            if problem is not None and reasks < self.max_reasks:
                reasks += 1
                logger.warning("%s: %s, asking again (%d/%d)", self._target, problem, reasks, self.max_reasks)
                continue
            return result.model_copy(
                update={
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "latency_s": time.monotonic() - started,
                    "attempts": attempts,
                    "reasks": reasks,
                }
            )


class OpenAIChatClient(_ChatClient):
    """`POST {base_url}/chat/completions` (non-streaming) over one lazily created aiohttp session."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        retry: RetryPolicy = CHAT_RETRY,
        extra_body: dict[str, Any] | None = None,
        max_reasks: int = 3,
        max_connections: int = 1024,
    ) -> None:
        if not base_url:
            raise ValueError("OpenAIChatClient needs a base_url such as http://host:port/v1")
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model
        self._secret = api_key or None
        self.retry = retry
        self.max_reasks = max_reasks
        self.extra_body = dict(extra_body or {})
        self.max_connections = max_connections
        self._target = f"POST {self.url}"
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        key = "set" if self._secret else None
        return f"OpenAIChatClient(base_url={self.base_url!r}, model={self.model!r}, api_key={key})"

    def _get_session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            # A session is bound to the loop it was made on; a client reused on a new loop gets a new one.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.max_connections))
            self._session_loop = loop
        return self._session

    async def complete(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | None = None,
        *,
        require_json_arguments: bool = False,
        **params: Any,
    ) -> ChatCompletion:
        body: dict[str, Any] = {"model": self.model, "messages": clean_messages(messages)}
        if tools:
            body["tools"] = tools
            if tool_choice is not None:
                body["tool_choice"] = tool_choice
        body.update(self.extra_body)
        body.update(params)
        return await self._complete(body, require_json_arguments)

    async def _attempt(self, request: dict[str, Any], timeout_s: float) -> ChatCompletion:
        headers = {"Content-Type": "application/json"}
        if self._secret:
            headers["Authorization"] = f"Bearer {self._secret}"
        session = self._get_session()
        try:
            async with session.post(
                self.url, data=_json_bytes(request), headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as response:
                status = response.status
                raw = await response.read()
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
        except asyncio.TimeoutError:
            raise Retryable(f"timed out after {timeout_s:.3g} s") from None
        except aiohttp.ClientError as err:
            raise Retryable(redact(f"{type(err).__name__}: {err}", self._secret)) from None
        if status != 200:
            detail = redact(f"HTTP {status}: {raw.decode('utf-8', errors='replace')[:_MAX_ERROR_BODY]}", self._secret)
            if is_retryable_status(status):
                raise Retryable(detail, retry_after=retry_after, status=status)
            raise ChatClientError(f"{self._target}: {detail}", status=status)
        try:
            return parse_openai_response(orjson.loads(raw))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as err:
            # A malformed 200 is a server hiccup (proxy, overload); it is retried like a 5xx.
            text = redact(raw.decode("utf-8", errors="replace")[:_MAX_ERROR_BODY], self._secret)
            raise Retryable(f"malformed response ({type(err).__name__}): {text}") from None

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            try:
                await self._session.close()
            except RuntimeError:  # made on a loop that is gone: nothing left to close
                pass
        self._session = None
        self._session_loop = None


# ------------------------------------------------------------------------------------------------------- Gemini


def _inline_refs(schema: Any, defs: dict[str, Any] | None = None) -> Any:
    """JSON schema with local `#/$defs/...` references inlined and `$defs` / `title` dropped (Gemini's function
    declarations accept a subset of JSON schema; tau2's pydantic-made schemas use $ref for enums)."""
    if isinstance(schema, dict):
        defs = {**(defs or {}), **schema.get("$defs", {})}
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/") and ref.split("/")[-1] in defs:
            merged = {**defs[ref.split("/")[-1]], **{k: v for k, v in schema.items() if k != "$ref"}}
            return _inline_refs(merged, defs)
        return {k: _inline_refs(v, defs) for k, v in schema.items() if k not in ("$defs", "title")}
    if isinstance(schema, list):
        return [_inline_refs(item, defs) for item in schema]
    return schema


def openai_tools_to_gemini(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """OpenAI tool schemas → one Gemini `Tool` holding all function declarations (google-genai dict form)."""
    declarations = []
    for tool in tools or []:
        function = tool.get("function", tool)
        declaration: dict[str, Any] = {"name": function["name"], "description": function.get("description") or ""}
        parameters = function.get("parameters")
        if parameters and parameters.get("properties"):
            declaration["parameters_json_schema"] = _inline_refs(parameters)
        declarations.append(declaration)
    return [{"function_declarations": declarations}] if declarations else []


def gemini_tool_config(tool_choice: str | None) -> dict[str, Any] | None:
    modes = {"auto": "AUTO", "required": "ANY", "any": "ANY", "none": "NONE"}
    if tool_choice is None:
        return None
    if tool_choice not in modes:
        raise ValueError(f"tool_choice {tool_choice!r} is not one of {sorted(modes)}")
    return {"function_calling_config": {"mode": modes[tool_choice]}}


def openai_messages_to_gemini(messages: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """OpenAI chat messages → (system instruction, Gemini contents). Assistant turns become role "model", tool
    results become `function_response` parts of a user turn (named after the call they answer), and consecutive
    turns of one role are merged, as Gemini expects."""
    system: list[str] = []
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}

    def add(role: str, parts: list[dict[str, Any]]) -> None:
        if not parts:
            return
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})

    for message in messages:
        role = message.get("role")
        text = _text_of(message.get("content"))
        if role == "system":
            if text:
                system.append(text)
        elif role == "user":
            add("user", [{"text": text}] if text else [])
        elif role == "assistant":
            parts: list[dict[str, Any]] = [{"text": text}] if text and text.strip() else []
            for call in message.get("tool_calls") or []:
                function = call.get("function") or {}
                arguments, _ = parse_arguments(function.get("arguments"))
                names[call.get("id") or ""] = function.get("name", "")
                parts.append({"function_call": {"name": function.get("name", ""), "args": arguments}})
            add("model", parts)
        elif role == "tool":
            name = message.get("name") or names.get(message.get("tool_call_id") or "", "") or "tool"
            add("user", [{"function_response": {"name": name, "response": {"result": text or ""}}}])
        else:
            raise ValueError(f"unknown message role {role!r}")
    return ("\n\n".join(system) if system else None), contents


def gemini_generation_params(params: dict[str, Any]) -> dict[str, Any]:
    """OpenAI sampling parameter names → GenerateContentConfig fields; unknown names pass through unchanged."""
    renames = {
        "max_tokens": "max_output_tokens",
        "max_completion_tokens": "max_output_tokens",
        "stop": "stop_sequences",
    }
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key == "stop" and isinstance(value, str):
            value = [value]
        out[renames.get(key, key)] = value
    return out


def parse_gemini_response(response: Any) -> ChatCompletion:
    """A google-genai GenerateContentResponse → ChatCompletion (thought parts are skipped)."""
    candidates = getattr(response, "candidates", None) or []
    texts: list[str] = []
    calls: list[ChatToolCall] = []
    finish_reason = None
    if candidates:
        candidate = candidates[0]
        reason = getattr(candidate, "finish_reason", None)
        finish_reason = str(getattr(reason, "value", reason)) if reason is not None else None
        content = getattr(candidate, "content", None)
        for part in (getattr(content, "parts", None) or []) if content is not None else []:
            if getattr(part, "thought", None):
                continue
            call = getattr(part, "function_call", None)
            if call is not None:
                calls.append(
                    ChatToolCall(
                        id=call.id or f"call_{uuid.uuid4().hex[:24]}",
                        name=call.name or "",
                        arguments=dict(call.args or {}),
                    )
                )
            elif getattr(part, "text", None):
                texts.append(part.text)
    usage = getattr(response, "usage_metadata", None)
    prompt = int(getattr(usage, "prompt_token_count", None) or 0) if usage is not None else 0
    completion = 0
    if usage is not None:
        completion = int(getattr(usage, "candidates_token_count", None) or 0)
        completion += int(getattr(usage, "thoughts_token_count", None) or 0)
    return ChatCompletion(
        content="".join(texts) if texts else None,
        tool_calls=calls,
        finish_reason=finish_reason,
        prompt_tokens=prompt,
        completion_tokens=completion,
    )


class GeminiChatClient(_ChatClient):
    """Gemini through google-genai's async API (optional dependency: `pip install google-genai`).

    `base_url` points the SDK at another endpoint (a proxy, or a local test server). The key comes from `api_key`,
    else GEMINI_API_KEY, else GOOGLE_API_KEY.
    """

    def __init__(
        self,
        model: str,
        api_key: str | None = None,
        base_url: str | None = None,
        retry: RetryPolicy = CHAT_RETRY,
        extra_body: dict[str, Any] | None = None,
        max_reasks: int = 3,
    ) -> None:
        try:
            from google import genai  # noqa: F401
        except ImportError as err:
            raise ImportError("GeminiChatClient needs the google-genai package: pip install google-genai") from err
        key = api_key or os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY")
        if not key:
            raise ValueError("GeminiChatClient needs an API key: pass api_key or set GEMINI_API_KEY")
        self.model = model
        self.base_url = base_url.rstrip("/") if base_url else None
        self._secret = key
        self.retry = retry
        self.max_reasks = max_reasks
        self.extra_body = dict(extra_body or {})
        self._target = f"gemini {model}"
        self._client: Any = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"GeminiChatClient(model={self.model!r}, base_url={self.base_url!r}, api_key=set)"

    def _get_client(self) -> Any:
        from google import genai
        from google.genai import types

        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            # The SDK's async transport is bound to the loop it first ran on, like an aiohttp session.
            options = types.HttpOptions(base_url=self.base_url) if self.base_url else None
            self._client = genai.Client(api_key=self._secret, http_options=options)
            self._client_loop = loop
        return self._client

    async def complete(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | None = None,
        *,
        require_json_arguments: bool = False,
        **params: Any,
    ) -> ChatCompletion:
        system, contents = openai_messages_to_gemini(messages)
        config: dict[str, Any] = {"automatic_function_calling": {"disable": True}}
        if system:
            config["system_instruction"] = system
        declarations = openai_tools_to_gemini(tools)
        if declarations:
            config["tools"] = declarations
            tool_config = gemini_tool_config(tool_choice)
            if tool_config is not None:
                config["tool_config"] = tool_config
        config.update(gemini_generation_params(self.extra_body))
        config.update(gemini_generation_params(params))
        return await self._complete({"contents": contents, "config": config}, require_json_arguments)

    async def _attempt(self, request: dict[str, Any], timeout_s: float) -> ChatCompletion:
        from google.genai import errors

        client = self._get_client()
        try:
            response = await asyncio.wait_for(
                client.aio.models.generate_content(
                    model=self.model, contents=request["contents"], config=request["config"]
                ),
                timeout_s,
            )
        except asyncio.TimeoutError:
            raise Retryable(f"timed out after {timeout_s:.3g} s") from None
        except errors.APIError as err:
            status = int(getattr(err, "code", 0) or 0)
            message = getattr(err, "message", None) or str(err)[:_MAX_ERROR_BODY]
            detail = redact(f"HTTP {status}: {message}", self._secret)
            if is_retryable_status(status):
                headers = getattr(getattr(err, "response", None), "headers", None) or {}
                retry_after = parse_retry_after(headers.get("Retry-After"))
                raise Retryable(detail, retry_after=retry_after, status=status) from None
            raise ChatClientError(f"{self._target}: {detail}", status=status) from None
        except (aiohttp.ClientError, ConnectionError, OSError) as err:
            raise Retryable(redact(f"{type(err).__name__}: {err}", self._secret)) from None
        except Exception as err:
            # httpx / httpx2 transport errors (the SDK may use either): retried like connection errors.
            if type(err).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore"):
                raise Retryable(redact(f"{type(err).__name__}: {err}", self._secret)) from None
            raise
        return parse_gemini_response(response)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            closer = getattr(client.aio, "aclose", None)
            if closer is not None:
                try:
                    await closer()
                except RuntimeError:
                    pass
        self._client_loop = None


ChatClient = OpenAIChatClient | GeminiChatClient


def build_chat_client(kind: str, model: str, base_url: str | None, api_key: str | None, **kw: Any) -> ChatClient:
    """kind "llm" / "openai": an OpenAI-compatible server at base_url; "gemini": Gemini (base_url optional)."""
    if not model:
        raise ValueError(f"a {kind} chat client needs a model name")
    if kind in ("llm", "openai"):
        if not base_url:
            raise ValueError("an OpenAI-compatible chat client needs base_url (e.g. http://127.0.0.1:30001/v1)")
        return OpenAIChatClient(base_url=base_url, model=model, api_key=api_key, **kw)
    if kind == "gemini":
        return GeminiChatClient(model=model, api_key=api_key, base_url=base_url, **kw)
    raise ValueError(f"unknown chat client kind {kind!r}; valid: llm, openai, gemini")
