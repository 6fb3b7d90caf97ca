"""Drift and accuracy by client release: a release that sends different inputs is named, where the
pooled report could only say that something drifted."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image, ImageFilter

from bench.liveserver import running_server
from tests.support import SHARED_DATA


@pytest.fixture(scope="module")
def served() -> httpx.Client:
    with running_server(workers=1, env={"LOG_FLUSH_INTERVAL_S": "0.1"}) as live, \
            httpx.Client(base_url=live.base_url, timeout=60) as client:
        yield client


def pngs(images: np.ndarray, *, invert: bool = False, blur: float = 0.0, rotate: int = 0) -> list[bytes]:
    """MNIST digits as PNGs, as sent (white on black), or inverted (dark ink on white), blurred or
    turned by ``rotate`` degrees (a camera held sideways)."""
    out = []
    for image in images:
        picture = Image.fromarray(255 - image if invert else image)
        if blur:
            picture = picture.filter(ImageFilter.GaussianBlur(blur))
        if rotate:
            picture = picture.rotate(rotate)
        buffer = io.BytesIO()
        picture.save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def send(client: httpx.Client, files: list[bytes], release: str) -> list[str]:
    ids = []
    for start in range(0, len(files), 50):
        answer = client.post("/v1/digits/predict", headers={"X-Client-Version": release},
                             files=[("image", (f"{i}.png", f, "image/png")) for i, f in enumerate(files[start:start + 50])])
        assert answer.status_code == 200, answer.text
        ids.append(answer.json()["request_id"])
    return ids


def test_a_release_that_sends_inverted_blurred_digits_is_named_as_the_one_that_drifted(served):
    with np.load(SHARED_DATA / "mnist" / "mnist.npz") as data:
        images = data["x_test"][:400]
    send(served, pngs(images[:200]), "app/1.0")
    send(served, pngs(images[200:], invert=True, blur=1.0), "app/1.1")  # a new camera pipeline

    def report(**params: str) -> dict:
        return served.get("/v1/monitoring/drift", params={"model": "digits", "window": "400", **params}).json()["models"][0]

    pooled, old, new = report(), report(client_version="app/1.0"), report(client_version="app/1.1")
    assert sorted((r["client_version"], r["n"]) for r in pooled["client_versions"]) == [("app/1.0", 200), ("app/1.1", 200)]
    assert (old["n"], old["status"]) == (200, "ok"), old
    assert (new["n"], new["status"]) == (200, "drift"), new
    assert new["client_version"] == "app/1.1" and pooled["status"] != "ok"


def test_releases_are_bounded_and_malformed_ones_bucketed(served):
    answer = served.post("/v1/clustering/predict", headers={"X-Client-Version": "<script>"},
                         json={"instances": [{"annual_income": 60, "spending_score": 50}]})
    assert answer.status_code == 200
    drift = served.get("/v1/monitoring/drift", params={"model": "clustering", "window": "10"}).json()["models"][0]
    assert {"client_version": "invalid", "n": 1} in drift["client_versions"]
    assert served.get("/v1/monitoring/drift", params={"client_version": "x" * 49}).status_code == 422


def test_accuracy_is_split_by_release_too(served):
    with np.load(SHARED_DATA / "mnist" / "mnist.npz") as data:
        images, labels = data["x_test"][400:430], data["y_test"][400:430]
    for release, files in (("app/2.0", pngs(images)), ("app/2.1", pngs(images, rotate=90))):
        for image, label in zip(files, labels, strict=True):
            made = served.post("/v1/digits/predict", headers={"X-Client-Version": release},
                               files={"image": ("d.png", image, "image/png")}).json()
            assert served.post("/v1/feedback", json={"request_id": made["request_id"], "label": str(label)}).status_code == 201
    upright = served.get("/v1/monitoring/accuracy", params={"model": "digits", "client_version": "app/2.0"}).json()["models"][0]
    sideways = served.get("/v1/monitoring/accuracy", params={"model": "digits", "client_version": "app/2.1"}).json()["models"][0]
    assert upright["labelled"] == sideways["labelled"] == 30
    assert upright["accuracy"] > sideways["accuracy"]


def test_the_dashboard_names_the_releases_and_shows_one_on_request(served):
    pooled = served.get("/v1/monitoring/dashboard", params={"model": "digits", "window": "400"}).text
    assert "Client releases in the window:" in pooled and "app/1.1 (200)" in pooled
    one = served.get("/v1/monitoring/dashboard", params={"model": "digits", "window": "400",
                                                        "client_version": "app/1.1"}).text
    assert "Client release: app/1.1." in one
