"""Fixtures of the SkyRL integration tests: the real SmolLM2 tokenizer (the recipe's Qwen-layout tool template),
tau2's telecom tasks, the engine's view of them, and the dataset written by tau2_dataset.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tok() -> Any:
    from examples.prepare_cpu_model import prepare_cpu_model
    from rollout.token_record import load_tokenizer

    return load_tokenizer(prepare_cpu_model())


@pytest.fixture(scope="session")
def test_tasks() -> list[Any]:
    from rollout.task_store import get_task_store

    return get_task_store().tasks("telecom", "test")


@pytest.fixture(scope="session")
def telecom_view(test_tasks: list[Any]) -> Any:
    from rollout.engine import EpisodeConfig, prepare_episode

    return asyncio.run(prepare_episode(test_tasks[0], EpisodeConfig(domain="telecom"))).view


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """telecom train/validation parquet files from integrations/skyrl/tau2_dataset.py."""
    from integrations.skyrl.tau2_dataset import main

    out = tmp_path_factory.mktemp("tau2_skyrl_data")
    assert main(["--output_dir", str(out), "--domain", "telecom"]) == 0
    return out
