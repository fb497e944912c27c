"""The recipe against slime's real code: slime 624b824 and the Megatron-LM commit its image uses (`../shared/vendor/`,
or SLIME_SRC / MEGATRON_SRC), with only ray, sglang, sglang_router and wandb stubbed as modules (tests/slime_stubs.py).

- slime's own plugin contract tests, run on the recipe's generate function, reward post-process and dynamic filter;
- slime's Sample field list against the stand-in the CPU dry run uses;
- the launchers' commands parsed by slime + Megatron argparse with ignore_unknown_args=False, then slime_validate_args;
- a GRPO-shaped batch through slime's own Dataset -> RolloutDataSourceWithBuffer -> generate_rollout (over-sampling,
  abort, partial rollout) -> RolloutManager._convert_samples_to_train_data (the reward post-process inside), and
  slime's log_rollout_data / eval_rollout / log_eval_rollout_data with the recipe's log functions.
Where a source is missing these tests skip with a message naming the variable to set.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from examples.slime_standin import Sample as StandinSample
from rollout import budgets, generate_with_tau
from rollout.scripted import TRANSFER_MESSAGE, TRANSFER_TOOL, ScriptedUser, opening_message
from rollout.task_store import get_task_store
from rollout.tool_format import format_assistant_turn
from tests.engine_helpers import agent_turn_index, gold_script_texts
from tests.scripted_policy_server import Fault, ScriptedPolicyServer
from tests.slime_stubs import slime_runtime
from tests.slime_vendor import ROOT, megatron_src, require_megatron, require_slime
from tests.test_launchers import base_env, cluster_inputs, dry_run, runtime_env, submit_command, train_args

SLIME = require_slime()
PRE_PARSED = {"--debug-train-only": 0, "--debug-rollout-only": 0, "--train-backend": 1, "--load-debug-rollout-data": 1}


# ------------------------------------------------------------------------------------------ contract tests


@pytest.mark.parametrize(
    ("contract", "paths"),
    [
        ("test_plugin_generate_contracts.py", {"CUSTOM_GENERATE_FUNCTION_PATH": "rollout.generate_with_tau.generate"}),
        (
            "test_plugin_runtime_hook_contracts.py",
            {"CUSTOM_REWARD_POST_PROCESS_PATH": "reward.tau2_reward_shaping.tau2_reward_post_process"},
        ),
        (
            "test_plugin_path_loading_contracts.py",
            {"DYNAMIC_SAMPLING_FILTER_PATH": "reward.dynamic_filter.shaped_reward_nonzero_std"},
        ),
        (
            "test_plugin_path_loading_contracts.py",
            {"DYNAMIC_SAMPLING_FILTER_PATH": "reward.dynamic_filter.shaped_reward_nonzero_std_with_fallback"},
        ),
    ],
    ids=["generate", "reward-post-process", "dynamic-filter", "dynamic-filter-fallback"],
)
def test_slimes_plugin_contract_tests_pass_on_the_recipe(contract: str, paths: dict[str, str]) -> None:
    """slime's tests/plugin_contracts, from slime's root (its call-site checks read slime/... relative to it)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(SLIME), str(SLIME / "tests")]),
        "PYTHONDONTWRITEBYTECODE": "1",
        **{f"SLIME_CONTRACT_{key}": value for key, value in paths.items()},
    }
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"tests/plugin_contracts/{contract}"]
    done = subprocess.run(command, cwd=SLIME, env=env, capture_output=True, text=True, timeout=600)
    tail = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0, tail
    assert " passed" in done.stdout and " failed" not in done.stdout and " skipped" not in done.stdout, tail


def test_standin_sample_has_slimes_fields() -> None:
    """examples/slime_standin.py's Sample: the same fields, in the same order, as slime's."""
    tree = ast.parse((SLIME / "slime" / "utils" / "types.py").read_text())
    sample = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Sample")
    fields = [stmt.target.id for stmt in sample.body if isinstance(stmt, ast.AnnAssign)]
    statuses = next(node for node in sample.body if isinstance(node, ast.ClassDef) and node.name == "Status")
    members = [stmt.targets[0].id for stmt in statuses.body if isinstance(stmt, ast.Assign)]
    assert [field.name for field in dataclasses.fields(StandinSample)] == fields
    assert [member.name for member in StandinSample.Status] == members


