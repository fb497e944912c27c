"""A small real inference server for a Hugging Face causal LM folder on CPU (transformers + torch fp32, aiohttp).

    python scripts/cpu_policy_server.py --model DIR --host 127.0.0.1 --port P [--threads N] [--served-model-name NAME]

It stands in for sglang / vLLM where no GPU exists, speaking their wire protocols for token-in-token-out use:
- sglang native `POST /generate` ({"input_ids" | "text", "sampling_params", "return_logprob", "rid"?}; a list of
  prompts gives a list of answers), `POST /abort_request` ({"rid"} or {"abort_all": true}), `GET /get_model_info`,
  `POST /flush_cache`;
- vLLM's OpenAI-compatible `POST /v1/completions` (token-id or text prompt, `return_token_ids`, `logprobs`) and
  `GET /v1/models`; `GET /health` answers 200 once the model is loaded (the port opens only then).

Semantics followed (from the servers' own code):
- Logprobs are log_softmax of the raw fp32 logits at the sampled position, whatever temperature / top-p / top-k were
  used for sampling (sglang's `output_token_logprobs`, vLLM's default "raw_logprobs"): comparable to the trainer's
  log-probs of the same tokens. temperature 0 samples greedily.
- Generation stops on the tokenizer's eos and the generation config's eos ids (SmolLM2: `<|im_end|>` = 2) unless
  `ignore_eos`, on `stop_token_ids` and on `stop` strings. The stopping token is always in `output_ids` / `token_ids`
  with its logprob (as in sglang and vLLM); only the text drops it, unless `no_stop_trim` (sglang) or
  `include_stop_str_in_output` (vLLM) is true.
- sglang finish_reason: {"type": "stop", "matched": id | str}, {"type": "length", "length": N},
  {"type": "abort", "message": ...}. vLLM: "stop" | "length" | "abort", stop_reason = the stop id / string, None
  for eos.
- With `return_logprob`, meta_info holds `output_token_logprobs` ([logprob, id, text if `return_text_in_logprobs`
  else None] per generated token) and, with `top_logprobs_num`, `output_top_logprobs`; prompt logprobs
  (`input_token_logprobs`) are not computed. vLLM's `logprobs: k` gives the sampled token's logprob plus the top k.
- `spaces_between_special_tokens` is accepted; fast tokenizers never insert those spaces, so it changes nothing.
- Penalties, min_new_tokens, logit_bias, streaming and sglang's n > 1 are not implemented: non-neutral values get 400.

One worker thread generates one request at a time with a KV cache; requests queue in arrival order and the aiohttp
loop never blocks. A client that disconnects, or an aborted request, stops at its next token. A small prefix cache
keeps the KV of recent sequences, so a multi-turn conversation re-sent with one more turn only prefills the new tokens
(reported as `cached_tokens`).
Fault injection for tests (off by default): `--fail-first-n N` answers 500 to the first N generation requests,
`--delay-s S` sleeps S seconds before handling each generation request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import queue
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from aiohttp import web
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.utils import logging as hf_logging

from rollout.clients.policy import sglang_generate_response

log = logging.getLogger("cpu_policy_server")

THREADS_ENV = "CPU_POLICY_THREADS"
PREFILL_CHUNK = 2048  # bounds activation memory of long prompts
MAX_TOP_LOGPROBS = 20  # vLLM's default --max-logprobs
LOGPROB_FLOOR = -9999.0  # vLLM clamps -inf to this in completions logprobs


class BadRequest(Exception):
    """Client error: answered with HTTP 400 and a JSON error body."""


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    top_logprobs: int = 0  # alternatives to report per step besides the sampled token


@dataclass
class Generation:
    output_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    finish_type: str  # "stop" | "length" | "abort"
    matched: int | str | None
    prompt_tokens: int
    cached_tokens: int
    eos_stop: bool = False  # stopped on an eos id (not a requested stop id / string)


# ----------------------------------------------------------------------------------------------- model and generation


class PrefixCache:
    """LRU of KV caches keyed by the token ids they hold; hands out cropped private copies, never shared tensors."""

    def __init__(self, capacity: int, config: Any) -> None:
        self.capacity = capacity
        self.config = config
        self.entries: OrderedDict[tuple[int, ...], DynamicCache] = OrderedDict()

    def take(self, prompt_ids: list[int]) -> tuple[DynamicCache, int]:
        """A cache holding the longest cached prefix of prompt_ids (at most len - 1: the last token is fed again)."""
        best_key, best_len = None, 0
        for key in self.entries:
            n = _common_prefix(key, prompt_ids, len(prompt_ids) - 1)
            if n > best_len:
                best_key, best_len = key, n
        if best_key is None:
            return DynamicCache(config=self.config), 0
        self.entries.move_to_end(best_key)
        source = self.entries[best_key]
        layers = [
            (layer.keys[:, :, :best_len].clone(), layer.values[:, :, :best_len].clone()) for layer in source.layers
        ]
        return DynamicCache(ddp_cache_data=layers, config=self.config), best_len

    def put(self, token_ids: list[int], cache: DynamicCache) -> None:
        if self.capacity <= 0 or not token_ids:
            return
        key = tuple(token_ids)
        # An entry that is a prefix of the new one is redundant (the same conversation, one turn earlier).
        for old in [k for k in self.entries if len(k) <= len(key) and key[: len(k)] == k]:
            del self.entries[old]
        self.entries[key] = cache
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

    def clear(self) -> None:
        self.entries.clear()


def _common_prefix(a: tuple[int, ...], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def sample_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator) -> int:
    """Pick the next token from raw logits: greedy at temperature 0, else temperature, top-k, top-p, min-p."""
    if cfg.temperature <= 1e-6:
        return int(torch.argmax(logits))
    scores = logits / cfg.temperature
    if 0 < cfg.top_k < scores.numel():
        kth = torch.topk(scores, cfg.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if cfg.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Drop a token once the mass strictly before it already reaches top_p (the top token always stays).
        drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= cfg.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    if cfg.min_p > 0.0:
        probs = probs.masked_fill(probs < cfg.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))


class Engine:
    """The model, its tokenizer and a KV-cached decode loop. Used from one thread at a time."""

    def __init__(self, model_dir: str, prefix_cache_size: int) -> None:
        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        # fp32 explicitly: CPUs without native bf16 run bf16 matmuls several times slower.
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        config = self.model.config
        self.vocab_size = int(config.vocab_size)
        self.max_context = int(getattr(config, "max_position_embeddings", 8192))
        self.eos_ids = _eos_ids(self.tokenizer, self.model)
        self.prefix_cache = PrefixCache(prefix_cache_size, config)

    def warm_up(self) -> None:
        self.generate([1, 2, 3, 4], SamplingConfig(temperature=0.0, max_new_tokens=2), lambda: False, use_cache=False)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    @torch.inference_mode()
    def _forward(self, ids: list[int], cache: DynamicCache) -> torch.Tensor:
        logits = None
        for start in range(0, len(ids), PREFILL_CHUNK):
            chunk = torch.tensor([ids[start : start + PREFILL_CHUNK]], dtype=torch.long)
            out = self.model(input_ids=chunk, past_key_values=cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[0, -1]
        return logits.float()

    def generate(
        self, prompt_ids: list[int], cfg: SamplingConfig, should_abort: Callable[[], bool], use_cache: bool = True
    ) -> Generation:
        if use_cache:
            cache, cached = self.prefix_cache.take(prompt_ids)
        else:
            cache, cached = DynamicCache(config=self.model.config), 0
        generator = torch.Generator()
        generator.manual_seed(cfg.seed if cfg.seed is not None else secrets.randbits(63))
        stop_ids = set(cfg.stop_token_ids)
        eos_ids = set() if cfg.ignore_eos else self.eos_ids
        longest_stop = max((len(s) for s in cfg.stop), default=0)

        output_ids: list[int] = []
        logprobs: list[float] = []
        top: list[list[tuple[int, float]]] = []
        finish_type, matched, eos_stop = "length", None, False
        if should_abort():  # aborted while waiting in the queue
            return Generation([], [], [], "abort", None, len(prompt_ids), 0)
        logits = self._forward(prompt_ids[cached:], cache)
        while len(output_ids) < cfg.max_new_tokens:
            if should_abort():
                finish_type = "abort"
                break
            token = sample_token(logits, cfg, generator)
            token_logprobs = torch.log_softmax(logits, dim=-1)
            output_ids.append(token)
            logprobs.append(float(token_logprobs[token]))
            if cfg.top_logprobs > 0:
                values, indices = torch.topk(token_logprobs, cfg.top_logprobs)
                top.append([(int(i), float(v)) for i, v in zip(indices, values, strict=True)])
            if token in eos_ids or token in stop_ids:
                finish_type, matched, eos_stop = "stop", token, token in eos_ids
                break
            if longest_stop:
                # A stop string of L characters lies within the last ~L tokens; the margin covers multi-byte pieces.
                tail = self.decode(output_ids[-(2 * longest_stop + 8) :], skip_special_tokens=False)
                hit = next((s for s in cfg.stop if s in tail), None)
                if hit is not None:
                    finish_type, matched = "stop", hit
                    break
            if len(output_ids) >= cfg.max_new_tokens:
                break
            with torch.inference_mode():
                out = self.model(
                    input_ids=torch.tensor([[token]], dtype=torch.long), past_key_values=cache, use_cache=True
                )
            logits = out.logits[0, -1].float()
        if use_cache and finish_type != "abort":
            # The cache holds the KV of every token but the last sampled one (never fed back).
            self.prefix_cache.put(prompt_ids + output_ids[:-1], cache)
        return Generation(
            output_ids=output_ids,
            logprobs=logprobs,
            top_logprobs=top,
            finish_type=finish_type,
            matched=matched,
            prompt_tokens=len(prompt_ids),
            cached_tokens=cached,
            eos_stop=eos_stop,
        )


def _eos_ids(tokenizer: Any, model: Any) -> set[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    return ids


# ----------------------------------------------------------------------------------------------- worker thread


@dataclass(eq=False)  # hashed by identity: jobs live in a set
class Job:
    run: Callable[[Callable[[], bool]], Any]  # called on the worker thread with a "should abort" probe
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    rid: str | None = None
    gone: threading.Event = field(default_factory=threading.Event)  # the client no longer waits: skip or stop
    aborted: threading.Event = field(default_factory=threading.Event)  # /abort_request: answer "abort" now


class Worker:
    """One thread that runs queued jobs in order (the engine is never used concurrently); results come back to the
    aiohttp loop through futures."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.pending: set[Job] = set()  # queued or running, touched only on the event loop
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="generation", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        self.jobs.put(None)
        self.thread.join(timeout)

    async def generate(self, prompt_ids: list[int], cfg: SamplingConfig, rid: str) -> Generation:
        return await self.call(lambda should_abort: self.engine.generate(prompt_ids, cfg, should_abort), rid)

    async def call(self, run: Callable[[Callable[[], bool]], Any], rid: str | None = None) -> Any:
        loop = asyncio.get_running_loop()
        job = Job(run=run, future=loop.create_future(), loop=loop, rid=rid)
        self.pending.add(job)
        self.jobs.put(job)
        try:
            return await job.future
        finally:
            # The answer came or the client went away (handler cancelled): a running job stops at its next token.
            job.gone.set()
            self.pending.discard(job)

    def abort(self, rid: str | None) -> int:
        """Abort the generation with this request id, or every one when rid is None; returns how many."""
        hits = [job for job in self.pending if job.rid is not None and (rid is None or job.rid == rid)]
        for job in hits:
            job.aborted.set()
        return len(hits)

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.gone.is_set():
                continue
            try:
                result = job.run(lambda job=job: job.gone.is_set() or job.aborted.is_set() or self.stopping.is_set())
                job.loop.call_soon_threadsafe(_resolve, job.future, result, None)
            except Exception as exc:  # reported to the client as a 500, the worker keeps serving
                log.exception("job failed")
                job.loop.call_soon_threadsafe(_resolve, job.future, None, exc)


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


