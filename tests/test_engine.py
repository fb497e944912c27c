"""The episode engine against a scripted policy server (sglang and OpenAI wire formats) with a real tokenizer.

Every episode's token record is checked against the chat template (rollout.token_record.verify_record).
"""

from __future__ import annotations

import asyncio
import json

import pytest

from rollout.clients.policy import build_policy_client
from rollout.clients.retry import RetryPolicy
from rollout.engine import EpisodeConfig, TokenAgent, prepare_episode, run_episode
from rollout.tool_format import format_tool_call
from tests.engine_helpers import gold_script_texts, opening_of, script_responder, verify_record
from tests.scripted_policy_server import Fault, ScriptedPolicyServer, fake_logprob

FAST_RETRY = RetryPolicy(max_retries=2, backoff_base_s=0.01, backoff_max_s=0.02, timeout_s=5.0)


def _task_with(tasks, predicate):
    return next(task for task in tasks if predicate(task))


async def _play(tok, url, task, responder_texts=None, *, solo=False, api="sglang", budget=8192, config=None, user=None):
    from rollout.scripted import ScriptedUser

    config = config or EpisodeConfig(solo_mode=solo)
    setup = await prepare_episode(task, config)
    env, view = setup.env, setup.view
    policy = build_policy_client(url, api=api, retry=FAST_RETRY)
    agent = TokenAgent(policy, tok, view, {"temperature": 1.0, "top_p": 1.0}, max_response_tokens=budget)
    if user is None and not solo:
        user = ScriptedUser(task)
    try:
        result = await run_episode(task, agent, user, config, env=env)
    finally:
        await policy.aclose()
    return result, agent, view


def _check_tokens(result, agent, view):
    assert result.record is not None
    verify_record(result.record, agent.renderer, opening_of(view), result.agent_messages)
    record = result.record
    assert len(record.loss_mask) == record.response_length == len(record.log_probs)
    for span in record.spans:  # masked tokens carry log-prob 0; sampled ones carry the server's
        for i in range(span.start, span.end):
            if span.kind == "glue":
                assert record.loss_mask[i] == 0 and record.log_probs[i] == 0.0
            else:
                assert record.loss_mask[i] == 1
                position = len(record.prompt_ids) + i
                assert record.log_probs[i] == pytest.approx(fake_logprob(position, record.response_ids[i]))


@pytest.mark.parametrize("api", ["sglang", "openai"])
def test_gold_episode_succeeds_and_tokens_match_template(tok, train_tasks, api):
    task = _task_with(train_tasks, lambda t: t.evaluation_criteria.actions and len(t.evaluation_criteria.actions) >= 2)
    texts = gold_script_texts(task, solo_mode=False)
    with ScriptedPolicyServer(tok, script_responder(texts, solo_mode=False)) as url:
        result, agent, view = asyncio.run(_play(tok, url, task, api=api))
    assert result.status == "completed", result.failure
    assert result.termination_reason == "user_stop"
    assert result.reward == 1.0
    _check_tokens(result, agent, view)
    # Each sampled span is exactly the scripted text's ids plus the sampled end-of-turn token.
    sampled = [s for s in result.record.spans if s.kind == "sampled"]
    for span, text in zip(sampled, texts):
        ids = result.record.response_ids[span.start : span.end].tolist()
        assert ids == [*tok.encode(text, add_special_tokens=False), agent.renderer.end_of_turn_id]


def test_solo_mode_gold_episode(tok, train_tasks):
    task = _task_with(train_tasks, lambda t: t.ticket and t.evaluation_criteria.actions)
    texts = gold_script_texts(task, solo_mode=True)
    with ScriptedPolicyServer(tok, script_responder(texts, solo_mode=True)) as url:
        result, agent, view = asyncio.run(_play(tok, url, task, solo=True))
    assert result.status == "completed", result.failure
    assert result.termination_reason == "agent_stop"
    assert result.reward == 1.0
    assert view.opening == [] and "done" in [tool["function"]["name"] for tool in view.tools]
    assert not any(m["role"] == "user" for m in result.agent_messages)
    _check_tokens(result, agent, view)


def test_tool_errors_are_observed_and_counted(tok, train_tasks):
    task = train_tasks[0]
    bad_args = format_tool_call("get_customer_by_phone", {"phone": 5})  # wrong argument name
    unknown = format_tool_call("launch_rocket", {})
    texts = [bad_args, unknown]
    config = EpisodeConfig(max_errors=2)
    with ScriptedPolicyServer(tok, script_responder(texts, solo_mode=False)) as url:
        result, agent, view = asyncio.run(_play(tok, url, task, config=config))
    assert result.termination_reason == "too_many_errors"
    assert result.status == "truncated"
    assert result.tool_errors == 2
    tool_results = [m for m in result.messages if m["role"] == "tool"]
    assert len(tool_results) == 2 and all(m["error"] for m in tool_results)
    seen = [m["content"] for m in result.agent_messages if m["role"] == "tool"]
    assert all(text.startswith("Error") for text in seen)
    _check_tokens(result, agent, view)
    assert result.reward == 0.0 and result.truncated_checks is not None


