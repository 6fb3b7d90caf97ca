"""Clustering preprocessing at its edges: the elbow against a restatement of its definition, when a
silhouette is defined and when it is sampled, what a requested or subsampled fit reports, segment
names at their thresholds, feature names, opacity and palettes."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score

from app.tasks.clustering.preprocess import (
    Scaler,
    dominant_colours,
    elbow_k,
    feature_key,
    lab_to_srgb,
    nearest_centroid,
    opaque_pixels,
    segment_names,
    select_k,
    silhouette,
    srgb_to_lab,
)


def knee(ks: list[int], inertias: list[float]) -> int:
    """The k whose point, both axes scaled to [0, 1], lies farthest below the line from the first
    point (0, 1) to the last (1, 0): the largest 1 - u - v."""
    u = [(k - ks[0]) / (ks[-1] - ks[0]) for k in ks]
    v = [(i - inertias[-1]) / (inertias[0] - inertias[-1]) for i in inertias]
    below = [1 - a - b for a, b in zip(u, v, strict=True)]
    return ks[below.index(max(below))]


def test_the_elbow_is_the_knee_for_uneven_ks_and_inertias_of_any_scale():
    rng = np.random.default_rng(7)
    for _ in range(60):
        ks = sorted(rng.choice(np.arange(1, 30), size=int(rng.integers(3, 9)), replace=False).tolist())
        inertias = sorted((rng.random(len(ks)) * 10.0 ** rng.integers(-3, 5)).tolist(), reverse=True)
        assert elbow_k(ks, inertias) == knee(ks, inertias), (ks, inertias)


def test_three_ks_are_enough_for_an_elbow_and_a_curve_that_does_not_fall_has_none():
    assert elbow_k([2, 3, 4], [0.9, 0.2, 0.1]) == 3
    assert elbow_k([2, 3, 4], [0.1, 0.2, 0.3]) is None


def two_blobs(n: int = 40) -> np.ndarray:
    rng = np.random.default_rng(1)
    return np.concatenate([rng.normal(0.0, 0.3, (n // 2, 2)), rng.normal(5.0, 0.3, (n - n // 2, 2))])


def test_a_silhouette_needs_two_clusters_and_fewer_clusters_than_rows():
    z = np.arange(8.0).reshape(4, 2)
    assert silhouette(z, np.array([0, 0, 0, 0]), sample_size=None, seed=0) is None
    assert silhouette(z, np.array([0, 1, 2, 3]), sample_size=None, seed=0) is None
    assert silhouette(z, np.array([0, 0, 1, 2]), sample_size=None, seed=0) == pytest.approx(
        silhouette_score(z, [0, 0, 1, 2]))
    assert silhouette(z[:3], np.array([0, 0, 1]), sample_size=None, seed=0) == pytest.approx(
        silhouette_score(z[:3], [0, 0, 1]))


def test_a_silhouette_is_sampled_only_beyond_the_sample_size_and_with_the_seed():
    z = two_blobs(400) + np.random.default_rng(2).normal(0.0, 1.5, (400, 2))
    labels = (z[:, 0] > 2.5).astype(int)
    full = silhouette_score(z, labels)
    assert silhouette(z, labels, sample_size=400, seed=0) == pytest.approx(full)
    sampled = silhouette(z, labels, sample_size=50, seed=3)
    assert sampled == pytest.approx(silhouette_score(z, labels, sample_size=50, random_state=3))
    assert sampled != pytest.approx(full, abs=1e-6)
    assert sampled != silhouette(z, labels, sample_size=50, seed=4)


def test_a_requested_k_reports_the_fit_on_every_row():
    z = two_blobs()
    selection = select_k(z, k=2, seed=3, n_init=2, max_iter=50)
    km = KMeans(n_clusters=2, init="k-means++", n_init=2, max_iter=50, random_state=3).fit(z)
    fit = selection.chosen
    assert selection.fits == [fit] and selection.silhouette_sample_size == 40
    assert fit.inertia == pytest.approx(km.inertia_) and fit.n_iter == km.n_iter_
    np.testing.assert_array_equal(fit.labels, km.labels_)
    np.testing.assert_allclose(fit.centers, km.cluster_centers_)
    assert fit.silhouette == pytest.approx(silhouette_score(z, km.labels_))
    assert select_k(z, k=2, seed=3, n_init=2, sample_size=10).silhouette_sample_size == 10


def test_a_subsampled_scan_measures_inertia_on_every_row_and_refits_the_chosen_k():
    z = np.concatenate([two_blobs(300), two_blobs(300) + [0.0, 10.0]])
    calls = []
    selection = select_k(z, k_min=2, k_max=5, seed=0, n_init=2, sample_size=100,
                         between_fits=lambda: calls.append(1))
    assert len(calls) == 1 + 4 + 1  # before the scan, before each fit, before the refit
    for fit in selection.fits:
        centres = KMeans(n_clusters=fit.k, n_init=2, random_state=0).fit(
            z[np.sort(np.random.default_rng(0).choice(len(z), size=100, replace=False))]).cluster_centers_
        labels, distances = nearest_centroid(z, centres)
        assert fit.inertia == pytest.approx(float(np.sum(distances.min(axis=1) ** 2)))
        np.testing.assert_array_equal(fit.labels, labels)
        np.testing.assert_allclose(fit.centers, centres)
    assert selection.chosen.k == 4 and selection.silhouette_sample_size == 100
    refit = KMeans(n_clusters=4, n_init=2, random_state=0).fit(z)
    assert selection.chosen.inertia == pytest.approx(refit.inertia_)
    assert selection.chosen.silhouette == pytest.approx(silhouette_score(z, refit.labels_, sample_size=100,
                                                                         random_state=0))


def test_exactly_sample_size_rows_are_scanned_whole():
    z = two_blobs(60)
    selection = select_k(z, k_min=2, k_max=3, seed=0, n_init=2, sample_size=60)
    assert selection.silhouette_sample_size == 60
    km = KMeans(n_clusters=2, n_init=2, random_state=0).fit(z)
    assert selection.fits[0].inertia == pytest.approx(km.inertia_)


def test_silhouette_ties_go_to_the_smaller_k_and_without_any_the_first_fit_is_chosen():
    # Four identical pairs of points: k = 2 and k = 4 both give a perfect silhouette of 1.
    z = np.repeat(np.array([[0.0, 0.0], [0.0, 9.0], [9.0, 0.0], [9.0, 9.0]]), 2, axis=0)
    z[::2] += 1e-9
    selection = select_k(z, k_min=4, k_max=5, seed=0, n_init=1)
    assert [f.k for f in selection.fits] == [4, 5] and selection.chosen.k == 4
    single = select_k(np.array([[0.0], [0.0], [1.0]]), k_min=2, k_max=2, seed=0, n_init=1)
    assert single.chosen is single.fits[0]


# --- names, pixels, colours -------------------------------------------------------------------


def test_half_a_standard_deviation_is_still_average_and_an_unnamed_feature_keeps_its_words():
    names = segment_names(np.array([[10.5, 1.0], [9.5, 2.0], [10.51, 3.0], [9.49, 0.0]]), [10.0, 1.0], [1.0, 0.0],
                          ["annual_income", "days_since_visit"])
    assert names == ["average income, average days since visit", "average income, high days since visit",
                     "high income, high days since visit", "low income, low days since visit"]
    with pytest.raises(ValueError):
        segment_names(np.array([[1.0, 2.0]]), [0.0, 0.0], [1.0, 1.0], ["annual_income"])


@pytest.mark.parametrize("column, key", [("Spending Score (1-100)", "spending_score"), ("  Age ", "age"),
                                         ("__weird__ name__", "weird_name"), ("Income (k$) per year", "income_per_year")])
def test_feature_keys(column, key):
    assert feature_key(column) == key


def test_a_column_with_no_name_outside_its_units_is_refused():
    with pytest.raises(ValueError, match=r"^cannot derive a feature name from column '\(k\$\)'$"):
        feature_key("(k$)")


def test_pixels_at_least_half_opaque_count():
    rgba = np.array([[[1, 2, 3, 128], [4, 5, 6, 127]], [[7, 8, 9, 255], [10, 11, 12, 0]]], dtype=np.uint8)
    assert opaque_pixels(rgba).tolist() == [[1, 2, 3], [7, 8, 9]]
    assert opaque_pixels(rgba, alpha_threshold=1).tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_the_identity_scaler_changes_nothing():
    scaler = Scaler.identity(3)
    assert scaler.mean.tolist() == [0.0, 0.0, 0.0] and scaler.scale.tolist() == [1.0, 1.0, 1.0]
    x = np.array([[1, 2, 3]])
    assert scaler.transform(x).tolist() == [[1.0, 2.0, 3.0]] and scaler.inverse_transform(x).tolist() == [[1.0, 2.0, 3.0]]


def test_a_nearly_constant_column_of_large_values_is_left_unscaled():
    x = np.array([[1e6, 0.0], [1e6 + 1e-9, 2.0]])
    scaler = Scaler.fit(x)
    assert scaler.scale.tolist() == [1.0, 1.0]
    assert scaler.mean.tolist() == pytest.approx([1e6, 1.0])
    assert Scaler.fit(np.array([[0.0], [2e-9]])).scale.tolist() == [1e-9]


def test_lab_round_trips_clip_to_the_gamut():
    np.testing.assert_allclose(lab_to_srgb(np.array([[100.0, 0.0, 0.0], [0.0, 0.0, 0.0]])),
                               [[255.0, 255.0, 255.0], [0.0, 0.0, 0.0]], atol=1e-6)
    assert lab_to_srgb(np.array([50.0, 200.0, 0.0])).min() >= 0.0
    assert lab_to_srgb(np.array([50.0, 200.0, 0.0])).max() == pytest.approx(255.0)  # red clipped to the gamut
    dark = np.array([[3, 3, 3], [10, 0, 0]])
    np.testing.assert_allclose(lab_to_srgb(srgb_to_lab(dark)), dark, atol=1e-6)


def test_a_palette_of_more_pixels_than_the_sample_samples_them_with_the_seed():
    rng = np.random.default_rng(0)
    pixels = np.where(rng.random((3000, 1)) < 0.3, [[250, 10, 10]], [[10, 10, 250]]).astype(np.uint8)
    palette = dominant_colours(pixels, 2, sample_size=500, seed=1)
    sample = pixels[np.sort(np.random.default_rng(1).choice(3000, size=500, replace=False))]
    red = float(np.mean(sample[:, 0] == 250))
    assert [c.hex for c in palette] == ["#0a0afa", "#fa0a0a"]
    assert [c.fraction for c in palette] == pytest.approx([1 - red, red])
    assert sum(c.fraction for c in dominant_colours(pixels, 2, sample_size=3000)) == pytest.approx(1.0)
    assert dominant_colours(pixels, 2, sample_size=3000)[1].fraction == pytest.approx(float(np.mean(pixels[:, 0] == 250)))


def test_a_palette_needs_pixels():
    with pytest.raises(ValueError, match="^no pixels$"):
        dominant_colours(np.zeros((0, 3), dtype=np.uint8), 3)
    [only] = dominant_colours(np.array([[1, 2, 3]], dtype=np.uint8), 3)
    assert only.rgb == (1, 2, 3) and only.fraction == 1.0
