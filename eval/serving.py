"""The policy server for an evaluation: reuse one that answers, or start one for the checkpoint and stop it after.

    with policy_server(ServerSpec(checkpoint=..., port=30000, launcher="sglang")) as server:
        server.url  # http://127.0.0.1:30000

`launcher="sglang"` runs `python -m sglang.launch_server --model-path CKPT --port P --host 127.0.0.1 [extra args]`;
`launcher="cpu"` runs `scripts/cpu_policy_server.py --model CKPT --port P --host 127.0.0.1 [extra args]` (the CPU
stand-in with the same wire protocol: tests and the CPU dry run take this same path). The server runs in its own
process group with its output in a log file; readiness is `GET /health` answering 200. If the process exits before
that, or the timeout passes, `ServerStartError` carries the last log lines. On leaving the context (normally, on an
error or on Ctrl-C) the whole process group gets SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

REPO_ROOT = Path(__file__).resolve().parents[1]
CPU_SERVER_SCRIPT = REPO_ROOT / "scripts" / "cpu_policy_server.py"
Launcher = Literal["sglang", "cpu"]
LOG_TAIL_LINES = 25


class ServerStartError(RuntimeError):
    """The policy server could not be started or did not become healthy (the message holds its last log lines)."""


class ServerSpec(BaseModel):
    """How to start a policy server for a checkpoint."""

    checkpoint: str
    port: int = Field(default=30000, gt=0, lt=65536)
    host: str = "127.0.0.1"
    launcher: Launcher = "sglang"
    extra_args: list[str] = Field(default_factory=list)
    ready_timeout_s: float = Field(default=900.0, gt=0)
    log_path: str | None = None
    stop_grace_s: float = Field(default=30.0, ge=0)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class RunningServer(BaseModel):
    """A server the evaluation talks to; `started` is False when an already running one was reused."""

    url: str
    started: bool = False
    pid: int | None = None
    log_path: str | None = None


def split_server_args(text: str | None) -> list[str]:
    """`--server-args "--tp 2 --mem-fraction-static 0.8"` -> a list, shell-quoting respected."""
    return shlex.split(text) if text else []


def server_command(spec: ServerSpec) -> list[str]:
    """The command that starts the server for `spec`."""
    if spec.launcher == "sglang":
        base = [sys.executable, "-m", "sglang.launch_server", "--model-path", spec.checkpoint]
    elif spec.launcher == "cpu":
        base = [sys.executable, str(CPU_SERVER_SCRIPT), "--model", spec.checkpoint]
    else:
        raise ValueError(f"unknown server launcher '{spec.launcher}'; valid: sglang, cpu")
    return [*base, "--port", str(spec.port), "--host", spec.host, *spec.extra_args]


def launcher_problem(launcher: Launcher) -> str | None:
    """Why this launcher cannot run here (None when it can)."""
    if launcher == "sglang" and importlib.util.find_spec("sglang") is None:
        return (
            "sglang is not installed in this Python; run inside slime's container, pass --sglang-url of a running "
            "server, or use --server-launcher cpu (CPU stand-in for small models)"
        )
    if launcher == "cpu" and not CPU_SERVER_SCRIPT.is_file():
        return f"{CPU_SERVER_SCRIPT} is missing; the recipe checkout is incomplete"
    return None


def http_get_json(url: str, timeout_s: float = 5.0) -> tuple[int, Any]:
    """(status, parsed JSON or None); status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            body = resp.read()
            status = resp.status
    except urllib.error.HTTPError as err:
        return err.code, None
    except (urllib.error.URLError, OSError, ValueError):
        return 0, None
    try:
        return status, json.loads(body) if body else None
    except ValueError:
        return status, None


def is_healthy(url: str, timeout_s: float = 5.0) -> bool:
    return http_get_json(f"{url.rstrip('/')}/health", timeout_s)[0] == 200


