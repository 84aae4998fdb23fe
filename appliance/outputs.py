"""Writers of synthetic beats (npy, csv, WFDB with annotations) and the comparison figure."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from appliance.classes import AAMI_CLASSES, BEAT_SYMBOL_TO_AAMI, NON_BEAT_SYMBOLS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

FORMATS = ("npy", "csv", "wfdb")
# The files that ``write_beats`` writes per format under its default name.
GENERATE_FILES = {
    "npy": ("synthetic.npy", "synthetic_classes.json"),
    "csv": ("synthetic.csv",),
    "wfdb": ("synthetic.hea", "synthetic.dat", "synthetic.atr"),
}
# WFDB format 16 stores signed 16-bit integers, with -32768 marking a missing sample. Each
# lead's gain maps its largest absolute value to this many units, so that a 3 mV peak is
# stored in steps of about 0.1 uV. A fixed 1 uV step changed the pertinence score of smooth
# synthetic beats by up to 0.03, through their share of energy above 40 Hz.
WFDB_PEAK_UNITS = 32000
# Upper bound of the gain (units per mV), for leads that are flat or nearly so.
WFDB_MAX_ADC_GAIN = 100_000.0
# Header comment of every WFDB record that ``write_beats`` writes. Ingest skips a record whose
# header contains it, so that generated beats are never read as a patient's recording.
SYNTHETIC_RECORD_COMMENT = "synthetic beats from the ECG appliance"
# AAMI class -> a representative MIT-BIH beat symbol for the annotation file.
CLASS_SYMBOL = {"N": "N", "S": "S", "V": "V", "F": "F", "Q": "Q"}
# Minimum number of real beats of one class for figures and reports to show their statistics
# (mean, 5-95 % band, morphology medians and quartiles). numpy's linear percentile puts the 5th
# percentile of n values at sorted position 0.05 * (n - 1). With 20 beats or fewer a band edge
# is therefore interpolated from the most extreme beat at each sample. With 1 beat the mean is
# that beat.
# From 30 beats each edge lies between the 2nd and 3rd most extreme beats, and no beat weighs
# more than 1/30 of the mean.
# NOTE: 30 is a judgment for aggregate figures, not a formal privacy bound.
MIN_REAL_BEATS_PER_CLASS = 30


# How to score a continuous recording, for the errors of validate's WFDB reader.
CONTINUOUS_RECORDING_ADVICE = (
    "To score a continuous recording, pass --recording, which cuts one window per annotated "
    "beat as training does. Otherwise remove its baseline wander first (the 0.5 Hz "
    "high-pass in the API guide, docs/api.md), cut one window per beat as `python -m "
    "appliance info` describes (window_samples, with pre_r_samples before the R peak), save "
    "them with numpy.save as (beats, leads, window_samples) in mV and pass the .npy file"
)


def real_statistics_allowed(real_beats: int) -> bool:
    """Return whether statistics of ``real_beats`` real beats of one class may be shown."""
    return real_beats >= MIN_REAL_BEATS_PER_CLASS


def real_band_withheld_note(real_beats: int) -> str:
    """Return the figure note for a class whose real mean and band are left out."""
    return (
        f"real mean and band left out: {real_beats} real beats, "
        f"fewer than {MIN_REAL_BEATS_PER_CLASS}"
    )


def write_beats(
    out_dir: Path,
    beats_mv: np.ndarray,
    classes: list[str],
    scores: np.ndarray,
    fs_hz: float,
    pre_r_samples: int,
    leads: list[str],
    fmt: str,
    name: str = "synthetic",
) -> list[Path]:
    """Write beats in one format and return the paths written.

    Arguments:
        out_dir: Output folder, created if missing.
        beats_mv: Beats, shape (beats, leads, window_samples), in mV.
        classes: Class name of each beat.
        scores: Pertinence score of each beat, shape (beats,).
        fs_hz: Sampling rate of the beats.
        pre_r_samples: Samples before the R peak in each window.
        leads: Lead names.
        fmt: ``npy``, ``csv`` or ``wfdb``.
        name: File or record name without extension.

    The files are written into a temporary folder inside ``out_dir`` and then renamed into
    place, so a failed write (a full disk) leaves the files of an earlier run as they were and
    no partial file behind.

    Raises:
        ValueError: If ``fmt`` is unknown.
        OSError: If a file cannot be written; the temporary folder is removed.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=out_dir))
    try:
        written = _write_format(
            staging, beats_mv, classes, scores, fs_hz, pre_r_samples, leads, fmt, name
        )
        paths = []
        # Each rename is atomic. A crash between two renames can leave one new file beside an
        # old one, but never a partial file.
        for path in written:
            target = out_dir / path.name
            os.replace(path, target)
            paths.append(target)
        return paths
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_format(
    out_dir: Path,
    beats_mv: np.ndarray,
    classes: list[str],
    scores: np.ndarray,
    fs_hz: float,
    pre_r_samples: int,
    leads: list[str],
    fmt: str,
    name: str,
) -> list[Path]:
    """Write beats in one format into ``out_dir``; the arguments are those of ``write_beats``."""
    if fmt == "npy":
        paths = [out_dir / f"{name}.npy", out_dir / f"{name}_classes.json"]
        np.save(paths[0], beats_mv.astype(np.float32))
        paths[1].write_text(
            json.dumps(
                {
                    "classes": classes,
                    "scores": scores.tolist(),
                    "fs_hz": fs_hz,
                    "leads": leads,
                    "unit": "mV",
                }
            )
        )
        return paths
    if fmt == "csv":
        path = out_dir / f"{name}.csv"
        flat = beats_mv.reshape(beats_mv.shape[0], -1)
        header = "class,score," + ",".join(
            f"{lead}_{i}" for lead in leads for i in range(beats_mv.shape[2])
        )
        with path.open("w") as handle:
            handle.write(header + "\n")
            for label, score, row in zip(classes, scores, flat, strict=True):
                handle.write(f"{label},{score:.4f}," + ",".join(f"{v:.5f}" for v in row) + "\n")
        return [path]
    if fmt == "wfdb":
        return _write_wfdb(out_dir, beats_mv, classes, fs_hz, pre_r_samples, leads, name)
    raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def wfdb_adc_gains(signal_mv: np.ndarray) -> np.ndarray:
    """Return the WFDB gain of each lead, in whole units per mV.

    Arguments:
        signal_mv: Samples, shape (samples, leads), in mV.

    Returns:
        Gains, shape (leads,): ``WFDB_PEAK_UNITS`` divided by the lead's largest absolute
        value, rounded down and at most ``WFDB_MAX_ADC_GAIN``.
    """
    peak = np.abs(signal_mv).max(axis=0)
    gains = np.full(peak.shape, WFDB_MAX_ADC_GAIN)
    nonzero = peak > 0
    gains[nonzero] = np.minimum(np.floor(WFDB_PEAK_UNITS / peak[nonzero]), WFDB_MAX_ADC_GAIN)
    return gains


