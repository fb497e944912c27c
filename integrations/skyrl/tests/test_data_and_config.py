"""The data conversion (tau2_dataset.py), the SkyRL training config (tau2_telecom.yaml through SkyRL's own config
classes and checks) and the launcher's --dry-run."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from integrations.skyrl.tests.support import ROOT, skip_reason

if reason := skip_reason():
    pytest.skip(reason, allow_module_level=True)

from skyrl.train.dataset import PromptDataset

from integrations.skyrl.config import load_config
from integrations.skyrl.env import Tau2Env, Tau2EnvConfig
from integrations.skyrl.tau2_dataset import skyrl_rows
from rollout.task_store import get_task_store

LAUNCHER = ROOT / "integrations" / "skyrl" / "run_tau2_telecom.sh"


def test_dataset_follows_the_recipe_split_and_skyrls_format(tok: Any, dataset_dir: Path, telecom_view: Any) -> None:
    store = get_task_store()
    train = PromptDataset([str(dataset_dir / "train.parquet")], tok, max_prompt_length=16384, num_workers=1)
    test = PromptDataset([str(dataset_dir / "validation.parquet")], tok, max_prompt_length=16384, num_workers=1)
    train_rows = [train[i] for i in range(len(train))]
    test_rows = [test[i] for i in range(len(test))]
    train_ids = [extras["task_id"] for _, _, extras, _ in train_rows]
    test_ids = [extras["task_id"] for _, _, extras, _ in test_rows]
    assert train_ids == store.task_ids("telecom", "train") and len(train_ids) == 74
    assert test_ids == store.task_ids("telecom", "test") and len(test_ids) == 40
    assert not set(train_ids) & set(test_ids)
    opening = [{"role": "system", "content": telecom_view.system_prompt}, *telecom_view.opening]
    for prompt, env_class, extras, _ in train_rows + test_rows:
        assert env_class == "tau2_telecom" and extras["domain"] == "telecom"
        assert prompt == opening
        task = store.get("telecom", extras["task_id"])
        assert type(task).model_validate(json.loads(extras["task"])) == task
    assert json.loads((dataset_dir / "tools.json").read_text()) == telecom_view.tools


def test_full_train_set_never_holds_a_test_task() -> None:
    rows, _ = skyrl_rows("telecom", "train", "full", solo_mode=False)
    test_ids = set(get_task_store().task_ids("telecom", "test"))
    assert len(rows) > 2000 and not {row["task_id"] for row in rows} & test_ids


def test_env_plays_the_row_it_is_given(dataset_dir: Path, tok: Any) -> None:
    """A row's prompt is the engine's opening; init adds the user's first message, the episode runs from the row's
    embedded task."""
    data = PromptDataset([str(dataset_dir / "validation.parquet")], tok, max_prompt_length=16384, num_workers=1)
    prompt, _, extras, _ = data[0]
    env = Tau2Env(env_config=None, extras=extras, domain="telecom")
    first, info = env.init(prompt)
    assert first[: len(prompt)] == prompt and first[-1]["role"] == "user" and info["task_id"] == extras["task_id"]
    env.close()  # ends the episode (judged as truncated) instead of leaving it waiting
    assert env.metrics["truncated"] == 1.0


def test_env_user_settings_are_checked_and_keep_the_key_out(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TAU2_USER_KIND", "TAU2_USER_MODEL", "TAU2_USER_BASE_URL", "TAU2_USER_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="TAU2_USER_MODEL"):
        Tau2EnvConfig.coerce({"user_kind": "llm", "user_base_url": "http://127.0.0.1:1/v1"}).user_config()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-value")
    settings = Tau2EnvConfig.coerce({"user_kind": "llm", "user_model": "m", "user_base_url": "http://127.0.0.1:1/v1"})
    user = settings.user_config()
    assert (user.kind, user.model, user.secret()) == ("llm", "m", "sk-secret-value")
    assert "sk-secret-value" not in repr(user) + repr(settings) + json.dumps(user.public_dict())


def test_env_rejects_bad_settings_and_rows() -> None:
    with pytest.raises(ValueError, match="valid"):
        Tau2EnvConfig.coerce({"rewards": "shaped"})
    with pytest.raises(ValueError, match="shaped"):
        Tau2EnvConfig.coerce({"reward": "dense"})
    task = get_task_store().tasks("telecom", "test")[0]
    with pytest.raises(ValueError, match="env_class"):
        Tau2Env(extras={"task_id": task.id, "domain": "airline"}, domain="telecom")
    with pytest.raises(ValueError, match=r"tau2_dataset\.py"):
        Tau2Env(extras={"domain": "telecom"}, domain="telecom")


def test_training_config_passes_skyrls_own_checks(telecom_view: Any) -> None:
    from skyrl.train.utils import validate_cfg

    cfg = load_config([])
    validate_cfg(cfg)
    assert cfg.trainer.policy.model.path == "Qwen/Qwen3-4B-Instruct-2507"
    assert cfg.environment.env_class == "tau2_telecom"
    assert cfg.generator.chat_template_kwargs["tools"] == telecom_view.tools
    assert cfg.generator.batched is False and cfg.generator.use_conversation_multi_turn is True
    env = cfg.environment.skyrl_gym.tau2_telecom
    assert isinstance(env, Tau2EnvConfig) and env.reward == "shaped" and env.max_steps == 200
    workers = cfg.environment.skyrl_gym.max_env_workers
    assert workers >= cfg.trainer.train_batch_size * cfg.generator.n_samples_per_prompt
    assert workers >= cfg.trainer.eval_batch_size * cfg.generator.eval_n_samples_per_prompt

    tuned = load_config(["environment.skyrl_gym.tau2_telecom.reward=tau2", "trainer.algorithm.eps_clip_high=0.3"])
    assert tuned.environment.skyrl_gym.tau2_telecom.reward == "tau2" and tuned.trainer.algorithm.eps_clip_high == 0.3


def test_training_config_rejects_what_would_mislead() -> None:
    with pytest.raises(ValueError, match="Invalid fields"):  # SkyRL's own key check
        load_config(["environment.skyrl_gym.tau2_telecom.rewards=tau2"])
    with pytest.raises(SystemExit, match="not a tau2 environment"):
        load_config(["environment.env_class=gsm8k"])
    with pytest.raises(SystemExit, match="tool schemas"):
        load_config(['generator.chat_template_kwargs={"tools": []}'])


def _launcher(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TAU2_")}
    environ.update({"PYTHON": sys.executable, "DATA_DIR": str(tmp_path / "data"), **env})
    return subprocess.run(
        ["bash", str(LAUNCHER), "--dry-run", "--", "trainer.epochs=3"],
        capture_output=True,
        text=True,
        env=environ,
        timeout=120,
    )


def test_launcher_dry_run_prints_commands_the_config_accepts(tmp_path: Path) -> None:
    done = _launcher(tmp_path, NUM_GPUS="4", TRAIN_BATCH_SIZE="8", N_SAMPLES="8", REWARD="tau2", MAX_TURNS="12")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0] == f"cd {ROOT}"
    assert shlex.split(lines[1])[1:] == [
        "integrations/skyrl/tau2_dataset.py",
        "--output_dir",
        str(tmp_path / "data"),
        "--domain",
        "telecom",
        "--train-set",
        "train",
    ]
    command = shlex.split(lines[2])
    assert command[:2] == ["env", f"PYTHONPATH={ROOT}"] or command[1].startswith(f"PYTHONPATH={ROOT}:")
    start = command.index("integrations.skyrl.main_tau2") + 1
    cfg = load_config(command[start:])
    assert cfg.data.train_data == [str(tmp_path / "data" / "train.parquet")]
    assert cfg.data.val_data == [str(tmp_path / "data" / "validation.parquet")]
    assert cfg.trainer.placement.policy_num_gpus_per_node == cfg.generator.inference_engine.num_engines == 4
    assert (cfg.trainer.train_batch_size, cfg.generator.n_samples_per_prompt, cfg.generator.max_turns) == (8, 8, 12)
    assert cfg.environment.skyrl_gym.tau2_telecom.reward == "tau2" and cfg.trainer.epochs == 3
    assert cfg.environment.skyrl_gym.max_env_workers >= 64
    assert "scripted customer" in done.stderr  # no user simulator configured: said, not hidden


def test_launcher_rejects_bad_knobs(tmp_path: Path) -> None:
    done = _launcher(tmp_path, REWARD="dense")
    assert done.returncode != 0 and "REWARD must be shaped or tau2" in done.stderr
    done = _launcher(tmp_path, NUM_GPUS="0")
    assert done.returncode != 0 and "NUM_GPUS" in done.stderr


def test_solo_rows_hold_only_tasks_with_a_ticket() -> None:
    rows, view = skyrl_rows("telecom", "test", "train", solo_mode=True)
    tasks = get_task_store().tasks("telecom", "test")
    assert [r["task_id"] for r in rows] == [t.id for t in tasks if t.ticket]
    assert view.tools[-1]["function"]["name"] == "done"
    assert all(r["prompt"][0]["role"] == "system" and len(r["prompt"]) == 1 for r in rows)
    assert all(task.ticket in r["prompt"][0]["content"] for task, r in zip([t for t in tasks if t.ticket], rows))


def test_an_abandoned_env_does_not_leave_its_episode_waiting(dataset_dir: Path, tok: Any) -> None:
    """SkyRL closes no env whose agent_loop raised; once such an env is collected, its episode still ends."""
    import gc

    from integrations.skyrl.bridge import EpisodeEnd

    data = PromptDataset([str(dataset_dir / "validation.parquet")], tok, max_prompt_length=16384, num_workers=1)
    prompt, _, extras, _ = data[1]
    env = Tau2Env(extras=extras, domain="telecom")
    env.init(prompt)
    bridge = env.bridge
    del env
    gc.collect()
    bridge._future.result(timeout=120)  # the engine's coroutine finished (a hang fails here)
    end = bridge._events.get(timeout=5)
    assert isinstance(end, EpisodeEnd) and end.result.termination_reason == "max_tokens"
