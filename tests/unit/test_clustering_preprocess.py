"""Clustering preprocessing: scaling, the choice of k, segment names, colour spaces, palettes."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.preprocessing import StandardScaler

from app.tasks.clustering.preprocess import (
    Scaler,
    count_distinct_rows,
    dominant_colours,
    elbow_k,
    feature_key,
    lab_to_srgb,
    nearest_centroid,
    opaque_pixels,
    rgb_hex,
    segment_names,
    select_k,
    srgb_to_lab,
    summary_features,
)
from tests.support import mall_rows


def mall_income_spending() -> np.ndarray:
    return np.array(mall_rows())


def test_feature_keys_drop_units_and_become_snake_case():
    assert feature_key("Annual Income (k$)") == "annual_income"
    assert feature_key("Spending Score (1-100)") == "spending_score"
    assert feature_key("Age") == "age"
    with pytest.raises(ValueError):
        feature_key("(k$)")


def test_scaler_matches_scikit_learn_standard_scaler_including_constant_columns():
    x = np.random.default_rng(0).normal(5.0, 3.0, size=(300, 3))
    x[:, 2] = 7.0
    ours, theirs = Scaler.fit(x), StandardScaler().fit(x)
    np.testing.assert_allclose(ours.mean, theirs.mean_)
    np.testing.assert_allclose(ours.scale, theirs.scale_)
    np.testing.assert_allclose(ours.transform(x), theirs.transform(x))
    np.testing.assert_allclose(ours.inverse_transform(ours.transform(x)), x)


def test_nearest_centroid_returns_labels_and_euclidean_distances():
    centroids = np.array([[0.0, 0.0], [10.0, 0.0]])
    labels, distances = nearest_centroid(np.array([[1.0, 0.0], [7.0, 4.0]]), centroids)
    assert labels.tolist() == [0, 1]
    np.testing.assert_allclose(distances, [[1.0, 9.0], [np.hypot(7, 4), 5.0]])


def test_elbow_is_the_knee_of_the_inertia_curve():
    assert elbow_k([1, 2, 3, 4, 5, 6], [100, 40, 12, 10, 9, 8]) == 3
    assert elbow_k([2, 3], [10.0, 5.0]) is None
    assert elbow_k([2, 3, 4], [5.0, 5.0, 5.0]) is None


def test_mall_customers_scan_chooses_five_segments_by_silhouette_with_the_elbow_at_five():
    x = mall_income_spending()
    selection = select_k(Scaler.fit(x).transform(x), k_min=2, k_max=10, seed=42, n_init=10)
    assert [f.k for f in selection.fits] == list(range(2, 11))
    assert selection.method == "silhouette"
    assert selection.chosen.k == 5
    assert selection.elbow_k == 5
    assert selection.chosen.silhouette == pytest.approx(0.5547, abs=1e-3)
    assert sorted(np.bincount(selection.chosen.labels).tolist()) == [22, 23, 35, 39, 81]


def test_requested_k_fits_only_that_k():
    x = mall_income_spending()
    selection = select_k(Scaler.fit(x).transform(x), k=3, seed=0, n_init=3)
    assert selection.method == "requested"
    assert [f.k for f in selection.fits] == [3]
    assert selection.chosen.k == 3 and selection.elbow_k is None


def test_large_inputs_scan_on_a_subsample_but_label_and_measure_every_row():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0, 0], [8, 0, 0], [0, 8, 0], [0, 0, 8]], dtype=float)
    x = np.concatenate([c + rng.normal(size=(1500, 3)) for c in centres])
    selection = select_k(x, k_min=2, k_max=6, seed=0, n_init=2, sample_size=1000)
    assert selection.chosen.k == 4
    assert selection.silhouette_sample_size == 1000
    assert len(selection.chosen.labels) == len(x)
    assert all(len(f.labels) == len(x) for f in selection.fits)
    assert sorted(np.bincount(selection.chosen.labels).tolist()) == [1500, 1500, 1500, 1500]


def test_mall_segment_names_describe_where_each_centroid_sits():
    x = mall_income_spending()
    centroids = np.array([[55.3, 49.5], [86.5, 82.1], [25.7, 79.4], [88.2, 17.1], [26.3, 20.9]])
    names = segment_names(centroids, x.mean(axis=0), x.std(axis=0), ["annual_income", "spending_score"])
    assert names == ["average income, average spending", "high income, high spending",
                     "low income, high spending", "high income, low spending", "low income, low spending"]


def test_duplicate_segment_names_are_numbered():
    names = segment_names(np.array([[0.0], [0.1], [5.0]]), [0.0], [1.0], ["age"])
    assert names == ["average age #1", "average age #2", "high age"]


def test_summary_features_are_the_feature_values_as_floats():
    assert summary_features({"annual_income": 15, "spending_score": 39.5}) == {
        "annual_income": 15.0, "spending_score": 39.5}


def test_count_distinct_rows():
    assert count_distinct_rows(np.array([[1, 2], [1, 2], [3, 4]])) == 2


def test_srgb_to_lab_matches_published_values():
    lab = srgb_to_lab(np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0], [0, 0, 255]]))
    np.testing.assert_allclose(lab[0], [100.0, 0.0, 0.0], atol=1e-3)
    np.testing.assert_allclose(lab[1], [0.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(lab[2], [53.2408, 80.0925, 67.2032], atol=1e-3)
    np.testing.assert_allclose(lab[3], [32.2970, 79.1875, -107.8602], atol=1e-3)


def test_lab_round_trip_returns_every_srgb_colour():
    rgb = np.random.default_rng(0).integers(0, 256, size=(20_000, 3))
    np.testing.assert_allclose(lab_to_srgb(srgb_to_lab(rgb)), rgb, atol=1e-6)


def test_opaque_pixels_ignore_transparent_ones():
    rgba = np.array([[[255, 0, 0, 255], [0, 255, 0, 0]], [[0, 0, 255, 200], [9, 9, 9, 100]]], np.uint8)
    assert opaque_pixels(rgba).tolist() == [[255, 0, 0], [0, 0, 255]]


def three_colour_pixels() -> np.ndarray:
    colours = np.array([[230, 40, 40]] * 500 + [[20, 90, 200]] * 300 + [[250, 220, 30]] * 200, np.uint8)
    return np.random.default_rng(1).permutation(colours)


def test_palette_of_three_flat_colours_returns_them_with_their_fractions():
    palette = dominant_colours(three_colour_pixels(), 3)
    assert [(c.rgb, c.fraction) for c in palette] == [
        ((230, 40, 40), 0.5), ((20, 90, 200), 0.3), ((250, 220, 30), 0.2)]
    assert palette[0].hex == "#e62828" == rgb_hex((230, 40, 40))


def test_palette_asks_for_no_more_colours_than_the_image_has():
    assert len(dominant_colours(three_colour_pixels(), 8)) == 3


def test_palette_of_noisy_colours_finds_the_cluster_centres():
    rng = np.random.default_rng(2)
    base = np.array([[200, 30, 30]] * 6000 + [[30, 30, 200]] * 4000, float)
    pixels = np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)
    palette = dominant_colours(pixels, 2, sample_size=5000)
    assert [c.fraction for c in palette] == pytest.approx([0.6, 0.4], abs=0.02)
    np.testing.assert_allclose(palette[0].rgb, [200, 30, 30], atol=3)
    np.testing.assert_allclose(palette[1].rgb, [30, 30, 200], atol=3)


def test_palette_is_deterministic():
    pixels = np.random.default_rng(3).integers(0, 256, size=(30_000, 3), dtype=np.uint8)
    first = dominant_colours(pixels, 6, sample_size=10_000)
    assert dominant_colours(pixels, 6, sample_size=10_000) == first
    assert sum(c.fraction for c in first) == pytest.approx(1.0)
    assert [c.fraction for c in first] == sorted((c.fraction for c in first), reverse=True)
