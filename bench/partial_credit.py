"""Partial credit on real tau2 tasks: tau2's checks (old) against progress toward the gold end state (new).

    python bench/partial_credit.py [--quick] [--out docs/partial_credit.md] [--json FILE] [--rollouts FILE.jsonl ...]

Episodes are lists of tool calls played against a real tau2 environment (tests/tau2_gold.py builds the trajectory),
graded by tau2's own evaluator, measured by reward.progress and shaped by reward.tau2_reward_shaping under each
credit. Sections:
1. cost per episode of the progress figures against tau2's own evaluation, per domain;
2. properties on every task: k of n gold actions, doing nothing, random tool spam, calling every tool once;
3. learning signal on synthetic groups a weak policy would produce: random prefixes and permutations of the gold
   actions, noise calls, premature transfers, truncations; per credit, the share of all-fail groups whose shaped
   rewards are not all equal and the rank correlation between shaped reward and true progress;
4. the same on real rollouts of the CPU model (`examples/cpu_rollout_batch.py --output` JSONL files);
5. the transfer guard: ending versus transferring after the same fixes.
True progress = the share of the task's gold actions performed (tau2's action matcher on every gold action).
The output file's hand-written part (from "## Design and choices" on) is kept when the script rewrites it.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from reward import progress as progress_module
from reward.partial_credit import NORMAL_TERMINATIONS, checks_ignoring_termination
from reward.progress import TRANSFER_TOOL, initial_environment, measure_progress, progress_of_simulation
from reward.tau2_reward_shaping import ShapingConfig, shape_reward
from rollout.engine import fast_env_constructor
from rollout.task_store import get_task_store
from tests.tau2_gold import AssistantMessage, TerminationReason, ToolCall, gold_simulation, tau2_verdict

KEEP_HEADING = "## Design and choices"  # from this heading on, the output file is hand-written and kept
Call = tuple[str, str, dict[str, Any]]  # (requestor, tool name, arguments)
DOMAINS = ("telecom", "airline", "retail")

CREDITS: dict[str, ShapingConfig] = {
    "checks (old)": ShapingConfig(credit="checks"),
    "progress (new default)": ShapingConfig(credit="progress"),
    "progress, no collateral penalty": ShapingConfig(credit="progress", collateral_penalty=0.0),
    "progress, penalty 2": ShapingConfig(credit="progress", collateral_penalty=2.0),
    "progress + transfer guard": ShapingConfig(credit="progress", transfer_guard=True),
    "checks + transfer guard": ShapingConfig(credit="checks", transfer_guard=True),
}
FIELD_SHARE = "progress by end fields (each field 1)"  # the alternative state share, from the same figures
PER_TOUCHED = "progress, penalty per touched field"  # stray fields / fields gold touches, instead of / gold actions
DERIVED = (FIELD_SHARE, PER_TOUCHED)


class Settings(BaseModel):
    """What one run measures. Airline and retail episodes cost ~1-2 s each (tau2's evaluation builds and hashes
    their 1.5-3 MB databases), telecom's ~15 ms: hence fewer runs there."""

    tasks_per_domain: dict[str, int | None] = {"telecom": None, "airline": None, "retail": None}  # None: all
    cost_tasks: int = 20
    spam_runs: dict[str, int] = {"telecom": 3, "airline": 1, "retail": 1}
    spam_length: int = 12
    groups_per_task: dict[str, int] = {"telecom": 4, "airline": 1, "retail": 1}
    group_size: int = 8
    seed: int = 0


QUICK = Settings(
    tasks_per_domain={"telecom": 6, "airline": 2, "retail": 2},
    cost_tasks=2,
    spam_runs={"telecom": 1, "airline": 1, "retail": 1},
    spam_length=6,
    groups_per_task={"telecom": 1, "airline": 0, "retail": 0},
    group_size=4,
)


# ------------------------------------------------------------------------------------------------ playing episodes


def domain_tasks(domain: str, limit: int | None = None) -> list[Any]:
    store = get_task_store()
    tasks = store.tasks(domain, "train") + store.tasks(domain, "test")
    return tasks if limit is None else tasks[:limit]


def gold_calls(task: Any) -> list[Call]:
    return [(a.requestor, a.name, dict(a.arguments)) for a in task.evaluation_criteria.actions or []]


def play(task: Any, domain: str, calls: Sequence[Call], termination: str = "user_stop") -> dict[str, Any] | None:
    """The sample metadata the rollout would write for an episode making `calls` (plus its task reward); None when
    tau2's evaluator cannot replay the trajectory (telecom's refuel_data names a new bill with a random id, so a
    later bill look-up replays differently: the engine reports such an episode as failed). Before its closing line
    the agent states the task's communicate_info (airline, retail), so the gold actions succeed and the comparison is
    about the actions: every episode meets those checks alike."""
    gold = task.evaluation_criteria.actions or []
    reason = TerminationReason(termination)
    simulation = gold_simulation(task, domain, skip=range(len(gold)), termination=reason, extra=list(calls))
    if task.evaluation_criteria.communicate_info:
        said = AssistantMessage(role="assistant", content=" ".join(task.evaluation_criteria.communicate_info))
        simulation.messages.insert(len(simulation.messages) - 2, said)
    try:
        verdict = tau2_verdict(simulation, task, domain)
    except Exception:  # the episode tau2 cannot grade is left out, and counted
        return None
    truncated = None
    if termination not in NORMAL_TERMINATIONS:
        truncated = checks_ignoring_termination(simulation, task, domain, solo_mode=False).model_dump(mode="json")
    return {
        "reward": float(verdict.reward),
        "reward_info": verdict.model_dump(mode="json"),
        "truncated_checks": truncated,
        "termination_reason": termination,
        "progress": progress_of_simulation(simulation, task, domain).model_dump(mode="json"),
        "turns": len(calls) + 2,
        "tool_calls": len(calls),
    }


