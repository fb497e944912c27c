"""slime's custom generate function for tau2: `--custom-generate-function-path rollout.generate_with_tau.generate`.

A thin adapter over rollout.engine: it resolves the task from the sample, plays one episode token-in-token-out
against slime's sglang router, and writes slime's fields (tokens, response_length, loss_mask, rollout_log_probs,
reward, status, metadata, prefix_cache_info, weight_versions, non_generation_time). It never raises, whatever the
args, sample or tokenizer: a failed episode comes back FAILED (TRUNCATED on an older slime without FAILED), an
episode the trainer aborted comes back ABORTED; both with `remove_sample=True`, reward 0.0, a reason in metadata and
a loss mask of zeros (so they train nothing whatever the trainer does with `remove_sample`), and never an empty
response.

Budgets (rollout.budgets; the same in training, in-training evaluation and the evaluator):
- the episode's whole response (sampled turns, tool results, user turns) is `sampling_params["max_new_tokens"]`,
  i.e. slime's `--rollout-max-response-len` (`--eval-max-response-len` when evaluating): the episode budget;
- prompt + response: `--rollout-max-context-len` (`--eval-max-context-len` when evaluating);
- one policy turn: TAU2_MAX_TOKENS_PER_TURN (default rollout.budgets.TURN_TOKENS; 0: no cap).
Time bounds: each policy or user-simulator turn TAU2_TURN_TIMEOUT_S, the episode TAU2_EPISODE_TIMEOUT_S; both
derived from the budgets when unset (rollout/budgets.py).

Aborts: slime aborts a rollout's in-flight requests once its batch is full. Before every policy and user turn the
episode checks slime's abort flag (`GenerateState.aborted` in slime.rollout.sglang_rollout) and ends as ABORTED
instead of sending new requests. On partial-rollout re-entry an aborted sample is reset and played from the start
(a tau2 episode cannot resume: its environment and user simulator state are gone).

Settings come from TAU2_* environment variables (the launcher forwards every one to the Ray job; docs/settings.md
lists them): rollout.settings.RolloutSettings (TAU2_POLICY_API, TAU2_POLICY_URL with TAU2_POLICY_URL_OVERRIDE=1,
TAU2_TASK_SPLIT / TAU2_EVAL_TASK_SPLIT for `--input-key index` rows, TAU2_KEEP_TRAJECTORY), the episode
(EpisodeConfig: TAU2_DOMAIN, TAU2_MAX_STEPS, TAU2_MAX_TURNS, TAU2_MAX_TOKENS_PER_TURN, ...) and the user simulator
(UserSimConfig: TAU2_USER_*).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from typing import Any

from rollout.budgets import EPISODE_TOKENS
from rollout.clients.policy import PolicyClient, build_policy_client
from rollout.clients.retry import RetryPolicy
from rollout.settings import EpisodeConfig, RolloutSettings
from rollout.token_record import load_tokenizer

logger = logging.getLogger(__name__)

_LOCK = threading.Lock()
_POLICIES: dict[tuple[str, str, int, float], PolicyClient] = {}
_USER_CLIENTS: dict[Any, Any] = {}
_LOGGED: set[tuple[str, str]] = set()

TRANSFER_TOOL = "transfer_to_human_agents"
# Per-episode metadata this module writes: cleared when a sample is played again (partial-rollout re-entry).
# The row's own keys (task, task_id, domain) say which task to play, so they are never cleared.
EPISODE_KEYS = (
    "subtask", "evaluation", "episode_status", "termination_reason", "reward_info",
    "truncated_checks", "progress", "turns", "steps", "tool_calls", "tool_errors", "invalid_turns", "user_tool_calls",
    "transferred", "gold_transfer", "budget_hit", "turn_cap_hits", "policy_tokens", "policy_latency_s", "user_tokens",
    "user_latency_s", "episode_wall_s", "failure", "failure_kind", "tau2_messages", "raw_reward", "partial_score",
    "partial_components", "partial_credit", "shaped_reward", "advantage", "reward_valid",
)  # fmt: skip


def slime_aborted() -> bool:
    """True while slime's rollout is aborting its in-flight work (its batch is full).

    slime 624b824 sets `GenerateState(args).aborted = True` in `abort()` (slime/rollout/sglang_rollout.py), then
    aborts sglang's requests and waits for the pending groups; `reset()` clears it for the next rollout. The state is
    a singleton (SingletonMeta), read here without creating it and without importing slime where it is not loaded."""
    module = sys.modules.get("slime.rollout.sglang_rollout")
    state_cls = getattr(module, "GenerateState", None) if module is not None else None
    instances = getattr(type(state_cls), "_instances", None) if state_cls is not None else None
    state = instances.get(state_cls) if isinstance(instances, dict) else None
    return bool(getattr(state, "aborted", False))


def _log_once(level: int, key: tuple[str, str], message: str) -> None:
    with _LOCK:
        if key in _LOGGED:
            return
        _LOGGED.add(key)
    logger.log(level, message)


def policy_url(args: Any, settings: RolloutSettings) -> str:
    """slime's router, unless the user asked for TAU2_POLICY_URL (TAU2_POLICY_URL_OVERRIDE=1) or there is none."""
    override = (settings.policy_url or "").strip()
    router_ip, router_port = getattr(args, "sglang_router_ip", None), getattr(args, "sglang_router_port", None)
    router = f"http://{router_ip}:{router_port}" if router_ip and router_port else None
    opted_in = settings.policy_url_override
    if override and (opted_in or router is None):
        why = "TAU2_POLICY_URL_OVERRIDE=1" if opted_in else "no sglang router in slime's args"
        _log_once(logging.WARNING, ("url", override), f"tau2 rollouts use TAU2_POLICY_URL={override} ({why})")
        return override
    if router is None:
        raise ValueError("slime's args name no sglang router (sglang_router_ip / sglang_router_port)")
    if override:
        _log_once(
            logging.WARNING,
            ("ignored", override),
            f"TAU2_POLICY_URL={override} is set but ignored: tau2 rollouts go to slime's router {router} "
            "(set TAU2_POLICY_URL_OVERRIDE=1 to use TAU2_POLICY_URL instead)",
        )
    return router


