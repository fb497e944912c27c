"""Dynamic sampling on the shaped reward, for slime's `--dynamic-sampling-filter-path`.

    --dynamic-sampling-filter-path reward.dynamic_filter.shaped_reward_nonzero_std
    --dynamic-sampling-filter-path reward.dynamic_filter.shaped_reward_nonzero_std_with_fallback

slime calls the filter once per finished group (`fn(args, samples)`); a dropped group is not trained and another
group is played in its place (with `--over-sampling-batch-size` above `--rollout-batch-size`). slime's own
`check_reward_nonzero_std` reads `sample.reward`, which is tau2's 0/1 task reward here: it would drop every all-fail
group, exactly the groups whose near misses the partial credit ranks. These filters keep a group when the shaped
reward (reward.tau2_reward_shaping.shape_reward, the value the post-process normalizes) differs within its valid
samples, i.e. when the group has a non-zero advantage somewhere; a group with fewer than two valid samples (failed,
aborted or removed ones do not count, as in the post-process) has none and is dropped too.

`..._with_fallback` keeps a rejected group when dropping it would leave too few candidates to fill the batch
(slime's `keep_when_insufficient`), so a rollout never starts another sampling round for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from reward.tau2_reward_shaping import ShapingConfig, is_valid_sample, shape_reward, task_reward_of


def shaped_rewards(args: Any, samples: Sequence[Any], config: ShapingConfig | None = None) -> list[float]:
    """The shaped rewards of a group's valid samples, as the reward post-process computes them."""
    config = config or ShapingConfig.current()
    reward_key = getattr(args, "reward_key", None)
    values = []
    for sample in samples:
        task_reward = task_reward_of(sample, reward_key)
        if is_valid_sample(sample, task_reward):
            values.append(shape_reward(getattr(sample, "metadata", None), task_reward, config)[0])
    return values


def _output(keep: bool, reason: str | None, fallback: bool) -> Any:
    try:
        from slime.rollout.filter_hub.base_types import DynamicFilterOutput
    except ImportError:  # outside slime: the legacy boolean answer slime also accepts
        return keep
    return DynamicFilterOutput(keep=keep, reason=reason, keep_when_insufficient=fallback)


def _decide(args: Any, samples: Sequence[Any]) -> tuple[bool, str | None]:
    values = shaped_rewards(args, samples)
    if len(values) < 2:
        return False, "shaped_under_2_valid"
    if max(values) == min(values):  # the post-process gives such a group all-zero advantages
        return False, f"shaped_zero_std_{round(values[0], 1)}"
    return True, None


def shaped_reward_nonzero_std(args: Any, samples: Sequence[Any], **kwargs: Any) -> Any:
    """Keep a group whose valid samples' shaped rewards are not all equal."""
    keep, reason = _decide(args, samples)
    return _output(keep, reason, fallback=False)


def shaped_reward_nonzero_std_with_fallback(args: Any, samples: Sequence[Any], **kwargs: Any) -> Any:
    """As shaped_reward_nonzero_std, but never forces another sampling round to replace a dropped group."""
    keep, reason = _decide(args, samples)
    return _output(keep, reason, fallback=True)
