"""The gRPC server: thread settings, health, reflection, TLS and graceful shutdown.

The server starts listening before it loads the model, so that clients and orchestrators can
see it come up: health reports NOT_SERVING and every ApplianceService call fails with UNAVAILABLE
until both graphs are loaded and the self-check passes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import FrameType

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from appliance.allocator import limit_malloc_arenas, peak_resident_mib
from appliance.engine import INFERENCE_BATCH, Engine
from appliance.errors import ModelStoreError
from appliance.serve_config import ServeConfig, TlsFiles
from appliance.server_errors import UnservedCallLogger, limit_grpc_library_logs
from appliance.service import ApplianceServicer, ThreadPlan
from appliance.store import current_version_id, load_current, require_served_files
from appliance.tls_files import check_ca_file, check_key_pair, validity_problem
from appliance.v1 import appliance_pb2 as pb
from appliance.v1 import appliance_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ApplianceService"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# Minimum worker threads of the default plan.
MIN_WORKERS = 8
# Seconds stop waits for the health servicer to send NOT_SERVING to open Watch calls.
HEALTH_SHUTDOWN_WAIT_S = 1.0
# Seconds past the grace period that stop waits for gRPC to confirm the shutdown.
STOP_WAIT_MARGIN_S = 5.0
# Largest z -> x -> z error of the self-check on the bottleneck dimensions.
SELF_CHECK_MAX_ERROR = 1e-2
CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def is_loopback(host: str) -> bool:
    """Return True for loopback addresses and the name localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind_policy(config: ServeConfig) -> None:
    """Reject an insecure port on a non-loopback address unless the operator allowed it.

    Raises:
        ValueError: If ``host`` carries a port, or is not loopback while neither TLS nor
            ``allow_insecure_remote`` is set.
    """
    host, _, port = config.host.rpartition(":")
    # One colon, or a bracketed IPv6 address followed by a colon, marks HOST:PORT; a bare
    # IPv6 address has several colons and no brackets.
    carries_port = port.isdigit() and (
        (host and ":" not in host) or (host.startswith("[") and host.endswith("]"))
    )
    if carries_port:
        raise ValueError(
            f"--host {config.host} is invalid: it takes an address without a port; pass "
            f"--host {host} --port {port}"
        )
    if config.tls is None and not config.allow_insecure_remote and not is_loopback(config.host):
        raise ValueError(
            f"insecure port on non-loopback host {config.host} rejected: configure TLS "
            "(--tls-cert, --tls-key) or pass --allow-insecure-remote explicitly"
        )


