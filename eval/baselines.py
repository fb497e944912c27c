"""Shortcut baselines: what trivial scripted policies score on the same tasks, user simulator and episode limits.

On telecom a policy that only transfers to a human solves every transfer-only task (12 of the 40 test tasks), and a
policy that asks for every phone fix by name solves more (docs/shortcut_baselines.md), so a pass rate means little
until it stands beside them. The evaluator plays `rollout.scripted.SCRIPTED_POLICIES` (gold as the ceiling;
always_transfer, shotgun and do_nothing as the shortcuts) through the same engine (rollout.episode) with the run's
user simulator and limits, records the episodes in their own resumable JSONL, and reports:
- per policy: pass@1, successes, transfer rate, per-subtask pass@1, which tasks it solves;
- the shortcut check of the model: its pass@1 beside the best shortcut's, overall and per subtask, and on the tasks
  no shortcut solves ("where they fail": a task counts as solved by a shortcut if any trial of any shortcut
  succeeded). A model that solves none of those tasks does not beat the shortcuts, whatever its pass@1, and the
  report says so.
The scripted policies take no tokens, so the policy's token budgets (episode and per turn) do not apply to them;
max_steps, max_errors and max_turns do. Solo mode has no user to talk to: no baselines there.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from eval import metrics

CEILING = "gold"


def baseline_policies(domain: str) -> list[str]:
    from rollout.scripted import policies_for_domain

    return policies_for_domain(domain)


def shortcut_names(policies: Sequence[str]) -> list[str]:
    from rollout.scripted import SHORTCUT_POLICIES

    return [name for name in policies if name in SHORTCUT_POLICIES]


# What changes a baseline's results: the tasks' domain and split, the user simulator, the episode limits.
HASHED_KEYS = (
    "domain", "task_split", "max_steps", "max_errors", "max_turns", "user_kind", "user_model", "user_temperature",
    "user_extra_args", "tau2_version",
)  # fmt: skip


def hashed_config(model_hashed: Mapping[str, Any]) -> dict[str, Any]:
    """The part of the model run's hashed configuration (evaluate_tau2.hashed_config) that a baseline depends on."""
    return {key: model_hashed[key] for key in HASHED_KEYS}


async def play_baselines(
    pending: Sequence[tuple[str, Any, int]],
    *,
    config: Any,
    user_config: Any,
    concurrency: int,
    on_result: Callable[[str, Any, int, Any], None],
) -> None:
    """Play (policy, task, trial) episodes through the engine, `concurrency` at a time; `on_result(policy, task,
    trial, EpisodeResult)` is called as each one finishes (a set-up error becomes a failed result)."""
    from rollout.episode import play_episode
    from rollout.scripted import ScriptedPolicyAgent
    from rollout.user_sim import close_user_clients

    clients: dict[Any, Any] = {}
    semaphore = asyncio.Semaphore(concurrency)

    async def one(policy: str, task: Any, trial: int) -> None:
        async with semaphore:
            task = task.model_copy(deep=True)  # the store's tasks are shared
            result = await play_episode(
                task, config, lambda view: ScriptedPolicyAgent(policy, task), user_config, clients
            )
        on_result(policy, task, trial, result)

    jobs = [asyncio.ensure_future(one(policy, task, trial)) for policy, task, trial in pending]
    try:
        await asyncio.gather(*jobs)
    finally:
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        await close_user_clients(clients)


# ---------------------------------------------------------------------------------------------------- the summary


def policy_summary(rows: Sequence[metrics.EpisodeRow]) -> dict[str, Any]:
    """pass@1, counts, transfer rate, per-subtask rates and the solved tasks of one policy's episodes."""
    counted = list(rows)
    by_task = metrics.successes_by_task(counted)
    return {
        **metrics.rates(counted),
        "failed_episodes": sum(row.failed for row in counted),
        "pass_hat_k": {str(k): v for k, v in metrics.pass_hat_k_curve(by_task).items()},
        "by_subtask": metrics.breakdown(counted, lambda row: row.subtask),
        "solved_task_ids": sorted(task for task, oks in by_task.items() if any(oks)),
    }


