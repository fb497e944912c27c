"""One real-model episode: SkyRL's generator samples SmolLM2-135M-Instruct from the CPU policy server
(scripts/cpu_policy_server.py, vLLM's token-in-token-out /v1/completions) and the tau2 environment plays it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from integrations.skyrl.tests.support import skip_reason

if reason := skip_reason():
    pytest.skip(reason, allow_module_level=True)

from integrations.skyrl.tests.support import make_generator, policy_server_client, session_of, trajectory_id
from integrations.skyrl.tests.test_generator import (
    RecordingTau2Env,
    extras_of,
    opening_of,
    policy_runs,
    recorded_env_id,
)


@pytest.mark.slow
def test_real_model_episode_through_the_cpu_policy_server(tok: Any, test_tasks: list[Any], tmp_path: Any) -> None:
    from examples.prepare_cpu_model import prepare_cpu_model
    from rollout.engine import EpisodeConfig, prepare_episode
    from tests.conftest import running_cpu_server  # the recipe's: starts and stops the CPU policy server

    model_dir = prepare_cpu_model()
    task = test_tasks[0]
    # The compact policy keeps SmolLM2's prompt short (~3k tokens with the tool schemas).
    view = asyncio.run(prepare_episode(task, EpisodeConfig(domain="telecom", policy_variant="compact"))).view
    params = {"max_tokens": 32, "temperature": 0.0, "logprobs": 1}
    RecordingTau2Env.made.clear()

    with running_cpu_server(model_dir, tmp_path / "server.log") as server:
        client = policy_server_client(tok, server.url, model=model_dir.name)
        generator = make_generator(
            tok, client, view.tools, env_configs={recorded_env_id("real"): {"policy_variant": "compact"}}, max_turns=2
        )

        async def episode() -> Any:
            try:
                return await generator.agent_loop(
                    opening_of(view), recorded_env_id("real"), extras_of(task), 32, 7000, params, trajectory_id(task.id)
                )
            finally:
                await client.aclose()

        out = asyncio.run(episode())

    sampled = client.sampled[session_of(task.id)]
    assert 1 <= len(sampled) <= 2
    assert len(out.loss_mask) == len(out.response_ids) == len(out.rollout_logprobs)
    runs = policy_runs(out.loss_mask)
    assert len(runs) == len(sampled)
    newline = tok.encode("\n", add_special_tokens=False)
    for (start, end), (ids, logprobs) in zip(runs, sampled, strict=True):
        assert out.response_ids[start:end] == ids  # the server's sampled ids, verbatim
        assert out.rollout_logprobs[start:end] == logprobs and all(lp <= 0.0 for lp in logprobs)
        if ids[-1] == tok.eos_token_id and end < len(out.response_ids):
            # the policy stopped on <|im_end|> (sampled, trained); the template's newline follows, not sampled
            assert out.response_ids[end : end + len(newline)] == newline and out.loss_mask[end] == 0
    assert all(lp == 0.0 for lp, bit in zip(out.rollout_logprobs, out.loss_mask, strict=True) if not bit)

    env = RecordingTau2Env.made[-1]
    assert env.metrics["failed"] == 0.0, env.end_metadata.get("failure")
    metadata = env.end_metadata
    assert metadata["termination_reason"] in ("max_turns", "user_stop", "agent_stop", "max_tokens", "too_many_errors")
    assert metadata["reward_info"] is not None  # tau2 judged the episode
    assert out.env_metrics["turns"] >= 1.0
