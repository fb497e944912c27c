"""The tau2 episode engine: one async loop that plays a task the way tau2's Orchestrator does.

GRPO rollouts (rollout.generate_with_tau), the evaluator (eval/evaluate_tau2.py), SFT trace generation
(examples/generate_sft_traces.py), the benchmark and SkyRL all play episodes through rollout.episode, which calls
`run_episode`; only the agent differs:
- `TokenAgent`: the policy under training, token-in-token-out against sglang /generate or /v1/completions;
- `ChatAgent`: a teacher model behind an OpenAI-compatible chat endpoint (or Gemini);
- `rollout.scripted.ScriptedPolicyAgent`: the task's gold actions or a shortcut policy, no LLM.
The user is an `EpisodeUser` (rollout.user_sim's LLM user, rollout.scripted's scripted customer), None in solo mode.

Semantics follow tau2/orchestrator/orchestrator.py: the fixed greeting, one step per routed message, max_steps and
max_errors checked when the next recipient is not the environment, tool errors counted, user stop tokens, the agent
seeing only its own messages, user text and its own tool results. Network calls are async; CPU work (environment
construction, the first prompt, tau2's evaluator: 0.3-6 ms pieces) goes through `run_cpu`.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
import pickle
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, Field

from reward.partial_credit import NORMAL_TERMINATIONS, checks_ignoring_termination
from reward.progress import episode_progress
from reward.tau2_reward_shaping import is_success
from rollout.clients.policy import JsonIds, PolicyClient, PolicyServerError
from rollout.settings import EpisodeConfig, ProcessSettings
from rollout.tau2_setup import import_tau2
from rollout.token_record import ChatRenderer, IdsJson, TokenRecord
from rollout.tool_format import format_assistant_turn, parse_assistant_text
from rollout.tool_schemas import tool_schemas

import_tau2()

from tau2.agent.llm_agent import (  # noqa: E402
    AGENT_INSTRUCTION,
    AGENT_SOLO_INSTRUCTION,
    SYSTEM_PROMPT,
    SYSTEM_PROMPT_SOLO,
    LLMSoloAgent,
)
from tau2.data_model.message import (  # noqa: E402
    AssistantMessage,
    Message,
    MultiToolMessage,
    ToolCall,
    ToolMessage,
    UserMessage,
)
from tau2.data_model.simulation import RewardInfo, SimulationRun, TerminationReason  # noqa: E402
from tau2.data_model.tasks import Task  # noqa: E402
from tau2.environment.environment import Environment  # noqa: E402
from tau2.evaluator.evaluator import EvaluationType, evaluate_simulation  # noqa: E402
from tau2.orchestrator.orchestrator import DEFAULT_FIRST_AGENT_MESSAGE  # noqa: E402
from tau2.user.user_simulator import UserSimulator  # noqa: E402
from tau2.utils.utils import get_now  # noqa: E402

T = TypeVar("T")
Status = Literal["completed", "truncated", "aborted", "failed"]
SOLO_STOP_TOOL = LLMSoloAgent.STOP_FUNCTION_NAME
SOLO_STOP_TOKEN = LLMSoloAgent.STOP_TOKEN

COMPACT_POLICY_NOTE = (
    "COMPACT POLICY (dry run only): the full domain policy is replaced by its first section so that a small model "
    "with a short context can run; scores are not comparable with the full policy."
)


_CPU_POOL: ThreadPoolExecutor | None = None
_CPU_SETUP_DONE = False
_CPU_LOCK = threading.Lock()


def _make_pool(workers: int) -> ThreadPoolExecutor | None:
    if workers <= 0:
        return None
    switch_ms = ProcessSettings.current().gil_switch_interval_ms
    if switch_ms > 0:
        # CPython's convoy effect: every socket call of the loop releases the GIL and waits up to the switch interval
        # (5 ms by default) to get it back from a worker thread.
        sys.setswitchinterval(switch_ms / 1000.0)
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tau2-cpu")


def _cpu_pool() -> ThreadPoolExecutor | None:
    """The worker threads for CPU work (None: run it on the loop), set up with the process's GC settings once."""
    global _CPU_POOL, _CPU_SETUP_DONE
    with _CPU_LOCK:
        if not _CPU_SETUP_DONE:
            _CPU_SETUP_DONE = True
            settings = ProcessSettings.current()
            gen0 = settings.gc_gen0_threshold
            if gen0 > gc.get_threshold()[0]:
                # A batch allocates millions of short-lived objects (environments, messages): at Python's default of
                # 700 the young-generation collections and the full ones they cascade into stalled a 256-episode
                # batch for ~0.7 s in all (measured with gc.callbacks); freed by reference counting, they need no GC.
                gc.set_threshold(gen0, *gc.get_threshold()[1:])
            _CPU_POOL = _make_pool(settings.cpu_workers)
        return _CPU_POOL


def set_cpu_workers(workers: int) -> None:
    """From now on run CPU work in `workers` threads (0: on the loop), as TAU2_CPU_WORKERS does at start-up."""
    global _CPU_POOL
    _cpu_pool()
    with _CPU_LOCK:
        old, _CPU_POOL = _CPU_POOL, _make_pool(workers)
    if old is not None:
        old.shutdown(wait=False)


