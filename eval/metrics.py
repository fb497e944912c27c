"""Evaluation metrics over finished episodes: pure functions, no I/O.

Definitions (n = trials of a task, c = its successes, T = tasks):
- success: tau2's reward is at least 1 - 1e-6 (tau2's `is_successful` on its rewards, which lie in [0, 1]; the
  recipe's one definition, reward.tau2_reward_shaping.is_success). A failed episode (infrastructure: server down,
  timeout, evaluator error) has no reward; by default it counts as a failure with reward 0 and partial 0, and it is
  dropped from every rate only with `exclude_failed=True`. Either way the failed episodes are counted and listed.
- pass@1: mean success over ALL counted trials, pooled (sum c / sum n). With equal n per task it equals pass^1.
- pass^k (tau2's leaderboard "pass_hat_k", arXiv 2406.12045): per task C(c, k) / C(n, k), averaged over tasks, for
  k = 1 .. min n over tasks (as tau2 caps k at the smallest trial count). The chance that k draws without
  replacement from a task's trials ALL succeed: reliability.
- pass@k: per task the unbiased estimator 1 - C(n - c, k) / C(n, k) (chance that at least one of k draws succeeds),
  averaged over tasks, k = 1 .. min n. Optimistic; it is what papers calling "pass@k = any success" report.
- avg_reward: mean of tau2's reward over counted episodes.
- avg_partial_score: mean of `reward.partial_credit.compute_partial_score(reward_info)` over counted episodes, using
  tau2's own reward_info only. tau2 computes no sub-checks for episodes that did not end with agent_stop / user_stop,
  so a truncated episode scores partial 0 here: the headline never mixes in re-graded checks. The checks the engine
  computes for truncated episodes anyway (`truncated_checks`: tau2's evaluator run as if the episode had stopped)
  are reported apart, under `truncated`, with the alternative average `avg_partial_score_with_truncated_checks`
  that uses them for truncated episodes (clearly labelled; not the headline).
- partial components: per component, the mean fraction met over the counted episodes that have that component.
- pass@1 confidence interval: percentile cluster bootstrap. The T tasks are resampled with replacement (all trials
  of a drawn task stay together), pass@1 is recomputed as pooled successes / pooled trials of the draw, repeated
  `resamples` times with numpy's PCG64 generator seeded with `seed`; the interval is the (alpha/2, 1 - alpha/2)
  percentiles (linear interpolation). Same data and seed -> same interval.
- episode statistics (turns, tokens, latency): mean, median and 90th percentile (numpy linear interpolation) over
  the episodes that did not fail (a failed episode's counts describe the failure, not the policy).
- transfer_rate: share of counted episodes in which the agent called transfer_to_human_agents at least once;
  unneeded_transfer_rate: the same over episodes of tasks whose gold actions hold no transfer (None when the gold is
  not known). On telecom always-transferring solves every transfer-only task, so a policy collapsing onto it shows
  here first.
- tau2's names: `pass_hat_1`, `pass_hat_2`, ... and `avg_reward` are tau2's `compute_metrics` keys for the same
  numbers (`tau2_metric_keys`).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from reward.partial_credit import compute_partial_score
from reward.tau2_reward_shaping import is_success

TRANSFER_TOOL = "transfer_to_human_agents"
NO_GROUP = "(none)"  # group label for episodes without a subtask / persona
DEFAULT_RESAMPLES = 10_000
DEFAULT_BOOTSTRAP_SEED = 0


class EpisodeRow(BaseModel):
    """One finished episode, reduced to what the metrics read (built from a results JSONL record)."""

    task_id: str
    trial: int
    subtask: str | None = None
    persona: str | None = None
    status: str
    termination_reason: str
    reward: float | None = None
    partial_score: float = 0.0
    partial_components: dict[str, float] = Field(default_factory=dict)
    truncated_partial_score: float | None = None
    truncated_partial_components: dict[str, float] = Field(default_factory=dict)
    truncated_reward: float | None = None
    turns: int = 0
    steps: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    invalid_turns: int = 0
    policy_prompt_tokens: int = 0
    policy_completion_tokens: int = 0
    user_prompt_tokens: int = 0
    user_completion_tokens: int = 0
    wall_s: float = 0.0
    policy_latency_s: float = 0.0
    user_latency_s: float = 0.0
    failure: str | None = None
    transferred: bool = False
    gold_transfers: bool | None = None  # whether the task's gold actions hold a transfer (None: not known)

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    @property
    def success(self) -> bool:
        return not self.failed and is_success(self.reward)

    @property
    def truncated(self) -> bool:
        return self.status == "truncated"


def agent_transferred(messages: Iterable[Mapping[str, Any]]) -> bool:
    """Whether the agent called transfer_to_human_agents in a tau2 trajectory (messages as model_dump dicts)."""
    for message in messages:
        if message.get("role") != "assistant":
            continue
        for call in message.get("tool_calls") or []:
            if call.get("name") == TRANSFER_TOOL:
                return True
    return False


def row_from_episode(
    episode: Mapping[str, Any],
    trial: int,
    subtask: str | None = None,
    persona: str | None = None,
    gold_transfers: bool | None = None,
) -> EpisodeRow:
    """An EpisodeRow from `EpisodeResult.summary()`; the partial scores come from `compute_partial_score`."""
    status = str(episode.get("status") or "failed")
    reward = episode.get("reward")
    reward_info = episode.get("reward_info")
    partial, components = compute_partial_score(reward_info) if reward_info else (0.0, {})
    truncated_info = episode.get("truncated_checks")
    truncated_partial = None
    truncated_components: dict[str, float] = {}
    truncated_reward = None
    if truncated_info:
        truncated_partial, truncated_components = compute_partial_score(truncated_info)
        raw = truncated_info.get("reward") if isinstance(truncated_info, Mapping) else None
        truncated_reward = float(raw) if raw is not None else None
    return EpisodeRow(
        task_id=str(episode["task_id"]),
        trial=int(trial),
        subtask=subtask,
        persona=persona,
        status=status,
        termination_reason=str(episode.get("termination_reason") or "unknown"),
        reward=float(reward) if reward is not None and status != "failed" else None,
        partial_score=partial if status != "failed" else 0.0,
        partial_components=components if status != "failed" else {},
        truncated_partial_score=truncated_partial,
        truncated_partial_components=truncated_components,
        truncated_reward=truncated_reward,
        turns=int(episode.get("turns") or 0),
        steps=int(episode.get("steps") or 0),
        tool_calls=int(episode.get("tool_calls") or 0),
        tool_errors=int(episode.get("tool_errors") or 0),
        invalid_turns=len(episode.get("invalid_turns") or []),
        policy_prompt_tokens=int(episode.get("policy_prompt_tokens") or 0),
        policy_completion_tokens=int(episode.get("policy_completion_tokens") or 0),
        user_prompt_tokens=int(episode.get("user_prompt_tokens") or 0),
        user_completion_tokens=int(episode.get("user_completion_tokens") or 0),
        wall_s=float(episode.get("wall_s") or 0.0),
        policy_latency_s=float(episode.get("policy_latency_s") or 0.0),
        user_latency_s=float(episode.get("user_latency_s") or 0.0),
        failure=episode.get("failure"),
        transferred=agent_transferred(episode.get("messages") or []),
        gold_transfers=gold_transfers,
    )


# ------------------------------------------------------------------------------------------------ pass metrics


def pass_hat_k(num_trials: int, successes: int, k: int) -> float:
    """C(successes, k) / C(num_trials, k): chance that k of the trials drawn without replacement all succeed."""
    _check_counts(num_trials, successes, k)
    return math.comb(successes, k) / math.comb(num_trials, k)


def pass_at_k(num_trials: int, successes: int, k: int) -> float:
    """1 - C(num_trials - successes, k) / C(num_trials, k): chance that at least one of k drawn trials succeeds."""
    _check_counts(num_trials, successes, k)
    return 1.0 - math.comb(num_trials - successes, k) / math.comb(num_trials, k)


def _check_counts(num_trials: int, successes: int, k: int) -> None:
    if k < 1 or num_trials < k:
        raise ValueError(f"k must be in [1, num_trials]: k={k}, num_trials={num_trials}")
    if not 0 <= successes <= num_trials:
        raise ValueError(f"successes must be in [0, num_trials]: {successes} of {num_trials}")


def successes_by_task(rows: Iterable[EpisodeRow]) -> dict[str, list[bool]]:
    """Task id -> success of each of its episodes (in the order given)."""
    out: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        out[row.task_id].append(row.success)
    return dict(out)


def pass_at_1(by_task: Mapping[str, Sequence[bool]]) -> float | None:
    """Pooled mean success over all trials; None without trials."""
    trials = sum(len(v) for v in by_task.values())
    if trials == 0:
        return None
    return sum(sum(v) for v in by_task.values()) / trials


def max_k(by_task: Mapping[str, Sequence[bool]]) -> int:
    """Largest k every task supports: the smallest trial count (0 without tasks)."""
    counts = [len(v) for v in by_task.values() if len(v) > 0]
    return min(counts) if counts else 0


def _per_task_curve(
    by_task: Mapping[str, Sequence[bool]], metric: Callable[[int, int, int], float]
) -> dict[int, float]:
    tasks = [v for v in by_task.values() if len(v) > 0]
    return {k: sum(metric(len(v), sum(v), k) for v in tasks) / len(tasks) for k in range(1, max_k(by_task) + 1)}


def pass_hat_k_curve(by_task: Mapping[str, Sequence[bool]]) -> dict[int, float]:
    """tau2's pass^k for k = 1 .. min trials: per-task C(c, k) / C(n, k), averaged over tasks."""
    return _per_task_curve(by_task, pass_hat_k)


