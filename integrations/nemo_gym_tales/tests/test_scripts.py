"""The scripts end to end: walkthrough rollouts (resume, example rows), the shipped example rows, a real model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import HAS_JAVA, HERE, Client
from episodes import LocalServer, read_jsonl, row_id

REPO = HERE.parents[1]


def run_script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=HERE)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_walkthrough_script_writes_rollouts_examples_and_resumes(server, tmp_path):
    out, examples = tmp_path / "rollouts.jsonl", tmp_path / "example.jsonl"
    args = ["walkthrough_rollouts.py", "--server", server, "--frameworks", "textworld_express,textworld"]
    args += ["--tasks", "coin,coin_collector-level1", "--single-turn-steps", "all", "--out", str(out)]
    first = run_script(*args, "--example-out", str(examples))
    records = read_jsonl(out)
    assert {r["mode"] for r in records} == {"multi_turn", "single_turn"}
    assert all(r["reward"] == 1.0 and r["won"] for r in records if r["mode"] == "multi_turn"), records
    for task in ("coin", "coin_collector-level1"):  # single-turn: the game's score after each gold step
        steps = sorted((r for r in records if r["task"] == task and r["mode"] == "single_turn"), key=lambda r: r["id"])
        rewards = [r["reward"] for r in steps]
        assert rewards == sorted(rewards) and rewards[-1] == 1.0 and steps[-1]["won"], steps
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["all"]["episodes"] == len(records) and summary["all"]["errors"] == 0
    assert "mean_reward" not in first.stderr
    rows = read_jsonl(examples)
    assert rows and all(r["agent_ref"]["name"] == "nemo_gym_tales_simple_agent" for r in rows)

    again = run_script(*args)
    assert "skip textworld_express/coin/train/0/multi_turn (done)" in again.stdout
    assert len(read_jsonl(out)) == len(records)  # resumed: nothing played twice


def test_walkthrough_script_records_failures_and_goes_on(server, tmp_path):
    out = tmp_path / "rollouts.jsonl"
    args = ["walkthrough_rollouts.py", "--server", server, "--frameworks", "jericho,textworld_express"]
    result = subprocess.run(
        [sys.executable, *args, "--split", "test", "--tasks", "zork1,coin", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=HERE,
    )
    assert result.returncode == 1  # some episodes failed
    by_id = {r["id"]: r for r in read_jsonl(out)}
    assert "download" in by_id["jericho/zork1/test/0/multi_turn"]["error"]
    assert by_id["textworld_express/coin/test/0/multi_turn"]["reward"] == 1.0


def test_shipped_example_rows_seed_and_match_their_games(server):
    rows = read_jsonl(HERE / "data" / "example.jsonl")
    assert {r["mode"] for r in rows} == {"multi_turn", "single_turn"}
    for row in rows:
        if row["framework"] == "scienceworld" and not HAS_JAVA:
            continue
        client = Client(server)
        try:
            seeded = client.post("/seed_session", row).json()
            assert seeded["task_id"] == "/".join(row_id(row).split("/")[:4])
            if row["mode"] == "multi_turn":  # the prompt holds exactly the game's first observation
                assert row["responses_create_params"]["input"][1]["content"] == seeded["observation"].strip()
                assert [t["name"] for t in row["responses_create_params"]["tools"]] == ["execute_command"]
            else:
                assert seeded["steps_left"] == 100 - len(row["history"]) and not seeded["done"]
                assert row["responses_create_params"]["input"][1]["content"].endswith(">")
        finally:
            client.post("/close_session")
            client.http.close()


def recipe_python() -> str | None:
    for candidate in (os.environ.get("RECIPE_PYTHON"), str(REPO / ".venv" / "bin" / "python")):
        if candidate and Path(candidate).exists():
            probe = subprocess.run([candidate, "-c", "import torch, transformers, aiohttp"], capture_output=True)
            if probe.returncode == 0:
                return candidate
    return None


@pytest.mark.slow
def test_model_script_plays_rows_with_a_real_model_and_resumes(tmp_path):
    python = recipe_python()
    if python is None:
        pytest.skip("the recipe's environment (torch, transformers) is not built: set RECIPE_PYTHON or make .venv")
    prepared = subprocess.run(
        [python, str(REPO / "examples" / "prepare_cpu_model.py")], capture_output=True, text=True, cwd=REPO
    )
    if prepared.returncode != 0:
        pytest.skip(f"SmolLM2 model folder unavailable: {prepared.stderr[-500:]}")
    model_dir = prepared.stdout.strip().splitlines()[-1]
    policy = LocalServerCommand(
        tmp_path / "policy.log", python, REPO / "scripts" / "cpu_policy_server.py", "--model", model_dir
    )
    adapter = None
    try:
        policy.wait("/health")
        adapter = LocalServerCommand(
            tmp_path / "adapter.log",
            python,
            HERE / "chat_adapter.py",
            "--upstream",
            policy.url,
            "--model-dir",
            model_dir,
        )
        adapter.wait("/health")
        rows = tmp_path / "rows.jsonl"
        rows.write_text(
            "".join(
                json.dumps(r) + "\n"
                for r in read_jsonl(HERE / "data" / "example.jsonl")
                if r["framework"] != "scienceworld" or HAS_JAVA
            )
        )
        out = tmp_path / "model.jsonl"
        args = ["model_rollouts.py", "--base-url", adapter.url + "/v1", "--model", "smollm2-135m-instruct-tools"]
        args += ["--input", str(rows), "--out", str(out), "--max-steps", "2", "--max-tokens", "12", "--text-commands"]
        first = run_script(*args, timeout=900)
        records = read_jsonl(out)
        assert len(records) == len(read_jsonl(rows)) and not [r for r in records if "error" in r]
        assert all(0.0 <= r["reward"] <= 1.0 for r in records)
        assert all(r["commands"] for r in records if r["mode"] == "multi_turn")  # text replies were played
        assert "mean_reward" not in first.stderr and "all" in first.stdout
        again = run_script(*args)
        assert again.stdout.count("(done)") == len(records) and len(read_jsonl(out)) == len(records)
    finally:
        for process in (adapter, policy):
            if process is not None:
                process.stop()


class LocalServerCommand(LocalServer):
    """Any server script on a free port (the CPU policy server, the chat adapter), stopped like LocalServer."""

    def __init__(self, log_path: Path, python: str, script: Path, *args: str) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [python, str(script), *args, "--host", "127.0.0.1", "--port", str(self.port)]
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, path: str, timeout: float = 300) -> None:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_path.read_text()[-3000:]
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"{self.url} not ready:\n{self.log_path.read_text()[-3000:]}")
