"""tau2's own Orchestrator playing the recipe's scripted players: the reference the async engine is compared with
(tests/test_engine_faithfulness.py) and a check that the scripted players follow tau2's protocols."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from rollout.engine import IncomingMessage
from rollout.scripted import (
    ScriptedTurn,
    ScriptedUserLogic,
    gold_agent_turns,
    scripted_policy,
    turn_to_message,
)
from rollout.tau2_setup import import_tau2

import_tau2()

from tau2.agent.base import LocalAgent  # noqa: E402
from tau2.agent.llm_agent import LLMSoloAgent  # noqa: E402
from tau2.data_model.message import (  # noqa: E402
    AssistantMessage,
    Message,
    MultiToolMessage,
    ToolMessage,
    UserMessage,
)
from tau2.data_model.simulation import SimulationRun  # noqa: E402
from tau2.data_model.tasks import Task  # noqa: E402
from tau2.evaluator.evaluator import EvaluationType, evaluate_simulation  # noqa: E402
from tau2.orchestrator.orchestrator import Orchestrator  # noqa: E402
from tau2.user.base import BaseUser, UserState  # noqa: E402
from tau2.user.user_simulator import DummyUser, UserSimulator  # noqa: E402


class Tau2ScriptedUser(BaseUser):
    """The scripted customer as a tau2 user, so tau2's own Orchestrator can run it (one instance per episode)."""

    def __init__(self, task: Task, tools: list[Any] | None = None) -> None:
        super().__init__(instructions=str(task.user_scenario), llm=None, llm_args=None)
        self.tools = tools
        self.logic = ScriptedUserLogic(task)

    def get_init_state(self, message_history: list[Message] | None = None) -> UserState:
        return UserState(system_messages=[], messages=list(message_history or []))

    def generate_next_message(self, message: IncomingMessage, state: UserState) -> tuple[UserMessage, UserState]:
        if isinstance(message, MultiToolMessage):
            state.messages.extend(message.tool_messages)
        else:
            state.messages.append(message)
        reply = self.logic.respond(message)
        state.messages.append(reply)
        return reply, state

    @classmethod
    def is_stop(cls, message: UserMessage) -> bool:
        return UserSimulator.is_stop(message)

    def set_seed(self, seed: int) -> None:
        """Deterministic: nothing to seed."""


class ScriptedAgentState(BaseModel):
    next_turn: int = 0
    messages: list[Any] = Field(default_factory=list)


def _next_scripted_message(turns: list[ScriptedTurn], state: ScriptedAgentState) -> AssistantMessage:
    # Past the end of the script the last turn repeats (the closing line, or `done`).
    index = min(state.next_turn, len(turns) - 1)
    state.next_turn += 1
    return turn_to_message(turns[index], state.next_turn - 1)


class Tau2ScriptedAgent(LocalAgent[ScriptedAgentState]):
    """A tau2 agent that plays a scripted policy (default `gold`: `gold_agent_turns(task, solo_mode=False)`)."""

    def __init__(self, tools: list[Any], domain_policy: str, task: Task, policy: str = "gold") -> None:
        super().__init__(tools=tools, domain_policy=domain_policy)
        self.task = task
        self.policy = scripted_policy(policy)
        self.turns: list[ScriptedTurn] = gold_agent_turns(task, solo_mode=False) if policy == "gold" else []

    def get_init_state(self, message_history: list[Message] | None = None) -> ScriptedAgentState:
        return ScriptedAgentState(messages=list(message_history or []))

    def generate_next_message(
        self, message: UserMessage | ToolMessage | MultiToolMessage, state: ScriptedAgentState
    ) -> tuple[AssistantMessage, ScriptedAgentState]:
        if isinstance(message, MultiToolMessage):
            state.messages.extend(message.tool_messages)
        else:
            state.messages.append(message)
        if state.next_turn == 0 and not self.turns:  # the plan comes from the user's first message
            opening = message.content if isinstance(message, UserMessage) else ""
            self.turns = self.policy.plan(self.task, opening or "")
        reply = _next_scripted_message(self.turns, state)
        state.messages.append(reply)
        return reply, state

    def set_seed(self, seed: int) -> None:
        """Deterministic: nothing to seed."""


class Tau2ScriptedSoloAgent(LLMSoloAgent):
    """tau2's LLMSoloAgent (its Orchestrator requires one in solo mode) playing `gold_agent_turns(task, True)`;
    tau2's own `_check_if_stop_toolcall` turns the final `done` call into "###STOP###"."""

    def __init__(self, tools: list[Any], domain_policy: str, task: Task) -> None:
        super().__init__(tools=tools, domain_policy=domain_policy, task=task)
        self.turns = gold_agent_turns(task, solo_mode=True)

    def get_init_state(self, message_history: list[Message] | None = None) -> ScriptedAgentState:  # type: ignore[override]
        return ScriptedAgentState(messages=list(message_history or []))

    def generate_next_message(  # type: ignore[override]
        self, message: ToolMessage | MultiToolMessage | None, state: ScriptedAgentState
    ) -> tuple[AssistantMessage, ScriptedAgentState]:
        if isinstance(message, UserMessage):
            raise ValueError("LLMSoloAgent does not support user messages.")
        if isinstance(message, MultiToolMessage):
            state.messages.extend(message.tool_messages)
        elif message is not None:
            state.messages.append(message)
        reply = self._check_if_stop_toolcall(_next_scripted_message(self.turns, state))
        state.messages.append(reply)
        return reply, state

    def set_seed(self, seed: int) -> None:
        """Deterministic: nothing to seed."""


def run_tau2_orchestrator(
    task: Task,
    solo_mode: bool,
    max_steps: int = 100,
    max_errors: int = 10,
    domain: str = "telecom",
    policy: str = "gold",
) -> SimulationRun:
    """Play a scripted agent (`policy`, default gold) and the scripted user through tau2's own Orchestrator, then
    score with tau2's evaluator (`reward_info` set): the reference the async engine is compared with. Synchronous CPU
    work. Solo mode plays the gold policy only.

    As in tau2's `run_task`, except that the scripted players get no tool schemas: they never read them, and
    building them (`get_tools`, pydantic models per tool) costs more than the whole episode.
    """
    registry = import_tau2()
    constructor = registry.get_env_constructor(domain)
    if solo_mode and policy != "gold":
        raise ValueError(f"solo mode plays the gold policy only, not '{policy}'")
    if solo_mode:
        environment = constructor(solo_mode=True)
        agent: LocalAgent[Any] = Tau2ScriptedSoloAgent(tools=[], domain_policy=environment.get_policy(), task=task)
        user: BaseUser = DummyUser(tools=None, instructions=str(task.user_scenario))
    else:
        environment = constructor()
        agent = Tau2ScriptedAgent(tools=[], domain_policy=environment.get_policy(), task=task, policy=policy)
        user = Tau2ScriptedUser(task)
    orchestrator = Orchestrator(
        domain=domain,
        agent=agent,
        user=user,
        environment=environment,
        task=task,
        max_steps=max_steps,
        max_errors=max_errors,
        seed=None,
        solo_mode=solo_mode,
    )
    simulation = orchestrator.run()
    simulation.reward_info = evaluate_simulation(
        simulation=simulation, task=task, evaluation_type=EvaluationType.ALL, solo_mode=solo_mode, domain=domain
    )
    return simulation
