"""What a GRPO run shows about tau2 in W&B / TensorBoard: slime's custom rollout and eval log functions.

    --custom-rollout-log-function-path rollout.rollout_log.log_rollout
    --custom-eval-rollout-log-function-path rollout.rollout_log.log_eval_rollout

Per rollout, under `rollout/tau2/` (per in-training evaluation dataset NAME, under `eval/NAME/tau2/`):
- samples, valid, aborted, infra_failures, infra_failure_rate, infra_failures/KIND (policy_server, policy_timeout,
  user_simulator, user_simulator_timeout, episode_timeout, evaluation, setup, other): infrastructure failures are
  counted here and left out of every rate below;
- success_rate (tau2's reward == 1 over valid samples), partial_mean and shaped_mean (reward.tau2_reward_shaping's
  shape_reward with the run's TAU2_REWARD_* settings, the values the post-process normalizes);
- termination/REASON (share of valid samples), turns_mean / turns_max, tool_calls_mean, tool_errors_mean,
  invalid_turns_mean, budget_hit_rate (episodes that used up the token budget), turn_cap_hits_mean;
- user_latency_s_mean (per episode), user_latency_per_turn_s, user_sim_failures;
- shortcuts: transfer_rate (episodes calling transfer_to_human_agents), transfer_rate_gold_no_transfer (the same on
  tasks whose gold actions do not transfer: a policy collapsing onto "always transfer" drives it up),
  agent_tool_calls_per_turn (the shotgun-like rate), user_tool_calls_mean (phone actions the customer performed);
- subtask/NAME/success_rate and subtask/NAME/n for each telecom subtask (mms_issue, mobile_data_issue,
  service_issue): the transfer shortcut solves only service_issue tasks.
Both functions log through slime's own logger (W&B and TensorBoard as configured) with slime's step, then return
False so slime's generic metrics are logged too. They never raise: a logging problem is a warning, not a crash.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from reward.tau2_reward_shaping import ShapingConfig, is_success, shape_reward, task_reward_of

logger = logging.getLogger(__name__)


def _status_name(sample: Any) -> str:
    status = getattr(sample, "status", None)
    return str(getattr(status, "name", status)).rsplit(".", 1)[-1].lower()


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else 0.0


def _number(metadata: dict[str, Any], key: str) -> float:
    value = metadata.get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0


def tau2_metrics(samples: Sequence[Any], reward_key: str | None = None, config: ShapingConfig | None = None) -> dict:
    """The tau2 numbers of one batch of samples (keys without a prefix; see the module docstring)."""
    config = config or ShapingConfig.current()
    metrics: dict[str, float] = {"samples": float(len(samples))}
    failures: Counter[str] = Counter()
    aborted = 0
    valid: list[tuple[Any, dict[str, Any], float]] = []
    for sample in samples:
        metadata = sample.metadata if isinstance(getattr(sample, "metadata", None), dict) else {}
        status = _status_name(sample)
        if status == "aborted":
            aborted += 1
            continue
        if status == "failed" or metadata.get("failure_kind"):
            failures[str(metadata.get("failure_kind") or "other")] += 1
            continue
        task_reward = task_reward_of(sample, reward_key)
        if task_reward is None or getattr(sample, "remove_sample", False):
            failures["other"] += 1
            continue
        valid.append((sample, metadata, task_reward))
    infra = sum(failures.values())
    metrics.update(
        {
            "valid": float(len(valid)),
            "aborted": float(aborted),
            "infra_failures": float(infra),
            "infra_failure_rate": infra / max(1, len(samples) - aborted),
            "user_sim_failures": float(sum(n for kind, n in failures.items() if kind.startswith("user_simulator"))),
        }
    )
    metrics.update({f"infra_failures/{kind}": float(n) for kind, n in failures.items()})
    if not valid:
        return metrics

    metas = [metadata for _, metadata, _ in valid]
    shaped = [shape_reward(metadata, reward, config) for _, metadata, reward in valid]
    turns = [_number(m, "turns") for m in metas]
    total_turns = math.fsum(turns)
    metrics.update(
        {
            "success_rate": _mean([1.0 if is_success(reward) else 0.0 for _, _, reward in valid]),
            "partial_mean": _mean([partial for _, partial, _ in shaped]),
            "shaped_mean": _mean([value for value, _, _ in shaped]),
            "turns_mean": _mean(turns),
            "turns_max": max(turns),
            "tool_calls_mean": _mean([_number(m, "tool_calls") for m in metas]),
            "tool_errors_mean": _mean([_number(m, "tool_errors") for m in metas]),
            "invalid_turns_mean": _mean([_number(m, "invalid_turns") for m in metas]),
            "budget_hit_rate": _mean([1.0 if m.get("budget_hit") else 0.0 for m in metas]),
            "turn_cap_hits_mean": _mean([_number(m, "turn_cap_hits") for m in metas]),
            "user_latency_s_mean": _mean([_number(m, "user_latency_s") for m in metas]),
            "user_latency_per_turn_s": math.fsum(_number(m, "user_latency_s") for m in metas) / max(1.0, total_turns),
            "transfer_rate": _mean([1.0 if m.get("transferred") else 0.0 for m in metas]),
            "agent_tool_calls_per_turn": math.fsum(_number(m, "tool_calls") for m in metas) / max(1.0, total_turns),
            "user_tool_calls_mean": _mean([_number(m, "user_tool_calls") for m in metas]),
        }
    )
    no_gold_transfer = [m for m in metas if m.get("gold_transfer") is False]
    if no_gold_transfer:
        metrics["transfer_rate_gold_no_transfer"] = _mean(
            [1.0 if m.get("transferred") else 0.0 for m in no_gold_transfer]
        )
    reasons = Counter(str(m.get("termination_reason")) for m in metas)
    metrics.update({f"termination/{reason}": n / len(valid) for reason, n in reasons.items()})
    by_subtask: dict[str, list[float]] = defaultdict(list)
    for _, metadata, reward in valid:
        if metadata.get("subtask"):
            by_subtask[str(metadata["subtask"])].append(1.0 if is_success(reward) else 0.0)
    for subtask, outcomes in sorted(by_subtask.items()):
        metrics[f"subtask/{subtask}/success_rate"] = _mean(outcomes)
        metrics[f"subtask/{subtask}/n"] = float(len(outcomes))
    return metrics


def _emit(args: Any, metrics: dict[str, float], step_key: str, step: int) -> None:
    """Through slime's logger (W&B / TensorBoard as configured); the Python log always gets a line."""
    logger.info("tau2 %s %d: %s", step_key, step, {k: round(v, 4) for k, v in metrics.items()})
    from slime.observability import logging_utils

    logging_utils.log(args, {**metrics, step_key: step}, step_key=step_key)


