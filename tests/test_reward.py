"""Partial credit and reward post-process: real tau2 verdicts on real telecom trajectories, plus properties.

The trajectories are the tasks' gold actions played against a real tau2 telecom environment (tests/tau2_gold.py)
and graded by tau2's own `evaluate_simulation`. slime is not installed here: `Sample` below is a stand-in with
slime's field names and status enum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from examples import slime_standin as slime_standins
from reward.partial_credit import (
    PartialWeights,
    checks_ignoring_termination,
    compute_partial_score,
    compute_progress_score,
)
from reward.tau2_reward_shaping import (
    ShapingConfig,
    shape_reward,
    tau2_reward_post_process,
)
from rollout.task_store import get_task_store
from tests.tau2_gold import (  # tau2 names come through tau2_gold, which imports tau2 the recipe's way
    AssistantMessage,
    TerminationReason,
    ToolCall,
    assertions_met_after,
    gold_simulation,
    tau2_verdict,
)

DOMAIN = "telecom"
MOBILE_2G = "[mobile_data_issue]airplane_mode_on|bad_network_preference[PERSONA:Hard]"
DATA_OFF_EXCEEDED = "[mobile_data_issue]data_mode_off|data_usage_exceeded[PERSONA:None]"
SAVER_EXCEEDED = "[mobile_data_issue]bad_network_preference|data_saver_mode_on|data_usage_exceeded[PERSONA:Hard]"
SERVICE_SIM = "[service_issue]airplane_mode_on|unseat_sim_card[PERSONA:None]"
TRANSFER = "[service_issue]airplane_mode_on|lock_sim_card_pin[PERSONA:Easy]"
ALL_SHAPING_VARS = (
    "TAU2_REWARD_ALPHA",
    "TAU2_TRUNCATION_DISCOUNT",
    "TAU2_TURN_PENALTY",
    "TAU2_PARTIAL_W_ENV",
    "TAU2_PARTIAL_W_ACTION",
    "TAU2_PARTIAL_W_COMMUNICATE",
    "TAU2_PARTIAL_W_DB",
    "TAU2_PARTIAL_W_NL",
    "TAU2_PARTIAL_W_STATE",
    "TAU2_PARTIAL_CREDIT",
    "TAU2_COLLATERAL_PENALTY",
    "TAU2_TRANSFER_GUARD",
)


@pytest.fixture(autouse=True)
def _default_shaping_env(monkeypatch):
    """The post-process reads its settings from the environment: start every test from the defaults."""
    for name in ALL_SHAPING_VARS:
        monkeypatch.delenv(name, raising=False)


def task(task_id: str):
    return get_task_store().get(DOMAIN, task_id)


def skip_indices(task_obj, names: tuple[str, ...]) -> list[int]:
    actions = task_obj.evaluation_criteria.actions
    found = [i for i, action in enumerate(actions) if action.name in names]
    assert len(found) == len(names), f"{task_obj.id} lacks one of {names}"
    return found


# ---------------------------------------------------------------------------------------------------------------
# Real tau2 verdicts
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task_id", [MOBILE_2G, DATA_OFF_EXCEEDED, SAVER_EXCEEDED, SERVICE_SIM, TRANSFER])
def test_gold_actions_score_one_with_full_partial(task_id):
    t = task(task_id)
    verdict = tau2_verdict(gold_simulation(t), t)
    assert verdict.reward == 1.0
    score, components = compute_partial_score(verdict)
    assert score == 1.0
    assert components["env_assertion"] == 1.0
    config = ShapingConfig()
    metadata = {"reward_info": verdict.model_dump(mode="json"), "termination_reason": "user_stop"}
    shaped, partial, _ = shape_reward(metadata, verdict.reward, config)
    assert (shaped, partial) == (1.0 + config.alpha, 1.0)


# (task, gold actions left out, expected partial score with default weights, why)
KNOWN_NEAR_MISSES = [
    (MOBILE_2G, ("set_network_mode_preference",), 1 / 2, "airplane mode off brings data back; 2G-only keeps it slow"),
    (MOBILE_2G, ("toggle_airplane_mode",), 0.0, "in airplane mode there is no data at all"),
    (DATA_OFF_EXCEEDED, ("toggle_data",), 1 / 3, "refuelled, but mobile data still off: only the refuel check"),
    (DATA_OFF_EXCEEDED, ("refuel_data",), 0.0, "over the data limit nothing works and nothing was refuelled"),
    (SAVER_EXCEEDED, ("toggle_data_saver_mode",), 2 / 3, "data works and is refuelled, data saver keeps it slow"),
    (SAVER_EXCEEDED, ("set_network_mode_preference",), 2 / 3, "data works and is refuelled, 2G keeps it slow"),
    (SERVICE_SIM, ("toggle_airplane_mode",), 1 / 2, "no service in airplane mode; the no-overdue-bill check holds"),
    (TRANSFER, ("transfer_to_human_agents",), 1 / 2, "the line stays without service (1/1) but no transfer (0/1)"),
]


@pytest.mark.parametrize(("task_id", "left_out", "expected", "why"), KNOWN_NEAR_MISSES)
def test_leaving_gold_actions_out_gives_the_known_fraction(task_id, left_out, expected, why):
    t = task(task_id)
    verdict = tau2_verdict(gold_simulation(t, skip=skip_indices(t, left_out)), t)
    assert verdict.reward == 0.0, why
    score, _ = compute_partial_score(verdict.model_dump(mode="json"))
    assert score == pytest.approx(expected), why
    config = ShapingConfig()
    metadata = {"reward_info": verdict.model_dump(mode="json"), "termination_reason": "user_stop"}
    shaped, _, _ = shape_reward(metadata, verdict.reward, config)
    assert shaped == pytest.approx(config.alpha * expected)


def _sweep_tasks() -> list[str]:
    """Graded-by-env-only train tasks with 2-4 gold actions, a few per subtask."""
    chosen: dict[str, list[str]] = {}
    for t in get_task_store().tasks(DOMAIN, "train"):
        criteria = t.evaluation_criteria
        subtask = t.id.split("]")[0]
        if [b.value for b in criteria.reward_basis] == ["ENV_ASSERTION"] and 2 <= len(criteria.actions) <= 4:
            if len(chosen.setdefault(subtask, [])) < 3:
                chosen[subtask].append(t.id)
    return [task_id for ids in chosen.values() for task_id in ids]


def test_partial_equals_fraction_of_assertions_met_on_a_directly_driven_environment():
    """Every leave-one-out variant of several tasks: the partial score equals the share of env assertions that hold
    after applying the same actions straight to a fresh environment (no trajectory, no evaluator)."""
    task_ids = _sweep_tasks()
    assert len(task_ids) >= 6
    intermediate = 0
    for task_id in task_ids:
        t = task(task_id)
        for left_out in range(len(t.evaluation_criteria.actions)):
            met = assertions_met_after(t, DOMAIN, skip=[left_out])
            expected = sum(met) / len(met)
            verdict = tau2_verdict(gold_simulation(t, skip=[left_out]), t)
            score, components = compute_partial_score(verdict)
            assert score == pytest.approx(expected), (task_id, left_out)
            assert set(components) == {"env_assertion"}
            intermediate += 0 < expected < 1
    assert intermediate > 0  # the sweep covers real near misses, not only all-or-nothing


def test_action_checks_count_only_where_tau2_grades_them():
    t = task(MOBILE_2G)
    # The undo: the user toggles airplane mode back on after the gold fixes; every gold action still "matches".
    sim = gold_simulation(t, extra=[("user", "toggle_airplane_mode", {})])
    verdict = tau2_verdict(sim, t)
    assert verdict.reward == 0.0
    assert verdict.action_checks and all(check.action_match for check in verdict.action_checks)
    heavy_actions = PartialWeights(action=10.0)
    assert (
        compute_partial_score(verdict, heavy_actions) == compute_partial_score(verdict) == (0.0, {"env_assertion": 0.0})
    )
    # Where ACTION is in the basis the same weight does count.
    transfer = task(TRANSFER)
    missed = tau2_verdict(gold_simulation(transfer, skip=[0]), transfer)
    assert compute_partial_score(missed, heavy_actions)[0] == pytest.approx(1 / 11)
    assert compute_partial_score(missed, PartialWeights(action=0.0))[0] == 1.0
    assert compute_partial_score(missed, PartialWeights(action=3.0))[0] == pytest.approx(0.25)


def test_weights_renormalize_over_present_components():
    t = task(SAVER_EXCEEDED)
    verdict = tau2_verdict(gold_simulation(t, skip=skip_indices(t, ("toggle_data_saver_mode",))), t)
    # Telecom has no communicate checks: their weight must not move the score.
    for communicate in (0.0, 1.0, 50.0):
        assert compute_partial_score(verdict, PartialWeights(communicate=communicate))[0] == pytest.approx(2 / 3)
    assert compute_partial_score(verdict, PartialWeights(env_assertion=0.0)) == (
        0.0,
        {"env_assertion": pytest.approx(2 / 3)},
    )


@pytest.mark.parametrize(
    "termination",
    [TerminationReason.MAX_STEPS, TerminationReason.TOO_MANY_ERRORS, TerminationReason.AGENT_ERROR],
)
def test_truncated_episode_gets_checks_and_discounted_credit(termination):
    t = task(SAVER_EXCEEDED)
    sim = gold_simulation(t, skip=skip_indices(t, ("toggle_data_saver_mode",)), termination=termination)
    verdict = tau2_verdict(sim, t)
    assert verdict.reward == 0.0
    assert verdict.env_assertions is None and verdict.action_checks is None
    assert compute_partial_score(verdict) == (0.0, {})

    checks = checks_ignoring_termination(sim, t, DOMAIN, solo_mode=False)
    assert sim.termination_reason == termination  # the caller's simulation is untouched
    assert checks.info["termination_reason"] == termination.value
    assert [c.met for c in checks.env_assertions] == assertions_met_after(
        t, DOMAIN, skip_indices(t, ("toggle_data_saver_mode",))
    )
    assert compute_partial_score(checks)[0] == pytest.approx(2 / 3)

    config = ShapingConfig(alpha=0.4, truncation_discount=0.25)
    metadata = {
        "reward_info": verdict.model_dump(mode="json"),
        "termination_reason": termination.value,
        "truncated_checks": checks.model_dump(mode="json"),
        "turns": 40,
        "tool_calls": 60,
    }
    shaped, partial, components = shape_reward(metadata, verdict.reward, config)
    assert partial == pytest.approx(0.25 * 2 / 3)
    assert shaped == pytest.approx(0.4 * 0.25 * 2 / 3)
    assert components == {"env_assertion": pytest.approx(2 / 3)}


def test_truncated_episode_that_had_solved_the_task_is_still_a_failure():
    t = task(MOBILE_2G)
    sim = gold_simulation(t, termination=TerminationReason.MAX_STEPS)
    checks = checks_ignoring_termination(sim, t, DOMAIN, solo_mode=False)
    assert checks.reward == 1.0  # what it would have scored; shaping never uses it
    config = ShapingConfig()
    metadata = {"termination_reason": "max_steps", "truncated_checks": checks.model_dump(mode="json")}
    shaped, partial, _ = shape_reward(metadata, 0.0, config)
    assert partial == config.truncation_discount
    assert shaped == config.alpha * config.truncation_discount < 1.0


def test_episode_cut_mid_call_keeps_the_checks_before_the_cut():
    t = task(MOBILE_2G)
    sim = gold_simulation(
        t, skip=skip_indices(t, ("set_network_mode_preference",)), termination=TerminationReason.MAX_STEPS
    )
    late_call = ToolCall(id="late", name="get_customer_by_phone", arguments={"phone_number": "555-123-2002"})
    cut = sim.model_copy(
        update={"messages": [*sim.messages, AssistantMessage(role="assistant", tool_calls=[late_call])]}
    )
    checks = checks_ignoring_termination(cut, t, DOMAIN, solo_mode=False)
    assert "error" not in checks.info and checks.info["dropped_unanswered_messages"] == 1
    assert compute_partial_score(checks) == (0.5, {"env_assertion": 0.5})
    assert len(cut.messages) == len(sim.messages) + 1


def test_checks_ignoring_termination_never_raises_on_malformed_trajectories():
    t = task(MOBILE_2G)
    sim = gold_simulation(t, termination=TerminationReason.MAX_STEPS)
    tool_positions = [i for i, m in enumerate(sim.messages) if m.role == "tool"]
    tampered = sim.model_copy(deep=True)
    tampered.messages[tool_positions[0]].content = "a result the environment never returned"
    orphan = sim.model_copy(deep=True)
    del orphan.messages[tool_positions[0] - 1]  # a tool result without its call
    for bad_sim, domain in [(tampered, DOMAIN), (orphan, DOMAIN), (sim, "no_such_domain")]:
        checks = checks_ignoring_termination(bad_sim, t, domain, solo_mode=False)
        assert checks.reward == 0.0
        assert checks.info["error"]
        assert compute_partial_score(checks) == (0.0, {})
    nonsense = checks_ignoring_termination("not a simulation", t, DOMAIN, solo_mode=False)  # type: ignore[arg-type]
    assert nonsense.reward == 0.0 and nonsense.info["error"]


def test_model_and_json_dump_give_the_same_score():
    t = task(TRANSFER)
    verdict = tau2_verdict(gold_simulation(t, skip=[0]), t)
    assert compute_partial_score(verdict) == compute_partial_score(verdict.model_dump(mode="json"))
    assert compute_partial_score(verdict) == (0.5, {"env_assertion": 1.0, "action": 0.0})


# ---------------------------------------------------------------------------------------------------------------
# Settings from the environment
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    for model in (ShapingConfig, PartialWeights):
        for field in model.model_fields:
            monkeypatch.delenv(model.env_name(field), raising=False)
    return monkeypatch


def set_env(monkeypatch, variables: dict[str, str]) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


def test_credit_settings_from_env(clean_env):
    assert ShapingConfig().credit == "progress" and ShapingConfig().transfer_guard is False
    variables = {"TAU2_PARTIAL_CREDIT": " Checks ", "TAU2_TRANSFER_GUARD": "on", "TAU2_COLLATERAL_PENALTY": "2.5"}
    set_env(clean_env, {**variables, "TAU2_PARTIAL_W_STATE": "3"})
    config = ShapingConfig()
    assert (config.credit, config.transfer_guard, config.collateral_penalty) == ("checks", True, 2.5)
    assert config.weights.state == 3.0
    assert ShapingConfig(credit="progress").credit == "progress"  # a keyword wins over the variable
    for value, expected in (("1", True), ("TRUE", True), ("no", False), ("0", False), ("", False)):
        clean_env.setenv("TAU2_TRANSFER_GUARD", value)
        assert ShapingConfig().transfer_guard is expected


def test_settings_from_env_parse_and_default(clean_env):
    assert ShapingConfig() == ShapingConfig.current()
    variables = {"TAU2_REWARD_ALPHA": "0.3", "TAU2_TRUNCATION_DISCOUNT": "1", "TAU2_PARTIAL_W_DB": "2"}
    set_env(clean_env, {**variables, "TAU2_PARTIAL_W_NL": ""})
    config = ShapingConfig.current()
    assert config.alpha == 0.3 and config.truncation_discount == 1.0 and config.turn_penalty == 0.0
    assert config.weights == PartialWeights(db=2.0) and PartialWeights(nl_assertion=0.5).nl_assertion == 0.5


def test_post_process_reports_a_bad_setting(monkeypatch):
    monkeypatch.setenv("TAU2_REWARD_ALPHA", "2")
    with pytest.raises(ValueError, match="TAU2_REWARD_ALPHA"):
        tau2_reward_post_process(make_args(), [Sample(reward=1.0, group_index=0)])


# ---------------------------------------------------------------------------------------------------------------
# slime stand-ins
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Sample(slime_standins.Sample):
    """The shared slime Sample stand-in as a finished rollout hands it to the post-process: COMPLETED by default."""

    status: Any = slime_standins.Sample.Status.COMPLETED


class OldStatus(Enum):
    """An older slime's status enum: no FAILED."""

    PENDING = "pending"
    COMPLETED = "completed"
    TRUNCATED = "truncated"
    ABORTED = "aborted"


