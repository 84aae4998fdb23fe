"""The command line: help text, and one-line errors with exit status 2 for bad input."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.config import DEFAULT_DATA_DIR


def run_cli(*args: str, timeout_s: float = 900.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@pytest.mark.parametrize(
    "command",
    [
        "train",
        "export",
        "serve",
        "health",
        "generate",
        "validate",
        "run",
        "report",
        "quality-report",
    ],
)
def test_help_states_every_option(command: str) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0
    assert "usage:" in result.stdout
    assert "default" in result.stdout or command == "export"


def test_missing_data_folder_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = run_cli("train", "--data", str(missing), "--store", str(tmp_path / "store"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    assert str(missing) in lines[0]
    assert "--data" in lines[0]


def test_folder_without_records_exits_2(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no WFDB here\n")
    result = run_cli("train", "--data", str(tmp_path), "--store", str(tmp_path / "store"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "no WFDB records" in result.stderr


def test_corrupt_header_is_reported_and_skipped(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for record in ("209", "220", "223"):
        for suffix in (".hea", ".dat", ".atr"):
            shutil.copy(DEFAULT_DATA_DIR / f"{record}{suffix}", data / f"{record}{suffix}")
    (data / "999.hea").write_text("999 two 360 abc\nthis is not a signal line\n")
    result = run_cli(
        "train",
        "--data",
        str(data),
        "--store",
        str(tmp_path / "store"),
        "--split",
        "random",
        "--epochs",
        "1",
        "--max-minutes",
        "0.2",
        "--max-beats-per-class",
        "100",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipped 999" in result.stdout
    assert "records read: 3" in result.stdout
    assert (tmp_path / "store" / "CURRENT").exists()


def test_serve_without_model_exits_2(tmp_path: Path) -> None:
    result = run_cli("serve", "--store", str(tmp_path / "empty"), "--port", "0")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "no trained model" in result.stderr


def test_negative_budget_exits_2(tmp_path: Path) -> None:
    result = run_cli("train", "--max-minutes", "-1", "--store", str(tmp_path / "store"))
    assert result.returncode == 2
    assert "--max-minutes=-1.0 must be greater than 0" in result.stderr


def test_rejected_request_prints_one_line(server_address: str, tmp_path: Path) -> None:
    import numpy as np

    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((5, 1, 300), dtype=np.float32))
    result = run_cli("validate", "--address", server_address, "--input", str(wrong))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "INVALID_ARGUMENT" in result.stderr
    assert "window_samples=300" in result.stderr


def test_generate_count_zero_exits_2(tmp_path: Path) -> None:
    result = run_cli("generate", "--count", "0", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "--count=0 must be at least 1" in result.stderr


def test_validate_text_file_exits_2(tmp_path: Path) -> None:
    text = tmp_path / "beats.npy"
    text.write_text("not an array\n")
    result = run_cli("validate", "--input", str(text))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "is not a NumPy .npy array file" in result.stderr
