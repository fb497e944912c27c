"""slime's custom generate function for tau2: `--custom-generate-function-path rollout.generate_with_tau.generate`.

A thin adapter over rollout.engine: it resolves the task from the sample, plays one episode token-in-token-out
against slime's sglang router, and writes slime's fields (tokens, response_length, loss_mask, rollout_log_probs,
reward, status, metadata). It never raises: a failed episode comes back with status FAILED (TRUNCATED on an older slime
without FAILED), `remove_sample=True`, a reason in metadata, and a one-token masked response, so it trains nothing.

Settings come from environment variables (the launcher forwards every TAU2_* variable to the Ray job):
  TAU2_POLICY_API       sglang (native /generate, default) or openai (/v1/completions with a token-id prompt)
  TAU2_POLICY_URL       policy server root; default http://{args.sglang_router_ip}:{args.sglang_router_port}
  TAU2_DOMAIN, TAU2_TASK_SPLIT   where `--input-key index` rows are looked up (default telecom / train)
  TAU2_USER_*           the user simulator (rollout.user_sim.UserSimConfig.from_env)
  TAU2_MAX_STEPS, TAU2_MAX_ERRORS, TAU2_MAX_TURNS, TAU2_MAX_TOKENS_PER_TURN, ...   the episode (EpisodeConfig.from_env)
  TAU2_KEEP_TRAJECTORY  1: keep the tau2 message trajectory in sample.metadata["tau2_messages"]
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

from rollout.engine import EpisodeConfig, EpisodeResult, TokenAgent, prepare_episode, run_episode
from rollout.policy_client import PolicyClient, RetryPolicy, build_policy_client
from rollout.task_store import get_task_store, task_from_metadata, task_subtask
from rollout.token_record import ChatRenderer
from rollout.user_sim import UserSimConfig, build_user

_LOCK = threading.Lock()
_TOKENIZERS: dict[str, Any] = {}
_POLICIES: dict[tuple[str, str, int], PolicyClient] = {}
_USER_CLIENTS: dict[Any, Any] = {}


def load_tokenizer(path: str) -> Any:
    """One tokenizer per checkpoint path per process."""
    with _LOCK:
        if path not in _TOKENIZERS:
            from transformers import AutoTokenizer

            _TOKENIZERS[path] = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        return _TOKENIZERS[path]


def policy_for(args: Any) -> PolicyClient:
    url = os.environ.get("TAU2_POLICY_URL") or f"http://{args.sglang_router_ip}:{args.sglang_router_port}"
    api = os.environ.get("TAU2_POLICY_API", "sglang")
    key = (url, api, id(asyncio.get_running_loop()))  # aiohttp sessions belong to one loop
    with _LOCK:
        if key not in _POLICIES:
            _POLICIES[key] = build_policy_client(
                url, api=api, model=os.environ.get("TAU2_POLICY_MODEL", "default"), retry=RetryPolicy()
            )
        return _POLICIES[key]


async def close_clients() -> None:
    """Close this loop's HTTP sessions (policy and user simulator); for scripts that end their loop."""
    from rollout.user_sim import close_user_clients

    with _LOCK:
        policies = list(_POLICIES.values())
        _POLICIES.clear()
    for policy in policies:
        await policy.aclose()
    await close_user_clients(_USER_CLIENTS)


def resolve_task(sample: Any) -> tuple[Any, str]:
    """The task a sample stands for: metadata (task / task_id + domain), or an `--input-key index` row number."""
    metadata = sample.metadata if isinstance(getattr(sample, "metadata", None), dict) else {}
    if metadata.get("task") or metadata.get("task_id"):
        task = task_from_metadata(metadata)
        return task, metadata.get("domain") or os.environ.get("TAU2_DOMAIN", "telecom")
    prompt = sample.prompt
    if isinstance(prompt, str) and prompt.strip().isdigit():
        prompt = int(prompt)
    if not isinstance(prompt, int):
        raise ValueError(
            "the sample has no task: expected metadata with 'task_id' (prompt data from examples/tau2_mock.py with "
            "--metadata-key metadata) or an integer prompt (--input-key index)"
        )
    domain = os.environ.get("TAU2_DOMAIN", "telecom")
    split = os.environ.get("TAU2_TASK_SPLIT", "train")
    tasks = get_task_store().tasks(domain, split)
    if not 0 <= prompt < len(tasks):
        raise ValueError(f"index {prompt} is out of range for {domain}/{split} ({len(tasks)} tasks)")
    return tasks[prompt], domain


def _status(sample: Any, name: str) -> Any:
    statuses = type(sample).Status
    if name == "FAILED" and not hasattr(statuses, "FAILED"):
        name = "TRUNCATED"  # older slime has no FAILED; remove_sample keeps it out of the loss
    return getattr(statuses, name)


