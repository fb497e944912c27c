"""slime's custom generate contract: signature, returned fields, statuses, failures that never raise."""

from __future__ import annotations

import asyncio
import inspect
import json
from pathlib import Path

import pytest
from engine_helpers import ROOT, gold_script_texts, script_responder
from scripted_policy_server import Fault, ScriptedPolicyServer
from slime_standins import OldSample, Sample, slime_args, slime_sampling_params

from rollout import generate_with_tau
from rollout.task_store import get_task_store


@pytest.fixture(scope="module")
def model_dir(tok):
    return str(Path(tok.name_or_path))


@pytest.fixture
def scripted_env(monkeypatch):
    monkeypatch.setenv("TAU2_USER_KIND", "scripted")
    monkeypatch.delenv("TAU2_POLICY_URL", raising=False)
    monkeypatch.delenv("TAU2_POLICY_API", raising=False)


def _rows():
    import sys

    sys.path.insert(0, str(ROOT / "examples"))
    from tau2_mock import build_rows

    return build_rows("telecom", "train", "train")


def _generate(args, sample, sampling_params):
    """One generate() call on a fresh loop; its HTTP sessions are closed as a script ending its loop must do."""

    async def run():
        try:
            return await generate_with_tau.generate(args, sample, sampling_params)
        finally:
            await generate_with_tau.close_clients()

    return asyncio.run(run())


def test_signature_matches_slime_plugin_contract():
    params = list(inspect.signature(generate_with_tau.generate).parameters)
    assert params[:3] == ["args", "sample", "sampling_params"]
    assert "evaluation" in params
    assert inspect.iscoroutinefunction(generate_with_tau.generate)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_generate_fills_sample_from_metadata_row(tok, model_dir, scripted_env):
    row = _rows()[0]
    task = get_task_store().get("telecom", row["metadata"]["task_id"])
    texts = gold_script_texts(task, solo_mode=False)
    with ScriptedPolicyServer(tok, script_responder(texts, solo_mode=False)) as url:
        args = slime_args(model_dir, _port(url))
        sample = Sample(prompt=row["index"], metadata=json.loads(json.dumps(row["metadata"])))
        out = _generate(args, sample, slime_sampling_params())
    assert out is sample
    assert out.status == Sample.Status.COMPLETED
    assert out.reward == 1.0
    assert len(out.loss_mask) == out.response_length == len(out.rollout_log_probs) > 0
    assert len(out.tokens) > out.response_length
    assert out.metadata["task_id"] == task.id and out.metadata["reward_info"]["reward"] == 1.0
    assert out.metadata["termination_reason"] == "user_stop"
    assert not out.remove_sample
    assert out.response == tok.decode(out.tokens[-out.response_length :], skip_special_tokens=False)


def test_generate_resolves_index_prompt(tok, model_dir, scripted_env, monkeypatch):
    monkeypatch.setenv("TAU2_TASK_SPLIT", "train")
    task = get_task_store().tasks("telecom", "train")[3]
    texts = gold_script_texts(task, solo_mode=False)
    with ScriptedPolicyServer(tok, script_responder(texts, solo_mode=False)) as url:
        sample = Sample(prompt=3)
        out = _generate(slime_args(model_dir, _port(url)), sample, slime_sampling_params())
    assert out.metadata["task_id"] == task.id
    assert out.reward == 1.0


@pytest.mark.parametrize("sample_cls, expected", [(Sample, "FAILED"), (OldSample, "TRUNCATED")])
def test_server_down_gives_failed_sample_never_raises(tok, model_dir, scripted_env, monkeypatch, sample_cls, expected):
    monkeypatch.setenv("TAU2_POLICY_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    row = _rows()[0]
    from rollout.policy_client import RetryPolicy

    monkeypatch.setattr(generate_with_tau, "RetryPolicy", lambda: RetryPolicy(max_retries=1, backoff_base_s=0.01))
    generate_with_tau._POLICIES.clear()
    sample = sample_cls(prompt=0, metadata=dict(row["metadata"]))
    out = _generate(slime_args(model_dir, 9), sample, slime_sampling_params())
    assert out.status == getattr(sample_cls.Status, expected)
    assert out.remove_sample is True
    assert out.response_length >= 1 and sum(out.loss_mask) == 0  # never an empty or trainable response
    assert len(out.rollout_log_probs) == out.response_length
    assert "PolicyServerError" in out.metadata["failure"]
    generate_with_tau._POLICIES.clear()


def test_bad_sample_is_reported_not_raised(tok, model_dir, scripted_env):
    sample = Sample(prompt="not a task", metadata={})
    out = _generate(slime_args(model_dir, 9), sample, slime_sampling_params())
    assert out.status == Sample.Status.FAILED and out.remove_sample
    assert "the sample has no task" in out.metadata["failure"]


def test_abort_maps_to_aborted(tok, model_dir, scripted_env):
    row = _rows()[1]
    with ScriptedPolicyServer(tok, lambda p, q: Fault(abort=True, text="Hel")) as url:
        sample = Sample(prompt=1, metadata=dict(row["metadata"]))
        out = _generate(slime_args(model_dir, _port(url)), sample, slime_sampling_params())
    assert out.status == Sample.Status.ABORTED
    assert len(out.loss_mask) == out.response_length == len(out.rollout_log_probs)


def test_budget_from_sampling_params(tok, model_dir, scripted_env):
    row = _rows()[0]
    with ScriptedPolicyServer(tok, lambda p, q: "Let me check that for you. " * 20) as url:
        sample = Sample(prompt=0, metadata=dict(row["metadata"]))
        out = _generate(slime_args(model_dir, _port(url)), sample, slime_sampling_params(300))
    assert out.status == Sample.Status.TRUNCATED
    assert 0 < out.response_length <= 300
    assert out.metadata["termination_reason"] == "max_tokens"
