"""Python client library of the appliance's gRPC service."""

from __future__ import annotations

import math
import numbers
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health_pb2, health_pb2_grpc

from appliance.baseline import find_input_problem, measure_beat_levels, summarise_beat_levels
from appliance.classes import AAMI_CLASSES
from appliance.serve_config import (
    DEFAULT_MAX_BEATS_PER_REQUEST,
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_MESSAGE_BYTES,
    PROGRESS_INTERVAL_S,
    REQUEST_FIXED_BYTES,
    validate_message_fit,
    validate_reply_fit,
)
from appliance.server_errors import REQUEST_ID_KEY
from appliance.tls_files import check_ca_file, check_key_pair
from appliance.v1 import appliance_pb2 as pb
from appliance.v1 import appliance_pb2_grpc as pb_grpc

# Largest reply the client accepts by default: twice the server's default message limit.
DEFAULT_MAX_RECEIVE_MESSAGE_BYTES = 8 * 1024 * 1024
# File names of a quality report fetched with GetQualityReport.
QUALITY_HTML = "quality.html"
QUALITY_JSON = "quality.json"
RequestT = TypeVar("RequestT", pb.ValidateRequest, pb.ValidateStreamRequest)
# Beats per ValidateStream message: 4096 one-lead beats of 256 samples are 4 MiB, the default
# message limit, so 2048 keeps each message near 2 MiB.
VALIDATE_STREAM_BEATS = 2048


@dataclass
class Generated:
    """Beats returned by Generate.

    Attributes:
        beats: Shape (beats, leads, window_samples), in the requested unit.
        classes: AAMI class names, one per beat.
        scores: Pertinence scores, shape (beats,).
        stats: The counts of the call (``appliance.v1.GenerateStats``).
        fs_hz: Sampling rate of the beats.
    """

    beats: np.ndarray
    classes: list[str]
    scores: np.ndarray
    stats: pb.GenerateStats
    fs_hz: float


@dataclass
class Validated:
    """Scores returned by Validate.

    Attributes:
        scores: Pertinence scores in [0, 1], shape (beats,).
        accepted: Whether each score reached the margin, shape (beats,).
        classes: AAMI class name each beat was scored under.
        margin: Margin the server used.
        warnings: The server's warnings about the beats as a whole, for example that they are
            probably not in mV or carry baseline wander. Empty when the server found none.
    """

    scores: np.ndarray
    accepted: np.ndarray
    classes: list[str]
    margin: float
    warnings: list[str] = field(default_factory=list)


def unsigned_field(name: str, value: int, bits: int) -> int:
    """Return ``value`` if it fits an unsigned protobuf field of ``bits`` bits.

    Raises:
        ValueError: Naming the field, the value and the range, if it does not fit.
    """
    largest = 2**bits - 1
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name}={value!r} is not a whole number; use one from 0 to {largest}")
    if not 0 <= int(value) <= largest:
        raise ValueError(f"{name}={value} is out of range; use a whole number from 0 to {largest}")
    return int(value)


def encode_samples(beats: npt.ArrayLike, normalised: bool = False) -> pb.Samples:
    """Pack beats of shape (beats, leads, window_samples) as little-endian float32."""
    beats = np.asarray(beats, dtype=np.float32)
    if beats.ndim != 3:
        raise ValueError(
            f"beats must have shape (beats, leads, window_samples), got {beats.shape}"
        )
    return pb.Samples(
        count=beats.shape[0],
        leads=beats.shape[1],
        window_samples=beats.shape[2],
        values_f32=np.ascontiguousarray(beats, dtype="<f4").tobytes(),
        unit=pb.SAMPLE_UNIT_NORMALISED if normalised else pb.SAMPLE_UNIT_MILLIVOLT,
    )


def decode_samples(samples: pb.Samples) -> np.ndarray:
    """Unpack Samples into shape (count, leads, window_samples), float32."""
    values = np.frombuffer(samples.values_f32, dtype="<f4")
    return values.reshape(samples.count, samples.leads, samples.window_samples)