def _write_wfdb(
    out_dir: Path,
    beats_mv: np.ndarray,
    classes: list[str],
    fs_hz: float,
    pre_r_samples: int,
    leads: list[str],
    name: str,
) -> list[Path]:
    """Concatenate beats into one record with a beat annotation at each R peak."""
    import wfdb

    count, n_leads, window = beats_mv.shape
    signal = beats_mv.transpose(0, 2, 1).reshape(count * window, n_leads).astype(np.float64)
    gains = [float(g) for g in wfdb_adc_gains(signal)]
    wfdb.wrsamp(
        name,
        fs=fs_hz,
        units=["mV"] * n_leads,
        sig_name=list(leads),
        p_signal=signal,
        fmt=["16"] * n_leads,
        adc_gain=gains,
        baseline=[0] * n_leads,
        write_dir=str(out_dir),
        comments=[
            SYNTHETIC_RECORD_COMMENT,
            f"independent beat windows of {window} samples placed end to end, not a rhythm: "
            "the signal steps at each join and RR intervals carry no meaning",
        ],
    )
    r_samples = np.arange(count) * window + pre_r_samples
    wfdb.wrann(
        name,
        "atr",
        sample=r_samples,
        symbol=[CLASS_SYMBOL[c] for c in classes],
        write_dir=str(out_dir),
        fs=fs_hz,
    )
    return [out_dir / f"{name}.hea", out_dir / f"{name}.dat", out_dir / f"{name}.atr"]


