"""Quality and privacy metrics on cases whose answer is known, and the report end to end."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from appliance.classes import class_index
from appliance.config import DEFAULT_DATA_DIR, TrainConfig
from appliance.outputs import MIN_REAL_BEATS_PER_CLASS, real_vs_synthetic_figure
from appliance.quality.baselines import (
    CopyGenerator,
    NoiseGenerator,
    PcaGaussian,
    RealNvpBaseline,
    RealNvpConfig,
)
from appliance.quality.classifier import ClassifierConfig, f1_per_class
from appliance.quality.discriminative import discriminative_score
from appliance.quality.evaluate import QualityConfig, evaluate_generators
from appliance.quality.mmd import frechet_distance, mmd2_test, power_spectra
from appliance.quality.morphology import morphology_report
from appliance.quality.privacy_metrics import (
    auroc,
    closest_distance,
    matched_samples,
    membership_auroc,
    privacy_report,
)
from appliance.quality.protocol import LabelledBeats, load_protocol, subsample, znormalise
from appliance.quality.report import beats_figure, build_report, render_html
from appliance.report_store import shortfall_warnings
from appliance.train import select_training_beats

N, S, V, F = (class_index(name) for name in "NSVF")
FAST_CLASSIFIER = ClassifierConfig(steps=40, batch_size=32)


@pytest.fixture(scope="module")
def protocol():
    """The de Chazal protocol on the bundled records (DS1: 106 208 209 220 223; DS2: 213 232)."""
    return load_protocol(DEFAULT_DATA_DIR)


@pytest.fixture(scope="module")
def small_fit(protocol) -> LabelledBeats:
    return subsample(protocol.fit, 300, seed=0)


def test_znormalise_gives_unit_beats():
    rng = np.random.default_rng(0)
    beats = rng.normal(3.0, 5.0, size=(4, 1, 256))
    beats[3] = 2.0
    z = znormalise(beats)
    assert np.allclose(z[:3].mean(axis=(1, 2)), 0.0, atol=1e-5)
    assert np.allclose(z[:3].std(axis=(1, 2)), 1.0, atol=1e-4)
    assert np.all(z[3] == 0.0)


def test_protocol_keeps_sets_apart(protocol):
    assert len(protocol.fit) > 0
    assert len(protocol.holdout) > 0
    assert len(protocol.test) > 0
    assert protocol.holdout_mv.shape == protocol.holdout.beats.shape
    assert np.allclose(protocol.fit.beats.std(axis=(1, 2)), 1.0, atol=1e-3)


def test_mmd_same_distribution_near_zero(small_fit):
    normal = small_fit.of_class(N)
    rng = np.random.default_rng(1)
    order = rng.permutation(len(normal))
    half = len(order) // 2
    result = mmd2_test(normal[order[:half]], normal[order[half:]], permutations=100)
    # The unbiased estimator is near 0; the biased one, which keeps the kernel's diagonal,
    # would be about 5e-3 here.
    assert abs(result.mmd2) < 1e-3
    assert result.p_value > 0.05


def test_mmd_noise_is_large_and_significant(small_fit):
    normal = small_fit.of_class(N)[:100]
    noise = NoiseGenerator((1, 256)).sample({N: 100}, seed=0).beats
    result = mmd2_test(normal, noise, permutations=100)
    assert result.mmd2 > 0.1
    assert result.p_value == pytest.approx(1 / 101)


def test_mmd_rejects_tiny_samples():
    with pytest.raises(ValueError, match="at least 2 rows"):
        mmd2_test(np.zeros((1, 5)), np.zeros((3, 5)))


def test_power_spectra_sum_to_one(small_fit):
    spectra = power_spectra(small_fit.beats[:10], fs_hz=360.0)
    assert spectra.shape == (10, 129)
    assert np.allclose(spectra.sum(axis=1), 1.0)


def test_frechet_distance_of_shifted_gaussian():
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((4000, 3))
    assert frechet_distance(sample, sample) == pytest.approx(0.0, abs=1e-6)
    shifted = sample + np.array([3.0, 0.0, 4.0])
    assert frechet_distance(sample, shifted) == pytest.approx(25.0, rel=1e-3)


def test_frechet_distance_of_scaled_gaussian():
    # N(0, I) against N(0, 4I) in 3 dimensions: trace(I + 4I - 2 * 2I) = 3.
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((20000, 3))
    scaled = 2.0 * rng.standard_normal((20000, 3))
    assert frechet_distance(sample, scaled) == pytest.approx(3.0, rel=0.05)


def test_auroc_known_cases():
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 0.0
    assert auroc(np.ones(5), np.ones(7)) == 0.5


def test_f1_per_class_known_answer():
    true = np.array([N, N, N, S, S, V])
    predicted = np.array([N, N, S, S, N, V])
    f1 = f1_per_class(true, predicted)
    assert f1["N"] == pytest.approx(2 / 3)
    assert f1["S"] == pytest.approx(0.5)
    assert f1["V"] == pytest.approx(1.0)
    assert f1["F"] is None
    assert f1["macro"] == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)


def split_members(fit: LabelledBeats, per_class: int) -> tuple[LabelledBeats, LabelledBeats]:
    """Split ``fit`` into random members (at most ``per_class`` per class) and the rest."""
    rng = np.random.default_rng(0)
    members = np.zeros(len(fit), dtype=bool)
    for class_index_ in np.unique(fit.labels):
        of_class = np.flatnonzero(fit.labels == class_index_)
        members[rng.choice(of_class, size=min(per_class, of_class.size), replace=False)] = True
    return (
        LabelledBeats(fit.beats[members], fit.labels[members]),
        LabelledBeats(fit.beats[~members], fit.labels[~members]),
    )


def test_privacy_flags_copied_beats(protocol):
    members, unseen = split_members(protocol.fit, 100)
    counts = {c: 20 * n for c, n in enumerate(np.bincount(members.labels)) if n}
    copies = CopyGenerator(members).sample(counts, seed=0)  # nearly every member copied
    report = privacy_report(
        copies.beats, members, protocol.holdout, seed=0, max_members=150, unseen=unseen
    )
    assert report["dcr_synthetic_median"] == pytest.approx(0.0, abs=1e-3)
    dcr_holdout = closest_distance(protocol.holdout.beats, members.beats)
    assert report["holdout_dcr_p05"] == pytest.approx(np.quantile(dcr_holdout, 0.05))
    assert report["dcr_holdout_median"] == pytest.approx(np.median(dcr_holdout))
    assert report["fraction_below_holdout_p05"] > 0.99
    assert report["mia_auroc"] > 0.8
    assert report["mia_auroc_unseen"] > 0.8


def test_privacy_passes_noise(protocol):
    members, unseen = split_members(protocol.fit, 100)
    noise = NoiseGenerator((1, 256)).sample({N: 300}, seed=0)
    report = privacy_report(
        noise.beats, members, protocol.holdout, seed=0, max_members=300, unseen=unseen
    )
    assert report["fraction_below_holdout_p05"] == 0.0
    assert report["dcr_synthetic_median"] > report["dcr_holdout_median"]
    assert 0.35 < report["mia_auroc"] < 0.65
    assert 0.35 < report["mia_auroc_unseen"] < 0.65


def test_unseen_auroc_absent_without_unseen_beats(protocol):
    members, _ = split_members(protocol.fit, 100)
    noise = NoiseGenerator((1, 256)).sample({N: 50}, seed=0)
    report = privacy_report(noise.beats, members, protocol.holdout, seed=0, max_members=100)
    assert report["mia_auroc_unseen"] is None
    assert report["mia_auroc"] is not None


def toy_beats(rng: np.random.Generator, labels: np.ndarray) -> LabelledBeats:
    """Beats of two kinds: class 0 near one smooth shape, class 1 spread far from it."""
    t = np.linspace(0.0, 1.0, 64)
    shape = np.exp(-(((t - 0.4) / 0.05) ** 2))
    beats = np.empty((labels.size, 1, t.size))
    for i, label in enumerate(labels):
        noise = rng.standard_normal(t.size)
        beats[i, 0] = shape + 0.05 * noise if label == 0 else noise
    return LabelledBeats(beats, labels.astype(np.int64))


def test_membership_auroc_matches_classes():
    # Members and non-members come from the same two distributions, so membership leaks
    # nothing. Members are mostly class 0, which lies near the synthetic beats, and non-members
    # mostly class 1. Without matching the classes the attack would look strong.
    rng = np.random.default_rng(0)
    members = toy_beats(rng, np.repeat([0, 1], [900, 100]))
    others = toy_beats(rng, np.repeat([0, 1], [100, 900]))
    synthetic = toy_beats(rng, np.zeros(200, dtype=np.int64)).beats
    unmatched = auroc(
        -closest_distance(members.beats, synthetic), -closest_distance(others.beats, synthetic)
    )
    assert unmatched > 0.8
    matched = membership_auroc(synthetic, members, others, np.random.default_rng(1), 1000)
    assert matched is not None
    assert 0.4 < matched < 0.6


def test_matched_samples_have_equal_class_counts():
    rng = np.random.default_rng(0)
    first_labels = np.repeat([0, 1, 2], [50, 50, 3])
    second_labels = np.repeat([0, 1, 2, 3], [10, 20, 5, 7])  # class 3 is not in the first set
    first, second = matched_samples(first_labels, second_labels, 100, rng)
    assert np.array_equal(np.bincount(first_labels[first]), [10, 20, 3])
    assert np.array_equal(np.bincount(second_labels[second]), [10, 20, 3])
    assert np.unique(first).size == first.size
    smaller_first, smaller_second = matched_samples(first_labels, second_labels, 6, rng)
    assert 0 < smaller_second.size <= 6
    assert np.array_equal(
        np.bincount(first_labels[smaller_first], minlength=3),
        np.bincount(second_labels[smaller_second], minlength=3),
    )


def test_protocol_members_are_capped_beats():
    cap = 200
    data = load_protocol(DEFAULT_DATA_DIR, training=TrainConfig(max_beats_per_class=cap, seed=3))
    _, selected = select_training_beats(data.fit.labels, cap, 3)
    assert np.array_equal(data.members.labels, data.fit.labels[selected])
    assert np.array_equal(data.members.beats, data.fit.beats[selected])
    counts = np.bincount(data.members.labels)
    assert counts.max() == cap
    # Every fit beat of a known class is a member or unseen, never both.
    known = np.isin(data.fit.labels, np.unique(data.members.labels))
    assert len(data.members) + len(data.unseen) == int(known.sum())
    assert np.all(np.bincount(data.unseen.labels, minlength=counts.size)[counts < cap] == 0)


def test_discriminative_separates_noise(small_fit):
    noise = NoiseGenerator((1, 256)).sample({N: 200, V: 200}, seed=0)
    result = discriminative_score(small_fit, noise, FAST_CLASSIFIER, seed=0)
    assert result["overall"] > 0.4
    assert result["per_class"]["N"] > 0.4


def test_discriminative_cannot_tell_real_halves(protocol):
    first = subsample(protocol.fit, 200, seed=1)
    second = subsample(protocol.fit, 200, seed=2)
    copies = CopyGenerator(second).sample({N: 200, V: 200}, seed=3)
    result = discriminative_score(first, copies, FAST_CLASSIFIER, seed=0)
    assert result["overall"] < 0.15


def test_morphology_of_copies_matches_real(small_fit):
    copies = CopyGenerator(small_fit).sample({N: 60}, seed=0)
    report = morphology_report(small_fit, copies, 360.0, 90, per_class=30, seed=0)
    qrs = report["N"]["qrs_width_ms"]
    assert 40.0 < qrs["real"]["median"] < 200.0
    assert abs(qrs["median_difference"]) < 15.0
    assert qrs["real"]["found"] > 0.8
    assert "V" not in report  # no synthetic V beats were drawn


def beats_of_classes(source: LabelledBeats, counts: dict[int, int]) -> LabelledBeats:
    """Return the first ``counts[c]`` beats of each class ``c`` of ``source``."""
    beats = [source.of_class(c)[:n] for c, n in counts.items()]
    for (c, n), chosen in zip(counts.items(), beats, strict=True):
        assert len(chosen) == n, f"the source has {len(chosen)} beats of class {c}, not {n}"
    labels = [np.full(n, c) for c, n in counts.items()]
    return LabelledBeats(np.concatenate(beats), np.concatenate(labels))


def test_morphology_withholds_few_real_beats(protocol):
    few = MIN_REAL_BEATS_PER_CLASS - 1
    real = beats_of_classes(protocol.fit, {N: MIN_REAL_BEATS_PER_CLASS, V: few})
    synthetic = beats_of_classes(protocol.fit, {N: 10, V: 10})
    report = morphology_report(real, synthetic, 360.0, 90, per_class=100, seed=0)
    for measure, entry in report["V"].items():
        assert entry["real_withheld"] is True, measure
        assert entry["real_beats"] == few, measure
        assert set(entry["real"].values()) == {None}, measure
        assert entry["median_difference"] is None, measure
        assert entry["synthetic"]["found"] is not None, measure
    qrs = report["N"]["qrs_width_ms"]
    assert qrs["real_withheld"] is False
    assert qrs["real_beats"] == MIN_REAL_BEATS_PER_CLASS
    assert qrs["real"]["median"] is not None


def test_morphology_counts_delineated_real_beats(small_fit):
    # per_class below the minimum caps the real beats delineated, so every real summary is
    # withheld.
    synthetic = beats_of_classes(small_fit, {N: 5})
    report = morphology_report(small_fit, synthetic, 360.0, 90, per_class=10, seed=0)
    qrs = report["N"]["qrs_width_ms"]
    assert qrs["real_beats"] == 10
    assert qrs["real_withheld"] is True
    assert qrs["real"]["median"] is None


def test_morphology_skip_names_class_and_set(small_fit, caplog: pytest.LogCaptureFixture):
    # NeuroKit2 rejects a signal of 2 beats as too short for its wavelets.
    synthetic = beats_of_classes(small_fit, {N: 2})
    with caplog.at_level(logging.WARNING, logger="appliance.quality.morphology"):
        report = morphology_report(small_fit, synthetic, 360.0, 90, per_class=40, seed=0)
    skipped = [r.getMessage() for r in caplog.records if "delineation skipped" in r.getMessage()]
    assert len(skipped) == 1
    assert skipped[0].startswith("delineation skipped class=N set=synthetic beats=2 reason=")
    assert report["N"]["qrs_width_ms"]["synthetic"]["median"] is None


def test_protocol_warns_on_partial_database(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING, logger="appliance.quality.protocol"):
        load_protocol(DEFAULT_DATA_DIR)
    warnings = [r.getMessage() for r in caplog.records if "de Chazal records" in r.getMessage()]
    assert len(warnings) == 1
    bundled = {path.stem for path in DEFAULT_DATA_DIR.glob("*.hea")}
    # The bundled folder contains 7 of the 44 records.
    assert f"lacks {44 - len(bundled)} of the 44 de Chazal records" in warnings[0]
    assert "101," in warnings[0]
    assert "106," not in warnings[0]


def test_beats_figure_withholds_few_real_beats(protocol):
    # The bundled DS1 records contain 2 Q beats.
    few = {class_index("Q"): 2, V: 1}
    fit = beats_of_classes(protocol.fit, {N: MIN_REAL_BEATS_PER_CLASS, **few})
    data = dataclasses.replace(protocol, fit=fit)
    synthetic = beats_of_classes(protocol.fit, {N: 3, V: 3})
    synthetic = LabelledBeats(
        np.concatenate([synthetic.beats, synthetic.beats[:2]]),
        np.concatenate([synthetic.labels, np.full(2, class_index("Q"))]),
    )
    figure = beats_figure("test", data, synthetic)
    panels = dict(zip("NSVFQ", figure.axes, strict=True))
    # The N panel has the band (one filled area), the mean line and three synthetic beats.
    assert len(panels["N"].collections) == 1
    assert len(panels["N"].lines) == 4
    assert "left out" not in panels["N"].get_title()
    for name, synthetic_count in (("V", 3), ("Q", 2)):
        panel = panels[name]
        assert len(panel.collections) == 0, name
        assert len(panel.lines) == synthetic_count, name
        assert "real mean and band left out" in panel.get_title(), name
        assert f"fewer than {MIN_REAL_BEATS_PER_CLASS}" in panel.get_title(), name
        # Wrapped to the panel, so that the last panel's title stays inside the figure.
        assert max(len(line) for line in panel.get_title().splitlines()) <= 40, name


def test_real_vs_synthetic_withholds_few_real_beats(protocol):
    real = beats_of_classes(protocol.fit, {N: MIN_REAL_BEATS_PER_CLASS, V: 4})
    names = ["N", "N", "V", "V"]
    synthetic = np.concatenate([real.of_class(N)[:2], real.of_class(V)[:2]])
    figure = real_vs_synthetic_figure(real.beats, real.labels, synthetic, names, 360.0)
    panel_n, panel_v = figure.axes
    assert len(panel_n.collections) == 1
    assert len(panel_n.lines) == 3
    assert len(panel_v.collections) == 0
    assert len(panel_v.lines) == 2
    assert "real mean and band left out: 4 real beats" in panel_v.get_title()
    assert "left out" not in panel_n.get_title()


def test_baselines_sample_requested_classes(small_fit):
    flow = RealNvpBaseline(
        small_fit, RealNvpConfig(dims=8, transforms=2, hidden_features=32, steps=10, batch_size=64)
    )
    for generator in (PcaGaussian(small_fit, dims=8), flow):
        sample = generator.sample({N: 5, V: 3, F: 0}, seed=0)
        assert sample.beats.shape == (8, 1, 256)
        assert sample.counts()["N"] == 5
        assert sample.counts()["V"] == 3
        assert np.isfinite(sample.beats).all()


def test_realnvp_keeps_weights_before_divergence(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class SpikingAdam(torch.optim.Adam):
        """Adam that multiplies every weight by 30 once, after its 150th step."""

        steps_taken = 0

        def step(self, closure: Any = None) -> Any:
            loss = super().step(closure)
            SpikingAdam.steps_taken += 1
            if SpikingAdam.steps_taken == 150:
                with torch.no_grad():
                    for group in self.param_groups:
                        for parameter in group["params"]:
                            parameter.mul_(30.0)
            return loss

    monkeypatch.setattr(torch.optim, "Adam", SpikingAdam)
    caplog.set_level(logging.INFO, logger="appliance.quality.baselines")
    rng = np.random.default_rng(0)
    train = LabelledBeats(
        rng.normal(size=(400, 1, 256)).astype(np.float32), np.repeat([N, V], 200)
    )
    config = RealNvpConfig(dims=8, transforms=2, hidden_features=32, steps=300, batch_size=64)
    flow = RealNvpBaseline(train, config)
    # Monitored at steps 100, 200 and 300; the weights broken at step 150 never recover.
    assert flow.best_step == 100
    assert flow.monitor_nll_nats < 20.0
    assert "training diverged after the kept step" in caplog.text
    sample = flow.sample({N: 5}, seed=0)
    assert np.isfinite(sample.beats).all()


def test_evaluation_ranks_copies_over_noise(protocol, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="appliance.quality.evaluate")
    small = load_protocol_subset(protocol)
    config = QualityConfig(
        train_per_class=150,
        rebalance_target=200,
        eval_per_class=100,
        mmd_per_class=60,
        permutations=30,
        morphology_per_class=10,
        classifier=FAST_CLASSIFIER,
    )
    generators = [CopyGenerator(small.fit), NoiseGenerator((1, 256)), _Starved(small.fit)]
    figures = evaluate_generators(small, generators, config).summary()["generators"]
    copies, noise, starved = figures["copies"], figures["noise"], figures["starved"]
    # A generator whose budget ran out is named, with what it returned of each class.
    warnings = shortfall_warnings(figures)
    assert len(warnings) == 1, warnings
    requested = starved["requested_counts"]
    assert warnings[0].startswith(
        f"generator starved returned 3 of the {sum(requested.values())} beats requested for "
        f"the synthetic training set (N 3 of {requested['N']}, "
    )
    # Classes it was asked to top up but gave nothing get no rebalancing gain.
    topped = [n for n, c in starved["requested_top_up_counts"].items() if c > 0 and n != "N"]
    assert topped, "the configuration requested no top-up beats"
    for name in topped:
        assert starved["rebalancing_gain"][name] is None, name
        assert copies["rebalancing_gain"][name] is not None, name
    assert copies["tstr_trtr"] > noise["tstr_trtr"]
    assert copies["mean_mmd2_waveform"] < noise["mean_mmd2_waveform"]
    assert copies["discriminative"]["overall"] < noise["discriminative"]["overall"]
    assert copies["privacy"]["fraction_below_holdout_p05"] > 0.5
    assert noise["privacy"]["fraction_below_holdout_p05"] == 0.0
    # Each stage of each generator is logged once as progress.
    messages = [record.getMessage() for record in caplog.records]
    for name in ("copies", "noise"):
        for stage in (
            "sampling",
            "tstr_and_rebalancing",
            "discriminative",
            "mmd_and_frechet",
            "morphology",
        ):
            prefix = f"generator={name} stage={stage} done elapsed_s="
            assert sum(m.startswith(prefix) for m in messages) == 1, prefix


class _Starved(CopyGenerator):
    """A generator whose draw budget runs out: three copies of class N, nothing else."""

    name = "starved"

    def sample(self, counts: dict[int, int], seed: int) -> LabelledBeats:
        return super().sample({N: 3} if N in counts else {}, seed)


def load_protocol_subset(protocol):
    """The protocol with a few hundred beats per class in each set, for a fast evaluation."""
    from dataclasses import replace

    return replace(
        protocol,
        fit=subsample(protocol.fit, 300, 0),
        holdout=subsample(protocol.holdout, 100, 0),
        test=subsample(protocol.test, 300, 0),
    )


@pytest.mark.slow
def test_report_writes_page_and_json(
    model_store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    # A figure of an earlier report with another generator, which this one does not write.
    (tmp_path / "beats_copies.png").write_bytes(b"")
    config = QualityConfig(
        train_per_class=40,
        rebalance_target=40,
        eval_per_class=40,
        mmd_per_class=30,
        permutations=20,
        morphology_per_class=5,
        classifier=ClassifierConfig(steps=40, batch_size=32),
    )
    summary = build_report(
        model_store,
        DEFAULT_DATA_DIR,
        tmp_path,
        config,
        realnvp=RealNvpConfig(dims=8, transforms=2, hidden_features=32, steps=20),
    )
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved == summary
    assert (
        f"figures of an earlier report stay in out_dir={tmp_path} files=beats_copies.png; "
        in caplog.text
    )
    assert set(summary["generators"]) == {"appliance", "pca_gaussian", "realnvp"}
    assert summary["protocol"]["matches_training_records"] is False  # bundled SPLITS file
    missing = summary["protocol"]["missing_records"]
    bundled = {path.stem for path in DEFAULT_DATA_DIR.glob("*.hea")}
    assert len(missing) == 44 - len(bundled)
    assert "101" in missing
    assert "106" not in missing
    page = (tmp_path / "quality.html").read_text()
    assert f"the data folder lacked or could not read {len(missing)} of the 44 de Chazal" in page
    for name in summary["figures"]:
        assert (tmp_path / name).stat().st_size > 1000
        assert f'src="{name}"' in page
    assert summary["score_quantiles"]["real"]["median"] is not None
    assert summary["score_quantiles"]["corrupted"]["median"] < 0.5
    # The bundled model did not learn from the protocol's fit records, so the page opens with
    # a warning and shows no privacy figure.
    assert "<strong>Warning:</strong> this model was trained on other records" in page
    mia = f"{summary['generators']['appliance']['privacy']['mia_auroc']:.4f}"
    assert page.count("not applicable") == 4 * len(summary["generators"])
    matching = {
        **summary,
        "protocol": {
            **summary["protocol"],
            "matches_training_records": True,
            "missing_records": [],
        },
    }
    matching_page = render_html(matching)
    assert "Warning" not in matching_page
    assert "not applicable" not in matching_page
    assert f"<td>{mia}</td>" in matching_page
