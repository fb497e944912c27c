"""How close the rollout harness comes to the limit set by the LLMs, side by side with tau2's gym wrapper.

    python bench/rollout_harness.py [--quick] [--out docs/benchmarks.md] [--json results.json]

An episode of T policy turns cannot finish faster than the LLM waits it contains: T policy calls of latency Lp and
U user-simulator calls of latency Lu (floor = T*Lp + U*Lu), so C concurrent episodes give at most C / floor episodes
per second. Both endpoints run in another process (bench/doubles.py) and answer after a fixed delay: the policy speaks
sglang's /generate with real tokenizer ids, the user OpenAI chat. Episodes are real telecom tasks played by the
recipe's engine (rollout.engine.run_episode with a TokenAgent and the LLM user simulator), judged by tau2's evaluator.

Sections (each measured once per run):
1. harness overhead per turn and per episode (zero endpoint delay; the endpoints' own service time subtracted);
2. throughput at C concurrent episodes as a fraction of the bound, with the event loop's lag;
3. the prior approach: tau2's AgentGymEnv with blocking reset()/step() called from coroutines, same tasks and delays;
4. per-turn token bookkeeping (incremental glue) versus re-tokenizing the whole conversation every turn;
5. memory per concurrent episode;
6. eval/evaluate_tau2.py at high concurrency versus one episode at a time;
7. where an episode's CPU time goes (the parts that dominate at high concurrency);
8. a floor under the CPU target: what tau2's own work and the HTTP requests of 30 turns cost on their own.

The gym section runs first: the engine installs a faster environment constructor in tau2's registry, and the prior
approach must run against tau2 as shipped. The output file's hand-written part (from "## Findings and fixes" on) is
kept when the script rewrites it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import datetime
import gc
import heapq
import io
import itertools
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from bench.doubles import DoublesHandle, Script, ToolCallSpec, UserTurn, start_doubles, user_calls_per_episode

ROOT = Path(__file__).resolve().parents[1]

USER_MODEL = "user-sim"
KEEP_HEADING = "## Findings and fixes"  # from this heading on, the output file is hand-written and kept
TARGETS = {
    "concurrency": 512,  # slime's default in-flight requests per engine
    "fraction": 0.95,
    "cpu_ms_per_30_turns": 8.0,
    "turn_growth": 1.2,
    "mb_per_episode": 0.5,
    "repaired_gym_ratio": 5.0,
}


class Latency(BaseModel):
    """The endpoint doubles' latency model (bench/doubles.py): per request, a lognormal whose median is base + a per
    prompt token + b per output token; at most `*_slots` requests served at once per server, the rest queue."""

    policy_base_s: float = 0.15
    policy_s_per_prompt_token: float = 2e-5  # prefill of a cached prefix plus the new tokens, averaged
    policy_s_per_output_token: float = 0.012  # decode at a large batch
    user_base_s: float = 0.25
    user_s_per_prompt_token: float = 1e-5
    user_s_per_output_token: float = 0.015
    sigma: float = 0.4
    policy_slots: int = 256
    user_slots: int = 128

    def double_config(self, scale: float, seed: int) -> dict[str, Any]:
        """DoubleConfig fields with every time multiplied by `scale` (0: the doubles answer at once)."""
        return {
            "policy_delay_s": scale * self.policy_base_s,
            "policy_s_per_prompt_token": scale * self.policy_s_per_prompt_token,
            "policy_s_per_output_token": scale * self.policy_s_per_output_token,
            "user_delay_s": scale * self.user_base_s,
            "user_s_per_prompt_token": scale * self.user_s_per_prompt_token,
            "user_s_per_output_token": scale * self.user_s_per_output_token,
            "sigma": self.sigma,
            "policy_slots": self.policy_slots,
            "user_slots": self.user_slots,
            "seed": seed,
        }


class Settings(BaseModel):
    """What one run measures. Episodes follow gold-like scripts of `min_turns`..`max_turns` policy turns."""

    min_turns: int = 20
    max_turns: int = 50
    latency: Latency = Latency()
    seed: int = 0
    tasks: int = 20  # first N tasks of the telecom train split, cycled
    concurrency: list[int] = [1, 64, 512]
    overhead_episodes: int = 10
    gym_concurrency: int = 64
    gym_complete_episodes: int = 2  # played to the end, two at a time: per-call costs and a measured throughput
    gym_window_s: float = 0.0  # the as-shipped gym at gym_concurrency runs this long (0: skip)
    gym_repaired_concurrency: list[int] = [1, 64, 512]  # the repaired gym, played to the end at each C
    token_turns: int = 50
    token_repeats: int = 5
    eval_tasks: int = 40
    eval_trials: int = 4
    eval_concurrency: int = 160
    eval_turns: int = 4
    eval_delay_s: float = 0.05
    stress_scale: float | None = 0.25  # one more wave at the largest C with latencies scaled by this
    memory_wave: bool = True  # the largest C again under tracemalloc (memory per episode)
    threads_compare: int = 0  # one more wave at the largest C with CPU work in this many threads (0: skip)
    breakdown_repeats: int = 20
    floor_episodes: int = 5  # played one at a time (zero delay); tau2's work per 30 turns is read from them
    floor_requests: int = 2000  # policy requests timed per HTTP client
    floor_concurrency: int = 64
    floor_user_turns: int = 10  # the user request priced: its state after this many turns (about mid-episode)


QUICK = Settings(
    min_turns=4,
    max_turns=6,
    latency=Latency(
        policy_base_s=0.02,
        policy_s_per_prompt_token=0.0,
        policy_s_per_output_token=0.0,
        user_base_s=0.02,
        user_s_per_prompt_token=0.0,
        user_s_per_output_token=0.0,
        sigma=0.3,
        policy_slots=2,
        user_slots=2,
    ),
    tasks=2,
    concurrency=[1, 4],
    overhead_episodes=3,
    gym_concurrency=2,
    gym_complete_episodes=2,
    gym_window_s=0.0,
    gym_repaired_concurrency=[2],
    token_turns=10,
    token_repeats=2,
    eval_tasks=2,
    eval_trials=2,
    eval_concurrency=4,
    eval_turns=2,
    eval_delay_s=0.01,
    stress_scale=None,
    memory_wave=True,
    threads_compare=0,
    breakdown_repeats=3,
    floor_episodes=2,
    floor_requests=40,
    floor_concurrency=4,
)


# ---------------------------------------------------------------------------------------------------- scripts

FILLER_CHECKS = (
    "check_status_bar",
    "check_network_status",
    "check_sim_status",
    "check_network_mode_preference",
    "check_data_restriction_status",
    "check_apn_settings",
    "check_vpn_status",
)


def build_scripts(tasks: list[Any], min_turns: int, max_turns: int, seed: int) -> list[Script]:
    """One gold-like script per task: read-only look-ups and device checks (the user calls one of its device tools,
    as tau2's user simulator does), then the task's gold actions in order (agent actions as the policy's tool calls,
    user actions as the user's device tool calls after the agent asks), then a closing question the user answers
    with ###STOP###. The number of policy turns is drawn per task from [min_turns, max_turns] (at least the gold
    actions and the closing)."""
    scripts = []
    for task in tasks:
        found = re.search(r"\d{3}-\d{3}-\d{4}", str(task.user_scenario))
        phone = found.group(0) if found else "555-123-2002"
        lookup = ToolCallSpec(name="get_customer_by_phone", arguments={"phone_number": phone})
        core_policy: list[ToolCallSpec | str] = []
        core_user: list[UserTurn] = []
        for action in task.evaluation_criteria.actions or []:
            if action.name == "transfer_to_human_agents":  # it ends the conversation: not a step to replay
                continue
            call = ToolCallSpec(name=action.name, arguments=dict(action.arguments or {}))
            if action.requestor == "user":
                core_policy.append(f"Please use {action.name.replace('_', ' ')} on your phone, then tell me.")
                core_user.append(UserTurn(device=call, text=f"Done, I did {action.name.replace('_', ' ')}."))
            else:
                core_policy.append(call)
        turns = random.Random(f"{seed}/{task.id}").randint(min_turns, max_turns)
        policy: list[ToolCallSpec | str] = []
        user = [UserTurn(text=f"Hi, my phone has no mobile data. My number is {phone}.")]
        for i in range(max(0, turns - len(core_policy) - 1)):
            if i % 2 == 0:
                policy.append(lookup)
            else:
                check = FILLER_CHECKS[(i // 2) % len(FILLER_CHECKS)]
                policy.append(f"Could you run {check.replace('_', ' ')} on your phone and tell me what it shows?")
                user.append(UserTurn(device=ToolCallSpec(name=check), text="I checked it; it shows what it showed."))
        policy += [*core_policy, "Is there anything else I can help you with?"]
        user += [*core_user, UserTurn(text="No, that is everything.")]
        scripts.append(Script(policy=policy, user=user))
    return scripts


# --------------------------------------------------------------------------------------------------- measuring


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def cpu_s_of(pid: int) -> float:
    """User + system CPU seconds of a process (the endpoint doubles)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


class LoopMonitor:
    """How late the loop wakes a sleeper (what every coroutine waits extra), and the peak RSS meanwhile. Its own
    cost is counted in the waves' CPU: ~40 ms per second of wall time at a 5 ms period, ~10 at 20 ms."""

    def __init__(self, period_s: float = 0.005) -> None:
        self.period_s = period_s
        self.lags: list[float] = []
        self.peak_rss_mb = 0.0
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        ticks = 0
        while not self._stop.is_set():
            started = time.perf_counter()
            await asyncio.sleep(self.period_s)
            self.lags.append(time.perf_counter() - started - self.period_s)
            ticks += 1
            if ticks % 10 == 0:
                self.peak_rss_mb = max(self.peak_rss_mb, rss_mb())

    async def __aenter__(self) -> LoopMonitor:
        self.peak_rss_mb = rss_mb()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        self.peak_rss_mb = max(self.peak_rss_mb, rss_mb())

    def summary(self) -> dict[str, float]:
        return {"lag_p99_ms": 1000 * pct(self.lags, 99), "lag_max_ms": 1000 * max(self.lags, default=0.0)}


class Bench:
    """What every section shares: the tokenizer, the endpoint doubles, the tasks."""

    def __init__(self, settings: Settings, doubles: DoublesHandle, tokenizer: Any, tokenizer_dir: Path) -> None:
        from rollout.task_store import get_task_store

        self.settings = settings
        self.doubles = doubles
        self.tokenizer = tokenizer
        self.tokenizer_dir = tokenizer_dir
        self.tasks = get_task_store().tasks("telecom", "train")[: settings.tasks]

        self.scripts = build_scripts(self.tasks, settings.min_turns, settings.max_turns, settings.seed)
        doubles.set_scripts(self.scripts)

    def configure(self, scale: float = 1.0) -> None:
        """The doubles' latency model with its times scaled (0: zero latency), counters and records cleared."""
        self.doubles.configure(**self.settings.latency.double_config(scale, self.settings.seed))
        self.doubles.reset()

    def configure_fixed(self, delay_s: float, turns: int) -> None:
        """Unscripted episodes (as the evaluator plays them): fixed delays, the user stops after `turns`."""
        fields = Latency(policy_slots=0, user_slots=0, sigma=0.0).double_config(0.0, 0)
        fields.update(policy_delay_s=delay_s, user_delay_s=delay_s, user_stop_after=user_calls_per_episode(turns, True))
        self.doubles.configure(**fields)
        self.doubles.reset()

    def policy_turns(self, task_index: int) -> int:
        return len(self.scripts[task_index % len(self.scripts)].policy)


EPISODE: contextvars.ContextVar[str] = contextvars.ContextVar("bench_episode", default="")


def simulate_bound(records: list[tuple[str, str, float, float, float, float]], config: Latency) -> dict[str, float]:
    """The wall time of the same episodes with a harness that costs nothing: each episode's requests in order, each
    sent the moment the previous one is answered, served for their drawn times by servers with the same slots (first
    come, first served). Also the longest episode alone (no queueing): the floor."""
    chains: dict[str, list[tuple[str, float]]] = {}
    for kind, episode, _t_in, _start, _out, service in sorted(records, key=lambda r: r[2]):
        chains.setdefault(episode, []).append((kind, service))
    slots = {"policy": config.policy_slots, "user": config.user_slots}
    busy = {"policy": 0, "user": 0}
    queues: dict[str, list[tuple[str, int]]] = {"policy": [], "user": []}
    events: list[tuple[float, int, str, str, int]] = []  # (time, order, what, episode, request index)
    order = itertools.count()
    for episode in chains:
        heapq.heappush(events, (0.0, next(order), "arrive", episode, 0))
    wall = 0.0
    while events:
        now, _, what, episode, j = heapq.heappop(events)
        kind, service = chains[episode][j]
        if what == "arrive":
            if slots[kind] and busy[kind] >= slots[kind]:
                queues[kind].append((episode, j))
                continue
            busy[kind] += 1
            heapq.heappush(events, (now + service, next(order), "done", episode, j))
            continue
        wall = max(wall, now)
        busy[kind] -= 1
        if queues[kind]:
            waiting, k = queues[kind].pop(0)
            busy[kind] += 1
            heapq.heappush(events, (now + chains[waiting][k][1], next(order), "done", waiting, k))
        if j + 1 < len(chains[episode]):
            heapq.heappush(events, (now, next(order), "arrive", episode, j + 1))
    floor = max((sum(service for _, service in chain) for chain in chains.values()), default=0.0)
    return {"bound_wall_s": wall, "floor_s": floor}


# ------------------------------------------------------------------------------------------------ our episodes


class Played(BaseModel):
    """One episode as the harness saw it (monotonic clock, comparable with the doubles' records)."""

    model_config = {"arbitrary_types_allowed": True}

    started: float
    ended: float
    setup_s: float
    task_index: int
    result: Any

    @property
    def user_calls(self) -> int:
        """The user's device tool calls."""
        return sum(len(m.get("tool_calls") or []) for m in self.result.messages if m.get("role") == "user")


class TimedPolicy:
    """The policy client, with each request's client-side start and end recorded (what the engine waits for)."""

    def __init__(self, inner: Any, calls: list[tuple[str, float, float]]) -> None:
        self.inner, self.calls = inner, calls
        self.takes_json_ids = getattr(inner, "takes_json_ids", False)

    async def generate(self, input_ids: list[int], sampling_params: dict[str, Any]) -> Any:
        started = time.monotonic()
        episode = EPISODE.get()
        if episode:  # which script the policy double plays
            sampling_params = {**sampling_params, "bench_episode": episode}
        request = self.inner.generate(input_ids, sampling_params)
        del input_ids  # as the engine: while the request is in flight only the client's body holds the ids
        try:
            return await request
        finally:
            self.calls.append(("policy", started, time.monotonic()))

    async def aclose(self) -> None:
        await self.inner.aclose()


class TimedChat:
    """The user simulator's chat client, timed like TimedPolicy."""

    def __init__(self, inner: Any, calls: list[tuple[str, float, float]]) -> None:
        self.inner, self.calls = inner, calls

    async def complete(self, messages: list[dict[str, Any]], tools: Any = None, tool_choice: Any = None, **kw: Any):
        started = time.monotonic()
        episode = EPISODE.get()
        if episode:  # OpenAI's `user` field tells the user double which script it plays
            kw["user"] = episode
        try:
            return await self.inner.complete(messages, tools=tools, tool_choice=tool_choice, **kw)
        finally:
            self.calls.append(("user", started, time.monotonic()))

    async def aclose(self) -> None:
        await self.inner.aclose()


class Ours:
    """The recipe's way, as the evaluator plays it: shared policy and user clients, TokenAgent + LLMUser per episode."""

    def __init__(self, bench: Bench) -> None:
        from rollout.clients.policy import build_policy_client
        from rollout.engine import EpisodeConfig
        from rollout.user_sim import UserSimConfig, get_user_client

        self.bench = bench
        self.calls: list[tuple[str, float, float]] = []
        self.policy = TimedPolicy(build_policy_client(bench.doubles.policy_url, api="sglang"), self.calls)
        self.user_config = UserSimConfig(kind="llm", model=USER_MODEL, base_url=bench.doubles.user_base_url)
        # The cache build_user takes LLM users' chat clients from, holding the timed one.
        self.clients: dict[Any, Any] = {}
        self.clients[self.user_config.client_key()] = TimedChat(get_user_client(self.user_config, {}), self.calls)
        most = max(bench.policy_turns(i) for i in range(len(bench.tasks)))
        self.config = EpisodeConfig(domain="telecom", max_turns=most + 2)  # the user ends it after its script
        self.played = 0

    async def play(self, task_index: int) -> Played:
        from rollout.engine import TokenAgent
        from rollout.episode import Episode

        task_index %= len(self.bench.tasks)
        EPISODE.set(f"{self.played}/{task_index}")
        self.played += 1
        started = time.monotonic()
        task = self.bench.tasks[task_index].model_copy(deep=True)  # the store's tasks are shared (as the evaluator)

        def make_agent(view: Any) -> TokenAgent:
            return TokenAgent(self.policy, self.bench.tokenizer, view, {"temperature": 1.0}, max_response_tokens=65536)

        episode = await Episode.start(task, self.config, make_agent, self.user_config, self.clients)
        setup_s = time.monotonic() - started
        result = await episode.play()
        return Played(started=started, ended=time.monotonic(), setup_s=setup_s, task_index=task_index, result=result)

    async def aclose(self) -> None:
        from rollout.user_sim import close_user_clients

        await self.policy.aclose()
        await close_user_clients(self.clients)


def check_played(bench: Bench, played: list[Played]) -> int:
    """Episodes that did not go as scripted (failed, or not ended by the user after its script's policy turns)."""
    return sum(
        1
        for p in played
        if p.result.termination_reason != "user_stop" or p.result.turns != bench.policy_turns(p.task_index)
    )


async def ours_wave(bench: Bench, concurrency: int, scale: float = 1.0, trace_memory: bool = False) -> dict[str, Any]:
    """C episodes started together (a rollout batch), the loop watched, CPU and memory counted; the bound is the same
    episodes' wall time with a harness that costs nothing (simulate_bound, from the doubles' records). With
    `trace_memory`, tracemalloc's peak of Python allocations during the wave (slower: for memory only)."""
    ours = Ours(bench)
    bench.configure(0.0)
    await ours.play(0)  # warm: connections, per-process caches
    bench.configure(scale)
    gc.collect()
    rss_before = rss_mb()
    if trace_memory:
        tracemalloc.start()
        traced_before = tracemalloc.get_traced_memory()[0]
    cpu0, doubles_cpu0 = time.process_time(), cpu_s_of(bench.doubles.pid)
    started = time.monotonic()
    async with LoopMonitor(period_s=0.02) as monitor:  # 20 ms: a quarter of a 5 ms monitor's CPU on the waves
        played = await asyncio.gather(*(ours.play(i) for i in range(concurrency)))
    wall = time.monotonic() - started
    cpu, doubles_cpu = time.process_time() - cpu0, cpu_s_of(bench.doubles.pid) - doubles_cpu0
    traced_mb = None
    if trace_memory:
        traced_mb = (tracemalloc.get_traced_memory()[1] - traced_before) / 2**20
        tracemalloc.stop()
    await ours.aclose()
    records = bench.doubles.records()
    bound = simulate_bound(records, bench.settings.latency)
    turns = sum(p.result.turns for p in played)
    return {
        "concurrency": concurrency,
        "episodes": len(played),
        "unexpected": check_played(bench, played),
        "reward_mean": statistics.mean(float(p.result.reward or 0.0) for p in played),
        "turns_mean": turns / len(played),
        "user_requests_per_episode": sum(1 for r in records if r[0] == "user") / len(played),
        "user_tool_calls_per_episode": sum(p.user_calls for p in played) / len(played),
        "queue_wait_ms_mean": 1000 * statistics.mean(r[3] - r[2] for r in records),
        "wall_s": wall,
        "floor_s": bound["floor_s"],
        "bound_wall_s": bound["bound_wall_s"],
        "episodes_per_s": len(played) / wall,
        "bound_per_s": len(played) / bound["bound_wall_s"] if bound["bound_wall_s"] else float("inf"),
        "fraction": bound["bound_wall_s"] / wall if bound["bound_wall_s"] else 0.0,
        "cpu_ms_per_episode": 1000 * cpu / len(played),
        "cpu_ms_per_30_turns": 1000 * cpu / turns * 30,
        "doubles_cpu_ms_per_episode": 1000 * doubles_cpu / len(played),
        "rss_before_mb": rss_before,
        "rss_peak_mb": monitor.peak_rss_mb,
        "mb_per_episode": (monitor.peak_rss_mb - rss_before) / concurrency,
        "traced_mb_per_episode": traced_mb / concurrency if traced_mb is not None else None,
        **monitor.summary(),
    }


# ---------------------------------------------------------------------------------------------------- section 1


async def one_at_a_time(bench: Bench, episodes: int) -> tuple[list[Played], float, list[tuple[str, float, float]]]:
    """`episodes` episodes played one after another after a warm-up one (the doubles' records cleared after it):
    the episodes, this process's CPU seconds over them, and their requests (kind, start, end) in start order."""
    ours = Ours(bench)
    await ours.play(0)
    bench.doubles.reset()
    ours.calls.clear()
    cpu0 = time.process_time()
    played = [await ours.play(i) for i in range(episodes)]
    cpu = time.process_time() - cpu0
    await ours.aclose()
    return played, cpu, sorted(ours.calls, key=lambda c: c[1])


def first_prompt(view: Any) -> list[dict[str, Any]]:
    """A task's first policy prompt: its system prompt, tau2's opening and a first user message."""
    return [{"role": "system", "content": view.system_prompt}, *view.opening, {"role": "user", "content": "Hi."}]


def section_overhead(bench: Bench) -> dict[str, Any]:
    """Zero endpoint delay, one episode at a time. A turn runs from one policy request to the next (client side).
    'Harness' = the turn minus the service time of its requests as the doubles measured it on their side (so HTTP on
    both ends counts as harness); 'in-process' = the turn minus the waits the client saw (the engine's view)."""
    s = bench.settings
    bench.configure(0.0)

    played, cpu, calls = asyncio.run(one_at_a_time(bench, s.overhead_episodes))
    served = sorted(bench.doubles.records(), key=lambda r: r[2])
    if [c[0] for c in calls] != [r[0] for r in served]:
        raise RuntimeError(f"{len(calls)} requests sent but {len(served)} served, or in another order")
    # (kind, client start, client end, service time), one request after another.
    requests = [(kind, start, end, r[4] - r[2]) for (kind, start, end), r in zip(calls, served)]
    turns: dict[str, list[float]] = {"harness": [], "in_process": [], "tool": [], "talk": []}
    by_turn: dict[int, list[float]] = {}  # in-process time per turn, by the turn's number in its episode
    episodes: dict[str, list[float]] = {"harness": [], "in_process": []}
    for episode in played:
        mine = [r for r in requests if episode.started <= r[1] <= episode.ended]
        wall = episode.ended - episode.started
        episodes["harness"].append(wall - sum(r[3] for r in mine))
        episodes["in_process"].append(wall - sum(r[2] - r[1] for r in mine))
        starts = [r[1] for r in mine if r[0] == "policy"]
        for number, (a, b) in enumerate(itertools.pairwise(starts), start=1):
            inside = [r for r in mine if a <= r[1] < b]
            harness = b - a - sum(r[3] for r in inside)
            turns["harness"].append(harness)
            turns["in_process"].append(b - a - sum(r[2] - r[1] for r in inside))
            by_turn.setdefault(number, []).append(turns["in_process"][-1])
            turns["talk" if any(r[0] == "user" for r in inside) else "tool"].append(harness)

    def stats(values: list[float]) -> dict[str, float]:
        ms = [1000 * v for v in values]
        return {"median": statistics.median(ms) if ms else 0.0, "p99": pct(ms, 99), "n": len(ms)}

    transport = {kind: stats([r[2] - r[1] - r[3] for r in requests if r[0] == kind]) for kind in ("policy", "user")}
    buckets = []
    for low in range(1, max(by_turn, default=0) + 1, 10):
        values = [v for n in range(low, low + 10) for v in by_turn.get(n, [])]
        buckets.append({"turns": f"{low}-{low + 9}", **stats(values)})
    total_turns = sum(p.result.turns for p in played)
    return {
        "episodes": len(played),
        "unexpected": check_played(bench, played),
        "turns": total_turns / len(played),
        "by_turn_in_process_ms": buckets,
        "cpu_ms_per_30_turns": 1000 * cpu / total_turns * 30,
        "per_turn_ms": stats(turns["harness"]),
        "per_turn_in_process_ms": stats(turns["in_process"]),
        "per_tool_turn_ms": stats(turns["tool"]),
        "per_talk_turn_ms": stats(turns["talk"]),
        "http_ms": transport,
        "per_episode_ms": stats(episodes["harness"]),
        "per_episode_in_process_ms": stats(episodes["in_process"]),
        "setup_ms": 1000 * statistics.median(p.setup_s for p in played),
        "eval_ms": 1000 * statistics.median(p.result.eval_s for p in played),
        "cpu_ms_per_episode": 1000 * cpu / len(played),
    }


# ---------------------------------------------------------------------------------------------------- section 2


def section_throughput(
    bench: Bench,
) -> tuple[list[dict[str, Any]], dict[str, Any] | None, dict[str, Any] | None]:
    """One wave per concurrency, largest first (its RSS growth is measured from a heap not yet grown by others);
    then, optionally, the largest C again with short delays (the harness's own CPU sets the pace) and with CPU work
    in worker threads."""
    s = bench.settings
    rows = []
    for concurrency in sorted(set(s.concurrency), reverse=True):
        row = asyncio.run(ours_wave(bench, concurrency))
        row["load"] = load_line()
        rows.append(row)
        print(f"  C={concurrency}: {row['fraction']:.1%} of the bound, lag p99 {row['lag_p99_ms']:.1f} ms", flush=True)
    stress = None
    if s.stress_scale is not None:
        top = max(s.concurrency)
        stress = asyncio.run(ours_wave(bench, top, s.stress_scale))
        stress.update(load=load_line(), scale=s.stress_scale)
        print(f"  C={top}, latencies x {s.stress_scale:g}: {stress['episodes_per_s']:.1f} episodes/s", flush=True)
    threads = None
    if s.threads_compare > 0:
        from rollout.engine import set_cpu_workers

        top = max(s.concurrency)
        set_cpu_workers(s.threads_compare)
        try:
            threads = asyncio.run(ours_wave(bench, top))
        finally:
            set_cpu_workers(0)
        threads.update(load=load_line(), workers=s.threads_compare)
        print(f"  C={top}, CPU work in {s.threads_compare} threads: {threads['fraction']:.1%} of the bound", flush=True)
    return sorted(rows, key=lambda r: r["concurrency"]), stress, threads


# ---------------------------------------------------------------------------------------------------- section 5


def section_memory(bench: Bench, top: dict[str, Any]) -> dict[str, Any]:
    """The largest C again with tracemalloc: the peak of Python allocations during the wave per episode (what the
    episodes, their requests in flight and their results hold), beside the RSS growth of the timed wave (which a
    heap grown by earlier sections hides)."""
    out = {k: top[k] for k in ("concurrency", "rss_before_mb", "rss_peak_mb", "mb_per_episode")}
    out["traced_mb_per_episode"] = None
    if bench.settings.memory_wave:
        row = asyncio.run(ours_wave(bench, top["concurrency"], trace_memory=True))
        out["traced_mb_per_episode"] = row["traced_mb_per_episode"]
        print(f"  C={top['concurrency']}, traced: {row['traced_mb_per_episode']:.3f} MB per episode", flush=True)
    return out


# ---------------------------------------------------------------------------------------------------- section 3


def gym_action(text: str) -> tuple[str, bool]:
    """The policy's text as an AgentGymEnv action: a tool call as tau2's JSON form, else the text to say."""
    from rollout.tool_format import parse_assistant_text

    parsed = parse_assistant_text(text, None, None)
    if parsed.tool_calls:
        call = parsed.tool_calls[0]  # the gym takes one tool call per step
        return json.dumps({"name": call.name, "arguments": call.arguments}), True
    return parsed.content or text, False


class GymCalls(BaseModel):
    resets: list[float] = []
    steps: list[float] = []  # every step() of every episode
    episode_steps: list[float] = []  # step() time summed per finished episode
    finished: int = 0
    rewards: list[float] = []


@contextlib.contextmanager
def cached_task_lookup() -> Iterator[None]:
    """tau2's AgentGymEnv with its task lookup cached: `_get_task` re-parses the domain's task file on every call
    (reset, and every step's `info`); here each (domain, task id) is loaded once. The repaired gym's first fix."""
    from tau2.gym.gym_agent import AgentGymEnv

    original = AgentGymEnv._get_task
    cache: dict[tuple[str, str], Any] = {}
    lock = threading.Lock()

    def cached(self: Any) -> Any:
        key = (self.domain, self.task_id)
        with lock:
            if key not in cache:
                cache[key] = original(self)
            return cache[key]

    AgentGymEnv._get_task = cached
    try:
        yield
    finally:
        AgentGymEnv._get_task = original


async def gym_episode(
    bench: Bench,
    task_index: int,
    episode: str,
    calls: GymCalls,
    policy: Any,
    deadline: float = math.inf,
    pool: ThreadPoolExecutor | None = None,
) -> None:
    """One episode driven the prior way: reset() and step() block the loop; only the policy call is awaited.
    With `pool` (the repaired gym), reset() and step() run in its threads and the loop awaits them.

    The agent's prompt is re-rendered with the chat template and re-tokenized from the start every turn. A blocking
    call cannot be interrupted, so a time window is kept by not starting a reset() or step() after `deadline`."""
    loop = asyncio.get_running_loop()

    async def call(fn: Any, *args: Any) -> Any:
        return fn(*args) if pool is None else await loop.run_in_executor(pool, fn, *args)

    from tau2.agent.llm_agent import AGENT_INSTRUCTION, SYSTEM_PROMPT
    from tau2.gym.gym_agent import AgentGymEnv
    from tau2.orchestrator.orchestrator import DEFAULT_FIRST_AGENT_MESSAGE

    env = AgentGymEnv(
        domain="telecom",
        task_id=bench.tasks[task_index].id,
        max_steps=400,
        user_llm=f"openai/{USER_MODEL}",
        # `user` names the episode for the user double (its script), as the engine's requests do; litellm drops a
        # top-level `user` for this provider, so it goes in the body as an extra field.
        user_llm_args={
            "api_base": bench.doubles.user_base_url,
            "api_key": "bench",
            "temperature": 0.0,
            "extra_body": {"user": episode},
        },
    )
    started = time.monotonic()
    if started > deadline:
        return
    observation, info = await call(env.reset)
    calls.resets.append(time.monotonic() - started)
    tools = [tool.openai_schema for tool in info["tools"]]
    system = SYSTEM_PROMPT.format(domain_policy=info["policy"], agent_instruction=AGENT_INSTRUCTION)
    messages = [
        {"role": "system", "content": system},
        {"role": "assistant", "content": DEFAULT_FIRST_AGENT_MESSAGE.content},
        {"role": "user", "content": observation},
    ]
    tok = bench.tokenizer
    stepped = 0.0
    params = {"temperature": 1.0, "max_new_tokens": 8192, "no_stop_trim": True, "bench_episode": episode}
    for _ in range(bench.policy_turns(task_index) + 2):
        text = tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False)
        out = await policy.generate(ids, params)
        reply = tok.decode(out.token_ids[:-1], skip_special_tokens=False)
        action, is_tool = gym_action(reply)
        messages.append({"role": "assistant", "content": reply})
        started = time.monotonic()
        if started > deadline:
            return
        observation, reward, terminated, _truncated, info = await call(env.step, action)
        calls.steps.append(time.monotonic() - started)
        stepped += calls.steps[-1]
        if terminated:
            calls.finished += 1
            calls.episode_steps.append(stepped)
            calls.rewards.append(float(reward))
            return
        messages.append({"role": "tool" if is_tool else "user", "content": observation})


