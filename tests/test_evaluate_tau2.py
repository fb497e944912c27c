"""eval/evaluate_tau2.py end to end: the real engine, real tau2 tasks and evaluator, the real tokenizer, a scripted
policy server speaking sglang's wire protocol, and the scripted user.

The scripted server recognizes a task by the scripted user's opening message (the test uses tasks whose openings
differ) and answers with that task's gold script (rollout.scripted.gold_agent_turns rendered by
rollout.tool_format.format_assistant_turn). One task plays its script with one user action left out, so it never
finishes (max_steps, truncated) and gets reward 0 with re-graded partial checks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from eval import serving
from eval.evaluate_tau2 import main
from rollout.scripted import gold_agent_turns, opening_message
from rollout.task_store import get_task_store
from rollout.tool_format import format_assistant_turn
from tests.conftest import free_port
from tests.engine_helpers import agent_turn_index, gold_script_texts
from tests.scripted_policy_server import Fault, ScriptedPolicyServer
from tests.tau2_gold import assertions_met_after

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "eval" / "evaluate_tau2.py"
MAX_STEPS = "30"
SECRET = "sk-test-secret-value-0123456789"


def _unfinished_choice(task: Any) -> int | None:
    """A user action whose omission leaves some, not all, env assertions met (so partial credit is in (0, 1))."""
    actions = task.evaluation_criteria.actions or []
    for index, action in enumerate(actions):
        if action.requestor == "user":
            met = assertions_met_after(task, "telecom", skip=[index])
            if any(met) and not all(met):
                return index
    return None


def _three_tasks() -> tuple[list[Any], int]:
    """Two tasks for the gold script and a third to leave unfinished (with the index of the gold action it leaves
    out); the scripted user's openings of the three differ (the policy server tells tasks apart by it)."""
    seen: dict[str, Any] = {}
    for task in get_task_store().tasks("telecom", "test"):
        seen.setdefault(opening_message(task), task)
    distinct = list(seen.values())
    unfinished, drop = next((task, i) for task in distinct if (i := _unfinished_choice(task)) is not None)
    gold = [task for task in distinct if task is not unfinished][:2]
    return [*gold, unfinished], drop


def _partial_script(task: Any, drop: int) -> list[str]:
    """The gold script without the instruction for gold action `drop`: the user never finishes its actions."""
    turns = gold_agent_turns(task, solo_mode=False)  # one turn per gold action, then the closing line
    assert not turns[drop].tool_calls, "the dropped turn must be an instruction to the user"
    return [format_assistant_turn(t.content, t.tool_calls) for i, t in enumerate(turns) if i != drop]


class Responder:
    """Maps the scripted user's opening to a script; `fail` answers 400 for tasks, `hold` never answers them while a
    test runs (the request ends when its client goes away)."""

    def __init__(self, scripts: dict[str, list[str]]) -> None:
        self.scripts = scripts
        self.fail: set[str] = set()
        self.hold: set[str] = set()
        self.lock = threading.Lock()

    def __call__(self, prompt_text: str, params: dict[str, Any]) -> str | Fault:
        for opening, texts in self.scripts.items():
            if opening in prompt_text:
                if opening in self.fail:
                    return Fault(status=400)
                if opening in self.hold:
                    return Fault(delay_s=3600, text="held")
                index = agent_turn_index(prompt_text, solo_mode=False)
                return texts[index] if index < len(texts) else "Is there anything else I can help you with?"
        return "I cannot help with that."


@pytest.fixture(scope="module")
def chosen() -> tuple[list[Any], int]:
    return _three_tasks()


@pytest.fixture(scope="module")
def tasks(chosen) -> list[Any]:
    return chosen[0]


@pytest.fixture(scope="module")
def responder(chosen) -> Responder:
    tasks, drop = chosen
    scripts = {opening_message(t): gold_script_texts(t, solo_mode=False) for t in tasks[:2]}
    scripts[opening_message(tasks[2])] = _partial_script(tasks[2], drop)
    return Responder(scripts)


@pytest.fixture(scope="module")
def policy_url(smollm2_tokenizer, responder):
    with ScriptedPolicyServer(smollm2_tokenizer, responder) as url:
        yield url


@pytest.fixture
def reset_responder(responder):
    yield responder
    responder.fail = set()
    responder.hold = set()


def _args(policy_url: str, output: Path, tokenizer_dir: Path, task_ids: list[str], *extra: str) -> list[str]:
    return [
        "--sglang-url",
        policy_url,
        "--tokenizer",
        str(tokenizer_dir),
        "--model-name",
        "scripted-gold",
        "--output-path",
        str(output),
        "--domain",
        "telecom",
        "--task-split",
        "test",
        "--task-ids",
        ",".join(task_ids),
        "--user-kind",
        "scripted",
        "--max-steps",
        MAX_STEPS,
        "--no-progress",
        "--policy-max-retries",
        "0",
        *extra,
    ]


def _jsonl(path: Path, allow_torn_tail: bool = False) -> list[dict[str, Any]]:
    lines = path.read_text().split("\n")
    if allow_torn_tail:  # a run killed mid-write may leave an incomplete last line
        lines = lines[:-1]
    return [json.loads(line) for line in lines if line.strip()]