async def run_cpu(fn: Callable[..., T], *args: Any) -> T:
    """Run an episode's CPU work (environment set-up, first prompt, tau2's verdict): on the loop by default.

    The work holds the GIL, so threads add no throughput, and with threads the loop's socket calls queue for the GIL
    behind them (the convoy effect): a batch of 256 episodes finished 0.2-0.6 s later with a 2-thread pool than
    inline (docs/benchmarks.md). Each piece is short (0.3-6 ms); TAU2_CPU_WORKERS=N moves it to N threads anyway,
    where a loop must stay responsive to other work (TAU2_GIL_SWITCH_INTERVAL_MS then sets the switch interval).
    Also raises the cyclic GC's young-generation threshold to TAU2_GC_GEN0_THRESHOLD (default 20000; never lowered)."""
    pool = _cpu_pool()
    if pool is None:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))


class TurnTimeout(RuntimeError):
    """A policy or user-simulator turn took longer than its bound (EpisodeConfig.turn_deadline_s)."""


# --------------------------------------------------------------------------------------------- what the agent sees


class TaskView(BaseModel):
    """What a deployed agent is shown for a task: system prompt, tool schemas, and (dual mode) the greeting."""

    system_prompt: str
    tools: list[dict[str, Any]]
    opening: list[dict[str, Any]]  # messages before the agent's first turn (the greeting in dual mode)


def _compact(policy: str) -> str:
    """First section of a policy markdown (up to the second top-level heading), for small-context dry runs."""
    lines = policy.splitlines()
    headings = [i for i, line in enumerate(lines) if line.startswith("# ") or line.startswith("## ")]
    cut = headings[2] if len(headings) > 2 else min(len(lines), 40)
    return "\n".join(lines[:cut]).strip()


_FAST_LOCK = threading.Lock()
_SHARED_POLICIES: dict[str, str] = {}  # one string per distinct policy text, shared by every environment


def _database_templates(constructor: Any) -> dict[str, Any]:
    params = inspect.signature(constructor).parameters
    template = constructor()
    found: dict[str, Any] = {}
    if "db" in params and getattr(template, "tools", None) is not None:
        found["db"] = template.tools.db
    if "user_db" in params and getattr(template, "user_tools", None) is not None:
        found["user_db"] = template.user_tools.db
    return found


class _DatabaseCopier:
    """Fresh copies of a parsed database: unpickling a snapshot is ~3x faster than pydantic's deep copy (0.17 vs
    0.59 ms for telecom). A database that does not survive the round trip unchanged is deep-copied instead."""

    def __init__(self, db: Any) -> None:
        self.db = db
        try:
            blob: bytes | None = pickle.dumps(db, protocol=pickle.HIGHEST_PROTOCOL)
            if pickle.loads(blob).model_dump(mode="json") != db.model_dump(mode="json"):
                blob = None
        except Exception:  # an object pickle cannot take
            blob = None
        self.blob = blob

    def copy(self) -> Any:
        return pickle.loads(self.blob) if self.blob is not None else self.db.model_copy(deep=True)


def fast_env_constructor(domain: str) -> Any:
    """tau2's environment constructor for the domain, made ~10x faster and installed in tau2's registry.

    tau2 re-parses the domain's TOML/JSON databases for every environment (~15 ms each), and its evaluator builds
    two environments per verdict. The databases are parsed once here and each environment gets deep copies: the same
    state, so the same verdicts (tests/test_engine_faithfulness.py compares against tau2's own runs)."""
    registry = import_tau2()
    with _FAST_LOCK:
        constructor = registry.get_env_constructor(domain)
        if getattr(constructor, "recipe_fast", False):
            return constructor
        templates = {name: _DatabaseCopier(db) for name, db in _database_templates(constructor).items()}

        def fast(*args: Any, **kwargs: Any) -> Environment:
            if not args:
                for name, copier in templates.items():
                    if kwargs.get(name) is None:
                        kwargs[name] = copier.copy()
            env = constructor(*args, **kwargs)
            policy = getattr(env, "policy", None)
            if isinstance(policy, str):  # tau2 reads the policy files for every environment: ~86 KB each (telecom)
                env.policy = _SHARED_POLICIES.setdefault(policy, policy)
            return env

        fast.recipe_fast = True  # type: ignore[attr-defined]
        registry._domains[domain] = fast  # tau2's registry has no public way to replace a domain
        return fast


def build_environment(domain: str, task: Task, solo_mode: bool) -> Environment:
    """A fresh environment in the task's initial state (CPU work, ~0.5-10 ms: call it through run_cpu)."""
    constructor = fast_env_constructor(domain)
    env = constructor(solo_mode=True) if solo_mode else constructor()
    initial = task.initial_state
    env.set_state(
        initialization_data=initial.initialization_data if initial else None,
        initialization_actions=initial.initialization_actions if initial else None,
        message_history=[],
    )
    user_tools_of(env)  # the first environment of a domain builds the user's Tool objects
    return env


# The user's Tool objects only supply schemas (the user simulator's prompt); its calls run through
# env.get_response, so one list per (domain, solo mode) serves every environment.
_USER_TOOLS_CACHE: dict[tuple[str, bool], list[Any] | None] = {}


