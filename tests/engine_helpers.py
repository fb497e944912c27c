"""Shared pieces for engine tests: the real tokenizer, gold scripts as policy text, and a turn-indexed responder."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from rollout.tool_format import format_assistant_turn

ROOT = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=1)
def real_tokenizer() -> Any:
    """SmolLM2-135M-Instruct's tokenizer with the recipe's Qwen-style tool template (converted once, cached)."""
    from examples.prepare_cpu_model import load_tokenizer, prepare_cpu_model

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
