"""The one place where appliance errors become gRPC status codes, and per-call logging."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import re
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from appliance.errors import (
    ApplianceError,
    ModelNotReadyError,
    ModelStoreError,
    RequestError,
    RequestTooLargeError,
)

logger = logging.getLogger("appliance.service")

REQUEST_ID_KEY = "x-request-id"
# Client-chosen request ids are logged verbatim, so only a short, log-safe alphabet is kept.
_REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")


def status_code_for(error: BaseException) -> grpc.StatusCode:
    """Return the gRPC status code for an exception raised while serving a call."""
    if isinstance(error, RequestTooLargeError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, RequestError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, ModelNotReadyError):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(error, ModelStoreError):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INTERNAL


class CallCancelledError(Exception):
    """The client cancelled the call or its deadline expired; the servicer stops its work."""


def request_id_of(context: grpc.ServicerContext) -> tuple[str, int | None]:
    """Return the call's request id and the length of a client id that was replaced.

    Returns:
        The client's ``x-request-id`` if it is log-safe, else a new random id. Second, the
        length in characters of a client id that was not log-safe, or None when the client
        sent a valid id or none.
    """
    return _request_id_from(context.invocation_metadata())


def _request_id_from(metadata: Any) -> tuple[str, int | None]:
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str):
            if _REQUEST_ID_PATTERN.fullmatch(value):
                return value, None
            return uuid.uuid4().hex[:16], len(value)
    return uuid.uuid4().hex[:16], None


@dataclass
class CallRecord:
    """Fields that one call logs when it ends.

    Attributes:
        method: RPC name, for example ``Generate``.
        request_id: Id from the client's ``x-request-id`` metadata, or a random one.
        counts: Call figures (beats requested, accepted, ...) logged as key=value.
        status: gRPC status name the call ended with.
    """

    method: str
    request_id: str
    counts: dict[str, Any] = field(default_factory=dict)
    status: str = "OK"


def _deadline_passed(context: grpc.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


# grpcio hands the servicer the end of a request stream and the client's cancel as two events
# on one completion queue. The servicer can see the stream end before the cancel is processed,
# so a stream that looks finished is checked again after this pause.
STREAM_END_SETTLE_S = 0.05


def request_stream_cancelled(context: grpc.ServicerContext) -> bool:
    """Return whether the client cancelled a request stream that has just ended.

    A client that half-closes leaves the call active. A cancel or a passed deadline also ends
    the stream, but gRPC can mark the call inactive a moment later, and the server's deadline
    can lag the client's. So an active call is checked again after ``STREAM_END_SETTLE_S``.
    """
    if not context.is_active() or _deadline_passed(context):
        return True
    time.sleep(STREAM_END_SETTLE_S)
    return not context.is_active() or _deadline_passed(context)


def _ended_status(context: grpc.ServicerContext) -> str:
    if _deadline_passed(context):
        return "DEADLINE_EXCEEDED"
    if context.is_active():
        return "OK"
    return "CANCELLED"


@contextlib.contextmanager
def rpc_call(method: str, context: grpc.ServicerContext) -> Iterator[CallRecord]:
    """Log the call once when it ends and turn raised errors into a gRPC status.

    The log line has ``rpc``, ``request_id``, ``status``, ``duration_ms`` and the counts the
    servicer stored in the yielded record. Appliance errors become the status of
    ``status_code_for`` with their message. Any other exception is logged with its traceback
    and becomes INTERNAL with the request id, so that a client can quote it.
    """
    request_id, replaced_id_chars = request_id_of(context)
    record = CallRecord(method=method, request_id=request_id)
    if replaced_id_chars is not None:
        # The client's id itself is not logged, because it could forge log fields.
        record.counts["invalid_client_request_id_chars"] = replaced_id_chars
    context.set_trailing_metadata(((REQUEST_ID_KEY, record.request_id),))
    started = time.monotonic()
    abort: tuple[grpc.StatusCode, str] | None = None
    error = ""
    try:
        yield record
        record.status = _ended_status(context)
    except CallCancelledError:
        record.status = _ended_status(context)
        watch = _CURRENT_WATCH.get()
        if record.status == "CANCELLED" and watch is not None and watch.parse_failed:
            # gRPC ended the request stream because a message could not be parsed, and sent
            # the client INTERNAL.
            record.status = "INTERNAL"
            error = "a request message could not be parsed as the method's request type"
    except ApplianceError as exc:
        code = status_code_for(exc)
        record.status = code.name
        error = str(exc)
        abort = (code, error)
    except grpc.RpcError as exc:
        # Reading a request stream raises this when the client cancels, its deadline expires
        # or a message is over the size limit. gRPC has already sent the client its status.
        code = exc.code() if isinstance(exc, grpc.Call) else None
        record.status = code.name if code is not None else _ended_status(context)
        error = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        if context.is_active() and code is not None:
            abort = (code, error or code.name)
    except Exception:
        record.status = "INTERNAL"
        logger.exception("rpc=%s request_id=%s error=unhandled", method, record.request_id)
        abort = (grpc.StatusCode.INTERNAL, f"internal error; request id {record.request_id}")
    except GeneratorExit:
        # A streaming call whose client went away: grpc closes the response generator.
        record.status = _ended_status(context)
        raise
    finally:
        counts = "".join(f" {key}={value}" for key, value in record.counts.items())
        duration_ms = (time.monotonic() - started) * 1000
        if error:
            logger.info(
                "rpc=%s request_id=%s status=%s duration_ms=%.1f%s error=%r",
                method,
                record.request_id,
                record.status,
                duration_ms,
                counts,
                error,
            )
        else:
            logger.info(
                "rpc=%s request_id=%s status=%s duration_ms=%.1f%s",
                method,
                record.request_id,
                record.status,
                duration_ms,
                counts,
            )
    if abort is not None:
        context.abort(*abort)


# Lines about calls that gRPC rejected that are logged per window, and the window, in s.
REJECTION_LOG_LINES = 20
REJECTION_LOG_WINDOW_S = 10.0


class _RejectionLogLimit:
    """Let at most ``REJECTION_LOG_LINES`` lines through per ``REJECTION_LOG_WINDOW_S`` window.

    A flood of rejected calls would otherwise write one WARNING line each. The first line let
    through after a suppression gives the number of lines suppressed before it.
    """

    def __init__(self) -> None:
        # A weakref finalizer calls ``admit``, and the garbage collector can run it in a thread
        # that is already inside ``admit``. A plain Lock would deadlock that thread.
        self._lock = threading.RLock()
        self._window_started = -math.inf
        self._lines = 0
        self._suppressed = 0

    def admit(self) -> tuple[bool, int]:
        """Return whether a line may be logged now, and how many were suppressed before it."""
        with self._lock:
            now = time.monotonic()
            if now - self._window_started >= REJECTION_LOG_WINDOW_S:
                self._window_started, self._lines = now, 0
            if self._lines >= REJECTION_LOG_LINES:
                self._suppressed += 1
                return False, 0
            self._lines += 1
            suppressed, self._suppressed = self._suppressed, 0
            return True, suppressed


# Loggers of grpcio that write an ERROR line with a traceback for every request it cannot parse
# and every header it cannot decode. The call is logged once by this module in any case.
GRPC_LIBRARY_LOGGERS = ("grpc._common", "grpc._cython.cygrpc", "grpc._server")


class GrpcLibraryLogLimit(logging.Filter):
    """Rate limit of grpcio's own log lines, with the same window as the rejection lines."""

    def __init__(self) -> None:
        super().__init__()
        self._limit = _RejectionLogLimit()

    def filter(self, record: logging.LogRecord) -> bool:
        admitted, suppressed = self._limit.admit()
        if admitted and suppressed:
            record.msg = f"{record.msg} (suppressed_before={suppressed})"
        return admitted