def user_tools_of(env: Environment) -> list[Any] | None:
    """The user's device tools (telecom), or None for domains whose user has none. tau2 rebuilds the Tool objects on
    every call (pydantic models, ~40 ms and ~250 KB for telecom), so one list per domain serves every environment."""
    key = (env.domain_name, env.solo_mode)
    with _FAST_LOCK:
        if key not in _USER_TOOLS_CACHE:
            try:
                tools = env.get_user_tools() if env.user_tools is not None else None
            except Exception:  # tau2 raises when a domain has no user tools
                tools = None
            _USER_TOOLS_CACHE[key] = tools
        return _USER_TOOLS_CACHE[key]


@dataclass
class EpisodeSetup:
    """What `prepare_episode` gives: the agent's view, the user's tools, and (first episode of a domain) an env."""

    view: TaskView
    user_tools: list[Any] | None
    env: Environment | None  # pass to run_episode(env=...); None: built where the episode first needs it


async def prepare_episode(task: Task, config: EpisodeConfig) -> EpisodeSetup:
    """The agent's view of the task and the user's tools; an environment only when the domain's view is not known.

    Nothing touches the environment before the first step ends (the first LLM reply), so run_episode builds it
    then: a batch's first requests go out at once instead of after a burst of environment builds."""
    shared = _VIEW_CACHE.get((config.domain, config.solo_mode, config.policy_variant))
    user_key = (config.domain, config.solo_mode)
    if shared is None or user_key not in _USER_TOOLS_CACHE:
        env = await run_cpu(build_environment, config.domain, task, config.solo_mode)
        return EpisodeSetup(view=task_view(task, env, config), user_tools=user_tools_of(env), env=env)
    return EpisodeSetup(view=_task_view(task, shared, config), user_tools=_USER_TOOLS_CACHE[user_key], env=None)


def _stop_tool_schema() -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": SOLO_STOP_TOOL,
            "description": "Call this function when you are done with the task.",
            "parameters": {"type": "object", "properties": {}, "required": []},
        },
    }


class _DomainView(BaseModel):
    """What every task of a domain shares: policy text, tool schemas and (dual mode) the whole system prompt."""

    policy: str
    tools: list[dict[str, Any]]
    dual_system_prompt: str | None


_VIEW_CACHE: dict[tuple[str, bool, str], _DomainView] = {}


def _domain_view(env: Environment, config: EpisodeConfig) -> _DomainView:
    """Built once (~60 ms; the dual system prompt is ~90 KB) per process, not once per episode."""
    key = (config.domain, config.solo_mode, config.policy_variant)
    if key not in _VIEW_CACHE:
        policy = env.get_policy()
        if config.policy_variant == "compact":
            policy = f"{COMPACT_POLICY_NOTE}\n\n{_compact(policy)}"
        tools = list(tool_schemas(env.get_tools()) or [])
        dual_system = None
        if config.solo_mode:
            tools += tool_schemas(user_tools_of(env)) or []
            tools.append(_stop_tool_schema())
        else:
            dual_system = SYSTEM_PROMPT.format(domain_policy=policy, agent_instruction=AGENT_INSTRUCTION)
        _VIEW_CACHE[key] = _DomainView(policy=policy, tools=tools, dual_system_prompt=dual_system)
    return _VIEW_CACHE[key]


def task_view(task: Task, env: Environment, config: EpisodeConfig) -> TaskView:
    """tau2's own agent prompt (LLMAgent / LLMSoloAgent) and tools, so training matches deployment."""
    return _task_view(task, _domain_view(env, config), config)


def _task_view(task: Task, shared: _DomainView, config: EpisodeConfig) -> TaskView:
    tools = list(shared.tools)  # the schemas themselves are shared and read-only
    if config.solo_mode:
        if task.ticket is None:
            raise ValueError(f"task {task.id} has no ticket: it cannot be played in solo mode")
        instruction = AGENT_SOLO_INSTRUCTION.format(stop_function_name=SOLO_STOP_TOOL, stop_token=SOLO_STOP_TOKEN)
        system = SYSTEM_PROMPT_SOLO.format(
            agent_instruction=instruction, domain_policy=shared.policy, ticket=task.ticket
        )
        opening: list[dict[str, Any]] = []
    else:
        system = shared.dual_system_prompt or ""
        opening = [{"role": "assistant", "content": DEFAULT_FIRST_AGENT_MESSAGE.content}]
    return TaskView(system_prompt=system, tools=tools, opening=opening)


def assistant_to_openai(message: AssistantMessage) -> dict[str, Any]:
    """Native OpenAI form (tool calls as `tool_calls`, arguments as a dict) as slime's SFT reader expects."""
    out: dict[str, Any] = {"role": "assistant", "content": message.content or ""}
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call in message.tool_calls
        ]
    return out


def tool_to_openai(message: ToolMessage, name: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"role": "tool", "tool_call_id": message.id, "content": message.content or ""}
    if name:
        out["name"] = name
    return out


# ------------------------------------------------------------------------------------------------------ the agents


class AgentTurn(BaseModel):
    """One agent turn: a routable message, or an error the agent is shown, or the end of its budget."""

    model_config = {"arbitrary_types_allowed": True}

    message: AssistantMessage | None = None
    error: str | None = None
    raw_text: str = ""
    finish_reason: Literal["stop", "length", "abort", "budget"] = "stop"
    abort_message: str | None = None
    latency_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class EpisodeAgent(Protocol):
    async def act(self, new_messages: list[dict[str, Any]], turn_index: int) -> AgentTurn:
        """Produce the next turn after seeing `new_messages` (OpenAI-style user / tool messages)."""
        ...