def policy_for(args: Any, turn_timeout_s: float, settings: RolloutSettings | None = None) -> PolicyClient:
    settings = settings or RolloutSettings.current()
    url, api = policy_url(args, settings), settings.policy_api
    key = (url, api, id(asyncio.get_running_loop()), turn_timeout_s)  # aiohttp sessions belong to one loop
    with _LOCK:
        if key not in _POLICIES:
            # One attempt never outlasts the turn's bound; the engine bounds the turn, retries included.
            retry = RetryPolicy(timeout_s=turn_timeout_s)
            _POLICIES[key] = build_policy_client(url, api=api, model=settings.policy_model, retry=retry)
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


def resolve_task(sample: Any, evaluation: bool, domain: str, settings: RolloutSettings) -> tuple[Any, str]:
    """The task a sample stands for: metadata (task / task_id + domain), or an `--input-key index` row number of the
    settings' domain and split."""
    from rollout.task_store import get_task_store, task_from_metadata

    metadata = sample.metadata if isinstance(getattr(sample, "metadata", None), dict) else {}
    if metadata.get("task") or metadata.get("task_id"):
        task = task_from_metadata(metadata)
        return task, metadata.get("domain") or domain
    prompt = getattr(sample, "prompt", None)
    if isinstance(prompt, str) and prompt.strip().isdigit():
        prompt = int(prompt)
    if not isinstance(prompt, int) or isinstance(prompt, bool):
        raise ValueError(
            "the sample has no task: expected metadata with 'task_id' (prompt data from examples/tau2_mock.py with "
            "--metadata-key metadata) or an integer prompt (--input-key index)"
        )
    split = settings.eval_task_split if evaluation else settings.task_split
    tasks = get_task_store().tasks(domain, split)
    if not 0 <= prompt < len(tasks):
        raise ValueError(f"index {prompt} is out of range for {domain}/{split} ({len(tasks)} tasks)")
    return tasks[prompt], domain


def _status(sample: Any, name: str) -> Any:
    statuses = getattr(type(sample), "Status", None)
    if statuses is None:
        return name.lower()
    if name == "FAILED" and not hasattr(statuses, "FAILED"):
        name = "TRUNCATED"  # older slime has no FAILED; the zero mask and remove_sample keep it out of the loss
    return getattr(statuses, name)


def _end_of_turn_id(tokenizer: Any) -> int:
    """The token that closes an assistant turn as the chat template writes it; any valid id for a broken tokenizer."""
    try:
        from rollout.token_record import ChatRenderer

        end_id = ChatRenderer(tokenizer).end_of_turn_id
        if end_id is not None:
            return int(end_id)
    except Exception:  # no usable chat template: the failure this sample reports is elsewhere
        pass
    eos = getattr(tokenizer, "eos_token_id", None)
    return eos if isinstance(eos, int) and not isinstance(eos, bool) and eos >= 0 else 0