def shortcut_check(
    model_rows: Sequence[metrics.EpisodeRow], policies: Mapping[str, dict[str, Any]], shortcuts: Sequence[str]
) -> dict[str, Any]:
    """The model beside the shortcuts: overall, per subtask, and on the tasks no shortcut solves (with a verdict)."""
    present = [name for name in shortcuts if name in policies]
    model = metrics.rates(model_rows)
    best_name = max(present, key=lambda n: policies[n]["pass_at_1"] or 0.0) if present else None
    best_rate = policies[best_name]["pass_at_1"] if best_name else None
    solvable = {task for name in present for task in policies[name]["solved_task_ids"]}
    resistant_rows = [row for row in model_rows if row.task_id not in solvable]
    solvable_rows = [row for row in model_rows if row.task_id in solvable]
    on_resistant = metrics.rates(resistant_rows)
    by_subtask: dict[str, dict[str, Any]] = {}
    for subtask, group in metrics.breakdown(model_rows, lambda row: row.subtask).items():
        shortcut_rates = {
            name: ((policies[name]["by_subtask"] or {}).get(subtask) or {}).get("pass_at_1") for name in present
        }
        best = max(present, key=lambda n: shortcut_rates[n] or 0.0) if present else None
        best_value = shortcut_rates[best] if best else None
        by_subtask[subtask] = {
            "model": group["pass_at_1"],
            "best_shortcut": best,
            "best_shortcut_pass_at_1": best_value,
            "model_beats_best_shortcut": group["pass_at_1"] is not None
            and (best_value is None or group["pass_at_1"] > best_value),
        }
    verdict, beats = _verdict(model, best_name, best_rate, on_resistant, len({r.task_id for r in resistant_rows}))
    return {
        "shortcuts": present,
        "best_shortcut": best_name,
        "best_shortcut_pass_at_1": best_rate,
        "model_pass_at_1": model["pass_at_1"],
        "beats_best_shortcut_overall": model["pass_at_1"] is not None
        and (best_rate is None or model["pass_at_1"] > best_rate),
        "shortcut_solvable_tasks": len({r.task_id for r in solvable_rows}),
        "shortcut_resistant_tasks": len({r.task_id for r in resistant_rows}),
        "model_on_shortcut_resistant_tasks": on_resistant,
        "model_on_shortcut_solvable_tasks": metrics.rates(solvable_rows),
        "by_subtask": by_subtask,
        "beats_shortcuts": beats,
        "verdict": verdict,
    }


def _verdict(
    model: dict[str, Any], best: str | None, best_rate: float | None, resistant: dict[str, Any], n_resistant: int
) -> tuple[str, bool | None]:
    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    if best is None:
        return "no shortcut baseline was run for these tasks", None
    overall = f"pass@1 {pct(model['pass_at_1'])} vs {pct(best_rate)} for the best shortcut ({best})"
    if n_resistant == 0:
        return f"every task here is solved by a shortcut: they cannot tell the model from one ({overall})", None
    where = f"{resistant['successes']}/{resistant['episodes']} episodes on the {n_resistant} tasks no shortcut solves"
    if resistant["successes"] == 0:
        successes = model["successes"]
        why = "it solves no task" if successes == 0 else f"all {successes} of its successes are tasks a shortcut solves"
        return f"DOES NOT BEAT THE SHORTCUTS where they fail: {where}; {why} ({overall})", False
    if model["pass_at_1"] is not None and best_rate is not None and model["pass_at_1"] <= best_rate:
        return f"BELOW THE BEST SHORTCUT overall ({overall}), though it solves {where}", False
    return f"beats the shortcuts: {overall}; {where}", True


def summarize_baselines(
    records: Sequence[Mapping[str, Any]],
    model_rows: Sequence[metrics.EpisodeRow],
    *,
    policies: Sequence[str],
    task_ids: Sequence[str],
    trials: int,
    row_of: Callable[[Mapping[str, Any]], metrics.EpisodeRow],
    user_sim: Mapping[str, Any],
    limits: Mapping[str, Any],
) -> dict[str, Any]:
    """The `baselines` section of the results: per policy, and the model's shortcut check."""
    wanted = set(task_ids)
    latest: dict[tuple[str, str, int], Mapping[str, Any]] = {}
    for record in records:
        if record.get("policy") in policies and record["task_id"] in wanted and record["trial"] < trials:
            latest[(record["policy"], record["task_id"], record["trial"])] = record
    grouped: dict[str, list[metrics.EpisodeRow]] = defaultdict(list)
    for (policy, _, _), record in sorted(latest.items()):
        grouped[policy].append(row_of(record))
    summaries = {name: policy_summary(grouped[name]) for name in policies if grouped.get(name)}
    expected = len(task_ids) * trials
    return {
        "note": (
            "scripted policies (no LLM) played through the same engine on the same tasks, with the same user "
            "simulator and episode limits; token budgets do not apply to them"
        ),
        "user_sim": dict(user_sim),
        "limits": dict(limits),
        "trials": trials,
        "complete": all(len(grouped.get(name, [])) == expected for name in policies),
        "policies": summaries,
        "shortcut_check": shortcut_check(model_rows, summaries, shortcut_names(list(summaries))),
    }
