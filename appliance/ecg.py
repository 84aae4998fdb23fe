"""Reading one WFDB record into beat windows: lead choice, filtering, resampling, windowing."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import wfdb
from scipy import signal
from wfdb import processing

from appliance.baseline import UNIT_HIGH_MV
from appliance.classes import AAMI_CLASSES, BEAT_SYMBOL_TO_AAMI, NON_BEAT_SYMBOLS
from appliance.config import DataConfig
from appliance.errors import RecordError
from appliance.ingest_checks import (
    check_adc_gains,
    check_file_names,
    check_sampling_rate,
    check_segment_count,
    header_lines,
    header_without_base_time,
    malformed_base_time,
    readable_frames,
)

logger = logging.getLogger(__name__)

HIGHPASS_ORDER = 2
# Largest denominator of the rational resampling factor; keeps polyphase filters small.
RESAMPLE_MAX_DENOMINATOR = 1000
# Relative difference below which two sampling rates count as equal.
SAME_RATE_TOLERANCE = 1e-9
DETECTOR = "detector:xqrs"
# WFDB header checksums are sums of the stored integers modulo 2^16.
CHECKSUM_MODULUS = 65536
# Lowest sampling rate of a lead that is read as an ECG waveform. A QRS complex lasts about
# 100 ms, so slower signals (for example numerics written once per second or minute) are not
# waveforms.
MIN_LEAD_FS_HZ = 50.0
# Percentile of a lead's absolute values, after baseline removal, that must stay under
# UNIT_HIGH_MV. Above it the header's gain or units are wrong, and the beats would swamp the
# training scale. The percentile lets a few saturated spikes through.
LEAD_AMPLITUDE_PERCENTILE = 99.0
# A beat window whose lead spans less than this (peak to peak, mV) is skipped as flat. The
# smallest span of any MIT-BIH beat window is 0.075 mV.
FLAT_WINDOW_MV = 0.05
# Annotations that stop this long before the signal ends, and at least this share of the
# record before it, are reported: a truncated annotation file reads without an error.
ANNOTATION_GAP_MIN_S = 60.0
ANNOTATION_GAP_MIN_FRACTION = 0.1


@dataclass
class RecordBeats:
    """Beat windows of one record.

    Attributes:
        record: Record name relative to the data folder.
        windows: Beats, shape (beats, leads, window_samples), in mV after baseline removal.
        labels: AAMI class index of each beat, shape (beats,).
        r_samples: R-peak positions at the model rate, shape (beats,).
        fs_hz: Sampling rate of the first chosen lead in the record, before resampling.
        leads: Lead names used, as the record spells them, one per window channel.
        beat_source: ``annotations:<extension>`` or ``detector:xqrs``.
        skipped: Counts of beats skipped, by reason (``edge``, ``invalid_samples``,
            ``unknown_symbol``).
        lead_fs_hz: Sampling rate of each chosen lead before resampling.
        beats_found: Beat positions found (annotated beats or detections) before skipping.
        invalid_samples: Samples of the chosen leads that wfdb returned as NaN.
        warnings: Defects that were tolerated, one short sentence each.
    """

    record: str
    windows: np.ndarray
    labels: np.ndarray
    r_samples: np.ndarray
    fs_hz: float
    leads: list[str]
    beat_source: str
    skipped: dict[str, int] = field(default_factory=dict)
    lead_fs_hz: list[float] = field(default_factory=list)
    beats_found: int = 0
    invalid_samples: int = 0
    warnings: list[str] = field(default_factory=list)


def normal_lead_name(name: str) -> str:
    return " ".join(name.split()).casefold()


def choose_leads(record: str, names: list[str], config: DataConfig) -> list[int]:
    """Return the channel indices of the configured leads, first ``n_leads`` found in order.

    Names match without regard to case or repeated spaces, so ``ii`` matches ``II``. A record
    whose first preferred lead is missing logs which lead was used instead.

    Raises:
        RecordError: If the record has fewer of the configured leads than ``n_leads``.
    """
    normal_names = [normal_lead_name(name) for name in names]
    chosen: list[int] = []
    for lead in config.leads:
        preferred_name = normal_lead_name(lead)
        if preferred_name in normal_names and normal_names.index(preferred_name) not in chosen:
            chosen.append(normal_names.index(preferred_name))
        if len(chosen) == config.n_leads:
            break
    if len(chosen) < config.n_leads:
        raise RecordError(
            record,
            f"has leads {names} but only {len(chosen)} of the {config.n_leads} needed from the "
            f"configured leads {list(config.leads)}; add one of its lead names to --leads",
        )
    preferred = list(config.leads[: config.n_leads])
    used = [names[index] for index in chosen]
    if [normal_lead_name(n) for n in used] != [normal_lead_name(n) for n in preferred]:
        logger.info(
            "record=%s leads=%s preferred=%s reason=preferred_lead_missing",
            record,
            ",".join(used),
            ",".join(preferred),
        )
    return chosen


def _segment_lead_names(
    path: Path, record: str, lines: list[str]
) -> tuple[list[str], list[list[str]]]:
    """Return the lead names of a multi-segment record and each segment's header lines."""
    names: list[str] = []
    segments: list[list[str]] = []
    for line in lines[1:]:
        segment = line.split()[0]
        if segment == "~":
            continue
        segment_header = path.with_name(f"{segment}.hea")
        if not segment_header.exists():
            raise RecordError(record, f"segment header {segment_header.name} not found")
        segment_lines = header_lines(segment_header)
        check_file_names(record, segment_lines)
        segments.append(segment_lines)
        if not names:
            # The first segment is the layout segment of a variable-layout record, or the first
            # data segment of a fixed-layout one; either lists every signal name.
            names = [
                str(n) for n in (wfdb.rdheader(str(segment_header.with_suffix(""))).sig_name or [])
            ]
    return names, segments


