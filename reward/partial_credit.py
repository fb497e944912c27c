"""Partial credit from tau2's sub-checks, and sub-checks for episodes tau2 refuses to grade.

tau2's task reward is a product of 0/1 checks, so a near miss and a total miss both score 0. The partial score is a
weighted mean of the fractions of checks met, one fraction per component:

| component       | RewardInfo field        | fraction                              | counts when basis has |
|-----------------|-------------------------|---------------------------------------|-----------------------|
| `env_assertion` | `env_assertions`        | assertions with `met`                 | ENV_ASSERTION         |
| `action`        | `action_checks`         | expected actions with `action_match`  | ACTION                |
| `communicate`   | `communicate_checks`    | checks with `met`                     | COMMUNICATE           |
| `nl_assertion`  | `nl_assertions`         | assertions with `met`                 | NL_ASSERTION          |
| `db`            | `db_check`              | 1.0 if `db_match` else 0.0            | DB                    |

Weights (`PartialWeights`, default 1/1/1/1 and `db` 0; `state` belongs to the progress credit) are renormalized over the
components the episode actually has: telecom has no communicate checks, so the communicate weight dilutes nothing there.
`db` defaults to 0 because the DB hash either matches or not, and where it is graded (airline, retail) a match is almost
the success itself: it adds no gradation.

Only checks tau2 grades count. tau2 fills `action_checks` for every task with expected actions, also when
`reward_basis` lacks ACTION (94 of 114 telecom base tasks, every airline and retail task). Those checks are left out:
- tau2 does not require them: the graded end state can be reached by other action sequences;
- tau2's matcher ignores order and repetition and, for telecom's device fixes (`toggle_airplane_mode` and the like,
  no arguments), matches on the name alone: a call that was undone later still matches, so paying for them pays the
  "ask the user to toggle everything" behaviour, whose credit grows with the number of calls;
- airline and retail expected actions include read-only look-ups (`get_reservation_details`) that grade nothing.
Consequences: a success (every graded check met) always has partial 1.0; on telecom the partial score is the
fraction of env assertions met (plus the transfer action on the 20 ACTION tasks), which still grades: leaving one
gold action out of a telecom base task leaves 1 of 2 (or 1-2 of 3) assertions met in 332 of 516 cases. A
RewardInfo without a `reward_basis` (unknown grading) counts every check it has.

A component already met at the start of the episode (some telecom tasks assert the line stays without service)
gives every attempt of that task the same credit; GRPO subtracts the group mean of one task's attempts, so such a
constant never reaches the advantage.

The progress credit (`compute_progress_score`, the reward post-process's default) replaces the end-state checks (env
assertions, the DB match) by the share of the task's gold actions the episode's end state shows (reward/progress.py)
and keeps the graded checks that are about the conversation (action, communicate, NL assertions): on telecom, where
the env assertions judge only the final outcome, half the fixes then score between none and all of them. Weight
`state` (TAU2_PARTIAL_W_STATE) applies to it only.

`checks_ignoring_termination` exists because tau2 returns reward 0 and no sub-checks at all for episodes that did not
end with agent_stop / user_stop (tau2-bench issue #82): it re-runs tau2's own evaluator as if the episode had ended
normally, so that a truncated episode's progress is still visible to the shaping.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from rollout.settings import Tau2Settings

if TYPE_CHECKING:
    from tau2.data_model.simulation import RewardInfo, SimulationRun
    from tau2.data_model.tasks import Task

# Component name -> (RewardInfo list field, per-check flag, tau2 RewardType value).
_LIST_COMPONENTS: dict[str, tuple[str, str, str]] = {
    "env_assertion": ("env_assertions", "met", "ENV_ASSERTION"),
    "action": ("action_checks", "action_match", "ACTION"),
    "communicate": ("communicate_checks", "met", "COMMUNICATE"),
    "nl_assertion": ("nl_assertions", "met", "NL_ASSERTION"),
}
_DB_BASIS = "DB"

# Terminations tau2 grades; every other one gets reward 0 and no sub-checks.
NORMAL_TERMINATIONS: frozenset[str] = frozenset({"agent_stop", "user_stop"})


class PartialWeights(Tau2Settings):
    """Weight of each kind of tau2 sub-check in the partial score, renormalized over the kinds an episode has
    (reward.partial_credit)."""

    model_config = SettingsConfigDict(env_prefix="TAU2_PARTIAL_W_", frozen=True)

    env_assertion: float = Field(
        default=1.0,
        ge=0.0,
        allow_inf_nan=False,
        validation_alias="TAU2_PARTIAL_W_ENV",
        description="weight of the environment-assertion checks in partial credit",
    )
    action: float = Field(default=1.0, ge=0.0, allow_inf_nan=False, description="weight of the action checks")
    communicate: float = Field(default=1.0, ge=0.0, allow_inf_nan=False, description="weight of the communicate checks")
    db: float = Field(default=0.0, ge=0.0, allow_inf_nan=False, description="weight of the database check")
    nl_assertion: float = Field(
        default=1.0,
        ge=0.0,
        allow_inf_nan=False,
        validation_alias="TAU2_PARTIAL_W_NL",
        description="weight of the natural-language assertions",
    )
    state: float = Field(
        default=1.0, ge=0.0, allow_inf_nan=False, description="weight of the end state's progress (progress only)"
    )


def reward_info_dict(reward_info: Any) -> dict[str, Any] | None:
    """A RewardInfo (model or its JSON dump) as a dict; anything else -> None. An unset reward_basis stays None."""
    if reward_info is None:
        return None
    if isinstance(reward_info, Mapping):
        return dict(reward_info)
    dump = getattr(reward_info, "model_dump", None)
    if dump is None:
        return None
    data = dump(mode="json")
    # RewardInfo defaults reward_basis to [DB]; a basis nobody set is unknown, not DB.
    if "reward_basis" not in getattr(reward_info, "model_fields_set", {"reward_basis"}):
        data["reward_basis"] = None
    return data


def graded_basis(info: Mapping[str, Any]) -> set[str] | None:
    """The reward_basis as upper-case names (enum values or strings); None when absent or not a list."""
    basis = info.get("reward_basis")
    if not isinstance(basis, (list, tuple)):
        return None
    return {str(getattr(item, "value", item)).upper() for item in basis}


def _fraction_met(checks: Any, flag: str) -> float | None:
    """Share of checks whose flag is True; a malformed entry counts as not met; no checks -> None."""
    if not isinstance(checks, (list, tuple)) or not checks:
        return None
    met = sum(1 for check in checks if isinstance(check, Mapping) and check.get(flag) is True)
    return met / len(checks)


def partial_components(reward_info: Any) -> dict[str, float]:
    """The fraction met per graded component present in the RewardInfo (see the module docstring)."""
    info = reward_info_dict(reward_info)
    if info is None:
        return {}
    basis = graded_basis(info)
    components: dict[str, float] = {}
    for name, (field, flag, basis_name) in _LIST_COMPONENTS.items():
        if basis is not None and basis_name not in basis:
            continue
        fraction = _fraction_met(info.get(field), flag)
        if fraction is not None:
            components[name] = fraction
    db_check = info.get("db_check")
    if isinstance(db_check, Mapping) and (basis is None or _DB_BASIS in basis):
        components["db"] = 1.0 if db_check.get("db_match") is True else 0.0
    return components


def compute_partial_score(
    reward_info: dict[str, Any] | RewardInfo | None, weights: PartialWeights | None = None
) -> tuple[float, dict[str, float]]:
    """Weighted mean of the graded components' fractions, renormalized over those present.

    Returns (score in [0, 1], {component: fraction}). No graded checks -> (0.0, {}); components present but all
    weighted 0 -> (0.0, components).
    """
    weights = weights or PartialWeights()
    components = partial_components(reward_info)
    total_weight = sum(getattr(weights, name) for name in components)
    if total_weight <= 0.0:
        return 0.0, components
    score = sum(getattr(weights, name) * fraction for name, fraction in components.items()) / total_weight
    return min(1.0, max(0.0, score)), components


# Components of the progress credit besides the state: the graded checks that are not about the end state.
PROGRESS_CHECK_COMPONENTS = ("action", "communicate", "nl_assertion")
PROGRESS_FIGURES = ("target_actions", "done_actions", "collateral")


def progress_figures(progress: Any) -> dict[str, Any] | None:
    """The engine's progress payload (`reward.progress.StateProgress` dump) if usable, else None (missing, an
    {"error": ...} payload, or malformed figures)."""
    if not isinstance(progress, Mapping):
        return None
    figures = {}
    for name in PROGRESS_FIGURES:
        value = progress.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            return None
        figures[name] = value
    if figures["done_actions"] > figures["target_actions"]:
        return None
    figures["transferred"] = progress.get("transferred") is True
    figures["gold_transfers"] = progress.get("gold_transfers") is True
    return figures


def compute_progress_score(
    reward_info: dict[str, Any] | RewardInfo | None,
    progress: Mapping[str, Any] | None,
    weights: PartialWeights | None = None,
    collateral_penalty: float = 1.0,
) -> tuple[float, dict[str, float]] | None:
    """Progress credit: weighted mean of the state share and the graded non-state checks, minus the collateral
    penalty; None when `progress` is not a usable payload (the caller falls back to `compute_partial_score`).

    - `state` = done_actions / target_actions (reward.progress: the share of the gold actions the end state shows);
      1.0 when the gold actions change nothing (the state is as they leave it unless the episode changed it);
    - `action`, `communicate`, `nl_assertion`: as in `compute_partial_score` (graded checks only); env assertions
      and the DB check are left out: they judge the same end state, all or nothing;
    - `collateral` = collateral_penalty * fields changed that no gold action changes / max(1, target_actions),
      subtracted from the mean: at the default 1, each stray field cancels one gold action's worth of state credit
      (toggling everything cannot farm it; a single wrong toggle of airplane mode changes 4 fields).
    Returns (score in [0, 1], {component: fraction, ..., "collateral": penalty}).
    """
    figures = progress_figures(progress)
    if figures is None:
        return None
    weights = weights or PartialWeights()
    components = {
        name: value for name, value in partial_components(reward_info).items() if name in PROGRESS_CHECK_COMPONENTS
    }
    target = figures["target_actions"]
    components["state"] = figures["done_actions"] / target if target > 0 else 1.0
    total_weight = sum(getattr(weights, name) for name in components)
    mean = 0.0
    if total_weight > 0.0:
        mean = sum(getattr(weights, name) * fraction for name, fraction in components.items()) / total_weight
    penalty = collateral_penalty * figures["collateral"] / max(1, target)
    components["collateral"] = penalty
    return min(1.0, max(0.0, mean - penalty)), components


def is_normal_termination(termination_reason: Any) -> bool:
    """True for agent_stop / user_stop, given as tau2's enum, its value or its name (any case)."""
    value = getattr(termination_reason, "value", termination_reason)
    return str(value).strip().rsplit(".", 1)[-1].lower() in NORMAL_TERMINATIONS


