"""Where the tests find slime's and Megatron-LM's real sources, and the pins of slime's image.

`SLIME_SRC` / `MEGATRON_SRC` name clones (a slime checkout holds `slime/`, a Megatron-LM one `megatron/`); without
them the pinned snapshots in `../shared/vendor/` beside the checkout are used. `SLIME_IMAGE_PINS` names the image
pins file (default: `slime-image-pins.txt` in that vendor folder or beside `SLIME_SRC`). Tests that need a missing
source skip with a message naming the variable to set.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENDOR = ROOT.parent / "shared" / "vendor"
SLIME_COMMIT_DIR = "slime-624b824"
MEGATRON_COMMIT_DIR = "megatron-lm-1dcf0da"


def _source(env: str, default: Path, marker: str) -> Path | None:
    raw = os.environ.get(env)
    path = Path(raw).expanduser().resolve() if raw else default
    return path if (path / marker).is_dir() else None


def slime_src() -> Path | None:
    return _source("SLIME_SRC", VENDOR / SLIME_COMMIT_DIR, "slime")


def megatron_src() -> Path | None:
    return _source("MEGATRON_SRC", VENDOR / MEGATRON_COMMIT_DIR, "megatron")


def image_pins() -> Path | None:
    candidates = [os.environ.get("SLIME_IMAGE_PINS"), VENDOR / "slime-image-pins.txt"]
    slime = slime_src()
    if slime is not None:
        candidates.append(slime.parent / "slime-image-pins.txt")
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def require_slime() -> Path:
    path = slime_src()
    if path is None:
        pytest.skip(
            f"slime's source not found: set SLIME_SRC to a slime clone (default {VENDOR / SLIME_COMMIT_DIR})",
            allow_module_level=True,
        )
    return path


def require_megatron() -> Path:
    path = megatron_src()
    if path is None:
        pytest.skip(
            f"Megatron-LM's source not found: set MEGATRON_SRC to a clone at the commit slime's image uses "
            f"(default {VENDOR / MEGATRON_COMMIT_DIR})",
            allow_module_level=True,
        )
    return path


def require_image_pins() -> Path:
    path = image_pins()
    if path is None:
        pytest.skip(
            f"slime's image pins not found: set SLIME_IMAGE_PINS (default {VENDOR / 'slime-image-pins.txt'})",
            allow_module_level=True,
        )
    return path
