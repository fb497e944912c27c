"""Progress toward the gold end state, measured on tau2's own state: how much of what the task's gold actions do the
episode's end state shows, and how many fields it changed that no gold action changes.

State: what tau2 compares when it grades a database, i.e. the agent's database (`env.tools.db`) and, where the
domain has one, the user's (`env.user_tools.db`: telecom's phone and surroundings). A field is a leaf of those
pydantic models (records in dicts by key, in lists by position; a record on one side only counts with each of its
leaves; an empty container is a leaf).

Target (`progress_target`, built on first use and cached per task): the task's initial state S0, built as tau2's
evaluator builds its gold environment (initialization data, initialization actions, message history), and the gold
actions replayed on it one by one, each followed by `sync_tools` as every call of an episode is (tau2's gold
environment skips that sync: it only hashes databases, and sync changes nothing in the graded airline and retail
databases; telecom's sync derives data-limit, roaming and payment fields from the line). A gold action that raises
is skipped, as tau2 does. Kept: each action's changes (`steps`), the end fields that differ from S0 (`final`), and
which actions the gold end state shows (`counted`, see `action_shares`).

Measure (`measure_progress`, at the end of an episode, on its own environment E):
- `done_actions` of `target_actions`: the counted gold actions, each counting the share of its fields E shows;
- `matched_fields` of `target_fields`: end fields E holds with the gold value (the plain field share);
- `collateral`: fields where E differs from S0 that no gold action changes (toggling everything changes many);
- `transferred` / `gold_transfers`: whether the agent called, and the gold actions call, `transfer_to_human_agents`.
The reward post-process turns these into credit (reward/partial_credit.py, `compute_progress_score`).

Cost: states are diffed against one shared base state per domain (the databases before any initialization), so a
target keeps only its own few fields, and only differences are walked: equal subtrees are skipped with one `==`
(pydantic compares field dicts in C). The engine calls `episode_progress` at episode end through `run_cpu`, where the
environment exists (slime passes samples, not environments), and stores the figures in `EpisodeResult.progress`;
the slime adapter copies them to `sample.metadata["progress"]`. Numbers: docs/partial_credit.md.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from tau2.data_model.simulation import SimulationRun
    from tau2.data_model.tasks import Task
    from tau2.environment.environment import Environment

TRANSFER_TOOL = "transfer_to_human_agents"  # the hand-off tool of every tau2 domain
LISTED_FIELDS = 6  # field paths kept per list in the payload: enough to read, small enough for every sample
TARGET_CACHE_SIZE = 4096  # tasks (telecom's full set has 2285); a target is a few KB

Path = tuple[Any, ...]


class _Absent:
    """The value of a key or position that one side does not have."""

    def __repr__(self) -> str:
        return "<absent>"


ABSENT: Any = _Absent()


def path_text(path: Path) -> str:
    return "/".join(str(part) for part in path)


def _children(value: Any) -> dict[Any, Any] | None:
    """A container's children by key (model fields, dict keys, list positions); None for a leaf."""
    if isinstance(value, BaseModel):
        children = {name: getattr(value, name) for name in type(value).model_fields}
        if value.__pydantic_extra__:
            children.update(value.__pydantic_extra__)
        return children
    if isinstance(value, dict):
        return {key.value if isinstance(key, Enum) else key: child for key, child in value.items()}
    if isinstance(value, (list, tuple)):
        return dict(enumerate(value))
    return None


def _leaves(value: Any, path: Path) -> Iterator[tuple[Path, Any]]:
    """Every leaf under a value; an empty container is a leaf of its own."""
    children = _children(value)
    if not children:
        yield path, value
        return
    for key, child in children.items():
        yield from _leaves(child, (*path, key))


def _record(out: dict[Path, tuple[Any, Any]], path: Path, before: Any, after: Any) -> None:
    """The leaf-by-leaf differences of two subtrees (ABSENT: no subtree on that side)."""
    old = dict(_leaves(before, path)) if before is not ABSENT else {}
    new = dict(_leaves(after, path)) if after is not ABSENT else {}
    for leaf in old.keys() | new.keys():
        value_before, value_after = old.get(leaf, ABSENT), new.get(leaf, ABSENT)
        if value_before is ABSENT or value_after is ABSENT or value_before != value_after:
            out[leaf] = (value_before, value_after)


