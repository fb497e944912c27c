"""Telecom episode lengths in tokens, as GRPO sees them, on Qwen3's real tokenizer with the full policy.

    python bench/episode_lengths.py [--split train,test] [--limit N] [--json OUT.json]

Each task is played through the recipe's engine with `TokenAgent` (exactly the token bookkeeping of a GRPO sample)
and the scripted customer, by two scripted agents:
- gold: the task's gold actions (rollout.scripted.gold_agent_turns), the shortest successful episode;
- teacher-like: what an LLM agent following the telecom policy adds around the same path: the account look-ups
  (customer by phone, each line until the caller's, its plan, data usage or bills where the task needs them), a
  diagnostic question before and a check after each phone fix, and an explanation sentence in every turn. Its
  questions the scripted customer cannot act on get its one-line "not sure" reply, so an LLM customer's longer
  replies are not counted: treat these numbers as a floor for real teacher traces.
The policy's turns go through an in-process client that returns the script's token ids (the end-of-turn id
appended, as sglang returns it with no_stop_trim), so no server and no timing is involved.

Printed per agent, over tasks: p50 / p95 / max of the first prompt, the response (everything after the prompt:
sampled turns, tool results, user turns; what `--rollout-max-response-len` budgets), the whole sequence, the
sampled tokens of its longest policy turn, and policy turns; with the success rate (every episode should succeed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from pathlib import Path
from typing import Any

from rollout.clients.policy import PolicyOutput
from rollout.engine import EpisodeConfig, TokenAgent, build_environment
from rollout.episode import Episode
from rollout.scripted import (
    CLOSING_MESSAGE,
    TRANSFER_MESSAGE,
    TRANSFER_TOOL,
    ScriptedTurn,
    gold_actions,
    gold_agent_turns,
    user_action_instruction,
)
from rollout.task_store import get_task_store
from rollout.tool_format import format_assistant_turn
from rollout.user_sim import UserSimConfig

PHONE = re.compile(r"\b\d{3}-\d{3}-\d{4}\b")
EXPLANATION = (
    "Thank you for your patience. Based on what I can see on your account and what you have described, this is "
    "the next step in our troubleshooting process."
)
DIAGNOSTIC = (
    "Before we change anything, could you please check your status bar and tell me what it shows for signal, "
    "mobile data and Wi-Fi (check_status_bar)?"
)
VERIFY = (
    "Thanks. Could you run a quick speed test and tell me the result, so we know whether it helped (run_speed_test)?"
)
IDENTIFY = (
    "I'm sorry to hear you're having trouble with your phone service. I'd be glad to help. To look up your account, "
    "could you please confirm the phone number of the line you are calling about?"
)


class ScriptPolicy:
    """A PolicyClient that answers turn k of an episode with the k-th scripted text's token ids."""

    def __init__(self, tokenizer: Any, texts: list[str], end_of_turn_id: int) -> None:
        self.ids = [[*tokenizer.encode(text, add_special_tokens=False), end_of_turn_id] for text in texts]
        self.calls = 0

    async def generate(self, input_ids: list[int], sampling_params: dict[str, Any]) -> PolicyOutput:
        ids = self.ids[min(self.calls, len(self.ids) - 1)][: sampling_params["max_new_tokens"]]
        self.calls += 1
        return PolicyOutput(
            token_ids=ids, logprobs=[0.0] * len(ids), finish_reason="stop", prompt_tokens=len(input_ids)
        )

    async def aclose(self) -> None:
        """Nothing to release."""


def _lookups(task: Any) -> list[ScriptedTurn]:
    """The account look-ups a policy-following agent makes, with the ids read from the task's initial state."""
    match = PHONE.search(str(task.user_scenario.instructions.known_info or ""))
    if match is None:
        return []
    env = build_environment("telecom", task, solo_mode=False)
    tools = env.tools
    customer = tools.get_customer_by_phone(match.group(0))
    turns = [
        ScriptedTurn(content=EXPLANATION, tool_calls=[_call("get_customer_by_phone", phone_number=match.group(0))])
    ]
    line = None
    for line_id in customer.line_ids:
        turns.append(ScriptedTurn(tool_calls=[_call("get_details_by_id", id=line_id)]))
        line = tools.get_details_by_id(line_id)
        if getattr(line, "phone_number", None) == match.group(0):
            break
    if line is not None:
        turns.append(ScriptedTurn(tool_calls=[_call("get_details_by_id", id=line.plan_id)]))
    names = {action.name for action in gold_actions(task)}
    if "refuel_data" in names and line is not None:
        turns.append(
            ScriptedTurn(tool_calls=[_call("get_data_usage", customer_id=customer.customer_id, line_id=line.line_id)])
        )
    if names & {"send_payment_request", "resume_line"}:
        turns.append(ScriptedTurn(tool_calls=[_call("get_bills_for_customer", customer_id=customer.customer_id)]))
    return turns