IncomingMessage = AssistantMessage | ToolMessage | MultiToolMessage


class UserReply(BaseModel):
    message: UserMessage
    latency_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@runtime_checkable
class EpisodeUser(Protocol):
    """What the engine routes to the user, as tau2's Orchestrator does: the agent's text (AssistantMessage), or the
    results of the user's own tool calls (ToolMessage / MultiToolMessage). Users hold nothing to release: LLM users
    share their chat client (rollout.user_sim.close_user_clients closes it). A user may carry `turn_timeout_s`, a
    bound on its turns below the episode's turn bound (the LLM user's TAU2_USER_CALL_TIMEOUT_S)."""

    async def respond(self, incoming: IncomingMessage) -> UserReply: ...


def _message_from_calls(
    content: str | None, calls: list[tuple[str, dict[str, Any]]], turn_index: int
) -> AssistantMessage:
    tool_calls = [
        ToolCall(id=f"call_{turn_index}_{k}", name=name, arguments=arguments, requestor="assistant")
        for k, (name, arguments) in enumerate(calls)
    ]
    return AssistantMessage(role="assistant", content=content or None, tool_calls=tool_calls or None)


def parse_turn(turn: AgentTurn, turn_index: int, max_tool_calls: int | None = None) -> AgentTurn:
    """Fill a sampled turn's message from its text (rollout.tool_format), or the error the policy is shown."""
    parsed = parse_assistant_text(turn.raw_text, None, max_tool_calls)
    if parsed.error:
        turn.error = parsed.error
    else:
        calls = [(call.name, call.arguments) for call in parsed.tool_calls]
        turn.message = _message_from_calls(parsed.content, calls, turn_index)
    return turn


_VOCAB_SIZES: dict[int, int] = {}


def _vocab_size(tokenizer: Any) -> int:
    """Ids a tokenizer can decode (base vocabulary and added tokens), computed once per tokenizer."""
    key = id(tokenizer)
    if key not in _VOCAB_SIZES:
        _VOCAB_SIZES[key] = len(tokenizer)
    return _VOCAB_SIZES[key]