def write_quality_report(reply: pb.GetQualityReportResponse, out_dir: Path) -> list[Path]:
    """Write a GetQualityReport reply as ``quality.json`` and, if it carries the page, HTML.

    Returns:
        The paths written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / QUALITY_JSON]
    paths[0].write_text(reply.report_json, encoding="utf-8")
    if reply.report_html:
        paths.append(out_dir / QUALITY_HTML)
        paths[1].write_bytes(reply.report_html)
    return paths


def describe_model_info(info: pb.GetModelInfoResponse) -> str:
    """Format a GetModelInfo reply as aligned ``label  value`` lines for a terminal.

    Classes the model does not know are listed with their training counts on a line of their
    own. Quality figures, one per line, appear only when the manifest has some.
    """
    known = [class_name(value) for value in info.classes_known]
    counts = dict(info.train_class_counts)
    known_text = ", ".join(f"{name} {counts.get(name, 0)}" for name in known)
    # Protobuf maps have no defined order, so the other classes are listed in AAMI order.
    unknown = sorted(
        (name for name in counts if name not in known),
        key=lambda name: (AAMI_CLASSES.index(name) if name in AAMI_CLASSES else 99, name),
    )
    unknown_text = ", ".join(f"{name} {counts[name]}" for name in unknown)
    rows = [
        ("model id", info.model_id),
        ("trained at", info.trained_at),
        ("sampling rate", f"{info.fs_hz:g} Hz"),
        ("window", f"{info.window_samples} samples, {info.pre_r_samples} before the R peak"),
        ("leads", ", ".join(info.leads)),
        ("scale", f"{info.scale_mv:.4g} mV per model unit"),
        ("classes", f"{known_text} (training beats)"),
    ]
    if unknown_text:
        rows.append(("classes not known", f"{unknown_text} (training beats, too few to learn)"))
    prior = "fitted per class at export" if info.fitted_latent_prior else "standard normal"
    lead_check = "on" if info.lead_check else "off (several leads, or too few other-lead beats)"
    rows += [
        ("bottleneck", f"{info.bottleneck_dims} of {info.latent_dims} latent dimensions"),
        ("tail scale", f"{info.tail_scale:g}"),
        ("latent prior", prior),
        ("lead check", lead_check),
        (
            "default margin",
            f"{info.default_margin:.3f} (a request may set {info.min_margin:.3f} to "
            f"{info.max_margin:.3f})",
        ),
        ("forward graph", f"SHA-256 {info.forward_graph_sha256}"),
        ("inverse graph", f"SHA-256 {info.inverse_graph_sha256}"),
    ]
    # One figure per line; only the first line carries the label.
    for index, (name, value) in enumerate(sorted(info.quality.items())):
        rows.append(("quality" if index == 0 else "", f"{name} {value:.6g}"))
    rows += [
        ("max amplitude", f"{info.max_abs_mv:g} mV"),
        ("max beats", f"{info.max_beats_per_request} per request"),
        ("max message", f"{info.max_message_bytes} bytes"),
        ("execution provider", info.execution_provider),
        ("engine slots", str(info.engine_slots)),
        ("threads per slot", str(info.intra_op_threads)),
        ("CPU limit", f"{info.cpu_limit:g} ({info.cpu_limit_source})"),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def class_value(name: str | None) -> int:
    """Return the BeatClass enum value of a class name; None gives UNSPECIFIED."""
    if name is None or name == "":
        return pb.BEAT_CLASS_UNSPECIFIED
    if name not in AAMI_CLASSES:
        raise ValueError(
            f"class {name!r} is not an AAMI class; use one of {', '.join(AAMI_CLASSES)}"
        )
    return int(pb.BeatClass.Value(f"BEAT_CLASS_{name}"))


def class_name(value: int) -> str:
    """Return the class name of a BeatClass enum value."""
    return AAMI_CLASSES[value - 1] if value > 0 else ""


def _read_pem(path: Path, description: str) -> bytes:
    """Return the bytes of a PEM file, or raise ``ValueError`` naming it and the failure."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{description} {path} cannot be read ({exc.strerror or exc})") from exc


