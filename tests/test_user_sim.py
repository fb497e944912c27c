"""rollout.user_sim: tau2's LLM user over the async chat client, against a local OpenAI-compatible server.

The reference for what the user must send is tau2's own UserSimulator, run through litellm against the same fake
server: both requests are recorded and compared.
"""

from __future__ import annotations

import asyncio

import pytest

from rollout.clients.chat import OpenAIChatClient, clean_messages
from rollout.clients.retry import RetryPolicy
from rollout.engine import EpisodeUser
from rollout.scripted import ScriptedUser
from rollout.task_store import get_task_store
from rollout.tau2_setup import import_tau2
from rollout.user_sim import (
    LLMUser,
    UserSimConfig,
    UserSimulatorError,
    build_user,
    close_user_clients,
    get_user_client,
)
from tests.fake_openai_server import FakeOpenAIServer, FakeReply, error_reply, text_reply, tool_call_reply

registry = import_tau2()

from tau2.data_model.message import AssistantMessage, MultiToolMessage, UserMessage  # noqa: E402
from tau2.orchestrator.orchestrator import DEFAULT_FIRST_AGENT_MESSAGE  # noqa: E402
from tau2.user.user_simulator import UserSimulator  # noqa: E402
from tau2.utils.llm_utils import to_litellm_messages  # noqa: E402

SECRET = "sk-user-sim-0a1b2c3d4e5f"


@pytest.fixture(scope="module")
def task():
    return get_task_store().tasks("telecom", "train")[0]


@pytest.fixture
def env(task):
    environment = registry.get_env_constructor("telecom")()
    state = task.initial_state
    environment.set_state(
        initialization_data=state.initialization_data,
        initialization_actions=state.initialization_actions,
        message_history=[],
    )
    return environment


@pytest.fixture
def server():
    with FakeOpenAIServer() as srv:
        yield srv


def greeting():
    return DEFAULT_FIRST_AGENT_MESSAGE.model_copy(deep=True)


def wire(messages):
    """Messages as compared on the wire: tau2's per-call `name` and empty keys set aside."""
    out = []
    for message in clean_messages(messages):
        message = {k: v for k, v in message.items() if v is not None}
        out.append(message)
    return out


def play_llm_user(task, tools, client, incoming_factory):
    """Drive an LLMUser through several turns on one loop; incoming_factory(reply) gives the next incoming."""

    async def main():
        user = LLMUser(task, tools, client)
        replies = []
        incoming = greeting()
        try:
            while incoming is not None:
                reply = await user.respond(incoming)
                replies.append(reply)
                incoming = incoming_factory(reply)
        finally:
            await client.aclose()
        return user, replies

    return asyncio.run(main())


def test_llm_user_sends_what_tau2_sends(server, task, env):
    tools = env.get_user_tools()
    assert len(tools) == 30
    script = [
        tool_call_reply("toggle_airplane_mode", {}, call_id="call_u1"),
        text_reply("I turned airplane mode off, still no data."),
    ]

    # tau2's own UserSimulator through litellm: the reference requests.
    server.enqueue(*script)
    reference = UserSimulator(
        tools=tools,
        instructions=str(task.user_scenario),
        llm="openai/fake-model",
        llm_args={"api_base": server.base_url, "api_key": "unused", "temperature": 0.0},
    )
    state = reference.get_init_state()
    ref_first, state = reference.generate_next_message(greeting(), state)
    ref_result = env.get_response(ref_first.tool_calls[0])
    ref_second, state = reference.generate_next_message(ref_result, state)
    tau2_requests = [r.body for r in server.requests]
    server.requests.clear()

    # The same conversation through LLMUser.
    server.enqueue(*script)
    env2 = registry.get_env_constructor("telecom")()
    env2.set_state(
        initialization_data=task.initial_state.initialization_data,
        initialization_actions=task.initial_state.initialization_actions,
        message_history=[],
    )

    def next_incoming(reply):
        return env2.get_response(reply.message.tool_calls[0]) if reply.message.is_tool_call() else None

    client = OpenAIChatClient(server.base_url, "fake-model", retry=RetryPolicy(backoff_base_s=0.001))
    user, replies = play_llm_user(task, tools, client, next_incoming)
    ours = [r.body for r in server.requests]

    assert len(ours) == len(tau2_requests) == 2
    for mine, theirs in zip(ours, tau2_requests, strict=True):
        assert mine["model"] == theirs["model"] == "fake-model"
        assert wire(mine["messages"]) == wire(theirs["messages"])
        assert mine["tools"] == theirs["tools"]
        assert mine["tool_choice"] == theirs["tool_choice"] == "auto"
        assert mine["temperature"] == theirs["temperature"] == 0.0

    # The exact system prompt, the flipped roles, and the 30 phone tools.
    first, second = ours
    assert first["messages"][0] == {"role": "system", "content": reference.system_prompt}
    assert user.system_prompt == reference.system_prompt
    assert "<scenario>" in reference.system_prompt and "555-123-2002" in reference.system_prompt
    assert first["messages"][1:] == [{"role": "user", "content": "Hi! How can I help you today?"}]
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "tool"]
    assert second["messages"][2]["tool_calls"][0]["function"] == {"name": "toggle_airplane_mode", "arguments": "{}"}
    assert second["messages"][3]["tool_call_id"] == "call_u1"
    assert [t["function"]["name"] for t in first["tools"]] == [tool.name for tool in tools]
    assert first["tools"] == [tool.openai_schema for tool in tools]

    # Replies: the tool call flipped to requestor "user", exactly as tau2 does; usage and latency recorded.
    call_reply, text = replies
    assert isinstance(call_reply.message, UserMessage)
    assert call_reply.message == ref_first  # role, content, tool calls (id, name, arguments, requestor)
    assert call_reply.message.tool_calls[0].requestor == "user"
    assert call_reply.message.content is None
    assert text.message == ref_second and text.message.content == "I turned airplane mode off, still no data."
    assert (call_reply.prompt_tokens, call_reply.completion_tokens) == (11, 7)
    assert call_reply.latency_s > 0
    assert call_reply.message.usage == {"completion_tokens": 7, "prompt_tokens": 11}
    # The user's state holds the same conversation as tau2's.
    assert [type(m).__name__ for m in user.state.messages] == [type(m).__name__ for m in state.messages]


