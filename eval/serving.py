"""The policy server for an evaluation: reuse one that answers, or start one for the checkpoint and stop it after.

    with policy_server(ServerSpec(checkpoint=..., port=30000, launcher="sglang", owner_file="run.server.pid")) as s:
        s.url  # http://127.0.0.1:30000

`launcher="sglang"` runs `python -m sglang.launch_server --model-path CKPT --port P --host 127.0.0.1 [extra args]`;
`launcher="cpu"` runs `scripts/cpu_policy_server.py --model CKPT --port P --host 127.0.0.1 [extra args]` (the CPU
stand-in with the same wire protocol: tests and the CPU dry run take this same path). The server runs in its own
process group with its output in a log file; readiness is `GET /health` answering 200. If the process exits before
that, or the timeout passes, `ServerStartError` carries the last log lines.

A server started here is always stopped, and every outcome is reported through `say`:
- on leaving the context (normally, on an error, on Ctrl-C or SIGTERM) its whole process group gets SIGTERM, then
  SIGKILL after a grace period;
- if this process is killed outright (SIGKILL, OOM killer), the server gets SIGTERM from the kernel (Linux
  parent-death signal), so it does not outlive its owner;
- `owner_file` (JSON: pid, process start time, URL, checkpoint, owner) records the server while it runs. A later run
  with the same owner file that finds the server still running adopts it when it answers and serves the same
  checkpoint (and stops it at the end), and otherwise stops it before starting its own. A record whose process is gone
  is removed. A server that answers on the port without a record of ours is used and left running.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
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
    owner_file: str | None = None  # where a started server is recorded, so that a later run can adopt or stop it

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class RunningServer(BaseModel):
    """A server the evaluation talks to. `started`: this run started it; `adopted`: an earlier run with the same owner
    file started it and was killed before stopping it (this run stops it). Neither: someone else's, left running."""

    url: str
    started: bool = False
    adopted: bool = False
    pid: int | None = None
    log_path: str | None = None


class ServerRecord(BaseModel):
    """The owner file's content: enough to recognise a server process after its owner died, and to stop it."""

    pid: int  # also the process group (the server is started in a session of its own)
    start_ticks: int | None = None  # the process's start time: a later process reusing the pid has another
    url: str
    launcher: str
    checkpoint: str
    command: list[str]
    owner_pid: int
    owner_start_ticks: int | None = None
    started_at: str


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


# ------------------------------------------------------------------------------------------- processes and owners


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat from the state field on (None without /proc or when the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start_ticks(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def process_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Whether `pid` runs (a zombie does not), and is the process that had `start_ticks` when that is known."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    fields = _stat_fields(pid)
    if fields is None:
        return not Path("/proc/self/stat").exists()  # without /proc, kill(0) is all there is
    if fields[0] == "Z":
        return False
    return start_ticks is None or int(fields[19]) == start_ticks


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group `pgid` in session `pgid`; [pgid] without /proc if it exists."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        # fields: state, ppid, pgrp, session, ...
        if fields and fields[0] != "Z" and int(fields[2]) == pgid and int(fields[3]) == pgid:
            members.append(int(entry.name))
    return members


def stop_group(pgid: int, grace_s: float = 30.0, poll_s: float = 0.2) -> bool:
    """SIGTERM a process group that is not our child, SIGKILL what is left after `grace_s`; True if it is gone."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
        if not group_members(pgid):
            return True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait_s
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(poll_s)
    return not group_members(pgid)


def read_record(path: str | Path | None) -> ServerRecord | None:
    if path is None:
        return None
    try:
        return ServerRecord.model_validate_json(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # unreadable or from another version: nothing to act on
        Path(path).unlink(missing_ok=True)
        return None


def write_record(path: str | Path, record: ServerRecord) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(record.model_dump_json(indent=1) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# Runs first in the server's process and then becomes the server (exec): the kernel sends the server SIGTERM when the
# thread that started it dies, even by SIGKILL (Linux PR_SET_PDEATHSIG; kept across exec).
_PARENT_DEATH_WRAPPER = """
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))
if os.getppid() != int(sys.argv[1]):
    sys.exit("the process that started this server is gone")
