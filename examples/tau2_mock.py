"""Prepare tau2 tasks as JSONL prompt data for slime.

    python examples/tau2_mock.py --local_dir DIR [--domains telecom,airline,retail] [--splits train,test]
                                 [--train-set full]

Writes DIR/{domain}_{split}_tasks.jsonl with one row per task: {"index": row number, "metadata": {...}}.
slime reads it with `--input-key index --metadata-key metadata`; the rollout rebuilds each task from
metadata["task"] without re-reading tau2's task files. With `--train-set full` (telecom), the train file holds
telecom's 2285-task generated set minus every test-split task id, and that exclusion is verified before writing.
All files are written or none: if one cannot be written, the files already in DIR stay as they were.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

from rollout.cli import OneLineErrorParser
from rollout.task_store import (
    DOMAIN_SPLITS,
    DOMAINS,
    get_task_store,
    task_persona,
    task_subtask,
)


def task_metadata(task, domain: str, split: str, source_split: str) -> dict:
    criteria = task.evaluation_criteria
    actions = criteria.actions or [] if criteria is not None else []
    return {
        "domain": domain,
        "split": split,
        "source_split": source_split,
        "task_id": task.id,
        "subtask": task_subtask(task.id),
        "persona": task_persona(task),
        "reward_basis": [basis.value for basis in criteria.reward_basis] if criteria is not None else [],
        "num_agent_actions": sum(1 for action in actions if action.requestor == "assistant"),
        "num_user_actions": sum(1 for action in actions if action.requestor == "user"),
        "has_ticket": task.ticket is not None,
        "task": task.model_dump(mode="json", exclude_none=True),
    }


def build_rows(domain: str, split: str, train_set: str) -> list[dict]:
    store = get_task_store()
    source_split = split
    if split == "train" and train_set != "train":
        source_split = train_set
    tasks = store.tasks(domain, source_split)
    if source_split != split:
        # Training on a superset: drop every task the test split evaluates, then prove none is left.
        test_ids = set(store.task_ids(domain, "test"))
        tasks = [task for task in tasks if task.id not in test_ids]
        leaked = test_ids.intersection(task.id for task in tasks)
        if leaked:
            raise SystemExit(f"tau2_mock.py: error: {len(leaked)} test task ids leaked into the train set")
    seen: set[str] = set()
    rows = []
    for task in tasks:
        if task.id in seen:  # tau2's generated sets can repeat an id; a task trains once per epoch
            continue
        seen.add(task.id)
        rows.append({"index": len(rows), "metadata": task_metadata(task, domain, split, source_split)})
    return rows


class OutputError(Exception):
    """The output files could not be written; none of them was changed."""


def _write_temporary(path: Path, rows: list[dict]) -> Path:
    """The rows in a temporary file beside `path` (removed again if writing fails)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; data files are meant to be shared
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def write_all_or_nothing(files: dict[Path, list[dict]]) -> None:
    """Write every file or none: all are written to temporary files first; then each old file is moved aside and
    the new one moved in (renames in one directory), and on any failure the old files are put back."""
    for path in files:
        if path.is_dir():
            raise OutputError(f"cannot write {path}: it is a directory; no file was written")
    temporary: dict[Path, Path] = {}
    set_aside: dict[Path, Path] = {}
    placed: list[Path] = []
    current = next(iter(files), None)
    try:
        for current, rows in files.items():
            temporary[current] = _write_temporary(current, rows)
        for current, tmp in temporary.items():
            if os.path.lexists(current):
                set_aside[current] = tmp.with_name(tmp.name + ".old")
                os.replace(current, set_aside[current])
            os.replace(tmp, current)
            placed.append(current)
    except BaseException as err:  # a full disk, a permission problem, Ctrl-C: put the old files back
        for path in placed:
            path.unlink(missing_ok=True)
        for path, old in set_aside.items():
            os.replace(old, path)
        for tmp in temporary.values():
            tmp.unlink(missing_ok=True)
        if not isinstance(err, OSError):
            raise
        raise OutputError(f"cannot write {current}: {err.strerror or err}; no file was written") from None
    for old in set_aside.values():
        old.unlink(missing_ok=True)


def summary_table(written: dict[Path, list[dict]]) -> str:
    lines = [f"{'file':<34} {'domain':<8} {'split':<6} {'subtask':<18} {'rows':>5}", "-" * 75]
    for path, rows in written.items():
        counts = Counter(row["metadata"]["subtask"] or "-" for row in rows)
        meta = rows[0]["metadata"] if rows else {"domain": "?", "split": "?"}
        for subtask, count in sorted(counts.items()):
            lines.append(f"{path.name:<34} {meta['domain']:<8} {meta['split']:<6} {subtask:<18} {count:>5}")
        lines.append(f"{path.name:<34} {meta['domain']:<8} {meta['split']:<6} {'(all)':<18} {len(rows):>5}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineErrorParser(prog="tau2_mock.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--local_dir", "--local-dir", dest="local_dir", required=True, help="output directory")
    parser.add_argument("--domains", default="telecom", help=f"comma-separated, from: {','.join(DOMAINS)}")
    parser.add_argument("--splits", default="train,test", help="comma-separated (train,test; telecom also base,small)")
    parser.add_argument(
        "--train-set",
        "--train_set",
        dest="train_set",
        default="train",
        choices=["train", "full"],
        help="source of the train file: tau2's train split, or (telecom) the full set minus every test task",
    )
    args = parser.parse_args(argv)
    args.domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    args.splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    for domain in args.domains:
        if domain not in DOMAIN_SPLITS:
            parser.error(f"unknown domain '{domain}'; valid domains: {', '.join(DOMAINS)}")
        for split in args.splits:
            if split not in DOMAIN_SPLITS[domain] or split == "full":
                valid = [s for s in DOMAIN_SPLITS[domain] if s != "full"]
                parser.error(
                    f"unknown split '{split}' for domain '{domain}'; valid splits: {', '.join(valid)}"
                    + (" (use --train-set full for the full set)" if split == "full" else "")
                )
        if args.train_set == "full" and "full" not in DOMAIN_SPLITS[domain]:
            parser.error(f"--train-set full is available for telecom only, not '{domain}'")
    if not args.domains or not args.splits:
        parser.error("--domains and --splits must name at least one value")
    out = Path(args.local_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".write-probe.", delete=True)
        probe.close()
    except OSError as err:
        parser.error(f"cannot write to --local_dir '{out}': {err.strerror or err}; choose a writable directory")
    args.local_dir = out
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    built: dict[Path, list[dict]] = {}
    for domain in args.domains:
        for split in args.splits:
            built[args.local_dir / f"{domain}_{split}_tasks.jsonl"] = build_rows(domain, split, args.train_set)
    # Train and test files of one domain must never share a task.
    for domain in args.domains:
        train = built.get(args.local_dir / f"{domain}_train_tasks.jsonl", [])
        test_ids = set(get_task_store().task_ids(domain, "test"))
        overlap = {row["metadata"]["task_id"] for row in train} & test_ids
        if overlap:
            raise SystemExit(f"tau2_mock.py: error: {len(overlap)} task ids are in both train and test for {domain}")
    try:  # written only after everything was built and checked
        write_all_or_nothing(built)
    except OutputError as err:
        print(f"tau2_mock.py: error: {err}", file=sys.stderr)
        return 1
    print(summary_table(built))
    print(f"wrote {len(built)} files to {args.local_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
