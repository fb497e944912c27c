"""SFT rows in slime's format, built from engine episodes, and the checks a row must pass before it is written.

A row is what slime's SFT rollout reads with `--input-key messages --tool-key tools --loss-mask-type qwen3`:
    {"messages": [system, greeting (step_loss_mask 0, dual mode), user / assistant / tool ...],
     "tools": [OpenAI tool schemas, exactly TaskView.tools],
     "metadata": {task_id, domain, subtask, source, reward, partial_score, turns, solo_mode, teacher_model, ...}}
Assistant turns carry native `tool_calls` (arguments as a dict); tool results are `{"role": "tool", "tool_call_id",
"name", "content"}`. The conversation ends with the agent's last turn: what follows it trains nothing.

`RowChecker` applies the qwen3 loss-mask rules (written from slime's contract, by rendering prefixes of the
conversation with the model's own chat template):
- every assistant message is trained: its content, tool calls, end-of-turn marker and the newline after it;
  its generation prefix (`<|im_start|>assistant\\n`) is not;
- system, user and tool tokens are not trained; consecutive tool messages form one user turn;
- a message with `"step_loss_mask": 0` is not trained at all.
It then asserts what training depends on: only assistant text is trained, each assistant turn trains exactly the text
the policy samples in a rollout (rollout.tool_format's format plus the end-of-turn marker), and the tokens before the
first trained one are the prompt the rollout engine builds for the task.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from rollout.cli import write_atomic
from rollout.tool_format import format_assistant_turn

SOURCES: tuple[str, ...] = ("gold", "teacher", "rft")
SOLO_STOP_TOOL = "done"  # tau2's LLMSoloAgent.STOP_FUNCTION_NAME
SOLO_STOP_TOKEN = "###STOP###"  # tau2's LLMSoloAgent.STOP_TOKEN
GREETING = "Hi! How can I help you today?"  # tau2's DEFAULT_FIRST_AGENT_MESSAGE: fixed, never the policy's
_ROLES = ("system", "user", "assistant", "tool")


class RowError(ValueError):
    """A row that must not be written: invalid turns, nothing to train, or a rendering that breaks the rules."""


class RowMetadata(BaseModel):
    """What a row says about where it came from (slime passes it through untouched)."""

    task_id: str
    domain: str
    subtask: str | None = None
    source: str
    reward: float | None = None
    partial_score: float = 0.0
    partial_components: dict[str, float] = Field(default_factory=dict)
    turns: int = 0
    solo_mode: bool = False
    teacher_model: str | None = None
    attempt: int = 0
    termination_reason: str | None = None
    user_kind: str | None = None
    kept_as: str = "success"  # "success", or "partial" for an RFT task's best failed attempt
    policy_variant: str = "full"


# ------------------------------------------------------------------------------------------------- building rows


def _arguments_dict(arguments: Any) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    if isinstance(arguments, str):
        try:
            value = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            value = None
        if isinstance(value, dict):
            return value
    raise RowError(f"tool call arguments must be a JSON object, got {arguments!r:.80}")


def _assistant(message: dict[str, Any], turn: int, solo_mode: bool) -> dict[str, Any]:
    """An assistant message in the row's form: stripped content (as the rollout parser reads a turn), native calls."""
    content = (message.get("content") or "").strip()
    calls = message.get("tool_calls") or []
    if solo_mode and not calls and SOLO_STOP_TOKEN in content:
        # The engine (like tau2) turns the solo agent's `done` call into the stop token; the policy's turn was the call.
        content, calls = "", [{"id": f"call_{turn}_0", "function": {"name": SOLO_STOP_TOOL, "arguments": {}}}]
    out: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        out["tool_calls"] = [
            {
                "id": call.get("id") or f"call_{turn}_{k}",
                "type": "function",
                "function": {
                    "name": call["function"]["name"],
                    "arguments": _arguments_dict(call["function"].get("arguments")),
                },
            }
            for k, call in enumerate(calls)
        ]
    return out