def make_args(**overrides) -> SimpleNamespace:
    values = {
        "advantage_estimator": "grpo",
        "grpo_std_normalization": True,
        "rewards_normalization": True,
        "n_samples_per_prompt": 4,
        "reward_key": None,
    }
    values.update(overrides)
    return SimpleNamespace(**values)


def env_metadata(met: list[bool], termination: str = "user_stop") -> dict:
    return {
        "reward_info": {"reward_basis": ["ENV_ASSERTION"], "env_assertions": [{"met": m} for m in met]},
        "termination_reason": termination,
    }


def population_std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def test_post_process_groups_by_group_index_and_writes_metadata():
    # Two interleaved groups: a flat reshape would mix them.
    samples = [
        Sample(reward=1.0, group_index=7, metadata=env_metadata([True, True])),
        Sample(reward=0.0, group_index=3, metadata=env_metadata([True, False])),
        Sample(reward=0.0, group_index=7, metadata=env_metadata([False, False])),
        Sample(reward=0.0, group_index=3, metadata=env_metadata([False, False])),
    ]
    raw, rewards = tau2_reward_post_process(make_args(n_samples_per_prompt=2), samples)
    assert raw == [1.5, 0.25, 0.0, 0.0]
    for a, b in ((0, 2), (1, 3)):
        assert rewards[a] == pytest.approx(1.0, abs=1e-5) and rewards[b] == pytest.approx(-1.0, abs=1e-5)
    first = samples[0].metadata
    assert first["raw_reward"] == 1.0 and first["shaped_reward"] == 1.5 and first["partial_score"] == 1.0
    assert first["partial_components"] == {"env_assertion": 1.0} and first["advantage"] == rewards[0]
    assert samples[1].metadata["raw_reward"] == 0.0 and samples[1].metadata["partial_score"] == 0.5


