"""LLM endpoint doubles for the rollout benchmark: a policy server and a user simulator in their own process (their
JSON and tokenizer work must not share the harness's GIL).

    python bench/doubles.py --tokenizer DIR

prints one JSON line {"policy_url", "user_base_url", "pid"} when both listen, and stops when stdin closes.

Latency model (DoubleConfig): each request's service time is drawn from a lognormal whose median grows with its
prompt and output length, median = base + a * prompt tokens + b * output tokens, times exp(sigma * z) with z
standard normal, drawn from (seed, episode key, request index) so a run can be replayed. Each server admits at most
`*_slots` requests at once; the rest queue (first come, first served) and their wait is not service time.

- Policy: sglang's `POST /generate` (input_ids in, sampled ids and log-probs out, the end-of-turn id kept as with
  `no_stop_trim`), ids from the real tokenizer. A request that names its episode (`sampling_params.bench_episode`,
  "<episode>/<script>") gets its script's next turn: a tool call (the task's gold agent actions, read-only look-ups
  in between) or a message to the user. Without it, which turn it is comes from the prompt itself (every message
  adds one `<|im_start|>` id; the opening has four, every policy turn adds two) and with `tool_call_turns` even
  turns call `get_customer_by_phone`, odd turns talk.
- User: OpenAI `POST /v1/chat/completions`. A request that names its episode (`user`, as above) answers the k-th
  message of the agent (tau2 flips roles: the agent's messages arrive as role "user") with the script's k-th user
  turn: a call of one of the user's device tools (tau2's user simulator calls them; the task's gold user actions and
  read-only checks) and, after the tool's result, a text; the last one ends the episode with `###STOP###`. Without
  an episode, the `user_stop_after`-th reply stops.
- Control (on the policy port): `POST /bench/config` (DoubleConfig fields), `POST /bench/scripts` (the scripts),
  `POST /bench/reset`, `GET /bench/stats` (one [kind, episode, t_in, t_start, t_out, drawn service s] row per
  request, `time.monotonic()`: CLOCK_MONOTONIC, comparable across processes), and `/health`, `/get_model_info`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import random
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
CHARS_PER_TOKEN = 4  # the user's prompt and reply lengths in tokens, estimated from characters


class ToolCallSpec(BaseModel):
    name: str
    arguments: dict[str, Any] = {}


class UserTurn(BaseModel):
    """The user's answer to one message of the agent: optionally a device tool call first, then a text."""

    device: ToolCallSpec | None = None
    text: str = USER_TEXT


class Script(BaseModel):
    """One gold-like episode: the policy's turns (a tool call, or a text to the user) and the user's answers, one per
    message the agent sends the user (the greeting first). The last user turn stops the episode."""

    policy: list[ToolCallSpec | str]
    user: list[UserTurn]


class DoubleConfig(BaseModel):
    policy_delay_s: float = Field(default=0.0, ge=0.0, description="median latency's base, policy")
    user_delay_s: float = Field(default=0.0, ge=0.0, description="median latency's base, user")
    policy_s_per_prompt_token: float = Field(default=0.0, ge=0.0)
    policy_s_per_output_token: float = Field(default=0.0, ge=0.0)
    user_s_per_prompt_token: float = Field(default=0.0, ge=0.0)
    user_s_per_output_token: float = Field(default=0.0, ge=0.0)
    sigma: float = Field(default=0.0, ge=0.0, description="lognormal shape; 0: every request takes its median")
    policy_slots: int = Field(default=0, ge=0, description="requests served at once; 0: no bound")
    user_slots: int = Field(default=0, ge=0)
    seed: int = 0
    user_stop_after: int = Field(default=3, ge=1, description="without a script: the user's k-th reply stops")
    tool_call_turns: bool = True


