"""tau2 as a skyrl-gym environment, played by the recipe's one episode engine.

Registered ids (`register_tau2_envs`): tau2_telecom, tau2_airline, tau2_retail. A data row (tau2_dataset.py) holds
the task; the environment plays it through `EpisodeBridge` (bridge.py): tau2's greeting, the user simulator
(rollout.user_sim.build_user: scripted, LLM or Gemini), max_steps / max_errors and the stop rules as tau2's
Orchestrator applies them, then tau2's verdict. The reward is the recipe's shaped reward
(reward.tau2_reward_shaping.shape_reward: success + alpha * partial credit) or tau2's own 0/1, per `reward`.

- `init(prompt)` starts the episode and returns the opening the policy sees: tau2's system prompt, the greeting and
  the user's first message (dual mode), or the system prompt with the ticket (solo mode).
- `step(text)` plays one policy turn (text with <tool_call> blocks, parsed as the slime rollout parses it) and
  returns what the policy sees next: tool results and user messages, or done with the reward.
- `get_metrics()` reports tau2_reward, success, shaped_reward, partial_score, turns, tool_calls, tool_errors,
  invalid_turns, failed, truncated; an episode SkyRL cut short (context length) is ended and judged first.

`step` blocks its thread while the engine plays the user simulator and the tools, so it must run in SkyRL's env
worker threads: environment.skyrl_gym.max_env_workers > 0, at least the number of episodes in flight.
An episode that fails (user simulator down past retries, a bad task) ends alone: done, reward 0.0, failed=1 in
its metrics and the reason in `failure`; the other episodes of the batch play on.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import Any

from skyrl_gym.envs.base_text_env import BaseTextEnv, BaseTextEnvStepOutput
from skyrl_gym.envs.registration import register, registry

from integrations.skyrl.bridge import EpisodeBridge, EpisodeEnd, Observation
from reward.tau2_reward_shaping import ShapingConfig, is_success, shape_reward
from rollout.settings import EpisodeConfig, UserSimConfig
from rollout.task_store import task_from_metadata

log = logging.getLogger(__name__)

ENV_IDS: dict[str, str] = {"telecom": "tau2_telecom", "airline": "tau2_airline", "retail": "tau2_retail"}
REWARD_KINDS = ("shaped", "tau2")
# Tau2EnvConfig's user-simulator fields -> UserSimConfig's (TAU2_USER_*).
USER_SETTINGS = {
    "user_kind": "kind",
    "user_model": "model",
    "user_base_url": "base_url",
    "user_temperature": "temperature",
    "user_timeout_s": "timeout_s",
    "user_max_retries": "max_retries",
}


@dataclass
class Tau2EnvConfig:
    """The environment's settings (environment.skyrl_gym.tau2_<domain> in a SkyRL config).

    Episode and user-simulator fields left at None fall back to the recipe's TAU2_* variables (rollout.settings:
    EpisodeConfig, UserSimConfig) and then to their defaults; the user simulator's API key is only ever read from the
    environment (TAU2_USER_API_KEY, OPENAI_API_KEY or GEMINI_API_KEY)."""

    reward: str = "shaped"
    solo_mode: bool | None = None
    max_steps: int | None = None
    max_errors: int | None = None
    max_tool_calls_per_turn: int | None = None
    max_tokens_per_turn: int | None = None
    policy_variant: str | None = None
    episode_timeout_s: float | None = None
    user_kind: str | None = None
    user_model: str | None = None
    user_base_url: str | None = None
    user_temperature: float | None = None
    user_timeout_s: float | None = None
    user_max_retries: int | None = None
    wait_timeout_s: float | None = 3600.0  # how long one step waits for the engine before the episode fails

    @classmethod
    def coerce(cls, value: Any) -> Tau2EnvConfig:
        """From this class, SkyRL's config object (a dataclass or OmegaConf node), a mapping, or None (defaults)."""
        if isinstance(value, cls):
            return value
        if value is None:
            return cls()
        if is_dataclass(value) and not isinstance(value, type):
            value = asdict(value)
        elif not isinstance(value, Mapping):
            from omegaconf import OmegaConf  # skyrl-gym's dependency; SkyRL hands env configs as DictConfig

            value = OmegaConf.to_container(value, resolve=True)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown tau2 environment setting(s) {unknown}; valid: {sorted(known)}")
        config = cls(**dict(value))
        if config.reward not in REWARD_KINDS:
            raise ValueError(f"tau2 environment reward must be one of {REWARD_KINDS}, got {config.reward!r}")
        return config

    def episode_config(self, domain: str, max_turns: int | None) -> EpisodeConfig:
        names = ("solo_mode", "max_steps", "max_errors", "max_tool_calls_per_turn", "max_tokens_per_turn")
        overrides = {name: getattr(self, name) for name in (*names, "policy_variant", "episode_timeout_s")}
        overrides = {name: value for name, value in overrides.items() if value is not None}
        if max_turns is not None:
            overrides["max_turns"] = max_turns
        return EpisodeConfig(domain=domain, **overrides)

    def user_config(self) -> UserSimConfig:
        """The user simulator: these settings over the TAU2_USER_* variables, checked as the slime path checks them
        (an LLM user needs a model and a URL; the key falls back by kind)."""
        overrides = {
            field: getattr(self, name) for name, field in USER_SETTINGS.items() if getattr(self, name) is not None
        }
        return UserSimConfig(**overrides)


