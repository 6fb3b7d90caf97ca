"""Every figure of a drift report, recomputed here from the formulas in app.monitoring.drift's
docstrings (Jeffreys-smoothed bin shares, PSI, the chance-level PSI thresholds, Bonferroni-shared
p-values, the chi-squared homogeneity test with small cells pooled), and the edges of each rule."""

from __future__ import annotations

import math
from datetime import timedelta

import numpy as np
import pytest
from scipy import stats

from app.monitoring import drift


def jeffreys(counts: list[float]) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    return (counts + 0.5) / (counts.sum() + 0.5 * counts.size)


def psi_of(expected: np.ndarray, actual: np.ndarray) -> float:
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def chance_thresholds(n_ref: float, n_cur: float, bins: int, tests: int) -> tuple[float, float]:
    scale = 1 / n_ref + 1 / n_cur
    return (max(0.1, stats.chi2.ppf(1 - 0.01 / tests, bins - 1) * scale),
            max(0.2, stats.chi2.ppf(1 - 0.001 / tests, bins - 1) * scale))


# --- bins and PSI -----------------------------------------------------------------------------


def test_bin_shares_drop_missing_and_non_finite_values():
    shares = drift.bin_proportions([None, 0.5, float("nan"), 1.5, float("inf"), 2.5, 2.7], [0.0, 1.0, 2.0, 3.0])
    assert shares.tolist() == [0.25, 0.25, 0.5]


def test_bin_shares_of_a_2d_array_count_every_value():
    assert drift.bin_proportions(np.array([[0.5, 1.5], [2.5, 2.6]]), [0, 1, 2, 3]).tolist() == [0.25, 0.25, 0.5]


def test_two_reference_edges_make_two_bins_below_and_from_the_upper_one():
    assert drift.bin_proportions([0.0, 4.9, 5.0, 9.0], [1.0, 5.0]).tolist() == [0.5, 0.5]


def test_no_values_give_empty_bins_and_no_edges_are_an_error():
    assert drift.bin_proportions([], [0.0, 1.0, 2.0]).tolist() == [0.0, 0.0]
    assert drift.bin_proportions([1.5], [0.0, 1.0, 2.0]).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="^bin_edges is empty$"):
        drift.bin_proportions([1.0], [])


def test_psi_floors_an_empty_bin_at_epsilon():
    want = (1.0 - 0.5) * math.log(1.0 / 0.5) + (1e-4 - 0.5) * math.log(1e-4 / 0.5)
    assert drift.psi_from_proportions(np.array([0.5, 0.5]), np.array([1.0, 0.0])) == pytest.approx(want)
    floor = (1.0 - 0.5) * math.log(1.0 / 0.5) + (0.01 - 0.5) * math.log(0.01 / 0.5)
    assert drift.psi_from_proportions([0.5, 0.5], [1.0, 0.0], epsilon=0.01) == pytest.approx(floor)


def test_psi_floors_an_empty_reference_bin_too():
    want = (0.5 - 1.0) * math.log(0.5 / 1.0) + (0.5 - 1e-4) * math.log(0.5 / 1e-4)
    assert drift.psi_from_proportions(np.array([1.0, 0.0]), np.array([0.5, 0.5])) == pytest.approx(want)


def test_psi_of_raw_values_bins_both_sides_on_the_reference_edges():
    reference, current, edges = [0.5, 0.6, 1.5, 2.5], [0.5, 1.5, 1.6, 1.7], [0.0, 1.0, 2.0, 3.0]
    want = psi_of(np.array([0.5, 0.25, 0.25]), np.clip(np.array([0.25, 0.75, 0.0]), 1e-4, None))
    assert drift.psi(reference, current, edges) == pytest.approx(want)
    assert drift.psi(reference, current, edges, epsilon=0.05) == pytest.approx(
        psi_of(np.array([0.5, 0.25, 0.25]), np.array([0.25, 0.75, 0.05])))


def test_jeffreys_smoothing_adds_half_a_count_per_bin():
    assert drift._smoothed(np.array([0.5, 0.5, 0.0]), 10.0).tolist() == pytest.approx([5.5 / 11.5, 5.5 / 11.5,
                                                                                       0.5 / 11.5])


@pytest.mark.parametrize("edges, bins", [([3.0], 3), ([1.0, 2.0], 2), ([0.0, 1.0, 2.0, 3.0], 3)])
def test_without_a_sample_the_reference_shares_are_equal(edges, bins):
    assert drift._reference_proportions(np.array([]), edges).tolist() == pytest.approx([1 / bins] * bins)


