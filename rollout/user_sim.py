"""User simulators for the async episode engine: tau2's LLM user over a non-blocking chat client, or a scripted one.

`LLMUser` is tau2's `UserSimulator` with only the LLM call replaced: the same system prompt (guidelines + scenario),
the same state and role flip (`UserState.flip_roles`), the same message conversion (`to_litellm_messages`), the
user's tools as OpenAI schemas with `tool_choice="auto"`, and the reply's tool calls flipped to `requestor="user"`.
The request goes through `rollout.clients.chat` (aiohttp / google-genai) instead of litellm, so hundreds of episodes
can share one asyncio loop.

Configuration comes from the environment (`UserSimConfig.from_env`):
  TAU2_USER_KIND         llm | gemini | scripted | solo            (default scripted)
  TAU2_USER_MODEL        served model name (llm) or Gemini model   (llm, gemini)
  TAU2_USER_BASE_URL     OpenAI-compatible base URL, e.g. http://127.0.0.1:30001/v1 (llm; optional for gemini)
  TAU2_USER_API_KEY      falls back to OPENAI_API_KEY (llm) or GEMINI_API_KEY (gemini)
  TAU2_USER_TEMPERATURE  default 0.0 (tau2's default)
  TAU2_USER_TIMEOUT_S    seconds one request attempt may take, default 120
  TAU2_USER_MAX_RETRIES  retries of a failed request (rollout.clients.retry: 5xx, 429, timeout, connection), default 6
  TAU2_USER_CALL_TIMEOUT_S  seconds one user turn may take in all (requests, backoff, re-asks), default 300
  TAU2_USER_EXTRA_ARGS   JSON object of extra request fields (e.g. {"max_tokens": 512})

A reply the user cannot use (empty, or a tool call whose arguments are not a JSON object) is asked again up to 3
times, as tau2 asks again after an empty reply; after that, or once the retries are spent, the turn fails with
UserSimulatorError and the episode ends as an infrastructure failure (status "failed", reason infra_error), which
GRPO keeps out of training. The engine bounds each user turn (requests, backoff and re-asks together) by
TAU2_USER_CALL_TIMEOUT_S or TAU2_TURN_TIMEOUT_S, whichever is smaller: a hung server ends the episode as failed,
reason timeout.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from rollout.clients.chat import CHAT_RETRY, ChatClient, ChatClientError, build_chat_client
from rollout.engine import EpisodeUser, IncomingMessage, UserReply
from rollout.scripted import ScriptedUser
from rollout.tau2_setup import import_tau2
from rollout.tool_schemas import tool_schemas

import_tau2()

from tau2.data_model.message import (  # noqa: E402
    AssistantMessage,
    Message,
    MultiToolMessage,
    ToolCall,
    ToolMessage,
    UserMessage,
)
from tau2.user.user_simulator import UserSimulator  # noqa: E402
from tau2.utils.llm_utils import to_litellm_messages  # noqa: E402

if TYPE_CHECKING:
    from tau2.data_model.tasks import Task
    from tau2.environment.tool import Tool

UserKind = Literal["llm", "gemini", "scripted", "solo"]
USER_KINDS: tuple[str, ...] = ("llm", "gemini", "scripted", "solo")


class UserSimulatorError(RuntimeError):
    """The user simulator could not produce a reply (server down past retries, unusable reply): an infrastructure
    failure, not a policy mistake."""


class UserSimConfig(BaseModel):
    """Which user simulator plays the customer. The API key never appears in repr, dumps or `public_dict()`."""

    model_config = ConfigDict(extra="forbid")

    kind: UserKind = "scripted"
    model: str | None = None
    base_url: str | None = None
    api_key: SecretStr | None = Field(default=None, exclude=True, repr=False)
    temperature: float = Field(default=0.0, ge=0.0)
    timeout_s: float = Field(default=120.0, gt=0.0)
    max_retries: int = Field(default=6, ge=0)
    call_timeout_s: float = Field(default=300.0, gt=0.0)
    extra_args: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> UserSimConfig:
        """Read TAU2_USER_* (see the module docstring). A bad value raises ValueError naming the variable."""
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name)
            return value.strip() if value is not None and value.strip() else None

        kind = get("TAU2_USER_KIND") or "scripted"
        if kind not in USER_KINDS:
            raise ValueError(f"TAU2_USER_KIND={kind!r} is not one of {', '.join(USER_KINDS)}")
        model = get("TAU2_USER_MODEL")
        base_url = get("TAU2_USER_BASE_URL")
        if kind in ("llm", "gemini") and not model:
            raise ValueError(f"TAU2_USER_KIND={kind} needs TAU2_USER_MODEL (the model name to call)")
        if kind == "llm" and not base_url:
            raise ValueError("TAU2_USER_KIND=llm needs TAU2_USER_BASE_URL (e.g. http://127.0.0.1:30001/v1)")
        fallback = {"llm": "OPENAI_API_KEY", "gemini": "GEMINI_API_KEY"}.get(kind)
        api_key = get("TAU2_USER_API_KEY") or (get(fallback) if fallback else None)
        values: dict[str, Any] = {"kind": kind, "model": model, "base_url": base_url}
        if api_key:
            values["api_key"] = SecretStr(api_key)
        temperature = _env_number(get, "TAU2_USER_TEMPERATURE", float, minimum=0.0)
        if temperature is not None:
            values["temperature"] = temperature
        timeout = _env_number(get, "TAU2_USER_TIMEOUT_S", float, minimum=0.0, strict=True)
        if timeout is not None:
            values["timeout_s"] = timeout
        retries = _env_number(get, "TAU2_USER_MAX_RETRIES", int, minimum=0)
        if retries is not None:
            values["max_retries"] = retries
        call_timeout = _env_number(get, "TAU2_USER_CALL_TIMEOUT_S", float, minimum=0.0, strict=True)
        if call_timeout is not None:
            values["call_timeout_s"] = call_timeout
        extra = get("TAU2_USER_EXTRA_ARGS")
        if extra is not None:
            try:
                parsed = json.loads(extra)
            except ValueError as err:
                raise ValueError(f"TAU2_USER_EXTRA_ARGS is not valid JSON: {err}") from None
            if not isinstance(parsed, dict):
                raise ValueError("TAU2_USER_EXTRA_ARGS must be a JSON object")
            values["extra_args"] = parsed
        return cls(**values)

    def secret(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key is not None else None

    def public_dict(self) -> dict[str, Any]:
        """The configuration for run logs: everything but the key (only whether one is set)."""
        data = self.model_dump(mode="json")
        data["api_key_set"] = self.api_key is not None
        return data

    def client_key(self) -> tuple[Any, ...]:
        """Identifies the chat client this config needs (the key enters only as a digest)."""
        secret = self.secret()
        digest = hashlib.sha256(secret.encode()).hexdigest()[:16] if secret else None
        return (self.kind, self.model, self.base_url, digest, self.timeout_s, self.max_retries)


def _env_number(get: Any, name: str, kind: type, minimum: float, strict: bool = False) -> Any:
    raw = get(name)
    if raw is None:
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
    if value < minimum or (strict and value == minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise ValueError(f"{name}={raw!r} must be {bound}")
    return value


class LLMUser:
    """tau2's UserSimulator with the LLM call made through an async chat client. One instance per episode; the
    client is shared. An unusable reply (empty, or tool-call arguments that are not a JSON object) is asked again
    by the client; if it is still unusable, `respond` raises UserSimulatorError saying what the simulator sent."""

    def __init__(
        self,
        task: Task,
        user_tools: list[Tool] | None,
        client: ChatClient,
        temperature: float = 0.0,
        llm_args: dict[str, Any] | None = None,
        message_history: list[Message] | None = None,
        turn_timeout_s: float | None = None,
    ) -> None:
        self.turn_timeout_s = turn_timeout_s  # the engine's bound on this user's turns, when below the turn bound
        # tau2's own object supplies the system prompt and the state (and with it flip_roles); only `generate` is ours.
        self.simulator = UserSimulator(tools=user_tools, instructions=str(task.user_scenario))
        self.state = self.simulator.get_init_state(message_history=message_history)
        self.tools = tool_schemas(user_tools)  # cached: tau2 rebuilds a JSON schema per access
        self.client = client
        self.params: dict[str, Any] = {"temperature": temperature, **(llm_args or {})}

    @property
    def system_prompt(self) -> str:
        return self.simulator.system_prompt

    def request_messages(self) -> list[dict[str, Any]]:
        """The messages tau2 would send for the current state: system prompt, then the flipped conversation."""
        return to_litellm_messages(self.state.system_messages + self.state.flip_roles())

    async def respond(self, incoming: IncomingMessage) -> UserReply:
        if isinstance(incoming, MultiToolMessage):
            self.state.messages.extend(incoming.tool_messages)
        elif isinstance(incoming, (AssistantMessage, ToolMessage)):
            self.state.messages.append(incoming)
        else:
            raise TypeError(f"the user cannot receive a {type(incoming).__name__}")
        try:
            completion = await self.client.complete(
                self.request_messages(),
                tools=self.tools,
                tool_choice="auto" if self.tools else None,
                require_json_arguments=True,
                **self.params,
            )
        except ChatClientError as err:
            raise UserSimulatorError(f"user simulator request failed: {err}") from None
        problem = completion.problem(require_json_arguments=True)
        if problem is not None:
            asks = completion.reasks + 1
            raise UserSimulatorError(f"the user simulator sent {problem}, {asks} time(s) in a row")
        message = UserMessage(
            role="user",
            content=completion.content,
            cost=0.0,
            usage={"completion_tokens": completion.completion_tokens, "prompt_tokens": completion.prompt_tokens},
            raw_data={"finish_reason": completion.finish_reason, "attempts": completion.attempts},
        )
        if completion.tool_calls:
            message.tool_calls = [
                ToolCall(id=call.id, name=call.name, arguments=call.arguments, requestor="user")
                for call in completion.tool_calls
            ]
        self.state.messages.append(message)
        return UserReply(
            message=message,
            latency_s=completion.latency_s,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
        )


_CLIENTS: dict[Any, ChatClient] = {}


def get_user_client(config: UserSimConfig, cache: dict[Any, Any] | None = None) -> ChatClient:
    """The chat client for this config, built once per cache (default: one per process)."""
    cache = _CLIENTS if cache is None else cache
    key = config.client_key()
    client = cache.get(key)
    if client is None:
        client = build_chat_client(
            config.kind,
            config.model or "",
            config.base_url,
            config.secret(),
            retry=CHAT_RETRY.model_copy(update={"timeout_s": config.timeout_s, "max_retries": config.max_retries}),
        )
        cache[key] = client
    return client


async def close_user_clients(cache: dict[Any, Any] | None = None) -> None:
    cache = _CLIENTS if cache is None else cache
    clients = list(cache.values())
    cache.clear()
    for client in clients:
        await client.aclose()


def build_user(
    config: UserSimConfig, task: Task, user_tools: list[Tool] | None, client_cache: dict[Any, Any] | None = None
) -> EpisodeUser | None:
    """A fresh user for one episode (None in solo mode). LLM users share a cached chat client."""
    if config.kind == "solo":
        return None
    if config.kind == "scripted":
        return ScriptedUser(task)
    client = get_user_client(config, client_cache)
    return LLMUser(
        task,
        user_tools,
        client,
        temperature=config.temperature,
        llm_args=config.extra_args,
        turn_timeout_s=config.call_timeout_s,
    )
