"""The command line: help text, and one-line errors with exit status 2 for bad input."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from appliance.config import DEFAULT_DATA_DIR


def run_cli(
    *args: str, timeout_s: float = 900.0, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        cwd=cwd,
    )


@pytest.mark.parametrize(
    "command",
    [
        "train",
        "export",
        "serve",
        "health",
        "info",
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
    assert "default" in result.stdout


def test_top_level_help_is_plain() -> None:
    from appliance.__main__ import PARSER_DESCRIPTION

    result = run_cli("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert PARSER_DESCRIPTION in text
    # The module docstring (reStructuredText and notes on imports) is not the help text.
    assert "``" not in result.stdout
    assert "PyTorch" not in result.stdout
    for command in ("train", "export", "serve", "health", "info", "generate", "report", "run"):
        assert f"\n    {command} " in result.stdout
    assert "quality-report" in result.stdout
    assert "score beats from a .npy, .csv or WFDB file" in text
    assert "DEBUG, INFO, WARNING, ERROR" in text


def test_export_help_states_data_default() -> None:
    result = run_cli("export", "--help")
    assert result.returncode == 0
    assert "(default: the bundled MIT-BIH records)" in " ".join(result.stdout.split())


def test_validate_folder_names_files(tmp_path: Path) -> None:
    import numpy as np

    np.save(tmp_path / "synthetic.npy", np.zeros((2, 1, 256), dtype=np.float32))
    result = run_cli("validate", "--address", "127.0.0.1:1", "--input", str(tmp_path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"--input {tmp_path} is a folder; it contains synthetic.npy." in result.stderr
    assert f"e.g. {tmp_path / 'synthetic.npy'}" in result.stderr


def test_serve_run_folder_names_store(model_store: Path, tmp_path: Path) -> None:
    run_folder = tmp_path / "run"
    shutil.copytree(model_store, run_folder / "model-store")
    result = run_cli("serve", "--store", str(run_folder), "--port", "0", timeout_s=300.0)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert f"but {run_folder / 'model-store'} has one; pass --store" in result.stderr


def test_export_rejects_file_not_checkpoint(tmp_path: Path) -> None:
    not_checkpoint = tmp_path / "notes.pt"
    not_checkpoint.write_text("# not a checkpoint\n")
    result = run_cli("export", "--checkpoint", str(not_checkpoint), "--store", str(tmp_path / "s"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert f"{not_checkpoint} is not a checkpoint written by `train`" in result.stderr
    assert not (tmp_path / "s").exists()


def test_export_checks_training_records(
    trained_result, trained_work_dir: Path, shared_data: Path, tmp_path: Path
) -> None:
    from appliance.store import load_current

    checkpoint = str(trained_work_dir / "best.pt")
    # The full database splits differently, so its training beats are not the bundled ones.
    other = run_cli(
        "export",
        "--checkpoint",
        checkpoint,
        "--data",
        str(shared_data / "mitdb"),
        "--store",
        str(tmp_path / "other"),
    )
    assert other.returncode != 0
    assert "Traceback" not in other.stderr
    assert "does not give the training beats of checkpoint" in other.stderr
    assert "records not trained on: " in other.stderr
    assert not (tmp_path / "other").exists()

    same = run_cli("export", "--checkpoint", checkpoint, "--store", str(tmp_path / "same"))
    assert same.returncode == 0, same.stderr
    manifest = load_current(tmp_path / "same").manifest
    # The manifest records the ingested data as a training run's manifest does.
    assert set(manifest["data"]["records"]) == {p.stem for p in DEFAULT_DATA_DIR.glob("*.hea")}
    # The weights were trained when the checkpoint was saved, not at this export.
    saved = datetime.fromtimestamp((trained_work_dir / "best.pt").stat().st_mtime, UTC)
    assert manifest["trained_at"] == saved.isoformat(timespec="seconds")
    assert manifest["trained_at"] <= manifest["exported_at"]
    # The training beats per class are those of the training run, so GetModelInfo has them.
    trained = trained_result.summary
    assert manifest["training"]["train_class_counts"] == trained["train_class_counts"]
    assert manifest["training"]["train_beats"] == trained["train_beats"]
    assert manifest["training"]["learnt_class_counts"] == trained["learnt_class_counts"]

    # The same weights again: the store keeps its version instead of a copy of it.
    again = run_cli("export", "--checkpoint", checkpoint, "--store", str(tmp_path / "same"))
    assert again.returncode == 0, again.stderr
    assert f"model {manifest['model_id']} is unchanged" in again.stdout
    assert "published model" not in again.stdout
    assert len(list((tmp_path / "same" / "versions").iterdir())) == 1


def test_export_store_write_failures_named(
    trained_result, trained_work_dir: Path, tmp_path: Path
) -> None:
    checkpoint = str(trained_work_dir / "best.pt")
    store_file = tmp_path / "store-file"
    store_file.write_text("not a folder\n")
    as_file = run_cli("export", "--checkpoint", checkpoint, "--store", str(store_file))
    assert as_file.returncode == 2
    assert "Traceback" not in as_file.stderr
    assert f"--store {store_file} is a file; pass a folder" in as_file.stderr
    # A file where the store keeps its versions fails only when the version is written.
    store = tmp_path / "store"
    store.mkdir()
    (store / "versions").write_text("in the way\n")
    blocked = run_cli("export", "--checkpoint", checkpoint, "--store", str(store))
    assert blocked.returncode == 1
    assert "Traceback" not in blocked.stderr
    assert f"writing the model version to store {store} failed" in blocked.stderr
    assert "the store's current version is unchanged" in blocked.stderr
    assert not (store / "CURRENT").exists()


def test_mistyped_option_shows_command_usage(tmp_path: Path) -> None:
    result = run_cli("generate", "--coutn", "10", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "usage: python -m appliance generate" in result.stderr
    assert "python -m appliance generate: error: unrecognized arguments: --coutn 10" in (
        result.stderr
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("entry", "value", "message"),
    [
        ("model", {}, "has weights that do not fit its own model settings"),
        ("config", 1, "has invalid settings under 'config'"),
        ("train_records", "106", "has an invalid 'train_records' entry"),
        ("scale_mv", -0.4, "has scale_mv=-0.4 (a positive number of mV)"),
        ("classes_known", ["N", "Z"], "has classes_known=['N', 'Z'] (distinct names"),
        ("classes_known", [], "has classes_known=[] (distinct names"),
    ],
)
def test_export_rejects_damaged_checkpoint(
    trained_result, trained_work_dir: Path, tmp_path: Path, entry: str, value: object, message: str
) -> None:
    import torch

    state = torch.load(trained_work_dir / "best.pt", weights_only=True)
    state[entry] = value
    damaged = tmp_path / "damaged.pt"
    torch.save(state, damaged)
    result = run_cli("export", "--checkpoint", str(damaged), "--store", str(tmp_path / "s"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"checkpoint {damaged} {message}" in result.stderr
    assert not (tmp_path / "s").exists()


def test_unknown_log_level_exits_2() -> None:
    result = run_cli("--log-level", "foo", "health", "--address", "127.0.0.1:1")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "argument --log-level: invalid choice: 'FOO'" in result.stderr
    assert "'DEBUG', 'INFO', 'WARNING', 'ERROR'" in result.stderr


def test_log_level_ignores_case() -> None:
    # Port 1 on loopback has no listener, so the command gets as far as the failed call.
    result = run_cli("--log-level", "warning", "health", "--address", "127.0.0.1:1")
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot reach 127.0.0.1:1: UNAVAILABLE: ")


@pytest.mark.parametrize(
    ("argv", "level"),
    [
        (["health"], "INFO"),
        (["--log-level", "debug", "health"], "DEBUG"),
        (["health", "--log-level", "error"], "ERROR"),
        (["--log-level", "debug", "health", "--log-level", "warning"], "WARNING"),
    ],
)
def test_log_level_before_or_after_command(argv: list[str], level: str) -> None:
    from appliance.__main__ import build_parser

    args, unknown = build_parser().parse_known_args(argv)
    assert unknown == []
    assert args.log_level == level


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--seed", "-1", "--seed=-1 is out of range; use 0 to 2^32 - 1"),
        ("--threads", "-3", "--threads=-3 must be 0 (PyTorch's own choice) or a positive count"),
        ("--learning-rate", "inf", "--learning-rate=inf must be a finite number"),
        ("--annotation-extension", "../x", "--annotation-extension='../x' must be letters"),
    ],
)
def test_train_bad_option_exits_2(tmp_path: Path, option: str, value: str, message: str) -> None:
    store = tmp_path / "store"
    result = run_cli(
        "train", "--data", str(DEFAULT_DATA_DIR), "--store", str(store), option, value
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    # The check runs before ingest, so no record was read.
    assert "records read" not in result.stdout + result.stderr


@pytest.mark.parametrize("command", ["train", "run"])
@pytest.mark.parametrize("kind", ["missing", "file"])
def test_missing_data_folder_exits_2(tmp_path: Path, command: str, kind: str) -> None:
    data = tmp_path / "nowhere"
    if kind == "file":
        data.write_text("not a WFDB folder\n")
    output = tmp_path / "output"
    option = "--store" if command == "train" else "--out"
    result = run_cli(command, "--data", str(data), option, str(output))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    assert str(data) in lines[0]
    assert "--data" in lines[0]
    # The check runs before any output folder is made.
    assert not output.exists()


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
        "5",
        "--max-beats-per-class",
        "100",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # The table is logged once, with the skip reason; standard output ends with its totals.
    assert "skipped 999" in result.stderr
    assert "skipped 999" not in result.stdout
    assert (result.stdout + result.stderr).count("split       ") == 1
    assert "records read: 3  skipped: 1  beats: train " in result.stdout
    assert "reasons and warnings in the logged ingest summary" in result.stdout
    assert (tmp_path / "store" / "CURRENT").exists()


def test_serve_without_model_exits_2(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = run_cli("serve", "--store", str(tmp_path / "empty"), "--port", "0")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "no trained model" in result.stderr
    # The store is checked before the port opens, so no listening line is logged.
    assert "server listening" not in result.stderr

    missing = run_cli("serve", "--store", str(tmp_path / "mistyped"), "--port", "0")
    assert missing.returncode == 2
    assert "mistyped does not exist; check --store" in missing.stderr
    assert "server listening" not in missing.stderr


@pytest.mark.parametrize("port", ["99999", "70000", "65536", "-1", "http"])
def test_serve_port_out_of_range_exits_2(tmp_path: Path, port: str) -> None:
    # gRPC would bind 99999 as 34463; the store is empty, so a server that started would
    # fail with "no trained model" instead.
    result = run_cli("serve", "--store", str(tmp_path / "empty"), "--port", port)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"argument --port: '{port}' is not a TCP port" in result.stderr
    assert "pass a number from 0 to 65535" in result.stderr
    assert "no trained model" not in result.stderr


def test_serve_port_file_in_missing_folder_exits_2(model_store: Path, tmp_path: Path) -> None:
    port_file = tmp_path / "missing" / "server.port"
    result = run_cli(
        "serve", "--store", str(model_store), "--port", "0", "--port-file", str(port_file)
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"folder {port_file.parent} does not exist" in result.stderr
    assert not port_file.parent.exists()


def test_serve_port_file_on_folder_exits_2(model_store: Path, tmp_path: Path) -> None:
    # A folder at the port file's path makes the final rename fail.
    port_file = tmp_path / "taken"
    port_file.mkdir()
    result = run_cli(
        "serve", "--store", str(model_store), "--port", "0", "--port-file", str(port_file)
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"--port-file {port_file}: writing it failed" in result.stderr
    assert not port_file.with_suffix(".tmp").exists()


def test_serve_threads_above_cpus_exit_2(model_store: Path, tmp_path: Path) -> None:
    # ONNX Runtime starts every thread while it loads, so a huge count must fail before that.
    port_file = tmp_path / "server.port"
    result = run_cli(
        "serve",
        "--store",
        str(model_store),
        "--port",
        "0",
        "--port-file",
        str(port_file),
        "--intra-op-threads",
        "100000",
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "--intra-op-threads 100000 is invalid: it must be at most" in result.stderr
    assert "engine loaded" not in result.stderr
    assert not port_file.exists()


def test_negative_budget_exits_2(tmp_path: Path) -> None:
    result = run_cli("train", "--max-minutes", "-1", "--store", str(tmp_path / "store"))
    assert result.returncode == 2
    assert "--max-minutes=-1.0 must be greater than 0" in result.stderr


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--grace-s", "-5"),
        ("--drain-s", "nan"),
        ("--max-message-bytes", "0"),
        ("--max-message-bytes", "2147483648"),
    ],
)
def test_serve_bad_setting_exits_2(tmp_path: Path, flag: str, value: str) -> None:
    result = run_cli("serve", flag, value, "--store", str(tmp_path / "store"), "--port", "0")
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {flag} ")
    assert "is invalid" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (("--tls-ca", "ca.pem", "--tls-cert", "ca.pem"), "--tls-cert and --tls-key go together"),
        (("--tls-ca", "ca.pem", "--tls-key", "ca.pem"), "--tls-cert and --tls-key go together"),
        (("--tls-cert", "ca.pem", "--tls-key", "ca.pem"), "--tls-cert needs --tls-ca"),
        (("--tls-ca", "missing.pem"), "CA certificate missing.pem cannot be read"),
        (("--tls-ca", "."), "CA certificate . cannot be read (Is a directory)"),
    ],
)
def test_client_tls_files_checked(tmp_path: Path, files: tuple[str, ...], message: str) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    result = run_cli("health", "--address", "127.0.0.1:1", *files, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert "Check failed" not in result.stderr


@pytest.mark.parametrize("planted", ["link", "dangling link", "folder"])
def test_generate_refuses_planted_output(tmp_path: Path, planted: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    target = out / "synthetic.npy"
    if planted == "link":
        target.symlink_to(victim)
    elif planted == "dangling link":
        target.symlink_to(tmp_path / "missing.npy")
    else:
        target.mkdir()
    result = run_cli("generate", "--address", "127.0.0.1:1", "--count", "2", "--out", str(out))
    assert result.returncode == 2
    assert f"{target} is " in result.stderr
    assert "remove it or pass another folder" in result.stderr
    assert victim.read_text() == "keep me\n"


def test_generate_refuses_dangling_out_link(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "missing")
    result = run_cli("generate", "--address", "127.0.0.1:1", "--count", "2", "--out", str(out))
    assert result.returncode == 2
    assert "is a symbolic link to a missing path" in result.stderr
    assert "probe folder" not in result.stderr


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


def test_validate_broken_classes_json_exits_2(tmp_path: Path) -> None:
    import numpy as np

    beats = tmp_path / "beats.npy"
    np.save(beats, np.zeros((3, 1, 256), dtype=np.float32))
    labels = tmp_path / "beats_classes.json"
    labels.write_text('{"classes": ["N", "N", "V"],}')
    result = run_cli("validate", "--input", str(beats))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"--input {beats}: the classes file {labels} is not valid JSON (" in result.stderr
    assert "Expecting property name" in result.stderr

    # A string or a mapping would otherwise be read as one class per character or key.
    for content in (
        '{"labels": ["N", "N", "V"]}',
        '{"classes": "NNV"}',
        '{"classes": {"0": "N", "1": "N", "2": "V"}}',
        '{"classes": ["N", 1, "V"]}',
        '["N", "N", "V"]',
    ):
        labels.write_text(content)
        result = run_cli("validate", "--input", str(beats))
        assert result.returncode == 2, content
        assert "Traceback" not in result.stderr
        assert (
            f"the classes file {labels} has no list of class names under the key 'classes', "
            'such as {"classes": ["N", "V", null]}'
        ) in result.stderr, content


def _write_bad_input(folder: Path, kind: str) -> Path:
    """Write one damaged validate input of ``kind`` into ``folder`` and return its path."""
    import numpy as np

    if kind == "empty npy":
        path = folder / "empty.npy"
        path.write_bytes(b"")
    elif kind == "npy header claims 100M beats":
        path = folder / "huge.npy"
        np.save(path, np.zeros((1, 1, 256), np.float32))
        path.write_bytes(path.read_bytes().replace(b"(1, 1, 256)", b"(100000000, 1, 256)"))
    elif kind == "pickle named npy":
        path = folder / "pickled.npy"
        path.write_bytes(pickle.dumps({"beats": [1.0, 2.0]}))
    elif kind == "object npy":
        path = folder / "objects.npy"
        np.save(path, np.array([{"beat": 1}, None], dtype=object), allow_pickle=True)
    elif kind == "complex npy":
        path = folder / "complex.npy"
        np.save(path, np.zeros((2, 1, 256), np.complex64))
    elif kind == "classes file is a folder":
        path = folder / "beats.npy"
        np.save(path, np.zeros((2, 1, 256), np.float32))
        (folder / "beats_classes.json").mkdir()
    elif kind == "binary csv":
        path = folder / "binary.csv"
        path.write_bytes(b"class,score,MLII_0\n\x96\x97\n")
    elif kind == "ragged csv":
        path = folder / "ragged.csv"
        path.write_text("class,score,MLII_0,MLII_1\nN,1,0.1\n")
    elif kind == "csv without samples":
        path = folder / "nolead.csv"
        path.write_text("class,score\nN,1\n")
    elif kind == "csv with uneven leads":
        path = folder / "uneven.csv"
        path.write_text("class,score,MLII_0,MLII_1,V1_0\nN,1,0.1,0.2,0.3\n")
    elif kind == "csv beyond float32":
        path = folder / "huge.csv"
        path.write_text("class,score,MLII_0,MLII_1\nN,1,0.1,1e300\n")
    elif kind == "scalar npy with classes file":
        path = folder / "scalar.npy"
        np.save(path, np.float32(1.0))
        (folder / "scalar_classes.json").write_text('{"classes": []}')
    elif kind == "fs_hz as text":
        path = folder / "beats.npy"
        np.save(path, np.zeros((2, 1, 256), np.float32))
        (folder / "beats_classes.json").write_text('{"classes": ["N", "N"], "fs_hz": "360"}')
    elif kind == "npz archive":
        path = folder / "arrays.npz"
        np.savez(path, beats=np.zeros((2, 1, 256), np.float32))
    elif kind == "npy without beats":
        path = folder / "none.npy"
        np.save(path, np.zeros((0, 1, 256), np.float32))
    elif kind == "npy beyond float32":
        path = folder / "f64.npy"
        beats = np.zeros((2, 1, 256))
        beats[1, 0, 7] = 1e300
        np.save(path, beats)
    else:
        path = folder / "text.csv"
        path.write_text("class,score,MLII_0\nN,1,abc\n")
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("empty npy", "is not a NumPy .npy array file"),
        ("npy header claims 100M beats", "is not a NumPy .npy array file"),
        ("object npy", "is a .npy file of Python objects, not numbers"),
        ("pickle named npy", "is not a NumPy .npy array file"),
        ("complex npy", "contains values of type complex64"),
        ("classes file is a folder", "beats_classes.json is not a file"),
        ("binary csv", "is not UTF-8 text"),
        ("ragged csv", "line 2 has 3 values, but the header has 4 columns"),
        ("csv without samples", "has no sample columns after 'class,score'"),
        ("csv with uneven leads", "of unequal count per lead (MLII 2, V1 1)"),
        ("csv beyond float32", "beat 0 has the value 1e+300, beyond the float32 range"),
        ("scalar npy with classes file", "contains a single number, not beats"),
        ("fs_hz as text", "gives fs_hz='360', which is not a number; write the sampling rate"),
        ("npz archive", "is a .npz archive, which validate does not read; save the beats"),
        ("npy without beats", "is empty: it contains 0 beats"),
        ("npy beyond float32", "beat 1 has the value 1e+300, beyond the float32 range"),
        ("text csv", "line 2 has 'abc', which is not a number"),
    ],
)
def test_validate_damaged_input_exits_2(tmp_path: Path, kind: str, message: str) -> None:
    path = _write_bad_input(tmp_path, kind)
    result = run_cli("validate", "--address", "127.0.0.1:1", "--input", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: --input {path}")
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert "Warning" not in result.stderr


def test_validate_wfdb_without_annotations_exits_2(tmp_path: Path) -> None:
    import numpy as np
    import wfdb

    wfdb.wrsamp(
        "plain",
        fs=360,
        units=["mV"],
        sig_name=["MLII"],
        p_signal=np.zeros((512, 1)),
        fmt=["16"],
        write_dir=str(tmp_path),
    )
    header = tmp_path / "plain.hea"
    result = run_cli("validate", "--address", "127.0.0.1:1", "--input", str(header))
    assert result.returncode == 2
    assert f"WFDB record {tmp_path / 'plain'} has no beat annotation file plain.atr" in (
        result.stderr
    )
    assert "pass --recording, which cuts one window per annotated beat" in result.stderr
    assert "cut one window per beat" in result.stderr
    assert "remove its baseline wander first (the 0.5 Hz high-pass" in result.stderr
    assert "Traceback" not in result.stderr


def test_validate_unknown_class_names_beat(tmp_path: Path) -> None:
    import json

    import numpy as np

    beats = tmp_path / "beats.npy"
    np.save(beats, np.zeros((3, 1, 256), dtype=np.float32))
    labels = tmp_path / "beats_classes.json"
    labels.write_text(json.dumps({"classes": ["N", "X", "V"]}))
    result = run_cli("validate", "--input", str(beats))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{labels} gives beat index 1 the class 'X', which is not an AAMI class" in (
        result.stderr
    )
    assert "not an AAMI class (N, S, V, F, Q); use a class that the model knows" in result.stderr
    assert "or pass --best-class" in result.stderr

    table = tmp_path / "beats.csv"
    header = "class,score," + ",".join(f"MLII_{i}" for i in range(256))
    row = ",".join(["0.0"] * 256)
    table.write_text(f"{header}\nN,0.9,{row}\nV,0.9,{row}\nB,0.9,{row}\n")
    result = run_cli("validate", "--input", str(table))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"--input {table}: {table} gives beat index 2 the class 'B'" in result.stderr


def test_validate_text_file_exits_2(tmp_path: Path) -> None:
    text = tmp_path / "beats.npy"
    text.write_text("not an array\n")
    result = run_cli("validate", "--input", str(text))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "is not a NumPy .npy array file" in result.stderr


@pytest.mark.parametrize("fmt", ["npy", "wfdb"])
def test_validate_sends_input_rate(server_address: str, tmp_path: Path, fmt: str) -> None:
    import numpy as np

    from appliance.outputs import write_beats

    # Beats that state 1000 Hz must be rejected, not scored as if sampled at the model's rate.
    beats = np.random.default_rng(0).normal(0.0, 0.2, size=(3, 1, 256))
    write_beats(tmp_path, beats, ["N"] * 3, np.ones(3), 1000.0, 90, ["MLII"], fmt, "beats")
    source = {"npy": "beats.npy", "wfdb": "beats.hea"}[fmt]
    result = run_cli("validate", "--address", server_address, "--input", str(tmp_path / source))
    assert result.returncode == 2, result.stdout
    assert "INVALID_ARGUMENT" in result.stderr
    assert "fs_hz" in result.stderr
    assert "1000" in result.stderr


@pytest.mark.parametrize(
    ("amount", "option"),
    [
        (["--count", "4294967296"], "--count=4294967296"),
        (["--classes", "N=99999,V=2"], "--classes"),
    ],
)
def test_generate_over_server_limit_exits_2(
    server_address: str, tmp_path: Path, amount: list[str], option: str
) -> None:
    out = tmp_path / "out"
    result = run_cli("generate", "--address", server_address, *amount, "--out", str(out))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert option in result.stderr
    assert "over this server's limit of 100000 beats per request" in result.stderr
    assert "request 1 to 100000" in result.stderr
    assert not (out / "synthetic.npy").exists()


@pytest.mark.parametrize("fmt", ["npy", "csv", "wfdb"])
def test_validate_reads_generated_formats(server_address: str, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / "out"
    # The csv case requests a total count, the others request counts per class.
    amount = ["--count", "7"] if fmt == "csv" else ["--classes", "N=4,V=3"]
    generated = run_cli(
        "generate",
        "--address",
        server_address,
        *amount,
        "--margin",
        "0",
        "--seed",
        "3",
        "--format",
        fmt,
        "--out",
        str(out),
    )
    assert generated.returncode == 0, generated.stderr
    assert "accepted 7 of 7" in generated.stdout
    assert "accepted beyond the request and dropped" in generated.stdout
    if fmt == "csv":
        from appliance.client import ApplianceClient, class_name

        with ApplianceClient(server_address) as client:
            known = [class_name(v) for v in client.model_info().classes_known]
        # Every class of the model is listed, and those that got no beat show 0.
        tally = re.search(r"^per class: (.*)$", generated.stdout, re.MULTILINE)
        assert tally is not None
        parts = [part.split(" ") for part in tally.group(1).split(", ")]
        assert [name for name, _ in parts] == known
        assert sum(int(count) for _, count in parts) == 7
    else:
        assert "per class: N 4 of 4, V 3 of 3" in generated.stdout

    source = {"npy": "synthetic.npy", "csv": "synthetic.csv", "wfdb": "synthetic.hea"}[fmt]
    result = run_cli(
        "validate", "--address", server_address, "--input", str(out / source), "--margin", "0"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "index\tscore\tresult\tclass"
    classes = [line.split("\t")[3] for line in lines[1:-1]]
    if fmt == "csv":
        rows = (out / source).read_text().splitlines()[1:]
        expected = sorted(row.split(",")[0] for row in rows)
        # Seven beats spread over the known classes, so at least two classes.
        assert len(set(expected)) >= 2
    else:
        expected = ["N"] * 4 + ["V"] * 3
    assert sorted(classes) == expected
    scored_under = (
        f"the classes in {out / 'synthetic_classes.json'}"
        if fmt == "npy"
        else "the classes of the input"
    )
    assert lines[-1] == f"accepted 7 of 7 at margin 0.000, scored under {scored_under}"
    assert "differ from the model's leads" not in result.stderr
    # Beats that name another lead are scored, with a warning that names both.
    if fmt == "npy":
        labels = out / "synthetic_classes.json"
        labels.write_text(labels.read_text().replace('"leads": ["MLII"]', '"leads": ["V1"]'))
    elif fmt == "csv":
        (out / source).write_text((out / source).read_text().replace("MLII_", "V1_"))
    else:
        header = out / "synthetic.hea"
        header.write_text(header.read_text().replace(" MLII", " V1"))
    renamed = run_cli("validate", "--address", server_address, "--input", str(out / source))
    assert renamed.returncode == 0, renamed.stderr
    assert f"input={out / source} leads=V1 differ from the model's leads=MLII; " in (
        renamed.stderr
    )
    assert "beat annotations mark sample" not in renamed.stderr
    if fmt == "wfdb":
        # Annotations shifted by 30 samples stay in step, so only the model's R position
        # shows that the windows were cut around another point.
        import wfdb

        annotation = wfdb.rdann(str(out / "synthetic"), "atr")
        _rewrite_annotations(out / "synthetic", list(annotation.sample + 30), annotation.symbol)
        shifted = run_cli("validate", "--address", server_address, "--input", str(out / source))
        assert shifted.returncode == 0, shifted.stderr
        assert (
            f"input={out / source} beat annotations mark sample 120 of each window, but the "
            "model's windows have their R peak at sample 90; "
        ) in shifted.stderr

    best = run_cli(
        "validate",
        "--address",
        server_address,
        "--input",
        str(out / source),
        "--best-class",
    )
    assert best.returncode == 0, best.stderr
    assert best.stdout.strip().splitlines()[-1].endswith("the best-fitting class of each beat")


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        ("N=-3", "--classes count N=-3 must be at least 1"),
        ("N=5,N=6", "--classes names class N twice"),
        ("N5", "--classes item 'N5' is not NAME=COUNT"),
    ],
)
def test_generate_bad_class_counts_exit_2(tmp_path: Path, classes: str, message: str) -> None:
    result = run_cli("generate", "--classes", classes, "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert message in result.stderr


def test_generate_unknown_class_exit_2(server_address: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli(
        "generate", "--address", server_address, "--classes", "N=2,X=3", "--out", str(out)
    )
    assert result.returncode == 2
    assert (
        "--classes names X, which the model does not know (X is not an AAMI class: "
        "N, S, V, F, Q); use N"
    ) in result.stderr
    assert not out.exists()


def test_generate_unlearnt_class_names_count(server_address: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    info = run_cli("info", "--address", server_address, "--json")
    assert info.returncode == 0, info.stderr
    figures = json.loads(info.stdout)
    known = {name.removeprefix("BEAT_CLASS_") for name in figures["classes_known"]}
    unlearnt = [name for name in "NSVFQ" if name not in known]
    assert unlearnt, "the fixture model learnt every class"
    name = unlearnt[0]
    beats = int(figures["train_class_counts"].get(name, 0))
    result = run_cli(
        "generate", "--address", server_address, "--classes", f"{name}=3", "--out", str(out)
    )
    assert result.returncode == 2
    assert f"({name} had {beats} training beats, too few to learn)" in result.stderr
    assert not out.exists()


def test_generate_count_with_classes_exit_2(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli("generate", "--count", "5", "--classes", "N=3", "--out", str(out))
    assert result.returncode == 2
    assert "--count=5 and --classes=N=3 are both set" in result.stderr
    assert not out.exists()


def test_generate_again_warns_on_replaced_files(server_address: str, tmp_path: Path) -> None:
    import numpy as np

    out = tmp_path / "out"
    first = run_cli("generate", "--address", server_address, "--classes", "n=3", "--out", str(out))
    assert first.returncode == 0, first.stderr
    # Class names are matched in any case.
    assert np.load(out / "synthetic.npy").shape[0] == 3
    assert "replacing" not in first.stderr
    second = run_cli("generate", "--address", server_address, "--count", "2", "--out", str(out))
    assert second.returncode == 0, second.stderr
    warnings = [line for line in second.stderr.splitlines() if "replacing files" in line]
    assert len(warnings) == 1
    assert "files=synthetic.npy,synthetic_classes.json" in warnings[0]
    assert np.load(out / "synthetic.npy").shape[0] == 2


@pytest.mark.parametrize("out_format", ["npy", "csv", "wfdb"])
def test_generate_none_accepted_writes_nothing(
    server_address: str, tmp_path: Path, out_format: str
) -> None:
    # Draws at temperature 5 are far from the training beats, so none passes margin 0.99.
    out = tmp_path / "out"
    command = [
        "generate", "--address", server_address, "--classes", "N=4", "--margin", "0.99",
        "--temperature", "5", "--max-draws-per-beat", "1", "--seed", "3",
        "--out", str(out), "--format", out_format,
    ]  # fmt: skip
    result = run_cli(*command)
    assert result.returncode == 1, result.stderr
    assert "no beat of the 4 requested was accepted" in result.stderr
    assert "lower --margin (the call used 0.990)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
    # Files of an earlier run in the folder are named as such.
    out.mkdir()
    (out / "synthetic.csv").write_text("class,score\n")
    again = run_cli(*command)
    assert again.returncode == 1, again.stderr
    assert f"Nothing was written to {out}; the files synthetic.csv there are from an earlier" in (
        again.stderr
    )


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("timeout_s", 0.0),
        ("timeout_s", -1.0),
        ("timeout_s", float("nan")),
        ("timeout_s", float("inf")),
        ("max_receive_message_bytes", 0),
        ("max_receive_message_bytes", 2**31),
    ],
)
def test_client_rejects_bad_setting(setting: str, value: float) -> None:
    from appliance.client import ApplianceClient

    # No server is needed: the constructor checks its settings before it opens a channel.
    with pytest.raises(ValueError, match=f"{setting}={value} is invalid"):
        ApplianceClient("127.0.0.1:1", **{setting: value})


def test_write_beats_failure_keeps_earlier_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import numpy as np

    from appliance import outputs

    beats = np.zeros((2, 1, 256))
    outputs.write_beats(tmp_path, beats, ["N", "V"], np.ones(2), 360.0, 90, ["MLII"], "npy")
    earlier = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert sorted(earlier) == ["synthetic.npy", "synthetic_classes.json"]

    def save_half_then_fail(path: Path, array: np.ndarray) -> None:
        Path(path).write_bytes(b"\x93NUMPY partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs.np, "save", save_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        outputs.write_beats(
            tmp_path, np.ones((5, 1, 256)), ["N"] * 5, np.ones(5), 360.0, 90, ["MLII"], "npy"
        )
    after = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert after == earlier


def test_generate_hot_draws_hint_temperature(server_address: str, tmp_path: Path) -> None:
    # At temperature 5 most latent draws map outside the amplitude range or fail to invert.
    out = tmp_path / "out"
    result = run_cli(
        "generate", "--address", server_address, "--classes", "N=4", "--temperature", "5",
        "--max-draws-per-beat", "2", "--seed", "1", "--out", str(out),
    )  # fmt: skip
    assert "Traceback" not in result.stderr
    assert "most draws were invalid, so lower --temperature (the call used 5)" in result.stderr
    assert result.returncode == 1, result.stdout


@pytest.mark.parametrize(
    ("temperature", "used"), [(None, "the server's default, 1.0"), (3.0, "3"), (0.5, "0.5")]
)
def test_no_beat_fix_names_temperature(temperature: float | None, used: str) -> None:
    from appliance.__main__ import no_beat_fix
    from appliance.v1 import appliance_pb2 as pb

    hot = pb.GenerateStats(draws=80, invalid_rejections=71, pertinence_rejections=9, margin=0.05)
    assert no_beat_fix(hot, temperature).startswith(
        f"most draws were invalid, so lower --temperature (the call used {used}); otherwise "
        "lower --margin (the call used 0.050)"
    )
    cold = pb.GenerateStats(draws=80, invalid_rejections=40, pertinence_rejections=40, margin=0.05)
    assert no_beat_fix(cold, temperature) == (
        "lower --margin (the call used 0.050) or raise --max-draws-per-beat"
    )


def test_client_empty_generate_keeps_shape(server_address: str) -> None:
    from appliance.client import ApplianceClient

    with ApplianceClient(server_address) as client:
        info = client.model_info()
        result = client.generate(
            class_counts={"N": 4}, margin=0.99, temperature=5.0, max_draws_per_beat=1, seed=3
        )
    assert result.beats.shape == (0, len(info.leads), info.window_samples)
    assert result.classes == []
    assert result.stats.accepted == 0


def test_generate_warns_on_stale_format(server_address: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = run_cli("generate", "--address", server_address, "--count", "2", "--out", str(out))
    assert first.returncode == 0, first.stderr
    second = run_cli(
        "generate", "--address", server_address, "--count", "2", "--out", str(out),
        "--format", "csv",
    )  # fmt: skip
    assert second.returncode == 0, second.stderr
    warnings = [line for line in second.stderr.splitlines() if "another format" in line]
    assert len(warnings) == 1
    assert "files=synthetic.npy,synthetic_classes.json" in warnings[0]
    assert (out / "synthetic.csv").exists()


def test_generate_out_is_file_exit_2(tmp_path: Path) -> None:
    existing = tmp_path / "beats.npy"
    existing.write_bytes(b"")
    result = run_cli("generate", "--count", "3", "--out", str(existing))
    assert result.returncode == 2
    assert f"--out {existing} is a file; pass a folder" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("classes", ["", " "])
def test_generate_empty_classes_exit_2(tmp_path: Path, classes: str) -> None:
    out = tmp_path / "out"
    result = run_cli("generate", "--classes", classes, "--out", str(out))
    assert result.returncode == 2
    assert "--classes is empty; pass beats per class as NAME=COUNT pairs" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def unwritable_out(tmp_path: Path, case: str) -> Path:
    """Return an --out folder that cannot be created, even by root."""
    if case == "under_file":
        parent = tmp_path / "beats.npy"
        parent.write_bytes(b"")
        return parent / "out"
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc file system")
    return Path("/proc/forbidden")


@pytest.mark.parametrize("case", ["under_file", "proc"])
def test_generate_unwritable_out_exits_2(tmp_path: Path, case: str) -> None:
    out = unwritable_out(tmp_path, case)
    # Port 1 on loopback has no listener, so a check after the call would report UNAVAILABLE.
    result = run_cli(
        "generate", "--address", "127.0.0.1:1", "--count", "4", "--seed", "1", "--out", str(out)
    )
    assert result.returncode == 2
    assert f"--out {out}: creating the folder failed" in result.stderr
    assert "pass a folder that this user can create and write to" in result.stderr
    assert "UNAVAILABLE" not in result.stderr
    assert "Traceback" not in result.stderr


def test_generate_out_check_leaves_no_folder(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "out"
    result = run_cli("generate", "--address", "127.0.0.1:1", "--count", "2", "--out", str(out))
    # The folder check passes, so the command gets as far as the failed call.
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr
    assert not (tmp_path / "a").exists()


def test_generate_closed_port_names_address(tmp_path: Path) -> None:
    # Port 1 on loopback has no listener, so the connection is refused at once.
    result = run_cli(
        "generate", "--address", "127.0.0.1:1", "--count", "3", "--out", str(tmp_path / "out")
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot reach 127.0.0.1:1: UNAVAILABLE: ")
    assert "check --address" in result.stderr


def test_health_closed_port_matches_generate(tmp_path: Path) -> None:
    # Port 1 on loopback has no listener, so the connection is refused at once.
    health = run_cli("health", "--address", "127.0.0.1:1", "--timeout-s", "10", timeout_s=60.0)
    generate = run_cli(
        "generate", "--address", "127.0.0.1:1", "--count", "3", "--out", str(tmp_path / "out")
    )
    assert health.returncode == 1
    assert health.stderr.startswith("error: cannot reach 127.0.0.1:1: UNAVAILABLE: ")
    assert "check --address and that `python -m appliance serve` is running" in health.stderr
    # Nothing listens there, so no TLS setting can be the cause.
    assert "--tls-ca" not in health.stderr
    assert health.stderr == generate.stderr
    assert health.stdout == ""


# Every client command with the options it requires besides --address.
CLIENT_COMMANDS = {
    "health": [],
    "info": [],
    "generate": ["--count", "3", "--out", "OUT"],
    "validate": ["--input", "INPUT"],
    "quality-report": ["--out", "OUT"],
}


def client_command(command: str, tmp_path: Path, *options: str) -> list[str]:
    """Return the argument list of a client command, with its required options filled in."""
    import numpy as np

    beats = tmp_path / "beats.npy"
    np.save(beats, np.zeros((2, 1, 256), dtype=np.float32))
    required = [
        {"OUT": str(tmp_path / "out"), "INPUT": str(beats)}.get(value, value)
        for value in CLIENT_COMMANDS[command]
    ]
    return [command, *required, *options]


@pytest.mark.parametrize("command", sorted(CLIENT_COMMANDS))
def test_address_without_port_exits_2(tmp_path: Path, command: str) -> None:
    result = run_cli(*client_command(command, tmp_path, "--address", "localhost"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "argument --address: 'localhost' has no port" in result.stderr
    assert "pass HOST:PORT, e.g. 127.0.0.1:50051" in result.stderr


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("[::1]", "'[::1]' has no port"),
        ("127.0.0.1:", "'127.0.0.1:' has no port"),
        ("dns:///localhost", "'dns:///localhost' has no port"),
        ("ipv4:127.0.0.1:1,127.0.0.2", "'ipv4:127.0.0.1:1,127.0.0.2' has no port"),
        ("::1:50051", "'::1:50051' is an IPv6 address without brackets"),
        ("[::1:50051", "'[::1:50051' has no closing ']'"),
        ("[::1]x:50051", "'[::1]x:50051' has no port"),
        (":50051", "':50051' has no host"),
        ("127.0.0.1:70000", "'127.0.0.1:70000' has port '70000'; a port is a number from 1"),
        ("127.0.0.1:0", "'127.0.0.1:0' has port '0'"),
        ("127.0.0.1:http", "'127.0.0.1:http' has port 'http'"),
        (
            "http://127.0.0.1:50051/",
            "'http://127.0.0.1:50051/' starts with the scheme http://, which gRPC does not take; "
            "pass HOST:PORT, e.g. 127.0.0.1:50051,",
        ),
    ],
)
def test_invalid_address_exits_2(address: str, message: str) -> None:
    result = run_cli("health", "--address", address)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"argument --address: {message}" in result.stderr


@pytest.mark.parametrize(
    "address", ["[::1]:1", "ipv4:127.0.0.1:1", "dns:///127.0.0.1:1", "unix:SOCKET"]
)
def test_accepted_address_forms_dial(tmp_path: Path, address: str) -> None:
    # Nothing listens on port 1 or at the socket path, so each call fails after dialling.
    address = address.replace("SOCKET", str(tmp_path / "missing.sock"))
    result = run_cli("health", "--address", address, "--timeout-s", "10", timeout_s=60.0)
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: cannot reach {address}: UNAVAILABLE: ")


@pytest.mark.parametrize("timeout", ["0", "-5", "nan", "inf", "soon", "1e10"])
def test_timeout_not_positive_exits_2(tmp_path: Path, timeout: str) -> None:
    result = run_cli(*client_command("generate", tmp_path, "--timeout-s", timeout))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"argument --timeout-s: '{timeout}' must be a number of seconds greater than 0" in (
        result.stderr
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("command", "default_s"), [("health", "10"), ("generate", "300")])
def test_timeout_default_per_command(command: str, default_s: str) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0
    help_text = " ".join(result.stdout.split())
    assert f"deadline of each call in seconds, greater than 0 (default: {default_s})" in help_text


@pytest.mark.parametrize("seconds", ["0", "-1", "nan"])
def test_stalled_send_not_positive_exits_2(tmp_path: Path, seconds: str) -> None:
    store = tmp_path / "store"
    result = run_cli("serve", "--store", str(store), "--port", "0", "--stalled-send-s", seconds)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert (
        f"argument --stalled-send-s: '{seconds}' must be a number of seconds greater than 0"
        in (result.stderr)
    )


@pytest.mark.parametrize("command", sorted(CLIENT_COMMANDS))
def test_deadline_names_timeout_option(tmp_path: Path, command: str) -> None:
    import socket

    # A socket that accepts connections and never speaks HTTP/2, so every call runs until
    # its deadline.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        arguments = client_command(command, tmp_path, "--address", address, "--timeout-s", "0.5")
        result = run_cli(*arguments, timeout_s=120.0)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    # validate also logs a warning that the all-zero beats are probably not in mV.
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith(
        f"error: the call to {address} did not finish within --timeout-s=0.5 s "
        "(DEADLINE_EXCEEDED: "
    )
    assert errors[0].endswith("; raise --timeout-s")


def test_info_prints_model_summary(server_address: str) -> None:
    from appliance.client import ApplianceClient, class_name

    result = run_cli("info", "--address", server_address)
    assert result.returncode == 0, result.stderr
    with ApplianceClient(server_address) as client:
        info = client.model_info()
    # Labels are padded to one column, where every value starts. Quality figures after the
    # first have an empty label.
    lines = result.stdout.splitlines()
    column = lines[0].index(info.model_id)
    rows = [(line[:column].strip(), line[column:]) for line in lines]
    by_label = {label: value for label, value in rows if label}
    assert by_label["model id"] == info.model_id
    assert by_label["trained at"] == info.trained_at
    assert by_label["sampling rate"] == "360 Hz"
    assert by_label["window"] == "256 samples, 90 before the R peak"
    assert by_label["leads"] == ", ".join(info.leads)
    for value in info.classes_known:
        name = class_name(value)
        assert f"{name} {info.train_class_counts[name]}" in by_label["classes"]
    assert (
        by_label["bottleneck"] == f"{info.bottleneck_dims} of {info.latent_dims} latent dimensions"
    )
    assert by_label["tail scale"] == f"{info.tail_scale:g}"
    assert by_label["lead check"] == "on"
    assert by_label["max message"] == f"{info.max_message_bytes} bytes"
    assert by_label["default margin"] == (
        f"{info.default_margin:.3f} (a request may set {info.min_margin:.3f} to "
        f"{info.max_margin:.3f})"
    )
    assert by_label["forward graph"] == f"SHA-256 {info.forward_graph_sha256}"
    assert by_label["inverse graph"] == f"SHA-256 {info.inverse_graph_sha256}"
    assert info.quality, "the fixture manifest has quality figures"
    first = [label for label, _ in rows].index("quality")
    figures = [value for _, value in rows[first : first + len(info.quality)]]
    assert figures == [f"{name} {value:.6g}" for name, value in sorted(info.quality.items())]
    assert by_label["execution provider"] == info.execution_provider


def test_info_describes_missing_lead_check() -> None:
    from appliance.client import describe_model_info
    from appliance.v1 import appliance_pb2 as pb

    text = describe_model_info(pb.GetModelInfoResponse(model_id="m", lead_check=False))
    assert "off (several leads, or too few other-lead beats)" in text
    assert " on\n" not in text


def test_info_json_parses_as_reply(server_address: str) -> None:
    import json

    from google.protobuf import json_format

    from appliance.client import ApplianceClient
    from appliance.v1 import appliance_pb2 as pb

    result = run_cli("info", "--address", server_address, "--json")
    assert result.returncode == 0, result.stderr
    with ApplianceClient(server_address) as client:
        info = client.model_info()
    parsed = json_format.Parse(result.stdout, pb.GetModelInfoResponse())
    assert parsed == info
    fields = json.loads(result.stdout)
    # Fields at their default value are printed too, so a min_margin of 0 is not missing.
    assert "min_margin" in fields
    assert "forward_graph_sha256" in fields
    counts = fields["train_class_counts"]
    assert counts and all(type(count) is int for count in counts.values())


def test_info_closed_port_matches_generate(tmp_path: Path) -> None:
    # Port 1 on loopback has no listener, so the connection is refused at once.
    info = run_cli("info", "--address", "127.0.0.1:1", timeout_s=60.0)
    generate = run_cli(
        "generate", "--address", "127.0.0.1:1", "--count", "3", "--out", str(tmp_path / "out")
    )
    assert info.returncode == 1
    assert info.returncode == generate.returncode
    assert info.stderr.startswith("error: cannot reach 127.0.0.1:1: UNAVAILABLE: ")
    assert info.stderr == generate.stderr
    assert info.stdout == ""


def test_serve_removes_port_file_on_sigterm(model_store: Path, tmp_path: Path) -> None:
    from appliance.pipeline import ServerProcess

    server = ServerProcess(model_store, tmp_path)
    address = server.wait_serving()
    assert server.port_file.read_text() == f"{address.rsplit(':', 1)[1]}\n"
    assert server.stop() == 0
    assert not server.port_file.exists()
    assert not server.port_file.with_suffix(".tmp").exists()


def test_serve_keeps_port_file_of_other_process(model_store: Path, tmp_path: Path) -> None:
    import signal

    from appliance.pipeline import ServerProcess

    server = ServerProcess(model_store, tmp_path)
    server.wait_serving()
    # Another server that reuses the path has written its own port since.
    server.port_file.write_text("65000\n")
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(timeout=60) == 0
    assert server.port_file.read_text() == "65000\n"


def test_validate_warns_on_baseline_offset(
    server_address: str, shared_data: Path, tmp_path: Path
) -> None:
    import numpy as np

    from appliance.baseline import measure_baseline_offset
    from appliance.config import DataConfig
    from appliance.ecg import read_record

    beats = read_record(shared_data / "mitdb" / "100", "100", DataConfig()).windows[:300]
    processed = tmp_path / "processed.npy"
    np.save(processed, beats)
    # -0.34 mV is the median level of record 100's raw MLII windows.
    offset = tmp_path / "offset.npy"
    np.save(offset, beats - 0.34)

    clean = run_cli("validate", "--address", server_address, "--input", str(processed))
    assert clean.returncode == 0, clean.stderr
    assert "appliance.baseline" not in clean.stderr

    shifted = run_cli("validate", "--address", server_address, "--input", str(offset))
    assert shifted.returncode == 0, shifted.stderr
    warnings = [line for line in shifted.stderr.splitlines() if "appliance.baseline" in line]
    assert len(warnings) == 1
    assert " WARNING " in warnings[0]
    expected = measure_baseline_offset(beats - 0.34)
    assert f"offset_beats={expected.offset_beats} beats=300" in warnings[0]
    assert f"median_offset_mv={expected.median_offset_mv:.3f}" in warnings[0]
    assert "docs/api.md, section 'Input beats" in warnings[0]

    # The beats are scored anyway, and the offset lowers their scores.
    clean_rows = clean.stdout.strip().splitlines()[1:-1]
    shifted_rows = shifted.stdout.strip().splitlines()[1:-1]
    assert len(shifted_rows) == 300
    clean_scores = [float(row.split("\t")[1]) for row in clean_rows]
    shifted_scores = [float(row.split("\t")[1]) for row in shifted_rows]
    assert np.median(shifted_scores) < np.median(clean_scores)


@pytest.mark.parametrize("peak_mv", [0.05, 3.0, 40.0])
def test_wfdb_output_keeps_beats_within_a_step(tmp_path: Path, peak_mv: float) -> None:
    import numpy as np
    import wfdb

    from appliance.outputs import WFDB_MAX_ADC_GAIN, WFDB_PEAK_UNITS, read_beats, write_beats

    rng = np.random.default_rng(0)
    beats = rng.uniform(-1.0, 1.0, size=(5, 2, 256))
    beats *= peak_mv / np.abs(beats).max()
    write_beats(tmp_path, beats, ["N"] * 5, np.ones(5), 360.0, 90, ["MLII", "V1"], "wfdb", "beats")
    read, classes = read_beats(tmp_path / "beats.hea")
    assert classes == ["N"] * 5
    # One step of the stored integers; rounding to the nearest step errs by at most half.
    step_mv = max(peak_mv / WFDB_PEAK_UNITS, 1.0 / WFDB_MAX_ADC_GAIN)
    header = wfdb.rdheader(str(tmp_path / "beats"))
    gains = header.adc_gain
    assert any("placed end to end, not a rhythm" in line for line in header.comments)
    # read_beats returns float32, which adds its own rounding of a few parts in 1e7.
    float32_error = float(np.finfo(np.float32).eps) * peak_mv
    for lead, gain in enumerate(gains):
        assert np.abs(read[:, lead] - beats[:, lead]).max() <= 0.5005 / gain + float32_error
    # One beat annotation at each window's R peak, pre_r_samples into the window.
    annotation = wfdb.rdann(str(tmp_path / "beats"), "atr")
    assert annotation.sample.tolist() == [256 * i + 90 for i in range(5)]
    # The step is much finer than the 1 uV of a fixed gain of 1000 units per mV.
    if peak_mv <= 3.0:
        assert step_mv < 1e-4


def test_read_beats_continuous_record_hint(shared_data: Path) -> None:
    from appliance.outputs import read_beats

    with pytest.raises(ValueError, match="cut one window per beat") as raised:
        read_beats(shared_data / "mitdb" / "100.hea")
    # The record's one rhythm annotation (+) marks no beat.
    assert "650000 samples and 2273 beat annotations" in str(raised.value)


def _rewrite_annotations(record: Path, samples: list[int], symbols: list[str]) -> None:
    """Replace the beat annotations of the WFDB record ``record`` (a path without suffix)."""
    import numpy as np
    import wfdb

    wfdb.wrann(
        record.name, "atr", np.asarray(samples), symbol=symbols, write_dir=str(record.parent)
    )


def test_read_beats_maps_mit_bih_symbols_and_units(tmp_path: Path) -> None:
    import numpy as np
    import wfdb

    from appliance.outputs import read_beats

    beats_mv = np.random.default_rng(1).uniform(-1.0, 1.0, size=(6, 1, 256))
    signal_uv = beats_mv.transpose(0, 2, 1).reshape(-1, 1) * 1000.0
    wfdb.wrsamp(
        "uv", fs=360, units=["uV"], sig_name=["MLII"], p_signal=signal_uv,
        fmt=["32"], adc_gain=[1000.0], baseline=[0], write_dir=str(tmp_path),
    )  # fmt: skip
    # MIT-BIH beat labels, and a rhythm annotation (+) that marks no window.
    _rewrite_annotations(
        tmp_path / "uv",
        [0, 90, 256 + 90, 512 + 90, 768 + 90, 1024 + 90, 1280 + 90],
        ["+", "L", "A", "E", "/", "f", "j"],
    )
    read, classes = read_beats(tmp_path / "uv.hea")
    assert classes == ["N", "S", "V", "Q", "Q", "N"]
    # The header's uV are read as mV.
    np.testing.assert_allclose(read, beats_mv, atol=1e-5)

    wfdb.wrsamp(
        "pressure", fs=360, units=["mmHg"], sig_name=["ABP"], p_signal=signal_uv / 1000.0,
        fmt=["16"], write_dir=str(tmp_path),
    )  # fmt: skip
    _rewrite_annotations(tmp_path / "pressure", [90 + 256 * i for i in range(6)], ["N"] * 6)
    with pytest.raises(ValueError, match=r"states the unit 'mmHg' for signal 0, which is not a"):
        read_beats(tmp_path / "pressure.hea")


def test_read_beats_rejects_annotations_out_of_step(tmp_path: Path) -> None:
    import numpy as np

    from appliance.outputs import read_beats, write_beats

    beats = np.zeros((20, 1, 256))
    write_beats(tmp_path, beats, ["N"] * 20, np.ones(20), 360.0, 90, ["MLII"], "wfdb", "few")
    # Ten annotations on 20 windows would read as windows of 512 samples.
    _rewrite_annotations(tmp_path / "few", [256 * i + 90 for i in range(10)], ["N"] * 10)
    with pytest.raises(ValueError) as raised:
        read_beats(tmp_path / "few.hea")
    assert str(raised.value).startswith(
        f"WFDB record {tmp_path / 'few'} has 5120 samples and 10 beat annotations, which gives "
        "windows of 512 samples, but the annotations are 256 samples apart and annotation 1, "
        "at sample 346, lies outside window 1; "
    )
    # Evenly spaced annotations that start one window late lie outside their windows too.
    _rewrite_annotations(tmp_path / "few", [256 * i + 90 for i in range(1, 21)], ["N"] * 20)
    with pytest.raises(ValueError, match=r"annotation 0, at sample 346, lies outside window 0"):
        read_beats(tmp_path / "few.hea")


def test_read_beats_headerless_csv_hint(tmp_path: Path) -> None:
    from appliance.outputs import read_beats

    plain = tmp_path / "beats.csv"
    plain.write_text("0.1,0.2,0.3\n0.2,0.3,0.4\n")
    with pytest.raises(ValueError, match="save other beats with numpy.save"):
        read_beats(plain)


@pytest.mark.parametrize("inside", ["versions", "version"])
def test_store_subfolder_names_store(model_store: Path, inside: str) -> None:
    from appliance.errors import ModelStoreError
    from appliance.store import load_current

    path = model_store / "versions"
    if inside == "version":
        path = next(path.iterdir())
    with pytest.raises(ModelStoreError, match=f"pass --store {model_store}$"):
        load_current(path)


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    """Return the ``error:`` lines of a command's standard error."""
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def usage_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """Check that a command failed with exit status 2 and one error line; return that line."""
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("option", "placement"),
    [
        ("--store", "file"),
        ("--store", "under_file"),
        ("--work-dir", "file"),
        ("--work-dir", "under_file"),
        ("--cache-dir", "file"),
    ],
)
def test_train_folder_is_file_exits_2(tmp_path: Path, option: str, placement: str) -> None:
    existing = tmp_path / "notes.txt"
    existing.write_text("not a folder\n")
    folder = existing if placement == "file" else existing / "sub"
    store = folder if option == "--store" else tmp_path / "store"
    extra = [] if option == "--store" else [option, str(folder)]
    # A data folder without records shows that the check runs before ingest reads any record.
    missing_data = tmp_path / "no-records"
    missing_data.mkdir()
    result = run_cli(
        "train", "--data", str(missing_data), "--store", str(store), *extra, timeout_s=120.0
    )
    line = usage_error_line(result)
    assert line.startswith(f"error: {option} {folder}")
    assert "pass a folder" in line
    if placement == "file":
        assert f"{option} {folder} is a file" in line
    else:
        assert "creating the folder failed (Not a directory)" in line
    assert str(missing_data) not in result.stderr
    assert existing.read_text() == "not a folder\n"


