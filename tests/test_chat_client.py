"""rollout.clients.chat against a local server speaking the OpenAI (and Gemini) wire format."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import socket
import sys

import pytest

from rollout.clients import retry as retry_module
from rollout.clients.chat import (
    ChatClientError,
    GeminiChatClient,
    OpenAIChatClient,
    build_chat_client,
    clean_messages,
    gemini_tool_config,
    openai_messages_to_gemini,
    openai_tools_to_gemini,
    parse_arguments,
)
from rollout.clients.retry import RetryPolicy, parse_retry_after
from tests.fake_openai_server import FakeOpenAIServer, FakeReply, RequestGate, error_reply, text_reply

SECRET = "sk-test-9f8e7d6c5b4a3f2e1d0c"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi."}]
TOOL = {
    "type": "function",
    "function": {
        "name": "set_network_mode_preference",
        "description": "Changes the preferred network.",
        "parameters": {
            "$defs": {"Mode": {"enum": ["4g_5g_preferred", "2g_only"], "title": "Mode", "type": "string"}},
            "properties": {"mode": {"anyOf": [{"$ref": "#/$defs/Mode"}, {"type": "string"}], "title": "Mode"}},
            "required": ["mode"],
            "title": "parameters",
            "type": "object",
        },
    },
}


@pytest.fixture
def server():
    with FakeOpenAIServer() as srv:
        yield srv


def fast_retry(kw: dict) -> RetryPolicy:
    """A quick retry policy from the retry fields in kw (taken out of it)."""
    chosen = {key: kw.pop(key) for key in list(kw) if key in RetryPolicy.model_fields}
    return RetryPolicy(**{"backoff_base_s": 0.001, "backoff_max_s": 0.01, "timeout_s": 5.0, **chosen})


def fast_client(srv: FakeOpenAIServer, **kw) -> OpenAIChatClient:
    return OpenAIChatClient(srv.base_url, "fake-model", retry=fast_retry(kw), **kw)


def run(client, coro_factory):
    """Run one coroutine against a client on a fresh loop, closing the client's session afterwards."""

    async def main():
        try:
            return await coro_factory()
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_text_completion_and_request_format(server):
    server.enqueue(text_reply("Hi!", prompt_tokens=12, completion_tokens=3))
    client = fast_client(server, api_key=SECRET, extra_body={"seed": 7})
    result = run(client, lambda: client.complete(MESSAGES, temperature=0.0, max_tokens=64))
    assert result.content == "Hi!" and result.tool_calls == []
    assert result.finish_reason == "stop"
    assert (result.prompt_tokens, result.completion_tokens, result.attempts) == (12, 3, 1)
    assert result.latency_s > 0
    [request] = server.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["Authorization"] == f"Bearer {SECRET}"
    assert request.body == {
        "model": "fake-model",
        "messages": MESSAGES,
        "seed": 7,
        "temperature": 0.0,
        "max_tokens": 64,
    }


def test_tools_and_tool_choice_are_sent_only_with_tools(server):
    server.enqueue(text_reply("a"), text_reply("b"))
    client = fast_client(server)

    async def both():
        await client.complete(MESSAGES, tools=[TOOL], tool_choice="auto")
        await client.complete(MESSAGES, tools=None, tool_choice="auto")

    run(client, both)
    first, second = (r.body for r in server.requests)
    assert first["tools"] == [TOOL] and first["tool_choice"] == "auto"
    assert "tools" not in second and "tool_choice" not in second
    assert "Authorization" not in server.requests[0].headers  # no key, no header


