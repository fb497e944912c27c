"""Evaluate a policy checkpoint on tau2 tasks with the recipe's episode engine, honestly and resumably.

    python eval/evaluate_tau2.py --checkpoint CKPT --output-path results.json --num-tasks 25 --sglang-port 30000 \
        --domain telecom --task-split test [--num-trials 4] [--concurrency 8] [--user-kind llm --user-model M ...]
    python eval/evaluate_tau2.py --compare base.json sft.json grpo.json [tau2_run.json] [--output-path compare.md]

The policy is played token-in-token-out (rollout.engine.TokenAgent + run_episode, the same loop as GRPO rollouts)
against an sglang server (`--policy-api sglang`, /generate) or an OpenAI-compatible one (`openai`, /v1/completions,
e.g. vLLM). With `--checkpoint` and no `--sglang-url`, a server is started on `--sglang-port` unless one already
answers there (eval/serving.py), and stopped at the end. The tokenizer comes from the checkpoint (or `--tokenizer`).

Files (for --output-path results.json):
- results.episodes.jsonl: one line per finished episode, written at once (fsynced at most once a second: grouped, off
  the per-episode path; and at the end): task_id, trial, subtask,
  persona, status, reward, success, sampling_seed, timings, config_hash and config (the hashed settings), and
  `episode` = EpisodeResult.summary() (trajectory, what the agent saw, reward_info, truncated_checks, counts).
  Re-running the same command skips finished (task, trial) pairs; a killed run loses at most the episodes in
  flight (a torn last line is dropped with a warning). A file from another configuration (model, user simulator,
  domain, split, episode limits, sampling, solo mode, tau2 version) is refused unless --overwrite.
- results.json: every metric of eval/metrics.py (tau2's names too: pass_hat_1, ..., avg_reward), the per-episode list
  `results`, the shortcut baselines beside the model (`baselines`, eval/baselines.py) and the full run
  configuration, always rebuilt from the JSONL (for the selected tasks and trials), written atomically.
- results.tau2.json: the same episodes as tau2's own `Results` (eval/tau2_results.py), rebuilt from the JSONL: open it
  with `tau2 view --file results.tau2.json` or `tau2 evaluate-trajs results.tau2.json`. tau2's `compute_metrics` on
  it is stored as `tau2_metrics` and equals the recipe's pass^k and average reward.
- results.baselines.jsonl: the shortcut baselines' episodes (always-transfer, shotgun, do-nothing and the gold
  ceiling: scripted, no LLM) with the run's user simulator and limits; resumable like the model's (--no-baselines).
- results.md / results.png: Markdown summary and chart (eval/report.py). results.server.log: a started server's log;
  results.server.pid: the started server while it runs (a run killed outright leaves it; the next run adopts that
  server or stops it, and says which).

tau2's flag spellings work too: --task-split-name, --max-concurrency, --user-llm, --save-to, -d, and --task-ids as a
space-separated list.

Exit codes: 0 done; 1 runtime failure (server could not start, every episode failed); 2 bad input (unknown domain,
split or task id, missing checkpoint, unreachable server, results from another configuration); 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from eval import metrics
from eval.serving import (
    RunningServer,
    ServerSpec,
    ServerStartError,
    http_get_json,
    launcher_problem,
    policy_server,
    same_model,
    served_model_info,
    split_server_args,
)
from rollout.budgets import EPISODE_TOKENS
from rollout.cli import EXIT_USAGE, OneLineErrorParser, user_flags, write_atomic
from rollout.settings import EpisodeConfig
from rollout.token_record import TokenizerError, load_tokenizer

PROG = "evaluate_tau2.py"
EXIT_OK, EXIT_RUNTIME, EXIT_INTERRUPTED = 0, 1, 130
RECORD_VERSION = 1


class UsageError(Exception):
    """Bad input: one line to stderr, exit code 2, nothing written."""


class RunFailure(Exception):
    """The evaluation could not run (server did not start, every episode failed): exit code 1."""


def warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


def info(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------ arguments


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="RESULTS_JSON",
        help="print a side-by-side table of result files (the recipe's or tau2 run's Results) and exit; with "
        "--output-path also write it as Markdown with a chart",
    )
    p.add_argument("--checkpoint", help="Hugging Face model folder to evaluate")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the checkpoint)")
    p.add_argument("--model-name", help="name identifying the model in results (default: checkpoint path)")
    p.add_argument(
        "--output-path",
        "--save-to",
        dest="output_path",
        help="results JSON ('.json' added when missing); the episodes JSONL, tau2 Results, .md and .png go beside it",
    )
    g = p.add_argument_group("tasks")
    g.add_argument("--domain", "-d", help="tau2 domain (default: $TAU2_DOMAIN, else telecom)")
    g.add_argument("--task-split", "--task-split-name", dest="task_split", default="test")
    g.add_argument("--num-tasks", type=_positive_int, help="first N tasks of the split in tau2's order (default all)")
    g.add_argument(
        "--task-ids", nargs="+", metavar="ID", help="task ids of the split, space- or comma-separated (not --num-tasks)"
    )
    g.add_argument("--num-trials", type=_positive_int, default=1, help="episodes per task (pass^k needs k trials)")
    g.add_argument(
        "--concurrency", "--max-concurrency", dest="concurrency", type=_positive_int, default=8, help="episodes at once"
    )
    s = p.add_argument_group("policy server")
    s.add_argument("--sglang-url", help="use this running server (http://host:port) instead of starting one")
    s.add_argument("--sglang-port", type=_positive_int, default=30000, help="port of the server to use or start")
    s.add_argument("--policy-api", choices=["sglang", "openai"], default="sglang", help="/generate or /v1/completions")
    s.add_argument("--server-launcher", choices=["sglang", "cpu"], default="sglang")
    s.add_argument("--server-args", default="", help="extra arguments for the started server (one string)")
    s.add_argument("--server-timeout", type=_positive_int, default=900, help="seconds to wait for /health")
    s.add_argument("--policy-max-retries", type=int, default=5, help="retries of a policy request (5xx, timeouts)")
    s.add_argument("--policy-timeout-s", type=_positive_int, default=600, help="timeout of one policy request")
    a = p.add_argument_group("sampling and episode limits")
    a.add_argument("--temperature", type=_non_negative_float, default=0.0)
    a.add_argument("--top-p", type=float, default=1.0)
    budget_help = "token budget of an episode, as in GRPO (rollout/budgets.py)"
    a.add_argument("--max-response-tokens", type=_positive_int, default=EPISODE_TOKENS, help=budget_help)
    a.add_argument("--max-context-tokens", type=_positive_int, help="default: the server's max_model_len if reported")
    a.add_argument(
        "--max-tokens-per-turn",
        type=_positive_int,
        help="cap on one policy turn (default $TAU2_MAX_TOKENS_PER_TURN or 1024)",
    )
    a.add_argument("--max-steps", type=_positive_int, help="tau2 max_steps (default $TAU2_MAX_STEPS or 200)")
    a.add_argument("--max-errors", type=_positive_int, help="tau2 max_errors (default $TAU2_MAX_ERRORS or 10)")
    a.add_argument("--max-turns", type=_positive_int, help="cap on policy turns (default none)")
    a.add_argument("--policy-variant", choices=["full", "compact"], help="compact: dry runs with a tiny model only")
    a.add_argument("--episode-timeout-s", type=float, help="wall-clock limit of one episode (default none)")
    a.add_argument("--seed", type=int, default=0, help="per-episode sampling seeds derive from it (temperature > 0)")
    u = p.add_argument_group("user simulator (defaults: TAU2_USER_* variables)")
    u.add_argument("--user-kind", choices=["llm", "gemini", "scripted", "solo"])
    u.add_argument("--user-model")
    u.add_argument(
        "--user-llm",
        metavar="MODEL",
        help="tau2's spelling: the model as litellm names it (gpt-4.1, openai/NAME, gemini/NAME); sets --user-model "
        "without the provider prefix and, without --user-kind, the kind (gemini/...: gemini, else llm)",
    )
    u.add_argument("--user-base-url")
    u.add_argument("--user-api-key-env", metavar="NAME", help="name of the variable holding the API key")
    u.add_argument("--user-temperature", type=_non_negative_float)
    r = p.add_argument_group("results")
    r.add_argument("--exclude-failed", action="store_true", help="drop infrastructure failures from pass rates")
    r.add_argument("--retry-failed", action="store_true", help="re-run recorded episodes that failed (infra)")
    r.add_argument("--overwrite", action="store_true", help="discard an existing episodes file and start over")
    r.add_argument("--bootstrap-resamples", type=_positive_int, default=metrics.DEFAULT_RESAMPLES)
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--no-baselines", action="store_true", help="do not play the shortcut baselines beside the model")
    r.add_argument("--baseline-trials", type=_positive_int, default=1, help="trials per task of each baseline policy")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compare:
        return args
    if args.domain is None:
        try:
            args.domain = EpisodeConfig().domain
        except ValueError as err:
            parser.error(str(err))
    if args.output_path:
        args.output_path = json_path(args.output_path)
    if not args.output_path:
        parser.error("--output-path is required (or --compare FILES)")
    if args.task_ids is not None:
        args.task_ids = [task_id.strip() for item in args.task_ids for task_id in item.split(",") if task_id.strip()]
    if args.user_llm:
        if args.user_model:
            parser.error("give --user-model or --user-llm, not both")
        provider, _, name = args.user_llm.partition("/")
        known = provider in ("openai", "gemini") and bool(name)
        args.user_model = name if known else args.user_llm
        if args.user_kind is None:
            args.user_kind = "gemini" if known and provider == "gemini" else "llm"
    if args.num_tasks is not None and args.task_ids:
        parser.error("give --num-tasks or --task-ids, not both")
    if not args.checkpoint and not args.sglang_url:
        parser.error("give --checkpoint (a server is started or reused for it) and/or --sglang-url")
    if args.policy_max_retries < 0:
        parser.error("--policy-max-retries must be >= 0")
    if not 0.0 < args.top_p <= 1.0:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    return args


# --------------------------------------------------------------------------------------------------- configuration


def json_path(path: str) -> str:
    """tau2's --save-to names a file without '.json': add it (an existing folder is left for check_output)."""
    if path.lower().endswith(".json") or Path(path).expanduser().is_dir():
        return path
    return f"{path}.json"