def record_lead_names(path: Path, record: str) -> list[str]:
    """Return a record's lead names as ``read_record`` reads them, multi-segment records included.

    Raises:
        RecordError: If the header cannot be read; the message names the failure.
    """
    header_path = path.with_name(f"{path.name}.hea")
    try:
        lines = header_lines(header_path)
        if not lines:
            raise RecordError(record, "header file is empty")
        check_file_names(record, lines)
        if "/" in lines[0].split()[0]:
            return _segment_lead_names(path, record, lines)[0]
        with contextlib.ExitStack() as stack:
            read_path = path
            if malformed_base_time(lines) is not None:
                read_path = stack.enter_context(header_without_base_time(path, lines))
            return [str(name) for name in (wfdb.rdheader(str(read_path)).sig_name or [])]
    except RecordError:
        raise
    except PermissionError as exc:
        raise RecordError(record, _permission_message(exc)) from exc
    except Exception as exc:  # wfdb raises ValueError, IndexError and others on bad files
        raise RecordError(record, f"header cannot be read: {exc}") from exc


def _read_leads(
    path: Path, record: str, lines: list[str], config: DataConfig, warnings: list[str]
) -> tuple[list[np.ndarray], list[float], list[str], float]:
    """Read the chosen leads in mV at their own rates.

    Returns:
        One array per lead, shape (samples,), in mV with NaN for invalid samples; the sampling
        rate of each lead; the lead names; the frame rate of the record.
    """
    multi_segment = "/" in lines[0].split()[0]
    check_file_names(record, lines)
    check_sampling_rate(record, lines)
    sample_to: int | None = None
    with contextlib.ExitStack() as stack:
        read_path = path
        if multi_segment:
            check_segment_count(record, lines)
            names, segments = _segment_lead_names(path, record, lines)
        else:
            bad_time = malformed_base_time(lines)
            if bad_time is not None:
                warnings.append(f"malformed base time or date {bad_time!r} ignored")
                read_path = stack.enter_context(header_without_base_time(path, lines))
            header = wfdb.rdheader(str(read_path))
            names = [str(n) for n in (header.sig_name or [])]
            segments = [lines]
        channels = choose_leads(record, names, config)
        chosen = [names[c] for c in channels]
        for segment_lines in segments:
            check_adc_gains(record, segment_lines, chosen, config.leads)
        if not multi_segment:
            frames = readable_frames(record, path.with_name(f"{path.name}.hea"), lines)
            declared = int(header.sig_len or 0)
            if frames is not None and frames < declared:
                if frames == 0:
                    raise RecordError(record, "signal file contains no complete frame")
                warnings.append(
                    f"signal file contains {frames} of the {declared} frames the header declares; "
                    "read the frames present"
                )
                sample_to = frames
        # A single-segment record is read as stored integers where wfdb can, so that the
        # header's checksums can be compared, then converted to physical units as rdrecord
        # would. wfdb reads multi-segment records of variable layout, and some formats such as
        # 61, in physical units only.
        digital = None
        if not multi_segment:
            try:
                digital = wfdb.rdrecord(
                    str(read_path),
                    channel_names=chosen,
                    smooth_frames=False,
                    sampto=sample_to,
                    physical=False,
                )
            except Exception:  # the physical read below reports a real defect
                logger.debug("record=%s read as stored integers failed", record, exc_info=True)
        if digital is not None:
            data = digital
        else:
            data = wfdb.rdrecord(
                str(read_path), channel_names=chosen, smooth_frames=False, sampto=sample_to
            )
    if digital is None:
        physical = data.e_p_signal
    else:
        if sample_to is None:
            warnings.extend(_checksum_mismatches(digital))
        physical = digital.dac(expanded=True)
    frames_read = int(data.sig_len)
    leads = [np.asarray(values, dtype=np.float64) for values in physical]
    # A lead stored with k samples per frame has k * frame rate samples per second.
    rates = [float(data.fs) * lead.size / frames_read for lead in leads]
    return leads, rates, [str(n) for n in data.sig_name], float(data.fs)


