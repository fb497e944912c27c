"""Replay each task's walkthrough (gold path) through the TALES resources server: rollouts and data/example.jsonl.

    python walkthrough_rollouts.py [--frameworks textworld_express,textworld,scienceworld] [--split train]
        [--tasks all|coin,cooking-level1,...] [--episodes 1] [--single-turn-steps last|all|N]
        [--out runs/tales/walkthrough_rollouts.jsonl] [--example-out data/example.jsonl] [--server URL]

Each episode is played over HTTP exactly as an agent would: /seed_session, /walkthrough (gold commands),
/execute_command for each, /verify with the transcript as a Responses API response (multi-turn). For the single-turn
formulation, a row condenses the transcript before a gold step into one user message; /verify plays the gold command
after replaying the history. Records are appended as they finish; a rerun skips the ids already done (resume) and
prints the summary of scores. Without --server it starts its own server (with walkthroughs exposed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from episodes import (
    GameSession,
    LocalServer,
    append_jsonl,
    finished_ids,
    message_item,
    multi_turn_row,
    print_summary,
    response_object,
    row_id,
    single_turn_row,
    summarize,
    task_fields,
    tool_call_items,
    tool_output,
)
from games import FRAMEWORKS

MODEL_NAME = "walkthrough"
AGENT_REF = {"type": "responses_api_agents", "name": "nemo_gym_tales_simple_agent"}


def single_turn_steps(spec: str, length: int) -> list[int]:
    """Which gold steps get a single-turn row: 'last', 'all', or N evenly spread steps (always with the last)."""
    if length == 0:
        return []
    if spec == "all":
        return list(range(length))
    if spec == "last":
        return [length - 1]
    count = min(int(spec), length)
    return sorted({round(i * (length - 1) / max(1, count - 1)) for i in range(count)} | {length - 1})


def verdict_record(row: dict[str, Any], verdict: dict[str, Any], **extra: Any) -> dict[str, Any]:
    keys = ("reward", "score", "max_score", "won", "lost", "moves", "commands", "verified_from")
    return (
        {"id": row_id(row), **{k: row[k] for k in ("framework", "task", "split", "episode", "mode")}}
        | {k: verdict[k] for k in keys}
        | extra
    )


async def replay_episode(url: str, fields: dict[str, Any], steps_spec: str) -> tuple[list[dict], list[dict]]:
    """(records, example rows) of one task episode: the multi-turn walkthrough and its single-turn rows."""
    async with GameSession(url) as session:
        start = await session.seed({**fields, "mode": "multi_turn"})
        gold = await session.walkthrough()
        turns, output = [], []
        for command in gold:
            result = await session.command(command)
            turns.append((command, result["observation"]))
            output += tool_call_items(command, tool_output(result))
            if result["done"]:
                break
        row = multi_turn_row(fields, start["observation"])
        verdict = await session.verify(row, response_object(output, MODEL_NAME))
    records = [verdict_record(row, verdict, walkthrough_length=len(gold), transcript=output)]
    rows = [row]
    for step in single_turn_steps(steps_spec, len(turns)):
        st_row = single_turn_row(fields, start["observation"], turns[:step], expected_command=turns[step][0])
        async with GameSession(url) as session:
            await session.seed(st_row)
            verdict = await session.verify(st_row, response_object([message_item(turns[step][0])], MODEL_NAME))
        records.append(verdict_record(st_row, verdict))
        rows.append(st_row)
    return records, rows


async def run(args: argparse.Namespace, url: str) -> list[dict[str, Any]]:
    done = finished_ids(args.out)
    jobs = []
    for name in args.frameworks:
        tasks = FRAMEWORKS[name].tasks(args.split)
        chosen = tasks if args.tasks == ["all"] else [t for t in tasks if t in args.tasks]
        jobs += [task_fields(name, t, args.split, e) for t in chosen for e in range(args.episodes)]
    semaphore = asyncio.Semaphore(args.concurrency)
    example_rows: list[dict[str, Any]] = []

    async def one(fields: dict[str, Any]) -> None:
        multi_id = row_id({**fields, "mode": "multi_turn"})
        if multi_id in done:
            print(f"skip {multi_id} (done)", flush=True)
            return
        async with semaphore:
            try:
                records, rows = await replay_episode(url, fields, args.single_turn_steps)
            except Exception as err:  # one failed episode never stops the batch
                records, rows = [{"id": multi_id, **fields, "mode": "multi_turn", "error": str(err)}], []
        # Single-turn records first: the multi-turn id marks the whole episode done.
        for record in sorted(records, key=lambda r: r["mode"] == "multi_turn"):
            append_jsonl(args.out, record)
            status = record.get("error") or f"reward {record['reward']:.3f}"
            print(f"{record['id']}: {status}", flush=True)
        example_rows.extend(rows)

    await asyncio.gather(*(one(fields) for fields in jobs))
    return example_rows


def write_examples(path: Path, rows: list[dict[str, Any]], limit: int) -> None:
    """Up to `limit` rows, alternating frameworks and formulations, each tagged with the agent that plays it."""
    by_group: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in sorted(rows, key=row_id):
        by_group.setdefault((row["framework"], row["mode"]), []).append(row)
    chosen: list[dict[str, Any]] = []
    while len(chosen) < limit and any(by_group.values()):
        for group in by_group.values():
            if group and len(chosen) < limit:
                chosen.append(group.pop(0))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row | {"agent_ref": AGENT_REF}) + "\n" for row in chosen))
    print(f"wrote {len(chosen)} rows to {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frameworks", default="textworld_express,textworld,scienceworld")
    parser.add_argument("--split", choices=["train", "test"], default="train")
    parser.add_argument("--tasks", default="all", help="comma-separated task names, or 'all'")
    parser.add_argument("--episodes", type=int, default=1, help="episodes per task (0..N-1 of the split)")
    parser.add_argument("--single-turn-steps", default="last", help="'last', 'all' or a count of gold steps")
    parser.add_argument("--out", type=Path, default=Path("runs/tales/walkthrough_rollouts.jsonl"))
    parser.add_argument("--example-out", type=Path, default=None, help="also write NeMo Gym example rows here")
    parser.add_argument("--example-rows", type=int, default=6)
    parser.add_argument("--server", default=None, help="base URL of a running server with expose_walkthroughs")
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args(argv)
    args.frameworks = [f for f in args.frameworks.split(",") if f]
    unknown = [f for f in args.frameworks if f not in FRAMEWORKS]
    if unknown:
        parser.error(f"unknown frameworks {unknown}: use {list(FRAMEWORKS)}")
    args.tasks = [t for t in args.tasks.split(",") if t]

    server = None
    if args.server is None:
        server = LocalServer(args.out.with_suffix(".server.log"), "--expose-walkthroughs").wait_ready()
    try:
        rows = asyncio.run(run(args, args.server or server.url))
    finally:
        if server is not None:
            server.stop()
    if args.example_out is not None:
        write_examples(args.example_out, rows, args.example_rows)
    summary = summarize(args.out)
    args.out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    return 1 if summary.get("all", {}).get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