def read_beats(path: Path) -> tuple[np.ndarray, list[str] | None]:
    """Read beats written by ``write_beats``, or a plain ``.npy`` array, for validation.

    Arguments:
        path: A ``.npy``, ``.csv`` or WFDB file. The classes of a ``.npy`` file come from
            ``<stem>_classes.json`` beside it, when present. A ``.csv`` file has ``class`` and
            ``score`` columns first. A WFDB record (``.hea``, ``.dat`` or the record path
            without extension) contains consecutive beat windows, one beat annotation each.

    Returns:
        Beats, shape (beats, leads, window_samples), in mV, and the class name of each beat,
        or ``None`` when the file contains no classes.

    Raises:
        ValueError: If the file cannot be read as any of these, with the reason.
    """
    suffix = path.suffix.lower()
    if suffix in (".hea", ".dat", ".atr", ""):
        return _read_wfdb(path.with_suffix(""))
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".npz":
        raise ValueError(
            f"{path} is a .npz archive, which validate does not read; save the beats as one "
            "array of shape (beats, leads, window_samples) in mV with numpy.save (.npy)"
        )
    try:
        # Mapped first, so that a header that claims more data than the file contains fails
        # here instead of allocating that much memory.
        beats = np.array(np.load(path, mmap_mode="r", allow_pickle=False))
    except (ValueError, OSError, EOFError) as exc:
        if "Python objects in dtype" in str(exc):
            # NumPy maps no object array and loads one only with pickle, which can run code.
            raise ValueError(
                f"{path} is a .npy file of Python objects, not numbers; save the beats as a "
                "float32 or float64 array of shape (beats, leads, window_samples) in mV"
            ) from exc
        raise ValueError(
            f"{path} is not a NumPy .npy array file; pass a .npy, .csv or WFDB file written by "
            "`generate`, or save the beats with numpy.save"
        ) from exc
    if beats.dtype.kind not in "fiu":
        raise ValueError(
            f"{path} contains values of type {beats.dtype}; save the beats as real numbers in mV "
            "(float32 or float64) with numpy.save"
        )
    if beats.ndim == 0:
        raise ValueError(
            f"{path} contains a single number, not beats; save an array of shape (beats, leads, "
            "window_samples) in mV with numpy.save"
        )
    labels = path.with_name(f"{path.stem}_classes.json")
    classes = None
    if labels.exists():
        if not labels.is_file():
            raise ValueError(
                f"{path}: the classes file {labels} is not a file; move it away to score each "
                "beat under its best-fitting class"
            )
        listed = json.loads(labels.read_text())["classes"]
        # A string or a mapping would be read by its characters or keys, one per beat.
        if not isinstance(listed, list) or not all(
            name is None or isinstance(name, str) for name in listed
        ):
            raise TypeError(f"classes is a {type(listed).__name__} or lists other than names")
        classes = list(listed)
        if len(classes) != beats.shape[0]:
            raise ValueError(
                f"{labels} lists {len(classes)} classes for {beats.shape[0]} beats in {path}; "
                "remove or fix the classes file"
            )
    return beats, classes


