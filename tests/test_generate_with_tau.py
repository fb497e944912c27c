"""slime's custom generate contract: signature, returned fields, statuses, failures that never raise."""

from __future__ import annotations

import asyncio
import inspect
import json
from pathlib import Path
from typing import ClassVar

import pytest

from examples.slime_standin import OldSample, Sample, slime_args, slime_sampling_params
from rollout import generate_with_tau
from rollout.task_store import get_task_store
from tests.engine_helpers import gold_script_texts, script_responder
from tests.scripted_policy_server import Fault, ScriptedPolicyServer


@pytest.fixture(scope="module")
def model_dir(tok):
    return str(Path(tok.name_or_path))


@pytest.fixture
def scripted_env(monkeypatch):
    monkeypatch.setenv("TAU2_USER_KIND", "scripted")
    monkeypatch.delenv("TAU2_POLICY_URL", raising=False)
    monkeypatch.delenv("TAU2_POLICY_API", raising=False)


def _rows():

    from examples.tau2_mock import build_rows

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


@pytest.fixture
def fast_retry(monkeypatch):
    """Policy clients built by generate() retry once, quickly (the turn's bound still sets each attempt's timeout)."""
    from rollout.clients.retry import RetryPolicy

    monkeypatch.setattr(
        generate_with_tau,
        "RetryPolicy",
        lambda **kw: RetryPolicy(max_retries=1, backoff_base_s=0.01, backoff_max_s=0.02, **kw),
    )
    generate_with_tau._POLICIES.clear()
    yield
    generate_with_tau._POLICIES.clear()


@pytest.mark.parametrize("sample_cls, expected", [(Sample, "FAILED"), (OldSample, "TRUNCATED")])
def test_server_down_gives_failed_sample_never_raises(tok, model_dir, scripted_env, fast_retry, sample_cls, expected):
    row = _rows()[0]
    sample = sample_cls(prompt=0, metadata=dict(row["metadata"]))
    out = _generate(slime_args(model_dir, 9), sample, slime_sampling_params())  # discard port: nothing listens
    assert out.status == getattr(sample_cls.Status, expected)
    assert out.remove_sample is True
    assert out.response_length >= 1 and sum(out.loss_mask) == 0  # never an empty or trainable response
    assert len(out.rollout_log_probs) == out.response_length
    assert "PolicyServerError" in out.metadata["failure"]
    assert out.metadata["failure_kind"] == "policy_server"


@pytest.mark.parametrize("sample_cls, expected", [(Sample, "FAILED"), (OldSample, "TRUNCATED")])
def test_failure_after_trained_turns_trains_nothing(tok, model_dir, scripted_env, fast_retry, sample_cls, expected):
    """A server that dies after two good turns: the sample keeps its tokens for the lengths but a zero mask."""
    row = _rows()[0]
    task = get_task_store().get("telecom", row["metadata"]["task_id"])
    texts = gold_script_texts(task, solo_mode=False)
    calls = {"n": 0}

    def dies(prompt, params):
        calls["n"] += 1
        return texts[0] if calls["n"] <= 2 else Fault(status=500)

    with ScriptedPolicyServer(tok, dies) as url:
        sample = sample_cls(prompt=0, metadata=dict(row["metadata"]))
        out = _generate(slime_args(model_dir, _port(url)), sample, slime_sampling_params())
    assert out.status == getattr(sample_cls.Status, expected) and out.remove_sample
    assert out.response_length > 20  # two sampled turns and the glue between them
    assert out.loss_mask == [0] * out.response_length
    assert out.rollout_log_probs == [0.0] * out.response_length
    assert out.reward == 0.0


