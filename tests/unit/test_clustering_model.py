"""The committed clustering model: plain JSON that reproduces scikit-learn's KMeans exactly."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.preprocessing import StandardScaler

from app.core.config import Settings
from app.tasks.clustering.model import ClusteringModel
from tests.support import SHARED_DATA, committed_version

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "models" / "clustering"
MALL = SHARED_DATA / "mall_customers" / "Mall_Customers.csv"



@pytest.fixture(scope="module")
def model() -> ClusteringModel:
    return ClusteringModel.load(committed_version("clustering"), Settings())


def mall(columns: list[str]) -> np.ndarray:
    with open(MALL, newline="") as f:
        return np.array([[float(r[c]) for c in columns] for r in csv.DictReader(f)])


def random_points(n: int = 1000) -> np.ndarray:
    """Income 0..150 k$, spending 0..100: the whole plane the segments tile, boundaries included."""
    rng = np.random.default_rng(7)
    return np.column_stack([rng.uniform(0, 150, n), rng.uniform(0, 100, n)])


def test_exactly_one_committed_version_with_a_json_model_and_no_pickles():
    versions = [p for p in COMMITTED.iterdir() if p.is_dir()]
    assert [p.name for p in versions] == ["1.0.0"]
    files = {p.name for p in versions[0].iterdir()}
    assert {"model.json", "metadata.json", "reference.json", "report"} <= files
    assert not [p for p in versions[0].rglob("*") if p.suffix in {".pkl", ".pickle", ".joblib"}]
    assert {p.name for p in (versions[0] / "report").iterdir()} >= {
        "elbow.png", "silhouette.png", "segments.png", "metrics.json"}


def test_metadata_records_k_five_and_the_clustering_metrics(model):
    metrics = model.metadata["metrics"]
    assert metrics["k"] == 5 and metrics["elbow_k"] == 5
    assert metrics["silhouette"] == pytest.approx(0.5547, abs=1e-3)
    assert metrics["calinski_harabasz"] > 200 and metrics["davies_bouldin"] < 0.7
    assert [p["k"] for p in metrics["elbow"]] == list(range(2, 11))
    assert model.metadata["labels"] == model.segments
    assert model.features == ["annual_income", "spending_score"]


def test_reference_holds_the_feature_distributions_and_the_segment_prior(model):
    assert set(model.reference["features"]) == {"annual_income", "spending_score"}
    prior = model.reference["prediction"]["prior"]
    assert set(prior) == set(model.segments)
    assert sum(prior.values()) == pytest.approx(1.0)
    assert prior["average income, average spending"] == pytest.approx(81 / 200)


def test_predict_equals_scikit_learn_kmeans_predict_with_the_model_centroids(model):
    # A KMeans whose centres are the model's: fitting on the centroids themselves keeps them.
    centroids = model.centroids
    kmeans = KMeans(n_clusters=len(centroids), init=centroids, n_init=1, max_iter=1).fit(centroids)
    np.testing.assert_array_equal(kmeans.cluster_centers_, centroids)
    points = random_points()
    expected = kmeans.predict(model.scaler.transform(points))
    labels, distances = model.predict(points)
    np.testing.assert_array_equal(labels, expected)
    assert len(set(labels.tolist())) == 5
    np.testing.assert_allclose(distances.min(axis=1), distances[np.arange(len(points)), labels])


def test_predict_equals_a_scikit_learn_refit_of_the_training_data_with_the_same_seed(model):
    x = mall(model.metadata["input"]["columns"])
    params = model.metadata["params"]
    scaler = StandardScaler().fit(x)
    np.testing.assert_allclose(scaler.mean_, model.scaler.mean)
    np.testing.assert_allclose(scaler.scale_, model.scaler.scale)
    kmeans = KMeans(n_clusters=5, init="k-means++", n_init=params["n_init"],
                    random_state=params["seed"]).fit(scaler.transform(x))
    np.testing.assert_allclose(kmeans.cluster_centers_, model.centroids, atol=1e-9)
    points = random_points()
    np.testing.assert_array_equal(model.predict(points).labels,
                                  kmeans.predict(scaler.transform(points)))
    np.testing.assert_array_equal(model.predict(x).labels, kmeans.labels_)


def test_the_textbook_customers_land_in_the_expected_segments(model):
    names = [model.segments[i] for i in model.predict(np.array(
        [[15, 39], [15, 81], [16, 6], [120, 79], [137, 18], [60, 50]])).labels]
    assert names == ["low income, low spending", "low income, high spending",
                     "low income, low spending", "high income, high spending",
                     "high income, low spending", "average income, average spending"]


def test_a_model_json_that_disagrees_with_itself_fails_to_load(tmp_path):
    version = committed_version("clustering")
    broken = tmp_path / "1.0.0"
    broken.mkdir()
    (broken / "metadata.json").write_text((version / "metadata.json").read_text())
    spec = json.loads((version / "model.json").read_text())
    spec["segments"] = spec["segments"][:-1]
    (broken / "model.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="segment names"):
        ClusteringModel.load(broken, Settings())