os.execvp(sys.argv[2], sys.argv[2:])
"""


def _with_parent_death_signal(command: list[str]) -> list[str]:
    """`command` wrapped so that it dies with this process (Linux, main thread: the signal follows the thread that
    forks); unchanged elsewhere."""
    if not sys.platform.startswith("linux") or not _in_main_thread():
        return command
    return [sys.executable, "-c", _PARENT_DEATH_WRAPPER, str(os.getpid()), *command]


def _say(message: str) -> None:
    print(f"serving: {message}", file=sys.stderr, flush=True)


def start_server(spec: ServerSpec, command: list[str] | None = None) -> subprocess.Popen[bytes]:
    """Start the server in its own process group (stopped by the kernel if this process dies), output appended to
    spec.log_path (or discarded)."""
    cmd = command or server_command(spec)
    if shutil.which(cmd[0]) is None:
        raise ServerStartError(f"cannot run {cmd[0]}: no such program")
    log = open(spec.log_path, "ab") if spec.log_path else subprocess.DEVNULL
    try:
        if spec.log_path:
            log.write(f"\n$ {shlex.join(cmd)}\n".encode())  # type: ignore[union-attr]
            log.flush()  # type: ignore[union-attr]
        return subprocess.Popen(
            _with_parent_death_signal(cmd),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
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


def _settle_record(spec: ServerSpec, say: Callable[[str], None]) -> ServerRecord | None:
    """Act on the owner file left by an earlier run: the record of a server to adopt, or None (after stopping a
    server that cannot be adopted and removing a stale record)."""
    record = read_record(spec.owner_file)
    if record is None or spec.owner_file is None:
        return None
    if process_alive(record.owner_pid, record.owner_start_ticks):  # its owner still runs: not ours to adopt or stop
        say(f"the server in {spec.owner_file} (pid {record.pid}) belongs to a running process (pid {record.owner_pid})")
        return None
    alive = process_alive(record.pid, record.start_ticks)
    members = group_members(record.pid)
    if record.pid in members and not alive:  # the pid now belongs to another process: not our server's group
        members = []
    if not members:
        say(f"an earlier run's {record.launcher} server (pid {record.pid}) is no longer running; record removed")
        Path(spec.owner_file).unlink(missing_ok=True)
        return None
    if alive and record.url == spec.url and record.checkpoint == spec.checkpoint and is_healthy(spec.url):
        return record
    same = record.url == spec.url and record.checkpoint == spec.checkpoint
    why = "it does not answer" if same else f"it serves {record.checkpoint} at {record.url}"
    gone = stop_group(record.pid, spec.stop_grace_s)
    outcome = "stopped" if gone else "could not stop"
    say(f"{outcome} the {record.launcher} server (pid {record.pid}) an earlier run left behind ({why})")
    Path(spec.owner_file).unlink(missing_ok=True)
    return None


@contextlib.contextmanager
def policy_server(
    spec: ServerSpec, command: list[str] | None = None, say: Callable[[str], None] = _say
) -> Iterator[RunningServer]:
    """Adopt our earlier run's server, else reuse a healthy server at spec.url (left running), else start one; a
    server started or adopted here is stopped on exit (whatever the exit). `say` reports which case it was."""
    adopted = _settle_record(spec, say)
    if adopted is not None:
        say(
            f"adopting the {adopted.launcher} server (pid {adopted.pid}) that an earlier run started at {spec.url} "
            "and did not stop; it is stopped at the end of this run"
        )
        try:
            yield RunningServer(url=spec.url, adopted=True, pid=adopted.pid, log_path=spec.log_path)
        finally:
            gone = stop_group(adopted.pid, spec.stop_grace_s)
            if spec.owner_file:
                Path(spec.owner_file).unlink(missing_ok=True)
            say(f"{'stopped' if gone else 'could not stop'} the adopted {adopted.launcher} server (pid {adopted.pid})")
        return
    if is_healthy(spec.url):
        say(f"using the server already answering at {spec.url}; this run did not start it and leaves it running")
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
        if spec.owner_file:
            record = ServerRecord(
                pid=process.pid,
                start_ticks=process_start_ticks(process.pid),
                url=spec.url,
                launcher=spec.launcher,
                checkpoint=spec.checkpoint,
                command=list(command or server_command(spec)),
                owner_pid=os.getpid(),
                owner_start_ticks=process_start_ticks(os.getpid()),
                started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            )
            write_record(spec.owner_file, record)
        wait_until_healthy(process, spec)
        yield RunningServer(url=spec.url, started=True, pid=process.pid, log_path=spec.log_path)
    finally:
        stop_server(process, spec.stop_grace_s)
        if spec.owner_file:
            Path(spec.owner_file).unlink(missing_ok=True)
        say(f"stopped the {spec.launcher} server (pid {process.pid}) this run started")
        if restore:
            signal.signal(signal.SIGTERM, previous)


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