def output_paths(output: Path) -> dict[str, Path]:
    return {
        "json": output,
        "episodes": output.with_suffix(".episodes.jsonl"),
        "tau2": output.with_suffix(".tau2.json"),
        "baselines": output.with_suffix(".baselines.jsonl"),
        "markdown": output.with_suffix(".md"),
        "chart": output.with_suffix(".png"),
        "server_log": output.with_suffix(".server.log"),
    }


def check_output(output: Path) -> None:
    if output.is_dir():
        raise UsageError(f"--output-path '{output}' is a directory; give a file name such as {output}/results.json")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output.parent, prefix=".write-probe."):
            pass
    except OSError as err:
        raise UsageError(f"cannot write beside --output-path '{output}': {err.strerror or err}") from None


def check_checkpoint(path: str, flag: str = "--checkpoint") -> str:
    folder = Path(path).expanduser()
    if not folder.exists():
        raise UsageError(f"{flag} path '{path}' does not exist")
    if folder.is_dir() and not (folder / "config.json").is_file():
        if any(folder.glob("iter_*")):
            raise UsageError(
                f"{flag} '{path}' is a Megatron save folder; convert it first (scripts/convert_megatron_to_hf.sh)"
            )
        if flag == "--checkpoint":
            raise UsageError(f"{flag} '{path}' has no config.json: not a Hugging Face model folder")
    return str(folder.resolve())


