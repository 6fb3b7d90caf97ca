"""The segmentation model class and endpoint in-process (TestClient) on the committed U-Net."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.core.config import Settings
from app.tasks.segmentation.model import SegmentationModel
from bench.common import png_bytes as png
from tests.support import SHARED_DATA, committed_version, single_task_client

MEMBRANE = SHARED_DATA / "membrane"





@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[TestClient]:
    """An app whose models dir holds only the committed segmentation model."""
    with single_task_client(tmp_path_factory.mktemp("segmentation"), "segmentation") as test_client:
        yield test_client


def test_model_loads_with_the_tile_size_and_threshold_of_its_metadata():
    model = SegmentationModel.load(committed_version("segmentation"), Settings())
    assert model.runner.input_shape[1:] == (model.tile, model.tile, 1)
    assert model.tile == model.metadata["params"]["tile"]
    assert 0.0 < model.threshold < 1.0
    assert model.metadata["output"]["foreground"] == "membrane"
    probability = model.probability(np.full((300, 517), 0.5, dtype=np.float32))
    assert probability.shape == (300, 517)
    assert probability.min() >= 0.0 and probability.max() <= 1.0


def test_png_mask_has_the_input_size_and_only_0_or_255(client):
    image = (np.random.default_rng(0).random((517, 300)) * 255).astype(np.uint8)  # 300 wide, 517 high
    response = client.post("/v1/segmentation/predict", files={"image": ("x.png", png(image), "image/png")})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-model-version"] == committed_version("segmentation").name
    mask = Image.open(io.BytesIO(response.content))
    assert mask.mode == "L" and mask.size == (300, 517)
    assert set(np.unique(np.asarray(mask))) <= {0, 255}


def test_json_carries_the_same_mask_as_base64(client):
    image = np.asarray(Image.open(MEMBRANE / "train" / "image" / "25.png"))
    response = client.post("/v1/segmentation/predict", params={"format": "json"},
                           files={"image": ("25.png", png(image), "image/png")})
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "segmentation" and body["request_id"] == response.headers["x-request-id"]
    assert body["version"] == response.headers["x-model-version"] == committed_version("segmentation").name
    (prediction,) = body["predictions"]
    assert {"width", "height", "membrane_fraction", "threshold", "mask_png_b64"} == set(prediction)
    assert (prediction["width"], prediction["height"]) == (512, 512)
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(prediction["mask_png_b64"]))))
    assert mask.shape == (512, 512)
    assert prediction["membrane_fraction"] == pytest.approx(np.mean(mask == 255), abs=1e-6)


@pytest.mark.parametrize("threshold", ["0", "1", "-0.2", "abc"])
def test_threshold_outside_0_1_is_422_problem(client, threshold):
    response = client.post("/v1/segmentation/predict", params={"threshold": threshold},
                           files={"image": ("x.png", png(np.zeros((8, 8), np.uint8)), "image/png")})
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["field"] == "threshold"


def test_missing_image_field_is_422_naming_it(client):
    response = client.post("/v1/segmentation/predict", files={"picture": ("x.png", b"abc", "image/png")})
    assert response.status_code == 422
    assert response.json()["field"] == "image"


def test_an_image_wider_than_2048_is_413(client):
    response = client.post("/v1/segmentation/predict",
                           files={"image": ("wide.png", png(np.zeros((1, 2049), np.uint8)), "image/png")})
    assert response.status_code == 413
    assert response.json()["code"] == "image-too-large"