# ----------------------------------------------------------------------------------------------- request parsing

# sglang sampling_params this server implements, and those accepted only at their neutral value.
SGLANG_KEYS = {
    "temperature", "top_p", "top_k", "min_p", "max_new_tokens", "stop", "stop_token_ids", "ignore_eos",
    "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim", "seed", "sampling_seed",
}  # fmt: skip
NEUTRAL = {
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_new_tokens": 0,
    "min_tokens": 0,
    "n": 1,
    "logit_bias": None,
    "regex": None,
    "json_schema": None,
    "ebnf": None,
    "stream": False,
    "echo": False,
}


def _number(params: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = params.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value) or not lo <= value <= hi:
        raise BadRequest(f"{key} must be a number in [{lo}, {hi}], got {value!r}")
    return float(value)


def _integer(params: dict, key: str, default: int | None, lo: int, hi: int) -> int | None:
    value = params.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadRequest(f"{key} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _flag(params: dict, key: str, default: bool) -> bool:
    value = params.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f"{key} must be a boolean, got {value!r}")
    return value


def _check_neutral(params: dict) -> None:
    for key, neutral in NEUTRAL.items():
        value = params.get(key)
        if value is not None and value != neutral and not (neutral is None and value in ({}, [])):
            raise BadRequest(f"{key}={value!r} is not supported by this server (only {neutral!r})")


