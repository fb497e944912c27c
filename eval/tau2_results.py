"""tau2's own results format (`tau2.data_model.simulation.Results`) for recipe runs, and tau2 runs as recipe results.

`build_results` rebuilds a tau2 Results object from the evaluator's episode records (the JSONL stays the source of
truth), so that tau2's tools open a recipe run: `tau2 view --file results.tau2.json`, `tau2 evaluate-trajs
results.tau2.json`, `tau2.metrics.agent_metrics.compute_metrics`. How the recipe's run maps onto tau2's fields:
- Info: git_commit of the recipe checkout; num_trials, max_steps, max_errors, seed of the run; agent_info
  `llm_agent` (`llm_agent_solo` in solo mode: tau2's evaluate-trajs reads solo mode from these names) with the model
  and its sampling settings; user_info `user_simulator` (an LLM user, which is tau2's UserSimulator with its own
  prompt), `scripted_user` or `dummy_user` (solo), with the model and its request settings, never an API key;
  environment_info from tau2's environment of the domain.
- one SimulationRun per (task, trial): the engine's id, times and trajectory, tau2's reward_info, the trial, the
  sampling seed. The recipe's extra endings (max_tokens, max_turns, aborted) are tau2's max_steps, as the engine
  hands them to tau2's evaluator; an infrastructure failure is marked as `tau2 run --skip-failed-samples` marks one:
  skipped, agent_error, reward 0 (the error's first line in reward_info.info). With --exclude-failed the failures
  are left out instead, so tau2's numbers on the file are the recipe's headline numbers.
- costs: the policy is a self-hosted checkpoint, which tau2 itself records as 0.0 (litellm has no price for it; a
  NaN average would fail `tau2 submit validate`); the scripted user costs 0.0; an LLM user's cost is not priced by
  the recipe: None (its token counts are in each user message's `usage`).

`load_tau2_run` reads a Results JSON written by `tau2 run` (or by this module) into the form of the evaluator's
results, for `--compare`.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from eval import metrics
from rollout.cli import write_atomic
from rollout.tau2_setup import import_tau2

FAILED_TERMINATION = "agent_error"  # what tau2 run records for a skipped (failed) sample
USER_IMPLEMENTATIONS = {"llm": "user_simulator", "gemini": "user_simulator", "scripted": "scripted_user"}
RESULTS_KEYS = ("info", "tasks", "simulations")


def recipe_git_commit() -> str:
    """The commit of the recipe checkout that ran the evaluation ("unknown" outside a git checkout)."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def tau2_termination(reason: str | None) -> str:
    """tau2's termination reason for one of the engine's (its extra endings are max_steps to tau2's evaluator)."""
    from tau2.data_model.simulation import TerminationReason

    import_tau2()
    if reason in TerminationReason._value2member_map_:
        return str(reason)
    return TerminationReason.MAX_STEPS.value


def build_info(run_config: Mapping[str, Any], git_commit: str | None = None) -> Any:
    """tau2's Info for the run (see the module docstring)."""
    registry = import_tau2()
    from tau2.data_model.simulation import AgentInfo, Info, UserInfo
    from tau2.user.user_simulator import get_global_user_sim_guidelines

    solo = bool(run_config.get("solo_mode"))
    episode = run_config.get("episode") or {}
    sampling = run_config.get("sampling") or {}
    user = run_config.get("user_sim") or {}
    constructor = registry.get_env_constructor(run_config["domain"])
    environment = constructor(solo_mode=True) if solo else constructor()
    if solo:
        user_info = UserInfo(implementation="dummy_user")
    else:
        kind = str(user.get("kind"))
        llm_args: dict[str, Any] | None = None
        guidelines = None
        if kind in ("llm", "gemini"):
            llm_args = {"temperature": user.get("temperature"), **(user.get("extra_args") or {})}
            if user.get("base_url"):
                llm_args["api_base"] = user["base_url"]
            guidelines = get_global_user_sim_guidelines(use_tools=environment.user_tools is not None)
        user_info = UserInfo(
            implementation=USER_IMPLEMENTATIONS.get(kind, kind),
            llm=user.get("model"),
            llm_args=llm_args,
            global_simulation_guidelines=guidelines,
        )
    agent_info = AgentInfo(
        implementation="llm_agent_solo" if solo else "llm_agent",
        llm=run_config.get("model"),
        llm_args={
            "temperature": sampling.get("temperature"),
            "top_p": sampling.get("top_p"),
            "max_response_tokens": sampling.get("max_response_tokens"),
            "max_context_tokens": sampling.get("max_context_tokens"),
            "policy_api": run_config.get("policy_api"),
            "policy_variant": episode.get("policy_variant"),
            "max_turns": episode.get("max_turns"),
            "max_tokens_per_turn": episode.get("max_tokens_per_turn"),
        },
    )
    return Info(
        git_commit=git_commit or recipe_git_commit(),
        num_trials=int(run_config.get("num_trials") or 1),
        max_steps=int(episode.get("max_steps") or 200),
        max_errors=int(episode.get("max_errors") or 10),
        user_info=user_info,
        agent_info=agent_info,
        environment_info=environment.get_info(include_tool_info=False),
        seed=sampling.get("seed"),
    )