def _check_run(output: Path, tasks: list[Any], trials: int = 2) -> dict[str, Any]:
    """The expected outcome of the 3-task run: gold, gold, unfinished."""
    data = json.loads(output.read_text())
    n = 3 * trials
    assert data["complete"] and data["recorded_episodes"] == n
    assert data["pass_at_1"] == pytest.approx(2 / 3)
    assert data["pass_hat_k"]["1"] == pytest.approx(2 / 3)
    if trials >= 2:
        assert data["pass_hat_k"]["2"] == pytest.approx(2 / 3)  # deterministic: a task passes all or none
    assert data["avg_reward"] == pytest.approx(2 / 3)
    assert data["counts"]["successes"] == 2 * trials and data["counts"]["failed_episodes"] == 0
    assert data["by_termination"]["user_stop"]["episodes"] == 2 * trials
    assert data["by_termination"]["max_steps"]["episodes"] == trials
    assert data["truncated"]["episodes"] == trials and data["truncated"]["graded"] == trials
    # The unfinished task: tau2 grades nothing (partial 0 in the headline); the re-graded checks see progress.
    assert data["avg_partial_score"] == pytest.approx(2 / 3)
    assert 0.0 < data["truncated"]["avg_partial_score_from_truncated_checks"] < 1.0
    assert data["avg_partial_score_with_truncated_checks"] > data["avg_partial_score"]
    low, high = data["pass_at_1_ci"]["low"], data["pass_at_1_ci"]["high"]
    assert low <= data["pass_at_1"] <= high
    subtasks = {t.id.split("]")[0][1:] for t in tasks}
    assert set(data["by_subtask"]) == subtasks
    assert sum(g["episodes"] for g in data["by_subtask"].values()) == n
    return data


# --------------------------------------------------------------------------------------------------- end to end


def test_end_to_end_files_agree_and_rerun_resumes(tmp_path, policy_url, tasks, smollm2_model_dir, monkeypatch, capsys):
    monkeypatch.setenv("EVAL_TEST_USER_KEY", SECRET)
    output = tmp_path / "run" / "results.json"
    ids = [t.id for t in tasks]
    args = _args(policy_url, output, smollm2_model_dir, ids, "--num-trials", "2", "--concurrency", "3")
    assert main([*args, "--user-api-key-env", "EVAL_TEST_USER_KEY"]) == 0
    data = _check_run(output, tasks)
    episodes = output.with_suffix(".episodes.jsonl")
    records = _jsonl(episodes)
    assert len(records) == 6
    assert sorted((r["task_id"], r["trial"]) for r in records) == sorted((i, k) for i in ids for k in range(2))
    by_pair = {(r["task_id"], r["trial"]): r for r in records}
    for result in data["results"]:
        record = by_pair[(result["task_id"], result["trial"])]
        assert record["config_hash"] == data["config_hash"]
        assert record["episode"]["reward"] == result["reward"]
        assert record["episode"]["messages"] and record["episode"]["agent_messages"]
        assert record["subtask"] == result["subtask"] and record["persona"] == result["persona"]
        assert record["timings"]["wall_s"] == result["wall_s"]
    # The run configuration is complete and carries no secret.
    config = data["config"]
    assert config["model"] == "scripted-gold" and config["user_sim"]["kind"] == "scripted"
    assert config["user_sim"]["api_key_set"] is True and config["episode"]["max_steps"] == int(MAX_STEPS)
    assert config["sampling"]["temperature"] == 0.0 and config["tau2_version"]
    assert "--num-trials" in config["command_line"]
    for path in (output, episodes, output.with_suffix(".md")):
        assert SECRET not in path.read_text()
    assert SECRET not in capsys.readouterr().err
    markdown = output.with_suffix(".md").read_text()
    assert "66.7%" in markdown and "mobile_data_issue" in markdown and "pass^k" in markdown
    assert output.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same command again: nothing is played, the summary is rebuilt from the file.
    assert main([*args, "--user-api-key-env", "EVAL_TEST_USER_KEY"]) == 0
    again = json.loads(output.read_text())
    assert again["run"]["new_episodes"] == 0 and again["run"]["resumed_episodes"] == 6
    assert {k: again[k] for k in ("pass_at_1", "pass_hat_k", "by_subtask")} == {
        k: data[k] for k in ("pass_at_1", "pass_hat_k", "by_subtask")
    }
    assert len(_jsonl(episodes)) == 6

    # More trials extend the same file: only the new (task, trial) pairs are played.
    extended = [*args[: args.index("--num-trials")], "--num-trials", "3", "--concurrency", "3"]
    assert main([*extended, "--user-api-key-env", "EVAL_TEST_USER_KEY"]) == 0
    third = _check_run(output, tasks, trials=3)
    assert third["run"]["new_episodes"] == 3 and len(_jsonl(episodes)) == 9