async def gym_wave(
    bench: Bench, concurrency: int, episodes: int, window_s: float | None, repaired: bool = False
) -> dict[str, Any]:
    """`episodes` gym episodes, `concurrency` at a time. Repaired: reset()/step() in a pool of `concurrency` threads
    and tau2's task lookup cached (the strongest fair version of the approach); else tau2 as shipped, on the loop."""
    from rollout.clients.policy import build_policy_client

    policy = build_policy_client(bench.doubles.policy_url, api="sglang")
    calls = GymCalls()
    semaphore = asyncio.Semaphore(concurrency)
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="gym") if repaired else None

    started = time.monotonic()
    cpu0 = time.process_time()
    deadline = math.inf if window_s is None else started + window_s

    async def one(i: int) -> None:
        async with semaphore:
            task_index = i % len(bench.tasks)
            await gym_episode(bench, task_index, f"gym{i}/{task_index}", calls, policy, deadline, pool)

    # An episode left unfinished at the deadline leaves its orchestrator thread parked on an Event (daemon, idle).
    with cached_task_lookup() if repaired else contextlib.nullcontext():
        async with LoopMonitor(period_s=0.005) as monitor:
            await asyncio.gather(*(one(i) for i in range(episodes)))
    wall = time.monotonic() - started
    cpu = time.process_time() - cpu0
    await policy.aclose()
    if pool is not None:
        pool.shutdown(wait=False)
    blocked = sum(calls.resets) + sum(calls.steps)
    return {
        "repaired": repaired,
        "cpu_ms_per_episode": 1000 * cpu / max(1, calls.finished),
        "concurrency": concurrency,
        "episodes": episodes,
        "finished": calls.finished,
        "wall_s": wall,
        "blocked_fraction": blocked / wall,
        "reset_s": statistics.mean(calls.resets) if calls.resets else None,
        "resets": len(calls.resets),
        "step_s": statistics.mean(calls.steps) if calls.steps else None,
        "steps": len(calls.steps),
        "episode_steps_s": statistics.mean(calls.episode_steps) if calls.episode_steps else None,
        "episodes_per_s": calls.finished / wall,
        "reward_mean": statistics.mean(calls.rewards) if calls.rewards else None,
        "steps_per_episode": len(calls.steps) / max(1, calls.finished),
        **monitor.summary(),
    }