def test_with_a_sample_the_reference_shares_are_the_samples():
    assert drift._reference_proportions(np.array([0.5, 0.7, 1.5, 2.5]), [0.0, 1.0, 2.0, 3.0]).tolist() == \
        [0.5, 0.25, 0.25]


# --- thresholds -------------------------------------------------------------------------------


@pytest.mark.parametrize("n_ref, n_cur, bins, tests", [(1000, 30, 10, 1), (1000, 30, 10, 7), (200, 100, 10, 2),
                                                       (5000, 5000, 10, 1)])
def test_psi_thresholds_are_raised_to_what_chance_reaches(n_ref, n_cur, bins, tests):
    assert drift.psi_thresholds(n_ref, n_cur, bins, tests) == pytest.approx(
        chance_thresholds(n_ref, n_cur, bins, tests))


def test_large_samples_keep_the_fixed_psi_thresholds():
    assert drift.psi_thresholds(10**6, 10**6, 10) == (0.1, 0.2)


def test_psi_thresholds_treat_empty_samples_as_one_value_and_one_bin_as_one_degree_of_freedom():
    assert drift.psi_thresholds(0, 0.5, 1) == pytest.approx(chance_thresholds(1, 1, 2, 1))


@pytest.mark.parametrize("statistic, pvalue, tests, status", [
    (0.1, 0.0009, 1, "drift"),  # the effect is "at least 0.1"
    (0.0999, 1e-12, 1, "ok"),
    (0.5, 0.001, 1, "ok"),  # "below 0.001"
    (0.5, 0.0004, 3, "ok"),  # 0.001 shared among three features
    (0.5, 0.0003, 3, "drift"),
])
def test_ks_status_at_its_edges(statistic, pvalue, tests, status):
    assert drift.ks_status(statistic, pvalue, tests) == status


@pytest.mark.parametrize("pvalue, status", [(0.01, "warning"), (0.0099, "drift"), (0.05, "ok"), (0.0499, "warning")])
def test_chi2_status_at_its_edges(pvalue, status):
    assert drift.chi2_status(pvalue) == status


@pytest.mark.parametrize("statuses, worst", [([], "ok"), (["ok"], "ok"), (["ok", "warning", "ok"], "warning"),
                                             (["warning", "drift", "ok"], "drift"), (["drift", "ok"], "drift")])
def test_the_worst_status_wins(statuses, worst):
    assert drift.worst(statuses) == worst


# --- one feature ------------------------------------------------------------------------------


EDGES = [0.0, 1.0, 2.0, 3.0, 4.0]
SAMPLE = [0.1, 0.2, 0.3, 1.1, 1.2, 1.3, 2.1, 2.2, 2.3, 3.1, 3.2, 3.3]


def test_a_feature_report_holds_every_figure():
    reference = {"mean": 1.7, "bin_edges": EDGES, "sample": SAMPLE, "n": 999}
    current = [3.5] * 30 + [2.5] * 10 + [None, float("nan")]
    report = drift.feature_drift(reference, current, tests=2)
    expected, actual = jeffreys([3, 3, 3, 3]), jeffreys([0, 0, 10, 30])
    value = psi_of(expected, actual)
    warning_at, drift_at = chance_thresholds(12, 40, 4, 2)
    statistic, pvalue = stats.ks_2samp(SAMPLE, [3.5] * 30 + [2.5] * 10)
    status = "drift" if value >= drift_at else "warning" if value >= warning_at else "ok"
    assert report == {"n": 40, "reference_mean": 1.7, "current_mean": 3.25,
                      "psi": round(value, 6), "psi_drift_threshold": round(drift_at, 6),
                      "ks_statistic": round(statistic, 6), "ks_pvalue": pytest.approx(pvalue), "status": status}
    assert status == "drift"  # a real shift: the figures above are not all "ok"


def test_a_feature_between_the_psi_thresholds_is_a_warning():
    reference = {"bin_edges": EDGES, "n": 1000}  # no sample: equal shares of 1 000 values, no KS
    current = [0.5] * 18 + [1.5] * 18 + [2.5] * 18 + [3.5] * 46
    report = drift.feature_drift(reference, current)
    value = psi_of(jeffreys([250, 250, 250, 250]), jeffreys([18, 18, 18, 46]))
    warning_at, drift_at = chance_thresholds(1000, 100, 4, 1)
    assert warning_at <= value < drift_at
    assert report["psi"] == round(value, 6) and report["status"] == "warning"
    assert report["ks_statistic"] is None and report["ks_pvalue"] is None
    assert report["psi_drift_threshold"] == round(drift_at, 6)