def limit_grpc_library_logs() -> GrpcLibraryLogLimit:
    """Attach one shared ``GrpcLibraryLogLimit`` to grpcio's loggers, once per process."""
    for name in GRPC_LIBRARY_LOGGERS:
        for existing in logging.getLogger(name).filters:
            if isinstance(existing, GrpcLibraryLogLimit):
                return existing
    shared = GrpcLibraryLogLimit()
    for name in GRPC_LIBRARY_LOGGERS:
        logging.getLogger(name).addFilter(shared)
    return shared


@dataclass
class _CallWatch:
    """State that the unserved-call logger keeps for one call while gRPC handles it."""

    method: str
    request_id: str
    replaced_id_chars: int | None
    started: float
    interceptor_thread: int
    max_message_bytes: int
    max_concurrent_rpcs: int | None
    limit: _RejectionLogLimit
    received: bool = False
    parse_failed: bool = False
    invalid_method_chars: int | None = None

    def report_if_unserved(self) -> None:
        if self.received:
            return
        if self.parse_failed:
            status = "INTERNAL"
            reason = "the request message could not be parsed as the method's request type"
        elif threading.get_ident() == self.interceptor_thread:
            # gRPC rejects a call over its concurrent-call limit in the thread that ran the
            # interceptor, before any worker takes it.
            # NOTE: that is how grpcio 1.85's server works, not a documented contract; the
            # concurrent-call test in tests/test_server.py checks it.
            status = "RESOURCE_EXHAUSTED"
            reason = f"the server was at its limit of {self.max_concurrent_rpcs} calls at once"
        else:
            status = "NOT_RECEIVED"
            reason = (
                "the request never reached the service: its message was over the message size "
                f"limit of {self.max_message_bytes} bytes, its metadata was over gRPC's metadata "
                "size limit, or the client cancelled or its deadline passed before a worker "
                "thread took the call"
            )
        self.log(status, reason)

    def log(self, status: str, reason: str) -> None:
        """Log the call's line at WARNING, unless the rejection log limit suppresses it."""
        duration_ms = (time.monotonic() - self.started) * 1000
        admitted, suppressed = self.limit.admit()
        if not admitted:
            return
        fields = ""
        if self.invalid_method_chars is not None:
            fields += f" invalid_method_chars={self.invalid_method_chars}"
        if self.replaced_id_chars is not None:
            fields += f" invalid_client_request_id_chars={self.replaced_id_chars}"
        if suppressed:
            fields += f" suppressed_before={suppressed}"
        logger.warning(
            "rpc=%s request_id=%s status=%s duration_ms=%.1f%s reason=%r",
            self.method,
            self.request_id,
            status,
            duration_ms,
            fields,
            reason,
        )