# ------------------------------------------------------------------------------------------- slime runtime


@pytest.fixture(scope="module")
def slime() -> Any:
    with slime_runtime(SLIME, megatron_src()):
        yield


def _launcher_args(name: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch, *extra: str) -> Any:
    """The launcher's training command as slime parses it (slime.utils.arguments.parse_args's phases), but with
    Megatron + slime's parser at ignore_unknown_args=False: every flag not taken by the pre-parse or by sglang's
    parser must be one slime or Megatron defines. Then slime_validate_args."""
    require_megatron()
    import slime.utils.arguments as slime_arguments
    from megatron.training.arguments import parse_args
    from slime.backends.sglang_utils.arguments import add_sglang_arguments

    _, argv = train_args(submit_command(dry_run(name, env, *(["--", *extra] if extra else []))))
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    pre = slime_arguments._pre_parse_mode()
    rest, i = [], 0
    while i < len(argv):
        skip = PRE_PARSED.get(argv[i])
        if skip is None:
            rest.append(argv[i])
        i += 1 + (skip or 0)
    sglang_ns = None
    if not pre.debug_train_only:
        sglang_ns = slime_arguments.sglang_parse_args()
        parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        add_sglang_arguments(parser)
        _, rest = parser.parse_known_args(rest)
    monkeypatch.setattr(sys, "argv", ["train.py", *rest])
    args = parse_args(extra_args_provider=slime_arguments.get_slime_extra_args_provider(), ignore_unknown_args=False)
    for namespace in (pre, sglang_ns):
        for key, value in vars(namespace or argparse.Namespace()).items():
            setattr(args, key, value)
    slime_arguments.slime_validate_args(args)
    return args


@pytest.mark.parametrize(
    ("name", "knobs"),
    [
        ("run_grpo.sh", {}),
        ("run_grpo.sh", {"DYNAMIC_SAMPLING": "1", "EVAL_INTERVAL": "0", "WANDB_PROJECT": "tau2", "TP": "1"}),
        ("run_grpo.sh", {"COLOCATE": "0", "ROLLOUT_GPUS": "2", "ASYNC": "1", "SGLANG_SERVER_CONCURRENCY": "32"}),
        ("run_sft.sh", {}),
        ("run_sft.sh", {"WANDB_PROJECT": "tau2", "TP": "1"}),
    ],
)
def test_launcher_commands_parse_in_slime_and_megatron(slime, tmp_path, monkeypatch, name, knobs) -> None:
    from slime.utils.misc import load_function

    args = _launcher_args(name, base_env(tmp_path, **cluster_inputs(tmp_path), **knobs), monkeypatch)
    if name == "run_sft.sh":
        assert args.loss_type == "sft_loss" and args.debug_train_only and args.loss_mask_type == "qwen3"
        return
    assert args.rollout_max_response_len == budgets.EPISODE_TOKENS
    assert args.rollout_max_context_len == budgets.CONTEXT_TOKENS
    for path in (
        args.custom_generate_function_path,
        args.custom_reward_post_process_path,
        args.custom_rollout_log_function_path,
        args.custom_eval_rollout_log_function_path,
        args.dynamic_sampling_filter_path,
    ):
        if path is not None:
            assert load_function(path) is not None  # slime's own loader finds the recipe's plugin
    if knobs.get("EVAL_INTERVAL") == "0":
        assert not args.eval_datasets and args.dynamic_sampling_filter_path.startswith("reward.dynamic_filter.")
    else:
        (dataset,) = args.eval_datasets
        assert dataset.name == "telecom_test" and dataset.max_response_len == budgets.EPISODE_TOKENS


# ---------------------------------------------------------------------------------- a GRPO batch, end to end