def _checksum_mismatches(data: wfdb.Record) -> list[str]:
    """Return a warning for each lead whose samples do not sum to the header's checksum.

    A WFDB header may give each signal's checksum: the sum of its stored integers modulo
    65536. A mismatch means that the signal file changed after the header was written. Leads
    with several samples per frame or a skew are left out: wfdb's sum for the skewed lead of
    the PhysioNet test record 03700181 does not match its header.

    Arguments:
        data: A whole record read with ``physical=False`` and ``smooth_frames=False``.
    """
    stored = data.checksum or []
    computed = data.calc_checksum(expanded=True)
    skews = data.skew or [None] * len(stored)
    mismatches = []
    for name, expected, actual, per_frame, skew in zip(
        data.sig_name, stored, computed, data.samps_per_frame, skews, strict=False
    ):
        if expected is None or per_frame != 1 or skew:
            continue
        if (int(expected) - int(actual)) % CHECKSUM_MODULUS:
            # Headers store the checksum as a signed 16-bit number, so the sum is shown so too.
            signed = (
                int(actual) + CHECKSUM_MODULUS // 2
            ) % CHECKSUM_MODULUS - CHECKSUM_MODULUS // 2
            mismatches.append(
                f"lead {name}: the signal file's checksum ({signed}) differs from the header's "
                f"({int(expected)}), so the signal file may be damaged; check it against its "
                "source"
            )
    return mismatches


def _fill_nan(values: np.ndarray) -> np.ndarray:
    """Linearly interpolate NaN runs so that filters do not spread them, shape (samples,)."""
    bad = ~np.isfinite(values)
    if not bad.any():
        return values
    if bad.all():
        return np.zeros_like(values)
    index = np.arange(values.size)
    filled = values.copy()
    filled[bad] = np.interp(index[bad], index[~bad], values[~bad])
    return filled


