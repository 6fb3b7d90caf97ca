"""The digits model class and endpoint in-process (TestClient) on the committed CNN."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.core.config import Settings
from app.tasks.digits.model import DigitsModel
from app.tasks.digits.preprocess import normalize_batch, prepare_image
from tests.support import MODELS, SHARED_DATA, committed_version, photo_like, single_task_client

MNIST = SHARED_DATA / "mnist" / "mnist.npz"


@pytest.fixture(scope="module")
def mnist_test() -> tuple[np.ndarray, np.ndarray]:
    with np.load(MNIST) as data:
        return data["x_test"][:500], data["y_test"][:500].astype(int)


@pytest.fixture(scope="module")
def model() -> DigitsModel:
    return DigitsModel.load(committed_version("digits"), Settings())


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[TestClient]:
    """An app whose models dir holds only the committed digits model."""
    with single_task_client(tmp_path_factory.mktemp("digits"), "digits") as test_client:
        yield test_client


def test_metadata_describes_the_artifact_and_its_test_accuracy(model):
    assert model.task == "digits"
    assert model.metadata["labels"] == [str(d) for d in range(10)]
    assert model.metadata["input"]["shape"] == [None, 28, 28, 1]
    assert model.metadata["metrics"]["test_accuracy"] >= 0.994
    assert (committed_version("digits") / "model.tflite").stat().st_size < 2 * 1024 * 1024
    assert model.reference is not None and "raw_mean" in model.reference["features"]


def test_mnist_test_digits_are_classified(model, mnist_test):
    images, labels = mnist_test
    probabilities = model.predict(normalize_batch(images))
    assert probabilities.shape == (500, 10)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    assert (probabilities.argmax(axis=1) == labels).mean() >= 0.99


def test_batch_results_equal_one_at_a_time(model, mnist_test):
    batch = normalize_batch(mnist_test[0][:8])
    together = model.predict(batch)
    alone = np.concatenate([model.predict(batch[i:i + 1]) for i in range(8)])
    assert np.abs(together - alone).max() < 1e-5


def test_photo_like_digits_are_classified(model, mnist_test):
    images, labels = mnist_test
    photos = np.stack([prepare_image(photo_like(images[i], at=(20 + 5 * i, 130 - 10 * i))).array
                       for i in range(10)])
    assert list(model.predict(photos).argmax(axis=1)) == list(labels[:10])


def test_endpoint_classifies_a_png_upload(client, mnist_test):
    buffer = io.BytesIO()
    Image.fromarray(mnist_test[0][0]).save(buffer, format="PNG")
    response = client.post("/v1/digits/predict", files={"image": ("7.png", buffer.getvalue(), "image/png")})
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "digits" and body["version"] == committed_version("digits").name
    assert body["request_id"] == response.headers["x-request-id"]
    (prediction,) = body["predictions"]
    assert prediction["digit"] == mnist_test[1][0] == 7 and prediction["label"] == "7"
    assert prediction["confidence"] == max(prediction["probabilities"].values())
    assert list(prediction["probabilities"]) == [str(d) for d in range(10)]


def test_each_answer_is_its_digits_model_output_rounded(client, model, mnist_test):
    """Several images in one request: per image, the digit is the model's argmax and the
    probabilities its outputs to 6 decimals, in the order sent (whatever path builds the answer)."""
    images = [mnist_test[0][i] for i in (0, 1, 2, 3, 4, 7)]
    files = []
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        files.append(("image", (f"{i}.png", buffer.getvalue(), "image/png")))
    response = client.post("/v1/digits/predict", files=files)
    assert response.status_code == 200, response.text
    expected = model.predict(np.stack([prepare_image(Image.fromarray(image)).array for image in images]))
    predictions = response.json()["predictions"]
    assert len(predictions) == len(images)
    for prediction, probabilities in zip(predictions, expected, strict=True):
        assert prediction["digit"] == int(probabilities.argmax())
        assert list(prediction["probabilities"].values()) == np.round(probabilities.astype(np.float64), 6).tolist()
        assert prediction["confidence"] == prediction["probabilities"][prediction["label"]]
    assert [p["digit"] for p in predictions] == [int(mnist_test[1][i]) for i in (0, 1, 2, 3, 4, 7)]


def test_endpoint_refuses_other_media_types(client):
    response = client.post("/v1/digits/predict", content=b"7", headers={"content-type": "text/plain"})
    assert response.status_code == 415
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["field"] == "content-type"


def test_docs_describe_every_request_shape(client):
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/v1/digits/predict"]["post"]
    content = operation["requestBody"]["content"]
    assert set(content) == {"multipart/form-data", "application/json", "application/octet-stream"}
    files = content["multipart/form-data"]["schema"]["properties"]["image"]
    assert (files["maxItems"], files["items"]["format"]) == (256, "binary")
    request = spec["components"]["schemas"][content["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]]
    assert request["properties"]["instances"]["maxItems"] == 256
    assert operation["operationId"] == "digits_predict"


@pytest.mark.parametrize("version", sorted(p.name for p in (MODELS / "digits").iterdir() if p.is_dir()))
def test_every_version_gives_a_digit_the_same_probabilities_in_any_batch(version, mnist_test):
    """``predict`` is batchable: the service joins the digits of requests that arrive together into
    one call (``app.core.execution.ModelCalls``), so no digit's answer may depend on its batch."""
    model = DigitsModel.load(MODELS / "digits" / version, Settings())
    digits = normalize_batch(mnist_test[0][:300])[..., None]
    alone = np.concatenate([model.predict(digits[i:i + 1]) for i in range(len(digits))])
    sizes = [2, 3, 5, 8, 13, 7, 4, 16, 1, 6, 24, 32, 40] * 10  # over 32 rows the runner splits the batch
    starts = np.cumsum([0, *sizes])
    batched = np.concatenate([model.predict(digits[a:b]) for a, b in zip(starts, starts[1:], strict=False)
                              if a < len(digits)])
    assert batched.shape == alone.shape == (len(digits), 10)
    assert np.array_equal(batched, alone)  # to the bit
