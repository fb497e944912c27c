"""bench/partial_credit.py end to end on a few tasks: every section is written, the numbers are sane, and the
hand-written part of the report is kept. A smoke test that keeps the benchmark working: no speed is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.partial_credit import gold_calls, play
from rollout.task_store import get_task_store

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "partial_credit.py"
SETTINGS = {
    "tasks_per_domain": {"telecom": 3, "airline": 1, "retail": 1},
    "cost_tasks": 1,
    "spam_runs": {"telecom": 1, "airline": 1, "retail": 1},
    "spam_length": 4,
    "groups_per_task": {"telecom": 1},
    "group_size": 4,
}
SECTIONS = (
    "## 1. Cost per episode",
    "## 2. Properties on every task",
    "## 3. Learning signal on synthetic weak-policy groups",
    "## 4. Learning signal on real rollouts of the CPU model",
    "## 5. The transfer guard",
)


def rollout_records(path: Path) -> None:
    """A rollout file as examples/cpu_rollout_batch.py writes it, from real episodes: gold prefixes of two tasks (the
    second group all failures), and one failed sample."""
    lines = []
    for group, task in enumerate(get_task_store().tasks("telecom", "train")[:2]):
        gold = gold_calls(task)
        for k in (0, 1, len(gold) - 1, len(gold) if group == 0 else 1):
            metadata = play(task, "telecom", gold[:k])
            record = {"group_index": group, "status": "COMPLETED", "reward": metadata.pop("reward")}
            record["metadata"] = {**metadata, "task_id": task.id}
            lines.append(json.dumps(record))
    lines.append(json.dumps({"group_index": 9, "status": "FAILED", "reward": 0.0, "metadata": {}}))
    path.write_text("\n".join(lines) + "\n")


def test_quick_run_writes_every_section_with_sane_numbers(tmp_path):
    out, data, rollouts = tmp_path / "partial_credit.md", tmp_path / "partial_credit.json", tmp_path / "batch.jsonl"
    rollout_records(rollouts)
    notes = "\n## Design and choices\n\nHand-written, kept across runs.\n"
    out.write_text("# an older run\n\n| stale | table |\n" + notes)
    command = [sys.executable, str(SCRIPT), "--out", str(out), "--json", str(data), "--settings", json.dumps(SETTINGS)]
    proc = subprocess.run(
        [*command, "--rollouts", str(rollouts), "--rollout-source", "two gold-prefix groups"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text()
    for heading in SECTIONS:
        assert heading in report, heading
    assert report.endswith(notes) and "stale" not in report
    results = json.loads(data.read_text())

    for domain, row in results["cost"].items():
        assert row["tasks"] == 1 and row["progress_ms_median"] > 0 and row["tau2_eval_ms_median"] > 0, domain
    telecom = results["properties"]["telecom"]
    assert telecom["tasks"] == 3 and telecom["ungradable_tasks"] == 0 and telecom["gold_fails"] == 0
    new, old = telecom["new"], telecom["old"]
    assert new["drops"] == 0 and new["counted_up"] == new["counted_steps"] > 0  # every showable step counts
    assert new["counted_up"] >= old["counted_up"]
    assert new["spam_runs"] == 3 and new["every_runs"] == 3
    assert new["half_above_nothing"] == new["half_tasks"] == 3  # half the gold fixes beat none
    assert new["half_vs_truncated_full"]["pairs"] == 3

    signal = results["synthetic"]["telecom"]
    assert signal["groups"] == 3 and set(signal["credits"]) >= {"checks (old)", "progress (new default)"}
    real = results["rollouts"]
    assert real["episodes"] == 8 and real["failed"] == 1 and real["groups"] == 2 and real["successes"] == 1
    assert real["all_fail_groups"] == 1
    assert real["without_progress"] == 0 and real["source"] == "two gold-prefix groups"
    assert real["credits"]["progress (new default)"]["signal_fraction"] == 1.0  # prefixes 0 < 1 fix
    guard = results["guard"]
    assert guard["progress + transfer guard"]["transfer_higher"] == 0
    assert guard["progress + transfer guard"]["transfer_lower"] > 0

    # The report can be re-rendered from the numbers alone.
    again = tmp_path / "again.md"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--from-json", str(data), "--out", str(again)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert again.read_text() == report[: report.index("\n## Design and choices")]
