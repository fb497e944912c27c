"""OpenAI `/v1/chat/completions` in front of a server that only speaks `/v1/completions` (the recipe's CPU server).

    python chat_adapter.py --upstream http://127.0.0.1:8001 --model-dir .cache/smollm2-135m-instruct-tools \
        [--host 127.0.0.1] [--port 8002]

It renders the messages (and tools) with the model folder's own chat template, asks the upstream for a text
completion, and turns `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks in the reply (the template's
tool-call layout) into OpenAI `tool_calls`. Runs in the recipe's environment (transformers, aiohttp), not in the
TALES one. GET /health and /v1/models are passed through.
"""

from __future__ import annotations

import argparse
import json
import re
import time
import uuid
from typing import Any

from aiohttp import ClientSession, ClientTimeout, web

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
SAMPLING_KEYS = ("temperature", "top_p", "stop", "seed", "max_tokens")


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content without the tool-call blocks, OpenAI tool_calls); a block that is not JSON stays in the content."""
    calls, kept = [], text
    for block in TOOL_CALL.finditer(text):
        try:
            call = json.loads(block.group(1))
            name, arguments = call["name"], call.get("arguments", {})
        except (ValueError, KeyError, TypeError):
            continue
        kept = kept.replace(block.group(0), "", 1)
        calls.append(
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {
                    "name": name,
                    "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
                },
            }
        )
    content = kept.strip()
    return (content or None), calls


class ChatAdapter:
    def __init__(self, upstream: str, model_dir: str) -> None:
        from transformers import AutoTokenizer

        self.upstream = upstream.rstrip("/")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.http: ClientSession | None = None

    async def start(self, app: web.Application) -> None:
        self.http = ClientSession(timeout=ClientTimeout(total=600))

    async def stop(self, app: web.Application) -> None:
        if self.http is not None:
            await self.http.close()

    async def passthrough(self, request: web.Request) -> web.Response:
        async with self.http.get(self.upstream + request.path) as response:
            return web.Response(status=response.status, body=await response.read(), content_type="application/json")

    async def chat(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            messages = body["messages"]
            prompt = self.tokenizer.apply_chat_template(
                messages, tools=body.get("tools") or None, add_generation_prompt=True, tokenize=False
            )
        except (ValueError, KeyError, TypeError) as err:
            return web.json_response(
                {"error": {"message": f"bad chat request: {err}", "type": "BadRequestError"}}, status=400
            )
        upstream_body = {"prompt": prompt} | {k: body[k] for k in SAMPLING_KEYS if body.get(k) is not None}
        if body.get("max_completion_tokens") is not None:
            upstream_body["max_tokens"] = body["max_completion_tokens"]
        async with self.http.post(self.upstream + "/v1/completions", json=upstream_body) as response:
            answer = await response.json(content_type=None)
            if response.status != 200:
                return web.json_response(answer, status=response.status)
        choice = answer["choices"][0]
        content, tool_calls = parse_tool_calls(choice["text"])
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if tool_calls:
            message["tool_calls"] = tool_calls
        finish = "tool_calls" if tool_calls else choice.get("finish_reason", "stop")
        return web.json_response(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model") or answer.get("model"),
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": answer.get("usage"),
            }
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="base URL of the /v1/completions server")
    parser.add_argument("--model-dir", required=True, help="the served model's folder (for its chat template)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    args = parser.parse_args()
    adapter = ChatAdapter(args.upstream, args.model_dir)
    app = web.Application()
    app.on_startup.append(adapter.start)
    app.on_cleanup.append(adapter.stop)
    app.router.add_post("/v1/chat/completions", adapter.chat)
    app.router.add_get("/v1/models", adapter.passthrough)
    app.router.add_get("/health", adapter.passthrough)
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