def read_sampling_rate(path: Path) -> float | None:
    """Return the sampling rate in Hz that a ``read_beats`` input states, or None.

    A WFDB header states it, and so does the classes file that ``generate`` writes beside a
    ``.npy`` file (``fs_hz``). A ``.csv`` file and a plain ``.npy`` array do not.

    Raises:
        ValueError: If the classes file gives an ``fs_hz`` that is not a number.
    """
    suffix = path.suffix.lower()
    if suffix in (".hea", ".dat", ".atr", ""):
        import wfdb

        try:
            fs = wfdb.rdheader(str(path.with_suffix(""))).fs
        except (OSError, ValueError):
            return None
        return float(fs) if fs else None
    labels = path.with_name(f"{path.stem}_classes.json")
    if suffix != ".npy" or not labels.is_file():
        return None
    try:
        stated = json.loads(labels.read_text()).get("fs_hz")
    except (OSError, ValueError, AttributeError):
        return None
    if stated is None:
        return None
    if isinstance(stated, bool) or not isinstance(stated, int | float):
        raise ValueError(
            f"{path}: the classes file {labels} gives fs_hz={stated!r}, which is not a number; "
            "write the sampling rate in Hz as a number, such as 360, or remove the entry"
        )
    return float(stated)


def read_lead_names(path: Path) -> list[str] | None:
    """Return the lead names that a ``read_beats`` input states, or None.

    A WFDB header states them, a ``.csv`` file written by ``generate`` names them in its
    sample columns (``MLII_0``), and the classes file beside a ``.npy`` file lists them under
    ``leads``. A plain ``.npy`` array does not.
    """
    suffix = path.suffix.lower()
    try:
        if suffix in (".hea", ".dat", ".atr", ""):
            import wfdb

            names = wfdb.rdheader(str(path.with_suffix(""))).sig_name
        elif suffix == ".csv":
            with path.open(encoding="utf-8") as stream:
                header = stream.readline().strip().split(",")
            names = list(Counter(column.rsplit("_", 1)[0] for column in header[2:]))
        else:
            labels = path.with_name(f"{path.stem}_classes.json")
            names = json.loads(labels.read_text()).get("leads") if labels.is_file() else None
    except (OSError, ValueError, AttributeError, IndexError, KeyError, TypeError):
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not names:
        return None
    return list(names)


def read_r_position(path: Path) -> int | None:
    """Return the sample of each window that a WFDB input's beat annotations mark, or None.

    ``read_beats`` has checked that every beat annotation sits at the same place in its
    window, so the first one gives it. Other inputs state no R position.
    """
    if path.suffix.lower() not in (".hea", ".dat", ".atr", ""):
        return None
    import wfdb

    try:
        annotation = wfdb.rdann(str(path.with_suffix("")), "atr")
    except (OSError, ValueError, IndexError, KeyError, TypeError):
        return None
    beats = [s for s, symbol in zip(annotation.sample, annotation.symbol, strict=True)
             if symbol not in NON_BEAT_SYMBOLS]  # fmt: skip
    return int(beats[0]) if beats else None