def served_model_info(url: str) -> dict[str, Any]:
    """What the server says it serves: model path (sglang /get_model_info, vLLM /v1/models `root`), served name and
    context length (`max_model_len`, when /v1/models reports it). Missing entries are left out."""
    root = url.rstrip("/")
    info: dict[str, Any] = {}
    status, data = http_get_json(f"{root}/get_model_info")
    if status == 200 and isinstance(data, dict) and data.get("model_path"):
        info["model_path"] = str(data["model_path"])
    status, data = http_get_json(f"{root}/v1/models")
    cards = data.get("data") if status == 200 and isinstance(data, dict) else None
    if isinstance(cards, list) and cards and isinstance(cards[0], dict):
        card = cards[0]
        if card.get("id"):
            info["served_model_name"] = str(card["id"])
        if card.get("root") and "model_path" not in info:
            info["model_path"] = str(card["root"])
        if isinstance(card.get("max_model_len"), int):
            info["max_model_len"] = card["max_model_len"]
    return info


def same_model(reported: str, checkpoint: str) -> bool:
    """Whether a server's reported model path is the checkpoint: same real path when both exist here, else the
    same final folder name (a server in another container reports its own mount point)."""
    a, b = Path(reported.rstrip("/")), Path(checkpoint.rstrip("/"))
    if a.exists() and b.exists():
        return a.resolve() == b.resolve()
    return a.name == b.name


def log_tail(path: str | Path | None, lines: int = LOG_TAIL_LINES) -> str:
    if path is None:
        return ""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def start_server(spec: ServerSpec, command: list[str] | None = None) -> subprocess.Popen[bytes]:
    """Start the server in its own process group, output appended to spec.log_path (or discarded)."""
    cmd = command or server_command(spec)
    log = open(spec.log_path, "ab") if spec.log_path else subprocess.DEVNULL
    try:
        if spec.log_path:
            log.write(f"\n$ {shlex.join(cmd)}\n".encode())  # type: ignore[union-attr]
            log.flush()  # type: ignore[union-attr]
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    except OSError as err:
        raise ServerStartError(f"cannot run {cmd[0]}: {err}") from None
    finally:
        if spec.log_path:
            log.close()  # type: ignore[union-attr]  (the child keeps its own descriptor)


def wait_until_healthy(process: subprocess.Popen[bytes], spec: ServerSpec, poll_s: float = 1.0) -> None:
    """Poll /health until 200; raise ServerStartError if the process exits or the timeout passes."""
    deadline = time.monotonic() + spec.ready_timeout_s
    while True:
        if is_healthy(spec.url, timeout_s=2.0):
            return
        code = process.poll()
        if code is not None:
            tail = log_tail(spec.log_path)
            where = f" (log: {spec.log_path})" if spec.log_path else ""
            raise ServerStartError(
                f"the {spec.launcher} server exited with code {code} before answering /health{where}"
                + (f"; last lines:\n{tail}" if tail else "")
            )
        if time.monotonic() >= deadline:
            tail = log_tail(spec.log_path)
            raise ServerStartError(
                f"the {spec.launcher} server (pid {process.pid}) did not answer {spec.url}/health within "
                f"{spec.ready_timeout_s:g} s" + (f"; last lines:\n{tail}" if tail else "")
            )
        time.sleep(poll_s)


def stop_server(process: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM the server's process group, SIGKILL it after `grace_s`; safe to call twice."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@contextlib.contextmanager
def policy_server(spec: ServerSpec, command: list[str] | None = None) -> Iterator[RunningServer]:
    """Reuse a healthy server at spec.url, else start one and stop it on exit (whatever the exit)."""
    if is_healthy(spec.url):
        yield RunningServer(url=spec.url, started=False)
        return
    process = start_server(spec, command)
    # SIGTERM to this process (a scheduler, `kill`) must also run the clean-up below.
    previous = signal.getsignal(signal.SIGTERM)
    restore = False
    if previous in (signal.SIG_DFL, None) and _in_main_thread():
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        restore = True
    try:
        wait_until_healthy(process, spec)
        yield RunningServer(url=spec.url, started=True, pid=process.pid, log_path=spec.log_path)
    finally:
        stop_server(process, spec.stop_grace_s)
        if restore:
            signal.signal(signal.SIGTERM, previous)


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
