"""A fake chat-completion server for tests: the OpenAI `/v1/chat/completions` wire format (non-streaming), and
Gemini's `/{version}/models/{model}:generateContent` for the google-genai SDK.

It replays a queue of scripted replies (text, tool calls, HTTP errors, malformed bodies), each with an optional
delay and headers (`Retry-After`), and records every request it receives. It runs on 127.0.0.1 on a free port in a
background thread with its own event loop, so sync code (litellm, tau2) and async code (any loop) can call it:

    with FakeOpenAIServer([text_reply("hi"), error_reply(429, retry_after=1), tool_call_reply("f", {"x": 1})]) as srv:
        client = OpenAIChatClient(srv.base_url, "fake-model")
        ...
        srv.requests[0].body["messages"]

    async with FakeOpenAIServer() as srv: ...   # the same, from a coroutine

With an empty queue it answers `default` if one was given, else HTTP 400 (not retried by clients, so a test that
runs out of replies fails fast).

Concurrency is proven by structure, not by timing: with `srv.gate = RequestGate(n)` no request is answered until n
wait at once (see RequestGate); a client that sends one request at a time never fills a wave.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class FakeReply:
    """One scripted reply. `body` (a str or JSON value) replaces the generated body, e.g. a malformed response."""

    content: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # {"name", "arguments": dict | str, "id"?}
    status: int = 200
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    error_message: str = "scripted error"
    finish_reason: str | None = None
    prompt_tokens: int = 11
    completion_tokens: int = 7


def text_reply(content: str, **kw: Any) -> FakeReply:
    return FakeReply(content=content, **kw)


def tool_call_reply(name: str, arguments: dict[str, Any] | str | None = None, **kw: Any) -> FakeReply:
    call_id = kw.pop("call_id", None)
    call: dict[str, Any] = {"name": name, "arguments": {} if arguments is None else arguments}
    if call_id is not None:
        call["id"] = call_id
    return FakeReply(tool_calls=[call], **kw)


def error_reply(status: int, message: str = "scripted error", retry_after: float | str | None = None, **kw: Any):
    headers = dict(kw.pop("headers", {}))
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return FakeReply(status=status, error_message=message, headers=headers, **kw)


class RequestGate:
    """Holds requests and releases them in waves of exactly `count`: the proof that `count` requests were in flight
    at the same moment. Use it from one event loop (a server's). If a wave does not fill within `limit_s` (a client
    that serializes its requests), it is released anyway, counted in `unfilled_waves`, and the gate stays open from
    then on, so such a test ends quickly and fails on its assertions instead of hanging."""

    def __init__(self, count: int, limit_s: float = 300.0) -> None:
        self.count = count
        self.limit_s = limit_s
        self.waiting = 0
        self.waves: list[int] = []  # the size of every released wave
        self.unfilled_waves = 0
        self.passed_open = 0  # requests that found the gate open
        self._event: asyncio.Event | None = None

    @property
    def is_open(self) -> bool:
        return self.unfilled_waves > 0

    async def wait(self) -> None:
        if self.is_open:
            self.passed_open += 1
            return
        if self._event is None:
            self._event = asyncio.Event()
        event = self._event
        self.waiting += 1
        if self.waiting >= self.count:
            self._release(event, filled=True)
            return
        try:
            await asyncio.wait_for(event.wait(), self.limit_s)
        except asyncio.TimeoutError:
            if not event.is_set():
                self._release(event, filled=False)
        except asyncio.CancelledError:  # the client went away while held
            if not event.is_set():
                self.waiting -= 1
            raise

    def _release(self, event: asyncio.Event, filled: bool) -> None:
        self.waves.append(self.waiting)
        self.unfilled_waves += not filled
        self.waiting = 0
        self._event = None
        event.set()


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    received_at: float


_GEMINI_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 429: "RESOURCE_EXHAUSTED"}


class FakeOpenAIServer:
    def __init__(self, replies: Iterable[FakeReply] = (), default: FakeReply | None = None) -> None:
        self._queue: deque[FakeReply] = deque(replies)
        self._lock = threading.Lock()
        self.default = default
        self.requests: list[RecordedRequest] = []
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._call_counter = 0
        self.gate: RequestGate | None = None  # set before requests arrive; used on the server's loop only
        self.in_flight = 0
        self.peak_in_flight = 0

    # ------------------------------------------------------------------ scripting and inspection

    def enqueue(self, *replies: FakeReply) -> None:
        with self._lock:
            self._queue.extend(replies)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    @property
    def root_url(self) -> str:
        if self.port is None:
            raise RuntimeError("the fake server is not running")
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL (`.../v1`)."""
        return f"{self.root_url}/v1"

    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeOpenAIServer:
        self._thread = threading.Thread(target=self._serve, name="fake-openai-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=15):
            raise RuntimeError("the fake server did not start within 15 s")
        if self._error is not None:
            raise RuntimeError(f"the fake server failed to start: {self._error}")
        return self

    def stop(self) -> None:
        loop, runner = self._loop, self._runner
        if loop is None or runner is None:
            return
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._loop = self._runner = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> FakeOpenAIServer:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._setup())
        except BaseException as err:  # report to start() instead of dying silently
            self._error = err
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _setup(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._openai)
        app.router.add_post("/chat/completions", self._openai)
        app.router.add_post("/{version}/models/{model}:generateContent", self._gemini)
        # Cancel handlers whose client went away (timeouts) and do not wait long for them on shutdown.
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runner = runner
        self.port = runner.addresses[0][1]

    # ------------------------------------------------------------------ handlers

    async def _next(self, request: web.Request) -> tuple[FakeReply, Any]:
        try:
            body: Any = await request.json()
        except (ValueError, UnicodeDecodeError):
            body = await request.text()
        self.requests.append(
            RecordedRequest(request.method, request.path, dict(request.headers), body, time.monotonic())
        )
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            with self._lock:
                reply = self._queue.popleft() if self._queue else self.default
            if reply is None:
                reply = FakeReply(status=400, error_message="fake server: no scripted reply left")
            if reply.delay_s:
                await asyncio.sleep(reply.delay_s)
        finally:
            self.in_flight -= 1
        return reply, body

    def _call_id(self) -> str:
        self._call_counter += 1
        return f"call_fake_{self._call_counter}"

    @staticmethod
    def _raw(reply: FakeReply) -> web.Response:
        text = reply.body if isinstance(reply.body, str) else json.dumps(reply.body)
        return web.Response(status=reply.status, text=text, headers=reply.headers, content_type="application/json")

    async def _openai(self, request: web.Request) -> web.Response:
        reply, request_body = await self._next(request)
        if reply.body is not None:
            return self._raw(reply)
        if reply.status != 200:
            error = {"error": {"message": reply.error_message, "type": "fake_error", "code": reply.status}}
            return web.json_response(error, status=reply.status, headers=reply.headers)
        message: dict[str, Any] = {"role": "assistant", "content": reply.content}
        if reply.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.get("id") or self._call_id(),
                    "type": "function",
                    "function": {
                        "name": call["name"],
                        "arguments": call["arguments"]
                        if isinstance(call["arguments"], str)
                        else json.dumps(call["arguments"]),
                    },
                }
                for call in reply.tool_calls
            ]
        payload = {
            "id": f"chatcmpl-fake-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request_body.get("model", "fake") if isinstance(request_body, dict) else "fake",
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop"),
                }
            ],
            "usage": {
                "prompt_tokens": reply.prompt_tokens,
                "completion_tokens": reply.completion_tokens,
                "total_tokens": reply.prompt_tokens + reply.completion_tokens,
            },
        }
        return web.json_response(payload, headers=reply.headers)

    async def _gemini(self, request: web.Request) -> web.Response:
        reply, _ = await self._next(request)
        if reply.body is not None:
            return self._raw(reply)
        if reply.status != 200:
            status = _GEMINI_STATUS.get(reply.status, "INTERNAL" if reply.status >= 500 else "FAILED_PRECONDITION")
            error = {"error": {"code": reply.status, "message": reply.error_message, "status": status}}
            return web.json_response(error, status=reply.status, headers=reply.headers)
        parts: list[dict[str, Any]] = []
        if reply.content is not None:
            parts.append({"text": reply.content})
        for call in reply.tool_calls:
            arguments = json.loads(call["arguments"]) if isinstance(call["arguments"], str) else call["arguments"]
            function_call: dict[str, Any] = {"name": call["name"], "args": arguments}
            if call.get("id"):
                function_call["id"] = call["id"]
            parts.append({"functionCall": function_call})
        payload = {
            "candidates": [
                {
                    "content": {"role": "model", "parts": parts},
                    "finishReason": reply.finish_reason or "STOP",
                    "index": 0,
                }
            ],
            "usageMetadata": {
                "promptTokenCount": reply.prompt_tokens,
                "candidatesTokenCount": reply.completion_tokens,
                "totalTokenCount": reply.prompt_tokens + reply.completion_tokens,
            },
        }
        return web.json_response(payload, headers=reply.headers)
