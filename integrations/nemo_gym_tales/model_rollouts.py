"""Play TALES rows with a model behind any OpenAI-compatible `/chat/completions` endpoint; score them with /verify.

    python model_rollouts.py --base-url http://127.0.0.1:8002/v1 --model NAME [--input data/example.jsonl]
        [--out runs/tales/model_rollouts.jsonl] [--server URL] [--max-steps 30] [--repeats 1]
        [--temperature 0] [--max-tokens 64] [--concurrency 2] [--text-commands] [--api-key-env OPENAI_API_KEY]

Single-turn rows: one completion, whose first line is the next command; /verify plays it after the row's history.
Multi-turn rows: the model calls `execute_command` until the game is over, it stops calling the tool, or --max-steps
is reached; /verify scores the session's game. With --text-commands, a reply without a tool call is played as a
command too (for models without tool calling) and the game's answer comes back as a user message.
Records are appended as episodes finish; a rerun skips the ids already done (resume); the summary of scores is
printed and written beside the output. The API key, when needed, is read from the variable --api-key-env names and
never printed. Without --server it starts its own resources server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx
from episodes import (
    TOOL_NAME,
    GameSession,
    LocalServer,
    ServerError,
    append_jsonl,
    chat_tool,
    finished_ids,
    message_item,
    print_summary,
    read_jsonl,
    response_object,
    row_id,
    summarize,
    tool_output,
)

RETRIES = 2


class ChatClient:
    def __init__(self, base_url: str, model: str, api_key: str | None, sampling: dict[str, Any]) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=600)
        self.model = model
        self.sampling = sampling

    async def complete(self, messages: list[dict[str, Any]], tools: list[dict] | None) -> dict[str, Any]:
        body = {"model": self.model, "messages": messages, **self.sampling} | ({"tools": tools} if tools else {})
        for attempt in range(RETRIES + 1):
            try:
                response = await self.http.post("/chat/completions", json=body)
            except httpx.TransportError as err:
                if attempt == RETRIES:
                    raise RuntimeError(f"model endpoint unreachable: {err!r}") from err
            else:
                if response.status_code == 200:
                    return response.json()
                if response.status_code < 500 or attempt == RETRIES:
                    raise RuntimeError(f"model endpoint answered {response.status_code}: {response.text[:500]}")
            await asyncio.sleep(2**attempt)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await self.http.aclose()


def chat_messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The row's Responses-API input as chat messages (text content only, as the rows carry)."""
    items = row["responses_create_params"]["input"]
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    return [{"role": item["role"], "content": item["content"]} for item in items]


def first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


async def play_single_turn(row: dict, chat: ChatClient, session: GameSession, model: str) -> tuple[dict, dict]:
    completion = await chat.complete(chat_messages(row), None)
    text = completion["choices"][0]["message"].get("content") or ""
    verdict = await session.verify(row, response_object([message_item(text)], model))
    return verdict, {"reply": text, "usage": completion.get("usage")}


async def play_multi_turn(
    row: dict, chat: ChatClient, session: GameSession, model: str, max_steps: int, text_commands: bool
) -> tuple[dict, dict]:
    messages = chat_messages(row)
    output: list[dict[str, Any]] = []
    steps, over, stop = 0, False, "max_steps"
    while steps < max_steps and not over:
        message = (await chat.complete(messages, [chat_tool()]))["choices"][0]["message"]
        calls = message.get("tool_calls") or []
        messages.append(
            {"role": "assistant", "content": message.get("content"), **({"tool_calls": calls} if calls else {})}
        )
        if message.get("content"):
            output.append(message_item(message["content"]))
        if not calls:
            command = first_line(message.get("content")) if text_commands else ""
            if not command:
                stop = "no_tool_call"
                break
            result = await play_command(session, command)
            steps += 1
            over = result.get("done", False)
            messages.append({"role": "user", "content": result.get("observation") or json.dumps(result)})
            continue
        for call in calls:
            function = call.get("function", {})
            try:
                command = json.loads(function.get("arguments") or "{}").get("command", "")
            except (ValueError, AttributeError):
                command = ""
            if function.get("name") != TOOL_NAME:
                result = {"error": f"unknown tool {function.get('name')!r}: the only tool is {TOOL_NAME}"}
            else:
                result = await play_command(session, command)
                steps += 1
            text = tool_output(result) if "error" not in result else json.dumps(result)
            output.append(
                {
                    "type": "function_call",
                    "name": function.get("name", ""),
                    "arguments": function.get("arguments") or "{}",
                    "call_id": call["id"],
                }
            )
            output.append({"type": "function_call_output", "call_id": call["id"], "output": text})
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": text})
            over = over or result.get("done", False)
    if over:
        stop = "game_over"
    verdict = await session.verify(row, response_object(output, model))
    return verdict, {"steps": steps, "stop": stop, "transcript": output}


