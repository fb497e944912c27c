"""The two formulations as NeMo Gym dataset rows, Responses-API outputs for /verify, a session client, resumable JSONL.

- Multi-turn: system prompt + the first observation; the model plays through the `execute_command` tool.
- Single-turn: system prompt + ONE user message that condenses the whole transcript so far (first observation, then
  "> command" and the game's answer for every command already played); the model replies with the next command.
  The row's `history` holds those commands so that /verify can replay them before playing the reply.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx

TOOL_NAME = "execute_command"
TOOL_DESCRIPTION = "Play one text command in the game and get the game's answer, score and whether it is over."
COMMAND_SCHEMA = {
    "type": "object",
    "properties": {"command": {"type": "string", "description": "one command, e.g. 'open the fridge'"}},
    "required": ["command"],
    "additionalProperties": False,
}
MULTI_TURN_SYSTEM = (
    "You are playing a text-based game. Reach the goal by sending one command at a time with the execute_command "
    "tool, e.g. 'look', 'inventory', 'go north', 'take the key', 'open the door'. Keep playing until the game is won."
)
SINGLE_TURN_SYSTEM = (
    "You are playing a text-based game. The user message is the game so far: observations, and after each '>' the "
    "command that was played. Reply with the next command only, on one line, e.g. 'take the key'."
)


def responses_tool() -> dict[str, Any]:
    """The execute_command tool in the Responses API layout (what NeMo Gym rows carry)."""
    return {
        "type": "function",
        "name": TOOL_NAME,
        "description": TOOL_DESCRIPTION,
        "parameters": COMMAND_SCHEMA,
        "strict": True,
    }


def chat_tool() -> dict[str, Any]:
    """The same tool in the Chat Completions layout."""
    return {
        "type": "function",
        "function": {"name": TOOL_NAME, "description": TOOL_DESCRIPTION, "parameters": COMMAND_SCHEMA},
    }


def task_fields(framework: str, task: str, split: str, episode: int) -> dict[str, Any]:
    return {"framework": framework, "task": task, "split": split, "episode": episode}


def condensed_transcript(first_observation: str, turns: Iterable[tuple[str, str]]) -> str:
    """The single-turn user message: the whole game so far, ending with the '>' prompt for the next command."""
    text = first_observation.strip()
    for command, observation in turns:
        text += f"\n\n> {command}\n{observation.strip()}"
    return text + "\n\n>"


def multi_turn_row(fields: dict[str, Any], first_observation: str, max_steps: int | None = None) -> dict[str, Any]:
    row = {
        "responses_create_params": {
            "input": [
                {"role": "system", "content": MULTI_TURN_SYSTEM},
                {"role": "user", "content": first_observation.strip()},
            ],
            "tools": [responses_tool()],
        },
        **fields,
        "mode": "multi_turn",
    }
    if max_steps is not None:
        row["max_steps"] = max_steps
    return row


def single_turn_row(
    fields: dict[str, Any], first_observation: str, turns: list[tuple[str, str]], expected_command: str | None = None
) -> dict[str, Any]:
    row = {
        "responses_create_params": {
            "input": [
                {"role": "system", "content": SINGLE_TURN_SYSTEM},
                {"role": "user", "content": condensed_transcript(first_observation, turns)},
            ]
        },
        **fields,
        "mode": "single_turn",
        "history": [command for command, _ in turns],
    }
    if expected_command is not None:
        row["expected_command"] = expected_command  # the gold next command: for SFT and reading, not for the reward
    return row


def row_id(row: dict[str, Any]) -> str:
    base = f"{row['framework']}/{row['task']}/{row['split']}/{row['episode']}/{row.get('mode', 'multi_turn')}"
    return base + (f"/h{len(row['history'])}" if row.get("mode") == "single_turn" else "")


def response_object(output: list[dict[str, Any]], model: str) -> dict[str, Any]:
    """A Responses API response (NeMo Gym's NeMoGymResponse) holding the episode's output items."""
    return {
        "id": f"resp_{uuid.uuid4().hex}",
        "created_at": time.time(),
        "model": model,
        "object": "response",
        "output": output,
        "parallel_tool_calls": False,
        "tool_choice": "auto",
        "tools": [],
    }


def message_item(text: str) -> dict[str, Any]:
    return {
        "id": f"msg_{uuid.uuid4().hex}",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def tool_call_items(command: str, output: str, call_id: str | None = None) -> list[dict[str, Any]]:
    call_id = call_id or f"call_{uuid.uuid4().hex[:24]}"
    return [
        {"type": "function_call", "name": TOOL_NAME, "arguments": json.dumps({"command": command}), "call_id": call_id},
        {"type": "function_call_output", "call_id": call_id, "output": output},
    ]


class ServerError(RuntimeError):
    def __init__(self, path: str, status: int, detail: str) -> None:
        super().__init__(f"{path} answered {status}: {detail}")
        self.status = status
        self.detail = detail


class GameSession:
    """One episode against the resources server; its own cookie jar keeps its session apart from all others."""

    def __init__(self, base_url: str, timeout: float = 300.0) -> None:
        self.client = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout)

    async def __aenter__(self) -> GameSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()

    async def post(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        response = await self.client.post(path, json=body or {})
        if response.status_code >= 400:
            try:
                payload = response.json()
            except ValueError:
                payload = response.text
            detail = payload.get("detail", payload) if isinstance(payload, dict) else payload
            raise ServerError(path, response.status_code, str(detail))
        return response.json()

    async def seed(self, row: dict[str, Any]) -> dict[str, Any]:
        return await self.post("/seed_session", row)

    async def command(self, command: str) -> dict[str, Any]:
        return await self.post(f"/{TOOL_NAME}", {"command": command})

    async def walkthrough(self) -> list[str]:
        return (await self.post("/walkthrough"))["walkthrough"]

    async def verify(self, row: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
        return await self.post("/verify", {**row, "response": response})


def tool_output(result: dict[str, Any]) -> str:
    """What the model reads back from one execute_command call."""
    return json.dumps({k: result[k] for k in ("observation", "score", "max_score", "done", "won", "lost")})


# -- resumable JSONL ---------------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as err:
                raise SystemExit(f"{path}:{number}: not JSON ({err}); fix or remove that line") from err
    return rows


def finished_ids(path: Path) -> set[str]:
    """Ids of the records already written without an error: a rerun skips them (failed ones run again)."""
    return {record["id"] for record in read_jsonl(path) if "error" not in record}


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()


def summarize(path: Path) -> dict[str, Any]:
    """Mean reward, win rate and counts per framework and mode, over the latest record of each id."""
    latest: dict[str, dict[str, Any]] = {}
    for record in read_jsonl(path):
        latest[record["id"]] = record
    groups: dict[str, dict[str, Any]] = {}
    for record in latest.values():
        for key in ("all", f"{record['framework']}/{record['mode']}"):
            group = groups.setdefault(key, {"episodes": 0, "errors": 0, "reward_sum": 0.0, "won": 0})
            group["episodes"] += 1
            if "error" in record:
                group["errors"] += 1
                continue
            group["reward_sum"] += record["reward"]
            group["won"] += bool(record["won"])
    summary = {}
    for key, group in sorted(groups.items()):
        scored = group["episodes"] - group["errors"]
        summary[key] = {
            "episodes": group["episodes"],
            "errors": group["errors"],
            "mean_reward": round(group["reward_sum"] / scored, 4) if scored else None,
            "win_rate": round(group["won"] / scored, 4) if scored else None,
        }
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    print(f"{'group':40s} {'episodes':>8s} {'errors':>6s} {'reward':>7s} {'won':>6s}")
    for key, group in summary.items():
        reward = "-" if group["mean_reward"] is None else f"{group['mean_reward']:.3f}"
        won = "-" if group["win_rate"] is None else f"{group['win_rate']:.3f}"
        print(f"{key:40s} {group['episodes']:8d} {group['errors']:6d} {reward:>7s} {won:>6s}")


# -- a local server for the scripts and tests --------------------------------------------------------------------------


class LocalServer:
    """app.py in a subprocess on a free loopback port (own process group, output in a log file)."""

    def __init__(self, log_path: Path, *extra_args: str, python: str | None = None) -> None:
        import socket
        import subprocess
        import sys

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        app = Path(__file__).resolve().with_name("app.py")
        command = [python or sys.executable, str(app), "--host", "127.0.0.1", "--port", str(self.port), *extra_args]
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 120.0) -> LocalServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"app.py exited with {self.process.returncode}:\n{self.log_path.read_text()[-3000:]}"
                )
            try:
                if httpx.get(self.url + "/", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"app.py not ready after {timeout:.0f} s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        import os
        import signal
        import subprocess

        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
