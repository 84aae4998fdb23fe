"""Exception tree of the appliance.

::

    ApplianceError
    ├── DataError              input data cannot be used (exit status 2 on the command line)
    │   ├── RecordError        one record is unusable; ingest reports it and skips it
    │   └── NoUsableDataError  nothing usable was found in a data folder
    ├── RequestError           a gRPC request is invalid           -> INVALID_ARGUMENT
    │   └── RequestTooLargeError  a request exceeds a size limit   -> RESOURCE_EXHAUSTED
    ├── ModelStoreError        the model store is missing or corrupt -> FAILED_PRECONDITION
    │   └── ReportNotFoundError  the served model has no stored quality report
    ├── ModelNotReadyError     the server has no usable model yet  -> UNAVAILABLE
    └── TrainingError          training cannot continue
        └── NonFiniteLossError the loss became NaN or infinite

The mapping to gRPC status codes lives in ``appliance.server_errors`` so that this module
stays importable without gRPC.
"""

from __future__ import annotations

from pathlib import Path


class ApplianceError(Exception):
    """Base class of every error the appliance raises on purpose."""


class DataError(ApplianceError):
    """Input data that cannot be used; the message names the input and the fix."""


class RecordError(DataError):
    """One WFDB record that cannot be used.

    Attributes:
        record: The record name, relative to the data folder.
        reason: A short reason, used in the ingest report.
    """

    def __init__(self, record: str, reason: str) -> None:
        super().__init__(f"record {record}: {reason}")
        self.record = record
        self.reason = reason


class NoUsableDataError(DataError):
    """A data folder gave no usable beats."""


class RequestError(ApplianceError):
    """A request field is out of its valid range; the message names field, value and range."""


class RequestTooLargeError(RequestError):
    """A request exceeds a size limit set by the operator."""


class ModelStoreError(ApplianceError):
    """The model store is missing, incomplete or fails its hash check."""


class ReportNotFoundError(ModelStoreError):
    """The model store contains no valid quality report for the requested model."""


class ModelNotReadyError(ApplianceError):
    """The server has not finished loading and checking its model."""


class TrainingError(ApplianceError):
    """Training cannot continue."""


class StoppedAtOnce(BaseException):  # noqa: N818 - an interrupt, like KeyboardInterrupt
    """A second SIGTERM or SIGINT: stop at once, without finishing the step or stage.

    It derives from ``BaseException``, as ``KeyboardInterrupt`` does, so that the handlers that
    turn a damaged record or file into a reported error do not catch it.

    Attributes:
        signum: The signal's number; the command line exits with ``128 + signum``.
        step: The optimiser step training stopped after, or None when it stopped in export.
        checkpoint: The checkpoint saved at that step, or None when it stopped in export.
    """

    def __init__(
        self, message: str, signum: int, step: int | None = None, checkpoint: Path | None = None
    ) -> None:
        super().__init__(message)
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint


class TrainingStoppedError(TrainingError):
    """Training stopped on a signal (SIGTERM or SIGINT) after saving a checkpoint.

    Attributes:
        signum: The signal's number; the command line exits with ``128 + signum``.
        step: The optimiser step training stopped after, or None when it stopped in export.
        checkpoint: The checkpoint saved at that step, or None when it stopped in export.
    """

    def __init__(
        self, message: str, signum: int, step: int | None = None, checkpoint: Path | None = None
    ) -> None:
        super().__init__(message)
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint


class NonFiniteLossError(TrainingError):
    """The training loss became NaN or infinite.

    Attributes:
        step: The optimiser step at which the loss was not finite.
    """

    def __init__(self, step: int, records: list[str]) -> None:
        super().__init__(
            f"loss became non-finite at step {step} (batch from records {', '.join(records)}); "
            "the last good checkpoint is kept and nothing was exported. Lower --learning-rate "
            "or check those records."
        )
        self.step = step
        self.records = records