def shaped(metadata: dict[str, Any], config: ShapingConfig) -> float:
    return shape_reward(metadata, metadata["reward"], config)[0]


def field_share_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """The same episode with the state share counted over end fields (each weighs 1) instead of gold actions."""
    figures = dict(metadata.get("progress") or {})
    if "target_fields" in figures:
        figures["target_actions"], figures["done_actions"] = figures["target_fields"], figures["matched_fields"]
    return {**metadata, "progress": figures}


def per_touched_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """The same episode with the collateral penalty per field the gold actions touch instead of per gold action."""
    figures = dict(metadata.get("progress") or {})
    if "touched_fields" in figures:
        figures["collateral"] = (
            figures["collateral"] * max(1, figures["target_actions"]) / max(1, figures["touched_fields"])
        )
    return {**metadata, "progress": figures}


def all_shaped(metadata: dict[str, Any]) -> dict[str, float]:
    out = {name: shaped(metadata, config) for name, config in CREDITS.items()}
    out[FIELD_SHARE] = shaped(field_share_metadata(metadata), CREDITS["progress (new default)"])
    out[PER_TOUCHED] = shaped(per_touched_metadata(metadata), CREDITS["progress (new default)"])
    return out


def true_progress(metadata: dict[str, Any]) -> float | None:
    """Share of the task's gold actions performed, by tau2's action matcher (every gold action, graded or not)."""
    checks = metadata.get("truncated_checks") or metadata.get("reward_info") or {}
    actions = checks.get("action_checks") if isinstance(checks, dict) else None
    if not actions:
        return None
    return sum(1 for check in actions if check.get("action_match")) / len(actions)


# ------------------------------------------------------------------------------------------- weak-policy calls


class ToolInfo(BaseModel):
    requestor: str
    name: str
    params: list[str]
    writes: bool


_CATALOGS: dict[str, list[ToolInfo]] = {}


def tool_catalog(domain: str) -> list[ToolInfo]:
    """Every tool of the domain: the agent's, then the user's (telecom's phone)."""
    if domain not in _CATALOGS:
        env = fast_env_constructor(domain)()
        tools: list[ToolInfo] = []
        for requestor, kit in (("assistant", env.tools), ("user", env.user_tools)):
            if kit is None:
                continue
            for name in kit.get_tools():
                params = [p for p in inspect.signature(getattr(kit, name)).parameters if p != "self"]
                writes = str(getattr(kit.tool_type(name), "value", kit.tool_type(name))).lower() == "write"
                tools.append(ToolInfo(requestor=requestor, name=name, params=params, writes=writes))
        _CATALOGS[domain] = tools
    return _CATALOGS[domain]


DEFAULT_ARGUMENTS: dict[str, list[Any]] = {
    "mode": ["4g_5g_preferred", "4g_only", "3g_only", "2g_only"],
    "app_name": ["messaging", "browser"],
    "permission": ["sms", "storage", "phone", "network"],
    "gb_amount": [1.0, 2.0, 5.0],
    "reason": ["customer request"],
    "summary": ["The customer needs more help than I can give."],
    "limit": [3],
    "expression": ["2 + 2"],
    "apn_settings": [{"apn_name": "internet"}, {"apn_name": "broken"}],  # a string here breaks tau2's device model
}


_DOMAIN_VALUES: dict[str, dict[str, list[Any]]] = {}


def _json_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def domain_values(domain: str) -> dict[str, list[Any]]:
    """Every argument value the domain's gold and initialization actions use, per parameter name."""
    if domain not in _DOMAIN_VALUES:
        values: dict[str, dict[str, Any]] = {}
        for task in domain_tasks(domain):
            initial = task.initial_state
            actions = [
                *(task.evaluation_criteria.actions or []),
                *((initial.initialization_actions or []) if initial else []),
            ]
            for action in actions:
                for name, value in action.arguments.items():
                    values.setdefault(name, {})[_json_key(value)] = value
        _DOMAIN_VALUES[domain] = {name: list(found.values()) for name, found in values.items()}
    return _DOMAIN_VALUES[domain]


