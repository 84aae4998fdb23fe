"""Checks on the raw text of WFDB headers and on signal file sizes, made before wfdb reads them.

wfdb 4.3.1 hides some header defects: it replaces an ADC gain of 0, NaN or infinity with 200 (so
an uncalibrated signal reads as if it were in mV), reads a sampling rate it cannot parse (such as
-360) as 250 Hz and one written as 1e6 as 1 Hz, rejects a whole record for a malformed base time,
and fails with a NumPy broadcast error when a signal file is shorter than the header declares.
The functions here find those defects in the header text itself, so that ingest can name them.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import RecordError
from appliance.outputs import SYNTHETIC_RECORD_COMMENT

logger = logging.getLogger(__name__)

# Bytes per sample of each fixed-width WFDB storage format. FLAC formats (508, 516, 524) are
# compressed, so their file size does not give their length.
BYTES_PER_SAMPLE: dict[int, float] = {
    8: 1.0,
    80: 1.0,
    16: 2.0,
    61: 2.0,
    160: 2.0,
    212: 1.5,
    310: 4.0 / 3.0,
    311: 4.0 / 3.0,
    24: 3.0,
    32: 4.0,
}
_FORMAT_FIELD = re.compile(r"^(?P<format>\d+)(?:x(?P<spf>\d+))?(?::\d+)?(?:\+(?P<offset>\d+))?$")
# The gain field is "gain[(baseline)][/units]", so the gain is the text before "(" or "/".
_GAIN_FIELD = re.compile(r"^(?P<gain>[^(/]*)")
# A sampling rate as the WFDB header format writes it: a plain decimal number.
_RATE_TEXT = re.compile(r"^(\d+\.?\d*|\.\d+)$")


@dataclass(frozen=True)
class SignalLine:
    """One signal specification line of a single-segment header.

    Attributes:
        file_name: Signal file the samples are stored in.
        format_code: WFDB storage format (16, 212, ...).
        samples_per_frame: Samples of this signal in each frame.
        byte_offset: Bytes skipped at the start of the signal file.
        adc_gain: ADC units per physical unit as written, None when the field is absent, and
            NaN when the field is present but not a number.
        name: Signal (lead) name, or an empty string when the line has none.
    """

    file_name: str
    format_code: int
    samples_per_frame: int
    byte_offset: int
    adc_gain: float | None
    name: str


def header_lines(header_path: Path) -> list[str]:
    """Return the non-comment lines of a header file, with line endings removed."""
    text = header_path.read_text(errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def is_synthetic_record(header_path: Path) -> bool:
    """Return whether a header contains the comment that marks the appliance's own output.

    Returns False for a header that cannot be read, so that reading the record reports why.
    """
    try:
        text = header_path.read_text(errors="replace")
    except OSError:
        return False
    comments = (line[1:].strip() for line in text.splitlines() if line.startswith("#"))
    return SYNTHETIC_RECORD_COMMENT in comments


def parse_signal_lines(lines: list[str]) -> list[SignalLine]:
    """Parse the signal lines (every line after the record line) of a single-segment header."""
    signals = []
    for line in lines[1:]:
        fields = line.split()
        match = _FORMAT_FIELD.match(fields[1]) if len(fields) > 1 else None
        if match is None:
            continue
        gain = None
        if len(fields) > 2:
            gain_match = _GAIN_FIELD.match(fields[2])
            gain_text = gain_match["gain"] if gain_match else ""
            if gain_text:
                try:
                    gain = float(gain_text)
                except ValueError:
                    gain = math.nan
        signals.append(
            SignalLine(
                file_name=fields[0],
                format_code=int(match["format"]),
                samples_per_frame=int(match["spf"] or 1),
                byte_offset=int(match["offset"] or 0),
                adc_gain=gain,
                name=" ".join(fields[8:]) if len(fields) > 8 else "",
            )
        )
    return signals


def check_file_names(record: str, lines: list[str]) -> None:
    """Raise if a signal file or segment named in a header contains a folder part.

    Arguments:
        record: Record name used in the error.
        lines: Header lines from ``header_lines``, of a single-segment or multi-segment header.

    Raises:
        RecordError: Naming the file, because wfdb 4.3.1 accepts only a bare file name there
            (it rejects ``sig/105.dat`` as invalid header syntax).
    """
    multi_segment = "/" in lines[0].split()[0]
    for line in lines[1:]:
        name = line.split()[0]
        if "/" not in name:
            continue
        kind = "segment" if multi_segment else "signal file"
        raise RecordError(
            record,
            f"{kind} {name!r} named in the header is in a subfolder, which wfdb does not read; "
            "move its files beside the header and write the name without the folder",
        )


def check_adc_gains(
    record: str, lines: list[str], lead_names: list[str], preferred: tuple[str, ...] = ()
) -> None:
    """Raise if a chosen lead's ADC gain is 0 (uncalibrated in WFDB) or not a finite number.

    A gain that is not a number can make wfdb misread the lead's name, so that another lead is
    chosen in its place. Such a gain is therefore also checked on the ``preferred`` leads.
    Lead names are compared with runs of white space folded to one space, as lead choice does.

    Raises:
        RecordError: Naming the lead, because its amplitudes cannot be converted to mV.
    """
    chosen = {" ".join(name.split()) for name in lead_names}
    checked = chosen | {" ".join(name.split()) for name in preferred}
    for signal in parse_signal_lines(lines):
        if signal.name not in checked or signal.adc_gain is None:
            continue
        if signal.adc_gain == 0 and signal.name in chosen:
            raise RecordError(
                record,
                f"lead {signal.name} has ADC gain 0 in its header (uncalibrated, so its "
                "amplitude in mV is unknown); write the gain in ADC units per mV",
            )
        if not math.isfinite(signal.adc_gain):
            raise RecordError(
                record,
                f"lead {signal.name} has an ADC gain in its header that is not a finite number "
                "(wfdb would read it as 200); write the gain in ADC units per mV",
            )


def check_sampling_rate(record: str, lines: list[str]) -> None:
    """Raise if the record line's sampling rate is not a positive plain decimal number.

    Raises:
        RecordError: With the text as written, because wfdb would read another rate.
    """
    fields = lines[0].split()
    if len(fields) < 3:
        return  # no rate field: WFDB's default of 250 Hz is part of the format
    rate_text = fields[2].split("/")[0]
    if not _RATE_TEXT.match(rate_text) or float(rate_text) <= 0:
        raise RecordError(
            record,
            f"sampling rate {rate_text!r} on the header's record line is not a positive "
            "decimal number such as 360 or 62.5, so wfdb would read another rate; correct it",
        )


def readable_frames(record: str, header_path: Path, lines: list[str]) -> int | None:
    """Return the number of whole frames in the signal files, or None without fixed-width files.

    The count is the smallest over the record's fixed-width signal files. The caller compares
    it with the length the header declares.
    """
    samples_per_frame: dict[str, int] = {}
    bytes_per_sample: dict[str, float] = {}
    offsets: dict[str, int] = {}
    for signal in parse_signal_lines(lines):
        if signal.format_code not in BYTES_PER_SAMPLE or signal.file_name == "~":
            return None
        samples_per_frame[signal.file_name] = (
            samples_per_frame.get(signal.file_name, 0) + signal.samples_per_frame
        )
        bytes_per_sample[signal.file_name] = BYTES_PER_SAMPLE[signal.format_code]
        offsets[signal.file_name] = signal.byte_offset
    frames: list[int] = []
    for file_name, spf in samples_per_frame.items():
        path = header_path.parent / file_name
        if not path.exists():
            raise RecordError(record, f"signal file {file_name} named in the header is missing")
        stored_bytes = path.stat().st_size - offsets[file_name]
        frames.append(math.floor(stored_bytes / (spf * bytes_per_sample[file_name])))
    return min(frames) if frames else None


def check_segment_count(record: str, lines: list[str]) -> None:
    """Raise if a multi-segment header lists fewer segments than its record line declares.

    Raises:
        RecordError: With both counts, because a missing segment shifts every later sample.
    """
    declared = int(lines[0].split()[0].split("/")[1])
    listed = len(lines) - 1
    if listed != declared:
        raise RecordError(
            record,
            f"multi-segment header declares {declared} segments but lists {listed}; "
            "restore the missing segment lines",
        )


def malformed_base_time(lines: list[str]) -> str | None:
    """Return the record line's base time and date text if it does not parse, else None."""
    fields = lines[0].split()
    # Record line: name[/segments] n_sig [fs[/counter[(base)]] [sig_len [time [date]]]]
    extra = fields[4:]
    if not extra:
        return None
    time_text = extra[0]
    date_text = extra[1] if len(extra) > 1 else None
    for time_format in ("%H:%M:%S.%f", "%H:%M:%S", "%M:%S", "%S"):
        with contextlib.suppress(ValueError):
            datetime.datetime.strptime(time_text, time_format)
            break
    else:
        return " ".join(extra)
    if date_text is not None:
        try:
            datetime.datetime.strptime(date_text, "%d/%m/%Y")
        except ValueError:
            return " ".join(extra)
    return None


@contextlib.contextmanager
def header_without_base_time(path: Path, lines: list[str]) -> Iterator[Path]:
    """Yield a record path whose header is a copy without the base time and date fields.

    The copy sits in a temporary folder next to symbolic links to the original signal files,
    so wfdb reads the same samples. The base time is not used by ingest.
    """
    with tempfile.TemporaryDirectory(prefix="appliance-header-") as folder:
        copy = Path(folder) / path.name
        fields = lines[0].split()
        record_line = " ".join(fields[:4])
        copy.with_name(f"{path.name}.hea").write_text("\n".join([record_line, *lines[1:]]) + "\n")
        for signal in parse_signal_lines(lines):
            link = Path(folder) / signal.file_name
            # is_symlink as well: a link to a missing signal file does not "exist", and linking
            # it again for a second signal of that file would raise FileExistsError.
            if not (link.is_symlink() or link.exists()):
                link.symlink_to((path.parent / signal.file_name).resolve())
        yield copy
