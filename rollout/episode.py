"""The one way an episode is played: set the task up (rollout.engine.prepare_episode), build its user
(rollout.user_sim.build_user), make the agent from the task's view, then rollout.engine.run_episode.

GRPO rollouts (rollout.generate_with_tau), the evaluator and its shortcut baselines (eval/), SFT trace generation
(examples/generate_sft_traces.py), the benchmark (bench/) and SkyRL (integrations/skyrl/bridge.py) all start their
episodes here; only the agent differs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rollout.engine import (
    EpisodeAgent,
    EpisodeConfig,
    EpisodeResult,
    EpisodeSetup,
    EpisodeUser,
    TaskView,
    prepare_episode,
    run_episode,
)
from rollout.settings import UserSimConfig
from rollout.user_sim import build_user


class Episode:
    """One episode, set up and ready to play; its view, user and agent stay readable after the run."""

    def __init__(
        self, task: Any, config: EpisodeConfig, setup: EpisodeSetup, user: EpisodeUser | None, agent: EpisodeAgent
    ) -> None:
        self.task = task
        self.config = config
        self.setup = setup
        self.user = user
        self.agent = agent

    @property
    def view(self) -> TaskView:
        return self.setup.view

    @classmethod
    async def start(
        cls,
        task: Any,
        config: EpisodeConfig,
        make_agent: Callable[[TaskView], EpisodeAgent],
        user_config: UserSimConfig | None = None,
        user_clients: dict[Any, Any] | None = None,
    ) -> Episode:
        """Set the episode up; raises when it cannot be (a bad task, agent or user-simulator setting).
        `user_config`: the user simulator (default: the TAU2_USER_* settings), none in solo mode; `user_clients`:
        where LLM users' chat clients are shared (default: one cache per process)."""
        setup = await prepare_episode(task, config)
        user = None
        if not config.solo_mode:
            user = build_user(user_config or UserSimConfig.current(), task, setup.user_tools, user_clients)
        return cls(task, config, setup, user, make_agent(setup.view))

    async def play(self, abort_check: Callable[[], bool] | None = None) -> EpisodeResult:
        """run_episode: never raises for episode-level failures (see there)."""
        return await run_episode(self.task, self.agent, self.user, self.config, self.setup.env, abort_check)


async def play_episode(
    task: Any,
    config: EpisodeConfig,
    make_agent: Callable[[TaskView], EpisodeAgent],
    user_config: UserSimConfig | None = None,
    user_clients: dict[Any, Any] | None = None,
) -> EpisodeResult:
    """Start and play one episode; a set-up failure comes back as a failed result, never as an exception."""
    try:
        episode = await Episode.start(task, config, make_agent, user_config, user_clients)
    except Exception as err:  # a task the engine cannot set up is an infrastructure failure, not a bad policy
        return EpisodeResult.setup_failed(task, config, err)
    return await episode.play()
