"""rollout.scripted: the gold agent script and the scripted customer, run through tau2's own Orchestrator and
scored by tau2's own evaluator."""

from __future__ import annotations

import asyncio

import pytest

from rollout.scripted import (
    CLOSING_MESSAGE,
    SCRIPTED_POLICIES,
    SHORTCUT_POLICIES,
    TRANSFER_MESSAGE,
    UNCLEAR_REPLY,
    ScriptedPolicyAgent,
    ScriptedUser,
    ScriptedUserLogic,
    first_person,
    gold_agent_turns,
    opening_message,
    policies_for_domain,
    scripted_policy,
    solo_supported,
    turn_to_message,
)
from rollout.task_store import get_task_store
from rollout.tau2_setup import import_tau2
from tests.tau2_reference import Tau2ScriptedUser, run_tau2_orchestrator

registry = import_tau2()

from tau2.agent.base import LocalAgent  # noqa: E402
from tau2.data_model.message import AssistantMessage, MultiToolMessage, ToolMessage  # noqa: E402
from tau2.data_model.simulation import TerminationReason  # noqa: E402
from tau2.orchestrator.orchestrator import DEFAULT_FIRST_AGENT_MESSAGE, Orchestrator  # noqa: E402

NORMAL_STOPS = {TerminationReason.USER_STOP, TerminationReason.AGENT_STOP}


@pytest.fixture(scope="module")
def tasks():
    store = get_task_store()
    return store.tasks("telecom", "train") + store.tasks("telecom", "test")


def task_by_id(tasks, task_id):
    return next(task for task in tasks if task.id == task_id)


def agent_says(text: str) -> AssistantMessage:
    return AssistantMessage(role="assistant", content=text)


def check_gold_run(task, solo_mode: bool) -> None:
    simulation = run_tau2_orchestrator(task, solo_mode=solo_mode)
    info = simulation.reward_info
    assert simulation.termination_reason in NORMAL_STOPS, (task.id, simulation.termination_reason)
    assert info.reward == 1.0, (task.id, solo_mode, info.model_dump(mode="json"))
    assert info.env_assertions and all(check.met for check in info.env_assertions), task.id
    assert all(check.action_match for check in info.action_checks or []), task.id
    # Every gold action was performed, by the right side in dual mode.
    performed = [
        (call.name, call.arguments, call.requestor)
        for message in simulation.messages
        if not isinstance(message, ToolMessage) and message.tool_calls
        for call in message.tool_calls
    ]
    expected = [
        (a.name, a.arguments, "assistant" if solo_mode else a.requestor) for a in task.evaluation_criteria.actions
    ]
    assert performed == expected, task.id
    assert not any(isinstance(m, ToolMessage) and m.error for m in simulation.messages), task.id


def test_every_task_reaches_reward_1_in_dual_control(tasks):
    assert len(tasks) == 114
    for task in tasks:
        check_gold_run(task, solo_mode=False)


def test_every_solo_capable_task_reaches_reward_1_in_solo_mode(tasks):
    solo_tasks = [task for task in tasks if solo_supported(task)]
    assert len(solo_tasks) == 114  # every telecom task has an initial state, which tau2's solo agent accepts
    for task in solo_tasks:
        check_gold_run(task, solo_mode=True)


def test_dual_trajectory_shape(tasks):
    task = task_by_id(
        tasks, "[mobile_data_issue]bad_network_preference|bad_vpn|user_abroad_roaming_disabled_on[PERSONA:None]"
    )
    simulation = run_tau2_orchestrator(task, solo_mode=False)
    assert simulation.termination_reason == TerminationReason.USER_STOP
    roles = [m.role for m in simulation.messages]
    # greeting, opening; two instruct -> user call -> result -> report; agent call -> result; closing; stop
    assert roles == ["assistant", "user"] + ["assistant", "user", "tool", "user"] * 2 + ["assistant", "tool"] + [
        "assistant",
        "user",
    ]
    messages = simulation.messages
    assert messages[0].content == DEFAULT_FIRST_AGENT_MESSAGE.content
    assert messages[3].tool_calls[0].name == "set_network_mode_preference"
    assert messages[3].tool_calls[0].requestor == "user" and messages[3].tool_calls[0].id == "user_call_1_0"
    assert messages[5].content.startswith("Done. Here is what my phone shows:")
    assert messages[10].tool_calls[0].id == "call_2_0" and messages[10].tool_calls[0].name == "enable_roaming"
    assert messages[12].content == CLOSING_MESSAGE and messages[13].content == "###STOP###"


