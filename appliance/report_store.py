"""Quality reports stored in the model store, beside the versions they describe.

Layout::

    STORE/reports/<version_id>/quality.json   figures of ``appliance.quality.report.build_report``
    STORE/reports/<version_id>/quality.html   the report page, PNG figures embedded as data URIs

Reports live outside ``STORE/versions``, so attaching one leaves the version folder and its
hashed manifest untouched. ``attach_report`` writes a new folder and moves it into place with
``os.replace``. ``load_report`` reads both files through one directory handle, so it returns the
JSON and the page of the same report. This module imports neither PyTorch nor gRPC.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.errors import ModelStoreError, ReportNotFoundError
from appliance.store import MANIFEST_FILE, VERSIONS_DIR

logger = logging.getLogger(__name__)

REPORTS_DIR = "reports"
REPORT_JSON = "quality.json"
REPORT_HTML = "quality.html"
REPORT_COMMAND = "python -m appliance report --store STORE --data MITDB_FOLDER"


@dataclass(frozen=True)
class StoredReport:
    """A quality report read back from the model store.

    Attributes:
        version: Model version id the report is stored under.
        model_id: Identifier of the model the report describes.
        summary: The parsed figures of ``report_json``.
        report_json: The stored JSON text, unchanged.
        report_html: The stored page, UTF-8 HTML with embedded figures.
    """

    version: str
    model_id: str
    summary: dict[str, Any]
    report_json: str
    report_html: bytes


# Columns that compare synthetic beats with the beats the model learnt from. They describe the
# model only when it was trained on the protocol's fit records.
PRIVACY_COLUMNS = (
    "dcr_synthetic_median",
    "fraction_below_holdout_p05",
    "mia_auroc",
    "mia_auroc_unseen",
)


def mismatch_warning(matches_training_records: bool | None) -> str | None:
    """Return the warning for a model not trained on the protocol's fit records, else None.

    Arguments:
        matches_training_records: The report's ``protocol.matches_training_records``; None
            when the manifest does not record the training records.
    """
    if matches_training_records is not False:
        return None
    return (
        "this model was trained on other records than the protocol's fit set (the DS1 "
        "records of the de Chazal split). The members and hold-out of the privacy figures "
        "(DCR, MIA AUROC) are therefore not the beats it learnt from and the beats it never "
        "saw, so those figures do not describe it, and the fidelity figures compare it with "
        "another set of patients. Retrain on the DS1 records of --data for a report that "
        "describes the model"
    )


def missing_records_warning(missing_records: list[str] | None) -> str | None:
    """Return the warning for a report on a folder without every de Chazal record, else None.

    Arguments:
        missing_records: The report's ``protocol.missing_records``; None or empty when the
            folder had every record or the report predates the entry.
    """
    if not missing_records:
        return None
    return (
        f"the data folder lacked or could not read {len(missing_records)} of the 44 de Chazal "
        f"records ({', '.join(missing_records)}), so these figures come from fewer patients "
        "and are not comparable with a report on the full MIT-BIH database or with the goals. "
        "Pass a folder with all 48 readable MIT-BIH records"
    )


def shortfall_warnings(generators: dict[str, Any]) -> list[str]:
    """Return a warning for each generator that returned under half the beats requested of it.

    Arguments:
        generators: The report's ``generators`` section. Reports from before the requested
            counts were recorded give no warning.
    """
    warnings = []
    for name, metrics in generators.items():
        requested = metrics.get("requested_counts")
        received = metrics.get("synthetic_counts")
        if not isinstance(requested, dict) or not isinstance(received, dict):
            continue
        requested_total, got = sum(requested.values()), sum(received.values())
        if requested_total == 0 or got * 2 >= requested_total:
            continue
        per_class = ", ".join(
            f"{label} {received.get(label, 0)} of {count}"
            for label, count in requested.items()
            if count > 0
        )
        warnings.append(
            f"generator {name} returned {got} of the {requested_total} beats requested for the "
            f"synthetic training set ({per_class}), because its draw budget ran out. Its "
            "figures rest on those few beats and do not describe the generator; a figure "
            "it could not compute is n/a. Train the model longer, or report at a lower "
            "--margin or --temperature"
        )
    return warnings


def report_warnings(summary: dict[str, Any]) -> list[str]:
    """Return every warning that a report's figures call for: protocol, then generators."""
    protocol = summary.get("protocol", {})
    warnings = [
        missing_records_warning(protocol.get("missing_records")),
        mismatch_warning(protocol.get("matches_training_records")),
    ]
    found = [warning for warning in warnings if warning is not None]
    return found + shortfall_warnings(summary.get("generators", {}))