def user_sim_config(args: argparse.Namespace) -> Any:
    """UserSimConfig from TAU2_USER_* with the command-line flags on top; the key only ever comes from a variable."""
    from rollout.settings import UserSimConfig

    try:
        return UserSimConfig(**user_flags(args))
    except ValueError as err:
        raise UsageError(f"user simulator (flags --user-* or TAU2_USER_* variables): {err}") from None


def select_tasks(args: argparse.Namespace) -> list[Any]:
    from rollout.task_store import TaskLookupError, check_split, get_task_store

    try:
        check_split(args.domain, args.task_split)
    except TaskLookupError as err:
        raise UsageError(str(err)) from None
    tasks = get_task_store().tasks(args.domain, args.task_split)
    if args.task_ids is not None:
        wanted = list(dict.fromkeys(args.task_ids))
        if not wanted:
            raise UsageError("--task-ids names no task")
        by_id = {task.id: task for task in tasks}
        unknown = [task_id for task_id in wanted if task_id not in by_id]
        if unknown:
            raise UsageError(
                f"unknown task id(s) for {args.domain}/{args.task_split}: {', '.join(unknown)} "
                f"(the split has {len(tasks)} tasks)"
            )
        return [by_id[task_id] for task_id in wanted]
    unique = list({task.id: task for task in tasks}.values())
    if args.num_tasks is None:
        return unique
    if args.num_tasks > len(unique):
        raise UsageError(
            f"--num-tasks {args.num_tasks} but {args.domain}/{args.task_split} has only {len(unique)} tasks"
        )
    return unique[: args.num_tasks]


def episode_config(args: argparse.Namespace, solo_mode: bool) -> Any:
    overrides: dict[str, Any] = {"domain": args.domain, "solo_mode": solo_mode}
    for flag in ("max_steps", "max_errors", "max_turns", "max_tokens_per_turn", "policy_variant", "episode_timeout_s"):
        value = getattr(args, flag)
        if value is not None:
            overrides[flag] = value
    try:
        return EpisodeConfig(**overrides)
    except ValueError as err:
        raise UsageError(f"episode settings (flags or TAU2_* variables): {err}") from None


