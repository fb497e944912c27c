"""Token bookkeeping for one episode: the prompt, then sampled spans (trained) and template glue (not trained).

Sampled ids are kept verbatim with their log-probs. Everything else (user turns, tool results, turn markers) is
rendered by the model's own chat template and tokenized incrementally: the new messages are rendered after a small
fixed anchor conversation and the anchor's rendering is cut off, so the cost grows with the new text, not the history.
"""

from __future__ import annotations

import hashlib
import os
import threading
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import orjson

from rollout.settings import ProcessSettings

SpanKind = Literal["sampled", "glue"]

# A fixed conversation whose rendering is a prefix of any continuation of it.
_ANCHOR_ASSISTANT = "A"
_ANCHOR = (
    {"role": "system", "content": "S"},
    {"role": "user", "content": "U"},
    {"role": "assistant", "content": _ANCHOR_ASSISTANT},
)


class ChatTemplateError(ValueError):
    """The chat template does not render conversations incrementally (a continuation changes earlier text)."""


class TokenizerError(ValueError):
    """A tokenizer that does not load, or has no chat template to render the policy's prompts with."""


_TOKENIZERS: dict[str, Any] = {}
_TOKENIZERS_LOCK = threading.Lock()


def load_tokenizer(source: str | os.PathLike[str], name: str = "") -> Any:
    """The tokenizer of a Hugging Face folder, one per folder per process. TokenizerError, one line naming the folder
    as the caller's user knows it (`name`, e.g. "--tokenizer"), when it does not load or has no chat template."""
    key = str(source)
    with _TOKENIZERS_LOCK:
        if key not in _TOKENIZERS:
            from transformers import AutoTokenizer

            where = f"{name} '{key}'" if name else f"'{key}'"
            try:
                tokenizer = AutoTokenizer.from_pretrained(key, trust_remote_code=True)
            except Exception as err:  # transformers raises OSError, ValueError or hub errors for a bad folder
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise TokenizerError(f"cannot load a tokenizer from {where}: {reason}") from None
            if not getattr(tokenizer, "chat_template", None):
                raise TokenizerError(f"the tokenizer in {where} has no chat template; give the model's folder")
            _TOKENIZERS[key] = tokenizer
        return _TOKENIZERS[key]


def id_array(ids: Iterable[int] = ()) -> array:
    """Token ids as a C array of int32: 4 bytes an id where a list holds an 8-byte pointer to a 28-byte int."""
    return array("i", ids)


def _remember(cache: dict[Any, Any], key: Any, value: Any, limit: int) -> Any:
    """Put `value` in a bounded cache (at most `limit` entries; the oldest leave first) and return it."""
    while len(cache) >= limit:
        cache.pop(next(iter(cache)))
    cache[key] = value
    return value