@pytest.mark.parametrize("bad_id", [-5, 10**9])
def test_token_ids_outside_the_vocabulary_fail_the_sample(tok, model_dir, scripted_env, fast_retry, bad_id):
    """A server that returns an id the tokenizer cannot decode (negative, or past the vocabulary): a policy-server
    fault, reported on the sample; never raised, never decoded, never trained."""
    row = _rows()[0]
    server = ScriptedPolicyServer(tok, lambda p, q: "Hello there")
    answer = server._answer

    def corrupt(input_ids, params, reply):
        ids, logprobs, text, finish = answer(input_ids, params, reply)
        return [ids[0], bad_id, *ids[1:]], [logprobs[0], -0.5, *logprobs[1:]], text, finish

    server._answer = corrupt
    with server as url:
        sample = Sample(prompt=0, metadata=dict(row["metadata"]))
        out = _generate(slime_args(model_dir, _port(url)), sample, slime_sampling_params())
    assert out.status == Sample.Status.FAILED and out.remove_sample
    assert "outside the tokenizer's vocabulary" in out.metadata["failure"]
    assert out.metadata["failure_kind"] == "policy_server"
    assert bad_id not in out.tokens and sum(out.loss_mask) == 0


def test_a_hung_policy_server_is_bounded_by_the_turn_deadline(tok, model_dir, scripted_env, monkeypatch):
    """Each policy request attempt is bounded by the turn's deadline, the whole turn too (retries included)."""
    from rollout.budgets import turn_timeout_s
    from rollout.engine import EpisodeConfig

    generate_with_tau._POLICIES.clear()
    assert EpisodeConfig().turn_deadline_s() == turn_timeout_s() <= 240  # a few minutes by default

    async def client_timeout():
        policy = generate_with_tau.policy_for(slime_args(model_dir, 9), EpisodeConfig().turn_deadline_s())
        await generate_with_tau.close_clients()
        return policy.retry.timeout_s

    assert asyncio.run(client_timeout()) == turn_timeout_s()  # one attempt never outlasts the turn's bound
    monkeypatch.setenv("TAU2_TURN_TIMEOUT_S", "0.5")
    row = _rows()[0]
    with ScriptedPolicyServer(tok, lambda p, q: Fault(delay_s=30.0, text="late")) as url:
        sample = Sample(prompt=0, metadata=dict(row["metadata"]))
        out = _generate(slime_args(model_dir, _port(url)), sample, slime_sampling_params())
    generate_with_tau._POLICIES.clear()
    assert out.status == Sample.Status.FAILED and out.remove_sample
    assert out.metadata["termination_reason"] == "timeout", out.metadata["failure"]
    assert out.metadata["failure_kind"] == "policy_timeout"
    assert "TAU2_TURN_TIMEOUT_S" in out.metadata["failure"]


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
    assert out.status == Sample.Status.ABORTED and out.remove_sample
    assert len(out.loss_mask) == out.response_length == len(out.rollout_log_probs)
    assert sum(out.loss_mask) == 0  # an aborted sample trains nothing
    assert out.reward == 0.0


class _GenerateStateMeta(type):
    """The shape of slime's SingletonMeta: instances kept on the metaclass, keyed by class."""

    _instances: ClassVar[dict] = {}


@pytest.fixture
def slime_state(monkeypatch):
    """A loaded `slime.rollout.sglang_rollout` whose GenerateState singleton exists (slime's abort flag)."""
    import sys
    import types

    GenerateState = _GenerateStateMeta("GenerateState", (), {})
    state = types.SimpleNamespace(aborted=False)
    monkeypatch.setitem(_GenerateStateMeta._instances, GenerateState, state)
    module = types.ModuleType("slime.rollout.sglang_rollout")
    module.GenerateState = GenerateState
    monkeypatch.setitem(sys.modules, "slime.rollout.sglang_rollout", module)
    return state


