"""GetQualityReport over a real loopback server: a stored report, its absence and its limits."""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from appliance.client import ApplianceClient
from appliance.config import DEFAULT_DATA_DIR
from appliance.errors import ModelStoreError
from appliance.quality.baselines import RealNvpConfig
from appliance.quality.classifier import ClassifierConfig
from appliance.quality.evaluate import QualityConfig
from appliance.quality.report import build_report, embedded_html
from appliance.report_store import REPORTS_DIR, attach_report, metric_rows
from appliance.server import ApplianceServer, ServeConfig, create_server
from appliance.store import CURRENT_FILE, VERSIONS_DIR, load_current, sha256_of
from appliance.v1 import appliance_pb2 as pb

pytestmark = pytest.mark.slow

CALL_TIMEOUT_S = 60.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DATA_URI = 'src="data:image/png;base64,'
# Sample sizes small enough for a test; the figures are real but noisy.
SMALL_QUALITY = QualityConfig(
    train_per_class=40,
    rebalance_target=40,
    eval_per_class=40,
    mmd_per_class=30,
    permutations=20,
    morphology_per_class=5,
    classifier=ClassifierConfig(steps=40, batch_size=32),
)
SMALL_REALNVP = RealNvpConfig(dims=8, transforms=2, hidden_features=32, steps=20)