def pass_at_k_curve(by_task: Mapping[str, Sequence[bool]]) -> dict[int, float]:
    """Unbiased pass@k (any success among k) for k = 1 .. min trials, averaged over tasks."""
    return _per_task_curve(by_task, pass_at_k)


def bootstrap_pass_at_1(
    by_task: Mapping[str, Sequence[bool]],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_BOOTSTRAP_SEED,
    confidence: float = 0.95,
) -> dict[str, Any] | None:
    """Percentile cluster-bootstrap interval for pooled pass@1, resampling tasks (see the module docstring).

    Returns {"low", "high", "confidence", "resamples", "seed", "std_error", "method"}; None without tasks."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    tasks = [v for v in by_task.values() if len(v) > 0]
    if not tasks:
        return None
    successes = np.array([sum(v) for v in tasks], dtype=np.float64)
    trials = np.array([len(v) for v in tasks], dtype=np.float64)
    rng = np.random.Generator(np.random.PCG64(seed))
    draws = rng.integers(0, len(tasks), size=(resamples, len(tasks)))
    stats = successes[draws].sum(axis=1) / trials[draws].sum(axis=1)
    alpha = 1.0 - confidence
    low, high = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return {
        "low": float(low),
        "high": float(high),
        "confidence": confidence,
        "resamples": resamples,
        "seed": seed,
        "std_error": float(stats.std(ddof=1)) if resamples > 1 else 0.0,
        "method": "percentile cluster bootstrap over tasks (trials of a task resampled together)",
    }


# ------------------------------------------------------------------------------------------------- statistics


def describe(values: Sequence[float]) -> dict[str, float | int | None]:
    """{n, mean, median, p90, min, max}; the statistics are None for an empty sequence."""
    if len(values) == 0:
        return {"n": 0, "mean": None, "median": None, "p90": None, "min": None, "max": None}
    arr = np.asarray(values, dtype=np.float64)
    return {
        "n": len(values),
        "mean": float(arr.mean()),
        "median": float(np.median(arr)),
        "p90": float(np.percentile(arr, 90)),
        "min": float(arr.min()),
        "max": float(arr.max()),
    }


EPISODE_STAT_FIELDS: tuple[str, ...] = (
    "turns",
    "steps",
    "tool_calls",
    "tool_errors",
    "invalid_turns",
    "policy_prompt_tokens",
    "policy_completion_tokens",
    "user_prompt_tokens",
    "user_completion_tokens",
    "wall_s",
    "policy_latency_s",
    "user_latency_s",
)


def episode_stats(rows: Sequence[EpisodeRow]) -> dict[str, dict[str, float | int | None]]:
    """describe() of each per-episode count and timing over the episodes that did not fail."""
    kept = [row for row in rows if not row.failed]
    return {name: describe([getattr(row, name) for row in kept]) for name in EPISODE_STAT_FIELDS}


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def component_means(rows: Sequence[EpisodeRow], field: str = "partial_components") -> dict[str, dict[str, float]]:
    """Per partial-credit component: mean fraction met over the episodes that have it, and how many do."""
    collected: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        for name, value in getattr(row, field).items():
            collected[name].append(value)
    return {name: {"mean": sum(v) / len(v), "episodes": len(v)} for name, v in sorted(collected.items())}


def rates(rows: Sequence[EpisodeRow]) -> dict[str, Any]:
    """Counts, pass@1, average reward, average partial score and transfer rate of counted episodes (failed -> 0)."""
    return {
        "episodes": len(rows),
        "tasks": len({row.task_id for row in rows}),
        "successes": sum(row.success for row in rows),
        "pass_at_1": _mean([float(row.success) for row in rows]),
        "avg_reward": _mean([row.reward if row.reward is not None else 0.0 for row in rows]),
        "avg_partial_score": _mean([row.partial_score for row in rows]),
        "transfer_rate": _mean([float(row.transferred) for row in rows]),
    }


def transfer_rates(rows: Sequence[EpisodeRow]) -> dict[str, Any]:
    """transfer_rate over all counted episodes; unneeded_transfer_rate over those of tasks whose gold does not
    transfer (None without such episodes or without gold information)."""
    unneeded = [row for row in rows if row.gold_transfers is False]
    return {
        "transfer_rate": _mean([float(row.transferred) for row in rows]),
        "unneeded_transfer_rate": _mean([float(row.transferred) for row in unneeded]),
        "episodes_of_tasks_without_gold_transfer": len(unneeded),
    }


def tau2_metric_keys(pass_hat_k_by_k: Mapping[str, float], avg_reward: float | None) -> dict[str, float | None]:
    """The numbers under tau2's own metric names (`AgentMetrics.as_dict`): avg_reward, pass_hat_1, pass_hat_2, ..."""
    return {"avg_reward": avg_reward, **{f"pass_hat_{k}": v for k, v in pass_hat_k_by_k.items()}}