def user_calls_per_episode(turns: int, tool_call_turns: bool) -> int:
    """User requests of an unscripted episode of `turns` policy turns: the greeting's reply, one per talking turn."""
    return 1 + (turns // 2 if tool_call_turns else turns)


def draw_latency(
    config: DoubleConfig, kind: str, key: str, index: int, prompt_tokens: int, output_tokens: int
) -> float:
    """The service time of an episode's `index`-th request of `kind` (lognormal around a length-dependent median)."""
    if kind == "policy":
        median = (
            config.policy_delay_s
            + config.policy_s_per_prompt_token * prompt_tokens
            + config.policy_s_per_output_token * output_tokens
        )
    else:
        median = (
            config.user_delay_s
            + config.user_s_per_prompt_token * prompt_tokens
            + config.user_s_per_output_token * output_tokens
        )
    if median <= 0 or config.sigma <= 0:
        return median
    z = random.Random(f"{config.seed}/{kind}/{key}/{index}").gauss(0.0, 1.0)
    return median * math.exp(config.sigma * z)


def tool_call_text(call: ToolCallSpec) -> str:
    return "<tool_call>\n" + json.dumps({"name": call.name, "arguments": call.arguments}) + "\n</tool_call>"


class Doubles:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.config = DoubleConfig()
        self.scripts: list[Script] = []
        self.records: list[tuple[str, str, float, float, float, float]] = []
        self.counts: dict[tuple[str, str], int] = {}  # (kind, episode) -> requests so far
        self.slots: dict[str, asyncio.Semaphore | None] = {"policy": None, "user": None}
        self.im_start_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
        self.end_of_turn_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.model_path = str(getattr(tokenizer, "name_or_path", "bench-policy"))
        self.replies: dict[str, tuple[list[int], str]] = {}  # each reply text encoded and decoded once

    def reply(self, text: str) -> tuple[list[int], str]:
        if text not in self.replies:
            ids = [*self.tokenizer.encode(text, add_special_tokens=False), self.end_of_turn_id]
            self.replies[text] = (ids, self.tokenizer.decode(ids, skip_special_tokens=False))
        return self.replies[text]

    def next_index(self, kind: str, episode: str) -> int:
        index = self.counts.get((kind, episode), 0)
        self.counts[(kind, episode)] = index + 1
        return index

    async def serve(self, kind: str, episode: str, t_in: float, service_s: float) -> None:
        """Wait for a slot of this server (queueing), then hold it for the service time; recorded."""
        slots = self.slots[kind]
        if slots is None:
            t_start = time.monotonic()
            if service_s > 0:
                await asyncio.sleep(service_s)
        else:
            async with slots:
                t_start = time.monotonic()
                if service_s > 0:
                    await asyncio.sleep(service_s)
        self.records.append((kind, episode, t_in, t_start, time.monotonic(), service_s))

    # ------------------------------------------------------------------------------------------------- policy
    def policy_turn(self, input_ids: list[int]) -> int:
        return max(0, (input_ids.count(self.im_start_id) - OPENING_MESSAGES) // 2)

    def policy_text(self, episode: str, input_ids: list[int]) -> tuple[str, int]:
        if episode:
            script = self.scripts[int(episode.rsplit("/", 1)[1])]
            turn = self.next_index("policy", episode)
            step = script.policy[min(turn, len(script.policy) - 1)]
            return (tool_call_text(step) if isinstance(step, ToolCallSpec) else step), turn
        turn = self.policy_turn(input_ids)
        return (TOOL_TURN_TEXT if self.config.tool_call_turns and turn % 2 == 0 else TALK_TURN_TEXT), turn

    async def generate(self, request: web.Request) -> web.Response:
        t_in = time.monotonic()
        body = orjson.loads(await request.read())
        input_ids = body["input_ids"]
        episode = str((body.get("sampling_params") or {}).get("bench_episode") or "")
        text, turn = self.policy_text(episode, input_ids)
        ids, decoded = self.reply(text)
        start = len(input_ids)
        logprobs = [-abs(math.sin((start + i) * 12.9898 + t * 78.233)) * 2.0 - 1e-3 for i, t in enumerate(ids)]
        answer = sglang_generate_response(
            ids,
            decoded,
            "stop",
            rid=f"bench-{len(self.records)}",
            prompt_tokens=start,
            matched=self.end_of_turn_id,
            logprobs=logprobs if body.get("return_logprob") else None,
        )
        payload = orjson.dumps(answer)
        service = draw_latency(self.config, "policy", episode, turn, start, len(ids))
        await self.serve("policy", episode, t_in, service)
        return web.Response(body=payload, content_type="application/json")

    # --------------------------------------------------------------------------------------------------- user
    def user_message(self, episode: str, messages: list[dict[str, Any]]) -> tuple[dict[str, Any], bool]:
        """The user's next message (text or a device tool call) and whether it is a tool call."""
        agent_messages = sum(1 for message in messages if message.get("role") == "user")
        if not episode:
            stop = agent_messages >= self.config.user_stop_after
            return {"role": "assistant", "content": USER_STOP_TEXT if stop else USER_TEXT}, False
        script = self.scripts[int(episode.rsplit("/", 1)[1])]
        k = min(agent_messages, len(script.user)) - 1
        turn = script.user[max(k, 0)]
        last = k == len(script.user) - 1
        after_tool = bool(messages) and messages[-1].get("role") == "tool"
        if turn.device is not None and not after_tool:
            call = {
                "id": f"call_{agent_messages}",
                "type": "function",
                "function": {"name": turn.device.name, "arguments": json.dumps(turn.device.arguments)},
            }
            return {"role": "assistant", "content": None, "tool_calls": [call]}, True
        text = f"{turn.text} {USER_STOP_TEXT}" if last else turn.text
        return {"role": "assistant", "content": text}, False

    async def chat(self, request: web.Request) -> web.Response:
        t_in = time.monotonic()
        raw = await request.read()
        body = orjson.loads(raw)
        episode = str(body.get("user") or "")
        message, is_call = self.user_message(episode, body.get("messages") or [])
        reply_chars = len(message.get("content") or "") + (len(orjson.dumps(message["tool_calls"])) if is_call else 0)
        prompt_tokens, output_tokens = len(raw) // CHARS_PER_TOKEN, max(1, reply_chars // CHARS_PER_TOKEN)
        payload = orjson.dumps(
            {
                "id": f"chatcmpl-bench-{len(self.records)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "user-sim"),
                "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if is_call else "stop"}],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": output_tokens,
                    "total_tokens": prompt_tokens + output_tokens,
                },
            }
        )
        index = self.next_index("user", episode)
        service = draw_latency(self.config, "user", episode, index, prompt_tokens, output_tokens)
        await self.serve("user", episode, t_in, service)
        return web.Response(body=payload, content_type="application/json")

    # ------------------------------------------------------------------------------------------------ control
    async def set_config(self, request: web.Request) -> web.Response:
        self.config = DoubleConfig.model_validate({**self.config.model_dump(), **orjson.loads(await request.read())})
        self.slots = {
            "policy": asyncio.Semaphore(self.config.policy_slots) if self.config.policy_slots else None,
            "user": asyncio.Semaphore(self.config.user_slots) if self.config.user_slots else None,
        }
        return web.json_response(self.config.model_dump())

    async def set_scripts(self, request: web.Request) -> web.Response:
        self.scripts = [Script.model_validate(item) for item in orjson.loads(await request.read())]
        return web.json_response({"scripts": len(self.scripts)})

    async def reset(self, request: web.Request) -> web.Response:
        self.records = []
        self.counts = {}
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
    policy.router.add_post("/bench/scripts", doubles.set_scripts)
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

    def set_scripts(self, scripts: list[Script]) -> None:
        self._call("/bench/scripts", [script.model_dump() for script in scripts])

    def reset(self) -> None:
        self._call("/bench/reset", {})

    def records(self) -> list[tuple[str, str, float, float, float, float]]:
        """(kind, episode, arrived, service started, replied, drawn service s) per request."""
        return [tuple(row) for row in self._call("/bench/stats")["records"]]


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