def test_request_built_by_appending_equals_tau2s_full_conversion(server, task, env):
    """LLMUser converts only the messages added since its last request; every request equals tau2's conversion of
    the whole state (system prompt + flip_roles + to_litellm_messages), as litellm would send it."""
    tools = env.get_user_tools()
    replies = [
        tool_call_reply("check_status_bar", {}, call_id="call_1"),
        text_reply("It shows no signal."),
        tool_call_reply("toggle_airplane_mode", {}, call_id="call_2"),
        text_reply("Done."),
    ]
    server.enqueue(*replies)
    agent_says = iter(["Please toggle airplane mode."])
    sent = []

    def next_incoming(reply):
        user_state = user_box[0].state
        sent.append(wire(user_box[0].request_messages()))
        reference = to_litellm_messages(user_state.system_messages + user_state.flip_roles())
        assert sent[-1] == wire(reference)
        if reply.message.is_tool_call():
            return env.get_response(reply.message.tool_calls[0])
        text = next(agent_says, None)
        return None if text is None else AssistantMessage(role="assistant", content=text)

    user_box = []
    original = LLMUser.__init__

    def remember(self, *args, **kwargs):
        original(self, *args, **kwargs)
        user_box.append(self)

    LLMUser.__init__ = remember
    try:
        client = OpenAIChatClient(server.base_url, "fake-model", retry=RetryPolicy(backoff_base_s=0.001))
        play_llm_user(task, tools, client, next_incoming)
    finally:
        LLMUser.__init__ = original
    assert [len(m) for m in sent] == [3, 5, 7, 9]
    bodies = [wire(r.body["messages"]) for r in server.requests]
    for body, before in zip(bodies[1:], sent, strict=False):  # each request: the state then, plus what came in
        assert body[:-1] == before


def test_multi_tool_results_reach_the_user(server, task, env):
    tools = env.get_user_tools()
    server.enqueue(
        FakeReply(
            tool_calls=[{"name": "check_status_bar", "arguments": {}}, {"name": "check_sim_status", "arguments": {}}]
        ),
        text_reply("Both checked."),
    )

    def next_incoming(reply):
        if reply.message.is_tool_call():
            return MultiToolMessage(
                role="tool", tool_messages=[env.get_response(call) for call in reply.message.tool_calls]
            )
        return None

    client = OpenAIChatClient(server.base_url, "fake-model")
    _, replies = play_llm_user(task, tools, client, next_incoming)
    assert len(replies[0].message.tool_calls) == 2
    assert all(call.requestor == "user" for call in replies[0].message.tool_calls)
    last = server.requests[-1].body["messages"]
    assert [m["role"] for m in last] == ["system", "user", "assistant", "tool", "tool"]