@pytest.fixture(scope="module")
def store(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the fixture store, so that attached reports stay out of the shared one."""
    copy = tmp_path_factory.mktemp("report-store") / "store"
    shutil.copytree(model_store, copy)
    return copy


@pytest.fixture(scope="module")
def version_id(store: Path) -> str:
    return (store / CURRENT_FILE).read_text().strip()


@pytest.fixture(scope="module")
def built(store: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """A real report of the served model and both baselines: (figures, folder of the PNGs)."""
    out = tmp_path_factory.mktemp("report-out")
    summary = build_report(store, DEFAULT_DATA_DIR, out, SMALL_QUALITY, realnvp=SMALL_REALNVP)
    return summary, out


@pytest.fixture(scope="module")
def server(store: Path) -> Iterator[ApplianceServer]:
    running = create_server(store, ServeConfig(port=0, grace_s=1.0, drain_s=0.0))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server: ApplianceServer) -> Iterator[ApplianceClient]:
    with ApplianceClient(f"127.0.0.1:{server.port}", timeout_s=CALL_TIMEOUT_S) as connected:
        yield connected


def _attach(store: Path, built: tuple[dict[str, Any], Path]) -> Path:
    summary, out = built
    return attach_report(store, summary, embedded_html(summary, out))


def _detach(store: Path) -> None:
    shutil.rmtree(store / REPORTS_DIR, ignore_errors=True)


def _rpc_error(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_missing_report_fails_precondition(store: Path, client: ApplianceClient) -> None:
    _detach(store)
    model_id = client.model_info().model_id
    error = _rpc_error(client.quality_report)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert model_id in error.details()
    assert "python -m appliance report" in error.details()
    assert str(store) not in error.details()


def test_reply_matches_stored_report(
    store: Path, version_id: str, built: tuple[dict[str, Any], Path], client: ApplianceClient
) -> None:
    summary, _ = built
    folder = _attach(store, built)
    assert folder == store / REPORTS_DIR / version_id

    reply = client.quality_report()
    assert reply.report_json == (folder / "quality.json").read_text()
    assert json.loads(reply.report_json) == summary
    assert reply.model_id == client.model_info().model_id
    assert reply.model_id == summary["model_id"]
    assert reply.created_at == summary["created_at"]
    assert reply.temperature == summary["settings"]["temperature"]
    assert reply.margin == summary["settings"]["margin"]
    assert reply.matches_training_records is False  # the bundled records have a SPLITS file

    rows = metric_rows(summary)
    assert [g.name for g in reply.generators] == ["appliance", "pca_gaussian", "realnvp"]
    assert [g.name for g in reply.generators] == [name for name, _ in rows]
    fields = {
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
    for generator, (name, figures) in zip(reply.generators, rows, strict=True):
        for field_name, key in fields.items():
            if figures[key] is None:
                assert not generator.HasField(field_name), (name, field_name)
            else:
                assert getattr(generator, field_name) == figures[key], (name, field_name)

    appliance = reply.generators[0]
    generator_json = summary["generators"]["appliance"]
    assert appliance.mia_auroc == generator_json["privacy"]["mia_auroc"]
    assert appliance.discriminative == generator_json["discriminative"]["overall"]

    trtr = {k: v for k, v in summary["trtr_f1"].items() if k != "macro" and v is not None}
    assert dict(reply.trtr_f1) == trtr
    assert reply.trtr_macro_f1 == summary["trtr_f1"]["macro"]


def test_page_embeds_png_figures(
    store: Path, built: tuple[dict[str, Any], Path], client: ApplianceClient
) -> None:
    summary, _ = built
    _attach(store, built)
    reply = client.quality_report(include_html=True)
    assert reply.report_html_bytes == len(reply.report_html)
    page = reply.report_html.decode("utf-8")
    assert page.count(DATA_URI) == len(summary["figures"])
    for name in summary["figures"]:
        assert f'src="{name}"' not in page
        assert f'alt="{name}"' in page
    first = page.index(DATA_URI) + len(DATA_URI)
    encoded = page[first : page.index('"', first)]
    assert base64.b64decode(encoded).startswith(PNG_SIGNATURE)


def test_include_html_false_omits_page(
    store: Path, built: tuple[dict[str, Any], Path], client: ApplianceClient
) -> None:
    folder = _attach(store, built)
    reply = client.quality_report(include_html=False)
    assert reply.report_html == b""
    assert reply.report_html_bytes == (folder / "quality.html").stat().st_size
    assert json.loads(reply.report_json) == built[0]
    assert len(reply.generators) == 3


def test_report_of_other_model_not_returned(
    store: Path, version_id: str, built: tuple[dict[str, Any], Path], client: ApplianceClient
) -> None:
    folder = _attach(store, built)
    served_id = built[0]["model_id"]
    stored = json.loads((folder / "quality.json").read_text())
    stored["model_id"] = "0123456789abcdef"
    (folder / "quality.json").write_text(json.dumps(stored))
    error = _rpc_error(client.quality_report)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert served_id in error.details()
    assert "0123456789abcdef" in error.details()
    # A report stored under another version is never read for the served one.
    folder = _attach(store, built)
    folder.rename(folder.with_name(f"{version_id}-other"))
    error = _rpc_error(client.quality_report)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "has no quality report" in error.details()


def _write_report(store: Path, version_id: str, summary: dict[str, Any]) -> None:
    """Write ``summary`` and a minimal page as the stored report of ``version_id``."""
    folder = store / REPORTS_DIR / version_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "quality.json").write_text(json.dumps(summary))
    (folder / "quality.html").write_text("<html></html>")


def _summary(model_id: str, figures: dict[str, Any]) -> dict[str, Any]:
    """Return a stored report of ``model_id`` whose one generator has ``figures``."""
    return {
        "model_id": model_id,
        "created_at": "2026-01-01T00:00:00+00:00",
        "settings": {"temperature": 1.0, "margin": 0.1},
        "trtr_f1": {"N": 0.9, "macro": 0.5},
        "protocol": {"matches_training_records": False},
        "generators": {"appliance": figures},
    }


def _figures(value: Any) -> dict[str, Any]:
    """Headline figures of one generator, every one set to ``value``."""
    return {
        "tstr_f1": {"macro": value},
        "tstr_trtr": value,
        "rebalancing_gain": {"S": value, "F": value},
        "discriminative": {"overall": value},
        "mean_mmd2_waveform": value,
        "mean_mmd2_spectrum": value,
        "frechet": value,
        "privacy": {
            "dcr_synthetic_median": value,
            "fraction_below_holdout_p05": value,
            "mia_auroc": value,
            "mia_auroc_unseen": value,
        },
    }


@pytest.mark.parametrize(
    "damage",
    [
        {"generators": {"appliance": _figures("high")}},
        {"generators": {"appliance": _figures({"value": 0.5})}},
        {"settings": {"temperature": "warm"}},
        {"settings": [1.0]},
        {"trtr_f1": [0.5]},
        {"protocol": "de Chazal"},
    ],
    ids=[
        "string figure",
        "object figure",
        "string setting",
        "settings list",
        "f1 list",
        "protocol text",
    ],
)
def test_wrongly_typed_report_fails_precondition(
    store: Path, version_id: str, client: ApplianceClient, damage: dict[str, Any]
) -> None:
    model_id = client.model_info().model_id
    summary: dict[str, Any] = {**_summary(model_id, _figures(0.5)), **damage}
    _write_report(store, version_id, summary)
    try:
        error = _rpc_error(client.quality_report)
    finally:
        _detach(store)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
    assert model_id in error.details()
    assert "python -m appliance report" in error.details()
    assert str(store) not in error.details()
    assert client.model_info().model_id == model_id


def test_report_without_figures_names_the_entry(
    store: Path, version_id: str, client: ApplianceClient
) -> None:
    model_id = client.model_info().model_id
    summary = _summary(model_id, _figures(0.5))
    del summary["generators"]
    _write_report(store, version_id, summary)
    try:
        error = _rpc_error(client.quality_report)
    finally:
        _detach(store)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
    assert "lacks its headline figures (no 'generators' entry)" in error.details()
    assert "KeyError" not in error.details()


@pytest.mark.parametrize("damage", ["fifo", "folder", "deep nesting", "huge integer"])
def test_damaged_report_file_fails_precondition(
    store: Path, version_id: str, client: ApplianceClient, damage: str
) -> None:
    model_id = client.model_info().model_id
    folder = store / REPORTS_DIR / version_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "quality.html").write_text("<html></html>")
    report = folder / "quality.json"
    if damage == "fifo":
        # Opening a FIFO for reading blocks until a writer appears, unless opened non-blocking.
        os.mkfifo(report)
    elif damage == "folder":
        report.mkdir()
    elif damage == "deep nesting":
        report.write_text("[" * 100_000 + "]" * 100_000)
    else:
        # Within Python's digit limit, but beyond the range of a float.
        report.write_text(json.dumps(_summary(model_id, _figures(10**400))))
    try:
        error = _rpc_error(client.quality_report)
    finally:
        _detach(store)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
    assert model_id in error.details()
    assert str(store) not in error.details()
    assert client.model_info().model_id == model_id


@pytest.mark.parametrize("link", ["symbolic link", "hard link", "linked folder"])
def test_linked_report_file_is_not_returned(
    store: Path, version_id: str, client: ApplianceClient, link: str
) -> None:
    # A link under the report's name could hand out a weight or the training beats.
    model_id = client.model_info().model_id
    secret = store / VERSIONS_DIR / version_id / "lead_check.npz"
    folder = store / REPORTS_DIR / version_id
    if link == "linked folder":
        elsewhere = store.parent / "elsewhere-report"
        elsewhere.mkdir(exist_ok=True)
        (elsewhere / "quality.json").write_text(json.dumps(_summary(model_id, _figures(0.5))))
        (elsewhere / "quality.html").write_text("<!doctype html><html></html>")
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.symlink_to(elsewhere, target_is_directory=True)
        expected = "is a link or not a folder"
    else:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "quality.json").write_text(json.dumps(_summary(model_id, _figures(0.5))))
        if link == "symbolic link":
            (folder / "quality.html").symlink_to(secret)
            expected = "is a symbolic link"
        else:
            os.link(secret, folder / "quality.html")
            expected = "is a file with other links"
    try:
        error = _rpc_error(lambda: client.quality_report(include_html=True))
    finally:
        _detach(store)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
    assert expected in error.details()
    assert str(store) not in error.details()
    assert client.model_info().model_id == model_id


def test_attach_rejects_other_model_id(store: Path, built: tuple[dict[str, Any], Path]) -> None:
    summary, out = built
    wrong = {**summary, "model_id": "0123456789abcdef"}
    with pytest.raises(ModelStoreError, match="0123456789abcdef"):
        attach_report(store, wrong, embedded_html(summary, out))
    for bad_version in ("../versions", ".hidden", ""):
        with pytest.raises(ModelStoreError, match="invalid"):
            attach_report(store, {**summary, "model_version": bad_version}, "<html></html>")


def test_attach_keeps_version_verified(
    store: Path, version_id: str, built: tuple[dict[str, Any], Path]
) -> None:
    version_dir = store / "versions" / version_id
    before = {p.name: sha256_of(p) for p in version_dir.iterdir()}
    _attach(store, built)
    _attach(store, built)  # replaces the earlier report
    after = {p.name: sha256_of(p) for p in version_dir.iterdir()}
    assert after == before
    assert load_current(store).path == version_dir
    temporary = [p.name for p in (store / REPORTS_DIR).iterdir() if p.name.startswith(".")]
    assert temporary == []


def test_page_over_message_limit_is_rejected(
    store: Path, built: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    folder = _attach(store, built)
    json_bytes = (folder / "quality.json").stat().st_size
    html_bytes = (folder / "quality.html").stat().st_size
    limit = json_bytes + 4096
    assert html_bytes > limit
    running = create_server(
        store, ServeConfig(port=0, max_message_bytes=limit, grace_s=1.0, drain_s=0.0)
    )
    try:
        with ApplianceClient(f"127.0.0.1:{running.port}", timeout_s=CALL_TIMEOUT_S) as small:
            error = _rpc_error(small.quality_report)
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert str(limit) in error.details()
            assert str(html_bytes) in error.details()
            assert "include_html=false" in error.details()
            reply = small.quality_report(include_html=False)
            assert reply.report_html_bytes == html_bytes
        address = f"127.0.0.1:{running.port}"
        cli = _run_cli("quality-report", "--address", address, "--out", str(tmp_path / "out"))
        assert cli.returncode == 2, cli.stderr
        assert "RESOURCE_EXHAUSTED" in cli.stderr
        assert "Rerun with --no-html to fetch quality.json only" in cli.stderr
        assert "Traceback" not in cli.stderr
    finally:
        running.stop()


def test_call_logged_once(
    store: Path,
    built: tuple[dict[str, Any], Path],
    client: ApplianceClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="appliance")
    _attach(store, built)
    _, call = client.stub.GetQualityReport.with_call(
        pb.GetQualityReportRequest(include_html=True),
        timeout=CALL_TIMEOUT_S,
        metadata=(("x-request-id", "log-report"),),
    )
    assert ("x-request-id", "log-report") in call.trailing_metadata()
    lines = [r.getMessage() for r in caplog.records if "request_id=log-report " in r.getMessage()]
    assert len(lines) == 1, lines
    assert "rpc=GetQualityReport" in lines[0]
    assert "status=OK" in lines[0]
    assert "include_html=True" in lines[0]


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_cli_writes_page_and_json(
    store: Path,
    built: tuple[dict[str, Any], Path],
    server: ApplianceServer,
    tmp_path: Path,
) -> None:
    folder = _attach(store, built)
    address = f"127.0.0.1:{server.port}"
    result = _run_cli("quality-report", "--address", address, "--out", str(tmp_path / "fetched"))
    assert result.returncode == 0, result.stderr
    written = tmp_path / "fetched"
    assert (written / "quality.json").read_text() == (folder / "quality.json").read_text()
    assert (written / "quality.html").read_bytes() == (folder / "quality.html").read_bytes()
    assert built[0]["model_id"] in result.stdout
    assert "warning: this model was trained on other records" in result.stderr


def test_cli_without_report_exits_2(store: Path, server: ApplianceServer, tmp_path: Path) -> None:
    _detach(store)
    address = f"127.0.0.1:{server.port}"
    result = _run_cli("quality-report", "--address", address, "--out", str(tmp_path / "fetched"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "FAILED_PRECONDITION" in result.stderr
    assert not (tmp_path / "fetched").exists()
