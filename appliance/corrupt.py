"""Corrupted versions of real beats, the out-of-distribution cases the gate must reject."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from appliance.config import DataConfig
from appliance.ecg import read_record

# Corruptions of a beat on its own. "other_lead" needs a second lead: ``read_other_lead``.
CORRUPTIONS = (
    "gaussian_noise",
    "flat_line",
    "amplitude_x0.1",
    "amplitude_x5",
    "time_reversed",
    "baseline_step",
    "mains_50hz",
    "sinusoid",
)
MAINS_HZ = 50.0
MAINS_AMPLITUDE_MV = 0.3
# Frequency of the smooth sinusoid, a heart rate of 72 beats per minute.
HEART_RATE_HZ = 1.2
BASELINE_STEP_MV = 1.0


def corrupt(beats: np.ndarray, kind: str, fs_hz: float, rng: np.random.Generator) -> np.ndarray:
    """Return corrupted copies of beats.

    Arguments:
        beats: Real beats, shape (beats, leads, window_samples), in mV.
        kind: One of ``CORRUPTIONS``.
        fs_hz: Sampling rate of the beats.
        rng: Random generator for noise, phases and amplitudes.

    Returns:
        Corrupted beats, same shape, in mV.

    Raises:
        ValueError: If ``kind`` is unknown.
    """
    count, leads, samples = beats.shape
    t_s = np.arange(samples) / fs_hz
    scale = beats.std(axis=(1, 2), keepdims=True)
    if kind == "gaussian_noise":
        return rng.standard_normal(beats.shape) * scale
    if kind == "flat_line":
        return np.repeat(beats.mean(axis=2, keepdims=True), samples, axis=2)
    if kind == "amplitude_x0.1":
        return beats * 0.1
    if kind == "amplitude_x5":
        return beats * 5.0
    if kind == "time_reversed":
        return beats[:, :, ::-1].copy()
    if kind == "baseline_step":
        step = np.where(
            np.arange(samples) >= rng.integers(samples // 4, 3 * samples // 4),
            BASELINE_STEP_MV,
            0.0,
        )
        return beats + step[None, None, :]
    if kind == "mains_50hz":
        phase = rng.uniform(0, 2 * np.pi, size=(count, 1, 1))
        return beats + MAINS_AMPLITUDE_MV * np.sin(2 * np.pi * MAINS_HZ * t_s + phase)
    if kind == "sinusoid":
        phase = rng.uniform(0, 2 * np.pi, size=(count, 1, 1))
        peak = np.ptp(beats, axis=2, keepdims=True) / 2
        return peak * np.sin(2 * np.pi * HEART_RATE_HZ * t_s + phase)
    raise ValueError(f"unknown corruption {kind!r}; expected one of {', '.join(CORRUPTIONS)}")


OTHER_LEAD = "other_lead"
# Lead read for the "other_lead" case; MIT-BIH records pair MLII with V1 most often.
OTHER_LEAD_NAME = "V1"


def read_other_lead(
    path: Path, record: str, config: DataConfig, lead: str = OTHER_LEAD_NAME
) -> np.ndarray:
    """Read the beats of one record from a lead the model was not trained on.

    Arguments:
        path: Record path without extension.
        record: Record name used in messages.
        config: Data settings of the model; only the lead choice is replaced.
        lead: Name of the lead to read.

    Returns:
        Beats, shape (beats, 1, window_samples), in mV.

    Raises:
        RecordError: If the record cannot be read or has no such lead.
    """
    beats = read_record(path, record, replace(config, leads=(lead,), n_leads=1))
    return beats.windows


def ood_suite(
    beats: np.ndarray, other_lead: np.ndarray, fs_hz: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Build every out-of-distribution case from real beats.

    Arguments:
        beats: Real beats, shape (beats, leads, window_samples), in mV.
        other_lead: Beats of the same records from another lead, shape
            (other, leads, window_samples), in mV; used as they are.
        fs_hz: Sampling rate of the beats.
        rng: Random generator for noise, phases and amplitudes.

    Returns:
        Corrupted beats of each kind in ``CORRUPTIONS``, then ``OTHER_LEAD``, in mV.
    """
    suite = {kind: corrupt(beats, kind, fs_hz, rng) for kind in CORRUPTIONS}
    suite[OTHER_LEAD] = other_lead
    return suite