def test_malformed_tool_call_becomes_error_observation(tok, train_tasks):
    task = _task_with(train_tasks, lambda t: len(t.evaluation_criteria.actions or []) >= 1)
    texts = [
        '<tool_call>\n{"name": "get_customer_by_phone", "arguments": {oops}\n</tool_call>',
        "<tool_call>{",
        *gold_script_texts(task, False),
    ]
    with ScriptedPolicyServer(tok, script_responder(texts, solo_mode=False)) as url:
        result, agent, view = asyncio.run(_play(tok, url, task))
    assert len(result.invalid_turns) == 2
    assert "not valid JSON" in result.invalid_turns[0]["error"]
    assert "not closed" in result.invalid_turns[1]["error"]
    # The malformed turns never reach tau2's trajectory: no tool message was created for them.
    assert all("oops" not in json.dumps(m) for m in result.messages)
    errors_seen = [m for m in result.agent_messages if m["role"] == "tool" and m.get("tool_call_id") == "invalid"]
    assert len(errors_seen) == 2
    _check_tokens(result, agent, view)
    # The gold script after the two bad turns is shifted by two turns, so the episode still ends normally.
    assert result.status in ("completed", "truncated")


def test_token_budget_truncates_without_exceeding_it(tok, train_tasks):
    task = train_tasks[0]
    texts = ["I will check. " * 30, format_tool_call("get_customer_by_phone", {"phone_number": "555-123-2002"})] * 5
    budget = 600
    with ScriptedPolicyServer(tok, script_responder(texts, solo_mode=False)) as url:
        result, agent, view = asyncio.run(_play(tok, url, task, budget=budget))
    assert result.status == "truncated"
    assert result.termination_reason == "max_tokens"
    assert 0 < result.record.response_length <= budget
    _check_tokens(result, agent, view)
    assert result.reward == 0.0
    assert result.truncated_checks is not None  # partial credit is still computed for truncated episodes


def test_abort_reported_by_server(tok, train_tasks):
    with ScriptedPolicyServer(tok, lambda prompt, params: Fault(abort=True, text="partial")) as url:
        result, _, _ = asyncio.run(_play(tok, url, train_tasks[0]))
    assert result.status == "aborted"
    assert result.reward is None or result.reward == 0.0


def test_server_errors_are_retried_then_fail_cleanly(tok, train_tasks):
    task = _task_with(train_tasks, lambda t: len(t.evaluation_criteria.actions or []) >= 1)
    texts = gold_script_texts(task, False)
    calls = {"n": 0}
    base = script_responder(texts, solo_mode=False)

    def flaky(prompt, params):
        calls["n"] += 1
        return Fault(status=500) if calls["n"] <= 2 else base(prompt, params)

    with ScriptedPolicyServer(tok, flaky) as url:
        result, agent, view = asyncio.run(_play(tok, url, task))
    assert result.status == "completed" and result.reward == 1.0
    with ScriptedPolicyServer(tok, lambda p, q: Fault(status=503)) as url:
        result, _, _ = asyncio.run(_play(tok, url, task))
    assert result.status == "failed" and result.termination_reason == "infra_error"
    assert "503" in result.failure


def test_policy_timeout_fails_episode(tok, train_tasks):
    slow_retry = RetryPolicy(max_retries=1, backoff_base_s=0.01, timeout_s=0.3)

    async def play(url):
        config = EpisodeConfig()
        setup = await prepare_episode(train_tasks[0], config)
        env, view = setup.env, setup.view
        policy = build_policy_client(url, retry=slow_retry)
        from rollout.scripted import ScriptedUser

        agent = TokenAgent(policy, tok, view, {}, max_response_tokens=4096)
        try:
            return await run_episode(train_tasks[0], agent, ScriptedUser(train_tasks[0]), config, env=env)
        finally:
            await policy.aclose()

    # The reply never comes while the test runs: only the client's timeout can end the request.
    with ScriptedPolicyServer(tok, lambda p, q: Fault(delay_s=3600, text="late")) as url:
        result = asyncio.run(play(url))
    assert result.status == "failed" and "TimeoutError" in result.failure


def test_user_simulator_failure_fails_episode(tok, train_tasks):
    from rollout.user_sim import UserSimulatorError

    class BrokenUser:
        async def respond(self, incoming):
            raise UserSimulatorError("user simulator endpoint returned 503 after 6 attempts")

    with ScriptedPolicyServer(tok, lambda p, q: "Hello") as url:
        result, _, _ = asyncio.run(_play(tok, url, train_tasks[0], user=BrokenUser()))
    assert result.status == "failed"
    assert "UserSimulatorError" in result.failure
    assert result.record is None  # the policy never got a turn


def test_max_turns_cap(tok, train_tasks):
    config = EpisodeConfig(max_turns=3)
    with ScriptedPolicyServer(tok, lambda p, q: "Could you restart your phone?") as url:
        result, agent, view = asyncio.run(_play(tok, url, train_tasks[0], config=config))
    assert result.termination_reason == "max_turns" and result.turns == 3
    _check_tokens(result, agent, view)


def test_parallel_calls_over_the_per_turn_cap_are_an_invalid_turn(tok, train_tasks):
    two_calls = "\n".join([format_tool_call("get_customer_by_phone", {"phone_number": "555-123-2002"})] * 2)
    config = EpisodeConfig(max_tool_calls_per_turn=1, max_turns=2)

    async def play(url):
        from rollout.scripted import ScriptedUser

        setup = await prepare_episode(train_tasks[0], config)

        env, view = setup.env, setup.view
        policy = build_policy_client(url, retry=FAST_RETRY)
        agent = TokenAgent(policy, tok, view, {}, max_response_tokens=4096, max_tool_calls_per_turn=1)
        try:
            return await run_episode(train_tasks[0], agent, ScriptedUser(train_tasks[0]), config, env=env), agent, view
        finally:
            await policy.aclose()

    with ScriptedPolicyServer(tok, lambda p, q: two_calls) as url:
        result, agent, view = asyncio.run(play(url))
    assert len(result.invalid_turns) == 2
    assert "2 tool calls in one turn; at most 1 allowed" in result.invalid_turns[0]["error"]
    assert not any(m["role"] == "tool" for m in result.messages)  # nothing was executed
    _check_tokens(result, agent, view)