def test_tool_call_parsing(server):
    calls = [
        {"id": "call_a", "name": "set_network_mode_preference", "arguments": {"mode": "4g_5g_preferred"}},
        {"id": "call_b", "name": "toggle_airplane_mode", "arguments": ""},
        {"id": "call_c", "name": "toggle_data", "arguments": "{not json"},
        {"name": "reboot_device", "arguments": "[1, 2]"},
    ]
    server.enqueue(FakeReply(tool_calls=calls))
    client = fast_client(server)
    result = run(client, lambda: client.complete(MESSAGES, tools=[TOOL], tool_choice="auto"))
    assert result.content is None and result.finish_reason == "tool_calls"
    a, b, c, d = result.tool_calls
    assert (a.id, a.name, a.arguments, a.raw_arguments) == (
        "call_a",
        "set_network_mode_preference",
        {"mode": "4g_5g_preferred"},
        None,
    )
    assert (b.id, b.arguments, b.raw_arguments) == ("call_b", {}, None)
    assert (c.arguments, c.raw_arguments) == ({}, "{not json")
    assert (d.arguments, d.raw_arguments) == ({}, "[1, 2]")
    assert d.id.startswith("call_fake_")


def test_parse_arguments():
    assert parse_arguments('{"a": 1}') == ({"a": 1}, None)
    assert parse_arguments({"a": 1}) == ({"a": 1}, None)
    assert parse_arguments(None) == ({}, None)
    assert parse_arguments("  ") == ({}, None)
    assert parse_arguments('"text"') == ({}, '"text"')


def test_retries_on_429_500_and_timeout(server):
    server.enqueue(
        error_reply(429),
        error_reply(500),
        error_reply(503),
        text_reply("never sent", delay_s=3600),  # a server that hangs: only the request timeout ends this attempt
        text_reply("finally"),
    )
    client = fast_client(server, timeout_s=0.3, max_retries=6)
    result = run(client, lambda: client.complete(MESSAGES))
    assert result.content == "finally"
    assert result.attempts == 5
    assert len(server.requests) == 5


def test_malformed_200_is_retried(server):
    server.enqueue(FakeReply(body="<html>bad gateway</html>"), FakeReply(body={"choices": []}), text_reply("ok"))
    client = fast_client(server)
    result = run(client, lambda: client.complete(MESSAGES))
    assert result.content == "ok" and result.attempts == 3


def _record_sleeps(monkeypatch) -> list[float]:
    """The delays the client sleeps (still slept for real): what it waited, not how long the machine took."""
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float, *args, **kw):
        slept.append(delay)
        return await real_sleep(delay, *args, **kw)

    monkeypatch.setattr(retry_module.asyncio, "sleep", sleep)
    return slept


def test_retry_after_is_honoured(server, monkeypatch):
    server.enqueue(error_reply(429, retry_after=0.6), text_reply("ok"))
    client = fast_client(server, backoff_max_s=5.0)
    slept = _record_sleeps(monkeypatch)
    result = run(client, lambda: client.complete(MESSAGES))
    assert result.content == "ok" and result.attempts == 2
    assert 0.6 in slept  # the server's Retry-After, not the client's own 1-10 ms backoff
    assert all(delay < 0.05 for delay in slept if delay != 0.6)


def test_backoff_is_exponential_with_jitter_and_capped():
    policy = RetryPolicy(backoff_base_s=0.5, backoff_max_s=60.0)
    for failures, full in [(1, 0.5), (2, 1.0), (3, 2.0), (6, 16.0)]:
        delays = [policy.delay(failures) for _ in range(200)]
        assert all(full / 2 <= d <= full for d in delays)
        assert max(delays) - min(delays) > 0  # jittered
    capped = RetryPolicy(backoff_base_s=0.5, backoff_max_s=3.0)
    assert all(capped.delay(20) <= 3.0 for _ in range(50))
    assert policy.delay(1, retry_after=7.0) == 7.0
    assert RetryPolicy(backoff_max_s=5.0).delay(1, retry_after=700.0) == 5.0


def test_parse_retry_after(monkeypatch):
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.25") == 0.25
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    now = 1445412450.0  # 07:27:30 GMT on the day below: a fixed clock, so the answer is exact
    monkeypatch.setattr(retry_module.time, "time", lambda: now)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 30.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT") == 0.0  # a date in the past: retry now


def test_400_is_not_retried(server):
    server.enqueue(error_reply(400, "bad request: unknown field"), text_reply("never"))
    client = fast_client(server)
    with pytest.raises(ChatClientError) as info:
        run(client, lambda: client.complete(MESSAGES))
    assert info.value.status == 400
    assert "unknown field" in str(info.value)
    assert len(server.requests) == 1 and server.pending == 1