def test_runs_are_deterministic(tasks):
    task = tasks[5]
    runs = [run_tau2_orchestrator(task, solo_mode=False) for _ in range(2)]
    first, second = ([(m.role, m.content, getattr(m, "tool_calls", None)) for m in run.messages] for run in runs)
    assert first == second


def test_gold_agent_turns(tasks):
    task = task_by_id(
        tasks, "[mobile_data_issue]bad_network_preference|bad_vpn|user_abroad_roaming_disabled_on[PERSONA:None]"
    )
    dual = gold_agent_turns(task, solo_mode=False)
    assert len(dual) == 4
    assert dual[0].content == (
        "Please set network mode preference on your phone, with mode set to 4g_5g_preferred "
        '(set_network_mode_preference, arguments: {"mode": "4g_5g_preferred"}).'
    )
    assert dual[1].content == "Please disconnect vpn on your phone (disconnect_vpn)." and not dual[1].tool_calls
    assert dual[2].content is None
    assert dual[2].tool_calls == [{"name": "enable_roaming", "arguments": {"customer_id": "C1001", "line_id": "L1002"}}]
    assert dual[3].content == CLOSING_MESSAGE

    solo = gold_agent_turns(task, solo_mode=True)
    assert [turn.tool_calls[0]["name"] for turn in solo] == [
        "set_network_mode_preference",
        "disconnect_vpn",
        "enable_roaming",
        "done",
    ]
    assert all(turn.content is None and len(turn.tool_calls) == 1 for turn in solo)

    transfer = task_by_id(tasks, "[service_issue]lock_sim_card_pin|overdue_bill_suspension[PERSONA:Easy]")
    turns = gold_agent_turns(transfer, solo_mode=False)
    assert turns[0].tool_calls[0]["name"] == "transfer_to_human_agents" and turns[-1].content == TRANSFER_MESSAGE

    message = turn_to_message(dual[2], 7)
    assert message.tool_calls[0].id == "call_7_0" and message.tool_calls[0].requestor == "assistant"
    # the script holds copies: mutating a turn never touches the task
    dual[2].tool_calls[0]["arguments"]["line_id"] = "changed"
    assert task.evaluation_criteria.actions[2].arguments["line_id"] == "L1002"


def test_transfer_ends_with_the_transfer_token(tasks):
    task = task_by_id(tasks, "[service_issue]lock_sim_card_pin|overdue_bill_suspension[PERSONA:Easy]")
    simulation = run_tau2_orchestrator(task, solo_mode=False)
    assert [m.content for m in simulation.messages[-2:]] == [TRANSFER_MESSAGE, "###TRANSFER###"]
    assert simulation.reward_info.reward == 1.0
    solo = run_tau2_orchestrator(task, solo_mode=True)
    assert solo.termination_reason == TerminationReason.AGENT_STOP
    assert solo.messages[-1].content == "###STOP###" and solo.messages[-1].tool_calls is None


def test_user_logic_step_by_step(tasks):
    task = task_by_id(tasks, "[mobile_data_issue]airplane_mode_on|data_mode_off[PERSONA:None]")
    logic = ScriptedUserLogic(task)
    opening = logic.respond(agent_says("Hi! How can I help you today?"))
    assert opening.content == opening_message(task)
    assert opening.content.startswith("Hi! My mobile data is not working properly.")
    assert "I am John Smith with phone number 555-123-2002." in opening.content

    assert logic.respond(agent_says("Could you restart the app?")).content == UNCLEAR_REPLY
    # "toggle data saver mode" names another tool: it is not a request to toggle data
    assert logic.respond(agent_says("Please toggle data saver mode (toggle_data_saver_mode).")).content == UNCLEAR_REPLY

    call = logic.respond(agent_says("Could you toggle airplane mode?"))
    assert call.content is None
    assert [(c.id, c.name, c.arguments, c.requestor) for c in call.tool_calls] == [
        ("user_call_3_0", "toggle_airplane_mode", {}, "user")
    ]
    report = logic.respond(
        ToolMessage(id="user_call_3_0", role="tool", content="Airplane Mode is now OFF.", requestor="user")
    )
    assert report.content == "Done. Here is what my phone shows: Airplane Mode is now OFF."
    assert not logic.done

    call = logic.respond(agent_says("Now please TOGGLE DATA."))
    assert call.tool_calls[0].name == "toggle_data"
    failed = ToolMessage(id="x", role="tool", content="Error: no SIM", requestor="user", error=True)
    assert logic.respond(failed).content == "I tried that, but my phone showed an error: Error: no SIM"
    assert logic.done
    assert logic.respond(agent_says("Anything else?")).content == "###STOP###"