def metric_rows(summary: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Return the headline figures of each generator, in the order of the metric table."""
    rows = []
    for name, m in summary["generators"].items():
        gain = m["rebalancing_gain"]
        rows.append(
            (
                name,
                {
                    "tstr_macro_f1": m["tstr_f1"]["macro"],
                    "tstr_trtr": m["tstr_trtr"],
                    "gain_f1_S": gain["S"],
                    "gain_f1_F": gain["F"],
                    "discriminative": m["discriminative"]["overall"],
                    "mean_mmd2_waveform": m["mean_mmd2_waveform"],
                    "mean_mmd2_spectrum": m["mean_mmd2_spectrum"],
                    "frechet": m["frechet"],
                    "dcr_synthetic_median": m["privacy"]["dcr_synthetic_median"],
                    "fraction_below_holdout_p05": m["privacy"]["fraction_below_holdout_p05"],
                    "mia_auroc": m["privacy"]["mia_auroc"],
                    "mia_auroc_unseen": m["privacy"].get("mia_auroc_unseen"),
                },
            )
        )
    return rows


def _check_version_id(version: object) -> str:
    """Return ``version`` if it is a plain folder name, so that it cannot leave the store."""
    if (
        not isinstance(version, str)
        or not version
        or version.startswith(".")
        or Path(version).name != version
    ):
        raise ModelStoreError(
            f"model version id {version!r} is invalid; rebuild the report with `{REPORT_COMMAND}`"
        )
    return version


def attach_report(store: Path, summary: dict[str, Any], page_html: str) -> Path:
    """Store a finished report under the model version it describes, replacing an earlier one.

    Arguments:
        store: Model store folder.
        summary: Figures from ``build_report``; ``model_version`` and ``model_id`` name the
            version, and must match that version's manifest.
        page_html: The self-contained report page.

    Returns:
        The report folder, ``STORE/reports/<version_id>``.

    Raises:
        ModelStoreError: If the summary names no version, the version is not in the store, or
            its manifest has another model id.
    """
    version = _check_version_id(summary.get("model_version"))
    model_id = summary.get("model_id")
    manifest_path = Path(store) / VERSIONS_DIR / version / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelStoreError(
            f"manifest {manifest_path} of the report's model version cannot be read: {exc}; "
            "attach the report to the store the model was published to"
        ) from exc
    if manifest.get("model_id") != model_id:
        raise ModelStoreError(
            f"the report describes model {model_id}, but version {version} contains model "
            f"{manifest.get('model_id')}; rebuild the report with `{REPORT_COMMAND}`"
        )
    reports = Path(store) / REPORTS_DIR
    reports.mkdir(exist_ok=True)
    partial = reports / f".partial-{uuid.uuid4().hex}"
    partial.mkdir()
    final = reports / version
    try:
        (partial / REPORT_JSON).write_text(json.dumps(summary, indent=2, sort_keys=True))
        (partial / REPORT_HTML).write_text(page_html, encoding="utf-8")
        if final.exists():
            # NOTE: a reader that looks between these two renames finds no report and gets
            # FAILED_PRECONDITION. Linux renameat2(RENAME_EXCHANGE) would swap the folders in
            # one step, but Python's os module has no wrapper for it.
            previous = reports / f".previous-{uuid.uuid4().hex}"
            os.replace(final, previous)
            os.replace(partial, final)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(partial, final)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    logger.info(
        "quality report attached store=%s version=%s model_id=%s", store, version, model_id
    )
    return final


def load_report(store: Path, version: str, model_id: str) -> StoredReport:
    """Read the report stored for a model version and check that it describes ``model_id``.

    Messages name the model and the version but no path, because the server sends them to
    clients.

    Raises:
        ReportNotFoundError: If the version has no report, or its report describes another
            model.
        ModelStoreError: If the report cannot be read or lacks its headline figures.
    """
    version = _check_version_id(version)
    missing = (
        f"model {model_id} has no quality report; run `{REPORT_COMMAND}` on the server's "
        "model store"
    )
    try:
        folder_fd = os.open(
            Path(store) / REPORTS_DIR / version, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
        )
    except FileNotFoundError as exc:
        raise ReportNotFoundError(missing) from exc
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ModelStoreError(
                f"the quality report folder of model {model_id} is a link or not a folder; "
                f"remove it and rebuild the report with `{REPORT_COMMAND}`"
            ) from exc
        raise ModelStoreError(
            f"the quality report folder of model {model_id} cannot be opened: {exc.strerror}"
        ) from exc
    try:
        raw_json = _read_file(REPORT_JSON, folder_fd, model_id, missing)
        raw_html = _read_file(REPORT_HTML, folder_fd, model_id, missing)
    finally:
        os.close(folder_fd)
    try:
        report_json = raw_json.decode("utf-8")
        summary = json.loads(report_json)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers invalid JSON and integers beyond Python's digit limit,
        # RecursionError nesting deeper than the parser's stack.
        raise ModelStoreError(
            f"{REPORT_JSON} of the quality report of model {model_id} is not valid JSON "
            f"({exc}); rebuild it with `{REPORT_COMMAND}`"
        ) from exc
    if not isinstance(summary, dict) or summary.get("model_id") != model_id:
        stored_id = summary.get("model_id") if isinstance(summary, dict) else None
        raise ReportNotFoundError(
            f"the stored quality report describes model {stored_id}, not the served model "
            f"{model_id}; run `{REPORT_COMMAND}` on the server's model store"
        )
    try:
        # Every headline figure must convert to a float, as GetQualityReport sends them.
        for _, figures in metric_rows(summary):
            for value in figures.values():
                if value is not None:
                    float(value)
    except (KeyError, TypeError, AttributeError, ValueError, OverflowError) as exc:
        detail = f"no {exc.args[0]!r} entry" if isinstance(exc, KeyError) else str(exc)
        raise ModelStoreError(
            f"the quality report of model {model_id} lacks its headline figures ({detail}); "
            f"rebuild it with `{REPORT_COMMAND}`"
        ) from exc
    return StoredReport(version, model_id, summary, report_json, raw_html)


def _read_file(name: str, folder_fd: int, model_id: str, missing: str) -> bytes:
    """Read one file of a report folder opened as ``folder_fd``."""
    try:
        # With O_NONBLOCK, opening a FIFO planted in the store returns at once instead of
        # blocking the call's thread until a writer appears. The file type is checked next.
        # O_NOFOLLOW refuses a symbolic link, which could point at a weight or beat file.
        file_fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW, dir_fd=folder_fd)
    except FileNotFoundError as exc:
        raise ReportNotFoundError(missing) from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ModelStoreError(
                f"{name} of the quality report of model {model_id} is a symbolic link; "
                f"remove it and rebuild the report with `{REPORT_COMMAND}`"
            ) from exc
        raise ModelStoreError(
            f"{name} of the quality report of model {model_id} cannot be opened: {exc.strerror}"
        ) from exc
    status = os.fstat(file_fd)
    if not stat.S_ISREG(status.st_mode) or status.st_nlink != 1:
        os.close(file_fd)
        # A report file is written to a new name and renamed, so it has one link. A second
        # link could be the store's privacy index or a weight file under the report's name.
        problem = "not a regular file" if status.st_nlink == 1 else "a file with other links"
        raise ModelStoreError(
            f"{name} of the quality report of model {model_id} is {problem}; "
            f"remove it and rebuild the report with `{REPORT_COMMAND}`"
        )
    with os.fdopen(file_fd, "rb") as handle:
        try:
            return handle.read()
        except OSError as exc:
            raise ModelStoreError(
                f"{name} of the quality report of model {model_id} cannot be read: {exc.strerror}"
            ) from exc
