"""What the recipe's command-line tools share: one-line argument errors, the --user-* flags, atomic file writes."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any, NoReturn

EXIT_USAGE = 2


class OneLineErrorParser(argparse.ArgumentParser):
    """Bad arguments print one line naming the problem (and the valid choices), then exit 2: no usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def user_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The --user-* flags (evaluator, SFT trace generation) as rollout.settings.UserSimConfig keywords. The key only
    ever comes from the variable --user-api-key-env names; ValueError when that one is unset."""
    flags = {
        "kind": args.user_kind,
        "model": args.user_model,
        "base_url": args.user_base_url,
        "temperature": args.user_temperature,
    }
    overrides = {field: value for field, value in flags.items() if value is not None}
    name = args.user_api_key_env
    if name:
        if not os.environ.get(name, "").strip():
            raise ValueError(f"--user-api-key-env {name}: the environment variable {name} is not set or empty")
        overrides["api_key"] = os.environ[name]
    return overrides


def write_atomic(path: Path | str, text: str) -> None:
    """Write a file whole or not at all: a temporary file beside it, flushed to disk, then renamed over it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
