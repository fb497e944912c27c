"""One process-wide store of tau2 tasks: each (domain, split) is parsed once, then tasks are looked up by id.

tau2's task loader re-parses the domain's tasks JSON on every call (~1 s for telecom), so rollout workers, the
evaluator and trace generation all go through this module instead.
"""

from __future__ import annotations

import gc
import re
import threading
from typing import TYPE_CHECKING, Any

from rollout.tau2_setup import import_tau2

if TYPE_CHECKING:
    from tau2.data_model.tasks import Task

# Splits each domain offers (tau2's split_tasks.json; telecom's "full" is its 2285-task generated set).
DOMAIN_SPLITS: dict[str, tuple[str, ...]] = {
    "telecom": ("train", "test", "base", "small", "full"),
    "airline": ("train", "test", "base"),
    "retail": ("train", "test", "base"),
}
DOMAINS: tuple[str, ...] = tuple(DOMAIN_SPLITS)

_SUBTASK_RE = re.compile(r"^\[(?P<subtask>[a-z_]+)\]")
_PERSONA_RE = re.compile(r"\[PERSONA:(?P<persona>[^\]]+)\]$")


class TaskLookupError(KeyError):
    """A domain, split or task id that tau2 does not have; the message names the valid choices."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


def check_domain(domain: str) -> str:
    if domain not in DOMAIN_SPLITS:
        raise TaskLookupError(f"unknown domain '{domain}'; valid domains: {', '.join(DOMAINS)}")
    return domain


def check_split(domain: str, split: str) -> str:
    check_domain(domain)
    if split not in DOMAIN_SPLITS[domain]:
        raise TaskLookupError(
            f"unknown split '{split}' for domain '{domain}'; valid splits: {', '.join(DOMAIN_SPLITS[domain])}"
        )
    return split


def task_subtask(task_id: str) -> str | None:
    """Telecom ids start with the subtask: '[mms_issue]...' -> 'mms_issue'. Other domains have none."""
    match = _SUBTASK_RE.match(task_id)
    return match.group("subtask") if match else None


def task_persona(task: Task) -> str:
    """The user persona: telecom encodes it in the id ('[PERSONA:Easy]'); 'None' when the task has none."""
    match = _PERSONA_RE.search(task.id)
    if match:
        return match.group("persona")
    persona = task.user_scenario.persona if task.user_scenario is not None else None
    return str(persona) if persona else "None"


class TaskStore:
    """Caches tau2 tasks per (domain, split) and indexes them by id. Thread-safe; share one per process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._splits: dict[tuple[str, str], list[Task]] = {}
        self._by_id: dict[str, dict[str, Task]] = {}

    def tasks(self, domain: str, split: str) -> list[Task]:
        """The tasks of one split, in tau2's order. Callers must not mutate them (deep-copy first)."""
        check_split(domain, split)
        key = (domain, split)
        with self._lock:
            if key not in self._splits:
                registry = import_tau2()
                tasks = registry.get_tasks_loader(domain)(split)
                self._splits[key] = tasks
                index = self._by_id.setdefault(domain, {})
                for task in tasks:
                    index.setdefault(task.id, task)
                # Tasks live as long as the process: take them out of the cyclic GC's reach, or every full
                # collection walks them (~0.4 s for telecom's 2285-task set, stalling every episode on the loop).
                gc.collect()
                gc.freeze()
            return self._splits[key]

    def task_ids(self, domain: str, split: str) -> list[str]:
        return [task.id for task in self.tasks(domain, split)]

    def get(self, domain: str, task_id: str) -> Task:
        """Look a task up by id in the domain's base split, then (telecom) its full set."""
        check_domain(domain)
        for split in ("base", "full"):
            if split not in DOMAIN_SPLITS[domain]:
                continue
            with self._lock:
                found = self._by_id.get(domain, {}).get(task_id)
            if found is not None:
                return found
            self.tasks(domain, split)
        with self._lock:
            found = self._by_id.get(domain, {}).get(task_id)
        if found is None:
            raise TaskLookupError(f"no task '{task_id}' in domain '{domain}'")
        return found


_STORE = TaskStore()


def get_task_store() -> TaskStore:
    return _STORE


def task_from_metadata(metadata: dict[str, Any]) -> Task:
    """Rebuild the Task a data row describes: from its embedded JSON if present, else from the store by id."""
    from tau2.data_model.tasks import Task

    if metadata.get("task"):
        return Task.model_validate(metadata["task"])
    domain = metadata.get("domain")
    task_id = metadata.get("task_id")
    if not domain or not task_id:
        raise TaskLookupError(
            "sample metadata needs 'domain' and 'task_id' (or an embedded 'task'); re-run tau2_mock.py"
        )
    return get_task_store().get(domain, task_id)
