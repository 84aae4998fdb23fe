"""The quality report: one HTML page with PNG figures and the same numbers as JSON.

The page shows aggregate figures only. Real beats appear as the per-class mean and percentile
bands, never as a single beat, and only for classes with at least
``appliance.outputs.MIN_REAL_BEATS_PER_CLASS`` real beats, so the report can leave the
appliance.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import textwrap
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from appliance.classes import AAMI_CLASSES
from appliance.config import DataConfig
from appliance.corrupt import CORRUPTIONS, corrupt
from appliance.dataset import assign_splits, find_records
from appliance.engine import Engine
from appliance.outputs import real_band_withheld_note, real_statistics_allowed
from appliance.quality.baselines import (
    ApplianceGenerator,
    PcaGaussian,
    RealNvpBaseline,
    RealNvpConfig,
)
from appliance.quality.evaluate import Evaluation, QualityConfig, evaluate_generators
from appliance.quality.protocol import (
    BeatGenerator,
    LabelledBeats,
    ProtocolData,
    load_protocol,
    recorded_training,
)
from appliance.report_store import (
    PRIVACY_COLUMNS,
    REPORT_HTML,
    REPORT_JSON,
    metric_rows,
    mismatch_warning,
    report_warnings,
)
from appliance.store import load_current

logger = logging.getLogger(__name__)

# Synthetic beats drawn per class panel, and the real percentile band around the mean.
BEATS_PER_PANEL = 12
# Characters per title line of a beats panel: about the width of a 3.2-inch panel at 8 points.
TITLE_CHARS = 40
BAND_PERCENTILES = (5.0, 95.0)
SCORED_BEATS = 1000
GOALS = {
    "tstr_trtr": ">= 1.2",
    "discriminative": "<= 0.35 (target 0.1)",
    "mean_mmd2_waveform": "<= 0.002",
    "fraction_below_holdout_p05": "<= 0.05",
    "mia_auroc": "<= 0.55",
}


def build_report(
    store: Path,
    data_dir: Path,
    out_dir: Path,
    config: QualityConfig | None = None,
    realnvp: RealNvpConfig | None = None,
    baselines: bool = True,
    temperature: float = 1.0,
    margin: float | None = None,
    cache_dir: str = "",
) -> dict[str, Any]:
    """Evaluate the current model of a store and both baselines, and write the report.

    Arguments:
        store: Model store whose current version was trained on ``data_dir``.
        data_dir: MIT-BIH folder with every DS1 and DS2 record.
        out_dir: Folder for ``quality.html``, ``quality.json`` and the PNG figures.
        config: Sample sizes and budgets of the evaluation.
        realnvp: Size and budget of the RealNVP baseline.
        baselines: Also fit and score the PCA Gaussian and RealNVP baselines.
        temperature: Latent temperature of the appliance's generation.
        margin: Pertinence margin of generation; ``None`` uses the model's default.
        cache_dir: Ingest cache folder; empty disables the cache.

    Returns:
        The figures written to ``quality.json``.

    Raises:
        ModelStoreError: If the store has no valid current version.
        DataError: If the folder lacks the records of the protocol.
    """
    settings = config or QualityConfig()
    version = load_current(Path(store))
    engine = Engine(version)
    data_config = _data_config(version.manifest, cache_dir)
    data = load_protocol(Path(data_dir), data_config, recorded_training(version.manifest))
    matches = _protocol_matches_training(version.manifest, Path(data_dir), data_config)
    appliance = ApplianceGenerator(engine, temperature=temperature, margin=margin)
    generators: list[BeatGenerator] = [appliance]
    if baselines:
        # The baselines learn from the same beats as the model, so that the membership figures
        # of all three generators have the same members.
        generators.append(PcaGaussian(data.members))
        generators.append(RealNvpBaseline(data.members, realnvp, seed=settings.seed))
    evaluation = evaluate_generators(data, generators, settings)
    scores = _score_sets(engine, data, appliance, settings.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = write_figures(out_dir, data, evaluation, scores)
    # A report with fewer generators leaves an earlier report's other figures in place.
    stale = sorted(p.name for p in out_dir.glob("beats_*.png") if p.name not in figures)
    if stale:
        logger.warning(
            "figures of an earlier report stay in out_dir=%s files=%s; this report does not "
            "show them, so remove them or pass another --out",
            out_dir,
            ",".join(stale),
        )
    summary = {
        "model_id": version.manifest.get("model_id"),
        "model_version": version.manifest.get("version"),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "protocol": {
            "split": "de-chazal",
            "fit_counts": data.fit.counts(),
            "member_counts": data.members.counts(),
            "unseen_counts": data.unseen.counts(),
            "holdout_counts": data.holdout.counts(),
            "test_counts": data.test.counts(),
            "matches_training_records": matches,
            "missing_records": list(data.missing_records),
        },
        "settings": {
            "temperature": temperature,
            "margin": appliance.margin,
            **_plain(settings.__dict__),
        },
        "goals": GOALS,
        **evaluation.summary(),
        "score_quantiles": {name: _quantiles(values) for name, values in scores.items()},
        "figures": figures,
    }
    summary = _plain(summary)
    (out_dir / REPORT_JSON).write_text(json.dumps(summary, indent=2, sort_keys=True))
    (out_dir / REPORT_HTML).write_text(render_html(summary))
    logger.info("quality report written out_dir=%s model_id=%s", out_dir, summary["model_id"])
    return summary


def _data_config(manifest: dict[str, Any], cache_dir: str) -> DataConfig:
    contract = manifest["data"]
    return DataConfig(
        fs_hz=float(contract["fs_hz"]),
        window_samples=int(contract["window_samples"]),
        pre_r_samples=int(contract["pre_r_samples"]),
        leads=tuple(contract.get("lead_preference", contract["leads"])),
        highpass_hz=float(contract.get("highpass_hz", DataConfig.highpass_hz)),
        split="de-chazal",
        cache_dir=cache_dir,
    )


def _protocol_matches_training(
    manifest: dict[str, Any], data_dir: Path, settings: DataConfig
) -> bool | None:
    """Check that the model trained on the protocol's DS1 training records (None if unknown)."""
    trained = manifest["data"].get("records")
    if not trained:
        return None
    trained_on = {r for r, split in trained.items() if split == "train"}
    expected = assign_splits(find_records(data_dir), data_dir, settings)
    protocol_fit = {r for r, split in expected.items() if split == "train"}
    matches = trained_on == protocol_fit
    if not matches:
        logger.warning(
            "model was trained on other records than the protocol's fit set data_dir=%s "
            "trained=%s protocol=%s; the privacy figures do not describe this model",
            data_dir,
            ",".join(sorted(trained_on)),
            ",".join(sorted(protocol_fit)),
        )
    return matches