def section_gym(bench: Bench) -> dict[str, Any]:
    from rollout.tau2_setup import import_tau2

    registry = import_tau2()
    if getattr(registry.get_env_constructor("telecom"), "recipe_fast", False):
        raise RuntimeError("the gym must run against tau2 as shipped: run this section before any engine episode")
    s = bench.settings
    bench.configure()
    small = min(2, s.gym_concurrency)
    complete = asyncio.run(gym_wave(bench, small, s.gym_complete_episodes, None))
    print(f"  gym C={small}: {complete['episodes_per_s']:.3f} episodes/s", flush=True)
    out: dict[str, Any] = {"complete": complete, "window": None}
    if s.gym_window_s > 0 and s.gym_concurrency > small:
        bench.configure()
        out["window"] = asyncio.run(gym_wave(bench, s.gym_concurrency, s.gym_concurrency, s.gym_window_s))
        print(
            f"  gym C={s.gym_concurrency}: {out['window']['finished']} finished in {s.gym_window_s:.0f} s", flush=True
        )
    # Blocking calls serialize the episodes: one episode's blocking time bounds throughput at any concurrency.
    resets = [complete["reset_s"]] + ([out["window"]["reset_s"]] if out["window"] and out["window"]["reset_s"] else [])
    out["blocking_per_episode_s"] = statistics.mean(resets) + (complete["episode_steps_s"] or 0.0)
    out["bound_per_s"] = 1.0 / out["blocking_per_episode_s"]
    # The repaired gym, C episodes at once, every episode played to the end.
    out["repaired"] = []
    for concurrency in sorted(set(s.gym_repaired_concurrency)):
        bench.configure()
        row = asyncio.run(gym_wave(bench, concurrency, concurrency, None, repaired=True))
        row["load"] = load_line()
        out["repaired"].append(row)
        print(f"  repaired gym C={concurrency}: {row['episodes_per_s']:.3f} episodes/s", flush=True)
    return out