def test_resume_after_kill_loses_nothing(tmp_path, policy_url, tasks, smollm2_model_dir, reset_responder):
    output = tmp_path / "results.json"
    episodes = output.with_suffix(".episodes.jsonl")
    args = _args(policy_url, output, smollm2_model_dir, [t.id for t in tasks], "--num-trials", "2")
    # The third task's policy turns never answer while the run lives: its two episodes stay in flight, the other four
    # finish (three slots: one is always free), and the run is killed in exactly that state.
    reset_responder.hold = {opening_message(tasks[2])}
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), *args, "--concurrency", "3"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240  # a bound on waiting; normally a few seconds
        while time.monotonic() < deadline:
            if episodes.exists() and len(episodes.read_text().splitlines()) >= 4:
                break
            assert process.poll() is None, process.stdout.read().decode(errors="replace")
            time.sleep(0.1)
        else:
            pytest.fail("no episode was recorded in time")
        os.kill(process.pid, signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(30)
    before = _jsonl(episodes, allow_torn_tail=True)
    assert len(before) == 4 and {r["task_id"] for r in before} == {tasks[0].id, tasks[1].id}
    assert not output.exists()  # the summary is written only at the end
    with episodes.open("a") as handle:  # a write torn by the kill
        handle.write('{"version": 1, "task_id": "[mms_issue]torn", "trial": 0, "episo')

    reset_responder.hold = set()
    assert main(args) == 0
    after = _jsonl(episodes)
    pairs = [(r["task_id"], r["trial"]) for r in after]
    assert len(pairs) == len(set(pairs)) == 6, "no duplicated and no missing episode"
    assert after[: len(before)] == before  # finished episodes were kept as they were
    data = _check_run(output, tasks)
    assert data["run"]["new_episodes"] == 6 - len(before)


def test_failed_episodes_counted_excluded_and_retried(
    tmp_path, policy_url, tasks, smollm2_model_dir, reset_responder, capsys
):
    output = tmp_path / "results.json"
    good, bad = tasks[0], tasks[1]
    args = _args(policy_url, output, smollm2_model_dir, [good.id, bad.id])
    reset_responder.fail = {opening_message(bad)}
    assert main(args) == 0
    data = json.loads(output.read_text())
    assert data["counts"]["failed_episodes"] == 1 and data["pass_at_1"] == 0.5  # a failure counts as a failure
    assert data["failed"]["episodes_list"] == [{"task_id": bad.id, "trial": 0}]
    assert "HTTP 400" in next(iter(data["failed"]["by_error"]))
    assert "1 episode(s) failed" in capsys.readouterr().err

    assert main([*args, "--exclude-failed"]) == 0  # not part of the configuration: the file is reused
    data = json.loads(output.read_text())
    assert data["pass_at_1"] == 1.0 and data["counts"]["counted_episodes"] == 1
    assert data["counts"]["failed_episodes"] == 1 and data["run"]["new_episodes"] == 0

    reset_responder.fail = set()
    assert main([*args, "--retry-failed"]) == 0
    data = json.loads(output.read_text())
    assert data["pass_at_1"] == 1.0 and data["counts"]["failed_episodes"] == 0 and data["run"]["new_episodes"] == 1
    assert len(_jsonl(output.with_suffix(".episodes.jsonl"))) == 3  # the failure stays in the log, superseded


def test_every_episode_failing_is_a_runtime_failure(tmp_path, policy_url, tasks, smollm2_model_dir, reset_responder):
    output = tmp_path / "results.json"
    reset_responder.fail = {opening_message(tasks[1])}
    assert main(_args(policy_url, output, smollm2_model_dir, [tasks[1].id])) == 1
    data = json.loads(output.read_text())  # the summary is still written, and says so
    assert data["counts"]["failed_episodes"] == 1 and data["pass_at_1"] == 0.0


def test_num_tasks_takes_the_first_tasks_in_tau2_order(tmp_path, policy_url, smollm2_model_dir):
    output = tmp_path / "results.json"
    args = _args(policy_url, output, smollm2_model_dir, ["x"], "--max-steps", "6")
    args = [a for a in args if a not in ("--task-ids", "x")] + ["--num-tasks", "2"]
    assert main(args) == 0
    data = json.loads(output.read_text())
    assert data["task_ids"] == get_task_store().task_ids("telecom", "test")[:2]
    assert data["recorded_episodes"] == 2 and data["config"]["task_selection"] == "first_n"


# ------------------------------------------------------------------------------------------------------ compare


def test_compare_prints_side_by_side(tmp_path, policy_url, tasks, smollm2_model_dir, capsys):
    base = tmp_path / "base.json"
    assert main(_args(policy_url, base, smollm2_model_dir, [t.id for t in tasks], "--num-trials", "2")) == 0
    grpo = tmp_path / "grpo.json"
    other = json.loads(base.read_text())
    other["pass_at_1"] = 0.9
    other["config"]["user_sim"]["model"] = "another-user-model"
    grpo.write_text(json.dumps(other))
    capsys.readouterr()
    assert main(["--compare", str(base), str(grpo)]) == 0
    table = capsys.readouterr().out
    lines = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("|")}
    assert "66.7%" in lines["pass@1 [95% CI]"] and "90.0%" in lines["pass@1 [95% CI]"]
    assert "pass^2" in lines and "pass@2 (any success)" in lines
    assert any(key.startswith("pass@1 mobile_data_issue") for key in lines)
    assert "| base | grpo |" in table.splitlines()[0].replace("  ", " ")
    assert "not directly comparable" in table and "user model differs" in table

    assert main(["--compare", str(base), str(tmp_path / "missing.json")]) == 2
    assert "no such results file" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert main(["--compare", str(tmp_path / "bad.json")]) == 2