def conversation_of(
    system_prompt: str, opening: list[dict[str, Any]], agent_messages: list[dict[str, Any]], solo_mode: bool
) -> list[dict[str, Any]]:
    """The row's messages: system prompt, the opening (not trained), then what the agent saw and said, up to its last
    turn. Raises RowError on an invalid or cut-off turn, or when the agent never produced a turn."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system_prompt}]
    messages += [{**message, "step_loss_mask": 0} for message in opening]  # seen by the policy, never sampled by it
    turn = 0
    for message in agent_messages:
        if message.get("invalid_turn") or message.get("cut_turn"):
            raise RowError(f"turn {turn} is invalid or cut off: rows with invalid turns are dropped")
        role = message.get("role")
        if role == "assistant":
            messages.append(_assistant(message, turn, solo_mode))
            turn += 1
        elif role == "tool":
            if message.get("tool_call_id") == "invalid":
                raise RowError("the agent was shown a format error: rows with invalid turns are dropped")
            out = {"role": "tool", "tool_call_id": message.get("tool_call_id"), "content": message.get("content") or ""}
            if message.get("name"):
                out["name"] = message["name"]
            messages.append(out)
        elif role == "user":
            messages.append({"role": "user", "content": message.get("content") or ""})
        else:
            raise RowError(f"unexpected message role {role!r} in the agent's view")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant" and "step_loss_mask" not in m), default=0)
    if last == 0:
        raise RowError("the agent produced no turn")
    return messages[: last + 1]


def build_row(
    system_prompt: str,
    tools: list[dict[str, Any]],
    opening: list[dict[str, Any]],
    agent_messages: list[dict[str, Any]],
    metadata: RowMetadata,
) -> dict[str, Any]:
    """One SFT row from an episode (TaskView.system_prompt / .tools / .opening and EpisodeResult.agent_messages)."""
    return {
        "messages": conversation_of(system_prompt, opening, agent_messages, metadata.solo_mode),
        "tools": tools,
        "metadata": metadata.model_dump(mode="json"),
    }


def row_from_episode(view: Any, result: Any, metadata: RowMetadata) -> dict[str, Any]:
    """`build_row` for an engine episode: view is the TaskView, result the EpisodeResult."""
    return build_row(view.system_prompt, view.tools, view.opening, result.agent_messages, metadata)


# ---------------------------------------------------------------------------------------------- structural checks


def structure_errors(row: Any) -> list[str]:
    """What is wrong with a row's shape, without a tokenizer (empty list: nothing)."""
    if not isinstance(row, dict):
        return ["the row is not a JSON object"]
    errors: list[str] = []
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return ["'messages' must be a non-empty list"]
    tools = row.get("tools")
    if not isinstance(tools, list) or not all(isinstance(t, dict) and "function" in t for t in tools):
        errors.append("'tools' must be a list of OpenAI tool schemas")
    if not isinstance(row.get("metadata"), dict) or not row["metadata"].get("task_id"):
        errors.append("'metadata' must name the task_id")
    if not isinstance(messages[0], dict) or messages[0].get("role") != "system":
        errors.append("the first message must be the system prompt")
    open_calls: set[str] = set()
    trained = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            errors.append(f"message {i}: role must be one of {', '.join(_ROLES)}")
            continue
        if message.get("invalid_turn") or message.get("cut_turn"):
            errors.append(f"message {i}: an invalid or cut-off turn")
        if not isinstance(message.get("content", ""), str):
            errors.append(f"message {i}: content must be a string")
        role = message["role"]
        if role == "system" and i > 0:
            errors.append(f"message {i}: a system message after the first")
        if role == "assistant":
            calls = message.get("tool_calls") or []
            if message.get("step_loss_mask", 1) != 0:
                trained += 1
                if i == 1 and message.get("content") == GREETING:
                    errors.append("message 1: the fixed greeting is trained (it needs step_loss_mask 0)")
                if not calls and not (message.get("content") or "").strip():
                    errors.append(f"message {i}: an empty assistant turn")
            open_calls = set()
            for call in calls:
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    errors.append(f"message {i}: a tool call without function.name")
                elif not isinstance(function.get("arguments"), dict):
                    errors.append(f"message {i}: tool call '{function['name']}' arguments must be a dict")
                open_calls.add(call.get("id") if isinstance(call, dict) else None)
        elif role == "tool":
            if message.get("tool_call_id") not in open_calls:
                errors.append(f"message {i}: a tool result that answers no call of the previous assistant turn")
            if not message.get("name"):
                errors.append(f"message {i}: a tool result without the tool's name")
        elif role == "user":
            open_calls = set()
    if trained == 0:
        errors.append("no trained assistant turn")
    return errors


