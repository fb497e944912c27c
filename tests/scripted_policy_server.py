"""A policy server for tests: speaks sglang's /generate and OpenAI's /v1/completions wire formats, and answers with
scripted assistant text encoded by a REAL tokenizer, with deterministic, real-looking log-probs.

The responder callable sees the decoded prompt and returns the next assistant text, or a `Fault` to inject a failure.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from rollout.clients.policy import FinishReason, sglang_generate_response


@dataclass
class Fault:
    """An injected failure: an HTTP status, a delay, an sglang abort, or a cut at `max_new_tokens`."""

    status: int | None = None
    delay_s: float = 0.0
    abort: bool = False
    text: str | None = None  # with abort / delay: what to return


Responder = Callable[[str, dict[str, Any]], "str | Fault"]


def fake_logprob(position: int, token_id: int) -> float:
    """Deterministic, negative, varied: what a sampled token's log-prob looks like."""
    return -abs(math.sin(position * 12.9898 + token_id * 78.233)) * 2.0 - 1e-3


@dataclass
class ScriptedPolicyServer:
    tokenizer: Any
    responder: Responder
    end_of_turn_id: int = 2
    decode_prompt: bool = True  # False: the responder gets "" (saves the server's CPU in load tests)
    weight_version: str | None = None  # sglang's meta_info["weight_version"], when the test wants one
    requests: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _runner: web.AppRunner | None = None

    # -------------------------------------------------------------------------------------------------- protocol
    def _encode(self, text: str) -> tuple[int, ...]:
        """Scripted replies repeat: encode each distinct text once."""
        cache = self.__dict__.setdefault("_encoded", {})
        if text not in cache:
            cache[text] = tuple(self.tokenizer.encode(text, add_special_tokens=False))
        return cache[text]

    def _answer(
        self, input_ids: list[int], params: dict[str, Any], reply: str | Fault
    ) -> tuple[list[int], list[float], str, FinishReason]:
        fault = reply if isinstance(reply, Fault) else None
        text = (fault.text or "") if fault else reply
        ids = list(self._encode(text)) if text else []
        limit = int(params.get("max_new_tokens") or params.get("max_tokens") or 10**9)
        finish: FinishReason
        if fault and fault.abort:
            finish = "abort"
        elif len(ids) + 1 > limit:
            ids, finish = ids[:limit], "length"
        else:
            ids.append(self.end_of_turn_id)  # no_stop_trim: the stop token is returned with its log-prob
            finish = "stop"
        start = len(input_ids)
        logprobs = [fake_logprob(start + i, t) for i, t in enumerate(ids)]
        return ids, logprobs, self.tokenizer.decode(ids, skip_special_tokens=False), finish

    async def _reply(self, input_ids: list[int], params: dict[str, Any]) -> str | Fault:
        """Ask the responder once per request; sleep out an injected delay."""
        prompt_text = self.tokenizer.decode(input_ids, skip_special_tokens=False) if self.decode_prompt else ""
        reply = self.responder(prompt_text, params)
        if isinstance(reply, Fault) and reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        return reply

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _generate(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        self.requests.append(body)
        input_ids = body["input_ids"]
        params = body.get("sampling_params") or {}
        reply = await self._reply(input_ids, params)
        if isinstance(reply, Fault) and reply.status:
            return web.json_response({"error": "injected"}, status=reply.status)
        ids, logprobs, text, finish = self._answer(input_ids, params, reply)
        extra = {"weight_version": self.weight_version} if self.weight_version is not None else {}
        answer = sglang_generate_response(
            ids,
            text,
            finish,
            rid=f"req{len(self.requests)}",
            prompt_tokens=len(input_ids),
            matched=self.end_of_turn_id,
            abort_message="Abort before prefill",
            logprobs=logprobs if body.get("return_logprob") else None,
            **extra,
        )
        return web.json_response(answer)

    async def _completions(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        self.requests.append(body)
        input_ids = body["prompt"]
        params = {"max_new_tokens": body.get("max_tokens"), **body}
        reply = await self._reply(input_ids, params)
        if isinstance(reply, Fault) and reply.status:
            return web.json_response({"error": "injected"}, status=reply.status)
        ids, logprobs, text, finish = self._answer(input_ids, params, reply)
        choice = {
            "index": 0,
            "text": text,
            "token_ids": ids,
            "finish_reason": finish,
            "logprobs": {
                "tokens": [self.tokenizer.convert_ids_to_tokens(t) for t in ids],
                "token_logprobs": logprobs,
                "top_logprobs": [None] * len(ids),
                "text_offset": [0] * len(ids),
            },
        }
        usage = {"prompt_tokens": len(input_ids), "completion_tokens": len(ids)}
        return web.json_response({"id": "cmpl", "object": "text_completion", "choices": [choice], "usage": usage})

    def add_routes(self, app: web.Application) -> None:
        """More endpoints of the same server (a subclass adds sglang's router / admin routes)."""

    # ----------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> str:
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application(client_max_size=64 * 1024**2)
            app.router.add_get("/health", self._health)
            app.router.add_post("/generate", self._generate)
            app.router.add_post("/v1/completions", self._completions)
            self.add_routes(app)
            # handler_cancellation: a client that goes away (timeout, kill) ends its request here too, as in sglang.
            runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self._runner = runner
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("scripted policy server did not start")
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
