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

    def text(ids_json: IdsJson) -> bytes:
        return b"".join(ids_json()) + b"]"

    record = TokenRecord(prompt_ids=[5, 6, 7])
    ids_json = IdsJson(record)
    assert orjson.loads(text(ids_json)) == [5, 6, 7]
    for step in range(6):
        if step % 2:
            record.add_glue([100 + step, 0])
        else:
            record.add_sampled([200 + step], [-0.5])
        assert text(ids_json) == orjson.dumps(record.all_ids)
    twin = IdsJson(TokenRecord(prompt_ids=[5, 6, 7]))
    assert twin()[0] is ids_json()[0]  # one prompt text for every episode with that prompt
    empty = TokenRecord(prompt_ids=[])
    assert text(IdsJson(empty)) == b"[]"
    empty.add_glue([4])
    assert text(IdsJson(empty)) == b"[4]"
    shrunk = IdsJson(record)
    text(shrunk)
    del record.response_ids[2:], record.loss_mask[2:], record.log_probs[2:]  # not grown: encoded again
    assert text(shrunk) == orjson.dumps(record.all_ids)
    params = {"sampling_params": {"temperature": 1.0}, "return_logprob": True}
    spliced = _json_body("input_ids", JsonIds(ids_json(), len(record.all_ids)), params)
    assert orjson.loads(spliced) == {"input_ids": record.all_ids, **params}
    assert _json_body("prompt", JsonIds((b"[1",), 1), {}) == b'{"prompt":[1]}'
    assert _json_body("prompt", JsonIds((b"[", b""), 0), {"a": 1}) == b'{"prompt":[],"a":1}'


def test_record_arrays_hold_exact_values_and_give_slimes_lists():
    from rollout.token_record import TokenRecord

    record = TokenRecord(prompt_ids=[5, 151_668])
    log_probs = [-0.123456789012345678, -1e-300, 0.0, -17.25]
    record.add_sampled([10, 151_645, 3, 4], log_probs)
    record.add_glue([198, 7])
    prompt, response, mask, lps = record.as_lists()
    assert prompt == [5, 151_668] and response == [10, 151_645, 3, 4, 198, 7]
    assert mask == [1, 1, 1, 1, 0, 0] and record.sampled_tokens == 4
    assert lps == [*log_probs, 0.0, 0.0]  # float64: the server's log-probs exactly, glue 0.0
    assert all(type(v) is int for v in prompt + response + mask) and all(type(v) is float for v in lps)
    assert record.all_ids == prompt + response
    record.check()
    with pytest.raises(ValueError, match="2 sampled ids but 1 log-probs"):
        record.add_sampled([1, 2], [-0.1])
    record.check()  # a refused turn leaves the record as it was
    assert record.response_length == 6


def test_glue_ids_are_cached_bounded_and_equal_to_encoding(tok, monkeypatch):
    monkeypatch.setenv("TAU2_GLUE_CACHE_ENTRIES", "2")
    monkeypatch.setattr(ChatRenderer, "_GLUE", {})
    renderer = ChatRenderer(tok)
    texts = ["<|im_start|>user\nno signal<|im_end|>\n", '{"status": "active"}', "Grüße 😀"]
    for text in texts:
        assert renderer.glue_ids(text).tolist() == list(tok.encode(text, add_special_tokens=False))
    assert renderer.glue_ids(texts[2]) is renderer.glue_ids(texts[2])  # reused
    assert len(ChatRenderer._GLUE) == 2 and (id(tok), texts[0]) not in ChatRenderer._GLUE  # oldest left
    monkeypatch.setenv("TAU2_GLUE_CACHE_ENTRIES", "0")
    off = ChatRenderer(tok)
    assert off.glue_ids(texts[0]) is not off.glue_ids(texts[0]) and len(ChatRenderer._GLUE) == 2