def _token_ids(value: Any, vocab_size: int, what: str) -> list[int]:
    if not isinstance(value, list) or not value:
        raise BadRequest(f"{what} must be a non-empty list of token ids")
    for token in value:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise BadRequest(f"{what} holds {token!r}, not a token id in [0, {vocab_size})")
    return value


def _stop_strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise BadRequest("stop must be a non-empty string or a list of them")
    return tuple(value)


def _sampling_config(params: dict, vocab_size: int, max_new_key: str, max_new_default: int | None) -> SamplingConfig:
    _check_neutral(params)
    stop_ids = params.get("stop_token_ids")
    seed = params.get("seed", params.get("sampling_seed"))
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest(f"seed must be an integer, got {seed!r}")
    top_k = _integer(params, "top_k", -1, -1, vocab_size)
    return SamplingConfig(
        temperature=_number(params, "temperature", 1.0, 0.0, 100.0),
        top_p=_number(params, "top_p", 1.0, 1e-9, 1.0),
        top_k=-1 if top_k == 0 else top_k,
        min_p=_number(params, "min_p", 0.0, 0.0, 1.0),
        max_new_tokens=_integer(params, max_new_key, max_new_default, 0, 1 << 30),
        stop_token_ids=tuple(_token_ids(stop_ids, vocab_size, "stop_token_ids")) if stop_ids else (),
        stop=_stop_strings(params.get("stop")),
        ignore_eos=_flag(params, "ignore_eos", False),
        seed=None if seed is None else seed % (1 << 63),
    )


