"""The engine plays tasks exactly as tau2's own Orchestrator does.

The same scripted agent (gold actions) and scripted user run through tau2's Orchestrator (rollout.scripted.
run_tau2_orchestrator) and through the async engine, where the agent is a policy server replaying the script as
tokens of a real tokenizer. Trajectories, termination reasons and tau2's RewardInfo must agree, for every telecom
train and test task, in dual-control and solo mode, and when max_steps cuts the episode short.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from rollout.clients.policy import build_policy_client
from rollout.engine import EpisodeConfig, TokenAgent, prepare_episode, run_episode
from rollout.scripted import ScriptedUser, solo_supported
from rollout.task_store import get_task_store
from tests.engine_helpers import gold_script_texts, opening_of, real_tokenizer, script_responder, verify_record
from tests.scripted_policy_server import ScriptedPolicyServer
from tests.tau2_reference import run_tau2_orchestrator


class SwitchableResponder:
    """One server for many sequential episodes: the test swaps in each task's script."""

    def __init__(self) -> None:
        self.respond = None

    def __call__(self, prompt_text: str, params: dict[str, Any]) -> str:
        assert self.respond is not None
        return self.respond(prompt_text, params)


@pytest.fixture(scope="module")
def server():
    tok = real_tokenizer()
    responder = SwitchableResponder()
    srv = ScriptedPolicyServer(tok, responder)
    url = srv.start()
    yield tok, url, responder
    srv.stop()


def _essence(messages: list[Any]) -> list[tuple]:
    """What the two runs must agree on: who said what, which tools with which arguments, which results."""
    out = []
    for m in messages:
        m = m if isinstance(m, dict) else m.model_dump(mode="json")
        calls = tuple(
            (c["name"], tuple(sorted(c["arguments"].items())), c["requestor"]) for c in m.get("tool_calls") or []
        )
        out.append((m["role"], m.get("content"), calls, m.get("error", False) if m["role"] == "tool" else None))
    return out


def _reward_essence(info: Any) -> tuple:
    info = info if isinstance(info, dict) else info.model_dump(mode="json")
    env = tuple(bool(a["met"]) for a in info.get("env_assertions") or [])
    actions = tuple(bool(a["action_match"]) for a in info.get("action_checks") or [])
    return (info["reward"], env, actions, (info.get("db_check") or {}).get("db_match"))


def _run_engine(tok, url, responder, task, solo_mode: bool, max_steps: int):
    texts = gold_script_texts(task, solo_mode)
    responder.respond = script_responder(texts, solo_mode)

    async def play():
        config = EpisodeConfig(solo_mode=solo_mode, max_steps=max_steps)
        setup = await prepare_episode(task, config)
        env, view = setup.env, setup.view
        policy = build_policy_client(url)
        agent = TokenAgent(policy, tok, view, {"temperature": 1.0}, max_response_tokens=32768)
        user = None if solo_mode else ScriptedUser(task)
        try:
            result = await run_episode(task, agent, user, config, env=env)
        finally:
            await policy.aclose()
        verify_record(result.record, agent.renderer, opening_of(view), result.agent_messages)
        return result

    return asyncio.run(play())


def _compare(tok, url, responder, task, solo_mode: bool, max_steps: int = 100) -> None:
    reference = run_tau2_orchestrator(task, solo_mode=solo_mode, max_steps=max_steps)
    result = _run_engine(tok, url, responder, task, solo_mode, max_steps)
    assert result.status != "failed", result.failure
    assert result.termination_reason == reference.termination_reason.value, task.id
    assert _essence(result.messages) == _essence(reference.messages), task.id
    assert _reward_essence(result.reward_info) == _reward_essence(reference.reward_info), task.id


def _all_tasks():
    store = get_task_store()
    return store.tasks("telecom", "train") + store.tasks("telecom", "test")


def test_dual_control_matches_tau2_for_every_train_and_test_task(server):
    tok, url, responder = server
    tasks = _all_tasks()
    assert len(tasks) == 114
    for task in tasks:
        _compare(tok, url, responder, task, solo_mode=False)


def test_solo_mode_matches_tau2(server):
    tok, url, responder = server
    tasks = [t for t in _all_tasks() if solo_supported(t)]
    assert tasks, "telecom has solo-capable tasks"
    for task in tasks[::3]:
        _compare(tok, url, responder, task, solo_mode=True)


@pytest.mark.parametrize("max_steps", [3, 6, 9])
def test_max_steps_cut_matches_tau2(server, max_steps):
    tok, url, responder = server
    for task in _all_tasks()[:12]:
        _compare(tok, url, responder, task, solo_mode=False, max_steps=max_steps)
