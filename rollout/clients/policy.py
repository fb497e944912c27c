"""Token-in-token-out clients for the policy server: sglang's native /generate and OpenAI-style /v1/completions.

Both return the sampled token ids verbatim with their log-probs, so the trainer sees exactly what was sampled.
`sglang_generate_response` writes sglang's /generate answer: the CPU server (scripts/cpu_policy_server.py) and every
test or benchmark double answer with it, so they and this client agree with sglang by construction.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal, NamedTuple, Protocol

import aiohttp
import orjson
from pydantic import BaseModel

from rollout.clients.retry import Retryable, RetryPolicy, is_retryable_status, parse_retry_after

FinishReason = Literal["stop", "length", "abort"]
_JSON_HEADERS = {"Content-Type": "application/json"}

# sglang sampling keys that vLLM's /v1/completions spells differently or does not take.
_OPENAI_RENAMES = {"max_new_tokens": "max_tokens"}
_OPENAI_DROP = {"no_stop_trim", "spaces_between_special_tokens", "stop_token_ids", "stop", "n"}


class PolicyOutput(BaseModel):
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    abort_message: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    weight_version: str | None = None
    latency_s: float = 0.0


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


class JsonIds(NamedTuple):
    """A prompt's token ids already encoded as JSON (IdsJson: the prompt's text shared, the response's extended by
    each turn's new ids): the array's text without its closing bracket, in parts ("[1,2", ",3"), and how many ids.
    Clients with `takes_json_ids` accept it for `input_ids`."""

    parts: tuple[bytes | bytearray, ...]
    count: int


def _json_body(ids_key: str, input_ids: list[int] | JsonIds, rest: dict[str, Any]) -> bytes:
    """The request body: the ids under `ids_key` first (JsonIds joined in one copy), then `rest`."""
    if isinstance(input_ids, JsonIds):
        tail = orjson.dumps(rest)
        key = b'{"' + ids_key.encode() + b'":'
        return b"".join((key, *input_ids.parts, b"]", b"," + tail[1:] if len(tail) > 2 else b"}"))
    return orjson.dumps({ids_key: input_ids, **rest})


class PolicyClient(Protocol):
    async def generate(self, input_ids: list[int], sampling_params: dict[str, Any]) -> PolicyOutput: ...

    async def aclose(self) -> None: ...


class _HttpPolicyClient:
    """Shared plumbing: one aiohttp session per loop, attempts retried by the recipe's retry policy."""

    takes_json_ids = True  # generate() accepts JsonIds for input_ids

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

    async def _post(self, body: bytes) -> tuple[dict[str, Any], float]:
        """POST the JSON body with the retry policy; returns (json, latency of the successful attempt)."""
        latency = 0.0

        async def attempt(timeout_s: float) -> dict[str, Any]:
            nonlocal latency
            started = time.perf_counter()
            try:
                session = self._get_session()
                timeout = aiohttp.ClientTimeout(total=timeout_s)
                async with session.post(self.url, data=body, headers=_JSON_HEADERS, timeout=timeout) as resp:
                    raw = await resp.read()
                    if resp.status != 200:
                        detail = f"HTTP {resp.status} from {self.url}: {raw.decode(errors='replace')[:300]}"
                        if not is_retryable_status(resp.status):
                            raise PolicyServerError(detail)
                        raise Retryable(detail, parse_retry_after(resp.headers.get("Retry-After")), resp.status)
                data = orjson.loads(raw)
            except orjson.JSONDecodeError as err:
                raise Retryable(f"invalid JSON from {self.url}: {err}") from None
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as err:
                _raise_if_cancelled()  # aiohttp reports an outer cancellation as its own timeout: never retry it
                raise Retryable(f"{type(err).__name__} talking to {self.url}: {err}") from None
            latency = time.perf_counter() - started
            return data

        def give_up(attempts: int, last: Retryable) -> PolicyServerError:
            return PolicyServerError(f"gave up after {attempts} attempts: {last}")

        data, _ = await self.retry.run(attempt, f"POST {self.url}", give_up)
        return data, latency


def _raise_if_cancelled() -> None:
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    if cancelling is not None and cancelling():
        raise asyncio.CancelledError


class SglangGenerateClient(_HttpPolicyClient):
    """sglang's native `POST /generate` with `input_ids` and `return_logprob`."""

    async def generate(self, input_ids: list[int] | JsonIds, sampling_params: dict[str, Any]) -> PolicyOutput:
        # orjson: a 10k-token prompt encodes in ~0.1 ms instead of ~2 ms with the json module, every turn.
        body = _json_body("input_ids", input_ids, {"sampling_params": sampling_params, "return_logprob": True})
        count = input_ids.count if isinstance(input_ids, JsonIds) else len(input_ids)
        del input_ids  # while the request is in flight only its body is kept
        data, latency = await self._post(body)
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
            finish_reason=finish_type,
            abort_message=finish.get("message") if isinstance(finish, dict) else None,
            prompt_tokens=int(meta.get("prompt_tokens") or count),
            cached_tokens=int(meta.get("cached_tokens") or 0),
            weight_version=str(meta["weight_version"]) if meta.get("weight_version") is not None else None,
            latency_s=latency,
        )


class OpenAICompletionsClient(_HttpPolicyClient):
    """OpenAI-compatible `POST /v1/completions` with a token-id prompt (vLLM, sglang): ids and logprobs come back."""

    def __init__(self, url: str, model: str, retry: RetryPolicy | None = None, max_connections: int = 0) -> None:
        super().__init__(url, retry, max_connections)
        self.model = model

    async def generate(self, input_ids: list[int] | JsonIds, sampling_params: dict[str, Any]) -> PolicyOutput:
        payload: dict[str, Any] = {
            "model": self.model,
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
        body = _json_body("prompt", input_ids, payload)
        count = input_ids.count if isinstance(input_ids, JsonIds) else len(input_ids)
        del input_ids  # while the request is in flight only its body is kept
        data, latency = await self._post(body)
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
            finish_reason=finish_type,
            prompt_tokens=int(usage.get("prompt_tokens") or count),
            latency_s=latency,
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