def remove_baseline(values: np.ndarray, fs_hz: float, config: DataConfig) -> np.ndarray:
    """Remove baseline wander with a zero-phase Butterworth high-pass filter.

    Arguments:
        values: Signal, shape (samples,) or (samples, leads), in mV, without NaN.
        fs_hz: Sampling rate of ``values``.
        config: Data settings (``highpass_hz``).

    Returns:
        Filtered signal, same shape, in mV.
    """
    sos = signal.butter(
        HIGHPASS_ORDER, config.highpass_hz, btype="highpass", fs=fs_hz, output="sos"
    )
    return signal.sosfiltfilt(sos, values, axis=0)


def resample(values: np.ndarray, fs_hz: float, target_fs_hz: float) -> np.ndarray:
    """Resample along axis 0 with a polyphase filter whose Kaiser-window low-pass anti-aliases.

    Returns:
        Signal at ``target_fs_hz``, same trailing shape.
    """
    if abs(fs_hz - target_fs_hz) <= SAME_RATE_TOLERANCE * target_fs_hz:
        return values
    ratio = Fraction(target_fs_hz / fs_hz).limit_denominator(RESAMPLE_MAX_DENOMINATOR)
    return signal.resample_poly(values, ratio.numerator, ratio.denominator, axis=0)


def preprocess(values: np.ndarray, fs_hz: float, config: DataConfig) -> np.ndarray:
    """Remove baseline wander and resample to the model rate.

    Arguments:
        values: Signal, shape (samples, leads), in mV, without NaN.
        fs_hz: Sampling rate of ``values``.
        config: Data settings (``highpass_hz``, ``fs_hz``).

    Returns:
        Signal at ``config.fs_hz``, shape (samples', leads), in mV.
    """
    return resample(remove_baseline(values, fs_hz, config), fs_hz, config.fs_hz)


def _invalid_at_model_rate(
    bad: np.ndarray, fs_hz: float, config: DataConfig, size: int
) -> np.ndarray:
    """Mark model-rate samples whose neighbouring original samples include an invalid one."""
    source = np.arange(size) * (fs_hz / config.fs_hz)
    low = np.clip(np.floor(source).astype(np.int64), 0, bad.size - 1)
    high = np.clip(low + 1, 0, bad.size - 1)
    return bad[low] | bad[high]


def _permission_message(exc: PermissionError) -> str:
    """Return a skip reason for a record file that this process may not read."""
    return (
        f"{exc.filename or 'a file of the record'} is not readable by this process (user id "
        f"{os.getuid()}); give that user read access to the record's files, or run as a user "
        "who has it"
    )


def _annotated_beats(
    path: Path, record: str, frame_fs_hz: float, config: DataConfig
) -> tuple[np.ndarray, list[str]] | None:
    """Return annotated positions at the model rate and their symbols, or None without a file."""
    extension = config.annotation_extension
    if not path.with_name(f"{path.name}.{extension}").exists():
        return None
    try:
        annotation = wfdb.rdann(str(path), extension)
    except PermissionError as exc:
        raise RecordError(record, _permission_message(exc)) from exc
    except (ValueError, IndexError, KeyError, OSError, TypeError) as exc:
        raise RecordError(
            record,
            f"annotation file .{extension} cannot be read ({type(exc).__name__}: {exc}); the "
            "file is truncated, corrupt or not a WFDB annotation file",
        ) from exc
    # Sample numbers count ticks of the annotation's own rate when the file declares one, and
    # frames of the record otherwise.
    annotation_fs_hz = float(annotation.fs) if annotation.fs else frame_fs_hz
    samples = np.asarray(annotation.sample, dtype=np.float64) * (config.fs_hz / annotation_fs_hz)
    symbols = [s if isinstance(s, str) else "<undefined code>" for s in annotation.symbol]
    return np.round(samples).astype(np.int64), symbols


