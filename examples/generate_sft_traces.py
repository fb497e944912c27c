"""Make SFT warm-up data for slime from tau2 episodes: gold traces, teacher traces, or rejection sampling (RFT).

    python examples/generate_sft_traces.py --source gold|teacher|rft --domain telecom --split train --output FILE.jsonl
        [--train-set full] [--n N] [--concurrency C] [--solo] [--allow-test] [--max-tokens-per-row 16384]
        [--tokenizer DIR] [--task-ids ID,ID] [--limit K]
        gold:    no LLM: the task's gold actions (rollout.scripted), the scripted user performs the device actions
        teacher: --teacher-kind openai|gemini --teacher-model NAME [--teacher-base-url URL] [--teacher-api-key-env VAR]
        rft:     --policy-url URL [--policy-api sglang|openai] --tokenizer DIR [--min-partial 0.6]
        user simulator (teacher, rft): --user-kind llm|gemini|scripted [--user-model ...] (default: TAU2_USER_*)

Every episode runs on rollout.engine.run_episode and is judged by tau2's evaluator. Kept by default: successes
(reward 1). RFT with --min-partial P also keeps, for a task without any success, its best completed attempt with
partial score >= P. Each kept row passes rollout.sft_format's checks with the model's chat template before it is
written (no invalid turns, renders like the rollout prompt, only assistant tokens trained, within
--max-tokens-per-row); a row that fails is reported and skipped.

Resume: every attempt is recorded in FILE.jsonl.attempts.jsonl (appended and flushed one by one); a re-run skips
the (task, attempt) pairs recorded there, except infrastructure failures, which it tries again (--min-partial
applies to the attempts run with it: the log keeps rows of candidates only). Rows are appended to
FILE.jsonl as they come; at the end the file is rewritten deduplicated (same messages -> one row).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from reward.tau2_reward_shaping import is_success
from rollout.cli import OneLineErrorParser, user_flags
from rollout.sft_format import (
    SOURCES,
    RowCheck,
    RowChecker,
    RowError,
    RowMetadata,
    append_jsonl,
    check_row,
    dedupe_rows,
    iter_jsonl,
    repair_torn_tail,
    row_from_episode,
    row_key,
    stats_table,
    write_jsonl_atomic,
)
from rollout.task_store import DOMAIN_SPLITS, DOMAINS, get_task_store, task_subtask
from rollout.token_record import TokenizerError, load_tokenizer

PROG = "generate_sft_traces.py"
DEFAULT_N = {"gold": 1, "teacher": 1, "rft": 4}
DEFAULT_TEMPERATURE = {"gold": 0.0, "teacher": 0.7, "rft": 0.7}
DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "gemini": "GEMINI_API_KEY"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineErrorParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, choices=SOURCES)
    p.add_argument("--domain", default="telecom", choices=DOMAINS)
    p.add_argument("--split", default="train", help="task split (test-split tasks need --allow-test)")
    p.add_argument("--train-set", default="train", choices=["train", "full"], help="full: telecom's 2285 minus test")
    p.add_argument("--output", required=True, type=Path, help="SFT rows (JSONL), appended to and deduplicated")
    p.add_argument("--attempts-file", type=Path, default=None, help="attempt log (default: OUTPUT.attempts.jsonl)")
    p.add_argument("--n", type=int, default=None, help="attempts per task (default: gold 1, teacher 1, rft 4)")
    p.add_argument("--concurrency", type=int, default=8, help="episodes in flight")
    p.add_argument("--solo", action="store_true", help="solo mode: the agent holds every tool, no user")
    p.add_argument("--allow-test", action="store_true", help="allow tasks of the test split (contaminates eval)")
    p.add_argument("--task-ids", default=None, help="comma-separated task ids (default: the whole split)")
    p.add_argument("--limit", type=int, default=None, help="only the first K tasks")
    p.add_argument("--max-tokens-per-row", type=int, default=16384, help="skip rows longer than this")
    p.add_argument(
        "--tokenizer", default=None, help="HF folder whose chat template renders rows (default $HF_CHECKPOINT)"
    )
    p.add_argument("--max-steps", type=int, default=None, help="episode step cap (default TAU2_MAX_STEPS or 200)")
    p.add_argument("--policy-variant", choices=["full", "compact"], default=None, help="compact: dry runs only")
    p.add_argument("--temperature", type=float, default=None, help="teacher / policy sampling temperature")
    p.add_argument("--min-partial", type=float, default=None, help="rft: keep a task's best failure at >= this partial")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    t = p.add_argument_group("teacher")
    t.add_argument("--teacher-kind", choices=["openai", "gemini"], default="openai")
    t.add_argument("--teacher-model", default=None)
    t.add_argument("--teacher-base-url", default=None, help="OpenAI-compatible base URL, e.g. http://host:30000/v1")
    t.add_argument("--teacher-api-key-env", default=None, help="variable holding the key (default by kind)")
    t.add_argument("--teacher-max-tokens", type=int, default=None, help="max tokens per teacher reply")
    t.add_argument("--teacher-timeout-s", type=float, default=300.0)
    t.add_argument("--price-input-per-mtok", type=float, default=None, help="teacher price per 1M prompt tokens")
    t.add_argument("--price-output-per-mtok", type=float, default=None, help="teacher price per 1M output tokens")
    r = p.add_argument_group("rft policy")
    r.add_argument("--policy-url", default=None, help="policy server root, e.g. http://127.0.0.1:30000")
    r.add_argument("--policy-api", choices=["sglang", "openai"], default="sglang")
    r.add_argument("--policy-model", default="default", help="model name for --policy-api openai")
    r.add_argument("--max-response-tokens", type=int, default=None, help="per episode (default --max-tokens-per-row)")
    u = p.add_argument_group("user simulator (teacher, rft; default from TAU2_USER_*)")
    u.add_argument("--user-kind", choices=["llm", "gemini", "scripted"], default=None)
    u.add_argument("--user-model", default=None)
    u.add_argument("--user-base-url", default=None)
    u.add_argument("--user-api-key-env", default=None, help="variable holding the user simulator's key")
    u.add_argument("--user-temperature", type=float, default=None)
    args = p.parse_args(argv)

    if args.split not in DOMAIN_SPLITS[args.domain] or args.split == "full":
        valid = [s for s in DOMAIN_SPLITS[args.domain] if s != "full"]
        p.error(f"unknown split '{args.split}' for {args.domain}; valid: {', '.join(valid)} (full: --train-set full)")
    if args.train_set == "full" and (args.domain != "telecom" or args.split != "train"):
        p.error("--train-set full needs --domain telecom --split train")
    args.n = args.n if args.n is not None else DEFAULT_N[args.source]
    if args.n < 1 or args.concurrency < 1 or args.max_tokens_per_row < 1:
        p.error("--n, --concurrency and --max-tokens-per-row must be >= 1")
    if args.source == "gold" and args.n != 1:
        p.error("gold traces are deterministic: --n must be 1")
    if args.min_partial is not None and not 0.0 <= args.min_partial <= 1.0:
        p.error("--min-partial must be within [0, 1]")
    if args.temperature is None:
        args.temperature = DEFAULT_TEMPERATURE[args.source]
    args.tokenizer = args.tokenizer or os.environ.get("HF_CHECKPOINT") or None
    if args.source == "teacher":
        if not args.teacher_model:
            p.error("--source teacher needs --teacher-model")
        if args.teacher_kind == "openai" and not args.teacher_base_url:
            p.error("--teacher-kind openai needs --teacher-base-url (e.g. http://127.0.0.1:30000/v1)")
    if args.source == "rft":
        if not args.policy_url:
            p.error("--source rft needs --policy-url (the policy checkpoint's server)")
        if not args.tokenizer:
            p.error("--source rft needs --tokenizer (the policy checkpoint's HF folder)")
    if args.attempts_file is None:
        args.attempts_file = args.output.with_name(args.output.name + ".attempts.jsonl")
    return args


# ---------------------------------------------------------------------------------------------------------- tasks


def select_tasks(args: argparse.Namespace) -> list[Any]:
    """The tasks to play, with the test-split guard applied."""
    store = get_task_store()
    if args.train_set == "full":
        # The same exclusion as the RL prompt data: telecom's full set minus every test task, verified.
        from examples.tau2_mock import build_rows

        tasks = [store.get(args.domain, row["metadata"]["task_id"]) for row in build_rows(args.domain, "train", "full")]
    else:
        tasks = list(store.tasks(args.domain, args.split))
    if args.task_ids:
        wanted = [t.strip() for t in args.task_ids.split(",") if t.strip()]
        by_id = {task.id: task for task in tasks}
        missing = [t for t in wanted if t not in by_id]
        if missing:
            raise SystemExit(f"{PROG}: error: {len(missing)} task ids not in {args.domain}/{args.split}: {missing[0]}")
        tasks = [by_id[t] for t in wanted]
    if args.limit is not None:
        tasks = tasks[: args.limit]
    test_ids = set(store.task_ids(args.domain, "test"))
    leaked = [task.id for task in tasks if task.id in test_ids]
    if leaked and not args.allow_test:
        raise SystemExit(
            f"{PROG}: error: refusing to make training data from {len(leaked)} test-split task(s) "
            f"(e.g. {leaked[0]}): training on them contaminates the evaluation; pass --allow-test to override"
        )
    if leaked:
        print(f"WARNING: {len(leaked)} test-split tasks included (--allow-test)", file=sys.stderr)
    return tasks


# -------------------------------------------------------------------------------------------------------- attempts


class AttemptRecord(BaseModel):
    """One line of the attempt log: the outcome of one (task, attempt), and its row if it is a candidate."""

    source: str
    task_id: str
    attempt: int
    solo_mode: bool
    status: str
    termination_reason: str | None = None
    reward: float | None = None
    partial_score: float = 0.0
    turns: int = 0
    invalid_turns: int = 0
    policy_prompt_tokens: int = 0
    policy_completion_tokens: int = 0
    policy_latency_s: float = 0.0
    user_prompt_tokens: int = 0
    user_completion_tokens: int = 0
    wall_s: float = 0.0
    failure: str | None = None
    kept: bool = False
    drop_reason: str | None = None
    check: dict[str, Any] | None = None
    row: dict[str, Any] | None = Field(default=None, description="a success, or an RFT partial candidate")

    @property
    def key(self) -> tuple[str, str, int, bool]:
        return (self.source, self.task_id, self.attempt, self.solo_mode)

    @property
    def success(self) -> bool:
        return is_success(self.reward)


class Generator:
    """Plays attempts on the engine and writes rows and attempt records as they finish."""

    def __init__(self, args: argparse.Namespace, tokenizer: Any) -> None:
        self.args = args
        self.tokenizer = tokenizer
        self.checker = RowChecker(tokenizer, args.max_tokens_per_row) if tokenizer is not None else None
        from rollout.settings import UserSimConfig

        # gold: the scripted customer, who performs each gold device action the agent asks for; solo: no user.
        self.user_config = None if args.solo else UserSimConfig(kind="scripted")
        if args.source != "gold" and not args.solo:
            self.user_config = self._user_config()
        self.user_clients: dict[Any, Any] = {}
        self.teacher = None
        self.policy = None
        self.records: list[AttemptRecord] = []

    # ------------------------------------------------------------------------------------------------ set-up
    def _user_config(self) -> Any:
        """TAU2_USER_* with the --user-* flags on top."""
        from rollout.settings import UserSimConfig

        try:
            config = UserSimConfig(**user_flags(self.args))
        except ValueError as err:
            raise SystemExit(f"{PROG}: error: user simulator (--user-* flags or TAU2_USER_*): {err}") from None
        if config.kind == "solo":
            raise SystemExit(f"{PROG}: error: the user simulator kind is 'solo' (TAU2_USER_KIND): pass --solo instead")
        return config

    def _teacher_client(self) -> Any:
        from rollout.clients.chat import CHAT_RETRY, build_chat_client

        args = self.args
        key_env = args.teacher_api_key_env or DEFAULT_KEY_ENV[args.teacher_kind]
        api_key = os.environ.get(key_env) or None
        if args.teacher_api_key_env and not api_key:
            raise SystemExit(f"{PROG}: error: --teacher-api-key-env {key_env} is not set")
        return build_chat_client(
            args.teacher_kind,
            args.teacher_model,
            args.teacher_base_url,
            api_key,
            retry=CHAT_RETRY.model_copy(update={"timeout_s": args.teacher_timeout_s}),
        )

    def agent_label(self) -> str | None:
        args = self.args
        if args.source == "teacher":
            return f"{args.teacher_kind}:{args.teacher_model}"
        if args.source == "rft":
            return f"{Path(args.tokenizer).name}@{args.policy_url}"
        return None

    def episode_config(self) -> Any:
        from rollout.settings import EpisodeConfig

        overrides: dict[str, Any] = {"domain": self.args.domain, "solo_mode": self.args.solo}
        if self.args.max_steps is not None:
            overrides["max_steps"] = self.args.max_steps
        if self.args.policy_variant is not None:
            overrides["policy_variant"] = self.args.policy_variant
        return EpisodeConfig(**overrides)

    # ---------------------------------------------------------------------------------------------- one attempt
    def _agent(self, task: Any, view: Any, config: Any) -> Any:
        from rollout.engine import ChatAgent, TokenAgent

        args = self.args
        if args.source == "gold":
            from rollout.scripted import ScriptedPolicyAgent

            return ScriptedPolicyAgent("gold", task, solo_mode=args.solo)
        if args.source == "teacher":
            if self.teacher is None:
                self.teacher = self._teacher_client()
            params: dict[str, Any] = {"temperature": args.temperature, "solo": args.solo}
            if args.teacher_max_tokens:
                params["max_tokens"] = args.teacher_max_tokens
            return ChatAgent(self.teacher, view, params)
        if self.policy is None:
            from rollout.clients.policy import build_policy_client

            self.policy = build_policy_client(args.policy_url, api=args.policy_api, model=args.policy_model)
        budget = args.max_response_tokens or args.max_tokens_per_row
        return TokenAgent(
            self.policy,
            self.tokenizer,
            view,
            {"temperature": args.temperature, "top_p": 1.0},
            max_response_tokens=budget,
            max_context_tokens=args.max_tokens_per_row,
            max_tool_calls_per_turn=config.max_tool_calls_per_turn,
        )

    async def play(self, task: Any, attempt: int) -> AttemptRecord:
        from reward.partial_credit import compute_partial_score
        from rollout.episode import Episode

        args = self.args
        config = self.episode_config()
        record = AttemptRecord(
            source=args.source, task_id=task.id, attempt=attempt, solo_mode=args.solo, status="failed"
        )
        try:
            episode = await Episode.start(
                task, config, lambda view: self._agent(task, view, config), self.user_config, self.user_clients
            )
        except Exception as err:  # a setup failure is this attempt's, not the run's
            record.failure = f"setup: {type(err).__name__}: {err}"
            return record
        result = await episode.play()
        checks = result.reward_info if result.status == "completed" else result.truncated_checks
        partial, components = compute_partial_score(checks)
        record = record.model_copy(
            update={
                "status": result.status,
                "termination_reason": result.termination_reason,
                "reward": result.reward,
                "partial_score": partial,
                "turns": result.turns,
                "invalid_turns": len(result.invalid_turns),
                "policy_prompt_tokens": result.policy_prompt_tokens,
                "policy_completion_tokens": result.policy_completion_tokens,
                "policy_latency_s": result.policy_latency_s,
                "user_prompt_tokens": result.user_prompt_tokens,
                "user_completion_tokens": result.user_completion_tokens,
                "wall_s": result.wall_s,
                "failure": (result.failure or "")[:500] or None,
            }
        )
        candidate = record.success or (
            args.min_partial is not None and result.status == "completed" and partial >= args.min_partial
        )
        if not candidate:
            return record
        metadata = RowMetadata(
            task_id=task.id,
            domain=args.domain,
            subtask=task_subtask(task.id),
            source=args.source,
            reward=result.reward,
            partial_score=partial,
            partial_components=components,
            turns=result.turns,
            solo_mode=args.solo,
            teacher_model=self.agent_label(),
            attempt=attempt,
            termination_reason=result.termination_reason,
            user_kind=None if args.solo else self.user_config.kind,
            kept_as="success" if record.success else "partial",
            policy_variant=config.policy_variant,
        )
        try:
            row = row_from_episode(episode.view, result, metadata)
        except RowError as err:
            record.drop_reason = str(err)
            return record
        check = self.checker.check(row) if self.checker is not None else check_row(row)
        record.check = check.model_dump(exclude={"index"})
        if not check.ok:
            record.drop_reason = check.error
            return record
        record.row = row
        return record

    # ----------------------------------------------------------------------------------------------- the run
    async def run(self, pending: list[tuple[Any, int]], out_handle: Any, log_handle: Any) -> None:
        semaphore = asyncio.Semaphore(self.args.concurrency)
        bar = None
        if not self.args.no_progress:
            from tqdm import tqdm

            bar = tqdm(total=len(pending), desc=f"{self.args.source} episodes", unit="ep", dynamic_ncols=True)

        async def one(task: Any, attempt: int) -> None:
            async with semaphore:
                record = await self.play(task, attempt)
            if record.row is not None and record.success:
                append_jsonl(out_handle, record.row)  # successes are final: written at once
                record.kept = True
            append_jsonl(log_handle, record.model_dump(mode="json"))
            self.records.append(record)
            if bar is not None:
                wins = sum(1 for r in self.records if r.success)
                bar.set_postfix(success=f"{wins}/{len(self.records)}", kept=sum(r.kept for r in self.records))
                bar.update(1)
            if record.drop_reason:
                message = f"skipped row {record.task_id} #{record.attempt}: {record.drop_reason}"
                (bar.write if bar is not None else print)(message, file=sys.stderr)

        try:
            await asyncio.gather(*(one(task, attempt) for task, attempt in pending))
        finally:
            if bar is not None:
                bar.close()
            await self.aclose()

    async def aclose(self) -> None:
        for client in (self.teacher, self.policy):
            if client is not None:
                await client.aclose()
        if self.user_clients:
            from rollout.user_sim import close_user_clients

            await close_user_clients(self.user_clients)


# ------------------------------------------------------------------------------------------------------ finishing


def load_records(path: Path) -> list[AttemptRecord]:
    return [AttemptRecord.model_validate(line) for line in iter_jsonl(path)]


def partial_picks(records: list[AttemptRecord], min_partial: float | None) -> list[dict[str, Any]]:
    """For each (task, mode) without a success: its best completed attempt at or above the partial threshold."""
    if min_partial is None:
        return []
    solved = {(r.task_id, r.solo_mode) for r in records if r.success and r.row is not None}
    best: dict[tuple[str, bool], AttemptRecord] = {}
    for r in records:
        key = (r.task_id, r.solo_mode)
        if key in solved or r.success or r.row is None or r.partial_score < min_partial:
            continue
        current = best.get(key)
        if current is None or (r.partial_score, -r.turns, -r.attempt) > (
            current.partial_score,
            -current.turns,
            -current.attempt,
        ):
            best[key] = r
    return [best[key].row for key in sorted(best)]  # type: ignore[misc]


def finalize(args: argparse.Namespace, records: list[AttemptRecord]) -> list[dict[str, Any]]:
    """Rewrite the output: earlier rows, every success in the log, RFT partial picks; deduplicated."""
    existing = [
        row
        for row in iter_jsonl(args.output)
        if not (
            (row.get("metadata") or {}).get("kept_as") == "partial" and row["metadata"].get("source") == args.source
        )
    ]
    successes = [r.row for r in records if r.success and r.row is not None]
    rows = dedupe_rows([*existing, *successes, *partial_picks(records, args.min_partial)])
    write_jsonl_atomic(args.output, rows)
    return rows


def attempt_table(records: list[AttemptRecord], tasks: int, price_in: float | None, price_out: float | None) -> str:
    """Success rate, coverage, drops and token / latency totals of the attempts of this source."""
    n = len(records)
    wins = [r for r in records if r.success]
    covered = {(r.task_id, r.solo_mode) for r in wins}
    statuses = Counter(r.status for r in records)
    drops = Counter((r.drop_reason or "").split(":")[0][:60] for r in records if r.drop_reason)
    prompt = sum(r.policy_prompt_tokens for r in records)
    completion = sum(r.policy_completion_tokens for r in records)
    lines = [
        f"attempts {n}  successes {len(wins)} ({100.0 * len(wins) / max(n, 1):.1f}%)  "
        f"tasks solved {len(covered)}/{tasks}  statuses {dict(statuses)}",
        f"agent tokens: prompt {prompt}  completion {completion}  "
        f"latency {sum(r.policy_latency_s for r in records):.1f}s"
        f"  | user tokens {sum(r.user_prompt_tokens + r.user_completion_tokens for r in records)}"
        f"  | episode wall {sum(r.wall_s for r in records):.1f}s",
    ]
    if price_in is not None or price_out is not None:
        cost = prompt / 1e6 * (price_in or 0.0) + completion / 1e6 * (price_out or 0.0)
        lines.append(f"estimated agent cost: ${cost:.2f}")
    for reason, count in drops.most_common():
        lines.append(f"rows skipped: {count} x {reason}")
    failures = Counter((r.failure or "").splitlines()[0][:80] for r in records if r.status == "failed")
    for reason, count in failures.most_common(5):
        lines.append(f"failed episodes: {count} x {reason}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tasks = select_tasks(args)
    if args.solo:
        from rollout.scripted import solo_supported

        playable = [task for task in tasks if task.ticket is not None and solo_supported(task)]
        if len(playable) < len(tasks):
            print(f"solo mode: {len(tasks) - len(playable)} tasks have no ticket and are skipped", file=sys.stderr)
        tasks = playable
    tokenizer = None
    if args.tokenizer:
        try:
            tokenizer = load_tokenizer(args.tokenizer, "--tokenizer")
        except TokenizerError as err:
            raise SystemExit(f"{PROG}: error: {err}") from None
    else:
        print(
            "WARNING: no --tokenizer (or HF_CHECKPOINT): rows are checked for shape only, not rendered with the "
            "model's chat template, and --max-tokens-per-row is not enforced",
            file=sys.stderr,
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for path in (args.output, args.attempts_file):
        repair_torn_tail(path)
    previous = [r for r in load_records(args.attempts_file) if r.source == args.source and r.solo_mode == args.solo]
    done = {r.key for r in previous if r.status != "failed"}  # infrastructure failures are tried again
    pending = [
        (task, attempt)
        for task in tasks
        for attempt in range(args.n)
        if (args.source, task.id, attempt, args.solo) not in done
    ]
    print(
        f"{args.source}: {len(tasks)} tasks x {args.n} = {len(tasks) * args.n} attempts, "
        f"{len(tasks) * args.n - len(pending)} already recorded in {args.attempts_file}",
        file=sys.stderr,
    )
    generator = Generator(args, tokenizer)
    started = time.perf_counter()
    with args.output.open("a", encoding="utf-8") as out_handle, args.attempts_file.open("a", encoding="utf-8") as log:
        asyncio.run(generator.run(pending, out_handle, log))
    task_ids = {task.id for task in tasks}
    latest = {r.key: r for r in [*previous, *generator.records]}  # a retried failure replaces its record
    records = [r for r in latest.values() if r.task_id in task_ids]
    rows = finalize(args, records)
    logged = load_records(args.attempts_file)  # every source's attempts: checks for rows made by earlier runs too
    checks_by_key = {row_key(r.row): r.check for r in logged if r.row is not None and r.check}
    checks = [
        RowCheck(index=i, **checks_by_key[row_key(row)]) for i, row in enumerate(rows) if row_key(row) in checks_by_key
    ]
    print(attempt_table(records, len(tasks), args.price_input_per_mtok, args.price_output_per_mtok))
    print(stats_table(rows, checks))
    print(f"wrote {len(rows)} rows to {args.output} in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