class TokenAgent:
    """The policy, token-in-token-out: sampled ids kept verbatim, everything else rendered by the chat template.
    Every sampled id is checked against the tokenizer's vocabulary: a turn with an id outside it fails the episode
    as a policy-server fault (PolicyServerError), before anything is decoded or recorded."""

    def __init__(
        self,
        policy: PolicyClient,
        tokenizer: Any,
        view: TaskView,
        sampling_params: dict[str, Any],
        max_response_tokens: int,
        max_context_tokens: int | None = None,
        max_tool_calls_per_turn: int | None = None,
        max_tokens_per_turn: int | None = None,
    ) -> None:
        self.policy = policy
        self.max_tokens_per_turn = max_tokens_per_turn
        self.tokenizer = tokenizer
        self.view = view
        self.renderer = ChatRenderer(tokenizer, view.tools)
        self.max_response_tokens = max_response_tokens
        self.max_context_tokens = max_context_tokens
        self.max_tool_calls_per_turn = max_tool_calls_per_turn
        self.sampling_params = self._prepare_params(sampling_params)
        self.vocab_size = _vocab_size(tokenizer)
        self.record: TokenRecord | None = None
        self._ids_json: IdsJson | None = None
        self._turn_closed = True
        # What slime's Sample keeps per request (prefix_cache_info, weight_versions) and the per-turn cap's hits.
        self.cached_tokens = 0
        self.request_prompt_tokens = 0
        self.weight_versions: list[str] = []
        self.turn_cap_hits = 0

    def _prepare_params(self, params: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in params.items() if v is not None}
        stop_ids = list(out.get("stop_token_ids") or [])
        for token_id in (self.renderer.end_of_turn_id, getattr(self.tokenizer, "eos_token_id", None)):
            if token_id is not None and token_id not in stop_ids:
                stop_ids.append(token_id)
        out["stop_token_ids"] = stop_ids
        out["no_stop_trim"] = True  # the end-of-turn token is sampled and must be trained: keep its id and log-prob
        out["skip_special_tokens"] = False
        out["spaces_between_special_tokens"] = False
        return out

    def _budget_left(self) -> int:
        assert self.record is not None
        left = self.max_response_tokens - self.record.response_length
        if self.max_context_tokens is not None:
            left = min(left, self.max_context_tokens - len(self.record.prompt_ids) - self.record.response_length)
        return left

    async def _observe(self, new_messages: list[dict[str, Any]]) -> bool:
        """Append template glue for the messages; False if it does not fit in the budget (then nothing is added)."""
        if self.record is None:
            opening = [{"role": "system", "content": self.view.system_prompt}, *self.view.opening, *new_messages]
            # The opening (~8k tokens) is rendered and encoded in full once per prefix, then ~0.3 ms (ChatRenderer).
            self.record = TokenRecord(prompt_ids=await run_cpu(self.renderer.prompt_ids, opening))
            return True
        text = self.renderer.continuation_text(new_messages, self._turn_closed)
        ids = self.renderer.glue_ids(text)
        if len(ids) >= self._budget_left():  # no room left to sample even one token after it
            return False
        self.record.add_glue(ids)
        return True

    def _request_ids(self) -> list[int] | JsonIds:
        """The ids as JSON, extended by each turn's new ids only (IdsJson), for a client that takes them; else a
        list."""
        assert self.record is not None
        if not getattr(self.policy, "takes_json_ids", False):
            return self.record.all_ids
        if self._ids_json is None or self._ids_json.record is not self.record:
            self._ids_json = IdsJson(self.record)
        return JsonIds(self._ids_json(), len(self.record.prompt_ids) + self.record.response_length)

    async def act(self, new_messages: list[dict[str, Any]], turn_index: int) -> AgentTurn:
        if not await self._observe(new_messages) or self._budget_left() <= 0:
            return AgentTurn(finish_reason="budget")
        assert self.record is not None
        left = self._budget_left()
        turn_cap = min(left, self.max_tokens_per_turn) if self.max_tokens_per_turn else left
        params = dict(self.sampling_params, max_new_tokens=turn_cap)
        # Passed straight on: while the request is in flight only the client holds the ids (and drops them).
        out = await self.policy.generate(self._request_ids(), params)
        if len(out.token_ids) > params["max_new_tokens"]:
            out.token_ids, out.logprobs = (
                out.token_ids[: params["max_new_tokens"]],
                out.logprobs[: params["max_new_tokens"]],
            )
        bad = [t for t in out.token_ids if not 0 <= t < self.vocab_size]
        if bad:  # never decoded, never trained: a server or checkpoint that does not match this tokenizer
            count = f", {len(bad)} such ids" if len(bad) > 1 else ""
            raise PolicyServerError(
                f"the policy server returned token id {bad[0]} outside the tokenizer's vocabulary "
                f"(0..{self.vocab_size - 1}{count}): the served model and --hf-checkpoint differ"
            )
        self.cached_tokens += out.cached_tokens
        self.request_prompt_tokens += out.prompt_tokens
        if out.weight_version is not None:
            self.weight_versions.append(out.weight_version)
        self.record.add_sampled(out.token_ids, out.logprobs)
        closed = bool(out.token_ids) and out.token_ids[-1] in params["stop_token_ids"]
        if not closed and out.finish_reason != "abort" and len(out.token_ids) >= turn_cap and turn_cap < left:
            self.turn_cap_hits += 1
        self._turn_closed = closed
        body_ids = out.token_ids[:-1] if closed else out.token_ids
        text = self.tokenizer.decode(body_ids, skip_special_tokens=False)
        turn = AgentTurn(
            raw_text=text,
            finish_reason=out.finish_reason,
            abort_message=out.abort_message,
            latency_s=out.latency_s,
            prompt_tokens=out.prompt_tokens,
            completion_tokens=len(out.token_ids),
        )
        if out.finish_reason == "abort":
            return turn
        if not closed and len(out.token_ids) >= left:  # the episode's token budget ran out mid-turn: it ends here
            turn.finish_reason = "budget"
            return turn
        return parse_turn(turn, turn_index, self.max_tool_calls_per_turn)


class ChatAgent:
    """A teacher behind an OpenAI-compatible chat endpoint (or Gemini): text in, native tool calls out."""

    def __init__(self, client: Any, view: TaskView, params: dict[str, Any] | None = None) -> None:
        self.client = client
        self.view = view
        self.params = params or {}
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": view.system_prompt}, *view.opening]

    async def act(self, new_messages: list[dict[str, Any]], turn_index: int) -> AgentTurn:
        for message in new_messages:
            if message["role"] == "tool" and message.get("tool_call_id") == "invalid":
                self.messages.append({"role": "user", "content": message["content"]})  # no call to answer
            else:
                self.messages.append(message)
        reply = await self.client.complete(
            self.messages,
            tools=self.view.tools,
            tool_choice="required" if self.params.get("solo") else "auto",
            **{k: v for k, v in self.params.items() if k != "solo"},
        )
        calls = [(call.name, call.arguments) for call in reply.tool_calls]
        turn = AgentTurn(
            raw_text=format_assistant_turn(reply.content, [{"name": n, "arguments": a} for n, a in calls]),
            latency_s=reply.latency_s,
            prompt_tokens=reply.prompt_tokens,
            completion_tokens=reply.completion_tokens,
        )
        if not calls and not (reply.content or "").strip():
            turn.error = "the message is empty: write a reply or make a tool call"
            return turn
        turn.message = _message_from_calls(reply.content, calls, turn_index)
        self.messages.append(assistant_to_openai(turn.message))
        return turn


# ----------------------------------------------------------------------------------------------------- the episode