def test_post_process_falls_back_to_contiguous_chunks_without_group_index():
    samples = [Sample(reward=r) for r in (1.0, 0.0, 0.0, 1.0, 1.0, 1.0)]
    _, rewards = tau2_reward_post_process(make_args(n_samples_per_prompt=3), samples)
    assert rewards[3:] == [0.0, 0.0, 0.0]
    assert rewards[0] > 0 > rewards[1] == rewards[2]
    assert sum(rewards[:3]) == pytest.approx(0.0, abs=1e-9)


def test_invalid_samples_get_zero_and_stay_out_of_the_statistics():
    good = [Sample(reward=r, group_index=0) for r in (1.0, 0.0)]
    bad = [
        Sample(reward=1.0, group_index=0, remove_sample=True),
        Sample(reward=1.0, group_index=0, status=Sample.Status.ABORTED),
        Sample(reward=1.0, group_index=0, status=Sample.Status.FAILED),
        Sample(reward=None, group_index=0, status=Sample.Status.TRUNCATED),
        Sample(reward=float("nan"), group_index=0),
        Sample(reward=1.0, group_index=0, status="ABORTED"),  # a status given as a plain string
        Sample(reward=1.0, group_index=0, status="Status.FAILED"),
        Sample(reward=1.0, group_index=0, status=OldStatus.ABORTED),
    ]
    raw, rewards = tau2_reward_post_process(make_args(), good + bad)
    assert rewards[0] == pytest.approx(1.0, abs=1e-5) and rewards[1] == pytest.approx(-1.0, abs=1e-5)
    assert rewards[2:] == [0.0] * len(bad)
    assert len(raw) == len(rewards) == len(good) + len(bad)
    assert [s.metadata["reward_valid"] for s in good + bad] == [True, True] + [False] * len(bad)
    assert bad[3].metadata["raw_reward"] == 0.0 and raw[5] == 0.0
    numpy_reward = Sample(reward=np.float32(1.0), group_index=2)
    assert tau2_reward_post_process(make_args(), [numpy_reward])[0] == [1.0]
    old_completed = Sample(reward=1.0, group_index=1, status=OldStatus.COMPLETED)
    tau2_reward_post_process(make_args(), [old_completed])
    assert old_completed.metadata["reward_valid"] is True


