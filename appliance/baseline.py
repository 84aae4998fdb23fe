"""Check of client beats for baseline wander, a DC offset or a wrong unit before scoring.

The model learned beats in mV after baseline-wander removal (a 0.5 Hz zero-phase high-pass,
see ``appliance.ecg.remove_baseline``), so the mean level of each window sits near 0 mV. Beats
cut from a signal that still has its offset or its wander sit higher or lower, and the server
then scores them low and may pick a wrong best-fitting class. The check measures that level
on the client; it never changes the beats.

Statistic and limits come from the 48 MIT-BIH records: 109,452 windows of the first
configured lead, cut where ``appliance.ecg.read_record`` cuts them, once from the signal after
its high-pass and once from the raw signal. ``tests/test_baseline.py`` repeats this
measurement and checks the record-level results below.

- Statistic: the mean of each lead's window. The high-pass makes the mean over a cardiac cycle
  about 0, and a window covers about one cycle. The window median keeps more of the QRS
  complex and T wave: over one record, the median of the window medians reaches -0.14 mV
  (record 116), while the median of the window means stays within 0.08 mV (record 113).
- Processed windows: 313 of 109,452 (0.29 %) have a mean beyond 0.2 mV. The highest share in
  one record is 3.4 % (record 105, whose header notes high-grade noise and artifact), below the
  10 % that warns, so no whole processed record warns.
- Raw windows: every record warns. The lowest share beyond 0.2 mV is 10.4 % (record 201, with
  a median raw offset of -0.195 mV), and 24 records are above 50 %.
- A constant offset of 0.25 mV, of either sign, added to the processed windows makes every
  record warn.

NOTE: in a batch of fewer than 10 beats one offset beat is enough to warn. With processed
beats drawn at random from all records, that happens to 0.29 % of one-beat batches and about
1.4 % of five-beat batches.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

# Mean level of a window, in mV, beyond which a beat counts as offset.
OFFSET_LIMIT_MV = 0.2
# Share of the beats that must be offset before the check warns.
OFFSET_SHARE_LIMIT = 0.1
# Median peak-to-peak amplitude of a batch, in mV, outside which the beats are probably not in
# mV. One beat's largest peak-to-peak over its leads lies between 0.39 and 5.5 mV for 15,544
# ingested MIT-BIH beats (held-out DS1 and 1,000 DS2 beats, lead MLII). The same beats in uV
# have a median near 2,000 and in V near 0.002.
UNIT_LOW_MV = 0.05
UNIT_HIGH_MV = 50.0
# Section of docs/api.md that states the input contract and how to meet it.
API_DOC_SECTION = "docs/api.md, section 'Input beats: millivolts without baseline wander'"


@dataclass(frozen=True)
class BaselineOffset:
    """Result of the baseline check of one batch of beats.

    Attributes:
        beats: Beats checked.
        offset_beats: Beats with a lead whose window mean is beyond ``OFFSET_LIMIT_MV``.
        median_offset_mv: Median of those beats' window means (the lead furthest from 0 of
            each beat), in mV; 0 when no beat is offset.
        largest_offset_mv: The window mean furthest from 0 over every beat and lead, with its
            sign, in mV.
        median_peak_to_peak_mv: Median over the beats of each beat's largest peak-to-peak
            amplitude over its leads, in the unit the beats came in (mV when they are right).
            NaN when no beat is finite.
        low_amplitude_beats: Beats whose peak-to-peak amplitude is below ``UNIT_LOW_MV``,
            flat beats included.
        high_amplitude_beats: Beats whose peak-to-peak amplitude is above ``UNIT_HIGH_MV``.
        flat_beats: Beats whose every lead is constant (peak-to-peak 0).
    """

    beats: int
    offset_beats: int
    median_offset_mv: float
    largest_offset_mv: float
    median_peak_to_peak_mv: float = 0.0
    low_amplitude_beats: int = 0
    high_amplitude_beats: int = 0
    flat_beats: int = 0

    @property
    def suspect(self) -> bool:
        """Whether more than ``OFFSET_SHARE_LIMIT`` of the beats are offset."""
        return self.offset_beats > OFFSET_SHARE_LIMIT * self.beats

    @property
    def flat_suspect(self) -> bool:
        """Whether more than ``OFFSET_SHARE_LIMIT`` of the beats are flat."""
        return self.flat_beats > OFFSET_SHARE_LIMIT * self.beats

    @property
    def unit_suspect(self) -> bool:
        """Whether the beats are probably not in mV.

        True when the median amplitude, or the amplitude of more than ``OFFSET_SHARE_LIMIT`` of
        the beats that are not flat, lies outside ``UNIT_LOW_MV`` to ``UNIT_HIGH_MV``.
        """
        if self.beats == 0 or not np.isfinite(self.median_peak_to_peak_mv):
            return False
        if not UNIT_LOW_MV <= self.median_peak_to_peak_mv <= UNIT_HIGH_MV:
            return True
        return self.out_of_range_beats > OFFSET_SHARE_LIMIT * self.beats

    @property
    def out_of_range_beats(self) -> int:
        """Beats that are not flat and whose amplitude lies outside the mV range."""
        return self.high_amplitude_beats + self.low_amplitude_beats - self.flat_beats


@dataclass(frozen=True)
class BeatLevels:
    """Per-beat figures that the baseline and unit checks summarise.

    Attributes:
        window_mean_mv: Window mean of each beat's lead furthest from 0, with its sign, in
            mV; NaN for a beat with a NaN or infinite sample. Shape (beats,).
        peak_to_peak_mv: Largest peak-to-peak amplitude over each beat's leads, in the unit
            the beats came in; NaN for a beat with a NaN or infinite sample. Shape (beats,).
    """

    window_mean_mv: np.ndarray
    peak_to_peak_mv: np.ndarray

    @classmethod
    def concatenate(cls, parts: list[BeatLevels]) -> BeatLevels:
        """Join the figures of several batches, in order, as if they were one batch."""
        if not parts:
            return cls(np.zeros(0), np.zeros(0))
        return cls(
            np.concatenate([part.window_mean_mv for part in parts]),
            np.concatenate([part.peak_to_peak_mv for part in parts]),
        )


def measure_beat_levels(beats: np.ndarray) -> BeatLevels:
    """Measure each beat's window mean and peak-to-peak amplitude.

    Arguments:
        beats: Shape (beats, leads, window_samples), in mV.

    Raises:
        ValueError: If ``beats`` does not have three dimensions or contains text that is not
            a number.
    """
    if beats.ndim != 3:
        raise ValueError(
            f"beats must have shape (beats, leads, window_samples), got {beats.shape}"
        )
    if beats.shape[1] == 0 or beats.shape[2] == 0:
        nothing = np.full(beats.shape[0], np.nan)
        return BeatLevels(nothing, nothing.copy())
    if not np.issubdtype(beats.dtype, np.number):
        beats = beats.astype(np.float64)  # ValueError for text that is not a number
    # A beat with both +inf and -inf gives inf - inf, which NumPy warns about. Such beats are
    # marked non-finite below, and the server rejects them with a message of its own.
    with np.errstate(invalid="ignore", over="ignore"):
        means = beats.mean(axis=2, dtype=np.float64)  # (beats, leads)
        peak_to_peak = np.ptp(beats, axis=2).max(axis=1).astype(np.float64)
    finite = np.isfinite(means).all(axis=1)
    # The lead furthest from 0 represents the beat, with its sign.
    furthest = np.take_along_axis(
        means, np.abs(np.nan_to_num(means)).argmax(axis=1)[:, None], axis=1
    )[:, 0]
    return BeatLevels(
        window_mean_mv=np.where(finite, furthest, np.nan),
        peak_to_peak_mv=np.where(np.isfinite(peak_to_peak), peak_to_peak, np.nan),
    )


def summarise_beat_levels(levels: BeatLevels) -> BaselineOffset:
    """Count the offset beats and take the median amplitude of a batch's figures."""
    means = levels.window_mean_mv
    finite = np.isfinite(means)
    offset = finite & (np.abs(np.nan_to_num(means)) > OFFSET_LIMIT_MV)
    median = float(np.median(means[offset])) if offset.any() else 0.0
    largest = float(means[finite][np.abs(means[finite]).argmax()]) if finite.any() else 0.0
    finite_ptp = levels.peak_to_peak_mv[np.isfinite(levels.peak_to_peak_mv)]
    return BaselineOffset(
        beats=int(means.shape[0]),
        offset_beats=int(offset.sum()),
        median_offset_mv=median,
        largest_offset_mv=largest,
        # NaN when no beat is finite, so that beats the server rejects get no unit warning.
        median_peak_to_peak_mv=float(np.median(finite_ptp)) if finite_ptp.size else math.nan,
        low_amplitude_beats=int((finite_ptp < UNIT_LOW_MV).sum()),
        high_amplitude_beats=int((finite_ptp > UNIT_HIGH_MV).sum()),
        flat_beats=int((finite_ptp == 0).sum()),
    )