def argument_pool(task: Any, domain: str, rng: random.Random, others: int = 5) -> dict[str, list[Any]]:
    """Plausible values per parameter name: the task's own (its gold and initialization arguments; telecom: also the
    caller's customer, lines and bills), up to `others` values other tasks of the domain use, and domain defaults. A
    call picks each argument from its pool, so it repeats a gold call only by chance (one argument in several
    candidates each); a parameter with no value gets "unknown" (the call then fails, as a guessed id would)."""
    pool: dict[str, list[Any]] = {name: list(values) for name, values in DEFAULT_ARGUMENTS.items()}

    def add(name: str, value: Any) -> None:
        if _json_key(value) not in {_json_key(known) for known in pool.setdefault(name, [])}:
            pool[name].append(value)

    initial = task.initial_state
    own = [*(task.evaluation_criteria.actions or []), *((initial.initialization_actions or []) if initial else [])]
    for action in own:
        for name, value in action.arguments.items():
            add(name, value)
    for name, values in domain_values(domain).items():
        for value in rng.sample(values, min(others, len(values))):
            add(name, value)
    if domain == "telecom":
        env = initial_environment(task, domain)
        phone = env.user_tools.db.surroundings.phone_number
        if phone:
            add("phone_number", phone)
            customer = env.tools.get_customer_by_phone(phone)
            add("customer_id", customer.customer_id)
            add("full_name", customer.full_name)
            for line_id in customer.line_ids:
                add("line_id", line_id)
                add("id", line_id)
            for bill_id in customer.bill_ids:
                add("bill_id", bill_id)
    return pool


def random_call(rng: random.Random, tools: Sequence[ToolInfo], pool: dict[str, list[Any]]) -> Call:
    tool = rng.choice(list(tools))
    arguments = {name: rng.choice(pool.get(name) or ["unknown"]) for name in tool.params}
    return tool.requestor, tool.name, arguments


def spam_calls(task: Any, domain: str, rng: random.Random, length: int) -> list[Call]:
    """Random tool spam: `length` calls of tools drawn at random (writes and reads alike), plausible arguments."""
    tools, pool = tool_catalog(domain), argument_pool(task, domain, rng)
    return [random_call(rng, tools, pool) for _ in range(length)]


def every_tool_calls(task: Any, domain: str, rng: random.Random) -> list[Call]:
    """Every tool of the domain once, in random order."""
    pool = argument_pool(task, domain, rng)
    tools = tool_catalog(domain)
    return [random_call(rng, [tool], pool) for tool in rng.sample(tools, len(tools))]


class WeakEpisode(BaseModel):
    calls: list[tuple[str, str, dict[str, Any]]]
    termination: str
    gold_done: int


def weak_episode(task: Any, domain: str, rng: random.Random) -> WeakEpisode:
    """What a weak policy does: some of the gold actions (a prefix, or a random subset in random order; all of them
    one time in ten), 0-3 noise calls of tools the gold actions do not use, a premature transfer one time in five,
    and a truncated end (max_steps) one time in four."""
    gold = gold_calls(task)
    n = len(gold)
    k = n if n == 0 or rng.random() < 0.1 else rng.randrange(n)
    chosen = list(range(k)) if rng.random() < 0.5 else sorted(rng.sample(range(n), k))
    if rng.random() < 0.5:
        rng.shuffle(chosen)
    calls = [gold[i] for i in chosen]
    gold_names = {name for _, name, _ in gold}
    noise_tools = [tool for tool in tool_catalog(domain) if tool.name not in gold_names and tool.name != TRANSFER_TOOL]
    pool = argument_pool(task, domain, rng)
    for _ in range(rng.randint(0, 3)):
        calls.insert(rng.randint(0, len(calls)), random_call(rng, noise_tools, pool))
    if rng.random() < 0.2 and TRANSFER_TOOL not in gold_names:
        calls.append(("assistant", TRANSFER_TOOL, {"summary": DEFAULT_ARGUMENTS["summary"][0]}))
    termination = "max_steps" if rng.random() < 0.25 else "user_stop"
    return WeakEpisode(calls=calls, termination=termination, gold_done=len(chosen))


# ------------------------------------------------------------------------------------------------- statistics


