"""Shaped tau2 rewards and their GRPO group normalization, as slime's custom reward post-process.

    --custom-reward-post-process-path reward.tau2_reward_shaping.tau2_reward_post_process

What the rollout puts on each sample (the contract this module reads):
- `sample.reward`: tau2's task reward (float 0..1), or a dict holding it under `args.reward_key` (default "reward");
  None on failed samples.
- `sample.metadata["reward_info"]`: tau2's `RewardInfo.model_dump(mode="json")` for the episode (tau2's verdict).
- `sample.metadata["termination_reason"]`: tau2's TerminationReason value ("agent_stop", "user_stop", "max_steps",
  "too_many_errors", "agent_error", "user_error", ...).
- `sample.metadata["truncated_checks"]`: for episodes that did not end with agent_stop / user_stop, the RewardInfo
  dump from `reward.partial_credit.checks_ignoring_termination` (tau2 gives those reward 0 and no sub-checks);
  None otherwise.
- `sample.metadata["progress"]`: the end state's progress figures (`reward.progress.StateProgress` dump), measured by
  the engine on the episode's own environment; {"error": ...} if that failed; absent from older rollouts.
- `sample.metadata["turns"]` (policy turns), `["tool_calls"]` (agent tool calls), `["tool_errors"]`, `["task_id"]`,
  `["domain"]`, `["subtask"]`.

Shaping: `shaped = success + alpha * partial`, where
- `success` is 1.0 when tau2's reward is >= 1 - 1e-6 (tau2's own success threshold) and 0.0 otherwise, NaN and
  None included. tau2's reward is a product of 0/1 checks, so this loses nothing on its domains, and it is what makes
  the ordering below hold for any input;
- `partial = max(0, credit * d - turn_penalty * turns)`, `d = truncation_discount` for episodes that did not end with
  agent_stop / user_stop and 1 otherwise, `turns` the policy turns (garbage or negative -> 0), and `credit` one of
  (`TAU2_PARTIAL_CREDIT`):
  - `progress` (default), `reward.partial_credit.compute_progress_score`: the share of the task's gold actions the end
    state shows (reward/progress.py: gold actions replayed on the initial state give each action's effect on the
    agent's database and the user's device), averaged with the graded checks that are not about the end state
    (telecom's transfer action check; airline's and retail's communicate checks), minus `collateral_penalty` times
    the fields the episode changed that no gold action changes, per gold action. A sample without usable progress
    figures gets the checks credit (`metadata["partial_credit"]` says which one was used);
  - `checks`, `reward.partial_credit.compute_partial_score`: the weighted share of tau2's graded sub-checks met (env
    assertions, graded actions, communicate, NL assertions).
  Either reads `reward_info` for a normal end and `truncated_checks` for any other (falling back to `reward_info`).
- With `transfer_guard` on, an episode that called transfer_to_human_agents on a task whose gold actions do not
  transfer gets credit 0 (its success, if tau2 grades one, stays).

Why progress is the default (docs/partial_credit.md, written by bench/partial_credit.py on every train and test task
with real environments and tau2's evaluator): telecom's env assertions judge only the final outcome, so under the checks
credit the first half of a task's gold actions, ended properly, beats doing nothing on 5 of the 94 telecom tasks with
two or more; the progress credit on all 94. Over all 114 telecom tasks, adding one more gold action raises the progress
credit at all 492 steps the end state can show, the checks credit at 144. The 24 other steps cannot be shown by any end
state: the transfer of the 20 transfer-only tasks (the whole task, graded by tau2's action check) and 4 repeated reboots
that change nothing. In all-fail groups a weak policy would produce (gold prefixes and shuffles, noise calls, premature
transfers, truncations), every telecom group gets a gradient (checks: 73%) and the within-group rank correlation between
shaped reward and true progress is 0.69 (checks: 0.39); airline 0.23 (0.02), retail 0.26 (-0.08). The CPU model
(SmolLM2-135M) makes no tool call in its rollouts, so neither credit has anything to grade there. Cost per episode at
its end: 0.23 ms on telecom (tau2's evaluation 1.5 ms), 32 ms on airline (656 ms), 15 ms on retail (244 ms); a target is
built once per task.

Guarantees, for every input (asserted in `shape_reward`, tested with hypothesis):
- Bounds: partial in [0, 1] (a clamped credit times d <= 1, minus a non-negative penalty, floored at 0), so
  shaped in [0, 1 + alpha].
- Any success scores strictly above any failure: success >= 1 + alpha * 0 = 1, failure <= 0 + alpha * 1 = alpha, and
  alpha < 1 is enforced. This needs nothing of the credit: a success whose partial is below 1 (odd weights, a
  turn penalty, stray changes, unmet checks) still scores >= 1.
- Partial credit never grows with turn or tool-call count: tool calls are not read at all, turns enter only through
  the non-negative penalty. Neither credit can be farmed by calling tools: the checks credit counts fractions of fixed
  lists (and leaves out the action checks tau2 does not grade, telecom's name-only device fixes); the progress
  credit reads only the end state, and every field changed that no gold action changes costs one gold action's
  worth (calling every tool once beats doing nothing in 2 of 87 failing telecom runs; checks: 6).
- Truncated episodes keep the discount: the same end state and checks, cut, score `truncation_discount` times the
  credit of a normal end.

Defaults:
- `alpha = 0.5`: a failure can earn at most half the success bonus, so the best near miss stays 0.5 below any
  success and a mixed group still ranks every success first; a smaller alpha would shrink the near-miss/total-miss
  spread that lets all-fail groups learn (under std normalization alpha cancels out there), a larger one narrows
  the success margin.
- `truncation_discount = 0.5`: a truncated episode (max_steps, too_many_errors, errors) keeps half of its progress.
  At 1 a policy that never ends the conversation would earn what a properly ended one earns (the looping failure
  mode); at 0 truncated episodes get tau2's flat zero and no gradient toward progress.
- `turn_penalty = 0.0`: off; turn count is already not rewarded. Raising it favours shorter successes and never
  breaks the success/failure ordering because it only lowers the partial term.
- `credit = progress`, above.
- `collateral_penalty = 1.0`: without it calling every tool once beats doing nothing in 84 of 87 failing telecom
  runs, at 1 in 2, at 2 in none; the within-group rank correlation with true progress (which ignores what noise
  calls change) falls from 0.85 to 0.69 and 0.61 with it. 1 keeps toggling-everything out at a moderate cost.
- `transfer_guard = off`: under the progress credit a transfer earns nothing by itself (after the same fixes,
  ending and transferring score the same in all 496 telecom pairs), and the guard would erase real fixes followed by
  a transfer (402 of those pairs), cutting the rank correlation from 0.69 to 0.52. Turn it on if the transfer rate
  logged during training climbs on tasks that need no transfer.
Environment: TAU2_REWARD_ALPHA, TAU2_TRUNCATION_DISCOUNT, TAU2_TURN_PENALTY, TAU2_PARTIAL_CREDIT (progress | checks),
TAU2_COLLATERAL_PENALTY, TAU2_TRANSFER_GUARD (1/0, true/false, yes/no, on/off), TAU2_PARTIAL_W_{ENV,ACTION,COMMUNICATE,
DB,NL,STATE} (ShapingConfig, PartialWeights; docs/settings.md); unset or empty keeps the default, a bad value raises a
ValueError naming the variable. Set them in the Ray job's runtime-env env_vars: Ray workers do not inherit the shell's
environment.

Normalization (slime skips its own when a custom post-process is given):
- groups by `sample.group_index`, never by reshaping the flat list;
- a sample is invalid when `remove_sample` is True, its status is ABORTED or FAILED (compared by name, so slime
  versions without FAILED work), or its reward is None / not a finite number; invalid samples get exactly 0.0 and stay
  out of their group's mean and std;
- `rewards_normalization` false: rewards = shaped (invalid -> 0.0), nothing subtracted;
- otherwise subtract the group mean; divide by (std + 1e-6) when `advantage_estimator` is grpo or gspo and
  `grpo_std_normalization`. The std is the population std (ddof 0): it is defined for a group left with one valid
  sample (advantage 0) and gives a normalized group a population std of std / (std + 1e-6), i.e. 1 up to the
  epsilon, whatever the number of valid samples. slime's built-in uses
  torch's unbiased std, larger by sqrt(n / (n - 1)): a constant per group size that only rescales advantages;
- a group whose valid shaped rewards are all equal gets zeros, never NaN.

Returns (raw_rewards, rewards): raw = shaped before normalization (0.0 for samples without a reward), rewards = the
advantages. Each sample's metadata gets `raw_reward` (tau2's task reward, 0.0 where there is none), `partial_score`,
`partial_components`, `partial_credit` (the credit used), `shaped_reward`, `advantage` and `reward_valid`. slime keeps
the returned raw list as the batch's raw reward unless the samples carry `metadata["raw_reward"]`, which then wins: the
logged raw reward is tau2's own, i.e. the honest success rate, while the shaped values stay in the returned list and in
`metadata["shaped_reward"]`. `reward_valid` False marks the samples left out of the statistics (removed, aborted,
failed, no reward), so a log can leave them out of the success rate too.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from reward.partial_credit import (
    PartialWeights,
    compute_partial_score,
    compute_progress_score,
    is_normal_termination,
    progress_figures,
)
from rollout.settings import Tau2Settings

SUCCESS_THRESHOLD = 1.0 - 1e-6  # tau2's pass^k counts reward 1 +- 1e-6 as a success
STD_EPS = 1e-6
STD_NORMALIZED_ESTIMATORS = frozenset({"grpo", "gspo"})
INVALID_STATUSES = frozenset({"aborted", "failed"})


class ShapingConfig(Tau2Settings):
    """How the reward post-process shapes tau2's verdict (reward.tau2_reward_shaping); defaults justified in its
    docstring. The sub-check weights are PartialWeights'."""

    model_config = SettingsConfigDict(frozen=True)

    alpha: float = Field(
        default=0.5,
        ge=0.0,
        lt=1.0,  # < 1 keeps success > failure
        allow_inf_nan=False,
        validation_alias="TAU2_REWARD_ALPHA",
        description="weight of partial credit in the shaped reward success + alpha * partial (below 1)",
    )
    truncation_discount: float = Field(
        default=0.5, ge=0.0, le=1.0, allow_inf_nan=False, description="share of its credit a truncated episode keeps"
    )
    turn_penalty: float = Field(
        default=0.0, ge=0.0, allow_inf_nan=False, description="partial credit lost per policy turn"
    )
    weights: PartialWeights = Field(default_factory=PartialWeights, description="TAU2_PARTIAL_W_* (PartialWeights)")
    credit: Literal["progress", "checks"] = Field(
        default="progress",
        validation_alias="TAU2_PARTIAL_CREDIT",
        description="partial credit: progress (the gold actions the end state shows) or checks (tau2's sub-checks)",
    )
    collateral_penalty: float = Field(
        default=1.0,
        ge=0.0,
        allow_inf_nan=False,
        description="credit lost per field changed that no gold action changes, per gold action (progress only)",
    )
    transfer_guard: bool = Field(
        default=False, description="1: no credit for a transfer on a task whose gold actions do not transfer"
    )

    @field_validator("credit", mode="before")
    @classmethod
    def _any_case(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value


def _finite_float(value: Any) -> float | None:
    """A finite float from a Python or numpy number (bools included); anything else -> None."""
    if not isinstance(value, numbers.Real):
        return None
    result = float(value)
    return result if math.isfinite(result) else None


def _count(value: Any) -> int:
    """A non-negative count from metadata; anything that is not a finite number counts as 0."""
    number = _finite_float(value)
    return max(0, int(number)) if number is not None else 0


def is_success(task_reward: Any) -> bool:
    reward = _finite_float(task_reward)
    return reward is not None and reward >= SUCCESS_THRESHOLD


def partial_credit(metadata: Mapping[str, Any], config: ShapingConfig) -> tuple[float, dict[str, float]]:
    """(credit before discount and turn penalty, components) for one episode; the progress credit's components
    include `state`.

    The checks come from `reward_info` (normal end) or `truncated_checks` (any other end, falling back to
    `reward_info`); the progress credit also reads `progress`, and falls back to the checks credit when the sample
    has no usable progress figures. With the transfer guard on, an episode that transferred on a task whose gold
    actions do not transfer gets 0."""
    reward_info = metadata.get("reward_info")
    termination = metadata.get("termination_reason")
    if termination is not None and not is_normal_termination(termination):
        truncated_checks = metadata.get("truncated_checks")
        if truncated_checks is not None:
            reward_info = truncated_checks
    progress = metadata.get("progress")
    scored = None
    if config.credit == "progress":
        scored = compute_progress_score(reward_info, progress, config.weights, config.collateral_penalty)
    score, components = scored if scored is not None else compute_partial_score(reward_info, config.weights)
    if config.transfer_guard:
        figures = progress_figures(progress)
        if figures is not None and figures["transferred"] and not figures["gold_transfers"]:
            score, components = 0.0, {**components, "transfer_guard": 1.0}
    return score, components


def shape_reward(
    sample_metadata: Mapping[str, Any] | None, task_reward: float | None, config: ShapingConfig | None = None
) -> tuple[float, float, dict[str, float]]:
    """(shaped, partial, components) for one episode; see the module docstring for the formula and its guarantees.

    `partial` is the credit that entered `shaped` (after the truncation discount and turn penalty); `components`
    are the fractions it came from (plus, for the progress credit, the `collateral` penalty subtracted)."""
    config = config or ShapingConfig.current()
    metadata = sample_metadata if isinstance(sample_metadata, Mapping) else {}
    discount = 1.0
    termination = metadata.get("termination_reason")
    if termination is not None and not is_normal_termination(termination):
        discount = config.truncation_discount
    score, components = partial_credit(metadata, config)
    partial = max(0.0, score * discount - config.turn_penalty * _count(metadata.get("turns")))
    success = 1.0 if is_success(task_reward) else 0.0
    shaped = success + config.alpha * partial
    assert 0.0 <= partial <= 1.0, partial
    assert 0.0 <= shaped <= 1.0 + config.alpha, shaped
    return shaped, partial, components


def _status_name(status: Any) -> str:
    """'aborted' for Sample.Status.ABORTED, "ABORTED" or "Status.ABORTED": any slime version, no slime import."""
    return str(getattr(status, "name", status)).strip().rsplit(".", 1)[-1].lower()


def task_reward_of(sample: Any, reward_key: str | None) -> float | None:
    """tau2's task reward from `sample.reward` (a dict is read at reward_key); None when missing or not finite."""
    value = sample.reward
    if isinstance(value, Mapping):
        value = value.get(reward_key or "reward")
    return _finite_float(value)


def is_valid_sample(sample: Any, task_reward: float | None) -> bool:
    if getattr(sample, "remove_sample", False):
        return False
    if _status_name(getattr(sample, "status", None)) in INVALID_STATUSES:
        return False
    return task_reward is not None


def group_keys(samples: Sequence[Any], n_samples_per_prompt: int) -> list[tuple[str, Any]]:
    """One group key per sample: its group_index, else (no group_index) its contiguous chunk of n samples."""
    n = max(1, n_samples_per_prompt)
    keys: list[tuple[str, Any]] = []
    for position, sample in enumerate(samples):
        group_index = getattr(sample, "group_index", None)
        # slime versions or callers that leave group_index unset still deliver a prompt's n samples contiguously.
        keys.append(("group", group_index) if group_index is not None else ("chunk", position // n))
    return keys


def normalize_group(values: Sequence[float], divide_by_std: bool) -> list[float]:
    """Subtract the mean and optionally divide by (population std + 1e-6); all-equal values give zeros."""
    if not values:
        return []
    if max(values) == min(values):
        return [0.0] * len(values)
    mean = math.fsum(values) / len(values)
    centered = [value - mean for value in values]
    if not divide_by_std:
        return centered
    std = math.sqrt(math.fsum(c * c for c in centered) / len(centered))
    return [c / (std + STD_EPS) for c in centered]


def tau2_reward_post_process(args: Any, samples: Sequence[Any]) -> tuple[list[float], list[float]]:
    """slime's custom reward post-process: (raw shaped rewards, group-normalized advantages), both len(samples)."""
    config = ShapingConfig.current()
    reward_key = getattr(args, "reward_key", None)
    n_per_prompt = int(getattr(args, "n_samples_per_prompt", 1) or 1)
    normalize = bool(getattr(args, "rewards_normalization", True))
    estimator = str(getattr(args, "advantage_estimator", "")).lower()
    divide_by_std = estimator in STD_NORMALIZED_ESTIMATORS and bool(getattr(args, "grpo_std_normalization", False))

    raw_rewards: list[float] = []
    valid: list[bool] = []
    for sample in samples:
        if getattr(sample, "metadata", None) is None:
            sample.metadata = {}
        metadata = sample.metadata
        task_reward = task_reward_of(sample, reward_key)
        ok = is_valid_sample(sample, task_reward)
        if task_reward is None:
            shaped, partial, components = 0.0, 0.0, {}
        else:
            shaped, partial, components = shape_reward(metadata, task_reward, config)
        metadata["raw_reward"] = task_reward if task_reward is not None else 0.0
        metadata["partial_score"] = partial
        metadata["partial_components"] = components
        metadata["partial_credit"] = "progress" if "state" in components else "checks"
        metadata["shaped_reward"] = shaped
        metadata["reward_valid"] = ok
        raw_rewards.append(shaped)
        valid.append(ok)

    rewards = [0.0] * len(samples)
    if not normalize:
        rewards = [shaped if ok else 0.0 for shaped, ok in zip(raw_rewards, valid, strict=True)]
    else:
        members: dict[tuple[str, Any], list[int]] = {}
        for position, key in enumerate(group_keys(samples, n_per_prompt)):
            if valid[position]:
                members.setdefault(key, []).append(position)
        for positions in members.values():
            normalized = normalize_group([raw_rewards[p] for p in positions], divide_by_std)
            for position, value in zip(positions, normalized, strict=True):
                rewards[position] = value

    for sample, advantage in zip(samples, rewards, strict=True):
        sample.metadata["advantage"] = advantage
    return raw_rewards, rewards
