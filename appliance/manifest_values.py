"""Types and ranges of the manifest values that serving reads, checked when a version loads.

The model id covers the file hashes and the sections that shape replies, so an edit there fails
the id check. Sections outside the id (``training``, ``quality``, ``trained_at``, ``version``)
and a writer who recomputes the id could still leave a value that serving cannot use. Each is
checked here, so a damaged version is refused at start-up, with the key named, instead of
failing every call that reads it. This module does not import PyTorch or ONNX Runtime.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from appliance.classes import AAMI_CLASSES
from appliance.errors import ModelStoreError

# Largest sampling rate and window a version may state; far above any ECG recording.
MAX_FS_HZ = 100_000.0
MAX_WINDOW_SAMPLES = 1_000_000
MAX_LEADS = 64
# Largest class count; a count must also fit the proto's int64 field.
MAX_COUNT = 2**62


def _finite(value: object) -> float | None:
    """Return ``value`` as a finite float, or None if it is not a finite number."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond the float range
        return None
    return number if math.isfinite(number) else None


def _in_range(value: object, low: float, high: float, low_open: bool = False) -> bool:
    number = _finite(value)
    if number is None:
        return False
    return (low < number if low_open else low <= number) and number <= high


def _count(value: object, low: int, high: int) -> int | None:
    """Return ``value`` if it is an integer from ``low`` to ``high``, else None."""
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
        return value
    return None


def manifest_value_problems(manifest: dict[str, Any]) -> list[str]:
    """Return one phrase per manifest value that serving cannot use, naming its key.

    Arguments:
        manifest: A manifest whose ``files`` table was checked already.
    """
    problems: list[str] = []

    def need(ok: bool, key: str, value: object, expected: str) -> None:
        if not ok:
            value_text = repr(value)
            problems.append(
                f"{key}={value_text[:60]}{'...' if len(value_text) > 60 else ''} ({expected})"
            )

    def section(name: str) -> dict[str, Any]:
        value = manifest.get(name)
        need(isinstance(value, dict), name, value, "a table")
        return value if isinstance(value, dict) else {}

    for key in ("model_id", "version", "trained_at"):
        value = manifest.get(key)
        need(isinstance(value, str) and bool(value), key, value, "a non-empty string")

    data = section("data")
    need(
        _in_range(data.get("fs_hz"), 0.0, MAX_FS_HZ, low_open=True),
        "data.fs_hz",
        data.get("fs_hz"),
        f"a rate in Hz above 0 and at most {MAX_FS_HZ:g}",
    )
    window = _count(data.get("window_samples"), 1, MAX_WINDOW_SAMPLES)
    need(
        window is not None,
        "data.window_samples",
        data.get("window_samples"),
        f"a count from 1 to {MAX_WINDOW_SAMPLES}",
    )
    need(
        _count(data.get("pre_r_samples"), 0, (window or MAX_WINDOW_SAMPLES) - 1) is not None,
        "data.pre_r_samples",
        data.get("pre_r_samples"),
        "a count from 0 to data.window_samples - 1",
    )
    leads = data.get("leads")
    leads_ok = (
        isinstance(leads, list)
        and 0 < len(leads) <= MAX_LEADS
        and all(isinstance(name, str) and name for name in leads)
    )
    need(leads_ok, "data.leads", leads, f"a list of 1 to {MAX_LEADS} lead names")
    need(
        _in_range(data.get("scale_mv"), 0.0, math.inf, low_open=True),
        "data.scale_mv",
        data.get("scale_mv"),
        "a positive number of mV",
    )

    model = section("model")
    values_per_beat = len(leads) * window if leads_ok and window and isinstance(leads, list) else 0
    latent = _count(model.get("latent_dims"), 1, MAX_LEADS * MAX_WINDOW_SAMPLES)
    need(
        latent is not None and (not values_per_beat or latent == values_per_beat),
        "model.latent_dims",
        model.get("latent_dims"),
        f"the values per beat, data.leads x data.window_samples = {values_per_beat}",
    )
    need(
        _count(model.get("bottleneck_dims"), 1, latent or MAX_LEADS * MAX_WINDOW_SAMPLES)
        is not None,
        "model.bottleneck_dims",
        model.get("bottleneck_dims"),
        "a count from 1 to model.latent_dims",
    )

    classes = manifest.get("classes_known")
    need(
        isinstance(classes, list)
        and bool(classes)
        and all(isinstance(name, str) and name in AAMI_CLASSES for name in classes)
        and len(set(classes)) == len(classes),
        "classes_known",
        classes,
        f"distinct names from {', '.join(AAMI_CLASSES)}",
    )

    gate = section("gate")
    margins = []
    for key in ("min_margin", "default_margin", "max_margin"):
        need(_in_range(gate.get(key), 0.0, 1.0), f"gate.{key}", gate.get(key), "from 0 to 1")
        margins.append(_finite(gate.get(key)))
    low, default, high = margins
    if low is not None and default is not None and high is not None:
        need(
            low <= default <= high,
            "gate.default_margin",
            default,
            "between gate.min_margin and gate.max_margin",
        )
    for key in ("truncation", "max_abs_mv"):
        value = gate.get(key)
        need(_in_range(value, 0.0, math.inf, low_open=True), f"gate.{key}", value, "above 0")
    if "tail_scale" in gate:
        value = gate["tail_scale"]
        need(_in_range(value, 0.0, math.inf), "gate.tail_scale", value, "0 or more")

    if "privacy_index" in manifest.get("files", {}):
        threshold = section("privacy").get("threshold")
        need(
            _in_range(threshold, 0.0, math.inf, low_open=True),
            "privacy.threshold",
            threshold,
            "a positive distance; 0 or less would turn the near-copy guard off",
        )

    counts = section("training").get("train_class_counts", {})
    need(
        isinstance(counts, dict)
        and all(
            isinstance(name, str) and _count(value, 0, MAX_COUNT) is not None
            for name, value in counts.items()
        ),
        "training.train_class_counts",
        counts,
        "beat counts per class name",
    )
    quality = manifest.get("quality", {})
    need(
        isinstance(quality, dict)
        and all(
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or _finite(value) is not None
            for value in quality.values()
        ),
        "quality",
        quality,
        "finite figures",
    )
    return problems


def check_manifest_values(manifest: dict[str, Any], manifest_path: Path) -> None:
    """Raise ``ModelStoreError`` naming every manifest value that serving cannot use."""
    problems = manifest_value_problems(manifest)
    if problems:
        raise ModelStoreError(
            f"manifest {manifest_path} has values that the appliance never writes: "
            f"{'; '.join(problems)}. The version is damaged or was edited; restore it, or "
            "publish the model again with `python -m appliance export` or `train`"
        )