def test_reward_dict_is_read_at_reward_key():
    samples = [
        Sample(reward={"score": 1.0, "reward": 0.0}, group_index=0),
        Sample(reward={"score": 0.0}, group_index=0),
    ]
    raw, _ = tau2_reward_post_process(make_args(reward_key="score"), samples)
    assert raw == [1.0, 0.0]  # no reward_info: no partial credit
    raw, rewards = tau2_reward_post_process(make_args(reward_key=None), samples)
    assert raw == [0.0, 0.0] and rewards == [0.0, 0.0]  # default key "reward": missing on the second -> invalid
    assert samples[1].metadata["reward_valid"] is False


def test_normalization_switches():
    def fresh():
        return [
            Sample(reward=r, group_index=0, metadata=env_metadata([m]))
            for r, m in ((1.0, True), (0.0, True), (0.0, False))
        ]

    shaped = [1.5, 0.5, 0.0]
    raw, rewards = tau2_reward_post_process(make_args(rewards_normalization=False), fresh())
    assert raw == rewards == shaped
    centered = [s - sum(shaped) / 3 for s in shaped]
    for args in (make_args(grpo_std_normalization=False), make_args(advantage_estimator="reinforce_plus_plus")):
        _, rewards = tau2_reward_post_process(args, fresh())
        assert rewards == pytest.approx(centered)
    for estimator in ("grpo", "gspo"):
        _, rewards = tau2_reward_post_process(make_args(advantage_estimator=estimator), fresh())
        assert rewards == pytest.approx([c / (population_std(shaped) + 1e-6) for c in centered])


