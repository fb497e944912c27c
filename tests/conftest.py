"""Session fixtures shared by the test files: the real SmolLM2-135M-Instruct folder, its tokenizer, real CPU servers.

- `smollm2_model_dir`: the converted HF folder (examples/prepare_cpu_model.py; ~30 s once, then cached in .cache/).
- `smollm2_tokenizer`: its tokenizer with the tool chat template; cheap once the folder exists, fine for fast tests.
- `cpu_policy_server`: base URL ("http://127.0.0.1:PORT") of scripts/cpu_policy_server.py serving that folder,
  started once per session. Only slow tests may use it.
- `cpu_policy_server_factory`: starts extra servers with their own flags (fault injection), stopped after the test.
- `free_port()`: a TCP port free on 127.0.0.1 right now.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from examples.prepare_cpu_model import prepare_cpu_model
from rollout.token_record import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]

SERVER_SCRIPT = ROOT / "scripts" / "cpu_policy_server.py"
SERVER_READY_TIMEOUT_S = float(os.environ.get("CPU_SERVER_READY_TIMEOUT_S", "180"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_json(url: str, body: Any = None, timeout: float = 300.0) -> tuple[int, Any]:
    """GET (body None) or POST JSON; returns (status, parsed JSON body) for 2xx and error answers alike."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


class CpuServer:
    """A running scripts/cpu_policy_server.py subprocess (own process group, output in a log file)."""

    def __init__(self, model_dir: Path, log_path: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [sys.executable, str(SERVER_SCRIPT), "--model", str(model_dir), "--host", "127.0.0.1"]
        command += ["--port", str(self.port), *extra_args]
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float = SERVER_READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"cpu_policy_server exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            time.sleep(0.25)
        raise RuntimeError(f"cpu_policy_server not healthy after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL to the whole group if it does not exit in time; returns the exit code."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


@contextlib.contextmanager
def running_cpu_server(model_dir: Path, log_path: Path, *extra_args: str) -> Iterator[CpuServer]:
    server = CpuServer(model_dir, log_path, extra_args)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


# Fixtures that run the model: only slow tests may use them, so `-m "not slow"` stays fast.
MODEL_FIXTURES = {"cpu_policy_server", "cpu_policy_server_factory"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    misuse = [
        item.nodeid
        for item in items
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("slow") is None
    ]
    if misuse:
        raise pytest.UsageError(f"tests using {sorted(MODEL_FIXTURES)} must be marked @pytest.mark.slow: {misuse}")


@pytest.fixture(scope="session")
def tok() -> Any:
    """SmolLM2-135M-Instruct's tokenizer with the recipe's tool template (engine_helpers.real_tokenizer)."""
    from tests.engine_helpers import real_tokenizer

    return real_tokenizer()


@pytest.fixture(scope="session")
def train_tasks() -> list[Any]:
    """tau2's telecom train tasks (the store loads them once per process)."""
    from rollout.task_store import get_task_store

    return get_task_store().tasks("telecom", "train")


@pytest.fixture(scope="session")
def smollm2_model_dir() -> Path:
    return prepare_cpu_model()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_model_dir: Path) -> Any:
    return load_tokenizer(smollm2_model_dir)


@pytest.fixture(scope="session")
def cpu_policy_server(smollm2_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log_path = tmp_path_factory.mktemp("cpu_policy_server") / "server.log"
    with running_cpu_server(smollm2_model_dir, log_path) as server:
        yield server.url


@pytest.fixture
def cpu_policy_server_factory(smollm2_model_dir: Path, tmp_path: Path) -> Iterator[Callable[..., CpuServer]]:
    """`start(*extra_args)` -> a ready CpuServer; every server started is stopped when the test ends."""
    servers: list[CpuServer] = []

    def start(*extra_args: str) -> CpuServer:
        server = CpuServer(smollm2_model_dir, tmp_path / f"server{len(servers)}.log", extra_args)
        servers.append(server)
        server.wait_ready()
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()
