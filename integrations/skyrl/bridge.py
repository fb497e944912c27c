"""The recipe's episode engine played one policy turn at a time, for a synchronous `step(policy_text)` environment.

`rollout.engine.run_episode` drives an agent: it calls `act(new_messages, turn_index)` and waits for the turn. A
skyrl-gym environment is driven the other way round: SkyRL's generator samples a turn and calls `env.step(text)`.
`EpisodeBridge` inverts control without a second copy of the episode loop: the engine plays the episode on one
background asyncio loop per process; its agent (`_BridgeAgent`) hands the messages the policy should see next to the
environment's thread and waits for the policy's text, and `send(text)` hands that text over and blocks until the
engine asks for the next turn or the episode has ended and been judged by tau2.

Only the calling thread blocks (one of SkyRL's env worker threads); the engine loop and every other episode go on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import re
import threading
from dataclasses import dataclass, field
from typing import Any

from rollout.engine import AgentTurn, EpisodeResult, parse_turn
from rollout.episode import Episode
from rollout.settings import EpisodeConfig, UserSimConfig

# Special tokens a client may leave at the end of the decoded turn (SkyRL's remote client decodes without
# skip_special_tokens, so Qwen's text ends with <|im_end|>): they end the turn, they are not part of it.
_TRAILING_SPECIAL_TOKENS = re.compile(r"(?:\s*<\|[A-Za-z0-9_]+\|>)+\s*$")

_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()
_USER_CLIENTS: dict[Any, Any] = {}  # chat clients of LLM user simulators, shared by the episodes of the loop
_STOP = object()  # sent instead of a policy turn: end the episode as if the token budget ran out


def engine_loop() -> asyncio.AbstractEventLoop:
    """The process's engine loop, running in a daemon thread started on first use."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None or _LOOP.is_closed():
            loop = asyncio.new_event_loop()
            started = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(started.set)
                loop.run_forever()

            threading.Thread(target=run, name="tau2-engine-loop", daemon=True).start()
            started.wait()
            _LOOP = loop
        return _LOOP


@dataclass
class Observation:
    """The engine asks for the policy's next turn; `messages` are what the policy sees first (OpenAI form)."""

    messages: list[dict[str, Any]]


@dataclass
class EpisodeEnd:
    """The episode is over: the engine's result (tau2's verdict included), or None when it could not be played."""

    result: EpisodeResult | None
    failure: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def policy_turn(text: str, turn_index: int, max_tool_calls: int | None = None) -> AgentTurn:
    """The policy's decoded turn as the engine's AgentTurn, parsed as TokenAgent parses a sampled turn."""
    return parse_turn(AgentTurn(raw_text=_TRAILING_SPECIAL_TOKENS.sub("", text)), turn_index, max_tool_calls)


class _BridgeAgent:
    """The engine's agent: shows the policy its new messages through the bridge and plays the text it gets back."""

    def __init__(self, bridge: EpisodeBridge) -> None:
        self.bridge = bridge

    async def act(self, new_messages: list[dict[str, Any]], turn_index: int) -> AgentTurn:
        self.bridge._events.put(Observation(messages=[dict(m) for m in new_messages]))
        text = await self.bridge._actions.get()
        if text is _STOP:
            return AgentTurn(finish_reason="budget")
        return policy_turn(text, turn_index, self.bridge.config.max_tool_calls_per_turn)


class EpisodeBridge:
    """One episode on the engine loop, driven turn by turn from a synchronous caller.

    `start()` returns the first Observation (the messages before the policy's first turn) or an EpisodeEnd;
    `send(text)` plays one policy turn and returns the next event; `stop()` ends a running episode as truncated
    ("max_tokens", judged by tau2 like any other truncation). Events come back within `wait_timeout_s` or the
    episode is cancelled and ends failed. Never call these from a thread that runs an event loop."""

    def __init__(
        self,
        task: Any,
        config: EpisodeConfig,
        user_config: UserSimConfig,
        wait_timeout_s: float | None = None,
    ) -> None:
        self.task = task
        self.config = config
        self.user_config = user_config
        self.wait_timeout_s = wait_timeout_s
        self.view: Any = None  # the engine's TaskView once the episode is set up
        self.end: EpisodeEnd | None = None
        self._events: queue.Queue[Observation | EpisodeEnd] = queue.Queue()
        self._loop = engine_loop()
        self._actions: asyncio.Queue[Any] = asyncio.Queue()
        self._future: concurrent.futures.Future[None] | None = None

    @property
    def done(self) -> bool:
        return self.end is not None

    def start(self) -> Observation | EpisodeEnd:
        if self._future is not None:
            raise RuntimeError("the episode was already started")
        self._future = asyncio.run_coroutine_threadsafe(self._play(), self._loop)
        return self._next_event()

    def send(self, text: str) -> Observation | EpisodeEnd:
        if self.end is not None:
            return self.end
        if self._future is None:
            raise RuntimeError("start() the episode before sending a policy turn")
        self._loop.call_soon_threadsafe(self._actions.put_nowait, text)
        return self._next_event()

    def stop(self) -> EpisodeEnd:
        if self.end is None and self._future is not None:
            self._loop.call_soon_threadsafe(self._actions.put_nowait, _STOP)
            while self.end is None:  # the engine may emit nothing else: the stop turn ends the episode
                self._next_event()
        if self.end is None:  # never started
            self.end = EpisodeEnd(result=None, failure="the episode was never started")
        return self.end

    def abandon(self) -> None:
        """Let a running episode end (as `stop`) without waiting for it: for callers that are going away."""
        if self.end is None and self._future is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._actions.put_nowait, _STOP)

    def _next_event(self) -> Observation | EpisodeEnd:
        try:
            event = self._events.get(timeout=self.wait_timeout_s)
        except queue.Empty:
            assert self._future is not None
            self._future.cancel()
            event = EpisodeEnd(result=None, failure=f"the engine gave no answer within {self.wait_timeout_s} s")
        if isinstance(event, EpisodeEnd):
            self.end = event
        return event

    async def _play(self) -> None:
        result: EpisodeResult | None = None
        failure: str | None = None
        try:
            episode = await Episode.start(
                self.task, self.config, lambda view: _BridgeAgent(self), self.user_config, _USER_CLIENTS
            )
            self.view = episode.view
            result = await episode.play()
            failure = result.failure if result.status == "failed" else None
        except Exception as err:  # set-up failures (bad task, user config): this episode ends, nothing else does
            failure = f"{type(err).__name__}: {err}"
        finally:
            self._events.put(EpisodeEnd(result=result, failure=failure))
