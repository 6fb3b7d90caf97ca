"""The examples of docs/api.md: every file in examples/ through its endpoint, as the curl lines send it,
and the four tasks answering two instances at once with the envelope and its headers, readable by a
browser app on another origin (CORS)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from bench.liveserver import running_server

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ORIGIN = "https://app.example"


def read(name: str) -> bytes:
    return (EXAMPLES / name).read_bytes()


@pytest.fixture(scope="module")
def cors_server():
    with running_server(workers=1, env={"CORS_ORIGINS": ORIGIN}) as live:
        yield live


def test_every_example_file_gets_its_expected_answer(client):
    digit = client.post("/v1/digits/predict", files={"image": ("digit-7.png", read("digit-7.png"), "image/png")})
    drawn = client.post("/v1/digits/predict", content=read("digit-7-drawn.png"), headers={"content-type": "image/png"})
    assert [p["label"] for r in (digit, drawn) for p in r.json()["predictions"]] == ["7", "7"]
    speech = client.post("/v1/emotion/predict",
                         files={"audio": ("a.wav", read("emodb-08a01Wa-anger.wav"), "audio/wav")})
    assert speech.json()["predictions"][0]["label"] == "anger"
    mask = client.post("/v1/segmentation/predict", files={"image": ("m.png", read("membrane-slice3-crop.png"), "image/png")})
    assert mask.status_code == 200 and Image.open(io.BytesIO(mask.content)).size == (256, 256)
    palette = client.post("/v1/clustering/palette", data={"colors": "4"},
                          files={"image": ("sunset.png", read("sunset.png"), "image/png")})
    assert len(palette.json()["predictions"][0]["colors"]) == 4
    segments = client.post("/v1/clustering/predict", content=read("mall-customers.json"),
                           headers={"content-type": "application/json"})
    assert len(segments.json()["predictions"]) == 6
    fit = client.post("/v1/clustering/fit", content=read("mall-fit.json"), headers={"content-type": "application/json"})
    (result,) = fit.json()["predictions"]
    assert result["n_rows"] == 40 and 2 <= result["k"] <= 8 and result["selection"] == "silhouette"


def two_of_each() -> dict[str, dict]:
    digit, drawn = read("digit-7.png"), read("digit-7-drawn.png")
    wav = read("emodb-08a01Wa-anger.wav")
    crop = read("membrane-slice3-crop.png")
    half = io.BytesIO()
    Image.open(io.BytesIO(crop)).crop((0, 0, 128, 96)).save(half, "PNG")
    return {
        "/v1/digits/predict": {"files": [("image", ("a.png", digit, "image/png")), ("image", ("b.png", drawn, "image/png"))]},
        "/v1/emotion/predict": {"files": [("audio", ("a.wav", wav, "audio/wav")), ("audio", ("b.wav", wav, "audio/wav"))]},
        "/v1/segmentation/predict?format=json": {"files": [("image", ("a.png", crop, "image/png")),
                                                           ("image", ("b.png", half.getvalue(), "image/png"))]},
        "/v1/clustering/predict": {"json": {"instances": json.loads(read("mall-customers.json"))["instances"][:2]}},
    }


@pytest.mark.parametrize("path", list(two_of_each()))
def test_two_instances_come_back_in_one_envelope_with_headers_a_browser_can_read(cors_server, path):
    response = httpx.post(cors_server.base_url + path, headers={"Origin": ORIGIN}, timeout=60.0,
                          **two_of_each()[path])
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"model", "version", "request_id", "predictions"}
    assert len(body["predictions"]) == 2
    assert response.headers["x-model-version"] == body["version"]
    assert response.headers["x-request-id"] == body["request_id"]
    timing = {part.split(";")[0].strip() for part in response.headers["server-timing"].split(",")}
    assert {"decode", "inference", "total"} <= timing
    assert response.headers["access-control-allow-origin"] == ORIGIN
    exposed = {h.strip().lower() for h in response.headers["access-control-expose-headers"].split(",")}
    assert {"x-request-id", "x-model-version", "server-timing"} <= exposed
    if "segmentation" in path:
        sizes = [Image.open(io.BytesIO(base64.b64decode(p["mask_png_b64"]))).size for p in body["predictions"]]
        assert sizes == [(256, 256), (128, 96)]
    if "digits" in path:
        assert [p["label"] for p in body["predictions"]] == ["7", "7"]
    assert np.isfinite([p.get("confidence", 0.0) for p in body["predictions"]]).all()


def test_an_image_over_the_pixel_limit_is_refused_alike_by_every_task(client):
    """5000 x 5000 (25 M pixels) is over MAX_IMAGE_PIXELS everywhere: the same 413 and limit."""
    buffer = io.BytesIO()
    Image.new("L", (5000, 5000), 255).save(buffer, "PNG")
    problems = []
    for path in ("/v1/digits/predict", "/v1/segmentation/predict", "/v1/clustering/palette"):
        response = client.post(path, files={"image": ("big.png", buffer.getvalue(), "image/png")})
        assert response.status_code == 413, response.text
        problems.append((response.json()["code"], response.json()["max_pixels"]))
    assert problems == [("image-too-large", 16_777_216)] * 3
    models = {m["task"]: m for m in client.get("/v1/models").json()["models"]}
    shown = {t: [r["value"] for r in models[t]["limits"] if r["what"] == "pixels per image"]
             for t in ("digits", "segmentation", "clustering")}
    assert shown == {t: ["16,777,216"] for t in shown}