def test_without_a_sample_or_n_the_reference_counts_as_1000_values():
    report = drift.feature_drift({"bin_edges": EDGES}, [0.5, 1.5, 2.5, 3.5] * 5)
    assert report["psi"] == round(psi_of(jeffreys([250] * 4), jeffreys([5] * 4)), 6)
    assert report["psi_drift_threshold"] == round(chance_thresholds(1000, 20, 4, 1)[1], 6)


def test_without_bin_edges_the_reference_range_is_one_edge_pair():
    report = drift.feature_drift({"min": 2.0, "max": 10.0, "n": 100}, [1.0, 12.0, 15.0, 16.0])
    assert report["psi"] == round(psi_of(jeffreys([50, 50]), jeffreys([1, 3])), 6)
    assert report["psi_drift_threshold"] == round(chance_thresholds(100, 4, 2, 1)[1], 6)
    assert report["status"] == "ok"
    # A missing end of the range is 0: values below 0 / at or above 0 here.
    no_min = drift.feature_drift({"max": 3.0}, [1.0, 2.0, 2.5, 4.0])
    assert no_min["psi"] == round(psi_of(jeffreys([500, 500]), jeffreys([3, 1])), 6)
    no_max = drift.feature_drift({"min": -5.0}, [0.5, 2.0, 2.5, -1.0])
    assert no_max["psi"] == round(psi_of(jeffreys([500, 500]), jeffreys([1, 3])), 6)


def test_a_shift_the_ks_test_sees_is_drift_even_when_psi_is_quiet():
    rng = np.random.default_rng(0)
    sample = np.sort(rng.normal(0.0, 1.0, 2000))
    reference = {"bin_edges": [-10.0, 10.0], "sample": sample.tolist()}  # every value in one bin
    report = drift.feature_drift(reference, rng.normal(1.0, 1.0, 500))
    assert report["psi"] < 0.01 and report["ks_statistic"] >= 0.1 and report["status"] == "drift"


def test_the_ks_p_value_is_shared_among_the_features_judged_together():
    reference = {"bin_edges": [-10.0, 10.0], "sample": np.linspace(0.0, 1.0, 400).tolist()}
    current = np.linspace(0.0, 1.0, 300) + 0.148  # D 0.151, p 0.00074: below 0.001, above 0.001 / 2
    alone, among_two = drift.feature_drift(reference, current), drift.feature_drift(reference, current, tests=2)
    assert alone["ks_pvalue"] == pytest.approx(0.000736, abs=1e-6)
    assert (alone["status"], among_two["status"]) == ("drift", "ok")
    assert alone["ks_statistic"] == round(stats.ks_2samp(reference["sample"], current).statistic, 6) == 0.150833


def test_an_empty_window_is_insufficient_data_with_no_figures():
    assert drift.feature_drift({"bin_edges": EDGES, "mean": 2.0}, [None, float("inf")]) == {
        "n": 0, "reference_mean": 2.0, "current_mean": None, "psi": None, "ks_statistic": None,
        "ks_pvalue": None, "status": "insufficient_data"}


# --- the class distribution -------------------------------------------------------------------


PRIOR = {"kind": "categorical", "n": 1000, "labels": ["a", "b", "c"], "prior": {"a": 0.5, "b": 0.3, "c": 0.2}}
SMALL_PRIOR = {"n": 200, "labels": ["c", "a", "b", "d"], "prior": {"a": 0.5, "b": 0.3, "c": 0.2}}


def test_the_reference_is_its_own_n_predictions_in_the_order_of_its_labels():
    report = drift.class_drift(SMALL_PRIOR, ["a"] * 30 + ["b"] * 60 + ["c"] * 30)
    assert list(report["reference"]) == ["c", "a", "b", "d"]
    raw = np.array([40.5, 100.5, 60.5, 0.5])
    assert report["reference"] == {label: round(p, 6) for label, p in zip("cabd", raw / raw.sum(), strict=True)}
    assert report["current"] == {"c": 0.25, "a": 0.25, "b": 0.5, "d": 0.0}
    result = stats.chi2_contingency(np.array([[40, 100, 60], [30, 30, 60]]), correction=False)
    assert report["chi2"] == round(result.statistic, 6) and report["dof"] == 2