class SglangDouble(ScriptedPolicyServer):
    """sglang behind its router, as slime's rollout talks to it: /generate (the parent), /workers, /abort_request
    (abort_all: held requests come back with finish_reason abort) and /v1/loads. Records every /generate request
    and whether it arrived after an abort."""

    def __init__(self, tokenizer: Any, responder: Any) -> None:
        super().__init__(tokenizer, responder)
        self.aborts = 0
        self.after_abort: list[str] = []
        self._held: list[asyncio.Future] = []

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/workers", self._workers)
        app.router.add_post("/abort_request", self._abort)
        app.router.add_get("/v1/loads", self._loads)

    async def _workers(self, request: web.Request) -> web.Response:
        return web.json_response({"workers": [{"url": f"http://127.0.0.1:{self.port}"}]})

    async def _abort(self, request: web.Request) -> web.Response:
        self.aborts += 1
        for held in self._held:
            if not held.done():
                held.set_result(None)
        return web.json_response({})

    async def _loads(self, request: web.Request) -> web.Response:
        return web.json_response({"num_reqs": sum(1 for held in self._held if not held.done())})

    async def _reply(self, input_ids: list[int], params: dict[str, Any]) -> Any:
        prompt = self.tokenizer.decode(input_ids, skip_special_tokens=False)
        if self.aborts:
            self.after_abort.append(prompt[-200:])
        reply = self.responder(prompt, params)
        if reply == "HOLD":  # held until slime aborts: what sglang does with a request in flight at abort_all
            held = asyncio.get_running_loop().create_future()
            self._held.append(held)
            await held
            return Fault(abort=True, text="Let me")
        return reply


def _rows_by_opening(split: str = "train") -> dict[str, dict[str, Any]]:
    """One task per distinct opening message (the responder tells tasks apart by it), none that transfers."""
    from examples.tau2_mock import build_rows

    chosen: dict[str, dict[str, Any]] = {}
    for row in build_rows("telecom", split, split):
        task = get_task_store().get("telecom", row["metadata"]["task_id"])
        if TRANSFER_TOOL in [a.name for a in task.evaluation_criteria.actions]:
            continue
        chosen.setdefault(opening_message(task), row)
    return chosen


class Scenario:
    """Four tasks, two samples each, in the first rollout: A (one sample transfers: a success and a failure), B (one
    sample's first request gets HTTP 400: an infrastructure failure), C (its customer is slow: waiting on the user
    simulator when slime aborts), D (its second policy turn is still at sglang when slime aborts)."""

    def __init__(self, rows: list[dict[str, Any]], abort_flag: Any) -> None:
        self.tasks = {name: get_task_store().get("telecom", row["metadata"]["task_id"]) for name, row in rows}
        self.by_opening = {opening_message(task): name for name, task in self.tasks.items()}
        self.scripts = {name: gold_script_texts(task, solo_mode=False) for name, task in self.tasks.items()}
        self.first_seen: set[str] = set()
        self.blocking = True
        self.abort_flag = abort_flag

    def name_of(self, prompt: str) -> str:
        return next(name for opening, name in self.by_opening.items() if opening in prompt)

    def respond(self, prompt: str, params: dict[str, Any]) -> Any:
        name = self.name_of(prompt)
        turn = agent_turn_index(prompt, solo_mode=False)
        first = turn == 0 and name not in self.first_seen
        if turn == 0:
            self.first_seen.add(name)
        if name == "A" and first:
            return format_assistant_turn(None, [{"name": TRANSFER_TOOL, "arguments": {"summary": "cannot fix it"}}])
        if name == "A" and f'<tool_call>\n{{"name": "{TRANSFER_TOOL}"' in prompt:
            return TRANSFER_MESSAGE
        if name == "B" and first:
            return Fault(status=400)
        if name == "D" and turn >= 1 and self.blocking:
            return "HOLD"
        texts = self.scripts[name]
        return texts[min(turn, len(texts) - 1)]

    def build_user(self, config: Any, task: Any, user_tools: Any, clients: Any) -> Any:
        scenario = self

        class SlowCustomer(ScriptedUser):
            async def respond(self, incoming: Any) -> Any:
                self.calls = getattr(self, "calls", 0) + 1
                while scenario.blocking and self.calls >= 2 and not scenario.abort_flag():
                    await asyncio.sleep(0.01)  # still talking when slime aborts the batch
                return await super().respond(incoming)

        slow = task.id == self.tasks["C"].id
        return SlowCustomer(task) if slow else ScriptedUser(task)


