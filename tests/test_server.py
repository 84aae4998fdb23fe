"""Server lifecycle over real sockets: readiness, cancellation, limits, logging, SIGTERM."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc
from stalled_run import StalledRun, stall_after_first_run

from appliance.client import (
    ApplianceClient,
    CallPartError,
    GenerateInterruptedError,
    StreamStalledError,
    encode_samples,
)
from appliance.errors import ModelStoreError
from appliance.pipeline import ServerProcess
from appliance.server import (
    ApplianceServer,
    ServeConfig,
    TlsFiles,
    check_bind_policy,
    cpu_limit,
    create_server,
    plan_threads,
    start_server,
)
from appliance.server_errors import (
    GRPC_LIBRARY_LOGGERS,
    REJECTION_LOG_LINES,
    REJECTION_LOG_WINDOW_S,
    GrpcLibraryLogLimit,
    _ended_status,
    _RejectionLogLimit,
    limit_grpc_library_logs,
    request_stream_cancelled,
)
from appliance.service import ApplianceServicer
from appliance.v1 import appliance_pb2 as pb

pytestmark = pytest.mark.slow

CALL_TIMEOUT_S = 60.0
# Upper bound for conditions that should hold within a second or two. It is generous so that
# the tests stay stable on a loaded machine, and no test asserts on speed.
WAIT_S = 30.0


def _wait_for(condition, what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout_s:.0f} s")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def small_server(model_store: Path) -> Iterator[ApplianceServer]:
    """An in-process server with two workers, one engine slot and small request limits."""
    running = create_server(
        model_store,
        ServeConfig(
            port=0,
            workers=2,
            intra_op_threads=1,
            max_beats_per_request=50,
            max_message_bytes=64 * 1024,
            grace_s=2.0,
            drain_s=0.0,
        ),
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def small_client(small_server: ApplianceServer) -> Iterator[ApplianceClient]:
    with ApplianceClient(f"127.0.0.1:{small_server.port}", timeout_s=CALL_TIMEOUT_S) as client:
        yield client


@contextlib.contextmanager
def _serving(model_store: Path, **settings: Any) -> Iterator[ApplianceServer]:
    """Run an in-process server on a free port with two workers, one thread and no drain."""
    defaults: dict[str, Any] = {
        "port": 0,
        "workers": 2,
        "intra_op_threads": 1,
        "grace_s": 1.0,
        "drain_s": 0.0,
    }
    running = create_server(model_store, ServeConfig(**{**defaults, **settings}))
    try:
        yield running
    finally:
        running.stop()


def _beats(info: pb.GetModelInfoResponse, count: int) -> np.ndarray:
    t = np.arange(info.window_samples, dtype=np.float32)
    peak = np.exp(-0.5 * ((t - info.pre_r_samples) / 4.0) ** 2)
    return np.broadcast_to(peak, (count, len(info.leads), info.window_samples)).copy()


def test_health_not_serving_until_loaded(model_store: Path, tmp_path: Path):
    running = start_server(ServeConfig(port=0, grace_s=1.0, drain_s=0.0))
    try:
        with ApplianceClient(f"127.0.0.1:{running.port}", timeout_s=CALL_TIMEOUT_S) as client:
            assert client.health() == "NOT_SERVING"
            assert client.health("appliance.v1.ApplianceService") == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as raised:
                client.model_info()
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "still loading" in raised.value.details()

            # A store without a model leaves the server up and NOT_SERVING.
            with pytest.raises(ModelStoreError, match="has no trained model"):
                running.load(tmp_path)
            assert client.health() == "NOT_SERVING"

            running.load(model_store)
            assert client.health() == "SERVING"
            assert client.health("appliance.v1.ApplianceService") == "SERVING"
            assert client.model_info().window_samples == 256
    finally:
        running.stop()


def test_cancelled_calls_free_workers(
    small_server: ApplianceServer, small_client: ApplianceClient, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="appliance")
    info = small_client.model_info()
    workers = small_server.plan.workers
    assert workers == 2
    # Each call requests far more work than the test waits for: 50 beats with a draw budget of
    # 1000 per beat, in one-beat chunks.
    request = pb.GenerateRequest(count=50, chunk_beats=1, max_draws_per_beat=1000, margin=0.99)
    abandoned = 3 * workers
    for i in range(abandoned):
        metadata = (("x-request-id", f"abandoned-{i}"),)
        if i % 2 == 0:
            call = small_client.stub.Generate(request, timeout=CALL_TIMEOUT_S, metadata=metadata)
            time.sleep(0.3)
            call.cancel()
            with pytest.raises(grpc.RpcError) as raised:
                list(call)
            assert raised.value.code() == grpc.StatusCode.CANCELLED
        else:
            with pytest.raises(grpc.RpcError) as raised:
                list(small_client.stub.Generate(request, timeout=0.3, metadata=metadata))
            assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    # Each abandoned call ends on the server, and logs its status once.
    def ended() -> list[str]:
        return [
            r.getMessage() for r in caplog.records if "request_id=abandoned-" in r.getMessage()
        ]

    _wait_for(lambda: len(ended()) == abandoned, "logging of every abandoned call")
    for i in range(abandoned):
        lines = [m for m in ended() if f"request_id=abandoned-{i} " in m]
        assert len(lines) == 1, lines
        expected = "CANCELLED" if i % 2 == 0 else "DEADLINE_EXCEEDED"
        assert f"status={expected}" in lines[0]
    # The workers are free again: a call with a short deadline succeeds.
    reply = small_client.stub.Validate(
        pb.ValidateRequest(samples=encode_samples(_beats(info, 2))), timeout=20.0
    )
    assert len(reply.scores) == 2


def test_size_limits_reject_large_requests(
    small_client: ApplianceClient, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO)
    info = small_client.model_info()
    assert info.max_beats_per_request == 50
    with pytest.raises(grpc.RpcError) as raised:
        small_client.generate(count=51)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "count=51" in raised.value.details()
    assert "limit of 50" in raised.value.details()

    parts = [pb.ValidateStreamRequest(samples=encode_samples(_beats(info, 30))) for _ in range(2)]
    with pytest.raises(grpc.RpcError) as raised:
        small_client.stub.ValidateStream(iter(parts), timeout=CALL_TIMEOUT_S)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "60 beats" in raised.value.details()
    assert "limit of 50" in raised.value.details()

    # 80 one-lead beats are 80 KiB, over the 64 KiB message limit of this server.
    with pytest.raises(grpc.RpcError) as raised:
        small_client.stub.Validate(
            pb.ValidateRequest(samples=encode_samples(_beats(info, 80))),
            timeout=CALL_TIMEOUT_S,
            metadata=(("x-request-id", "too-big"),),
        )
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "65536" in raised.value.details()
    # gRPC rejects the message before the servicer runs, and the call is logged all the same.
    line = _single_rpc_line(caplog, "too-big", "the oversized call's log line")
    assert line.startswith("rpc=Validate request_id=too-big status=NOT_RECEIVED ")
    assert "message size limit of 65536 bytes" in line
    assert small_client.health() == "SERVING"
    assert len(small_client.validate(_beats(info, 3)).scores) == 3


def _hold_engine(client: ApplianceClient, request_id: str) -> grpc.Future:
    """Start a Generate that keeps one engine slot busy until it is cancelled.

    One chunk of 2000 beats at margin 0.99 with a budget of 1000 draws per beat needs about
    200,000 draws, which keeps the slot for far longer than the tests wait, even on fast graphs.
    """
    request = pb.GenerateRequest(
        count=2000, chunk_beats=2000, max_draws_per_beat=1000, margin=0.99
    )
    call = client.stub.Generate(
        request, timeout=CALL_TIMEOUT_S, metadata=(("x-request-id", request_id),)
    )

    def first_response() -> None:
        # The call ends as CANCELLED when the test cancels it.
        with contextlib.suppress(grpc.RpcError):
            next(call, None)

    threading.Thread(target=first_response, daemon=True).start()
    return call


def _rpc_lines(caplog: pytest.LogCaptureFixture, request_id: str) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if f"request_id={request_id} " in r.getMessage()
    ]


def _single_rpc_line(caplog: pytest.LogCaptureFixture, request_id: str, description: str) -> str:
    """Wait for the log line of ``request_id`` and return it, checking that it is the only one.

    Arguments:
        caplog: The test's log capture.
        request_id: The call's ``x-request-id``.
        description: The awaited line in words, for the failure message.
    """
    _wait_for(lambda: _rpc_lines(caplog, request_id), description)
    lines = _rpc_lines(caplog, request_id)
    assert len(lines) == 1, lines
    return lines[0]


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_validate_stream_reply_fits_message_limit(model_store: Path):
    # (20000 - 4096) // 6 = 2650 beats fit one reply; the request limit is far higher.
    with _serving(model_store, max_message_bytes=20000, max_beats_per_request=100_000) as running:
        with ApplianceClient(f"127.0.0.1:{running.port}", timeout_s=CALL_TIMEOUT_S) as client:
            info = client.model_info()
            parts = [
                pb.ValidateStreamRequest(samples=encode_samples(_beats(info, 18)))
                for _ in range(150)
            ]
            with pytest.raises(grpc.RpcError) as raised:
                client.stub.ValidateStream(iter(parts), timeout=CALL_TIMEOUT_S)
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "the reply for more than 2650 beats" in raised.value.details()
            assert "message limit of 20000 bytes" in raised.value.details()
            # The largest stream that fits gets its reply.
            fitting = [
                pb.ValidateStreamRequest(samples=encode_samples(_beats(info, 10)))
                for _ in range(265)
            ]
            reply = client.stub.ValidateStream(iter(fitting), timeout=CALL_TIMEOUT_S)
            assert len(reply.scores) == 2650
            assert reply.ByteSize() <= 20000


def _rejected_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith("rpc=") and " reason=" in r.getMessage()
    ]


def test_malformed_request_logged_as_parse_failure(
    small_server: ApplianceServer, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO)
    with grpc.insecure_channel(f"127.0.0.1:{small_server.port}") as channel:
        raw = channel.unary_unary("/appliance.v1.ApplianceService/Validate")
        with pytest.raises(grpc.RpcError) as raised:
            raw(
                b"\xff\xff\xff\xff garbage",
                timeout=CALL_TIMEOUT_S,
                metadata=(("x-request-id", "garbled"),),
            )
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    line = _single_rpc_line(caplog, "garbled", "the malformed call's log line")
    assert line.startswith("rpc=Validate request_id=garbled status=INTERNAL ")
    assert "could not be parsed" in line


def test_malformed_stream_message_logged_as_parse_failure(
    small_client: ApplianceClient, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO)
    info = small_client.model_info()
    valid = pb.ValidateStreamRequest(samples=encode_samples(_beats(info, 2))).SerializeToString()
    raw = small_client.channel.stream_unary("/appliance.v1.ApplianceService/ValidateStream")
    with pytest.raises(grpc.RpcError) as raised:
        raw(
            iter([valid, b"\xff\xff\xff"]),
            timeout=CALL_TIMEOUT_S,
            metadata=(("x-request-id", "garbled-stream"),),
        )
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    line = _single_rpc_line(caplog, "garbled-stream", "the malformed stream's log line")
    assert line.startswith("rpc=ValidateStream request_id=garbled-stream status=INTERNAL ")
    assert "could not be parsed" in line


@pytest.fixture
def unloaded_server() -> Iterator[ApplianceServer]:
    """A server with no model, whose interceptor logs the calls that gRPC ends itself."""
    # Eight workers keep the tests that open one stream per worker small.
    running = start_server(ServeConfig(port=0, workers=8, grace_s=1.0, drain_s=0.0))
    yield running
    running.stop()


def test_long_metadata_logged_as_not_received(
    unloaded_server: ApplianceServer, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO)
    with grpc.insecure_channel(f"127.0.0.1:{unloaded_server.port}") as channel:
        info = channel.unary_unary("/appliance.v1.ApplianceService/GetModelInfo")
        # gRPC drops a header over its 16 KiB hard metadata limit and ends the call.
        with pytest.raises(grpc.RpcError) as raised:
            info(
                b"",
                timeout=CALL_TIMEOUT_S,
                metadata=(("x-request-id", "long-metadata"), ("x-padding", "a" * 20000)),
            )
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    line = _single_rpc_line(caplog, "long-metadata", "the long metadata call's line")
    assert line.startswith("rpc=GetModelInfo request_id=long-metadata status=NOT_RECEIVED ")
    assert "metadata" in line.split(" reason=", 1)[1]


def test_unknown_method_logged(unloaded_server: ApplianceServer, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    with grpc.insecure_channel(f"127.0.0.1:{unloaded_server.port}") as channel:
        for method, request_id in [
            ("/appliance.v1.ApplianceService/Nope", "no-such-method"),
            ("/other.Service/Call request_id=forged status=OK", "forging-method"),
        ]:
            with pytest.raises(grpc.RpcError) as raised:
                channel.unary_unary(method)(
                    b"", timeout=CALL_TIMEOUT_S, metadata=(("x-request-id", request_id),)
                )
            assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
            line = _single_rpc_line(caplog, request_id, f"the line of unknown {method}")
            assert f"request_id={request_id} status=UNIMPLEMENTED " in line
            assert "request_id=forged" not in line
    assert _rpc_lines(caplog, "no-such-method")[0].startswith(
        "rpc=/appliance.v1.ApplianceService/Nope "
    )
    assert _rpc_lines(caplog, "forging-method")[0].startswith("rpc=invalid ")


def test_health_watches_hold_no_worker(unloaded_server: ApplianceServer):
    # grpcio serves the health service's Watch without a worker thread; each watch stays open.
    watches = unloaded_server.plan.workers + 2
    with ApplianceClient(f"127.0.0.1:{unloaded_server.port}", timeout_s=CALL_TIMEOUT_S) as client:
        calls = [
            client.health_stub.Watch(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)
            for _ in range(watches)
        ]
        try:
            for call in calls:
                assert next(call).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert client.health() == "NOT_SERVING"
        finally:
            for call in calls:
                call.cancel()


def test_rejection_log_limit_counts_suppressed():
    limit = _RejectionLogLimit()
    admitted = [limit.admit() for _ in range(REJECTION_LOG_LINES + 5)]
    assert admitted[:REJECTION_LOG_LINES] == [(True, 0)] * REJECTION_LOG_LINES
    assert admitted[REJECTION_LOG_LINES:] == [(False, 0)] * 5
    # The next window lets a line through again and reports the 5 lines left out.
    limit._window_started -= REJECTION_LOG_WINDOW_S
    assert limit.admit() == (True, 5)
    assert limit.admit() == (True, 0)


def test_rejection_limit_admits_nested_call(monkeypatch: pytest.MonkeyPatch):
    # A finalizer run by the garbage collector can call admit while the same thread is in it.
    limit = _RejectionLogLimit()
    nested: list[tuple[bool, int]] = []
    real_monotonic = time.monotonic

    def monotonic_with_nested_admit() -> float:
        if not nested:
            nested.append((False, -1))
            nested[0] = limit.admit()
        return real_monotonic()

    outer: list[tuple[bool, int]] = []
    monkeypatch.setattr(time, "monotonic", monotonic_with_nested_admit)
    worker = threading.Thread(target=lambda: outer.append(limit.admit()), daemon=True)
    worker.start()
    worker.join(timeout=10.0)
    monkeypatch.undo()
    assert not worker.is_alive(), "admit deadlocked when called again in the same thread"
    assert nested == [(True, 0)]
    assert outer == [(True, 0)]


def test_concurrent_call_limit_logs_rejection(model_store: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    running = create_server(
        model_store,
        ServeConfig(
            port=0,
            workers=4,
            intra_op_threads=1,
            max_concurrent_rpcs=2,
            grace_s=1.0,
            drain_s=0.0,
        ),
    )
    try:
        with ApplianceClient(f"127.0.0.1:{running.port}", timeout_s=CALL_TIMEOUT_S) as client:
            holders = [_hold_engine(client, f"hold-limit-{i}") for i in range(2)]
            time.sleep(1.0)
            try:
                with pytest.raises(grpc.RpcError) as raised:
                    client.stub.GetModelInfo(
                        pb.GetModelInfoRequest(),
                        timeout=CALL_TIMEOUT_S,
                        metadata=(("x-request-id", "over-limit"),),
                    )
                assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                _wait_for(lambda: _rpc_lines(caplog, "over-limit"), "the rejected call's log")
                with pytest.raises(grpc.RpcError) as raised:
                    client.stub.GetModelInfo(
                        pb.GetModelInfoRequest(),
                        timeout=CALL_TIMEOUT_S,
                        metadata=(("x-request-id", "bad id=forge"),),
                    )
                assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                _wait_for(lambda: len(_rejected_lines(caplog)) == 2, "the second rejection's log")
            finally:
                for holder in holders:
                    holder.cancel()
            lines = _rpc_lines(caplog, "over-limit")
            assert len(lines) == 1
            assert lines[0].startswith(
                "rpc=GetModelInfo request_id=over-limit status=RESOURCE_EXHAUSTED "
            )
            assert "limit of 2 calls at once" in lines[0]
            replaced = [
                m for m in _rejected_lines(caplog) if "invalid_client_request_id_chars=12 " in m
            ]
            assert len(replaced) == 1
            assert "bad id=forge" not in replaced[0]
            # Once the holders have ended, calls are served and logged by the servicer only.
            _wait_for(
                lambda: all(_rpc_lines(caplog, f"hold-limit-{i}") for i in range(2)),
                "the held calls' log lines",
            )
            assert client.model_info().window_samples > 0
            assert _errors(caplog) == []
    finally:
        running.stop()


def test_validate_deadline_while_waiting_logs_status(
    model_store: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO)
    # More workers than engine slots, so that a Validate runs while every slot is taken.
    running = create_server(
        model_store, ServeConfig(port=0, workers=4, intra_op_threads=1, grace_s=1.0, drain_s=0.0)
    )
    try:
        with ApplianceClient(f"127.0.0.1:{running.port}", timeout_s=CALL_TIMEOUT_S) as client:
            info = client.model_info()
            slots = running.plan.engine_slots
            assert running.plan.workers > slots
            holders = [_hold_engine(client, f"hold-validate-{i}") for i in range(slots)]
            time.sleep(1.0)
            try:
                with pytest.raises(grpc.RpcError) as raised:
                    client.stub.Validate(
                        pb.ValidateRequest(samples=encode_samples(_beats(info, 5))),
                        timeout=0.5,
                        metadata=(("x-request-id", "late-validate"),),
                    )
                assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                _wait_for(lambda: _rpc_lines(caplog, "late-validate"), "the late call's log")
            finally:
                for holder in holders:
                    holder.cancel()
            lines = _rpc_lines(caplog, "late-validate")
            assert len(lines) == 1
            assert "status=DEADLINE_EXCEEDED" in lines[0]
            assert _errors(caplog) == []
            assert len(client.validate(_beats(info, 2)).scores) == 2
    finally:
        running.stop()


def test_validate_runs_between_generate_pieces(model_store: Path):
    # One engine slot: a Generate chunk of 2048 beats takes it piece by piece, so a Validate
    # that arrives meanwhile is served before the chunk is done, not after it.
    cpus = len(os.sched_getaffinity(0))
    running = create_server(
        model_store, ServeConfig(port=0, workers=4, intra_op_threads=cpus, drain_s=0.0)
    )
    try:
        assert running.plan.engine_slots == 1
        with ApplianceClient(f"127.0.0.1:{running.port}", timeout_s=CALL_TIMEOUT_S) as client:
            # Read through the client's cache, so that validate below makes only its own call.
            info = client.cached_model_info()
            # One class, so that the first chunk is all 2048 beats: eight pieces of 256.
            request = pb.GenerateRequest(
                class_counts=[pb.ClassCount(beat_class=pb.BEAT_CLASS_N, count=2048)],
                chunk_beats=2048,
                seed=3,
                margin=0.5,
                max_draws_per_beat=1000,
            )
            stream = client.stub.Generate(request, timeout=CALL_TIMEOUT_S)
            first_chunk: list[float] = []

            def read_first() -> None:
                # Progress messages without beats may come first.
                while not next(stream).samples.count:
                    pass
                first_chunk.append(time.monotonic())

            started = time.monotonic()
            reader = threading.Thread(target=read_first, daemon=True)
            reader.start()
            time.sleep(0.1)
            assert not first_chunk, "the chunk should take longer than 0.1 s"
            assert len(client.validate(_beats(info, 2)).scores) == 2
            validated = time.monotonic()
            reader.join(CALL_TIMEOUT_S)
            assert first_chunk, "the Generate chunk did not arrive"
            # Eight pieces make the chunk, and the Validate waits for the one under way. Had
            # the chunk kept the slot, the Validate would end with the chunk.
            assert validated - started < (first_chunk[0] - started) / 2
            stream.cancel()
    finally:
        running.stop()


def test_validate_stream_deadline_logs_status(
    small_client: ApplianceClient, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO)
    info = small_client.model_info()

    def one_then_silence() -> Iterator[pb.ValidateStreamRequest]:
        yield pb.ValidateStreamRequest(samples=encode_samples(_beats(info, 4)))
        time.sleep(3.0)

    with pytest.raises(grpc.RpcError) as raised:
        small_client.stub.ValidateStream(
            one_then_silence(), timeout=1.0, metadata=(("x-request-id", "silent-stream"),)
        )
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    line = _single_rpc_line(caplog, "silent-stream", "the silent stream's log line")
    assert re.search(r"status=(DEADLINE_EXCEEDED|CANCELLED) ", line)
    assert _errors(caplog) == []


def test_silent_streams_leave_workers_free(
    small_server: ApplianceServer, small_client: ApplianceClient, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO)
    info = small_client.model_info()
    workers = small_server.plan.workers
    stream_limit = max(1, workers // 2)
    release = threading.Event()

    def silent() -> Iterator[pb.ValidateStreamRequest]:
        release.wait()
        yield from ()

    # As many silent streams as workers: each one keeps a worker while it waits for a message.
    calls = [
        small_client.stub.ValidateStream.future(
            silent(), timeout=CALL_TIMEOUT_S, metadata=(("x-request-id", f"silent-{i}"),)
        )
        for i in range(workers)
    ]
    try:
        _wait_for(
            lambda: sum(call.done() for call in calls) == workers - stream_limit,
            "rejection of the streams over the limit",
        )
        rejected = next(call for call in calls if call.done())
        error = cast(grpc.RpcError, rejected.exception())
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"{stream_limit} calls that stream requests" in error.details()
        assert f"{workers} worker threads" in error.details()
        # The workers that streams may not take still serve health checks and other calls.
        assert small_client.health() == "SERVING"
        assert len(small_client.validate(_beats(info, 2)).scores) == 2
    finally:
        release.set()
    for call in calls:
        with pytest.raises(grpc.RpcError):
            call.result()
    # Once the silent streams have ended, a new stream is served.
    parts = [pb.ValidateStreamRequest(samples=encode_samples(_beats(info, 3)))]
    assert len(small_client.stub.ValidateStream(iter(parts), timeout=CALL_TIMEOUT_S).scores) == 3
    assert _errors(caplog) == []


def test_silent_reflection_streams_leave_workers_free(
    unloaded_server: ApplianceServer, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO)
    workers = unloaded_server.plan.workers
    stream_limit = max(1, workers // 2)
    release = threading.Event()

    def silent() -> Iterator[object]:
        release.wait()
        yield from ()

    with ApplianceClient(f"127.0.0.1:{unloaded_server.port}", timeout_s=CALL_TIMEOUT_S) as client:
        reflection = reflection_pb2_grpc.ServerReflectionStub(client.channel)
        calls = [
            reflection.ServerReflectionInfo(
                silent(),
                timeout=CALL_TIMEOUT_S,
                metadata=(("x-request-id", f"silent-reflection-{i}"),),
            )
            for i in range(workers)
        ]
        try:
            _wait_for(
                lambda: sum(call.done() for call in calls) == workers - stream_limit,
                "rejection of the reflection streams over the limit",
            )
            index, rejected = next((i, call) for i, call in enumerate(calls) if call.done())
            assert rejected.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"{stream_limit} calls that stream requests" in rejected.details()
            request_id = ("x-request-id", f"silent-reflection-{index}")
            assert request_id in rejected.trailing_metadata()
            assert client.health() == "NOT_SERVING"
        finally:
            release.set()
            for call in calls:
                call.cancel()
    lines = [
        line
        for i in range(workers)
        for line in _rpc_lines(caplog, f"silent-reflection-{i}")
        if "status=RESOURCE_EXHAUSTED" in line
    ]
    assert len(lines) == workers - stream_limit
    assert lines[0].startswith("rpc=/grpc.reflection.v1alpha.ServerReflection/")


class _StubContext:
    """The two ServicerContext methods that decide how a call ended.

    ``active`` lists what successive ``is_active`` calls return; the last value repeats.
    """

    def __init__(self, active: list[bool], remaining_s: float | None) -> None:
        self.active = active
        self.remaining_s = remaining_s
        self.activity_checks = 0

    def is_active(self) -> bool:
        index = min(self.activity_checks, len(self.active) - 1)
        self.activity_checks += 1
        return self.active[index]

    def time_remaining(self) -> float | None:
        return self.remaining_s


@pytest.mark.parametrize(
    ("active", "remaining_s", "cancelled", "status"),
    [
        ([True], 5.0, False, "OK"),
        ([True], None, False, "OK"),
        # gRPC can end a request stream at the deadline while is_active still returns True.
        ([True], -0.002, True, "DEADLINE_EXCEEDED"),
        ([False], -0.002, True, "DEADLINE_EXCEEDED"),
        ([False], 5.0, True, "CANCELLED"),
        # The cancel is processed a moment after the stream end reached the servicer.
        ([True, False], 0.004, True, "CANCELLED"),
    ],
)
def test_stream_end_late_cancel(
    active: list[bool], remaining_s: float | None, cancelled: bool, status: str
):
    context = cast(grpc.ServicerContext, _StubContext(active, remaining_s))
    assert request_stream_cancelled(context) is cancelled
    assert _ended_status(context) == status


def test_validate_stream_accepts_repeated_default_margin(small_client: ApplianceClient):
    info = small_client.model_info()
    # The default travels as float32 (0.0500000007 for 0.05) when a client repeats it.
    parts = [
        pb.ValidateStreamRequest(samples=encode_samples(_beats(info, 3))),
        pb.ValidateStreamRequest(
            samples=encode_samples(_beats(info, 3)), margin=info.default_margin
        ),
    ]
    reply = small_client.stub.ValidateStream(iter(parts), timeout=CALL_TIMEOUT_S)
    assert len(reply.scores) == 6
    assert reply.margin == pytest.approx(info.default_margin)


def test_generate_chunks_fit_message_limit(model_store: Path):
    # 32 KiB hold 30 one-lead beats of 256 samples with their scores and classes, so the
    # default chunk of 256 beats must shrink to fit.
    running = create_server(
        model_store,
        ServeConfig(port=0, workers=2, intra_op_threads=1, max_message_bytes=32 * 1024),
    )
    try:
        with ApplianceClient(f"127.0.0.1:{running.port}", timeout_s=CALL_TIMEOUT_S) as client:
            request = pb.GenerateRequest(count=45, margin=0.0, seed=3)
            chunks = list(client.stub.Generate(request, timeout=CALL_TIMEOUT_S))
            sizes = [chunk.samples.count for chunk in chunks if chunk.samples.count]
            assert sum(sizes) == chunks[-1].stats.accepted
            assert chunks[-1].stats.accepted > 30
            assert max(sizes) <= 30
            assert all(chunk.ByteSize() <= 32 * 1024 for chunk in chunks)
    finally:
        running.stop()


@pytest.mark.parametrize(
    ("setting", "value", "flag"),
    [
        ("grace_s", -5.0, "--grace-s"),
        ("grace_s", float("nan"), "--grace-s"),
        ("grace_s", float("inf"), "--grace-s"),
        ("drain_s", -1.0, "--drain-s"),
        ("drain_s", float("nan"), "--drain-s"),
        ("stalled_send_s", 0.0, "--stalled-send-s"),
        ("workers", -1, "--workers"),
        ("intra_op_threads", -3, "--intra-op-threads"),
        ("max_beats_per_request", 0, "--max-beats-per-request"),
        ("max_concurrent_rpcs", 0, "--max-concurrent-rpcs"),
        ("max_message_bytes", 0, "--max-message-bytes"),
        ("max_message_bytes", 2**31, "--max-message-bytes"),
        ("port", 70000, "--port"),
    ],
)
def test_serve_config_rejects_bad_setting(setting: str, value: float, flag: str) -> None:
    with pytest.raises(ValueError) as raised:
        ServeConfig(**{setting: value})
    message = str(raised.value)
    assert message.startswith(f"{flag} {value} is invalid: {setting} must be")


def test_health_answers_while_calls_hold_slots(model_store: Path) -> None:
    # More long Validate calls than eight workers, on two engine slots. With a thread per
    # admitted call, a health check returns while they compute or wait for a slot.
    running = create_server(
        model_store,
        ServeConfig(port=0, intra_op_threads=1, max_concurrent_rpcs=16, grace_s=1.0),
    )
    try:
        assert running.plan.workers == 16
        with ApplianceClient(f"127.0.0.1:{running.port}", timeout_s=CALL_TIMEOUT_S) as client:
            info = client.model_info()
            # Without classes each beat takes six graph passes: seconds per call.
            request = pb.ValidateRequest(samples=encode_samples(_beats(info, 2000)))
            calls = [client.stub.Validate.future(request, timeout=300.0) for _ in range(12)]
            time.sleep(1.0)
            started = time.monotonic()
            reply = client.health_stub.Check(health_pb2.HealthCheckRequest(), timeout=3.0)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert time.monotonic() - started < 3.0
            assert not all(call.done() for call in calls)
            for call in calls:
                assert len(call.result().scores) == 2000
    finally:
        running.stop()


@pytest.mark.parametrize("seconds", [0.0, -1.0, float("nan")])
def test_stalled_send_must_be_positive(seconds: float) -> None:
    plan = plan_threads(ServeConfig(), 2.0, "test")
    with pytest.raises(ValueError, match=f"stalled_send_s={seconds} must be a finite number"):
        ApplianceServicer(plan, stalled_send_s=seconds)


def test_unread_generate_frees_worker(model_store: Path, caplog: pytest.LogCaptureFixture):
    # Each call requests far more beats than gRPC's flow-control window takes, in chunks near
    # the message limit, and its client reads only the first chunk. The server's sends then
    # block the worker threads until the stall guard cancels the calls.
    caplog.set_level(logging.INFO, logger="appliance")
    stalled_send_s = 2.0
    running = create_server(
        model_store,
        ServeConfig(
            port=0, workers=2, intra_op_threads=1, stalled_send_s=stalled_send_s, grace_s=1.0
        ),
    )
    try:
        with ApplianceClient(f"127.0.0.1:{running.port}", timeout_s=CALL_TIMEOUT_S) as client:
            info = client.model_info()
            request = pb.GenerateRequest(count=60_000, margin=0.0, seed=5, chunk_beats=4000)
            calls = []
            for i in range(running.plan.workers):
                call = client.stub.Generate(
                    request, timeout=300.0, metadata=(("x-request-id", f"unread-{i}"),)
                )
                # Progress messages without beats may come before the first chunk.
                assert any(message.samples.count for message in call)
                calls.append(call)

            def cancelled() -> list[str]:
                return [
                    r.getMessage()
                    for r in caplog.records
                    if "request_id=unread-" in r.getMessage()
                    and "status=CANCELLED" in r.getMessage()
                ]

            _wait_for(lambda: len(cancelled()) == len(calls), "cancellation of unread calls", 240)
            for line in cancelled():
                assert f"stalled_send_s={stalled_send_s}" in line
            # The workers are free again: a call with a short deadline succeeds at once.
            reply = client.stub.Validate(
                pb.ValidateRequest(samples=encode_samples(_beats(info, 2))), timeout=20.0
            )
            assert len(reply.scores) == 2
            for call in calls:
                with pytest.raises(grpc.RpcError) as raised:
                    list(call)
                assert raised.value.code() == grpc.StatusCode.CANCELLED
    finally:
        running.stop()


def test_every_call_logged_once(small_client: ApplianceClient, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="appliance")
    info = small_client.model_info()
    stub = small_client.stub
    _, call = stub.GetModelInfo.with_call(
        pb.GetModelInfoRequest(), metadata=(("x-request-id", "log-info"),)
    )
    assert ("x-request-id", "log-info") in call.trailing_metadata()
    chunks = list(
        stub.Generate(
            pb.GenerateRequest(count=4, seed=1), metadata=(("x-request-id", "log-generate"),)
        )
    )
    with pytest.raises(grpc.RpcError) as raised:
        stub.Validate(
            pb.ValidateRequest(samples=encode_samples(_beats(info, 2)), margin=3.0),
            metadata=(("x-request-id", "log-bad"),),
        )
    assert ("x-request-id", "log-bad") in raised.value.trailing_metadata()
    stub.Validate(
        pb.ValidateRequest(samples=encode_samples(_beats(info, 2))),
        metadata=(("x-request-id", "bad status=OK id=forged"),),
    )

    messages = [
        record.getMessage() for record in caplog.records if record.getMessage().startswith("rpc=")
    ]

    def lines(request_id: str) -> list[str]:
        return [m for m in messages if f"request_id={request_id} " in m]

    assert len(lines("log-info")) == 1
    assert re.search(
        r"rpc=GetModelInfo request_id=log-info status=OK duration_ms=\d+\.\d", lines("log-info")[0]
    )
    assert len(lines("log-generate")) == 1
    generate_line = lines("log-generate")[0]
    assert "rpc=Generate" in generate_line
    assert "status=OK" in generate_line
    assert "requested=4" in generate_line
    assert f"accepted={chunks[-1].stats.accepted}" in generate_line
    assert f"draws={chunks[-1].stats.draws}" in generate_line
    assert len(lines("log-bad")) == 1
    assert "status=INVALID_ARGUMENT" in lines("log-bad")[0]
    assert "margin=3" in lines("log-bad")[0]
    # A request id that could forge log fields is replaced by a random one, and the line
    # gives the rejected id's length instead of the id.
    assert not any("forged" in m for m in messages)
    validate_lines = [m for m in messages if m.startswith("rpc=Validate ")]
    assert len(validate_lines) == 2
    assert all("beats=2" in m or "INVALID_ARGUMENT" in m for m in validate_lines)
    replaced = [m for m in validate_lines if "invalid_client_request_id_chars=" in m]
    assert len(replaced) == 1
    assert "invalid_client_request_id_chars=23 " in replaced[0]
    assert re.search(r"request_id=[0-9a-f]{16} status=OK ", replaced[0])


def test_insecure_remote_bind_rejected(model_store: Path, tmp_path: Path):
    for host in ("0.0.0.0", "10.1.2.3", "::", "appliance.example"):
        with pytest.raises(ValueError, match="--allow-insecure-remote"):
            check_bind_policy(ServeConfig(host=host))
    # create_server checks the policy before it binds or loads anything.
    with pytest.raises(ValueError, match="insecure port on non-loopback host 0.0.0.0"):
        create_server(model_store, ServeConfig(host="0.0.0.0", port=0))
    for host in ("127.0.0.1", "::1", "[::1]", "localhost", "127.0.0.2"):
        check_bind_policy(ServeConfig(host=host))
    check_bind_policy(ServeConfig(host="0.0.0.0", allow_insecure_remote=True))
    tls = TlsFiles(tmp_path / "server.pem", tmp_path / "server.key")
    check_bind_policy(ServeConfig(host="0.0.0.0", tls=tls))


@pytest.mark.parametrize(
    ("host", "fix"),
    [("127.0.0.1:99", "--host 127.0.0.1 --port 99"), ("[::1]:50051", "--host [::1] --port 50051")],
)
def test_host_with_port_rejected(host: str, fix: str):
    with pytest.raises(ValueError, match="takes an address without a port") as raised:
        check_bind_policy(ServeConfig(host=host))
    assert fix in str(raised.value)
    assert "--allow-insecure-remote" not in str(raised.value)


def test_cpu_limit_follows_cgroup_quota(tmp_path: Path):
    cpu_max = tmp_path / "cpu.max"
    quota, period = tmp_path / "cpu.cfs_quota_us", tmp_path / "cpu.cfs_period_us"
    missing = tmp_path / "missing"
    affinity, source = cpu_limit(missing, missing, missing)
    assert source == "sched_getaffinity"
    assert affinity >= 1

    cpu_max.write_text("50000 100000\n")
    assert cpu_limit(cpu_max, missing, missing) == (0.5, "cgroup cpu.max")
    cpu_max.write_text("max 100000\n")
    assert cpu_limit(cpu_max, missing, missing) == (affinity, "sched_getaffinity")
    # A quota above the affinity mask cannot give more CPUs than the mask.
    cpu_max.write_text(f"{int(affinity * 4 * 100000)} 100000\n")
    assert cpu_limit(cpu_max, missing, missing) == (affinity, "sched_getaffinity")
    quota.write_text("25000\n")
    period.write_text("100000\n")
    assert cpu_limit(missing, quota, period) == (0.25, "cgroup cpu.cfs_quota_us")
    quota.write_text("-1\n")
    assert cpu_limit(missing, quota, period) == (affinity, "sched_getaffinity")

    for cpus in (0.5, 1.0, 1.5, 2.0, 3.0, 8.0, 16.0, 64.0):
        plan = plan_threads(ServeConfig(), cpus, "cgroup cpu.max")
        assert plan.engine_slots * plan.intra_op_threads <= max(1, int(cpus))
        assert plan.workers > plan.engine_slots
    plan = plan_threads(ServeConfig(workers=3, intra_op_threads=2), 8.0, "cgroup cpu.max")
    assert (plan.workers, plan.intra_op_threads, plan.engine_slots) == (3, 2, 4)


def test_plan_threads_rejects_more_than_cpus() -> None:
    # ONNX Runtime would start every requested thread at load, so the count is capped first.
    plan = plan_threads(ServeConfig(intra_op_threads=4), 4.5, "cgroup cpu.max")
    assert plan.intra_op_threads == 4
    with pytest.raises(ValueError, match="--intra-op-threads 100000 is invalid") as raised:
        plan_threads(ServeConfig(intra_op_threads=100_000), 4.5, "cgroup cpu.max")
    assert "at most 4" in str(raised.value)
    assert "cgroup cpu.max" in str(raised.value)


def test_sigterm_drains_and_exits(model_store: Path, tmp_path: Path):
    server = ServerProcess(model_store, tmp_path)
    try:
        address = server.wait_serving()
        with ApplianceClient(address, timeout_s=CALL_TIMEOUT_S) as client:
            info = client.model_info()
            # Small chunks that the test reads slowly keep the call in flight across SIGTERM.
            request = pb.GenerateRequest(count=24, chunk_beats=1, seed=5, margin=0.0)
            stream = client.stub.Generate(request, timeout=CALL_TIMEOUT_S)
            first = next(stream)
            assert first.samples.count == 1
            server.process.send_signal(signal.SIGTERM)
            _wait_for(lambda: client.health() == "NOT_SERVING", "health NOT_SERVING")
            with pytest.raises(grpc.RpcError) as raised:
                client.validate(_beats(info, 2))
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            rest = list(stream)
            assert rest[-1].HasField("stats")
            assert 1 + sum(chunk.samples.count for chunk in rest) == rest[-1].stats.accepted
        assert server.process.wait(timeout=WAIT_S) == 0
    finally:
        server.stop()


def test_sigterm_while_loading_exits(model_store: Path, tmp_path: Path):
    # A sparse 64 GiB forward graph keeps the load hashing for tens of seconds; SIGTERM must
    # end the process at once, not after the load.
    store = tmp_path / "store"
    shutil.copytree(model_store, store)
    version = store / "versions" / (store / "CURRENT").read_text().strip()
    with (version / "forward.onnx").open("r+b") as graph:
        graph.truncate(64 << 30)
    server = ServerProcess(store, tmp_path)
    try:
        _wait_for(server.port_file.exists, "the port file")
        time.sleep(1.0)
        assert server.process.poll() is None
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=WAIT_S) == 0
        assert time.monotonic() - signalled < 10.0
        assert not server.port_file.exists()
    finally:
        server.stop()


def test_stop_lets_inflight_call_finish(model_store: Path):
    running = create_server(model_store, ServeConfig(port=0, grace_s=30.0, drain_s=0.2))
    stopper = threading.Thread(target=running.stop)
    try:
        with ApplianceClient(f"127.0.0.1:{running.port}", timeout_s=CALL_TIMEOUT_S) as client:
            stream = client.stub.Generate(
                pb.GenerateRequest(count=12, chunk_beats=1, seed=2, margin=0.0)
            )
            first = next(stream)
            stopper.start()
            rest = list(stream)
            stopper.join(WAIT_S)
            assert not stopper.is_alive()
            assert (
                first.samples.count + sum(c.samples.count for c in rest) == rest[-1].stats.accepted
            )
            with pytest.raises(grpc.RpcError) as raised:
                client.model_info()
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop()


def test_busy_port_names_the_fix(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="appliance.server")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        capfd.readouterr()
        with pytest.raises(ValueError) as raised:
            start_server(ServeConfig(port=port, grace_s=1.0, drain_s=0.0))
    message = str(raised.value)
    assert f"cannot bind 127.0.0.1:{port}: the port is in use" in message
    assert "--port 0 takes a free one" in message
    assert "GRPC_VERBOSITY" not in message
    # gRPC's C core reports the failed bind on file descriptor 2, which must reach the debug log.
    assert "Failed to add port" not in capfd.readouterr().err
    debug_lines = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("Failed to add port" in line for line in debug_lines), debug_lines


def test_grpc_library_lines_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    library = logging.getLogger("tests.grpc_library")
    library.addFilter(GrpcLibraryLogLimit())
    caplog.set_level(logging.ERROR, logger=library.name)
    for index in range(3 * REJECTION_LOG_LINES):
        library.error("failed to parse message %d", index)
    lines = [r for r in caplog.records if r.name == library.name]
    assert len(lines) == REJECTION_LOG_LINES


def test_grpc_library_limit_attached_once() -> None:
    shared = limit_grpc_library_logs()
    assert limit_grpc_library_logs() is shared
    for name in GRPC_LIBRARY_LOGGERS:
        limits = [f for f in logging.getLogger(name).filters if isinstance(f, GrpcLibraryLogLimit)]
        assert limits == [shared]


def test_generate_timeout_bounds_each_chunk_not_the_stream(small_server: ApplianceServer):
    # Ten chunks read half a second apart take five seconds, more than the two-second timeout.
    address = f"127.0.0.1:{small_server.port}"
    request = pb.GenerateRequest(count=50, chunk_beats=5, margin=0.0, seed=3)
    received = 0
    with ApplianceClient(address, timeout_s=2.0) as client:
        started = time.monotonic()
        for chunk in client.generate_stream(request):
            received += chunk.samples.count
            time.sleep(0.5)
        elapsed_s = time.monotonic() - started
    assert received == 50
    assert elapsed_s > 2.0


def test_stalled_generate_stream_is_cancelled(small_server: ApplianceServer, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    engine = small_server.engine
    assert engine is not None
    monkeypatch.setattr(engine, "start_generate", lambda *a, **k: StalledRun())
    request = pb.GenerateRequest(count=5, chunk_beats=1)
    with ApplianceClient(f"127.0.0.1:{small_server.port}", timeout_s=1.0) as client:
        with pytest.raises(StreamStalledError) as raised:
            next(client.generate_stream(request))
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert raised.value.details().startswith("no message of the stream arrived within 1 s; ")
    # The cancellation reaches the server, which ends the call well before the 60 s.
    _wait_for(
        lambda: any(
            "rpc=Generate" in r.getMessage() and "status=CANCELLED" in r.getMessage()
            for r in caplog.records
        ),
        "the server's log line of the cancelled call",
    )


class _SlowRun:
    """A real generation run whose every ``advance`` first sleeps for ``delay_s``."""

    def __init__(self, run, delay_s: float) -> None:  # noqa: ANN001
        self.run = run
        self.delay_s = delay_s

    @property
    def done(self) -> bool:
        return bool(self.run.done)

    def advance(self, should_stop, until_s: float) -> None:  # noqa: ANN001
        time.sleep(self.delay_s)
        self.run.advance(should_stop, until_s)

    def finish(self):  # noqa: ANN201
        return self.run.finish()


def test_generate_sends_progress_between_pieces_of_a_chunk(model_store: Path, monkeypatch):
    # A chunk of 768 beats is three pieces of 256, and each piece here ends within one pause
    # of 0.3 s and one batch. No piece alone runs past the 0.5 s interval, but the whole chunk
    # does, so a progress message must come between pieces.
    request = pb.GenerateRequest(chunk_beats=768, margin=0.0, seed=8)
    request.class_counts.add(beat_class=pb.BEAT_CLASS_N, count=768)
    with _serving(model_store) as running:
        engine = running.engine
        assert engine is not None
        real_start = engine.start_generate
        with ApplianceClient(f"127.0.0.1:{running.port}", timeout_s=CALL_TIMEOUT_S) as client:
            plain = list(client.stub.Generate(request))
            monkeypatch.setattr(running.servicer, "progress_interval_s", 0.5)
            monkeypatch.setattr(
                engine, "start_generate", lambda *a, **k: _SlowRun(real_start(*a, **k), 0.3)
            )
            paced = list(client.stub.Generate(request))
    progress = [c for c in paced if c.samples.count == 0 and not c.HasField("stats")]
    assert progress, "the three pieces of one chunk went out without a progress message"
    assert b"".join(c.samples.values_f32 for c in paced) == b"".join(
        c.samples.values_f32 for c in plain
    )


def test_generate_keeps_beats_received_before_a_failure(
    small_server: ApplianceServer, monkeypatch
):
    engine = small_server.engine
    assert engine is not None
    # The first chunk's run is real; the second never ends, so the client gives up.
    real_start = engine.start_generate
    stall_after_first_run(engine, monkeypatch)
    with ApplianceClient(f"127.0.0.1:{small_server.port}", timeout_s=1.0) as client:
        with pytest.raises(GenerateInterruptedError) as raised:
            client.generate(class_counts={"N": 10}, chunk_beats=5, margin=0.0, seed=3)
    error = raised.value
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert error.details().startswith(
        "the stream failed after 5 of the 10 requested beats had arrived: no message of the "
        "stream arrived within 1 s"
    )
    assert isinstance(error.cause, StreamStalledError)
    assert error.received.beats.shape == (5, len(engine.leads), engine.window_samples)
    assert error.received.classes == ["N"] * 5
    assert error.received.scores.shape == (5,)
    assert np.isfinite(error.received.beats).all()
    # Those are the first five beats of the same call on a server that does not fail.
    monkeypatch.setattr(engine, "start_generate", real_start)
    with ApplianceClient(f"127.0.0.1:{small_server.port}", timeout_s=CALL_TIMEOUT_S) as client:
        whole = client.generate(class_counts={"N": 10}, chunk_beats=5, margin=0.0, seed=3)
    np.testing.assert_array_equal(whole.beats[:5], error.received.beats)


def test_generate_sends_progress_while_draws_are_rejected(
    small_server: ApplianceServer, small_client: ApplianceClient, caplog, monkeypatch
):
    # Each piece of drawing lasts at most 0.05 s here, far less than filling a chunk takes at a
    # margin that rejects almost every draw, so progress messages come between the chunks.
    caplog.set_level(logging.INFO)
    servicer = small_server.servicer
    monkeypatch.setattr(servicer, "progress_interval_s", 0.05)
    request = pb.GenerateRequest(chunk_beats=4, margin=0.9, seed=21, max_draws_per_beat=200)
    request.class_counts.add(beat_class=pb.BEAT_CLASS_N, count=4)
    metadata = (("x-request-id", "progress-call"),)
    chunks = list(small_client.stub.Generate(request, metadata=metadata))
    progress = [c for c in chunks if c.samples.count == 0 and not c.HasField("stats")]
    assert progress, "no progress message although drawing took many pieces"
    for message in progress:
        assert (message.samples.leads, message.samples.window_samples) != (0, 0)
        assert message.fs_hz > 0
        assert not message.beat_classes
        assert not message.scores
    assert chunks[-1].HasField("stats")
    # Pausing changes nothing: the same request without progress gives the same beats.
    monkeypatch.setattr(servicer, "progress_interval_s", 1000.0)
    again = list(small_client.stub.Generate(request))
    assert not [c for c in again if c.samples.count == 0 and not c.HasField("stats")]
    beats = b"".join(c.samples.values_f32 for c in chunks)
    assert beats == b"".join(c.samples.values_f32 for c in again)
    assert chunks[-1].stats == again[-1].stats
    line = _single_rpc_line(caplog, "progress-call", "the progress call's log line")
    assert f"progress_messages={len(progress)}" in line


def test_closed_client_refuses_calls(small_server: ApplianceServer):
    client = ApplianceClient(f"127.0.0.1:{small_server.port}", timeout_s=CALL_TIMEOUT_S)
    assert client.health() == "SERVING"
    client.close()
    client.close()
    with pytest.raises(ValueError, match="this ApplianceClient is closed; create a new one"):
        client.model_info()
    with pytest.raises(ValueError, match="this ApplianceClient is closed"):
        client.health()


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"address": None}, "address=None is invalid"),
        ({"address": "127.0.0.1:1", "timeout_s": "5"}, "timeout_s='5' is invalid"),
        ({"address": "127.0.0.1:1", "timeout_s": True}, "timeout_s=True is invalid"),
        ({"address": "127.0.0.1:1", "max_receive_message_bytes": 2.5}, "max_receive_message"),
    ],
)
def test_client_arguments_of_wrong_type_named(arguments: dict, named: str):  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=re.escape(named)):
        ApplianceClient(**arguments)


def test_class_counts_must_be_a_mapping(small_client: ApplianceClient):
    with pytest.raises(ValueError, match="class_counts must map class names to counts"):
        small_client.generate(class_counts=[("N", 2)])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("beats", "named"),
    [
        (np.zeros((1, 1, 4), dtype=complex), "beats are complex numbers"),
        (np.full((1, 1, 4), 1e300), "beats[0, 0, 0] is 1e+300, beyond the float32 range"),
        (np.array([[["a", "b"]]]), "cannot be read as numbers"),
    ],
)
def test_validate_refuses_values_the_cast_would_change(
    small_client: ApplianceClient, beats: np.ndarray, named: str
):
    with pytest.raises(ValueError, match=re.escape(named)):
        small_client.validate(beats)


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"classes": "N"}, "classes must be a list of class names (or None), one per beat"),
        ({"classes": {0: "N"}}, "got dict"),
        ({"classes": [1]}, "got list"),
        ({"fs_hz": "360"}, "fs_hz='360' is not a number"),
        ({"margin": True}, "margin=True is not a number"),
    ],
)
def test_validate_names_arguments_of_wrong_type(
    small_client: ApplianceClient, arguments: dict[str, Any], named: str
):
    beats = np.zeros((1, 1, 256), dtype=np.float32)
    with pytest.raises(ValueError, match=re.escape(named)):
        small_client.validate(beats, **arguments)


def test_validate_takes_classes_as_array_or_tuple(small_client: ApplianceClient):
    beats = np.zeros((2, 1, 256), dtype=np.float32)
    for classes in (np.array(["N", "N"]), ("N", None), np.array(["N", None], dtype=object)):
        reply = small_client.validate(beats, classes=classes)
        assert reply.classes[0] == "N", classes


def test_client_accepts_numpy_numbers(small_server: ApplianceServer):
    with ApplianceClient(
        f"127.0.0.1:{small_server.port}",
        timeout_s=np.float64(CALL_TIMEOUT_S),
        max_receive_message_bytes=np.int64(8 * 1024 * 1024),
    ) as client:
        assert client.health() == "SERVING"


def test_validate_splits_a_set_over_the_servers_limits(small_client: ApplianceClient):
    # This server takes at most 50 beats per request and 64 KiB per message (about 60 beats).
    info = small_client.model_info()
    beats = _beats(info, 130)
    beats[::7] *= 0.5  # beats of two shapes, so that the order of the scores is checked
    classes = ["N"] * 130
    whole = small_client.validate(beats, classes=classes)
    assert whole.scores.shape == (130,)
    assert whole.accepted.shape == (130,)
    assert len(whole.classes) == 130
    assert whole.margin == pytest.approx(info.default_margin)
    # Each beat gets the score it gets alone.
    for index in (0, 7, 49, 50, 100, 129):
        alone = small_client.validate(beats[index : index + 1], classes=["N"])
        assert whole.scores[index] == pytest.approx(alone.scores[0], rel=1e-5)
    # A margin set by the caller applies to every call.
    strict = small_client.validate(beats, margin=0.9)
    assert strict.margin == pytest.approx(0.9)
    assert (strict.scores[strict.accepted] >= 0.9 - 1e-6).all()
    assert (strict.scores[~strict.accepted] < 0.9 + 1e-6).all()

    # The warning of a split set gives the figures of the whole set, not of one call.
    offset = beats.copy()
    offset[:60] += 2.0
    warned = small_client.validate(offset)
    assert len(warned.warnings) == 1, warned.warnings
    assert "offset_beats=60 beats=130 " in warned.warnings[0]
    assert small_client.validate(beats).warnings == []
    # An empty set still reaches the server, which names the empty field.
    with pytest.raises(grpc.RpcError) as empty:
        small_client.validate(beats[:0])
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A failure in the third call (beats 100 to 129) names that call's beats, within which the
    # server counts from 0.
    beats[110, 0, 3] = np.nan
    with pytest.raises(CallPartError) as raised:
        small_client.validate(beats)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith(
        "in the call for beats 100 to 129 of 130 (the server numbers beats from 100 as 0): "
    )
    assert "NaN or infinity in beat 10" in raised.value.details()
    assert (raised.value.start, raised.value.stop) == (100, 130)
    # A failure in the first call is the server's error itself.
    beats[110, 0, 3] = 1.0
    beats[10, 0, 3] = np.inf
    with pytest.raises(grpc.RpcError) as first:
        small_client.validate(beats)
    assert not isinstance(first.value, CallPartError)
    assert "NaN or infinity in beat 10" in first.value.details()


def test_validate_message_size_follows_the_servers_limit(model_store: Path):
    # The smallest message limit takes 14 one-lead beats of 256 samples per message.
    with _serving(model_store, max_message_bytes=16 * 1024) as running:
        with ApplianceClient(f"127.0.0.1:{running.port}", timeout_s=CALL_TIMEOUT_S) as client:
            info = client.model_info()
            reply = client.validate(_beats(info, 100))
            assert reply.scores.shape == (100,)
            alone = client.validate(_beats(info, 1)).scores[0]
            assert reply.scores[0] == pytest.approx(alone, rel=1e-5)
            # A beat larger than one message is named before anything is sent.
            with pytest.raises(ValueError, match=r"one beat of shape \(1, 8192\) is 32768 bytes"):
                client.validate(np.zeros((1, 1, 8192), dtype=np.float32))