def test_class_shares_are_rounded_to_six_decimals():
    report = drift.class_drift(PRIOR, ["a", "b", "c"] * 20)
    assert report["current"] == {"a": 0.333333, "b": 0.333333, "c": 0.333333}


def test_a_class_report_holds_every_figure():
    predictions = ["a"] * 50 + ["b"] * 20 + ["c"] * 30
    report = drift.class_drift(PRIOR, predictions)
    smoothed = np.array([500.5, 300.5, 200.5]) / 1001.5
    current = np.array([0.5, 0.2, 0.3])
    result = stats.chi2_contingency(np.array([[500, 300, 200], [50, 20, 30]]), correction=False)
    assert report == {
        "n": 100,
        "reference": {label: round(p, 6) for label, p in zip("abc", smoothed, strict=True)},
        "current": {"a": 0.5, "b": 0.2, "c": 0.3},
        "psi": round(psi_of(smoothed, current), 6),
        "chi2": round(result.statistic, 6), "pvalue": pytest.approx(result.pvalue), "dof": 2,
        "status": drift.chi2_status(result.pvalue)}
    assert report["status"] == "warning"  # p ~ 0.02


def test_without_labels_the_classes_are_the_priors_and_n_defaults_to_1000():
    reference = {"prior": {"y": 0.75, "x": 0.25}}
    report = drift.class_drift(reference, ["x"] * 20 + ["y"] * 20)
    assert list(report["reference"]) == ["y", "x"]
    assert report["reference"] == {"x": round(250.5 / 1001, 6), "y": round(750.5 / 1001, 6)}
    result = stats.chi2_contingency(np.array([[750, 250], [20, 20]]), correction=False)  # no Yates correction
    assert report["chi2"] == round(result.statistic, 6) and report["dof"] == 1
    assert report["chi2"] != round(stats.chi2_contingency(np.array([[750, 250], [20, 20]])).statistic, 6)


def test_a_reference_with_neither_labels_nor_prior_knows_only_the_windows_classes():
    report = drift.class_drift({}, ["b", "a", "b"])
    assert list(report["current"]) == ["a", "b"] and report["reference"] == {"a": 0.5, "b": 0.5}
    assert report["chi2"] is None and report["status"] == "ok"


def test_a_reference_of_a_single_prediction_is_still_tested():
    reference = {"labels": ["a", "b"], "prior": {"a": 1.0, "b": 0.0}, "n": 1}
    report = drift.class_drift(reference, ["a"] * 10 + ["b"] * 10)
    assert report["pvalue"] == pytest.approx(stats.chi2_contingency(np.array([[1, 0], [10, 10]]),
                                                                     correction=False).pvalue)


def test_unknown_labels_are_added_in_sorted_order_after_the_references():
    report = drift.class_drift(PRIOR, ["z", "a", "y", "z"])
    assert list(report["current"]) == ["a", "b", "c", "y", "z"]
    assert report["current"] == {"a": 0.25, "b": 0.0, "c": 0.0, "y": 0.25, "z": 0.5}
    assert report["reference"]["z"] == round(0.5 / 1002.5, 6)


def test_no_predictions_is_insufficient_data():
    report = drift.class_drift(PRIOR, [])
    assert report["n"] == 0 and report["status"] == "insufficient_data"
    assert report["psi"] is None and report["chi2"] is None and report["pvalue"] is None and report["dof"] is None
    assert report["current"] == {"a": 0.0, "b": 0.0, "c": 0.0}


def test_a_reference_without_counts_has_nothing_to_test_against():
    report = drift.class_drift({"labels": ["a", "b"], "n": 50}, ["a"] * 20 + ["b"] * 20)
    assert (report["chi2"], report["pvalue"], report["status"]) == (None, None, "ok")


def test_a_class_neither_sample_has_is_left_out_of_the_test():
    # Expected 120 x 0.5 / 11.5 = 5.2 times in the window: not pooled, but seen in neither sample.
    reference = {"n": 10, "labels": ["a", "b", "c"], "prior": {"a": 0.5, "b": 0.5, "c": 0.0}}
    report = drift.class_drift(reference, ["a"] * 60 + ["b"] * 60)
    assert report["dof"] == 1 and report["pvalue"] == pytest.approx(1.0)


def test_small_cells_are_pooled_and_a_still_small_pool_is_folded_into_the_smallest_cell():
    observed, expected = drift._pool_small(np.array([10.0, 1.0, 1.0, 30.0]), np.array([10.0, 2.0, 2.0, 30.0]))
    assert observed.tolist() == [12.0, 30.0] and expected.tolist() == [14.0, 30.0]