def ranks(values: Sequence[float]) -> np.ndarray:
    """Average ranks (ties share the mean of their positions)."""
    array = np.asarray(values, dtype=float)
    order = np.argsort(array, kind="mergesort")
    out = np.empty(len(array))
    sorted_values = array[order]
    start = 0
    while start < len(array):
        end = start
        while end + 1 < len(array) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        out[order[start : end + 1]] = (start + end) / 2.0
        start = end + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation; None when either side is constant."""
    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def median_ms(values: Sequence[float]) -> float:
    return statistics.median(values) * 1000 if values else float("nan")


def p90_ms(values: Sequence[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)] * 1000


# ------------------------------------------------------------------------------------------------- 1. cost


def measure_cost(settings: Settings) -> dict[str, Any]:
    """Per domain: building the target (once per task), the progress figures on a live end environment, and tau2's
    own evaluation of the same episode (the first half of the gold actions)."""
    from tau2.evaluator.evaluator import EvaluationType, evaluate_simulation

    rows = {}
    for domain in DOMAINS:
        tasks = domain_tasks(domain, settings.cost_tasks)
        target_s, progress_s, tau2_s = [], [], []
        for task in tasks:
            calls = gold_calls(task)[: len(gold_calls(task)) // 2]
            progress_module._TARGETS.pop((domain, task.id), None)
            started = time.perf_counter()
            progress_module.progress_target(task, domain)
            target_s.append(time.perf_counter() - started)
            env = initial_environment(task, domain)
            for position, (requestor, name, arguments) in enumerate(calls):
                env.get_response(ToolCall(id=f"c{position}", name=name, arguments=arguments, requestor=requestor))
            simulation = gold_simulation(task, domain, skip=range(len(gold_calls(task))), extra=calls)
            started = time.perf_counter()
            measure_progress(task, domain, env, simulation.messages)
            progress_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            evaluate_simulation(simulation, task, EvaluationType.ALL, False, domain)
            tau2_s.append(time.perf_counter() - started)
        rows[domain] = {
            "tasks": len(tasks),
            "progress_ms_median": median_ms(progress_s),
            "progress_ms_p90": p90_ms(progress_s),
            "tau2_eval_ms_median": median_ms(tau2_s),
            "target_ms_median": median_ms(target_s),
            "target_ms_p90": p90_ms(target_s),
        }
    return rows


# -------------------------------------------------------------------------------------------- 2. properties


def uncounted_reason(task: Any, domain: str, position: int) -> str:
    """Why the end state cannot show gold action `position` (it is not in the target's `counted`)."""
    target = progress_module.progress_target(task, domain)
    action = task.evaluation_criteria.actions[position]
    writes = {tool.name for tool in tool_catalog(domain) if tool.writes}
    if action.name == TRANSFER_TOOL:
        return "transfer: changes no state"
    if action.name not in writes:
        return "read-only tool"
    if position in target.gold_errors:
        return "raises in the gold replay (tau2 skips it too)"
    if not target.steps[position]:
        return "changes nothing (a repeat, or already so)"
    return "undone by a later gold action"


def check_task(task: Any, domain: str, rng: random.Random, settings: Settings) -> dict[str, Any] | None:
    """Both credits on one task: every gold prefix, nothing, spam runs and every tool once (None: tau2 cannot
    grade a gold prefix)."""
    gold = gold_calls(task)
    target = progress_module.progress_target(task, domain)
    episodes = [play(task, domain, gold[:k]) for k in range(len(gold) + 1)]
    if any(episode is None for episode in episodes):
        return None
    prefixes = [all_shaped(episode) for episode in episodes]

    def run(calls: list[Call]) -> dict[str, Any] | None:
        metadata = play(task, domain, calls)
        if metadata is None:
            return None
        return {"success": metadata["reward"] >= 1.0 - 1e-6, "shaped": all_shaped(metadata)}

    steps = []
    for k in range(1, len(gold) + 1):
        counted = (k - 1) in target.counted
        steps.append(
            {
                "action": gold[k - 1][1],
                "counted": counted,
                "reason": None if counted else uncounted_reason(task, domain, k - 1),
                "old": (prefixes[k - 1]["checks (old)"], prefixes[k]["checks (old)"]),
                "new": (prefixes[k - 1]["progress (new default)"], prefixes[k]["progress (new default)"]),
                "partial_new": shape_reward(episodes[k], 0.0, CREDITS["progress (new default)"])[1],
            }
        )
    truncated_full = play(task, domain, gold, termination="max_steps")
    return {
        "task_id": task.id,
        "n": len(gold),
        "steps": steps,
        "half": prefixes[len(gold) // 2],
        "truncated_full": all_shaped(truncated_full) if truncated_full is not None else None,
        "full": prefixes[-1],
        "full_success": episodes[-1]["reward"] >= 1.0 - 1e-6,
        "nothing": prefixes[0],
        "spam": [
            run(spam_calls(task, domain, rng, settings.spam_length)) for _ in range(settings.spam_runs.get(domain, 1))
        ],
        "every": [run(every_tool_calls(task, domain, rng))],
    }


def summarize_properties(results: list[dict[str, Any] | None]) -> dict[str, Any]:
    graded = [result for result in results if result is not None]
    summary: dict[str, Any] = {"tasks": len(results), "ungradable_tasks": len(results) - len(graded)}
    summary["gold_fails"] = sum(1 for result in graded if not result["full_success"])
    reasons: dict[str, int] = {}
    for result in graded:
        for step in result["steps"]:
            if step["reason"]:
                reasons[step["reason"]] = reasons.get(step["reason"], 0) + 1
    summary["uncounted_reasons"] = reasons
    for credit, key in (("checks (old)", "old"), ("progress (new default)", "new")):
        strict_up = ties = drops = below_full = not_below_full = 0
        counted_up = counted_steps = 0
        for result in graded:
            full = result["full"][credit]
            for index, step in enumerate(result["steps"]):
                before, after = step[key]
                strict_up += after > before
                ties += after == before
                drops += after < before
                if step["counted"]:
                    counted_steps += 1
                    counted_up += after > before
                if index < len(result["steps"]) - 1:  # k < n
                    below_full += after < full
                    not_below_full += after >= full
        values: dict[str, Any] = {
            "steps": strict_up + ties + drops,
            "strictly_up": strict_up,
            "ties": ties,
            "drops": drops,
            "counted_steps": counted_steps,
            "counted_up": counted_up,
            "k_below_n": below_full,
            "k_not_below_n": not_below_full,
            "nothing_mean": statistics.fmean(r["nothing"][credit] for r in graded) if graded else 0.0,
        }
        halves = [r for r in graded if r["n"] >= 2]
        values["half_tasks"] = len(halves)
        values["half_above_nothing"] = sum(1 for r in halves if r["half"][credit] > r["nothing"][credit] + 1e-12)
        values["half_mean"] = statistics.fmean(r["half"][credit] for r in halves) if halves else 0.0
        values["half_nothing_mean"] = statistics.fmean(r["nothing"][credit] for r in halves) if halves else 0.0
        pairs = [(r["half"][credit], r["truncated_full"][credit]) for r in halves if r["truncated_full"] is not None]
        values["half_vs_truncated_full"] = {
            "pairs": len(pairs),
            "half_higher": sum(1 for half, cut in pairs if half > cut + 1e-12),
            "equal": sum(1 for half, cut in pairs if abs(half - cut) <= 1e-12),
            "truncated_full_higher": sum(1 for half, cut in pairs if cut > half + 1e-12),
        }
        for kind in ("spam", "every"):
            runs = [(r["nothing"][credit], run) for r in graded for run in r[kind]]
            failing = [(nothing, run) for nothing, run in runs if run is not None and not run["success"]]
            values[f"{kind}_runs"] = len(runs)
            values[f"{kind}_ungradable"] = sum(1 for _, run in runs if run is None)
            values[f"{kind}_successes"] = sum(1 for _, run in runs if run is not None and run["success"])
            values[f"{kind}_failing"] = len(failing)
            values[f"{kind}_above_nothing"] = sum(
                1 for nothing, run in failing if run["shaped"][credit] > nothing + 1e-12
            )
            values[f"{kind}_mean"] = statistics.fmean(run["shaped"][credit] for _, run in failing) if failing else 0.0
        summary[key] = values
    summary["by_credit"] = {}
    for credit in [*CREDITS, *DERIVED]:
        row: dict[str, Any] = {}
        for kind in ("spam", "every"):
            failing = [
                (r["nothing"][credit], run) for r in graded for run in r[kind] if run is not None and not run["success"]
            ]
            row[f"{kind}_failing"] = len(failing)
            row[f"{kind}_above_nothing"] = sum(1 for nothing, run in failing if run["shaped"][credit] > nothing + 1e-12)
        summary["by_credit"][credit] = row
    return summary


# ------------------------------------------------------------------------------------------- 3./4. signal


def group_signal(groups: list[list[tuple[dict[str, float], float, bool]]]) -> dict[str, Any]:
    """groups: [(shaped per credit, true progress, success)] per group; statistics over the all-fail groups."""
    all_fail = [group for group in groups if not any(success for _, _, success in group)]
    credits = list(groups[0][0][0]) if groups and groups[0] else []
    out: dict[str, Any] = {"groups": len(groups), "all_fail_groups": len(all_fail), "credits": {}}
    for credit in credits:
        with_signal = 0
        correlations = []
        pooled_x: list[float] = []
        pooled_y: list[float] = []
        for group in all_fail:
            values = [scores[credit] for scores, _, _ in group]
            truth = [truth for _, truth, _ in group]
            with_signal += max(values) > min(values)
            if len(set(truth)) > 1:
                correlation = spearman(values, truth)
                correlations.append(correlation if correlation is not None else 0.0)
            pooled_x.extend(values)
            pooled_y.extend(truth)
        out["credits"][credit] = {
            "signal_fraction": with_signal / len(all_fail) if all_fail else float("nan"),
            "within_group_spearman": statistics.fmean(correlations) if correlations else float("nan"),
            "groups_with_varying_truth": len(correlations),
            "pooled_spearman": spearman(pooled_x, pooled_y),
        }
    return out


def synthetic_signal(settings: Settings) -> dict[str, Any]:
    rng = random.Random(settings.seed + 1)
    out = {}
    for domain, groups_per_task in settings.groups_per_task.items():
        if not groups_per_task:
            continue
        groups = []
        ungradable = 0
        for task in domain_tasks(domain, settings.tasks_per_domain.get(domain)):
            n = len(gold_calls(task))
            for _ in range(groups_per_task):
                group = []
                for _ in range(settings.group_size):
                    episode = weak_episode(task, domain, rng)
                    metadata = play(task, domain, episode.calls, episode.termination)
                    if metadata is None:
                        ungradable += 1
                        continue
                    truth = episode.gold_done / n if n else 0.0
                    group.append((all_shaped(metadata), truth, metadata["reward"] >= 1.0 - 1e-6))
                groups.append(group)
        out[domain] = group_signal(groups)
        out[domain]["ungradable_episodes"] = ungradable
    return out


def rollout_signal(paths: Sequence[Path]) -> dict[str, Any] | None:
    """Real rollouts: JSONL records of examples/cpu_rollout_batch.py (--output), grouped by file and group_index."""
    if not paths:
        return None
    groups: dict[tuple[str, Any], list[tuple[dict[str, float], float, bool]]] = {}
    episodes = failed = missing_progress = 0
    tasks: set[str] = set()
    for path in paths:
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            metadata = dict(record.get("metadata") or {})
            if record.get("status") == "FAILED" or record.get("reward") is None:
                failed += 1
                continue
            metadata["reward"] = float(record["reward"])
            truth = true_progress(metadata)
            if truth is None:
                truth = 0.0
            missing_progress += not isinstance(metadata.get("progress"), dict) or "error" in metadata["progress"]
            episodes += 1
            tasks.add(str(metadata.get("task_id")))
            key = (str(path), record.get("group_index"))
            groups.setdefault(key, []).append((all_shaped(metadata), truth, metadata["reward"] >= 1.0 - 1e-6))
    summary = group_signal(list(groups.values()))
    summary.update({"episodes": episodes, "failed": failed, "tasks": len(tasks), "without_progress": missing_progress})
    truths = [truth for group in groups.values() for _, truth, _ in group]
    summary["episodes_with_any_gold_action"] = sum(1 for truth in truths if truth > 0)
    summary["successes"] = sum(1 for group in groups.values() for _, _, success in group if success)
    return summary


# -------------------------------------------------------------------------------------------- 5. the guard


def guard_comparison(settings: Settings) -> dict[str, Any]:
    """Telecom tasks whose gold does not transfer: the first k gold actions then a proper end, against the same k
    then a transfer, for every k < n."""
    pairs: dict[str, list[tuple[float, float]]] = {name: [] for name in CREDITS}
    for task in domain_tasks("telecom", settings.tasks_per_domain.get("telecom")):
        gold = gold_calls(task)
        if any(name == TRANSFER_TOOL for _, name, _ in gold):
            continue
        transfer = ("assistant", TRANSFER_TOOL, {"summary": DEFAULT_ARGUMENTS["summary"][0]})
        for k in range(len(gold)):
            ended = play(task, "telecom", gold[:k])
            transferred = play(task, "telecom", [*gold[:k], transfer])
            if ended is None or transferred is None:
                continue
            for name, config in CREDITS.items():
                pairs[name].append((shaped(ended, config), shaped(transferred, config)))
    out = {}
    for name, values in pairs.items():
        out[name] = {
            "pairs": len(values),
            "transfer_lower": sum(1 for end, transfer in values if transfer < end - 1e-12),
            "equal": sum(1 for end, transfer in values if abs(transfer - end) <= 1e-12),
            "transfer_higher": sum(1 for end, transfer in values if transfer > end + 1e-12),
            "mean_end": statistics.fmean(end for end, _ in values) if values else float("nan"),
            "mean_transfer": statistics.fmean(transfer for _, transfer in values) if values else float("nan"),
        }
    return out


# ---------------------------------------------------------------------------------------------------- report


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return lines


def signal_rows(signal: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for credit, values in signal["credits"].items():
        rows.append(
            [
                credit,
                values["signal_fraction"],
                values["within_group_spearman"],
                values["groups_with_varying_truth"],
                values["pooled_spearman"],
            ]
        )
    return rows


SIGNAL_HEADER = (
    "credit",
    "all-fail groups with signal",
    "Spearman within group (mean)",
    "groups with varying truth",
    "Spearman pooled",
)


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        "# Partial credit: tau2's checks against progress toward the gold end state",
        "",
        f"Written by `python bench/partial_credit.py{' --quick' if meta['quick'] else ''}` (edit the script, not "
        f"the tables; the part from '{KEEP_HEADING}' on is hand-written and kept when the script rewrites this file)."
        " Real tau2 tasks (train + test splits), real environments, tau2's own evaluator; episodes are lists of tool"
        " calls played against the environment (`tests/tau2_gold.py`), measured by `reward/progress.py` and shaped by"
        " `reward/tau2_reward_shaping.py` with its defaults (alpha 0.5, truncation discount 0.5).",
        "",
        f"- Run: {meta['when']}, {meta['wall_s']:.0f} s; Python {meta['python']}; {meta['cores']} cores; load "
        f"before {meta['load_before']}, after {meta['load_after']} (shared machine: wall times include other jobs).",
        "",
        "## 1. Cost per episode",
        "",
        "The progress figures are computed once per episode at its end, on the live environment (the engine's"
        " `run_cpu`, on the asyncio loop by default); the target is built once per task and cached. tau2's evaluation"
        " is `evaluate_simulation(..., EvaluationType.ALL, ...)` of the same episode (the first half of the gold"
        " actions), which every episode already pays.",
        "",
    ]
    cost_rows = [
        [
            domain,
            row["tasks"],
            row["progress_ms_median"],
            row["progress_ms_p90"],
            row["tau2_eval_ms_median"],
            row["progress_ms_median"] / row["tau2_eval_ms_median"],
            row["target_ms_median"],
            row["target_ms_p90"],
        ]
        for domain, row in results["cost"].items()
    ]
    lines += table(
        (
            "domain",
            "tasks",
            "progress ms (median)",
            "progress ms (p90)",
            "tau2 evaluation ms (median)",
            "progress / tau2",
            "target build ms, once per task (median)",
            "(p90)",
        ),
        cost_rows,
    )
    lines += [
        "",
        "## 2. Properties on every task",
        "",
        "Per task: the first k gold actions for every k (a proper end), nothing at all, random tool spam (calls of"
        " random tools of the domain, the agent's and the user's, each argument drawn from the task's own values, a few"
        " other tasks' values and domain defaults) and every tool of the domain once. A step is k-1 -> k; 'steps the"
        " state can show' leaves out the gold actions listed below. 'k < n below n' compares shaped rewards; the"
        " exceptions are prefixes that already succeed (airline and retail tasks whose remaining gold actions are"
        " look-ups). Spam and every-tool columns: failing runs (the shaped reward of a success"
        " outranks everything anyway) scoring above doing nothing, and their mean shaped reward.",
        "",
    ]
    header = (
        "domain",
        "credit",
        "tasks",
        "steps k-1 -> k",
        "up",
        "tied",
        "down",
        "steps the state can show: up",
        "k < n below n",
        "nothing (mean)",
        "spam: failing runs above nothing",
        "spam: mean",
        "every tool: failing runs above nothing",
        "every tool: mean",
    )
    rows = []
    for domain, summary in results["properties"].items():
        for key, name in (("old", "checks (old)"), ("new", "progress (new)")):
            v = summary[key]
            rows.append(
                [
                    domain,
                    name,
                    summary["tasks"],
                    v["steps"],
                    v["strictly_up"],
                    v["ties"],
                    v["drops"],
                    f"{v['counted_up']}/{v['counted_steps']}",
                    f"{v['k_below_n']}/{v['k_below_n'] + v['k_not_below_n']}",
                    v["nothing_mean"],
                    f"{v['spam_above_nothing']}/{v['spam_failing']}",
                    v["spam_mean"],
                    f"{v['every_above_nothing']}/{v['every_failing']}",
                    v["every_mean"],
                ]
            )
    lines += table(header, rows)
    lines += [
        "",
        "The first half of the gold actions (k = n // 2, tasks with n >= 2) ended properly, against doing nothing and"
        " against all gold actions in an episode that never ends (truncated at max_steps):",
        "",
    ]
    half_rows = []
    for domain, summary in results["properties"].items():
        for key, name in (("old", "checks (old)"), ("new", "progress (new)")):
            v = summary[key]
            cut = v["half_vs_truncated_full"]
            half_rows.append(
                [
                    domain,
                    name,
                    f"{v['half_above_nothing']}/{v['half_tasks']}",
                    v["half_mean"],
                    v["half_nothing_mean"],
                    f"{cut['half_higher']} / {cut['equal']} / {cut['truncated_full_higher']}",
                ]
            )
    lines += table(
        (
            "domain",
            "credit",
            "half above nothing",
            "half (mean shaped)",
            "nothing (mean shaped)",
            "half vs all-but-never-ended: higher / equal / lower",
        ),
        half_rows,
    )
    lines += ["", "Failing spam and every-tool runs above doing nothing, per credit:", ""]
    credit_rows = []
    for credit in [*CREDITS, *DERIVED]:
        cells: list[Any] = [credit]
        for summary in results["properties"].values():
            row = summary["by_credit"][credit]
            cells += [
                f"{row['spam_above_nothing']}/{row['spam_failing']}",
                f"{row['every_above_nothing']}/{row['every_failing']}",
            ]
        credit_rows.append(cells)
    credit_header = ["credit"]
    for domain in results["properties"]:
        credit_header += [f"{domain}: spam", f"{domain}: every tool"]
    lines += table(credit_header, credit_rows)
    lines += ["", "Gold actions the end state cannot show (their step ties under the progress credit), by reason:", ""]
    for domain, summary in results["properties"].items():
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(summary["uncounted_reasons"].items()))
        lines.append(f"- {domain}: {reasons or 'none'}")
    lines += ["", "Spam and every-tool runs tau2 grades as successes, or cannot grade, are left out of the table:", ""]
    for domain, summary in results["properties"].items():
        v = summary["new"]
        lines.append(
            f"- {domain}: spam {v['spam_successes']} successes, {v['spam_ungradable']} ungradable of"
            f" {v['spam_runs']} runs; every tool {v['every_successes']} successes, {v['every_ungradable']}"
            f" ungradable of {v['every_runs']}; gold actions that do not succeed: {summary['gold_fails']} tasks;"
            f" gold prefixes tau2 cannot grade: {summary['ungradable_tasks']} tasks."
        )
    lines += [
        "",
        "## 3. Learning signal on synthetic weak-policy groups",
        "",
        "Groups of one task's episodes as a weak policy plays them: some gold actions (a prefix or a random subset,"
        " in order or shuffled; all of them one time in ten), 0-3 noise calls of tools the gold actions do not use, a"
        " premature transfer one time in five (tasks whose gold does not transfer), a truncated end one time in four."
        " True progress = the share of gold actions performed. Over all-fail groups (no success): the share whose"
        " shaped rewards are not all equal (GRPO gets a gradient), and Spearman's rank correlation between shaped"
        " reward and true progress (within group, averaged over groups whose true progress varies, a constant reward"
        " counting 0; and pooled over all their episodes).",
        "",
    ]
    for domain, signal in results["synthetic"].items():
        lines += [
            f"**{domain}**: {signal['groups']} groups, {signal['all_fail_groups']} all-fail"
            f" ({signal['ungradable_episodes']} episodes tau2 could not grade left out).",
            "",
        ]
        lines += table(SIGNAL_HEADER, signal_rows(signal))
        lines.append("")
    lines += ["## 4. Learning signal on real rollouts of the CPU model", ""]
    rollouts = results.get("rollouts")
    if rollouts is None:
        lines += ["Not run (pass `--rollouts FILE.jsonl` from `examples/cpu_rollout_batch.py --output`).", ""]
    else:
        lines += [
            f"{rollouts['episodes']} episodes ({rollouts['failed']} failed and left out) on {rollouts['tasks']}"
            f" telecom train tasks in {rollouts['groups']} groups, {rollouts['all_fail_groups']} all-fail;"
            f" {rollouts['successes']} successes; {rollouts['episodes_with_any_gold_action']} episodes performed at"
            f" least one gold action; {rollouts['without_progress']} without progress figures. Source:"
            f" {rollouts.get('source', 'see the design section')}.",
            "",
        ]
        lines += table(SIGNAL_HEADER, signal_rows(rollouts))
        lines.append("")
    lines += [
        "## 5. The transfer guard",
        "",
        "Telecom tasks whose gold actions do not transfer, every k < n: the first k gold actions then a proper end,"
        " against the same k actions then `transfer_to_human_agents` (the user leaves on the transfer: also a proper"
        " end).",
        "",
    ]
    guard_rows = [
        [name, v["pairs"], v["transfer_lower"], v["equal"], v["transfer_higher"], v["mean_end"], v["mean_transfer"]]
        for name, v in results["guard"].items()
    ]
    lines += table(
        ("credit", "pairs", "transfer lower", "equal", "transfer higher", "mean shaped: end", "mean shaped: transfer"),
        guard_rows,
    )
    lines.append("")
    return "\n".join(lines)


def run(settings: Settings, quick: bool, rollouts: Sequence[Path], rollout_source: str | None) -> dict[str, Any]:
    started = time.perf_counter()
    load_before = " ".join(f"{value:.2f}" for value in os.getloadavg())
    rng = random.Random(settings.seed)
    for domain in DOMAINS:
        fast_env_constructor(domain)
    results: dict[str, Any] = {"settings": settings.model_dump(), "cost": measure_cost(settings), "properties": {}}
    for domain in DOMAINS:
        checked = [
            check_task(task, domain, rng, settings)
            for task in domain_tasks(domain, settings.tasks_per_domain.get(domain))
        ]
        results["properties"][domain] = summarize_properties(checked)
        results["properties"][domain]["task_results"] = checked
    results["synthetic"] = synthetic_signal(settings)
    results["rollouts"] = rollout_signal(rollouts)
    if results["rollouts"] is not None and rollout_source:
        results["rollouts"]["source"] = rollout_source
    results["guard"] = guard_comparison(settings)
    results["meta"] = {
        "quick": quick,
        "when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_s": time.perf_counter() - started,
        "python": platform.python_version(),
        "cores": len(os.sched_getaffinity(0)),
        "load_before": load_before,
        "load_after": " ".join(f"{value:.2f}" for value in os.getloadavg()),
    }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few tasks per domain (smoke test)")
    parser.add_argument("--settings", default=None, help="JSON overrides of the settings")
    parser.add_argument("--out", type=Path, default=None, help="markdown report (e.g. docs/partial_credit.md)")
    parser.add_argument("--json", type=Path, default=None, help="all numbers as JSON")
    parser.add_argument("--rollouts", type=Path, nargs="*", default=[], help="cpu_rollout_batch.py --output files")
    parser.add_argument("--rollout-source", default=None, help="one line on how the rollout files were made")
    parser.add_argument("--from-json", type=Path, default=None, help="re-render a run's --json output, no new runs")
    opts = parser.parse_args(argv)
    settings = QUICK if opts.quick else Settings()
    if opts.settings:
        settings = settings.model_copy(update=json.loads(opts.settings))
    for path in opts.rollouts:
        if not path.exists():
            parser.error(f"no rollout file at {path}; write one with examples/cpu_rollout_batch.py --output")
    if opts.from_json:
        results = json.loads(opts.from_json.read_text())
        for domain, summary in results["properties"].items():
            task_results = summary["task_results"]
            results["properties"][domain] = {**summarize_properties(task_results), "task_results": task_results}
    else:
        results = run(settings, opts.quick, opts.rollouts, opts.rollout_source)
    report = render(results)
    print(report)
    if opts.out:
        kept = ""
        if opts.out.exists():
            previous = opts.out.read_text()
            at = previous.find("\n" + KEEP_HEADING)
            if at >= 0:
                kept = previous[at:]
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(report + kept)
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