def _end_of_turn_id(tokenizer: Any) -> int:
    """The token that closes an assistant turn, as the chat template writes it (the same rule the engine uses)."""
    try:
        end_id = ChatRenderer(tokenizer).end_of_turn_id
    except Exception:  # no usable chat template: the failure this sample reports is elsewhere
        end_id = None
    return end_id if end_id is not None else int(tokenizer.eos_token_id)


def fill_sample(sample: Any, result: EpisodeResult | None, tokenizer: Any, failure: str | None = None) -> Any:
    """Write an episode into slime's Sample; a response is never empty and failures are never trained."""
    record = result.record if result is not None else None
    metadata = dict(sample.metadata) if isinstance(sample.metadata, dict) else {}
    if record is not None:
        prompt_ids, response = list(record.prompt_ids), list(record.response_ids)
        mask, log_probs = list(record.loss_mask), list(record.log_probs)
    else:
        prompt_ids, response, mask, log_probs = list(sample.tokens or []), [], [], []
    failed = result is None or result.status == "failed"
    if not response:
        # slime must never see a zero-length response: one masked end-of-turn token, nothing trained.
        response, mask, log_probs = [_end_of_turn_id(tokenizer)], [0], [0.0]
        failed = True
        failure = failure or (result.failure if result else None) or "the policy produced no tokens"
    if not prompt_ids:
        prompt_ids = [_end_of_turn_id(tokenizer)]
    sample.tokens = prompt_ids + response
    sample.response_length = len(response)
    sample.loss_mask = mask
    sample.rollout_log_probs = log_probs
    sample.response = tokenizer.decode(response, skip_special_tokens=False)
    if result is not None and result.status == "aborted":
        sample.status = _status(sample, "ABORTED")
    elif failed:
        sample.status = _status(sample, "FAILED")
        sample.remove_sample = True
    elif result.status == "truncated":
        sample.status = _status(sample, "TRUNCATED")
    else:
        sample.status = _status(sample, "COMPLETED")
    sample.reward = 0.0 if failed or result is None or result.reward is None else float(result.reward)
    if result is not None:
        metadata.update(
            {
                "task_id": result.task_id,
                "domain": result.domain,
                "subtask": task_subtask(result.task_id),
                "episode_status": result.status,
                "termination_reason": result.termination_reason,
                "reward_info": result.reward_info,
                "truncated_checks": result.truncated_checks,
                "progress": result.progress,
                "turns": result.turns,
                "steps": result.steps,
                "tool_calls": result.tool_calls,
                "tool_errors": result.tool_errors,
                "invalid_turns": len(result.invalid_turns),
                "policy_tokens": record.sampled_tokens if record is not None else 0,
                "policy_latency_s": result.policy_latency_s,
                "user_tokens": result.user_prompt_tokens + result.user_completion_tokens,
                "user_latency_s": result.user_latency_s,
                "episode_wall_s": result.wall_s,
            }
        )
        if os.environ.get("TAU2_KEEP_TRAJECTORY", "0") == "1":
            metadata["tau2_messages"] = result.messages
    if failed:
        metadata["failure"] = failure or (result.failure if result is not None else "unknown failure")
    sample.metadata = metadata
    return sample


async def generate(args: Any, sample: Any, sampling_params: dict[str, Any], evaluation: bool = False) -> Any:
    """slime entry point: play the sample's tau2 task and return the filled sample (never raises)."""
    tokenizer = load_tokenizer(args.hf_checkpoint)
    try:
        task, domain = resolve_task(sample)
        config = EpisodeConfig.from_env(domain=domain)
        setup = await prepare_episode(task, config)
        user_config = UserSimConfig.from_env()
        user = None if config.solo_mode else build_user(user_config, task, setup.user_tools, _USER_CLIENTS)
        max_context = getattr(args, "rollout_max_context_len", None)
        agent = TokenAgent(
            policy_for(args),
            tokenizer,
            setup.view,
            sampling_params,
            max_response_tokens=int(sampling_params.get("max_new_tokens") or args.rollout_max_response_len),
            max_context_tokens=int(max_context) if max_context else None,
            max_tool_calls_per_turn=config.max_tool_calls_per_turn,
            max_tokens_per_turn=config.max_tokens_per_turn,
        )
        result = await run_episode(task, agent, user, config, env=setup.env)
        if agent.record is None and result.status != "failed":
            result.status, result.failure = "failed", result.failure or "the episode ended before the policy's turn"
    except Exception as err:  # bad sample or setup failure: report it on the sample, never crash the batch
        return fill_sample(sample, None, tokenizer, failure=f"{type(err).__name__}: {err}")
    return fill_sample(sample, result, tokenizer)