def test_retries_exhausted(server):
    server.enqueue(*[error_reply(503, "overloaded") for _ in range(3)])
    client = fast_client(server, max_retries=2)
    with pytest.raises(ChatClientError, match="after 3 attempts") as info:
        run(client, lambda: client.complete(MESSAGES))
    assert info.value.status == 503
    assert len(server.requests) == 3


def test_connection_errors_are_retried_then_fail():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = OpenAIChatClient(
        f"http://127.0.0.1:{port}/v1", "m", retry=RetryPolicy(max_retries=2, backoff_base_s=0.001)
    )
    with pytest.raises(ChatClientError, match="after 3 attempts"):
        run(client, lambda: client.complete(MESSAGES))


def test_api_key_never_in_errors_or_logs(server, caplog):
    leak = f"Incorrect API key provided: {SECRET}"
    server.enqueue(error_reply(500, leak), error_reply(500, leak), error_reply(401, leak))
    client = fast_client(server, api_key=SECRET, max_retries=5)
    with caplog.at_level(logging.DEBUG), pytest.raises(ChatClientError) as info:
        run(client, lambda: client.complete(MESSAGES))
    assert info.value.status == 401
    assert "Incorrect API key provided" in str(info.value)
    assert SECRET not in str(info.value)
    retry_logs = [r.getMessage() for r in caplog.records if r.name == "rollout.clients.retry"]
    assert len(retry_logs) == 2 and all("Incorrect API key" in m for m in retry_logs)
    assert all(SECRET not in m for m in retry_logs)
    assert SECRET not in repr(client)

    server.enqueue(*[error_reply(502, leak) for _ in range(2)])
    exhausted = fast_client(server, api_key=SECRET, max_retries=1)
    with pytest.raises(ChatClientError) as info:
        run(exhausted, lambda: exhausted.complete(MESSAGES))
    assert SECRET not in str(info.value)


def test_empty_reply_is_asked_again_then_returned(server):
    server.enqueue(text_reply(""), FakeReply(content=None), text_reply("here"))
    client = fast_client(server)
    result = run(client, lambda: client.complete(MESSAGES))
    assert result.content == "here" and result.attempts == 3 and result.reasks == 2
    assert result.prompt_tokens == 33  # usage of every attempt is counted

    server.enqueue(text_reply("  "), text_reply(""))
    client = fast_client(server, max_reasks=1)
    result = run(client, lambda: client.complete(MESSAGES))
    assert result.is_empty() and result.attempts == 2 and result.reasks == 1
    assert result.problem() == "an empty reply (no text, no tool call)"


def test_broken_tool_call_arguments_are_asked_again_only_on_request(server):
    broken = FakeReply(tool_calls=[{"name": "toggle_data", "arguments": "{oops"}])
    server.enqueue(broken, text_reply("fixed"))
    client = fast_client(server)
    result = run(client, lambda: client.complete(MESSAGES, tools=[TOOL], require_json_arguments=True))
    assert result.content == "fixed" and result.reasks == 1 and len(server.requests) == 2

    server.enqueue(broken)  # without the flag the call comes back for the caller to judge (a teacher agent)
    result = run(client, lambda: client.complete(MESSAGES, tools=[TOOL]))
    assert result.reasks == 0 and result.malformed_calls()[0].raw_arguments == "{oops"
    assert result.problem() is None
    assert "not a JSON object: toggle_data('{oops')" in result.problem(require_json_arguments=True)


def test_many_parallel_calls_are_in_flight_at_once(server):
    n = 40
    server.enqueue(*[text_reply(f"r{i}") for i in range(n)])
    server.gate = RequestGate(n)  # no reply until all n requests wait at the server together
    client = fast_client(server, timeout_s=600.0)

    async def burst():
        return await asyncio.gather(*(client.complete(MESSAGES) for _ in range(n)))

    results = run(client, burst)
    assert sorted(r.content for r in results) == sorted(f"r{i}" for i in range(n))
    assert server.gate.waves == [n] and server.gate.unfilled_waves == 0
    assert all(r.attempts == 1 for r in results)