def _annotation_gap(positions: np.ndarray, samples: int, config: DataConfig) -> str | None:
    """Return a warning when the annotations end well before the signal does, else None.

    Arguments:
        positions: Annotation positions at the model rate, shape (annotations,).
        samples: Signal length at the model rate.
        config: Data settings (``fs_hz``, ``annotation_extension``).
    """
    last = int(positions.max()) if positions.size else 0
    gap = samples - last
    if gap < ANNOTATION_GAP_MIN_S * config.fs_hz or gap < ANNOTATION_GAP_MIN_FRACTION * samples:
        return None
    return (
        f"annotations (.{config.annotation_extension}) end at {last / config.fs_hz:.0f} s of the "
        f"signal's {samples / config.fs_hz:.0f} s; beats after that are missing if the "
        "annotation file is truncated"
    )


def _annotations_past_end(positions: np.ndarray, samples: int, config: DataConfig) -> str | None:
    """Return a warning when annotations lie after the end of the signal, else None.

    Arguments:
        positions: Annotation positions at the model rate, shape (annotations,).
        samples: Signal length at the model rate.
        config: Data settings (``fs_hz``, ``annotation_extension``).
    """
    past_end = int((positions >= samples).sum())
    if past_end == 0:
        return None
    return (
        f"{past_end} of {positions.size} annotations (.{config.annotation_extension}) lie after "
        f"the end of the signal at {samples / config.fs_hz:.0f} s, so their beats are skipped; "
        "the header may state too few samples, or the signal file may be truncated"
    )


def _detected_beats(lead: np.ndarray, fs_hz: float, config: DataConfig) -> np.ndarray:
    """Return QRS positions at the model rate found by wfdb's XQRS detector.

    Arguments:
        lead: Baseline-free signal of the first chosen lead, shape (samples,), in mV, at
            ``fs_hz``, which is the lower of the lead's own rate and the model rate.
        fs_hz: Sampling rate of ``lead``.
        config: Data settings (``fs_hz``).
    """
    detector = processing.XQRS(sig=lead, fs=fs_hz)
    detector.detect(verbose=False)
    positions = np.asarray(detector.qrs_inds, dtype=np.float64) * (config.fs_hz / fs_hz)
    return np.round(positions).astype(np.int64)