def compare_gym(bench: Bench, gym: dict[str, Any], throughput: list[dict[str, Any]]) -> dict[str, Any]:
    """Ours at the gym's concurrency (from section 2, else measured now) and at the small concurrency, same settings."""
    s = bench.settings
    by_c = {row["concurrency"]: row for row in throughput}
    rows = {}
    for concurrency in sorted({gym["complete"]["concurrency"], s.gym_concurrency}):
        if concurrency not in by_c:
            by_c[concurrency] = asyncio.run(ours_wave(bench, concurrency))
        rows[concurrency] = by_c[concurrency]["episodes_per_s"]
    small = gym["complete"]["concurrency"]
    theirs_at_c = gym["window"]["episodes_per_s"] if gym["window"] and gym["window"]["finished"] else None
    theirs = gym["bound_per_s"] if theirs_at_c is None else min(theirs_at_c, gym["bound_per_s"])
    repaired = []
    for row in gym["repaired"]:
        concurrency = row["concurrency"]
        if concurrency not in by_c:
            by_c[concurrency] = asyncio.run(ours_wave(bench, concurrency))
        ours = by_c[concurrency]
        repaired.append(
            {
                "concurrency": concurrency,
                "ours_per_s": ours["episodes_per_s"],
                "theirs_per_s": row["episodes_per_s"],
                "ratio": ours["episodes_per_s"] / row["episodes_per_s"] if row["episodes_per_s"] else math.inf,
                "ours_cpu_ms": ours["cpu_ms_per_episode"],
                "theirs_cpu_ms": row["cpu_ms_per_episode"],
                "finished": row["finished"],
                "episodes": row["episodes"],
            }
        )
    # Above the largest C the gym ran at: its CPU per episode caps it at (usable cores) / (CPU per episode).
    ceiling = None
    if gym["repaired"]:
        most = max(gym["repaired"], key=lambda r: r["concurrency"])
        top = max(by_c)
        if top > most["concurrency"] and most["cpu_ms_per_episode"]:
            cores = len(os.sched_getaffinity(0))
            cap = min(cores * 1000.0 / most["cpu_ms_per_episode"], by_c[top]["bound_per_s"])
            ceiling = {
                "concurrency": top,
                "ours_per_s": by_c[top]["episodes_per_s"],
                "theirs_cap_per_s": cap,
                "ratio": by_c[top]["episodes_per_s"] / cap,
            }
    return {
        "repaired": repaired,
        "repaired_ceiling": ceiling,
        "small_concurrency": small,
        "ours_small_per_s": rows[small],
        "theirs_small_per_s": gym["complete"]["episodes_per_s"],
        "ratio_small": rows[small] / gym["complete"]["episodes_per_s"],
        "concurrency": s.gym_concurrency,
        "ours_per_s": rows[s.gym_concurrency],
        "theirs_per_s": theirs,
        "ratio": rows[s.gym_concurrency] / theirs,
    }


# ---------------------------------------------------------------------------------------------------- section 4


def section_tokens(bench: Bench) -> dict[str, Any]:
    """Cost of preparing the next policy prompt at turn n: our glue (render only the new messages after a fixed
    anchor, encode them) versus rendering the whole conversation with the tools and encoding it all again."""
    from tau2.data_model.message import ToolCall

    from rollout.engine import EpisodeConfig, build_environment, task_view
    from rollout.token_record import ChatRenderer

    s = bench.settings
    task = bench.tasks[0]
    env = build_environment("telecom", task, False)
    view = task_view(task, env, EpisodeConfig())
    call = {"name": "get_customer_by_phone", "arguments": {"phone_number": "555-123-2002"}}
    tool_result = env.get_response(ToolCall(id="c", name=call["name"], arguments=call["arguments"])).content
    renderer = ChatRenderer(bench.tokenizer, view.tools)
    history = [
        {"role": "system", "content": view.system_prompt},
        *view.opening,
        {"role": "user", "content": "My phone shows no service."},
    ]

    def timed(fn: Any) -> float:
        samples = []
        for _ in range(s.token_repeats):
            started = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - started)
        return statistics.median(samples)

    rows = []
    for n in range(1, s.token_turns + 1):
        if n % 2:  # a tool-calling turn and its result
            assistant = {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"id": f"c{n}", "type": "function", "function": call}],
            }
            new = [{"role": "tool", "tool_call_id": f"c{n}", "content": tool_result}]
        else:  # a talking turn and the user's reply
            assistant = {"role": "assistant", "content": "Could you restart your phone?"}
            new = [{"role": "user", "content": "I restarted it. The status bar still shows no signal."}]
        history += [assistant, *new]

        def ours(new: list[dict[str, Any]] = new) -> None:
            renderer.encode(renderer.continuation_text(new, True))

        def full(history: list[dict[str, Any]] = history) -> None:
            bench.tokenizer.encode(
                bench.tokenizer.apply_chat_template(
                    history, tools=view.tools, tokenize=False, add_generation_prompt=True
                ),
                add_special_tokens=False,
            )

        rows.append({"turn": n, "ours_ms": 1000 * timed(ours), "full_ms": 1000 * timed(full)})
    total_ours = sum(r["ours_ms"] for r in rows)
    total_full = sum(r["full_ms"] for r in rows)
    return {
        "rows": rows,
        "episode_ours_ms": total_ours,
        "episode_full_ms": total_full,
        "episode_ratio": total_full / total_ours,
        "prompt_tokens_at_end": len(renderer.prompt_ids(history)),
    }


# ---------------------------------------------------------------------------------------------------- section 6


def section_eval(bench: Bench) -> dict[str, Any]:
    """eval/evaluate_tau2.py (its main(), in this process) against the doubles: high concurrency, then one at a
    time."""
    evaluator = ROOT / "eval" / "evaluate_tau2.py"
    if not evaluator.is_file():
        raise RuntimeError("eval/evaluate_tau2.py is missing")
    from eval.evaluate_tau2 import EpisodeLog
    from eval.evaluate_tau2 import main as evaluate_main

    s = bench.settings
    runs = []
    grouped = EpisodeLog.SYNC_EVERY_S
    # (concurrency, seconds between fsyncs of the episode log): grouped as shipped, then every record (before)
    plan = [(s.eval_concurrency, grouped), (s.eval_concurrency, 0.0), (1, grouped)]
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        for run_index, (concurrency, sync_every) in enumerate(plan):
            EpisodeLog.SYNC_EVERY_S = sync_every
            bench.configure_fixed(s.eval_delay_s, s.eval_turns)
            argv = [
                "--sglang-url", bench.doubles.policy_url,
                "--tokenizer", str(bench.tokenizer_dir),
                "--model-name", "bench-policy-double",
                "--user-kind", "llm",
                "--user-model", USER_MODEL,
                "--user-base-url", bench.doubles.user_base_url,
                "--domain", "telecom",
                "--task-split", "test",
                "--num-tasks", str(s.eval_tasks),
                "--num-trials", str(s.eval_trials),
                "--concurrency", str(concurrency),
                "--output-path", str(Path(tmp) / f"run{run_index}" / "results.json"),
                "--no-progress",
                "--overwrite",
            ]  # fmt: skip
            log = io.StringIO()
            started, cpu0 = time.monotonic(), time.process_time()
            try:
                with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                    code = evaluate_main(argv)
            finally:
                EpisodeLog.SYNC_EVERY_S = grouped
            wall, cpu = time.monotonic() - started, time.process_time() - cpu0
            if code != 0:
                raise RuntimeError(f"evaluate_tau2.py exited {code}: {log.getvalue()[-2000:]}")
            results = json.loads((Path(tmp) / f"run{run_index}" / "results.json").read_text())
            records = bench.doubles.records()
            episodes_wall = max(r[4] for r in records) - min(r[2] for r in records)
            statuses = [r["status"] for r in results["results"]]
            runs.append(
                {
                    "concurrency": concurrency,
                    "sync_every_s": sync_every,
                    "wall_s": wall,
                    "cpu_s": cpu,
                    "episodes_wall_s": episodes_wall,
                    "episodes": len(statuses),
                    "failed": statuses.count("failed"),
                }
            )
            print(f"  evaluator --concurrency {concurrency}, fsync every {sync_every:g} s: {wall:.1f} s", flush=True)
    high, every_record, one = runs
    floor = s.eval_turns * s.eval_delay_s + user_calls_per_episode(s.eval_turns, True) * s.eval_delay_s
    return {
        "runs": runs,
        "speedup": one["wall_s"] / high["wall_s"],
        "episodes_speedup": one["episodes_wall_s"] / high["episodes_wall_s"],
        "grouped_sync_gain": every_record["episodes_wall_s"] / high["episodes_wall_s"],
        "floor_s": floor,
    }