class EpisodeResult(BaseModel):
    model_config = {"arbitrary_types_allowed": True}

    task_id: str
    domain: str
    solo_mode: bool
    status: Status
    termination_reason: str
    reward: float | None = None
    reward_info: dict[str, Any] | None = None
    truncated_checks: dict[str, Any] | None = None
    progress: dict[str, Any] | None = Field(default=None, description="reward.progress figures of the end state")
    failure: str | None = None
    messages: list[dict[str, Any]] = Field(default_factory=list, description="tau2 trajectory (model_dump json)")
    agent_messages: list[dict[str, Any]] = Field(default_factory=list, description="what the agent saw, OpenAI form")
    invalid_turns: list[dict[str, Any]] = Field(default_factory=list)
    turns: int = 0
    steps: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    policy_latency_s: float = 0.0
    policy_prompt_tokens: int = 0
    policy_completion_tokens: int = 0
    user_latency_s: float = 0.0
    user_prompt_tokens: int = 0
    user_completion_tokens: int = 0
    env_s: float = 0.0
    eval_s: float = 0.0
    wall_s: float = 0.0
    # tau2's SimulationRun fields the trajectory alone does not carry (tau2 Results files are rebuilt from them).
    simulation_id: str | None = None
    start_time: str | None = None
    end_time: str | None = None
    duration_s: float | None = None
    tau2_termination_reason: str | None = None
    record: Any = Field(default=None, exclude=True, description="TokenRecord of a TokenAgent, else None")

    @property
    def success(self) -> bool:
        return is_success(self.reward)

    @classmethod
    def setup_failed(cls, task: Task, config: EpisodeConfig, error: BaseException) -> EpisodeResult:
        """An episode the engine could not set up: an infrastructure failure, not a bad policy."""
        return cls(
            task_id=task.id,
            domain=config.domain,
            solo_mode=config.solo_mode,
            status="failed",
            termination_reason="infra_error",
            failure=f"episode setup failed: {type(error).__name__}: {error}",
        )

    def summary(self) -> dict[str, Any]:
        """Everything but the token record: what the evaluator and trace files store."""
        return self.model_dump(mode="json")


class _Episode:
    """Mutable state of one episode (tau2's Orchestrator fields, plus what the engine measures)."""

    def __init__(self, task: Task, config: EpisodeConfig) -> None:
        self.task = task
        self.config = config
        self.trajectory: list[Message] = []
        self.agent_view: list[dict[str, Any]] = []
        self.pending: list[dict[str, Any]] = []
        self.step_count = 0
        self.num_errors = 0
        self.turns = 0
        self.tool_calls = 0
        self.tool_errors = 0
        self.invalid_turns: list[dict[str, Any]] = []
        self.done = False
        self.reason: str | None = None
        self.status: Status = "completed"
        self.failure: str | None = None
        self.policy_latency = 0.0
        self.policy_prompt_tokens = 0
        self.policy_completion_tokens = 0
        self.user_latency = 0.0
        self.user_prompt_tokens = 0
        self.user_completion_tokens = 0
        self.env_s = 0.0
        self.env: Environment | None = None  # the environment at the end, for the progress figures


def _to_agent(ep: _Episode, messages: list[dict[str, Any]]) -> None:
    ep.pending.extend(messages)
    ep.agent_view.extend(messages)


def _run_tools(ep: _Episode, env: Environment, message: AssistantMessage | UserMessage) -> list[ToolMessage]:
    started = time.perf_counter()
    results = []
    for call in message.tool_calls or []:
        result = env.get_response(call)
        if result.error:
            ep.num_errors += 1
            if call.requestor == "assistant":
                ep.tool_errors += 1
        results.append(result)
    ep.env_s += time.perf_counter() - started
    return results


TURN_KNOB = "TAU2_TURN_TIMEOUT_S; default derived from TAU2_MAX_TOKENS_PER_TURN, see rollout/budgets.py"


async def _bounded(awaitable: Any, seconds: float, who: str, knob: str = TURN_KNOB) -> Any:
    """Await one turn within its bound; a stuck server becomes a TurnTimeout naming the knob. The bound holds whatever
    the turn does with a cancellation (aiohttp swallows one that lands as its own request timeout fires, and a
    retrying client then carries on): the turn is never waited for past its bound, only cancelled until it stops."""
    turn = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({turn}, timeout=seconds)
    except asyncio.CancelledError:
        _stop(turn)
        raise
    if turn in done:
        return turn.result()
    turn.add_done_callback(_outcome_unused)
    _stop(turn)
    raise TurnTimeout(f"the {who} produced no turn within {seconds:.0f} s ({knob})")


def _stop(task: asyncio.Future[Any]) -> None:
    if not task.done():
        task.cancel()
        asyncio.get_running_loop().call_later(0.05, _stop, task)