def test_slime_abort_stops_the_episode_before_its_next_turn(tok, model_dir, scripted_env, slime_state):
    """slime aborts the batch while an episode runs: no new /generate request, ABORTED, nothing trained; a
    re-entered sample (partial rollout) is reset and played from the start."""
    row = _rows()[0]
    task = get_task_store().get("telecom", row["metadata"]["task_id"])
    texts = gold_script_texts(task, solo_mode=False)
    base = script_responder(texts, solo_mode=False)

    def abort_after_first(prompt, params):
        slime_state.aborted = True  # slime's abort() runs while this turn is served
        return base(prompt, params)

    server = ScriptedPolicyServer(tok, abort_after_first)
    with server as url:
        sample = Sample(prompt=0, metadata=dict(row["metadata"]))
        out = _generate(slime_args(model_dir, _port(url)), sample, slime_sampling_params())
    assert len(server.requests) == 1  # the turn in flight was served; no request after the abort
    assert out.status == Sample.Status.ABORTED and out.remove_sample
    assert out.metadata["termination_reason"] == "aborted"
    assert sum(out.loss_mask) == 0 and out.reward == 0.0

    slime_state.aborted = False  # the next rollout: slime hands the aborted sample back
    out.metadata["start_rollout_id"] = 3
    with ScriptedPolicyServer(tok, base) as url:
        again = _generate(slime_args(model_dir, _port(url)), out, slime_sampling_params())
    assert again.status == Sample.Status.COMPLETED and again.reward == 1.0
    assert again.remove_sample is False and "failure" not in again.metadata
    assert sum(again.loss_mask) > 0 and again.metadata["start_rollout_id"] == 3
    assert again.metadata["termination_reason"] == "user_stop"


def test_slime_abort_before_the_first_turn_sends_nothing(tok, model_dir, scripted_env, slime_state):
    slime_state.aborted = True
    row = _rows()[0]
    server = ScriptedPolicyServer(tok, lambda p, q: "Hello")
    with server as url:
        out = _generate(slime_args(model_dir, _port(url)), Sample(prompt=0, metadata=dict(row["metadata"])), {})
    assert server.requests == []
    assert out.status == Sample.Status.ABORTED and out.response_length == 1 and out.loss_mask == [0]


def test_evaluation_ignores_the_abort_flag_and_reads_the_eval_split(tok, model_dir, scripted_env, slime_state):
    slime_state.aborted = True  # evaluation is never aborted by slime: the flag belongs to training rollouts
    task = get_task_store().tasks("telecom", "test")[2]
    texts = gold_script_texts(task, solo_mode=False)
    with ScriptedPolicyServer(tok, script_responder(texts, solo_mode=False)) as url:
        args = slime_args(model_dir, _port(url), eval_max_context_len=50000, rollout_max_context_len=10)
        sample = Sample(prompt=2)
        out = asyncio.run(_generate_eval(args, sample, slime_sampling_params()))
    assert out.metadata["task_id"] == task.id and out.metadata["evaluation"] is True
    assert out.status == Sample.Status.COMPLETED and out.reward == 1.0  # the eval context, not the rollout's 10


async def _generate_eval(args, sample, sampling_params):
    try:
        return await generate_with_tau.generate(args, sample, sampling_params, evaluation=True)
    finally:
        await generate_with_tau.close_clients()


class _NoTokenizer:
    """Any object slime's stubs could hand over as a tokenizer."""


class _BrokenTokenizer:
    eos_token_id = None

    def decode(self, *args, **kwargs):
        raise OverflowError("out of range integral type conversion attempted")


@pytest.mark.parametrize(
    "args, tokenizer",
    [
        (type("Args", (), {})(), None),  # slime's contract-test args: no hf_checkpoint, no router
        (slime_args("/nonexistent/checkpoint", 9), None),
        (slime_args("unused", 9), _NoTokenizer()),
        (slime_args("unused", 9), _BrokenTokenizer()),
    ],
    ids=["bare-args", "missing-checkpoint", "object-tokenizer", "broken-tokenizer"],
)
def test_generate_never_raises_for_any_args_or_tokenizer(scripted_env, monkeypatch, args, tokenizer):
    if tokenizer is not None:
        monkeypatch.setattr(generate_with_tau, "load_tokenizer", lambda path: tokenizer)
    row = _rows()[0]
    for sample in (Sample(index=0, prompt="prompt"), Sample(prompt=0, metadata=dict(row["metadata"]))):
        out = _generate(args, sample, {"temperature": 0.3})
        assert out.status == Sample.Status.FAILED and out.remove_sample
        assert isinstance(out.tokens, list) and isinstance(out.response, str)
        assert out.response_length == len(out.loss_mask) == 1 and out.loss_mask == [0]
        assert out.reward == 0.0 and out.metadata["failure"]


