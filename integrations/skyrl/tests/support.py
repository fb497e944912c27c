"""Shared pieces of the SkyRL integration tests: SkyRL's own generator over the tau2 environment, driven by
inference clients that speak SkyRL's `InferenceEngineInterface` (a scripted policy, or the CPU policy server).

Import `skip_reason()` first: everything else needs SkyRL's generator, which imports on Python 3.12 only.
"""

from __future__ import annotations

import asyncio
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]


def skip_reason() -> str | None:
    """Why SkyRL's generator cannot run here (None: it can)."""
    if sys.version_info[:2] != (3, 12):
        return (
            f"SkyRL's generator needs Python 3.12, this is {sys.version.split()[0]}: "
            "run bash integrations/skyrl/run_tests.sh (it builds integrations/skyrl/.venv)"
        )
    try:
        import skyrl_gym  # noqa: F401
        from skyrl.train.generators.skyrl_gym_generator import SkyRLGymGenerator  # noqa: F401
    except Exception as err:  # ImportError, or skyrl's own import-time errors
        return f"SkyRL is not importable ({type(err).__name__}: {err}): run bash integrations/skyrl/install.sh"
    return None


def gold_texts(task: Any, solo_mode: bool = False) -> list[str]:
    from tests.engine_helpers import gold_script_texts

    return gold_script_texts(task, solo_mode)


def turn_index_of(prompt_text: str, solo_mode: bool = False) -> int:
    from tests.engine_helpers import agent_turn_index

    return agent_turn_index(prompt_text, solo_mode)


def _interface() -> type:
    from skyrl.backends.skyrl_train.inference_servers.base import InferenceEngineInterface

    return InferenceEngineInterface