def _read_csv(path: Path) -> tuple[np.ndarray, list[str] | None]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path} is not UTF-8 text, so it was not written by generate; save other beats "
            "with numpy.save and pass the .npy file"
        ) from exc
    header = lines[0].split(",") if lines else []
    if header[:2] != ["class", "score"]:
        raise ValueError(
            f"{path} has no 'class,score,...' header, so it was not written by generate; save "
            "other beats with numpy.save as an array of shape (beats, leads, window_samples) in "
            "mV and pass the .npy file"
        )
    columns_per_lead = Counter(column.rsplit("_", 1)[0] for column in header[2:])
    leads = list(columns_per_lead)
    if not leads:
        raise ValueError(
            f"{path} has no sample columns after 'class,score'; generate writes one column "
            "per lead and sample, named LEAD_0, LEAD_1, ... (for example MLII_0)"
        )
    if len(set(columns_per_lead.values())) > 1:
        counts = ", ".join(f"{lead} {count}" for lead, count in columns_per_lead.items())
        raise ValueError(
            f"{path} has sample columns of unequal count per lead ({counts}); every lead "
            "needs one column per sample, so fix or regenerate the file"
        )
    rows = [line.split(",") for line in lines[1:] if line]
    for number, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise ValueError(
                f"{path} line {number} has {len(row)} values, but the header has "
                f"{len(header)} columns; fix or regenerate the file"
            )
        for value in row[2:]:
            try:
                float(value)
            except ValueError:
                raise ValueError(
                    f"{path} line {number} has {value!r}, which is not a number; fix or "
                    "regenerate the file"
                ) from None
    # float64 keeps a value beyond float32's range finite, so that validate can name it.
    values = np.array([[float(v) for v in row[2:]] for row in rows], dtype=np.float64)
    beats = values.reshape(len(rows), len(leads), -1) if rows else values.reshape(0, 1, 0)
    return beats, [row[0] for row in rows]


def _read_wfdb(record: Path) -> tuple[np.ndarray, list[str] | None]:
    import wfdb

    annotation_path = record.with_name(f"{record.name}.atr")
    if record.with_name(f"{record.name}.hea").is_file() and not annotation_path.exists():
        raise ValueError(
            f"WFDB record {record} has no beat annotation file {annotation_path.name}; "
            "validate reads records of consecutive beat windows written by generate, one "
            f"annotation per window. {CONTINUOUS_RECORDING_ADVICE}"
        )
    try:
        header = wfdb.rdrecord(str(record))
        annotation = wfdb.rdann(str(record), "atr")
    # wfdb raises IndexError, KeyError and TypeError on some malformed headers.
    except (OSError, ValueError, IndexError, KeyError, TypeError) as exc:
        raise ValueError(f"WFDB record {record} cannot be read: {exc}") from exc
    signal = header.p_signal * _millivolts_per_unit(record, list(header.units or []))
    # Only beat annotations mark windows; rhythm and signal-quality notes mark none.
    is_beat = [symbol not in NON_BEAT_SYMBOLS for symbol in annotation.symbol]
    positions = np.asarray(annotation.sample)[is_beat]
    symbols = [symbol for symbol, beat in zip(annotation.symbol, is_beat, strict=True) if beat]
    count = len(positions)
    if count == 0 or signal.shape[0] % count:
        raise ValueError(
            f"WFDB record {record} has {signal.shape[0]} samples and {count} beat annotations; "
            "validate reads records of consecutive beat windows, one annotation per window. "
            f"{CONTINUOUS_RECORDING_ADVICE}"
        )
    window = signal.shape[0] // count
    # Each annotation must sit at the same place in its window, one window after the last.
    offsets = positions - window * np.arange(count)
    out_of_step = np.flatnonzero((offsets != offsets[0]) | (offsets < 0) | (offsets >= window))
    if out_of_step.size:
        first = int(out_of_step[0])
        spacing = np.diff(positions)
        apart = f"{int(np.median(spacing))} samples apart" if spacing.size else "alone"
        raise ValueError(
            f"WFDB record {record} has {signal.shape[0]} samples and {count} beat annotations, "
            f"which gives windows of {window} samples, but the annotations are {apart} and "
            f"annotation {first}, at sample {int(positions[first])}, lies outside window "
            f"{first}; validate reads records of consecutive beat windows, one annotation per "
            f"window at the same place in each. {CONTINUOUS_RECORDING_ADVICE}"
        )
    beats = signal.reshape(count, window, signal.shape[1]).transpose(0, 2, 1)
    classes = [BEAT_SYMBOL_TO_AAMI.get(symbol) for symbol in symbols]
    if any(name is None for name in classes):
        first = symbols[classes.index(None)]
        logger.warning(
            "record=%s beats are scored under their best-fitting class: annotation symbol "
            "%r is not a beat label that maps to an AAMI class",
            record,
            first,
        )
        return beats.astype(np.float32), None
    return beats.astype(np.float32), [str(name) for name in classes]


