"""ChatRenderer's fast paths give exactly what the slow ones give: a message's rendering as its role's cached prefix
+ content + suffix (instead of a Jinja render per turn), and the Rust tokenizer called directly (instead of the
transformers wrapper). Checked on the SmolLM2 tool template and on Qwen3-4B-Instruct-2507's real tokenizer, with
contents that a template could mangle (edge whitespace, Jinja syntax, special tokens, non-ASCII)."""

from __future__ import annotations

import pytest

from examples import qwen3_tokenizer
from rollout.token_record import ChatRenderer

CONTENTS = [
    "",
    "plain",
    "  edge whitespace \n\n",
    '{"customer_id": "C1001", "lines": [{"line_id": "L1", "status": "Active"}]}',
    "{{ jinja }} {% if x %} {# c #}",
    "<|im_end|>\n<|im_start|>assistant\n<tool_call>",
    "Grüße 😀 日本語\t\r\n",
    "</tool_response> <think>x</think>",
]
MESSAGES = [
    *({"role": "user", "content": c} for c in CONTENTS),
    *({"role": "tool", "tool_call_id": f"call_{i}", "content": c} for i, c in enumerate(CONTENTS)),
    *({"role": "tool", "tool_call_id": "c", "name": "get_customer_by_phone", "content": c} for c in CONTENTS),
]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    directory = qwen3_tokenizer.prepare_qwen3_tokenizer(tmp_path_factory.mktemp("qwen3") / "tokenizer")
    return qwen3_tokenizer.load_qwen3_tokenizer(directory)


@pytest.mark.parametrize("which", ["smollm2", "qwen3"])
def test_cached_role_wrap_and_rust_encode_match_the_slow_paths(which, request):
    tokenizer = request.getfixturevalue("tok" if which == "smollm2" else "qwen3")
    renderer = ChatRenderer(tokenizer, [{"type": "function", "function": {"name": "f", "parameters": {}}}])
    for message in MESSAGES:
        fast = renderer.new_turns_text([message])
        assert fast == renderer._render_new_turns([message]), message
        assert renderer._wrap(message) is not None, message  # the fast path is taken for these templates
        for text in (fast, renderer.continuation_text([message], False)):
            assert renderer.encode(text) == list(tokenizer.encode(text, add_special_tokens=False))
    assert ChatRenderer._RUST[id(tokenizer)] is not None  # both are fast tokenizers: Rust called directly


def test_a_template_that_changes_the_content_takes_the_render_path(tok):
    """A template that strips the content is caught by the probe check and rendered every time."""

    class Stripping:
        def __init__(self, inner):
            self.inner = inner
            self.chat_template = inner.chat_template.replace("{{- content -}}", "{{- content | trim -}}")

        def apply_chat_template(self, *args, **kwargs):
            return self.inner.apply_chat_template(*args, chat_template=self.chat_template, **kwargs)

        def encode(self, *args, **kwargs):
            return self.inner.encode(*args, **kwargs)

        def convert_tokens_to_ids(self, token):
            return self.inner.convert_tokens_to_ids(token)

    stripping = Stripping(tok)
    assert stripping.chat_template != tok.chat_template, "the template changed: update this test's replacement"
    renderer = ChatRenderer(stripping)
    message = {"role": "user", "content": "  padded  "}
    assert renderer._wrap(message) is None
    assert renderer.new_turns_text([message]) == renderer._render_new_turns([message])
    assert "  padded  " not in renderer.new_turns_text([message])


def test_ids_json_grows_with_the_record_and_matches_a_full_encode():
    import orjson

    from rollout.clients.policy import JsonIds, _json_body
    from rollout.token_record import IdsJson, TokenRecord

    record = TokenRecord(prompt_ids=[5, 6, 7])
    ids_json = IdsJson(record)
    assert orjson.loads(ids_json()) == [5, 6, 7]
    for step in range(6):
        if step % 2:
            record.add_glue([100 + step, 0])
        else:
            record.add_sampled([200 + step], [-0.5])
        assert ids_json() == orjson.dumps(record.all_ids)
    assert IdsJson(TokenRecord(prompt_ids=[]))() == b"[]"
    params = {"sampling_params": {"temperature": 1.0}, "return_logprob": True}
    spliced = _json_body("input_ids", JsonIds(ids_json(), len(record.all_ids)), params)
    assert orjson.loads(spliced) == {"input_ids": record.all_ids, **params}
    assert _json_body("prompt", JsonIds(b"[1]", 1), {}) == b'{"prompt":[1]}'


def test_shared_ids_keep_values_and_share_the_objects(tok):
    from rollout.token_record import shared_ids

    fresh = [int(str(n)) for n in (5, 1000, 49151, 300000, -1)]  # new int objects
    shared = shared_ids(fresh)
    assert shared == fresh
    assert shared_ids([int("1000")])[0] is shared[1]  # one object per id across calls
    renderer = ChatRenderer(tok)
    text = "<|im_start|>user\nno signal<|im_end|>\n"
    assert renderer.encode(text) == list(tok.encode(text, add_special_tokens=False))
