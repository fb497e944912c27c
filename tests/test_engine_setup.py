"""Episode set-up shortcuts: the first prompt's cached prefix, database copies, the environment built on first need,
and where CPU work runs. Each shortcut is checked against doing the work in full."""

from __future__ import annotations

import asyncio
import copy
import gc
import threading

import pytest

from rollout import engine
from rollout.clients.policy import build_policy_client
from rollout.clients.retry import RetryPolicy
from rollout.engine import EpisodeConfig, TokenAgent, prepare_episode, run_episode, task_view
from rollout.token_record import ChatRenderer
from tests.engine_helpers import gold_script_texts, opening_of, script_responder, verify_record
from tests.scripted_policy_server import ScriptedPolicyServer

FAST_RETRY = RetryPolicy(max_retries=1, backoff_base_s=0.01, backoff_max_s=0.02, timeout_s=5.0)


def _full_ids(renderer: ChatRenderer, messages):
    return renderer.encode(renderer.render(messages, add_generation_prompt=True))


def test_prompt_prefix_shortcut_gives_the_full_encoding(tok, train_tasks):
    env = engine.build_environment("telecom", train_tasks[0], False)
    view = task_view(train_tasks[0], env, EpisodeConfig())
    renderer = ChatRenderer(tok, view.tools)
    opening = [{"role": "system", "content": view.system_prompt}, *view.opening]
    firsts = [
        "Hi, my phone has no signal.",
        "  leading spaces and a trailing newline\n",
        'Quotes " and <tags> and unicode: é 漢字 🙂',
        "",
    ]
    for text in firsts * 2:  # the second round takes the cached prefix
        messages = [*opening, {"role": "user", "content": text}]
        assert renderer.prompt_ids(messages) == _full_ids(renderer, messages), text
    digests = [key for key in ChatRenderer._PREFIXES if key[0] == id(tok)]
    assert digests and all(ChatRenderer._PREFIXES[key] is not None for key in digests)


def test_prompt_prefix_shortcut_refuses_a_template_where_it_would_differ(tok):
    # This template writes user turns differently when tools are given: the tail rendered without tools differs.
    odd = copy.copy(tok)
    odd.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}{% if tools and m['role'] == 'user' %}[t]{% endif %}\n"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}]
    renderer = ChatRenderer(odd, tools)
    opening = [{"role": "system", "content": "policy"}, {"role": "assistant", "content": "Hi! How can I help?"}]
    for text in ("first", "second", "first"):
        messages = [*opening, {"role": "user", "content": text}]
        assert renderer.prompt_ids(messages) == _full_ids(renderer, messages)
    entries = [value for key, value in ChatRenderer._PREFIXES.items() if key[0] == id(odd)]
    assert entries == [None]  # checked once, then always the full path


def test_database_copies_are_equal_and_independent(train_tasks):
    constructor = engine.fast_env_constructor("telecom")
    first, second = constructor(), constructor()
    assert first.tools.db.model_dump(mode="json") == second.tools.db.model_dump(mode="json")
    assert first.tools.db is not second.tools.db
    customer = first.tools.db.customers[0]
    customer.full_name = "Changed In One Copy"
    assert second.tools.db.customers[0].full_name != "Changed In One Copy"
    assert constructor().tools.db.customers[0].full_name != "Changed In One Copy"


def test_environments_share_one_policy_text_equal_to_tau2s(train_tasks):
    from tau2.domains.telecom.environment import get_environment

    constructor = engine.fast_env_constructor("telecom")
    first, second, solo = constructor(), constructor(), constructor(solo_mode=True)
    assert first.policy is second.policy  # one string, not ~86 KB per environment
    assert first.policy == get_environment().policy  # tau2's own text
    assert solo.policy == get_environment(solo_mode=True).policy != first.policy


def test_database_copier_falls_back_to_deep_copy_when_pickling_fails():
    class Unpicklable:
        def __init__(self) -> None:
            self.lock = threading.Lock()  # pickle refuses locks

        def model_dump(self, mode: str) -> dict:
            return {}

        def model_copy(self, deep: bool) -> Unpicklable:
            return Unpicklable()

    original = Unpicklable()
    copier = engine._DatabaseCopier(original)
    assert copier.blob is None
    made = copier.copy()
    assert isinstance(made, Unpicklable) and made is not original