# Signal units that a WFDB header may state, and their size in mV.
MILLIVOLTS_PER_UNIT = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "v": 1e3, "nv": 1e-6}


def _millivolts_per_unit(record: Path, units: list[str]) -> np.ndarray:
    """Return the factor to mV of each lead's unit, shape (leads,); a missing unit is mV.

    Raises:
        ValueError: If a lead's unit is not a voltage, naming it.
    """
    factors = []
    for lead, unit in enumerate(units):
        key = (unit or "mV").strip().lower()
        if key not in MILLIVOLTS_PER_UNIT:
            raise ValueError(
                f"WFDB record {record} states the unit {unit!r} for signal {lead}, which is not "
                "a voltage; validate reads ECG signals in V, mV or uV"
            )
        factors.append(MILLIVOLTS_PER_UNIT[key])
    return np.asarray(factors or [1.0])


def plot_real_vs_synthetic(
    path: Path,
    real_mv: np.ndarray,
    real_classes: np.ndarray,
    synthetic_mv: np.ndarray,
    synthetic_classes: list[str],
    fs_hz: float,
    real_source: str = "",
) -> Path:
    """Draw, per class, the real beats' mean and 5-95 % band against synthetic beats.

    Only aggregate bands of real beats are drawn, never a single real beat. A class with fewer
    than ``MIN_REAL_BEATS_PER_CLASS`` real beats shows its synthetic beats only, with a note.
    ``real_source`` says where the real beats come from, as a line above the panels.
    """
    figure = real_vs_synthetic_figure(
        real_mv, real_classes, synthetic_mv, synthetic_classes, fs_hz, real_source
    )
    figure.savefig(path, dpi=110)
    return path


def real_vs_synthetic_figure(
    real_mv: np.ndarray,
    real_classes: np.ndarray,
    synthetic_mv: np.ndarray,
    synthetic_classes: list[str],
    fs_hz: float,
    real_source: str = "",
) -> Figure:
    """Build the figure of ``plot_real_vs_synthetic``, one panel per synthetic class."""
    from matplotlib.figure import Figure

    present = [c for c in AAMI_CLASSES if c in synthetic_classes]
    figure = Figure(figsize=(4 * max(1, len(present)), 3.2))
    axes = figure.subplots(1, max(1, len(present)), squeeze=False)
    t_ms = np.arange(real_mv.shape[2]) / fs_hz * 1000
    for axis, name in zip(axes[0], present, strict=False):
        real = real_mv[real_classes == AAMI_CLASSES.index(name), 0]
        synthetic = synthetic_mv[np.asarray(synthetic_classes) == name, 0]
        if real_statistics_allowed(real.shape[0]):
            low, high = np.percentile(real, [5, 95], axis=0)
            axis.fill_between(t_ms, low, high, color="tab:blue", alpha=0.25, label="real 5-95 %")
            axis.plot(t_ms, real.mean(axis=0), color="tab:blue", label="real mean")
        for index, beat in enumerate(synthetic[:20]):
            label = "synthetic" if index == 0 else None
            axis.plot(t_ms, beat, color="tab:red", alpha=0.3, linewidth=0.8, label=label)
        title = f"class {name}: real n={real.shape[0]}, synthetic n={synthetic.shape[0]}"
        if not real_statistics_allowed(real.shape[0]):
            title += "\n" + real_band_withheld_note(real.shape[0])
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("time (ms)")
        axis.set_ylabel("amplitude (mV)")
    axes[0][0].legend(loc="upper right", fontsize=7)
    if real_source:
        figure.suptitle(f"real beats: {real_source}", fontsize=9)
    figure.tight_layout()
    return figure
