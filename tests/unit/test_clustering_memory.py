"""The k scan of a 10 000 x 50 fit stays small in memory: two workers each running the largest fit a
request may ask for must fit a 512 MiB dyno (`make docker-test` runs them in one)."""

from __future__ import annotations

import tracemalloc

import numpy as np
from sklearn.metrics import silhouette_score

from app.tasks.clustering import preprocess
from app.tasks.clustering.preprocess import centroid_distances, select_k, silhouette


def peak_mib(work) -> tuple[object, float]:
    """``work()``'s result and the most memory it held at once (numpy's buffers included), MiB."""
    tracemalloc.start()
    try:
        result = work()
        return result, tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def one_piece_distances(z: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    diff = z[:, None, :] - centroids[None, :, :]
    return np.sqrt(np.einsum("nkd,nkd->nk", diff, diff))


def test_distances_computed_in_blocks_equal_the_one_piece_computation_to_the_bit(monkeypatch):
    rng = np.random.default_rng(3)
    z, centroids = rng.normal(size=(1003, 7)) * 50, rng.normal(size=(6, 7))
    monkeypatch.setattr(preprocess, "DISTANCE_BLOCK_VALUES", 6 * 7 * 10)  # 10 rows a block, 3 left over
    assert np.array_equal(centroid_distances(z, centroids), one_piece_distances(z, centroids))


def test_distances_of_the_largest_fit_to_twenty_centroids_hold_a_fraction_of_their_differences():
    rng = np.random.default_rng(4)
    z, centroids = rng.normal(size=(10_000, 50)), rng.normal(size=(20, 50))
    distances, peak = peak_mib(lambda: centroid_distances(z, centroids))
    assert distances.shape == (10_000, 20)
    assert peak < 24  # the n x k x d differences at once are 76 MiB


def test_silhouette_in_blocks_is_scikit_learns_value_with_a_quarter_of_its_memory():
    rng = np.random.default_rng(5)
    z, labels = rng.normal(size=(10_000, 50)), rng.integers(0, 20, 10_000)
    value, peak = peak_mib(lambda: silhouette(z, labels, sample_size=2000, seed=0))
    assert value == float(silhouette_score(z, labels, sample_size=2000, random_state=0))
    assert peak < 12  # scikit-learn's default working memory holds the 2 000 x 2 000 matrix: 31 MiB


def test_the_largest_k_scan_holds_under_thirty_mib():
    z = np.random.default_rng(6).normal(size=(10_000, 50))
    selection, peak = peak_mib(lambda: select_k(z, k_min=2, k_max=20, seed=0, n_init=1, max_iter=20,
                                                sample_size=2000))
    assert [f.k for f in selection.fits] == list(range(2, 21))
    assert peak < 30  # 90 MiB with the distances in one piece and scikit-learn's working memory