# ---------------------------------------------------------------------------------------------------- section 7


def section_breakdown(bench: Bench) -> list[dict[str, Any]]:
    """Median CPU of the per-episode pieces, each called alone (single thread, no contention)."""
    from tau2.data_model.message import AssistantMessage, ToolCall, UserMessage
    from tau2.data_model.simulation import SimulationRun, TerminationReason
    from tau2.evaluator.evaluator import EvaluationType, evaluate_simulation

    from rollout.engine import EpisodeConfig, build_environment, fast_env_constructor, task_view, user_tools_of
    from rollout.tau2_setup import import_tau2
    from rollout.token_record import ChatRenderer

    task = bench.tasks[0]
    config = EpisodeConfig()
    env = build_environment("telecom", task, False)
    view = task_view(task, env, config)
    constructor = fast_env_constructor("telecom")
    fresh = iter([constructor() for _ in range(bench.settings.breakdown_repeats + 1)])  # user tools are per env
    renderer = ChatRenderer(bench.tokenizer, view.tools)
    opening = first_prompt(view)
    call = ToolCall(id="c", name="get_customer_by_phone", arguments={"phone_number": "555-123-2002"})
    tool_result = env.get_response(call).content
    simulation = SimulationRun(
        id="bench",
        task_id=task.id,
        start_time="",
        end_time="",
        duration=1.0,
        termination_reason=TerminationReason.USER_STOP,
        messages=[
            AssistantMessage(role="assistant", content="Hi! How can I help you today?", turn_idx=0),
            UserMessage(role="user", content="###STOP###", turn_idx=1),
        ],
    )
    pieces = {
        "build_environment (engine, per episode)": lambda: build_environment("telecom", task, False),
        "  of which import_tau2() (re-quiets loguru)": import_tau2,
        "  of which user_tools_of() (tau2 builds 30 pydantic models)": lambda: user_tools_of(next(fresh)),
        "  of which the environment constructor": constructor,
        "first prompt: render + encode (~8k tokens)": lambda: renderer.prompt_ids(opening),
        "tau2 evaluate_simulation (2-message trajectory)": lambda: evaluate_simulation(
            simulation, task, EvaluationType.ALL, False, "telecom"
        ),
        "task deep copy": lambda: task.model_copy(deep=True),
        "per turn: glue for a tool result (render + encode)": lambda: renderer.encode(
            renderer.continuation_text([{"role": "tool", "tool_call_id": "c", "content": tool_result}], True)
        ),
        "per turn: glue for a user reply (render + encode)": lambda: renderer.encode(
            renderer.continuation_text([{"role": "user", "content": "The status bar still shows no signal."}], True)
        ),
        "per turn: the environment's tool call": lambda: env.get_response(call),
        "per turn: the user simulator's request at turn 40 (one message more)": user_request_at(bench, task, env, 40),
        "per turn: the policy request's body at 20k tokens (300 new)": policy_body_at(20000, 300),
    }
    rows = []
    for name, fn in pieces.items():
        fn()
        samples = []
        for _ in range(bench.settings.breakdown_repeats):
            started = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - started)
        rows.append({"piece": name, "ms": 1000 * statistics.median(samples)})
    return rows


def llm_user_at(bench: Bench, task: Any, env: Any, turns: int) -> Any:
    """An LLM user whose state holds `turns` turns (an agent question, a device check and its result, a reply),
    its request list built as each of its turns builds it."""
    from tau2.data_model.message import AssistantMessage, ToolCall, ToolMessage, UserMessage

    from rollout.engine import user_tools_of
    from rollout.user_sim import LLMUser

    user = LLMUser(task, user_tools_of(env), client=None)  # type: ignore[arg-type]
    for i in range(turns):
        call = ToolCall(id=f"u{i}", name="check_status_bar", arguments={}, requestor="user")
        user.state.messages += [
            AssistantMessage(role="assistant", content=f"Could you check your status bar? ({i})"),
            UserMessage(role="user", content=None, tool_calls=[call]),
            ToolMessage(id=f"u{i}", role="tool", content="Status bar: no signal, airplane mode off.", requestor="user"),
            UserMessage(role="user", content="It shows no signal."),
        ]
        user.request_messages()
    return user


def user_request_at(bench: Bench, task: Any, env: Any, turns: int) -> Any:
    """A function that adds one message to an LLM user's state at `turns` turns and builds its request, as each of
    its turns does."""
    from tau2.data_model.message import AssistantMessage

    user = llm_user_at(bench, task, env, turns)
    agent = AssistantMessage(role="assistant", content="Please toggle airplane mode.")

    def one() -> None:
        user.state.messages.append(agent)
        user.request_messages()

    return one


