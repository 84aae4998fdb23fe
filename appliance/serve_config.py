"""Settings of the gRPC server, importable without gRPC or the generated code.

The command line reads the defaults here for its help text, so ``--help`` works before
``make proto`` has generated ``appliance/v1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_MAX_BEATS_PER_REQUEST = 100_000
# gRPC's default message limit, stated so that the limit is explicit and documented.
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
DEFAULT_GRACE_S = 10.0
# After SIGTERM, health reports NOT_SERVING and new calls are rejected for this long before the
# listening port closes, so that load balancers polling health can move traffic away.
DEFAULT_DRAIN_S = 1.0
# Calls accepted at once (running plus queued for a worker); more get RESOURCE_EXHAUSTED.
DEFAULT_MAX_CONCURRENT_RPCS = 256
# A Generate response that the client has not taken after this many seconds cancels the call:
# gRPC's flow control blocks the worker thread while the client reads nothing.
DEFAULT_STALLED_SEND_S = 60.0


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for TLS; with ``client_ca`` set, clients must present a certificate it signed.

    Attributes:
        certificate: Server certificate chain.
        private_key: Private key of the server certificate.
        client_ca: CA certificates that sign client certificates (mutual TLS), or None.
    """

    certificate: Path
    private_key: Path
    client_ca: Path | None = None


@dataclass(frozen=True)
class ServeConfig:
    """Server settings.

    Attributes:
        host: Address to bind; loopback unless ``allow_insecure_remote`` or TLS is set.
        port: TCP port; 0 lets the operating system choose.
        workers: gRPC worker threads (0: ``server.WORKERS_PER_SLOT`` per engine slot, at least
            ``server.MIN_WORKERS``).
        intra_op_threads: ONNX Runtime threads per graph call (0: half the CPU limit, at
            least 1).
        tls: TLS files, or None for an insecure port.
        allow_insecure_remote: Allow an insecure port on a non-loopback address.
        require_gpu: Refuse to start without the CUDA execution provider.
        max_beats_per_request: Most beats one request may ask for or carry.
        max_message_bytes: Largest request or reply message in bytes.
        max_concurrent_rpcs: Calls accepted at once; more get RESOURCE_EXHAUSTED.
        grace_s: Seconds from SIGTERM until calls still in flight are cancelled.
        drain_s: Seconds, within ``grace_s``, during which health reports NOT_SERVING and new
            calls are rejected before the port closes.
        stalled_send_s: Seconds a Generate response may wait for the client to read it before
            the call is cancelled and its worker thread freed.
    """

    host: str = "127.0.0.1"
    port: int = 50051
    workers: int = 0
    intra_op_threads: int = 0
    tls: TlsFiles | None = None
    allow_insecure_remote: bool = False
    require_gpu: bool = False
    max_beats_per_request: int = DEFAULT_MAX_BEATS_PER_REQUEST
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS
    grace_s: float = DEFAULT_GRACE_S
    drain_s: float = DEFAULT_DRAIN_S
    stalled_send_s: float = DEFAULT_STALLED_SEND_S
