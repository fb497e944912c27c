"""Token-in-token-out clients for the policy server: sglang's native /generate and OpenAI-style /v1/completions.

Both return the sampled token ids verbatim with their log-probs, so the trainer sees exactly what was sampled.
`sglang_generate_response` writes sglang's /generate answer: the CPU server (scripts/cpu_policy_server.py) and every
test or benchmark double answer with it, so they and this client agree with sglang by construction.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any, Literal, Protocol

import aiohttp
import orjson
from pydantic import BaseModel, Field

FinishReason = Literal["stop", "length", "abort"]
_JSON_HEADERS = {"Content-Type": "application/json"}

# sglang sampling keys that vLLM's /v1/completions spells differently or does not take.
_OPENAI_RENAMES = {"max_new_tokens": "max_tokens"}
_OPENAI_DROP = {"no_stop_trim", "spaces_between_special_tokens", "stop_token_ids", "stop", "n"}


class PolicyOutput(BaseModel):
    token_ids: list[int]
    logprobs: list[float]
    text: str = ""
    finish_reason: FinishReason
    abort_message: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    weight_version: str | None = None
    latency_s: float = 0.0
    attempts: int = 1


def sglang_generate_response(
    output_ids: list[int],
    text: str,
    finish_type: FinishReason,
    *,
    rid: str,
    prompt_tokens: int,
    cached_tokens: int = 0,
    matched: int | str | None = None,
    abort_message: str = "request aborted",
    logprobs: list[float] | None = None,
    token_texts: list[str | None] | None = None,
    **meta: Any,
) -> dict[str, Any]:
    """The body of sglang's `POST /generate` answer for one prompt: `text`, `output_ids` and `meta_info` with the
    request id, `finish_reason` ({"type": "stop", "matched": id | str | None}, {"type": "length", "length": N} or
    {"type": "abort", "message": ...}), prompt, completion and cached token counts, any `meta` given
    (weight_version, e2e_latency, output_top_logprobs) and, when `logprobs` are given (`return_logprob`),
    `output_token_logprobs`: one [logprob, token id, text or None] per output id."""
    if finish_type == "stop":
        finish: dict[str, Any] = {"type": "stop", "matched": matched}
    elif finish_type == "length":
        finish = {"type": "length", "length": len(output_ids)}
    else:
        finish = {"type": "abort", "message": abort_message}
    meta_info: dict[str, Any] = {
        "id": rid,
        "finish_reason": finish,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(output_ids),
        "cached_tokens": cached_tokens,
        **meta,
    }
    if logprobs is not None:
        texts = token_texts if token_texts is not None else [None] * len(output_ids)
        meta_info["output_token_logprobs"] = [list(entry) for entry in zip(logprobs, output_ids, texts, strict=True)]
    return {"text": text, "output_ids": list(output_ids), "meta_info": meta_info}


class PolicyServerError(RuntimeError):
    """The policy server could not produce a turn (down, overloaded past all retries, or a bad request)."""


class PolicyTimeout(PolicyServerError):
    """No answer within the request's deadline (RetryPolicy.deadline_s), all attempts included."""


class PolicyClient(Protocol):
    async def generate(self, input_ids: list[int], sampling_params: dict[str, Any]) -> PolicyOutput: ...

    async def aclose(self) -> None: ...


class RetryPolicy(BaseModel):
    max_retries: int = Field(default=5, ge=0)
    backoff_base_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)
    timeout_s: float = Field(default=600.0, gt=0, description="one attempt")
    deadline_s: float | None = Field(default=None, gt=0, description="one request: attempts and back-off together")

    def delay(self, attempt: int) -> float:
        """Full-jitter exponential backoff: spreads retries of many episodes hitting one restarted server."""
        return random.uniform(0, min(self.backoff_max_s, self.backoff_base_s * 2**attempt))


class _HttpPolicyClient:
    """Shared plumbing: one aiohttp session per loop, retries on 5xx / 429 / timeouts / connection errors."""

    def __init__(self, url: str, retry: RetryPolicy | None = None, max_connections: int = 0) -> None:
        self.url = url
        self.retry = retry or RetryPolicy()
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            connector = aiohttp.TCPConnector(limit=self._max_connections, force_close=False)
            self._session = aiohttp.ClientSession(connector=connector)
            self._loop = loop
        return self._session

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def _post(self, payload: dict[str, Any]) -> tuple[dict[str, Any], int, float]:
        """POST with retries; returns (json, attempts, latency of the successful attempt)."""
        last_error = "no attempt made"
        request_body = orjson.dumps(payload)
        deadline = self.retry.deadline_s
        first = time.perf_counter()
        for attempt in range(self.retry.max_retries + 1):
            left = self.retry.timeout_s if deadline is None else deadline - (time.perf_counter() - first)
            if attempt:
                await asyncio.sleep(min(self.retry.delay(attempt - 1), max(0.0, left)))
                left = self.retry.timeout_s if deadline is None else deadline - (time.perf_counter() - first)
            if left <= 0:
                raise PolicyTimeout(
                    f"no answer from {self.url} within {deadline:.1f} s ({attempt} attempts): {last_error}"
                )
            started = time.perf_counter()
            try:
                session = self._get_session()
                timeout = aiohttp.ClientTimeout(total=min(self.retry.timeout_s, left))
                # orjson: a 10k-token prompt encodes in ~0.1 ms instead of ~2 ms with the json module, every turn.
                async with session.post(self.url, data=request_body, headers=_JSON_HEADERS, timeout=timeout) as resp:
                    if resp.status == 200:
                        data = orjson.loads(await resp.read())
                        return data, attempt + 1, time.perf_counter() - started
                    detail = (await resp.text())[:300]
                    last_error = f"HTTP {resp.status} from {self.url}: {detail}"
                    if resp.status not in (408, 429) and resp.status < 500:
                        raise PolicyServerError(last_error)
            except orjson.JSONDecodeError as err:
                last_error = f"invalid JSON from {self.url}: {err}"
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as err:
                _raise_if_cancelled()  # aiohttp reports an outer cancellation as its own timeout: never retry it
                last_error = f"{type(err).__name__} talking to {self.url}: {err}"
        raise PolicyServerError(f"gave up after {self.retry.max_retries + 1} attempts: {last_error}")


