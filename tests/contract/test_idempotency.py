"""Safe retries with Idempotency-Key, on the real server (two workers), SQLite and PostgreSQL: one run
and one log row however many times a request is sent, the same answer to every retry, another
request under a used key refused."""

from __future__ import annotations

import concurrent.futures
import io
import json
import uuid
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from bench.common import mnist_digit_png
from bench.liveserver import LiveServer, running_server
from tests.monitoring_db import BACKENDS, database_url
from tests.support import rows, wait_until


@pytest.fixture(scope="module", params=BACKENDS)
def server(request, tmp_path_factory) -> Iterator[tuple[LiveServer, str]]:
    with database_url(request.param, tmp_path_factory.mktemp(request.param)) as url:
        with running_server(env={"DATABASE_URL": url, "LOG_FLUSH_INTERVAL_S": "0.1"}, workers=2) as live:
            yield live, url


def count(url: str, sql: str, **params) -> int:
    return int(rows(url, sql, **params)[0][0])


def key() -> dict[str, str]:
    return {"Idempotency-Key": str(uuid.uuid4())}


def post_digit(base_url: str, png: bytes, headers: dict[str, str]) -> httpx.Response:
    # A new client each time: a new connection (either worker) and a new multipart boundary.
    with httpx.Client(base_url=base_url, timeout=30.0) as client:
        return client.post("/v1/digits/predict", files={"image": ("d.png", png, "image/png")}, headers=headers)


def test_twenty_posts_at_once_with_one_key_run_once_and_get_one_answer(server):
    live, url = server
    before = count(url, "SELECT COUNT(*) FROM predictions")
    headers, png = key(), mnist_digit_png(3)
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: post_digit(live.base_url, png, headers), range(20)))
    assert [a.status_code for a in answers] == [200] * 20
    assert len({a.content for a in answers}) == 1  # the same body, the same request id in it
    request_id = answers[0].json()["request_id"]
    assert {a.headers["x-request-id"] for a in answers} == {request_id}
    assert [a.headers.get("idempotent-replayed") for a in answers].count("true") == 19
    # Present first (the one run's row), then nothing more: one row in all, not one per request.
    assert wait_until(lambda: count(url, "SELECT COUNT(*) FROM predictions WHERE request_id = :r",
                                    r=request_id) == 1, timeout=10)
    later = post_digit(live.base_url, mnist_digit_png(4), {})  # a row written after ours, then counted
    assert wait_until(lambda: count(url, "SELECT COUNT(*) FROM predictions WHERE request_id = :r",
                                    r=later.json()["request_id"]) == 1, timeout=10)
    assert count(url, "SELECT COUNT(*) FROM predictions") == before + 2


def test_a_retry_after_the_answer_gets_it_again_with_a_new_boundary(server):
    live, _ = server
    headers = key()
    first = post_digit(live.base_url, mnist_digit_png(5), headers)
    again = post_digit(live.base_url, mnist_digit_png(5), headers)
    assert first.status_code == again.status_code == 200
    assert "idempotent-replayed" not in first.headers and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json() and again.headers["x-model-version"] == first.headers["x-model-version"]


def test_the_same_key_with_another_request_is_a_422(server):
    live, _ = server
    headers = key()
    assert post_digit(live.base_url, mnist_digit_png(1), headers).status_code == 200
    other = post_digit(live.base_url, mnist_digit_png(2), headers)
    assert other.status_code == 422 and other.headers["content-type"] == "application/problem+json"
    assert other.json()["code"] == "idempotency-key-reused" and other.json()["field"] == "Idempotency-Key"
    with httpx.Client(base_url=live.base_url) as client:  # another path with that key
        elsewhere = client.post("/v1/clustering/predict", headers=headers,
                                json={"instances": [{"annual_income": 50, "spending_score": 50}]})
    assert elsewhere.status_code == 422 and elsewhere.json()["code"] == "idempotency-key-reused"


def test_a_client_error_is_replayed_too(server):
    live, _ = server
    headers = key()
    with httpx.Client(base_url=live.base_url) as client:
        first = client.post("/v1/digits/predict", headers=headers,
                            files={"image": ("x.png", b"not an image", "image/png")})
        again = client.post("/v1/digits/predict", headers=headers,
                            files={"image": ("x.png", b"not an image", "image/png")})
    assert first.status_code == again.status_code and 400 <= first.status_code < 500
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"


def test_json_v2_and_feedback_posts_are_idempotent_too(server):
    live, url = server
    with httpx.Client(base_url=live.base_url, timeout=30.0) as client:
        headers = key()
        body = {"instances": [{"annual_income": 80, "spending_score": 90}]}
        first, again = (client.post("/v1/clustering/predict", json=body, headers=headers) for _ in range(2))
        assert first.status_code == 200 and again.json() == first.json()
        assert again.headers["idempotent-replayed"] == "true"

        headers = key()
        pixels = np.asarray(Image.open(io.BytesIO(mnist_digit_png(8))), dtype=np.float32).ravel().tolist()
        tensor = {"inputs": [{"name": "pixels", "shape": [1, 28, 28], "datatype": "FP32", "data": pixels}]}
        first, again = (client.post("/v2/models/digits/infer", json=tensor, headers=headers) for _ in range(2))
        assert first.status_code == 200 and again.content == first.content
        assert again.headers["idempotent-replayed"] == "true"

        prediction = client.post("/v1/digits/predict", files={"image": ("d.png", mnist_digit_png(7), "image/png")})
        request_id = prediction.json()["request_id"]
        headers = key()
        feedback = {"request_id": request_id, "label": "7"}
        first, again = (client.post("/v1/feedback", json=feedback, headers=headers) for _ in range(2))
        assert first.status_code == again.status_code == 201 and again.json() == first.json()
        assert again.headers["idempotent-replayed"] == "true"
    assert wait_until(lambda: count(url, "SELECT COUNT(*) FROM feedback WHERE request_id = :r", r=request_id) == 1)


@pytest.mark.parametrize("bad", ["", "a b", "x" * 256, "caf\u00e9"])
def test_a_malformed_key_is_a_400_naming_the_header(server, bad):
    live, _ = server
    with httpx.Client(base_url=live.base_url) as client:
        response = client.post("/v1/clustering/predict", headers={"Idempotency-Key": bad.encode("utf-8")},
                               json={"instances": [{"annual_income": 50, "spending_score": 50}]})
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "invalid-idempotency-key" and response.json()["field"] == "Idempotency-Key"


def test_without_a_key_every_post_runs(server):
    live, _ = server
    answers = [post_digit(live.base_url, mnist_digit_png(6), {}) for _ in range(2)]
    assert answers[0].json()["request_id"] != answers[1].json()["request_id"]
    assert not any("idempotent-replayed" in a.headers for a in answers)
    assert json.loads(answers[0].content)["predictions"] == json.loads(answers[1].content)["predictions"]
