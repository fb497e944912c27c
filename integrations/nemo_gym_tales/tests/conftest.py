"""Fixtures: the TALES resources server as a real subprocess on loopback, and a plain HTTP client per session.

- `server`: app.py with walkthroughs exposed and TextWorld games generated into a fresh folder (once per run).
- `small_server`: app.py with its shipped config defaults except max_active_games=1 (walkthroughs not served).
- `Client`: one httpx client = one cookie jar = one NeMo Gym session.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

HERE = Path(__file__).resolve().parents[1]
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from episodes import LocalServer  # noqa: E402

HAS_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="needs Java (apt-get install default-jre)")
DUMMY_PARAMS = {"input": [{"role": "user", "content": "play"}]}


class Client:
    """One session against the server (its own cookie jar), with the row fields it plays."""

    def __init__(self, url: str, **fields: Any) -> None:
        self.http = httpx.Client(base_url=url, timeout=300)
        self.fields = fields

    def row(self, **extra: Any) -> dict[str, Any]:
        return {"responses_create_params": DUMMY_PARAMS, **self.fields, **extra}

    def post(self, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        return self.http.post(path, json=body or {})

    def seed(self, **extra: Any) -> dict[str, Any]:
        response = self.post("/seed_session", self.row(**extra))
        assert response.status_code == 200, response.text
        return response.json()

    def command(self, command: str) -> dict[str, Any]:
        response = self.post("/execute_command", {"command": command})
        assert response.status_code == 200, response.text
        return response.json()

    def walkthrough(self) -> list[str]:
        response = self.post("/walkthrough")
        assert response.status_code == 200, response.text
        return response.json()["walkthrough"]

    def verify(self, output: list[dict[str, Any]] | None = None, **extra: Any) -> httpx.Response:
        from episodes import response_object

        return self.post("/verify", self.row(**extra) | {"response": response_object(output or [], "test")})

    def close(self) -> None:
        self.http.close()


def _start(log: Path, *args: str) -> Iterator[str]:
    server = LocalServer(log, *args).wait_ready()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("tales")
    os.environ.setdefault("TALES_TEXTWORLD_DIR", str(root / "textworld_games"))
    yield from _start(root / "server.log", "--expose-walkthroughs")


@pytest.fixture(scope="session")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _start(tmp_path_factory.mktemp("tales_small") / "server.log", "--max-active-games", "1")


@pytest.fixture
def client_factory(server: str) -> Iterator[Any]:
    clients: list[Client] = []

    def make(url: str | None = None, **fields: Any) -> Client:
        client = Client(url or server, **fields)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.post("/close_session")
        client.close()
