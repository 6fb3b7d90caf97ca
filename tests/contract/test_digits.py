"""POST /v1/digits/predict against the real gunicorn server, with real MNIST test digits: as
MNIST-style pixels, as image files in every supported format, and re-drawn the way people send
them (dark ink on white paper, 300x300, off-centre, thick strokes, transparent canvases)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from scipy.stats import binom

from tests.support import MODELS, SHARED_DATA, assert_problem, photo_like

MNIST = SHARED_DATA / "mnist" / "mnist.npz"
URL = "/v1/digits/predict"


@pytest.fixture(scope="module")
def mnist_test() -> tuple[np.ndarray, np.ndarray]:
    with np.load(MNIST) as data:
        return data["x_test"][:300], data["y_test"][:300].astype(int)


def encode(image: Image.Image | np.ndarray, fmt: str = "PNG", **options) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def canvas_drawing(digit: np.ndarray) -> Image.Image:
    """An MNIST digit as a browser-canvas PNG: black strokes on a fully transparent 280x280 RGBA."""
    alpha = Image.fromarray(digit).resize((280, 280), Image.BICUBIC)
    canvas = Image.new("RGBA", (280, 280), (0, 0, 0, 0))
    canvas.putalpha(alpha)
    return canvas


def files(*payloads: tuple[str, bytes, str]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("image", payload) for payload in payloads]


def assert_digits_problem(response, status: int, *, field: str, code: str | None = None) -> dict:
    """A digits problem names its field, in ``field`` and in its detail (unless the field is the
    whole body or its content type)."""
    problem = assert_problem(response, status, code=code, field=field)
    assert field in problem["detail"] or problem["field"] in ("body", "content-type")
    return problem


def digits_of(response) -> list[int]:
    assert response.status_code == 200, response.text
    return [p["digit"] for p in response.json()["predictions"]]


# ---- what comes back -------------------------------------------------------------------------


def test_response_has_model_version_request_id_and_probabilities(client, mnist_test):
    response = client.post(URL, json={"instances": [{"pixels": mnist_test[0][0].tolist()}]},
                           headers={"X-Request-ID": "digits-contract-1"})
    body = response.json()
    assert response.status_code == 200
    assert set(body) == {"model", "version", "request_id", "predictions"}
    served = {m["task"]: m["version"] for m in client.get("/v1/models").json()["models"]}
    assert body["model"] == "digits" and body["version"] == served["digits"]
    assert body["request_id"] == response.headers["x-request-id"] != "digits-contract-1"
    assert response.headers["x-correlation-id"] == "digits-contract-1"
    (prediction,) = body["predictions"]
    assert prediction["digit"] == 7
    assert list(prediction["probabilities"]) == [str(d) for d in range(10)]
    assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert prediction["confidence"] == max(prediction["probabilities"].values()) > 0.9
    assert prediction["label"] == str(prediction["digit"])
    assert response.headers["x-model-version"] == body["version"]
    assert {"decode", "inference", "total"} <= {part.split(";")[0].strip() for part in
                                                response.headers["server-timing"].split(",")}


def test_real_mnist_test_digits_are_classified(client, mnist_test):
    images, labels = mnist_test
    response = client.post(URL, json={"instances": [{"pixels": image.tolist()} for image in images[:256]]})
    predicted = np.array(digits_of(response))
    assert len(predicted) == 256
    # The floor comes from the served model's committed MNIST test accuracy: the count of right
    # answers a model that accurate reaches on 256 digits in 99 % of samples.
    served = client.get("/v1/models/digits").json()["version"]
    accuracy = json.loads((MODELS / "digits" / served / "metadata.json").read_text())["metrics"]["test_accuracy"]
    assert int((predicted == labels[:256]).sum()) >= binom.ppf(0.01, 256, accuracy)


def test_same_digit_as_png_jpeg_webp_bmp_gif_pixels_and_base64(client, mnist_test):
    image, label = mnist_test[0][1], mnist_test[1][1]
    uploads = files(("d.png", encode(image), "image/png"), ("d.jpg", encode(image, "JPEG", quality=90), "image/jpeg"),
                    ("d.webp", encode(image, "WEBP", quality=90), "image/webp"),
                    ("d.bmp", encode(image, "BMP"), "image/bmp"), ("d.gif", encode(image, "GIF"), "image/gif"))
    as_files = client.post(URL, files=uploads)
    as_json = client.post(URL, json={"instances": [
        {"pixels": image.tolist()}, {"pixels": (image / 255.0).tolist()},
        {"image_b64": base64.b64encode(encode(image)).decode()},
        {"image_b64": "data:image/png;base64," + base64.b64encode(encode(image)).decode()}]})
    assert digits_of(as_files) == [label] * 5
    assert digits_of(as_json) == [label] * 4
    png, pixels = as_files.json()["predictions"][0], as_json.json()["predictions"][0]
    assert png["probabilities"] == pytest.approx(pixels["probabilities"], abs=1e-5)


def test_several_files_come_back_in_the_order_sent(client, mnist_test):
    images, labels = mnist_test
    picks = [3, 2, 1, 18, 4, 8, 11, 0, 61, 7]  # the digits 0 to 9, shuffled
    response = client.post(URL, files=files(*[(f"{i}.png", encode(images[i]), "image/png") for i in picks]))
    assert digits_of(response) == [labels[i] for i in picks]


def test_photo_like_digits_dark_on_white_off_centre_thick_are_classified(client, mnist_test):
    images, labels = mnist_test
    picks = list(range(12))
    photos = [photo_like(images[i], at=(10 + 10 * i, 120 - 10 * i)) for i in picks]
    uploads = [(f"{i}.jpg", encode(p, "JPEG", quality=85), "image/jpeg") for i, p in zip(picks, photos, strict=True)]
    assert digits_of(client.post(URL, files=files(*uploads))) == [labels[i] for i in picks]


def test_transparent_canvas_drawings_are_read_as_ink_on_white_paper(client, mnist_test):
    images, labels = mnist_test
    uploads = [(f"{i}.png", encode(canvas_drawing(images[i])), "image/png") for i in range(5)]
    assert digits_of(client.post(URL, files=files(*uploads))) == list(labels[:5])


# ---- what is refused -------------------------------------------------------------------------


def test_corrupt_image_is_422_naming_the_file(client, mnist_test):
    good = encode(mnist_test[0][0])
    response = client.post(URL, files=files(("a.png", good, "image/png"), ("b.png", good[:60], "image/png")))
    assert_digits_problem(response, 422, field="image[1]", code="corrupt-image")


def test_text_file_is_415_naming_the_file(client):
    response = client.post(URL, files=files(("notes.txt", b"the digit seven", "text/plain")))
    assert_digits_problem(response, 415, field="image[0]", code="unsupported-image-format")


def test_blank_image_is_422_not_a_guess(client, mnist_test):
    blank = encode(np.full((300, 300), 255, dtype=np.uint8))
    response = client.post(URL, files=files(("ok.png", encode(mnist_test[0][0]), "image/png"),
                                            ("blank.png", blank, "image/png")))
    assert_digits_problem(response, 422, field="image[1]", code="blank-image")
    pixels = client.post(URL, json={"instances": [{"pixels": [[0] * 28] * 28}]})
    assert_digits_problem(pixels, 422, field="instances[0].pixels", code="blank-image")


def test_empty_file_and_missing_field_are_422(client):
    assert_digits_problem(client.post(URL, files=files(("e.png", b"", "image/png"))), 422,
                          field="image[0]", code="empty-file")
    assert_digits_problem(client.post(URL, files={"picture": ("x.png", b"x", "image/png")}), 422,
                          field="image", code="missing-file")


def test_empty_and_malformed_json_bodies(client):
    headers = {"content-type": "application/json"}
    assert_digits_problem(client.post(URL, content=b"", headers=headers), 422, field="body", code="empty-body")
    assert_digits_problem(client.post(URL, content=b'{"instances": [', headers=headers), 400,
                          field="body", code="malformed-json")
    assert_digits_problem(client.post(URL, json={"instances": []}), 422, field="instances")
    assert_digits_problem(client.post(URL, json=[1, 2]), 422, field="body")


def test_more_than_256_instances_is_refused(client, mnist_test):
    instances = [{"pixels": mnist_test[0][i % 300].tolist()} for i in range(257)]
    problem = assert_digits_problem(client.post(URL, json={"instances": instances}), 422, field="instances",
                                    code="too-many-instances")
    assert problem["max_instances"] == 256


def test_pixels_of_the_wrong_shape_name_the_instance(client, mnist_test):
    good = {"pixels": mnist_test[0][0].tolist()}
    instances = [good, good, good, {"pixels": mnist_test[0][0][:27].tolist()}]
    assert_digits_problem(client.post(URL, json={"instances": instances}), 422,
                          field="instances[3].pixels", code="invalid-request")


@pytest.mark.parametrize("bad,field,code", [
    ("NaN", "instances[0].pixels[0][27]", "invalid-request"),
    ("Infinity", "instances[0].pixels[0][27]", "invalid-request"),
    ('"7"', "instances[0].pixels[0][27]", "invalid-request"),
    ("-3", "instances[0].pixels", "invalid-pixels"),
    ("300", "instances[0].pixels", "invalid-pixels"),
])
def test_pixels_must_be_finite_numbers_in_range(client, bad, field, code):
    row = ", ".join(["0"] * 14 + ["255"] * 13 + [bad])
    body = '{"instances": [{"pixels": [' + ", ".join([f"[{row}]"] * 28) + "]}]}"
    response = client.post(URL, content=body.encode(), headers={"content-type": "application/json"})
    assert_digits_problem(response, 422, field=field, code=code)


def test_instances_must_be_pixels_or_image_b64(client, mnist_test):
    pixels = mnist_test[0][0].tolist()
    both = {"instances": [{"pixels": pixels, "image_b64": "aGk="}]}
    assert_digits_problem(client.post(URL, json=both), 422, field="instances[0]", code="invalid-request")
    assert_digits_problem(client.post(URL, json={"instances": [{"pixels": pixels}, 7]}), 422, field="instances[1]")
    not_b64 = {"instances": [{"image_b64": "%%% not base64 %%%"}]}
    assert_digits_problem(client.post(URL, json=not_b64), 422, field="instances[0].image_b64", code="invalid-base64")
    not_image = {"instances": [{"image_b64": base64.b64encode(b"plain text").decode()}]}
    assert_digits_problem(client.post(URL, json=not_image), 415, field="instances[0].image_b64")


def test_other_content_types_are_415_and_a_raw_image_body_is_one_instance(client, mnist_test):
    png = encode(mnist_test[0][0])
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "audio/wav", None):
        headers = {"content-type": content_type} if content_type else {}
        response = client.post(URL, content=png, headers=headers)
        assert_digits_problem(response, 415, field="content-type", code="unsupported-media-type")
        assert json.loads(response.text)["request_id"] == response.headers["x-request-id"]
    raw = client.post(URL, content=png, headers={"content-type": "image/png"})
    as_file = client.post(URL, files=files(("7.png", png, "image/png")))
    assert digits_of(raw) == digits_of(as_file) == [7]
    assert raw.json()["predictions"][0]["probabilities"] == as_file.json()["predictions"][0]["probabilities"]


def test_requests_that_arrive_together_share_model_calls_and_each_gets_its_own_answer(mnist_test):
    """On one worker, requests that arrive together have their model calls made together on the
    event loop, as one batch (``/health/ready`` counts the groups and the calls batched); each
    still gets the answer it gets alone."""
    import http.client
    import socket
    import time
    from urllib.parse import urlsplit

    import httpx

    from bench.liveserver import running_server

    images, _ = mnist_test
    bodies = [encode(d) for d in images[:48]]
    with running_server(workers=1) as live, httpx.Client(base_url=live.base_url, timeout=30.0) as one:
        alone = [one.post(URL, content=b, headers={"Content-Type": "image/png"}).json()["predictions"][0]
                 for b in bodies]
        before = one.get("/health/ready").json()["model_calls"]
        assert before["calls"] == before["groups"]  # one request at a time: groups of one
        address = urlsplit(live.base_url)
        # 16 requests on 16 connections, all but their last byte; then the 16 last bytes at once,
        # so the requests are complete within microseconds of each other.
        for start in range(0, len(bodies), 16):
            batch = range(start, start + 16)
            sockets = [socket.create_connection((address.hostname, address.port), timeout=30) for _ in batch]
            try:
                requests = [f"POST {URL} HTTP/1.1\r\nHost: {address.netloc}\r\nContent-Type: image/png\r\n"
                            f"Content-Length: {len(bodies[i])}\r\n\r\n".encode() + bodies[i] for i in batch]
                for sock, request in zip(sockets, requests, strict=True):
                    sock.sendall(request[:-1])
                time.sleep(0.3)
                for sock, request in zip(sockets, requests, strict=True):
                    sock.sendall(request[-1:])
                for sock, i in zip(sockets, batch, strict=True):
                    response = http.client.HTTPResponse(sock)
                    response.begin()
                    body = response.read()
                    assert response.status == 200, body
                    assert json.loads(body)["predictions"][0] == alone[i], i
            finally:
                for sock in sockets:
                    sock.close()
        after = one.get("/health/ready").json()["model_calls"]
    calls, groups = after["calls"] - before["calls"], after["groups"] - before["groups"]
    assert calls == len(bodies)
    assert groups < calls / 2, after  # most calls were made with others
    assert before["batched"] == 0 and after["batched"] > calls / 2, after  # as one batch: the model is batchable