def _outcome_unused(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it: the episode already ended on the timeout


def _user_turn_bound(user: Any, config: EpisodeConfig) -> tuple[float, str]:
    """The bound on one user turn: the turn bound, or the user simulator's own if it is smaller."""
    own = getattr(user, "turn_timeout_s", None)
    if own is not None and own < config.turn_deadline_s():
        return own, "TAU2_USER_CALL_TIMEOUT_S"
    return config.turn_deadline_s(), TURN_KNOB


async def _agent_step(ep: _Episode, agent: EpisodeAgent) -> tuple[Message | None, str]:
    """One agent turn; returns (message, next recipient) or (None, 'stop') when the episode ends."""
    turn = await _bounded(agent.act(ep.pending, ep.turns), ep.config.turn_deadline_s(), "policy")
    ep.pending = []
    ep.turns += 1
    ep.policy_latency += turn.latency_s
    ep.policy_prompt_tokens += turn.prompt_tokens
    ep.policy_completion_tokens += turn.completion_tokens
    if turn.finish_reason in ("abort", "budget") and turn.completion_tokens:
        ep.agent_view.append({"role": "assistant", "content": turn.raw_text, "cut_turn": True})  # sampled, unfinished
    if turn.finish_reason == "abort":
        ep.status, ep.reason, ep.failure = "aborted", "aborted", turn.abort_message or "aborted by the policy server"
        return None, "stop"
    if turn.finish_reason == "budget":
        ep.status, ep.reason = "truncated", "max_tokens"
        return None, "stop"
    if turn.error is not None:
        # Malformed output touches neither environment nor user: the agent sees an error, tau2's trajectory does not.
        ep.invalid_turns.append({"turn": ep.turns - 1, "error": turn.error, "text": turn.raw_text[:2000]})
        ep.agent_view.append({"role": "assistant", "content": turn.raw_text, "invalid_turn": True})
        ep.num_errors += 1
        ep.step_count += 1  # the agent's message; the error observation is the step below
        _to_agent(ep, [{"role": "tool", "tool_call_id": "invalid", "content": f"Error: {turn.error}"}])
        return None, "agent"
    message = turn.message
    assert message is not None
    if ep.config.solo_mode and message.tool_calls and any(c.name == SOLO_STOP_TOOL for c in message.tool_calls):
        message.content, message.tool_calls = SOLO_STOP_TOKEN, None  # as tau2's LLMSoloAgent turns `done` into a stop
    ep.trajectory.append(message)
    ep.agent_view.append(assistant_to_openai(message))
    if ep.config.solo_mode and LLMSoloAgent.is_stop(message):
        ep.done, ep.reason = True, TerminationReason.AGENT_STOP.value
        return message, "user"
    if message.is_tool_call():
        ep.tool_calls += len(message.tool_calls or [])
        return message, "env"
    if ep.config.solo_mode:  # a solo agent may only make tool calls
        ep.done, ep.reason = True, TerminationReason.AGENT_ERROR.value
    return message, "user"


ABORTED_BY_TRAINER = "the trainer aborted the rollout (its batch was full) before this turn"


def _aborted(ep: _Episode, abort_check: Callable[[], bool] | None) -> bool:
    """Checked before every policy and user turn: once the trainer aborts, no new request is sent."""
    if abort_check is None or not abort_check():
        return False
    ep.status, ep.reason, ep.failure = "aborted", "aborted", ABORTED_BY_TRAINER
    return True


async def _play(
    ep: _Episode,
    agent: EpisodeAgent,
    user: Any | None,
    env: Environment | None,
    abort_check: Callable[[], bool] | None = None,
) -> None:
    config = ep.config
    if config.solo_mode:
        # tau2 solo: the agent's first turn happens during initialization and is not counted as a step.
        if _aborted(ep, abort_check):
            return
        message, to_role = await _agent_step(ep, agent)
        if to_role == "stop":
            return
    else:
        greeting = DEFAULT_FIRST_AGENT_MESSAGE.model_copy(deep=True)
        greeting.timestamp = get_now()
        ep.trajectory.append(greeting)
        message, to_role = greeting, "user"
    user_s, user_knob = _user_turn_bound(user, config)
    while not ep.done:
        if to_role in ("user", "agent") and _aborted(ep, abort_check):
            return
        if to_role == "user":
            if user is None:
                raise RuntimeError("a message was routed to the user in solo mode")
            reply = await _bounded(user.respond(message), user_s, "user simulator", user_knob)
            user_message = reply.message
            user_message.validate()  # as tau2's Orchestrator: an empty user message is an error, not a turn
            ep.user_latency += reply.latency_s
            ep.user_prompt_tokens += reply.prompt_tokens
            ep.user_completion_tokens += reply.completion_tokens
            ep.trajectory.append(user_message)
            if not user_message.is_tool_call() and UserSimulator.is_stop(user_message):
                ep.done, ep.reason = True, TerminationReason.USER_STOP.value
            message = user_message
            if user_message.is_tool_call():
                to_role = "env"
            else:
                to_role = "agent"
                _to_agent(ep, [{"role": "user", "content": user_message.content or ""}])
        elif to_role == "agent":
            if config.max_turns is not None and ep.turns >= config.max_turns:
                ep.status, ep.reason = "truncated", "max_turns"
                return
            agent_message, to_role = await _agent_step(ep, agent)
            if to_role == "stop":
                return
            if agent_message is not None:
                message = agent_message
        elif to_role == "env":
            if env is None:
                env = await run_cpu(build_environment, config.domain, ep.task, config.solo_mode)
            results = _run_tools(ep, env, message)
            ep.trajectory.extend(results)
            requestor = "assistant" if isinstance(message, AssistantMessage) else "user"
            names = [call.name for call in message.tool_calls or []]
            message = results[0] if len(results) == 1 else MultiToolMessage(role="tool", tool_messages=results)
            if requestor == "assistant":
                to_role = "agent"
                _to_agent(ep, [tool_to_openai(result, name) for result, name in zip(results, names)])
            else:
                to_role = "user"
        ep.step_count += 1
        if env is None:  # built after the first LLM reply, not in the burst of a batch's first requests
            env = await run_cpu(build_environment, config.domain, ep.task, config.solo_mode)
        env.sync_tools()
        ep.env = env
        if to_role == "env":
            continue
        # As tau2: these checks run after every step that does not go to the environment, even after a stop.
        if ep.step_count >= config.max_steps:
            ep.done, ep.reason = True, TerminationReason.MAX_STEPS.value
        if ep.num_errors >= config.max_errors:
            ep.done, ep.reason = True, TerminationReason.TOO_MANY_ERRORS.value


def _simulation(ep: _Episode, started_at: str, duration: float, reason: TerminationReason) -> SimulationRun:
    # Shallow copies with the turn index: the episode is over, so nothing changes the messages they share parts with.
    messages = [msg.model_copy(update={"turn_idx": i}) for i, msg in enumerate(ep.trajectory)]
    return SimulationRun(
        id=str(uuid.uuid4()),
        task_id=ep.task.id,
        start_time=started_at,
        end_time=get_now(),
        duration=duration,
        termination_reason=reason,
        reward_info=None,
        messages=messages,
    )


def _evaluate(ep: _Episode, simulation: SimulationRun) -> tuple[RewardInfo, RewardInfo | None]:
    """tau2's verdict, and for a truncated episode the checks tau2 skips (CPU work: call it through run_cpu)."""
    config = ep.config
    info = evaluate_simulation(simulation, ep.task, EvaluationType.ALL, config.solo_mode, config.domain)
    truncated = None
    if simulation.termination_reason.value not in NORMAL_TERMINATIONS:
        truncated = checks_ignoring_termination(simulation, ep.task, config.domain, config.solo_mode)
    return info, truncated


async def run_episode(
    task: Task,
    agent: EpisodeAgent,
    user: Any | None,
    config: EpisodeConfig,
    env: Environment | None = None,
    abort_check: Callable[[], bool] | None = None,
) -> EpisodeResult:
    """Play one task to the end and judge it with tau2's evaluator. Never raises for episode-level failures:
    infrastructure errors (policy or user simulator down past retries, timeouts, bugs) come back as status 'failed'.
    `env`: a fresh environment, or None to build one where the episode first needs it (after the first LLM reply).
    `abort_check`: called before every policy and user turn; True ends the episode as 'aborted' (slime's abort).
    Every wait is bounded: each turn by `config.turn_deadline_s()`, the episode by `config.episode_deadline_s()`
    of the agent's token budget."""
    started = time.perf_counter()
    started_at = get_now()
    ep = _Episode(task, config)
    deadline = config.episode_deadline_s(getattr(agent, "max_response_tokens", None))
    try:
        await asyncio.wait_for(_play(ep, agent, user, env, abort_check), deadline)
    except TurnTimeout as err:
        ep.status, ep.reason, ep.failure = "failed", "timeout", str(err)
    except asyncio.TimeoutError:
        ep.status, ep.reason = "failed", "timeout"
        ep.failure = f"the episode exceeded {deadline:.0f} s (TAU2_EPISODE_TIMEOUT_S; default derived from its budget)"
    except Exception as err:  # servers down past retries, a tau2 error or a bug: never take down the batch
        ep.status, ep.reason = "failed", "infra_error"
        ep.failure = f"{type(err).__name__}: {err}"
        if not isinstance(err, (PolicyServerError, ConnectionError)) and "Simulator" not in type(err).__name__:
            ep.failure += "\n" + traceback.format_exc(limit=6)
    reason = ep.reason or TerminationReason.MAX_STEPS.value
    if ep.status == "completed" and reason not in NORMAL_TERMINATIONS:
        ep.status = "truncated"
    result = EpisodeResult(
        task_id=task.id,
        domain=config.domain,
        solo_mode=config.solo_mode,
        status=ep.status,
        termination_reason=reason,
        failure=ep.failure,
        agent_messages=ep.agent_view,
        invalid_turns=ep.invalid_turns,
        turns=ep.turns,
        steps=ep.step_count,
        tool_calls=ep.tool_calls,
        tool_errors=ep.tool_errors,
        policy_latency_s=ep.policy_latency,
        policy_prompt_tokens=ep.policy_prompt_tokens,
        policy_completion_tokens=ep.policy_completion_tokens,
        user_latency_s=ep.user_latency,
        user_prompt_tokens=ep.user_prompt_tokens,
        user_completion_tokens=ep.user_completion_tokens,
        env_s=ep.env_s,
        record=getattr(agent, "record", None),
    )
    tau2_reason = (
        TerminationReason(reason) if reason in TerminationReason._value2member_map_ else TerminationReason.MAX_STEPS
    )
    simulation = _simulation(ep, started_at, time.perf_counter() - started, tau2_reason)
    result.messages = [m.model_dump(mode="json") for m in simulation.messages]
    result.simulation_id, result.start_time, result.end_time = simulation.id, simulation.start_time, simulation.end_time
    result.duration_s, result.tau2_termination_reason = simulation.duration, simulation.termination_reason.value
    if ep.status != "failed":
        eval_started = time.perf_counter()
        try:
            info, truncated = await run_cpu(_evaluate, ep, simulation)
            result.reward = float(info.reward)
            result.reward_info = info.model_dump(mode="json")
            result.truncated_checks = truncated.model_dump(mode="json") if truncated is not None else None
            result.progress = await run_cpu(episode_progress, task, config.domain, ep.env, ep.trajectory)
        except Exception as err:
            result.status, result.failure = "failed", f"evaluation failed: {type(err).__name__}: {err}"
        result.eval_s = time.perf_counter() - eval_started
    result.wall_s = time.perf_counter() - started
    return result
