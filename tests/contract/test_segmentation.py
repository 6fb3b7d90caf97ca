"""Segmentation over HTTP against the real gunicorn server: mask sizes, formats, errors, accuracy."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from tests.support import SHARED_DATA

URL = "/v1/segmentation/predict"
MEMBRANE = SHARED_DATA / "membrane"


def encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def em_crop(height: int, width: int) -> np.ndarray:
    """A real EM crop (held-out slice 26), reflect-tiled when larger than 512."""
    slice_26 = np.asarray(Image.open(MEMBRANE / "train" / "image" / "26.png"))
    padding = ((0, max(0, height - 512)), (0, max(0, width - 512)))
    return np.pad(slice_26, padding, mode="reflect")[:height, :width]


def post(client, data: bytes, name: str = "image.png", media: str = "image/png", **params):
    return client.post(URL, params=params, files={"image": (name, data, media)})


def read_png(content: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(content))
    assert image.format == "PNG"
    return image


@pytest.mark.parametrize(("width", "height"), [(300, 517), (1, 1), (37, 1000), (700, 33)])
def test_mask_has_exactly_the_input_width_and_height(client, width, height):
    response = post(client, encode(em_crop(height, width)))
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-model-version"]
    mask = read_png(response.content)
    assert (mask.mode, mask.size) == ("L", (width, height))
    assert set(np.unique(np.asarray(mask))) <= {0, 255}


def test_held_out_slice_is_segmented_well_above_chance(client):
    image = np.asarray(Image.open(MEMBRANE / "train" / "image" / "27.png"))
    membrane = np.asarray(Image.open(MEMBRANE / "train" / "label" / "27.png")) == 0
    response = post(client, encode(image))
    mask = np.asarray(read_png(response.content)) == 255  # 255 = membrane
    accuracy = float(np.mean(mask == membrane))
    chance = max(membrane.mean(), 1 - membrane.mean())  # always answering the majority class
    assert chance < 0.8
    assert accuracy >= 0.9


def test_json_format_describes_the_mask(client):
    response = post(client, encode(em_crop(200, 333)), format="json")
    assert response.status_code == 200
    assert response.json()["model"] == "segmentation"
    assert response.json()["request_id"] == response.headers["x-request-id"]
    (body,) = response.json()["predictions"]
    assert (body["width"], body["height"]) == (333, 200)
    mask = np.asarray(read_png(base64.b64decode(body["mask_png_b64"])))
    assert mask.shape == (200, 333)
    assert body["membrane_fraction"] == pytest.approx(float(np.mean(mask == 255)), abs=1e-6)
    assert 0.05 < body["membrane_fraction"] < 0.6  # EM has membranes, but not everywhere


def test_several_images_with_format_json_come_back_in_order(client):
    small, large = encode(em_crop(64, 96)), encode(em_crop(128, 80))
    response = client.post("/v1/segmentation/predict", params={"format": "json"},
                           files=[("image", ("a.png", small, "image/png")), ("image", ("b.png", large, "image/png"))])
    assert response.status_code == 200, response.text
    assert [(p["width"], p["height"]) for p in response.json()["predictions"]] == [(96, 64), (80, 128)]
    as_png = client.post("/v1/segmentation/predict",
                         files=[("image", ("a.png", small, "image/png")), ("image", ("b.png", large, "image/png"))])
    assert (as_png.status_code, as_png.json()["code"]) == (422, "too-many-instances")


def test_overlay_is_an_rgb_picture_of_the_input_size(client):
    response = post(client, encode(em_crop(150, 260)), format="overlay")
    assert response.status_code == 200
    picture = read_png(response.content)
    assert (picture.mode, picture.size) == ("RGB", (260, 150))


def test_rgb_jpeg_and_tiff_inputs_are_accepted(client):
    gray = em_crop(128, 96)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    jpeg = post(client, encode(rgb, "JPEG"), "x.jpg", "image/jpeg")
    tiff = post(client, encode(gray, "TIFF"), "x.tif", "image/tiff")
    for response in (jpeg, tiff):
        assert response.status_code == 200
        assert read_png(response.content).size == (96, 128)


def test_a_lower_threshold_marks_at_least_as_much_membrane(client):
    data = encode(em_crop(256, 256))
    low = post(client, data, format="json", threshold=0.2).json()["predictions"][0]
    high = post(client, data, format="json", threshold=0.8).json()["predictions"][0]
    assert low["membrane_fraction"] > high["membrane_fraction"]
    assert (low["threshold"], high["threshold"]) == (0.2, 0.8)


@pytest.mark.parametrize(("data", "media", "status", "code"), [
    (b"", "image/png", 422, "empty-file"),
    (b"plain text, not an image", "text/plain", 415, "unsupported-image-format"),
    (encode(np.zeros((64, 64), np.uint8))[:60], "image/png", 422, "corrupt-image"),
])
def test_bad_uploads_are_problem_json(client, data, media, status, code):
    response = post(client, data, media=media)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == code
    assert response.json()["field"] == "image[0]"


@pytest.mark.parametrize("params", [{"threshold": "0"}, {"threshold": "1.5"}, {"threshold": "x"},
                                    {"format": "gif"}])
def test_bad_query_parameters_are_422(client, params):
    response = post(client, encode(np.zeros((8, 8), np.uint8)), **params)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["field"] == next(iter(params))