def _float32_beats(beats: npt.ArrayLike) -> np.ndarray:
    """Return beats as float32, the wire format, refusing values the cast would change.

    Raises:
        ValueError: If the values are complex, not numbers, or finite but beyond float32.
    """
    values = np.asarray(beats)
    if values.dtype == np.float32:
        return values
    if np.iscomplexobj(values):
        raise ValueError(
            "beats are complex numbers; pass real values in mV (the imaginary part would be lost)"
        )
    try:
        wide = values.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"beats of dtype {values.dtype} cannot be read as numbers ({exc}); pass an array "
            "of real values in mV"
        ) from exc
    with np.errstate(invalid="ignore"):
        too_large = np.isfinite(wide) & (np.abs(wide) > np.finfo(np.float32).max)
    if too_large.any():
        position = tuple(int(i) for i in np.argwhere(too_large)[0])
        raise ValueError(
            f"beats{list(position)} is {float(wide[position]):.3g}, beyond the float32 range "
            "that samples are sent in; beats are in mV, so check their unit"
        )
    return wide.astype(np.float32)


def _class_names(classes: object) -> list[str | None]:
    """Return ``classes`` as a list of names or None, from a list, tuple or 1-D array.

    A string is rejected because it would be read as one class per character.

    Raises:
        ValueError: If ``classes`` is a string, a mapping or not iterable, or an entry is
            neither a string nor None.
    """
    names: list[object] | None = None
    if not isinstance(classes, str | bytes | Mapping):
        try:
            names = list(classes)  # type: ignore[call-overload]
        except TypeError:
            names = None
    if names is None or not all(name is None or isinstance(name, str) for name in names):
        raise ValueError(
            "classes must be a list of class names (or None), one per beat, such as "
            f"['N', 'V', None]; got {type(classes).__name__} {str(classes)[:40]!r}"
        )
    return [None if name is None else str(name) for name in names]


class StreamStalledError(grpc.RpcError):
    """No message of a Generate stream arrived within the client's timeout; it is cancelled.

    It reads as a call that ended with ``DEADLINE_EXCEEDED``, as a deadline on the whole call
    would have ended.
    """

    def __init__(self, timeout_s: float) -> None:
        if timeout_s <= PROGRESS_INTERVAL_S:
            cause = (
                f"a server that is drawing may send nothing for {PROGRESS_INTERVAL_S:g} s, so "
                f"wait longer than that (timeout_s above {PROGRESS_INTERVAL_S:g})"
            )
        else:
            cause = (
                f"a drawing server sends a message every {PROGRESS_INTERVAL_S:g} s, so this "
                "one is stalled, too busy to take its engine, or older than progress messages"
            )
        self._details = f"no message of the stream arrived within {timeout_s:g} s; {cause}"
        super().__init__(self._details)

    def code(self) -> grpc.StatusCode:
        """Return ``DEADLINE_EXCEEDED``."""
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        """Return what the client waited for."""
        return self._details


class FailedCallError(grpc.RpcError):
    """A failed call's error with more context: ``code()`` is its status, ``details()`` adds to it.

    Attributes:
        cause: The error of the failed call.
    """

    def __init__(self, cause: grpc.RpcError, context: str) -> None:
        self.cause = cause
        cause_details = cause.details() if hasattr(cause, "details") else str(cause)
        self._details = f"{context}: {cause_details}"
        super().__init__(self._details)

    def code(self) -> grpc.StatusCode:
        """Return the failed call's status code."""
        code = self.cause.code() if hasattr(self.cause, "code") else None
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN

    def details(self) -> str:
        """Return the failed call's details after the added context."""
        return self._details


class CallPartError(FailedCallError):
    """A call for one part of a set that ``validate`` split into several calls failed.

    It reads as the failed call: ``code()`` is that call's status, and ``details()`` adds the
    beats of the part, because the server counts beats from the start of each call.

    Attributes:
        start: Index of the part's first beat in the whole set.
        stop: Index one past the part's last beat.
    """

    def __init__(self, cause: grpc.RpcError, start: int, stop: int, total: int) -> None:
        self.start = start
        self.stop = stop
        super().__init__(
            cause,
            f"in the call for beats {start} to {stop - 1} of {total} (the server numbers "
            f"beats from {start} as 0)",
        )


def request_total(request: pb.GenerateRequest) -> int:
    """Return the beats a Generate request requests: its class counts, else its count."""
    return sum(item.count for item in request.class_counts) or request.count