def _decode(tokenizer: Any, ids: list[int]) -> str:
    try:
        return str(tokenizer.decode(ids, skip_special_tokens=False))
    except Exception:  # a tokenizer that cannot decode: the text is only for logs
        return ""


def reset_for_episode(sample: Any) -> None:
    """Forget a previous attempt (slime's partial rollout hands an aborted sample back): nothing of it survives."""
    sample.remove_sample = False
    sample.reward = None
    sample.tokens = []
    sample.response = ""
    sample.response_length = 0
    sample.loss_mask = None
    sample.rollout_log_probs = None
    if hasattr(sample, "weight_versions"):
        sample.weight_versions = []
    info = getattr(sample, "prefix_cache_info", None)
    if info is not None:
        sample.prefix_cache_info = type(info)()
    if isinstance(getattr(sample, "metadata", None), dict):
        sample.metadata = {k: v for k, v in sample.metadata.items() if k not in EPISODE_KEYS}
    else:
        sample.metadata = {}


def failure_kind(result: Any, failure: str | None) -> str:
    """Where an infrastructure failure came from, for the rollout log."""
    text = failure or (result.failure if result is not None else "") or ""
    if result is None:
        return "setup"
    if result.termination_reason == "timeout":
        if "user simulator produced no turn" in text:
            return "user_simulator_timeout"
        return "policy_timeout" if "policy produced no turn" in text else "episode_timeout"
    if text.startswith("PolicyServerError"):
        return "policy_server"
    if text.split(":", 1)[0].endswith(("SimulatorError", "ChatClientError")):
        return "user_simulator"
    if text.startswith("evaluation failed"):
        return "evaluation"
    return "other"


def _trajectory_counts(messages: list[dict[str, Any]]) -> tuple[bool, int]:
    """(the agent called transfer_to_human_agents, number of tool calls the user simulator made)."""
    transferred, user_calls = False, 0
    for message in messages:
        calls = message.get("tool_calls") or []
        if message.get("role") == "assistant":
            transferred = transferred or any(call.get("name") == TRANSFER_TOOL for call in calls)
        elif message.get("role") == "user":
            user_calls += len(calls)
    return transferred, user_calls


def _gold_transfers(task: Any) -> bool | None:
    criteria = getattr(task, "evaluation_criteria", None)
    if criteria is None:
        return None
    return any(action.name == TRANSFER_TOOL for action in criteria.actions or [])


def episode_metadata(result: Any, agent: Any, evaluation: bool, task: Any = None) -> dict[str, Any]:
    from rollout.task_store import task_subtask

    record = result.record
    transferred, user_calls = _trajectory_counts(result.messages)
    return {
        "task_id": result.task_id,
        "domain": result.domain,
        "subtask": task_subtask(result.task_id),
        "evaluation": evaluation,
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
        "user_tool_calls": user_calls,
        "transferred": transferred,
        "gold_transfer": _gold_transfers(task),
        "budget_hit": result.termination_reason == "max_tokens",
        "turn_cap_hits": getattr(agent, "turn_cap_hits", 0),
        "policy_tokens": record.sampled_tokens if record is not None else 0,
        "policy_latency_s": result.policy_latency_s,
        "user_tokens": result.user_prompt_tokens + result.user_completion_tokens,
        "user_latency_s": result.user_latency_s,
        "episode_wall_s": result.wall_s,
    }