def breakdown(rows: Sequence[EpisodeRow], key: Callable[[EpisodeRow], str | None]) -> dict[str, dict[str, Any]]:
    """rates() per group (groups sorted by name; a missing key is grouped as "(none)")."""
    groups: dict[str, list[EpisodeRow]] = defaultdict(list)
    for row in rows:
        groups[key(row) or NO_GROUP].append(row)
    return {name: rates(groups[name]) for name in sorted(groups)}


def failure_summary(rows: Sequence[EpisodeRow]) -> dict[str, Any]:
    """The failed (infrastructure) episodes: count, first line of each distinct error, and which ones."""
    failed = [row for row in rows if row.failed]
    reasons = Counter(((row.failure or "unknown").strip().splitlines() or ["unknown"])[0][:200] for row in failed)
    return {
        "episodes": len(failed),
        "by_error": dict(reasons.most_common()),
        "episodes_list": [{"task_id": row.task_id, "trial": row.trial} for row in failed],
    }


def truncated_summary(rows: Sequence[EpisodeRow]) -> dict[str, Any]:
    """Truncated episodes (max_steps, too_many_errors, token budget, ...) graded as if they had stopped."""
    truncated = [row for row in rows if row.truncated]
    graded = [row for row in truncated if row.truncated_partial_score is not None]
    return {
        "episodes": len(truncated),
        "graded": len(graded),
        "avg_partial_score_from_truncated_checks": _mean([row.truncated_partial_score or 0.0 for row in graded]),
        "components_from_truncated_checks": component_means(graded, "truncated_partial_components"),
        "would_have_succeeded": sum(1 for row in graded if is_success(row.truncated_reward)),
        "note": (
            "tau2 gives truncated episodes reward 0 and no sub-checks; these come from tau2's evaluator run as if the "
            "episode had ended normally. They are NOT part of avg_partial_score."
        ),
    }