def test_policy_url_override_needs_an_explicit_opt_in(tok, model_dir, scripted_env, monkeypatch, caplog):
    """TAU2_POLICY_URL left in a shell never redirects GRPO rollouts away from slime's router by itself."""
    import logging

    row = _rows()[0]
    task = get_task_store().get("telecom", row["metadata"]["task_id"])
    texts = gold_script_texts(task, solo_mode=False)
    generate_with_tau._LOGGED.clear()
    caplog.set_level(logging.INFO, logger="rollout.generate_with_tau")
    with ScriptedPolicyServer(tok, script_responder(texts, solo_mode=False)) as router:
        with ScriptedPolicyServer(tok, script_responder(texts, solo_mode=False)) as stray:
            monkeypatch.setenv("TAU2_POLICY_URL", stray)
            out = _generate(slime_args(model_dir, _port(router)), Sample(prompt=0), slime_sampling_params())
            assert out.reward == 1.0
            assert f"TAU2_POLICY_URL={stray} is set but ignored" in caplog.text
            monkeypatch.setenv("TAU2_POLICY_URL_OVERRIDE", "1")
            out = _generate(slime_args(model_dir, 9), Sample(prompt=0), slime_sampling_params())
            assert out.reward == 1.0  # port 9 is slime's "router" here: the opted-in URL was used
            assert f"tau2 rollouts use TAU2_POLICY_URL={stray} (TAU2_POLICY_URL_OVERRIDE=1)" in caplog.text
    generate_with_tau._POLICIES.clear()


def test_sample_fields_slimes_metrics_read(tok, model_dir, scripted_env):
    """prefix_cache_info, weight_versions and non_generation_time are filled; metadata for the rollout log."""
    row = _rows()[0]
    task = get_task_store().get("telecom", row["metadata"]["task_id"])
    texts = gold_script_texts(task, solo_mode=False)
    server = ScriptedPolicyServer(tok, script_responder(texts, solo_mode=False), weight_version="7")
    with server as url:
        out = _generate(slime_args(model_dir, _port(url)), Sample(prompt=0), slime_sampling_params())
    assert out.prefix_cache_info.total_prompt_tokens == sum(len(r["input_ids"]) for r in server.requests)
    assert out.weight_versions == ["7"] * len(server.requests)
    assert out.non_generation_time >= 0.0
    meta = out.metadata
    assert meta["turns"] == len(server.requests) and meta["budget_hit"] is False
    assert meta["transferred"] == any(t.startswith("<tool_call>") and "transfer" in t for t in texts)
    assert meta["user_tool_calls"] == sum(1 for a in task.evaluation_criteria.actions if a.requestor == "user")


def test_per_turn_cap_is_separate_from_the_episode_budget(tok, model_dir, scripted_env, monkeypatch):
    from rollout.budgets import TURN_TOKENS
    from rollout.engine import EpisodeConfig

    assert EpisodeConfig().max_tokens_per_turn == TURN_TOKENS
    monkeypatch.setenv("TAU2_MAX_TOKENS_PER_TURN", "12")
    monkeypatch.setenv("TAU2_MAX_TURNS", "3")
    row = _rows()[0]
    with ScriptedPolicyServer(tok, lambda p, q: "Let me check that for you. " * 10) as url:
        out = _generate(slime_args(model_dir, _port(url)), Sample(prompt=0, metadata=dict(row["metadata"])), {})
    # Each turn is cut at 12 tokens and the episode goes on until its turn limit, not its token budget.
    assert out.metadata["turn_cap_hits"] == out.metadata["turns"] == 3
    assert out.metadata["termination_reason"] == "max_turns" and out.status == Sample.Status.TRUNCATED


def test_budget_from_sampling_params(tok, model_dir, scripted_env):
    row = _rows()[0]
    with ScriptedPolicyServer(tok, lambda p, q: "Let me check that for you. " * 20) as url:
        sample = Sample(prompt=0, metadata=dict(row["metadata"]))
        out = _generate(slime_args(model_dir, _port(url)), sample, slime_sampling_params(300))
    assert out.status == Sample.Status.TRUNCATED
    assert 0 < out.response_length <= 300
    assert out.metadata["termination_reason"] == "max_tokens"