def test_client_survives_a_new_event_loop(server):
    server.enqueue(text_reply("one"), text_reply("two"))
    client = fast_client(server)
    assert asyncio.run(client.complete(MESSAGES)).content == "one"
    assert run(client, lambda: client.complete(MESSAGES)).content == "two"


def test_clean_messages_gives_openai_wire_form():
    # What tau2's to_litellm_messages produces: tool_calls None on text turns, an extra "name" in each call.
    tau2_style = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "tool_calls": None},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "name": "f", "function": {"name": "f", "arguments": "{}"}, "type": "function"}],
        },
        {"role": "tool", "content": "ok", "tool_call_id": "c1"},
    ]
    assert clean_messages(tau2_style) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {
            "role": "assistant",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        },
        {"role": "tool", "content": "ok", "tool_call_id": "c1"},
    ]
    # Cleaning a clean list keeps every message as it is, the same object: the user simulator's growing request
    # list is cleaned once a message and passed whole to complete() every turn.
    cleaned = clean_messages(tau2_style)
    again = clean_messages(cleaned)
    assert again == cleaned and all(a is b for a, b in zip(again, cleaned))
    # Not clean yet: a dict of arguments, a call with tau2's extra "name", content None beside calls.
    call = {"id": "c2", "type": "function", "function": {"name": "g", "arguments": {"x": 1}}}
    assert clean_messages([{"role": "assistant", "tool_calls": [call]}])[0]["tool_calls"][0]["function"] == {
        "name": "g",
        "arguments": '{"x": 1}',
    }
    named = {**call, "name": "g", "function": {"name": "g", "arguments": "{}"}}
    assert "name" not in clean_messages([{"role": "assistant", "tool_calls": [named]}])[0]["tool_calls"][0]
    wire = {**call, "function": {"name": "g", "arguments": "{}"}}
    assert "content" not in clean_messages([{"role": "assistant", "content": None, "tool_calls": [wire]}])[0]


def test_build_chat_client():
    client = build_chat_client("llm", "m", "http://127.0.0.1:1/v1/", None, retry=RetryPolicy(timeout_s=3.0))
    assert isinstance(client, OpenAIChatClient)
    assert client.url == "http://127.0.0.1:1/v1/chat/completions" and client.retry.timeout_s == 3.0
    with pytest.raises(ValueError, match="base_url"):
        build_chat_client("llm", "m", None, None)
    with pytest.raises(ValueError, match="unknown chat client kind"):
        build_chat_client("claude", "m", None, None)


# ------------------------------------------------------------------------------------------------------- Gemini


def test_openai_messages_to_gemini():
    messages = [
        {"role": "system", "content": "Be a customer."},
        {"role": "user", "content": "Hi! How can I help you today?"},
        {"role": "assistant", "content": "My data is broken."},
        {"role": "user", "content": "Please toggle airplane mode."},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "toggle_airplane_mode", "arguments": "{}"}},
                {"id": "c2", "type": "function", "function": {"name": "check_status_bar", "arguments": '{"a": 1}'}},
            ],
        },
        {"role": "tool", "content": "Airplane mode is now OFF.", "tool_call_id": "c1"},
        {"role": "tool", "content": "Signal: excellent", "tool_call_id": "c2"},
    ]
    system, contents = openai_messages_to_gemini(messages)
    assert system == "Be a customer."
    assert contents == [
        {"role": "user", "parts": [{"text": "Hi! How can I help you today?"}]},
        {"role": "model", "parts": [{"text": "My data is broken."}]},
        {"role": "user", "parts": [{"text": "Please toggle airplane mode."}]},
        {
            "role": "model",
            "parts": [
                {"function_call": {"name": "toggle_airplane_mode", "args": {}}},
                {"function_call": {"name": "check_status_bar", "args": {"a": 1}}},
            ],
        },
        {
            "role": "user",
            "parts": [
                {
                    "function_response": {
                        "name": "toggle_airplane_mode",
                        "response": {"result": "Airplane mode is now OFF."},
                    }
                },
                {"function_response": {"name": "check_status_bar", "response": {"result": "Signal: excellent"}}},
            ],
        },
    ]


