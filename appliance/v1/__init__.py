"""Code generated from proto/appliance/v1/appliance.proto by grpc_tools.protoc.

The generated modules are not in git: ``make proto`` (which ``make run`` and ``make test`` call)
writes them, and a wheel built after it contains them.
"""

from __future__ import annotations

import importlib

GENERATED_MODULES = ("appliance_pb2", "appliance_pb2_grpc")


class GeneratedCodeMissingError(ImportError):
    """A module generated from the proto file is missing from ``appliance/v1``."""


def __getattr__(name: str) -> object:
    # ``from appliance.v1 import NAME`` looks NAME up here before it imports the submodule, so
    # this imports it and turns only its absence into the error below.
    if name in GENERATED_MODULES:
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
        raise GeneratedCodeMissingError(
            f"appliance/v1/{name}.py, generated from proto/appliance/v1/appliance.proto, is "
            "missing; run `make proto` in the repository before running or packaging the "
            "appliance"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
