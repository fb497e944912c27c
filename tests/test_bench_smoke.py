"""bench/rollout_harness.py --quick end to end (tiny sizes, near-zero delays): every section is written and its
numbers are sane. A smoke test that keeps the benchmark working, not a timed test: no speed is asserted."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "rollout_harness.py"
SECTIONS = (
    "## Targets",
    "## 1. Harness overhead",
    "## 2. Throughput against the bound",
    "## 3. The prior approach: tau2 `AgentGymEnv`",
    "## 4. Token bookkeeping per turn",
    "## 5. Memory per concurrent episode",
    "## 6. Evaluator",
    "## 7. Where an episode's CPU goes",
    "## 8. A floor under the CPU target",
)
SETTINGS = {"token_turns": 6, "concurrency": [1, 4], "gym_complete_episodes": 2, "threads_compare": 1}


def _positive(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_run_writes_every_section_with_sane_numbers(tmp_path):
    out, data = tmp_path / "benchmarks.md", tmp_path / "benchmarks.json"
    notes = "\n## Findings and fixes\n\nHand-written, kept across runs.\n"
    out.write_text("# an older run\n\n| stale | table |\n" + notes)
    command = [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--json", str(data)]
    proc = subprocess.run(
        [*command, "--settings", json.dumps(SETTINGS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = out.read_text()
    for heading in SECTIONS:
        assert heading in table, heading
    assert table.endswith(notes) and "stale" not in table  # tables rewritten, the hand-written part kept
    assert not re.search(r"\b(nan|inf)\b", table), "a number came out as nan or inf"
    results = json.loads(data.read_text())

    overhead = results["overhead"]
    assert overhead["unexpected"] == 0
    for key in ("per_turn_ms", "per_turn_in_process_ms", "per_episode_ms", "per_episode_in_process_ms"):
        assert _positive(overhead[key]["median"]) and overhead[key]["p99"] >= overhead[key]["median"], key
    # The harness's share of an episode is a part of it: below the whole CPU-bound episode, above one turn.
    assert overhead["per_turn_ms"]["median"] < overhead["per_episode_ms"]["median"]
    # Each request's client-side wait contains its service time, so the in-process share is the smaller one.
    assert overhead["per_turn_in_process_ms"]["median"] <= overhead["per_turn_ms"]["median"] + 1e-9

    rows = {row["concurrency"]: row for row in results["throughput"]}
    assert sorted(rows) == SETTINGS["concurrency"]
    for row in rows.values():
        assert row["unexpected"] == 0 and row["episodes"] == row["concurrency"]
        assert 0 < row["fraction"] <= 1.2, row
        # Gold-like scripts: device tool calls by the user, and tau2 judges the replayed gold actions a success.
        assert row["user_tool_calls_per_episode"] >= 1 and row["reward_mean"] == 1.0, row
        assert row["bound_wall_s"] >= row["floor_s"] > 0, row
        assert _positive(row["episodes_per_s"]) and _positive(row["bound_per_s"])
        assert row["lag_p99_ms"] >= 0 and row["lag_max_ms"] >= row["lag_p99_ms"]
        assert _positive(row["cpu_ms_per_episode"])
    threads = results["threads"]  # the largest C again, CPU work in worker threads
    assert threads["workers"] == 1 and threads["concurrency"] == 4 and threads["unexpected"] == 0
    assert 0 < threads["fraction"] <= 1.2
    assert "worker threads (`TAU2_CPU_WORKERS=1`)" in table

    gym = results["gym"]["complete"]
    assert gym["finished"] == gym["episodes"] == SETTINGS["gym_complete_episodes"]
    # The gym plays the same gold-like scripts (its user requests name their episode too): tau2 judges them a success.
    assert gym["reward_mean"] == 1.0 and results["gym"]["repaired"][0]["reward_mean"] == 1.0
    assert _positive(gym["reset_s"]) and _positive(gym["step_s"]) and 0 < gym["blocked_fraction"] <= 1.2
    compare = results["gym_compare"]
    assert _positive(compare["ratio"]) and _positive(compare["ratio_small"])
    assert compare["ours_per_s"] > compare["theirs_per_s"]  # blocking calls serialize the gym's episodes
    repaired = results["gym"]["repaired"]
    assert [row["concurrency"] for row in repaired] == [2] and repaired[0]["finished"] == 2
    assert _positive(compare["repaired"][0]["ratio"]) and _positive(compare["repaired"][0]["theirs_cpu_ms"])

    tokens = results["tokens"]
    assert [row["turn"] for row in tokens["rows"]] == list(range(1, SETTINGS["token_turns"] + 1))
    assert all(_positive(row["ours_ms"]) and _positive(row["full_ms"]) for row in tokens["rows"])
    assert tokens["rows"][-1]["full_ms"] > tokens["rows"][-1]["ours_ms"]  # the whole conversation vs one message

    memory = results["memory"]
    assert memory["concurrency"] == max(SETTINGS["concurrency"])
    assert 0 <= memory["mb_per_episode"] < 100 and memory["rss_peak_mb"] >= memory["rss_before_mb"]
    assert 0 < memory["traced_mb_per_episode"] < 100  # tracemalloc's peak of the wave's Python allocations

    evaluation = results["eval"]
    assert [run["concurrency"] for run in evaluation["runs"]] == [4, 4, 1]
    assert [run["sync_every_s"] for run in evaluation["runs"]] == [1.0, 0.0, 1.0]  # grouped, every episode, grouped
    assert _positive(evaluation["grouped_sync_gain"]) and all(_positive(run["cpu_s"]) for run in evaluation["runs"])
    for run in evaluation["runs"]:
        assert run["episodes"] == 4 and run["failed"] == 0 and _positive(run["wall_s"])
    assert _positive(evaluation["speedup"])

    assert all(_positive(row["ms"]) for row in results["breakdown"])
    floor = results["floor"]
    assert floor["episodes"] == 2 and floor["prompt_tokens"] > 1000 and floor["user_request_kb"] > 1
    assert _positive(floor["policy_requests_per_30_turns"]) and _positive(floor["user_requests_per_30_turns"])
    priced = [f"{kind}_{client}_ms" for kind in ("policy", "user") for client in ("recipe", "minimal")]
    for key in ("verdict_ms_per_30_turns", "tools_ms_per_30_turns", *priced):
        assert _positive(floor[key]), key
    tau2_ms = floor["verdict_ms_per_30_turns"] + floor["tools_ms_per_30_turns"]
    for client in ("recipe", "minimal"):
        expected = tau2_ms + sum(
            floor[f"{kind}_requests_per_30_turns"] * floor[f"{kind}_{client}_ms"] for kind in ("policy", "user")
        )
        assert math.isclose(floor[f"floor_{client}_client_ms"], expected, rel_tol=1e-9), client
    assert len(results["targets"]) == 5 and all(isinstance(t["met"], bool) for t in results["targets"])
    assert results["meta"]["cores"] >= 1 and results["meta"]["load_before"]


def test_bound_simulation_queues_requests_behind_busy_slots():
    """simulate_bound: two episodes of one 1 s policy request each, one policy slot: the second waits (2 s)."""
    from bench.rollout_harness import Latency, simulate_bound

    records = [("policy", "a", 0.0, 0.0, 1.0, 1.0), ("policy", "b", 0.1, 1.0, 2.0, 1.0), ("user", "a", 1.2, 0, 0, 0.5)]
    one_slot = simulate_bound(records, Latency(policy_slots=1, user_slots=0))
    assert one_slot == {"bound_wall_s": 2.0, "floor_s": 1.5}
    unbounded = simulate_bound(records, Latency(policy_slots=0, user_slots=0))
    assert unbounded["bound_wall_s"] == 1.5


def test_gold_like_scripts_replay_the_gold_actions():
    from bench.rollout_harness import build_scripts
    from rollout.task_store import get_task_store

    tasks = get_task_store().tasks("telecom", "train")[:5]
    for task, script in zip(tasks, build_scripts(tasks, 20, 50, seed=0)):
        assert 20 <= len(script.policy) <= 50
        gold = [a for a in task.evaluation_criteria.actions if a.name != "transfer_to_human_agents"]
        device = [turn.device.name for turn in script.user if turn.device is not None]
        assert [a.name for a in gold if a.requestor == "user"] == [n for n in device if not n.startswith("check_")]
        # One user turn per message the agent sends the user: the greeting and every text turn.
        assert len(script.user) == 1 + sum(isinstance(step, str) for step in script.policy)
