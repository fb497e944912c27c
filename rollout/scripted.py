"""Deterministic gold-path players with no LLM: the task's gold actions played as an agent script, and a scripted
customer who performs its gold phone actions when the agent asks for them.

Used for gold SFT traces, the evaluator's shortcut baselines and tests (tests/tau2_reference.py plays the same
players through tau2's own Orchestrator and evaluator: the reference the engine is compared with).

The scripted user (`ScriptedUserLogic`):
- replies to the greeting with its reason for calling and what it knows (from the task's user instructions);
- on an agent message that names one of its pending gold user actions (the tool name, or its words with spaces),
  performs that action as a tool call (requestor "user"), with the gold arguments; when several pending actions
  use that tool, the one whose argument values the message mentions. With the gold agent this is always the next
  pending action; another agent may ask for them in another order;
- if the message names none of them while actions are pending: "I'm not sure what you want me to do on my phone.
  Could you tell me exactly?";
- after a tool result, reports it in plain text;
- once all its gold actions are done and the agent writes again: "###STOP###" ("###TRANSFER###" if the agent says
  it is transferring the call).

Shortcut policies (`SCRIPTED_POLICIES`, played by `ScriptedPolicyAgent` through the engine): what a trivial policy
scores on the same tasks and user simulator. Only `gold` reads the task; the others see nothing but the user's first
message:
- `gold`: the task's gold actions (`gold_agent_turns`), the ceiling;
- `always_transfer`: calls transfer_to_human_agents and says tau2's transfer line;
- `shotgun`: transfers when the user reports "No Service"; otherwise asks the user for every phone fix by name, one
  per turn, then calls refuel_data and enable_roaming with the ids every telecom task uses (telecom only);
- `do_nothing`: says goodbye, every turn.
Past the end of its plan a policy repeats its last turn, as tau2's scripted agents do.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

from rollout.engine import AgentTurn, IncomingMessage, UserReply
from rollout.tau2_setup import import_tau2
from rollout.tool_format import format_assistant_turn

import_tau2()

from tau2.agent.llm_agent import LLMSoloAgent  # noqa: E402
from tau2.data_model.message import (  # noqa: E402
    AssistantMessage,
    MultiToolMessage,
    ToolCall,
    ToolMessage,
    UserMessage,
)
from tau2.data_model.tasks import Action, StructuredUserInstructions, Task  # noqa: E402
from tau2.user.base import STOP, TRANSFER  # noqa: E402

CLOSING_MESSAGE = "Is there anything else I can help you with today?"
# tau2's telecom policy: after transfer_to_human_agents the agent sends exactly this.
TRANSFER_MESSAGE = "YOU ARE BEING TRANSFERRED TO A HUMAN AGENT. PLEASE HOLD ON."
TRANSFER_TOOL = "transfer_to_human_agents"
UNCLEAR_REPLY = "I'm not sure what you want me to do on my phone. Could you tell me exactly?"
SOLO_STOP_TOOL = LLMSoloAgent.STOP_FUNCTION_NAME


class ScriptedTurn(BaseModel):
    content: str | None = None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list, description='each {"name", "arguments"}')


def gold_actions(task: Task) -> list[Action]:
    criteria = task.evaluation_criteria
    return list(criteria.actions or []) if criteria is not None else []


def tool_words(name: str) -> str:
    return name.replace("_", " ")


def user_action_instruction(action: Action) -> str:
    """What the agent says to have the user perform a phone action; it names the tool and, if any, its arguments
    (in words and as JSON)."""
    words = tool_words(action.name)
    if not action.arguments:
        return f"Please {words} on your phone ({action.name})."
    described = " and ".join(f"{tool_words(key)} set to {value}" for key, value in action.arguments.items())
    return f"Please {words} on your phone, with {described} ({action.name}, arguments: {json.dumps(action.arguments)})."


def gold_agent_turns(task: Task, solo_mode: bool) -> list[ScriptedTurn]:
    """The agent's script from the gold actions, in order.

    Dual: an assistant action is a turn with that one tool call; a user action is an instruction to the user; then a
    closing text turn (tau2's transfer message when the last action is a transfer). Solo: every gold action is a
    tool call turn (the solo agent holds the user's tools too), then a call to `done`.
    """
    turns: list[ScriptedTurn] = []
    actions = gold_actions(task)
    for action in actions:
        if solo_mode or action.requestor == "assistant":
            call = {"name": action.name, "arguments": copy.deepcopy(action.arguments)}
            turns.append(ScriptedTurn(tool_calls=[call]))
        else:
            turns.append(ScriptedTurn(content=user_action_instruction(action)))
    if solo_mode:
        turns.append(ScriptedTurn(tool_calls=[{"name": SOLO_STOP_TOOL, "arguments": {}}]))
    elif actions and actions[-1].name == TRANSFER_TOOL:
        turns.append(ScriptedTurn(content=TRANSFER_MESSAGE))
    else:
        turns.append(ScriptedTurn(content=CLOSING_MESSAGE))
    return turns


def turn_to_message(turn: ScriptedTurn, turn_index: int) -> AssistantMessage:
    """A script turn as tau2's AssistantMessage; tool call ids are `call_{turn_index}_{k}`."""
    calls = [
        ToolCall(
            id=f"call_{turn_index}_{k}",
            name=call["name"],
            arguments=copy.deepcopy(call.get("arguments") or {}),
            requestor="assistant",
        )
        for k, call in enumerate(turn.tool_calls)
    ]
    return AssistantMessage(role="assistant", content=turn.content, tool_calls=calls or None, cost=0.0)


# ------------------------------------------------------------------------------------------- shortcut policies

GOODBYE_MESSAGE = "Thank you for contacting us. Goodbye!"
# The ids and amount every telecom task's agent actions use (the customer of every task is the same).
TELECOM_CUSTOMER_ID, TELECOM_LINE_ID, TELECOM_REFUEL_GB = "C1001", "L1002", 2.0
# Every phone fix of telecom's gold actions, in an order that works when all are needed (APN reset before reboot).
TELECOM_PHONE_FIXES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("toggle_airplane_mode", {}),
    ("set_network_mode_preference", {"mode": "4g_5g_preferred"}),
    ("disconnect_vpn", {}),
    ("toggle_data", {}),
    ("toggle_data_saver_mode", {}),
    ("toggle_roaming", {}),
    ("toggle_wifi_calling", {}),
    ("grant_app_permission", {"app_name": "messaging", "permission": "sms"}),
    ("grant_app_permission", {"app_name": "messaging", "permission": "storage"}),
    ("reseat_sim_card", {}),
    ("reset_apn_settings", {}),
    ("reboot_device", {}),
)
NO_SERVICE = re.compile(r"\bno service\b", re.IGNORECASE)


def _transfer_turns() -> list[ScriptedTurn]:
    summary = "The customer needs help that I cannot give."
    return [
        ScriptedTurn(tool_calls=[{"name": TRANSFER_TOOL, "arguments": {"summary": summary}}]),
        ScriptedTurn(content=TRANSFER_MESSAGE),
    ]


def gold_policy(task: Task, opening: str) -> list[ScriptedTurn]:
    """The ceiling: the task's gold actions (it alone reads the task)."""
    return gold_agent_turns(task, solo_mode=False)


def always_transfer_policy(task: Task, opening: str) -> list[ScriptedTurn]:
    return _transfer_turns()


def do_nothing_policy(task: Task, opening: str) -> list[ScriptedTurn]:
    return [ScriptedTurn(content=GOODBYE_MESSAGE)]


def shotgun_policy(task: Task, opening: str) -> list[ScriptedTurn]:
    """Telecom: a 2-way lookup on the user's first message, then every fix there is, with the constant ids."""
    if NO_SERVICE.search(opening):
        return _transfer_turns()
    turns = [
        ScriptedTurn(content=user_action_instruction(Action(action_id=f"fix_{i}", name=name, arguments=arguments)))
        for i, (name, arguments) in enumerate(TELECOM_PHONE_FIXES)
    ]
    ids = {"customer_id": TELECOM_CUSTOMER_ID, "line_id": TELECOM_LINE_ID}
    refuel = {"name": "refuel_data", "arguments": {**ids, "gb_amount": TELECOM_REFUEL_GB}}
    turns.append(ScriptedTurn(tool_calls=[refuel]))
    turns.append(ScriptedTurn(tool_calls=[{"name": "enable_roaming", "arguments": dict(ids)}]))
    turns.append(ScriptedTurn(content=CLOSING_MESSAGE))
    return turns


class ScriptedPolicy(BaseModel):
    """A scripted agent policy: `plan(task, user's first message)` -> its turns; `domains` None: every domain."""

    model_config = {"arbitrary_types_allowed": True}

    name: str
    plan: Callable[[Task, str], list[ScriptedTurn]]
    description: str
    domains: tuple[str, ...] | None = None


SCRIPTED_POLICIES: dict[str, ScriptedPolicy] = {
    policy.name: policy
    for policy in (
        ScriptedPolicy(name="gold", plan=gold_policy, description="the task's gold actions (ceiling)"),
        ScriptedPolicy(
            name="always_transfer",
            plan=always_transfer_policy,
            description="transfer_to_human_agents, then the transfer line",
        ),
        ScriptedPolicy(
            name="shotgun",
            plan=shotgun_policy,
            description="transfer on 'No Service'; else ask for every phone fix by name, refuel, enable roaming",
            domains=("telecom",),
        ),
        ScriptedPolicy(name="do_nothing", plan=do_nothing_policy, description="says goodbye"),
    )
}
SHORTCUT_POLICIES: tuple[str, ...] = ("always_transfer", "shotgun", "do_nothing")  # the trivial ones (not gold)


def scripted_policy(name: str) -> ScriptedPolicy:
    if name not in SCRIPTED_POLICIES:
        raise ValueError(f"unknown scripted policy '{name}'; valid: {', '.join(SCRIPTED_POLICIES)}")
    return SCRIPTED_POLICIES[name]


def policies_for_domain(domain: str, names: tuple[str, ...] | None = None) -> list[str]:
    """The scripted policies (default: all) defined for the domain."""
    chosen = names if names is not None else tuple(SCRIPTED_POLICIES)
    return [n for n in chosen if scripted_policy(n).domains is None or domain in scripted_policy(n).domains]


class ScriptedPolicyAgent:
    """A scripted policy as an engine agent (EpisodeAgent): no LLM; the plan is made on the first turn from the
    user's first message (only `gold` reads the task). Solo mode has no user: it plays gold only."""

    def __init__(self, policy: str, task: Task, solo_mode: bool = False) -> None:
        self.policy = scripted_policy(policy)
        self.task = task
        if solo_mode and policy != "gold":
            raise ValueError(f"solo mode plays the gold policy only, not '{policy}'")
        self.turns: list[ScriptedTurn] | None = gold_agent_turns(task, solo_mode=True) if solo_mode else None

    async def act(self, new_messages: list[dict[str, Any]], turn_index: int) -> AgentTurn:
        if self.turns is None:
            opening = " ".join(str(m.get("content") or "") for m in new_messages if m.get("role") == "user")
            self.turns = self.policy.plan(self.task, opening)
        step = self.turns[min(turn_index, len(self.turns) - 1)]
        return AgentTurn(
            message=turn_to_message(step, turn_index), raw_text=format_assistant_turn(step.content, step.tool_calls)
        )


# Second person → first person, for the user's opening message built from tau2's instructions ("You are ...").
_PERSON_SWAPS = [
    (re.compile(r"\byou (mobile|phone|data|account|line)\b", re.IGNORECASE), r"my \1"),  # tau2 writes "You mobile"
    (re.compile(r"\byou are\b", re.IGNORECASE), "I am"),
    (re.compile(r"\byou're\b", re.IGNORECASE), "I'm"),
    (re.compile(r"\byou were\b", re.IGNORECASE), "I was"),
    (re.compile(r"\byourself\b", re.IGNORECASE), "myself"),
    (re.compile(r"\byours\b", re.IGNORECASE), "mine"),
    (re.compile(r"\byour\b", re.IGNORECASE), "my"),
    (re.compile(r"\byou\b", re.IGNORECASE), "I"),
]


def first_person(text: str) -> str:
    for pattern, replacement in _PERSON_SWAPS:

        def swap(match: re.Match[str], replacement: str = replacement) -> str:
            out = match.expand(replacement)
            return out[0].upper() + out[1:] if match.group(0)[0].isupper() else out

        text = pattern.sub(swap, text)
    return text


def opening_message(task: Task) -> str:
    """The user's reply to the greeting: the reason for calling and the known info, in the first person."""
    instructions = task.user_scenario.instructions
    if isinstance(instructions, StructuredUserInstructions):
        parts = [instructions.reason_for_call]
        if instructions.known_info:
            parts.append(instructions.known_info)
    else:
        parts = [str(instructions)]
    return "Hi! " + " ".join(" ".join(first_person(part).split()) for part in parts)


def _mention_pattern(phrase: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![a-z0-9_]){re.escape(phrase.lower())}(?![a-z0-9_])")


_USER_TOOL_NAMES: dict[str, tuple[str, ...]] = {}


def user_tool_names(domain: str) -> tuple[str, ...]:
    """Names of the domain's user (phone) tools, read once per process (no tool schemas are built)."""
    if domain not in _USER_TOOL_NAMES:
        environment = import_tau2().get_env_constructor(domain)()
        toolkit = environment.user_tools
        _USER_TOOL_NAMES[domain] = tuple(toolkit.tools) if toolkit is not None else ()
    return _USER_TOOL_NAMES[domain]


def task_domain(task: Task, default: str = "telecom") -> str:
    instructions = task.user_scenario.instructions
    return instructions.domain if isinstance(instructions, StructuredUserInstructions) else default


class ScriptedUserLogic:
    """The scripted customer's decisions: pure, synchronous and deterministic (see the module docstring).

    `tool_names`: every user tool of the domain (default: read from tau2 for the task's domain); they are matched
    too, so that a request for one tool is never read as a request for another whose name it contains.
    """

    def __init__(self, task: Task, tool_names: list[str] | tuple[str, ...] | None = None) -> None:
        self.task = task
        self.pending: list[Action] = [a.model_copy(deep=True) for a in gold_actions(task) if a.requestor == "user"]
        self.started = False
        self.turn = 0
        if tool_names is None:  # a user with nothing to do matches nothing: no need to look the tools up
            tool_names = user_tool_names(task_domain(task)) if self.pending else ()
        known = set(tool_names)
        names = sorted(known | {action.name for action in self.pending}, key=len, reverse=True)
        # Longest names first, and their matches masked, so "toggle data" is not found inside "toggle data saver".
        self._patterns = [(name, [_mention_pattern(name), _mention_pattern(tool_words(name))]) for name in names]

    @property
    def done(self) -> bool:
        return not self.pending

    def mentioned_tools(self, text: str) -> set[str]:
        remaining = text.lower()
        found: set[str] = set()
        for name, patterns in self._patterns:
            for pattern in patterns:
                if pattern.search(remaining):
                    found.add(name)
                    remaining = pattern.sub(" ", remaining)
        return found

    def requested_action(self, text: str) -> Action | None:
        """The earliest pending action whose tool the text names (preferring one whose argument values it names)."""
        named = self.mentioned_tools(text)
        candidates = [action for action in self.pending if action.name in named]
        lowered = text.lower()
        for action in candidates:
            if all(_mention_pattern(str(value)).search(lowered) for value in action.arguments.values()):
                return action
        return candidates[0] if candidates else None

    def respond(self, incoming: IncomingMessage) -> UserMessage:
        index = self.turn
        self.turn += 1
        if isinstance(incoming, (ToolMessage, MultiToolMessage)):
            results = incoming.tool_messages if isinstance(incoming, MultiToolMessage) else [incoming]
            return _text(" ".join(_report(result) for result in results))
        if not isinstance(incoming, AssistantMessage):
            raise TypeError(f"the user cannot receive a {type(incoming).__name__}")
        text = incoming.content or ""
        if not self.started:
            self.started = True
            return _text(opening_message(self.task))
        if "transferred to a human agent" in text.lower():
            return _text(TRANSFER)
        if not self.pending:
            return _text(STOP)
        action = self.requested_action(text)
        if action is None:
            return _text(UNCLEAR_REPLY)
        self.pending.remove(action)
        call = ToolCall(
            id=f"user_call_{index}_0", name=action.name, arguments=copy.deepcopy(action.arguments), requestor="user"
        )
        return UserMessage(role="user", tool_calls=[call], cost=0.0, usage=_NO_USAGE.copy())


_NO_USAGE = {"completion_tokens": 0, "prompt_tokens": 0}


def _text(content: str) -> UserMessage:
    return UserMessage(role="user", content=content, cost=0.0, usage=_NO_USAGE.copy())


def _report(result: ToolMessage) -> str:
    content = (result.content or "").strip()
    if result.error:
        return f"I tried that, but my phone showed an error: {content}"
    return f"Done. Here is what my phone shows: {content}" if content else "Done."


class ScriptedUser:
    """The scripted customer as an engine user (EpisodeUser): no latency, no tokens."""

    def __init__(self, task: Task) -> None:
        self.logic = ScriptedUserLogic(task)

    async def respond(self, incoming: IncomingMessage) -> UserReply:
        return UserReply(message=self.logic.respond(incoming), latency_s=0.0, prompt_tokens=0, completion_tokens=0)


def solo_supported(task: Task) -> bool:
    """Whether tau2's LLMSoloAgent accepts the task (it needs a ticket, unless the task has an initial state)."""
    return LLMSoloAgent.check_valid_task(task)
