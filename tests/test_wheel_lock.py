"""The lock file of the image's wheels: every requirement pinned to one file and its digest.

``build/download-wheels.sh`` writes ``build/locks/wheels.txt`` (CPU image) and
``build/locks/wheels-gpu.txt`` (GPU image), and the Dockerfile installs the lines of one of them
with ``pip --require-hashes --no-deps``. These tests read the committed lock file and run
the script's offline check on wheel files made in the test. None of them needs the network.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "build" / "download-wheels.sh"
LOCKS = {
    "cpu": REPO_ROOT / "build" / "locks" / "wheels.txt",
    "gpu": REPO_ROOT / "build" / "locks" / "wheels-gpu.txt",
}
PIN = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+)"
    r" --hash=sha256:(?P<digest>[0-9a-f]{64})$"
)


def run_script(*arguments: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the wheel script with the test's Python and return its completed process."""
    return subprocess.run(
        ["bash", str(SCRIPT), *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHON": os.environ.get("PYTHON", "python3"), **(env or {})},
    )


def locked_pins(lock: Path) -> dict[str, tuple[str, str, str]]:
    """Map each canonical distribution name to (version, digest, file) from a lock file."""
    pins: dict[str, tuple[str, str, str]] = {}
    file_name = ""
    for line in lock.read_text().splitlines():
        if line.startswith("# file: "):
            file_name = line.removeprefix("# file: ")
        elif line and not line.startswith("#"):
            match = PIN.match(line)
            assert match, f"lock line is not NAME==VERSION --hash=sha256:DIGEST: {line!r}"
            name = canonicalize_name(match["name"])
            assert name not in pins, f"{name} is pinned twice"
            pins[name] = (match["version"], match["digest"], file_name)
            file_name = ""
    return pins


@pytest.mark.parametrize("variant", sorted(LOCKS))
def test_lock_records_the_current_requirements(variant: str) -> None:
    lock = LOCKS[variant]
    printed = run_script("--print-requirements", variant)
    assert printed.returncode == 0, printed.stderr
    recorded = [
        line.removeprefix("# requirement: ")
        for line in lock.read_text().splitlines()
        if line.startswith("# requirement: ")
    ]
    assert recorded == printed.stdout.splitlines(), (
        "pyproject.toml changed since the lock was written: run "
        f"build/download-wheels.sh --lock {variant} and commit {lock.relative_to(REPO_ROOT)}"
    )


@pytest.mark.parametrize("variant", sorted(LOCKS))
def test_lock_pins_each_requirement_to_one_matching_file(variant: str) -> None:
    lock = LOCKS[variant]
    pins = locked_pins(lock)
    for line in lock.read_text().splitlines():
        if not line.startswith("# requirement: "):
            continue
        requirement = Requirement(line.removeprefix("# requirement: "))
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} has no pinned wheel"
        version = pins[name][0]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{name}=={version} does not satisfy {requirement}"
        )
    for name, (version, _, file_name) in pins.items():
        # A wheel file name starts with DISTRIBUTION-VERSION-.
        file_distribution, file_version = file_name.split("-")[:2]
        assert canonicalize_name(file_distribution) == name, file_name
        assert Version(file_version) == Version(version), file_name
    if variant == "cpu":
        assert pins["torch"][0].endswith("+cpu"), "the CPU image must pin the +cpu torch build"
        assert "onnxruntime" in pins
        assert "onnxruntime-gpu" not in pins
        assert not [name for name in pins if name.startswith("nvidia-")], "CUDA wheels in CPU lock"
    else:
        assert "+cpu" not in pins["torch"][0], "the GPU image must pin the CUDA torch build"
        assert "onnxruntime-gpu" in pins
        assert "onnxruntime" not in pins
        # The CUDA provider of onnxruntime-gpu loads cuDNN and cuBLAS from these wheels.
        assert {"nvidia-cudnn-cu13", "nvidia-cublas"} <= set(pins), sorted(pins)


def make_wheel_folder(folder: Path) -> Path:
    """Write two small files named as wheels and a lock file with their digests."""
    folder.mkdir()
    lines = ["# requirement: alpha", "# requirement: beta"]
    for name, content in (("alpha", b"alpha wheel"), ("beta", b"beta wheel")):
        file_name = f"{name}-1.0-py3-none-any.whl"
        (folder / file_name).write_bytes(content)
        digest = hashlib.sha256(content).hexdigest()
        lines += [f"# file: {file_name}", f"{name}==1.0 --hash=sha256:{digest}"]
    lock = folder.parent / "lock.txt"
    lock.write_text("\n".join(lines) + "\n")
    return lock


def test_check_accepts_a_folder_that_matches_its_lock(tmp_path: Path) -> None:
    lock = make_wheel_folder(tmp_path / "wheels")
    result = run_script(
        "--check", env={"WHEELS_DIR": str(tmp_path / "wheels"), "WHEELS_LOCK": str(lock)}
    )
    assert result.returncode == 0, result.stderr
    assert "wheels match the lock" in result.stderr


@pytest.mark.parametrize("fault", ["changed", "missing"])
def test_check_names_a_changed_or_missing_wheel(tmp_path: Path, fault: str) -> None:
    lock = make_wheel_folder(tmp_path / "wheels")
    wheel = tmp_path / "wheels" / "beta-1.0-py3-none-any.whl"
    if fault == "changed":
        wheel.write_bytes(b"beta wheel with one byte more")
    else:
        wheel.unlink()
    result = run_script(
        "--check", env={"WHEELS_DIR": str(tmp_path / "wheels"), "WHEELS_LOCK": str(lock)}
    )
    assert result.returncode == 1
    expected = "wheel digest differs from the lock" if fault == "changed" else "missing wheel"
    assert f"{expected}: beta-1.0-py3-none-any.whl" in result.stderr
    assert "alpha" not in result.stderr
