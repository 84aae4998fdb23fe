"""Reading one WFDB record into beat windows: lead choice, filtering, resampling, windowing."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import wfdb
from scipy import signal

from appliance.classes import AAMI_CLASSES, BEAT_SYMBOL_TO_AAMI, NON_BEAT_SYMBOLS
from appliance.config import DataConfig
from appliance.errors import RecordError

logger = logging.getLogger(__name__)

HIGHPASS_ORDER = 2
# Largest denominator of the rational resampling factor; keeps polyphase filters small.
RESAMPLE_MAX_DENOMINATOR = 1000


@dataclass
class RecordBeats:
    """Beat windows of one record.

    Attributes:
        record: Record name relative to the data folder.
        windows: Beats, shape (beats, leads, window_samples), in mV after baseline removal.
        labels: AAMI class index of each beat, shape (beats,).
        r_samples: R-peak positions at the model rate, shape (beats,).
        fs_hz: Sampling rate of the chosen lead in the record, before resampling.
        leads: Lead names used, one per window channel.
        beat_source: ``annotations:<ext>`` or ``detector:xqrs``.
        skipped: Counts of beats skipped, by reason.
    """

    record: str
    windows: np.ndarray
    labels: np.ndarray
    r_samples: np.ndarray
    fs_hz: float
    leads: list[str]
    beat_source: str
    skipped: dict[str, int] = field(default_factory=dict)


def choose_leads(record: str, names: list[str], config: DataConfig) -> list[int]:
    """Return the channel indices of the configured leads, first ``n_leads`` found in order.

    Raises:
        RecordError: If the record has fewer of the configured leads than ``n_leads``.
    """
    chosen: list[int] = []
    for lead in config.leads:
        if lead in names and names.index(lead) not in chosen:
            chosen.append(names.index(lead))
        if len(chosen) == config.n_leads:
            return chosen
    raise RecordError(
        record,
        f"has leads {names} but none (or too few) of the configured leads "
        f"{list(config.leads)}; pass --leads with one of its lead names",
    )


def _read_signal(path: Path, record: str, channels: list[int]) -> tuple[np.ndarray, float]:
    """Read the chosen channels in mV at their own rate, shape (samples, leads)."""
    header = wfdb.rdheader(str(path))
    gains = getattr(header, "adc_gain", None)
    if gains is not None:
        for channel in channels:
            if gains[channel] == 0:
                raise RecordError(record, f"signal {channel} has ADC gain 0 (uncalibrated)")
    samples_per_frame = getattr(header, "samps_per_frame", None) or [1] * header.n_sig
    spf = {samples_per_frame[c] for c in channels}
    if len(spf) != 1:
        raise RecordError(record, "chosen leads have different sampling rates; choose one lead")
    if spf == {1}:
        data = wfdb.rdrecord(str(path), channels=channels)
        values = np.asarray(data.p_signal, dtype=np.float64)
        fs_hz = float(data.fs)
    else:
        data = wfdb.rdrecord(str(path), channels=channels, smooth_frames=False)
        values = np.stack([np.asarray(s, dtype=np.float64) for s in data.e_p_signal], axis=1)
        fs_hz = float(data.fs) * spf.pop()
    return values, fs_hz


def _fill_nan(values: np.ndarray) -> np.ndarray:
    """Linearly interpolate NaN runs so that filters do not spread them, shape kept."""
    filled = values.copy()
    for lead in range(values.shape[1]):
        column = filled[:, lead]
        bad = ~np.isfinite(column)
        if bad.all():
            column[:] = 0.0
        elif bad.any():
            index = np.arange(column.size)
            column[bad] = np.interp(index[bad], index[~bad], column[~bad])
    return filled


def preprocess(values: np.ndarray, fs_hz: float, config: DataConfig) -> np.ndarray:
    """Remove baseline wander and resample to the model rate.

    Arguments:
        values: Signal, shape (samples, leads), in mV, without NaN.
        fs_hz: Sampling rate of ``values``.
        config: Data settings (``highpass_hz``, ``fs_hz``).

    Returns:
        Signal at ``config.fs_hz``, shape (samples', leads), in mV.
    """
    sos = signal.butter(HIGHPASS_ORDER, config.highpass_hz, btype="highpass", fs=fs_hz, output="sos")
    filtered = signal.sosfiltfilt(sos, values, axis=0)
    if abs(fs_hz - config.fs_hz) < 1e-6:
        return filtered
    ratio = Fraction(config.fs_hz / fs_hz).limit_denominator(RESAMPLE_MAX_DENOMINATOR)
    # resample_poly applies a Kaiser-window anti-aliasing low-pass filter.
    return signal.resample_poly(filtered, ratio.numerator, ratio.denominator, axis=0)


def _beat_positions(
    path: Path, record: str, fs_hz: float, values: np.ndarray, config: DataConfig
) -> tuple[np.ndarray, list[str], str]:
    """Return R-peak positions at ``fs_hz`` and their symbols, from annotations or a detector."""
    annotation_file = path.with_name(f"{path.name}.{config.annotation_extension}")
    if annotation_file.exists():
        try:
            annotation = wfdb.rdann(str(path), config.annotation_extension)
        except Exception as exc:  # wfdb raises bare ValueError, IndexError and others
            raise RecordError(record, f"annotation file cannot be read: {exc}") from exc
        annotation_fs = float(annotation.fs) if annotation.fs else fs_hz
        positions = np.asarray(annotation.sample, dtype=np.float64) * (fs_hz / annotation_fs)
        return (
            np.round(positions).astype(np.int64),
            list(annotation.symbol),
            f"annotations:{config.annotation_extension}",
        )
    from wfdb import processing

    detector = processing.XQRS(sig=values[:, 0], fs=fs_hz)
    detector.detect(verbose=False)
    positions = np.asarray(detector.qrs_inds, dtype=np.int64)
    return positions, ["Q"] * positions.size, "detector:xqrs"


def read_record(path: Path, record: str, config: DataConfig) -> RecordBeats:
    """Read one record and cut beat windows around its R peaks.

    Arguments:
        path: Record path without extension.
        record: Record name used in messages and reports.
        config: Data settings.

    Returns:
        The record's beats, in mV at ``config.fs_hz``.

    Raises:
        RecordError: If the record cannot be used; the reason says why.
    """
    try:
        header = wfdb.rdheader(str(path))
    except Exception as exc:  # wfdb raises ValueError, IndexError and others on bad headers
        raise RecordError(record, f"header cannot be read: {exc}") from exc
    names = [str(name) for name in (header.sig_name or [])]
    channels = choose_leads(record, names, config)
    try:
        values, fs_hz = _read_signal(path, record, channels)
    except RecordError:
        raise
    except Exception as exc:
        raise RecordError(record, f"signal cannot be read: {exc}") from exc
    if values.size == 0:
        raise RecordError(record, "signal has no samples")
    invalid = ~np.isfinite(values).all(axis=1)
    if invalid.all():
        raise RecordError(record, "every sample of the chosen lead is invalid (NaN)")
    if invalid.any():
        logger.warning("record=%s invalid_samples=%d action=skip_overlapping_beats", record,
                       int(invalid.sum()))
    positions, symbols, source = _beat_positions(path, record, fs_hz, _fill_nan(values), config)
    signal_model = preprocess(_fill_nan(values), fs_hz, config)
    scale = config.fs_hz / fs_hz
    invalid_model = np.zeros(signal_model.shape[0], dtype=bool)
    if invalid.any():
        index = np.flatnonzero(invalid)
        invalid_model[np.clip(np.round(index * scale).astype(np.int64), 0,
                              invalid_model.size - 1)] = True
    windows, labels, r_samples = [], [], []
    skipped = {"edge": 0, "invalid_samples": 0, "unknown_symbol": 0}
    unknown: set[str] = set()
    for position, symbol in zip(positions, symbols, strict=True):
        if symbol not in BEAT_SYMBOL_TO_AAMI:
            if symbol not in NON_BEAT_SYMBOLS:
                skipped["unknown_symbol"] += 1
                unknown.add(symbol)
            continue
        r = int(round(position * scale))
        start = r - config.pre_r_samples
        stop = start + config.window_samples
        if start < 0 or stop > signal_model.shape[0]:
            skipped["edge"] += 1
            continue
        if invalid_model[max(0, start - 1) : stop + 1].any():
            skipped["invalid_samples"] += 1
            continue
        windows.append(signal_model[start:stop].T)
        labels.append(AAMI_CLASSES.index(BEAT_SYMBOL_TO_AAMI[symbol]))
        r_samples.append(r)
    if unknown:
        logger.warning("record=%s unknown_symbols=%s count=%d action=skip_beats", record,
                       "".join(sorted(unknown)), skipped["unknown_symbol"])
    if not windows:
        raise RecordError(record, f"no complete beat windows (skipped: {skipped})")
    return RecordBeats(
        record=record,
        windows=np.stack(windows).astype(np.float32),
        labels=np.asarray(labels, dtype=np.int64),
        r_samples=np.asarray(r_samples, dtype=np.int64),
        fs_hz=fs_hz,
        leads=[names[c] for c in channels],
        beat_source=source,
        skipped=skipped,
    )
