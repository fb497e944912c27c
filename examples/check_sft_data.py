"""Check an SFT data file the way slime will train it, before spending GPU time on it.

    python examples/check_sft_data.py FILE.jsonl [--tokenizer DIR] [--max-tokens N] [--quiet] [--output CLEAN.jsonl]

For each row: its shape (system prompt first, native tool calls with dict arguments, every tool result answering a
call, no invalid turns, something to train); with --tokenizer (default $HF_CHECKPOINT) also slime's qwen3 loss mask
computed with the model's chat template: only assistant turns trained (greeting and other `step_loss_mask: 0`
messages not), each trained turn exactly the text the policy samples, the tokens before the first trained turn equal
to the rollout's prompt, and at most N tokens. Prints trained-token counts per row, duplicate rows and a stats table;
exits 1 if any row is broken (a line that is not JSON, a torn last line included) or the file holds no row, 2 on bad
arguments (missing file, a tokenizer that does not load). --output writes the good rows, deduplicated (same
messages -> one row).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from rollout.sft_format import (
    RowCheck,
    RowChecker,
    check_row,
    dedupe_rows,
    row_key,
    stats_table,
    write_jsonl_atomic,
)
from rollout.token_record import TokenizerError, load_tokenizer

PROG = "check_sft_data.py"


def read_rows(path: Path) -> tuple[list[Any], dict[int, str]]:
    """Every non-blank line as a row, strictly: a line that is not JSON stays in the list as None, with the reason
    under its row index (a torn last line is named as such: its writer was stopped mid-row)."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    rows: list[Any] = []
    problems: dict[int, str] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) and not line.endswith("\n"):
                problems[len(rows)] = (
                    f"line {number} is torn (not valid JSON, no final newline: its writer was stopped mid-row); "
                    "finish the run that writes the file, or drop the line (--output writes the good rows)"
                )
            else:
                problems[len(rows)] = f"line {number} is not valid JSON"
            rows.append(None)
    return rows, problems


def check_file(
    path: Path, tokenizer: object | None = None, max_tokens: int | None = None
) -> tuple[list[Any], list[RowCheck], int]:
    """(rows, one check per row, number of duplicate rows); a row that is not JSON is None with a failed check."""
    rows, problems = read_rows(path)
    checker = RowChecker(tokenizer, max_tokens) if tokenizer is not None else None
    checks = []
    for i, row in enumerate(rows):
        if i in problems:
            checks.append(RowCheck(index=i, ok=False, error=problems[i]))
        else:
            checks.append(checker.check(row, i) if checker is not None else check_row(row, None, max_tokens, i))
    parsed = [row for i, row in enumerate(rows) if i not in problems and isinstance(row, dict)]
    duplicates = len(parsed) - len({row_key(row) for row in parsed})
    return rows, checks, duplicates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--tokenizer", default=None, help="HF folder with the chat template (default $HF_CHECKPOINT)")
    parser.add_argument("--max-tokens", type=int, default=None, help="fail rows longer than this")
    parser.add_argument("--quiet", action="store_true", help="no per-row lines")
    parser.add_argument("--output", type=Path, default=None, help="write the good rows here, deduplicated")
    args = parser.parse_args(argv)
    if not args.file.is_file():
        parser.exit(2, f"{PROG}: error: no such file: {args.file}\n")
    tokenizer = None
    if args.tokenizer or os.environ.get("HF_CHECKPOINT"):
        flag = "--tokenizer" if args.tokenizer else "$HF_CHECKPOINT"
        try:
            tokenizer = load_tokenizer(args.tokenizer or os.environ["HF_CHECKPOINT"], flag)
        except TokenizerError as err:
            parser.exit(2, f"{PROG}: error: {err}\n")
    else:
        print("WARNING: no --tokenizer: checking shape only (no chat template, no loss mask)", file=sys.stderr)
    try:
        rows, checks, duplicates = check_file(args.file, tokenizer, args.max_tokens)
    except (UnicodeDecodeError, OSError) as err:
        parser.exit(1, f"{PROG}: error: cannot read {args.file}: {err}\n")
    if not rows:
        parser.exit(1, f"{PROG}: error: {args.file} holds no rows (the file is empty); nothing to train on\n")
    broken = [c for c in checks if not c.ok]
    if not args.quiet:
        print(f"{'row':>6} {'tokens':>7} {'trained':>8} {'turns':>5}  task")
        for c in checks:
            state = "" if c.ok else f"  BROKEN: {c.error}"
            print(f"{c.index:>6} {c.tokens:>7} {c.trained_tokens:>8} {c.assistant_turns:>5}  {c.task_id}{state}")
    good = [c for c in checks if c.ok]
    print(stats_table([rows[c.index] for c in good], [c.model_copy(update={"index": i}) for i, c in enumerate(good)]))
    print(
        f"rows {len(rows)}  ok {len(good)}  broken {len(broken)}  duplicates {duplicates}  "
        f"tokens {sum(c.tokens for c in good)}  trained tokens {sum(c.trained_tokens for c in good)}"
    )
    for c in broken[:20]:
        print(f"BROKEN row {c.index} ({c.task_id}): {c.error}", file=sys.stderr)
    if args.output is not None:
        clean = dedupe_rows(rows[c.index] for c in good)
        write_jsonl_atomic(args.output, clean)
        print(f"wrote {len(clean)} rows to {args.output}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
