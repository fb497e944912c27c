"""SkyRL's own generator (SkyRLGymGenerator.agent_loop) over the tau2 environment, with scripted policies.

The policy side is an InferenceEngineInterface that returns scripted turns as token ids with log-probs, the way
SkyRL's remote client returns vLLM's; everything else is real: SkyRL's multi-turn loop, tokenization and loss mask,
skyrl-gym's registry, the recipe's engine, tau2's environment, user simulators and evaluator.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, ClassVar

import pytest

from integrations.skyrl.tests.support import skip_reason

if reason := skip_reason():
    pytest.skip(reason, allow_module_level=True)

from skyrl_gym.envs.registration import register, registry

from integrations.skyrl.env import Tau2Env
from integrations.skyrl.tests.support import (
    GatheringUserServer,
    gold_texts,
    make_generator,
    scripted_client,
    session_of,
    trajectory_id,
)
from reward.tau2_reward_shaping import ShapingConfig, shape_reward
from rollout.scripted import gold_agent_turns
from rollout.tool_format import format_assistant_turn

ALPHA = ShapingConfig().alpha


class RecordingTau2Env(Tau2Env):
    """Tau2Env that keeps every instance, so a test can read the episode SkyRL's generator played."""

    made: ClassVar[list[RecordingTau2Env]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        RecordingTau2Env.made.append(self)


def recorded_env_id(name: str, domain: str = "telecom") -> str:
    env_id = f"tau2_{domain}_recorded_{name}"
    if env_id not in registry:
        register(id=env_id, entry_point=RecordingTau2Env, kwargs={"domain": domain})
    return env_id


def extras_of(task: Any, domain: str = "telecom") -> dict[str, Any]:
    return {"task": json.dumps(task.model_dump(mode="json")), "task_id": task.id, "domain": domain}


def opening_of(view: Any) -> list[dict[str, Any]]:
    return [{"role": "system", "content": view.system_prompt}, *view.opening]


def scripts_by_session(tasks: list[Any], texts: dict[str, list[str]] | None = None) -> Any:
    """respond(session, turn) for SkyRL's session ids: each task's script, its last turn repeated past the end
    (as tau2's own scripted agent does)."""
    scripts = {task.id: (texts or {}).get(task.id) or gold_texts(task) for task in tasks}

    def respond(session: str, turn: int) -> str:
        script = scripts[session.rsplit("_", 1)[0]]  # session ids are {task_id}_{repetition}
        return script[min(turn, len(script) - 1)]

    return respond


def generate(generator: Any, items: list[tuple[list[dict[str, Any]], str, dict[str, Any], str]]) -> dict[str, Any]:
    """SkyRL's generate() (agent_loop per item, in parallel) over (prompt, env_class, extras, task_id) items."""
    batch = {
        "prompts": [item[0] for item in items],
        "env_classes": [item[1] for item in items],
        "env_extras": [item[2] for item in items],
        "trajectory_ids": [trajectory_id(item[3]) for item in items],
    }
    return asyncio.run(generator.generate(batch, disable_tqdm=True))


def policy_runs(loss_mask: list[int]) -> list[tuple[int, int]]:
    """(start, end) of every maximal run of mask-1 positions."""
    runs, start = [], None
    for i, bit in enumerate([*loss_mask, 0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            runs.append((start, i))
            start = None
    return runs


def assert_mask_is_exactly_the_sampled_turns(
    tok: Any, response_ids: list[int], loss_mask: list[int], logprobs: list[float], sampled: list[Any]
) -> None:
    """Mask 1 on exactly the sampled ids, turn by turn, with their log-probs; everything else 0 with log-prob 0."""
    assert len(loss_mask) == len(response_ids) == len(logprobs)
    runs = policy_runs(loss_mask)
    assert len(runs) == len(sampled), (len(runs), len(sampled))
    newline = tok.encode("\n", add_special_tokens=False)
    for (start, end), (ids, lps) in zip(runs, sampled, strict=True):
        assert response_ids[start:end] == ids
        assert logprobs[start:end] == lps
        assert ids[-1] == tok.eos_token_id  # the stop token is sampled: trained
        if end < len(response_ids):  # the template's newline after it is not sampled: masked
            assert response_ids[end : end + len(newline)] == newline
    assert all(lp == 0.0 for lp, bit in zip(logprobs, loss_mask, strict=True) if not bit)


# ------------------------------------------------------------------------------------------------------ gold and wrong


def test_gold_scripts_score_one_on_every_telecom_test_task(tok: Any, dataset_dir: Any, test_tasks: list[Any]) -> None:
    from skyrl.train.dataset import PromptDataset

    data = PromptDataset([str(dataset_dir / "validation.parquet")], tok, max_prompt_length=16384, num_workers=1)
    assert len(data) == len(test_tasks) == 40
    rows = [data[i] for i in range(len(data))]
    tools = json.loads((dataset_dir / "tools.json").read_text())
    client = scripted_client(tok, scripts_by_session(test_tasks))
    generator = make_generator(tok, client, tools, max_env_workers=16)
    out = generate(generator, [(prompt, env_class, extras, extras["task_id"]) for prompt, env_class, extras, _ in rows])

    assert [m["success"] for m in out["env_metrics"]] == [1.0] * 40
    assert [m["tau2_reward"] for m in out["env_metrics"]] == [1.0] * 40
    assert [m["failed"] for m in out["env_metrics"]] == [0.0] * 40
    for i, (_, _, extras, _) in enumerate(rows):
        rewards = out["rewards"][i]
        assert rewards[-1] == pytest.approx(1.0 + ALPHA) and sum(rewards) == pytest.approx(1.0 + ALPHA)
        assert out["stop_reasons"][i] == "stop"
        sampled = client.sampled[session_of(extras["task_id"])]
        assert_mask_is_exactly_the_sampled_turns(
            tok, out["response_ids"][i], out["loss_masks"][i], out["rollout_logprobs"][i], sampled
        )
    assert out["rollout_metrics"]["environment/success"] == out["rollout_metrics"]["environment/tau2_reward"] == 1.0


def _task_with_agent_action(tasks: list[Any], name: str) -> Any:
    for task in tasks:
        if any(a.requestor == "assistant" and a.name == name for a in task.evaluation_criteria.actions or []):
            return task
    raise AssertionError(f"no telecom test task has an agent action {name}")


def test_wrong_script_fails_as_tau2_says(tok: Any, test_tasks: list[Any], telecom_view: Any, monkeypatch: Any) -> None:
    """Leave the data refuel out of a gold script: SkyRL's episode ends as tau2's own Orchestrator's does."""
    from tests import tau2_reference

    task = _task_with_agent_action(test_tasks, "refuel_data")
    gold = gold_agent_turns(task, False)
    wrong = [t for t in gold if not any(c["name"] == "refuel_data" for c in t.tool_calls)]
    texts = [format_assistant_turn(t.content, t.tool_calls) for t in wrong]

    RecordingTau2Env.made.clear()
    client = scripted_client(tok, scripts_by_session([task], {task.id: texts}))
    generator = make_generator(tok, client, telecom_view.tools, max_turns=40)
    env_id = recorded_env_id("wrong")
    out = generate(generator, [(opening_of(telecom_view), env_id, extras_of(task), task.id)])
    env = RecordingTau2Env.made[-1]

    monkeypatch.setattr(tau2_reference, "gold_agent_turns", lambda task, solo_mode: wrong)
    tau2_run = tau2_reference.run_tau2_orchestrator(task, solo_mode=False, max_steps=200, max_errors=10)
    tau2_info = tau2_run.reward_info.model_dump(mode="json")

    metadata = env.end_metadata
    assert metadata["termination_reason"] == tau2_run.termination_reason.value == "user_stop"
    assert metadata["tau2_reward"] == tau2_info["reward"] == 0.0
    met = [a["met"] for a in metadata["reward_info"]["env_assertions"]]
    assert met == [a["met"] for a in tau2_info["env_assertions"]]
    assert False in met
    shaped, partial, _ = shape_reward(metadata, 0.0, ShapingConfig())
    assert partial == pytest.approx(sum(met) / len(met))  # telecom's partial credit: the share of assertions met
    assert out["rewards"][0][-1] == pytest.approx(shaped) == pytest.approx(ALPHA * partial)
    assert out["env_metrics"][0]["success"] == 0.0


def test_reward_kind_tau2_gives_tau2s_own_reward(tok: Any, test_tasks: list[Any], telecom_view: Any) -> None:
    gold, wrong_task = test_tasks[0], _task_with_agent_action(test_tasks, "enable_roaming")
    drop = [
        format_assistant_turn(t.content, t.tool_calls)
        for t in gold_agent_turns(wrong_task, False)
        if not any(c["name"] == "enable_roaming" for c in t.tool_calls)
    ]
    client = scripted_client(tok, scripts_by_session([gold, wrong_task], {wrong_task.id: drop}))
    generator = make_generator(tok, client, telecom_view.tools, env_configs={"tau2_telecom": {"reward": "tau2"}})
    out = generate(
        generator,
        [(opening_of(telecom_view), "tau2_telecom", extras_of(t), t.id) for t in (gold, wrong_task)],
    )
    assert [r[-1] for r in out["rewards"]] == [1.0, 0.0]
    assert [m["reward"] for m in out["env_metrics"]] == [1.0, 0.0]


def test_solo_mode_gold_scripts(tok: Any, test_tasks: list[Any]) -> None:
    from rollout.engine import EpisodeConfig, prepare_episode

    tasks = [t for t in test_tasks if t.ticket][:3]
    assert tasks, "telecom test tasks have tickets"
    views = [asyncio.run(prepare_episode(t, EpisodeConfig(domain="telecom", solo_mode=True))).view for t in tasks]
    client = scripted_client(
        tok, scripts_by_session(tasks, {t.id: gold_texts(t, solo_mode=True) for t in tasks}), solo_mode=True
    )
    generator = make_generator(tok, client, views[0].tools, env_configs={"tau2_telecom": {"solo_mode": True}})
    out = generate(generator, [(opening_of(v), "tau2_telecom", extras_of(t), t.id) for t, v in zip(tasks, views)])
    assert [m["success"] for m in out["env_metrics"]] == [1.0] * len(tasks)


# -------------------------------------------------------------------------------------------------------- the tokens


def test_loss_mask_covers_exactly_the_policy_tokens(tok: Any, test_tasks: list[Any], telecom_view: Any) -> None:
    """Policy turns are trained as sampled (ending in <|im_end|>); tool results, user turns and the template's glue,
    the newline after each <|im_end|> included, are not; the whole stream is what the chat template renders."""
    task = _task_with_agent_action(test_tasks, "refuel_data")  # agent tool calls and user phone actions
    RecordingTau2Env.made.clear()
    client = scripted_client(tok, scripts_by_session([task]))
    generator = make_generator(tok, client, telecom_view.tools)
    env_id = recorded_env_id("mask")
    out = asyncio.run(
        generator.agent_loop(
            opening_of(telecom_view), env_id, extras_of(task), 512, 60000, trajectory_id=trajectory_id(task.id)
        )
    )
    sampled = client.sampled[session_of(task.id)]
    assert len(sampled) == len(gold_texts(task)) >= 4
    assert_mask_is_exactly_the_sampled_turns(tok, out.response_ids, out.loss_mask, out.rollout_logprobs, sampled)
    assert sum(out.loss_mask) == sum(len(ids) for ids, _ in sampled)

    result = RecordingTau2Env.made[-1].bridge.end.result
    assert result.reward == 1.0 and result.tool_calls >= 1
    seen = list(result.agent_messages)
    while seen[-1]["role"] != "assistant":  # the user's closing ###STOP### reaches no policy turn
        seen.pop()
    conversation = [*opening_of(telecom_view), *seen]
    rendered = tok.apply_chat_template(conversation, tools=telecom_view.tools, tokenize=True, return_dict=False)
    newline = tok.encode("\n", add_special_tokens=False)
    assert out.prompt_ids + out.response_ids + newline == rendered


# ------------------------------------------------------------------------------------------------ parallel and failure


def test_episodes_in_parallel_do_not_block_each_other(tok: Any, test_tasks: list[Any], telecom_view: Any) -> None:
    """Four episodes with an LLM user simulator that answers only once all four have asked, and a policy that
    answers only once all four are sampling: both happen only if no episode waits for another, on the engine's
    loop (user turns) or on SkyRL's (policy turns) while env steps hold SkyRL's worker threads."""
    n = 4
    tasks = test_tasks[:n]
    with GatheringUserServer(gather=n) as user:
        env_config = {"user_kind": "llm", "user_model": "user", "user_base_url": user.base_url, "user_max_retries": 0}
        env_config["wait_timeout_s"] = 120  # a step that never gets its answer ends the episode, not the test run
        client = scripted_client(tok, lambda session, turn: "Thanks, I have checked your line.", gather=n)
        generator = make_generator(
            tok, client, telecom_view.tools, env_configs={"tau2_telecom": env_config}, max_env_workers=n
        )
        batch = [(opening_of(telecom_view), "tau2_telecom", extras_of(t), t.id) for t in tasks]
        out = asyncio.run(asyncio.wait_for(_generate_async(generator, batch), timeout=300))
    assert user.max_open == n and client.max_waiting == n
    assert [m["failed"] for m in out["env_metrics"]] == [0.0] * n
    assert all(m["turns"] == 1.0 for m in out["env_metrics"])  # each: greeting, user, policy, user stop


async def _generate_async(generator: Any, items: list[Any]) -> dict[str, Any]:
    batch = {
        "prompts": [item[0] for item in items],
        "env_classes": [item[1] for item in items],
        "env_extras": [item[2] for item in items],
        "trajectory_ids": [trajectory_id(item[3]) for item in items],
    }
    return await generator.generate(batch, disable_tqdm=True)


def test_env_refuses_to_block_skyrls_event_loop(tok: Any, test_tasks: list[Any], telecom_view: Any) -> None:
    task = test_tasks[0]
    client = scripted_client(tok, scripts_by_session([task]))
    generator = make_generator(tok, client, telecom_view.tools, max_env_workers=0)
    loop_args = (opening_of(telecom_view), "tau2_telecom", extras_of(task), 512, 60000)
    with pytest.raises(RuntimeError, match="max_env_workers"):
        asyncio.run(generator.agent_loop(*loop_args, trajectory_id=trajectory_id(task.id)))


def test_failing_user_simulator_ends_one_episode_not_the_batch(
    tok: Any, test_tasks: list[Any], telecom_view: Any
) -> None:
    """One episode's LLM user simulator answers the greeting, then fails (HTTP 500, no retries): that episode ends
    failed with reward 0; the two gold episodes beside it in the batch score 1."""
    from tests.fake_openai_server import FakeOpenAIServer, FakeReply, text_reply

    RecordingTau2Env.made.clear()
    gold_a, broken, gold_b = test_tasks[1], test_tasks[2], test_tasks[3]
    with FakeOpenAIServer([text_reply("Hi! My phone has no service."), FakeReply(status=500)]) as server:
        failing_id = recorded_env_id("failing_user")
        failing_user = {"user_kind": "llm", "user_model": "fake", "user_base_url": server.base_url}
        client = scripted_client(tok, scripts_by_session([gold_a, broken, gold_b]))
        generator = make_generator(
            tok, client, telecom_view.tools, env_configs={failing_id: {**failing_user, "user_max_retries": 0}}
        )
        out = generate(
            generator,
            [
                (opening_of(telecom_view), "tau2_telecom", extras_of(gold_a), gold_a.id),
                (opening_of(telecom_view), failing_id, extras_of(broken), broken.id),
                (opening_of(telecom_view), "tau2_telecom", extras_of(gold_b), gold_b.id),
            ],
        )
    assert [m["success"] for m in out["env_metrics"]] == [1.0, 0.0, 1.0]
    assert [m["failed"] for m in out["env_metrics"]] == [0.0, 1.0, 0.0]
    assert out["rewards"][1][-1] == 0.0 and sum(out["rewards"][1]) == 0.0
    metadata = RecordingTau2Env.made[-1].end_metadata
    assert metadata["episode_status"] == "failed" and "user simulator" in metadata["failure"]


# ------------------------------------------------------------------------------------------------- where episodes end


def test_max_turns_ends_the_episode_truncated_and_judged(tok: Any, test_tasks: list[Any], telecom_view: Any) -> None:
    """generator.max_turns reaches the engine: after that many policy turns the episode ends truncated (max_turns),
    tau2 judges it, and the shaped reward gives its progress the truncation discount."""
    task = _task_with_agent_action(test_tasks, "refuel_data")
    RecordingTau2Env.made.clear()
    client = scripted_client(tok, scripts_by_session([task]))
    generator = make_generator(tok, client, telecom_view.tools, max_turns=2)
    out = generate(generator, [(opening_of(telecom_view), recorded_env_id("turns"), extras_of(task), task.id)])
    metadata = RecordingTau2Env.made[-1].end_metadata
    assert metadata["termination_reason"] == "max_turns" and metadata["episode_status"] == "truncated"
    assert len(client.sampled[session_of(task.id)]) == 2
    shaped, _, _ = shape_reward(metadata, 0.0, ShapingConfig())
    assert out["rewards"][0][-1] == pytest.approx(shaped)
    assert out["env_metrics"][0]["truncated"] == 1.0


def test_episode_cut_by_skyrls_context_limit_is_still_judged(
    tok: Any, test_tasks: list[Any], telecom_view: Any
) -> None:
    """SkyRL stops the loop itself past max_input_length (no reward from the env); the environment then ends the
    episode and tau2 judges it, so the metrics still say what happened."""
    task = test_tasks[0]
    client = scripted_client(tok, scripts_by_session([task]))
    generator = make_generator(tok, client, telecom_view.tools)
    args = (opening_of(telecom_view), recorded_env_id("context"), extras_of(task), 512)
    full = asyncio.run(generator.agent_loop(*args, 60000, trajectory_id=trajectory_id(task.id, 0)))
    assert full.stop_reason == "stop" and full.env_metrics["success"] == 1.0
    limit = len(full.prompt_ids)  # room for the first policy turn only
    RecordingTau2Env.made.clear()
    out = asyncio.run(generator.agent_loop(*args, limit, trajectory_id=trajectory_id(task.id, 1)))
    assert out.stop_reason == "length" and len(client.sampled[session_of(task.id, 1)]) == 1
    assert out.env_metrics["truncated"] == 1.0 and out.env_metrics["failed"] == 0.0
    assert out.env_metrics["success"] == 0.0 and out.reward[-1] == 0.0
    metadata = RecordingTau2Env.made[-1].end_metadata
    assert metadata["termination_reason"] == "max_tokens" and metadata["truncated_checks"] is not None