def test_user_logic_picks_the_action_whose_arguments_are_named(tasks):
    task = next(
        t
        for t in tasks
        if [a.arguments.get("permission") for a in t.evaluation_criteria.actions if a.name == "grant_app_permission"]
        == ["sms", "storage"]
    )
    logic = ScriptedUserLogic(task)
    logic.respond(agent_says("Hi!"))
    call = logic.respond(agent_says("Please grant app permission with permission set to storage for messaging."))
    assert call.tool_calls[0].arguments == {"app_name": "messaging", "permission": "storage"}
    call = logic.respond(agent_says("Now grant_app_permission again."))
    assert call.tool_calls[0].arguments == {"app_name": "messaging", "permission": "sms"}


def test_user_reports_every_result_of_a_multi_tool_message(tasks):
    logic = ScriptedUserLogic(tasks[0])
    results = MultiToolMessage(
        role="tool",
        tool_messages=[
            ToolMessage(id="a", role="tool", content="one", requestor="user"),
            ToolMessage(id="b", role="tool", content="two", requestor="user"),
        ],
    )
    assert (
        logic.respond(results).content
        == "Done. Here is what my phone shows: one Done. Here is what my phone shows: two"
    )


def test_user_transfers_when_told(tasks):
    logic = ScriptedUserLogic(tasks[0])
    logic.respond(agent_says("Hi!"))
    assert logic.respond(agent_says(TRANSFER_MESSAGE)).content == "###TRANSFER###"


class SilentAgent(LocalAgent):
    """An agent that never names anything the user could do."""

    def get_init_state(self, message_history=None):
        return list(message_history or [])

    def generate_next_message(self, message, state):
        return AssistantMessage(role="assistant", content="Let me look into that for you.", cost=0.0), state


def test_an_agent_that_names_nothing_gets_the_fixed_reply(tasks):
    task = tasks[0]
    environment = registry.get_env_constructor("telecom")()
    orchestrator = Orchestrator(
        domain="telecom",
        agent=SilentAgent(tools=[], domain_policy=""),
        user=Tau2ScriptedUser(task),
        environment=environment,
        task=task,
        max_steps=12,
    )
    simulation = orchestrator.run()
    assert simulation.termination_reason == TerminationReason.MAX_STEPS
    user_texts = [m.content for m in simulation.messages if m.role == "user"]
    assert user_texts[0] == opening_message(task)
    assert len(user_texts) >= 4 and all(text == UNCLEAR_REPLY for text in user_texts[1:])


def test_scripted_user_is_an_async_episode_user(tasks):
    user = ScriptedUser(tasks[0])

    async def talk():
        first = await user.respond(agent_says("Hi! How can I help you today?"))
        second = await user.respond(agent_says("Please toggle airplane mode on your phone (toggle_airplane_mode)."))
        return first, second

    first, second = asyncio.run(talk())
    assert first.latency_s == 0.0 and first.prompt_tokens == first.completion_tokens == 0
    assert second.message.tool_calls[0].name == "toggle_airplane_mode"


def test_first_person():
    assert first_person("You are John Smith.") == "I am John Smith."
    assert first_person("Your phone has been showing 'No Service'.") == "My phone has been showing 'No Service'."
    assert first_person("You mobile data is slow. You want to fix it.") == "My mobile data is slow. I want to fix it."
    assert first_person("using your messaging app") == "using my messaging app"


# ------------------------------------------------------------------------------------------- shortcut policies


