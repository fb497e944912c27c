"""eval/serving.py: a server the evaluator starts is always stopped (or adopted by the next run and stopped), even
when the evaluator is killed with SIGKILL, and the log says which; an evaluation that cannot reach or start a server
leaves nothing behind.

The servers are small HTTP processes answering /health (a real process tree, real signals); the slow test at the end
runs the evaluator with the real CPU policy server. Waits for a process to go have generous bounds and assert only
the outcome, never how long it took."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from eval import serving
from eval.evaluate_tau2 import main as evaluate_main
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "eval" / "evaluate_tau2.py"

# A policy-server stand-in: answers /health, reports its pid; with "stubborn" it ignores SIGTERM (a server that hangs
# in shutdown), so only SIGKILL stops it.
HEALTH_SERVER = """
import http.server, os, signal, sys
if sys.argv[2] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("SERVER-PID", os.getpid(), flush=True)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""

# An evaluator stand-in: starts the server through policy_server, says so, then waits to be killed.
OWNER = """
import sys, time
from eval import serving
spec = serving.ServerSpec.model_validate_json(sys.argv[1])
with serving.policy_server(spec, [sys.executable, "-c", sys.argv[2], str(spec.port), sys.argv[3]]) as server:
    print("UP", server.pid, flush=True)
    time.sleep(3600)
"""

GONE_WITHIN_S = 60.0  # a bound on waiting, not a measurement: a signalled process normally goes in milliseconds


def _wait_gone(pid: int, bound_s: float = GONE_WITHIN_S) -> bool:
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        if not serving.process_alive(pid):
            return True
        time.sleep(0.05)
    return not serving.process_alive(pid)


@pytest.fixture
def spec(tmp_path) -> serving.ServerSpec:
    return serving.ServerSpec(
        checkpoint="/models/ckpt",
        port=free_port(),
        launcher="cpu",
        log_path=str(tmp_path / "results.server.log"),
        owner_file=str(tmp_path / "results.server.pid"),
        ready_timeout_s=120,
        stop_grace_s=1,
    )


@pytest.fixture
def cleanup() -> Iterator[list[int]]:
    """Process groups to SIGKILL after the test, whatever happened."""
    groups: list[int] = []
    yield groups
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _kill_owner_after_start(spec: serving.ServerSpec, mode: str, cleanup: list[int]) -> int:
    """Run an owner that starts a server, SIGKILL the owner once the server answers; returns the server's pid."""
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, spec.model_dump_json(), HEALTH_SERVER, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    cleanup.append(owner.pid)
    line = owner.stdout.readline()
    assert line.startswith("UP "), owner.stderr.read()
    server_pid = int(line.split()[1])
    cleanup.append(server_pid)
    assert serving.is_healthy(spec.url)
    record = json.loads(Path(spec.owner_file).read_text())
    assert record["pid"] == server_pid and record["owner_pid"] == owner.pid and record["url"] == spec.url
    owner.kill()  # SIGKILL: no clean-up code of the owner runs
    owner.wait()
    return server_pid


def test_owner_killed_with_sigkill_takes_its_server_down(spec, cleanup):
    server_pid = _kill_owner_after_start(spec, "plain", cleanup)
    assert _wait_gone(server_pid), "the server outlived the evaluator that started it"
    assert not serving.is_healthy(spec.url)

    # The next run finds the record of a server that is gone: removed, said, and a fresh server started.
    messages: list[str] = []
    command = [sys.executable, "-c", HEALTH_SERVER, str(spec.port), "plain"]
    with serving.policy_server(spec, command, say=messages.append) as server:
        cleanup.append(server.pid)
        assert server.started and server.pid != server_pid
    assert messages[0] == f"an earlier run's cpu server (pid {server_pid}) is no longer running; record removed"
    assert messages[-1] == f"stopped the cpu server (pid {server.pid}) this run started"
    assert not Path(spec.owner_file).exists() and not serving.process_alive(server.pid)


def test_orphan_that_survived_is_adopted_and_stopped(spec, cleanup):
    server_pid = _kill_owner_after_start(spec, "stubborn", cleanup)  # ignores the SIGTERM its owner's death sends
    assert serving.process_alive(server_pid) and serving.is_healthy(spec.url)

    messages: list[str] = []
    with serving.policy_server(spec, ["false"], say=messages.append) as server:
        assert server.adopted and not server.started and server.pid == server_pid
        assert serving.is_healthy(server.url)  # the evaluation uses it
    assert messages == [
        f"adopting the cpu server (pid {server_pid}) that an earlier run started at {spec.url} and did not stop; "
        "it is stopped at the end of this run",
        f"stopped the adopted cpu server (pid {server_pid})",
    ]
    assert _wait_gone(server_pid) and not Path(spec.owner_file).exists()