def _raise_if_cancelled() -> None:
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    if cancelling is not None and cancelling():
        raise asyncio.CancelledError


class SglangGenerateClient(_HttpPolicyClient):
    """sglang's native `POST /generate` with `input_ids` and `return_logprob`."""

    async def generate(self, input_ids: list[int], sampling_params: dict[str, Any]) -> PolicyOutput:
        payload = {"input_ids": input_ids, "sampling_params": sampling_params, "return_logprob": True}
        data, attempts, latency = await self._post(payload)
        meta = data.get("meta_info") or {}
        entries = meta.get("output_token_logprobs") or []
        token_ids = [int(entry[1]) for entry in entries]
        logprobs = [float(entry[0]) if entry[0] is not None else 0.0 for entry in entries]
        if not token_ids and data.get("output_ids"):
            raise PolicyServerError(
                "the server returned output_ids without output_token_logprobs; is return_logprob on?"
            )
        finish = meta.get("finish_reason") or {}
        finish_type = finish.get("type") if isinstance(finish, dict) else finish
        if finish_type not in ("stop", "length", "abort"):
            finish_type = "stop"
        return PolicyOutput(
            token_ids=token_ids,
            logprobs=logprobs,
            text=data.get("text") or "",
            finish_reason=finish_type,
            abort_message=finish.get("message") if isinstance(finish, dict) else None,
            prompt_tokens=int(meta.get("prompt_tokens") or len(input_ids)),
            cached_tokens=int(meta.get("cached_tokens") or 0),
            weight_version=str(meta["weight_version"]) if meta.get("weight_version") is not None else None,
            latency_s=latency,
            attempts=attempts,
        )


class OpenAICompletionsClient(_HttpPolicyClient):
    """OpenAI-compatible `POST /v1/completions` with a token-id prompt (vLLM, sglang): ids and logprobs come back."""

    def __init__(self, url: str, model: str, retry: RetryPolicy | None = None, max_connections: int = 0) -> None:
        super().__init__(url, retry, max_connections)
        self.model = model

    async def generate(self, input_ids: list[int], sampling_params: dict[str, Any]) -> PolicyOutput:
        payload: dict[str, Any] = {
            "model": self.model,
            "prompt": input_ids,
            "logprobs": 1,
            "return_token_ids": True,
            "echo": False,
            "skip_special_tokens": False,
            "include_stop_str_in_output": True,
        }
        for key, value in sampling_params.items():
            if key in _OPENAI_DROP or value is None:
                continue
            payload[_OPENAI_RENAMES.get(key, key)] = value
        if sampling_params.get("stop_token_ids"):
            payload["stop_token_ids"] = sampling_params["stop_token_ids"]
        if sampling_params.get("top_k", -1) in (-1, 0):
            payload.pop("top_k", None)
        data, attempts, latency = await self._post(payload)
        choice = (data.get("choices") or [{}])[0]
        token_ids = [int(t) for t in choice.get("token_ids") or []]
        logprobs = [
            float(x) if x is not None else 0.0 for x in (choice.get("logprobs") or {}).get("token_logprobs") or []
        ]
        if len(token_ids) != len(logprobs):
            raise PolicyServerError(
                f"/v1/completions returned {len(token_ids)} token ids but {len(logprobs)} logprobs; "
                "the server must support return_token_ids and logprobs"
            )
        finish = choice.get("finish_reason")
        finish_type: FinishReason = "length" if finish == "length" else ("abort" if finish == "abort" else "stop")
        usage = data.get("usage") or {}
        return PolicyOutput(
            token_ids=token_ids,
            logprobs=logprobs,
            text=choice.get("text") or "",
            finish_reason=finish_type,
            prompt_tokens=int(usage.get("prompt_tokens") or len(input_ids)),
            latency_s=latency,
            attempts=attempts,
        )


def build_policy_client(
    base_url: str,
    api: Literal["sglang", "openai"] = "sglang",
    model: str = "default",
    retry: RetryPolicy | None = None,
) -> PolicyClient:
    """`base_url` is the server root (http://host:port); the path is chosen by the API."""
    root = base_url.rstrip("/")
    if api == "sglang":
        return SglangGenerateClient(root if root.endswith("/generate") else f"{root}/generate", retry)
    if api == "openai":
        if root.endswith("/v1"):
            root = root[: -len("/v1")]
        return OpenAICompletionsClient(f"{root}/v1/completions", model, retry)
    raise ValueError(f"unknown policy API '{api}'; valid: sglang, openai")