def policy_body_at(tokens: int, new: int) -> Any:
    """A function that grows a token record by `new` ids and builds the policy request's body, as each turn does."""
    import orjson

    from rollout import token_record
    from rollout.clients import policy

    record = token_record.TokenRecord(prompt_ids=list(range(1000, 1000 + tokens // 2)))
    record.add_glue(list(range(2000, 2000 + tokens // 2)))
    params = {"sampling_params": {"temperature": 1.0, "max_new_tokens": 1024}, "return_logprob": True}
    ids_json = token_record.IdsJson(record) if hasattr(token_record, "IdsJson") else None
    if ids_json is not None:
        ids_json()

    def one() -> None:
        record.add_glue(list(range(3000, 3000 + new)))
        if ids_json is not None:
            count = len(record.prompt_ids) + record.response_length
            policy._json_body("input_ids", policy.JsonIds(ids_json(), count), params)
        elif hasattr(record, "ids_json"):  # the same, kept on the record (an earlier layout)
            policy._json_body("input_ids", policy.JsonIds(record.ids_json(), record.response_length), params)
        else:
            orjson.dumps({"input_ids": record.all_ids, **params})

    return one


# ---------------------------------------------------------------------------------------------------- section 8


class MinimalHttp(asyncio.Protocol):
    """A price, not a client: keep-alive HTTP/1.1 POSTs answered with a Content-Length body; no retries, timeouts,
    TLS, chunked replies or redirects. What any Python client must spend on a request: one write, the reads, JSON.
    The recipe does not use it."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.reply: asyncio.Future[bytes] | None = None
        self.header_end = -1
        self.total = -1

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.total < 0:
            self.header_end = self.buffer.find(b"\r\n\r\n")
            if self.header_end < 0:
                return
            head = bytes(self.buffer[: self.header_end]).lower()
            if not head.startswith((b"http/1.1 200 ", b"http/1.0 200 ")):
                raise RuntimeError(f"MinimalHttp: {head.splitlines()[0]!r} from the policy double")
            length = re.search(rb"content-length:\s*(\d+)", head)
            if length is None:
                raise RuntimeError("MinimalHttp reads Content-Length replies only")
            self.total = self.header_end + 4 + int(length.group(1))
        if len(self.buffer) >= self.total and self.reply is not None:
            self.reply.set_result(bytes(self.buffer[self.header_end + 4 : self.total]))
            del self.buffer[: self.total]
            self.total, self.reply = -1, None

    async def post(self, head: bytes, body: bytes) -> bytes:
        self.reply = asyncio.get_running_loop().create_future()
        self.transport.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        return await self.reply


async def request_cpu_ms(bench: Bench, kind: str, payload: Any, minimal: bool) -> float:
    """CPU of this process per request (body built, sent, reply read and parsed), `floor_requests` requests
    `floor_concurrency` at a time, zero endpoint delay, through the recipe's client or MinimalHttp over as many
    connections. `kind` "policy": sglang's /generate, `payload` the prompt as the engine sends it (JsonIds: its JSON
    text encoded once); "user": the user simulator's chat request, `payload` its (messages, tools)."""
    import orjson

    from rollout.clients.policy import _json_body, build_policy_client
    from rollout.user_sim import UserSimConfig, get_user_client

    s = bench.settings
    sampling = {"temperature": 1.0, "max_new_tokens": 1024}
    if minimal:
        base = bench.doubles.policy_url if kind == "policy" else bench.doubles.user_base_url
        authority, _, prefix = base.split("//", 1)[1].partition("/")
        host, port = authority.rsplit(":", 1)
        path = "/generate" if kind == "policy" else f"/{prefix}/chat/completions"
        head = f"POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\n".encode()
        loop = asyncio.get_running_loop()
        free: asyncio.Queue[MinimalHttp] = asyncio.Queue()
        for _ in range(s.floor_concurrency):
            free.put_nowait((await loop.create_connection(MinimalHttp, host, int(port)))[1])

        if kind == "policy":

            def body() -> bytes:
                return _json_body("input_ids", payload, {"sampling_params": sampling, "return_logprob": True})

            def parse(data: Any) -> None:
                entries = data["meta_info"]["output_token_logprobs"]
                [int(e[1]) for e in entries], [float(e[0]) for e in entries]

        else:
            messages, tools = payload

            def body() -> bytes:
                request = {"model": USER_MODEL, "messages": messages, "tools": tools, "tool_choice": "auto"}
                return orjson.dumps(request)

            def parse(data: Any) -> None:
                data["choices"][0]["message"]["content"]

        async def one() -> None:
            conn = await free.get()
            parse(orjson.loads(await conn.post(head, body())))
            free.put_nowait(conn)

    else:
        gate = asyncio.Semaphore(s.floor_concurrency)
        if kind == "policy":
            client: Any = build_policy_client(bench.doubles.policy_url, api="sglang")

            async def send() -> Any:
                return await client.generate(payload, sampling)

        else:
            config = UserSimConfig(kind="llm", model=USER_MODEL, base_url=bench.doubles.user_base_url)
            client = get_user_client(config, {})
            messages, tools = payload

            async def send() -> Any:
                return await client.complete(messages, tools=tools, tool_choice="auto")

        async def one() -> None:
            async with gate:
                await send()

    await asyncio.gather(*(one() for _ in range(s.floor_concurrency)))  # warm: connections opened
    cpu0 = time.process_time()
    await asyncio.gather(*(one() for _ in range(s.floor_requests)))
    cpu = time.process_time() - cpu0
    if minimal:
        while not free.empty():
            free.get_nowait().transport.close()
    else:
        await client.aclose()
    return 1000 * cpu / s.floor_requests


def section_floor(bench: Bench) -> dict[str, Any]:
    """What 30 policy turns cost before any harness code runs: tau2's verdict and tool calls (timed on episodes
    played one at a time; the verdict re-run alone on each episode's trajectory) and the HTTP requests (per-request
    CPU of the recipe's clients and of MinimalHttp, policy and user requests each priced with their own body, times
    the requests of each kind the episodes made)."""
    import orjson
    from tau2.data_model.simulation import SimulationRun
    from tau2.evaluator.evaluator import EvaluationType, evaluate_simulation

    from rollout.clients.policy import JsonIds
    from rollout.engine import EpisodeConfig, build_environment, task_view
    from rollout.token_record import ChatRenderer

    s = bench.settings
    bench.configure(0.0)

    played, _, calls = asyncio.run(one_at_a_time(bench, s.floor_episodes))
    counts = {kind: sum(1 for call in calls if call[0] == kind) for kind in ("policy", "user")}
    turns = sum(p.result.turns for p in played)
    verdict_s = 0.0
    for p in played:
        r = p.result
        simulation = SimulationRun(
            id=r.simulation_id or "floor",
            task_id=r.task_id,
            start_time=r.start_time,
            end_time=r.end_time,
            duration=r.duration_s,
            termination_reason=r.tau2_termination_reason,
            messages=r.messages,
        )
        task = bench.tasks[p.task_index]
        samples = []
        for _ in range(3):
            cpu0 = time.process_time()
            info = evaluate_simulation(simulation, task, EvaluationType.ALL, False, "telecom")
            samples.append(time.process_time() - cpu0)
            if info.reward != r.reward:  # the verdict timed must be the episode's own
                raise RuntimeError(f"tau2's verdict re-run gave {info.reward}, the episode had {r.reward}")
        verdict_s += statistics.median(samples)
    view_task = bench.tasks[0]
    env = build_environment("telecom", view_task, False)
    view = task_view(view_task, env, EpisodeConfig())
    prompt_ids = list(ChatRenderer(bench.tokenizer, view.tools).prompt_ids(first_prompt(view)))
    # As the engine sends a prompt: its JSON text encoded once (IdsJson), joined into each body.
    policy_payload = JsonIds((b"[" + orjson.dumps(prompt_ids)[1:-1],), len(prompt_ids))
    user = llm_user_at(bench, view_task, env, s.floor_user_turns)
    user_payload = (user.request_messages(), user.tools)
    payloads = {"policy": policy_payload, "user": user_payload}
    per_30 = 30 / turns
    tau2_ms = 1000 * per_30 * (verdict_s + sum(p.result.env_s for p in played))

    def priced(run: Any) -> dict[str, Any]:
        """Per-request CPU of each kind and client under `run` (asyncio.run or uvloop.run), and the two floors."""
        ms = {
            f"{kind}_{client}_ms": run(request_cpu_ms(bench, kind, payloads[kind], client == "minimal"))
            for kind in ("policy", "user")
            for client in ("recipe", "minimal")
        }
        for client in ("recipe", "minimal"):
            requests_ms = sum(per_30 * counts[kind] * ms[f"{kind}_{client}_ms"] for kind in ("policy", "user"))
            ms[f"floor_{client}_client_ms"] = tau2_ms + requests_ms
        return ms

    on_uvloop = None
    with contextlib.suppress(ImportError):  # measured where uvloop is installed; the recipe does not need it
        import uvloop

        on_uvloop = priced(uvloop.run)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load": load_line(),
        "episodes": len(played),
        "turns_mean": turns / len(played),
        "prompt_tokens": len(prompt_ids),
        "user_request_kb": len(orjson.dumps({"messages": user_payload[0], "tools": user_payload[1]})) / 1024,
        "policy_requests_per_30_turns": counts["policy"] * per_30,
        "user_requests_per_30_turns": counts["user"] * per_30,
        "verdict_ms_per_30_turns": 1000 * per_30 * verdict_s,
        "tools_ms_per_30_turns": 1000 * per_30 * sum(p.result.env_s for p in played),
        **priced(asyncio.run),
        "uvloop": on_uvloop,
    }


# ------------------------------------------------------------------------------------------------------ report


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def stat_row(label: str, stats: dict[str, Any]) -> str:
    return f"| {label} | {fmt(stats['median'], 3)} | {fmt(stats['p99'], 3)} | {stats['n']} |"


def render(results: dict[str, Any]) -> str:
    meta, s = results["meta"], Settings.model_validate(results["settings"])
    lat = s.latency
    ov, tp, gym, cmp_, tok, mem, ev = (
        results[k] for k in ("overhead", "throughput", "gym", "gym_compare", "tokens", "memory", "eval")
    )
    at = {row["concurrency"]: row for row in tp}
    top = max(at)
    lines = [
        "# Rollout harness benchmarks",
        "",
        "Written by `python bench/rollout_harness.py"
        + (" --quick" if meta["quick"] else "")
        + f"` (edit the script, not the tables; the part from '{KEEP_HEADING}' on is hand-written and kept when the "
        "script rewrites this file). Real telecom tasks, the recipe's engine (`rollout.engine`), the real "
        "tokenizer (SmolLM2-135M-Instruct with the recipe's tool template) and tau2's evaluator; the policy and the "
        "user simulator are endpoint doubles in another process (`bench/doubles.py`: sglang `/generate` with real "
        "token ids; OpenAI chat) that play gold-like scripts with drawn latencies and bounded server concurrency.",
        "",
        f"- Run: {meta['date']}, {meta['duration_s']:.0f} s; Python {meta['python']}; {meta['cpu']}",
        f"- Cores: {meta['cores']} usable; load average (1, 5, 15 min) before {meta['load_before']}, after "
        f"{meta['load_after']} (`uptime`: {meta['uptime']}). The machine is shared: wall times include other jobs.",
        f"- Episodes: gold-like scripts of {s.min_turns}-{s.max_turns} policy turns (drawn per task), one per task "
        f"of the first {s.tasks} of telecom `train`, cycled: read-only look-ups (`get_customer_by_phone`) and "
        "device checks (the user calls `check_status_bar`, `check_network_status`, ... on its phone, as tau2's user "
        "simulator does: one more user request each), then the task's gold actions in order (agent actions as the "
        "policy's tool calls; user actions such as `toggle_airplane_mode` as the user's device tool calls after "
        "the agent asks), then a closing question the user answers with ###STOP###.",
        f"- Latency model (`bench/doubles.py`, `Latency`): per request a lognormal, median x exp({lat.sigma:g} z); "
        f"policy median = {lat.policy_base_s:g} s + {1e6 * lat.policy_s_per_prompt_token:g} us per prompt token + "
        f"{1e3 * lat.policy_s_per_output_token:g} ms per output token; user median = {lat.user_base_s:g} s + "
        f"{1e6 * lat.user_s_per_prompt_token:g} us per prompt token + {1e3 * lat.user_s_per_output_token:g} ms per "
        f"output token (tokens estimated as characters / 4); at most {lat.policy_slots} policy and "
        f"{lat.user_slots} user requests served at once, the rest queue first come, first served. The draws depend "
        "on (seed, episode, request index): every run replays the same latencies.",
        "- Profiling: cProfile and tracemalloc (standard library); `--probe` re-measures sections 1, 2 and 7 alone "
        "(one change's effect).",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    checks = results["targets"]
    for row in checks:
        lines.append(f"| {row['target']} | {row['measured']} | {'yes' if row['met'] else 'no'} |")
    lines += [
        "",
        "## 1. Harness overhead (zero endpoint delay)",
        "",
        "| measure | median ms | p99 ms | n |",
        "|---|---|---|---|",
        stat_row("per turn: harness (all but the endpoints' service time)", ov["per_turn_ms"]),
        stat_row("  tool-calling turns", ov["per_tool_turn_ms"]),
        stat_row("  talking turns (one user request more)", ov["per_talk_turn_ms"]),
        stat_row("per turn: in-process (all but the waits the client saw)", ov["per_turn_in_process_ms"]),
        stat_row("HTTP per policy request (client wait - service)", ov["http_ms"]["policy"]),
        stat_row("HTTP per user request (client wait - service)", ov["http_ms"]["user"]),
        stat_row(f"per episode: harness (copy, setup, {ov['turns']:.0f} turns, evaluation)", ov["per_episode_ms"]),
        stat_row("per episode: in-process", ov["per_episode_in_process_ms"]),
        "",
        f"Of an episode: setup before it starts (view, user, agent; the environment is built inside the episode, "
        f"after the first LLM reply) {fmt(ov['setup_ms'])} ms, tau2's evaluation "
        f"{fmt(ov['eval_ms'])} ms (medians); CPU of this process per episode {fmt(ov['cpu_ms_per_episode'])} ms, "
        f"{fmt(ov['cpu_ms_per_30_turns'])} ms per 30 policy turns. Unexpected episodes: {ov['unexpected']}.",
        "",
        "In-process time per turn by the turn's number in its episode (flat: the glue costs O(new tokens)):",
        "",
        "| turns | median ms | p99 ms | n |",
        "|---|---|---|---|",
        *(stat_row(bucket["turns"], bucket) for bucket in ov["by_turn_in_process_ms"]),
        "",
        "Method: episodes are played one at a time with both endpoints answering at once. The doubles stamp every "
        "request on arrival and on reply (their own handler time: the service time), and thin wrappers around the "
        "policy and user clients stamp when the engine starts and stops waiting (CLOCK_MONOTONIC, shared by both "
        "processes). A turn runs from one policy request to the next. Harness time = the turn minus the service "
        "time of its requests (the policy request, and the user requests after a talking turn): everything that is "
        "not the endpoints' own work counts, HTTP on both ends included. In-process = the turn minus the waits the "
        "engine saw (its `policy_latency_s` / `user_latency_s` view): JSON, glue rendering and encoding, the "
        "environment's tool call, tau2's message bookkeeping. Per episode likewise, over the whole episode (task "
        "copy, setup, turns, tau2's evaluation). On this shared 2-core machine the doubles' process competes for "
        "the same cores, which inflates the HTTP share.",
        "",
        "## 2. Throughput against the bound (the latency model above)",
        "",
        "| C | episodes/s | bound | fraction | wall s | bound s | longest episode s | queue wait ms | "
        "loop lag p99 ms | CPU ms/episode | CPU ms/30 turns | turns | user tool calls | reward | load (1/5/15) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in tp:
        lines.append(
            f"| {row['concurrency']} | {fmt(row['episodes_per_s'], 3)} | {fmt(row['bound_per_s'], 3)} | "
            f"{row['fraction']:.1%} | {fmt(row['wall_s'])} | {fmt(row['bound_wall_s'])} | {fmt(row['floor_s'])} | "
            f"{fmt(row['queue_wait_ms_mean'], 0)} | {fmt(row['lag_p99_ms'], 1)} | "
            f"{fmt(row['cpu_ms_per_episode'], 1)} | {fmt(row['cpu_ms_per_30_turns'], 1)} | "
            f"{fmt(row['turns_mean'], 1)} | {fmt(row['user_tool_calls_per_episode'], 1)} | "
            f"{fmt(row['reward_mean'], 2)} | {row['load']} |"
        )
    stress = results.get("stress")
    if stress:
        lines += [
            "",
            f"Latencies x {stress['scale']:g} at C = {stress['concurrency']}: "
            f"{fmt(stress['episodes_per_s'], 1)} episodes/s against a bound of {fmt(stress['bound_per_s'], 1)} "
            f"({stress['fraction']:.0%}; CPU {fmt(stress['cpu_ms_per_episode'], 1)} ms per episode here and "
            f"{fmt(stress['doubles_cpu_ms_per_episode'], 1)} ms in the doubles' process, lag p99 "
            f"{fmt(stress['lag_p99_ms'], 0)} ms). With the LLMs this fast the harness's own CPU sets the pace: this "
            "is the most this process delivers on this machine.",
        ]
    threads = results.get("threads")
    if threads:
        lines += [
            "",
            f"The C = {threads['concurrency']} wave again with the episodes' CPU work (environment set-up, first "
            f"prompt, tau2's verdict) in {threads['workers']} worker threads (`TAU2_CPU_WORKERS={threads['workers']}`) "
            f"instead of on the loop (the default): {threads['fraction']:.1%} of the bound, wall "
            f"{fmt(threads['wall_s'])} s, lag p99 {fmt(threads['lag_p99_ms'], 1)} ms, max "
            f"{fmt(threads['lag_max_ms'], 1)} ms. The work holds the GIL either way; in threads the loop's socket "
            "calls also queue behind it for the GIL.",
        ]
    one = next((r for r in tp if r["concurrency"] == 1), None)
    fixed_line = (
        f"at C = 1, {fmt((one['cpu_ms_per_episode'] - results['overhead']['cpu_ms_per_episode']) / one['wall_s'], 1)}"
        " ms/s (its CPU per episode less the same episode's CPU at zero latency, section 1, over its wall time)"
        if one is not None and results.get("overhead")
        else "not measured (no C = 1 wave)"
    )
    lines += [
        "",
        "Method: C episodes start together (a rollout batch) and the wall time runs until the last one is judged. "
        "Bound: the wall time of the same episodes with a harness that costs nothing, simulated from the doubles' "
        "records: each episode's requests in order, each sent the moment the previous one is answered and served "
        "for its drawn time by servers with the same slots, first come, first served. Fraction = bound / wall. "
        "Longest episode: its LLM time alone, without queueing. Queue wait: mean time a request waited for a "
        "server slot. Reward: tau2's mean verdict (gold-like trajectories). Loop lag: a coroutine sleeping 20 ms "
        "measures how late it wakes. CPU: this process's CPU time (user + system, all threads) per episode and per "
        "30 policy turns. It includes a fixed cost per second of wall time that does not scale with the episodes "
        f"(the loop's wake-ups, the lag monitor's 50 a second among them): {fixed_line}. "
        f"Unexpected episodes: {sum(r['unexpected'] for r in tp)}.",
        "",
        "## 3. The prior approach: tau2 `AgentGymEnv` stepped from coroutines",
        "",
    ]
    lines += [
        "The repaired gym (the headline comparison): `reset()` and `step()` in a pool of C threads (the loop "
        "awaits them) and tau2's task lookup cached (each task parsed once instead of on every reset and step). "
        "Every episode played to the end.",
        "",
        "| C | ours episodes/s | repaired gym episodes/s | ratio | ours CPU ms/episode | gym CPU ms/episode | "
        "gym episodes finished |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in cmp_["repaired"]:
        lines.append(
            f"| {row['concurrency']} | {fmt(row['ours_per_s'], 3)} | {fmt(row['theirs_per_s'], 3)} | "
            f"{fmt(row['ratio'], 2)}x | {fmt(row['ours_cpu_ms'], 1)} | {fmt(row['theirs_cpu_ms'], 1)} | "
            f"{row['finished']} of {row['episodes']} |"
        )
    ceiling = cmp_.get("repaired_ceiling")
    if ceiling:
        lines += [
            "",
            f"At C = {ceiling['concurrency']} (the repaired gym not run there: its CPU alone would take many minutes "
            "on this machine): it cannot exceed (usable cores) / (its CPU per episode) = "
            f"{fmt(ceiling['theirs_cap_per_s'], 3)} episodes/s (or the LLM bound, if lower; its Python holds one GIL, "
            "so this is generous); ours "
            f"{fmt(ceiling['ours_per_s'], 3)} episodes/s: at least {fmt(ceiling['ratio'], 1)}x.",
        ]
    lines += [
        "",
        "The gym as shipped (`reset()`/`step()` block the loop, tau2 re-reads its task file on every call):",
        "",
        "| | ours (engine) | theirs (AgentGymEnv as shipped) | ratio |",
        "|---|---|---|---|",
        f"| episodes/s at C = {cmp_['concurrency']} (theirs: bound from the blocking time) | "
        f"{fmt(cmp_['ours_per_s'], 3)} | {fmt(cmp_['theirs_per_s'], 4)} | {fmt(cmp_['ratio'], 1)}x |",
        f"| episodes/s at C = {cmp_['small_concurrency']} (both measured to the end) | "
        f"{fmt(cmp_['ours_small_per_s'], 3)} | {fmt(cmp_['theirs_small_per_s'], 4)} | {fmt(cmp_['ratio_small'], 1)}x |",
        "",
    ]
    complete, window = gym["complete"], gym["window"]
    lines += [
        f"Theirs, measured: {complete['finished']} of {complete['episodes']} episodes finished at C = "
        f"{complete['concurrency']} in {fmt(complete['wall_s'], 1)} s; reset() {fmt(complete['reset_s'])} s, "
        f"step() {fmt(complete['step_s'])} s on average ({complete['steps']} steps), blocking time per episode "
        f"{fmt(gym['blocking_per_episode_s'])} s; the loop was blocked {complete['blocked_fraction']:.0%} of the run "
        f"(lag p99 {fmt(complete['lag_p99_ms'], 0)} ms).",
    ]
    if window:
        lines.append(
            f"At C = {window['concurrency']}, a {s.gym_window_s:g} s window (no reset() or step() starts after it; "
            f"one already running finishes), {fmt(window['wall_s'], 0)} s in all: {window['resets']} resets "
            f"(mean {fmt(window['reset_s'])} s) and {window['steps']} steps done, {window['finished']} episodes "
            f"finished, loop blocked {window['blocked_fraction']:.0%} of the time (lag p99 "
            f"{fmt(window['lag_p99_ms'], 0)} ms, max {fmt(window['lag_max_ms'], 0)} ms)."
        )
    lines += [
        "",
        "Method: each coroutine builds an `AgentGymEnv` (tau2 as shipped; its user simulator goes through litellm "
        f"to the same user double as `openai/{USER_MODEL}` with `api_base`), calls `reset()`, then per turn renders "
        "the whole conversation with the chat template, tokenizes it, awaits the same policy double, and calls the "
        "blocking `step()` with the reply (a tool call as tau2's JSON action, else the text). While `reset()` or "
        "`step()` runs (user-simulator call, tau2 reloading its task file for `info`), no other coroutine runs, so "
        "episodes serialize: throughput at any concurrency is at most 1 / (blocking time of one episode). That bound, "
        "from the measured reset and step times, is the 'theirs' figure at the large C (generous to the gym: it "
        "assumes the policy waits overlap perfectly); the small C row is measured end to end on both sides. Even "
        "with tau2's task reloading removed, every user-simulator call blocks the loop for its whole latency.",
        "",
        "## 4. Token bookkeeping per turn: incremental glue vs re-tokenizing the conversation",
        "",
        "| turn | ours ms | re-tokenize ms | ratio |",
        "|---|---|---|---|",
    ]
    shown = [r for r in tok["rows"] if r["turn"] in (1, 2, 5, 10, 20, 30, 40, 50) or r["turn"] == len(tok["rows"])]
    for row in shown:
        lines.append(
            f"| {row['turn']} | {fmt(row['ours_ms'], 3)} | {fmt(row['full_ms'], 2)} | "
            f"{fmt(row['full_ms'] / row['ours_ms'], 0)}x |"
        )
    lines += [
        f"| whole episode ({len(tok['rows'])} turns) | {fmt(tok['episode_ours_ms'], 1)} | "
        f"{fmt(tok['episode_full_ms'], 1)} | {fmt(tok['episode_ratio'], 0)}x |",
        "",
        "Method: for turn n, 'ours' is `ChatRenderer.continuation_text` of the new message (tool result or user "
        "reply) plus `encode`; 're-tokenize' is `apply_chat_template` of the whole conversation with the tools plus "
        f"`encode`, as a harness that keeps only messages must do before every policy call (the prompt reaches "
        f"{tok['prompt_tokens_at_end']:,} tokens at the last turn). Median of {s.token_repeats} runs per turn.",
        "",
        f"## 5. Memory per concurrent episode (C = {mem['concurrency']})",
        "",
        "| Python allocations at the peak, per episode MB (tracemalloc) | RSS before MB | RSS peak MB | "
        "RSS growth per episode MB |",
        "|---|---|---|---|",
        f"| {fmt(mem['traced_mb_per_episode'], 3)} | {fmt(mem['rss_before_mb'], 1)} | {fmt(mem['rss_peak_mb'], 1)} | "
        f"{fmt(mem['mb_per_episode'], 3)} |",
        "",
        "Method: the wave at this C again under tracemalloc: the peak of Python allocations during the wave minus "
        "those before it, / C (episodes in flight, their request bodies, and the finished episodes' results, which "
        "a batch returns together). RSS (/proc/self/statm, after a garbage collection before the timed wave, peak "
        "sampled every 50 ms): its growth understates, since the heap freed by earlier sections is reused.",
        "",
        f"## 6. Evaluator: {s.eval_tasks} tasks x {s.eval_trials} trials",
        "",
        "| --concurrency | episode log fsynced | wall s | episodes phase s | CPU s | episodes | failed |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in ev["runs"]:
        synced = (
            "after every episode (before)"
            if not run.get("sync_every_s")
            else f"at most every {run['sync_every_s']:g} s (grouped)"
        )
        lines.append(
            f"| {run['concurrency']} | {synced} | {fmt(run['wall_s'], 1)} | {fmt(run['episodes_wall_s'], 1)} | "
            f"{fmt(run.get('cpu_s'), 1)} | {run['episodes']} | {run['failed']} |"
        )
    lines += [
        "",
        f"Speed-up: {fmt(ev['speedup'], 1)}x on the whole run, {fmt(ev['episodes_speedup'], 1)}x on the episodes "
        f"phase. Grouped fsyncs against one fsync per finished episode (the same run otherwise): episodes phase "
        f"{fmt(ev['runs'][0]['episodes_wall_s'], 2)} s against {fmt(ev['runs'][1]['episodes_wall_s'], 2)} s "
        f"(every-episode / grouped: {fmt(ev.get('grouped_sync_gain'), 2)}). "
        "Method: `eval/evaluate_tau2.py`'s `main()` in this process (`--sglang-url` the policy double, "
        f"`--user-kind llm` the user double, telecom `test`), delays Lp = Lu = {s.eval_delay_s:g} s, "
        f"{s.eval_turns} policy turns per episode (LLM floor {fmt(ev['floor_s'])} s). The whole run includes "
        "loading tasks and tokenizer, the summary with bootstrap intervals and the chart; the episodes phase runs "
        "from the first request the doubles saw to the last reply.",
        "",
        "## 7. Where an episode's CPU goes (each piece alone, median)",
        "",
        "| piece | ms |",
        "|---|---|",
    ]
    for row in results["breakdown"]:
        lines.append(f"| {row['piece']} | {fmt(row['ms'])} |")
    lines += [
        "",
        f"At C = {top} these pieces are paid {top} times in bursts: environments and first prompts after the first "
        "LLM replies, verdicts when the wave ends. They hold the GIL (pydantic, Jinja, tau2's Python) even in worker "
        "threads, so they serialize; the engine runs them on the loop (`run_cpu`).",
        "",
    ]
    if "floor" in results:
        lines += floor_lines(results["floor"], s)
    return "\n".join(lines)


def floor_lines(fl: dict[str, Any], s: Settings) -> list[str]:
    target = TARGETS["cpu_ms_per_30_turns"]
    policy, user = fl["policy_requests_per_30_turns"], fl["user_requests_per_30_turns"]

    def requests_row(client: str, label: str, ms: dict[str, Any]) -> str:
        p_ms, u_ms = ms[f"policy_{client}_ms"], ms[f"user_{client}_ms"]
        return (
            f"| {policy:.0f} policy + {user:.0f} user requests, {label} ({fmt(p_ms, 3)} + {fmt(u_ms, 3)} ms each) | "
            f"{fmt(policy * p_ms + user * u_ms)} |"
        )

    lines = [
        f"## 8. A floor under the CPU target ({target:g} ms per 30 turns)",
        "",
        f"Measured {fl['date']} (load {fl['load']}). {fl['episodes']} bench episodes ({fl['turns_mean']:.0f} policy "
        "turns on average) played one at a time with zero delay; tau2's verdict re-run alone on each trajectory "
        f"(CPU, median of 3), tau2's tool calls as the engine timed them; per 30 turns {policy:.0f} policy and "
        f"{user:.0f} user requests. Per-request CPU ({s.floor_requests} requests of each kind, "
        f"{s.floor_concurrency} at a time, zero delay: body built, sent, reply read and parsed): policy requests "
        f"with a {fl['prompt_tokens']}-token prompt sent as the engine sends it (its JSON text encoded once and "
        f"joined into each body), user requests with the user simulator's request after {s.floor_user_turns} turns "
        f"({fmt(fl['user_request_kb'], 0)} KB of JSON: its system prompt, the conversation and its tools). "
        "`MinimalHttp` (bench/rollout_harness.py) is a bare HTTP/1.1 client (one write, Content-Length reads, no "
        "retries or timeouts): the price of a request in any Python client.",
        "",
        "| part | ms per 30 turns |",
        "|---|---|",
        f"| tau2's verdict (`evaluate_simulation`) | {fmt(fl['verdict_ms_per_30_turns'])} |",
        f"| tau2's tool calls (`Environment.get_response`) | {fmt(fl['tools_ms_per_30_turns'])} |",
        requests_row("recipe", "the recipe's clients (aiohttp)", fl),
        requests_row("minimal", "`MinimalHttp`", fl),
        f"| **floor: tau2 + requests, the recipe's clients** | **{fmt(fl['floor_recipe_client_ms'])}** |",
        f"| **floor: tau2 + requests, `MinimalHttp`** | **{fmt(fl['floor_minimal_client_ms'])}** |",
        "",
    ]
    uv = fl.get("uvloop")
    if uv:
        lines += [
            "On uvloop (installed where this ran; the recipe does not depend on it):",
            "",
            "| part | ms per 30 turns |",
            "|---|---|",
            requests_row("recipe", "the recipe's clients", uv),
            requests_row("minimal", "`MinimalHttp`", uv),
            f"| **floor, the recipe's clients** | **{fmt(uv['floor_recipe_client_ms'])}** |",
            f"| **floor, `MinimalHttp`** | **{fmt(uv['floor_minimal_client_ms'])}** |",
        ]
    else:
        lines.append("uvloop is not installed here: no uvloop figures.")
    lines += [
        "",
        "Nothing else of an episode is in the floor: no template glue, no building of the user simulator's message "
        "list, no tau2 message objects, no event loop beyond these requests, no partial credit.",
        "",
    ]
    return lines


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    tp = {row["concurrency"]: row for row in results["throughput"]}
    top = tp[max(tp)]
    ov, mem = results["overhead"], results["memory"]
    buckets = [b for b in ov["by_turn_in_process_ms"] if b["n"]]
    growth = buckets[-1]["median"] / buckets[0]["median"] if buckets and buckets[0]["median"] else math.inf
    repaired = max(results["gym_compare"]["repaired"], key=lambda r: r["concurrency"], default=None)
    ceiling = results["gym_compare"].get("repaired_ceiling")
    memory = mem["traced_mb_per_episode"] if mem["traced_mb_per_episode"] is not None else mem["mb_per_episode"]
    c = TARGETS["concurrency"]
    return [
        {
            "target": f">= {TARGETS['fraction']:.0%} of the bound at C = {c}",
            "measured": f"{top['fraction']:.1%} at C = {top['concurrency']}",
            "met": top["concurrency"] >= c and top["fraction"] >= TARGETS["fraction"],
        },
        {
            "target": f"harness CPU <= {TARGETS['cpu_ms_per_30_turns']:g} ms per 30-turn episode-equivalent at C = {c}",
            "measured": f"{top['cpu_ms_per_30_turns']:.1f} ms at C = {top['concurrency']} "
            f"({ov['cpu_ms_per_30_turns']:.1f} ms one episode at a time)",
            "met": top["concurrency"] >= c and top["cpu_ms_per_30_turns"] <= TARGETS["cpu_ms_per_30_turns"],
        },
        {
            "target": f"per-turn CPU flat in turn number (last ten turns <= {TARGETS['turn_growth']:g}x the first ten)",
            "measured": f"{growth:.2f}x (turns {buckets[0]['turns']}: {buckets[0]['median']:.3f} ms, "
            f"{buckets[-1]['turns']}: {buckets[-1]['median']:.3f} ms)"
            if buckets
            else "n/a",
            "met": growth <= TARGETS["turn_growth"],
        },
        {
            "target": f"<= {TARGETS['mb_per_episode']:g} MB per concurrent episode",
            "measured": f"{memory:.3f} MB at C = {mem['concurrency']} (Python allocations at the peak, tracemalloc)",
            "met": memory <= TARGETS["mb_per_episode"],
        },
        {
            "target": f">= {TARGETS['repaired_gym_ratio']:g}x the repaired AgentGymEnv",
            "measured": (
                f"{repaired['ratio']:.2f}x at C = {repaired['concurrency']} (measured to the end)"
                + (
                    f"; >= {ceiling['ratio']:.1f}x at C = {ceiling['concurrency']} against its CPU ceiling"
                    if ceiling
                    else ""
                )
            )
            if repaired
            else "not measured",
            "met": bool(repaired) and repaired["ratio"] >= TARGETS["repaired_gym_ratio"],
        },
    ]


# --------------------------------------------------------------------------------------------------------- main


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def probe(bench: Bench, results: dict[str, Any], load_before: str, out: Path | None) -> int:
    """Sections 1 and 2 only, the numbers a CPU cut moves, printed (and written) as JSON."""
    results["breakdown"] = section_breakdown(bench)
    results["overhead"] = section_overhead(bench)
    results["throughput"], results["stress"], _ = section_throughput(bench)
    ov = results["overhead"]
    summary = {
        "load_before": load_before,
        "load_after": load_line(),
        "pieces_ms": {row["piece"]: round(row["ms"], 4) for row in results["breakdown"]},
        "sequential_cpu_ms_per_30_turns": ov["cpu_ms_per_30_turns"],
        "sequential_in_process_ms_per_turn": ov["per_turn_in_process_ms"]["median"],
        "sequential_harness_ms_per_turn": ov["per_turn_ms"]["median"],
        "by_turn_in_process_ms": [(b["turns"], round(b["median"], 3)) for b in ov["by_turn_in_process_ms"]],
        "waves": [
            {k: row[k] for k in ("concurrency", "fraction", "cpu_ms_per_30_turns", "mb_per_episode", "lag_p99_ms")}
            for row in results["throughput"]
        ],
    }
    print(json.dumps(summary, indent=1), flush=True)
    if out:
        out.write_text(json.dumps(results, indent=1, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and near-zero delays (about a minute)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md", help="Markdown table to write")
    parser.add_argument("--json", type=Path, help="also write every number as JSON here")
    parser.add_argument("--settings", help="JSON object overriding Settings fields (e.g. '{\"turns\": 6}')")
    parser.add_argument(
        "--probe",
        action="store_true",
        help="only sections 1 and 2 (per-turn costs, the waves), numbers printed as JSON: one step's effect",
    )
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    if args.settings:
        settings = Settings.model_validate({**settings.model_dump(), **json.loads(args.settings)})
    started = time.monotonic()
    load_before = load_line()
    from examples.prepare_cpu_model import prepare_cpu_model
    from rollout.token_record import load_tokenizer

    tokenizer_dir = prepare_cpu_model()
    with start_doubles(tokenizer_dir) as doubles:
        from rollout.tau2_setup import import_tau2

        import_tau2()
        bench = Bench(settings, doubles, load_tokenizer(tokenizer_dir), tokenizer_dir)
        results: dict[str, Any] = {"settings": settings.model_dump()}
        if args.probe:
            return probe(bench, results, load_before, args.json)
        print("3. AgentGymEnv (first: against tau2 as shipped)", flush=True)
        results["gym"] = section_gym(bench)
        print("1. harness overhead", flush=True)
        results["overhead"] = section_overhead(bench)
        print("2. throughput", flush=True)
        results["throughput"], results["stress"], results["threads"] = section_throughput(bench)
        results["gym_compare"] = compare_gym(bench, results["gym"], results["throughput"])
        top = max(results["throughput"], key=lambda r: r["concurrency"])
        results["memory"] = section_memory(bench, top)
        print("4. token bookkeeping", flush=True)
        results["tokens"] = section_tokens(bench)
        print("6. evaluator", flush=True)
        results["eval"] = section_eval(bench)
        print("7. per-episode CPU breakdown", flush=True)
        results["breakdown"] = section_breakdown(bench)
        print("8. a floor under the CPU target", flush=True)
        results["floor"] = section_floor(bench)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    results["meta"] = {
        "quick": args.quick,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "duration_s": time.monotonic() - started,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cores": len(os.sched_getaffinity(0)),
        "load_before": load_before,
        "load_after": load_line(),
        "uptime": uptime,
    }
    results["targets"] = targets(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    kept = ""
    if args.out.exists():  # hand-written findings at the end of the file survive a re-run
        previous = args.out.read_text()
        at = previous.find("\n" + KEEP_HEADING)
        kept = previous[at:] if at >= 0 else ""
    args.out.write_text(render(results) + kept)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {args.out} in {results['meta']['duration_s']:.0f} s", flush=True)
    for row in results["targets"]:
        print(f"  {'met ' if row['met'] else 'MISS'} {row['target']}: {row['measured']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