def test_orphan_serving_another_checkpoint_is_stopped_before_starting(spec, cleanup):
    server_pid = _kill_owner_after_start(spec, "stubborn", cleanup)
    other = spec.model_copy(update={"checkpoint": "/models/other"})
    messages: list[str] = []
    command = [sys.executable, "-c", HEALTH_SERVER, str(spec.port), "plain"]
    with serving.policy_server(other, command, say=messages.append) as server:
        cleanup.append(server.pid)
        assert server.started and server.pid != server_pid
        assert not serving.process_alive(server_pid)
        assert json.loads(Path(spec.owner_file).read_text())["checkpoint"] == "/models/other"
    assert messages[0] == (
        f"stopped the cpu server (pid {server_pid}) an earlier run left behind (it serves /models/ckpt at {spec.url})"
    )


def test_server_of_a_running_owner_is_neither_adopted_nor_stopped(spec, cleanup):
    messages: list[str] = []
    command = [sys.executable, "-c", HEALTH_SERVER, str(spec.port), "plain"]
    with serving.policy_server(spec, command, say=messages.append) as first:
        cleanup.append(first.pid)
        with serving.policy_server(spec, command, say=messages.append) as second:  # same owner file, same process
            assert not second.started and not second.adopted
        assert serving.process_alive(first.pid) and Path(spec.owner_file).exists()
    assert not serving.process_alive(first.pid)
    assert "belongs to a running process" in messages[0]
    assert "this run did not start it and leaves it running" in messages[1]


def test_foreign_server_is_used_and_left_running(spec, cleanup):
    foreign = subprocess.Popen(
        [sys.executable, "-c", HEALTH_SERVER, str(spec.port), "plain"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    cleanup.append(foreign.pid)
    assert foreign.stdout.readline().startswith("SERVER-PID")
    deadline = time.monotonic() + GONE_WITHIN_S
    while not serving.is_healthy(spec.url) and time.monotonic() < deadline:
        time.sleep(0.05)
    messages: list[str] = []
    with serving.policy_server(spec, ["false"], say=messages.append) as server:
        assert not server.started and not server.adopted
    assert messages == [
        f"using the server already answering at {spec.url}; this run did not start it and leaves it running"
    ]
    assert foreign.poll() is None and serving.is_healthy(spec.url)
    assert not Path(spec.owner_file).exists()


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None, reason="needs a Python without sglang")
def test_dead_port_without_sglang_leaves_nothing(tmp_path, smollm2_model_dir, capsys):
    out = tmp_path / "out"
    port = free_port()
    argv = [
        "--checkpoint",
        str(smollm2_model_dir),
        "--sglang-port",
        str(port),
        "--output-path",
        str(out / "results.json"),
        "--domain",
        "telecom",
        "--task-split",
        "test",
        "--num-tasks",
        "1",
        "--user-kind",
        "scripted",
        "--no-progress",
    ]
    assert evaluate_main(argv) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"evaluate_tau2.py: error: no policy server answers at http://127.0.0.1:{port} and none can be started "
        "here: sglang is not installed in this Python; run inside slime's container, pass --sglang-url of a "
        "running server, or use --server-launcher cpu (CPU stand-in for small models)"
    ]
    assert sorted(p.name for p in out.iterdir()) == []  # no empty episodes file, no summary, no server files


@pytest.mark.slow
def test_evaluator_killed_with_sigkill_leaves_no_cpu_server(tmp_path, smollm2_model_dir, cleanup):
    """The user's path: the evaluator starts the real CPU server, is killed with -9; the server goes with it and the
    rerun starts its own, finishes and stops it."""
    output = tmp_path / "results.json"
    port = free_port()
    command = [
        sys.executable,
        str(SCRIPT),
        "--checkpoint",
        str(smollm2_model_dir),
        "--server-launcher",
        "cpu",
        "--server-args",
        "--threads 1",
        "--sglang-port",
        str(port),
        "--output-path",
        str(output),
        "--domain",
        "telecom",
        "--task-split",
        "test",
        "--num-tasks",
        "1",
        "--user-kind",
        "scripted",
        "--policy-variant",
        "compact",
        "--max-response-tokens",
        "16",
        "--no-progress",
    ]
    owner_file = output.with_suffix(".server.pid")
    evaluator = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    cleanup.append(evaluator.pid)
    deadline = time.monotonic() + 600
    while not owner_file.exists() and evaluator.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert owner_file.exists(), evaluator.stderr.read() if evaluator.poll() is not None else "no server started"
    server_pid = json.loads(owner_file.read_text())["pid"]
    cleanup.append(server_pid)
    evaluator.kill()
    evaluator.wait()
    assert _wait_gone(server_pid), "the CPU server outlived the evaluator killed with SIGKILL"

    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"an earlier run's cpu server (pid {server_pid}) is no longer running; record removed" in done.stderr
    stopped = [line for line in done.stderr.splitlines() if "this run started" in line]
    assert len(stopped) == 1 and stopped[0].startswith("evaluate_tau2.py: stopped the cpu server (pid ")
    assert json.loads(output.read_text())["recorded_episodes"] == 1
    assert not owner_file.exists() and not serving.is_healthy(f"http://127.0.0.1:{port}")