def fill_sample(
    sample: Any,
    result: Any | None,
    tokenizer: Any,
    failure: str | None = None,
    agent: Any = None,
    evaluation: bool = False,
    task: Any = None,
) -> Any:
    """Write an episode into slime's Sample; a response is never empty and failed or aborted ones train nothing."""
    record = result.record if result is not None else None
    metadata = dict(sample.metadata) if isinstance(getattr(sample, "metadata", None), dict) else {}
    if record is not None:
        prompt_ids, response, mask, log_probs = record.as_lists()
    else:
        prompt_ids, response, mask, log_probs = [], [], [], []
    aborted = result is not None and result.status == "aborted"
    failed = not aborted and (result is None or result.status == "failed" or not response)
    if failed:
        failure = failure or (result.failure if result is not None else None) or "the policy produced no tokens"
    if not response:
        # slime must never see a zero-length response: one masked end-of-turn token.
        response, log_probs = [_end_of_turn_id(tokenizer)], [0.0]
    if failed or aborted:
        # Nothing of a failed or aborted episode is trained, remove_sample or not; masked tokens carry log-prob 0.
        mask, log_probs = [0] * len(response), [0.0] * len(response)
    else:
        mask = mask or [0] * len(response)
    if not prompt_ids:
        prompt_ids = [_end_of_turn_id(tokenizer)]
    sample.tokens = prompt_ids + response
    sample.response_length = len(response)
    sample.loss_mask = mask
    sample.rollout_log_probs = log_probs
    sample.response = _decode(tokenizer, response)
    if aborted:
        sample.status = _status(sample, "ABORTED")
    elif failed:
        sample.status = _status(sample, "FAILED")
    elif result.status == "truncated":
        sample.status = _status(sample, "TRUNCATED")
    else:
        sample.status = _status(sample, "COMPLETED")
    sample.remove_sample = failed or aborted
    valid_reward = not (failed or aborted) and result is not None and result.reward is not None
    sample.reward = float(result.reward) if valid_reward else 0.0
    if result is not None:
        metadata.update(episode_metadata(result, agent, evaluation, task))
        sample.non_generation_time = result.user_latency_s + result.env_s + result.eval_s
        if RolloutSettings.current().keep_trajectory:
            metadata["tau2_messages"] = result.messages
    else:
        metadata["evaluation"] = evaluation
    if agent is not None:
        info = getattr(sample, "prefix_cache_info", None)
        if info is not None and hasattr(info, "add"):
            info.add({"cached_tokens": agent.cached_tokens, "prompt_tokens": agent.request_prompt_tokens})
        if hasattr(sample, "weight_versions"):
            sample.weight_versions = list(agent.weight_versions)
    if failed:
        metadata["failure"] = failure
        metadata["failure_kind"] = failure_kind(result, failure)
    elif aborted:
        metadata["failure"] = (result.failure if result is not None else None) or "aborted by the policy server"
    sample.metadata = metadata
    return sample


def _last_resort(sample: Any, error: BaseException) -> Any:
    """What is left when even writing the sample failed: slime's required fields, nothing trained."""
    try:
        sample.tokens, sample.response, sample.response_length = [0, 0], "", 1
        sample.loss_mask, sample.rollout_log_probs, sample.reward = [0], [0.0], 0.0
        sample.remove_sample = True
        sample.status = _status(sample, "FAILED")
        if isinstance(getattr(sample, "metadata", None), dict):
            sample.metadata["failure"] = f"{type(error).__name__}: {error}"
            sample.metadata["failure_kind"] = "setup"
    except Exception:  # a sample object that takes no attributes: nothing more can be done
        logger.exception("tau2 generate could not write its failure into the sample")
    return sample


async def generate(args: Any, sample: Any, sampling_params: dict[str, Any], evaluation: bool = False) -> Any:
    """slime entry point: play the sample's tau2 task and return the filled sample (never raises)."""
    tokenizer: Any = None
    agent: Any = None
    try:
        reset_for_episode(sample)
        tokenizer = load_tokenizer(args.hf_checkpoint)
        from rollout.engine import TokenAgent
        from rollout.episode import Episode

        settings, config = RolloutSettings.current(), EpisodeConfig.current()
        task, domain = resolve_task(sample, evaluation, config.domain, settings)
        config = config.model_copy(update={"domain": domain})
        budget = sampling_params.get("max_new_tokens") or getattr(args, "rollout_max_response_len", None)
        if evaluation:
            context = getattr(args, "eval_max_context_len", None) or getattr(args, "rollout_max_context_len", None)
        else:
            context = getattr(args, "rollout_max_context_len", None)
        policy = policy_for(args, config.turn_deadline_s(), settings)

        def make_agent(view: Any) -> TokenAgent:
            return TokenAgent(
                policy,
                tokenizer,
                view,
                sampling_params,
                max_response_tokens=int(budget) if budget else EPISODE_TOKENS,
                max_context_tokens=int(context) if context else None,
                max_tool_calls_per_turn=config.max_tool_calls_per_turn,
                max_tokens_per_turn=config.max_tokens_per_turn,
            )

        episode = await Episode.start(task, config, make_agent, user_clients=_USER_CLIENTS)
        agent = episode.agent
        result = await episode.play(abort_check=None if evaluation else slime_aborted)
        if agent.record is None and result.status not in ("failed", "aborted"):
            result.status, result.failure = "failed", result.failure or "the episode ended before the policy's turn"
        return fill_sample(sample, result, tokenizer, agent=agent, evaluation=evaluation, task=task)
    except Exception as err:  # bad args, sample, tokenizer or setup: report it on the sample, never crash the batch
        try:
            return fill_sample(sample, None, tokenizer, failure=f"{type(err).__name__}: {err}", evaluation=evaluation)
        except Exception as inner:
            return _last_resort(sample, inner)
