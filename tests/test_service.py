"""The gRPC contract over a real socket: bad input, determinism, chunking, reflection."""

from __future__ import annotations

import base64
import json
import math
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from appliance.client import ApplianceClient, decode_samples, encode_samples
from appliance.v1 import appliance_pb2 as pb
from appliance.v1 import appliance_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

CALL_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def client(server_address: str) -> Iterator[ApplianceClient]:
    with ApplianceClient(server_address, timeout_s=CALL_TIMEOUT_S) as connected:
        yield connected


@pytest.fixture(scope="module")
def info(client: ApplianceClient) -> pb.GetModelInfoResponse:
    return client.model_info()


@pytest.fixture(scope="module")
def generated(client: ApplianceClient):
    """Forty beats generated with a fixed seed, in mV.

    Margin 0 accepts any pertinence score, so that the count does not depend on how well the
    short fixture training went; the privacy and validity gates still apply.
    """
    return client.generate(count=40, seed=11, margin=0.0)


def _beats(
    info: pb.GetModelInfoResponse, count: int, leads: int | None = None, window: int | None = None
) -> np.ndarray:
    """Smooth beat-like test windows in mV, shape (count, leads, window)."""
    leads = len(info.leads) if leads is None else leads
    window = info.window_samples if window is None else window
    t = np.arange(window, dtype=np.float32)
    peak = np.exp(-0.5 * ((t - info.pre_r_samples) / 4.0) ** 2)
    return np.broadcast_to(peak, (count, leads, window)).astype(np.float32).copy()


def _validate_request(info: pb.GetModelInfoResponse, beats: np.ndarray) -> pb.ValidateRequest:
    return pb.ValidateRequest(samples=encode_samples(beats))


@dataclass(frozen=True)
class BadCase:
    """A request that must be rejected: the call, the status and words the message names."""

    call: Callable[[pb_grpc.ApplianceServiceStub, pb.GetModelInfoResponse], object]
    code: grpc.StatusCode
    words: tuple[str, ...]


def _generate(
    **fields: object,
) -> Callable[[pb_grpc.ApplianceServiceStub, pb.GetModelInfoResponse], object]:
    def call(stub: pb_grpc.ApplianceServiceStub, info: pb.GetModelInfoResponse) -> object:
        request = pb.GenerateRequest(**fields)  # type: ignore[arg-type]
        return list(stub.Generate(request, timeout=CALL_TIMEOUT_S))

    return call


def _validate(
    make: Callable[[pb.GetModelInfoResponse], pb.ValidateRequest],
) -> Callable[[pb_grpc.ApplianceServiceStub, pb.GetModelInfoResponse], object]:
    def call(stub: pb_grpc.ApplianceServiceStub, info: pb.GetModelInfoResponse) -> object:
        return stub.Validate(make(info), timeout=CALL_TIMEOUT_S)

    return call


def _with_nan(info: pb.GetModelInfoResponse, value: float) -> pb.ValidateRequest:
    beats = _beats(info, 5)
    beats[3, 0, 17] = value
    return _validate_request(info, beats)


def _with(info: pb.GetModelInfoResponse, **fields: object) -> pb.ValidateRequest:
    request = _validate_request(info, _beats(info, 4))
    for name, value in fields.items():
        if name == "beat_classes":
            request.beat_classes.extend(value)  # type: ignore[arg-type]
        else:
            setattr(request, name, value)
    return request


def _samples(info: pb.GetModelInfoResponse, **fields: int) -> pb.ValidateRequest:
    request = _validate_request(info, _beats(info, 4))
    for name, value in fields.items():
        setattr(request.samples, name, value)
    return request


INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
FIVE_MIB = 5 * 1024 * 1024

