"""Shared pieces for engine tests: the real tokenizer, gold scripts as policy text, a turn-indexed responder, and
the check of an episode's tokens against the chat template (`verify_record`)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from rollout.token_record import ChatRenderer, TokenRecord
from rollout.tool_format import format_assistant_turn

ROOT = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=1)
def real_tokenizer() -> Any:
    """SmolLM2-135M-Instruct's tokenizer with the recipe's Qwen-style tool template (converted once, cached)."""
    from examples.prepare_cpu_model import prepare_cpu_model
    from rollout.token_record import load_tokenizer

    return load_tokenizer(prepare_cpu_model())


def gold_script_texts(task: Any, solo_mode: bool) -> list[str]:
    from rollout.scripted import gold_agent_turns

    return [format_assistant_turn(turn.content, turn.tool_calls) for turn in gold_agent_turns(task, solo_mode)]


def agent_turn_index(prompt_text: str, solo_mode: bool) -> int:
    """Which agent turn a prompt asks for: assistant turns already in it, minus the greeting in dual mode."""
    assistant_turns = prompt_text.count("<|im_start|>assistant") - 1  # the last one is the generation prompt
    return assistant_turns - (0 if solo_mode else 1)


def script_responder(texts: list[str], solo_mode: bool, after_script: str = "Is there anything else?"):
    def respond(prompt_text: str, params: dict[str, Any]) -> str:
        index = agent_turn_index(prompt_text, solo_mode)
        return texts[index] if index < len(texts) else after_script

    return respond


def opening_of(view: Any) -> list[dict[str, Any]]:
    return [{"role": "system", "content": view.system_prompt}, *view.opening]


def verify_record(record: TokenRecord, renderer: ChatRenderer, opening: list[dict], agent_view: list[dict]) -> None:
    """Check an episode's tokens against the chat template; raises AssertionError naming the first mismatch.

    `opening` is the system turn plus what precedes the agent's first turn (the greeting); `agent_view` is what the
    agent saw afterwards, its own turns included, in order (EpisodeResult.agent_messages). Checked: the prompt is the
    template's rendering of the opening; sampled spans are the server's ids; glue spans re-encode to themselves; and
    the whole sequence decodes to the template's rendering of the conversation, assistant turns as sampled.
    """
    record.check()
    prompt_ids, response_ids, _, _ = record.as_lists()
    tok = renderer.tokenizer
    first = next((i for i, m in enumerate(agent_view) if m["role"] == "assistant"), len(agent_view))
    prompt_messages = [*opening, *agent_view[:first]]
    if renderer.encode(renderer.render(prompt_messages, add_generation_prompt=True)) != prompt_ids:
        raise AssertionError("prompt ids differ from the chat template's rendering of the opening conversation")
    sampled = [span for span in record.spans if span.kind == "sampled"]
    last = max((i for i, m in enumerate(agent_view) if m["role"] == "assistant"), default=len(agent_view) - 1)
    agent_view = agent_view[: last + 1]  # messages after the agent's last turn were never shown to it
    rebuilt = list(prompt_messages)
    k = 0
    for message in agent_view[first:]:
        if message["role"] != "assistant":
            rebuilt.append(message)
            continue
        if k >= len(sampled):
            raise AssertionError(f"more assistant turns in the view than the {len(sampled)} sampled spans")
        ids = response_ids[sampled[k].start : sampled[k].end]
        closed = bool(ids) and ids[-1] == renderer.end_of_turn_id
        text = tok.decode(ids[:-1] if closed else ids, skip_special_tokens=False)
        rebuilt.append({"role": "assistant", "content": text})
        k += 1
    if k != len(sampled):
        raise AssertionError(f"{len(sampled)} sampled spans but {k} assistant turns in the view")
    actual = tok.decode(record.all_ids, skip_special_tokens=False)
    ends_with_agent = rebuilt[-1]["role"] == "assistant"
    expected = renderer.render(rebuilt, add_generation_prompt=not ends_with_agent)
    if ends_with_agent:  # the record stops right after the last sampled token
        cut = renderer.after_end_of_turn_text
        if not actual.endswith(renderer.end_of_turn_text):
            cut = renderer.end_of_turn_text + cut
        expected = expected[: len(expected) - len(cut)]
    if actual != expected:
        at = next((i for i, (a, b) in enumerate(zip(actual, expected)) if a != b), min(len(actual), len(expected)))
        raise AssertionError(
            f"tokens decode differently from the template at char {at}: {actual[at : at + 80]!r} "
            f"vs {expected[at : at + 80]!r}"
        )
    for span in record.spans:
        if span.kind == "glue":
            ids = response_ids[span.start : span.end]
            if renderer.encode(tok.decode(ids, skip_special_tokens=False)) != ids:
                raise AssertionError(f"glue span {span.start}:{span.end} does not re-encode to itself")
