"""Stand-ins for slime's Sample and args, for running the recipe's slime plugins without slime (which needs
Megatron and CUDA): the CPU dry run and the tests.

Field names and the Status members follow slime/utils/types.py (Sample) and slime's argument names; `OldSample`
mirrors the 2025-12 slime, which has no Status.FAILED.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from types import SimpleNamespace
from typing import Any


@dataclass
class Sample:
    """slime's Sample (slime/utils/types.py at 624b824): the same fields in the same order, without torch.
    tests/test_slime_real.py checks the field list against slime's source."""

    @dataclass
    class SpecInfo:
        spec_accept_token_num: int = 0
        spec_draft_token_num: int = 0
        spec_verify_ct: int = 0
        completion_token_num: int = 0

    @dataclass
    class PrefixCacheInfo:
        cached_tokens: int = 0
        total_prompt_tokens: int = 0

        def add(self, meta_info: dict) -> None:
            self.cached_tokens += meta_info.get("cached_tokens", 0)
            self.total_prompt_tokens += meta_info.get("prompt_tokens", 0)

    class Status(Enum):
        PENDING = "pending"
        COMPLETED = "completed"
        TRUNCATED = "truncated"
        ABORTED = "aborted"
        FAILED = "failed"

    group_index: int | None = None
    index: int | None = None
    rollout_id: int | None = None
    prompt: Any = ""
    tokens: list[int] = field(default_factory=list)
    multimodal_inputs: dict[str, Any] | None = None
    multimodal_train_inputs: dict[str, Any] | None = None
    multimodal_train_input_id: str | None = None
    apply_chat_template_kwargs: dict = field(default_factory=dict)
    response: str = ""
    response_length: int = 0
    label: str | None = None
    reward: float | dict | None = None
    loss_mask: list[int] | None = None
    weight_versions: list[str] = field(default_factory=list)
    rollout_log_probs: list[float] | None = None
    rollout_top_p_token_ids: list[int] | None = None
    rollout_top_p_token_offsets: list[int] | None = None
    rollout_routed_experts: list[list[int]] | None = None
    remove_sample: bool = False
    teacher_log_probs: list[float] | None = None
    status: Status = Status.PENDING
    metadata: dict = field(default_factory=dict)
    generate_function_path: str | None = None
    custom_rm_path: str | None = None
    train_metadata: dict | None = None
    session_id: str | None = None
    non_generation_time: float = 0.0
    spec_info: SpecInfo = field(default_factory=SpecInfo)
    prefix_cache_info: PrefixCacheInfo = field(default_factory=PrefixCacheInfo)


@dataclass
class OldSample(Sample):
    class Status(Enum):
        PENDING = "pending"
        COMPLETED = "completed"
        TRUNCATED = "truncated"
        ABORTED = "aborted"


def slime_args(hf_checkpoint: str, port: int, **overrides: Any) -> SimpleNamespace:
    values = {
        "hf_checkpoint": hf_checkpoint,
        "sglang_router_ip": "127.0.0.1",
        "sglang_router_port": port,
        "rollout_max_response_len": 4096,
        "rollout_temperature": 1.0,
        "n_samples_per_prompt": 2,
        "advantage_estimator": "grpo",
        "grpo_std_normalization": True,
        "rewards_normalization": True,
        "reward_key": None,
    }
    values.update(overrides)
    return SimpleNamespace(**values)


def slime_sampling_params(max_new_tokens: int = 4096) -> dict[str, Any]:
    """What slime passes to a custom generate function (fresh dict per sample)."""
    return {
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": -1,
        "max_new_tokens": max_new_tokens,
        "stop": None,
        "stop_token_ids": None,
        "skip_special_tokens": False,
        "no_stop_trim": True,
        "spaces_between_special_tokens": False,
    }
