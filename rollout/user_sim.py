"""User simulators for the async episode engine: tau2's LLM user over a non-blocking chat client, or a scripted one.

`LLMUser` is tau2's `UserSimulator` with only the LLM call replaced: the same system prompt (guidelines + scenario),
the same state and role flip (`UserState.flip_roles`), the same message conversion (`to_litellm_messages`), the
user's tools as OpenAI schemas with `tool_choice="auto"`, and the reply's tool calls flipped to `requestor="user"`.
The request goes through `rollout.clients.chat` (aiohttp / google-genai) instead of litellm, so hundreds of episodes
can share one asyncio loop.

Which user simulator plays the customer: rollout.settings.UserSimConfig, from the TAU2_USER_* variables
(docs/settings.md): TAU2_USER_KIND (llm, gemini, scripted, solo), TAU2_USER_MODEL, TAU2_USER_BASE_URL,
TAU2_USER_API_KEY (else OPENAI_API_KEY / GEMINI_API_KEY), TAU2_USER_TEMPERATURE, and the bounds TAU2_USER_TIMEOUT_S
(one request attempt), TAU2_USER_MAX_RETRIES and TAU2_USER_CALL_TIMEOUT_S (one user turn in all).

A reply the user cannot use (empty, or a tool call whose arguments are not a JSON object) is asked again up to 3
times, as tau2 asks again after an empty reply; after that, or once the retries are spent, the turn fails with
UserSimulatorError and the episode ends as an infrastructure failure (status "failed", reason infra_error), which
GRPO keeps out of training. The engine bounds each user turn (requests, backoff and re-asks together) by
TAU2_USER_CALL_TIMEOUT_S or TAU2_TURN_TIMEOUT_S, whichever is smaller: a hung server ends the episode as failed,
reason timeout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rollout.clients.chat import CHAT_RETRY, ChatClient, ChatClientError, build_chat_client, clean_messages
from rollout.engine import EpisodeUser, IncomingMessage, UserReply
from rollout.scripted import ScriptedUser
from rollout.settings import UserSimConfig
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
from tau2.user.base import UserState  # noqa: E402
from tau2.user.user_simulator import UserSimulator  # noqa: E402
from tau2.utils.llm_utils import to_litellm_messages  # noqa: E402

if TYPE_CHECKING:
    from tau2.data_model.tasks import Task
    from tau2.environment.tool import Tool


class UserSimulatorError(RuntimeError):
    """The user simulator could not produce a reply (server down past retries, unusable reply): an infrastructure
    failure, not a policy mistake."""


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
        # The request so far: the system prompt and state.messages[:_sent] flipped and converted. The state only
        # grows (respond appends), so each request converts only the messages added since the last one.
        self._request: list[dict[str, Any]] = []
        self._sent = 0

    @property
    def system_prompt(self) -> str:
        return self.simulator.system_prompt

    def request_messages(self) -> list[dict[str, Any]]:
        """The messages tau2 would send for the current state: system prompt, then the flipped conversation
        (tau2's flip_roles and to_litellm_messages convert each message on its own, so converting only the new
        ones and appending gives the same list)."""
        messages = self.state.messages
        if not self._request or self._sent > len(messages):
            self._request, self._sent = clean_messages(to_litellm_messages(self.state.system_messages)), 0
        if self._sent < len(messages):
            new = UserState.model_construct(system_messages=[], messages=messages[self._sent :]).flip_roles()
            self._request.extend(clean_messages(to_litellm_messages(new)))
            self._sent = len(messages)
        return list(self._request)

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