def diff_fields(before: Any, after: Any, path: Path = ()) -> dict[Path, tuple[Any, Any]]:
    """{field path: (before, after)} for every leaf that differs (an empty container is a leaf; ABSENT stands for a
    missing key or position). Equal subtrees cost one `==` each."""
    out: dict[Path, tuple[Any, Any]] = {}
    _diff(before, after, path, out)
    return out


def _diff(before: Any, after: Any, path: Path, out: dict[Path, tuple[Any, Any]]) -> None:
    if before is after or (type(before) is type(after) and before == after):
        return
    old, new = _children(before), _children(after)
    if not old or not new or type(before) is not type(after):  # a leaf, an empty container, or a change of kind
        _record(out, path, before, after)
        return
    for key in old.keys() | new.keys():
        _diff(old.get(key, ABSENT), new.get(key, ABSENT), (*path, key), out)


def environment_state(env: Environment) -> dict[str, Any]:
    """The databases tau2 hashes: the agent's, and the user's where the domain has one."""
    state = {"db": env.tools.db}
    user_db = getattr(env.user_tools, "db", None) if env.user_tools is not None else None
    if user_db is not None:
        state["user_db"] = user_db
    return state


def value_at(state: Any, path: Path) -> Any:
    """The value at a field path; ABSENT where a key or position is missing."""
    value = state
    for key in path:
        children = _children(value)
        if children is None or key not in children:
            return ABSENT
        value = children[key]
    return value


@dataclass(frozen=True)
class ProgressTarget:
    """What the gold actions do to a task's initial state. `base` is shared by a domain's tasks: never mutate it."""

    task_id: str
    domain: str
    base: dict[str, Any]  # the domain's databases before any initialization
    initialized: dict[Path, Any]  # fields where the task's initial state S0 differs from `base`: their S0 values
    steps: tuple[dict[Path, Any], ...]  # per gold action: the fields it changed, with their values right after it
    final: dict[Path, Any]  # fields whose gold end value differs from S0, with that end value
    initial_values: dict[Path, Any]  # S0 value of every field any gold action changes
    counted: frozenset[int]  # gold actions whose effect the gold end state shows (see `action_shares`)
    gold_transfers: bool
    gold_errors: dict[int, str]  # position -> error of the gold actions that raised (skipped, as tau2 does)

    def differences(self, env: Environment | None) -> dict[Path, tuple[Any, Any]]:
        """{field: (S0 value, value in env)} where they differ; env None is S0 itself."""
        if env is None:
            return {}
        from_base = diff_fields(self.base, environment_state(env))
        out = {}
        for path in from_base.keys() | self.initialized.keys():
            base_value = from_base[path][0] if path in from_base else value_at(self.base, path)
            start = self.initialized.get(path, base_value)
            now = from_base[path][1] if path in from_base else base_value
            if start is ABSENT and now is ABSENT:
                continue
            if start is ABSENT or now is ABSENT or start != now:
                out[path] = (start, now)
        return out


class StateProgress(BaseModel):
    """The figures an episode hands to the reward post-process (`sample.metadata["progress"]`)."""

    model_config = ConfigDict(extra="forbid")

    target_actions: int = Field(ge=0, description="gold actions whose effect the gold end state shows")
    done_actions: float = Field(ge=0, description="their summed shares shown (see `action_shares`)")
    target_fields: int = Field(ge=0, description="fields whose gold end value differs from the initial one")
    matched_fields: int = Field(ge=0, description="of those, fields the episode left with the gold end value")
    touched_fields: int = Field(ge=0, description="fields any gold action changes, end value or on the way")
    collateral: int = Field(ge=0, description="fields the episode changed that no gold action changes")
    transferred: bool = Field(description="the agent called transfer_to_human_agents")
    gold_transfers: bool = Field(description="the gold actions call transfer_to_human_agents")
    missed_fields: list[str] = Field(default_factory=list, description=f"first {LISTED_FIELDS} unmatched end fields")
    collateral_fields: list[str] = Field(default_factory=list, description=f"first {LISTED_FIELDS} collateral fields")


_LOCK = threading.Lock()
_TARGETS: OrderedDict[tuple[str, str], ProgressTarget] = OrderedDict()
_BASES: dict[str, dict[str, Any]] = {}


def _environment(domain: str, initial_state: Any) -> Environment:
    from rollout.engine import fast_env_constructor  # the engine's cached databases; imported late: it imports us

    env = fast_env_constructor(domain)()
    env.set_state(
        initialization_data=initial_state.initialization_data if initial_state else None,
        initialization_actions=initial_state.initialization_actions if initial_state else None,
        message_history=(initial_state.message_history or []) if initial_state else [],
    )
    return env