async def play_command(session: GameSession, command: str) -> dict[str, Any]:
    """One command; a refused command (empty, too long, game over) comes back as an error for the model."""
    try:
        return await session.command(command)
    except ServerError as err:
        if err.status in (409, 422):
            return {"error": err.detail, "done": err.status == 409}
        raise


async def run(args: argparse.Namespace, url: str) -> None:
    rows = read_jsonl(args.input)
    if not rows:
        raise SystemExit(f"model_rollouts.py: no rows in {args.input}")
    done = finished_ids(args.out)
    api_key = os.environ.get(args.api_key_env) or None
    sampling = {"temperature": args.temperature, "max_tokens": args.max_tokens}
    chat = ChatClient(args.base_url, args.model, api_key, sampling)
    semaphore = asyncio.Semaphore(args.concurrency)

    async def one(row: dict[str, Any], repeat: int) -> None:
        episode_id = f"{row_id(row)}/r{repeat}"
        if episode_id in done:
            print(f"skip {episode_id} (done)", flush=True)
            return
        base = {"id": episode_id, **{k: row.get(k) for k in ("framework", "task", "split", "episode", "mode")}}
        async with semaphore:
            try:
                async with GameSession(url) as session:
                    await session.seed(row)
                    if row.get("mode") == "single_turn":
                        verdict, extra = await play_single_turn(row, chat, session, args.model)
                    else:
                        max_steps = min(args.max_steps, row.get("max_steps") or args.max_steps)
                        verdict, extra = await play_multi_turn(
                            row, chat, session, args.model, max_steps, args.text_commands
                        )
                keys = ("reward", "score", "max_score", "won", "lost", "moves", "commands")
                record = base | {k: verdict[k] for k in keys} | {"model": args.model} | extra
            except Exception as err:  # one failed episode never stops the batch
                record = base | {"error": str(err)}
        append_jsonl(args.out, record)
        status = record.get("error") or f"reward {record['reward']:.3f}"
        print(f"{episode_id}: {status}", flush=True)

    try:
        await asyncio.gather(*(one(row, r) for row in rows for r in range(args.repeats)))
    finally:
        await chat.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8002/v1")
    parser.add_argument("--model", required=True)
    parser.add_argument("--input", type=Path, default=Path(__file__).resolve().parent / "data" / "example.jsonl")
    parser.add_argument("--out", type=Path, default=Path("runs/tales/model_rollouts.jsonl"))
    parser.add_argument("--server", default=None, help="base URL of a running TALES resources server")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--text-commands", action="store_true", help="play replies without a tool call as commands")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="variable holding the API key, if any")
    args = parser.parse_args(argv)

    server = None
    if args.server is None:
        server = LocalServer(args.out.with_suffix(".server.log")).wait_ready()
    try:
        asyncio.run(run(args, args.server or server.url))
    finally:
        if server is not None:
            server.stop()
    summary = summarize(args.out)
    args.out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    return 1 if summary.get("all", {}).get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