BAD_CASES = {
    "count zero": BadCase(_generate(count=0), INVALID, ("count=0", "1 to 100000")),
    "count absurd": BadCase(_generate(count=10**9), EXHAUSTED, ("count=1000000000", "100000")),
    "count max uint32": BadCase(
        _generate(count=2**32 - 1), EXHAUSTED, ("count=4294967295", "100000")
    ),
    "class count zero": BadCase(
        _generate(class_counts=[pb.ClassCount(beat_class=pb.BEAT_CLASS_N, count=0)]),
        INVALID,
        ("class_counts[0].count=0", "1 to 100000"),
    ),
    "class counts sum absurd": BadCase(
        _generate(
            class_counts=[
                pb.ClassCount(beat_class=pb.BEAT_CLASS_N, count=2**31),
                pb.ClassCount(beat_class=pb.BEAT_CLASS_N, count=2**31),
            ]
        ),
        EXHAUSTED,
        ("class_counts=4294967296", "100000"),
    ),
    "class unknown value": BadCase(
        _generate(class_counts=[pb.ClassCount(beat_class=42, count=3)]),  # type: ignore[arg-type]
        INVALID,
        ("class_counts[0].beat_class=42", "BEAT_CLASS_N"),
    ),
    "class not learned": BadCase(
        _generate(class_counts=[pb.ClassCount(beat_class=pb.BEAT_CLASS_Q, count=3)]),
        INVALID,
        ("beat_class=BEAT_CLASS_Q (class Q) is not known by the model", "(short names N, "),
    ),
    "class unspecified": BadCase(
        _generate(class_counts=[pb.ClassCount(count=3)]),
        INVALID,
        ("class_counts[0].beat_class=BEAT_CLASS_UNSPECIFIED",),
    ),
    "temperature zero": BadCase(
        _generate(count=5, temperature=0.0), INVALID, ("temperature=0", "above 0", "at most 5")
    ),
    "temperature negative": BadCase(
        _generate(count=5, temperature=-1.0), INVALID, ("temperature=-1", "above 0")
    ),
    "temperature nan": BadCase(
        _generate(count=5, temperature=math.nan), INVALID, ("temperature=nan", "above 0")
    ),
    "temperature too high": BadCase(
        _generate(count=5, temperature=6.0), INVALID, ("temperature=6", "at most 5")
    ),
    "margin above range": BadCase(
        _generate(count=5, margin=1.5), INVALID, ("margin=1.5", "0 to 0.99")
    ),
    "margin below range": BadCase(
        _generate(count=5, margin=-0.25), INVALID, ("margin=-0.25", "0 to 0.99")
    ),
    "margin nan": BadCase(_generate(count=5, margin=math.nan), INVALID, ("margin=nan",)),
    "chunk beats too many": BadCase(
        _generate(count=5, chunk_beats=5000), INVALID, ("chunk_beats=5000", "1 to 4096")
    ),
    "draws per beat too many": BadCase(
        _generate(count=5, max_draws_per_beat=1001),
        INVALID,
        ("max_draws_per_beat=1001", "1 to 1000"),
    ),
    "unit unknown": BadCase(
        _generate(count=5, unit=7),
        INVALID,  # type: ignore[arg-type]
        ("unit=7", "SAMPLE_UNIT_MILLIVOLT"),
    ),
    "sample length wrong": BadCase(
        _validate(lambda info: _validate_request(info, _beats(info, 3, window=200))),
        INVALID,
        ("samples.window_samples=200", "256"),
    ),
    "lead count wrong": BadCase(
        _validate(lambda info: _validate_request(info, _beats(info, 3, leads=2))),
        INVALID,
        ("samples.leads=2", "1 lead"),
    ),
    "sample nan": BadCase(
        _validate(lambda info: _with_nan(info, math.nan)),
        INVALID,
        ("samples.values_f32", "NaN or infinity", "beat 3"),
    ),
    "sample infinity": BadCase(
        _validate(lambda info: _with_nan(info, math.inf)),
        INVALID,
        ("samples.values_f32", "beat 3"),
    ),
    # Finite in float32, but over the float32 maximum once divided by scale_mv (below 1).
    "sample overflows when scaled": BadCase(
        _validate(lambda info: _with_nan(info, 3e38)),
        INVALID,
        ("samples.values_f32 in beat 3", "3e+38 mV", "too large to score"),
    ),
    "byte length wrong": BadCase(
        _validate(lambda info: _samples(info, count=5)),
        INVALID,
        ("samples.values_f32 has 4096 bytes", "5120 bytes expected"),
    ),
    "sample count zero": BadCase(
        _validate(lambda info: _samples(info, count=0)),
        INVALID,
        ("samples.count=0", "1 to 100000"),
    ),
    "sample count absurd": BadCase(
        _validate(lambda info: _samples(info, count=10**9)),
        EXHAUSTED,
        ("samples.count=1000000000", "100000"),
    ),
    "sample unit unknown": BadCase(
        _validate(lambda info: _samples(info, unit=9)), INVALID, ("samples.unit=9",)
    ),
    "validate class unknown": BadCase(
        _validate(lambda info: _with(info, beat_classes=[1, 1, 1, 77])),
        INVALID,
        ("beat_classes[3]=77", "BEAT_CLASS_N"),
    ),
    "validate classes miscounted": BadCase(
        _validate(lambda info: _with(info, beat_classes=[1, 1])),
        INVALID,
        ("beat_classes has 2 entries", "(4)"),
    ),
    "validate margin out of range": BadCase(
        _validate(lambda info: _with(info, margin=2.0)), INVALID, ("margin=2", "0 to 0.99")
    ),
    "sampling rate wrong": BadCase(
        _validate(lambda info: _with(info, fs_hz=250.0)), INVALID, ("fs_hz=250", "360 Hz")
    ),
    "message over size limit": BadCase(
        _validate(
            lambda info: pb.ValidateRequest(
                samples=pb.Samples(
                    count=FIVE_MIB // 1024, leads=1, window_samples=256, values_f32=bytes(FIVE_MIB)
                )
            )
        ),
        EXHAUSTED,
        ("larger than max", "4194304"),
    ),
}