def without_unanswered_tail(messages: list[Any]) -> tuple[list[Any], int]:
    """Drop a final tool-call message whose results never came (an episode cut mid-call), with what follows it.

    Those calls did not all run, and tau2's replay rejects a call without a result; everything before them is kept.
    Returns (messages, how many were dropped).
    """
    for position in range(len(messages) - 1, -1, -1):
        calls = getattr(messages[position], "tool_calls", None)
        if calls and getattr(messages[position], "role", None) in ("assistant", "user"):
            answered = sum(1 for message in messages[position + 1 :] if getattr(message, "role", None) == "tool")
            if answered < len(calls):
                return list(messages[:position]), len(messages) - position
            break
    return list(messages), 0


def checks_ignoring_termination(simulation: SimulationRun, task: Task, domain: str, solo_mode: bool) -> RewardInfo:
    """tau2's full evaluation of a copy of the simulation marked agent_stop, for episodes tau2 refuses to grade.

    Replays the trajectory on a fresh environment and runs env assertions, action checks and communicate checks
    exactly as tau2's `evaluate_simulation(..., EvaluationType.ALL, ...)` does, after dropping a final tool call
    left without results (`without_unanswered_tail`). Its `reward` is what the episode
    would have scored had it ended normally; shaping uses only its sub-checks, never that reward. The original
    termination reason goes to `info["termination_reason"]`. Never raises: a trajectory that cannot be replayed
    gives reward 0, no checks and the error in `info["error"]`. CPU-bound (~16 ms): run it in a worker thread.
    """
    # tau2 loads only where checks are computed: the post-process module stays light for slime's driver.
    from rollout.tau2_setup import import_tau2

    if "tau2.registry" not in sys.modules:  # import_tau2 resets loguru's sinks: once per process is enough
        import_tau2()
    from tau2.data_model.simulation import RewardInfo, TerminationReason
    from tau2.evaluator.evaluator import EvaluationType, evaluate_simulation

    original = getattr(getattr(simulation, "termination_reason", None), "value", None)
    basis = None
    dropped = 0
    try:
        criteria = task.evaluation_criteria
        basis = list(criteria.reward_basis) if criteria is not None else None
        messages, dropped = without_unanswered_tail(simulation.messages)
        as_if_stopped = simulation.model_copy(
            update={"termination_reason": TerminationReason.AGENT_STOP, "messages": messages}
        )
        result = evaluate_simulation(as_if_stopped, task, EvaluationType.ALL, solo_mode=solo_mode, domain=domain)
    except Exception as error:  # a malformed trajectory must not take the rollout down
        return RewardInfo(
            reward=0.0,
            reward_basis=basis,
            info={
                "error": f"{type(error).__name__}: {error}"[:2000],
                "termination_reason": original,
                "note": "checks_ignoring_termination: trajectory could not be evaluated",
            },
        )
    info = dict(result.info or {})
    info["termination_reason"] = original
    info["dropped_unanswered_messages"] = dropped
    info["note"] = "checks computed as if the episode had ended with agent_stop"
    return result.model_copy(update={"info": info})