def measure_baseline_offset(beats: np.ndarray) -> BaselineOffset:
    """Measure the mean level of each beat's window, in mV, and count the offset beats.

    Arguments:
        beats: Shape (beats, leads, window_samples), in mV. Beats with a NaN or infinite sample
            are not counted as offset; the server rejects them anyway.

    Raises:
        ValueError: If ``beats`` does not have three dimensions or contains text that is not
            a number.
    """
    return summarise_beat_levels(measure_beat_levels(beats))


@dataclass(frozen=True)
class InputProblem:
    """A property of a batch of beats that makes their scores unreliable.

    Attributes:
        kind: ``flat`` when many beats are constant, ``unit`` when the beats are probably not
            in mV, ``baseline`` when they probably carry baseline wander or a DC offset.
        message: Sentences with the measured figures and how to fix the beats.
    """

    kind: str
    message: str


def find_input_problem(result: BaselineOffset) -> InputProblem | None:
    """Return the flat, unit or baseline problem that ``result`` shows, or None.

    Flat beats come first, because they have no amplitude to judge a unit by. A wrong unit
    comes before the baseline, because an offset measured in the wrong unit means nothing about
    the baseline.
    """
    if result.flat_suspect:
        return InputProblem(
            "flat",
            f"input beats are flat: flat_beats={result.flat_beats} beats={result.beats} have "
            "the same value at every sample of every lead, so they carry no ECG signal and "
            "score low. Check how the beats were cut from the recording and that the right "
            f"lead was read; see {API_DOC_SECTION}",
        )
    if result.unit_suspect:
        too_low = result.low_amplitude_beats - result.flat_beats
        if result.median_peak_to_peak_mv < UNIT_LOW_MV or too_low > result.high_amplitude_beats:
            advice = "They are probably in V: multiply them by 1000 to convert them to mV"
        else:
            # Raw ADC counts also land here, for example int16 MIT-BIH samples, whose median
            # peak-to-peak amplitude is a few hundred counts at a gain of 200 per mV.
            advice = (
                "They are probably in uV or in raw ADC units and must be converted to mV. For "
                "uV, divide them by 1000. For ADC counts, subtract the baseline and divide by "
                "the gain (ADC units per mV) that the record header gives for the lead"
            )
        return InputProblem(
            "unit",
            f"input beats are probably not in mV: their median peak-to-peak amplitude is "
            f"{result.median_peak_to_peak_mv:.4g} in the unit they came in, and "
            f"{result.out_of_range_beats} of "
            f"{result.beats} beats lie outside {UNIT_LOW_MV:g} to {UNIT_HIGH_MV:g}. In mV, one "
            "ECG beat spans about 0.4 to 5.5. Validate expects mV, so these beats score low. "
            f"{advice}. See {API_DOC_SECTION}",
        )
    if result.suspect:
        return InputProblem(
            "baseline",
            f"input beats carry baseline wander or a DC offset: offset_beats="
            f"{result.offset_beats} beats={result.beats} median_offset_mv="
            f"{result.median_offset_mv:.3f} largest_offset_mv={result.largest_offset_mv:.3f} "
            f"limit_mv={OFFSET_LIMIT_MV:.2f}. Validate expects mV after baseline-wander "
            "removal, so these beats score low and may get a wrong best-fitting class. Remove "
            "the baseline first, for example with a 0.5 Hz zero-phase high-pass filter; see "
            f"{API_DOC_SECTION}",
        )
    return None


def check_baseline(beats: np.ndarray) -> BaselineOffset:
    """Measure the beats' baseline offset and amplitude, and log a warning when either is off.

    A batch whose median peak-to-peak amplitude lies outside ``UNIT_LOW_MV`` to
    ``UNIT_HIGH_MV`` gets a warning about its unit. Otherwise a batch with more than
    ``OFFSET_SHARE_LIMIT`` offset beats gets a warning about its baseline.

    Call it on beats in mV before ``ApplianceClient.validate``; ``python -m appliance validate``
    calls it on its input. Scoring is not affected: the beats are sent as they are.

    Arguments:
        beats: Shape (beats, leads, window_samples), in mV.

    Raises:
        ValueError: If ``beats`` does not have three dimensions or contains text that is not
            a number.
    """
    result = measure_baseline_offset(beats)
    problem = find_input_problem(result)
    if problem is not None:
        logger.warning("%s", problem.message)
    return result