def test_termination_reason_spellings():
    half = env_metadata([True, False])
    config = ShapingConfig(alpha=0.5, truncation_discount=0.5)
    for normal in ("user_stop", "AGENT_STOP", TerminationReason.USER_STOP, "TerminationReason.AGENT_STOP"):
        assert shape_reward({**half, "termination_reason": normal}, 0.0, config)[1] == 0.5
    for cut in ("max_steps", "TOO_MANY_ERRORS", TerminationReason.AGENT_ERROR, "timeout"):
        # No truncated_checks: the episode's own reward_info is used, discounted.
        assert shape_reward({**half, "termination_reason": cut}, 0.0, config)[1] == 0.25


def test_equal_rewards_give_exact_zeros(monkeypatch):
    # 0.7 * 3 / 3 != 0.7 in floating point: the mean alone would leave residues of ~1e-16 / 1e-6 = 1e-10.
    monkeypatch.setenv("TAU2_REWARD_ALPHA", "0.7")
    samples = [Sample(reward=0.0, group_index=0, metadata=env_metadata([True])) for _ in range(3)]
    raw, rewards = tau2_reward_post_process(make_args(), samples)
    assert raw == [0.7] * 3
    assert rewards == [0.0] * 3


def test_metadata_none_and_empty_batch():
    sample = Sample(reward=0.0, group_index=0)
    sample.metadata = None
    raw, rewards = tau2_reward_post_process(make_args(), [sample])
    assert raw == rewards == [0.0] and sample.metadata["advantage"] == 0.0
    assert tau2_reward_post_process(make_args(), []) == ([], [])