def test_a_pool_of_at_least_five_stays_its_own_cell():
    observed, expected = drift._pool_small(np.array([9.0, 3.0, 3.0, 20.0]), np.array([10.0, 3.0, 3.0, 20.0]))
    assert observed.tolist() == [9.0, 20.0, 6.0] and expected.tolist() == [10.0, 20.0, 6.0]


def test_a_pool_expected_exactly_five_times_stays_its_own_cell():
    observed, expected = drift._pool_small(np.array([9.0, 1.0, 4.0, 20.0]), np.array([10.0, 2.0, 3.0, 20.0]))
    assert observed.tolist() == [9.0, 20.0, 5.0] and expected.tolist() == [10.0, 20.0, 5.0]


def test_cells_expected_five_times_are_not_pooled():
    observed, expected = drift._pool_small(np.array([4.0, 6.0, 20.0]), np.array([5.0, 5.0, 20.0]))
    assert observed.tolist() == [4.0, 6.0, 20.0] and expected.tolist() == [5.0, 5.0, 20.0]


def test_one_cell_and_a_small_pool_are_left_as_two_cells():
    observed, expected = drift._pool_small(np.array([30.0, 1.0, 2.0]), np.array([30.0, 1.5, 2.0]))
    assert observed.tolist() == [30.0, 3.0] and expected.tolist() == [30.0, 3.5]


# --- a model's report -------------------------------------------------------------------------


def model_reference() -> dict:
    return {"features": {"u": {"bin_edges": EDGES, "sample": SAMPLE, "mean": 1.7},
                         "v": {"bin_edges": EDGES, "n": 1000}},
            "prediction": PRIOR}


def test_a_model_report_judges_each_feature_with_the_p_value_shared_among_them():
    window = {"u": [0.5, 1.5, 2.5, 3.5] * 10, "v": [3.9] * 40}
    report = drift.model_drift(model_reference(), window, ["a"] * 20 + ["b"] * 12 + ["c"] * 8, min_samples=40)
    assert report["features"]["u"] == drift.feature_drift(model_reference()["features"]["u"], window["u"], tests=2)
    assert report["features"]["v"] == drift.feature_drift(model_reference()["features"]["v"], window["v"], tests=2)
    assert report["prediction"] == drift.class_drift(PRIOR, ["a"] * 20 + ["b"] * 12 + ["c"] * 8)
    assert report["n"] == 40 and report["status"] == "drift"  # judged at exactly min_samples
    assert report["drift_score"] == max(report["features"]["u"]["psi"], report["features"]["v"]["psi"])


def test_a_feature_missing_from_the_window_does_not_decide_the_status():
    report = drift.model_drift(model_reference(), {"u": [0.5, 1.5, 2.5, 3.5] * 10}, ["a", "b"] * 20,
                               min_samples=10)
    assert report["features"]["v"]["status"] == "insufficient_data"
    assert report["status"] == drift.worst([report["features"]["u"]["status"], report["prediction"]["status"]])
    assert report["drift_score"] == report["features"]["u"]["psi"]


def test_the_class_distribution_alone_can_make_a_model_drift():
    reference = {"features": {}, "prediction": PRIOR}
    report = drift.model_drift(reference, {}, ["c"] * 100, min_samples=30)
    assert report["status"] == "drift" and report["features"] == {}
    assert report["drift_score"] == report["prediction"]["psi"]


def test_a_reference_without_a_class_distribution_reports_none():
    reference = {"features": {"v": {"bin_edges": EDGES, "n": 1000}}}
    report = drift.model_drift(reference, {"v": [0.5, 1.5, 2.5, 3.5] * 10}, ["a"] * 40, min_samples=30)
    assert report["prediction"] is None and report["status"] == "ok"


def test_one_prediction_short_of_min_samples_is_insufficient_data():
    report = drift.model_drift(model_reference(), {"v": [3.9] * 39}, ["a"] * 39, min_samples=40)
    assert report["status"] == "insufficient_data" and report["n"] == 39


def test_a_model_without_a_reference_has_an_empty_report():
    assert drift.model_drift(None, {"u": [1.0]}, ["a", "b"], min_samples=1) == {
        "n": 2, "status": "no_reference", "drift_score": None, "features": {}, "prediction": None}


