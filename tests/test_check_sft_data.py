"""examples/check_sft_data.py on files users actually end up with: a run killed mid-row, an empty file, a wrong
tokenizer path. Rows are real gold traces (examples/generate_sft_traces.py) checked with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from examples import check_sft_data, generate_sft_traces
from rollout.sft_format import iter_jsonl
from tests.engine_helpers import ROOT

SCRIPT = ROOT / "examples" / "check_sft_data.py"


@pytest.fixture(scope="module")
def gold_rows(tmp_path_factory, smollm2_model_dir) -> list[dict]:
    out = tmp_path_factory.mktemp("sft") / "gold.jsonl"
    argv = ["--output", str(out), "--no-progress", "--source", "gold", "--limit", "3"]
    assert generate_sft_traces.main([*argv, "--tokenizer", str(smollm2_model_dir)]) == 0
    rows = list(iter_jsonl(out))
    assert len(rows) == 3
    return rows


@pytest.fixture(autouse=True)
def _no_checkpoint_variable(monkeypatch):
    monkeypatch.delenv("HF_CHECKPOINT", raising=False)


def _run(*args: str) -> subprocess.CompletedProcess:
    env_free = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, env=env_free
    )


def test_torn_last_row_is_reported_and_fails(tmp_path, gold_rows, smollm2_model_dir, capsys):
    path = tmp_path / "torn.jsonl"
    whole = "".join(json.dumps(row) + "\n" for row in gold_rows)
    path.write_text(whole + json.dumps(gold_rows[0])[:500])  # a writer killed in the middle of a fourth row
    assert check_sft_data.main([str(path), "--tokenizer", str(smollm2_model_dir), "--quiet"]) == 1
    out, err = capsys.readouterr()
    assert "rows 4  ok 3  broken 1" in out
    assert "BROKEN row 3 (None): line 4 is torn (not valid JSON, no final newline" in err

    clean = tmp_path / "clean.jsonl"
    argv = [str(path), "--tokenizer", str(smollm2_model_dir), "--quiet", "--output", str(clean)]
    assert check_sft_data.main(argv) == 1
    assert list(iter_jsonl(clean)) == gold_rows  # the good rows are kept; the torn one is left out
    assert check_sft_data.main([str(clean), "--tokenizer", str(smollm2_model_dir), "--quiet"]) == 0


def test_bad_line_in_the_middle_is_a_broken_row(tmp_path, gold_rows, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(gold_rows[0]) + "\n{not json\n" + json.dumps(gold_rows[1]) + "\n")
    assert check_sft_data.main([str(path), "--quiet"]) == 1
    out, err = capsys.readouterr()
    assert "rows 3  ok 2  broken 1" in out and "BROKEN row 1 (None): line 2 is not valid JSON" in err


def test_missing_tokenizer_is_one_line(tmp_path, gold_rows):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(gold_rows[0]) + "\n")
    result = _run(str(path), "--tokenizer", "/nonexistent")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("check_sft_data.py: error: cannot load a tokenizer from --tokenizer '/nonexistent': ")
    assert result.stdout == ""


def test_tokenizer_without_chat_template_is_one_line(tmp_path, gold_rows, smollm2_model_dir, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smollm2_model_dir / name).exists():
            (bare / name).write_bytes((smollm2_model_dir / name).read_bytes())
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(gold_rows[0]) + "\n")
    with pytest.raises(SystemExit) as info:
        check_sft_data.main([str(path), "--tokenizer", str(bare)])
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        f"check_sft_data.py: error: the tokenizer in --tokenizer '{bare}' has no chat template; "
        "give the model's folder\n"
    )


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_says_so(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    result = _run(str(path))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"check_sft_data.py: error: {path} holds no rows (the file is empty); nothing to train on"
    )