def _play_in_engine(task, policy):
    from rollout.engine import EpisodeConfig, prepare_episode, run_episode

    config = EpisodeConfig(domain="telecom", max_steps=200)

    async def play():
        setup = await prepare_episode(task, config)
        return await run_episode(task, ScriptedPolicyAgent(policy, task), ScriptedUser(task), config, env=setup.env)

    return asyncio.run(play())


def test_shortcut_policies_on_telecom_test_through_the_engine_and_tau2(tasks):
    """Each scripted policy on the 40 telecom test tasks with the scripted user: the engine and tau2's own
    Orchestrator reach the same verdict on every task, and the shortcut scores are what the task data predicts."""
    test_tasks = get_task_store().tasks("telecom", "test")
    assert len(test_tasks) == 40
    transfer_only = {
        t.id for t in test_tasks if [a.name for a in t.evaluation_criteria.actions] == ["transfer_to_human_agents"]
    }
    assert len(transfer_only) == 12
    solved: dict[str, set[str]] = {}
    for policy in SCRIPTED_POLICIES:
        solved[policy] = set()
        for task in test_tasks:
            result = _play_in_engine(task, policy)
            reference = run_tau2_orchestrator(task, solo_mode=False, max_steps=200, policy=policy)
            assert result.reward == reference.reward_info.reward, (policy, task.id)
            assert result.termination_reason == reference.termination_reason.value, (policy, task.id)
            if result.success:
                solved[policy].add(task.id)
    assert len(solved["gold"]) == 40
    assert solved["always_transfer"] == transfer_only  # 12/40: the transfer's arguments are never compared
    assert solved["do_nothing"] == set()
    # The shotgun transfers on "No Service" (the 12 again) and gets more through asking for every fix by name.
    assert transfer_only < solved["shotgun"] and len(solved["shotgun"]) == 24
    assert not any(t.startswith("[service_issue]") for t in solved["shotgun"] - transfer_only)


def test_shortcut_plans_read_only_the_first_user_message(tasks):
    no_service = "Hi! My phone has been showing 'No Service' for the past few hours."
    mms = "Hi! I am unable to send MMS messages using my messaging app."
    for policy in SHORTCUT_POLICIES:  # no task: a shortcut must not need one
        assert scripted_policy(policy).plan(None, no_service)
    shotgun = scripted_policy("shotgun").plan(None, no_service)
    assert [c["name"] for t in shotgun for c in t.tool_calls] == ["transfer_to_human_agents"]
    assert shotgun[-1].content == TRANSFER_MESSAGE
    plan = scripted_policy("shotgun").plan(None, mms)
    asks = [t.content for t in plan if t.content and not t.tool_calls][:-1]
    assert len(asks) == 12 and all(t.startswith("Please ") for t in asks)
    assert asks.index(next(a for a in asks if "reset_apn_settings" in a)) < asks.index(
        next(a for a in asks if "reboot_device" in a)
    )
    calls = [c for t in plan for c in t.tool_calls]
    assert calls == [
        {"name": "refuel_data", "arguments": {"customer_id": "C1001", "line_id": "L1002", "gb_amount": 2.0}},
        {"name": "enable_roaming", "arguments": {"customer_id": "C1001", "line_id": "L1002"}},
    ]
    assert plan[-1].content == CLOSING_MESSAGE
    assert policies_for_domain("airline") == ["gold", "always_transfer", "do_nothing"]  # the shotgun is telecom's
    with pytest.raises(ValueError, match="unknown scripted policy 'nope'"):
        scripted_policy("nope")
    with pytest.raises(ValueError, match="solo mode plays the gold policy only"):
        run_tau2_orchestrator(tasks[0], solo_mode=True, policy="shotgun")


def test_a_shortcut_repeats_its_last_turn(tasks):
    agent = ScriptedPolicyAgent("always_transfer", tasks[0])

    async def turns():
        opening = [{"role": "user", "content": "Hi! My phone has been showing 'No Service'."}]
        return [await agent.act(opening if i == 0 else [], i) for i in range(4)]

    played = asyncio.run(turns())
    assert played[0].message.tool_calls[0].name == "transfer_to_human_agents"
    assert played[0].message.tool_calls[0].id == "call_0_0" and "transfer_to_human_agents" in played[0].raw_text
    assert [t.message.content for t in played[1:]] == [TRANSFER_MESSAGE] * 3