def _timestamps(record: Mapping[str, Any], duration: float) -> tuple[str, str]:
    """Start and end time of an old record without them: its recording time and duration."""
    try:
        end = datetime.fromisoformat(str(record.get("recorded_at")))
    except ValueError:
        end = datetime.fromtimestamp(0)
    start = end - timedelta(seconds=duration)
    return start.isoformat(), end.isoformat()


def simulation_from_record(
    record: Mapping[str, Any], *, agent_cost: float | None = None, user_cost: float | None = None
) -> Any:
    """One tau2 SimulationRun from an episode record of the evaluator's JSONL."""
    import_tau2()
    from tau2.data_model.simulation import RewardInfo, SimulationRun

    episode = record["episode"]
    failed = episode.get("status") == "failed"
    duration = float(episode.get("duration_s") or episode.get("wall_s") or 0.0)
    start, end = _timestamps(record, duration)
    if failed:
        failure = str(episode.get("failure") or "unknown").strip().splitlines() or ["unknown"]
        reward_info = RewardInfo(reward=0.0, info={"failure": failure[0][:500]})
        termination = FAILED_TERMINATION
    else:
        reward_info = RewardInfo.model_validate(episode["reward_info"]) if episode.get("reward_info") else None
        termination = episode.get("tau2_termination_reason") or tau2_termination(episode.get("termination_reason"))
        if reward_info is None:  # an episode played without evaluation: tau2 would score it 0
            reward_info = RewardInfo(reward=float(episode.get("reward") or 0.0))
    # A stable id for records written before the engine kept its SimulationRun id.
    fallback_id = uuid.uuid5(uuid.NAMESPACE_URL, f"{record.get('config_hash')}/{record['task_id']}/{record['trial']}")
    return SimulationRun.model_validate(
        {
            "id": episode.get("simulation_id") or str(fallback_id),
            "task_id": record["task_id"],
            "timestamp": episode.get("start_time") or start,
            "start_time": episode.get("start_time") or start,
            "end_time": episode.get("end_time") or end,
            "duration": duration,
            "termination_reason": termination,
            "agent_cost": agent_cost,
            "user_cost": user_cost,
            "reward_info": reward_info,
            "messages": episode.get("messages") or [],
            "trial": record["trial"],
            "seed": record.get("sampling_seed"),
            "skipped": failed,
        }
    )


def build_results(
    records: Sequence[Mapping[str, Any]],
    tasks: Sequence[Any],
    run_config: Mapping[str, Any],
    *,
    exclude_failed: bool = False,
    git_commit: str | None = None,
) -> Any:
    """tau2 Results for the selected episode records (one per (task, trial), in order) and tasks."""
    import_tau2()
    from tau2.data_model.simulation import Results

    user_kind = (run_config.get("user_sim") or {}).get("kind")
    user_cost = 0.0 if user_kind in ("scripted", "solo") or run_config.get("solo_mode") else None
    simulations = [
        simulation_from_record(record, agent_cost=0.0, user_cost=user_cost)
        for record in records
        if not (exclude_failed and record["episode"].get("status") == "failed")
    ]
    return Results(info=build_info(run_config, git_commit), tasks=list(tasks), simulations=simulations)


def write_results(results: Any, path: Path) -> None:
    """Write the Results JSON atomically (tau2's own serialization, as `Results.save` writes it)."""
    write_atomic(path, results.model_dump_json(indent=2) + "\n")


def tau2_metrics(results: Any) -> dict[str, float | None] | None:
    """tau2's own `compute_metrics` on the Results (`AgentMetrics.as_dict`: avg_reward, avg_agent_cost,
    pass_hat_1, ...); None without simulations. NaN (no cost known) becomes None."""
    if not results.simulations:
        return None
    import_tau2()
    from tau2.metrics.agent_metrics import compute_metrics

    values = compute_metrics(results).as_dict()
    return {key: (None if value is None or value != value else float(value)) for key, value in values.items()}