def _call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"name": name, "arguments": arguments}


def teacher_like_turns(task: Any) -> list[ScriptedTurn]:
    """The gold path with a policy-following agent's look-ups, questions, checks and explanations around it.

    Text-only turns are only sent while the customer still has gold phone actions to do: the scripted customer
    ends the call at the first text turn after its last one."""
    actions = gold_actions(task)
    user_actions = [a for a in actions if a.requestor == "user"]
    turns: list[ScriptedTurn] = [ScriptedTurn(content=IDENTIFY)] if user_actions else []
    turns += _lookups(task)
    pending = len(user_actions)
    for action in actions:
        if action.requestor == "assistant":
            turns.append(ScriptedTurn(content=EXPLANATION, tool_calls=[_call(action.name, **action.arguments)]))
            continue
        turns.append(ScriptedTurn(content=DIAGNOSTIC))
        turns.append(ScriptedTurn(content=f"{EXPLANATION} {user_action_instruction(action)}"))
        pending -= 1
        if pending:
            turns.append(ScriptedTurn(content=VERIFY))
    last = actions[-1].name if actions else None
    turns.append(ScriptedTurn(content=TRANSFER_MESSAGE if last == TRANSFER_TOOL else CLOSING_MESSAGE))
    return turns


AGENTS = {"gold": lambda task: gold_agent_turns(task, solo_mode=False), "teacher-like": teacher_like_turns}


async def play(task: Any, turns: list[ScriptedTurn], tokenizer: Any, budget: int) -> dict[str, Any]:
    texts = [format_assistant_turn(turn.content, turn.tool_calls) for turn in turns]
    policy = ScriptPolicy(tokenizer, texts, tokenizer.convert_tokens_to_ids("<|im_end|>"))

    def make_agent(view: Any) -> TokenAgent:
        return TokenAgent(policy, tokenizer, view, {"temperature": 1.0}, max_response_tokens=budget)

    episode = await Episode.start(task, EpisodeConfig(domain="telecom"), make_agent, UserSimConfig(kind="scripted"))
    result = await episode.play()
    record = result.record
    sampled = [span.end - span.start for span in record.spans if span.kind == "sampled"]
    return {
        "task_id": task.id,
        "success": result.success,
        "status": result.status,
        "prompt": len(record.prompt_ids),
        "response": record.response_length,
        "total": len(record.all_ids),
        "turn_sampled_max": max(sampled, default=0),
        "turns": result.turns,
    }


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): a value that occurred."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def table(rows: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        "| agent | episodes | success | prompt p50 / p95 / max | response p50 / p95 / max | total p50 / p95 / max "
        "| longest policy turn p50 / p95 / max | policy turns p50 / p95 / max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for agent, results in rows.items():
        cells = []
        for key in ("prompt", "response", "total", "turn_sampled_max", "turns"):
            values = [r[key] for r in results]
            cells.append(" / ".join(f"{percentile(values, q):,.0f}" for q in (50, 95, 100)))
        success = sum(r["success"] for r in results)
        lines.append(f"| {agent} | {len(results)} | {success}/{len(results)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", default="train,test", help="telecom splits, comma-separated")
    parser.add_argument("--limit", type=int, help="first N tasks of each split")
    parser.add_argument("--budget", type=int, default=65536, help="episode budget while measuring (never reached)")
    parser.add_argument("--json", type=Path, help="also write every episode's numbers here")
    args = parser.parse_args(argv)

    from examples.qwen3_tokenizer import load_qwen3_tokenizer

    tokenizer = load_qwen3_tokenizer()
    tasks = []
    for split in args.split.split(","):
        tasks += get_task_store().tasks("telecom", split.strip())[: args.limit]

    async def run_all() -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for agent, script in AGENTS.items():
            out[agent] = [await play(task, script(task), tokenizer, args.budget) for task in tasks]
        return out

    rows = asyncio.run(run_all())
    print(f"telecom {args.split}: {len(tasks)} tasks, Qwen3 tokenizer, full policy\n")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
