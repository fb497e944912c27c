"""The README's main job, scripts/cpu_dry_run.sh, run for real (installed packages reused) so it can never rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "cpu_dry_run.sh"


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {
        **os.environ,
        "SKIP_INSTALL": "1",
        "VENV": sys.prefix,
        "OUT_DIR": str(tmp_path / "out"),
        "PORT": str(free_port()),
        **env,
    }
    return subprocess.run(["bash", str(SCRIPT)], env=environ, capture_output=True, text=True, timeout=1500)


def test_dry_run_flag_prints_every_stage_and_runs_nothing(tmp_path):
    out = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"],
        env={**os.environ, "OUT_DIR": str(tmp_path / "out")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    for stage in ("install", "data", "model", "server", "rollout", "sft", "eval"):
        assert f"[{stage}]" in out.stdout
    for command in (
        "tau2_mock.py",
        "cpu_policy_server.py",
        "cpu_rollout_batch.py",
        "generate_sft_traces.py",
        "check_sft_data.py",
        "evaluate_tau2.py",
    ):
        assert command in out.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    result = _run(tmp_path, NUM_PROMPTS="1", N_SAMPLES="2", EVAL_TASKS="1", GOLD_TASKS="2", MAX_TURNS="2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "DRY RUN COMPLETE" in result.stdout
    out = tmp_path / "out"
    samples = [json.loads(line) for line in (out / "rollout_batch.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all(not s["problems"] for s in samples)
    assert {s["group_index"] for s in samples} == {0}
    assert all(s["trained_tokens"] > 0 for s in samples)
    assert len((out / "sft_gold.jsonl").read_text().splitlines()) == 2
    results = json.loads((out / "eval" / "results.json").read_text())
    assert {"pass_at_1", "avg_reward", "avg_partial_score", "results"} <= set(results)
    assert (out / "eval" / "results.md").exists() and (out / "eval" / "results.png").exists()


@pytest.mark.slow
def test_dry_run_fails_loudly_with_the_stage_named(tmp_path):
    result = _run(tmp_path, TAU2_USER_KIND="no-such-user", NUM_PROMPTS="1", N_SAMPLES="1")
    assert result.returncode != 0
    assert "DRY RUN FAILED at stage [rollout]" in result.stderr
    assert "DRY RUN COMPLETE" not in result.stdout
