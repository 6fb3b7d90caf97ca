"""Clustering against the real gunicorn server: segments equal scikit-learn, k=5 on the Mall data,
palettes of generated images, and problem+json for every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from sklearn.cluster import KMeans

from bench.common import png_bytes as png
from tests.support import assert_problem, mall_rows

REPO = Path(__file__).resolve().parents[2]


def model_json(version: str) -> dict:
    return json.loads((REPO / "models" / "clustering" / version / "model.json").read_text())


def test_clustering_model_is_listed_with_its_features_and_segments(client: httpx.Client):
    models = {m["task"]: m for m in client.get("/v1/models").json()["models"]}
    clustering = models["clustering"]
    assert clustering["ready"] is True
    assert clustering["input"]["features"] == ["annual_income", "spending_score"]
    assert len(clustering["labels"]) == clustering["metrics"]["k"] == 5


def test_predict_on_1000_random_points_equals_scikit_learn_kmeans_predict(client: httpx.Client):
    rng = np.random.default_rng(11)
    points = np.column_stack([rng.uniform(0, 150, 1000), rng.uniform(0, 100, 1000)])
    response = client.post("/v1/clustering/predict", json={"instances": [
        {"annual_income": a, "spending_score": s} for a, s in points.tolist()]})
    assert response.status_code == 200, response.text
    body = response.json()

    spec = model_json(body["version"])
    centroids = np.array(spec["centroids_scaled"])
    kmeans = KMeans(n_clusters=len(centroids), init=centroids, n_init=1, max_iter=1).fit(centroids)
    scaled = (points - np.array(spec["scaler"]["mean"])) / np.array(spec["scaler"]["scale"])
    expected = kmeans.predict(scaled)

    labels = np.array([p["cluster"] for p in body["predictions"]])
    np.testing.assert_array_equal(labels, expected)
    assert [p["segment"] for p in body["predictions"]] == [spec["segments"][i] for i in expected]
    distances = np.array([p["distances"] for p in body["predictions"]])
    np.testing.assert_allclose(distances, kmeans.transform(scaled), rtol=1e-9, atol=1e-12)


def test_fit_on_the_mall_data_with_k_null_returns_k_5(client: httpx.Client):
    response = client.post("/v1/clustering/fit", json={"data": mall_rows(), "k": None, "k_min": 2,
                                                        "k_max": 10, "scale": True})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "clustering-fit"
    (body,) = response.json()["predictions"]
    assert body["k"] == 5 and body["selection"] == "silhouette"
    assert body["silhouette"] == pytest.approx(0.55, abs=0.01)
    assert [p["k"] for p in body["elbow"]] == list(range(2, 11))
    assert len(body["labels"]) == 200 and len(body["centroids"]) == 5


def test_fit_of_10000_by_50_answers_within_a_few_seconds(client: httpx.Client):
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 6, size=(4, 50))
    data = (centres[rng.integers(0, 4, 10_000)] + rng.normal(size=(10_000, 50))).round(3)
    response = client.post("/v1/clustering/fit", json={"data": data.tolist(), "k_max": 8}, timeout=30.0)
    assert response.status_code == 200, response.text
    (body,) = response.json()["predictions"]
    assert body["k"] == 4 and body["silhouette_sample_size"] == 2000
    assert response.elapsed.total_seconds() < 10.0


def test_palette_of_a_generated_three_colour_image(client: httpx.Client):
    image = np.zeros((80, 50, 3), np.uint8)
    image[:40] = (30, 160, 90)      # 50 %
    image[40:64] = (240, 240, 240)  # 30 %
    image[64:] = (90, 20, 120)      # 20 %
    response = client.post("/v1/clustering/palette", data={"colors": "3"},
                           files={"image": ("three.png", png(image), "image/png")})
    assert response.status_code == 200, response.text
    colours = response.json()["predictions"][0]["colors"]
    assert [c["fraction"] for c in colours] == pytest.approx([0.5, 0.3, 0.2], abs=1e-9)
    for colour, expected in zip(colours, [(30, 160, 90), (240, 240, 240), (90, 20, 120)], strict=True):
        np.testing.assert_allclose(colour["rgb"], expected, atol=2)
        assert colour["hex"] == "#" + "".join(f"{v:02x}" for v in colour["rgb"])


GOOD = {"annual_income": 15, "spending_score": 39}


@pytest.mark.parametrize(("path", "body", "field"), [
    ("predict", {"instances": [GOOD, {"annual_income": 15}]}, "instances[1].spending_score"),
    ("predict", {"instances": [GOOD, {**GOOD, "age": 3}]}, "instances[1].age"),
    ("predict", {"instances": [GOOD, {**GOOD, "spending_score": "high"}]}, "instances[1].spending_score"),
    ("predict", {"instances": []}, "instances"),
    ("predict", {"instances": [GOOD] * 10_001}, "instances"),
    ("fit", {"data": [[1, 2], [3, 4, 5]]}, "data[1]"),
    ("fit", {"data": [[1, 2], [3, 4], [5, 6]], "k": 0}, "k"),
    ("fit", {"data": [[1, 2], [3, 4], [5, 6]], "k_min": 4, "k_max": 2}, "k_min"),
    ("fit", {"data": [[1, 2], [3, 4], [5, 6]]}, "data"),
])
def test_bad_json_input_is_a_422_problem_naming_the_field(client: httpx.Client, path, body, field):
    assert_problem(client.post(f"/v1/clustering/{path}", json=body), 422, field=field)


@pytest.mark.parametrize("literal", ["NaN", "Infinity"])
def test_json_nan_and_infinity_are_rejected(client: httpx.Client, literal):
    content = '{"instances": [{"annual_income": 15, "spending_score": %s}]}' % literal
    response = client.post("/v1/clustering/predict", content=content,
                           headers={"content-type": "application/json"})
    assert_problem(response, 422, field="instances[0].spending_score")


def test_bad_palette_uploads_are_problems_naming_the_field(client: httpx.Client):
    image = png((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    assert_problem(client.post("/v1/clustering/palette", data={"colors": "17"},
                               files={"image": ("a.png", image, "image/png")}), 422, field="colors")
    truncated = image[: len(image) // 2]
    assert_problem(client.post("/v1/clustering/palette", files={"image": ("a.png", truncated, "image/png")}),
                   422, field="image[0]")
    assert_problem(client.post("/v1/clustering/palette", files={"image": ("a.pdf", b"%PDF-1.4", "application/pdf")}),
                   415, field="image[0]")
