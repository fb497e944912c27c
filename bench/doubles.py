"""LLM endpoint doubles for the rollout benchmark: a policy server and a user simulator that answer after a fixed,
configurable delay, in their own process (their JSON and tokenizer work must not share the harness's GIL).

    python bench/doubles.py --tokenizer DIR

prints one JSON line {"policy_url", "user_base_url", "pid"} when both listen, and stops when stdin closes.

- Policy: sglang's `POST /generate` (input_ids in, sampled ids and log-probs out, the end-of-turn id kept as with
  `no_stop_trim`), ids from the real tokenizer. Which turn it is comes from the prompt itself: every message adds one
  `<|im_start|>` id, the opening has four (system, greeting, first user message, generation prompt) and every policy
  turn adds two (its own message and the tool result or user reply). With `tool_call_turns`, even turns call the CRM
  tool `get_customer_by_phone` (a customer that exists, so no tool error), odd turns talk to the user.
- User: OpenAI `POST /v1/chat/completions`. tau2 flips roles for the user simulator, so its k-th call in an episode
  carries k messages of role "user"; the `user_stop_after`-th reply ends the episode with `###STOP###`.
- Control (on the policy port): `POST /bench/config` (DoubleConfig fields), `POST /bench/reset`, `GET /bench/stats`
  (one [kind, t_in, t_out] row per request, `time.monotonic()`: CLOCK_MONOTONIC, comparable across processes), and
  `/health`, `/get_model_info` for the evaluator's checks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, Field

from rollout.clients.policy import sglang_generate_response

TOOL_TURN_TEXT = (
    '<tool_call>\n{"name": "get_customer_by_phone", "arguments": {"phone_number": "555-123-2002"}}\n</tool_call>'
)
TALK_TURN_TEXT = "Could you restart your phone and tell me what the status bar shows?"
USER_TEXT = "I restarted it. The status bar still shows no signal."
USER_STOP_TEXT = "Thanks, that is all. ###STOP###"
OPENING_MESSAGES = 4  # system, greeting, first user message, generation prompt


class DoubleConfig(BaseModel):
    policy_delay_s: float = Field(default=0.0, ge=0.0)
    user_delay_s: float = Field(default=0.0, ge=0.0)
    user_stop_after: int = Field(default=3, ge=1, description="the user's k-th reply of an episode stops it")
    tool_call_turns: bool = True


def user_calls_per_episode(turns: int, tool_call_turns: bool) -> int:
    """User requests of an episode of `turns` policy turns: the greeting's reply plus one per talking turn."""
    return 1 + (turns // 2 if tool_call_turns else turns)


class Doubles:
    def __init__(self, tokenizer: Any) -> None:
        self.config = DoubleConfig()
        self.records: list[tuple[str, float, float]] = []
        self.im_start_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
        self.end_of_turn_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.model_path = str(getattr(tokenizer, "name_or_path", "bench-policy"))
        # Replies repeat: encode and decode each once.
        self.replies = {}
        for key, text in (("tool", TOOL_TURN_TEXT), ("talk", TALK_TURN_TEXT)):
            ids = [*tokenizer.encode(text, add_special_tokens=False), self.end_of_turn_id]
            self.replies[key] = (ids, tokenizer.decode(ids, skip_special_tokens=False))

    # ------------------------------------------------------------------------------------------------- policy
    def policy_turn(self, input_ids: list[int]) -> int:
        return max(0, (input_ids.count(self.im_start_id) - OPENING_MESSAGES) // 2)

    async def generate(self, request: web.Request) -> web.Response:
        t_in = time.monotonic()
        body = orjson.loads(await request.read())
        input_ids = body["input_ids"]
        turn = self.policy_turn(input_ids)
        ids, text = self.replies["tool" if self.config.tool_call_turns and turn % 2 == 0 else "talk"]
        start = len(input_ids)
        logprobs = [-abs(math.sin((start + i) * 12.9898 + t * 78.233)) * 2.0 - 1e-3 for i, t in enumerate(ids)]
        answer = sglang_generate_response(
            ids,
            text,
            "stop",
            rid=f"bench-{len(self.records)}",
            prompt_tokens=start,
            matched=self.end_of_turn_id,
            logprobs=logprobs if body.get("return_logprob") else None,
        )
        payload = orjson.dumps(answer)
        if self.config.policy_delay_s:
            await asyncio.sleep(self.config.policy_delay_s)
        self.records.append(("policy", t_in, time.monotonic()))
        return web.Response(body=payload, content_type="application/json")

    # --------------------------------------------------------------------------------------------------- user
    async def chat(self, request: web.Request) -> web.Response:
        t_in = time.monotonic()
        body = orjson.loads(await request.read())
        calls = sum(1 for message in body.get("messages") or [] if message.get("role") == "user")
        content = USER_STOP_TEXT if calls >= self.config.user_stop_after else USER_TEXT
        payload = orjson.dumps(
            {
                "id": f"chatcmpl-bench-{len(self.records)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "user-sim"),
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 900, "completion_tokens": 12, "total_tokens": 912},
            }
        )
        if self.config.user_delay_s:
            await asyncio.sleep(self.config.user_delay_s)
        self.records.append(("user", t_in, time.monotonic()))
        return web.Response(body=payload, content_type="application/json")

    # ------------------------------------------------------------------------------------------------ control
    async def set_config(self, request: web.Request) -> web.Response:
        self.config = DoubleConfig.model_validate({**self.config.model_dump(), **orjson.loads(await request.read())})
        return web.json_response(self.config.model_dump())

    async def reset(self, request: web.Request) -> web.Response:
        self.records = []
        return web.json_response({"ok": True})

    async def stats(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps({"records": self.records}), content_type="application/json")

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def model_info(self, request: web.Request) -> web.Response:
        return web.json_response({"model_path": self.model_path})


async def _serve(doubles: Doubles, ready: dict[str, Any], started: threading.Event) -> list[web.AppRunner]:
    policy = web.Application(client_max_size=256 * 1024**2)
    policy.router.add_post("/generate", doubles.generate)
    policy.router.add_post("/bench/config", doubles.set_config)
    policy.router.add_post("/bench/reset", doubles.reset)
    policy.router.add_get("/bench/stats", doubles.stats)
    policy.router.add_get("/health", doubles.health)
    policy.router.add_get("/get_model_info", doubles.model_info)
    user = web.Application(client_max_size=256 * 1024**2)
    user.router.add_post("/v1/chat/completions", doubles.chat)
    user.router.add_post("/chat/completions", doubles.chat)
    runners = []
    for name, app in (("policy", policy), ("user", user)):
        # backlog: hundreds of episodes connect at once when a wave starts.
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        ready[name] = runner.addresses[0][1]
        runners.append(runner)
    started.set()
    return runners


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder (with the tool chat template)")
    args = parser.parse_args()
    from rollout.token_record import load_tokenizer

    doubles = Doubles(load_tokenizer(args.tokenizer))
    # With hundreds of requests in flight, garbage collections paused this process and every reply due meanwhile came
    # late (99th percentile 140 ms late at C = 256, 12 ms with this): a cost of the doubles, charged to the harness.
    gc.freeze()
    gc.set_threshold(20000, *gc.get_threshold()[1:])
    loop = asyncio.new_event_loop()
    ports: dict[str, Any] = {}
    started = threading.Event()
    runners = loop.run_until_complete(_serve(doubles, ports, started))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    urls = {
        "policy_url": f"http://127.0.0.1:{ports['policy']}",
        "user_base_url": f"http://127.0.0.1:{ports['user']}/v1",
        "pid": os.getpid(),
    }
    print(json.dumps(urls), flush=True)
    try:
        sys.stdin.read()  # the parent closes stdin (or dies) to stop us
    finally:
        for runner in runners:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    return 0


# ------------------------------------------------------------------------------------------- the parent's handle


class DoublesHandle(BaseModel):
    policy_url: str
    user_base_url: str
    pid: int

    def _call(self, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.policy_url}{path}", data=data, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def configure(self, **fields: Any) -> DoubleConfig:
        return DoubleConfig.model_validate(self._call("/bench/config", fields))

    def reset(self) -> None:
        self._call("/bench/reset", {})

    def records(self) -> list[tuple[str, float, float]]:
        return [(kind, t_in, t_out) for kind, t_in, t_out in self._call("/bench/stats")["records"]]


@contextlib.contextmanager
def start_doubles(tokenizer_dir: str | Path) -> Iterator[DoublesHandle]:
    """The doubles in a child process, stopped (stdin closed) on exit."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--tokenizer", str(tokenizer_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("the endpoint doubles did not start")
        yield DoublesHandle.model_validate(json.loads(line))
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


if __name__ == "__main__":
    sys.exit(main())
