"""One retry policy for every HTTP call of the recipe: the policy server, OpenAI-compatible chat servers, Gemini.

An attempt that fails in a way worth retrying (HTTP 408, 429 or 5xx, a timeout, a connection error, a malformed
answer) raises `Retryable`; anything else fails at once. Between attempts the caller waits the server's
`Retry-After` if it sent one, else an exponential backoff with jitter; both capped at `backoff_max_s`. Each attempt
is bounded by `timeout_s`, the attempts by `max_retries`. The whole turn (attempts and waits together) is bounded by
the engine, not here: TAU2_TURN_TIMEOUT_S (rollout/budgets.py), or TAU2_USER_CALL_TIMEOUT_S for the user simulator.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pydantic import BaseModel, Field

logger = logging.getLogger(__name__)
T = TypeVar("T")

RETRYABLE_STATUS = frozenset({408, 429})  # and every 5xx


def is_retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUS or status >= 500


class Retryable(Exception):
    """One failed attempt that may be retried; its message must hold no secret (it is logged)."""

    def __init__(self, message: str, retry_after: float | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status


class RetryPolicy(BaseModel):
    max_retries: int = Field(default=5, ge=0)
    backoff_base_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)
    timeout_s: float = Field(default=600.0, gt=0, description="one attempt")

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `failures` (1-based): the server's Retry-After if given, else
        exponential backoff with jitter in [d/2, d] (it spreads the retries of many episodes hitting one restarted
        server); both capped at backoff_max_s."""
        if retry_after is not None:
            return min(retry_after, self.backoff_max_s)
        delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** (failures - 1))
        return delay * (0.5 + random.random() / 2)

    async def run(
        self, attempt: Callable[[float], Awaitable[T]], target: str, give_up: Callable[[int, Retryable], Exception]
    ) -> tuple[T, int]:
        """`attempt(timeout_s)` until it returns; returns (its value, attempts made). After the last retry raises
        `give_up(attempts, last error)`."""
        failures = 0
        while True:
            try:
                return await attempt(self.timeout_s), failures + 1
            except Retryable as err:
                failures += 1
                if failures > self.max_retries:
                    raise give_up(failures, err) from None
                delay = self.delay(failures, err.retry_after)
                logger.warning("%s: attempt %d failed (%s); retrying in %.2f s", target, failures, err, delay)
                await asyncio.sleep(delay)


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` as seconds: a number, or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def redact(text: str, secret: str | None) -> str:
    """Replace every occurrence of the secret (servers sometimes echo a bad key back) before text leaves a client."""
    if secret and len(secret) >= 4:
        text = text.replace(secret, "***")
    return text
