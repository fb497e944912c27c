"""The SkyRL training configuration of the tau2 integration, built with SkyRL's own config classes.

The tau2 environments' settings live at environment.skyrl_gym.tau2_<domain> (Tau2EnvConfig), added the way SkyRL
asks for custom fields: by subclassing its config dataclasses. `load_config` reads a YAML file of SkyRL settings
(default: tau2_telecom.yaml beside this file), applies `key=value` overrides from the command line, parses both
with SkyRL's own override parser (`from_cli_overrides`, so its checks apply), and fills
generator.chat_template_kwargs.tools with the tool schemas the engine shows the policy: SkyRL renders every prompt
and observation through the chat template, and the recipe's prompt lists the tools there.
"""

import asyncio
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from skyrl.train.config import SkyRLTrainConfig
from skyrl.train.config.config import EnvironmentConfig, SkyRLGymConfig

from integrations.skyrl.env import ENV_IDS, Tau2EnvConfig
from rollout.engine import prepare_episode
from rollout.settings import EpisodeConfig
from rollout.task_store import get_task_store

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).with_name("tau2_telecom.yaml")
DOMAIN_OF_ENV = {env_id: domain for domain, env_id in ENV_IDS.items()}


@dataclass
class Tau2GymConfig(SkyRLGymConfig):
    tau2_telecom: Tau2EnvConfig = field(default_factory=Tau2EnvConfig)
    tau2_airline: Tau2EnvConfig = field(default_factory=Tau2EnvConfig)
    tau2_retail: Tau2EnvConfig = field(default_factory=Tau2EnvConfig)


@dataclass
class Tau2EnvironmentConfig(EnvironmentConfig):
    skyrl_gym: Tau2GymConfig = field(default_factory=Tau2GymConfig)


@dataclass
class Tau2TrainConfig(SkyRLTrainConfig):
    environment: Tau2EnvironmentConfig = field(default_factory=Tau2EnvironmentConfig)


def _dotlist(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """A nested YAML mapping as SkyRL's `key.path=value` overrides (JSON values: valid YAML flow syntax)."""
    out = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out += _dotlist(value, path + ".")
        else:
            out.append(f"{path}={json.dumps(value)}")
    return out


def engine_tools(domain: str, solo_mode: bool) -> list[dict[str, Any]]:
    """The tool schemas the engine shows the policy for a domain (the same for every task of it)."""
    task = get_task_store().tasks(domain, "test")[0]
    view = asyncio.run(prepare_episode(task, EpisodeConfig(domain=domain, solo_mode=solo_mode))).view
    return view.tools


def load_config(argv: list[str] | None = None) -> Tau2TrainConfig:
    """`[--config FILE] [key=value ...]` -> the typed SkyRL config, tool schemas filled in."""
    args = list(argv or [])
    config_file = DEFAULT_CONFIG
    if args and args[0].startswith("--config"):
        name, _, value = args.pop(0).partition("=")
        if not value:
            if not args:
                raise SystemExit("main_tau2: --config needs a file")
            value = args.pop(0)
        config_file = Path(value)
    try:
        tree = yaml.safe_load(config_file.read_text()) or {}
    except OSError as err:
        raise SystemExit(f"main_tau2: cannot read config '{config_file}': {err.strerror or err}") from None
    cfg = Tau2TrainConfig.from_cli_overrides(_dotlist(tree) + args)
    env_class = cfg.environment.env_class
    domain = DOMAIN_OF_ENV.get(env_class)
    if domain is None:
        valid = ", ".join(sorted(DOMAIN_OF_ENV))
        raise SystemExit(f"main_tau2: environment.env_class={env_class!r} is not a tau2 environment ({valid})")
    env_settings = Tau2EnvConfig.coerce(getattr(cfg.environment.skyrl_gym, env_class))
    solo = bool(env_settings.solo_mode) if env_settings.solo_mode is not None else EpisodeConfig().solo_mode
    tools = engine_tools(domain, solo)
    given = cfg.generator.chat_template_kwargs.get("tools")
    if given is not None and given != tools:
        raise SystemExit(
            "main_tau2: generator.chat_template_kwargs.tools differs from the engine's tool schemas; leave it unset "
            "(main_tau2 fills it) so the policy is shown the tools the environment runs"
        )
    cfg.generator.chat_template_kwargs["tools"] = tools
    in_flight = cfg.trainer.train_batch_size * cfg.generator.n_samples_per_prompt
    if cfg.environment.skyrl_gym.max_env_workers < in_flight:
        log.warning(
            "environment.skyrl_gym.max_env_workers=%d < %d episodes in flight: a tau2 step holds its worker thread "
            "while the user simulator answers, so at most that many episodes progress at once",
            cfg.environment.skyrl_gym.max_env_workers,
            in_flight,
        )
    return cfg