def cpu_limit(
    cpu_max: Path = CGROUP_V2_CPU_MAX,
    cfs_quota: Path = CGROUP_V1_QUOTA,
    cfs_period: Path = CGROUP_V1_PERIOD,
) -> tuple[float, str]:
    """Return the CPUs this process may use and where the figure comes from.

    A cgroup CPU quota (``cpu.max`` in cgroup v2, ``cpu.cfs_quota_us`` in v1) wins over the
    affinity mask, because a container limited to 2 CPUs on a 64-CPU host still has all 64 in
    its mask. The result is never above the affinity mask size.

    Returns:
        ``(cpus, source)``, with ``source`` one of ``cgroup cpu.max``,
        ``cgroup cpu.cfs_quota_us`` or ``sched_getaffinity``.
    """
    try:
        affinity = float(len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        affinity = float(os.cpu_count() or 1)
    quota = _cgroup_quota(cpu_max, cfs_quota, cfs_period)
    if quota is not None and quota[0] < affinity:
        return max(quota[0], 0.01), quota[1]
    return affinity, "sched_getaffinity"


def _cgroup_quota(cpu_max: Path, cfs_quota: Path, cfs_period: Path) -> tuple[float, str] | None:
    try:
        fields = cpu_max.read_text().split()
        if len(fields) == 2 and fields[0] != "max" and float(fields[1]) > 0:
            return float(fields[0]) / float(fields[1]), "cgroup cpu.max"
        return None
    except (OSError, ValueError):
        pass
    try:
        quota_us = float(cfs_quota.read_text())
        period_us = float(cfs_period.read_text())
    except (OSError, ValueError):
        return None
    if quota_us > 0 and period_us > 0:
        return quota_us / period_us, "cgroup cpu.cfs_quota_us"
    return None


def plan_threads(config: ServeConfig, cpus: float, source: str) -> ThreadPlan:
    """Split the CPU limit between concurrent graph calls and ONNX Runtime threads.

    ``engine_slots * intra_op_threads`` stays within the CPU limit (rounded down, at least 1),
    so that two replicas with their own quotas do not oversubscribe the host.

    Raises:
        ValueError: If ``config.intra_op_threads`` is above the CPU limit.
    """
    whole = max(1, math.floor(cpus))
    if config.intra_op_threads > whole:
        # ONNX Runtime starts every thread while it loads a graph, in native code where
        # Python's SIGTERM handler cannot run, so a huge count would hold the host unstoppably.
        raise ValueError(
            f"--intra-op-threads {config.intra_op_threads} is invalid: it must be at most "
            f"{whole}, the CPUs this process may use ({source}); pass {whole} or fewer, or 0 "
            "for half of them"
        )
    intra_op_threads = config.intra_op_threads or max(1, whole // 2)
    engine_slots = max(1, whole // intra_op_threads)
    # A thread waiting for an engine slot costs little, so by default every call that gRPC
    # admits gets its own thread, and a health check never queues behind long calls.
    workers = config.workers or max(MIN_WORKERS, config.max_concurrent_rpcs)
    return ThreadPlan(
        cpu_limit=cpus,
        cpu_limit_source=source,
        workers=workers,
        engine_slots=engine_slots,
        intra_op_threads=intra_op_threads,
    )


def warm_up(engine: Engine, plan: ThreadPlan) -> None:
    """Generate in every engine slot at once, so that calls run together later add no memory.

    Raises:
        RuntimeError: If the runs fail, for example because memory runs out.
    """
    try:
        engine.warm_up(plan.engine_slots)
    except StoppedWhileLoading:
        raise
    except Exception as exc:  # ONNX Runtime's own errors and MemoryError alike
        detail = str(exc).splitlines()[0] if str(exc) else "no details"
        raise RuntimeError(
            f"running both graphs on {INFERENCE_BATCH} beats in {plan.engine_slots} engine "
            f"slots at once failed ({type(exc).__name__}: {detail[:200]}); give the server "
            "more memory, or run one slot with --intra-op-threads "
            f"{max(1, math.floor(plan.cpu_limit))}"
        ) from exc


def self_check(engine: Engine) -> None:
    """Run both graphs on one latent draw per known class and check they invert each other.

    Raises:
        ModelStoreError: If the graphs give non-finite values or do not invert each other.
    """
    rng = np.random.default_rng(0)
    classes = np.asarray(engine.classes_known, dtype=np.int64)
    z = np.concatenate([engine.draw_latent(rng, 1, 1.0, int(c)) for c in classes])
    x = engine.inverse(z, classes)
    z_back, log_det = engine.forward(x, classes)
    if not (np.isfinite(x).all() and np.isfinite(z_back).all() and np.isfinite(log_det).all()):
        raise ModelStoreError(
            "self-check failed: the graphs returned non-finite values; re-export the model"
        )
    lead = slice(0, engine.bottleneck_dims)
    error = float(np.abs(z_back[:, lead] - z[:, lead]).max())
    if error > SELF_CHECK_MAX_ERROR:
        raise ModelStoreError(
            f"self-check failed: z -> x -> z error {error:.3g} is above "
            f"{SELF_CHECK_MAX_ERROR:g}; re-export the model"
        )
    # The calls' own path: scoring, the lead check, the privacy distance and the gate. A
    # calibration, prior or index that does not fit the graphs fails here instead of in
    # every call.
    try:
        scored = engine.score(x, classes)
        distances = engine.privacy_distance(x)
        engine.generate(
            {int(c): 1 for c in classes},
            temperature=1.0,
            margin=engine.default_margin,
            seed=0,
            max_draws_per_beat=2,
        )
    except StoppedWhileLoading:
        raise
    except Exception as exc:  # any failure here would be every call's failure
        detail = str(exc).splitlines()[0] if str(exc) else "no details"
        raise ModelStoreError(
            f"self-check failed: scoring or generating beats raised {type(exc).__name__}: "
            f"{detail[:200]}. The version's files do not fit together; restore the version, "
            "or publish the model again with `python -m appliance export` or `train`"
        ) from exc
    scores = np.asarray(scored.scores)
    if not (np.isfinite(scores).all() and ((scores >= 0) & (scores <= 1)).all()):
        raise ModelStoreError(
            "self-check failed: pertinence scores outside 0 to 1 or not finite; the "
            "calibration does not fit the graphs, so publish the model again"
        )
    if not np.isfinite(distances).all():
        raise ModelStoreError(
            "self-check failed: the privacy index gave non-finite distances; publish the model "
            "again"
        )


def load_served_engine(
    store: Path, intra_op_threads: int = 0, require_gpu: bool = False
) -> Engine:
    """Load the store's current version as a server does: verify, check, load, self-check.

    Raises:
        ModelStoreError: If the version is missing, damaged or fails the self-check.
        RuntimeError: If ``require_gpu`` is set and no GPU provider is available.
    """
    version = load_current(store)
    require_served_files(version)
    engine = Engine(version, intra_op_threads=intra_op_threads, require_gpu=require_gpu)
    self_check(engine)
    return engine


class ApplianceServer:
    """A listening server: the gRPC server object, its port, health and servicer.

    Attributes:
        server: The gRPC server.
        port: Bound TCP port.
        health: Health servicer; NOT_SERVING until ``load`` succeeds.
        servicer: The ApplianceService servicer.
        plan: Thread settings in use.
        config: Settings the server was started with.
        engine: The loaded model, or None before ``load``.
    """

    def __init__(
        self,
        server: grpc.Server,
        port: int,
        health_servicer: health.HealthServicer,
        servicer: ApplianceServicer,
        plan: ThreadPlan,
        config: ServeConfig,
    ) -> None:
        self.server = server
        self.port = port
        self.health = health_servicer
        self.servicer = servicer
        self.plan = plan
        self.config = config
        self.engine: Engine | None = None
        self._stopping = threading.Lock()
        self._stopped = False
        # Set once ``stop`` has finished, so that ``wait`` returns after its last log line.
        self._stop_finished = threading.Event()

    def load(self, store: Path) -> Engine:
        """Load the store's current model, self-check it and report SERVING.

        Raises:
            ModelStoreError: If the store has no valid model or the self-check fails; health
                stays NOT_SERVING.
            RuntimeError: If ``require_gpu`` is set and no GPU provider is available, or the
                warm up of the engine slots fails.
        """
        started = time.monotonic()
        engine = load_served_engine(store, self.plan.intra_op_threads, self.config.require_gpu)
        warm_up(engine, self.plan)
        version = engine.version
        self.engine = engine
        self.servicer.set_engine(engine, store)
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info(
            "server serving port=%d model_id=%s provider=%s load_ms=%.0f peak_rss_mib=%.0f",
            self.port,
            version.manifest["model_id"],
            engine.execution_provider,
            (time.monotonic() - started) * 1000,
            peak_resident_mib(),
        )
        return engine

    def stop(self, grace_s: float | None = None) -> None:
        """Shut down gracefully; later calls of ``stop`` return at once.

        Health turns NOT_SERVING and new calls get UNAVAILABLE for ``drain_s``. Then the port
        closes, and calls still in flight get the rest of ``grace_s`` before they are cancelled.
        """
        with self._stopping:
            if self._stopped:
                return
            self._stopped = True
        grace = self.config.grace_s if grace_s is None else grace_s
        drain = min(self.config.drain_s, grace)
        logger.info("server stopping port=%d drain_s=%.1f grace_s=%.1f", self.port, drain, grace)
        self.servicer.begin_shutdown()
        # grpcio's health servicer sends NOT_SERVING to every open Watch from this thread, and
        # a send to a watch whose client went away has been seen to block for good. The
        # server's stop below ends those calls, so the wait for the sends is bounded.
        drain_started = time.monotonic()
        health_shutdown = threading.Thread(
            target=self.health.enter_graceful_shutdown, name="health-shutdown", daemon=True
        )
        health_shutdown.start()
        health_shutdown.join(HEALTH_SHUTDOWN_WAIT_S)
        if health_shutdown.is_alive():
            logger.warning(
                "health watchers did not take NOT_SERVING within %.1f s port=%d; stopping anyway",
                HEALTH_SHUTDOWN_WAIT_S,
                self.port,
            )
        time.sleep(max(0.0, drain - (time.monotonic() - drain_started)))
        # NOTE: grpcio's stop event has been seen to stay unset after the grace period ended
        # the calls, so the wait is bounded.
        if not self.server.stop(grace - drain).wait(timeout=grace + STOP_WAIT_MARGIN_S):
            logger.warning(
                "server stop did not confirm within %.1f s port=%d; continuing",
                grace + STOP_WAIT_MARGIN_S,
                self.port,
            )
        logger.info("server stopped port=%d", self.port)
        self._stop_finished.set()

    def wait(self) -> None:
        """Block until the server stops and, when ``stop`` stopped it, until ``stop`` returns."""
        self.server.wait_for_termination()
        if self._stopped:
            self._stop_finished.wait(timeout=self.config.grace_s + 5.0)


def _port_bindable(host: str, port: int) -> bool:
    """Return whether a TCP listener could bind ``port`` on any address ``host`` resolves to.

    The trial socket sets ``SO_REUSEADDR`` as gRPC's listeners do, so a port held only by
    connections in TIME_WAIT counts as bindable. Port 0 is always bindable.
    """
    if port == 0:
        return True
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return False
    for family, kind, protocol, _, sockaddr in infos:
        try:
            with socket.socket(family, kind, protocol) as trial:
                trial.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                trial.bind(sockaddr)
                return True
        except OSError:
            continue
    return False


@contextlib.contextmanager
def _stderr_to_debug_log(context: str) -> Iterator[None]:
    """Send what is written to file descriptor 2 meanwhile to the debug log, as one line.

    Native code such as gRPC's C core writes to the descriptor directly, past Python's logging.
    Lines that other threads log meanwhile go to the same debug line.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace").strip()
            if text:
                logger.debug("%s stderr=%r", context, text)


@contextlib.contextmanager
def _unchanged(context: str) -> Iterator[None]:
    yield


def start_server(config: ServeConfig) -> ApplianceServer:
    """Bind the port and start serving health and reflection, with NOT_SERVING status.

    ApplianceService calls fail with UNAVAILABLE until ``ApplianceServer.load`` succeeds.

    Raises:
        ValueError: If the bind policy rejects the address (see ``check_bind_policy``) or the
            port cannot be bound.
    """
    check_bind_policy(config)
    limit_grpc_library_logs()
    credentials = None if config.tls is None else _credentials(config.tls)
    cpus, source = cpu_limit()
    plan = plan_threads(config, cpus, source)
    if plan.workers < config.max_concurrent_rpcs:
        logger.warning(
            "workers=%d is below max_concurrent_rpcs=%d, so calls past %d, health checks "
            "included, wait for a worker thread while the others run",
            plan.workers,
            config.max_concurrent_rpcs,
            plan.workers,
        )
    # Before the worker threads start, so that they share the capped arenas.
    malloc_arenas = plan.engine_slots + 1 if limit_malloc_arenas(plan.engine_slots + 1) else 0
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=plan.workers, thread_name_prefix="rpc"),
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        interceptors=[
            UnservedCallLogger(config.max_message_bytes, config.max_concurrent_rpcs, plan.workers)
        ],
    )
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    servicer = ApplianceServicer(
        plan, config.max_beats_per_request, config.max_message_bytes, config.stalled_send_s
    )
    pb_grpc.add_ApplianceServiceServicer_to_server(servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    host = (
        f"[{config.host}]"
        if ":" in config.host and not config.host.startswith("[")
        else (config.host)
    )
    address = f"{host}:{config.port}"
    # gRPC's C core writes its own line about a failed bind straight to standard error, ahead
    # of the error below, which names the fix. When a trial bind predicts that failure, that
    # line goes to the debug log instead.
    quiet = _stderr_to_debug_log if not _port_bindable(config.host, config.port) else _unchanged
    try:
        with quiet(f"bind address={address}"):
            if credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        # gRPC's own text only points at its debug log, so it goes to the debug log here.
        logger.debug("bind failed address=%s error=%s", address, exc)
        port = 0
    if port == 0:
        raise ValueError(
            f"cannot bind {address}: the port is in use or {config.host} is not an address of "
            "this host; choose another --port (--port 0 takes a free one) or --host"
        )
    server.start()
    logger.info(
        "server listening host=%s port=%d status=NOT_SERVING tls=%s mutual_tls=%s "
        "cpu_limit=%.2f cpu_limit_source=%r workers=%d engine_slots=%d "
        "intra_op_threads=%d malloc_arenas=%s",
        config.host,
        port,
        config.tls is not None,
        config.tls is not None and config.tls.client_ca is not None,
        plan.cpu_limit,
        plan.cpu_limit_source,
        plan.workers,
        plan.engine_slots,
        plan.intra_op_threads,
        malloc_arenas or "uncapped",
    )
    return ApplianceServer(server, port, health_servicer, servicer, plan, config)


def create_server(store: Path, config: ServeConfig) -> ApplianceServer:
    """Start the server, then load and check the store's current model.

    Raises:
        ModelStoreError: If the store has no valid model or its self-check fails; the server
            is stopped.
        ValueError: If the bind policy rejects the address or the port cannot be bound.
        RuntimeError: If ``require_gpu`` is set and no GPU provider is available.
    """
    # A store with no published model fails before the port is bound and logged as listening.
    current_version_id(store)
    running = start_server(config)
    try:
        running.load(store)
    except BaseException:
        running.server.stop(0).wait()
        raise
    return running


def _credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    try:
        pair = (tls.private_key.read_bytes(), tls.certificate.read_bytes())
        client_ca = tls.client_ca.read_bytes() if tls.client_ca is not None else None
    except OSError as exc:
        raise ValueError(
            f"cannot read TLS file {exc.filename}: {exc.strerror}; check "
            "--tls-cert, --tls-key and --tls-client-ca"
        ) from exc
    _check_tls_files(tls)
    if client_ca is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=True
    )


def _check_tls_files(tls: TlsFiles) -> None:
    """Check the server's TLS files before gRPC loads them.

    gRPC reports a bad file only in its own log and then fails to bind the port, which reads
    as a busy port. A certificate outside its validity period would be served, and every
    client's handshake would fail.

    Raises:
        ValueError: Naming the file that is not valid and what it must contain.
    """
    check_key_pair(tls.certificate, tls.private_key, "--tls-cert", "--tls-key")
    if tls.client_ca is not None:
        check_ca_file(tls.client_ca, "--tls-client-ca", "client certificates")
    problem = validity_problem(tls.certificate, tls.private_key)
    if problem is not None:
        raise ValueError(
            f"TLS certificate {tls.certificate} is rejected: {problem}, so every client would "
            "fail its handshake; pass a certificate valid now in --tls-cert, or check the "
            "clock of this host"
        )


class StoppedWhileLoading(Exception):
    """A stop signal arrived before the model was loaded; nothing was being served."""


def install_signal_handlers(running: ApplianceServer) -> None:
    """Stop the server gracefully on SIGTERM or SIGINT (see ``ApplianceServer.stop``).

    Before the model is loaded, the handler also raises ``StoppedWhileLoading`` in the main
    thread, so that a load that takes long (a large or slow model file) ends at once.
    """

    def handle(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        logger.info("signal received signal=%s", name)
        threading.Thread(target=running.stop, name="shutdown", daemon=True).start()
        if running.engine is None:
            raise StoppedWhileLoading(name)

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def serve_until_signal(running: ApplianceServer) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully."""
    install_signal_handlers(running)
    running.wait()
