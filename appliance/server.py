"""The gRPC server: health, reflection, TLS, thread settings and graceful shutdown."""

from __future__ import annotations

import ipaddress
import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from appliance.engine import Engine, default_threads
from appliance.errors import ModelStoreError
from appliance.service import DEFAULT_MAX_BEATS_PER_REQUEST, ApplianceServicer
from appliance.store import load_current
from appliance.v1 import appliance_pb2 as pb
from appliance.v1 import appliance_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ApplianceService"].full_name
# Largest message the server accepts; gRPC's default, stated so that the limit is explicit.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
DEFAULT_GRACE_S = 10.0


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for TLS; with ``client_ca`` set, clients must present a certificate."""

    certificate: Path
    private_key: Path
    client_ca: Path | None = None


@dataclass(frozen=True)
class ServeConfig:
    """Server settings.

    Attributes:
        host: Address to bind; loopback unless ``allow_insecure_remote`` or TLS is set.
        port: TCP port; 0 lets the operating system choose.
        workers: gRPC worker threads (0 = CPUs available to the process).
        intra_op_threads: ONNX Runtime threads per graph call (0 = CPUs available / workers).
        tls: TLS files, or None for an insecure port.
        allow_insecure_remote: Allow an insecure port on a non-loopback address.
        require_gpu: Refuse to start without the CUDA execution provider.
        max_beats_per_request: Most beats one request may ask for or carry.
        grace_s: Seconds calls in flight may take to finish after SIGTERM.
    """

    host: str = "127.0.0.1"
    port: int = 50051
    workers: int = 0
    intra_op_threads: int = 0
    tls: TlsFiles | None = None
    allow_insecure_remote: bool = False
    require_gpu: bool = False
    max_beats_per_request: int = DEFAULT_MAX_BEATS_PER_REQUEST
    grace_s: float = DEFAULT_GRACE_S


def is_loopback(host: str) -> bool:
    """Return True for loopback addresses and the name localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def self_check(engine: Engine) -> None:
    """Run both graphs on a latent draw and check the outputs are finite.

    Raises:
        ModelStoreError: If the graphs give non-finite values or do not invert each other.
    """
    rng = np.random.default_rng(0)
    classes = np.asarray(engine.classes_known, dtype=np.int64)
    z = engine.draw_latent(rng, classes.size, 1.0)
    x = engine.inverse(z, classes)
    z_back, log_det = engine.forward(x, classes)
    if not (np.isfinite(x).all() and np.isfinite(z_back).all() and np.isfinite(log_det).all()):
        raise ModelStoreError("self-check failed: the graphs returned non-finite values")
    error = np.abs(z_back[:, : engine.bottleneck_dims] - z[:, : engine.bottleneck_dims]).max()
    if error > 1e-2:
        raise ModelStoreError(f"self-check failed: z -> x -> z error {error:.3g} > 0.01")


class ApplianceServer:
    """A running server: the gRPC server object, its port and its health servicer."""

    def __init__(self, server: grpc.Server, port: int, health_servicer: health.HealthServicer,
                 engine: Engine, config: ServeConfig) -> None:
        self.server = server
        self.port = port
        self.health = health_servicer
        self.engine = engine
        self.config = config
        self._stopped = threading.Event()

    def stop(self, grace_s: float | None = None) -> None:
        """Report NOT_SERVING, refuse new calls, let calls in flight finish, then stop."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        grace = self.config.grace_s if grace_s is None else grace_s
        logger.info("server stopping port=%d grace_s=%.1f", self.port, grace)
        self.server.stop(grace).wait()
        logger.info("server stopped port=%d", self.port)

    def wait(self) -> None:
        """Block until the server stops."""
        self.server.wait_for_termination()


def create_server(store: Path, config: ServeConfig) -> ApplianceServer:
    """Load the current model from the store, check it, and start serving.

    Raises:
        ModelStoreError: If the store has no valid model or its self-check fails.
        ValueError: If the address is not loopback, and neither TLS nor
            ``allow_insecure_remote`` is set.
    """
    if config.tls is None and not config.allow_insecure_remote and not is_loopback(config.host):
        raise ValueError(
            f"refusing an insecure port on {config.host}: use TLS (--tls-cert, --tls-key) or "
            "pass --allow-insecure-remote explicitly"
        )
    cpus = default_threads()
    workers = config.workers or max(2, cpus)
    intra_op_threads = config.intra_op_threads or max(1, cpus // 2)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=workers * 4,
    )
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    address = f"[{config.host}]:{config.port}" if ":" in config.host else (
        f"{config.host}:{config.port}")
    if config.tls is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, _credentials(config.tls))
    if port == 0:
        raise ValueError(f"cannot bind {address}; the port may be in use")
    version = load_current(store)
    engine = Engine(version, intra_op_threads=intra_op_threads, require_gpu=config.require_gpu)
    servicer = ApplianceServicer(engine, config.max_beats_per_request)
    pb_grpc.add_ApplianceServiceServicer_to_server(servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    server.start()
    self_check(engine)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    logger.info("server serving address=%s port=%d model_id=%s provider=%s workers=%d "
                "intra_op_threads=%d tls=%s", config.host, port, version.manifest["model_id"],
                engine.execution_provider, workers, intra_op_threads, config.tls is not None)
    return ApplianceServer(server, port, health_servicer, engine, config)


def _credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    pair = (tls.private_key.read_bytes(), tls.certificate.read_bytes())
    if tls.client_ca is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials(
        [pair], root_certificates=tls.client_ca.read_bytes(), require_client_auth=True
    )


def serve_until_signal(running: ApplianceServer) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully."""

    def handle(signum: int, frame: FrameType | None) -> None:
        logger.info("signal received signal=%s", signal.Signals(signum).name)
        threading.Thread(target=running.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    running.wait()