def test_a_hung_user_simulator_is_bounded_by_the_turn_deadline(tok, model_dir, scripted_env, monkeypatch):
    import rollout.episode

    class HungCustomer:
        async def respond(self, incoming):
            await asyncio.sleep(3600)

    monkeypatch.setattr(rollout.episode, "build_user", lambda config, task, tools, clients: HungCustomer())
    monkeypatch.setenv("TAU2_TURN_TIMEOUT_S", "0.3")
    with ScriptedPolicyServer(tok, lambda p, q: "Hello") as url:
        out = _generate(slime_args(model_dir, _port(url)), Sample(prompt=0, metadata=dict(_rows()[0]["metadata"])), {})
    assert out.status == Sample.Status.FAILED and out.remove_sample and sum(out.loss_mask) == 0
    assert out.metadata["failure_kind"] == "user_simulator_timeout"


def test_every_wait_has_a_default_bound_derived_from_the_budgets():
    from rollout import budgets
    from rollout.engine import EpisodeConfig

    config = EpisodeConfig()
    assert config.turn_timeout_s is None and config.episode_timeout_s is None  # nothing set: derived
    assert config.turn_deadline_s() == budgets.TURN_OVERHEAD_S + budgets.TURN_TOKENS / budgets.MIN_TOKENS_PER_S
    assert (
        config.episode_deadline_s(budgets.EPISODE_TOKENS) == budgets.EPISODE_TOKENS / budgets.MIN_EPISODE_TOKENS_PER_S
    )
    assert config.turn_deadline_s() <= 5 * 60 and config.episode_deadline_s(None) <= 30 * 60
    assert EpisodeConfig(max_tokens_per_turn=4096).turn_deadline_s() > config.turn_deadline_s()
    assert EpisodeConfig(turn_timeout_s=7, episode_timeout_s=9).episode_deadline_s(10**6) == 9


def test_every_key_an_episode_and_its_reward_write_is_cleared_on_reentry(tok, model_dir, scripted_env):
    """Partial-rollout re-entry drops what the last play wrote: every metadata key generate() or the reward
    post-process adds must be listed in EPISODE_KEYS, or a stale value would ride along into the next play."""
    from types import SimpleNamespace

    from reward.tau2_reward_shaping import tau2_reward_post_process

    row = _rows()[0]
    task = get_task_store().get("telecom", row["metadata"]["task_id"])
    with ScriptedPolicyServer(tok, script_responder(gold_script_texts(task, solo_mode=False), solo_mode=False)) as url:
        out = _generate(slime_args(model_dir, _port(url)), Sample(prompt=0, metadata=dict(row["metadata"])), {})
    out.group_index = 0
    args = SimpleNamespace(
        advantage_estimator="grpo", grpo_std_normalization=True, rewards_normalization=True, n_samples_per_prompt=1
    )
    tau2_reward_post_process(args, [out])
    written = set(out.metadata) - set(row["metadata"])
    assert {"progress", "partial_credit", "shaped_reward", "turns"} <= written  # the check sees real writes
    assert written <= set(generate_with_tau.EPISODE_KEYS), sorted(written - set(generate_with_tau.EPISODE_KEYS))


def test_a_replayed_sample_plays_its_own_task_again(tok, model_dir, scripted_env):
    """Re-entry clears the last play but never the row's task: a sample naming its task by id alone (no embedded
    task, a text prompt) plays that task on the first and on the second play."""
    row = _rows()[5]
    task = get_task_store().get("telecom", row["metadata"]["task_id"])
    assert task.id != _rows()[0]["metadata"]["task_id"]  # a fallback to row 0 would show
    assert not {"task", "task_id", "domain"} & set(generate_with_tau.EPISODE_KEYS)
    sample = Sample(prompt="a prompt text", metadata={"domain": "telecom", "task_id": task.id})
    texts = gold_script_texts(task, solo_mode=False)
    for _ in range(2):
        with ScriptedPolicyServer(tok, script_responder(texts, solo_mode=False)) as url:
            out = _generate(slime_args(model_dir, _port(url)), sample, slime_sampling_params())
        assert out.status == Sample.Status.COMPLETED, out.metadata.get("failure")
        assert out.metadata["task_id"] == task.id and out.reward == 1.0
