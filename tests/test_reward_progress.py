"""reward.progress (how far an episode's end state is toward the gold end state) and the progress credit of the
reward post-process: real tau2 tasks and environments, tau2's own evaluator, and properties (hypothesis).

Episodes are lists of tool calls played against a real environment (tests/tau2_gold.py builds the trajectory, as the
reward tests do); the engine test plays the scripted gold agent and user through rollout.engine.run_episode.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bench.partial_credit import every_tool_calls, gold_calls, play, spam_calls
from reward.partial_credit import compute_progress_score
from reward.progress import (
    ABSENT,
    TRANSFER_TOOL,
    action_shares,
    diff_fields,
    environment_state,
    episode_progress,
    initial_environment,
    measure_progress,
    path_text,
    progress_of_simulation,
    progress_target,
)
from reward.tau2_reward_shaping import ShapingConfig, shape_reward
from rollout.task_store import get_task_store
from tests.tau2_gold import ToolCall, gold_simulation

NEW = ShapingConfig()  # the default: progress credit
OLD = ShapingConfig(credit="checks")
DATA_AND_ROAMING = "[mobile_data_issue]data_usage_exceeded|user_abroad_roaming_enabled_off[PERSONA:Easy]"
APN_AND_BILL = (
    "[service_issue]airplane_mode_on|break_apn_settings|overdue_bill_suspension|unseat_sim_card[PERSONA:None]"
)


def telecom_tasks() -> list[Any]:
    store = get_task_store()
    return store.tasks("telecom", "train") + store.tasks("telecom", "test")


def task(task_id: str, domain: str = "telecom") -> Any:
    return get_task_store().get(domain, task_id)


def shaped(metadata: dict[str, Any], config: ShapingConfig = NEW) -> float:
    return shape_reward(metadata, metadata["reward"], config)[0]


def live_environment(task_obj: Any, domain: str, calls: list[tuple[str, str, dict]]) -> Any:
    env = initial_environment(task_obj, domain)
    for position, (requestor, name, arguments) in enumerate(calls):
        env.get_response(ToolCall(id=f"c{position}", name=name, arguments=arguments, requestor=requestor))
    return env


# ---------------------------------------------------------------------------------------------------------------
# The state diff
# ---------------------------------------------------------------------------------------------------------------

leaf_values = st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from(["a", "b", ""])
trees = st.recursive(
    leaf_values,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["x", "y", "z"]), inner, max_size=3),
    max_leaves=12,
)


def leaves(value: Any, path: tuple = ()) -> dict[tuple, Any]:
    """Leaf paths of a JSON-like tree, an empty container being a leaf (the rule reward.progress documents)."""
    if isinstance(value, dict) and value:
        return {p: v for key, child in value.items() for p, v in leaves(child, (*path, key)).items()}
    if isinstance(value, list) and value:
        return {p: v for i, child in enumerate(value) for p, v in leaves(child, (*path, i)).items()}
    return {path: value}


@settings(max_examples=300, deadline=None)
@given(trees, trees)
def test_diff_fields_is_the_leaf_by_leaf_difference(before, after):
    old, new = leaves(before), leaves(after)
    expected = {}
    for path in old.keys() | new.keys():
        a, b = old.get(path, ABSENT), new.get(path, ABSENT)
        if a is ABSENT or b is ABSENT or a != b:
            expected[path] = (a, b)
    assert diff_fields(before, after) == expected
    assert diff_fields(before, before) == {}


def test_diff_fields_walks_tau2_models_and_expands_new_records():
    t = task(DATA_AND_ROAMING)
    before = initial_environment(t, "telecom")
    after = live_environment(t, "telecom", gold_calls(t))
    state_before = {"db": before.tools.db, "user_db": before.user_tools.db}
    state_after = {"db": after.tools.db, "user_db": after.user_tools.db}
    changes = {path_text(path): values for path, values in diff_fields(state_before, state_after).items()}
    assert changes["user_db/device/roaming_enabled"] == (False, True)
    assert changes["db/lines/1/data_refueling_gb"] == (0.0, 2.0)
    # The refuel adds a bill line item: each of its fields is a change from ABSENT.
    new_item = {path: values for path, values in changes.items() if path.startswith("db/bills/2/line_items/0/")}
    assert len(new_item) == 4 and all(old is ABSENT for old, _ in new_item.values())


# ---------------------------------------------------------------------------------------------------------------
# Targets and figures on real tasks
# ---------------------------------------------------------------------------------------------------------------


def test_differences_through_the_shared_base_equal_a_direct_diff_from_the_initial_state():
    """Targets keep only their own initialized fields and diff against the domain's shared base state: the result
    must be the direct diff between the task's initial state and the episode's."""
    rng = random.Random(3)
    for t in telecom_tasks()[::9]:
        target = progress_target(t, "telecom")
        initial = initial_environment(t, "telecom")
        for calls in (gold_calls(t), spam_calls(t, "telecom", rng, 12), []):
            env = live_environment(t, "telecom", calls)
            direct = diff_fields(environment_state(initial), environment_state(env))
            assert target.differences(env) == direct, t.id
    assert target.differences(None) == {}


def test_target_records_each_gold_step_and_is_cached():
    t = task(APN_AND_BILL)
    target = progress_target(t, "telecom")
    assert progress_target(t, "telecom") is target
    names = [action.name for action in t.evaluation_criteria.actions]
    steps = {name: {path_text(p) for p in step} for name, step in zip(names, target.steps)}
    # Reset-APN only arms a flag that the reboot consumes; the payment request is consumed by the payment.
    assert steps["reset_apn_settings"] == {"user_db/device/active_apn_settings/reset_at_reboot"}
    assert "db/bills/6/status" in steps["send_payment_request"] and "db/bills/6/status" in steps["make_payment"]
    flag = next(p for p in target.initial_values if path_text(p).endswith("reset_at_reboot"))
    assert flag not in target.final  # back to False at the end
    # The second reboot changes nothing: the only gold action the state cannot show.
    assert [names[i] for i in range(len(names)) if i not in target.counted] == ["reboot_device"]
    assert target.gold_errors == {} and target.gold_transfers is False


def test_gold_prefixes_on_the_live_environment():
    t = task(APN_AND_BILL)
    gold = gold_calls(t)
    done = []
    for k in range(len(gold) + 1):
        figures = measure_progress(t, "telecom", live_environment(t, "telecom", gold[:k]))
        assert figures.collateral == 0
        assert figures.missed_fields == sorted(figures.missed_fields)  # the same in every process (hash seed)
        if k == 0:
            assert len(figures.missed_fields) > 1
        done.append(figures.done_actions)
    assert figures.target_actions == len(gold) - 1 and done[-1] == figures.target_actions
    # Strictly up at every step but the repeated reboot (position 6).
    assert [b > a for a, b in itertools.pairwise(done)] == [True] * 6 + [False] + [True]


def test_collateral_counts_fields_no_gold_action_changes():
    t = task(DATA_AND_ROAMING)
    calls = [*gold_calls(t), ("user", "toggle_wifi", {}), ("user", "toggle_data_saver_mode", {})]
    figures = measure_progress(t, "telecom", live_environment(t, "telecom", calls))
    assert figures.done_actions == figures.target_actions == 2
    assert figures.collateral >= 2
    assert "user_db/device/data_saver_mode" in figures.collateral_fields


def test_transfer_flags_read_the_agents_calls():
    t = task(DATA_AND_ROAMING)
    simulation = gold_simulation(t, extra=[("assistant", TRANSFER_TOOL, {"summary": "help"})])
    figures = progress_of_simulation(simulation, t, "telecom")
    assert figures.transferred is True and figures.gold_transfers is False
    transfer_task = next(
        x for x in telecom_tasks() if [a.name for a in x.evaluation_criteria.actions] == [TRANSFER_TOOL]
    )
    assert progress_target(transfer_task, "telecom").gold_transfers is True
    as_dicts = [m.model_dump(mode="json") for m in simulation.messages]
    assert progress_of_simulation(simulation, t, "telecom") == measure_progress(
        t,
        "telecom",
        live_environment(t, "telecom", [*gold_calls(t), ("assistant", TRANSFER_TOOL, {"summary": "help"})]),
        as_dicts,
    )


def test_episode_progress_never_raises():
    t = task(DATA_AND_ROAMING)
    broken = episode_progress(t, "no_such_domain", None, [])
    assert set(broken) == {"error"}
    assert compute_progress_score(None, broken) is None  # the post-process then falls back to the checks credit
    fine = episode_progress(t, "telecom", None, [])
    assert fine["done_actions"] == 0.0 and fine["collateral"] == 0


@pytest.mark.parametrize(("domain", "task_id"), [("airline", "23"), ("retail", "16")])
def test_airline_and_retail_use_the_database_as_the_state(domain, task_id):
    t = task(task_id, domain)
    target = progress_target(t, domain)
    assert set(target.base) == {"db"} and target.initialized == {}  # no user database, no initialization
    gold = gold_calls(t)
    nothing = measure_progress(t, domain, None)
    full = measure_progress(t, domain, live_environment(t, domain, gold))
    assert target.final and nothing.done_actions == 0.0 and nothing.target_actions >= 1
    assert full.done_actions == full.target_actions and full.collateral == 0
    first_write = min(target.counted)
    first = measure_progress(t, domain, live_environment(t, domain, gold[: first_write + 1]))
    assert first.done_actions == 1.0 < first.target_actions


# ---------------------------------------------------------------------------------------------------------------
# The engine hands the figures over
# ---------------------------------------------------------------------------------------------------------------


def test_engine_measures_its_live_environment_and_the_adapter_copies_it(tok):
    from examples.slime_standin import Sample
    from rollout.engine import AgentTurn, EpisodeConfig, run_episode
    from rollout.generate_with_tau import fill_sample
    from rollout.scripted import ScriptedPolicyAgent, ScriptedUser, gold_agent_turns

    t = task(DATA_AND_ROAMING)
    turns = gold_agent_turns(t, solo_mode=False)

    class ScriptThenBudget(ScriptedPolicyAgent):
        """These turns, then out of budget: the episode ends truncated."""

        async def act(self, new_messages: list[dict], turn_index: int) -> AgentTurn:
            if turn_index >= len(self.turns):
                return AgentTurn(finish_reason="budget")
            return await super().act(new_messages, turn_index)

    async def episode(script):
        agent = ScriptThenBudget("gold", t)
        agent.turns = script
        return await run_episode(t, agent, ScriptedUser(t), EpisodeConfig(domain="telecom"))

    full = asyncio.run(episode(turns))
    assert full.reward == 1.0 and full.progress["done_actions"] == full.progress["target_actions"] == 2
    cut = asyncio.run(episode([turns[0], turns[-1]]))  # one fix, then the agent stops talking: truncated
    assert cut.termination_reason == "max_tokens" and cut.progress["done_actions"] == 1.0
    from tau2.data_model.simulation import SimulationRun, TerminationReason

    replayed = SimulationRun(
        id="x",
        task_id=t.id,
        start_time="",
        end_time="",
        duration=0.0,
        termination_reason=TerminationReason.MAX_STEPS,
        messages=cut.messages,
    )
    assert progress_of_simulation(replayed, t, "telecom").model_dump(mode="json") == cut.progress
    sample = fill_sample(Sample(prompt="", metadata={}), cut, tok)
    assert sample.metadata["progress"] == cut.progress


# ---------------------------------------------------------------------------------------------------------------
# Properties on every telecom train and test task
# ---------------------------------------------------------------------------------------------------------------

# Gold steps the end state cannot show, and why (reported in docs/partial_credit.md).
STATELESS_STEPS = {
    TRANSFER_TOOL: "the transfer changes no state; on the 20 transfer-only tasks it is the whole task (k = n)",
    "reboot_device": "a second reboot after everything it applies has been applied changes nothing",
}


def test_k_of_n_gold_actions_scores_between_k_minus_1_and_n_on_every_telecom_task():
    tasks = telecom_tasks()
    assert len(tasks) == 114
    strict = ties = 0
    for t in tasks:
        gold = gold_calls(t)
        target = progress_target(t, "telecom")
        episodes = [play(t, "telecom", gold[:k]) for k in range(len(gold) + 1)]
        scores = [shaped(metadata) for metadata in episodes]
        assert scores[-1] == 1.0 + NEW.alpha, t.id  # the gold actions succeed
        for k in range(1, len(gold) + 1):
            if k < len(gold):
                assert scores[k] < scores[-1], (t.id, k)
                assert shape_reward(episodes[k], 0.0, NEW)[1] < 1.0, (t.id, k)  # the credit itself, not only success
            if (k - 1) in target.counted:
                assert scores[k] > scores[k - 1], (t.id, k, scores)
                strict += 1
            else:
                assert gold[k - 1][1] in STATELESS_STEPS, (t.id, k, gold[k - 1])
                assert scores[k] >= scores[k - 1], (t.id, k, scores)
                ties += 1
    assert (strict, ties) == (sum(len(gold_calls(t)) for t in tasks) - 24, 24)


def test_spam_and_every_tool_earn_credit_only_for_real_fixes_on_every_telecom_task():
    """Random tool spam (12 calls) and every tool once, on every telecom task: a failing run never scores above doing
    nothing unless it performed gold fixes, and then its stray changes cost it (each stray field cancels one gold
    action's worth). Successes are tau2's verdict (on the transfer-only tasks any run that transfers and leaves the
    phone without service succeeds; short tasks are sometimes fixed by chance) and are left out."""
    rng = random.Random(7)
    runs = above = ungradable = 0
    above_by_kind = {"spam": 0, "every": 0}
    for t in telecom_tasks():
        nothing = shaped(play(t, "telecom", []))
        for kind, calls in (
            ("spam", spam_calls(t, "telecom", rng, 12)),
            ("every", every_tool_calls(t, "telecom", rng)),
        ):
            metadata = play(t, "telecom", calls)
            if metadata is None:  # tau2 cannot replay it (refuel_data's random bill id), as in the engine
                ungradable += 1
                continue
            if metadata["reward"] == 1.0:  # tau2's verdict: success outranks any failure, whatever it did
                continue
            runs += 1
            figures = metadata["progress"]
            score = shaped(metadata)
            if score > nothing:
                above += 1
                above_by_kind[kind] += 1
                assert figures["done_actions"] > 0, (t.id, kind, figures)
                fixes_only = NEW.alpha * figures["done_actions"] / figures["target_actions"]
                assert score <= fixes_only, (t.id, kind, figures)
                assert score < fixes_only or figures["collateral"] == 0
    assert runs > 150 and ungradable < 20
    assert above_by_kind["every"] <= 3, above_by_kind  # measured: docs/partial_credit.md
    assert above <= 0.1 * runs, (above, runs)


def test_old_credit_cannot_see_half_a_fix():
    """The problem the progress credit solves: on telecom, the checks credit scores half the gold fixes like none."""
    t = task("[mobile_data_issue]airplane_mode_on|data_mode_off[PERSONA:None]")
    gold = gold_calls(t)
    nothing, half = play(t, "telecom", []), play(t, "telecom", gold[:1])  # airplane mode off, mobile data still off
    assert shaped(half, OLD) == shaped(nothing, OLD)
    assert shaped(half) > shaped(nothing)


def test_truncated_episodes_keep_the_discount():
    t = task(APN_AND_BILL)
    gold = gold_calls(t)
    for k in (2, 5):
        ended = play(t, "telecom", gold[:k])
        cut = play(t, "telecom", gold[:k], termination="max_steps")
        assert cut["progress"] == ended["progress"]
        assert shaped(cut) == pytest.approx(NEW.truncation_discount * shaped(ended))


# ---------------------------------------------------------------------------------------------------------------
# action_shares on synthetic gold paths (hypothesis)
# ---------------------------------------------------------------------------------------------------------------

FIELDS = ("a", "b", "c", "d")
programs = st.lists(
    st.dictionaries(st.sampled_from(FIELDS), st.integers(0, 3), min_size=0, max_size=3), min_size=1, max_size=6
)


def _states(initial: dict[str, int], program: list[dict[str, int]]) -> list[dict[str, int]]:
    states = [dict(initial)]
    for assignment in program:
        states.append({**states[-1], **assignment})
    return states


def _no_revisits(states: list[dict[str, int]]) -> bool:
    """No field takes a value it had earlier on the path, except going back to its initial value at its last
    change (telecom's reset flag, retail's changed-back address). Without this, two prefixes can end in the same
    state (then no state-based credit can tell them apart) or a later action can look done before it is."""
    for name in FIELDS:
        values = [states[0][name]]
        for state in states[1:]:
            if state[name] != values[-1]:
                values.append(state[name])
        changed = values[1:]
        if len(set(changed)) < len(changed) or values[0] in changed[:-1]:
            return False
    return True


@settings(max_examples=500, deadline=None)
@given(st.fixed_dictionaries({name: st.integers(0, 3) for name in FIELDS}), programs)
def test_prefixes_of_any_gold_path_score_in_order(initial, program):
    """Any sequence of field assignments as gold actions (with no value revisited, see `_no_revisits`): each prefix
    scores at least the one before, strictly more when its last action is one the end state shows, and only the
    whole path scores full marks."""
    states = _states(initial, program)
    assume(_no_revisits(states))
    steps = [{(k,): v for k, v in states[i + 1].items() if states[i][k] != v} for i in range(len(program))]
    initial_values = {(k,): v for k, v in initial.items()}

    def shares(state):
        return action_shares(steps, initial_values, lambda path: state[path[0]])

    counted = [i for i, share in enumerate(shares(states[-1])) if share is not None]
    assert all(shares(states[-1])[i] == 1.0 for i in counted)

    def done(state):
        values = shares(state)
        return sum(values[i] or 0.0 for i in counted)

    scores = [done(state) for state in states]
    for k in range(1, len(states)):
        assert scores[k] >= scores[k - 1]
        if (k - 1) in counted:
            assert scores[k] > scores[k - 1]
    assert scores[0] == 0.0 or not counted
    for k in range(len(states) - 1):
        if any(i >= k for i in counted):
            assert scores[k] < len(counted)


# ---------------------------------------------------------------------------------------------------------------
# A real model's rollouts (slow)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_model_rollouts_carry_progress_figures_to_the_post_process(
    cpu_policy_server, smollm2_model_dir, monkeypatch
):
    """SmolLM2-135M through slime's generate function and the reward post-process: each sample's progress figures are
    those of its own trajectory replayed on a fresh environment, and the progress credit is the one used."""
    from tau2.data_model.simulation import SimulationRun

    from examples.slime_standin import Sample, slime_args, slime_sampling_params
    from reward.tau2_reward_shaping import tau2_reward_post_process
    from rollout import generate_with_tau

    budget = 96
    for name, value in {
        "TAU2_USER_KIND": "scripted",
        "TAU2_POLICY_VARIANT": "compact",
        "TAU2_MAX_TURNS": "2",
        "TAU2_KEEP_TRAJECTORY": "1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TAU2_POLICY_URL", raising=False)
    monkeypatch.delenv("TAU2_PARTIAL_CREDIT", raising=False)
    t = task(DATA_AND_ROAMING)
    port = int(cpu_policy_server.rsplit(":", 1)[1])
    args = slime_args(str(smollm2_model_dir), port, rollout_max_response_len=budget, n_samples_per_prompt=2)
    samples = [
        Sample(group_index=0, index=i, prompt=0, metadata={"domain": "telecom", "task_id": t.id}) for i in range(2)
    ]

    async def run_all():
        try:
            return await asyncio.gather(
                *(generate_with_tau.generate(args, s, slime_sampling_params(budget)) for s in samples)
            )
        finally:
            await generate_with_tau.close_clients()

    out = asyncio.run(run_all())
    tau2_reward_post_process(args, out)
    for sample in out:
        metadata = sample.metadata
        assert sample.status in (Sample.Status.COMPLETED, Sample.Status.TRUNCATED), metadata.get("failure")
        assert metadata["partial_credit"] == "progress" and "state" in metadata["partial_components"]
        simulation = SimulationRun.model_validate(
            {
                "id": "replay",
                "task_id": t.id,
                "start_time": "",
                "end_time": "",
                "duration": 0.0,
                "termination_reason": "max_steps",
                "messages": metadata["tau2_messages"],
            }
        )
        assert progress_of_simulation(simulation, t, "telecom").model_dump(mode="json") == metadata["progress"]
        assert metadata["progress"]["target_actions"] == len(progress_target(t, "telecom").counted)