def _end_metrics(end: EpisodeEnd, reward: float, shaped: float, partial: float) -> dict[str, float]:
    result = end.result
    failed = result is None or result.status == "failed"
    return {
        "tau2_reward": float(result.reward) if result is not None and result.reward is not None else 0.0,
        "success": 1.0 if result is not None and not failed and is_success(result.reward) else 0.0,
        "reward": reward,
        "shaped_reward": shaped,
        "partial_score": partial,
        "turns": float(result.turns) if result is not None else 0.0,
        "steps": float(result.steps) if result is not None else 0.0,
        "tool_calls": float(result.tool_calls) if result is not None else 0.0,
        "tool_errors": float(result.tool_errors) if result is not None else 0.0,
        "invalid_turns": float(len(result.invalid_turns)) if result is not None else 0.0,
        "failed": 1.0 if failed else 0.0,
        "truncated": 1.0 if result is not None and result.status == "truncated" else 0.0,
    }


class Tau2Env(BaseTextEnv):
    """One tau2 task, played by the recipe's episode engine (see the module docstring)."""

    def __init__(self, env_config: Any = None, extras: dict[str, Any] | None = None, domain: str = "telecom") -> None:
        super().__init__()
        extras = dict(extras or {})
        self.domain = domain
        self.settings = Tau2EnvConfig.coerce(env_config)
        row_domain = extras.get("domain") or domain
        if row_domain != domain:
            raise ValueError(f"a {row_domain} task was given to {ENV_IDS.get(domain, domain)}: fix its env_class")
        task_json = extras.get("task")
        metadata = {"domain": domain, "task_id": extras.get("task_id")}
        if task_json:
            metadata["task"] = json.loads(task_json) if isinstance(task_json, str) else task_json
        try:
            self.task = task_from_metadata(metadata)
        except (KeyError, ValueError) as err:  # TaskLookupError is a KeyError
            raise ValueError(
                f"this data row has no playable tau2 task ({err}); write the data with "
                "integrations/skyrl/tau2_dataset.py"
            ) from None
        max_turns = extras.get("max_turns")
        self.max_turns = int(max_turns) if max_turns else 0
        self.episode = self.settings.episode_config(domain, self.max_turns or None)
        self.shaping = ShapingConfig.current()
        self.bridge = EpisodeBridge(
            self.task, self.episode, self.settings.user_config(), wait_timeout_s=self.settings.wait_timeout_s
        )
        self.metrics: dict[str, float] = {}
        self.end_metadata: dict[str, Any] = {}

    def init(self, prompt: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        _refuse_event_loop_thread()
        event = self.bridge.start()
        view = self.bridge.view
        if view is None:  # the episode could not be set up: the row's prompt stands in, the first step ends it
            opening = [dict(m) for m in prompt]
        else:
            opening = [{"role": "system", "content": view.system_prompt}, *[dict(m) for m in view.opening]]
            if prompt and _plain(prompt) != opening:
                log.warning(
                    "task %s: the data row's prompt differs from the engine's; the engine's is used (stale "
                    "data? re-run integrations/skyrl/tau2_dataset.py)",
                    self.task.id,
                )
        first = event.messages if isinstance(event, Observation) else []
        return [*opening, *first], {"task_id": self.task.id, "domain": self.domain}

    def step(self, action: str) -> BaseTextEnvStepOutput:
        _refuse_event_loop_thread()
        self.turns += 1
        event = self.bridge.send(action)
        if isinstance(event, Observation):
            return BaseTextEnvStepOutput(observations=event.messages, reward=0.0, done=False, metadata={})
        reward = self._finish(event)
        return BaseTextEnvStepOutput(observations=[], reward=reward, done=True, metadata=dict(self.end_metadata))

    def _finish(self, end: EpisodeEnd) -> float:
        """Reward, metrics and metadata of an ended episode (once)."""
        if self.metrics:
            return self.metrics["reward"]
        result = end.result
        shaped = partial = 0.0
        components: dict[str, float] = {}
        failed = result is None or result.status == "failed" or result.reward is None
        if not failed:
            assert result is not None
            summary = {
                "termination_reason": result.termination_reason,
                "reward_info": result.reward_info,
                "truncated_checks": result.truncated_checks,
                "turns": result.turns,
            }
            shaped, partial, components = shape_reward(summary, result.reward, self.shaping)
        reward = 0.0 if failed else (shaped if self.settings.reward == "shaped" else float(result.reward))
        self.metrics = _end_metrics(end, reward, shaped, partial)
        self.end_metadata = {
            "task_id": self.task.id,
            "domain": self.domain,
            "reward_kind": self.settings.reward,
            "episode_status": result.status if result is not None else "failed",
            "termination_reason": result.termination_reason if result is not None else "infra_error",
            "reward_info": result.reward_info if result is not None else None,
            "truncated_checks": result.truncated_checks if result is not None else None,
            "partial_components": components,
            "failure": end.failure or (result.failure if result is not None else None),
            **self.metrics,
        }
        return reward

    def get_metrics(self) -> dict[str, Any]:
        if not self.metrics:  # SkyRL ended the loop itself (context length): tau2 still judges what was played
            self._finish(self.bridge.stop())
        return dict(self.metrics)

    def close(self) -> None:
        if not self.bridge.done:
            self._finish(self.bridge.stop())

    def __del__(self) -> None:
        # SkyRL does not close an env whose agent_loop raised: the engine must not keep waiting for its next turn.
        bridge = getattr(self, "bridge", None)
        if bridge is not None:
            bridge.abandon()


def _plain(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as plain dicts of their set fields (a dataset reader may fill absent keys with None)."""
    return [{k: v for k, v in dict(m).items() if v is not None} for m in messages]


def _refuse_event_loop_thread() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        "Tau2Env.init/step wait for the engine to play the user simulator and the tools, so they must not run on an "
        "event loop's thread: set environment.skyrl_gym.max_env_workers > 0 (at least the episodes in flight)"
    )


def register_tau2_envs() -> list[str]:
    """Register tau2_<domain> for every domain (idempotent); returns the ids."""
    for domain, env_id in ENV_IDS.items():
        if env_id not in registry:
            register(id=env_id, entry_point="integrations.skyrl.env:Tau2Env", kwargs={"domain": domain})
    return list(ENV_IDS.values())
