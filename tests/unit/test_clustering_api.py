"""The clustering endpoints in-process (TestClient) on the committed K-means model."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from bench.common import png_bytes as png
from tests.support import assert_problem, mall_rows, single_task_client


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[TestClient]:
    """An app whose models dir holds only the committed clustering model."""
    with single_task_client(tmp_path_factory.mktemp("clustering"), "clustering") as test_client:
        yield test_client


# --- predict ---------------------------------------------------------------------------------------

def test_predict_returns_cluster_segment_and_distances_per_instance(client):
    response = client.post("/v1/clustering/predict", json={"instances": [
        {"annual_income": 15, "spending_score": 39}, {"annual_income": 120, "spending_score": 79}]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "clustering" and body["version"] == "1.0.0" and body["request_id"]
    assert [p["segment"] for p in body["predictions"]] == ["low income, low spending",
                                                          "high income, high spending"]
    for p in body["predictions"]:
        assert len(p["distances"]) == 5
        assert p["distance"] == min(p["distances"]) == p["distances"][p["cluster"]]
    assert response.headers["x-model-version"] == body["version"]
    assert response.headers["x-request-id"] == body["request_id"]


@pytest.mark.parametrize(("instance", "field", "code"), [
    ({"annual_income": 15}, "instances[1].spending_score", "missing-feature"),
    ({"annual_income": 15, "spending_score": 39, "age": 30}, "instances[1].age", "unknown-feature"),
    ({"annual_income": 15, "spending_score": "39"}, "instances[1].spending_score", "invalid-request"),
    ({"annual_income": True, "spending_score": 39}, "instances[1].annual_income", "invalid-request"),
    ({"annual_income": None, "spending_score": 39}, "instances[1].annual_income", "invalid-request"),
    ([15, 39], "instances[1]", "invalid-request"),
])
def test_predict_rejects_a_bad_instance_naming_the_row_and_field(client, instance, field, code):
    good = {"annual_income": 15, "spending_score": 39}
    response = client.post("/v1/clustering/predict", json={"instances": [good, instance]})
    assert_problem(response, 422, code=code, field=field)


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_predict_rejects_json_nan_and_infinity_literals(client, literal):
    body = b'{"instances": [{"annual_income": 15, "spending_score": 39}, ' \
           b'{"annual_income": 20, "spending_score": ' + literal + b'}]}'
    response = client.post("/v1/clustering/predict", content=body,
                           headers={"content-type": "application/json"})
    assert "finite" in assert_problem(response, 422, field="instances[1].spending_score")["detail"]


def test_predict_rejects_no_instances_and_more_than_ten_thousand(client):
    assert_problem(client.post("/v1/clustering/predict", json={"instances": []}), 422, field="instances")
    too_many = [{"annual_income": 1, "spending_score": 1}] * 10_001
    assert_problem(client.post("/v1/clustering/predict", json={"instances": too_many}), 422, field="instances")
    assert_problem(client.post("/v1/clustering/predict", json={"rows": []}), 422, field="instances")


def test_predict_accepts_ten_thousand_instances(client):
    rng = np.random.default_rng(0)
    instances = [{"annual_income": float(a), "spending_score": float(b)}
                 for a, b in zip(rng.uniform(0, 150, 10_000), rng.uniform(0, 100, 10_000), strict=True)]
    response = client.post("/v1/clustering/predict", json={"instances": instances})
    assert response.status_code == 200
    assert len(response.json()["predictions"]) == 10_000


# --- fit -------------------------------------------------------------------------------------------

def test_fit_on_the_mall_data_chooses_five_clusters_by_silhouette(client):
    response = client.post("/v1/clustering/fit", json={"data": mall_rows(), "k": None})
    assert response.status_code == 200, response.text
    assert (response.json()["model"], response.json()["version"]) == ("clustering-fit", "1.0.0")
    (body,) = response.json()["predictions"]
    assert body["k"] == 5 and body["selection"] == "silhouette" and body["elbow_k"] == 5
    assert body["silhouette"] == pytest.approx(0.5547, abs=2e-3)
    assert [p["k"] for p in body["elbow"]] == list(range(2, 11))
    assert [p["k"] for p in body["silhouettes"]] == list(range(2, 11))
    assert max(body["silhouettes"], key=lambda p: p["silhouette"])["k"] == 5
    assert len(body["labels"]) == 200 and sorted(body["cluster_sizes"]) == [22, 23, 35, 39, 81]
    # Centroids come back in the data's units: the high-income, low-spending group sits near (88, 17).
    assert any(abs(c[0] - 88.2) < 0.5 and abs(c[1] - 17.1) < 0.5 for c in body["centroids"])


def test_fit_with_a_requested_k_fits_that_k(client):
    (body,) = client.post("/v1/clustering/fit", json={"data": mall_rows(), "k": 3, "scale": False}).json()["predictions"]
    assert body["k"] == 3 and body["selection"] == "requested" and body["scaled"] is False
    assert [p["k"] for p in body["elbow"]] == [3]


@pytest.mark.parametrize(("body", "field"), [
    ({"data": [[1, 2], [3, 4], [5]]}, "data[2]"),
    ({"data": [[1, 2], [3, "x"]]}, "data[1][1]"),
    ({"data": [[1, 2], [3, None]]}, "data[1][1]"),
    ({"data": []}, "data"),
    ({"data": [[]]}, "data[0]"),
    ({"data": [list(range(51))] * 3}, "data[0]"),
    ({"data": [[1.0, 2.0]] * 10_001}, "data"),
    ({"data": [[1, 2], [3, 4], [5, 6]], "k": 1}, "k"),
    ({"data": [[1, 2], [3, 4], [5, 6]], "k": 21}, "k"),
    ({"data": [[1, 2], [3, 4], [5, 6]], "k_max": 21}, "k_max"),
    ({"data": [[1, 2], [3, 4], [5, 6]], "k_min": 5, "k_max": 3}, "k_min"),
    ({"data": [[1, 2], [3, 4], [5, 6]], "k": 3}, "data"),
    ({"data": [[1, 2]] * 50, "k": 2}, "data"),
    ({"data": [[1, 2], [3, 4], [5, 6]], "k": 2, "scale": "yes"}, "scale"),
    ({"data": [[1, 2], [3, 4], [5, 6]], "k": 2, "seed": 1}, "seed"),
])
def test_fit_rejects_bad_input_naming_the_field(client, body, field):
    assert_problem(client.post("/v1/clustering/fit", json=body), 422, field=field)


def test_fit_rejects_nan_literals(client):
    response = client.post("/v1/clustering/fit", content=b'{"data": [[1, 2], [3, NaN], [5, 6]], "k": 2}',
                           headers={"content-type": "application/json"})
    assert_problem(response, 422, field="data[1][1]")


# --- palette -----------------------------------------------------------------------------------------

def three_colour_image() -> np.ndarray:
    image = np.zeros((60, 100, 3), np.uint8)
    image[:30] = (230, 40, 40)       # 50 %
    image[30:48] = (20, 90, 200)     # 30 %
    image[48:] = (250, 220, 30)      # 20 %
    return image


def test_palette_of_a_three_colour_image_returns_the_colours_and_their_fractions(client):
    response = client.post("/v1/clustering/palette", data={"colors": "3"},
                           files={"image": ("flag.png", png(three_colour_image()), "image/png")})
    assert response.status_code == 200, response.text
    assert [(c["hex"], c["rgb"], c["fraction"]) for c in response.json()["predictions"][0]["colors"]] == [
        ("#e62828", [230, 40, 40], 0.5), ("#145ac8", [20, 90, 200], 0.3), ("#fadc1e", [250, 220, 30], 0.2)]


def test_palette_ignores_transparent_pixels(client):
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[:, :4] = (10, 200, 10, 255)
    rgba[:, 4:] = (200, 10, 10, 0)   # fully transparent red: not part of the palette
    response = client.post("/v1/clustering/palette", files={"image": ("a.png", png(rgba), "image/png")})
    assert response.json()["predictions"][0]["colors"] == [{"hex": "#0ac80a", "rgb": [10, 200, 10], "fraction": 1.0}]


def test_palette_is_deterministic_for_the_same_image(client):
    photo = (np.random.default_rng(0).random((200, 300, 3)) * 255).astype(np.uint8)
    files = {"image": ("noise.png", png(photo), "image/png")}
    first = client.post("/v1/clustering/palette", files=files, data={"colors": "7"}).json()["predictions"][0]["colors"]
    second = client.post("/v1/clustering/palette", files=files, data={"colors": "7"}).json()["predictions"][0]["colors"]
    assert first == second and len(first) == 7


@pytest.mark.parametrize("colors", ["1", "17", "many"])
def test_palette_rejects_colours_out_of_range(client, colors):
    response = client.post("/v1/clustering/palette", data={"colors": colors},
                           files={"image": ("flag.png", png(three_colour_image()), "image/png")})
    assert_problem(response, 422, field="colors")


def test_palette_rejects_corrupt_unknown_empty_and_transparent_images(client):
    data = png(three_colour_image())
    post = client.post
    assert_problem(post("/v1/clustering/palette", files={"image": ("a.png", data[:100], "image/png")}),
                   422, field="image[0]")
    assert_problem(post("/v1/clustering/palette", files={"image": ("a.txt", b"not an image", "text/plain")}),
                   415, field="image[0]")
    assert_problem(post("/v1/clustering/palette", files={"image": ("a.png", b"", "image/png")}), 422, field="image[0]")
    assert_problem(post("/v1/clustering/palette", files={"image": ("a.png", png(np.zeros((4, 4, 4), np.uint8)),
                                                                   "image/png")}), 422, field="image[0]")
    assert_problem(post("/v1/clustering/palette", data={"colors": "3"}, files={"photo": ("a.png", data, "image/png")}),
                   422, field="image")
    assert_problem(post("/v1/clustering/palette", data={"colors": "3"}), 415, field="content-type")  # no file at all


# --- monitoring ----------------------------------------------------------------------------------------

def test_predictions_are_logged_with_their_features_and_the_mall_data_shows_no_drift(tmp_path):
    instances = [{"annual_income": a, "spending_score": s} for a, s in mall_rows()]
    with single_task_client(tmp_path, "clustering") as fresh:
        assert fresh.post("/v1/clustering/predict", json={"instances": instances}).status_code == 200
        # Ad-hoc fits are logged under their own name: they must not count as segment predictions.
        assert fresh.post("/v1/clustering/fit", json={"data": mall_rows()}).status_code == 200
        report = fresh.get("/v1/monitoring/drift", params={"model": "clustering"}).json()["models"][0]
    assert report["n"] == 200 and report["status"] == "ok"
    assert set(report["features"]) == {"annual_income", "spending_score"}
    assert report["features"]["annual_income"]["current_mean"] == pytest.approx(60.56)
    assert report["prediction"]["current"]["average income, average spending"] == pytest.approx(81 / 200)