# ----------------------------------------------------------------------------------------------- HTTP app


class Server:
    def __init__(self, engine: Engine, worker: Worker, args: argparse.Namespace) -> None:
        self.engine = engine
        self.worker = worker
        self.served_model_name = args.served_model_name or Path(args.model).name
        self.fail_first_n = args.fail_first_n
        self.delay_s = args.delay_s
        self.generation_requests = 0
        self.created = int(time.time())

    def app(self) -> web.Application:
        app = web.Application(middlewares=[log_requests], client_max_size=64 * 1024**2)
        app.router.add_get("/health", self.health)
        app.router.add_get("/get_model_info", self.model_info)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/flush_cache", self.flush_cache)
        app.router.add_post("/abort_request", self.abort_request)
        app.router.add_post("/generate", self.generate)
        app.router.add_post("/v1/completions", self.completions)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def model_info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"model_path": self.engine.model_dir, "tokenizer_path": self.engine.model_dir, "is_generation": True}
        )

    async def models(self, request: web.Request) -> web.Response:
        card = {
            "id": self.served_model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "cpu_policy_server",
            "root": self.engine.model_dir,
            "parent": None,
            "max_model_len": self.engine.max_context,
        }
        return web.json_response({"object": "list", "data": [card]})

    async def flush_cache(self, request: web.Request) -> web.Response:
        # Queued on the worker thread so it never races a generation that is using the cache.
        await self.worker.call(lambda _: self.engine.prefix_cache.clear())
        return web.Response(text="Cache flushed.")

    async def abort_request(self, request: web.Request) -> web.Response:
        """sglang's abort: {"rid": id} or {"abort_all": true}; the aborted requests answer finish_reason "abort"."""
        try:
            body = await self._body(request)
            rid = body.get("rid")
            if not (isinstance(rid, str) or _flag(body, "abort_all", False)):
                raise BadRequest('give "rid" (a string) or "abort_all": true')
        except BadRequest as exc:
            return _error(400, str(exc), "BadRequestError")
        count = self.worker.abort(rid if isinstance(rid, str) else None)
        request["log_extra"] = f"aborted={count}"
        return web.Response()

    async def _faults(self) -> web.Response | None:
        """Test-only fault injection: delay every generation request, fail the first N."""
        self.generation_requests += 1
        if self.delay_s > 0:
            await asyncio.sleep(self.delay_s)
        if self.generation_requests <= self.fail_first_n:
            return _error(
                500, f"injected failure {self.generation_requests}/{self.fail_first_n}", "InternalServerError"
            )
        return None

    async def _body(self, request: web.Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(f"body is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object")
        return body

    # --- sglang /generate

    async def generate(self, request: web.Request) -> web.Response:
        fault = await self._faults()
        if fault is not None:
            return fault
        started = time.perf_counter()
        try:
            body = await self._body(request)
            prompts, single = self._sglang_prompts(body)
            params = body.get("sampling_params") or {}
            if not isinstance(params, dict):
                raise BadRequest("sampling_params must be an object")
            unknown = set(params) - SGLANG_KEYS - set(NEUTRAL)
            if unknown:
                raise BadRequest(f"unknown sampling_params: {sorted(unknown)}")
            cfg = _sampling_config(params, self.engine.vocab_size, "max_new_tokens", 128)
            cfg.top_logprobs = _integer(body, "top_logprobs_num", 0, 0, MAX_TOP_LOGPROBS)
            if body.get("stream"):
                raise BadRequest("stream=true is not supported by this server")
            options = {
                "return_logprob": _flag(body, "return_logprob", False),
                "text_in_logprobs": _flag(body, "return_text_in_logprobs", False),
                "skip_special_tokens": _flag(params, "skip_special_tokens", True),
                "no_stop_trim": _flag(params, "no_stop_trim", False),
            }
            _flag(params, "spaces_between_special_tokens", True)
            configs = [self._fit_sglang(ids, cfg) for ids in prompts]
            rids = _request_ids(body.get("rid"), len(prompts))
        except BadRequest as exc:
            request["log_extra"] = f"bad request: {exc}"
            return _error(400, str(exc), "BadRequestError")
        try:
            results = await asyncio.gather(
                *(self.worker.generate(*job) for job in zip(prompts, configs, rids, strict=True))
            )
        except Exception as exc:
            return _error(500, f"generation failed: {exc}", "InternalServerError")
        answers = [self._sglang_answer(r, rid, options, started) for r, rid in zip(results, rids, strict=True)]
        request["log_extra"] = _usage_note(results)
        return web.json_response(answers[0] if single else answers)

    def _sglang_prompts(self, body: dict) -> tuple[list[list[int]], bool]:
        ids, text = body.get("input_ids"), body.get("text")
        if (ids is None) == (text is None):
            raise BadRequest("give exactly one of input_ids or text")
        if ids is not None:
            if isinstance(ids, list) and ids and all(isinstance(p, list) for p in ids):
                return [_token_ids(p, self.engine.vocab_size, "input_ids") for p in ids], False
            return [_token_ids(ids, self.engine.vocab_size, "input_ids")], True
        if isinstance(text, str):
            return [_token_ids(self.engine.encode(text), self.engine.vocab_size, "text")], True
        if isinstance(text, list) and text and all(isinstance(t, str) for t in text):
            return [_token_ids(self.engine.encode(t), self.engine.vocab_size, "text") for t in text], False
        raise BadRequest("text must be a string or a list of strings")

    def _fit_sglang(self, ids: list[int], cfg: SamplingConfig) -> SamplingConfig:
        # sglang rejects a prompt that fills the context and shortens max_new_tokens to what is left.
        room = self.engine.max_context - len(ids)
        if room <= 0:
            raise BadRequest(f"input is {len(ids)} tokens, the context is {self.engine.max_context}")
        return _replace(cfg, max_new_tokens=min(cfg.max_new_tokens, room))

    def _sglang_answer(self, result: Generation, rid: str, options: dict, started: float) -> dict:
        trim = not options["no_stop_trim"] and result.finish_type == "stop"
        text_ids = result.output_ids[:-1] if trim and isinstance(result.matched, int) else result.output_ids
        text = self.engine.decode(text_ids, options["skip_special_tokens"])
        if trim and isinstance(result.matched, str) and result.matched in text:
            text = text[: text.find(result.matched)]
        in_text = options["text_in_logprobs"]

        def token_text(token: int) -> str | None:
            return self.engine.decode([token], False) if in_text else None

        extra: dict[str, Any] = {"e2e_latency": round(time.perf_counter() - started, 4)}
        if options["return_logprob"] and result.top_logprobs:
            extra["output_top_logprobs"] = [
                [[lp, token, token_text(token)] for token, lp in step] for step in result.top_logprobs
            ]
        return sglang_generate_response(
            result.output_ids,
            text,
            result.finish_type,
            rid=rid,
            prompt_tokens=result.prompt_tokens,
            cached_tokens=result.cached_tokens,
            matched=result.matched,
            logprobs=result.logprobs if options["return_logprob"] else None,
            token_texts=[token_text(t) for t in result.output_ids] if options["return_logprob"] else None,
            **extra,
        )

    # --- vLLM /v1/completions

    async def completions(self, request: web.Request) -> web.Response:
        fault = await self._faults()
        if fault is not None:
            return fault
        try:
            body = await self._body(request)
            model = body.get("model")
            if model is not None and model not in (self.served_model_name, self.engine.model_dir):
                return _error(404, f"The model `{model}` does not exist.", "NotFoundError")
            prompts = self._completion_prompts(body.get("prompt"))
            n = _integer(body, "n", 1, 1, 64)
            cfg = _sampling_config({**body, "n": 1}, self.engine.vocab_size, "max_tokens", 16)
            logprobs = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
            cfg.top_logprobs = logprobs or 0
            options = {
                "logprobs": logprobs,
                "return_token_ids": _flag(body, "return_token_ids", False),
                "skip_special_tokens": _flag(body, "skip_special_tokens", True),
                "include_stop": _flag(body, "include_stop_str_in_output", False),
            }
            _flag(body, "spaces_between_special_tokens", True)
            jobs = []
            for ids in prompts:
                fitted = self._fit_vllm(ids, cfg, explicit_max=body.get("max_tokens") is not None)
                for i in range(n):
                    # n samples of one prompt with a seed: distinct but reproducible streams.
                    seeded = fitted if cfg.seed is None else _replace(fitted, seed=(cfg.seed + i) % (1 << 63))
                    jobs.append((ids, seeded))
        except BadRequest as exc:
            request["log_extra"] = f"bad request: {exc}"
            return _error(400, str(exc), "BadRequestError")
        try:
            results = await asyncio.gather(*(self.worker.generate(ids, c, uuid.uuid4().hex) for ids, c in jobs))
        except Exception as exc:
            return _error(500, f"generation failed: {exc}", "InternalServerError")
        choices = [
            self._completion_choice(i, ids, r, options)
            for i, ((ids, _), r) in enumerate(zip(jobs, results, strict=True))
        ]
        prompt_tokens = sum(len(ids) for ids in prompts)
        completion_tokens = sum(len(r.output_ids) for r in results)
        request["log_extra"] = _usage_note(results)
        return web.json_response(
            {
                "id": f"cmpl-{uuid.uuid4().hex}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": self.served_model_name,
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                    "prompt_tokens_details": None,
                },
            }
        )

    def _completion_prompts(self, prompt: Any) -> list[list[int]]:
        vocab = self.engine.vocab_size
        if isinstance(prompt, str):
            return [_token_ids(self.engine.encode(prompt), vocab, "prompt")]
        if isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return [_token_ids(prompt, vocab, "prompt")]
        if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
            return [_token_ids(p, vocab, "prompt") for p in prompt]
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return [_token_ids(self.engine.encode(p), vocab, "prompt") for p in prompt]
        raise BadRequest("prompt must be a string, a list of token ids, or a list of either")

    def _fit_vllm(self, ids: list[int], cfg: SamplingConfig, explicit_max: bool) -> SamplingConfig:
        # vLLM rejects a prompt + an explicit max_tokens beyond the context; its default (16) is shortened instead.
        room = self.engine.max_context - len(ids)
        if room <= 0:
            raise BadRequest(f"prompt is {len(ids)} tokens, the context is {self.engine.max_context}")
        if not explicit_max:
            return _replace(cfg, max_new_tokens=min(cfg.max_new_tokens, room))
        if cfg.max_new_tokens > room:
            raise BadRequest(
                f"This model's maximum context length is {self.engine.max_context} tokens. However, you requested "
                f"{len(ids) + cfg.max_new_tokens} tokens ({len(ids)} in the prompt, {cfg.max_new_tokens} to generate)."
            )
        return cfg

    def _completion_choice(self, index: int, prompt_ids: list[int], result: Generation, options: dict) -> dict:
        stopped = result.finish_type == "stop"
        by_token = stopped and isinstance(result.matched, int)
        text_ids = result.output_ids[:-1] if by_token and not options["include_stop"] else result.output_ids
        text = self.engine.decode(text_ids, options["skip_special_tokens"])
        if stopped and isinstance(result.matched, str) and not options["include_stop"] and result.matched in text:
            text = text[: text.find(result.matched)]
        choice: dict[str, Any] = {
            "index": index,
            "text": text,
            "logprobs": self._completion_logprobs(result) if options["logprobs"] is not None else None,
            "finish_reason": result.finish_type,
            "stop_reason": None if result.eos_stop or not stopped else result.matched,
            "prompt_logprobs": None,
        }
        if options["return_token_ids"]:
            choice["prompt_token_ids"] = prompt_ids
            choice["token_ids"] = result.output_ids
        return choice

    def _completion_logprobs(self, result: Generation) -> dict:
        tokens = [self.engine.decode([token], False) for token in result.output_ids]
        offsets, position = [], 0
        for token in tokens:
            offsets.append(position)
            position += len(token)
        top: list[dict[str, float]] = []
        for step, (token, lp) in enumerate(zip(result.output_ids, result.logprobs, strict=True)):
            # vLLM lists the sampled token first, then the top alternatives.
            entries = {self.engine.decode([token], False): max(lp, LOGPROB_FLOOR)}
            for alt, alt_lp in result.top_logprobs[step] if result.top_logprobs else []:
                entries.setdefault(self.engine.decode([alt], False), max(alt_lp, LOGPROB_FLOOR))
            top.append(entries)
        return {
            "text_offset": offsets,
            "token_logprobs": [max(lp, LOGPROB_FLOOR) for lp in result.logprobs],
            "tokens": tokens,
            "top_logprobs": top,
        }