def hashed_config(run_config: dict[str, Any]) -> dict[str, Any]:
    """The part of the configuration that changes results: a results file from another one is refused."""
    episode = run_config["episode"]
    user = run_config["user_sim"]
    sampling = run_config["sampling"]
    return {
        "model": run_config["model"],
        "domain": run_config["domain"],
        "task_split": run_config["task_split"],
        "solo_mode": run_config["solo_mode"],
        "max_steps": episode["max_steps"],
        "max_errors": episode["max_errors"],
        "max_turns": episode["max_turns"],
        "max_tool_calls_per_turn": episode["max_tool_calls_per_turn"],
        "max_tokens_per_turn": episode.get("max_tokens_per_turn"),
        "policy_variant": episode["policy_variant"],
        "temperature": sampling["temperature"],
        "top_p": sampling["top_p"],
        "max_response_tokens": sampling["max_response_tokens"],
        "max_context_tokens": sampling["max_context_tokens"],
        "seed": sampling["seed"],
        "user_kind": user["kind"],
        "user_model": user["model"],
        "user_temperature": user["temperature"],
        "user_extra_args": user["extra_args"],
        "tau2_version": run_config["tau2_version"],
    }


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_difference(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    if not old:
        return "written by an unknown configuration"
    changed = [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]
    return "; ".join(changed) or "same settings, different hash"


def episode_seed(seed: int, task_id: str, trial: int) -> int:
    """A stable 31-bit sampling seed per (seed, task, trial)."""
    digest = hashlib.sha256(f"{seed}\x00{task_id}\x00{trial}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


# ----------------------------------------------------------------------------------------------- the episodes file


class EpisodeLog:
    """The append-only JSONL of finished episodes, held under an exclusive lock while a run uses it. Each record is
    written to the OS at once (a killed process loses nothing written); fsyncs are grouped, at most one per
    SYNC_EVERY_S and one at close, so a burst of finished episodes does not wait for the disk once each."""

    SYNC_EVERY_S = 1.0

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle: IO[str] | None = None
        self.dropped_lines = 0
        self._synced_at = float("-inf")  # the first record is synced at once
        self._unsynced = False

    def open(self) -> None:
        self.handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            self.handle = None
            raise UsageError(
                f"another evaluation is writing {self.path}; wait for it or choose another --output-path"
            ) from None

    def close(self) -> None:
        if self.handle is not None:
            if self._unsynced:
                self._sync(force=True)
            self.handle.close()
            self.handle = None

    def read(self, repair: bool = True) -> list[dict[str, Any]]:
        """All complete records. A torn last line (a run killed mid-write) is cut off the file (with `repair`);
        an unreadable line elsewhere is skipped with a warning."""
        assert self.handle is not None
        self.handle.seek(0)
        data = self.handle.read()
        records: list[dict[str, Any]] = []
        lines = data.split("\n")
        complete, tail = lines[:-1], lines[-1]
        self.dropped_lines = 0
        offset = 0
        for number, line in enumerate(complete, start=1):
            offset += len(line.encode("utf-8")) + 1
            if not line.strip():
                continue
            record = _parse_record(line)
            if record is None:
                self.dropped_lines += 1
                warn(f"{self.path}:{number}: unreadable episode record skipped")
                continue
            records.append(record)
        if tail.strip():
            record = _parse_record(tail)
            if record is not None:
                records.append(record)  # complete JSON without its newline: keep it and end the line
                if repair:
                    self._append_raw("\n")
            else:
                warn(f"{self.path}: the last line is incomplete (a killed run); it is dropped and re-run")
                if repair:
                    self.handle.truncate(offset)
                    self.handle.seek(0, os.SEEK_END)
        return records

    def reset(self) -> None:
        assert self.handle is not None
        self.handle.truncate(0)
        self._sync(force=True)

    def append(self, record: dict[str, Any]) -> None:
        self._append_raw(json.dumps(record, ensure_ascii=False, default=str) + "\n")

    def _append_raw(self, text: str) -> None:
        assert self.handle is not None
        self.handle.seek(0, os.SEEK_END)
        self.handle.write(text)
        self._sync()

    def _sync(self, force: bool = False) -> None:
        assert self.handle is not None
        self.handle.flush()
        now = time.monotonic()
        if force or now - self._synced_at >= self.SYNC_EVERY_S:
            os.fsync(self.handle.fileno())
            self._synced_at, self._unsynced = now, False
        else:
            self._unsynced = True


def records_of_config(
    log: EpisodeLog,
    hashed: dict[str, Any],
    hash_value: str,
    overwrite: bool,
    noun: str,
    remedy: str,
    overwrite_all: bool,
) -> list[dict[str, Any]]:
    """The open log's records, none from another configuration: those are refused (naming the first difference and
    `remedy`) unless `overwrite`, which empties the log when it holds them, or whenever it holds records if
    `overwrite_all`."""
    records = log.read()
    foreign = [r for r in records if r.get("config_hash") != hash_value]
    if foreign and not overwrite:
        raise UsageError(
            f"{log.path} holds {len(foreign)} {noun} from another configuration "
            f"({config_difference(foreign[0].get('config'), hashed)}); pass --overwrite to {remedy}"
        )
    if overwrite and (foreign or (overwrite_all and records)):
        info(f"--overwrite: discarding {len(records)} recorded {noun} in {log.path}")
        log.reset()
        return []
    return records


def _parse_record(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("episode"), dict):
        return None
    if not isinstance(record.get("task_id"), str) or not isinstance(record.get("trial"), int):
        return None
    return record


def latest_by_pair(records: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """(task id, trial) -> its last record (a retried failure supersedes the failure)."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for record in records:
        out[(record["task_id"], record["trial"])] = record
    return out


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


# ------------------------------------------------------------------------------------------------- the policy side


def model_identity(args: argparse.Namespace, checkpoint: str | None) -> tuple[str, dict[str, Any]]:
    """The model's name in results (hashed) and what a --sglang-url server reports about itself."""
    server_info: dict[str, Any] = {}
    if args.sglang_url:
        status, _ = http_get_json(f"{args.sglang_url.rstrip('/')}/health")
        if status == 0:
            raise UsageError(f"no policy server answers at {args.sglang_url}; start it or fix --sglang-url")
        server_info = served_model_info(args.sglang_url)
        reported = server_info.get("model_path")
        if checkpoint and reported and not same_model(reported, checkpoint):
            raise UsageError(f"the server at {args.sglang_url} serves '{reported}', not --checkpoint '{checkpoint}'")
    if args.model_name:
        return args.model_name, server_info
    if checkpoint:
        return checkpoint, server_info
    if server_info.get("model_path"):
        return server_info["model_path"], server_info
    raise UsageError(f"cannot tell which model {args.sglang_url} serves; name it with --model-name (or --checkpoint)")


def tokenizer_source(args: argparse.Namespace, checkpoint: str | None, server_info: dict[str, Any]) -> str:
    if args.tokenizer:
        return check_checkpoint(args.tokenizer, "--tokenizer")
    if checkpoint:
        return checkpoint
    reported = server_info.get("model_path")
    if reported and Path(reported).is_dir():
        return str(Path(reported).resolve())
    raise UsageError("no tokenizer: give --tokenizer (or --checkpoint) for the served model")


@contextlib.contextmanager
def serve_policy(args: argparse.Namespace, checkpoint: str | None, server_log: Path) -> Iterator[RunningServer]:
    if args.sglang_url:
        yield RunningServer(url=args.sglang_url.rstrip("/"), started=False)
        return
    assert checkpoint is not None
    spec = ServerSpec(
        checkpoint=checkpoint,
        port=args.sglang_port,
        launcher=args.server_launcher,
        extra_args=split_server_args(args.server_args),
        ready_timeout_s=float(args.server_timeout),
        log_path=str(server_log),
        owner_file=str(server_log.with_suffix(".pid")),  # a run killed outright: the next one adopts or stops it
    )
    from eval.serving import is_healthy

    if not is_healthy(spec.url):
        problem = launcher_problem(args.server_launcher)
        if problem:
            raise UsageError(f"no policy server answers at {spec.url} and none can be started here: {problem}")
        info(f"starting a {args.server_launcher} server for {checkpoint} on port {args.sglang_port} (log {server_log})")
    try:
        with policy_server(spec, say=info) as server:
            if not server.started and not server.adopted:
                reported = served_model_info(server.url).get("model_path")
                if reported and not same_model(reported, checkpoint):
                    raise UsageError(
                        f"a server on port {args.sglang_port} serves '{reported}', not '{checkpoint}'; stop it or "
                        "choose another --sglang-port"
                    )
            yield server
    except ServerStartError as err:
        raise RunFailure(str(err)) from None


# ------------------------------------------------------------------------------------------------------- episodes


class RunState:
    """What the progress bar shows: successes and failures among the selected episodes recorded so far."""

    def __init__(self, recorded: list[dict[str, Any]]) -> None:
        self.done = 0
        self.successes = 0
        self.failed = 0
        for record in recorded:
            self.add(record)

    def add(self, record: dict[str, Any]) -> None:
        episode = record["episode"]
        self.done += 1
        if episode.get("status") == "failed":
            self.failed += 1
        elif metrics.is_success(episode.get("reward")):
            self.successes += 1

    def postfix(self) -> str:
        rate = self.successes / self.done if self.done else 0.0
        return f"pass@1 {rate:.1%} ({self.successes}/{self.done}), failed {self.failed}"


def make_record(
    task: Any, trial: int, result: Any, hash_value: str, hashed: dict[str, Any], seed: int | None
) -> dict[str, Any]:
    from rollout.task_store import task_persona, task_subtask

    summary = result.summary()
    return {
        "version": RECORD_VERSION,
        "task_id": task.id,
        "trial": trial,
        "subtask": task_subtask(task.id),
        "persona": task_persona(task),
        "status": summary.get("status"),
        "reward": summary.get("reward"),
        "success": result.success,
        "sampling_seed": seed,
        "config_hash": hash_value,
        "config": hashed,
        "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "timings": {
            key: summary.get(key) for key in ("wall_s", "policy_latency_s", "user_latency_s", "env_s", "eval_s")
        },
        "episode": summary,
    }


async def play_episodes(
    pending: list[tuple[Any, int]],
    *,
    args: argparse.Namespace,
    url: str,
    served_name: str,
    tokenizer: Any,
    config: Any,
    user_config: Any,
    max_context_tokens: int | None,
    log: EpisodeLog,
    state: RunState,
    hash_value: str,
    hashed: dict[str, Any],
) -> list[dict[str, Any]]:
    """Play the pending (task, trial) pairs, `--concurrency` at a time; each record is on disk when it finishes."""
    from tqdm import tqdm

    from rollout.clients.policy import build_policy_client
    from rollout.clients.retry import RetryPolicy
    from rollout.engine import TokenAgent
    from rollout.episode import play_episode
    from rollout.user_sim import close_user_clients

    retry = RetryPolicy(max_retries=args.policy_max_retries, timeout_s=float(args.policy_timeout_s))
    policy = build_policy_client(url, api=args.policy_api, model=served_name, retry=retry)
    clients: dict[Any, Any] = {}
    semaphore = asyncio.Semaphore(args.concurrency)
    written: list[dict[str, Any]] = []
    bar = tqdm(total=len(pending), desc="episodes", unit="ep", disable=args.no_progress, file=sys.stderr)
    bar.set_postfix_str(state.postfix())

    async def play(task: Any, trial: int) -> tuple[Any, int | None]:
        task = task.model_copy(deep=True)  # the store's tasks are shared
        seed = episode_seed(args.seed, task.id, trial) if args.temperature > 0 else None
        sampling: dict[str, Any] = {"temperature": args.temperature, "top_p": args.top_p}
        if seed is not None:
            sampling["sampling_seed" if args.policy_api == "sglang" else "seed"] = seed

        def make_agent(view: Any) -> TokenAgent:
            return TokenAgent(
                policy,
                tokenizer,
                view,
                sampling,
                max_response_tokens=args.max_response_tokens,
                max_context_tokens=max_context_tokens,
                max_tool_calls_per_turn=config.max_tool_calls_per_turn,
                max_tokens_per_turn=config.max_tokens_per_turn,
            )

        return await play_episode(task, config, make_agent, user_config, clients), seed

    async def one(task: Any, trial: int) -> None:
        async with semaphore:
            result, seed = await play(task, trial)
        record = make_record(task, trial, result, hash_value, hashed, seed)
        log.append(record)
        written.append(record)
        state.add(record)
        bar.update(1)
        bar.set_postfix_str(state.postfix())

    jobs = [asyncio.ensure_future(one(task, trial)) for task, trial in pending]
    try:
        await asyncio.gather(*jobs)
    finally:
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        bar.close()
        await policy.aclose()
        await close_user_clients(clients)
    return written


# ---------------------------------------------------------------------------------------------------- the summary


def compact_result(record: dict[str, Any], row: metrics.EpisodeRow) -> dict[str, Any]:
    """One entry of `results`: what a reader of the JSON needs per episode (the trajectory stays in the JSONL)."""
    episode = record["episode"]
    return {
        "task_id": row.task_id,
        "trial": row.trial,
        "subtask": row.subtask,
        "persona": row.persona,
        "status": row.status,
        "termination_reason": row.termination_reason,
        "reward": row.reward,
        "success": row.success,
        "partial_score": row.partial_score,
        "partial_components": row.partial_components,
        "truncated_partial_score": row.truncated_partial_score,
        "turns": row.turns,
        "steps": row.steps,
        "tool_calls": row.tool_calls,
        "tool_errors": row.tool_errors,
        "invalid_turns": row.invalid_turns,
        "policy_prompt_tokens": row.policy_prompt_tokens,
        "policy_completion_tokens": row.policy_completion_tokens,
        "wall_s": row.wall_s,
        "policy_latency_s": row.policy_latency_s,
        "user_latency_s": row.user_latency_s,
        "failure": _first_line(episode.get("failure")),
    }


def _first_line(text: Any, limit: int = 300) -> str | None:
    lines = str(text).strip().splitlines() if text else []
    return lines[0][:limit] if lines else None


def select_records(records: list[dict[str, Any]], task_ids: list[str], num_trials: int) -> list[dict[str, Any]]:
    """The last record of each selected (task, trial) pair, in task order then trial order."""
    latest = latest_by_pair(records)
    return [latest[(t, k)] for t in task_ids for k in range(num_trials) if (t, k) in latest]


def record_row(record: dict[str, Any], gold_transfers: dict[str, bool] | None = None) -> metrics.EpisodeRow:
    return metrics.row_from_episode(
        dict(record["episode"], task_id=record["task_id"]),
        record["trial"],
        record.get("subtask"),
        record.get("persona"),
        gold_transfers=(gold_transfers or {}).get(record["task_id"]),
    )


def build_summary(
    records: list[dict[str, Any]],
    task_ids: list[str],
    num_trials: int,
    *,
    exclude_failed: bool,
    resamples: int,
    bootstrap_seed: int = metrics.DEFAULT_BOOTSTRAP_SEED,
    gold_transfers: dict[str, bool] | None = None,
) -> dict[str, Any]:
    """Metrics for the selected (task, trial) pairs from the episode records (the last record of each pair);
    `gold_transfers`: task id -> whether its gold transfers (for the unneeded-transfer rate)."""
    selected = select_records(records, task_ids, num_trials)
    rows = [record_row(r, gold_transfers) for r in selected]
    summary = metrics.summarize(rows, exclude_failed=exclude_failed, resamples=resamples, seed=bootstrap_seed)
    expected = len(task_ids) * num_trials
    return {
        "pass_at_1": summary["pass_at_1"],
        "avg_reward": summary["avg_reward"],
        "avg_partial_score": summary["avg_partial_score"],
        **metrics.tau2_metric_keys(summary["pass_hat_k"], summary["avg_reward"]),
        **summary,
        "complete": len(rows) == expected,
        "expected_episodes": expected,
        "recorded_episodes": len(rows),
        "other_records_in_file": len(latest_by_pair(records)) - len(rows),
        "task_ids": task_ids,
        "num_trials": num_trials,
        "results": [compact_result(r, row) for r, row in zip(selected, rows, strict=True)],
    }


def print_headline(summary: dict[str, Any], paths: dict[str, Path]) -> None:
    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    ci = summary.get("pass_at_1_ci") or {}
    ci_text = f" [{pct(ci.get('low'))}, {pct(ci.get('high'))}] 95% CI" if ci else ""
    counts = summary["counts"]
    lines = [
        f"pass@1 {pct(summary['pass_at_1'])}{ci_text}  ({counts['successes']}/{counts['counted_episodes']} episodes, "
        f"{counts['tasks']} tasks)",
        "pass^k " + "  ".join(f"k={k}: {pct(v)}" for k, v in summary["pass_hat_k"].items()),
        f"avg reward {summary['avg_reward'] or 0:.3f}  avg partial {summary['avg_partial_score'] or 0:.3f}",
        f"failed (infrastructure) episodes: {counts['failed_episodes']}"
        + (" (excluded from rates)" if counts["exclude_failed"] else " (counted as failures)"),
        f"results: {paths['json']}  episodes: {paths['episodes']}  tau2 Results: {paths['tau2']}",
    ]
    baselines = summary.get("baselines")
    if baselines and baselines.get("policies"):
        user = baselines["user_sim"]
        shown = ", ".join(f"{name} {pct(p['pass_at_1'])}" for name, p in baselines["policies"].items())
        lines.insert(3, f"beside shortcut baselines ({user.get('kind')} user): {shown}")
        lines.insert(4, f"transfer rate {pct(summary.get('transfer_rate'))}; {baselines['shortcut_check']['verdict']}")
    if not summary["complete"]:
        lines.append(
            f"INCOMPLETE: {summary['recorded_episodes']} of {summary['expected_episodes']} episodes recorded; "
            "re-run the same command to finish"
        )
    print("\n".join(lines), flush=True)


# ------------------------------------------------------------------------------ shortcut baselines and tau2 Results


def gold_transfer_map(tasks: list[Any]) -> dict[str, bool]:
    from eval.tau2_results import gold_transfers

    return {task.id: gold_transfers(task) for task in tasks}


def run_baselines(
    args: argparse.Namespace,
    tasks: list[Any],
    config: Any,
    user_config: Any,
    run_config: dict[str, Any],
    paths: dict[str, Path],
) -> tuple[list[dict[str, Any]], list[str]]:
    """Play the missing shortcut-baseline episodes into their own JSONL; returns all its records and the policies."""
    from eval import baselines

    names = baselines.baseline_policies(args.domain)
    hashed = baselines.hashed_config(hashed_config(run_config))
    hash_value = config_hash(hashed)
    log = EpisodeLog(paths["baselines"])
    log.open()
    try:
        # --overwrite empties this file only when it holds other settings' baselines: these settings' would not change.
        noun = "baseline episode(s)"
        records = records_of_config(log, hashed, hash_value, args.overwrite, noun, "replay them", False)
        done = {
            (r.get("policy"), r["task_id"], r["trial"])
            for r in records
            if not (args.retry_failed and r["episode"].get("status") == "failed")
        }
        trials = range(args.baseline_trials)
        pending = [(n, t, k) for k in trials for n in names for t in tasks if (n, t.id, k) not in done]
        if pending:
            info(f"playing {len(pending)} shortcut-baseline episode(s) ({', '.join(names)}), {user_config.kind} user")

            def record(policy: str, task: Any, trial: int, result: Any) -> None:
                log.append({**make_record(task, trial, result, hash_value, hashed, None), "policy": policy})

            asyncio.run(
                baselines.play_baselines(
                    pending, config=config, user_config=user_config, concurrency=args.concurrency, on_result=record
                )
            )
        records = log.read(repair=False)
    finally:
        log.close()
    return records, names


def baseline_summary(
    args: argparse.Namespace,
    tasks: list[Any],
    selected: list[dict[str, Any]],
    baseline_records: list[dict[str, Any]],
    names: list[str],
    run_config: dict[str, Any],
    user_config: Any,
) -> dict[str, Any]:
    from eval import baselines

    gold = gold_transfer_map(tasks)
    model_rows = [row for row in (record_row(r, gold) for r in selected) if not (args.exclude_failed and row.failed)]
    episode = run_config["episode"]
    return baselines.summarize_baselines(
        baseline_records,
        model_rows,
        policies=names,
        task_ids=[task.id for task in tasks],
        trials=args.baseline_trials,
        row_of=lambda record: record_row(dict(record), gold),
        user_sim=user_config.public_dict(),
        limits={key: episode[key] for key in ("max_steps", "max_errors", "max_turns")},
    )


def write_tau2_results(
    args: argparse.Namespace,
    tasks: list[Any],
    selected: list[dict[str, Any]],
    summary: dict[str, Any],
    run_config: dict[str, Any],
    path: Path,
) -> dict[str, Any]:
    """results.tau2.json from the selected records, and tau2's own compute_metrics on it (`tau2_metrics`)."""
    from eval import tau2_results

    by_id = {task.id: task for task in tasks}
    run_tasks = [by_id[task_id] for task_id in dict.fromkeys(r["task_id"] for r in selected)]
    results = tau2_results.build_results(selected, run_tasks, run_config, exclude_failed=args.exclude_failed)
    tau2_results.write_results(results, path)
    computed = tau2_results.tau2_metrics(results)
    ours = metrics.tau2_metric_keys(summary["pass_hat_k"], summary["avg_reward"])
    disagree = [key for key, value in ours.items() if computed is not None and not _same(value, computed.get(key))]
    if disagree:
        warn(f"tau2's compute_metrics on {path} differs from the summary on {', '.join(disagree)}")
    return {
        "tau2_metrics": computed,
        "tau2_results": {
            "path": str(path),
            "simulations": len(results.simulations),
            "computed_by": "tau2.metrics.agent_metrics.compute_metrics",
            "agrees_with_summary": not disagree,
        },
    }


def _same(a: float | None, b: float | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and abs(a - b) <= 1e-9)


# ----------------------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    started = time.time()
    paths = output_paths(Path(args.output_path).expanduser().resolve())
    check_output(paths["json"])
    from rollout.task_store import TaskLookupError, check_split

    try:  # cheap checks first: the task store and the servers are slow to reach
        check_split(args.domain, args.task_split)
    except TaskLookupError as err:
        raise UsageError(str(err)) from None
    checkpoint = check_checkpoint(args.checkpoint) if args.checkpoint else None
    user_config = user_sim_config(args)
    solo_mode = user_config.kind == "solo"
    model, server_info = model_identity(args, checkpoint)
    tokenizer_path = tokenizer_source(args, checkpoint, server_info)
    tasks = select_tasks(args)
    config = episode_config(args, solo_mode)

    from rollout.tau2_setup import tau2_version

    run_config: dict[str, Any] = {
        "model": model,
        "checkpoint": checkpoint,
        "tokenizer": tokenizer_path,
        "policy_api": args.policy_api,
        "policy_url": args.sglang_url or f"http://127.0.0.1:{args.sglang_port}",
        "server_launcher": None if args.sglang_url else args.server_launcher,
        "server_args": args.server_args or None,
        "domain": args.domain,
        "task_split": args.task_split,
        "num_tasks": len(tasks),
        "task_selection": "task_ids" if args.task_ids else ("first_n" if args.num_tasks else "all"),
        "num_trials": args.num_trials,
        "solo_mode": solo_mode,
        "episode": config.model_dump(mode="json"),
        "sampling": {
            "temperature": args.temperature,
            "top_p": args.top_p,
            "max_response_tokens": args.max_response_tokens,
            "max_context_tokens": args.max_context_tokens,
            "seed": args.seed,
        },
        "user_sim": user_config.public_dict(),
        "tau2_version": tau2_version(),
        "concurrency": args.concurrency,
        "exclude_failed": args.exclude_failed,
        "bootstrap": {"resamples": args.bootstrap_resamples, "seed": metrics.DEFAULT_BOOTSTRAP_SEED},
        "command_line": shlex.join([sys.executable, str(Path(__file__).resolve()), *args.argv]),
    }
    hashed = hashed_config(run_config)
    hash_value = config_hash(hashed)
    task_ids = [task.id for task in tasks]

    log = EpisodeLog(paths["episodes"])
    created = not paths["episodes"].exists()
    log.open()
    try:
        remedy = "discard them or choose another --output-path"
        records = records_of_config(log, hashed, hash_value, args.overwrite, "episode(s)", remedy, True)
        latest = latest_by_pair(records)
        wanted = {(task_id, trial) for task_id in task_ids for trial in range(args.num_trials)}
        done = {
            pair
            for pair, record in latest.items()
            if not (args.retry_failed and record["episode"].get("status") == "failed")
        }
        # Trial-major order: the running pass rate covers all tasks early.
        pending = [(task, trial) for trial in range(args.num_trials) for task in tasks if (task.id, trial) not in done]
        resumed = len(wanted & done)
        if resumed:
            info(f"resuming: {resumed} of {len(wanted)} episodes already recorded in {paths['episodes']}")
        new_records: list[dict[str, Any]] = []
        run_info: dict[str, Any] = {"server": None, "max_context_tokens_effective": args.max_context_tokens}
        if pending:
            check_checkpoint(tokenizer_path, "--tokenizer")
            try:
                tokenizer = load_tokenizer(tokenizer_path)
            except TokenizerError as err:
                raise UsageError(str(err)) from None
            with serve_policy(args, checkpoint, paths["server_log"]) as server:
                served = served_model_info(server.url)
                max_context = args.max_context_tokens or served.get("max_model_len")
                run_info = {
                    "server": {**server.model_dump(), **served},
                    "max_context_tokens_effective": max_context,
                }
                state = RunState([latest[pair] for pair in wanted & done])
                new_records = asyncio.run(
                    play_episodes(
                        pending,
                        args=args,
                        url=server.url,
                        served_name=served.get("served_model_name") or "default",
                        tokenizer=tokenizer,
                        config=config,
                        user_config=user_config,
                        max_context_tokens=max_context,
                        log=log,
                        state=state,
                        hash_value=hash_value,
                        hashed=hashed,
                    )
                )
        records = log.read(repair=False)  # the summary always comes from the file
    finally:
        with contextlib.suppress(OSError):
            if created and paths["episodes"].stat().st_size == 0:  # stopped before any episode: no empty log left
                paths["episodes"].unlink()
        log.close()
    baseline_records, baseline_names = (None, [])
    if not args.no_baselines and not solo_mode:
        baseline_records, baseline_names = run_baselines(args, tasks, config, user_config, run_config, paths)

    summary = build_summary(
        records,
        task_ids,
        args.num_trials,
        exclude_failed=args.exclude_failed,
        resamples=args.bootstrap_resamples,
        gold_transfers=gold_transfer_map(tasks),
    )
    selected = select_records(records, task_ids, args.num_trials)
    if baseline_records is not None:
        summary["baselines"] = baseline_summary(
            args, tasks, selected, baseline_records, baseline_names, run_config, user_config
        )
    summary.update(write_tau2_results(args, tasks, selected, summary, run_config, paths["tau2"]))
    finished = time.time()
    skipped = {"server_log"} if not pending else set()
    if baseline_records is None:
        skipped.add("baselines")
    output = {
        **summary,
        "config": run_config,
        "config_hash": hash_value,
        "files": {name: str(path) for name, path in paths.items() if name not in skipped},
        "run": {
            **run_info,
            "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
            "finished_at": datetime.fromtimestamp(finished, timezone.utc).isoformat(timespec="seconds"),
            "wall_s": finished - started,
            "new_episodes": len(new_records),
            "resumed_episodes": summary["recorded_episodes"] - len(new_records),
        },
    }
    write_json_atomic(paths["json"], output)
    try:
        from eval.report import write_report

        write_report(output, paths["markdown"], paths["chart"])
    except Exception as err:  # the JSON is what matters; a plotting problem must not hide it
        warn(f"could not write the Markdown / chart report: {type(err).__name__}: {err}")
    print_headline(output, paths)
    new_failed = [r for r in new_records if r["episode"].get("status") == "failed"]
    if new_records and len(new_failed) == len(new_records):
        first = str(new_failed[0]["episode"].get("failure") or "unknown").splitlines()[0]
        raise RunFailure(f"every episode of this run failed ({len(new_failed)}); first error: {first}")
    if new_failed:
        warn(f"{len(new_failed)} episode(s) failed (infrastructure); re-run with --retry-failed to play them again")
    return EXIT_OK


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    args.argv = argv
    try:
        if args.compare:
            from eval.report import compare_main

            return compare_main(args.compare, args.output_path)
        return run(args)
    except UsageError as err:
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)  # always one line
        return EXIT_USAGE
    except RunFailure as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished episodes are saved, re-run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    # SIGTERM (a scheduler, `kill`) ends the run like Ctrl-C: servers stopped, finished episodes kept.
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main())
