"""A real model drives telecom episodes end to end: SmolLM2-135M-Instruct behind the real CPU inference server,
through slime's generate function and through the engine; invariants hold and the returned log-probs of sampled
tokens match a teacher-forced forward pass of the same model within 1e-3."""

from __future__ import annotations

import asyncio

import pytest

from examples.slime_standin import Sample, slime_args, slime_sampling_params
from rollout import generate_with_tau
from rollout.clients.policy import build_policy_client
from rollout.engine import EpisodeConfig, TokenAgent, prepare_episode, run_episode
from rollout.scripted import ScriptedUser
from rollout.task_store import get_task_store
from tests.engine_helpers import opening_of, verify_record

pytestmark = pytest.mark.slow

BUDGET = 96  # tokens per episode: the model decodes ~16 tokens/s on 2 cores


def _teacher_forced_logprobs(model_dir, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for every position i >= 1, from one forward pass in fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return [0.0] + [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]


@pytest.mark.parametrize("api", ["sglang", "openai"])
def test_real_model_episode_invariants_and_logprobs(cpu_policy_server, smollm2_model_dir, smollm2_tokenizer, api):
    task = get_task_store().tasks("telecom", "train")[5]
    config = EpisodeConfig(policy_variant="compact", max_turns=3)

    async def play():
        setup = await prepare_episode(task, config)
        env, view = setup.env, setup.view
        policy = build_policy_client(cpu_policy_server, api=api, model=smollm2_model_dir.name)
        agent = TokenAgent(policy, smollm2_tokenizer, view, {"temperature": 1.0, "top_p": 1.0}, BUDGET)
        try:
            return await run_episode(task, agent, ScriptedUser(task), config, env=env), agent, view
        finally:
            await policy.aclose()

    result, agent, view = asyncio.run(play())
    assert result.status in ("completed", "truncated"), result.failure
    record = result.record
    assert record is not None and record.sampled_tokens > 0
    assert record.response_length <= BUDGET
    verify_record(record, agent.renderer, opening_of(view), result.agent_messages)
    reference = _teacher_forced_logprobs(smollm2_model_dir, record.all_ids)
    offset = len(record.prompt_ids)
    worst = 0.0
    for i, (mask, logprob) in enumerate(zip(record.loss_mask, record.log_probs)):
        if mask:
            worst = max(worst, abs(logprob - reference[offset + i]))
        else:
            assert logprob == 0.0
    assert worst < 1e-3, f"largest log-prob difference {worst:.2e}"


def test_real_model_through_slime_generate(cpu_policy_server, smollm2_model_dir, monkeypatch):
    monkeypatch.setenv("TAU2_USER_KIND", "scripted")
    monkeypatch.setenv("TAU2_POLICY_VARIANT", "compact")
    monkeypatch.setenv("TAU2_MAX_TURNS", "2")
    monkeypatch.delenv("TAU2_POLICY_URL", raising=False)
    task = get_task_store().tasks("telecom", "train")[0]
    port = int(cpu_policy_server.rsplit(":", 1)[1])
    args = slime_args(str(smollm2_model_dir), port, rollout_max_response_len=BUDGET)
    samples = [
        Sample(group_index=0, index=i, prompt=0, metadata={"domain": "telecom", "task_id": task.id}) for i in range(2)
    ]

    async def run_all():
        return await asyncio.gather(
            *(generate_with_tau.generate(args, s, slime_sampling_params(BUDGET)) for s in samples)
        )

    out = asyncio.run(run_all())
    generate_with_tau._POLICIES.clear()
    for sample in out:
        assert sample.status in (Sample.Status.COMPLETED, Sample.Status.TRUNCATED), sample.metadata.get("failure")
        assert 0 < sample.response_length <= BUDGET
        assert len(sample.loss_mask) == sample.response_length == len(sample.rollout_log_probs)
        assert sum(sample.loss_mask) > 0
        assert sample.reward is not None
        assert sample.metadata["task_id"] == task.id