class UnservedCallLogger(grpc.ServerInterceptor):
    """Log calls that gRPC ends before their request reaches the servicer.

    gRPC itself rejects a call over the concurrent-call limit, and a unary request over the
    message size limit, so ``rpc_call`` never runs for them. This interceptor wraps the method's
    behaviour and logs one line, with the request id, when gRPC drops a call whose behaviour
    never ran. It also logs a call of a method that no servicer has. Calls that reach the
    servicer are logged by ``rpc_call`` only.

    A call that streams requests (ValidateStream, reflection) keeps its worker thread while it
    waits for the client's next message. So this interceptor lets at most half of the workers
    serve such calls, and rejects further ones with RESOURCE_EXHAUSTED and a logged line. The
    other half stay free for health checks and other calls, however many streams clients
    open and leave silent.

    Arguments:
        max_message_bytes: The server's message size limit, for the log lines.
        max_concurrent_rpcs: The server's concurrent-call limit, for the log lines.
        workers: Number of the server's worker threads.
    """

    def __init__(
        self, max_message_bytes: int, max_concurrent_rpcs: int | None, workers: int
    ) -> None:
        self.max_message_bytes = max_message_bytes
        self.max_concurrent_rpcs = max_concurrent_rpcs
        self.limit = _RejectionLogLimit()
        self.streams = _RequestStreamLimit(max(1, workers // 2), workers)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = str(handler_call_details.method)
        request_id, replaced_id_chars = _request_id_from(handler_call_details.invocation_metadata)
        watch = _CallWatch(
            method=method.rsplit("/", 1)[-1] if method.startswith(_SERVICE_PREFIX) else method,
            request_id=request_id,
            replaced_id_chars=replaced_id_chars,
            started=time.monotonic(),
            interceptor_thread=threading.get_ident(),
            max_message_bytes=self.max_message_bytes,
            max_concurrent_rpcs=self.max_concurrent_rpcs,
            limit=self.limit,
        )
        if handler is None:
            # gRPC returns UNIMPLEMENTED. The client chose the name, so only a log-safe one
            # is logged, in full.
            if _METHOD_PATTERN.fullmatch(method):
                watch.method = method
            else:
                watch.method, watch.invalid_method_chars = "invalid", len(method)
            watch.log("UNIMPLEMENTED", "the server has no such method")
            return None
        return _watched_handler(handler, watch, self.streams)


class _RequestStreamLimit:
    """Places for the calls that stream requests, one per call while it runs."""

    def __init__(self, places: int, workers: int) -> None:
        self.places = places
        self.workers = workers
        self._free = threading.BoundedSemaphore(places)

    def enter(self, watch: _CallWatch, context: grpc.ServicerContext) -> None:
        """Take a place, or log the call and abort it with RESOURCE_EXHAUSTED."""
        if self._free.acquire(blocking=False):
            return
        message = (
            f"{self.places} calls that stream requests (ValidateStream, reflection) are already "
            f"open, the server's limit (half of its {self.workers} worker threads); retry when "
            "one has ended"
        )
        watch.log("RESOURCE_EXHAUSTED", message)
        context.set_trailing_metadata(((REQUEST_ID_KEY, watch.request_id),))
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    def leave(self) -> None:
        self._free.release()


def _leaving_at_end(responses: Iterator[Any], streams: _RequestStreamLimit) -> Iterator[Any]:
    """Yield the responses of a call that streams both ways, and free its place at the end."""
    try:
        yield from responses
    finally:
        streams.leave()


_SERVICE_PREFIX = "/appliance.v1.ApplianceService/"
# Unknown method names that are logged as sent: /package.Service/Method.
_METHOD_PATTERN = re.compile(r"/[A-Za-z0-9_.]{1,100}/[A-Za-z0-9_]{1,100}")
# Watch of the call whose behaviour runs in the current thread, if any.
_CURRENT_WATCH: contextvars.ContextVar[_CallWatch | None] = contextvars.ContextVar(
    "current_watch", default=None
)

_HANDLER_FACTORIES: dict[str, Callable[..., grpc.RpcMethodHandler]] = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def _watched_handler(
    handler: grpc.RpcMethodHandler, watch: _CallWatch, streams: _RequestStreamLimit | None = None
) -> grpc.RpcMethodHandler:
    """Return ``handler`` with its behaviour wrapped so that ``watch`` records whether it ran.

    With ``streams``, a call that streams requests also takes a place of ``streams`` while it
    runs, or is rejected when none is free.
    """
    limit = streams if handler.request_streaming else None
    for kind, factory in _HANDLER_FACTORIES.items():
        inner = getattr(handler, kind, None)
        if inner is None:
            continue

        def behavior(
            request: Any, context: grpc.ServicerContext, *callbacks: Any, inner: Any = inner
        ) -> Any:
            watch.received = True
            if limit is not None:
                limit.enter(watch, context)
            # rpc_call reads the watch while a streamed request is consumed in this thread.
            token = _CURRENT_WATCH.set(watch)
            try:
                result = inner(request, context, *callbacks)
            except BaseException:
                if limit is not None:
                    limit.leave()
                raise
            finally:
                _CURRENT_WATCH.reset(token)
            if limit is None:
                return result
            if handler.response_streaming:
                # The responses are produced after the behaviour returns.
                return _leaving_at_end(result, limit)
            limit.leave()
            return result

        # grpcio passes a non-blocking behaviour, such as the health service's Watch, a
        # response callback as third argument and frees the worker thread when it returns.
        # Without the flag on the wrapper, every open Watch would keep a worker thread.
        if getattr(inner, "experimental_non_blocking", False):
            behavior.experimental_non_blocking = True  # type: ignore[attr-defined]

        # gRPC drops its last reference to the behaviour when the call ends; the finalizer
        # then runs in that thread. No finalizer runs at interpreter exit.
        weakref.finalize(behavior, watch.report_if_unserved).atexit = False
        return factory(
            behavior,
            request_deserializer=_watched_deserializer(handler.request_deserializer, watch),
            response_serializer=handler.response_serializer,
        )
    return handler


def _watched_deserializer(
    deserializer: Callable[[bytes], Any] | None, watch: _CallWatch
) -> Callable[[bytes], Any] | None:
    """Return ``deserializer`` wrapped so that ``watch`` records a request that fails to parse."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:
            # gRPC logs the exception and ends the call with INTERNAL.
            watch.parse_failed = True
            raise

    return deserialize
