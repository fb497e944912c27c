"""sglang's /generate answer: one builder (rollout.clients.policy.sglang_generate_response) writes it for the CPU
server and every double, checked here against sglang's documented shape (slime's contract: text, output_ids,
meta_info with finish_reason, token counts and [logprob, id, text | None] per output id) and read back by the client."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

import pytest

from bench.doubles import start_doubles
from examples.prepare_cpu_model import prepare_cpu_model
from rollout.clients.policy import build_policy_client, sglang_generate_response
from tests.scripted_policy_server import Fault, ScriptedPolicyServer

FINISH_KEYS = {"stop": {"type", "matched"}, "length": {"type", "length"}, "abort": {"type", "message"}}


def check_sglang_answer(body: Any, return_logprob: bool = True) -> None:
    """sglang's /generate answer for one prompt, as slime reads it."""
    assert set(body) == {"text", "output_ids", "meta_info"} and isinstance(body["text"], str)
    ids, meta = body["output_ids"], body["meta_info"]
    assert all(isinstance(t, int) for t in ids)
    assert {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens"} <= set(meta)
    finish = meta["finish_reason"]
    assert set(finish) == FINISH_KEYS[finish["type"]]
    if finish["type"] == "length":
        assert finish["length"] == len(ids)
    assert meta["completion_tokens"] == len(ids) and meta["prompt_tokens"] > 0 and meta["cached_tokens"] >= 0
    if return_logprob:
        entries = meta["output_token_logprobs"]
        assert [entry[1] for entry in entries] == ids
        assert all(len(entry) == 3 and isinstance(entry[0], float) and entry[0] <= 0.0 for entry in entries)
    else:
        assert "output_token_logprobs" not in meta


def post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.mark.parametrize(("finish", "meta"), [("stop", {}), ("length", {}), ("abort", {"weight_version": "7"})])
def test_the_builder_writes_the_documented_shape_and_the_client_reads_it(finish, meta):
    ids, logprobs = [5, 6, 2], [-0.5, -1.25, -0.01]
    for with_logprobs in (True, False):
        body = sglang_generate_response(
            ids,
            "ab",
            finish,
            rid="r1",
            prompt_tokens=4,
            matched=2,
            logprobs=logprobs if with_logprobs else None,
            **meta,
        )
        check_sglang_answer(body, with_logprobs)
    assert (
        body["meta_info"]["finish_reason"]
        == {
            "stop": {"type": "stop", "matched": 2},
            "length": {"type": "length", "length": 3},
            "abort": {"type": "abort", "message": "request aborted"},
        }[finish]
    )


@pytest.mark.parametrize("fault", [None, Fault(abort=True, text="cut")])
def test_the_scripted_server_answers_the_documented_shape(tok, fault):
    server = ScriptedPolicyServer(tok, lambda prompt, params: fault or "Hello there.", weight_version="3")
    with server as url:
        prompt = tok.encode("Hi", add_special_tokens=False)
        for return_logprob in (True, False):
            body = post(
                f"{url}/generate", {"input_ids": prompt, "sampling_params": {}, "return_logprob": return_logprob}
            )
            check_sglang_answer(body, return_logprob)
        cut = post(f"{url}/generate", {"input_ids": prompt, "sampling_params": {"max_new_tokens": 2}})
        check_sglang_answer(cut, return_logprob=False)

        async def read() -> Any:
            client = build_policy_client(url)
            try:
                return await client.generate(prompt, {})
            finally:
                await client.aclose()

        out = asyncio.run(read())
    assert out.token_ids == body["output_ids"] and out.weight_version == "3"
    assert out.finish_reason == ("abort" if fault else "stop")


def test_the_benchmark_double_answers_the_documented_shape(tok):
    with start_doubles(prepare_cpu_model()) as doubles:
        prompt = tok.encode("Hi", add_special_tokens=False)
        check_sglang_answer(post(f"{doubles.policy_url}/generate", {"input_ids": prompt, "return_logprob": True}))