class ChatRenderer:
    """Renders messages with the tokenizer's chat template, with the task's tools passed natively (`tools=`)."""

    _ANCHORS: ClassVar[dict[tuple[int, Any], tuple[str, str, str, int | None]]] = {}  # per tokenizer: computed once
    # (tokenizer, template, role, the message's other fields) -> the text around a message's content after a closed
    # assistant turn (generation prompt included), or None where the template does more than insert the content.
    _WRAPS: ClassVar[dict[tuple[int, Any, str, tuple[str, ...]], tuple[str, str] | None]] = {}
    # tokenizer -> its Rust tokenizer (`tokenizers.Tokenizer`) where calling it directly gives the same ids, else None
    _RUST: ClassVar[dict[int, Any]] = {}

    def __init__(self, tokenizer: Any, tools: list[dict[str, Any]] | None = None) -> None:
        self.tokenizer = tokenizer
        self.tools = tools or None
        self._anchor = [dict(m) for m in _ANCHOR]
        key = (id(tokenizer), getattr(tokenizer, "chat_template", None))
        cached = self._ANCHORS.get(key)
        if cached is None:
            cached = self._analyse_template()
            self._ANCHORS[key] = cached
        self._anchor_text, self.end_of_turn_text, self.after_end_of_turn_text, self.end_of_turn_id = cached
        self._glue_limit = ProcessSettings.current().glue_cache_entries

    def _analyse_template(self) -> tuple[str, str, str, int | None]:
        """Where an assistant turn ends in this template: the end-of-turn marker and the text after it."""
        anchor_text = self.render(self._anchor, add_generation_prompt=False, with_tools=False)
        marker = anchor_text.rfind(_ANCHOR_ASSISTANT)
        tail = anchor_text[marker + len(_ANCHOR_ASSISTANT) :]
        # tail = end-of-turn text + what follows it, e.g. "<|im_end|>" + "\n" for ChatML templates.
        end_of_turn_text = tail.rstrip()
        if not end_of_turn_text:
            raise ChatTemplateError("the chat template writes no end-of-turn marker after an assistant message")
        end_ids = self.encode(end_of_turn_text)
        return anchor_text, end_of_turn_text, tail[len(end_of_turn_text) :], end_ids[0] if len(end_ids) == 1 else None

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool, with_tools: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            tools=self.tools if with_tools else None,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def encode(self, text: str) -> list[int]:
        rust = self._RUST.get(id(self.tokenizer), False)
        if rust is False:
            rust = self._RUST[id(self.tokenizer)] = self._rust_tokenizer()
        if rust is not None:  # the Rust tokenizer itself: the transformers wrapper costs ~0.1 ms per call
            return rust.encode(text, add_special_tokens=False).ids
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    # (tokenizer, text) -> its ids: tool results and replies repeat across an episode's samples (a GRPO group plays
    # one task n times), and encoding is the largest CPU piece of a turn. Bounded; oldest entries leave first.
    _GLUE: ClassVar[dict[tuple[int, str], array]] = {}
    _GLUE_MAX_TEXT = 32768

    def glue_ids(self, text: str) -> array:
        """`encode(text)` as an id array, from a bounded per-process cache (TAU2_GLUE_CACHE_ENTRIES; 0: off). The
        array is shared: extend from it, never change it."""
        limit = self._glue_limit
        if limit <= 0 or len(text) > self._GLUE_MAX_TEXT:
            return id_array(self.encode(text))
        key = (id(self.tokenizer), text)
        ids = self._GLUE.get(key)
        return ids if ids is not None else _remember(self._GLUE, key, id_array(self.encode(text)), limit)

    def _rust_tokenizer(self) -> Any:
        """The fast tokenizer's `tokenizers.Tokenizer`, if it encodes like the wrapper (checked once on samples with
        special tokens, whitespace and non-ASCII text); None for a slow tokenizer or any difference."""
        rust = getattr(self.tokenizer, "_tokenizer", None)
        if rust is None or not hasattr(rust, "encode"):
            return None
        samples = [
            self._anchor_text if hasattr(self, "_anchor_text") else "",
            "  leading and trailing spaces \n\n\t",
            '<tool_call>\n{"name": "x", "arguments": {"a": 1}}\n</tool_call>',
            "Grüße, ça va? 日本語 😀 <|im_end|>\n<|im_start|>user\n",
            *(str(token) for token in (getattr(self.tokenizer, "all_special_tokens", None) or [])[:8]),
        ]
        try:
            same = all(
                rust.encode(text, add_special_tokens=False).ids
                == list(self.tokenizer.encode(text, add_special_tokens=False))
                for text in samples
            )
        except Exception:  # any tokenizer that does not take this call: the wrapper
            return None
        return rust if same else None

    # (tokenizer, template, digest of the opening before its last message and the tools) -> that part's ids,
    # or None where the shortcut does not reproduce the full rendering.
    _PREFIXES: ClassVar[dict[tuple[int, Any, bytes], list[int] | None]] = {}

    def prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """The first prompt: the whole opening conversation with the generation prompt.

        Everything before the last message (system prompt with the tools, the greeting) is the same for every task
        of a domain in dual mode: it is rendered and encoded once, and later prompts render and encode only the last
        message. The first time a prefix is seen, the shortcut is checked against rendering and encoding the whole
        conversation; where it differs, that prefix always takes the full path."""
        if len(messages) < 2 or messages[-2].get("role") != "assistant":
            return self.encode(self.render(messages, add_generation_prompt=True))
        try:
            digest = hashlib.blake2b(orjson.dumps([messages[:-1], self.tools]), digest_size=16).digest()
        except TypeError:  # a value JSON cannot hold: no shortcut
            return self.encode(self.render(messages, add_generation_prompt=True))
        key = (id(self.tokenizer), getattr(self.tokenizer, "chat_template", None), digest)
        if key not in self._PREFIXES:  # bounded: prefixes that differ per task would grow it forever
            full = self.render(messages, add_generation_prompt=True)
            ids = self.encode(full)
            prefix = self.render(messages[:-1], add_generation_prompt=False)
            try:
                tail: str | None = self.new_turns_text(messages[-1:])
            except ChatTemplateError:
                tail = None
            prefix_ids = self.encode(prefix) if tail is not None and full == prefix + tail else None
            ok = prefix_ids is not None and tail is not None and prefix_ids + self.encode(tail) == ids
            _remember(self._PREFIXES, key, prefix_ids if ok else None, 64)
            return ids
        prefix_ids = self._PREFIXES[key]
        if prefix_ids is None:
            return self.encode(self.render(messages, add_generation_prompt=True))
        return prefix_ids + self.encode(self.new_turns_text(messages[-1:]))

    def new_turns_text(self, new_messages: list[dict[str, Any]]) -> str:
        """The rendering of `new_messages` after a closed assistant turn, with the generation prompt.

        One message with string content (a tool result, a user reply: nearly every turn) is its role's cached
        prefix + the content + suffix, once the template was seen to render it so (`_wrap`); else it is rendered."""
        if len(new_messages) == 1 and isinstance(new_messages[0].get("content"), str):
            wrap = self._wrap(new_messages[0])
            if wrap is not None:
                return wrap[0] + new_messages[0]["content"] + wrap[1]
        return self._render_new_turns(new_messages)

    _PROBES = ("PROBE-7f3a", "  <a b='c'>{{ x }}{% y %}\n\tGrüße 😀 <|im_end|>\n\n ")

    def _wrap(self, message: dict[str, Any]) -> tuple[str, str] | None:
        """The text before and after a message's content when it comes after a closed assistant turn, for its role
        and the names of its other fields. Found once by rendering two probe contents (different values in the other
        fields too) and kept only if both renderings are exactly prefix + content + suffix."""
        others = tuple(sorted(k for k in message if k not in ("role", "content")))
        key = (id(self.tokenizer), getattr(self.tokenizer, "chat_template", None), str(message.get("role")), others)
        if key in self._WRAPS:
            return self._WRAPS[key]
        wrap: tuple[str, str] | None = None
        if all(isinstance(message[k], str) for k in others):
            try:
                texts = [
                    self._render_new_turns([{**message, **{k: f"{k}-{i}" for k in others}, "content": probe}])
                    for i, probe in enumerate(self._PROBES)
                ]
            except ChatTemplateError:
                texts = []
            if texts and texts[0].count(self._PROBES[0]) == 1:
                before, after = texts[0].split(self._PROBES[0])
                if texts[1] == before + self._PROBES[1] + after:
                    wrap = (before, after)
        self._WRAPS[key] = wrap
        return wrap

    def _render_new_turns(self, new_messages: list[dict[str, Any]]) -> str:
        full = self.render(self._anchor + new_messages, add_generation_prompt=True, with_tools=False)
        if not full.startswith(self._anchor_text):
            raise ChatTemplateError(
                "the chat template re-renders earlier turns when a message is added; "
                "token-in-token-out needs a template whose rendering of a prefix is stable"
            )
        return full[len(self._anchor_text) :]

    def continuation_text(self, new_messages: list[dict[str, Any]], sampled_turn_closed: bool) -> str:
        """Text that follows a sampled assistant turn: its closing (if the model did not write it) and new turns."""
        closing = (
            self.after_end_of_turn_text if sampled_turn_closed else self.end_of_turn_text + self.after_end_of_turn_text
        )
        return closing + self.new_turns_text(new_messages)