class _Unused:
    """The control-plane methods of SkyRL's interface that a generator never calls."""

    model_name = "policy"

    def get_endpoint_url(self) -> str:
        raise NotImplementedError

    async def chat_completion(self, request_payload: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    async def render_chat_completion(self, request_payload: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    async def completion(self, request_payload: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    async def wake_up(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError

    async def sleep(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError

    async def init_weight_update_communicator(self, init_info: Any) -> None:
        raise NotImplementedError

    async def update_named_weights(self, request: Any) -> None:
        raise NotImplementedError

    async def teardown(self) -> None:
        raise NotImplementedError

    async def reset_prefix_cache(self, reset_running_requests: bool = False) -> None:
        raise NotImplementedError

    async def pause_generation(self) -> None:
        raise NotImplementedError

    async def resume_generation(self) -> None:
        raise NotImplementedError

    async def get_world_size(self) -> tuple[int, int]:
        return 1, 1


def scripted_client(
    tokenizer: Any, respond: Callable[[str, int], str], gather: int = 0, solo_mode: bool = False
) -> Any:
    """An InferenceEngineInterface whose policy plays `respond(session_id, turn_index) -> text`.

    Like SkyRL's RemoteInferenceClient: response ids end with the stop token the policy samples (the tokenizer's
    eos, <|im_end|>), `responses` is `tokenizer.batch_decode` of them (special tokens kept), one log-prob per id.
    Every sampled turn is recorded per session (`sampled[session_id]`: (ids, logprobs) per turn). With
    `gather=N`, each session's first request waits until N sessions are inside `generate` at the same time: if
    the generator served episodes one after another, that never happens and the test fails at its deadline."""

    class ScriptedInferenceClient(_Unused, _interface()):
        def __init__(self) -> None:
            self.sampled: dict[str, list[tuple[list[int], list[float]]]] = defaultdict(list)
            self.finished: list[str] = []
            self.waiting = 0
            self.max_waiting = 0
            self._all_in: asyncio.Event | None = None

        async def _gather(self, session: str) -> None:
            if gather <= 0 or self.sampled[session]:
                return
            if self._all_in is None:
                self._all_in = asyncio.Event()
            self.waiting += 1
            self.max_waiting = max(self.max_waiting, self.waiting)
            if self.waiting >= gather:
                self._all_in.set()
            await self._all_in.wait()

        async def generate(self, input_batch: dict[str, Any], model: str | None = None) -> dict[str, Any]:
            sessions = input_batch.get("session_ids") or [None] * len(input_batch["prompt_token_ids"])
            responses, ids_out, logprobs_out = [], [], []
            for prompt_ids, session in zip(input_batch["prompt_token_ids"], sessions, strict=True):
                session = str(session)
                await self._gather(session)
                turn = turn_index_of(tokenizer.decode(prompt_ids), solo_mode)
                text = respond(session, turn)
                ids = [*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
                count = len(self.sampled[session])
                logprobs = [-0.01 * (1 + (count * 31 + k) % 97) for k in range(len(ids))]  # distinct, traceable
                self.sampled[session].append((ids, logprobs))
                responses.append(tokenizer.batch_decode([ids])[0])
                ids_out.append(ids)
                logprobs_out.append(logprobs)
            return {
                "responses": responses,
                "response_ids": ids_out,
                "stop_reasons": ["stop"] * len(ids_out),
                "response_logprobs": logprobs_out,
            }

        async def finish_session(self, session_id: str) -> None:
            self.finished.append(str(session_id))

    return ScriptedInferenceClient()


def policy_server_client(tokenizer: Any, url: str, model: str) -> Any:
    """An InferenceEngineInterface over a real inference server's token-in-token-out `/v1/completions` (vLLM's wire,
    served here by scripts/cpu_policy_server.py): the sampled ids verbatim, with their log-probs."""
    from rollout.clients.policy import build_policy_client

    class PolicyServerInferenceClient(_Unused, _interface()):
        def __init__(self) -> None:
            self.policy = build_policy_client(url, api="openai", model=model)
            self.sampled: dict[str, list[tuple[list[int], list[float]]]] = defaultdict(list)

        async def generate(self, input_batch: dict[str, Any], model: str | None = None) -> dict[str, Any]:
            params = dict(input_batch.get("sampling_params") or {})
            sessions = input_batch.get("session_ids") or [None] * len(input_batch["prompt_token_ids"])
            outs = []
            for prompt_ids, session in zip(input_batch["prompt_token_ids"], sessions, strict=True):
                out = await self.policy.generate(list(prompt_ids), params)
                self.sampled[str(session)].append((list(out.token_ids), list(out.logprobs)))
                outs.append(out)
            return {
                "responses": tokenizer.batch_decode([out.token_ids for out in outs]),
                "response_ids": [list(out.token_ids) for out in outs],
                "stop_reasons": [out.finish_reason for out in outs],
                "response_logprobs": [list(out.logprobs) for out in outs],
            }

        async def finish_session(self, session_id: str) -> None:
            """Nothing to release."""

        async def aclose(self) -> None:
            await self.policy.aclose()

    return PolicyServerInferenceClient()


def make_generator(
    tokenizer: Any,
    client: Any,
    tools: list[dict[str, Any]],
    env_configs: dict[str, dict[str, Any]] | None = None,
    max_env_workers: int = 8,
    max_turns: int = 60,
    max_input_length: int = 60000,
    max_generate_length: int = 512,
) -> Any:
    """SkyRL's SkyRLGymGenerator, configured as integrations/skyrl/tau2_telecom.yaml configures it."""
    from skyrl.train.config import GeneratorConfig, SkyRLGymConfig
    from skyrl.train.config.config import SamplingParams
    from skyrl.train.generators.skyrl_gym_generator import SkyRLGymGenerator

    from integrations.skyrl.env import register_tau2_envs

    register_tau2_envs()
    generator_cfg = GeneratorConfig(
        max_turns=max_turns,
        max_input_length=max_input_length,
        batched=False,
        use_conversation_multi_turn=True,
        chat_template_kwargs={"tools": tools},
        sampling_params=SamplingParams(max_generate_length=max_generate_length, temperature=1.0, logprobs=1),
    )
    gym_cfg = SkyRLGymConfig(max_env_workers=max_env_workers)
    for env_class, env_config in (env_configs or {}).items():
        setattr(gym_cfg, env_class, env_config)
    return SkyRLGymGenerator(generator_cfg, gym_cfg, client, tokenizer)


def trajectory_id(task_id: str, repetition: int = 0) -> Any:
    from skyrl.train.generators.base import TrajectoryID

    return TrajectoryID(instance_id=task_id, repetition_id=repetition)


def session_of(task_id: str, repetition: int = 0) -> str:
    """The session id SkyRL's agent_loop derives from a trajectory id."""
    return f"{task_id}_{repetition}"


class GatheringUserServer:
    """An OpenAI-compatible `/v1/chat/completions` server (the wire of an LLM user simulator) that answers no request
    until `gather` requests are open at the same time, then answers every request: the customer's reason for
    calling to the greeting, "###STOP###" after that. If the engine played episodes one after another, the first
    request would wait alone and the test fails at its deadline. Runs on 127.0.0.1 in a thread of its own."""

    OPENING = "Hi! My phone shows no service since this morning. My number is 555-123-2002."

    def __init__(self, gather: int) -> None:
        self.gather = gather
        self.open_requests = 0
        self.max_open = 0
        self.requests = 0
        self.base_url = ""
        self._released: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: Any = None

    async def _chat(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.json()
        self.requests += 1
        self.open_requests += 1
        self.max_open = max(self.max_open, self.open_requests)
        assert self._released is not None
        if self.open_requests >= self.gather:
            self._released.set()
        await self._released.wait()
        self.open_requests -= 1
        turns = [m for m in body["messages"] if m["role"] != "system"]
        content = self.OPENING if len(turns) <= 1 else "###STOP###"
        return web.json_response(
            {
                "id": f"chat-{self.requests}",
                "object": "chat.completion",
                "model": body.get("model", "user"),
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1},
            }
        )

    def __enter__(self) -> GatheringUserServer:
        import threading

        from aiohttp import web

        started = threading.Event()

        async def serve() -> None:
            self._released = asyncio.Event()
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self._chat)
            self._runner = web.AppRunner(app)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # aiohttp exposes the bound port only here
            self.base_url = f"http://127.0.0.1:{port}/v1"
            started.set()

        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="gathering-user", daemon=True).start()
        asyncio.run_coroutine_threadsafe(serve(), self._loop).result(timeout=30)
        started.wait(timeout=30)
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
