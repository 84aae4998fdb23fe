"""The gRPC servicer: checks each request, calls the engine, builds the reply."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from appliance.classes import AAMI_CLASSES
from appliance.engine import Engine
from appliance.errors import ApplianceError, RequestError, RequestTooLargeError
from appliance.server_errors import status_code_for
from appliance.v1 import appliance_pb2 as pb
from appliance.v1 import appliance_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

MAX_TEMPERATURE = 5.0
DEFAULT_TEMPERATURE = 1.0
DEFAULT_CHUNK_BEATS = 256
MAX_CHUNK_BEATS = 4096
DEFAULT_DRAWS_PER_BEAT = 20
MAX_DRAWS_PER_BEAT = 1000
DEFAULT_MAX_BEATS_PER_REQUEST = 100_000


def class_to_proto(index: int) -> int:
    """Return the BeatClass enum value of an AAMI class index."""
    return index + 1


def class_from_proto(value: int) -> int:
    """Return the AAMI class index of a BeatClass enum value, or -1 for UNSPECIFIED."""
    return value - 1


@dataclass
class CallRecord:
    """What one call logs when it ends."""

    method: str
    request_id: str
    counts: dict[str, Any] = field(default_factory=dict)
    status: str = "OK"


class ApplianceServicer(pb_grpc.ApplianceServiceServicer):
    """Serves Generate, Validate, ValidateStream and GetModelInfo from one engine.

    Arguments:
        engine: The loaded model.
        max_beats_per_request: Most beats one request may ask for or carry.
    """

    def __init__(self, engine: Engine,
                 max_beats_per_request: int = DEFAULT_MAX_BEATS_PER_REQUEST) -> None:
        self.engine = engine
        self.max_beats_per_request = max_beats_per_request

    # Call bookkeeping ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _call(self, method: str, context: grpc.ServicerContext) -> Iterator[CallRecord]:
        """Log the call once at its end and map appliance errors to gRPC status codes."""
        metadata = dict(context.invocation_metadata() or ())
        request_id = str(metadata.get("x-request-id") or uuid.uuid4().hex[:16])
        record = CallRecord(method=method, request_id=request_id)
        started = time.monotonic()
        abort: tuple[grpc.StatusCode, str] | None = None
        try:
            yield record
        except ApplianceError as exc:
            code = status_code_for(exc)
            record.status = code.name
            abort = (code, str(exc))
        except Exception:
            record.status = "INTERNAL"
            logger.exception("rpc=%s request_id=%s error=unhandled", method, request_id)
            abort = (grpc.StatusCode.INTERNAL, f"internal error; request id {request_id}")
        finally:
            if abort is None and not context.is_active():
                record.status = "CANCELLED"
            counts = " ".join(f"{k}={v}" for k, v in record.counts.items())
            logger.info("rpc=%s request_id=%s status=%s duration_ms=%.1f %s", method,
                        request_id, record.status, (time.monotonic() - started) * 1000, counts)
        if abort is not None:
            context.abort(*abort)

    # Request checks ------------------------------------------------------------------------

    def _margin(self, request: Any) -> float:
        if not request.HasField("margin"):
            return self.engine.default_margin
        margin = float(request.margin)
        low, high = self.engine.min_margin, self.engine.max_margin
        if not (math.isfinite(margin) and low <= margin <= high):
            raise RequestError(f"margin={margin:g} is out of range; use {low:g} to {high:g}")
        return margin

    def _known_class(self, value: int, field_name: str) -> int:
        known = ", ".join(AAMI_CLASSES[i] for i in self.engine.classes_known)
        if value not in pb.BeatClass.values():
            raise RequestError(f"{field_name}={value} is not a BeatClass value; use one of "
                               f"the classes the model knows: {known}")
        index = class_from_proto(value)
        if index >= 0 and index not in self.engine.classes_known:
            raise RequestError(f"{field_name}={pb.BeatClass.Name(value)} is not known by the "
                               f"model; use one of: {known}")
        return index

    def _class_counts(self, request: pb.GenerateRequest) -> dict[int, int]:
        counts: dict[int, int] = {}
        if request.class_counts:
            for i, item in enumerate(request.class_counts):
                index = self._known_class(item.beat_class, f"class_counts[{i}].beat_class")
                if index < 0:
                    raise RequestError(f"class_counts[{i}].beat_class is unspecified; name a "
                                       "class")
                if item.count == 0:
                    raise RequestError(f"class_counts[{i}].count=0 is out of range; use at "
                                       f"least 1")
                counts[index] = counts.get(index, 0) + int(item.count)
            total, name = sum(counts.values()), "sum of class_counts"
        else:
            total, name = int(request.count), "count"
            if total == 0:
                raise RequestError(f"count=0 is out of range; use 1 to "
                                   f"{self.max_beats_per_request} or set class_counts")
        if total > self.max_beats_per_request:
            raise RequestTooLargeError(f"{name}={total} exceeds the limit of "
                                       f"{self.max_beats_per_request} beats per request; split "
                                       "the request")
        if not request.class_counts:
            known = self.engine.classes_known
            counts = {c: total // len(known) + (1 if i < total % len(known) else 0)
                      for i, c in enumerate(known)}
            counts = {c: n for c, n in counts.items() if n > 0}
        return counts

    def _temperature(self, request: pb.GenerateRequest) -> float:
        if not request.HasField("temperature"):
            return DEFAULT_TEMPERATURE
        value = float(request.temperature)
        if not (math.isfinite(value) and 0.0 < value <= MAX_TEMPERATURE):
            raise RequestError(f"temperature={value:g} is out of range; use a value above 0 "
                               f"and at most {MAX_TEMPERATURE:g}")
        return value

    def _decode(self, request: pb.ValidateRequest, offset: int = 0) -> tuple[np.ndarray,
                                                                            np.ndarray]:
        """Return scaled beats and class indices (-1 unknown) of a Validate request."""
        samples = request.samples
        leads, window = len(self.engine.leads), self.engine.window_samples
        if samples.count == 0:
            raise RequestError("samples.count=0 is out of range; send at least 1 beat")
        if samples.count > self.max_beats_per_request:
            raise RequestTooLargeError(f"samples.count={samples.count} exceeds the limit of "
                                       f"{self.max_beats_per_request}; split the request")
        if samples.leads != leads:
            raise RequestError(f"samples.leads={samples.leads} does not match the model's "
                               f"{leads} lead(s) ({', '.join(self.engine.leads)})")
        if samples.window_samples != window:
            raise RequestError(f"samples.window_samples={samples.window_samples} does not "
                               f"match the model's window of {window} samples")
        expected = samples.count * leads * window * 4
        if len(samples.values_f32) != expected:
            raise RequestError(f"samples.values_f32 has {len(samples.values_f32)} bytes; "
                               f"count*leads*window_samples*4 = {expected} expected")
        if request.HasField("fs_hz") and abs(request.fs_hz - self.engine.fs_hz) > 1e-3:
            raise RequestError(f"fs_hz={request.fs_hz:g} does not match the model's "
                               f"{self.engine.fs_hz:g} Hz; resample the beats first")
        x = np.frombuffer(samples.values_f32, dtype="<f4").reshape(samples.count, leads, window)
        finite = np.isfinite(x).all(axis=(1, 2))
        if not finite.all():
            first = int(np.flatnonzero(~finite)[0])
            raise RequestError(f"samples.values_f32 contains NaN or infinity in beat "
                               f"{first + offset}; send finite values only")
        if samples.unit != pb.SAMPLE_UNIT_NORMALISED:
            x = x / self.engine.scale_mv
        if request.beat_classes and len(request.beat_classes) != samples.count:
            raise RequestError(f"beat_classes has {len(request.beat_classes)} entries; send "
                               f"none or one per beat ({samples.count})")
        classes = np.full(samples.count, -1, dtype=np.int64)
        for i, value in enumerate(request.beat_classes):
            classes[i] = self._known_class(value, f"beat_classes[{i + offset}]")
        return x.astype(np.float32), classes

    # RPCs ----------------------------------------------------------------------------------

    def Generate(  # noqa: N802 - name fixed by the proto
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateChunk]:
        """Stream accepted synthetic beats in chunks; the last chunk carries the counts."""
        with self._call("Generate", context) as call:
            counts = self._class_counts(request)
            temperature = self._temperature(request)
            margin = self._margin(request)
            chunk_beats = request.chunk_beats or DEFAULT_CHUNK_BEATS
            if chunk_beats > MAX_CHUNK_BEATS:
                raise RequestError(f"chunk_beats={chunk_beats} is out of range; use 1 to "
                                   f"{MAX_CHUNK_BEATS}")
            draws_per_beat = request.max_draws_per_beat or DEFAULT_DRAWS_PER_BEAT
            if draws_per_beat > MAX_DRAWS_PER_BEAT:
                raise RequestError(f"max_draws_per_beat={draws_per_beat} is out of range; "
                                   f"use 1 to {MAX_DRAWS_PER_BEAT}")
            seed = request.seed if request.HasField("seed") else int.from_bytes(os.urandom(8))
            millivolt = request.unit != pb.SAMPLE_UNIT_NORMALISED
            call.counts.update(requested=sum(counts.values()), temperature=temperature,
                               margin=margin)
            stats = pb.GenerateStats(margin=margin,
                                     privacy_threshold=self.engine.privacy_threshold)
            part = 0
            for portion in _portions(counts, chunk_beats):
                if not context.is_active():
                    break
                result = self.engine.generate(
                    portion, temperature, margin, seed=_portion_seed(seed, part),
                    max_draws_per_beat=draws_per_beat, should_stop=lambda: not context.is_active()
                )
                part += 1
                stats.draws += result.draws
                stats.accepted += result.beats.shape[0]
                stats.pertinence_rejections += result.pertinence_rejections
                stats.privacy_rejections += result.privacy_rejections
                stats.invalid_rejections += result.invalid_rejections
                stats.budget_exhausted |= result.budget_exhausted
                if result.beats.shape[0]:
                    yield self._chunk(result.beats, result.classes, result.scores, millivolt)
            call.counts.update(accepted=stats.accepted, draws=stats.draws,
                               pertinence_rejections=stats.pertinence_rejections,
                               privacy_rejections=stats.privacy_rejections)
            final = self._chunk(np.zeros((0, len(self.engine.leads), self.engine.window_samples)),
                                np.zeros(0, dtype=np.int64), np.zeros(0), millivolt)
            final.stats.CopyFrom(stats)
            yield final

    def _chunk(self, beats: np.ndarray, classes: np.ndarray, scores: np.ndarray,
               millivolt: bool) -> pb.GenerateChunk:
        values = beats * self.engine.scale_mv if millivolt else beats
        return pb.GenerateChunk(
            samples=pb.Samples(
                count=beats.shape[0], leads=beats.shape[1], window_samples=beats.shape[2],
                values_f32=np.ascontiguousarray(values, dtype="<f4").tobytes(),
                unit=pb.SAMPLE_UNIT_MILLIVOLT if millivolt else pb.SAMPLE_UNIT_NORMALISED,
            ),
            beat_classes=[class_to_proto(int(c)) for c in classes],
            scores=scores.astype(np.float32).tolist(),
            fs_hz=self.engine.fs_hz,
        )

    def Validate(  # noqa: N802 - name fixed by the proto
        self, request: pb.ValidateRequest, context: grpc.ServicerContext
    ) -> pb.ValidateReply:
        """Score one batch of beats."""
        with self._call("Validate", context) as call:
            margin = self._margin(request)
            x, classes = self._decode(request)
            reply = self._validate(x, classes, margin)
            call.counts.update(beats=x.shape[0], accepted=sum(reply.accepted), margin=margin)
            return reply
        raise AssertionError("unreachable: _call aborts on error")  # pragma: no cover

    def ValidateStream(  # noqa: N802 - name fixed by the proto
        self, request_iterator: Iterable[pb.ValidateRequest], context: grpc.ServicerContext
    ) -> pb.ValidateReply:
        """Score beats sent as several messages; one reply covers all of them in order."""
        with self._call("ValidateStream", context) as call:
            xs, classes_list = [], []
            margin: float | None = None
            total = 0
            for message in request_iterator:
                message_margin = self._margin(message)
                if margin is not None and message.HasField("margin") and message_margin != margin:
                    raise RequestError(f"margin={message_margin:g} differs from the first "
                                       f"message's {margin:g}; use one margin per stream")
                margin = message_margin if margin is None else margin
                x, classes = self._decode(message, offset=total)
                total += x.shape[0]
                if total > self.max_beats_per_request:
                    raise RequestTooLargeError(f"stream carries {total} beats, over the limit "
                                               f"of {self.max_beats_per_request}; split it")
                xs.append(x)
                classes_list.append(classes)
            if not xs:
                raise RequestError("the stream carried no ValidateRequest; send at least one")
            assert margin is not None
            reply = self._validate(np.concatenate(xs), np.concatenate(classes_list), margin)
            call.counts.update(beats=total, messages=len(xs), accepted=sum(reply.accepted))
            return reply
        raise AssertionError("unreachable: _call aborts on error")  # pragma: no cover

    def _validate(self, x: np.ndarray, classes: np.ndarray, margin: float) -> pb.ValidateReply:
        scored = self.engine.score(x, classes)
        if not np.isfinite(scored.scores).all():
            raise ApplianceError("scores are not finite; the model store may be damaged")
        return pb.ValidateReply(
            scores=scored.scores.astype(np.float32).tolist(),
            accepted=(scored.scores >= margin).tolist(),
            beat_classes=[class_to_proto(int(c)) for c in scored.classes],
            margin=margin,
        )

    def GetModelInfo(  # noqa: N802 - name fixed by the proto
        self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext
    ) -> pb.ModelInfo:
        """Return the data contract and training summary; never weights or real beats."""
        with self._call("GetModelInfo", context):
            return model_info(self.engine, self.max_beats_per_request)
        raise AssertionError("unreachable: _call aborts on error")  # pragma: no cover


def model_info(engine: Engine, max_beats_per_request: int) -> pb.ModelInfo:
    """Build the ModelInfo reply from the engine's manifest."""
    manifest = engine.manifest
    files = manifest["files"]
    quality = {k: float(v) for k, v in manifest.get("quality", {}).items()
               if isinstance(v, int | float)}
    counts = manifest["training"].get("train_class_counts", {})
    return pb.ModelInfo(
        model_id=manifest["model_id"],
        fs_hz=engine.fs_hz,
        window_samples=engine.window_samples,
        pre_r_samples=int(manifest["data"]["pre_r_samples"]),
        leads=engine.leads,
        scale_mv=engine.scale_mv,
        classes_known=[class_to_proto(c) for c in engine.classes_known],
        train_class_counts={k: int(v) for k, v in counts.items()},
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
    )


def _portions(counts: dict[int, int], chunk_beats: int) -> Iterator[dict[int, int]]:
    """Split per-class counts into portions of at most ``chunk_beats`` beats, class by class."""
    for class_index, count in sorted(counts.items()):
        for start in range(0, count, chunk_beats):
            yield {class_index: min(chunk_beats, count - start)}


def _portion_seed(seed: int, part: int) -> int:
    return int(np.random.SeedSequence([seed, part]).generate_state(1, dtype=np.uint64)[0])