def test_llm_user_without_tools_sends_no_tools(server, task):
    server.enqueue(text_reply("hello"))
    client = OpenAIChatClient(server.base_url, "fake-model")
    _, replies = play_llm_user(task, None, client, lambda reply: None)
    body = server.requests[0].body
    assert "tools" not in body and "tool_choice" not in body
    assert (
        body["messages"][0]["content"] == UserSimulator(tools=None, instructions=str(task.user_scenario)).system_prompt
    )
    assert replies[0].message.content == "hello"


def test_server_failure_becomes_user_simulator_error(server, task):
    server.enqueue(*[error_reply(503, f"down {SECRET}") for _ in range(2)])
    retry = RetryPolicy(max_retries=1, backoff_base_s=0.001)
    client = OpenAIChatClient(server.base_url, "fake-model", api_key=SECRET, retry=retry)
    with pytest.raises(UserSimulatorError, match="after 2 attempts") as info:
        play_llm_user(task, None, client, lambda reply: None)
    assert SECRET not in str(info.value)


def test_tool_call_with_broken_json_is_asked_again(server, task, env):
    server.enqueue(tool_call_reply("toggle_data", "{oops"), tool_call_reply("toggle_data", {}, call_id="call_ok"))
    client = OpenAIChatClient(server.base_url, "fake-model")
    _, [reply] = play_llm_user(task, env.get_user_tools(), client, lambda reply: None)
    assert [call.id for call in reply.message.tool_calls] == ["call_ok"]
    assert reply.message.tool_calls[0].arguments == {} and reply.message.raw_data["attempts"] == 2
    assert len(server.requests) == 2
    assert server.requests[0].body == server.requests[1].body  # the same question, asked again


def test_tool_call_with_broken_json_every_time_fails_clearly(server, task, env):
    server.enqueue(*[tool_call_reply("toggle_data", "{oops") for _ in range(4)])
    client = OpenAIChatClient(server.base_url, "fake-model", max_reasks=3)
    with pytest.raises(UserSimulatorError) as info:
        play_llm_user(task, env.get_user_tools(), client, lambda reply: None)
    message = str(info.value)
    assert "tool call arguments that are not a JSON object" in message and "toggle_data('{oops')" in message
    assert message.endswith(", 4 time(s) in a row")
    assert len(server.requests) == 4 and server.pending == 0


def _play_episode_with_llm_user(task, server_url, turn_timeout_s=None, retry=None, **client_options):
    """One episode whose user is the LLM user at server_url; the agent plays the gold script (never reached when
    the user's first reply fails)."""
    from rollout.engine import EpisodeConfig, run_episode
    from rollout.scripted import ScriptedPolicyAgent

    async def main():
        retry_policy = retry or RetryPolicy(backoff_base_s=0.001)
        client = OpenAIChatClient(server_url, "fake-model", retry=retry_policy, **client_options)
        try:
            user = LLMUser(task, None, client, turn_timeout_s=turn_timeout_s)
            agent = ScriptedPolicyAgent("gold", task)
            return await run_episode(task, agent, user, EpisodeConfig())
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_empty_user_reply_fails_the_episode_saying_so(server, task):
    server.enqueue(*[text_reply("") for _ in range(4)])
    result = _play_episode_with_llm_user(task, server.base_url, max_reasks=3)
    assert result.status == "failed" and result.termination_reason == "infra_error"
    assert result.failure == (
        "UserSimulatorError: the user simulator sent an empty reply (no text, no tool call), 4 time(s) in a row"
    )
    assert len(server.requests) == 4


def test_broken_tool_call_then_a_good_reply_keeps_the_episode(server, task):
    server.enqueue(tool_call_reply("toggle_data", "{oops"), text_reply("###STOP###"))
    result = _play_episode_with_llm_user(task, server.base_url)
    assert result.status != "failed", result.failure
    assert result.termination_reason == "user_stop" and len(server.requests) == 2