# ------------------------------------------------------------------------------------------------- the loss mask


class MaskedRow(BaseModel):
    """A row as slime's SFT trains it: the template's rendering, its tokens and the qwen3 loss mask."""

    text: str
    input_ids: list[int]
    loss_mask: list[int]
    trained_texts: list[str] = Field(description="per trained assistant message, the text its mask covers")
    prompt_end: int = Field(description="index of the first trained token: the ids before it are the first prompt")


def _turn_groups(messages: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """Message ranges [a, b) that the template renders as one turn: each message, consecutive tool messages together."""
    groups: list[tuple[int, int]] = []
    i = 0
    while i < len(messages):
        j = i + 1
        if messages[i].get("role") == "tool":
            while j < len(messages) and messages[j].get("role") == "tool":
                j += 1
        groups.append((i, j))
        i = j
    return groups


class RowCheck(BaseModel):
    index: int
    task_id: str | None = None
    ok: bool = False
    error: str | None = None
    tokens: int = 0
    trained_tokens: int = 0
    prompt_tokens: int = 0
    assistant_turns: int = 0


class RowChecker:
    """Renders rows with one tokenizer's chat template and checks them (see the module docstring)."""

    def __init__(self, tokenizer: Any, max_tokens: int | None = None) -> None:
        from rollout.token_record import ChatRenderer

        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        renderer = ChatRenderer(tokenizer, None)
        # What the policy samples after its turn's body: the end-of-turn marker; the qwen3 mask adds the newline.
        self.end_of_turn_text = renderer.end_of_turn_text
        self.after_end_of_turn_text = renderer.after_end_of_turn_text

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, generation: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=tools or None, tokenize=False, add_generation_prompt=generation
        )

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt_ids(self, row: dict[str, Any]) -> list[int]:
        """The first prompt of the row's episode: everything before the first trained turn, with the generation prompt
        (what rollout.engine.TokenAgent sends first for the same task)."""
        messages = row["messages"]
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("step_loss_mask", 1) != 0)
        return self.encode(self.render(messages[:first], row.get("tools"), generation=True))

    def mask(self, row: dict[str, Any]) -> MaskedRow:
        """Tokens and qwen3 loss mask of a row; RowError if the template cannot render it by the rules."""
        messages, tools = row["messages"], row.get("tools")
        try:
            full = self.render(messages, tools, generation=False)
        except Exception as err:  # jinja errors and template exceptions of any kind
            raise RowError(f"the chat template cannot render the row: {type(err).__name__}: {err}") from None
        trained = bytearray(len(full))
        trained_texts: list[str] = []
        start = 0
        for a, b in _turn_groups(messages):
            end_text = self.render(messages[:b], tools, generation=False)
            if not full.startswith(end_text):
                raise RowError(f"the chat template renders message {b - 1} differently once later messages follow")
            end = len(end_text)
            message = messages[a]
            if message["role"] == "assistant":
                head = self.render(messages[:a], tools, generation=True)
                prefix = head[start:] if head.startswith(full[:start]) else None
                if prefix is None or not full.startswith(prefix, start):
                    raise RowError(f"assistant message {a} does not start with the template's generation prompt")
                if message.get("step_loss_mask", 1) != 0:
                    trained[start + len(prefix) : end] = b"\x01" * (end - start - len(prefix))
                    trained_texts.append(full[start + len(prefix) : end])
            start = end
        if start != len(full):
            raise RowError("the chat template writes text after the last message")
        encoded = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), encoded.get("offset_mapping")
        if offsets is None:
            raise RowError("the tokenizer gives no character offsets (a fast tokenizer is needed)")
        mask = []
        for position, (lo, hi) in enumerate(offsets):
            covered = sum(trained[lo:hi])
            if 0 < covered < hi - lo:
                raise RowError(f"token {position} ({full[lo:hi]!r}) straddles a trained / untrained boundary")
            mask.append(1 if hi > lo and covered == hi - lo else 0)
        prompt_end = mask.index(1) if 1 in mask else len(mask)
        return MaskedRow(text=full, input_ids=ids, loss_mask=mask, trained_texts=trained_texts, prompt_end=prompt_end)

    def expected_trained_texts(self, row: dict[str, Any]) -> list[str]:
        """Per trained assistant message: the text the policy samples for it, plus the newline the qwen3 mask trains."""
        out = []
        for message in row["messages"]:
            if message["role"] != "assistant" or message.get("step_loss_mask", 1) == 0:
                continue
            calls = [
                {"name": call["function"]["name"], "arguments": call["function"]["arguments"]}
                for call in message.get("tool_calls") or []
            ]
            body = format_assistant_turn(message.get("content"), calls)
            out.append(body + self.end_of_turn_text + self.after_end_of_turn_text)
        return out

    def check(self, row: Any, index: int = 0) -> RowCheck:
        """Every check on one row; never raises for a bad row (the result says what is wrong)."""
        task_id = row.get("metadata", {}).get("task_id") if isinstance(row, dict) else None
        result = RowCheck(index=index, task_id=task_id)
        errors = structure_errors(row)
        if errors:
            result.error = "; ".join(errors[:3])
            return result
        result.assistant_turns = sum(
            1 for m in row["messages"] if m["role"] == "assistant" and m.get("step_loss_mask", 1) != 0
        )
        try:
            masked = self.mask(row)
            self._assert_masked(row, masked)
        except RowError as err:
            result.error = str(err)
            return result
        except Exception as err:  # a template or tokenizer failure on this row is this row's problem only
            result.error = f"the chat template cannot render the row: {type(err).__name__}: {err}"
            return result
        result.tokens = len(masked.input_ids)
        result.trained_tokens = sum(masked.loss_mask)
        result.prompt_tokens = masked.prompt_end
        if self.max_tokens is not None and result.tokens > self.max_tokens:
            result.error = f"{result.tokens} tokens, over the {self.max_tokens}-token limit per row"
            return result
        result.ok = True
        return result

    def _assert_masked(self, row: dict[str, Any], masked: MaskedRow) -> None:
        expected = self.expected_trained_texts(row)
        if masked.trained_texts != expected:
            got_all, want_all = [*masked.trained_texts, "<nothing>"], [*expected, "<nothing>"]
            k = next(i for i, (a, b) in enumerate(zip(got_all, want_all, strict=False)) if a != b)
            got, want = got_all[min(k, len(got_all) - 1)], want_all[min(k, len(want_all) - 1)]
            raise RowError(f"assistant turn {k} trains {got[:120]!r}, but the policy samples {want[:120]!r}")
        # Token level: the trained ids decode to the assistant texts and nothing else.
        tok = self.tokenizer
        trained_ids = [t for t, m in zip(masked.input_ids, masked.loss_mask, strict=True) if m]
        if tok.decode(trained_ids, skip_special_tokens=False) != "".join(expected):
            raise RowError("the trained tokens decode to something other than the assistant turns")
        if masked.input_ids[: masked.prompt_end] != self.prompt_ids(row):
            raise RowError("the tokens before the first trained turn differ from the rollout's first prompt")


