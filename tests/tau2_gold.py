"""Real tau2 trajectories for tests: a task's gold actions played against a real tau2 environment.

`gold_simulation(task, domain)` builds a dual-control SimulationRun that looks like an orchestrator run: the
agent's greeting, the user's request, then each gold action (an agent tool call, or an agent instruction followed by
the user's tool call and reply), each tool result coming from the real environment in order, and a closing
exchange. tau2's evaluator replays it on a fresh environment and checks every tool result matches, so the results
here must be the environment's own.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from rollout.tau2_setup import import_tau2

registry = import_tau2()

from tau2.data_model.message import AssistantMessage, ToolCall, UserMessage  # noqa: E402
from tau2.data_model.simulation import SimulationRun, TerminationReason  # noqa: E402
from tau2.data_model.tasks import Task  # noqa: E402
from tau2.evaluator.evaluator import EvaluationType, evaluate_simulation  # noqa: E402

GREETING = "Hi! How can I help you today?"


def fresh_environment(task: Task, domain: str):
    """A new environment in the task's initial state."""
    env = registry.get_env_constructor(domain)()
    state = task.initial_state
    env.set_state(
        initialization_data=state.initialization_data if state is not None else None,
        initialization_actions=state.initialization_actions if state is not None else None,
        message_history=(state.message_history or []) if state is not None else [],
    )
    return env


def gold_simulation(
    task: Task,
    domain: str = "telecom",
    skip: Iterable[int] = (),
    termination: TerminationReason = TerminationReason.USER_STOP,
    extra: Iterable[tuple[str, str, dict]] = (),
) -> SimulationRun:
    """Play the task's gold actions (minus the indices in `skip`), then the `extra` (requestor, name, arguments)
    calls, and wrap the conversation in a SimulationRun."""
    skipped = set(skip)
    gold = task.evaluation_criteria.actions or []
    calls = [(a.requestor, a.name, dict(a.arguments)) for i, a in enumerate(gold) if i not in skipped]
    calls.extend(extra)
    env = fresh_environment(task, domain)
    ids = itertools.count()
    messages: list = [
        AssistantMessage(role="assistant", content=GREETING),
        UserMessage(role="user", content="Hi, my phone has a problem and I need help fixing it."),
    ]
    for requestor, name, arguments in calls:
        call = ToolCall(id=f"call_{next(ids)}", name=name, arguments=arguments, requestor=requestor)
        if requestor == "user":
            messages.append(AssistantMessage(role="assistant", content=f"Please run {name} on your phone."))
            messages.append(UserMessage(role="user", tool_calls=[call]))
            messages.append(env.get_response(call))
            messages.append(UserMessage(role="user", content="Done. What next?"))
        else:
            messages.append(AssistantMessage(role="assistant", tool_calls=[call]))
            messages.append(env.get_response(call))
    messages.append(AssistantMessage(role="assistant", content="Everything should work now. Anything else?"))
    messages.append(UserMessage(role="user", content="No, thank you. ###STOP###"))
    return SimulationRun(
        id=f"gold-{task.id}",
        task_id=task.id,
        start_time="2026-01-01T00:00:00",
        end_time="2026-01-01T00:01:00",
        duration=60.0,
        termination_reason=termination,
        messages=messages,
    )


def tau2_verdict(simulation: SimulationRun, task: Task, domain: str = "telecom"):
    """tau2's own RewardInfo for the simulation (dual-control mode, all checks but NL assertions)."""
    return evaluate_simulation(simulation, task, EvaluationType.ALL, solo_mode=False, domain=domain)


def assertions_met_after(task: Task, domain: str, skip: Iterable[int] = ()) -> list[bool]:
    """Each env assertion's outcome after applying the gold actions minus `skip` directly (no trajectory)."""
    skipped = set(skip)
    env = fresh_environment(task, domain)
    for position, action in enumerate(task.evaluation_criteria.actions or []):
        if position not in skipped:
            env.make_tool_call(action.name, requestor=action.requestor, **action.arguments)
            env.sync_tools()
    return [env.run_env_assertion(a, raise_assertion_error=False) for a in task.evaluation_criteria.env_assertions]