@dataclass
class Span:
    kind: SpanKind
    start: int  # offset into the response ids
    end: int


@dataclass
class TokenRecord:
    """prompt_ids + response (sampled and glue spans); `loss_mask` and `log_probs` align with the response.

    Kept as C arrays (int32 ids, int8 mask, float64 log-probs: exact as parsed): ~13 bytes a response token where
    lists of Python objects take ~75. `as_lists()` gives slime's form."""

    prompt_ids: array
    response_ids: array = field(default_factory=id_array)
    loss_mask: array = field(default_factory=lambda: array("b"))
    log_probs: array = field(default_factory=lambda: array("d"))
    spans: list[Span] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt_ids, array) or self.prompt_ids.typecode != "i":
            self.prompt_ids = id_array(self.prompt_ids)

    @property
    def response_length(self) -> int:
        return len(self.response_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids.tolist() + self.response_ids.tolist()

    @property
    def sampled_tokens(self) -> int:
        return sum(self.loss_mask)

    def as_lists(self) -> tuple[list[int], list[int], list[int], list[float]]:
        """(prompt ids, response ids, loss mask, log-probs) as Python lists, the form slime's Sample holds."""
        return (
            self.prompt_ids.tolist(),
            self.response_ids.tolist(),
            self.loss_mask.tolist(),
            self.log_probs.tolist(),
        )

    def add_sampled(self, token_ids: Sequence[int], log_probs: Sequence[float]) -> None:
        if len(token_ids) != len(log_probs):
            raise ValueError(f"{len(token_ids)} sampled ids but {len(log_probs)} log-probs")
        start = len(self.response_ids)
        self.response_ids.extend(token_ids)
        self.log_probs.extend(log_probs)
        self.loss_mask.frombytes(b"\x01" * len(token_ids))
        self.spans.append(Span("sampled", start, len(self.response_ids)))

    def add_glue(self, token_ids: Sequence[int]) -> None:
        start = len(self.response_ids)
        self.response_ids.extend(token_ids)
        self.loss_mask.frombytes(bytes(len(token_ids)))
        self.log_probs.frombytes(bytes(8 * len(token_ids)))  # 0.0 is all zero bytes
        self.spans.append(Span("glue", start, len(self.response_ids)))

    def check(self) -> None:
        """slime's invariants: one mask entry and one log-prob per response token."""
        n = len(self.response_ids)
        if len(self.loss_mask) != n or len(self.log_probs) != n:
            raise AssertionError(
                f"response {n} tokens, loss_mask {len(self.loss_mask)}, log_probs {len(self.log_probs)}"
            )


class IdsJson:
    """A record's prompt + response ids as JSON text for the policy request, in two parts: the prompt's ("[1,2,3",
    shared by every episode with the same prompt: a GRPO group's samples) and the response's (",4,5", kept and
    extended by the ids added since the last call, so each request encodes only its new ids). The client joins them
    into the body; nothing else is copied. Held by the agent for its episode, not by the record."""

    # prompt ids (as bytes) -> the prompt's JSON text without its closing bracket; bounded, oldest leave first
    _PROMPTS: ClassVar[dict[bytes, bytes]] = {}

    def __init__(self, record: TokenRecord) -> None:
        self.record = record
        self._start()

    def _start(self) -> None:
        prompt = self.record.prompt_ids
        key = prompt.tobytes()
        text = self._PROMPTS.get(key)
        if text is None:
            text = _remember(self._PROMPTS, key, b"[" + orjson.dumps(prompt.tolist())[1:-1], 64)
        self._prompt_json = text
        self._prompt_count = len(prompt)
        self._json = bytearray()  # the response's ids, each preceded by a comma (none: empty)
        self._count = 0  # response ids encoded

    def __call__(self) -> tuple[bytes | bytearray, ...]:
        """The array's text without its closing bracket, as parts to join; valid until the next call."""
        record = self.record
        if len(record.prompt_ids) != self._prompt_count or self._count > len(record.response_ids):
            self._start()  # not grown from what was encoded: start again
        response = record.response_ids
        if self._count < len(response):
            new = orjson.dumps(response[self._count :].tolist())
            # ",4,5": a comma before each id, the first one's only after a non-empty prompt
            self._json += (b"," if self._count or self._prompt_count else b"") + new[1:-1]
            self._count = len(response)
        return (self._prompt_json, self._json)