def _step(args: Any, rollout_id: int) -> int:
    from slime.observability.metric_utils import compute_rollout_step

    return compute_rollout_step(args, rollout_id)


def log_rollout(
    rollout_id: int, args: Any, samples: list[Any], rollout_extra_metrics: Any, rollout_time: float
) -> bool:
    """slime's --custom-rollout-log-function-path: tau2 metrics of the rollout under rollout/tau2/."""
    try:
        metrics = tau2_metrics(samples, getattr(args, "reward_key", None))
        _emit(args, {f"rollout/tau2/{k}": v for k, v in metrics.items()}, "rollout/step", _step(args, rollout_id))
    except Exception:  # logging must never stop training
        logger.warning("tau2 rollout metrics were not logged for rollout %s", rollout_id, exc_info=True)
    return False


def log_eval_rollout(rollout_id: int, args: Any, data: dict[str, Any], extra_metrics: Any) -> bool:
    """slime's --custom-eval-rollout-log-function-path: tau2 metrics per eval dataset under eval/NAME/tau2/."""
    try:
        reward_key = getattr(args, "eval_reward_key", None) or getattr(args, "reward_key", None)
        metrics: dict[str, float] = {}
        for name, entry in data.items():
            samples = entry.get("samples") if isinstance(entry, dict) else None
            if samples:
                metrics.update({f"eval/{name}/tau2/{k}": v for k, v in tau2_metrics(samples, reward_key).items()})
        if metrics:
            _emit(args, metrics, "eval/step", _step(args, rollout_id))
    except Exception:  # logging must never stop training
        logger.warning("tau2 eval metrics were not logged for rollout %s", rollout_id, exc_info=True)
    return False