# ---------------------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------------------

BASIS = ["ENV_ASSERTION", "ACTION", "COMMUNICATE", "NL_ASSERTION", "DB"]
TERMINATIONS = [
    "TerminationReason.AGENT_STOP",
    "agent_stop",
    "user_stop",
    "max_steps",
    "too_many_errors",
    "agent_error",
    "user_error",
    "AGENT_STOP",
    "?",
]
json_junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def _checks(flag: str):
    entry = st.fixed_dictionaries({flag: st.booleans()}) | json_junk
    return st.none() | st.lists(entry, max_size=6)


reward_infos = st.one_of(
    st.none(),
    json_junk,
    st.fixed_dictionaries(
        {
            "reward": st.floats(),
            "env_assertions": _checks("met"),
            "action_checks": _checks("action_match"),
            "communicate_checks": _checks("met"),
            "nl_assertions": _checks("met"),
            "db_check": st.none() | st.fixed_dictionaries({"db_match": st.booleans()}) | json_junk,
            "reward_basis": st.none() | st.lists(st.sampled_from(BASIS), max_size=5) | json_junk,
        }
    ),
)


@st.composite
def progress_payloads(draw):
    """What the engine stores (reward.progress.StateProgress), an error payload, or junk."""
    target = draw(st.integers(0, 12))
    payload = {
        "target_actions": target,
        "done_actions": draw(st.floats(0, target)) if target else 0.0,
        "target_fields": draw(st.integers(0, 30)),
        "matched_fields": 0,
        "touched_fields": draw(st.integers(0, 30)),
        "collateral": draw(st.integers(0, 40)),
        "transferred": draw(st.booleans()),
        "gold_transfers": draw(st.booleans()),
    }
    return draw(st.just(payload) | st.just({"error": "ValueError: x"}) | json_junk)


metadatas = st.fixed_dictionaries(
    {
        "reward_info": reward_infos,
        "termination_reason": st.none() | st.sampled_from(TERMINATIONS),
        "truncated_checks": reward_infos,
        "progress": st.none() | progress_payloads(),
        "turns": st.integers(0, 300) | json_junk,
        "tool_calls": st.integers(0, 300) | json_junk,
    }
)
weights = st.builds(
    PartialWeights,
    env_assertion=st.floats(0, 10),
    action=st.floats(0, 10),
    communicate=st.floats(0, 10),
    db=st.floats(0, 10),
    nl_assertion=st.floats(0, 10),
    state=st.floats(0, 10),
)
configs = st.builds(
    ShapingConfig,
    alpha=st.floats(0, 0.999),
    truncation_discount=st.floats(0, 1),
    turn_penalty=st.sampled_from([0.0, 0.001, 0.01]) | st.floats(0, 1),
    weights=weights,
    credit=st.sampled_from(["progress", "checks"]),
    collateral_penalty=st.sampled_from([0.0, 1.0]) | st.floats(0, 5),
    transfer_guard=st.booleans(),
)
success_rewards = st.floats(1 - 1e-6, 1e6) | st.just(True)
failure_rewards = st.none() | st.floats(max_value=1 - 2e-6) | st.just(float("nan")) | st.just(float("-inf"))


@settings(max_examples=150, deadline=None)
@given(configs, metadatas, metadatas, success_rewards, failure_rewards)
def test_any_success_beats_any_failure(config, success_meta, failure_meta, success_reward, failure_reward):
    success, _, _ = shape_reward(success_meta, success_reward, config)
    failure, _, _ = shape_reward(failure_meta, failure_reward, config)
    assert success >= 1.0 > config.alpha >= failure
    assert success > failure


def as_count(value: Any) -> int:
    """How the shaping reads a count: a finite number, floored at 0; anything else is 0."""
    return max(0, int(value)) if isinstance(value, (int, float)) and math.isfinite(value) else 0


