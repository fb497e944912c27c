"""The tau2 numbers a GRPO run logs per rollout (rollout/rollout_log.py) and the shaped-reward dynamic sampling filter
(reward/dynamic_filter.py), on samples as rollout.generate_with_tau writes them. slime's own call sites run them in
tests/test_slime_real.py."""

from __future__ import annotations

import logging
import math

import pytest

from examples.slime_standin import OldSample, Sample
from reward import dynamic_filter
from reward.tau2_reward_shaping import ShapingConfig, shape_reward
from rollout import rollout_log


def _info(met: int, total: int = 3, reward: float = 0.0) -> dict:
    """A tau2 RewardInfo dump graded on env assertions, `met` of `total` met."""
    assertions = [{"met": i < met, "env_assertion": {}} for i in range(total)]
    return {"reward": reward, "reward_basis": ["ENV_ASSERTION"], "env_assertions": assertions}


def _sample(
    reward: float = 0.0,
    met: int = 0,
    subtask: str = "mms_issue",
    status: str = "COMPLETED",
    cls: type = Sample,
    group: int = 0,
    **meta,
) -> Sample:
    metadata = {
        "reward_info": _info(3 if reward == 1.0 else met, reward=reward),
        "termination_reason": "user_stop",
        "subtask": subtask,
        "turns": 4,
        "tool_calls": 2,
        "tool_errors": 0,
        "invalid_turns": 0,
        "transferred": False,
        "gold_transfer": False,
        "user_tool_calls": 1,
        "user_latency_s": 2.0,
        "budget_hit": False,
        "turn_cap_hits": 0,
        **meta,
    }
    sample = cls(group_index=group, reward=reward, metadata=metadata, status=getattr(cls.Status, status))
    sample.remove_sample = status in ("FAILED", "ABORTED") or "failure_kind" in meta
    return sample


def test_success_is_over_valid_samples_and_failures_are_counted_apart():
    samples = [
        _sample(1.0, subtask="mms_issue"),
        _sample(0.0, met=2, subtask="mms_issue", transferred=True),
        _sample(1.0, subtask="service_issue", transferred=True, gold_transfer=True, tool_calls=1, turns=2),
        _sample(0.0, status="FAILED", failure_kind="user_simulator_timeout"),
        _sample(0.0, status="FAILED", failure_kind="policy_server"),
        _sample(0.0, status="ABORTED"),
        _sample(0.0, cls=OldSample, status="TRUNCATED", failure_kind="policy_server"),  # FAILED on older slime
    ]
    metrics = rollout_log.tau2_metrics(samples)
    assert metrics["samples"] == 7 and metrics["valid"] == 3 and metrics["aborted"] == 1
    assert metrics["infra_failures"] == 3 and metrics["infra_failures/policy_server"] == 2
    assert metrics["infra_failure_rate"] == pytest.approx(3 / 6)
    assert metrics["user_sim_failures"] == 1
    assert metrics["success_rate"] == pytest.approx(2 / 3)
    config = ShapingConfig.current()
    valid = samples[:3]
    partials = [shape_reward(s.metadata, s.reward, config)[1] for s in valid]
    assert metrics["partial_mean"] == pytest.approx(sum(partials) / 3)
    assert metrics["shaped_mean"] == pytest.approx(
        sum(shape_reward(s.metadata, s.reward, config)[0] for s in valid) / 3
    )
    assert metrics["transfer_rate"] == pytest.approx(2 / 3)
    assert metrics["transfer_rate_gold_no_transfer"] == pytest.approx(1 / 2)  # the shortcut where it does not belong
    assert metrics["agent_tool_calls_per_turn"] == pytest.approx(5 / 10)
    assert metrics["subtask/mms_issue/success_rate"] == 0.5 and metrics["subtask/mms_issue/n"] == 2
    assert metrics["subtask/service_issue/success_rate"] == 1.0
    assert metrics["termination/user_stop"] == 1.0
    assert metrics["user_latency_per_turn_s"] == pytest.approx(6.0 / 10)
    assert all(math.isfinite(value) for value in metrics.values())


def test_budget_hits_turn_caps_and_terminations():
    samples = [
        _sample(0.0, met=1, termination_reason="max_tokens", budget_hit=True, turns=30),
        _sample(0.0, met=1, termination_reason="too_many_errors", turn_cap_hits=2, invalid_turns=3),
    ]
    metrics = rollout_log.tau2_metrics(samples)
    assert metrics["budget_hit_rate"] == 0.5 and metrics["turn_cap_hits_mean"] == 1.0
    assert metrics["termination/max_tokens"] == 0.5 and metrics["termination/too_many_errors"] == 0.5
    assert metrics["turns_max"] == 30 and metrics["invalid_turns_mean"] == 1.5


def test_a_batch_of_failures_only_logs_the_counts():
    metrics = rollout_log.tau2_metrics([_sample(status="FAILED", failure_kind="setup")])
    assert metrics == {
        "samples": 1.0,
        "valid": 0.0,
        "aborted": 0.0,
        "infra_failures": 1.0,
        "infra_failure_rate": 1.0,
        "user_sim_failures": 0.0,
        "infra_failures/setup": 1.0,
    }


def test_the_log_functions_never_raise_and_let_slime_log_its_own(caplog):
    caplog.set_level(logging.WARNING, logger="rollout.rollout_log")
    bare_args = type("Args", (), {})()  # no slime here: the metrics are computed, the W&B call fails softly
    assert rollout_log.log_rollout(3, bare_args, [_sample(1.0)], {}, 0.5) is False
    assert rollout_log.log_eval_rollout(3, bare_args, {"x": {"samples": [_sample(1.0)]}}, {}) is False
    assert "tau2 rollout metrics were not logged for rollout 3" in caplog.text


# ------------------------------------------------------------------------------------------ dynamic sampling


def _keeps(group, fallback: bool = False) -> bool:
    """The filter's decision: slime's DynamicFilterOutput where slime is importable, else the boolean it accepts."""
    fn = (
        dynamic_filter.shaped_reward_nonzero_std_with_fallback if fallback else dynamic_filter.shaped_reward_nonzero_std
    )
    out = fn(None, group)
    if not isinstance(out, bool):
        assert out.keep_when_insufficient is fallback
        out = bool(out.keep)
    return out


def test_all_fail_groups_with_different_progress_are_kept():
    """slime's check_reward_nonzero_std reads the 0/1 reward: it would drop this group; the shaped one keeps it."""
    group = [_sample(0.0, met=0), _sample(0.0, met=2)]
    assert len({s.reward for s in group}) == 1
    assert _keeps(group) is True


@pytest.mark.parametrize(
    "group",
    [
        [_sample(1.0), _sample(1.0)],  # all successes: zero advantage
        [_sample(0.0, met=1), _sample(0.0, met=1)],  # identical near misses
        [_sample(1.0), _sample(0.0, status="FAILED", failure_kind="policy_server")],  # one valid sample
        [_sample(1.0), _sample(0.0, status="ABORTED")],
    ],
    ids=["all-success", "same-progress", "one-valid-failed", "one-valid-aborted"],
)
def test_groups_without_an_advantage_are_dropped(group):
    assert _keeps(group) is False
    assert _keeps(group, fallback=True) is False


def test_mixed_groups_are_kept():
    assert _keeps([_sample(1.0), _sample(0.0, met=3)]) is True