def test_openai_tools_to_gemini_inlines_refs():
    [tool] = openai_tools_to_gemini(
        [TOOL, {"type": "function", "function": {"name": "reboot_device", "parameters": {}}}]
    )
    first, second = tool["function_declarations"]
    assert first["name"] == "set_network_mode_preference"
    assert first["parameters_json_schema"] == {
        "properties": {
            "mode": {"anyOf": [{"enum": ["4g_5g_preferred", "2g_only"], "type": "string"}, {"type": "string"}]}
        },
        "required": ["mode"],
        "type": "object",
    }
    assert second == {"name": "reboot_device", "description": ""}
    assert gemini_tool_config("auto") == {"function_calling_config": {"mode": "AUTO"}}
    assert gemini_tool_config("required") == {"function_calling_config": {"mode": "ANY"}}
    assert gemini_tool_config(None) is None
    with pytest.raises(ValueError):
        gemini_tool_config("sometimes")


def gemini_client(srv: FakeOpenAIServer, **kw) -> GeminiChatClient:
    pytest.importorskip("google.genai")
    retry = fast_retry({"backoff_max_s": 2.0, **kw})
    return GeminiChatClient("gemini-2.5-flash", api_key=SECRET, base_url=srv.root_url, retry=retry)


def test_gemini_client_request_and_tool_call(server):
    server.enqueue(
        error_reply(429, retry_after=0.3),
        FakeReply(
            content="Sure.", tool_calls=[{"name": "set_network_mode_preference", "arguments": {"mode": "2g_only"}}]
        ),
    )
    client = gemini_client(server)
    conversation = [*MESSAGES, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "set 2g"}]
    result = run(client, lambda: client.complete(conversation, tools=[TOOL], tool_choice="auto", temperature=0.0))
    assert result.content == "Sure." and result.attempts == 2
    [call] = result.tool_calls
    assert (call.name, call.arguments) == ("set_network_mode_preference", {"mode": "2g_only"})
    assert (result.prompt_tokens, result.completion_tokens) == (11, 7)
    first, second = server.requests
    assert second.received_at - first.received_at >= 0.25  # Retry-After honoured
    assert second.path.endswith("/models/gemini-2.5-flash:generateContent")
    assert second.headers["x-goog-api-key"] == SECRET
    body = second.body
    assert body["systemInstruction"]["parts"] == [{"text": "You are terse."}]
    assert [c["role"] for c in body["contents"]] == ["user", "model", "user"]
    declaration = body["tools"][0]["functionDeclarations"][0]
    assert declaration["name"] == "set_network_mode_preference"
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}
    assert body["generationConfig"]["temperature"] == 0.0


def test_gemini_client_errors(server):
    server.enqueue(error_reply(400, f"API key not valid: {SECRET}"))
    client = gemini_client(server)
    with pytest.raises(ChatClientError) as info:
        run(client, lambda: client.complete(MESSAGES))
    assert info.value.status == 400 and SECRET not in str(info.value)
    assert len(server.requests) == 1

    server.requests.clear()
    server.enqueue(error_reply(500), error_reply(500))
    client = gemini_client(server, max_retries=1)
    with pytest.raises(ChatClientError, match="after 2 attempts"):
        run(client, lambda: client.complete(MESSAGES))
    assert len(server.requests) == 2


def test_gemini_client_needs_the_sdk_and_a_key(monkeypatch):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    if importlib.util.find_spec("google.genai") is not None:
        with pytest.raises(ValueError, match="GEMINI_API_KEY"):
            GeminiChatClient("gemini-2.5-flash")
        monkeypatch.setenv("GEMINI_API_KEY", SECRET)
        assert SECRET not in repr(GeminiChatClient("gemini-2.5-flash"))
    monkeypatch.setitem(sys.modules, "google.genai", None)  # as if the package were not installed
    if "google" in sys.modules:
        monkeypatch.delattr(sys.modules["google"], "genai", raising=False)
    with pytest.raises(ImportError, match="pip install google-genai"):
        GeminiChatClient("gemini-2.5-flash", api_key="k")