@settings(max_examples=150, deadline=None)
@given(configs, metadatas, st.floats(allow_nan=True) | st.none(), st.integers(0, 200), st.integers(0, 200))
def test_shaped_bounds_and_no_growth_with_turns_or_tool_calls(config, metadata, reward, more_turns, more_calls):
    shaped, partial, components = shape_reward(metadata, reward, config)
    assert 0.0 <= partial <= 1.0 and 0.0 <= shaped <= 1.0 + config.alpha
    assert all(0.0 <= value <= 1.0 for name, value in components.items() if name != "collateral")
    assert components.get("collateral", 0.0) >= 0.0
    base_turns, base_calls = as_count(metadata["turns"]), as_count(metadata["tool_calls"])
    longer = {**metadata, "turns": base_turns + more_turns, "tool_calls": base_calls + more_calls}
    longer_shaped, longer_partial, _ = shape_reward(longer, reward, config)
    assert longer_partial <= partial and longer_shaped <= shaped
    if config.turn_penalty == 0.0:
        assert (longer_shaped, longer_partial) == (shaped, partial)


@settings(max_examples=200, deadline=None)
@given(reward_infos, weights)
def test_partial_score_is_in_range_for_any_reward_info(reward_info, partial_weights):
    score, components = compute_partial_score(reward_info, partial_weights)
    assert 0.0 <= score <= 1.0
    if not components:
        assert score == 0.0


invalid_kinds = st.sampled_from(["valid", "valid", "valid", "removed", "aborted", "failed", "none"])
group_members = st.lists(
    st.tuples(invalid_kinds, st.sampled_from([0.0, 1.0]), st.lists(st.booleans(), min_size=1, max_size=3)),
    min_size=1,
    max_size=8,
)


