"""The CPU stand-in stack: the converted SmolLM2 folder, its Qwen-style tool chat template, and the CPU server.

Fast tests render the template with the real tokenizer. Slow tests run the real model behind
scripts/cpu_policy_server.py and check its sglang / vLLM wire protocols against a teacher-forced forward pass.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from examples import prepare_cpu_model as prepare_cpu_model_module
from examples.prepare_cpu_model import (
    MARKER_NAME,
    TEMPLATE_PATH,
    chat_template_text,
    prepare_cpu_model,
    read_marker,
)
from rollout.token_record import load_tokenizer
from tests.conftest import http_json
from tests.test_sglang_wire import check_sglang_answer

IM_START, IM_END = 1, 2

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_customer_by_phone",
            "description": "Find a customer <by> phone & return 'details'.",
            "parameters": {
                "type": "object",
                "properties": {"phone_number": {"type": "string", "description": "e.g. 555-123-2002"}},
                "required": ["phone_number"],
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "transfer_to_human_agents", "description": "Hand over.", "parameters": {}},
    },
]


def render(tokenizer: Any, messages: list[dict], tools: list[dict] | None = None, gen: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen)


def call(name: str, arguments: Any) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def tools_block(system: str | None) -> str:
    head = "<|im_start|>system\n" + (f"{system}\n\n" if system is not None else "")
    schemas = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in TOOLS)
    return (
        head + "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{schemas}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    )


# ------------------------------------------------------------------------------------------ the prepared folder


def test_prepared_folder_is_complete_fp32_with_the_tool_template(smollm2_model_dir: Path) -> None:
    marker = read_marker(smollm2_model_dir)
    assert marker is not None and marker["dtype"] == "float32"
    config = json.loads((smollm2_model_dir / "config.json").read_text())
    assert config["dtype"] == "float32" and config["model_type"] == "llama" and config["vocab_size"] == 49152
    # The safetensors header says every tensor is F32 (bf16 would run ~4x slower on these CPUs).
    with (smollm2_model_dir / "model.safetensors").open("rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    dtypes = {entry["dtype"] for name, entry in header.items() if name != "__metadata__"}
    assert dtypes == {"F32"}
    tokenizer_config = json.loads((smollm2_model_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (smollm2_model_dir / "chat_template.jinja").read_text() == TEMPLATE_PATH.read_text()


def test_prepare_is_cached(smollm2_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = smollm2_model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def no_conversion(*args: Any) -> None:
        raise AssertionError("a complete folder was converted again")

    monkeypatch.setattr(prepare_cpu_model_module, "_convert", no_conversion)
    assert prepare_cpu_model(smollm2_model_dir) == smollm2_model_dir
    assert weights.stat().st_mtime_ns == before


def test_changed_template_is_reinstalled_without_converting(smollm2_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    for item in smollm2_model_dir.iterdir():
        if item.name == "model.safetensors":
            (out / item.name).symlink_to(item)  # never rewritten by a template reinstall
        else:
            shutil.copy(item, out / item.name)
    (out / "chat_template.jinja").write_text("{{ 'stale' }}")
    marker = json.loads((out / MARKER_NAME).read_text())
    marker["chat_template_sha256"] = "stale"
    (out / MARKER_NAME).write_text(json.dumps(marker))

    assert prepare_cpu_model(out) == out.resolve()
    assert (out / "model.safetensors").is_symlink()
    assert load_tokenizer(out).chat_template == chat_template_text()
    assert read_marker(out)["chat_template_sha256"] != "stale"


def test_cli_prints_the_folder(smollm2_model_dir: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "examples" / "prepare_cpu_model.py"
    done = subprocess.run(
        [sys.executable, str(script), "--out", str(smollm2_model_dir)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(smollm2_model_dir)


@pytest.mark.slow
def test_half_written_folder_is_converted_again(smollm2_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{")  # a crash left this behind, and no marker
    try:
        assert prepare_cpu_model(out) == out.resolve()
        assert read_marker(out) is not None and json.loads((out / "config.json").read_text())["model_type"] == "llama"
        assert not (tmp_path / "model.partial").exists()
        fresh, cached = load_file(out / "model.safetensors"), load_file(smollm2_model_dir / "model.safetensors")
        assert fresh.keys() == cached.keys() and all(fresh[k].equal(cached[k]) for k in fresh)
    finally:
        shutil.rmtree(out, ignore_errors=True)  # 0.5 GB: not left for pytest's kept tmp dirs


def test_special_tokens_are_chatml(smollm2_tokenizer: Any) -> None:
    assert smollm2_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [IM_START, IM_END]
    assert smollm2_tokenizer.eos_token_id == IM_END
    # Tool-call markers are plain text, so they survive skip_special_tokens.
    ids = smollm2_tokenizer.encode("<tool_call>\n{}\n</tool_call>")
    assert smollm2_tokenizer.decode(ids, skip_special_tokens=True) == "<tool_call>\n{}\n</tool_call>"


# ------------------------------------------------------------------------------------------ the chat template


def test_no_default_system_prompt(smollm2_tokenizer: Any) -> None:
    assert render(smollm2_tokenizer, [{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n"


def test_system_turn_without_tools(smollm2_tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    assert render(smollm2_tokenizer, messages) == expected


def test_tools_are_listed_in_the_system_turn(smollm2_tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "You are a telecom agent."}, {"role": "user", "content": "hi"}]
    expected = tools_block("You are a telecom agent.") + "<|im_start|>user\nhi<|im_end|>\n"
    assert render(smollm2_tokenizer, messages, tools=TOOLS) == expected


def test_tools_without_system_message_open_with_the_tools_section(smollm2_tokenizer: Any) -> None:
    rendered = render(smollm2_tokenizer, [{"role": "user", "content": "hi"}], tools=TOOLS)
    assert rendered == tools_block(None) + "<|im_start|>user\nhi<|im_end|>\n"


def test_generation_prompt(smollm2_tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "hi"}]
    assert render(smollm2_tokenizer, messages, gen=True) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert not render(smollm2_tokenizer, messages).endswith("<|im_start|>assistant\n")


def test_consecutive_tool_messages_form_one_user_turn(smollm2_tokenizer: Any) -> None:
    messages = [
        {"role": "user", "content": "check"},
        {"role": "assistant", "content": "", "tool_calls": [call("a", {}), call("b", {"x": 1})]},
        {"role": "tool", "name": "a", "content": '{"ok": true}'},
        {"role": "tool", "name": "b", "content": "done"},
        {"role": "assistant", "content": None, "tool_calls": [call("c", {})]},
        {"role": "tool", "name": "c", "content": "third"},
        {"role": "assistant", "content": "All set."},
    ]
    expected = (
        "<|im_start|>user\ncheck<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n'
        '<tool_call>\n{"name": "b", "arguments": {"x": 1}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"ok": true}\n</tool_response>\n'
        "<tool_response>\ndone\n</tool_response><|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "c", "arguments": {}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nthird\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nAll set.<|im_end|>\n"
    )
    assert render(smollm2_tokenizer, messages) == expected


def test_content_before_calls_and_string_arguments_as_is(smollm2_tokenizer: Any) -> None:
    message = {
        "role": "assistant",
        "content": "Let me look that up.",
        "tool_calls": [call("lookup", '{"id":7}'), {"name": "bare", "arguments": {"k": "v"}}],
    }
    expected = (
        "<|im_start|>assistant\nLet me look that up.\n"
        '<tool_call>\n{"name": "lookup", "arguments": {"id":7}}\n</tool_call>\n'
        '<tool_call>\n{"name": "bare", "arguments": {"k": "v"}}\n</tool_call><|im_end|>\n'
    )
    assert render(smollm2_tokenizer, [message]) == expected


ARGUMENT_CASES = [
    {},
    {"phone_number": "555-123-2002"},
    {"z": 1, "a": 2, "m": {"y": [3, 2, 1], "b": None}},  # insertion order, not sorted
    {"name": "Zoë Ångström", "city": "東京", "emoji": "📱", "rtl": "שלום"},
    {"count": 0, "neg": -17, "big": 12345678901234567890, "pi": 3.14159, "tiny": 1e-07, "whole": 2.0, "exp": 1e300},
    {"flag": True, "other": False, "nothing": None},
    {"text": "quote \" backslash \\ newline \n tab \t <b>&amp;</b> 'single'"},
    {"nested": {"deeper": {"deepest": [{"a": []}, {}, [[]]]}}},
    {"control": "\u0001\u001f", "sep": "\u2028"},
]


@pytest.mark.parametrize("arguments", ARGUMENT_CASES)
def test_tool_call_json_is_byte_identical_to_json_dumps(smollm2_tokenizer: Any, arguments: dict) -> None:
    rendered = render(smollm2_tokenizer, [{"role": "assistant", "content": None, "tool_calls": [call("f", arguments)]}])
    body = json.dumps({"name": "f", "arguments": arguments}, ensure_ascii=False)
    assert rendered == f"<|im_start|>assistant\n<tool_call>\n{body}\n</tool_call><|im_end|>\n"


JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(min_size=1, max_size=12), arguments=st.dictionaries(st.text(), JSON_VALUES, max_size=5))
def test_tool_call_json_matches_json_dumps_for_any_arguments(
    smollm2_tokenizer: Any, name: str, arguments: dict
) -> None:
    rendered = render(
        smollm2_tokenizer, [{"role": "assistant", "content": None, "tool_calls": [call(name, arguments)]}]
    )
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    assert rendered == f"<|im_start|>assistant\n<tool_call>\n{body}\n</tool_call><|im_end|>\n"


def test_assistant_spans_are_marked_for_loss_masks(smollm2_tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [call("a", {"q": "é"})]},
        {"role": "tool", "content": "r"},
        {"role": "assistant", "content": "Done."},
    ]
    rendered = render(smollm2_tokenizer, messages, tools=TOOLS)
    first = 'Checking.\n<tool_call>\n{"name": "a", "arguments": {"q": "é"}}\n</tool_call><|im_end|>\n'
    assert f"<|im_start|>assistant\n{first}" in rendered
    assert rendered.endswith("<|im_start|>assistant\nDone.<|im_end|>\n")
    out = smollm2_tokenizer.apply_chat_template(
        messages, tools=TOOLS, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    trained = smollm2_tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
    # Body, <|im_end|> and the newline are trained; `<|im_start|>assistant\n` and every other turn are not.
    assert trained == first + "Done.<|im_end|>\n"


# ------------------------------------------------------------------------------------------ the CPU server (slow)

SLIME_PARAMS = {
    "temperature": 0.0,
    "top_p": 1.0,
    "top_k": -1,
    "max_new_tokens": 48,
    "stop": None,
    "stop_token_ids": [IM_END],
    "skip_special_tokens": False,
    "no_stop_trim": True,
    "spaces_between_special_tokens": False,
}


def chat_prompt(tokenizer: Any, question: str) -> list[int]:
    messages = [{"role": "system", "content": "Answer in one short sentence."}, {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]


def generate(url: str, input_ids: list[int], **params: Any) -> dict:
    status, body = http_json(
        f"{url}/generate",
        {"input_ids": input_ids, "sampling_params": {**SLIME_PARAMS, **params}, "return_logprob": True},
    )
    assert status == 200, body
    return body


@pytest.fixture(scope="module")
def reference_model(smollm2_model_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_model_dir, dtype=torch.float32).eval()


def teacher_forced_logprobs(model: Any, prompt: list[int], output: list[int]) -> list[float]:
    import torch

    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + output])).logits[0].float()
    logprobs = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return logprobs.gather(1, torch.tensor(output)[:, None])[:, 0].tolist()


@pytest.mark.slow
def test_generate_stops_on_im_end_and_keeps_it(cpu_policy_server: str, smollm2_tokenizer: Any) -> None:
    prompt = chat_prompt(smollm2_tokenizer, "What is the capital of France?")
    body = generate(cpu_policy_server, prompt)
    check_sglang_answer(body)
    meta, ids = body["meta_info"], body["output_ids"]
    assert meta["finish_reason"] == {"type": "stop", "matched": IM_END}
    assert ids[-1] == IM_END and IM_END not in ids[:-1]
    assert [entry[1] for entry in meta["output_token_logprobs"]] == ids
    assert all(
        isinstance(entry[0], float) and entry[0] <= 0.0 and entry[2] is None for entry in meta["output_token_logprobs"]
    )
    assert meta["prompt_tokens"] == len(prompt) and meta["completion_tokens"] == len(ids)
    assert isinstance(meta["id"], str) and meta["e2e_latency"] > 0 and meta["cached_tokens"] >= 0
    assert body["text"] == smollm2_tokenizer.decode(ids) and body["text"].endswith("<|im_end|>")
    assert "Paris" in body["text"]

    # Without no_stop_trim the text drops the stop token; the ids and logprobs still hold it (as sglang does).
    trimmed = generate(cpu_policy_server, prompt, no_stop_trim=False, skip_special_tokens=True)
    assert trimmed["output_ids"] == ids
    assert trimmed["text"] == smollm2_tokenizer.decode(ids[:-1])


@pytest.mark.slow
def test_generate_max_new_tokens_gives_length(cpu_policy_server: str, smollm2_tokenizer: Any) -> None:
    prompt = chat_prompt(smollm2_tokenizer, "Write a long story about a dragon.")
    body = generate(cpu_policy_server, prompt, max_new_tokens=6)
    assert body["meta_info"]["finish_reason"] == {"type": "length", "length": 6}
    assert len(body["output_ids"]) == len(body["meta_info"]["output_token_logprobs"]) == 6


@pytest.mark.slow
def test_stop_strings_text_input_and_batches(cpu_policy_server: str, smollm2_tokenizer: Any) -> None:
    prompt = chat_prompt(smollm2_tokenizer, "What is the capital of France?")
    full = generate(cpu_policy_server, prompt)["text"]
    cut = full.index("Paris")
    body = generate(cpu_policy_server, prompt, stop=["Paris"], no_stop_trim=False)
    assert body["meta_info"]["finish_reason"] == {"type": "stop", "matched": "Paris"}
    assert body["text"] == full[:cut]

    status, answer = http_json(
        f"{cpu_policy_server}/generate", {"text": smollm2_tokenizer.decode(prompt), "sampling_params": SLIME_PARAMS}
    )
    assert status == 200 and answer["text"] == full and "output_token_logprobs" not in answer["meta_info"]

    status, answers = http_json(
        f"{cpu_policy_server}/generate",
        {"input_ids": [prompt, prompt], "sampling_params": {**SLIME_PARAMS, "max_new_tokens": 3}},
    )
    assert status == 200 and isinstance(answers, list) and len(answers) == 2
    assert answers[0]["output_ids"] == answers[1]["output_ids"]


@pytest.mark.slow
def test_completions_with_token_prompt_match_generate(cpu_policy_server: str, smollm2_tokenizer: Any) -> None:
    prompt = chat_prompt(smollm2_tokenizer, "Name a primary color.")
    native = generate(cpu_policy_server, prompt)
    status, body = http_json(
        f"{cpu_policy_server}/v1/completions",
        {
            "model": "smollm2-135m-instruct-tools",
            "prompt": prompt,
            "max_tokens": 48,
            "temperature": 0.0,
            "top_p": 1.0,
            "logprobs": 1,
            "return_token_ids": True,
            "stop_token_ids": [IM_END],
            "skip_special_tokens": False,
            "include_stop_str_in_output": True,
        },
    )
    assert status == 200, body
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop" and choice["stop_reason"] is None
    assert choice["token_ids"] == native["output_ids"]
    assert choice["prompt_token_ids"] == prompt
    assert choice["text"] == native["text"]
    logprobs = choice["logprobs"]
    assert (
        len(logprobs["tokens"])
        == len(logprobs["token_logprobs"])
        == len(logprobs["text_offset"])
        == len(choice["token_ids"])
    )
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert all(len(top) >= 1 for top in logprobs["top_logprobs"])
    native_lps = [entry[0] for entry in native["meta_info"]["output_token_logprobs"]]
    assert max(abs(a - b) for a, b in zip(logprobs["token_logprobs"], native_lps, strict=True)) < 1e-3
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(prompt) and usage["completion_tokens"] == len(choice["token_ids"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    status, short = http_json(
        f"{cpu_policy_server}/v1/completions", {"prompt": prompt, "max_tokens": 4, "temperature": 0.0}
    )
    assert status == 200 and short["choices"][0]["finish_reason"] == "length" and "token_ids" not in short["choices"][0]
    assert short["choices"][0]["logprobs"] is None


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_logprobs_match_a_teacher_forced_pass(
    cpu_policy_server: str, smollm2_tokenizer: Any, reference_model: Any, temperature: float
) -> None:
    prompt = chat_prompt(smollm2_tokenizer, "Tell me about your favourite tool.")
    body = generate(cpu_policy_server, prompt, temperature=temperature, max_new_tokens=24, seed=1234)
    ids = body["output_ids"]
    served = [entry[0] for entry in body["meta_info"]["output_token_logprobs"]]
    reference = teacher_forced_logprobs(reference_model, prompt, ids)
    assert len(served) == len(ids) == len(reference) > 0
    assert max(abs(a - b) for a, b in zip(served, reference, strict=True)) < 1e-3


@pytest.mark.slow
def test_seeded_sampling_is_reproducible(cpu_policy_server: str, smollm2_tokenizer: Any) -> None:
    prompt = chat_prompt(smollm2_tokenizer, "Say something surprising.")
    params = {"temperature": 1.0, "max_new_tokens": 12, "seed": 7}
    first = generate(cpu_policy_server, prompt, **params)["output_ids"]
    assert generate(cpu_policy_server, prompt, **params)["output_ids"] == first


@pytest.mark.slow
def test_prefix_cache_reuses_a_conversation(cpu_policy_server: str, smollm2_tokenizer: Any) -> None:
    prompt = chat_prompt(smollm2_tokenizer, "What is two plus two?")
    first = generate(cpu_policy_server, prompt, max_new_tokens=12)
    closing = "\n" if first["output_ids"][-1] == IM_END else "<|im_end|>\n"
    follow_up = smollm2_tokenizer.encode(f"{closing}<|im_start|>user\nAnd three?<|im_end|>\n<|im_start|>assistant\n")
    longer = prompt + first["output_ids"] + follow_up
    cached = generate(cpu_policy_server, longer, max_new_tokens=12)
    # Everything the first request fed through the model (prompt + all sampled tokens but the last) is reused.
    assert cached["meta_info"]["cached_tokens"] == len(prompt) + len(first["output_ids"]) - 1
    assert http_json(f"{cpu_policy_server}/flush_cache", {})[0] == 200
    fresh = generate(cpu_policy_server, longer, max_new_tokens=12)
    assert fresh["meta_info"]["cached_tokens"] == 0
    assert fresh["output_ids"] == cached["output_ids"]


LONG_PARAMS = {**SLIME_PARAMS, "max_new_tokens": 4000, "ignore_eos": True, "stop_token_ids": []}


def _abort_until_done(url: str, threads: list[threading.Thread], body: dict) -> list[int]:
    """/health, then /abort_request, again and again until every request thread has its answer; the health codes.
    (An abort sent before its request arrived misses it: the next round catches it.)"""
    codes = []
    while any(thread.is_alive() for thread in threads):
        codes.append(http_json(f"{url}/health")[0])
        assert http_json(f"{url}/abort_request", body)[0] == 200
        for thread in threads:
            thread.join(0.05)  # pacing only: the outcome does not depend on it
    return codes


@pytest.mark.slow
def test_health_and_abort_are_answered_while_generations_run(cpu_policy_server: str, smollm2_tokenizer: Any) -> None:
    """The event loop never waits for the model. Proven by outcome, not by timing: three 4000-token generations are
    each cut short by an abort the server handled while they were queued or running; with a blocked loop the abort
    would be read only after the last token, too late to cut anything."""
    prompts = [chat_prompt(smollm2_tokenizer, f"Count to {n}.") for n in (3, 4, 5)]
    results: list[tuple[int, Any] | None] = [None] * len(prompts)

    def run(i: int) -> None:
        body = {"input_ids": prompts[i], "sampling_params": LONG_PARAMS, "rid": f"count-{i}"}
        results[i] = http_json(f"{cpu_policy_server}/generate", body)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    codes = _abort_until_done(cpu_policy_server, threads, {"abort_all": True})
    assert codes and set(codes) == {200}
    for result in results:
        assert result is not None and result[0] == 200, result
        answer = result[1]
        assert answer["meta_info"]["finish_reason"]["type"] == "abort" and len(answer["output_ids"]) < 4000


@pytest.mark.slow
def test_info_endpoints_and_bad_requests(cpu_policy_server: str, smollm2_model_dir: Path) -> None:
    status, info = http_json(f"{cpu_policy_server}/get_model_info")
    assert status == 200 and Path(info["model_path"]) == smollm2_model_dir.resolve()
    status, models = http_json(f"{cpu_policy_server}/v1/models")
    assert status == 200 and models["data"][0]["id"] == "smollm2-135m-instruct-tools"

    bad = [
        ("/generate", {"input_ids": [], "sampling_params": {}}),
        ("/generate", {"input_ids": [1, 99999999], "sampling_params": {}}),
        ("/generate", {"input_ids": [1, 2], "sampling_params": {"no_such_param": 1}}),
        ("/generate", {"input_ids": [1, 2], "sampling_params": {"repetition_penalty": 1.3}}),
        ("/generate", {"input_ids": [1, 2], "sampling_params": {"temperature": -1}}),
        ("/generate", {"input_ids": [1, 2], "text": "both"}),
        ("/generate", [1, 2, 3]),
        ("/v1/completions", {"prompt": [1, 2], "max_tokens": 100000}),
        ("/v1/completions", {"prompt": {"not": "a prompt"}}),
    ]
    for path, body in bad:
        status, answer = http_json(f"{cpu_policy_server}{path}", body)
        assert status == 400, (path, body, answer)
        assert isinstance(answer["error"]["message"], str)
    status, answer = http_json(f"{cpu_policy_server}/v1/completions", {"model": "other", "prompt": [1, 2]})
    assert status == 404


@pytest.mark.slow
def test_fault_injection_and_clean_shutdown(cpu_policy_server_factory: Any) -> None:
    server = cpu_policy_server_factory("--fail-first-n", "2", "--delay-s", "0.5", "--threads", "1")
    request = {"input_ids": [IM_START, 4093, 198], "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}
    statuses = []
    for _ in range(3):
        status, body = http_json(f"{server.url}/generate", request)  # each one delayed first (not timed here)
        statuses.append(status)
        if status == 500:
            assert "injected" in body["error"]["message"]
    assert statuses == [500, 500, 200]
    assert http_json(f"{server.url}/health")[0] == 200  # health is never failed or delayed
    os.killpg(server.process.pid, signal.SIGTERM)
    assert server.process.wait(30) == 0
    assert "stopped" in server.log_tail()


@pytest.mark.slow
def test_abort_request_and_client_disconnect_stop_generation(cpu_policy_server: str, smollm2_tokenizer: Any) -> None:
    prompt = chat_prompt(smollm2_tokenizer, "Write a very long essay.")
    answer: dict[str, Any] = {}

    def run() -> None:
        body = {"input_ids": prompt, "sampling_params": LONG_PARAMS, "return_logprob": True, "rid": "long-1"}
        answer["status"], answer["body"] = http_json(f"{cpu_policy_server}/generate", body)

    thread = threading.Thread(target=run)
    thread.start()
    _abort_until_done(cpu_policy_server, [thread], {"rid": "long-1"})
    assert answer["status"] == 200
    meta, ids = answer["body"]["meta_info"], answer["body"]["output_ids"]
    assert meta["id"] == "long-1" and meta["finish_reason"]["type"] == "abort"
    assert len(ids) == len(meta["output_token_logprobs"]) < 4000

    # A client that gives up stops its generation: it never runs to its 4000 tokens. A finished generation would be
    # in the prefix cache; the next request on the same prompt (served after it: one worker) finds nothing cached.
    assert http_json(f"{cpu_policy_server}/flush_cache", {})[0] == 200
    with pytest.raises(OSError):
        http_json(f"{cpu_policy_server}/generate", {"input_ids": prompt, "sampling_params": LONG_PARAMS}, timeout=2)
    after = generate(cpu_policy_server, prompt, max_new_tokens=2)
    assert after["meta_info"]["cached_tokens"] == 0
