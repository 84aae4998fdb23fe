"""The one place where appliance errors become gRPC status codes."""

from __future__ import annotations

import grpc

from appliance.errors import (
    ApplianceError,
    ModelNotReadyError,
    ModelStoreError,
    RequestError,
    RequestTooLargeError,
)


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
    if isinstance(error, ApplianceError):
        return grpc.StatusCode.INTERNAL
    return grpc.StatusCode.INTERNAL