def initial_environment(task: Task, domain: str) -> Environment:
    """A fresh environment in the task's initial state, as tau2's evaluator builds its gold environment."""
    return _environment(domain, task.initial_state)


def domain_base(domain: str) -> dict[str, Any]:
    """The domain's databases before any initialization (shared by its targets; that environment is never used)."""
    with _LOCK:
        base = _BASES.get(domain)
    if base is None:
        fresh = environment_state(_environment(domain, None))
        with _LOCK:
            base = _BASES.setdefault(domain, fresh)
    return base


def _initializes(task: Task) -> bool:
    initial = task.initial_state
    return initial is not None and bool(
        initial.initialization_data or initial.initialization_actions or initial.message_history
    )


def _gold_call(env: Environment, action: Any) -> str | None:
    """One gold action as an episode runs a call (then sync_tools); the error text if it raised."""
    try:
        env.make_tool_call(action.name, requestor=action.requestor, **action.arguments)
        env.sync_tools()
    except Exception as error:
        return f"{action.name}: {type(error).__name__}: {error}"[:300]
    return None


def _writes(env: Environment, action: Any) -> bool:
    """Whether the tool may change state: tau2 marks each tool READ, WRITE or GENERIC; unknown tools count as
    writes."""
    kit = env.user_tools if action.requestor == "user" else env.tools
    if kit is None or not kit.has_tool(action.name):
        return True
    kind = kit.tool_type(action.name)
    return str(getattr(kind, "value", kind)).lower() == "write"


def _gold_steps(
    task: Task, domain: str, actions: list[Any], initial: dict[str, Any], trust_tool_types: bool
) -> tuple[list[dict[Path, Any]], dict[int, str], Environment]:
    """Each gold action's changes ({field: value after it}), the errors, and the environment after all of them.

    Two environments replay the actions one step apart, so a step's changes are one diff with no copy of the state
    (airline's is 3 MB). With `trust_tool_types`, actions of non-WRITE tools are not diffed, and the lagging
    environment is built only at the second write (before it, the state is the initial one)."""
    ahead, behind = initial_environment(task, domain), None
    steps: list[dict[Path, Any]] = []
    errors: dict[int, str] = {}
    writes_seen = 0
    for position, action in enumerate(actions):
        writes = not trust_tool_types or _writes(ahead, action)
        if writes and writes_seen and behind is None:
            behind = initial_environment(task, domain)
            for earlier in actions[:position]:
                _gold_call(behind, earlier)
        before = environment_state(behind) if behind is not None else initial
        error = _gold_call(ahead, action)
        if error:
            errors[position] = error
        changes = diff_fields(before, environment_state(ahead)) if writes else {}
        steps.append({path: after for path, (_, after) in changes.items()})
        if behind is not None:
            _gold_call(behind, action)
        writes_seen += writes
    return steps, errors, ahead


def progress_target(task: Task, domain: str) -> ProgressTarget:
    """The task's target, built on first use (one to three environments replay the gold actions) and cached."""
    key = (domain, task.id)
    with _LOCK:
        cached = _TARGETS.get(key)
        if cached is not None:
            _TARGETS.move_to_end(key)
            return cached
    base = domain_base(domain)
    initial = environment_state(initial_environment(task, domain)) if _initializes(task) else base
    initialized = {path: now for path, (_, now) in diff_fields(base, initial).items()}
    criteria = task.evaluation_criteria
    actions = list(criteria.actions or []) if criteria is not None else []
    steps, errors, gold = _gold_steps(task, domain, actions, initial, trust_tool_types=True)
    final = {path: after for path, (_, after) in diff_fields(initial, environment_state(gold)).items()}
    if not final.keys() <= {path for step in steps for path in step}:  # a tool changed state its type denies
        steps, errors, gold = _gold_steps(task, domain, actions, initial, trust_tool_types=False)
    initial_values = {path: value_at(initial, path) for step in steps for path in step}
    at_gold = action_shares(steps, initial_values, lambda path: final.get(path, initial_values[path]))
    target = ProgressTarget(
        task_id=task.id,
        domain=domain,
        base=base,
        initialized=initialized,
        steps=tuple(steps),
        final=final,
        initial_values=initial_values,
        counted=frozenset(position for position, share in enumerate(at_gold) if share is not None),
        gold_transfers=any(action.name == TRANSFER_TOOL for action in actions),
        gold_errors=errors,
    )
    with _LOCK:
        target = _TARGETS.setdefault(key, target)  # another thread may have built it meanwhile
        _TARGETS.move_to_end(key)
        while len(_TARGETS) > TARGET_CACHE_SIZE:
            _TARGETS.popitem(last=False)
    return target