def _request_ids(rid: Any, count: int) -> list[str]:
    """sglang request ids: the client's `rid` (a string, or one per prompt) or fresh ones."""
    if rid is None:
        return [uuid.uuid4().hex for _ in range(count)]
    rids = [rid] if isinstance(rid, str) else rid
    if not isinstance(rids, list) or len(rids) != count or not all(isinstance(r, str) for r in rids):
        raise BadRequest("rid must be a string (one prompt) or a list of strings, one per prompt")
    return rids


def _replace(cfg: SamplingConfig, **changes: Any) -> SamplingConfig:
    return SamplingConfig(**{**cfg.__dict__, **changes})


def _error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


def _usage_note(results: list[Generation]) -> str:
    return " ".join(
        f"prompt={r.prompt_tokens} cached={r.cached_tokens} new={len(r.output_ids)} finish={r.finish_type}"
        for r in results
    )


@web.middleware
async def log_requests(request: web.Request, handler: Callable) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        if request.path != "/health":  # readiness polling would drown the log
            elapsed = time.perf_counter() - started
            log.info("%s %s %d %.3fs %s", request.method, request.path, status, elapsed, request.get("log_extra", ""))


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="CPU inference server speaking sglang /generate and vLLM completions")
    parser.add_argument("--model", required=True, help="Hugging Face model folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get(THREADS_ENV, "0")),
        help=f"torch threads (default: ${THREADS_ENV}, else all cores)",
    )
    parser.add_argument("--served-model-name", default=None, help="model name for /v1 (default: folder name)")
    parser.add_argument("--prefix-cache-size", type=int, default=4, help="KV caches kept for prefix reuse (0: off)")
    parser.add_argument("--fail-first-n", type=int, default=0, help="test only: answer 500 to the first N requests")
    parser.add_argument("--delay-s", type=float, default=0.0, help="test only: sleep before each generation request")
    parser.add_argument("--log-level", default=os.environ.get("CPU_POLICY_LOG_LEVEL", "INFO"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    hf_logging.disable_progress_bar()  # one log line per event, no weight-loading bars
    threads = args.threads if args.threads > 0 else (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    started = time.perf_counter()
    engine = Engine(str(Path(args.model).resolve()), args.prefix_cache_size)
    engine.warm_up()
    worker = Worker(engine)
    worker.start()
    server = Server(engine, worker, args)
    app = server.app()

    async def stop_worker(_: web.Application) -> None:
        await asyncio.get_running_loop().run_in_executor(None, worker.stop)

    app.on_cleanup.append(stop_worker)
    log.info(
        "loaded %s in %.1fs (%d threads, context %d); serving on http://%s:%d",
        engine.model_dir,
        time.perf_counter() - started,
        threads,
        engine.max_context,
        args.host,
        args.port,
    )
    # run_app turns SIGINT / SIGTERM into a graceful shutdown: in-flight requests abort, the worker joins.
    # handler_cancellation: a client that disconnects stops its generation at the next token.
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        shutdown_timeout=5.0,
        handler_cancellation=True,
    )
    log.info("stopped")


if __name__ == "__main__":
    main()
