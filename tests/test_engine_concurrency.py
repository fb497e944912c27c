"""Never serialize episodes: 64 concurrent episodes have every LLM call in flight together.

Both doubles (the policy speaking sglang's /generate with the real tokenizer, the user simulator speaking OpenAI chat)
hold each request until all 64 episodes have sent theirs (tests/fake_openai_server.RequestGate), then answer the wave
at once. A harness that played episodes one after another, or blocked the loop while a request was out, could never
fill a wave. The proof is the count of requests in flight together, not a time, so it holds on a loaded machine; how
fast the harness is (loop lag, throughput against the LLM-latency bound) is measured by bench/rollout_harness.py."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from rollout.clients.chat import OpenAIChatClient
from rollout.clients.policy import build_policy_client
from rollout.clients.retry import RetryPolicy
from rollout.engine import EpisodeConfig, TokenAgent, prepare_episode, run_episode
from rollout.task_store import get_task_store
from rollout.user_sim import LLMUser
from tests.engine_helpers import real_tokenizer
from tests.fake_openai_server import FakeOpenAIServer, RequestGate, text_reply
from tests.scripted_policy_server import Fault, ScriptedPolicyServer

TURNS = 3
EPISODES = 64
WAIT_S = 600.0  # clients wait this long for a held wave: a bound on waiting, never reached unless something is broken


@dataclass
class GatedPolicyServer(ScriptedPolicyServer):
    gate: RequestGate | None = None

    async def _reply(self, input_ids: list[int], params: dict[str, Any]) -> str | Fault:
        if self.gate is not None:
            await self.gate.wait()
        return await super()._reply(input_ids, params)


async def _episodes(tok: Any, policy_url: str, user_url: str, count: int) -> list:
    tasks = get_task_store().tasks("telecom", "train")
    config = EpisodeConfig(max_turns=TURNS)
    policy = build_policy_client(policy_url)
    client = OpenAIChatClient(user_url, model="user-sim", retry=RetryPolicy(timeout_s=WAIT_S, max_retries=0))

    async def one(i: int):
        task = tasks[i % len(tasks)]
        setup = await prepare_episode(task, config)
        env, view = setup.env, setup.view
        user = LLMUser(task, setup.user_tools, client)
        agent = TokenAgent(policy, tok, view, {"temperature": 1.0}, max_response_tokens=8192)
        return await run_episode(task, agent, user, config, env=env)

    try:
        return await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        await policy.aclose()
        await client.aclose()


def test_64_concurrent_episodes_have_every_call_in_flight_together():
    tok = real_tokenizer()
    policy_gate, user_gate = RequestGate(EPISODES, limit_s=WAIT_S / 2), RequestGate(EPISODES, limit_s=WAIT_S / 2)
    policy = GatedPolicyServer(tok, lambda prompt, params: "Could you restart your phone?", decode_prompt=False)
    policy.gate = policy_gate
    user = FakeOpenAIServer(default=text_reply("It still says no service."))
    user.gate = user_gate
    policy_url = policy.start()
    try:
        with user:
            results = asyncio.run(_episodes(tok, policy_url, user.base_url, EPISODES))
    finally:
        policy.stop()
    assert all(r.status == "truncated" and r.termination_reason == "max_turns" for r in results), [
        (r.status, r.failure) for r in results if r.status != "truncated"
    ][:3]
    assert all(r.turns == TURNS for r in results)
    # Each episode asks the user TURNS + 1 times (the greeting, then after every agent turn) and the policy TURNS
    # times; every one of those calls was in flight together with the same call of all other episodes.
    assert user_gate.waves == [EPISODES] * (TURNS + 1) and user_gate.unfilled_waves == 0
    assert policy_gate.waves == [EPISODES] * TURNS and policy_gate.unfilled_waves == 0
    assert user.peak_in_flight == EPISODES