class GenerateInterruptedError(FailedCallError):
    """A Generate call failed after some beats had arrived; ``received`` keeps those beats.

    It reads as the failed call: ``code()`` is that call's status, and ``details()`` states how
    many beats arrived first. The received beats passed the gate like any others, so they may
    be kept; a new call with another seed can ask for the rest.

    Attributes:
        received: The beats, classes and scores that arrived before the failure; its
            ``stats`` are empty, because only the last response carries them.
        requested: Beats the request asked for.
    """

    def __init__(self, cause: grpc.RpcError, received: Generated, requested: int) -> None:
        self.received = received
        self.requested = requested
        super().__init__(
            cause,
            f"the stream failed after {len(received.classes)} of the {requested} requested "
            "beats had arrived",
        )


class ApplianceClient:
    """Client of one appliance server.

    Arguments:
        address: ``host:port`` of the server.
        root_certificate: PEM of the CA that signed the server certificate (enables TLS).
        client_certificate: PEM certificate for mutual TLS.
        client_key: PEM private key for mutual TLS.
        timeout_s: Deadline of each call in seconds; for ``generate``, the longest wait for
            each chunk of the stream.
        max_receive_message_bytes: Largest reply message accepted, in bytes, 1 to
            ``MAX_MESSAGE_BYTES``; raise it for a server started with a larger
            ``--max-message-bytes``. gRPC's -1 (no limit) is not accepted.

    Raises:
        ValueError: If ``address`` is not a string, ``timeout_s`` is not a finite number
            above 0, the message limit is
            outside 1 to ``MAX_MESSAGE_BYTES``, or a TLS file cannot be read, is not PEM, or
            the client key does not belong to the client certificate.
    """

    def __init__(
        self,
        address: str,
        root_certificate: Path | None = None,
        client_certificate: Path | None = None,
        client_key: Path | None = None,
        timeout_s: float = 300.0,
        max_receive_message_bytes: int = DEFAULT_MAX_RECEIVE_MESSAGE_BYTES,
    ) -> None:
        if not isinstance(address, str) or not address:
            raise ValueError(f"address={address!r} is invalid: pass the server as 'host:port'")
        # The comparisons are False for NaN, so NaN is rejected too.
        # Checked as plain objects: callers outside mypy pass strings, bools and numpy numbers.
        timeout_value: object = timeout_s
        limit_value: object = max_receive_message_bytes
        if (
            isinstance(timeout_value, bool)
            or not isinstance(timeout_value, numbers.Real)
            or not 0.0 < float(timeout_value) < math.inf
        ):
            raise ValueError(
                f"timeout_s={timeout_s!r} is invalid: pass a finite number of seconds above 0"
            )
        if (
            isinstance(limit_value, bool)
            or not isinstance(limit_value, numbers.Integral)
            or not 1 <= int(limit_value) <= MAX_MESSAGE_BYTES
        ):
            raise ValueError(
                f"max_receive_message_bytes={max_receive_message_bytes} is invalid: pass 1 to "
                f"{MAX_MESSAGE_BYTES}, the largest limit gRPC takes"
            )
        options = [("grpc.max_receive_message_length", int(max_receive_message_bytes))]
        # gRPC's C core aborts the process on a certificate without its key or the reverse.
        if (client_certificate is None) != (client_key is None):
            raise ValueError(
                "a client certificate and its private key go together; pass both or neither"
            )
        if client_certificate is not None and root_certificate is None:
            raise ValueError(
                "a client certificate needs the CA certificate that signed the server's "
                "certificate (TLS); pass it as well"
            )
        if root_certificate is None:
            self.channel = grpc.insecure_channel(address, options=options)
        else:
            root_pem = _read_pem(root_certificate, "CA certificate")
            key_pem = _read_pem(client_key, "client key") if client_key else None
            chain_pem = (
                _read_pem(client_certificate, "client certificate") if client_certificate else None
            )
            # gRPC reports a bad file only as a failed handshake that names no file.
            check_ca_file(
                root_certificate,
                "--tls-ca (root_certificate)",
                "the server's certificate",
            )
            if client_certificate is not None and client_key is not None:
                check_key_pair(
                    client_certificate,
                    client_key,
                    "--tls-cert (client_certificate)",
                    "--tls-key (client_key)",
                )
            credentials = grpc.ssl_channel_credentials(
                root_certificates=root_pem, private_key=key_pem, certificate_chain=chain_pem
            )
            self.channel = grpc.secure_channel(address, credentials, options=options)
        self.stub = pb_grpc.ApplianceServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout_s = float(timeout_s)
        self.closed = False
        self._limits: pb.GetModelInfoResponse | None = None

    def close(self) -> None:
        """Close the channel; later calls raise ``ValueError``. Closing again does nothing."""
        self.closed = True
        self.channel.close()

    def __enter__(self) -> ApplianceClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _metadata(self) -> list[tuple[str, str]]:
        """Return call metadata with a new request id, which the server logs.

        Raises:
            ValueError: If the client was closed.
        """
        if self.closed:
            raise ValueError("this ApplianceClient is closed; create a new one to call again")
        return [(REQUEST_ID_KEY, uuid.uuid4().hex[:16])]

    def health(self, service: str = "") -> str:
        """Return the health status name, for example ``SERVING``."""
        reply = self.health_stub.Check(
            health_pb2.HealthCheckRequest(service=service),
            timeout=min(self.timeout_s, 10.0),
            metadata=self._metadata(),
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    def model_info(self) -> pb.GetModelInfoResponse:
        """Return the served model's data contract and training summary."""
        return self.stub.GetModelInfo(
            pb.GetModelInfoRequest(), timeout=self.timeout_s, metadata=self._metadata()
        )

    def quality_report(self, include_html: bool = True) -> pb.GetQualityReportResponse:
        """Return the quality report stored for the served model.

        Arguments:
            include_html: Also return the page with its embedded PNG figures.

        Raises:
            grpc.RpcError: FAILED_PRECONDITION if the model has no report, RESOURCE_EXHAUSTED
                if the page does not fit in the server's message limit.
        """
        return self.stub.GetQualityReport(
            pb.GetQualityReportRequest(include_html=include_html),
            timeout=self.timeout_s,
            metadata=self._metadata(),
        )

    def generate_stream(self, request: pb.GenerateRequest) -> Iterator[pb.GenerateResponse]:
        """Yield the raw chunks of a Generate call.

        ``timeout_s`` bounds the wait for each message, not the whole stream: a large count
        that arrives steadily takes as long as it needs, and a server that sends nothing for
        ``timeout_s`` seconds has the call cancelled. Progress messages (no beats, no stats)
        are yielded too.

        Raises:
            StreamStalledError: If no message arrived within ``timeout_s`` seconds.
        """
        call = self.stub.Generate(request, metadata=self._metadata())
        stalled = threading.Event()

        def cancel_stalled() -> None:
            stalled.set()
            call.cancel()

        watchdog: threading.Timer | None = None
        try:
            while True:
                watchdog = threading.Timer(self.timeout_s, cancel_stalled)
                watchdog.daemon = True
                watchdog.start()
                try:
                    chunk = next(call)
                except StopIteration:
                    return
                except grpc.RpcError as exc:
                    if stalled.is_set():
                        raise StreamStalledError(self.timeout_s) from exc
                    raise
                finally:
                    watchdog.cancel()
                yield chunk
        finally:
            # A caller that stops reading early frees the server's worker at once.
            call.cancel()

    def generate(
        self,
        count: int = 0,
        class_counts: dict[str, int] | None = None,
        temperature: float | None = None,
        margin: float | None = None,
        seed: int | None = None,
        normalised: bool = False,
        chunk_beats: int = 0,
        max_draws_per_beat: int = 0,
    ) -> Generated:
        """Generate beats and collect every chunk.

        Arguments:
            count: Total beats spread over the known classes (when ``class_counts`` is None).
            class_counts: Beats per class name.
            temperature: Latent temperature (server default 1.0).
            margin: Lowest accepted pertinence score (server default from the manifest).
            seed: Seed for reproducible beats.
            normalised: Return model units instead of millivolts.
            chunk_beats: Beats per streamed chunk (server default 256).
            max_draws_per_beat: Draw budget per requested beat (server default 20).

        Raises:
            ValueError: If a count, the seed or the draw budget does not fit its field.
            GenerateInterruptedError: If the call failed after some beats had arrived; it
                keeps them in ``received``. A call that fails before any beat arrived raises
                gRPC's own error.
        """
        request = pb.GenerateRequest(
            count=unsigned_field("count", count, 32),
            unit=pb.SAMPLE_UNIT_NORMALISED if normalised else pb.SAMPLE_UNIT_MILLIVOLT,
            chunk_beats=unsigned_field("chunk_beats", chunk_beats, 32),
            max_draws_per_beat=unsigned_field("max_draws_per_beat", max_draws_per_beat, 32),
        )
        if class_counts is not None and not isinstance(class_counts, Mapping):
            raise ValueError(
                f"class_counts must map class names to counts, such as {{'N': 100, 'V': 50}}; "
                f"got {type(class_counts).__name__}"
            )
        for name, n in (class_counts or {}).items():
            request.class_counts.add(
                beat_class=class_value(name), count=unsigned_field(f"count of {name}", n, 32)
            )
        if temperature is not None:
            request.temperature = temperature
        if margin is not None:
            request.margin = margin
        if seed is not None:
            request.seed = unsigned_field("seed", seed, 64)
        beats: list[np.ndarray] = []
        classes: list[str] = []
        scores: list[float] = []
        stats, fs_hz = pb.GenerateStats(), 0.0
        try:
            for chunk in self.generate_stream(request):
                # The last response has no beats but the shape, so an empty result keeps it.
                beats.append(decode_samples(chunk.samples))
                classes.extend(class_name(v) for v in chunk.beat_classes)
                scores.extend(chunk.scores)
                fs_hz = chunk.fs_hz or fs_hz
                if chunk.HasField("stats"):
                    stats = chunk.stats
        except grpc.RpcError as exc:
            if not classes:
                raise
            received = Generated(np.concatenate(beats), classes, np.asarray(scores), stats, fs_hz)
            raise GenerateInterruptedError(exc, received, request_total(request)) from exc
        stacked = np.concatenate(beats) if beats else np.zeros((0, 0, 0), dtype=np.float32)
        return Generated(stacked, classes, np.asarray(scores), stats, fs_hz)

    def validate(
        self,
        beats: npt.ArrayLike,
        classes: Sequence[str | None] | None = None,
        margin: float | None = None,
        normalised: bool = False,
        fs_hz: float | None = None,
    ) -> Validated:
        """Score beats of shape (beats, leads, window_samples), in mV unless ``normalised``.

        Nested lists are accepted and converted to a float32 array. ``fs_hz``, the beats'
        sampling rate when known, lets the server reject beats at another rate than the model's.
        The first call reads the server's limits with GetModelInfo. A set that does not fit one
        message goes with ValidateStream, in messages of at most ``VALIDATE_STREAM_BEATS``
        beats, and a set over the server's limit per request is split into several calls.
        Each call gets ``margin``, or the server's default when it is None. The warnings of a
        split set are computed here over the whole set, with the server's check.

        Raises:
            ValueError: If the beats are not three-dimensional numbers that fit float32, one
                beat is larger than the server's message limit,
                ``classes`` is not a list of names with one entry per beat, or ``margin`` or
                ``fs_hz`` is not a number.
            CallPartError: If a call for a later part of a split set failed; it names the beats
                of that part.
        """
        beats = _float32_beats(beats)
        if beats.ndim != 3:
            raise ValueError(
                f"beats must have shape (beats, leads, window_samples), got {beats.shape}"
            )
        if classes is not None:
            classes = _class_names(classes)
        for name, value in (("margin", margin), ("fs_hz", fs_hz)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, numbers.Real)
            ):
                raise ValueError(f"{name}={value!r} is not a number; pass a float, or None")
        if classes is not None and len(classes) != beats.shape[0]:
            raise ValueError(
                f"classes has {len(classes)} entries for {beats.shape[0]} beats; pass one "
                "class (or None) per beat, or no classes"
            )
        # A server that states no limit (0) has the defaults.
        limits = self.cached_model_info()
        message_bytes = limits.max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES
        beat_bytes = 4 * beats.shape[1] * beats.shape[2]
        if beat_bytes + REQUEST_FIXED_BYTES > message_bytes:
            raise ValueError(
                f"one beat of shape {beats.shape[1:]} is {beat_bytes} bytes of samples, more "
                f"than fits the server's message limit of {message_bytes} bytes; the model "
                f"takes {len(limits.leads)} lead(s) of {limits.window_samples} samples"
            )
        call_beats = min(
            limits.max_beats_per_request or DEFAULT_MAX_BEATS_PER_REQUEST,
            validate_reply_fit(message_bytes),
        )
        message_beats = min(
            VALIDATE_STREAM_BEATS,
            call_beats,
            validate_message_fit(message_bytes, beats.shape[1] * beats.shape[2]),
        )
        if beats.shape[0] <= message_beats:
            return self._validate_part(beats, classes, margin, normalised, fs_hz, message_beats)
        parts: list[Validated] = []
        for start in range(0, beats.shape[0], call_beats):
            stop = min(start + call_beats, beats.shape[0])
            part_classes = None if classes is None else classes[start:stop]
            try:
                part = self._validate_part(
                    beats[start:stop], part_classes, margin, normalised, fs_hz, message_beats
                )
            except grpc.RpcError as exc:
                if start == 0:
                    raise
                raise CallPartError(exc, start, stop, beats.shape[0]) from exc
            parts.append(part)
        # The server checks each call's beats alone, so the client runs the same check on the
        # whole set, and the warning gives the figures of the set.
        scale_mv = limits.scale_mv if normalised else 1.0
        problem = find_input_problem(summarise_beat_levels(measure_beat_levels(beats * scale_mv)))
        return Validated(
            scores=np.concatenate([part.scores for part in parts]),
            accepted=np.concatenate([part.accepted for part in parts]),
            classes=[name for part in parts for name in part.classes],
            margin=parts[0].margin,
            warnings=[] if problem is None else [problem.message],
        )

    def cached_model_info(self) -> pb.GetModelInfoResponse:
        """Return the server's GetModelInfo reply, read with the first call of this client.

        The limits and the data contract in it are fixed for the life of a server process.
        """
        if self._limits is None:
            self._limits = self.model_info()
        return self._limits

    def _validate_part(
        self,
        beats: np.ndarray,
        classes: Sequence[str | None] | None,
        margin: float | None,
        normalised: bool,
        fs_hz: float | None,
        message_beats: int,
    ) -> Validated:
        """Score beats in one call: Validate if they fit one message, else ValidateStream."""
        if beats.shape[0] <= message_beats:
            request = next(
                self._requests(
                    pb.ValidateRequest, beats, classes, margin, normalised, fs_hz, message_beats
                )
            )
            reply: pb.ValidateResponse | pb.ValidateStreamResponse = self.stub.Validate(
                request, timeout=self.timeout_s, metadata=self._metadata()
            )
        else:
            reply = self.stub.ValidateStream(
                self._requests(
                    pb.ValidateStreamRequest,
                    beats,
                    classes,
                    margin,
                    normalised,
                    fs_hz,
                    message_beats,
                ),
                timeout=self.timeout_s,
                metadata=self._metadata(),
            )
        return Validated(
            scores=np.asarray(reply.scores),
            accepted=np.asarray(reply.accepted, dtype=bool),
            classes=[class_name(v) for v in reply.beat_classes],
            margin=reply.margin,
            warnings=[warning.message for warning in reply.warnings],
        )

    def _requests(
        self,
        message_type: type[RequestT],
        beats: np.ndarray,
        classes: Sequence[str | None] | None,
        margin: float | None,
        normalised: bool,
        fs_hz: float | None,
        message_beats: int,
    ) -> Iterator[RequestT]:
        """Yield requests of ``message_beats`` beats each; only the first one sets the margin.

        An empty set gives one request without beats, which the server rejects by name.
        """
        for start in range(0, max(1, beats.shape[0]), message_beats):
            part = beats[start : start + message_beats]
            request = message_type(samples=encode_samples(part, normalised))
            if classes is not None:
                request.beat_classes.extend(
                    class_value(c) for c in classes[start : start + message_beats]
                )
            if margin is not None and start == 0:
                request.margin = margin
            if fs_hz is not None:
                request.fs_hz = fs_hz
            yield request