# ------------------------------------------------------------------------------------------ reading tau2's files


def is_tau2_results(data: Any) -> bool:
    return isinstance(data, dict) and all(key in data for key in RESULTS_KEYS)


def _user_kind(implementation: str) -> str:
    return {"user_simulator": "llm", "dummy_user": "solo", "scripted_user": "scripted"}.get(implementation, "other")


def _episode_from_simulation(simulation: Any) -> dict[str, Any]:
    """The fields of an EpisodeResult summary that the metrics read, from a tau2 SimulationRun."""
    messages = [m.model_dump(mode="json") for m in simulation.messages]
    reason = simulation.termination_reason.value
    if simulation.skipped:
        status = "failed"
    elif reason in ("user_stop", "agent_stop"):
        status = "completed"
    else:
        status = "truncated"
    info = simulation.reward_info
    assistant = [m for m in messages if m.get("role") == "assistant"]
    return {
        "task_id": simulation.task_id,
        "status": status,
        "termination_reason": reason,
        "reward": info.reward if info is not None else None,
        "reward_info": info.model_dump(mode="json") if info is not None and not simulation.skipped else None,
        "failure": (((info.info or {}).get("failure") if info is not None else None) or "skipped by tau2 run")
        if simulation.skipped
        else None,
        "messages": messages,
        "turns": len(assistant),
        "steps": len(messages),
        "tool_calls": sum(len(m.get("tool_calls") or []) for m in assistant),
        "wall_s": simulation.duration,
    }


def rows_from_results(results: Any) -> list[metrics.EpisodeRow]:
    """EpisodeRows (with subtask, persona and the gold's transfers) for every simulation of a tau2 Results."""
    from rollout.task_store import task_persona, task_subtask

    tasks = {task.id: task for task in results.tasks}
    trial_counter: dict[str, int] = {}
    rows = []
    for simulation in sorted(results.simulations, key=lambda s: (s.task_id, s.trial if s.trial is not None else -1)):
        task = tasks.get(simulation.task_id)
        trial = simulation.trial
        if trial is None:  # tau2 sets the trial; number any run without one in file order
            trial = trial_counter.get(simulation.task_id, 0)
        trial_counter[simulation.task_id] = trial + 1
        episode = _episode_from_simulation(simulation)
        row = metrics.row_from_episode(
            episode,
            trial,
            task_subtask(simulation.task_id),
            task_persona(task) if task is not None else None,
            gold_transfers=gold_transfers(task) if task is not None else None,
        )
        rows.append(row)
    return rows


def gold_transfers(task: Any) -> bool:
    """Whether the task's gold actions hold a transfer to a human agent."""
    criteria = task.evaluation_criteria
    return any(action.name == metrics.TRANSFER_TOOL for action in (criteria.actions or [])) if criteria else False


def load_tau2_run(path: Path, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A Results JSON (from `tau2 run`, or this module) summarized like the evaluator's results, for --compare."""
    import_tau2()
    from tau2.data_model.simulation import Results

    raw = json.dumps(data) if data is not None else Path(path).read_text(encoding="utf-8")
    results = Results.model_validate_json(raw)
    rows = rows_from_results(results)
    summary = metrics.summarize(rows)
    info = results.info
    solo = info.agent_info.implementation == "llm_agent_solo"
    task_ids = list(dict.fromkeys(s.task_id for s in results.simulations))
    return {
        **summary,
        "tau2_metrics": tau2_metrics(results),
        "source": "tau2 Results",
        "task_ids": task_ids,
        "num_trials": info.num_trials,
        "complete": True,
        "config": {
            "model": info.agent_info.llm or info.agent_info.implementation,
            "domain": info.environment_info.domain_name,
            "task_split": None,
            "solo_mode": solo,
            "episode": {"max_steps": info.max_steps, "max_errors": info.max_errors, "policy_variant": None},
            "user_sim": {
                "kind": "solo" if solo else _user_kind(info.user_info.implementation),
                "model": info.user_info.llm,
                "temperature": (info.user_info.llm_args or {}).get("temperature"),
            },
            "tau2_version": None,
            "git_commit": info.git_commit,
            "not_recorded": ["task split", "policy variant", "tau2 version"],
        },
        "results": [{"task_id": r.task_id, "trial": r.trial, "reward": r.reward, "success": r.success} for r in rows],
    }