def _run(tok, url, task, *, user=None, solo=False):
    from rollout.scripted import ScriptedUser

    async def play():
        config = EpisodeConfig(solo_mode=solo)
        setup = await prepare_episode(task, config)
        policy = build_policy_client(url, retry=FAST_RETRY)
        agent = TokenAgent(policy, tok, setup.view, {"temperature": 1.0}, max_response_tokens=8192)
        try:
            player = user if user is not None else (None if solo else ScriptedUser(task))
            return await run_episode(task, agent, player, config, env=setup.env), setup, agent
        finally:
            await policy.aclose()

    return asyncio.run(play())


@pytest.mark.parametrize("solo", [False, True], ids=["dual", "solo"])
def test_environment_built_on_first_need_gives_the_same_verdict(tok, train_tasks, solo):
    task = next(t for t in train_tasks if (t.ticket is not None or not solo) and len(gold_script_texts(t, solo)) > 1)
    responder = script_responder(gold_script_texts(task, solo), solo)
    with ScriptedPolicyServer(tok, responder) as url:
        _run(tok, url, task, solo=solo)  # the domain's view is cached after this one
        result, setup, agent = _run(tok, url, task, solo=solo)
    assert setup.env is None  # built inside run_episode, after the first LLM reply
    assert result.status == "completed" and result.reward == 1.0, result.failure
    verify_record(result.record, agent.renderer, opening_of(setup.view), result.agent_messages)


def test_no_environment_is_built_when_the_user_fails_first(tok, train_tasks, monkeypatch):
    from rollout.user_sim import UserSimulatorError

    class BrokenUser:
        async def respond(self, incoming):
            raise UserSimulatorError("user simulator endpoint returned 503 after 6 attempts")

    with ScriptedPolicyServer(tok, lambda p, q: "Hello") as url:
        _run(tok, url, train_tasks[0], user=BrokenUser())  # caches the domain view
        built = []
        original = engine.build_environment
        monkeypatch.setattr(engine, "build_environment", lambda *a: built.append(a) or original(*a))
        result, setup, _ = _run(tok, url, train_tasks[0], user=BrokenUser())
    assert result.status == "failed" and "UserSimulatorError" in result.failure
    assert setup.env is None and built == []


def test_environment_build_failure_fails_only_that_episode(tok, train_tasks, monkeypatch):
    responder = script_responder(gold_script_texts(train_tasks[0], False), False)
    with ScriptedPolicyServer(tok, responder) as url:
        _run(tok, url, train_tasks[0])

        def broken(*args):
            raise RuntimeError("initialization action failed: no such line")

        monkeypatch.setattr(engine, "build_environment", broken)
        result, _, _ = _run(tok, url, train_tasks[0])
    assert result.status == "failed" and result.termination_reason == "infra_error"
    assert "initialization action failed" in result.failure


def test_cpu_work_runs_on_the_loop_by_default_and_in_threads_when_asked(monkeypatch):
    async def where() -> str:
        return await engine.run_cpu(lambda: threading.current_thread().name)

    monkeypatch.setattr(engine, "_CPU_POOL", None)
    monkeypatch.setattr(engine, "_CPU_SETUP_DONE", False)
    monkeypatch.delenv("TAU2_CPU_WORKERS", raising=False)
    monkeypatch.setenv("TAU2_GC_GEN0_THRESHOLD", "25000")
    threshold = gc.get_threshold()
    try:
        assert asyncio.run(where()) == threading.main_thread().name
        assert gc.get_threshold()[0] >= 25000
        engine.set_cpu_workers(2)
        assert asyncio.run(where()).startswith("tau2-cpu")
        engine.set_cpu_workers(0)
        assert asyncio.run(where()) == threading.main_thread().name
        monkeypatch.setattr(engine, "_CPU_SETUP_DONE", False)
        monkeypatch.setenv("TAU2_CPU_WORKERS", "1")
        assert asyncio.run(where()).startswith("tau2-cpu")
    finally:
        engine.set_cpu_workers(0)
        gc.set_threshold(*threshold)
