"""Test access to the slime stand-ins that the CPU dry run also uses (examples/slime_standin.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from slime_standin import OldSample, Sample, slime_args, slime_sampling_params

__all__ = ["OldSample", "Sample", "slime_args", "slime_sampling_params"]