def summarize(
    rows: Sequence[EpisodeRow],
    exclude_failed: bool = False,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_BOOTSTRAP_SEED,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Every metric of the module docstring for one set of episodes (one row per (task, trial))."""
    counted = [row for row in rows if not (exclude_failed and row.failed)]
    by_task = successes_by_task(counted)
    headline = rates(counted)
    with_truncated = [
        row.truncated_partial_score if row.truncated and row.truncated_partial_score is not None else row.partial_score
        for row in counted
    ]
    return {
        "pass_at_1": headline["pass_at_1"],
        "pass_at_1_ci": bootstrap_pass_at_1(by_task, resamples, seed, confidence),
        "avg_reward": headline["avg_reward"],
        "avg_partial_score": headline["avg_partial_score"],
        "avg_partial_score_with_truncated_checks": _mean(with_truncated),
        "partial_components": component_means(counted),
        "pass_hat_k": {str(k): v for k, v in pass_hat_k_curve(by_task).items()},
        "pass_at_k": {str(k): v for k, v in pass_at_k_curve(by_task).items()},
        **transfer_rates(counted),
        "counts": {
            "episodes": len(rows),
            "counted_episodes": len(counted),
            "tasks": len(by_task),
            "successes": headline["successes"],
            "failed_episodes": sum(row.failed for row in rows),
            "truncated_episodes": sum(row.truncated for row in counted),
            "exclude_failed": exclude_failed,
            "trials_per_task": dict(sorted(Counter(len(v) for v in by_task.values()).items())),
        },
        "by_subtask": breakdown(counted, lambda row: row.subtask),
        "by_persona": breakdown(counted, lambda row: row.persona),
        "by_termination": breakdown(counted, lambda row: row.termination_reason),
        "episode_stats": episode_stats(rows),
        "failed": failure_summary(rows),
        "truncated": truncated_summary(counted),
        "definitions": {
            "success": "tau2 reward == 1 within 1e-6",
            "pass_at_1": "mean success over all counted trials (pooled)",
            "pass_hat_k": "tau2 leaderboard pass^k: mean over tasks of C(c,k)/C(n,k) (all k draws succeed)",
            "pass_at_k": "unbiased pass@k: mean over tasks of 1-C(n-c,k)/C(n,k) (any of k draws succeeds)",
            "transfer_rate": "share of episodes in which the agent called transfer_to_human_agents",
            "unneeded_transfer_rate": "transfer_rate over episodes of tasks whose gold actions hold no transfer",
            "avg_partial_score": (
                "mean compute_partial_score(tau2 reward_info); truncated episodes score 0 (tau2 grades no checks)"
            ),
            "failed": (
                "infrastructure failures; excluded from rates" if exclude_failed else "counted as failures (reward 0)"
            ),
        },
    }