@pytest.mark.parametrize("case", BAD_CASES.values(), ids=BAD_CASES.keys())
def test_bad_request_rejected_and_server_serves(
    case: BadCase, client: ApplianceClient, info: pb.GetModelInfoResponse
):
    with pytest.raises(grpc.RpcError) as raised:
        case.call(client.stub, info)
    error = raised.value
    assert error.code() == case.code, error.details()
    for word in case.words:
        assert word in error.details(), f"{word!r} not in {error.details()!r}"
    assert client.health() == "SERVING"
    assert client.model_info().model_id == info.model_id


def test_negative_count_rejected_by_message_type():
    # uint32 fields cannot carry -1: the Python runtime raises before sending, and a client
    # that wraps -1 to 4294967295 meets the count limit (see the table above).
    with pytest.raises(ValueError, match="-1"):
        pb.GenerateRequest(count=-1)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"count": 5, "seed": -1}, "seed=-1 is out of range; use a whole number from 0 to"),
        ({"count": 5, "seed": 2**64}, f"seed={2**64} is out of range"),
        ({"count": -1}, "count=-1 is out of range; use a whole number from 0 to 4294967295"),
        ({"class_counts": {"N": -1}}, "count of N=-1 is out of range"),
        ({"count": 5, "max_draws_per_beat": -1}, "max_draws_per_beat=-1 is out of range"),
        ({"count": 5, "chunk_beats": 1.5}, "chunk_beats=1.5 is not a whole number"),
    ],
)
def test_client_names_field_out_of_range(
    client: ApplianceClient, arguments: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        client.generate(**arguments)


def test_client_validates_nested_lists(client: ApplianceClient, generated) -> None:
    as_lists = generated.beats[:3].tolist()
    reply = client.validate(as_lists, classes=generated.classes[:3])
    np.testing.assert_allclose(reply.scores, generated.scores[:3], atol=1e-5)
    with pytest.raises(ValueError, match=r"shape \(beats, leads, window_samples\)"):
        client.validate([0.0, 1.0])
    with pytest.raises(ValueError, match="classes has 2 entries for 3 beats"):
        client.validate(generated.beats[:3], classes=generated.classes[:2])


def test_validate_stream_errors(client: ApplianceClient, info: pb.GetModelInfoResponse):
    with pytest.raises(grpc.RpcError) as raised:
        client.stub.ValidateStream(iter(()), timeout=CALL_TIMEOUT_S)
    assert raised.value.code() == INVALID
    assert "no ValidateStreamRequest" in raised.value.details()

    first = pb.ValidateStreamRequest(samples=encode_samples(_beats(info, 2)), margin=0.1)
    second = pb.ValidateStreamRequest(samples=encode_samples(_beats(info, 2)), margin=0.2)
    with pytest.raises(grpc.RpcError) as raised:
        client.stub.ValidateStream(iter((first, second)), timeout=CALL_TIMEOUT_S)
    assert raised.value.code() == INVALID
    assert "margin=0.2 in message 1" in raised.value.details()

    beats = _beats(info, 3)
    beats[1, 0, 5] = math.nan
    third = pb.ValidateStreamRequest(samples=encode_samples(beats))
    with pytest.raises(grpc.RpcError) as raised:
        client.stub.ValidateStream(iter((first, third)), timeout=CALL_TIMEOUT_S)
    assert raised.value.code() == INVALID
    assert "beat 3" in raised.value.details()  # beat index counted over the whole stream
    assert client.health() == "SERVING"


def test_validate_stream_error_names_message(
    client: ApplianceClient, info: pb.GetModelInfoResponse
):
    good = pb.ValidateStreamRequest(samples=encode_samples(_beats(info, 2)))
    miscounted = pb.ValidateStreamRequest(samples=encode_samples(_beats(info, 2)))
    miscounted.beat_classes.append(pb.BEAT_CLASS_N)
    bad_messages = {
        "samples.count=0": pb.ValidateStreamRequest(),
        "samples.leads=2": pb.ValidateStreamRequest(
            samples=encode_samples(_beats(info, 2, leads=2))
        ),
        "fs_hz=250": pb.ValidateStreamRequest(
            samples=encode_samples(_beats(info, 2)), fs_hz=250.0
        ),
        "beat_classes has 1 entries": miscounted,
        "margin=2": pb.ValidateStreamRequest(samples=encode_samples(_beats(info, 2)), margin=2.0),
    }
    for words, bad in bad_messages.items():
        with pytest.raises(grpc.RpcError) as raised:
            client.stub.ValidateStream(iter((good, good, bad)), timeout=CALL_TIMEOUT_S)
        assert raised.value.code() == INVALID, raised.value.details()
        assert words in raised.value.details()
        assert "message 2 of the stream" in raised.value.details()


def test_same_seed_same_beats(client: ApplianceClient, generated):
    again = client.generate(count=40, seed=11, margin=0.0)
    other = client.generate(count=40, seed=12, margin=0.0)
    assert again.beats.tobytes() == generated.beats.tobytes()
    assert again.classes == generated.classes
    assert np.array_equal(again.scores, generated.scores)
    assert other.beats.shape[0] > 0
    assert not np.array_equal(other.beats[:1], generated.beats[:1])


def test_generate_returns_its_seed(client: ApplianceClient, generated):
    assert generated.stats.seed == 11
    # Without a seed the server draws one and returns it, so the call can be repeated.
    random = client.generate(count=12, margin=0.0)
    repeated = client.generate(count=12, margin=0.0, seed=random.stats.seed)
    assert repeated.stats.seed == random.stats.seed
    assert repeated.beats.tobytes() == random.beats.tobytes()


def test_stream_margin_error_names_default(client: ApplianceClient, info):
    beats = encode_samples(_beats(info, 2))
    first = pb.ValidateStreamRequest(samples=beats)
    second = pb.ValidateStreamRequest(samples=beats, margin=0.3)
    with pytest.raises(grpc.RpcError) as raised:
        client.stub.ValidateStream(iter((first, second)), timeout=CALL_TIMEOUT_S)
    assert raised.value.code() == INVALID
    assert "margin=0.3 in message 1 differs from the first message's " in raised.value.details()
    assert "(the model's default, as the first message set none)" in raised.value.details()
    explicit = pb.ValidateStreamRequest(samples=beats, margin=0.2)
    with pytest.raises(grpc.RpcError) as raised:
        client.stub.ValidateStream(iter((explicit, second)), timeout=CALL_TIMEOUT_S)
    assert "differs from the first message's 0.2; use one margin" in raised.value.details()


def test_generate_returns_gated_beats(client: ApplianceClient, info, generated):
    stats = generated.stats
    assert generated.beats.shape == (stats.accepted, len(info.leads), info.window_samples)
    assert generated.beats.dtype == np.float32
    assert np.isfinite(generated.beats).all()
    assert np.abs(generated.beats).max() <= info.max_abs_mv
    # Every draw is accounted for once.
    assert (
        stats.accepted
        + stats.pertinence_rejections
        + stats.privacy_rejections
        + stats.invalid_rejections
        + stats.surplus_dropped
        == stats.draws
    )
    assert stats.accepted == 40 or stats.budget_exhausted
    assert stats.margin == 0.0
    assert (generated.scores >= 0).all()
    assert (generated.scores <= 1).all()
    assert set(generated.classes) <= {pb.BeatClass.Name(c)[-1] for c in info.classes_known}
    assert generated.fs_hz == pytest.approx(info.fs_hz)


def test_generate_applies_requested_margin(client: ApplianceClient):
    # The fixture model scores many draws below 0.3, so the margin must reject some.
    result = client.generate(count=20, margin=0.3, seed=4, max_draws_per_beat=50)
    stats = result.stats
    assert stats.margin == pytest.approx(0.3)
    assert stats.accepted > 0
    assert (result.scores >= 0.3).all()
    assert stats.pertinence_rejections > 0


def test_generate_streams_bounded_chunks(client: ApplianceClient, info):
    request = pb.GenerateRequest(
        class_counts=[pb.ClassCount(beat_class=info.classes_known[0], count=70)],
        chunk_beats=16,
        seed=3,
        unit=pb.SAMPLE_UNIT_NORMALISED,
        margin=0.0,
    )
    chunks = list(client.generate_stream(request))
    stats = chunks[-1].stats
    assert len(chunks) >= 2
    assert all(not chunk.HasField("stats") for chunk in chunks[:-1])
    assert all(1 <= chunk.samples.count <= 16 for chunk in chunks[:-1])
    assert all(chunk.ByteSize() < 64 * 1024 for chunk in chunks)
    assert sum(chunk.samples.count for chunk in chunks) == stats.accepted
    assert all(chunk.samples.unit == pb.SAMPLE_UNIT_NORMALISED for chunk in chunks)
    assert all(set(chunk.beat_classes) == {info.classes_known[0]} for chunk in chunks[:-1])

    millivolt = client.generate(
        class_counts={pb.BeatClass.Name(info.classes_known[0])[-1]: 70},
        seed=3,
        chunk_beats=16,
        margin=0.0,
    )
    normalised = np.concatenate([decode_samples(chunk.samples) for chunk in chunks])
    np.testing.assert_allclose(millivolt.beats, normalised * info.scale_mv, rtol=1e-6)


def test_validate_scores_generated_beats(client: ApplianceClient, info, generated):
    reply = client.validate(generated.beats, classes=generated.classes)
    assert reply.scores.shape == (generated.beats.shape[0],)
    assert ((reply.scores >= 0) & (reply.scores <= 1)).all()
    assert reply.classes == generated.classes
    assert reply.margin == pytest.approx(info.default_margin)
    assert np.array_equal(reply.accepted, reply.scores >= reply.margin)
    # Generation gated these beats on the same score, so each one passes again.
    np.testing.assert_allclose(reply.scores, generated.scores, atol=1e-5)

    unlabelled = client.validate(generated.beats, margin=0.5)
    assert unlabelled.margin == pytest.approx(0.5)
    assert set(unlabelled.classes) <= set(generated.classes) | {
        pb.BeatClass.Name(c)[-1] for c in info.classes_known
    }

    normalised = client.validate(
        generated.beats / info.scale_mv, classes=generated.classes, normalised=True
    )
    np.testing.assert_allclose(normalised.scores, reply.scores, atol=1e-5)


def test_validate_stream_matches_validate(client: ApplianceClient, info, generated):
    beats = generated.beats
    whole = client.stub.Validate(
        pb.ValidateRequest(samples=encode_samples(beats), margin=0.3), timeout=CALL_TIMEOUT_S
    )
    parts = [
        pb.ValidateStreamRequest(samples=encode_samples(beats[start : start + 7]))
        for start in range(0, beats.shape[0], 7)
    ]
    parts[0].margin = 0.3
    streamed = client.stub.ValidateStream(iter(parts), timeout=CALL_TIMEOUT_S)
    np.testing.assert_allclose(streamed.scores, whole.scores, atol=1e-6)
    assert list(streamed.accepted) == list(whole.accepted)
    assert list(streamed.beat_classes) == list(whole.beat_classes)
    assert streamed.margin == pytest.approx(0.3)


@pytest.fixture(scope="module")
def real_beats(shared_data: Path) -> np.ndarray:
    """300 real MLII beats of record 100 in mV after baseline-wander removal."""
    from appliance.config import DataConfig
    from appliance.ecg import read_record

    record = read_record(shared_data / "mitdb" / "100", "100", DataConfig())
    return record.windows[:300].astype(np.float32)


def _warning_kinds(reply: pb.ValidateResponse | pb.ValidateStreamResponse) -> list[str]:
    return [pb.InputWarningKind.Name(warning.kind) for warning in reply.warnings]


def test_validate_warns_on_unit_and_baseline(
    client: ApplianceClient, info: pb.GetModelInfoResponse, real_beats: np.ndarray
):
    from appliance.baseline import measure_baseline_offset

    def validate(beats: np.ndarray, normalised: bool = False) -> pb.ValidateResponse:
        request = pb.ValidateRequest(samples=encode_samples(beats, normalised))
        return client.stub.Validate(request, timeout=CALL_TIMEOUT_S)

    clean = validate(real_beats)
    assert _warning_kinds(clean) == []
    # Model units are scaled back to mV before the check, so they do not warn either.
    assert _warning_kinds(validate(real_beats / info.scale_mv, normalised=True)) == []

    microvolt = validate(real_beats * 1000)
    assert _warning_kinds(microvolt) == ["INPUT_WARNING_KIND_UNIT"]
    assert "probably not in mV" in microvolt.warnings[0].message
    assert "divide them by 1000" in microvolt.warnings[0].message
    assert "300 of 300 beats lie outside" in microvolt.warnings[0].message
    # The beats are scored as sent, and the wrong unit lowers their scores.
    assert len(microvolt.scores) == 300
    assert np.median(microvolt.scores) < np.median(clean.scores)

    flat = validate(np.zeros_like(real_beats))
    assert _warning_kinds(flat) == ["INPUT_WARNING_KIND_FLAT"]

    volt = validate(real_beats / 1000)
    assert _warning_kinds(volt) == ["INPUT_WARNING_KIND_UNIT"]
    assert "multiply them by 1000" in volt.warnings[0].message

    # -0.34 mV is the median level of record 100's raw MLII windows.
    offset = validate(real_beats - 0.34)
    assert _warning_kinds(offset) == ["INPUT_WARNING_KIND_BASELINE"]
    expected = measure_baseline_offset(real_beats - 0.34)
    assert expected.offset_beats == 300
    assert "offset_beats=300 beats=300" in offset.warnings[0].message
    assert f"median_offset_mv={expected.median_offset_mv:.3f}" in offset.warnings[0].message

    # The Python client passes the messages on.
    assert client.validate(real_beats * 1000).warnings == [microvolt.warnings[0].message]
    assert client.validate(real_beats).warnings == []


def test_validate_stream_warns_over_whole_stream(client: ApplianceClient, real_beats: np.ndarray):
    from appliance.baseline import measure_baseline_offset

    # The first message is clean and the other two have 20 % offset beats each, so the stream
    # warns with the count of all three messages.
    shifted = real_beats.copy()
    shifted[100::5] -= 0.5
    parts = [
        pb.ValidateStreamRequest(samples=encode_samples(shifted[start : start + 100]))
        for start in range(0, 300, 100)
    ]
    streamed = client.stub.ValidateStream(iter(parts), timeout=CALL_TIMEOUT_S)
    assert _warning_kinds(streamed) == ["INPUT_WARNING_KIND_BASELINE"]
    expected = measure_baseline_offset(shifted)
    assert expected.offset_beats >= 40
    assert f"offset_beats={expected.offset_beats} beats=300" in streamed.warnings[0].message

    in_microvolt = [
        pb.ValidateStreamRequest(samples=encode_samples(real_beats[start : start + 100] * 1000))
        for start in range(0, 300, 100)
    ]
    streamed = client.stub.ValidateStream(iter(in_microvolt), timeout=CALL_TIMEOUT_S)
    assert _warning_kinds(streamed) == ["INPUT_WARNING_KIND_UNIT"]
    clean = [
        pb.ValidateStreamRequest(samples=encode_samples(real_beats[start : start + 100]))
        for start in range(0, 300, 100)
    ]
    assert _warning_kinds(client.stub.ValidateStream(iter(clean), timeout=CALL_TIMEOUT_S)) == []


def test_model_info_has_contract_only(client: ApplianceClient, info, model_store: Path):
    assert info.fs_hz == pytest.approx(360.0)
    assert info.window_samples == 256
    assert 0 < info.pre_r_samples < info.window_samples
    assert list(info.leads) == ["MLII"]
    assert info.scale_mv > 0
    assert len(info.classes_known) >= 2
    assert sum(info.train_class_counts.values()) > 0
    assert len(info.forward_graph_sha256) == 64
    assert len(info.inverse_graph_sha256) == 64
    assert info.trained_at.endswith(("Z", "+00:00"))
    assert info.min_margin <= info.default_margin <= info.max_margin
    assert info.execution_provider == "CPUExecutionProvider"
    assert info.fitted_latent_prior
    assert info.lead_check
    assert info.tail_scale == 1.0
    # The fixture server runs with the default message limit of 4 MiB.
    assert info.max_message_bytes == 4 * 1024 * 1024

    assert info.cpu_limit > 0
    assert info.cpu_limit_source in (
        "cgroup cpu.max",
        "cgroup cpu.cfs_quota_us",
        "sched_getaffinity",
    )
    assert info.engine_slots * info.intra_op_threads <= max(1, math.floor(info.cpu_limit))

    # Nothing that could carry weights, graphs, paths or real beats.
    wire = info.SerializeToString()
    assert len(wire) < 4096
    assert str(model_store).encode() not in wire
    for suffix in (b".onnx", b".npy", b".npz", b".pt"):
        assert suffix not in wire, suffix
    strings = [
        info.model_id,
        info.trained_at,
        info.execution_provider,
        *info.leads,
        *info.train_class_counts.keys(),
        *info.quality.keys(),
    ]
    assert not any("/" in text or "\\" in text for text in strings)
    assert not any(field.type == field.TYPE_BYTES for field in info.DESCRIPTOR.fields)


def test_reflection_lists_and_calls_service(server_address: str):
    with grpc.insecure_channel(server_address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = database.get_services()
        assert "appliance.v1.ApplianceService" in services
        assert "grpc.health.v1.Health" in services
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName("appliance.v1.ApplianceService")
        methods = {method.name for method in service.methods}
        assert methods == {
            "Generate",
            "Validate",
            "ValidateStream",
            "GetModelInfo",
            "GetQualityReport",
        }
        # Call GetModelInfo with message classes built from reflection alone, as grpcurl does.
        method = service.methods_by_name["GetModelInfo"]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_unary(
            "/appliance.v1.ApplianceService/GetModelInfo",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        reply = call(request_class(), timeout=CALL_TIMEOUT_S)
        assert reply.window_samples == 256
        assert reply.fs_hz == pytest.approx(360.0)


GRPCURL = Path(sys.executable).parent / "grpcurl"


def _grpcurl(*arguments: str, data: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run grpcurl in plaintext mode; ``data`` is the request as JSON."""
    command = [str(GRPCURL), "-plaintext", "-max-time", "60"]
    if data is not None:
        command += ["-d", data]
    return subprocess.run(
        [*command, *arguments], capture_output=True, text=True, timeout=120, check=False
    )


def test_grpcurl_lists_describes_and_calls(
    server_address: str, info: pb.GetModelInfoResponse, real_beats: np.ndarray
):
    listed = _grpcurl(server_address, "list")
    assert listed.returncode == 0, listed.stderr
    assert "appliance.v1.ApplianceService" in listed.stdout.split()
    assert "grpc.health.v1.Health" in listed.stdout.split()

    described = _grpcurl(server_address, "describe", "appliance.v1.ApplianceService")
    assert described.returncode == 0, described.stderr
    assert "rpc Validate ( .appliance.v1.ValidateRequest )" in described.stdout
    assert "returns ( stream .appliance.v1.GenerateResponse )" in described.stdout

    health = _grpcurl(
        server_address,
        "grpc.health.v1.Health/Check",
        data=json.dumps({"service": "appliance.v1.ApplianceService"}),
    )
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout) == {"status": "SERVING"}

    # grpcurl prints the proto's field names and reads either those or their JSON names.
    model = _grpcurl(server_address, "appliance.v1.ApplianceService/GetModelInfo", data="{}")
    assert model.returncode == 0, model.stderr
    assert json.loads(model.stdout)["window_samples"] == info.window_samples


def test_grpcurl_validates_json_request(server_address: str, real_beats: np.ndarray):
    beats = real_beats[:3]
    request = {
        "samples": {
            "count": 3,
            "leads": 1,
            "windowSamples": beats.shape[2],
            # bytes fields travel as base64 in protobuf's JSON mapping.
            "valuesF32": base64.b64encode(beats.astype("<f4").tobytes()).decode(),
        },
        "beatClasses": ["BEAT_CLASS_N"] * 3,
    }
    scored = _grpcurl(
        server_address, "appliance.v1.ApplianceService/Validate", data=json.dumps(request)
    )
    assert scored.returncode == 0, scored.stderr
    reply = json.loads(scored.stdout)
    assert len(reply["scores"]) == 3
    assert reply["beat_classes"] == ["BEAT_CLASS_N"] * 3
    assert "warnings" not in reply

    rejected = _grpcurl(
        server_address,
        "appliance.v1.ApplianceService/Validate",
        data=json.dumps({**request, "margin": 3}),
    )
    assert rejected.returncode != 0
    assert "Code: InvalidArgument" in rejected.stderr
    assert "Message: margin=3.0 is out of range; use 0 to 0.99" in rejected.stderr
