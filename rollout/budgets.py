"""Token budgets and time bounds of an episode: one set of defaults for GRPO, in-training evaluation and the evaluator.

Budgets (tokens; a user overrides each, see SETUP_GUIDE.md "Episode budgets"):
- EPISODE_TOKENS: the whole response of an episode, everything after the first prompt (sampled turns, tool
  results, user turns, template glue): slime's `--rollout-max-response-len` / `--eval-max-response-len`, the
  evaluator's `--max-response-tokens`. An episode that reaches it ends TRUNCATED (termination `max_tokens`).
- TURN_TOKENS: one policy turn (TAU2_MAX_TOKENS_PER_TURN); a turn cut by it is closed and played as written.
- CONTEXT_TOKENS: prompt + response (slime's `--rollout-max-context-len`, the evaluator's `--max-context-tokens`).
Measured with bench/episode_lengths.py on the 114 telecom train + test tasks, Qwen3's tokenizer, full policy: the
prompt is 7,217 / 7,249 tokens (p50 / max); the response of a gold episode 313 / 735 / 885 (p50 / p95 / max), of a
teacher-like one 1,643 / 3,085 / 3,357, the longest sampled turn 77 tokens. EPISODE_TOKENS = 12,288 is ~4x the
teacher-like p95 (room for an LLM customer's longer replies and a policy that explores) and keeps prompt + response
under the default --max-tokens-per-gpu of 20,480, so every sample fits one micro-batch; TURN_TOKENS = 1,024 is 13x the
longest measured turn: a longer turn is almost always a degenerate loop, and the cap stops it from eating the budget.

Time bounds (seconds; derived from the budgets unless set, TAU2_TURN_TIMEOUT_S / TAU2_EPISODE_TIMEOUT_S):
- one turn, the policy's or the user simulator's, retries included: TURN_OVERHEAD_S + turn tokens / MIN_TOKENS_PER_S
  = 120 + 1,024 / 16 = 184 s with the defaults: a request that has not produced a turn by then is stuck, and a GRPO
  step never waits longer than that on it;
- the whole episode: max(4 turns' bound, episode tokens / MIN_EPISODE_TOKENS_PER_S) = 12,288 / 10 = 1,229 s with the
  defaults, several times a long healthy episode (~30 turns at a few seconds each).
"""

from __future__ import annotations

EPISODE_TOKENS = 12288
TURN_TOKENS = 1024
CONTEXT_TOKENS = 20480

TURN_OVERHEAD_S = 120.0  # queueing and the prefill of a long context under a full batch
MIN_TOKENS_PER_S = 16.0  # the slowest decode rate a healthy, fully loaded server gives one request
MIN_EPISODE_TOKENS_PER_S = 10.0  # an episode whose record grows slower than this on average is stuck


def turn_timeout_s(turn_tokens: int | None = None) -> float:
    """Bound on one policy or user turn (all retries), from the turn's token cap."""
    return TURN_OVERHEAD_S + (turn_tokens or TURN_TOKENS) / MIN_TOKENS_PER_S


def episode_timeout_s(episode_tokens: int | None = None, turn_tokens: int | None = None) -> float:
    """Bound on a whole episode, from its token budget (never below four turns' bound)."""
    return max(4 * turn_timeout_s(turn_tokens), (episode_tokens or EPISODE_TOKENS) / MIN_EPISODE_TOKENS_PER_S)