def config_from(monkeypatch, env: dict[str, str]) -> UserSimConfig:
    """UserSimConfig read from exactly these variables."""
    for name in (*(UserSimConfig.env_name(field) for field in UserSimConfig.model_fields), *KEY_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return UserSimConfig()


KEY_VARIABLES = ("OPENAI_API_KEY", "GEMINI_API_KEY")


def test_user_simulator_waits_are_bounded_by_default(task, monkeypatch):
    config = UserSimConfig(kind="llm", model="m", base_url="http://127.0.0.1:9/v1")
    user = build_user(config, task, None, {})
    limits = (user.client.retry.timeout_s, user.client.retry.max_retries, user.client.max_reasks, user.turn_timeout_s)
    assert limits == (120.0, 6, 3, 300.0)
    tuned = config_from(
        monkeypatch,
        {
            "TAU2_USER_KIND": "llm",
            "TAU2_USER_MODEL": "m",
            "TAU2_USER_BASE_URL": "http://127.0.0.1:9/v1",
            "TAU2_USER_TIMEOUT_S": "20",
            "TAU2_USER_MAX_RETRIES": "1",
            "TAU2_USER_CALL_TIMEOUT_S": "45",
        },
    )
    user = build_user(tuned, task, None, {})
    assert (user.client.retry.timeout_s, user.client.retry.max_retries, user.turn_timeout_s) == (20.0, 1, 45.0)


def test_hung_user_simulator_fails_the_turn_at_the_call_limit(server, task):
    # A server that accepts every request and never answers; the retries alone would allow 101 attempts.
    server.default = text_reply("too late", delay_s=3600)
    retry = RetryPolicy(timeout_s=0.2, max_retries=100, backoff_base_s=0.001)
    result = _play_episode_with_llm_user(task, server.base_url, turn_timeout_s=1.0, retry=retry)
    assert result.status == "failed" and result.termination_reason == "timeout"
    assert "user simulator produced no turn within 1 s (TAU2_USER_CALL_TIMEOUT_S)" in result.failure
    assert 1 <= len(server.requests) < 101

    # A Retry-After past the call limit: the turn still ends at the limit, with no second request.
    server.default = None
    server.requests.clear()
    server.enqueue(error_reply(503, retry_after=3600), text_reply("too late"))
    retry = RetryPolicy(backoff_base_s=0.001, backoff_max_s=7200)
    result = _play_episode_with_llm_user(task, server.base_url, turn_timeout_s=1.0, retry=retry)
    assert result.termination_reason == "timeout" and "TAU2_USER_CALL_TIMEOUT_S" in result.failure
    assert len(server.requests) == 1 and server.pending == 1


def test_config_from_env_and_secrets(monkeypatch):
    default = config_from(monkeypatch, {})
    assert default.kind == "scripted" and default.temperature == 0.0 and default.api_key is None

    env = {
        "TAU2_USER_KIND": "llm",
        "TAU2_USER_MODEL": "Qwen3-4B-Instruct-2507",
        "TAU2_USER_BASE_URL": "http://127.0.0.1:30001/v1",
        "OPENAI_API_KEY": SECRET,
        "TAU2_USER_TEMPERATURE": "0.7",
        "TAU2_USER_TIMEOUT_S": "30",
        "TAU2_USER_MAX_RETRIES": "2",
        "TAU2_USER_EXTRA_ARGS": '{"max_tokens": 512}',
    }
    config = config_from(monkeypatch, env)
    assert config.kind == "llm" and config.model == "Qwen3-4B-Instruct-2507"
    assert config.base_url == "http://127.0.0.1:30001/v1"
    assert (config.temperature, config.timeout_s, config.max_retries) == (0.7, 30.0, 2)
    assert config.extra_args == {"max_tokens": 512}
    assert config.secret() == SECRET
    public = config.public_dict()
    assert public["api_key_set"] is True and "api_key" not in public
    for text in (str(public), repr(config), str(config), config.model_dump_json(), str(config.model_dump())):
        assert SECRET not in text

    assert config_from(monkeypatch, {**env, "TAU2_USER_API_KEY": "sk-explicit"}).secret() == "sk-explicit"
    gemini = config_from(
        monkeypatch, {"TAU2_USER_KIND": "gemini", "TAU2_USER_MODEL": "gemini-2.5-flash", "GEMINI_API_KEY": SECRET}
    )
    assert gemini.secret() == SECRET and gemini.base_url is None
    bare = {"TAU2_USER_KIND": "llm", "TAU2_USER_MODEL": "m", "TAU2_USER_BASE_URL": "u"}
    assert config_from(monkeypatch, bare).api_key is None
    # Keyword arguments win over the variables (the evaluator's --user-* flags).
    assert UserSimConfig(kind="scripted").kind == "scripted" and UserSimConfig(temperature=0.3).model == "m"


@pytest.mark.parametrize(
    ("override", "variable"),
    [
        ({"TAU2_USER_KIND": "robot"}, "TAU2_USER_KIND"),
        ({"TAU2_USER_MODEL": ""}, "TAU2_USER_MODEL"),
        ({"TAU2_USER_BASE_URL": ""}, "TAU2_USER_BASE_URL"),
        ({"TAU2_USER_TEMPERATURE": "warm"}, "TAU2_USER_TEMPERATURE"),
        ({"TAU2_USER_TEMPERATURE": "-1"}, "TAU2_USER_TEMPERATURE"),
        ({"TAU2_USER_TIMEOUT_S": "0"}, "TAU2_USER_TIMEOUT_S"),
        ({"TAU2_USER_MAX_RETRIES": "2.5"}, "TAU2_USER_MAX_RETRIES"),
        ({"TAU2_USER_MAX_RETRIES": "-1"}, "TAU2_USER_MAX_RETRIES"),
        ({"TAU2_USER_CALL_TIMEOUT_S": "0"}, "TAU2_USER_CALL_TIMEOUT_S"),
        ({"TAU2_USER_CALL_TIMEOUT_S": "soon"}, "TAU2_USER_CALL_TIMEOUT_S"),
        ({"TAU2_USER_EXTRA_ARGS": "[1]"}, "TAU2_USER_EXTRA_ARGS"),
        ({"TAU2_USER_EXTRA_ARGS": "{bad"}, "TAU2_USER_EXTRA_ARGS"),
    ],
)
def test_config_bad_values_name_the_variable(override, variable, monkeypatch):
    env = {
        "TAU2_USER_KIND": "llm",
        "TAU2_USER_MODEL": "m",
        "TAU2_USER_BASE_URL": "http://h/v1",
        "OPENAI_API_KEY": SECRET,
    }
    with pytest.raises(ValueError, match=variable) as info:
        config_from(monkeypatch, {**env, **override})
    assert SECRET not in str(info.value)


def test_build_user_kinds_and_client_reuse(task, env):
    tools = env.get_user_tools()
    cache: dict = {}
    assert build_user(UserSimConfig(kind="solo"), task, tools, cache) is None
    scripted = build_user(UserSimConfig(kind="scripted"), task, tools, cache)
    assert isinstance(scripted, ScriptedUser) and isinstance(scripted, EpisodeUser)
    assert cache == {}

    config = UserSimConfig(kind="llm", model="m", base_url="http://127.0.0.1:9/v1", api_key=SECRET, temperature=0.3)
    first = build_user(config, task, tools, cache)
    second = build_user(config, task, tools, cache)
    assert isinstance(first, LLMUser) and isinstance(first, EpisodeUser)
    assert first is not second and first.client is second.client  # one client per config, one user per episode
    assert first.params == {"temperature": 0.3}
    assert len(cache) == 1 and SECRET not in str(cache)
    other = build_user(config.model_copy(update={"model": "other"}), task, tools, cache)
    assert other.client is not first.client and len(cache) == 2
    assert get_user_client(config, cache) is first.client
    asyncio.run(close_user_clients(cache))
    assert cache == {}


def test_scripted_user_kind_replies_without_a_server(task):
    user = build_user(UserSimConfig(kind="scripted"), task, None)

    async def talk():
        return await user.respond(greeting())

    reply = asyncio.run(talk())
    assert reply.latency_s == 0.0 and reply.prompt_tokens == reply.completion_tokens == 0
    assert "555-123-2002" in reply.message.content


def test_respond_rejects_user_messages(task):
    client = OpenAIChatClient("http://127.0.0.1:9/v1", "m")
    user = LLMUser(task, None, client)
    with pytest.raises(TypeError):
        asyncio.run(user.respond(UserMessage(role="user", content="hi")))


def test_gemini_user_through_build_user(server, task, env):
    pytest.importorskip("google.genai")
    tools = env.get_user_tools()
    server.enqueue(tool_call_reply("toggle_airplane_mode", {}), text_reply("Still no data."))
    config = UserSimConfig(kind="gemini", model="gemini-2.5-flash", base_url=server.root_url, api_key=SECRET)
    cache: dict = {}
    user = build_user(config, task, tools, cache)

    async def talk():
        try:
            first = await user.respond(greeting())
            second = await user.respond(env.get_response(first.message.tool_calls[0]))
            return first, second
        finally:
            await close_user_clients(cache)

    first, second = asyncio.run(talk())
    assert first.message.tool_calls[0].name == "toggle_airplane_mode"
    assert first.message.tool_calls[0].requestor == "user"
    assert second.message.content == "Still no data."
    body = server.requests[0].body
    prompt = UserSimulator(tools=tools, instructions=str(task.user_scenario)).system_prompt
    assert body["systemInstruction"]["parts"] == [{"text": prompt}]
    assert len(body["tools"][0]["functionDeclarations"]) == 30
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}
    later = server.requests[1].body["contents"]
    assert [c["role"] for c in later] == ["user", "model", "user"]
    assert later[2]["parts"][0]["functionResponse"]["name"] == "toggle_airplane_mode"
    assert server.requests[0].headers["x-goog-api-key"] == SECRET
