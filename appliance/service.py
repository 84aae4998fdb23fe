"""The gRPC servicer: checks each request, calls the engine, builds the reply."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import grpc
import numpy as np

from appliance.baseline import (
    BeatLevels,
    find_input_problem,
    measure_beat_levels,
    summarise_beat_levels,
)
from appliance.classes import AAMI_CLASSES
from appliance.engine import Engine, GenerateResult, merge_results
from appliance.errors import (
    ApplianceError,
    ModelNotReadyError,
    ModelStoreError,
    ReportNotFoundError,
    RequestError,
    RequestTooLargeError,
)
from appliance.report_store import REPORT_COMMAND, StoredReport, load_report, metric_rows
from appliance.serve_config import (
    DEFAULT_MAX_BEATS_PER_REQUEST,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_STALLED_SEND_S,
    MAX_TEMPERATURE,
    PROGRESS_INTERVAL_S,
    validate_reply_fit,
)
from appliance.server_errors import (
    CallCancelledError,
    CallRecord,
    request_stream_cancelled,
    rpc_call,
)
from appliance.slots import FairSlots
from appliance.v1 import appliance_pb2 as pb
from appliance.v1 import appliance_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

DEFAULT_TEMPERATURE = 1.0
DEFAULT_CHUNK_BEATS = 256
MAX_CHUNK_BEATS = 4096
DEFAULT_DRAWS_PER_BEAT = 20
MAX_DRAWS_PER_BEAT = 1000
# Validate scores this many beats per engine call, so that a cancelled call stops within one
# piece and other calls get the engine in between. On 2 cores 1,024 beats kept an engine slot
# for about 2 s after the client had gone. Scoring time grows with the beats, so 256 beats
# should take about a quarter of that (an estimate).
SCORE_PIECE_BEATS = 256
# Generate takes the engine slot for at most this many requested beats at a time, for the
# same reason. A chunk of up to this many beats is one piece, so its beats do not depend on it.
GENERATE_PIECE_BEATS = 256
# Bytes of a Generate response besides the samples, scores and classes: the sample header,
# fs_hz, field tags and length prefixes, with room to spare.
RESPONSE_OVERHEAD_BYTES = 1024
# Tolerance when comparing a request's fs_hz with the model's, in Hz.
FS_TOLERANCE_HZ = 1e-3
# How often a call waiting for an engine slot checks whether its client is still there, in s.
SLOT_POLL_S = 0.1


def class_to_proto(index: int) -> pb.BeatClass:
    """Return the BeatClass enum value of an AAMI class index."""
    return cast(pb.BeatClass, index + 1)


def class_from_proto(value: int) -> int:
    """Return the AAMI class index of a BeatClass enum value, or -1 for UNSPECIFIED."""
    return value - 1


@dataclass(frozen=True)
class ThreadPlan:
    """Split of the CPUs the server may use between graph calls and their threads.

    Attributes:
        cpu_limit: CPUs available: the cgroup quota if set, else the affinity mask size.
        cpu_limit_source: Where ``cpu_limit`` comes from.
        workers: gRPC worker threads.
        engine_slots: Graph calls run at the same time.
        intra_op_threads: ONNX Runtime threads per graph call.
    """

    cpu_limit: float
    cpu_limit_source: str
    workers: int
    engine_slots: int
    intra_op_threads: int


class _SamplesRequest(Protocol):
    """Fields shared by ValidateRequest and ValidateStreamRequest."""

    samples: pb.Samples
    beat_classes: Iterable[int]
    margin: float
    fs_hz: float

    def HasField(self, name: str) -> bool: ...  # noqa: N802 - protobuf method name


@contextlib.contextmanager
def _stall_guard(
    context: grpc.ServicerContext, stalled_send_s: float, call: CallRecord
) -> Iterator[None]:
    """Cancel the call if the response yielded inside this block is not sent in time.

    gRPC sends a yielded response from the handler's own worker thread and blocks that thread
    while the client's flow-control window is full, so a client that stops reading would keep
    a worker until its deadline. A timer cancels the call after ``stalled_send_s`` seconds,
    which ends the blocked send and frees the thread.
    """

    def cancel_stalled() -> None:
        call.counts["stalled_send_s"] = stalled_send_s
        logger.warning(
            "rpc=Generate request_id=%s stalled_send_s=%.1f error=the client read no response "
            "in time, so the call is cancelled",
            call.request_id,
            stalled_send_s,
        )
        context.cancel()

    timer = threading.Timer(stalled_send_s, cancel_stalled)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


class ApplianceServicer(pb_grpc.ApplianceServiceServicer):
    """Serves Generate, Validate, ValidateStream, GetModelInfo and GetQualityReport.

    Calls fail with UNAVAILABLE until ``set_engine`` is called and again after
    ``begin_shutdown``. Calls already running when shutdown begins carry on.

    Arguments:
        plan: Thread settings, reported by GetModelInfo; ``engine_slots`` bounds the graph
            calls that run at the same time.
        max_beats_per_request: Most beats one request may ask for or carry.
        max_message_bytes: The server's largest reply message in bytes; GetQualityReport
            rejects a reply above it with RESOURCE_EXHAUSTED.
    """

    def __init__(
        self,
        plan: ThreadPlan,
        max_beats_per_request: int = DEFAULT_MAX_BEATS_PER_REQUEST,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        stalled_send_s: float = DEFAULT_STALLED_SEND_S,
    ) -> None:
        if not (math.isfinite(stalled_send_s) and stalled_send_s > 0):
            raise ValueError(
                f"stalled_send_s={stalled_send_s} must be a finite number of seconds above 0"
            )
        self.plan = plan
        self.max_beats_per_request = max_beats_per_request
        self.max_message_bytes = max_message_bytes
        self.stalled_send_s = stalled_send_s
        self.progress_interval_s = PROGRESS_INTERVAL_S
        self._engine: Engine | None = None
        self._store: Path | None = None
        self._slots = FairSlots(plan.engine_slots)
        self._shutting_down = threading.Event()

    def set_engine(self, engine: Engine, store: Path | None = None) -> None:
        """Serve calls from a loaded and checked engine.

        Arguments:
            engine: The model to serve.
            store: Model store the engine was loaded from; GetQualityReport reads the
                model's report there. With None, GetQualityReport fails with
                FAILED_PRECONDITION.
        """
        self._engine = engine
        self._store = store

    def begin_shutdown(self) -> None:
        """Reject new calls with UNAVAILABLE while calls in flight continue."""
        self._shutting_down.set()

    def _ready_engine(self) -> Engine:
        if self._shutting_down.is_set():
            raise ModelNotReadyError("the server is shutting down; retry on another replica")
        if self._engine is None:
            raise ModelNotReadyError(
                "the model is still loading; retry when the health service reports SERVING"
            )
        return self._engine

    @contextlib.contextmanager
    def _engine_slot(self, context: grpc.ServicerContext) -> Iterator[None]:
        """Hold one engine slot, served in arrival order; give up if the client cancels."""
        ticket = self._slots.request()
        while not ticket.wait(SLOT_POLL_S):
            if not context.is_active():
                self._slots.withdraw(ticket)
                raise CallCancelledError
        try:
            yield
        finally:
            self._slots.release()

    # Request checks ------------------------------------------------------------------------

    def _margin(self, engine: Engine, request: _SamplesRequest | pb.GenerateRequest) -> float:
        if not request.HasField("margin"):
            return engine.default_margin
        margin = float(request.margin)
        low, high = engine.min_margin, engine.max_margin
        # The field is float32, so the bounds are compared at float32 precision: a client that
        # sends max_margin as float32 (0.99 becomes 0.9900000095) stays within range.
        low_f32, high_f32 = float(np.float32(low)), float(np.float32(high))
        if not (math.isfinite(margin) and low_f32 <= margin <= high_f32):
            raise RequestError(
                f"margin={_float32_text(margin)} is out of range; use {low:g} to {high:g}"
            )
        # Adding 0.0 turns -0.0 into 0.0, which the reply and the log then show.
        return min(max(margin, low), high) + 0.0

    def _known_class(self, engine: Engine, value: int, field_name: str) -> int:
        short_names = [AAMI_CLASSES[i] for i in engine.classes_known]
        known = ", ".join(f"BEAT_CLASS_{name}" for name in short_names)
        known += f" (short names {', '.join(short_names)})"
        if value not in pb.BeatClass.values():
            raise RequestError(
                f"{field_name}={value} is not a BeatClass value; use one of "
                f"the classes the model knows: {known}"
            )
        index = class_from_proto(value)
        if index >= 0 and index not in engine.classes_known:
            raise RequestError(
                f"{field_name}={pb.BeatClass.Name(value)} (class {AAMI_CLASSES[index]}) is not "
                f"known by the model; use one of: {known}"
            )
        return index

    def _class_counts(self, engine: Engine, request: pb.GenerateRequest) -> dict[int, int]:
        limit = self.max_beats_per_request
        if not request.class_counts:
            total = int(request.count)
            if total == 0:
                raise RequestError(
                    f"count=0 is out of range; use 1 to {limit} or set class_counts"
                )
            if total > limit:
                raise RequestTooLargeError(
                    f"count={total} is out of range: over the limit of "
                    f"{limit} beats per request; use 1 to {limit} and "
                    "split larger requests"
                )
            known = engine.classes_known
            shares = {
                c: total // len(known) + (1 if i < total % len(known) else 0)
                for i, c in enumerate(known)
            }
            return {c: n for c, n in shares.items() if n > 0}
        counts: dict[int, int] = {}
        for i, item in enumerate(request.class_counts):
            name = f"class_counts[{i}]"
            index = self._known_class(engine, item.beat_class, f"{name}.beat_class")
            if index < 0:
                raise RequestError(
                    f"{name}.beat_class=BEAT_CLASS_UNSPECIFIED is invalid; name "
                    "a class the model knows"
                )
            if item.count == 0:
                raise RequestError(f"{name}.count=0 is out of range; use 1 to {limit}")
            counts[index] = counts.get(index, 0) + int(item.count)
        total = sum(counts.values())
        if total > limit:
            raise RequestTooLargeError(
                f"sum of class_counts={total} is out of range: over the "
                f"limit of {limit} beats per request; split the request"
            )
        return counts

    def _temperature(self, request: pb.GenerateRequest) -> float:
        if not request.HasField("temperature"):
            return DEFAULT_TEMPERATURE
        value = float(request.temperature)
        if not (math.isfinite(value) and 0.0 < value <= MAX_TEMPERATURE):
            raise RequestError(
                f"temperature={_float32_text(value)} is out of range; use a value above 0 "
                f"and at most {MAX_TEMPERATURE:g}"
            )
        return value

    def _bounded(self, name: str, value: int, default: int, maximum: int) -> int:
        if value == 0:
            return default
        if value > maximum:
            raise RequestError(
                f"{name}={value} is out of range; use 1 to {maximum}, or 0 for "
                f"the default of {default}"
            )
        return value

    def _unit(self, name: str, value: int) -> bool:
        """Return True for millivolts, False for normalised units."""
        if value not in pb.SampleUnit.values():
            raise RequestError(
                f"{name}={value} is not a SampleUnit value; use "
                "SAMPLE_UNIT_MILLIVOLT or SAMPLE_UNIT_NORMALISED"
            )
        return value != pb.SAMPLE_UNIT_NORMALISED

    def _decode(
        self, engine: Engine, request: _SamplesRequest, offset: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return scaled beats (beats, leads, window_samples) and class indices (-1 unknown).

        Arguments:
            engine: The model whose data contract the beats must match.
            request: A ValidateRequest or ValidateStreamRequest.
            offset: Beats sent before this message in the same stream, for error messages.
        """
        samples = request.samples
        leads, window = len(engine.leads), engine.window_samples
        limit = self.max_beats_per_request
        if samples.count == 0:
            raise RequestError(f"samples.count=0 is out of range; send 1 to {limit} beats")
        if samples.count > limit:
            raise RequestTooLargeError(
                f"samples.count={samples.count} is out of range: over "
                f"the limit of {limit} beats; split the request"
            )
        if samples.leads != leads:
            raise RequestError(
                f"samples.leads={samples.leads} is invalid; the model takes "
                f"{leads} lead(s) ({', '.join(engine.leads)})"
            )
        if samples.window_samples != window:
            raise RequestError(
                f"samples.window_samples={samples.window_samples} is invalid; "
                f"the model takes windows of {window} samples"
            )
        expected = samples.count * leads * window * 4
        if len(samples.values_f32) != expected:
            raise RequestError(
                f"samples.values_f32 has {len(samples.values_f32)} bytes; "
                f"count*leads*window_samples*4 = {expected} bytes expected"
            )
        if request.HasField("fs_hz") and not (
            abs(request.fs_hz - engine.fs_hz) <= FS_TOLERANCE_HZ
        ):
            raise RequestError(
                f"fs_hz={request.fs_hz:g} is invalid; the model's sampling "
                f"rate is {engine.fs_hz:g} Hz, so resample the beats first"
            )
        millivolt = self._unit("samples.unit", samples.unit)
        x = np.frombuffer(samples.values_f32, dtype="<f4").reshape(samples.count, leads, window)
        finite = np.isfinite(x).all(axis=(1, 2))
        if not finite.all():
            first = int(np.flatnonzero(~finite)[0])
            raise RequestError(
                f"samples.values_f32 contains NaN or infinity in beat "
                f"{first + offset}; send finite values only"
            )
        beat_classes = list(request.beat_classes)
        if beat_classes and len(beat_classes) != samples.count:
            raise RequestError(
                f"beat_classes has {len(beat_classes)} entries; send none or "
                f"one per beat ({samples.count})"
            )
        classes = np.full(samples.count, -1, dtype=np.int64)
        for i, value in enumerate(beat_classes):
            classes[i] = self._known_class(engine, value, f"beat_classes[{i + offset}]")
        if millivolt:
            millivolts = x
            x = millivolts / engine.scale_mv
            # A finite value near the float32 maximum overflows when it is scaled.
            scaled_finite = np.isfinite(x).all(axis=(1, 2))
            if not scaled_finite.all():
                first = int(np.flatnonzero(~scaled_finite)[0])
                largest = float(np.abs(millivolts[first]).max())
                raise RequestError(
                    f"samples.values_f32 in beat {first + offset} has a value of "
                    f"{_float32_text(largest)} mV, too large to score; send ECG values in mV"
                )
        return x.astype(np.float32), classes

    # RPCs ----------------------------------------------------------------------------------

    def Generate(  # noqa: N802 - name fixed by the proto
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        """Stream accepted synthetic beats in chunks; the last response carries the counts.

        Each chunk is generated from its own seed derived from the request seed, and the
        client's cancellation or deadline is checked before each chunk and between engine
        batches, so an abandoned call frees its worker within one batch. While most draws are
        rejected, a response without beats or stats goes out whenever the call has sent nothing
        for ``progress_interval_s``, between two batches of drawing.
        """
        with rpc_call("Generate", context) as call:
            engine = self._ready_engine()
            counts = self._class_counts(engine, request)
            temperature = self._temperature(request)
            margin = self._margin(engine, request)
            chunk_beats = min(
                self._bounded(
                    "chunk_beats", request.chunk_beats, DEFAULT_CHUNK_BEATS, MAX_CHUNK_BEATS
                ),
                self._chunk_fit(engine),
            )
            draws_per_beat = self._bounded(
                "max_draws_per_beat",
                request.max_draws_per_beat,
                DEFAULT_DRAWS_PER_BEAT,
                MAX_DRAWS_PER_BEAT,
            )
            millivolt = self._unit("unit", request.unit)
            seed = request.seed if request.HasField("seed") else int.from_bytes(os.urandom(8))
            # The seed is logged and returned, so that a call without one can be repeated.
            call.counts.update(
                requested=sum(counts.values()), temperature=temperature, margin=margin, seed=seed
            )
            stats = pb.GenerateStats(
                margin=margin, privacy_threshold=engine.privacy_threshold, seed=seed
            )
            call.counts["accepted"] = 0
            sent = _SendClock(self.progress_interval_s)
            for part, portion in enumerate(_portions(counts, chunk_beats)):
                if not context.is_active():
                    raise CallCancelledError
                result = yield from self._generate_portion(
                    engine,
                    context,
                    call,
                    sent,
                    portion,
                    temperature,
                    margin,
                    _portion_seed(seed, part),
                    draws_per_beat,
                    millivolt,
                )
                stats.draws += result.draws
                stats.accepted += result.beats.shape[0]
                stats.pertinence_rejections += result.pertinence_rejections
                stats.privacy_rejections += result.privacy_rejections
                stats.invalid_rejections += result.invalid_rejections
                stats.surplus_dropped += result.surplus_dropped
                stats.budget_exhausted |= result.budget_exhausted
                call.counts.update(accepted=stats.accepted, draws=stats.draws)
                if result.beats.shape[0]:
                    chunk = self._chunk(
                        engine, result.beats, result.classes, result.scores, millivolt
                    )
                    with _stall_guard(context, self.stalled_send_s, call):
                        yield chunk
                    sent.mark()
            if not context.is_active():
                raise CallCancelledError
            call.counts.update(
                pertinence_rejections=stats.pertinence_rejections,
                privacy_rejections=stats.privacy_rejections,
                invalid_rejections=stats.invalid_rejections,
                surplus_dropped=stats.surplus_dropped,
            )
            final = self._progress(engine, millivolt)
            final.stats.CopyFrom(stats)
            with _stall_guard(context, self.stalled_send_s, call):
                yield final

    def _generate_portion(
        self,
        engine: Engine,
        context: grpc.ServicerContext,
        call: CallRecord,
        sent: _SendClock,
        portion: dict[int, int],
        temperature: float,
        margin: float,
        seed: int,
        draws_per_beat: int,
        millivolt: bool,
    ) -> Generator[pb.GenerateResponse, None, GenerateResult]:
        """Generate one chunk's beats in pieces, taking the engine slot for each piece.

        A portion of at most ``GENERATE_PIECE_BEATS`` beats is one piece with the portion's
        seed. A larger one is split, each piece with a seed derived from the portion's, so that
        other calls get the engine between pieces. When the call has sent nothing for
        ``progress_interval_s``, drawing pauses after its current batch, gives the engine back
        and yields a progress response without beats, so that the client knows the call is
        alive. It then draws on where it paused.

        Returns:
            The portion's result, through ``yield from``.
        """
        pieces = list(_portions(portion, GENERATE_PIECE_BEATS))
        results = []
        for index, piece in enumerate(pieces):
            run = engine.start_generate(
                piece,
                temperature,
                margin,
                seed=seed if len(pieces) == 1 else _portion_seed(seed, index),
                max_draws_per_beat=draws_per_beat,
            )
            while not run.done:
                if not context.is_active():
                    raise CallCancelledError
                with self._engine_slot(context):
                    run.advance(should_stop=lambda: not context.is_active(), until_s=sent.due_s)
                # The portion's last piece is followed by its chunk at once.
                last = run.done and index == len(pieces) - 1
                if time.monotonic() >= sent.due_s and not last:
                    if not context.is_active():
                        raise CallCancelledError
                    call.counts["progress_messages"] = call.counts.get("progress_messages", 0) + 1
                    with _stall_guard(context, self.stalled_send_s, call):
                        yield self._progress(engine, millivolt)
                    sent.mark()
            results.append(run.finish())
        return results[0] if len(results) == 1 else merge_results(results)

    def _progress(self, engine: Engine, millivolt: bool) -> pb.GenerateResponse:
        """Return a Generate response without beats or stats: the call is still drawing."""
        empty = np.zeros((0, len(engine.leads), engine.window_samples), dtype=np.float32)
        return self._chunk(engine, empty, np.zeros(0, dtype=np.int64), np.zeros(0), millivolt)

    def _stream_reply_fit(self) -> int:
        """Return the most beats whose ValidateStream reply fits the server's message limit."""
        return validate_reply_fit(self.max_message_bytes)

    def _chunk_fit(self, engine: Engine) -> int:
        """Return the most beats whose Generate response fits the server's message limit."""
        # float32 samples, one float32 score and a class enum of at most 2 bytes per beat.
        beat_bytes = len(engine.leads) * engine.window_samples * 4 + 4 + 2
        return max(1, (self.max_message_bytes - RESPONSE_OVERHEAD_BYTES) // beat_bytes)

    def _chunk(
        self,
        engine: Engine,
        beats: np.ndarray,
        classes: np.ndarray,
        scores: np.ndarray,
        millivolt: bool,
    ) -> pb.GenerateResponse:
        values = beats * engine.scale_mv if millivolt else beats
        return pb.GenerateResponse(
            samples=pb.Samples(
                count=beats.shape[0],
                leads=beats.shape[1],
                window_samples=beats.shape[2],
                values_f32=np.ascontiguousarray(values, dtype="<f4").tobytes(),
                unit=pb.SAMPLE_UNIT_MILLIVOLT if millivolt else pb.SAMPLE_UNIT_NORMALISED,
            ),
            beat_classes=[class_to_proto(int(c)) for c in classes],
            scores=scores.astype(np.float32).tolist(),
            fs_hz=engine.fs_hz,
        )

    def Validate(  # noqa: N802 - name fixed by the proto
        self, request: pb.ValidateRequest, context: grpc.ServicerContext
    ) -> pb.ValidateResponse:
        """Score one batch of beats."""
        with rpc_call("Validate", context) as call:
            engine = self._ready_engine()
            margin = self._margin(engine, request)
            x, classes = self._decode(engine, request)
            call.counts.update(beats=x.shape[0], margin=margin)
            levels = measure_beat_levels(x * engine.scale_mv)
            scores, scored_classes = self._score(engine, x, classes, context)
            accepted = scores >= margin
            call.counts["accepted"] = int(accepted.sum())
            warnings = _input_warnings(levels, call)
            return pb.ValidateResponse(
                scores=scores.astype(np.float32).tolist(),
                accepted=accepted.tolist(),
                beat_classes=[class_to_proto(int(c)) for c in scored_classes],
                margin=margin,
                warnings=warnings,
            )
        # Reached only when the client cancelled or its deadline expired; gRPC drops the reply.
        return pb.ValidateResponse()

    def ValidateStream(  # noqa: N802 - name fixed by the proto
        self,
        request_iterator: Iterable[pb.ValidateStreamRequest],
        context: grpc.ServicerContext,
    ) -> pb.ValidateStreamResponse:
        """Score beats sent as several messages; one reply covers all of them in order."""
        with rpc_call("ValidateStream", context) as call:
            engine = self._ready_engine()
            # Each message is scored as it arrives, so a stream keeps one message's beats in
            # memory at a time however long the client keeps it open.
            scores_list: list[np.ndarray] = []
            classes_list: list[np.ndarray] = []
            levels_list: list[BeatLevels] = []
            margin: float | None = None
            first_set_margin = False
            total = 0
            for message in request_iterator:
                with _naming_message(len(scores_list)):
                    message_margin = self._margin(engine, message)
                # Margins travel as float32, so they are compared at that precision: a client
                # that repeats the default margin must not differ from it by rounding.
                if (
                    margin is not None
                    and message.HasField("margin")
                    and np.float32(message_margin) != np.float32(margin)
                ):
                    first = _float32_text(margin)
                    if not first_set_margin:
                        first = f"{first} (the model's default, as the first message set none)"
                    raise RequestError(
                        f"margin={_float32_text(message_margin)} in message "
                        f"{len(scores_list)} differs from the first message's {first}; use "
                        "one margin per stream"
                    )
                if margin is None:
                    first_set_margin = message.HasField("margin")
                margin = message_margin if margin is None else margin
                with _naming_message(len(scores_list)):
                    x, classes = self._decode(engine, message, offset=total)
                total += x.shape[0]
                if total > self.max_beats_per_request:
                    raise RequestTooLargeError(
                        f"the stream carries at least {total} beats by message "
                        f"{len(scores_list)}, over the "
                        f"limit of {self.max_beats_per_request}; split "
                        "it into several calls"
                    )
                reply_limit = self._stream_reply_fit()
                if total > reply_limit:
                    raise RequestTooLargeError(
                        f"the stream carries at least {total} beats by message "
                        f"{len(scores_list)}, but the reply for more than "
                        f"{reply_limit} beats would exceed the server's message limit of "
                        f"{self.max_message_bytes} bytes; split it into several calls"
                    )
                levels_list.append(measure_beat_levels(x * engine.scale_mv))
                message_scores, message_classes = self._score(engine, x, classes, context)
                scores_list.append(message_scores)
                classes_list.append(message_classes)
            if request_stream_cancelled(context):
                # gRPC ends the request stream when the client goes away, its deadline passes or
                # a message is over the size limit; the client already has its status.
                raise CallCancelledError
            if not scores_list or margin is None:
                raise RequestError(
                    "the stream carried no ValidateStreamRequest; send at least one"
                )
            call.counts.update(beats=total, messages=len(scores_list), margin=margin)
            scores = np.concatenate(scores_list)
            scored_classes = np.concatenate(classes_list)
            accepted = scores >= margin
            call.counts["accepted"] = int(accepted.sum())
            warnings = _input_warnings(BeatLevels.concatenate(levels_list), call)
            return pb.ValidateStreamResponse(
                scores=scores.astype(np.float32).tolist(),
                accepted=accepted.tolist(),
                beat_classes=[class_to_proto(int(c)) for c in scored_classes],
                margin=margin,
                warnings=warnings,
            )
        # Reached only when the client cancelled or its deadline expired; gRPC drops the reply.
        return pb.ValidateStreamResponse()

    def _score(
        self, engine: Engine, x: np.ndarray, classes: np.ndarray, context: grpc.ServicerContext
    ) -> tuple[np.ndarray, np.ndarray]:
        """Score beats piece by piece, stopping if the client goes away.

        Returns:
            Scores, shape (beats,), and the class index each beat was scored under.
        """
        scores, scored_classes = [], []
        for start in range(0, x.shape[0], SCORE_PIECE_BEATS):
            if not context.is_active():
                raise CallCancelledError
            piece = slice(start, start + SCORE_PIECE_BEATS)
            with self._engine_slot(context):
                scored = engine.score(x[piece], classes[piece])
            if not np.isfinite(scored.scores).all():
                raise ApplianceError("scores are not finite; the model store may be damaged")
            scores.append(scored.scores)
            scored_classes.append(scored.classes)
        return np.concatenate(scores), np.concatenate(scored_classes)

    def GetModelInfo(  # noqa: N802 - name fixed by the proto
        self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetModelInfoResponse:
        """Return the data contract and training summary; never weights or real beats."""
        with rpc_call("GetModelInfo", context):
            engine = self._ready_engine()
            return model_info(
                engine, self.max_beats_per_request, self.plan, self.max_message_bytes
            )
        # Reached only when the client cancelled or its deadline expired; gRPC drops the reply.
        return pb.GetModelInfoResponse()

    def GetQualityReport(  # noqa: N802 - name fixed by the proto
        self, request: pb.GetQualityReportRequest, context: grpc.ServicerContext
    ) -> pb.GetQualityReportResponse:
        """Return the quality report stored for the served model, read from the store per call.

        Reading per call lets an operator attach a report while the server runs.
        """
        with rpc_call("GetQualityReport", context) as call:
            engine = self._ready_engine()
            model_id = str(engine.manifest["model_id"])
            call.counts.update(model_id=model_id, include_html=request.include_html)
            if self._store is None:
                raise ReportNotFoundError(
                    f"model {model_id} has no quality report: the server was started without "
                    f"a model store; run `{REPORT_COMMAND}` and serve that store"
                )
            stored = load_report(self._store, str(engine.manifest["version"]), model_id)
            try:
                reply = quality_report_reply(stored, request.include_html)
            except (TypeError, ValueError, AttributeError) as exc:
                # load_report checks that the figures exist, not that they are numbers.
                raise ModelStoreError(
                    f"the quality report of model {model_id} has a field of the wrong type "
                    f"({exc}); rebuild it with `{REPORT_COMMAND}`"
                ) from exc
            size_bytes = reply.ByteSize()
            call.counts.update(html_bytes=len(stored.report_html), reply_bytes=size_bytes)
            if size_bytes > self.max_message_bytes:
                raise RequestTooLargeError(
                    f"the quality report reply of model {model_id} is {size_bytes} bytes "
                    f"(report_html {len(stored.report_html)} bytes), over the server's message "
                    f"limit of {self.max_message_bytes} bytes; set include_html=false, or "
                    "restart the server with a larger --max-message-bytes"
                )
            return reply
        # Reached only when the client cancelled or its deadline expired; gRPC drops the reply.
        return pb.GetQualityReportResponse()


def model_info(
    engine: Engine, max_beats_per_request: int, plan: ThreadPlan, max_message_bytes: int
) -> pb.GetModelInfoResponse:
    """Build the GetModelInfo reply from the manifest's data contract and summary figures.

    Only named scalar fields are copied, so no weight, graph, file name or path reaches the
    client whatever else the manifest contains.
    """
    manifest = engine.manifest
    files = manifest["files"]
    quality = {
        key: float(value)
        for key, value in manifest.get("quality", {}).items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    counts = manifest["training"].get("train_class_counts", {})
    return pb.GetModelInfoResponse(
        model_id=manifest["model_id"],
        fs_hz=engine.fs_hz,
        window_samples=engine.window_samples,
        pre_r_samples=int(manifest["data"]["pre_r_samples"]),
        leads=engine.leads,
        scale_mv=engine.scale_mv,
        classes_known=[class_to_proto(c) for c in engine.classes_known],
        train_class_counts={str(k): int(v) for k, v in counts.items()},
        trained_at=manifest["trained_at"],
        forward_graph_sha256=files["forward_graph"]["sha256"],
        inverse_graph_sha256=files["inverse_graph"]["sha256"],
        quality=quality,
        bottleneck_dims=engine.bottleneck_dims,
        latent_dims=engine.latent_dims,
        default_margin=engine.default_margin,
        min_margin=engine.min_margin,
        max_margin=engine.max_margin,
        execution_provider=engine.execution_provider,
        max_abs_mv=engine.max_abs_mv,
        max_beats_per_request=max_beats_per_request,
        cpu_limit=plan.cpu_limit,
        cpu_limit_source=plan.cpu_limit_source,
        engine_slots=plan.engine_slots,
        intra_op_threads=plan.intra_op_threads,
        fitted_latent_prior="latent_prior" in files,
        tail_scale=engine.tail_scale,
        lead_check=engine.lead_check is not None,
        max_message_bytes=max_message_bytes,
    )


def quality_report_reply(stored: StoredReport, include_html: bool) -> pb.GetQualityReportResponse:
    """Build the GetQualityReport reply from a stored report's figures.

    Only aggregate figures are copied; ``report_html`` is left empty unless ``include_html``.
    """
    summary = stored.summary
    settings = summary.get("settings", {})
    reply = pb.GetQualityReportResponse(
        model_id=stored.model_id,
        created_at=str(summary.get("created_at") or ""),
        temperature=float(settings.get("temperature") or 0.0),
        margin=float(settings.get("margin") or 0.0),
        report_json=stored.report_json,
        report_html_bytes=len(stored.report_html),
    )
    for name, figures in metric_rows(summary):
        metrics = pb.GeneratorMetrics(name=name)
        for field_name, key in _GENERATOR_FIELDS.items():
            _set_optional(metrics, field_name, figures[key])
        reply.generators.append(metrics)
    trtr_f1: dict[str, Any] = summary.get("trtr_f1", {})
    for class_name in AAMI_CLASSES:
        value = trtr_f1.get(class_name)
        if value is not None:
            reply.trtr_f1[class_name] = float(value)
    _set_optional(reply, "trtr_macro_f1", trtr_f1.get("macro"))
    matches = summary.get("protocol", {}).get("matches_training_records")
    if isinstance(matches, bool):
        reply.matches_training_records = matches
    if include_html:
        reply.report_html = stored.report_html
    return reply


# GeneratorMetrics field name to the key of ``metric_rows``.
_GENERATOR_FIELDS = {
    "tstr_macro_f1": "tstr_macro_f1",
    "tstr_trtr": "tstr_trtr",
    "rebalancing_gain_f1_s": "gain_f1_S",
    "rebalancing_gain_f1_f": "gain_f1_F",
    "discriminative": "discriminative",
    "mean_mmd2_waveform": "mean_mmd2_waveform",
    "mean_mmd2_spectrum": "mean_mmd2_spectrum",
    "frechet": "frechet",
    "dcr_synthetic_median": "dcr_synthetic_median",
    "fraction_below_holdout_p05": "fraction_below_holdout_p05",
    "mia_auroc": "mia_auroc",
    "mia_auroc_unseen": "mia_auroc_unseen",
}


def _set_optional(message: Any, field_name: str, value: Any) -> None:
    """Set an optional double field, leaving it unset for a figure the report lacks."""
    if value is not None:
        setattr(message, field_name, float(value))


_INPUT_WARNING_KINDS = {
    "unit": pb.INPUT_WARNING_KIND_UNIT,
    "baseline": pb.INPUT_WARNING_KIND_BASELINE,
    "flat": pb.INPUT_WARNING_KIND_FLAT,
}


def _input_warnings(levels: BeatLevels, call: CallRecord) -> list[pb.InputWarning]:
    """Return the warning about a call's input beats, if any, and name it in the call's log.

    Raw gRPC clients do not run the CLI's check before they send, so the server repeats it.
    The beats are scored unchanged.
    """
    problem = find_input_problem(summarise_beat_levels(levels))
    if problem is None:
        return []
    call.counts["input_warning"] = problem.kind
    return [pb.InputWarning(kind=_INPUT_WARNING_KINDS[problem.kind], message=problem.message)]


@contextlib.contextmanager
def _naming_message(index: int) -> Iterator[None]:
    """Add the index of a ValidateStream message to a RequestError raised while checking it."""
    try:
        yield
    except RequestError as exc:
        raise type(exc)(f"{exc} (message {index} of the stream)") from exc


def _float32_text(value: float) -> str:
    """Return the shortest text that reads back as the same float32, as a client wrote it.

    float32 fields arrive widened to float64 (0.2 becomes 0.200000003), so messages print them
    at float32 precision: 0.2 stays 0.2 and 5.0000005 stays distinct from the limit 5.
    """
    return str(np.float32(value))


class _SendClock:
    """When a Generate call last sent a response, and when its next progress response is due.

    Arguments:
        interval_s: Seconds without a response after which a progress response is due.
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.last_s = time.monotonic()

    @property
    def due_s(self) -> float:
        """``time.monotonic()`` value at which a progress response is due."""
        return self.last_s + self.interval_s

    def mark(self) -> None:
        """Record that a response was sent now."""
        self.last_s = time.monotonic()


def _portions(counts: dict[int, int], chunk_beats: int) -> Iterator[dict[int, int]]:
    """Split per-class counts into portions of at most ``chunk_beats`` beats, class by class."""
    for class_index, count in sorted(counts.items()):
        for start in range(0, count, chunk_beats):
            yield {class_index: min(chunk_beats, count - start)}


def _portion_seed(seed: int, part: int) -> int:
    """Derive the seed of one chunk from the request seed and the chunk's index."""
    return int(np.random.SeedSequence([seed, part]).generate_state(1, dtype=np.uint64)[0])