# ------------------------------------------------------------------------------------------------ tau2's own tools


def _tau2_cli() -> list[str]:
    script = Path(sys.executable).parent / "tau2"
    return [str(script)] if script.exists() else [sys.executable, "-c", "from tau2.cli import main; main()"]


def test_tau2_flag_spellings_parse_like_the_recipes():
    from eval.evaluate_tau2 import parse_args

    common = ["--sglang-url", "http://x", "--model-name", "m"]
    tau2_flags = ["--save-to", "runs/base", "-d", "telecom", "--task-split-name", "train", "--max-concurrency", "16"]
    tau2_flags += ["--user-llm", "openai/Qwen3-32B", "--task-ids", "a", "b,c", "--num-trials", "4"]
    recipe_flags = ["--output-path", "runs/base.json", "--domain", "telecom", "--task-split", "train"]
    recipe_flags += ["--concurrency", "16", "--user-model", "Qwen3-32B", "--user-kind", "llm", "--task-ids", "a,b,c"]
    tau2, recipe = parse_args([*common, *tau2_flags]), parse_args([*common, *recipe_flags, "--num-trials", "4"])
    keys = ("output_path", "domain", "task_split", "concurrency", "user_model", "user_kind", "task_ids", "num_trials")
    assert {k: getattr(tau2, k) for k in keys} == {k: getattr(recipe, k) for k in keys}
    assert tau2.task_ids == ["a", "b", "c"] and tau2.output_path == "runs/base.json"
    gemini = parse_args([*common, "--output-path", "r.json", "--user-llm", "gemini/gemini-2.5-flash"])
    assert (gemini.user_kind, gemini.user_model) == ("gemini", "gemini-2.5-flash")
    kept = parse_args([*common, "--output-path", "r.json", "--user-llm", "gpt-4.1", "--user-kind", "gemini"])
    assert (kept.user_kind, kept.user_model) == ("gemini", "gpt-4.1")  # an explicit kind wins
    assert main([*common, "--output-path", "r.json", "--user-llm", "a", "--user-model", "b"]) == 2


