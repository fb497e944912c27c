"""eval/metrics.py against hand-computed cases and against tau2's own pass^k implementation on the same data."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eval import metrics
from eval.metrics import (
    EpisodeRow,
    bootstrap_pass_at_1,
    breakdown,
    describe,
    pass_at_1,
    pass_at_k,
    pass_at_k_curve,
    pass_hat_k,
    pass_hat_k_curve,
    row_from_episode,
    summarize,
)
from rollout.tau2_setup import import_tau2

T, F = True, False


def row(task: str, trial: int, reward: float | None, **extra) -> EpisodeRow:
    status = extra.pop("status", "failed" if reward is None else "completed")
    return EpisodeRow(
        task_id=task,
        trial=trial,
        status=status,
        termination_reason=extra.pop("termination_reason", "user_stop"),
        reward=reward,
        **extra,
    )


def rows_from(pattern: dict[str, list[bool]], **extra) -> list[EpisodeRow]:
    return [row(task, i, 1.0 if ok else 0.0, **extra) for task, oks in pattern.items() for i, ok in enumerate(oks)]


# ------------------------------------------------------------------------------------------------ hand-computed


def test_success_uses_tau2_tolerance():
    assert metrics.is_success(1.0) and metrics.is_success(1.0 - 1e-7) and metrics.is_success(1.0 + 1e-7)
    assert not metrics.is_success(1.0 - 1e-5)
    assert not metrics.is_success(0.0) and not metrics.is_success(None)


def test_pass_hat_k_and_pass_at_k_single_task():
    assert pass_hat_k(4, 2, 1) == pytest.approx(0.5)
    assert pass_hat_k(4, 2, 2) == pytest.approx(1 / 6)  # C(2,2)/C(4,2)
    assert pass_hat_k(4, 3, 2) == pytest.approx(3 / 6)  # C(3,2)/C(4,2)
    assert pass_hat_k(4, 4, 4) == 1.0 and pass_hat_k(4, 3, 4) == 0.0
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)  # 1 - C(2,2)/C(4,2)
    assert pass_at_k(4, 1, 3) == pytest.approx(1 - 1 / 4)  # 1 - C(3,3)/C(4,3)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0
    with pytest.raises(ValueError):
        pass_hat_k(2, 1, 3)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_hat_k(3, 1, 0)


def test_curves_over_tasks_hand_computed():
    by_task = {"A": [T, T, F, F], "B": [T, T, T, T], "C": [F, F, F, F]}
    assert pass_at_1(by_task) == pytest.approx(6 / 12)
    hat = pass_hat_k_curve(by_task)
    assert list(hat) == [1, 2, 3, 4]
    assert hat[1] == pytest.approx((0.5 + 1 + 0) / 3)
    assert hat[2] == pytest.approx((1 / 6 + 1 + 0) / 3)
    assert hat[3] == pytest.approx(1 / 3) and hat[4] == pytest.approx(1 / 3)
    at = pass_at_k_curve(by_task)
    assert at[1] == pytest.approx(hat[1])  # both are the mean success for k = 1
    assert at[2] == pytest.approx((5 / 6 + 1 + 0) / 3)
    assert at[4] == pytest.approx(2 / 3)  # any success among all four trials


def test_unequal_trials_pooled_pass_at_1_and_k_capped():
    by_task = {"A": [T], "B": [F, F, F]}
    assert pass_at_1(by_task) == pytest.approx(1 / 4)  # pooled over trials, not per-task mean
    assert pass_hat_k_curve(by_task) == {1: pytest.approx(0.5)}  # k capped at the smallest trial count (tau2)
    assert pass_at_1({}) is None and pass_hat_k_curve({}) == {}


def test_summarize_headline_failed_and_truncated():
    rows = [
        row(
            "A",
            0,
            1.0,
            subtask="mms_issue",
            persona="Easy",
            partial_score=1.0,
            partial_components={"env_assertion": 1.0},
        ),
        row(
            "A",
            1,
            0.0,
            subtask="mms_issue",
            persona="Easy",
            partial_score=0.5,
            partial_components={"env_assertion": 0.5},
        ),
        # truncated: tau2 reward 0, no checks; the re-graded checks say 2 of 2 met and reward 1
        row(
            "B",
            0,
            0.0,
            status="truncated",
            termination_reason="max_steps",
            subtask="service_issue",
            persona="Hard",
            truncated_partial_score=1.0,
            truncated_partial_components={"env_assertion": 1.0},
            truncated_reward=1.0,
        ),
        row("B", 1, None, subtask="service_issue", persona="Hard", termination_reason="infra_error", failure="Boom\nx"),
    ]
    out = summarize(rows, resamples=200)
    assert out["pass_at_1"] == pytest.approx(1 / 4)  # the failed episode counts as a failure
    assert out["avg_reward"] == pytest.approx(1 / 4)
    assert out["avg_partial_score"] == pytest.approx((1.0 + 0.5 + 0.0 + 0.0) / 4)  # truncated stays 0
    assert out["avg_partial_score_with_truncated_checks"] == pytest.approx((1.0 + 0.5 + 1.0 + 0.0) / 4)
    assert out["partial_components"] == {"env_assertion": {"mean": 0.75, "episodes": 2}}
    assert out["counts"]["failed_episodes"] == 1 and out["counts"]["counted_episodes"] == 4
    assert out["failed"]["by_error"] == {"Boom": 1}
    assert out["failed"]["episodes_list"] == [{"task_id": "B", "trial": 1}]
    assert out["truncated"]["episodes"] == 1 and out["truncated"]["would_have_succeeded"] == 1
    assert out["truncated"]["avg_partial_score_from_truncated_checks"] == 1.0
    assert out["pass_hat_k"] == {"1": pytest.approx(0.25), "2": pytest.approx(0.0)}
    assert out["pass_at_k"]["2"] == pytest.approx((1.0 + 0.0) / 2)

    excluded = summarize(rows, exclude_failed=True, resamples=200)
    assert excluded["pass_at_1"] == pytest.approx(1 / 3)
    assert excluded["counts"]["counted_episodes"] == 3 and excluded["counts"]["failed_episodes"] == 1
    assert excluded["pass_hat_k"] == {"1": pytest.approx((0.5 + 0.0) / 2)}  # B has one counted trial: k <= 1


def test_breakdowns_by_subtask_persona_termination():
    rows = [
        row("m1", 0, 1.0, subtask="mms_issue", persona="Easy"),
        row("m1", 1, 0.0, subtask="mms_issue", persona="Easy", termination_reason="max_steps", status="truncated"),
        row("d1", 0, 1.0, subtask="mobile_data_issue", persona="None"),
        row("d2", 0, 1.0, subtask="mobile_data_issue", persona="Hard"),
        row("x", 0, 0.0),  # no subtask / persona (airline-like)
    ]
    by_subtask = breakdown(rows, lambda r: r.subtask)
    assert list(by_subtask) == ["(none)", "mms_issue", "mobile_data_issue"]
    assert by_subtask["mms_issue"] == {
        "episodes": 2,
        "tasks": 1,
        "successes": 1,
        "pass_at_1": 0.5,
        "avg_reward": 0.5,
        "avg_partial_score": 0.0,
        "transfer_rate": 0.0,
    }
    assert by_subtask["mobile_data_issue"]["pass_at_1"] == 1.0 and by_subtask["mobile_data_issue"]["tasks"] == 2
    out = summarize(rows, resamples=100)
    assert out["by_persona"]["Easy"]["episodes"] == 2 and out["by_persona"]["(none)"]["pass_at_1"] == 0.0
    assert out["by_termination"]["max_steps"]["episodes"] == 1
    assert out["by_termination"]["user_stop"]["successes"] == 3


def test_describe_and_episode_stats():
    stats = describe([float(v) for v in range(1, 11)])
    assert stats["mean"] == 5.5 and stats["median"] == 5.5
    assert stats["p90"] == pytest.approx(9.1)  # linear interpolation at rank 0.9 * 9
    assert describe([])["mean"] is None
    rows = [row("a", 0, 1.0, turns=4, wall_s=2.0), row("b", 0, 0.0, turns=2, wall_s=4.0), row("c", 0, None, turns=0)]
    stats = metrics.episode_stats(rows)
    assert stats["turns"]["n"] == 2 and stats["turns"]["mean"] == 3.0  # the failed episode is left out
    assert stats["wall_s"]["median"] == 3.0


def test_row_from_episode_partial_scores():
    reward_info = {
        "reward": 0.0,
        "env_assertions": [{"met": True, "reward": 1.0}, {"met": False, "reward": 0.0}],
        "action_checks": [{"action_match": True}],
        "reward_basis": ["ENV_ASSERTION"],
    }
    episode = {"task_id": "t", "status": "completed", "termination_reason": "user_stop", "reward": 0.0}
    r = row_from_episode({**episode, "reward_info": reward_info, "turns": 3}, trial=2, subtask="s", persona="Easy")
    assert r.partial_score == 0.5 and r.partial_components == {"env_assertion": 0.5}  # ACTION is not graded here
    assert r.trial == 2 and r.turns == 3 and not r.success
    truncated = {
        **episode,
        "status": "truncated",
        "termination_reason": "max_steps",
        "reward_info": {"reward": 0.0, "reward_basis": ["ENV_ASSERTION"]},
        "truncated_checks": {**reward_info, "reward": 0.0, "env_assertions": [{"met": True}, {"met": True}]},
    }
    r = row_from_episode(truncated, trial=0)
    assert r.partial_score == 0.0 and r.truncated_partial_score == 1.0 and r.truncated_reward == 0.0
    failed = {**episode, "status": "failed", "reward": None, "termination_reason": "infra_error", "failure": "x"}
    r = row_from_episode(failed, trial=0)
    assert r.failed and r.reward is None and not r.success and r.partial_score == 0.0


def test_transfer_rates_from_trajectories():
    transfer_call = {"role": "assistant", "tool_calls": [{"name": "transfer_to_human_agents", "arguments": {}}]}
    user_call = {"role": "user", "tool_calls": [{"name": "transfer_to_human_agents", "arguments": {}}]}  # not the agent
    other_call = {"role": "assistant", "tool_calls": [{"name": "refuel_data", "arguments": {}}]}
    base = {"status": "completed", "termination_reason": "user_stop", "reward": 0.0}
    episodes = [
        ({"task_id": "a", **base, "messages": [transfer_call]}, False),  # unneeded transfer
        ({"task_id": "b", **base, "messages": [user_call, other_call]}, False),
        ({"task_id": "c", **base, "messages": [transfer_call]}, True),  # the gold transfers too
        ({"task_id": "d", **base, "messages": []}, None),  # gold unknown
    ]
    rows = [row_from_episode(e, trial=0, gold_transfers=gold) for e, gold in episodes]
    assert [r.transferred for r in rows] == [True, False, True, False]
    out = summarize(rows, resamples=50)
    assert out["transfer_rate"] == pytest.approx(0.5)
    assert out["unneeded_transfer_rate"] == pytest.approx(0.5) and out["episodes_of_tasks_without_gold_transfer"] == 2
    assert summarize(rows[3:], resamples=50)["unneeded_transfer_rate"] is None


def test_tau2_metric_names():
    assert metrics.tau2_metric_keys({"1": 0.5, "2": 0.25}, 0.4) == {
        "avg_reward": 0.4,
        "pass_hat_1": 0.5,
        "pass_hat_2": 0.25,
    }


# ------------------------------------------------------------------------------------------------------ bootstrap


def test_bootstrap_is_deterministic_and_contains_the_estimate():
    rng = random.Random(7)
    by_task = {f"t{i}": [rng.random() < 0.4 for _ in range(4)] for i in range(30)}
    point = pass_at_1(by_task)
    a = bootstrap_pass_at_1(by_task, resamples=2000, seed=3)
    b = bootstrap_pass_at_1(by_task, resamples=2000, seed=3)
    assert a == b
    assert a["low"] <= point <= a["high"] and a["low"] < a["high"]
    assert 0.0 <= a["low"] and a["high"] <= 1.0
    c = bootstrap_pass_at_1(by_task, resamples=2000, seed=4)
    assert c["low"] <= point <= c["high"]
    assert summarize(rows_from(by_task), resamples=2000, seed=3)["pass_at_1_ci"] == a


def test_bootstrap_resamples_tasks_not_trials():
    # Two tasks, four trials each, one always right, one always wrong. Resampling tasks, a draw is 0, 1/2 or 1 with
    # probabilities 1/4, 1/2, 1/4: the 95% interval is [0, 1]. Resampling the 8 trials independently would give a
    # much narrower interval (about [0.125, 0.875]).
    by_task = {"good": [T, T, T, T], "bad": [F, F, F, F]}
    ci = bootstrap_pass_at_1(by_task, resamples=4000, seed=0)
    assert ci["low"] == 0.0 and ci["high"] == 1.0
    assert bootstrap_pass_at_1({"only": [T, F, T, F]}, resamples=500)["low"] == 0.5  # one task: no spread
    all_right = bootstrap_pass_at_1({"a": [T, T], "b": [T]}, resamples=100)
    assert (all_right["low"], all_right["high"]) == (1.0, 1.0)
    assert bootstrap_pass_at_1({}) is None


# ------------------------------------------------------------------------------------------- against tau2's code


def _tau2_results(pattern: dict[str, list[float]]):
    """A tau2 Results object holding one simulation per (task, trial) with the given rewards."""
    import_tau2()
    from tau2.data_model.simulation import (
        AgentInfo,
        Info,
        Results,
        RewardInfo,
        SimulationRun,
        TerminationReason,
        UserInfo,
    )
    from tau2.environment.environment import EnvironmentInfo

    from rollout.task_store import get_task_store

    by_id = {task.id: task for task in get_task_store().tasks("telecom", "test")}
    trials = max(len(v) for v in pattern.values())
    simulations = [
        SimulationRun(
            id=f"{task_id}-{trial}",
            task_id=task_id,
            start_time="2025-01-01T00:00:00",
            end_time="2025-01-01T00:00:01",
            duration=1.0,
            termination_reason=TerminationReason.USER_STOP,
            reward_info=RewardInfo(reward=reward),
            messages=[],
            trial=trial,
        )
        for task_id, rewards in pattern.items()
        for trial, reward in enumerate(rewards)
    ]
    info = Info(
        git_commit="test",
        num_trials=trials,
        max_steps=200,
        max_errors=10,
        user_info=UserInfo(implementation="user_simulator"),
        agent_info=AgentInfo(implementation="llm_agent"),
        environment_info=EnvironmentInfo(domain_name="telecom", policy=""),
    )
    return Results(info=info, tasks=[by_id[t] for t in pattern], simulations=simulations)


def _ours(pattern: dict[str, list[float]]) -> dict:
    rows = [row(task, i, reward) for task, rewards in pattern.items() for i, reward in enumerate(rewards)]
    return summarize(rows, resamples=50)


@pytest.fixture(scope="module")
def test_task_ids():
    from rollout.task_store import get_task_store

    return get_task_store().task_ids("telecom", "test")


@pytest.mark.parametrize("trials", [1, 3, 4])
def test_pass_hat_k_matches_tau2_compute_metrics(test_task_ids, trials):
    from tau2.metrics.agent_metrics import compute_metrics

    rng = random.Random(trials)
    # Rewards near 1 inside tau2's tolerance count as successes; 0.5 does not.
    values = [0.0, 1.0, 1.0 - 1e-7, 0.5]
    pattern = {task_id: [rng.choice(values) for _ in range(trials)] for task_id in test_task_ids[:12]}
    theirs = compute_metrics(_tau2_results(pattern))
    ours = _ours(pattern)
    assert set(ours["pass_hat_k"]) == {str(k) for k in theirs.pass_hat_ks}
    for k, value in theirs.pass_hat_ks.items():
        assert ours["pass_hat_k"][str(k)] == pytest.approx(value, abs=1e-12)
    assert ours["avg_reward"] == pytest.approx(theirs.avg_reward, abs=1e-12)
    if trials == 1:
        assert ours["pass_at_1"] == pytest.approx(theirs.pass_hat_ks[1])


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=1, max_value=12).flatmap(
        lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))
    )
)
def test_pass_hat_k_matches_tau2_formula(case):
    import_tau2()
    from tau2.metrics.agent_metrics import pass_hat_k as tau2_pass_hat_k

    n, c, k = case
    assert pass_hat_k(n, c, k) == pytest.approx(tau2_pass_hat_k(n, c, k), abs=1e-15)
    # pass@k is the complement of "all k draws fail", i.e. 1 - pass^k of the failures.
    assert pass_at_k(n, c, k) == pytest.approx(1.0 - tau2_pass_hat_k(n, n - c, k), abs=1e-12)
    assert 0.0 <= pass_hat_k(n, c, k) <= pass_at_k(n, c, k) + 1e-12 <= 1.0 + 1e-12  # all succeed => any succeeds