def test_a_grpo_batch_through_slimes_rollout_path(slime, tmp_path, monkeypatch, tok) -> None:
    from slime.observability.rollout_metrics import log_eval_rollout_data, log_rollout_data
    from slime.ray.rollout import RolloutManager
    from slime.rollout.data_source import RolloutDataSourceWithBuffer
    from slime.rollout.sglang_rollout import eval_rollout, generate_rollout
    from slime.utils.async_utils import run
    from slime.utils.http_utils import init_http_client
    from slime.utils.types import Sample

    import rollout.episode

    openings = list(_rows_by_opening().values())
    rows = list(zip("ABCD", openings[:4]))
    data = tmp_path / "tasks"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for _, row in rows))
    eval_rows = list(_rows_by_opening("test").values())[:2]
    (data / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in eval_rows))

    inputs = cluster_inputs(tmp_path)
    knobs = {
        "PROMPT_DATA": str(data / "train.jsonl"),
        "EVAL_PROMPT_DATA": str(data / "test.jsonl"),
        "HF_CHECKPOINT": str(Path(tok.name_or_path)),
        "ROLLOUT_BATCH_SIZE": "2",
        "N_SAMPLES_PER_PROMPT": "2",
        "GLOBAL_BATCH_SIZE": "4",
        "ACTOR_GPUS": "2",
    }
    env = base_env(tmp_path, **{**inputs, **knobs})
    args = _launcher_args("run_grpo.sh", env, monkeypatch, "--over-sampling-batch-size", "4", "--partial-rollout")
    # What the Ray job sees: the launcher's TAU2_* variables; the rest of the environment as the test runs it.
    job_env = runtime_env(submit_command(dry_run("run_grpo.sh", env)))["env_vars"]
    for key, value in job_env.items():
        if key.startswith("TAU2_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("TAU2_USER_KIND", "scripted")
    for var in ("TAU2_POLICY_URL", "TAU2_POLICY_URL_OVERRIDE"):
        monkeypatch.delenv(var, raising=False)

    scenario = Scenario(rows, generate_with_tau.slime_aborted)
    monkeypatch.setattr(rollout.episode, "build_user", scenario.build_user)
    server = SglangDouble(tok, scenario.respond)
    with server as url:
        args.sglang_router_ip, args.sglang_router_port = "127.0.0.1", int(url.rsplit(":", 1)[1])
        init_http_client(args)
        data_source = RolloutDataSourceWithBuffer(args)

        # Rollout 0: 4 tasks started for a batch of 2; A and B finish, C and D are aborted.
        output = generate_rollout(args, 0, data_source)
        assert server.aborts >= 1 and server.after_abort == []  # nothing new was sent once slime aborted
        groups = output.samples
        assert len(groups) == 2
        kept = {s.metadata["task_id"] for g in groups for s in g}
        assert kept == {scenario.tasks["A"].id, scenario.tasks["B"].id}
        samples = [sample for group in groups for sample in group]
        for sample in samples:
            assert isinstance(sample, Sample)
            assert len(sample.loss_mask) == sample.response_length == len(sample.rollout_log_probs)
            assert sample.response_length <= args.rollout_max_response_len
            assert len(sample.tokens) <= args.rollout_max_context_len
            if sample.status != Sample.Status.FAILED:  # what sglang served: every prompt of the episode
                assert sample.prefix_cache_info.total_prompt_tokens >= len(sample.tokens) - sample.response_length
        by_outcome = {(s.metadata["task_id"], s.status.name, s.reward): s for s in samples}
        a, b = scenario.tasks["A"].id, scenario.tasks["B"].id
        assert (a, "COMPLETED", 1.0) in by_outcome and by_outcome[(a, "COMPLETED", 1.0)].metadata["turns"] > 1
        transferred = next(s for s in samples if s.metadata["task_id"] == a and s.metadata["transferred"])
        assert transferred.reward == 0.0 and transferred.status.name == "COMPLETED"
        failed = next(s for s in samples if s.status == Sample.Status.FAILED)
        assert failed.metadata["task_id"] == b and failed.remove_sample and sum(failed.loss_mask) == 0
        assert failed.metadata["failure_kind"] == "policy_server"
        # The aborted groups went back to slime's buffer, trained nothing and are marked as slime marks them.
        buffered = [sample for group in data_source.buffer for sample in group]
        assert {s.metadata["task_id"] for s in buffered} == {scenario.tasks["C"].id, scenario.tasks["D"].id}
        for sample in buffered:
            assert sample.status == Sample.Status.ABORTED and sample.remove_sample and sum(sample.loss_mask) == 0
            assert sample.metadata["start_rollout_id"] == 0
        d_sample = next(s for s in buffered if s.metadata["task_id"] == scenario.tasks["D"].id)
        assert d_sample.metadata["failure"] == "Abort before prefill"  # sglang's abort of the request in flight

        # What slime trains on: the reward post-process and slime's conversion, on the flattened batch.
        manager = object.__new__(RolloutManager)
        manager.args = args
        manager.custom_convert_samples_to_train_data_func = None
        from slime.utils.misc import load_function

        manager.custom_reward_post_process_func = load_function(args.custom_reward_post_process_path)
        train = manager._convert_samples_to_train_data(samples)
        advantages = dict(zip([id(s) for s in samples], train["rewards"], strict=True))
        success = by_outcome[(a, "COMPLETED", 1.0)]
        assert advantages[id(success)] > 0.5 and advantages[id(transferred)] < -0.5
        b_samples = [s for s in samples if s.metadata["task_id"] == b]
        assert [advantages[id(s)] for s in b_samples] == [0.0, 0.0]  # one valid sample left: no signal
        assert train["loss_masks"][samples.index(failed)] == [0] * failed.response_length
        assert train["raw_reward"] == [s.reward for s in samples]  # tau2's reward, not the shaped one
        assert all(len(lp) == n for lp, n in zip(train["rollout_log_probs"], train["response_lengths"], strict=True))

        # slime's rollout log with the recipe's function: both land in W&B.
        import wandb

        args.use_wandb, args.use_tensorboard = True, False
        log_rollout_data(0, args, samples, output.metrics, 1.0)
        logged = {key: value for entry in wandb.logged for key, value in entry.items()}
        assert logged["rollout/tau2/infra_failures/policy_server"] == 1.0
        assert logged["rollout/tau2/success_rate"] == pytest.approx(2 / 3)
        assert logged["rollout/tau2/transfer_rate"] == pytest.approx(1 / 3)
        assert logged["rollout/tau2/transfer_rate_gold_no_transfer"] == pytest.approx(1 / 3)
        assert "rollout/response_len/mean" in logged  # slime's own metrics still logged

        # Rollout 1 (partial rollout): the two aborted groups come back first and are played again from the start.
        scenario.blocking = False
        args.over_sampling_batch_size = args.rollout_batch_size
        again = [s for g in generate_rollout(args, 1, data_source).samples for s in g]
        assert {s.metadata["task_id"] for s in again} == {scenario.tasks["C"].id, scenario.tasks["D"].id}
        for sample in again:
            assert sample.status == Sample.Status.COMPLETED and sample.reward == 1.0
            assert sample.remove_sample is False and "failure" not in sample.metadata
            assert sum(sample.loss_mask) > 0 and sample.metadata["start_rollout_id"] == 0

        # In-training evaluation on the test split, as slime runs it, and its tau2 log.
        eval_scripts = {
            opening_message(get_task_store().get("telecom", r["metadata"]["task_id"])): r for r in eval_rows
        }
        assert len(eval_scripts) >= 1
        monkeypatch.setattr(rollout.episode, "build_user", lambda c, task, tools, clients: ScriptedUser(task))
        scenario.by_opening = {}
        scenario.scripts = {}
        for row in eval_rows:
            task = get_task_store().get("telecom", row["metadata"]["task_id"])
            scenario.by_opening[opening_message(task)] = task.id
            scenario.scripts[task.id] = gold_script_texts(task, solo_mode=False)
            scenario.tasks[task.id] = task
        eval_output, _ = run(eval_rollout(args, 0))
        (name,) = eval_output.data
        eval_samples = eval_output.data[name]["samples"]
        assert name == "telecom_test" and len(eval_samples) == len(eval_rows)
        for sample in eval_samples:
            assert sample.metadata["evaluation"] is True and sample.reward == 1.0, sample.metadata.get("failure")
        wandb.logged.clear()
        log_eval_rollout_data(0, args, eval_output.data, eval_output.metrics)
        logged = {key: value for entry in wandb.logged for key, value in entry.items()}
        assert logged["eval/telecom_test/tau2/success_rate"] == 1.0 and logged["eval/telecom_test"] == 1.0
        run(generate_with_tau.close_clients())
