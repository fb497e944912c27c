"""Write tau2 tasks as SkyRL prompt datasets: one parquet row per task, the engine's opening as the prompt.

    python integrations/skyrl/tau2_dataset.py --output_dir DIR [--domain telecom] [--train-set train|full] [--solo]

Writes DIR/train.parquet and DIR/validation.parquet (SkyRL's data.train_data / data.val_data) and DIR/tools.json.
The split is examples/tau2_mock.py's: train is tau2's train split, or with `--train-set full` (telecom) the
2285-task generated set minus every test task, checked before writing; validation is tau2's test split. No task
is in both files. Each row:
  prompt      the messages before the user's first reply, as the engine builds them: tau2's own agent system
              prompt with the domain policy, then tau2's greeting (solo: the solo prompt with the ticket, no greeting)
  env_class   tau2_<domain> (integrations/skyrl/env.py)
  task        the tau2 task as JSON text (the environment rebuilds it without reading tau2's task files)
  task_id, domain, split, source_split, subtask, persona, data_source ("tau2/<domain>")
tools.json holds the tool schemas the engine shows the policy; SkyRL renders them through
generator.chat_template_kwargs.tools (integrations/skyrl/main_tau2.py fills that from the engine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from examples.tau2_mock import build_rows
from integrations.skyrl.env import ENV_IDS
from rollout.engine import prepare_episode
from rollout.settings import EpisodeConfig
from rollout.task_store import get_task_store

# Output file -> tau2 split.
SPLIT_FILES = {"train.parquet": "train", "validation.parquet": "test"}


def opening_messages(view: Any) -> list[dict[str, Any]]:
    """What the policy sees before the user's first reply (the engine's TaskView)."""
    return [{"role": "system", "content": view.system_prompt}, *view.opening]


async def _views(tasks: list[Any], config: EpisodeConfig) -> list[Any]:
    return [(await prepare_episode(task, config)).view for task in tasks]


def skyrl_rows(domain: str, split: str, train_set: str, solo_mode: bool) -> tuple[list[dict[str, Any]], Any]:
    """SkyRL rows for one split, and one task's view (its tool schemas are the domain's)."""
    meta_rows = build_rows(domain, split, train_set)
    if solo_mode:  # tau2's solo agent works from the ticket: tasks without one cannot be played solo
        meta_rows = [row for row in meta_rows if row["metadata"]["has_ticket"]]
    store = get_task_store()
    tasks = [store.get(domain, row["metadata"]["task_id"]) for row in meta_rows]
    views = asyncio.run(_views(tasks, EpisodeConfig(domain=domain, solo_mode=solo_mode)))
    rows = []
    for row, view in zip(meta_rows, views, strict=True):
        meta = row["metadata"]
        rows.append(
            {
                "data_source": f"tau2/{domain}",
                "prompt": opening_messages(view),
                "env_class": ENV_IDS[domain],
                "task_id": meta["task_id"],
                "domain": domain,
                "split": meta["split"],
                "source_split": meta["source_split"],
                "subtask": meta["subtask"] or "",
                "persona": meta["persona"],
                "task": json.dumps(meta["task"], ensure_ascii=False, sort_keys=True),
            }
        )
    return rows, views[0] if views else None


def write_parquet_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    import datasets  # SkyRL's own reader library (installed with skyrl)

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".parquet", dir=path.parent)
    os.close(fd)
    try:
        datasets.Dataset.from_list(rows).to_parquet(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tau2_dataset.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", "--output-dir", dest="output_dir", required=True, type=Path)
    parser.add_argument("--domain", default="telecom", choices=sorted(ENV_IDS))
    parser.add_argument("--train-set", "--train_set", dest="train_set", default="train", choices=["train", "full"])
    parser.add_argument("--solo", action="store_true", help="solo mode: the ticket in the prompt, no user simulator")
    args = parser.parse_args(argv)
    if args.train_set == "full" and args.domain != "telecom":
        parser.error(f"--train-set full is available for telecom only, not '{args.domain}'")
    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        parser.error(f"cannot create --output_dir '{args.output_dir}': {err.strerror or err}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    built: dict[str, list[dict[str, Any]]] = {}
    view = None
    for name, split in SPLIT_FILES.items():
        built[name], view = skyrl_rows(args.domain, split, args.train_set, args.solo)
    train_ids = {row["task_id"] for row in built["train.parquet"]}
    test_ids = {row["task_id"] for row in built["validation.parquet"]}
    if train_ids & test_ids:  # tau2_mock.build_rows checks this too; the files are never written with a leak
        raise SystemExit(f"tau2_dataset.py: error: {len(train_ids & test_ids)} task ids are in both train and test")
    for name, rows in built.items():
        write_parquet_atomic(args.output_dir / name, rows)
    (args.output_dir / "tools.json").write_text(json.dumps(view.tools if view else [], indent=1) + "\n")
    for name, rows in built.items():
        print(f"{args.output_dir / name}: {len(rows)} {args.domain} tasks ({ENV_IDS[args.domain]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
