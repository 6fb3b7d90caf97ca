"""Drift statistics: PSI, KS, chi-squared, the thresholds, the status of a model, windows."""

from __future__ import annotations

import math

import numpy as np
import pytest

from app.monitoring import drift
from app.monitoring.reference import (
    build_reference,
    categorical_reference,
    numeric_reference,
)


def normal_reference(seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = ["a", "b", "c"]
    predictions = rng.choice(labels, size=3000, p=[0.5, 0.3, 0.2])
    return build_reference({"x": rng.normal(0, 1, 5000), "y": rng.uniform(0, 1, 5000)}, predictions, labels)


def test_psi_matches_the_textbook_formula():
    expected = np.array([0.5, 0.5])
    actual = np.array([0.25, 0.75])
    want = (0.25 - 0.5) * math.log(0.25 / 0.5) + (0.75 - 0.5) * math.log(0.75 / 0.5)
    assert drift.psi_from_proportions(expected, actual) == pytest.approx(want)
    assert drift.psi_from_proportions(expected, expected) == 0.0


def test_psi_of_an_empty_bin_is_large_but_finite():
    value = drift.psi_from_proportions(np.array([0.5, 0.5]), np.array([1.0, 0.0]))
    assert math.isfinite(value) and value > 2


def test_values_outside_the_reference_range_fall_in_the_outer_bins():
    edges = [0.0, 1.0, 2.0, 3.0]
    assert drift.bin_proportions([-5.0, 0.5, 1.5, 2.5, 99.0], edges).tolist() == [0.4, 0.2, 0.4]


def test_a_constant_reference_feature_separates_below_at_and_above():
    ref = numeric_reference([28.0] * 50)
    assert ref["bin_edges"] == [28.0]
    assert drift.bin_proportions([27.0, 28.0, 28.0, 56.0], ref["bin_edges"]).tolist() == [0.25, 0.5, 0.25]
    assert drift.feature_drift(ref, [28.0] * 40)["status"] == "ok"
    assert drift.feature_drift(ref, [56.0] * 40)["status"] == "drift"


@pytest.mark.parametrize(("value", "status"), [(0.0, "ok"), (0.0999, "ok"), (0.1, "warning"),
                                               (0.1999, "warning"), (0.2, "drift"), (3.0, "drift")])
def test_psi_thresholds(value, status):
    assert drift.psi_status(value) == status


@pytest.mark.parametrize(("statistic", "pvalue", "status"), [
    (0.3, 0.0009, "drift"),
    (0.05, 1e-9, "ok"),  # significant but tiny: a large sample finds everything significant
    (0.3, 0.002, "ok"),
])
def test_ks_needs_both_significance_and_effect(statistic, pvalue, status):
    assert drift.ks_status(statistic, pvalue) == status


@pytest.mark.parametrize(("pvalue", "status"), [(0.2, "ok"), (0.04, "warning"), (0.009, "drift"), (None, "ok")])
def test_chi2_thresholds(pvalue, status):
    assert drift.chi2_status(pvalue) == status


def test_same_distribution_is_ok_and_a_shift_is_drift():
    reference = normal_reference()
    rng = np.random.default_rng(1)
    same = drift.feature_drift(reference["features"]["x"], rng.normal(0, 1, 500))
    shifted = drift.feature_drift(reference["features"]["x"], rng.normal(1, 1, 500))
    assert same["status"] == "ok" and same["psi"] < 0.1 and same["ks_pvalue"] > 0.01
    assert shifted["status"] == "drift" and shifted["psi"] >= 0.2 and shifted["ks_statistic"] >= 0.1


def test_class_distribution_matching_the_prior_is_ok():
    reference = categorical_reference(["a"] * 50 + ["b"] * 30 + ["c"] * 20, ["a", "b", "c"])
    report = drift.class_drift(reference, ["a"] * 100 + ["b"] * 60 + ["c"] * 40)
    assert report["status"] == "ok"
    assert report["pvalue"] == pytest.approx(1.0, abs=0.02)
    assert report["current"] == {"a": 0.5, "b": 0.3, "c": 0.2}


def test_a_class_the_reference_never_predicted_is_drift_not_a_division_by_zero():
    reference = categorical_reference(["a"] * 60 + ["b"] * 40, ["a", "b", "z"])
    assert reference["prior"]["z"] == 0.0
    report = drift.class_drift(reference, ["a"] * 30 + ["b"] * 20 + ["z"] * 50)
    assert report["status"] == "drift"
    assert math.isfinite(report["chi2"]) and report["pvalue"] < 1e-4


def test_a_label_unknown_to_the_reference_is_counted():
    reference = categorical_reference(["a", "b"] * 50, ["a", "b"])
    report = drift.class_drift(reference, ["a"] * 40 + ["new"] * 40)
    assert report["current"]["new"] == 0.5 and report["status"] == "drift"


def test_rare_classes_are_pooled_so_small_counts_do_not_fake_drift():
    labels = [str(i) for i in range(10)]
    reference = categorical_reference(labels * 100, labels)
    report = drift.class_drift(reference, labels[:4])  # 4 predictions over 10 classes
    assert report["dof"] is None and report["status"] == "ok"  # nothing left to test after pooling


def test_model_status_is_insufficient_below_min_samples():
    report = drift.model_drift(normal_reference(), {"x": [5.0] * 10, "y": [5.0] * 10}, ["a"] * 10, min_samples=30)
    assert report["status"] == "insufficient_data"
    assert report["drift_score"] > 0.2  # still computed and shown, just not judged


def test_model_status_is_the_worst_of_features_and_classes():
    reference = normal_reference()
    rng = np.random.default_rng(2)
    labels = rng.choice(["a", "b", "c"], size=400, p=[0.5, 0.3, 0.2]).tolist()
    clean = drift.model_drift(reference, {"x": rng.normal(0, 1, 400), "y": rng.uniform(0, 1, 400)}, labels,
                              min_samples=30)
    one_bad = drift.model_drift(reference, {"x": rng.normal(0, 1, 400), "y": rng.uniform(0.5, 1.5, 400)},
                                labels, min_samples=30)
    assert clean["status"] == "ok"
    assert (one_bad["status"], one_bad["features"]["x"]["status"], one_bad["features"]["y"]["status"]) == \
        ("drift", "ok", "drift")
    assert one_bad["drift_score"] == one_bad["features"]["y"]["psi"]


def test_model_without_reference_reports_no_reference():
    assert drift.model_drift(None, {}, ["a"] * 100, min_samples=30)["status"] == "no_reference"


@pytest.mark.parametrize(("text", "window"), [
    (None, drift.Window(count=500)), ("", drift.Window(count=500)), ("200", drift.Window(count=200)),
    ("30m", drift.Window(seconds=1800)), ("1h", drift.Window(seconds=3600)), ("45s", drift.Window(seconds=45)),
    ("7d", drift.Window(seconds=7 * 86400)), ("1.5h", drift.Window(seconds=5400)),
])
def test_parse_window(text, window):
    assert drift.parse_window(text, 500) == window


@pytest.mark.parametrize("text", ["0", "abc", "-5", "10w", "1000001", "91d"])
def test_parse_window_rejects_nonsense_with_a_sentence(text):
    with pytest.raises(ValueError, match="window"):
        drift.parse_window(text, 500)