def read_record(path: Path, record: str, config: DataConfig) -> RecordBeats:
    """Read one record and cut beat windows around its R peaks.

    Any failure becomes a ``RecordError``, so that one bad record is reported and skipped while
    the other records are read.

    Beat positions come from the annotation file with ``config.annotation_extension`` when it
    exists and from wfdb's XQRS detector otherwise (labelled Q, unclassifiable). The XQRS pass
    took 7.6 s for 30 minutes at 360 Hz on one core (MIT-BIH record 100), and longer on noise.

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
        return _read_record(path, record, config)
    except RecordError:
        raise
    except Exception as exc:  # any failure of one record skips that record
        logger.debug("record=%s read failed", record, exc_info=True)
        raise RecordError(record, f"cannot be processed ({type(exc).__name__}: {exc})") from exc


def _read_record(path: Path, record: str, config: DataConfig) -> RecordBeats:
    """Read one record as ``read_record`` does, letting unexpected errors through."""
    header_path = path.with_name(f"{path.name}.hea")
    try:
        header_exists, header_is_file = header_path.exists(), header_path.is_file()
    except PermissionError as exc:  # a folder on the way that this user may not enter
        raise RecordError(record, _permission_message(exc)) from exc
    if not header_exists:
        raise RecordError(record, f"header file {header_path} not found")
    if not header_is_file:
        raise RecordError(record, f"header {header_path} is not a file")
    warnings: list[str] = []
    try:
        lines = header_lines(header_path)
    except PermissionError as exc:
        raise RecordError(record, _permission_message(exc)) from exc
    except OSError as exc:
        raise RecordError(
            record, f"header {header_path} cannot be read ({exc.strerror or exc})"
        ) from exc
    if not lines:
        raise RecordError(record, "header file is empty")
    try:
        leads, rates, names, frame_fs_hz = _read_leads(path, record, lines, config, warnings)
    except RecordError:
        raise
    except PermissionError as exc:
        raise RecordError(record, _permission_message(exc)) from exc
    except Exception as exc:  # wfdb raises ValueError, IndexError and others on bad files
        raise RecordError(
            record,
            f"header or signal cannot be read ({type(exc).__name__}: {exc}); check that the "
            "header's record line (signal and sample counts) matches its signal lines and the "
            "signal file",
        ) from exc
    if any(lead.size == 0 for lead in leads):
        raise RecordError(record, "signal has no samples")

    model_leads, invalid_masks, invalid_total = [], [], 0
    for lead, fs_hz, name in zip(leads, rates, names, strict=True):
        if not (np.isfinite(fs_hz) and fs_hz >= MIN_LEAD_FS_HZ):
            raise RecordError(
                record,
                f"lead {name} is sampled at {fs_hz:g} Hz, below the {MIN_LEAD_FS_HZ:g} Hz of an "
                "ECG waveform; check the header's sampling rate or choose another lead",
            )
        window_at_lead_rate = config.window_samples * fs_hz / config.fs_hz
        if lead.size < window_at_lead_rate:
            raise RecordError(
                record,
                f"lead {name} has {lead.size} samples, fewer than one beat window "
                f"({window_at_lead_rate:.0f} samples at {fs_hz:g} Hz)",
            )
        bad = ~np.isfinite(lead)
        if bad.all():
            raise RecordError(record, "every sample of a chosen lead is invalid (NaN)")
        invalid_total += int(bad.sum())
        model = preprocess(_fill_nan(lead), fs_hz, config)
        amplitude_mv = float(np.percentile(np.abs(model), LEAD_AMPLITUDE_PERCENTILE))
        if not amplitude_mv <= UNIT_HIGH_MV:
            raise RecordError(
                record,
                f"lead {name} reaches {amplitude_mv:.3g} mV ({LEAD_AMPLITUDE_PERCENTILE:g}th "
                f"percentile after baseline removal), beyond the {UNIT_HIGH_MV:g} mV of an ECG; "
                "check the header's ADC gain and units",
            )
        model_leads.append(model)
        invalid_masks.append(_invalid_at_model_rate(bad, fs_hz, config, model.size))
    size = min(lead.size for lead in model_leads)
    signal_model = np.stack([lead[:size] for lead in model_leads])  # (leads, samples)
    invalid_model = np.any([mask[:size] for mask in invalid_masks], axis=0)
    if invalid_total:
        warnings.append(f"{invalid_total} invalid (NaN) samples; beats touching them are skipped")

    annotated = _annotated_beats(path, record, frame_fs_hz, config)
    if annotated is not None:
        positions, symbols = annotated
        source = f"annotations:{config.annotation_extension}"
        gap = _annotation_gap(positions, signal_model.shape[1], config)
        if gap is not None:
            warnings.append(gap)
        past_end = _annotations_past_end(positions, signal_model.shape[1], config)
        if past_end is not None:
            warnings.append(past_end)
    else:
        if rates[0] < config.fs_hz:
            detection_input = remove_baseline(_fill_nan(leads[0]), rates[0], config)
            positions = _detected_beats(detection_input, rates[0], config)
        else:
            positions = _detected_beats(signal_model[0], config.fs_hz, config)
        symbols = ["Q"] * positions.size
        source = DETECTOR

    try:
        beats = _cut_windows(record, signal_model, invalid_model, positions, symbols, config)
    except RecordError as exc:
        # A defect found while reading, such as a truncated signal file, often explains why no
        # window is complete, so the skip reason carries it.
        if not warnings:
            raise
        raise RecordError(
            record, f"{exc.reason}; read with warnings: {'; '.join(warnings)}"
        ) from exc
    for warning in warnings:
        logger.warning("record=%s action=read_with_warning reason=%s", record, warning)
    return RecordBeats(
        record=record,
        fs_hz=rates[0],
        leads=names,
        beat_source=source,
        lead_fs_hz=rates,
        invalid_samples=invalid_total,
        warnings=warnings,
        **beats,
    )


def _cut_windows(
    record: str,
    signal_model: np.ndarray,
    invalid_model: np.ndarray,
    positions: np.ndarray,
    symbols: list[str],
    config: DataConfig,
) -> dict:
    """Cut one window per labelled beat and count the beats skipped, by reason.

    Arguments:
        signal_model: Signal at the model rate, shape (leads, samples), in mV.
        invalid_model: True where a sample was interpolated over a NaN, shape (samples,).
        positions: R-peak positions at the model rate, shape (annotations,).
        symbols: Annotation symbol of each position.
    """
    is_beat = np.array([s in BEAT_SYMBOL_TO_AAMI for s in symbols], dtype=bool)
    unknown = sorted(
        {s for s in symbols if s not in BEAT_SYMBOL_TO_AAMI and s not in NON_BEAT_SYMBOLS}
    )
    unknown_count = sum(1 for s in symbols if s in unknown)
    if unknown:
        logger.warning(
            "record=%s unknown_symbols=%s count=%d action=skip_beats",
            record,
            ",".join(unknown),
            unknown_count,
        )
    beat_positions = positions[is_beat]
    labels = np.array(
        [AAMI_CLASSES.index(BEAT_SYMBOL_TO_AAMI[s]) for s in symbols if s in BEAT_SYMBOL_TO_AAMI],
        dtype=np.int64,
    )
    starts = beat_positions - config.pre_r_samples
    inside = (starts >= 0) & (starts + config.window_samples <= signal_model.shape[1])
    # invalid_before[i] counts invalid samples before index i, so a window's count is a difference.
    invalid_before = np.concatenate([[0], np.cumsum(invalid_model)])
    clean = np.zeros_like(inside)
    clean[inside] = (
        invalid_before[starts[inside] + config.window_samples] - invalid_before[starts[inside]]
    ) == 0
    keep = inside & clean
    offsets = starts[keep][:, None] + np.arange(config.window_samples)  # (beats, window)
    windows = signal_model[:, offsets].transpose(1, 0, 2)  # (beats, leads, window)
    # A window whose lead barely moves contains no beat: a disconnected electrode, for example.
    flat_kept = np.ptp(windows, axis=2).min(axis=1, initial=np.inf) < FLAT_WINDOW_MV
    flat = np.zeros_like(keep)
    flat[np.flatnonzero(keep)[flat_kept]] = True
    windows = windows[~flat_kept]
    keep &= ~flat
    skipped = {
        "edge": int((~inside).sum()),
        "invalid_samples": int((inside & ~clean).sum()),
        "unknown_symbol": unknown_count,
        "flat": int(flat.sum()),
    }
    if not keep.any() and flat.any():
        raise RecordError(
            record,
            f"every beat window is flat: {int(flat.sum())} windows span less than "
            f"{FLAT_WINDOW_MV:g} mV on a lead. The electrode may have been disconnected, or "
            "the header's ADC gain is wrong; check the record or choose another lead",
        )
    if not keep.any():
        raise RecordError(record, f"no complete beat windows (beats skipped: {skipped})")
    if flat.any():
        logger.warning(
            "record=%s flat_windows=%d action=skip_beats reason=lead spans under %g mV",
            record,
            int(flat.sum()),
            FLAT_WINDOW_MV,
        )
    return {
        "windows": windows.astype(np.float32),
        "labels": labels[keep],
        "r_samples": beat_positions[keep],
        "skipped": skipped,
        "beats_found": int(is_beat.sum()),
    }