def check_row(row: Any, tokenizer: Any = None, max_tokens: int | None = None, index: int = 0) -> RowCheck:
    """Check one row: its shape always; with a tokenizer also the rendering, the loss mask and the token budget."""
    if tokenizer is not None:
        return RowChecker(tokenizer, max_tokens).check(row, index)
    errors = structure_errors(row)
    task_id = row.get("metadata", {}).get("task_id") if isinstance(row, dict) else None
    result = RowCheck(index=index, task_id=task_id, ok=not errors, error="; ".join(errors[:3]) or None)
    if not errors:
        result.assistant_turns = sum(
            1 for m in row["messages"] if m["role"] == "assistant" and m.get("step_loss_mask", 1) != 0
        )
    return result


# -------------------------------------------------------------------------------------------------------- files


def row_key(row: dict[str, Any]) -> str:
    """Identity for deduplication: the same messages are the same training example."""
    payload = json.dumps(row.get("messages"), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def dedupe_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """First occurrence of each distinct conversation, in order."""
    seen: set[str] = set()
    out = []
    for row in rows:
        key = row_key(row)
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def iter_jsonl(path: Path | str) -> Iterator[dict[str, Any]]:
    """Rows of a JSONL file; a torn last line (a run killed mid-write) is skipped, a torn line elsewhere raises."""
    path = Path(path)
    if not path.exists():
        return
    with path.open(encoding="utf-8") as handle:
        lines = handle.readlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and not line.endswith("\n"):
                return
            raise ValueError(f"{path}:{number}: not valid JSON") from None


def append_jsonl(handle: Any, row: dict[str, Any]) -> None:
    """One row, flushed and synced: a crash loses at most the row being written."""
    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def write_jsonl_atomic(path: Path | str, rows: Iterable[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def repair_torn_tail(path: Path | str) -> None:
    """Cut a last line left without its newline by a killed run, so appends start on a fresh line."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


# -------------------------------------------------------------------------------------------------------- stats


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def stats_table(rows: list[dict[str, Any]], checks: list[RowCheck] | None = None) -> str:
    """Per source (and overall): rows, tasks covered, turns, tokens per row and trained tokens."""
    by_index = {c.index: c for c in checks or []}
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        meta = row.get("metadata") or {}
        label = f"{meta.get('source', '?')}{'/solo' if meta.get('solo_mode') else ''}"
        groups.setdefault(label, []).append(i)
    if len(groups) > 1:
        groups["(all)"] = list(range(len(rows)))
    header = (
        f"{'source':<14} {'rows':>6} {'tasks':>6} {'partial':>7} {'turns':>6} {'tok/row':>8} {'tok max':>8} "
        f"{'trained':>10} {'trn/row':>8}"
    )
    lines = [header, "-" * len(header)]
    for label, indices in groups.items():
        metas = [rows[i].get("metadata") or {} for i in indices]
        tasks = {m.get("task_id") for m in metas}
        partial = sum(1 for m in metas if m.get("kept_as") == "partial")
        turns = [float(m.get("turns") or 0) for m in metas]
        tokens = [by_index[i].tokens for i in indices if i in by_index and by_index[i].tokens]
        trained = [by_index[i].trained_tokens for i in indices if i in by_index and by_index[i].tokens]
        lines.append(
            f"{label:<14} {len(indices):>6} {len(tasks):>6} {partial:>7} {_mean(turns):>6.1f} "
            f"{_mean(tokens):>8.0f} {max(tokens, default=0):>8} {sum(trained):>10} {_mean(trained):>8.0f}"
        )
    return "\n".join(lines)
