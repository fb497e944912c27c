"""The settings models (rollout.settings): defaults, errors naming the variable, and docs/settings.md, the one table of
every TAU2_* variable, kept in step with the code."""

from __future__ import annotations

import re
import subprocess

import pytest

from rollout import budgets, settings
from rollout.settings import EpisodeConfig, ProcessSettings, RolloutSettings, SettingsError, UserSimConfig
from tests.engine_helpers import ROOT

VARIABLE = re.compile(r"\bTAU2_[A-Z0-9_]*[A-Z0-9]\b")


@pytest.fixture
def clean_env(monkeypatch):
    for model in settings.all_settings():
        for field in model.model_fields:
            monkeypatch.delenv(model.env_name(field), raising=False)
    return monkeypatch


def test_the_doc_is_the_generated_table():
    assert settings.DOC_PATH.read_text() == settings.render_doc(), (
        "docs/settings.md is stale: python -m rollout.settings"
    )


def test_every_variable_the_code_reads_is_in_the_doc():
    files = subprocess.run(["git", "ls-files", "*.py", "*.sh"], cwd=ROOT, capture_output=True, text=True).stdout
    doc = settings.DOC_PATH.read_text()
    missing = {}
    for name in files.split():
        if name.startswith(("tests/", "integrations/nemo_gym_tales/")) or "/tests/" in name:
            continue
        for variable in VARIABLE.findall((ROOT / name).read_text()):
            if f"| `{variable}` |" not in doc:  # a row of the table
                missing.setdefault(variable, name)
    assert not missing, f"variables read by the code but not in docs/settings.md: {missing}"


def test_defaults(clean_env):
    episode = EpisodeConfig()
    assert (episode.domain, episode.max_steps, episode.max_errors, episode.max_turns) == ("telecom", 200, 10, None)
    assert episode.max_tokens_per_turn == budgets.TURN_TOKENS and episode.policy_variant == "full"
    assert episode.turn_deadline_s() == budgets.turn_timeout_s() and not episode.solo_mode
    assert UserSimConfig().kind == "scripted" and UserSimConfig().call_timeout_s == 300.0
    rollout = RolloutSettings()
    assert (rollout.policy_api, rollout.task_split, rollout.eval_task_split) == ("sglang", "train", "test")
    assert not rollout.policy_url_override and not rollout.keep_trajectory
    process = ProcessSettings()
    assert (process.cpu_workers, process.gc_gen0_threshold, process.log_level) == (0, 20000, "ERROR")
    assert process.cache_dir() == ROOT / ".cache"


def test_variables_and_keywords(clean_env):
    clean_env.setenv("TAU2_MAX_TURNS", "7")
    clean_env.setenv("TAU2_MAX_TOKENS_PER_TURN", "0")  # 0: no cap
    clean_env.setenv("TAU2_SOLO_MODE", "1")
    clean_env.setenv("TAU2_MAX_STEPS", "")  # empty: the default
    clean_env.setenv("TAU2_POLICY_URL_OVERRIDE", "true")
    clean_env.setenv("TAU2_RECIPE_CACHE", "/tmp/models")
    episode = EpisodeConfig(max_errors=3)
    assert (episode.max_turns, episode.max_tokens_per_turn, episode.solo_mode) == (7, None, True)
    assert (episode.max_steps, episode.max_errors) == (200, 3)
    assert EpisodeConfig(max_turns=2).max_turns == 2  # a keyword wins over the variable
    assert RolloutSettings().policy_url_override and str(ProcessSettings().cache_dir()) == "/tmp/models"


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("TAU2_MAX_STEPS", "many", "valid integer"),
        ("TAU2_MAX_ERRORS", "0", "greater than 0"),
        ("TAU2_SOLO_MODE", "maybe", "valid boolean"),
        ("TAU2_POLICY_VARIANT", "tiny", "'full' or 'compact'"),
        ("TAU2_TURN_TIMEOUT_S", "soon", "valid number"),
        ("TAU2_POLICY_API", "grpc", "'sglang' or 'openai'"),
        ("TAU2_CPU_WORKERS", "-1", "greater than or equal to 0"),
        ("TAU2_REWARD_ALPHA", "abc", "valid number"),
        ("TAU2_REWARD_ALPHA", "1.0", "less than 1"),
        ("TAU2_REWARD_ALPHA", "-0.1", "greater than or equal to 0"),
        ("TAU2_REWARD_ALPHA", "nan", "finite number"),
        ("TAU2_TRUNCATION_DISCOUNT", "1.5", "less than or equal to 1"),
        ("TAU2_TURN_PENALTY", "-0.01", "greater than or equal to 0"),
        ("TAU2_COLLATERAL_PENALTY", "-0.5", "greater than or equal to 0"),
        ("TAU2_PARTIAL_CREDIT", "env", "'progress' or 'checks'"),
        ("TAU2_TRANSFER_GUARD", "maybe", "valid boolean"),
        ("TAU2_PARTIAL_W_ENV", "-1", "greater than or equal to 0"),
        ("TAU2_PARTIAL_W_ACTION", "inf", "finite number"),
        ("TAU2_PARTIAL_W_COMMUNICATE", "1,5", "valid number"),
        ("TAU2_PARTIAL_W_NL", "heavy", "valid number"),
        ("TAU2_PARTIAL_W_STATE", "-1", "greater than or equal to 0"),
    ],
)
def test_a_bad_value_names_its_variable(clean_env, variable, value, problem):
    clean_env.setenv(variable, value)
    model = next(m for m in settings.all_settings() if variable in {m.env_name(f) for f in m.model_fields})
    with pytest.raises(SettingsError, match=re.escape(f"{variable}={value!r}")) as info:
        model()
    assert problem in str(info.value)


def test_an_unknown_keyword_is_refused():
    with pytest.raises(SettingsError, match=r"unknown EpisodeConfig setting\(s\) \['max_turn'\]"):
        EpisodeConfig(max_turn=3)


def test_current_is_shared_until_the_environment_changes(clean_env):
    first = EpisodeConfig.current()
    assert EpisodeConfig.current() is first and first.max_turns is None
    clean_env.setenv("TAU2_MAX_TURNS", "5")
    assert EpisodeConfig.current().max_turns == 5
    clean_env.setenv("OPENAI_API_KEY", "sk-one")
    clean_env.setenv("TAU2_USER_KIND", "llm")
    clean_env.setenv("TAU2_USER_MODEL", "m")
    clean_env.setenv("TAU2_USER_BASE_URL", "http://u/v1")
    assert UserSimConfig.current().secret() == "sk-one"
    clean_env.setenv("OPENAI_API_KEY", "sk-two")  # the key's fallback variable is watched too
    assert UserSimConfig.current().secret() == "sk-two"