def test_no_figures_at_all_give_no_drift_score():
    report = drift.model_drift({"features": {"v": {"bin_edges": EDGES}}}, {}, [], min_samples=1)
    assert report["drift_score"] is None and report["status"] == "insufficient_data"


def test_the_largest_feature_psi_is_unsmoothed_and_skips_features_without_values_or_edges():
    reference = {"features": {"w": {"bin_edges": []}, "x": {"bin_edges": EDGES},
                              "u": {"bin_edges": EDGES, "sample": SAMPLE + [0.4, 0.5, 0.6, 0.7]},
                              "v": {"bin_edges": EDGES}}}
    window = {"u": [0.5, 0.6, 1.5, 3.5], "v": [3.5] * 4, "w": [1.0]}
    u = psi_of(np.array([7, 3, 3, 3]) / 16, np.clip([0.5, 0.25, 0.0, 0.25], 1e-4, None))
    v = psi_of(np.full(4, 0.25), np.clip([0.0, 0.0, 0.0, 1.0], 1e-4, None))
    assert drift.max_feature_psi(reference, window) == round(max(u, v), 6)
    assert drift.max_feature_psi(reference, {"u": [0.5, 0.6, 1.5, 3.5]}) == round(u, 6)
    assert drift.max_feature_psi(reference, {"w": [1.0]}) is None
    assert drift.max_feature_psi({}, window) is None


# --- windows and JSON-safe numbers ------------------------------------------------------------


def test_a_window_describes_itself_and_its_time_span():
    assert drift.Window(count=200).describe() == {"kind": "count", "last": 200}
    assert drift.Window(seconds=90.0).describe() == {"kind": "time", "seconds": 90.0}
    assert drift.Window(seconds=90.0).since == timedelta(seconds=90)
    assert drift.Window(count=200).since is None


@pytest.mark.parametrize("text, window", [
    ("100000", drift.Window(count=100_000)), ("1", drift.Window(count=1)), (" 30 M ", drift.Window(seconds=1800)),
    ("90d", drift.Window(seconds=90 * 86400)), ("1s", drift.Window(seconds=1)), ("2H", drift.Window(seconds=7200)), ("  ", drift.Window(count=7)),
])
def test_window_edges_and_spelling(text, window):
    assert drift.parse_window(text, 7) == window


@pytest.mark.parametrize("text, message", [
    ("100001", "a count window must be between 1 and 100000"),
    ("0", "a count window must be between 1 and 100000"),
    ("0s", "a duration window must be longer than 0 and at most 90d"),
    ("90.1d", "a duration window must be longer than 0 and at most 90d"),
    ("5 weeks", "window must be a count (e.g. 500) or a duration (e.g. 30m, 1h, 7d)"),
])
def test_window_refusals_say_what_is_allowed(text, message):
    with pytest.raises(ValueError) as info:
        drift.parse_window(text, 500)
    assert str(info.value) == message


@pytest.mark.parametrize("value, clean", [(None, None), ("1.5", 1.5), (3, 3.0), (float("nan"), None),
                                          (float("-inf"), None), ("x", None), ([1], None)])
def test_clean_float_keeps_finite_numbers_only(value, clean):
    assert drift.clean_float(value) == clean


def test_large_samples_take_the_asymptotic_ks_p_value_and_small_ones_the_exact():
    rng = np.random.default_rng(0)
    reference = rng.normal(0.0, 1.0, 2000)
    window = rng.normal(0.1, 1.0, drift.KS_EXACT_MAX_PAIRS // 2000 + 1)  # one pair past the limit
    statistic, pvalue = drift.ks(reference, window)
    assert pvalue == stats.ks_2samp(reference, window, method="asymp").pvalue
    assert pvalue != stats.ks_2samp(reference, window, method="exact").pvalue
    at_limit = window[:drift.KS_EXACT_MAX_PAIRS // 2000]
    assert drift.ks(reference, at_limit)[1] == stats.ks_2samp(reference, at_limit, method="exact").pvalue


def test_a_class_seen_once_in_the_window_is_still_a_column():
    reference = {"n": 10, "labels": ["a", "b", "c"], "prior": {"a": 0.5, "b": 0.5, "c": 0.0}}
    report = drift.class_drift(reference, ["a"] * 60 + ["b"] * 59 + ["c"])
    result = stats.chi2_contingency(np.array([[5, 5, 0], [60, 59, 1]]), correction=False)
    assert report["dof"] == 2 and report["chi2"] == round(result.statistic, 6)
