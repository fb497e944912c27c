"""Check an SFT data file the way slime will train it, before spending GPU time on it.

    python examples/check_sft_data.py FILE.jsonl [--tokenizer DIR] [--max-tokens N] [--quiet] [--output CLEAN.jsonl]

For each row: its shape (system prompt first, native tool calls with dict arguments, every tool result answering a
call, no invalid turns, something to train); with --tokenizer (default $HF_CHECKPOINT) also slime's qwen3 loss mask
computed with the model's chat template: only assistant turns trained (greeting and other `step_loss_mask: 0`
messages not), each trained turn exactly the text the policy samples, the tokens before the first trained turn equal
to the rollout's prompt, and at most N tokens. Prints trained-token counts per row, duplicate rows and a stats table;
exits 1 if any row is broken. --output writes the good rows, deduplicated (same messages -> one row).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rollout.sft_format import (
    RowCheck,
    RowChecker,
    check_row,
    dedupe_rows,
    iter_jsonl,
    row_key,
    stats_table,
    write_jsonl_atomic,
)


def check_file(
    path: Path, tokenizer: object | None = None, max_tokens: int | None = None
) -> tuple[list[dict], list[RowCheck], int]:
    """(rows, one check per row, number of duplicate rows)."""
    rows = list(iter_jsonl(path))
    checker = RowChecker(tokenizer, max_tokens) if tokenizer is not None else None
    checks = []
    for i, row in enumerate(rows):
        checks.append(checker.check(row, i) if checker is not None else check_row(row, None, max_tokens, i))
    duplicates = len(rows) - len({row_key(row) for row in rows if isinstance(row, dict)})
    return rows, checks, duplicates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="check_sft_data.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--tokenizer", default=None, help="HF folder with the chat template (default $HF_CHECKPOINT)")
    parser.add_argument("--max-tokens", type=int, default=None, help="fail rows longer than this")
    parser.add_argument("--quiet", action="store_true", help="no per-row lines")
    parser.add_argument("--output", type=Path, default=None, help="write the good rows here, deduplicated")
    args = parser.parse_args(argv)
    if not args.file.is_file():
        parser.exit(2, f"check_sft_data.py: error: no such file: {args.file}\n")
    tokenizer_dir = args.tokenizer or os.environ.get("HF_CHECKPOINT")
    tokenizer = None
    if tokenizer_dir:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        print("WARNING: no --tokenizer: checking shape only (no chat template, no loss mask)", file=sys.stderr)
    try:
        rows, checks, duplicates = check_file(args.file, tokenizer, args.max_tokens)
    except ValueError as err:
        parser.exit(1, f"check_sft_data.py: error: {err}\n")
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
    return 1 if broken or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