def test_tau2_tools_read_a_recipe_run(tmp_path, policy_url, tasks, smollm2_model_dir, reset_responder, capsys):
    """results.tau2.json loads with tau2's loader; tau2's compute_metrics equals the summary (with and without
    infrastructure failures); tau2's re-evaluation from the trajectories gives the recorded rewards; tau2's CLI
    (`tau2 evaluate-trajs`, `tau2 view`) opens it."""
    from rollout.tau2_setup import import_tau2

    import_tau2()
    from tau2.data_model.simulation import Results
    from tau2.metrics.agent_metrics import compute_metrics
    from tau2.scripts.evaluate_trajectories import compute_simulation_rewards

    reset_responder.fail = {opening_message(tasks[1])}  # infrastructure failures: HTTP 400 for the second task
    args = _args(policy_url, tmp_path / "unused.json", smollm2_model_dir, [t.id for t in tasks], "--num-trials", "2")
    args = args[: args.index("--output-path")] + args[args.index("--output-path") + 2 :]
    args = [a for a in args if a not in ("--task-ids", ",".join(t.id for t in tasks))]
    args += ["--save-to", str(tmp_path / "run"), "--task-ids", *[t.id for t in tasks], "--max-concurrency", "3"]
    assert main(args) == 0
    data = json.loads((tmp_path / "run.json").read_text())
    path = tmp_path / "run.tau2.json"
    assert data["files"]["tau2"] == str(path) and data["counts"]["failed_episodes"] == 2

    def check_file(expected_simulations: int) -> Any:
        results = Results.load(path)  # tau2's own loader
        assert len(results.simulations) == expected_simulations
        assert [t.id for t in results.tasks] == [t.id for t in tasks]
        tau2 = compute_metrics(results)
        summary = json.loads((tmp_path / "run.json").read_text())
        assert tau2.avg_reward == pytest.approx(summary["avg_reward"], abs=1e-12)
        assert {str(k): v for k, v in tau2.pass_hat_ks.items()} == pytest.approx(summary["pass_hat_k"], abs=1e-12)
        assert summary["pass_hat_1"] == pytest.approx(tau2.pass_hat_ks[1], abs=1e-12)
        assert summary["pass_hat_2"] == pytest.approx(tau2.pass_hat_ks[2], abs=1e-12)
        assert summary["tau2_metrics"]["pass_hat_1"] == pytest.approx(tau2.pass_hat_ks[1], abs=1e-12)
        assert summary["tau2_results"]["agrees_with_summary"] is True
        return results

    results = check_file(6)
    assert data["pass_hat_1"] == pytest.approx(1 / 3)  # one good task of three: the failures count as failures
    info = results.info
    assert info.num_trials == 2 and info.max_steps == int(MAX_STEPS) and info.max_errors == 10
    assert info.agent_info.implementation == "llm_agent" and info.agent_info.llm == "scripted-gold"
    assert info.user_info.implementation == "scripted_user" and info.environment_info.domain_name == "telecom"
    assert len(info.git_commit) == 40
    by_pair = {(s.task_id, s.trial): s for s in results.simulations}
    assert (
        set(by_pair) == {(t.id, k) for t in tasks for k in range(2)} and len({s.id for s in results.simulations}) == 6
    )
    records = {(r["task_id"], r["trial"]): r for r in _jsonl(tmp_path / "run.episodes.jsonl")}
    for pair, simulation in by_pair.items():
        episode = records[pair]["episode"]
        if pair[0] == tasks[1].id:  # marked as tau2 run --skip-failed-samples marks a failed sample
            assert simulation.skipped and simulation.termination_reason.value == "agent_error"
            assert simulation.reward_info.reward == 0.0 and "HTTP 400" in simulation.reward_info.info["failure"]
            continue
        assert not simulation.skipped and simulation.id == episode["simulation_id"]
        assert simulation.reward_info.reward == episode["reward"] and simulation.duration > 0
        assert simulation.start_time < simulation.end_time and simulation.agent_cost == 0.0
        assert simulation.user_cost == 0.0  # the scripted user costs nothing
        assert simulation.termination_reason.value == episode["termination_reason"]  # user_stop / max_steps
        assert len(simulation.messages) == len(episode["messages"])
    # tau2 evaluate-trajs grades the trajectories again on fresh environments: the same rewards.
    regraded = compute_simulation_rewards(results)
    for simulation in regraded.simulations:
        if not simulation.skipped:
            assert simulation.reward_info.reward == by_pair[(simulation.task_id, simulation.trial)].reward_info.reward

    out_dir = tmp_path / "regraded"
    done = subprocess.run(
        [*_tau2_cli(), "evaluate-trajs", str(path), "-o", str(out_dir)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Agent Metrics" in done.stdout and (out_dir / f"updated_{path.name}").exists()
    # tau2 view: select the file, show the metrics, open the first simulation, skip the note, exit.
    view = subprocess.run(
        [*_tau2_cli(), "view", "--file", str(path)],
        input="1\n1\n2\n3\n1\n\n5\n",
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert view.returncode == 0, view.stdout[-2000:] + view.stderr[-2000:]
    assert "Loaded 6 simulations" in view.stdout and "Pass^k" in view.stdout and "Task Details" in view.stdout

    # --exclude-failed: the failures leave the tau2 file, and tau2's numbers still equal the summary.
    assert main([*args, "--exclude-failed"]) == 0
    check_file(4)
    assert json.loads((tmp_path / "run.json").read_text())["pass_hat_1"] == pytest.approx(1 / 2)
    capsys.readouterr()


def test_baselines_beside_the_result(tmp_path, policy_url, tasks, smollm2_model_dir, capsys):
    """The shortcut baselines are played on the same tasks with the same user and reported with a verdict."""
    from rollout.scripted import SCRIPTED_POLICIES

    output = tmp_path / "results.json"
    assert main(_args(policy_url, output, smollm2_model_dir, [t.id for t in tasks])) == 0
    data = json.loads(output.read_text())
    baselines = data["baselines"]
    assert list(baselines["policies"]) == list(SCRIPTED_POLICIES) and baselines["complete"]
    assert baselines["user_sim"]["kind"] == "scripted" and baselines["limits"]["max_steps"] == int(MAX_STEPS)
    records = _jsonl(output.with_suffix(".baselines.jsonl"))
    assert sorted((r["policy"], r["task_id"]) for r in records) == sorted(
        (p, t.id) for p in SCRIPTED_POLICIES for t in tasks
    )
    gold = baselines["policies"]["gold"]
    assert gold["pass_at_1"] == 1.0 and gold["transfer_rate"] == pytest.approx(
        sum(any(a.name == "transfer_to_human_agents" for a in t.evaluation_criteria.actions) for t in tasks) / 3
    )
    transfer = baselines["policies"]["always_transfer"]
    assert transfer["transfer_rate"] == 1.0
    for name, policy in baselines["policies"].items():  # each record is tau2's verdict on that policy's episode
        mine = [r for r in records if r["policy"] == name]
        assert policy["successes"] == sum(r["success"] for r in mine)
        assert policy["solved_task_ids"] == sorted(r["task_id"] for r in mine if r["success"])
    check = baselines["shortcut_check"]
    solvable = {
        t
        for name in ("always_transfer", "shotgun", "do_nothing")
        for t in baselines["policies"][name]["solved_task_ids"]
    }
    model_successes = {r["task_id"] for r in data["results"] if r["success"]}
    assert check["shortcut_resistant_tasks"] == len({t.id for t in tasks} - solvable)
    assert check["model_on_shortcut_resistant_tasks"]["successes"] == len(model_successes - solvable)
    assert check["verdict"] and set(check["by_subtask"]) == set(data["by_subtask"])
    markdown = output.with_suffix(".md").read_text()
    assert "Beside the shortcut baselines" in markdown and "always-transfer" in markdown and "Verdict" in markdown
    assert "tau2's own metrics" in markdown and "pass_hat_1" in markdown

    # Re-running plays nothing again; --no-baselines leaves them out.
    assert main(_args(policy_url, output, smollm2_model_dir, [t.id for t in tasks])) == 0
    assert len(_jsonl(output.with_suffix(".baselines.jsonl"))) == len(records)
    assert main([*_args(policy_url, output, smollm2_model_dir, [t.id for t in tasks]), "--no-baselines"]) == 0
    assert "baselines" not in json.loads(output.read_text())

    # Baselines of other settings are refused, the file left as it was; --overwrite empties it and replays them all.
    baselines_file = output.with_suffix(".baselines.jsonl")
    stale = [{**r, "config_hash": "0" * 16, "config": {**r["config"], "max_steps": 7}} for r in records[:2]]
    baselines_file.write_text("".join(json.dumps(r) + "\n" for r in stale + records[2:]))
    before = baselines_file.read_bytes()
    capsys.readouterr()
    assert main(_args(policy_url, output, smollm2_model_dir, [t.id for t in tasks])) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the episodes' "resuming" line
    assert "2 baseline episode(s) from another configuration" in err and "max_steps: 7 -> " in err
    assert "--overwrite to replay them" in err and baselines_file.read_bytes() == before
    assert main([*_args(policy_url, output, smollm2_model_dir, [t.id for t in tasks]), "--overwrite"]) == 0
    replayed = _jsonl(baselines_file)
    assert len(replayed) == len(records) and {r["config_hash"] for r in replayed} == {records[0]["config_hash"]}


def _tau2_run_results(tasks: list[Any], save_to: Path) -> Path:
    """A Results JSON written by tau2's own run machinery (`tau2.run.run_tasks`, what `tau2 run` calls): the
    shotgun policy as a registered tau2 agent and the scripted customer as a registered tau2 user; no LLM."""
    from rollout.tau2_setup import import_tau2, quiet_tau2_logging
    from tests.tau2_reference import Tau2ScriptedAgent, Tau2ScriptedUser

    registry = import_tau2()
    from tau2.agent.llm_agent import LLMAgent
    from tau2.run import run_tasks
    from tau2.user.base import BaseUser

    by_scenario = {str(task.user_scenario): task for task in tasks}

    class ShotgunAgent(LLMAgent):  # tau2's run_task builds LLMAgent subclasses with tools, policy, llm, llm_args
        def __init__(self, tools, domain_policy, llm=None, llm_args=None):
            super().__init__(tools=tools, domain_policy=domain_policy, llm=llm, llm_args=llm_args)
            self.script = Tau2ScriptedAgent(tools=[], domain_policy=domain_policy, task=None, policy="shotgun")

        def get_init_state(self, message_history=None):
            return self.script.get_init_state(message_history)

        def generate_next_message(self, message, state):
            return self.script.generate_next_message(message, state)

    class ScriptedCustomer(BaseUser):  # tau2's run_task builds users from the task's instructions
        def __new__(cls, tools=None, instructions=None, llm=None, llm_args=None):
            return Tau2ScriptedUser(by_scenario[str(instructions)], tools)

    if "recipe_test_shotgun" not in registry.get_agents():
        registry.register_agent(ShotgunAgent, "recipe_test_shotgun")
        registry.register_user(ScriptedCustomer, "scripted_user")
    try:
        run_tasks(
            domain="telecom",
            tasks=tasks,
            agent="recipe_test_shotgun",
            user="scripted_user",
            llm_agent="shotgun",
            llm_args_agent={},
            llm_user=None,
            llm_args_user={},
            num_trials=2,
            max_steps=int(MAX_STEPS),
            save_to=save_to,
            console_display=False,
            max_concurrency=1,
            log_level="ERROR",
        )
    finally:
        quiet_tau2_logging()  # run_tasks replaces loguru's sinks
    return save_to


def test_compare_puts_a_tau2_run_beside_a_recipe_run(tmp_path, policy_url, tasks, smollm2_model_dir, capsys):
    from rollout.tau2_setup import import_tau2

    import_tau2()
    from tau2.data_model.simulation import Results
    from tau2.metrics.agent_metrics import compute_metrics

    recipe = tmp_path / "recipe.json"
    assert main(_args(policy_url, recipe, smollm2_model_dir, [t.id for t in tasks], "--num-trials", "2")) == 0
    tau2_run = _tau2_run_results(tasks, tmp_path / "tau2_shotgun.json")
    tau2 = compute_metrics(Results.load(tau2_run))
    capsys.readouterr()
    assert main(["--compare", str(recipe), str(tau2_run), "--output-path", str(tmp_path / "cmp")]) == 0
    captured = capsys.readouterr()
    lines = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in captured.out.splitlines() if "|" in line}
    assert [c.strip() for c in lines[""]] == ["recipe", "tau2_shotgun"]
    assert lines["pass@1 [95% CI]"][1].strip().startswith(f"{100 * tau2.pass_hat_ks[1]:.1f}%")
    assert lines["pass^2"][1].strip() == f"{100 * tau2.pass_hat_ks[2]:.1f}%"
    assert lines["avg reward"][1].strip() == f"{tau2.avg_reward:.3f}"
    assert lines["source"][1].strip() == "tau2 Results"
    assert "(no baselines in this file)" in lines["beats the shortcuts"][1]
    assert lines["baseline shotgun pass@1"][0].strip() != "-" and lines["baseline shotgun pass@1"][1].strip() == "-"
    # The tau2 run played the shotgun on the same tasks with the same scripted user: the same score as the baseline.
    shotgun = json.loads(recipe.read_text())["baselines"]["policies"]["shotgun"]
    assert tau2.pass_hat_ks[1] == pytest.approx(shotgun["pass_at_1"])
    assert "user simulator differs" not in captured.out and "max steps differs" not in captured.out
    assert (tmp_path / "cmp.md").read_text().count("tau2_shotgun") >= 1
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------- bad input


def _bad(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line
    return err


def test_bad_input_is_one_line_and_exit_2(tmp_path, policy_url, tasks, smollm2_model_dir, capsys, monkeypatch):
    output = tmp_path / "bad" / "results.json"
    base = _args(policy_url, output, smollm2_model_dir, [tasks[0].id])

    def with_(flag: str, value: str) -> list[str]:
        args = list(base)
        args[args.index(flag) + 1] = value
        return args

    assert "unknown domain 'nodomain'" in _bad(capsys, with_("--domain", "nodomain"))
    assert "unknown split 'dev'" in _bad(capsys, with_("--task-split", "dev"))
    assert "unknown task id(s)" in _bad(capsys, with_("--task-ids", "[mms_issue]nope"))
    assert "does not exist" in _bad(capsys, with_("--tokenizer", str(tmp_path / "nowhere")))
    port = free_port()
    assert "no policy server answers" in _bad(capsys, with_("--sglang-url", f"http://127.0.0.1:{port}"))
    missing = ["--checkpoint", str(tmp_path / "no-such-checkpoint"), "--output-path", str(output)]
    assert "does not exist" in _bad(capsys, missing)
    too_many = [a for a in base if a not in ("--task-ids", tasks[0].id)] + ["--num-tasks", "999"]
    assert "has only 40 tasks" in _bad(capsys, too_many)
    monkeypatch.delenv("EVAL_TEST_UNSET_KEY", raising=False)
    assert "EVAL_TEST_UNSET_KEY" in _bad(capsys, [*base, "--user-api-key-env", "EVAL_TEST_UNSET_KEY"])
    assert "needs TAU2_USER_MODEL" in _bad(capsys, [*base, "--user-kind", "llm"])
    assert "--output-path is required" in _bad(capsys, base[: base.index("--output-path")])
    if serving.launcher_problem("sglang"):  # no sglang here: asking to start one is an input problem
        port_args = ["--checkpoint", str(smollm2_model_dir), "--sglang-port", str(free_port())]
        no_url = [a for a in base if a not in ("--sglang-url", policy_url)] + port_args
        assert "sglang is not installed" in _bad(capsys, no_url)
    assert not output.exists()  # nothing written but (at most) an empty episodes file
    episodes = output.with_suffix(".episodes.jsonl")
    assert not episodes.exists() or episodes.read_text() == ""


def test_results_from_another_configuration_are_refused(tmp_path, policy_url, tasks, smollm2_model_dir, capsys):
    output = tmp_path / "results.json"
    args = _args(policy_url, output, smollm2_model_dir, [tasks[0].id])
    assert main(args) == 0
    capsys.readouterr()
    before = (output.read_bytes(), output.with_suffix(".episodes.jsonl").read_bytes())
    changed = [*args, "--max-steps", "20", "--temperature", "0.5"]
    err = _bad(capsys, changed)
    assert "another configuration" in err and "max_steps: 30 -> 20" in err and "--overwrite" in err
    assert "max_tokens_per_turn" in _bad(capsys, [*args, "--max-tokens-per-turn", "64"])  # the per-turn cap counts
    assert (output.read_bytes(), output.with_suffix(".episodes.jsonl").read_bytes()) == before
    assert main([*changed, "--overwrite"]) == 0
    data = json.loads(output.read_text())
    assert data["config"]["episode"]["max_steps"] == 20 and data["recorded_episodes"] == 1
    assert len(_jsonl(output.with_suffix(".episodes.jsonl"))) == 1


# ------------------------------------------------------------------------------------------------------- serving


def test_server_commands():
    spec = serving.ServerSpec(checkpoint="/ckpt", port=31000, extra_args=["--tp-size", "2"])
    expected = "-m sglang.launch_server --model-path /ckpt --port 31000 --host 127.0.0.1 --tp-size 2".split()
    assert serving.server_command(spec)[1:] == expected
    cpu = serving.server_command(spec.model_copy(update={"launcher": "cpu"}))
    assert cpu[1:4] == [str(serving.CPU_SERVER_SCRIPT), "--model", "/ckpt"] and cpu[-2:] == ["--tp-size", "2"]
    assert serving.split_server_args("--a 1 --b 'x y'") == ["--a", "1", "--b", "x y"]


def test_server_that_dies_reports_its_log(tmp_path):
    spec = serving.ServerSpec(checkpoint="x", port=free_port(), log_path=str(tmp_path / "s.log"), ready_timeout_s=60)
    command = [sys.executable, "-c", "print('loading weights failed: out of memory'); raise SystemExit(3)"]
    with pytest.raises(serving.ServerStartError, match="exited with code 3") as info:
        with serving.policy_server(spec, command):
            pass
    assert "loading weights failed: out of memory" in str(info.value)


HEALTH_SERVER = """
import http.server, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("CHILD-PID", child.pid, flush=True)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is dead
        return stat.read().split(")")[-1].split()[0] != "Z"


def test_started_server_and_its_children_are_stopped(tmp_path):
    port = free_port()
    log = tmp_path / "s.log"
    spec = serving.ServerSpec(checkpoint="x", port=port, log_path=str(log), ready_timeout_s=60, stop_grace_s=5)
    command = [sys.executable, "-c", HEALTH_SERVER, str(port)]
    with serving.policy_server(spec, command) as server:
        assert server.started and server.url == f"http://127.0.0.1:{port}"
        assert serving.is_healthy(server.url)
        child = int(next(line for line in log.read_text().splitlines() if line.startswith("CHILD-PID ")).split()[1])
        assert _alive(server.pid) and _alive(child)
        # A second user of the same port reuses the running server and does not stop it.
        with serving.policy_server(spec, command) as again:
            assert not again.started
        assert serving.is_healthy(server.url)
    deadline = time.monotonic() + 60  # a bound on waiting for the reaper, not a measurement
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(server.pid) and not _alive(child)  # the whole process group is gone
    assert not serving.is_healthy(f"http://127.0.0.1:{port}")


def test_server_that_never_answers_times_out_and_is_stopped(tmp_path):
    spec = serving.ServerSpec(checkpoint="x", port=free_port(), log_path=str(tmp_path / "s.log"), ready_timeout_s=1.5)
    command = [sys.executable, "-c", "import time; print('warming up', flush=True); time.sleep(600)"]
    with pytest.raises(serving.ServerStartError, match="did not answer") as info:
        with serving.policy_server(spec, command):
            pass
    assert "warming up" in str(info.value) and "within 1.5 s" in str(info.value)
    pid = int(str(info.value).split("(pid ")[1].split(")")[0])
    assert not _alive(pid)  # given up at the limit and stopped, not left warming up


# ---------------------------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_cli_with_real_model_on_cpu_server(tmp_path, smollm2_model_dir):
    """The whole path users take: --checkpoint starts the CPU stand-in server, the real model plays 2 tasks."""
    output = tmp_path / "results.json"
    command = [
        sys.executable,
        str(SCRIPT),
        "--checkpoint",
        str(smollm2_model_dir),
        "--server-launcher",
        "cpu",
        "--server-args",
        "--threads 2",
        "--sglang-port",
        str(free_port()),
        "--output-path",
        str(output),
        "--domain",
        "telecom",
        "--task-split",
        "test",
        "--num-tasks",
        "2",
        "--user-kind",
        "scripted",
        "--policy-variant",
        "compact",
        "--max-response-tokens",
        "40",
        "--concurrency",
        "2",
        "--no-progress",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(output.read_text())
    assert data["recorded_episodes"] == 2 and data["complete"]
    assert data["counts"]["failed_episodes"] == 0, data["failed"]
    assert data["run"]["server"]["started"] is True
    assert data["run"]["max_context_tokens_effective"] == 8192  # read from the server's /v1/models
    assert data["config"]["model"] == str(smollm2_model_dir.resolve())
    records = _jsonl(output.with_suffix(".episodes.jsonl"))
    assert len(records) == 2
    for record in records:
        episode = record["episode"]
        assert episode["turns"] >= 1 and episode["policy_completion_tokens"] >= 1
        assert episode["reward"] is not None
    assert "pass@1" in done.stdout and output.with_suffix(".md").exists() and output.with_suffix(".png").exists()
    assert output.with_suffix(".server.log").exists()
    # The real model's episodes as tau2's Results: tau2's metrics equal the summary's; the shortcuts stand beside it.
    from tau2.data_model.simulation import Results
    from tau2.metrics.agent_metrics import compute_metrics

    tau2 = compute_metrics(Results.load(output.with_suffix(".tau2.json")))
    assert data["tau2_results"]["agrees_with_summary"] and data["pass_hat_1"] == pytest.approx(tau2.pass_hat_ks[1])
    assert data["avg_reward"] == pytest.approx(tau2.avg_reward)
    assert data["baselines"]["policies"]["gold"]["pass_at_1"] == 1.0
    assert data["baselines"]["shortcut_check"]["verdict"] and "beside shortcut baselines" in done.stdout
    # The server was stopped: nothing answers on its port any more.
    assert not serving.is_healthy(data["run"]["server"]["url"])


def test_episode_log_groups_fsyncs_and_syncs_at_close(tmp_path, monkeypatch):
    """Each record reaches the file at once; fsyncs are grouped (one per SYNC_EVERY_S) and the last one is at close."""
    from eval import evaluate_tau2

    synced = []
    monkeypatch.setattr(evaluate_tau2.os, "fsync", lambda fd: synced.append(fd))
    log = evaluate_tau2.EpisodeLog(tmp_path / "episodes.jsonl")
    log.SYNC_EVERY_S = 3600.0
    log.open()
    for i in range(5):
        log.append({"i": i})
        assert len((tmp_path / "episodes.jsonl").read_text().splitlines()) == i + 1  # written through at once
    assert len(synced) == 1  # the first; the next four wait for the interval
    log.close()
    assert len(synced) == 2  # the rest at close