def test_run_cache_dir_is_file_exits_2(tmp_path: Path) -> None:
    cache = tmp_path / "cache.npz"
    cache.write_bytes(b"")
    (tmp_path / "no-records").mkdir()
    result = run_cli(
        "run", "--data", str(tmp_path / "no-records"), "--out", str(tmp_path / "out"),
        "--cache-dir", str(cache), timeout_s=120.0,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert error_lines(result) == [
        f"error: --cache-dir {cache} is a file; pass a folder, which is created if missing"
    ]


def test_report_missing_data_exits_2(model_store: Path, tmp_path: Path) -> None:
    result = run_cli(
        "report", "--store", str(model_store), "--data", str(tmp_path / "no-data"),
        "--out", str(tmp_path / "out"), "--log-level", "info", timeout_s=120.0,
    )  # fmt: skip
    line = usage_error_line(result)
    assert line.startswith(f"error: data folder {tmp_path / 'no-data'} does not exist")
    # The folder is checked before the engine loads the model's graphs.
    assert "engine loaded" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("placement", ["file", "under_file"])
def test_report_out_is_file_exits_2(tmp_path: Path, placement: str) -> None:
    existing = tmp_path / "quality.html"
    existing.write_text("<html></html>\n")
    out = existing if placement == "file" else existing / "report"
    # The store is missing, so a check after loading the model would name the store instead.
    result = run_cli(
        "report", "--store", str(tmp_path / "no-store"), "--data", str(DEFAULT_DATA_DIR),
        "--out", str(out), timeout_s=120.0,
    )  # fmt: skip
    line = usage_error_line(result)
    assert line.startswith(f"error: --out {out}")
    assert "pass a folder" in line
    assert "no-store" not in result.stderr


def test_report_reports_folder_is_file_exits_2(model_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(model_store, store)
    (store / "reports").write_text("")
    result = run_cli(
        "report", "--store", str(store), "--data", str(DEFAULT_DATA_DIR),
        "--out", str(tmp_path / "out"), "--log-level", "info", timeout_s=300.0,
    )  # fmt: skip
    line = usage_error_line(result)
    assert line == (
        f"error: --store {store}: {store / 'reports'} is a file, but reports are attached in a "
        "folder of that name; move the file away, or pass --no-attach to write the report to "
        "--out only"
    )
    # The check comes before the evaluation, which loads the model's graphs first.
    assert "engine loaded" not in result.stderr


def test_report_cache_dir_is_file_exits_2(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.write_text("")
    result = run_cli(
        "report", "--store", str(tmp_path / "no-store"), "--data", str(DEFAULT_DATA_DIR),
        "--out", str(tmp_path / "out"), "--cache-dir", str(cache), timeout_s=120.0,
    )  # fmt: skip
    assert result.returncode == 2
    assert error_lines(result) == [
        f"error: --cache-dir {cache} is a file; pass a folder, which is created if missing"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("temperature", ["nan", "inf", "0", "-1", "5.5"])
def test_report_temperature_out_of_range_exits_2(tmp_path: Path, temperature: str) -> None:
    from appliance.service import MAX_TEMPERATURE

    result = run_cli(
        "report", "--store", str(tmp_path / "no-store"), "--data", str(DEFAULT_DATA_DIR),
        "--out", str(tmp_path / "out"), "--temperature", temperature, "--margin", "-1",
        timeout_s=120.0,
    )  # fmt: skip
    line = usage_error_line(result)
    assert line.startswith(f"error: --temperature={float(temperature):g} is out of range")
    assert f"above 0 and at most {MAX_TEMPERATURE:g}" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("margin", ["-1", "nan", "1.5", "inf"])
def test_report_margin_out_of_range_exits_2(
    model_store: Path, tmp_path: Path, margin: str
) -> None:
    from appliance.store import load_current

    gate = load_current(model_store).manifest["gate"]
    # A missing --data folder shows that the check runs before the evaluation reads records.
    result = run_cli(
        "report", "--store", str(model_store), "--data", str(tmp_path / "no-records"),
        "--out", str(tmp_path / "out"), "--margin", margin, "--no-attach", timeout_s=300.0,
    )  # fmt: skip
    line = usage_error_line(result)
    assert line.startswith(f"error: --margin={float(margin):g} is out of range for model")
    assert f"use {gate['min_margin']:g} to {gate['max_margin']:g}" in line
    assert not (tmp_path / "out").exists()


def test_report_margin_in_range_passes(model_store: Path) -> None:
    from appliance.__main__ import _check_report_margin
    from appliance.store import load_current

    gate = load_current(model_store).manifest["gate"]
    for margin in (None, gate["min_margin"], gate["default_margin"], gate["max_margin"]):
        _check_report_margin(model_store, margin)


def test_quality_report_out_is_file_exits_2(tmp_path: Path) -> None:
    existing = tmp_path / "quality.json"
    existing.write_text("{}\n")
    # Port 1 on loopback has no listener, so a check after the call would report UNAVAILABLE.
    result = run_cli("quality-report", "--address", "127.0.0.1:1", "--out", str(existing))
    assert result.returncode == 2
    assert "UNAVAILABLE" not in result.stderr
    assert error_lines(result) == [
        f"error: --out {existing} is a file; pass a folder, which is created if missing"
    ]


def test_quality_report_warns_stale_page(model_store: Path, tmp_path: Path) -> None:
    from test_quality_report_rpc import SMALL_QUALITY

    from appliance.quality.report import build_report, embedded_html
    from appliance.report_store import attach_report
    from appliance.server import ServeConfig, create_server

    # A copy, so that the attached report stays out of the shared fixture store.
    store = tmp_path / "store"
    shutil.copytree(model_store, store)
    built = tmp_path / "built"
    summary = build_report(store, DEFAULT_DATA_DIR, built, SMALL_QUALITY, baselines=False)
    attach_report(store, summary, embedded_html(summary, built))
    server = create_server(store, ServeConfig(port=0, grace_s=1.0, drain_s=0.0))
    try:
        address = f"127.0.0.1:{server.port}"
        out = tmp_path / "out"
        full = run_cli("quality-report", "--address", address, "--out", str(out))
        assert full.returncode == 0, full.stderr
        assert "earlier quality report" not in full.stderr
        missing = len(summary["protocol"]["missing_records"])
        assert f"warning: the data folder lacked or could not read {missing} of the 44" in (
            full.stderr
        )
        page = (out / "quality.html").read_bytes()
        json_only = run_cli("quality-report", "--address", address, "--out", str(out), "--no-html")
    finally:
        server.stop()
    assert json_only.returncode == 0, json_only.stderr
    warnings = [line for line in json_only.stderr.splitlines() if " WARNING " in line]
    assert len(warnings) == 1, json_only.stderr
    assert f"page of an earlier quality report kept path={out / 'quality.html'}" in warnings[0]
    assert "remove it or pass another --out" in warnings[0]
    assert (out / "quality.html").read_bytes() == page
    assert (out / "quality.json").exists()


# Runs the command line with the modules generated from the proto file made unimportable, as in
# a fresh clone before `make proto`.
_WITHOUT_GENERATED_CODE = """
import importlib.abc, runpy, sys

class HideGenerated(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.startswith("appliance.v1.appliance_pb2"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, HideGenerated())
sys.argv = ["appliance", *sys.argv[1:]]
runpy.run_module("appliance", run_name="__main__", alter_sys=True)
"""


def _run_without_generated_code(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_GENERATED_CODE, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    "command", ["train", "export", "serve", "run", "report", "generate", "validate", "info"]
)
def test_help_without_generated_code(command: str) -> None:
    result = _run_without_generated_code(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_client_without_generated_code_names_fix() -> None:
    result = _run_without_generated_code("health", "--address", "127.0.0.1:9")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "appliance_pb2.py, generated from proto/appliance/v1/appliance.proto" in result.stderr
    assert "run `make proto`" in result.stderr


def test_stuck_thread_does_not_block_exit() -> None:
    # A non-daemon thread that never ends, as a call blocked in a read would be.
    script = (
        "import logging, threading\n"
        "from appliance.__main__ import exit_if_threads_outlive\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "threading.Thread(target=threading.Event().wait).start()\n"
        "exit_if_threads_outlive(1.0)\n"
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 30.0
    assert "calls still running 1.0 s after the server stopped" in result.stderr


def test_generate_writes_beats_that_arrived_before_a_failure(
    model_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np
    from stalled_run import stall_after_first_run

    from appliance.client import ApplianceClient, class_name
    from appliance.server import ServeConfig, create_server

    server = create_server(model_store, ServeConfig(port=0, grace_s=1.0, drain_s=0.0))
    try:
        address = f"127.0.0.1:{server.port}"
        with ApplianceClient(address) as client:
            known = [class_name(v) for v in client.model_info().classes_known]
        assert len(known) >= 2, "the fixture model knows fewer than two classes"
        engine = server.engine
        assert engine is not None
        # Each class is its own chunk: the first class arrives, the second never does.
        stall_after_first_run(engine, monkeypatch)
        out = tmp_path / "out"
        classes = f"{known[0]}=3,{known[1]}=3"
        result = run_cli(
            "generate", "--address", address, "--classes", classes, "--margin", "0",
            "--seed", "5", "--timeout-s", "2", "--out", str(out), "--format", "npy",
        )  # fmt: skip
    finally:
        server.stop()
    assert result.returncode == 1, result.stderr
    assert (
        f"wrote the 3 beats that arrived before the stream failed: {out / 'synthetic.npy'}, "
        f"{out / 'synthetic_classes.json'}"
    ) in result.stdout
    assert "the stream failed after 3 of the 6 requested beats had arrived" in result.stderr
    beats = np.load(out / "synthetic.npy")
    assert beats.shape[0] == 3
    assert np.isfinite(beats).all()
    assert json.loads((out / "synthetic_classes.json").read_text())["classes"] == [known[0]] * 3


def test_generate_stream_ended_by_server(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import argparse

    import grpc
    import numpy as np

    from appliance.__main__ import _report_rpc_error
    from appliance.client import Generated, GenerateInterruptedError
    from appliance.v1 import appliance_pb2 as pb

    class ShuttingDown(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNAVAILABLE

        def details(self) -> str:
            return "Cancelling all calls"

    received = Generated(
        np.zeros((2, 1, 256), np.float32), ["N", "N"], np.ones(2), pb.GenerateStats(), 360.0
    )
    error = GenerateInterruptedError(ShuttingDown(), received, 10)
    args = argparse.Namespace(address="127.0.0.1:50051", timeout_s=30.0)
    assert _report_rpc_error(error, args) == 1
    assert capsys.readouterr().err == (
        "error: 127.0.0.1:50051 ended the stream: UNAVAILABLE: the stream failed after 2 of "
        "the 10 requested beats had arrived: Cancelling all calls; the server may be shutting "
        "down or restarting. When it serves again, generate the 8 missing beats with another "
        "--out, so that the beats written are kept, and another --seed or none, so that they "
        "are new beats\n"
    )
    # Before any beat arrived, UNAVAILABLE still points at the address.
    assert _report_rpc_error(ShuttingDown(), args) == 1
    assert "check --address" in capsys.readouterr().err


def test_report_names_a_version_published_meanwhile(
    model_store: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import appliance.quality.report as report_module
    from appliance.__main__ import main
    from appliance.store import CURRENT_FILE, VERSIONS_DIR, load_current

    store = tmp_path / "store"
    shutil.copytree(model_store, store)
    evaluated = load_current(store)
    shutil.copytree(evaluated.path, store / VERSIONS_DIR / "v-later")

    def build_report(*args: object, **kwargs: object) -> dict[str, object]:
        # Another model is published while the evaluation runs.
        (store / CURRENT_FILE).write_text("v-later\n")
        return {
            "model_version": evaluated.path.name,
            "model_id": evaluated.manifest["model_id"],
            "protocol": {},
            "generators": {},
        }

    monkeypatch.setattr(report_module, "build_report", build_report)
    monkeypatch.setattr(report_module, "embedded_html", lambda *args: "<html></html>")
    code = main(
        ["report", "--store", str(store), "--data", str(DEFAULT_DATA_DIR), "--out",
         str(tmp_path / "out")]
    )  # fmt: skip
    assert code == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == (
        f"attached the report of model {evaluated.manifest['model_id']} to "
        f"{store / 'reports' / evaluated.path.name}, but the store's current version is now "
        "v-later: a server started from now on serves that version and returns its report, if "
        "it has one, while a server that is running keeps this model and returns this report"
    )


def test_report_unwritable_reports_folder_advises_no_attach(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import appliance.__main__ as cli

    def reject_write(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    # Root may write anywhere, so the refusal is simulated where the check writes its file.
    monkeypatch.setattr(cli.tempfile, "TemporaryFile", reject_write)
    with pytest.raises(cli.UsageError) as raised:
        cli._check_reports_folder(tmp_path)
    assert str(raised.value) == (
        f"--store {tmp_path / 'reports'}: writing a file in the folder failed (Permission "
        "denied); give this user write access to it, or pass --no-attach to write the report "
        "to --out only"
    )


@pytest.mark.parametrize("placement", ["out_is_file", "synthetic_is_file", "inside_data"])
def test_run_checks_out_before_ingest(tmp_path: Path, placement: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    record = sorted(DEFAULT_DATA_DIR.glob("*.hea"))[0].stem
    for suffix in (".hea", ".dat", ".atr"):
        shutil.copy(DEFAULT_DATA_DIR / f"{record}{suffix}", data / f"{record}{suffix}")
    out = tmp_path / "out"
    if placement == "out_is_file":
        out.write_text("not a folder\n")
        expected = f"error: --out {out} is a file; pass a folder, which is created if missing"
    elif placement == "synthetic_is_file":
        out.mkdir()
        (out / "synthetic").write_text("not a folder\n")
        expected = (
            f"error: --out {out}: {out / 'synthetic'} is a file where the job writes a folder; "
            "move it away or pass another --out"
        )
    else:
        out = data / "runs" / "latest"
        expected = f"error: --out {out} is inside --data {data}; the job writes a WFDB record"
    result = run_cli("run", "--data", str(data), "--out", str(out), timeout_s=120.0)
    line = usage_error_line(result)
    assert line.startswith(expected), line
    # The check runs before ingest, so no record was read and nothing was created.
    assert "records read" not in result.stdout + result.stderr
    assert not (data / "runs").exists()
    assert not (out / "model-store").exists()


def test_run_without_records_leaves_no_out(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("no WFDB here\n")
    out = tmp_path / "runs" / "latest"
    result = run_cli("run", "--data", str(data), "--out", str(out), timeout_s=300.0)
    line = usage_error_line(result)
    assert "no WFDB records" in line
    # The job created runs/latest, found nothing to train on and removed both folders again.
    assert not (tmp_path / "runs").exists()


def test_validate_recording_cuts_beats_like_ingest(
    server_address: str, shared_data: Path, tmp_path: Path
) -> None:
    from appliance.classes import AAMI_CLASSES
    from appliance.client import ApplianceClient
    from appliance.config import DataConfig
    from appliance.ecg import read_record

    for suffix in (".hea", ".dat", ".atr"):
        shutil.copy(shared_data / "mitdb" / f"119{suffix}", tmp_path / f"119{suffix}")
    result = run_cli(
        "validate", "--address", server_address, "--input", str(tmp_path / "119.hea"),
        "--recording", timeout_s=600.0,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    with ApplianceClient(server_address) as client:
        info = client.model_info()
    config = DataConfig(
        fs_hz=info.fs_hz,
        window_samples=info.window_samples,
        pre_r_samples=info.pre_r_samples,
        leads=(*info.leads, *DataConfig().leads),
        n_leads=len(info.leads),
    )
    expected = read_record(tmp_path / "119", "119", config)
    lines = result.stdout.splitlines()
    assert lines[0] == "index\tscore\tresult\tclass"
    rows = [line.split("\t") for line in lines[1:-1]]
    assert len(rows) == len(expected.labels) > 1900
    # Each beat is scored under the AAMI class of its annotation, V beats included.
    assert [row[3] for row in rows] == [AAMI_CLASSES[int(i)] for i in expected.labels]
    assert {row[3] for row in rows} == {"N", "V"}
    assert lines[-1].startswith("accepted ")
    assert f"beats cut from {tmp_path / '119.hea'} (leads MLII," in lines[-1]
    assert lines[-1].endswith("scored under their annotations")


def test_validate_recording_needs_wfdb_record(tmp_path: Path) -> None:
    import numpy as np

    beats = tmp_path / "beats.npy"
    np.save(beats, np.zeros((2, 1, 256), dtype=np.float32))
    result = run_cli("validate", "--address", "127.0.0.1:1", "--input", str(beats), "--recording")
    line = usage_error_line(result)
    assert line == (
        f"error: --input {beats}: --recording reads a continuous WFDB recording; pass its .hea "
        "file, or leave out --recording to score the beats of a .npy file"
    )