def _score_sets(
    engine: Engine, data: ProtocolData, appliance: ApplianceGenerator, seed: int
) -> dict[str, np.ndarray]:
    """Pertinence scores of real hold-out, synthetic and corrupted beats."""
    rng = np.random.default_rng(seed)
    known = np.isin(data.holdout.labels, engine.classes_known)
    index = np.flatnonzero(known)
    index = rng.choice(index, size=min(SCORED_BEATS, index.size), replace=False)
    real_mv, labels = data.holdout_mv[index], data.holdout.labels[index]
    scores = {"real": engine.score(real_mv / engine.scale_mv, labels).scores}
    synthetic = [s for s in appliance.scores if s.size]
    scores["synthetic"] = np.concatenate(synthetic) if synthetic else np.zeros(0)
    per_kind = max(1, SCORED_BEATS // len(CORRUPTIONS))
    corrupted = []
    for kind in CORRUPTIONS:
        beats = corrupt(real_mv[:per_kind], kind, data.fs_hz, rng)
        corrupted.append(engine.score(beats / engine.scale_mv, labels[:per_kind]).scores)
    scores["corrupted"] = np.concatenate(corrupted)
    return scores


def _quantiles(values: np.ndarray) -> dict[str, float | None]:
    if values.size == 0:
        return {"p05": None, "median": None, "p95": None}
    p05, median, p95 = np.quantile(values, [0.05, 0.5, 0.95])
    return {"p05": float(p05), "median": float(median), "p95": float(p95)}


def write_figures(
    out_dir: Path, data: ProtocolData, evaluation: Evaluation, scores: dict[str, np.ndarray]
) -> list[str]:
    """Write the PNG figures and return their file names."""
    names = []
    for name, figures in evaluation.generators.items():
        names.append(_beats_figure(out_dir / f"beats_{name}.png", name, data, figures.synthetic))
    names.append(_balance_figure(out_dir / "class_balance.png", data, evaluation))
    names.append(_histogram_figure(out_dir / "scores.png", scores, "pertinence score"))
    distances = {"hold-out": evaluation.dcr_holdout}
    distances.update({n: g.dcr_synthetic for n, g in evaluation.generators.items()})
    names.append(
        _histogram_figure(
            out_dir / "dcr.png", distances, "distance to closest training beat (RMS, z-units)"
        )
    )
    return names


def _beats_figure(path: Path, name: str, data: ProtocolData, synthetic: Any) -> str:
    figure = beats_figure(name, data, synthetic)
    figure.savefig(path, dpi=80)
    return path.name


def beats_figure(name: str, data: ProtocolData, synthetic: LabelledBeats) -> Figure:
    """Draw synthetic beats over the real per-class mean and band of the fit set.

    A class with fewer than ``appliance.outputs.MIN_REAL_BEATS_PER_CLASS`` real beats shows its
    synthetic beats only, and its panel title states why the real band is left out.
    """
    time_ms = (np.arange(data.fit.beats.shape[2]) - data.pre_r_samples) * 1000.0 / data.fs_hz
    figure = Figure(figsize=(3.2 * len(AAMI_CLASSES), 3.0))
    axes = figure.subplots(1, len(AAMI_CLASSES), sharey=True)
    for class_index, (ax, class_name) in enumerate(zip(axes, AAMI_CLASSES, strict=True)):
        real = data.fit.of_class(class_index)[:, 0, :]
        fake = synthetic.of_class(class_index)[:BEATS_PER_PANEL, 0, :]
        real_band_drawn = real_statistics_allowed(real.shape[0])
        if real_band_drawn:
            low, high = np.percentile(real, BAND_PERCENTILES, axis=0)
            ax.fill_between(
                time_ms,
                low,
                high,
                color="0.8",
                label=f"real {BAND_PERCENTILES[0]:g}-{BAND_PERCENTILES[1]:g}%",
            )
            ax.plot(time_ms, real.mean(axis=0), color="black", lw=2, label="real mean")
        for beat in fake:
            ax.plot(time_ms, beat, color="tab:red", lw=0.6, alpha=0.6)
        title = f"{class_name}: {real.shape[0]} real, {len(fake)} synthetic shown"
        if not real_band_drawn:
            # Wrapped to the panel's width, so that the last panel's title is not cut off.
            title += "\n" + textwrap.fill(real_band_withheld_note(real.shape[0]), TITLE_CHARS)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("time from R (ms)")
    axes[0].set_ylabel("z-normalised amplitude")
    # The legend goes on the first panel with a real band, because only the band is labelled.
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower left", fontsize=7)
            break
    figure.suptitle(f"{name}: synthetic beats (red) over real per-class mean and band")
    figure.tight_layout()
    return figure


def _balance_figure(path: Path, data: ProtocolData, evaluation: Evaluation) -> str:
    figure = Figure(figsize=(7, 3.5))
    ax = figure.subplots()
    sets = {"real fit": data.fit.counts(), "real TRTR": evaluation.real_train.counts()}
    for name, figures in evaluation.generators.items():
        sets[f"{name} + top-up"] = {
            c: figures.metrics["synthetic_counts"][c] + figures.metrics["top_up_counts"][c]
            for c in AAMI_CLASSES
        }
    width = 0.8 / len(sets)
    for i, (name, counts) in enumerate(sets.items()):
        positions = np.arange(len(AAMI_CLASSES)) + i * width
        ax.bar(positions, [max(counts[c], 0.5) for c in AAMI_CLASSES], width, label=name)
    ax.set_xticks(np.arange(len(AAMI_CLASSES)) + 0.4 - width / 2, AAMI_CLASSES)
    ax.set_yscale("log")
    ax.set_ylabel("beats")
    ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    return path.name


def _histogram_figure(path: Path, sets: dict[str, np.ndarray], xlabel: str) -> str:
    figure = Figure(figsize=(7, 3.5))
    ax = figure.subplots()
    present = [v for v in sets.values() if v.size]
    pooled = np.concatenate(present) if present else np.zeros(1)
    edges = np.histogram_bin_edges(pooled, bins=40).tolist()
    for name, values in sets.items():
        if values.size:
            ax.hist(
                values,
                bins=edges,
                histtype="step",
                density=True,
                lw=1.5,
                label=f"{name} ({values.size})",
            )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    return path.name


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


def render_html(summary: dict[str, Any], image_sources: Mapping[str, str] | None = None) -> str:
    """Render the report page from the JSON figures.

    Arguments:
        summary: The figures of ``quality.json``.
        image_sources: ``src`` of each figure by file name; a figure not listed is referenced
            by its file name, relative to the page.
    """
    sources = image_sources or {}
    rows = metric_rows(summary)
    columns = list(rows[0][1]) if rows else []
    head = "".join(
        f"<th>{html.escape(c)}<br><small>{html.escape(GOALS.get(c, ''))}</small></th>"
        for c in columns
    )
    mismatch = mismatch_warning(summary["protocol"].get("matches_training_records"))

    def cell(column: str, value: Any) -> str:
        if mismatch is not None and column in PRIVACY_COLUMNS:
            return "not applicable"
        return _cell(value)

    body = "".join(
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(f"<td>{cell(c, v)}</td>" for c, v in values.items())
        + "</tr>"
        for name, values in rows
    )
    banner = "".join(
        f"<p class='warning'><strong>Warning:</strong> {html.escape(warning)}.</p>"
        for warning in report_warnings(summary)
    )
    f1_head = "".join(f"<th>{c}</th>" for c in (*AAMI_CLASSES, "macro"))
    f1_rows = [("TRTR (real)", summary["trtr_f1"])]
    for name, m in summary["generators"].items():
        f1_rows += [(f"TSTR {name}", m["tstr_f1"]), (f"real + {name} top-up", m["rebalanced_f1"])]
    f1_body = "".join(
        f"<tr><td>{html.escape(n)}</td>"
        + "".join(f"<td>{_cell(f1[c])}</td>" for c in (*AAMI_CLASSES, "macro"))
        + "</tr>"
        for n, f1 in f1_rows
    )
    images = "".join(
        f'<p><img src="{html.escape(sources.get(f, f))}" alt="{html.escape(f)}"></p>'
        for f in summary["figures"]
    )
    counts = html.escape(json.dumps(summary["protocol"]))
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Synthetic ECG quality</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #999;padding:3px 6px;text-align:right}"
        ".warning{border:2px solid #b00;padding:6px;background:#fee}</style></head><body>"
        f"<h1>Synthetic ECG quality report</h1>{banner}<p>Model {_cell(summary['model_id'])}. "
        "Beats z-normalised per beat; classifiers tested on DS2 of the de Chazal split; "
        "Q is reported but not scored.</p>"
        f"<h2>Metrics</h2><table><tr><th>generator</th>{head}</tr>{body}</table>"
        f"<h2>F1 on DS2</h2><table><tr><th>training set</th>{f1_head}</tr>{f1_body}</table>"
        f"<h2>Figures</h2>{images}<h2>Protocol</h2><pre>{counts}</pre>"
        "<p>Every figure, per class included, is in quality.json.</p></body></html>"
    )


def embedded_html(summary: dict[str, Any], figures_dir: Path) -> str:
    """Render the report page with each PNG figure of ``figures_dir`` embedded as a data URI.

    The page needs no other file, so it can be stored in the model store and sent over gRPC.
    """
    sources = {}
    for name in summary["figures"]:
        encoded = base64.b64encode((Path(figures_dir) / name).read_bytes()).decode("ascii")
        sources[name] = f"data:image/png;base64,{encoded}"
    return render_html(summary, sources)


def _plain(value: Any) -> Any:
    """Convert numpy scalars and nested containers to JSON-ready values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "__dataclass_fields__"):
        return _plain(dict(value.__dict__))
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
