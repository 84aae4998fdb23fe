"""Settings of the gRPC server, importable without gRPC or the generated code.

The command line reads the defaults here for its help text, so ``--help`` works before
``make proto`` has generated ``appliance/v1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_MAX_BEATS_PER_REQUEST = 100_000
# Largest latent temperature a request may set. Any value above 0 up to it is valid.
MAX_TEMPERATURE = 5.0
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
# A Generate call that has sent nothing for this long, because most of its draws are rejected,
# sends a response without beats, so that clients waiting for each message know it is alive.
PROGRESS_INTERVAL_S = 5.0
# Smallest message limit accepted: every reply but Generate's and GetQualityReport's stays far
# below it, and those two split or shrink their replies to fit.
MIN_MESSAGE_BYTES = 16 * 1024
# Largest message limit accepted: gRPC takes channel arguments as 32-bit signed integers.
MAX_MESSAGE_BYTES = 2**31 - 1
# Bytes of a ValidateStream reply per beat (score 4, accepted 1, class 1) and for the rest of it.
REPLY_BYTES_PER_BEAT = 6
REPLY_FIXED_BYTES = 4096
# Bytes of a Validate request besides the samples: one class enum of at most 2 bytes per beat,
# and the sample header, margin, fs_hz, field tags and length prefixes, with room to spare.
REQUEST_BYTES_PER_BEAT = 2
REQUEST_FIXED_BYTES = 1024


def validate_reply_fit(max_message_bytes: int) -> int:
    """Return the most beats whose Validate or ValidateStream reply fits the message limit."""
    return max(1, (max_message_bytes - REPLY_FIXED_BYTES) // REPLY_BYTES_PER_BEAT)


def validate_message_fit(max_message_bytes: int, values_per_beat: int) -> int:
    """Return the most beats of ``values_per_beat`` float32 samples that fit one request message.

    Arguments:
        max_message_bytes: The server's message limit.
        values_per_beat: ``leads * window_samples``.
    """
    beat_bytes = 4 * values_per_beat + REQUEST_BYTES_PER_BEAT
    return max(1, (max_message_bytes - REQUEST_FIXED_BYTES) // beat_bytes)


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
        workers: gRPC worker threads (0: one per call that ``max_concurrent_rpcs`` admits, so
            that no admitted call, a health check included, waits for a thread).
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

    def __post_init__(self) -> None:
        """Raise ``ValueError`` naming the first setting outside its valid range."""
        message_bytes = self.max_message_bytes
        counts = (
            ("workers", "--workers", self.workers, 0),
            ("intra_op_threads", "--intra-op-threads", self.intra_op_threads, 0),
            ("max_beats_per_request", "--max-beats-per-request", self.max_beats_per_request, 1),
            ("max_concurrent_rpcs", "--max-concurrent-rpcs", self.max_concurrent_rpcs, 1),
            ("max_message_bytes", "--max-message-bytes", message_bytes, MIN_MESSAGE_BYTES),
            ("port", "--port", self.port, 0),
        )
        for name, flag, value, lowest in counts:
            if value < lowest:
                raise ValueError(f"{flag} {value} is invalid: {name} must be {lowest} or more")
        if message_bytes > MAX_MESSAGE_BYTES:
            raise ValueError(
                f"--max-message-bytes {message_bytes} is invalid: max_message_bytes must be "
                f"{MAX_MESSAGE_BYTES} or less, the largest limit gRPC takes"
            )
        if self.port > 65535:
            raise ValueError(f"--port {self.port} is invalid: port must be 65535 or less")
        seconds = (
            ("grace_s", "--grace-s", self.grace_s),
            ("drain_s", "--drain-s", self.drain_s),
            ("stalled_send_s", "--stalled-send-s", self.stalled_send_s),
        )
        for name, flag, duration_s in seconds:
            # The comparisons are False for NaN, so NaN is rejected too.
            if not 0.0 <= duration_s < float("inf"):
                raise ValueError(
                    f"{flag} {duration_s} is invalid: {name} must be a finite number of "
                    "seconds, 0 or more"
                )
        if not self.stalled_send_s > 0.0:
            raise ValueError(
                f"--stalled-send-s {self.stalled_send_s} is invalid: stalled_send_s must be "
                "greater than 0"
            )
