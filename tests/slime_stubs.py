"""slime's real code in this process, with only what cannot run here stubbed as modules: ray, sglang,
sglang_router and wandb (every submodule of them too). Nothing of slime or Megatron-LM is replaced.

- `ray.remote` returns what it decorates (so `RolloutManager`'s methods are slime's own, callable on an instance);
- `wandb.log` records what it is given in `wandb.logged`;
- sglang's `ServerArgs.add_cli_args` registers the sglang server flags the recipe's launchers pass, with sglang's
  names (slime prefixes them with `--sglang-`), plus the dp size slime reads; sglang_router's `RouterArgs` adds none;
- any other attribute of a stubbed module is an inert class.
`slime_runtime()` puts slime (and Megatron-LM) on sys.path with the stubs installed, and removes slime's, Megatron's
and the stubs' modules afterwards, so the rest of the test session never sees them.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STUBBED = ("ray", "sglang", "sglang_router", "wandb")


class _Inert:
    """Accepts any construction, call and attribute; subclassable; false in a boolean context."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert()

    def __bool__(self) -> bool:
        return False


def _remote(*args: Any, **kwargs: Any) -> Any:
    if len(args) == 1 and not kwargs and callable(args[0]):
        return args[0]
    return lambda target: target


class ServerArgs:
    """The sglang ServerArgs flags the launchers use (run_grpo.sh: --sglang-mem-fraction-static)."""

    @staticmethod
    def add_cli_args(parser: Any) -> None:
        parser.add_argument("--mem-fraction-static", type=float, default=None)
        parser.add_argument("--dp-size", type=int, default=1)
        parser.add_argument("--pp-size", type=int, default=1)


class RouterArgs:
    @staticmethod
    def add_cli_args(parser: Any, use_router_prefix: bool = False, exclude_host_port: bool = False) -> None:
        """No router flags are passed by the launchers."""


_SPECIALS: dict[str, dict[str, Any]] = {
    "ray": {"remote": _remote},
    "sglang.srt.server_args": {"ServerArgs": ServerArgs},
    "sglang_router.launch_router": {"RouterArgs": RouterArgs},
}


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (_Inert,), {})
        setattr(self, name, value)
        return value


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname.split(".")[0] not in STUBBED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: Any) -> types.ModuleType:
        module = _StubModule(spec.name)
        module.__path__ = []  # a package: its submodules are stubs too
        module.__dict__.update(_SPECIALS.get(spec.name, {}))
        if spec.name == "wandb":
            module.logged = []
            module.log = lambda metrics, *args, **kwargs: module.logged.append(dict(metrics))
            module.run = None
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run."""


@contextlib.contextmanager
def slime_runtime(slime_src: Path, megatron_src: Path | None = None) -> Iterator[None]:
    before_modules = set(sys.modules)
    before_path = list(sys.path)
    shadowed = {name: sys.modules.pop(name) for name in list(sys.modules) if name.split(".")[0] in STUBBED}
    finder = _StubFinder()
    sys.meta_path.insert(0, finder)
    sys.path[:0] = [str(slime_src)] + ([str(megatron_src)] if megatron_src is not None else [])
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        sys.path[:] = before_path
        # slime's, Megatron's and the stubs' modules go; third-party modules they imported (torch parts, httpx, ...)
        # stay: re-importing those later would load them twice.
        for name in set(sys.modules) - before_modules:
            if name.split(".")[0] in {"slime", "megatron", "plugin_contracts", *STUBBED}:
                del sys.modules[name]
        sys.modules.update(shadowed)