def action_shares(
    steps: Sequence[Mapping[Path, Any]], initial_values: Mapping[Path, Any], value_of: Callable[[Path], Any]
) -> list[float | None]:
    """How much of each gold action a state shows (None: nothing), from the last action back.

    Each field a gold action changes is evidence for it, met when the state holds the value the action left there,
    or, if a later gold action changes the field again, when that later action is fully done. No evidence: a field
    the action sets back to its initial value (the untouched state holds it too: telecom's reset-at-reboot flag after
    the reboot), and a field holding another value whose later action has no evidence of its own (retail's "change
    the address, then change it back"). So a step whose effect a later step consumes (reset the APN, then reboot;
    request a payment, then pay) is credited while it is the latest, and after its consumer. `progress_target`
    counts the actions with evidence in the gold end state; the others never count.
    """
    shares: list[float | None] = [None] * len(steps)
    next_change: dict[Path, int] = {}
    for position in range(len(steps) - 1, -1, -1):
        evidence = []
        for path, value in steps[position].items():
            later = next_change.get(path)
            next_change[path] = position
            if value == initial_values[path]:
                continue
            met = value_of(path) == value
            if later is None:
                evidence.append(met)
            elif met or shares[later] is not None:
                evidence.append(met or shares[later] == 1.0)
        shares[position] = math.fsum(evidence) / len(evidence) if evidence else None
    return shares


def agent_tool_names(messages: Iterable[Any]) -> list[str]:
    """Names of the agent's tool calls in a tau2 trajectory (message objects or their JSON dumps)."""
    names = []
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else getattr(message, "role", None)
        calls = message.get("tool_calls") if isinstance(message, dict) else getattr(message, "tool_calls", None)
        if role != "assistant" or not calls:
            continue
        for call in calls:
            name = call.get("name") if isinstance(call, dict) else getattr(call, "name", None)
            if name:
                names.append(str(name))
    return names


def measure_progress(task: Task, domain: str, env: Environment | None, messages: Iterable[Any] = ()) -> StateProgress:
    """The episode's figures against the task's target; `env` None means no tool ever ran (the initial state)."""
    target = progress_target(task, domain)
    differences = target.differences(env)

    def value_of(path: Path) -> Any:
        return differences[path][1] if path in differences else target.initial_values[path]

    shares = action_shares(target.steps, target.initial_values, value_of)
    counted = [shares[position] or 0.0 for position in sorted(target.counted)]
    missed = sorted((path for path, gold in target.final.items() if value_of(path) != gold), key=path_text)
    collateral = sorted((path for path in differences if path not in target.initial_values), key=path_text)
    return StateProgress(
        target_actions=len(counted),
        done_actions=math.fsum(counted),
        target_fields=len(target.final),
        matched_fields=len(target.final) - len(missed),
        touched_fields=len(target.initial_values),
        collateral=len(collateral),
        transferred=TRANSFER_TOOL in agent_tool_names(messages),
        gold_transfers=target.gold_transfers,
        missed_fields=[path_text(path) for path in missed[:LISTED_FIELDS]],
        collateral_fields=[path_text(path) for path in collateral[:LISTED_FIELDS]],
    )


def episode_progress(task: Task, domain: str, env: Environment | None, messages: Iterable[Any]) -> dict[str, Any]:
    """`measure_progress` as the JSON the engine stores; never raises (an error comes back as {"error": ...}).
    CPU work: call it through run_cpu."""
    try:
        return measure_progress(task, domain, env, messages).model_dump(mode="json")
    except Exception as error:  # one episode's bad state must not take the batch down
        return {"error": f"{type(error).__name__}: {error}"[:2000]}


def progress_of_simulation(
    simulation: SimulationRun, task: Task, domain: str, solo_mode: bool = False
) -> StateProgress:
    """The figures for a finished trajectory without its environment: replays its tool calls on a fresh one, as
    tau2's evaluator does (for stored trajectories and tests; the engine measures its live environment instead)."""
    from reward.partial_credit import without_unanswered_tail

    messages, _ = without_unanswered_tail(list(simulation.messages))
    env = initial_environment(task, domain)
    if solo_mode:
        env.set_solo_mode(True)
    env.set_state(initialization_data=None, initialization_actions=None, message_history=messages)
    return measure_progress(task, domain, env, messages)
