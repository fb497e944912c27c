"""SFT warm-up data: gold, teacher and RFT traces on the real engine, tau2 and the real SmolLM2 tokenizer.

Test doubles only for what cannot run here: the teacher endpoint (tests/fake_openai_server.py, OpenAI wire format)
and the policy server (tests/scripted_policy_server.py, sglang wire format, text encoded by the real tokenizer).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from examples import check_sft_data, generate_sft_traces
from rollout.clients.policy import build_policy_client
from rollout.clients.retry import RetryPolicy
from rollout.engine import EpisodeConfig, TokenAgent, prepare_episode, run_episode
from rollout.scripted import TRANSFER_MESSAGE, ScriptedUser, gold_agent_turns, opening_message, solo_supported
from rollout.sft_format import (
    GREETING,
    RowChecker,
    RowError,
    RowMetadata,
    build_row,
    check_row,
    conversation_of,
    dedupe_rows,
    iter_jsonl,
    row_key,
)
from rollout.task_store import get_task_store
from rollout.tool_format import format_assistant_turn
from tests.engine_helpers import agent_turn_index, gold_script_texts
from tests.fake_openai_server import FakeOpenAIServer, FakeReply
from tests.scripted_policy_server import ScriptedPolicyServer
from tests.tau2_gold import assertions_met_after

FAST_RETRY = RetryPolicy(max_retries=1, backoff_base_s=0.01, backoff_max_s=0.02, timeout_s=10.0)


@pytest.fixture(scope="module")
def tok_dir(smollm2_model_dir) -> str:
    return str(smollm2_model_dir)


@pytest.fixture
def scripted_user_env(monkeypatch):
    for var in ("TAU2_USER_KIND", "TAU2_USER_MODEL", "TAU2_USER_BASE_URL", "HF_CHECKPOINT"):
        monkeypatch.delenv(var, raising=False)


def _generate(out: Path, *args: str) -> list[dict]:
    assert generate_sft_traces.main(["--output", str(out), "--no-progress", *args]) == 0
    return list(iter_jsonl(out))


def _attempts(out: Path) -> list[dict]:
    return list(iter_jsonl(out.with_name(out.name + ".attempts.jsonl")))


def _role_of_tokens(tok, ids: list[int]) -> list[str]:
    """An oracle independent of the checker: each token's turn role, read from the ChatML markers in the ids; the
    `<|im_start|>role\\n` header tokens get the role 'header'."""
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    roles: list[str] = []
    role, in_header, header_text, closing = "none", False, "", False
    for token in ids:
        if token == start:
            in_header, header_text = True, ""
            roles.append("header")
            continue
        if in_header:
            header_text += tok.decode([token])
            roles.append("header")
            if "\n" in header_text:
                role, in_header = header_text.split("\n")[0], False
            continue
        if closing:  # the newline after <|im_end|> belongs to the turn it closes
            closing = False
            if tok.decode([token]) == "\n":
                roles.append(role)
                continue
        roles.append(role)
        closing = token == end
    return roles


def _assert_only_policy_turns_trained(tok, row: dict, masked) -> None:
    roles = _role_of_tokens(tok, masked.input_ids)
    assert set(roles[i] for i, m in enumerate(masked.loss_mask) if m) == {"assistant"}
    # Every assistant token is trained except the greeting's (the first assistant turn of a dual-mode row).
    turns, current, previous = [], None, "header"
    for i, role in enumerate(roles):
        if role == "assistant" and previous == "header":
            current = []
            turns.append(current)
        if role == "assistant":
            current.append(masked.loss_mask[i])
        previous = role
    expected = [m.get("step_loss_mask", 1) for m in row["messages"] if m["role"] == "assistant"]
    assert [set(t) for t in turns] == [{e} for e in expected]
    if not row["metadata"]["solo_mode"]:
        assert row["messages"][1] == {"role": "assistant", "content": GREETING, "step_loss_mask": 0}
        assert expected[0] == 0


# --------------------------------------------------------------------------------------------------------- gold


def test_greeting_constant_is_tau2s():
    from tau2.orchestrator.orchestrator import DEFAULT_FIRST_AGENT_MESSAGE

    assert GREETING == DEFAULT_FIRST_AGENT_MESSAGE.content


def test_gold_dual_all_train_tasks(tmp_path, train_tasks, tok_dir, smollm2_tokenizer, scripted_user_env):
    """Every one of the 74 train tasks: gold trace at reward 1, a valid row with only assistant turns trained."""
    out = tmp_path / "gold.jsonl"
    rows = _generate(out, "--source", "gold", "--domain", "telecom", "--split", "train", "--tokenizer", tok_dir)
    attempts = _attempts(out)
    assert len(train_tasks) == 74
    assert len(attempts) == 74 and all(a["reward"] == 1.0 and a["kept"] for a in attempts)
    assert sorted(a["task_id"] for a in attempts) == sorted(t.id for t in train_tasks)
    # Tasks that differ only in what the agent never sees give the same conversation: one row for them all.
    keys = [row_key(r) for r in rows]
    assert len(set(keys)) == len(rows) and set(keys) == {row_key(a["row"]) for a in attempts}
    assert len(rows) > 60
    for row in rows:
        meta = row["metadata"]
        assert meta["source"] == "gold" and meta["reward"] == 1.0 and meta["partial_score"] == 1.0
        assert meta["solo_mode"] is False and meta["subtask"] in meta["task_id"]
        task = get_task_store().get("telecom", meta["task_id"])
        trained = [m for m in row["messages"] if m["role"] == "assistant" and "step_loss_mask" not in m]
        turns = gold_agent_turns(task, solo_mode=False)
        assert [format_assistant_turn(t.content, t.tool_calls) for t in turns] == [
            format_assistant_turn(m["content"], [c["function"] for c in m.get("tool_calls", [])]) for m in trained
        ]
    checker = RowChecker(smollm2_tokenizer)
    for row in rows[::15]:
        _assert_only_policy_turns_trained(smollm2_tokenizer, row, checker.mask(row))
    assert check_sft_data.main([str(out), "--tokenizer", tok_dir, "--quiet"]) == 0  # every row, by the checker


def _solo_gold(tmp_path: Path, tok_dir: str, *extra: str) -> tuple[list[dict], list[dict]]:
    out = tmp_path / "solo.jsonl"
    rows = _generate(out, "--source", "gold", "--solo", "--tokenizer", tok_dir, *extra)
    return rows, _attempts(out)


def test_gold_solo_subset(tmp_path, train_tasks, tok_dir, smollm2_tokenizer, scripted_user_env):
    """Solo mode: the agent performs every gold action itself and ends with `done`, trained as the tool call."""
    picked = [next(t for t in train_tasks if t.id.startswith(f"[{s}]")) for s in ("mobile_data_issue", "mms_issue")]
    picked.append(next(t for t in train_tasks if t.id.startswith("[service_issue]")))
    rows, attempts = _solo_gold(tmp_path, tok_dir, "--task-ids", ",".join(t.id for t in picked))
    assert all(a["reward"] == 1.0 for a in attempts) and len(rows) == 3
    checker = RowChecker(smollm2_tokenizer)
    for row in rows:
        assert row["metadata"]["solo_mode"] is True
        assert all("step_loss_mask" not in m for m in row["messages"])  # no greeting in solo mode
        last = row["messages"][-1]
        assert last["tool_calls"][0]["function"] == {"name": "done", "arguments": {}}
        assert "done" in [t["function"]["name"] for t in row["tools"]]
        masked = checker.mask(row)
        assert checker.check(row).ok
        _assert_only_policy_turns_trained(smollm2_tokenizer, row, masked)


@pytest.mark.slow
def test_gold_solo_all_train_tasks(tmp_path, train_tasks, tok_dir, scripted_user_env):
    rows, attempts = _solo_gold(tmp_path, tok_dir)
    allowed = [t for t in train_tasks if t.ticket is not None and solo_supported(t)]
    assert len(allowed) == len(attempts) and all(a["reward"] == 1.0 and a["kept"] for a in attempts)
    assert sorted(a["task_id"] for a in attempts) == sorted(t.id for t in allowed)
    assert {row_key(r) for r in rows} == {row_key(a["row"]) for a in attempts} and len(rows) > 60
    assert all(r["metadata"]["solo_mode"] for r in rows)
    assert check_sft_data.main([str(tmp_path / "solo.jsonl"), "--tokenizer", tok_dir, "--quiet"]) == 0


# ------------------------------------------------------------------------------------ rows match the rollout


@pytest.mark.parametrize("solo", [False, True])
def test_row_renders_exactly_what_the_rollout_engine_builds(train_tasks, smollm2_tokenizer, solo):
    """A row from a TokenAgent episode, rendered with the chat template and tools=, is token for token the engine's
    sequence: its first prompt, the sampled turns, the template glue between them."""
    tok = smollm2_tokenizer
    task = train_tasks[9]
    texts = gold_script_texts(task, solo)

    async def play():
        config = EpisodeConfig(solo_mode=solo)
        setup = await prepare_episode(task, config)
        env, view = setup.env, setup.view
        policy = build_policy_client(url, api="sglang", retry=FAST_RETRY)
        agent = TokenAgent(policy, tok, view, {"temperature": 1.0}, max_response_tokens=8192)
        user = None if solo else ScriptedUser(task)
        try:
            return await run_episode(task, agent, user, config, env=env), view
        finally:
            await policy.aclose()

    responder = lambda prompt, params: texts[min(agent_turn_index(prompt, solo), len(texts) - 1)]  # noqa: E731
    with ScriptedPolicyServer(tok, responder) as url:
        result, view = asyncio.run(play())
    assert result.success
    meta = RowMetadata(task_id=task.id, domain="telecom", source="rft", solo_mode=solo, reward=1.0)
    row = build_row(view.system_prompt, view.tools, view.opening, result.agent_messages, meta)
    row = json.loads(json.dumps(row))  # as read back from the file
    assert row["tools"] == view.tools
    checker = RowChecker(tok)
    masked = checker.mask(row)
    record = result.record
    assert checker.prompt_ids(row) == record.prompt_ids.tolist()
    assert masked.input_ids[: masked.prompt_end] == record.prompt_ids.tolist()
    # The whole episode: the row's tokens are the record's, plus the newline that closes the last turn.
    assert masked.input_ids[: len(record.all_ids)] == record.all_ids
    assert tok.decode(masked.input_ids[len(record.all_ids) :]) == "\n"
    # Trained tokens: exactly the sampled ones, plus the newline after each end-of-turn (glue in the rollout).
    response_mask = masked.loss_mask[len(record.prompt_ids) :]
    newline = tok.encode("\n", add_special_tokens=False)[0]
    for i, (row_bit, rec_bit) in enumerate(zip(response_mask, [*record.loss_mask, 0], strict=True)):
        if row_bit != rec_bit:
            ids = [*record.response_ids, newline]
            assert row_bit == 1 and ids[i] == newline and record.loss_mask[i - 1] == 1, i
    _assert_only_policy_turns_trained(tok, row, masked)


def test_rows_with_invalid_turns_are_refused():
    view_messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "<tool_call>{bad", "invalid_turn": True},
        {"role": "tool", "tool_call_id": "invalid", "content": "Error: not JSON"},
        {"role": "assistant", "content": "Sorry."},
    ]
    with pytest.raises(RowError, match="invalid"):
        conversation_of("system", [], view_messages, solo_mode=False)
    with pytest.raises(RowError, match="no turn"):
        conversation_of(
            "system", [{"role": "assistant", "content": GREETING}], [{"role": "user", "content": "x"}], False
        )


# ----------------------------------------------------------------------------------------------- loss mask check


def _gold_row(tmp_path: Path, tok_dir: str, task_id: str) -> dict:
    out = tmp_path / "one.jsonl"
    return _generate(out, "--source", "gold", "--task-ids", task_id, "--tokenizer", tok_dir)[0]


def test_check_sft_data_flags_broken_rows(tmp_path, train_tasks, tok_dir, smollm2_tokenizer, scripted_user_env, capsys):
    task = next(t for t in train_tasks if any(a.requestor == "assistant" for a in t.evaluation_criteria.actions))
    row = _gold_row(tmp_path, tok_dir, task.id)
    checker = RowChecker(smollm2_tokenizer)
    good = checker.check(row)
    assert good.ok and 0 < good.trained_tokens < good.tokens and good.prompt_tokens > 7000

    call_at = next(i for i, m in enumerate(row["messages"]) if m.get("tool_calls"))
    broken: dict[str, dict] = {}
    row_a = json.loads(json.dumps(row))
    del row_a["messages"][1]["step_loss_mask"]
    broken["greeting trained"] = row_a
    row_b = json.loads(json.dumps(row))
    row_b["messages"][call_at]["tool_calls"][0]["function"]["arguments"] = "{}"
    broken["string arguments"] = row_b
    row_c = json.loads(json.dumps(row))
    row_c["messages"][call_at]["invalid_turn"] = True
    broken["invalid turn"] = row_c
    row_d = json.loads(json.dumps(row))
    row_d["messages"][call_at + 1]["tool_call_id"] = "call_other"
    broken["orphan tool result"] = row_d
    row_e = json.loads(json.dumps(row))
    row_e["messages"] = [m for m in row_e["messages"] if m["role"] != "assistant" or "step_loss_mask" in m]
    broken["nothing trained"] = row_e
    for name, bad in broken.items():
        assert not checker.check(bad).ok, name
        assert not check_row(bad).ok, name  # the shape check alone finds these too

    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [row, row, *broken.values()]))
    capsys.readouterr()
    assert check_sft_data.main([str(path), "--tokenizer", tok_dir]) == 1
    report = capsys.readouterr()
    assert "broken 5" in report.out and "duplicates 1" in report.out
    assert f"{good.trained_tokens:>8}" in report.out.splitlines()[1]  # per-row trained-token count
    clean = tmp_path / "clean.jsonl"
    assert check_sft_data.main([str(path), "--tokenizer", tok_dir, "--quiet", "--output", str(clean)]) == 1
    assert list(iter_jsonl(clean)) == [row]  # the broken rows and the duplicate are gone
    good_path = tmp_path / "good.jsonl"
    good_path.write_text(json.dumps(row) + "\n")
    assert check_sft_data.main([str(good_path), "--tokenizer", tok_dir, "--max-tokens", str(good.tokens)]) == 0
    assert check_sft_data.main([str(good_path), "--tokenizer", tok_dir, "--max-tokens", str(good.tokens - 1)]) == 1


def test_loss_mask_groups_consecutive_tool_results(smollm2_tokenizer):
    """Two calls in one turn: both results form one user turn, untrained; both calls trained in one turn."""
    calls = [
        {
            "id": "c1",
            "type": "function",
            "function": {"name": "get_customer_by_id", "arguments": {"customer_id": "C1"}},
        },
        {"id": "c2", "type": "function", "function": {"name": "get_data_usage", "arguments": {"line_id": "L1"}}},
    ]
    row = {
        "messages": [
            {"role": "system", "content": "Be helpful."},
            {"role": "assistant", "content": GREETING, "step_loss_mask": 0},
            {"role": "user", "content": "My data is slow."},
            {"role": "assistant", "content": "Let me look.", "tool_calls": calls},
            {"role": "tool", "tool_call_id": "c1", "name": "get_customer_by_id", "content": '{"id": "C1"}'},
            {"role": "tool", "tool_call_id": "c2", "name": "get_data_usage", "content": '{"used": 3}'},
            {"role": "assistant", "content": "You used 3 GB."},
        ],
        "tools": [{"type": "function", "function": {"name": n, "parameters": {}}} for n in ("a", "b")],
        "metadata": {"task_id": "t", "solo_mode": False},
    }
    checker = RowChecker(smollm2_tokenizer)
    masked = checker.mask(row)
    assert checker.check(row).ok
    assert masked.text.count("<|im_start|>user") == 2  # the two tool results share one user turn
    assert masked.trained_texts == [
        'Let me look.\n<tool_call>\n{"name": "get_customer_by_id", "arguments": {"customer_id": "C1"}}\n</tool_call>'
        '\n<tool_call>\n{"name": "get_data_usage", "arguments": {"line_id": "L1"}}\n</tool_call><|im_end|>\n',
        "You used 3 GB.<|im_end|>\n",
    ]
    _assert_only_policy_turns_trained(smollm2_tokenizer, row, masked)


# ------------------------------------------------------------------------------------------------------ guards


def test_test_split_refused_unless_allowed(tmp_path, train_tasks, tok_dir, scripted_user_env, capsys):
    out = tmp_path / "t.jsonl"
    with pytest.raises(SystemExit) as err:
        generate_sft_traces.main(["--source", "gold", "--split", "test", "--output", str(out)])
    assert "test-split" in str(err.value) and "--allow-test" in str(err.value)
    test_id = get_task_store().task_ids("telecom", "test")[0]
    with pytest.raises(SystemExit, match="allow-test"):  # base holds the test tasks too
        generate_sft_traces.main(["--source", "gold", "--split", "base", "--task-ids", test_id, "--output", str(out)])
    assert not out.exists()
    rows = _generate(out, "--source", "gold", "--split", "test", "--limit", "1", "--allow-test", "--tokenizer", tok_dir)
    assert [r["metadata"]["task_id"] for r in rows] == [test_id]


def test_full_train_set_excludes_every_test_task(tmp_path):
    args = generate_sft_traces.parse_args(["--source", "gold", "--train-set", "full", "--output", str(tmp_path / "f")])
    ids = [task.id for task in generate_sft_traces.select_tasks(args)]
    store = get_task_store()
    test_ids, full_ids = set(store.task_ids("telecom", "test")), set(store.task_ids("telecom", "full"))
    assert len(ids) == len(set(ids)) == len(full_ids - test_ids) == 2245
    assert not test_ids & set(ids) and set(store.task_ids("telecom", "train")) <= set(ids)
    with pytest.raises(SystemExit):
        generate_sft_traces.parse_args(["--source", "gold", "--train-set", "full", "--split", "test", "--output", "x"])


def test_over_budget_rows_are_skipped(tmp_path, train_tasks, tok_dir, smollm2_tokenizer, scripted_user_env):
    ids = [t.id for t in train_tasks[:5]]
    checker = RowChecker(smollm2_tokenizer)
    unlimited = _generate(
        tmp_path / "all.jsonl", "--source", "gold", "--task-ids", ",".join(ids), "--tokenizer", tok_dir
    )
    sizes = sorted(checker.check(row).tokens for row in unlimited)
    limit = sizes[2]  # some rows fit, some do not
    out = tmp_path / "budget.jsonl"
    rows = _generate(out, "--source", "gold", "--task-ids", ",".join(ids), "--max-tokens-per-row", str(limit),
                     "--tokenizer", tok_dir)  # fmt: skip
    attempts = _attempts(out)
    skipped = [a for a in attempts if a["drop_reason"]]
    assert len(rows) == sum(1 for s in sizes if s <= limit) and skipped
    assert all("over the" in a["drop_reason"] and a["row"] is None and not a["kept"] for a in skipped)
    assert all(checker.check(r).tokens <= limit for r in rows)


def test_rows_the_template_cannot_render_are_skipped(tmp_path, train_tasks, smollm2_model_dir, scripted_user_env):
    """A tokenizer whose template rejects tool calls: rows with tool calls are reported and never written."""
    broken_dir = tmp_path / "tok"
    broken_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(smollm2_model_dir) / name, broken_dir / name)
    template = (Path(smollm2_model_dir) / "chat_template.jinja").read_text()
    guard = "{%- for m in messages %}{%- if m.get('tool_calls') %}{{ raise_exception('no tool calls') }}{%- endif %}"
    (broken_dir / "chat_template.jinja").write_text(guard + "{%- endfor %}" + template)
    with_calls = next(t for t in train_tasks if any(a.requestor == "assistant" for a in t.evaluation_criteria.actions))
    without = next(t for t in train_tasks if all(a.requestor == "user" for a in t.evaluation_criteria.actions))
    out = tmp_path / "r.jsonl"
    rows = _generate(out, "--source", "gold", "--task-ids", f"{with_calls.id},{without.id}", "--tokenizer",
                     str(broken_dir))  # fmt: skip
    assert [r["metadata"]["task_id"] for r in rows] == [without.id]
    dropped = [a for a in _attempts(out) if a["drop_reason"]]
    assert [a["task_id"] for a in dropped] == [with_calls.id] and "cannot render" in dropped[0]["drop_reason"]


def test_final_file_is_deduplicated_and_resume_skips_done_attempts(tmp_path, train_tasks, tok_dir, scripted_user_env):
    out = tmp_path / "d.jsonl"
    ids = ",".join(t.id for t in train_tasks[:2])
    rows = _generate(out, "--source", "gold", "--task-ids", ids, "--tokenizer", tok_dir)
    # A crash mid-write leaves a torn line; duplicate rows from an earlier run are already in the file.
    with out.open("a") as handle:
        handle.write(json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:50])
    log = out.with_name(out.name + ".attempts.jsonl")
    with log.open("a") as handle:
        handle.write('{"source": "gold", "task_')
    again = _generate(out, "--source", "gold", "--task-ids", ids, "--tokenizer", tok_dir)
    assert [row_key(r) for r in again] == [row_key(r) for r in rows]
    assert len(_attempts(out)) == 2  # nothing replayed
    assert dedupe_rows([rows[0], rows[0], rows[1]]) == rows


def test_without_tokenizer_rows_are_checked_for_shape_only(tmp_path, train_tasks, scripted_user_env, capsys):
    out = tmp_path / "n.jsonl"
    rows = _generate(out, "--source", "gold", "--task-ids", train_tasks[0].id)
    assert len(rows) == 1 and check_row(rows[0]).ok
    assert "--max-tokens-per-row is not enforced" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        generate_sft_traces.parse_args(["--source", "rft", "--policy-url", "http://x", "--output", str(out)])
    assert err.value.code == 2 and "rft needs --tokenizer" in capsys.readouterr().err


def test_user_simulator_flags_complete_the_environment(monkeypatch, tmp_path, scripted_user_env):
    def config(*flags: str):
        args = generate_sft_traces.parse_args(["--source", "rft", "--policy-url", "http://p", "--tokenizer", "t",
                                               "--output", str(tmp_path / "o"), *flags])  # fmt: skip
        return generate_sft_traces.Generator(args, None).user_config

    monkeypatch.setenv("TAU2_USER_KIND", "llm")  # TAU2_USER_MODEL / BASE_URL missing: the flags supply them
    monkeypatch.setenv("SFT_TEST_USER_KEY", "user-secret-value")
    made = config("--user-kind", "llm", "--user-model", "qwen-user", "--user-base-url", "http://u/v1",
                  "--user-api-key-env", "SFT_TEST_USER_KEY", "--user-temperature", "0.3")  # fmt: skip
    assert (made.kind, made.model, made.base_url, made.temperature) == ("llm", "qwen-user", "http://u/v1", 0.3)
    assert made.secret() == "user-secret-value" and "user-secret-value" not in json.dumps(made.public_dict())
    with pytest.raises(SystemExit, match="TAU2_USER_MODEL"):
        config()
    with pytest.raises(SystemExit, match="needs TAU2_USER_BASE_URL"):
        config("--user-kind", "llm", "--user-model", "m")
    monkeypatch.setenv("TAU2_USER_KIND", "solo")
    with pytest.raises(SystemExit, match="--solo"):
        config()
    monkeypatch.setenv("TAU2_USER_KIND", "scripted")
    assert config().kind == "scripted"
    assert generate_sft_traces.Generator(generate_sft_traces.parse_args(
        ["--source", "teacher", "--teacher-model", "m", "--teacher-base-url", "http://t/v1", "--solo", "--output", "o"]
    ), None).user_config is None  # fmt: skip


# ----------------------------------------------------------------------------------------------------- teacher


def _teacher_replies(task) -> list[FakeReply]:
    """A teacher that replays the gold script as OpenAI tool calls."""
    return [
        FakeReply(content=turn.content, tool_calls=[dict(call) for call in turn.tool_calls], prompt_tokens=1000)
        for turn in gold_agent_turns(task, solo_mode=False)
    ]


def test_teacher_traces_end_to_end_with_resume(tmp_path, train_tasks, tok_dir, scripted_user_env, monkeypatch):
    first, second = train_tasks[6], train_tasks[40]
    monkeypatch.setenv("SFT_TEST_TEACHER_KEY", "sk-test-secret-value")
    out = tmp_path / "teacher.jsonl"
    args = ["--source", "teacher", "--task-ids", f"{first.id},{second.id}", "--concurrency", "1",
            "--teacher-model", "big-teacher", "--teacher-api-key-env", "SFT_TEST_TEACHER_KEY",
            "--user-kind", "scripted", "--tokenizer", tok_dir, "--price-input-per-mtok", "1.0"]  # fmt: skip
    with FakeOpenAIServer(_teacher_replies(first)) as server:
        # The replies for the second task are missing: its first request gets HTTP 400 and the episode fails.
        rows = _generate(out, *args, "--teacher-base-url", server.base_url)
        requests = server.chat_requests()
    assert [r["metadata"]["task_id"] for r in rows] == [first.id]
    attempts = {a["task_id"]: a for a in _attempts(out)}
    assert attempts[first.id]["reward"] == 1.0 and attempts[first.id]["policy_prompt_tokens"] >= 1000
    assert attempts[second.id]["status"] == "failed"
    body = requests[0].body
    assert body["model"] == "big-teacher" and body["tools"] and body["tool_choice"] == "auto"
    assert [m["role"] for m in body["messages"]] == ["system", "assistant", "user"]
    assert requests[0].headers["Authorization"] == "Bearer sk-test-secret-value"
    assert "sk-test-secret-value" not in out.read_text() + out.with_name(out.name + ".attempts.jsonl").read_text()

    with FakeOpenAIServer(_teacher_replies(second)) as server:
        rows = _generate(out, *args, "--teacher-base-url", server.base_url)
        replayed = server.chat_requests()
    # Only the failed attempt ran again: every request of the resumed run belongs to the second task.
    assert len(replayed) == len(gold_agent_turns(second, solo_mode=False))
    assert replayed[0].body["messages"][2] == {"role": "user", "content": opening_message(second)}
    assert sorted(r["metadata"]["task_id"] for r in rows) == sorted([first.id, second.id])
    for row in rows:
        assert row["metadata"]["source"] == "teacher" and row["metadata"]["teacher_model"] == "openai:big-teacher"
        assert row["metadata"]["user_kind"] == "scripted"
    assert check_sft_data.main([str(out), "--tokenizer", tok_dir, "--quiet"]) == 0


def test_gemini_teacher(tmp_path, train_tasks, tok_dir, scripted_user_env, monkeypatch):
    """The same teacher path through the Gemini client (google-genai SDK against the fake server's Gemini route)."""
    pytest.importorskip("google.genai")
    task = train_tasks[9]
    monkeypatch.setenv("SFT_TEST_GEMINI_KEY", "gm-test-secret-value")
    out = tmp_path / "gemini.jsonl"
    with FakeOpenAIServer(_teacher_replies(task)) as server:
        rows = _generate(
            out, "--source", "teacher", "--task-ids", task.id, "--teacher-kind", "gemini", "--teacher-model",
            "gemini-2.5-flash", "--teacher-base-url", server.root_url, "--teacher-api-key-env", "SFT_TEST_GEMINI_KEY",
            "--user-kind", "scripted", "--tokenizer", tok_dir,
        )  # fmt: skip
        assert all(":generateContent" in r.path for r in server.requests)
    assert len(rows) == 1 and rows[0]["metadata"]["teacher_model"] == "gemini:gemini-2.5-flash"
    assert rows[0]["metadata"]["reward"] == 1.0
    assert "gm-test-secret-value" not in out.read_text()


# --------------------------------------------------------------------------------------------------------- RFT


def _partial_case(tasks) -> tuple[Any, int, float]:
    """A task, a gold action to leave out, and the partial score left: in [0.6, 1)."""
    for task in tasks:
        basis = [b.value for b in task.evaluation_criteria.reward_basis]
        if basis != ["ENV_ASSERTION"]:
            continue
        for k in range(len(task.evaluation_criteria.actions)):
            met = assertions_met_after(task, "telecom", skip=[k])
            if 0.6 <= sum(met) / len(met) < 1.0:
                return task, k, sum(met) / len(met)
    raise AssertionError("no telecom train task with a partial score in [0.6, 1)")


class RftScript:
    """The policy's text per task and attempt: gold, a near miss (one gold action left out, then a transfer), or a
    malformed first turn followed by gold. Tasks are told apart by the user's opening message in the prompt."""

    def __init__(self, plans: dict[str, tuple[Any, list[str], int]]) -> None:
        self.plans = plans  # task id -> (task, variant per attempt, gold action a near miss leaves out)
        self.started: Counter[str] = Counter()
        self.current: dict[str, str] = {}

    @staticmethod
    def texts(task: Any, variant: str, skip: int = 0) -> list[str]:
        gold = gold_script_texts(task, solo_mode=False)
        if variant == "near_miss":
            return [t for i, t in enumerate(gold[:-1]) if i != skip] + [TRANSFER_MESSAGE]
        if variant == "malformed":
            return ['<tool_call>\n{"name": "get_customer_by_id", "arguments": \n</tool_call>', *gold]
        return gold

    def __call__(self, prompt: str, params: dict[str, Any]) -> str:
        task_id = next(tid for tid, (task, _, _) in self.plans.items() if opening_message(task) in prompt)
        task, variants, skip = self.plans[task_id]
        index = agent_turn_index(prompt, solo_mode=False)
        if index == 0:
            variant = variants[min(self.started[task_id], len(variants) - 1)]
            self.started[task_id] += 1
            self.current[task_id] = variant
        texts = self.texts(task, self.current[task_id], skip)
        return texts[min(index, len(texts) - 1)]


def test_rft_end_to_end_with_partial_and_resume(tmp_path, train_tasks, tok_dir, smollm2_tokenizer, scripted_user_env):
    partial_task, skip, partial = _partial_case(train_tasks)
    others = [t for t in train_tasks if opening_message(t) != opening_message(partial_task)]
    solved = others[0]
    malformed = next(t for t in others[1:] if opening_message(t) != opening_message(solved))
    script = RftScript(
        {
            solved.id: (solved, ["near_miss", "gold"], 0),
            partial_task.id: (partial_task, ["near_miss"], skip),
            malformed.id: (malformed, ["malformed"], 0),
        }
    )
    out = tmp_path / "rft.jsonl"
    ids = ",".join(t.id for t in (solved, partial_task, malformed))
    with ScriptedPolicyServer(smollm2_tokenizer, script) as url:
        args = ["--source", "rft", "--task-ids", ids, "--policy-url", url, "--policy-api", "sglang", "--tokenizer",
                tok_dir, "--user-kind", "scripted", "--concurrency", "1", "--min-partial", "0.6"]  # fmt: skip
        rows = _generate(out, *args, "--n", "2")
        assert dict(script.started) == {solved.id: 2, partial_task.id: 2, malformed.id: 2}
        attempts = _attempts(out)
        assert len(attempts) == 6
        by_task = {tid: [r for r in rows if r["metadata"]["task_id"] == tid] for tid in script.plans}
        assert [r["metadata"]["kept_as"] for r in by_task[solved.id]] == ["success"]  # its near miss is not kept
        assert by_task[solved.id][0]["metadata"]["reward"] == 1.0 and by_task[solved.id][0]["metadata"]["attempt"] == 1
        kept_partial = by_task[partial_task.id]
        assert len(kept_partial) == 1 and kept_partial[0]["metadata"]["kept_as"] == "partial"
        assert kept_partial[0]["metadata"]["reward"] == 0.0
        assert kept_partial[0]["metadata"]["partial_score"] == pytest.approx(partial)
        assert by_task[malformed.id] == []  # successes, but with an invalid turn: dropped
        bad = [a for a in attempts if a["task_id"] == malformed.id]
        assert all(a["reward"] == 1.0 and a["invalid_turns"] == 1 and "invalid" in a["drop_reason"] for a in bad)

        # Resume with one more attempt per task: only attempt 2 is played. Its rows repeat earlier ones (the same
        # gold success, the same near miss): the final file holds each once.
        rows = _generate(out, *args, "--n", "3")
        assert dict(script.started) == {solved.id: 3, partial_task.id: 3, malformed.id: 3}
    assert len(_attempts(out)) == 9
    assert Counter(r["metadata"]["task_id"] for r in rows) == {solved.id: 1, partial_task.id: 1}
    assert all(r["metadata"]["source"] == "rft" and r["metadata"]["teacher_model"].endswith(url) for r in rows)
    checker = RowChecker(smollm2_tokenizer, 16384)
    for row in rows:
        assert checker.check(row).ok
    # Without --min-partial only successes are kept.
    rows = _generate(out, *[a for a in args if a not in ("--min-partial", "0.6")], "--n", "3")
    assert Counter(r["metadata"]["task_id"] for r in rows) == {solved.id: 1}


@pytest.mark.slow
def test_rft_against_the_real_cpu_model(cpu_policy_server, tmp_path, tok_dir, scripted_user_env, monkeypatch):
    """The RFT path with a real model behind the real CPU server: attempts are recorded and judged; whatever is
    kept passes the row checks (a 135M model rarely solves a task, so nothing has to be kept)."""
    monkeypatch.setenv("TAU2_MAX_TURNS", "2")
    out = tmp_path / "real.jsonl"
    task_id = get_task_store().task_ids("telecom", "train")[0]
    rows = _generate(
        out, "--source", "rft", "--task-ids", task_id, "--n", "1", "--policy-url", cpu_policy_server,
        "--tokenizer", tok_dir, "--user-kind", "scripted", "--policy-variant", "compact",
        "--max-response-tokens", "96", "--min-partial", "0.0",
    )  # fmt: skip
    [attempt] = _attempts(out)
    assert attempt["status"] in ("completed", "truncated"), attempt["failure"]
    assert attempt["policy_completion_tokens"] > 0 and attempt["reward"] is not None
    assert all(r["metadata"]["policy_variant"] == "compact" for r in rows)
    if rows:
        assert check_sft_data.main([str(out), "--tokenizer", tok_dir, "--quiet"]) == 0