def _build_sample(kind: str, reward: float, met: list[bool], group_index: int | None) -> Sample:
    status = {"aborted": Sample.Status.ABORTED, "failed": Sample.Status.FAILED}.get(kind, Sample.Status.COMPLETED)
    return Sample(
        reward=None if kind == "none" else reward,
        status=status,
        metadata=env_metadata(met, termination="user_stop" if reward else "max_steps"),
        remove_sample=kind == "removed",
        group_index=group_index,
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(group_members, min_size=1, max_size=6),
    st.randoms(use_true_random=False),
    st.sampled_from(["grpo", "gspo", "ppo"]),
    st.booleans(),
    st.booleans(),
)
def test_group_normalization_properties(groups, rng, estimator, std_norm, normalize):
    samples = [_build_sample(k, r, m, gi) for gi, members in enumerate(groups) for k, r, m in members]
    rng.shuffle(samples)  # uneven groups, interleaved: grouping must come from group_index
    args = make_args(advantage_estimator=estimator, grpo_std_normalization=std_norm, rewards_normalization=normalize)
    raw, rewards = tau2_reward_post_process(args, samples)
    assert len(raw) == len(rewards) == len(samples)
    assert all(math.isfinite(value) for value in raw + rewards)
    for sample, value in zip(samples, rewards, strict=True):
        if not sample.metadata["reward_valid"]:
            assert value == 0.0
    divides = estimator in {"grpo", "gspo"} and std_norm
    for gi in range(len(groups)):
        positions = [i for i, s in enumerate(samples) if s.group_index == gi and s.metadata["reward_valid"]]
        if not positions:
            continue
        shaped = [raw[i] for i in positions]
        advantages = [rewards[i] for i in positions]
        if not normalize:
            assert advantages == shaped
            continue
        if max(shaped) == min(shaped):
            assert advantages == [0.0] * len(positions)
            continue
        assert sum(advantages) / len(advantages) == pytest.approx(0.0, abs=1e-9)
        spread = population_std(shaped)
        if divides:
            assert population_std(advantages) == pytest.approx(spread / (spread + 1e-6), rel=1e-9)
            if spread > 1e-3:
                assert population_std(advantages) == pytest.approx(1.0, abs=1e-3)
        else:
            assert population_std(advantages) == pytest.approx(spread, rel=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# The progress credit
# ---------------------------------------------------------------------------------------------------------------


def progress_metadata(done: float, target: int, collateral: int = 0, **extra: Any) -> dict:
    figures = {"target_actions": target, "done_actions": done, "collateral": collateral}
    figures.update({"transferred": False, "gold_transfers": False, **extra})
    return {
        "reward_info": {"reward_basis": ["ENV_ASSERTION"], "env_assertions": [{"met": False}]},
        "termination_reason": "user_stop",
        "progress": figures,
    }


def test_progress_credit_is_the_share_of_gold_actions_minus_stray_fields():
    config = ShapingConfig()
    shaped, partial, components = shape_reward(progress_metadata(1.0, 4), 0.0, config)
    assert (partial, components) == (0.25, {"state": 0.25, "collateral": 0.0})  # env assertions do not enter
    _, partial, components = shape_reward(progress_metadata(3.0, 4, collateral=2), 0.0, config)
    assert partial == pytest.approx(0.75 - 2 / 4) and components["collateral"] == 0.5
    assert shape_reward(progress_metadata(1.0, 4, collateral=1), 0.0, config)[1] == 0.0  # floored
    # Nothing to change: the state is right unless the episode changed it.
    assert shape_reward(progress_metadata(0.0, 0), 0.0, config)[1] == 1.0
    assert shape_reward(progress_metadata(0.0, 0, collateral=1), 0.0, config)[1] == 0.0
    # A graded action check (telecom's transfer) is averaged in.
    with_action = {
        **progress_metadata(1.0, 2),
        "reward_info": {"reward_basis": ["ENV_ASSERTION", "ACTION"], "action_checks": [{"action_match": False}]},
    }
    assert shape_reward(with_action, 0.0, config)[1] == pytest.approx(0.25)


def test_without_usable_progress_figures_the_checks_credit_is_used():
    metadata = env_metadata([True, False])
    for progress in (None, {"error": "ValueError: x"}, {"target_actions": 2, "done_actions": 3, "collateral": 0}):
        samples = [Sample(reward=0.0, group_index=0, metadata={**metadata, "progress": progress})]
        tau2_reward_post_process(make_args(), samples)
        assert samples[0].metadata["partial_credit"] == "checks"
        assert samples[0].metadata["partial_score"] == 0.5
    samples = [Sample(reward=0.0, group_index=0, metadata=progress_metadata(1.0, 2))]
    tau2_reward_post_process(make_args(), samples)
    assert samples[0].metadata["partial_credit"] == "progress" and samples[0].metadata["partial_score"] == 0.5


def test_checks_credit_is_selectable(monkeypatch):
    monkeypatch.setenv("TAU2_PARTIAL_CREDIT", "checks")
    samples = [Sample(reward=0.0, group_index=0, metadata={**env_metadata([True, False]), **progress_metadata(0, 2)})]
    samples[0].metadata["reward_info"] = env_metadata([True, False])["reward_info"]
    tau2_reward_post_process(make_args(), samples)
    assert samples[0].metadata["partial_credit"] == "checks" and samples[0].metadata["partial_score"] == 0.5


@pytest.mark.parametrize("credit", ["progress", "checks"])
def test_transfer_guard_zeroes_credit_for_a_transfer_the_gold_does_not_make(credit):
    guarded = ShapingConfig(credit=credit, transfer_guard=True)
    plain = ShapingConfig(credit=credit)
    metadata = {**progress_metadata(1.0, 2, transferred=True), "reward_info": env_metadata([True])["reward_info"]}
    assert shape_reward(metadata, 0.0, plain)[1] == 0.5 if credit == "progress" else 1.0
    _, partial, components = shape_reward(metadata, 0.0, guarded)
    assert partial == 0.0 and components["transfer_guard"] == 1.0
    allowed = {**metadata, "progress": {**metadata["progress"], "gold_transfers": True}}
    assert shape_reward(allowed, 0.0, guarded) == shape_reward(allowed, 0.0, plain)
    assert shape_reward(metadata, 1.0, guarded)[0] >= 1.0  # a success stays a success


@settings(max_examples=200, deadline=None)
@given(configs, metadatas, st.floats(0, 1) | st.none())
def test_truncated_episodes_keep_the_discount(config, metadata, reward):
    """The same end state and checks, ended normally or cut: the cut one gets `truncation_discount` of the credit."""
    config = config.model_copy(update={"turn_penalty": 0.0})
    ended = {**metadata, "termination_reason": "user_stop"}
    cut = {**metadata, "termination_reason": "max_steps", "truncated_checks": metadata["reward_info"]}
    _, partial_ended, _ = shape_reward(ended, reward, config)
    _, partial_cut, _ = shape_reward(cut, reward, config)
    assert partial_cut == pytest.approx(config.truncation_discount * partial_ended, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(reward_infos, progress_payloads(), weights, st.just(0.0) | st.floats(1e-3, 5), st.integers(1, 20))
def test_more_stray_fields_never_raise_the_progress_credit(reward_info, progress, partial_weights, penalty, more):
    scored = compute_progress_score(reward_info, progress, partial_weights, penalty)
    if scored is None:
        return
    worse = compute_progress_score(
        reward_info, {**progress, "collateral": progress["collateral"] + more}, partial_weights, penalty
    )
    assert worse is not None and 0.0 <= worse[0] <= scored[0] <= 1.0
    if penalty > 0 and scored[0] > 0:
        assert worse[0] < scored[0]
