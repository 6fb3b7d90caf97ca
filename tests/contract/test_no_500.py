"""No input gives a 500: a sweep of malformed, extreme and mistyped values over every route, against
the real server. Each answer must be a 4xx problem (or a 2xx where the input is in fact valid)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

BIG_INT = "1" * 5000
EXTREMES = [BIG_INT, "1e400", "-1e400", "1e308", "-1e308", "NaN", "Infinity", "-Infinity", "null",
            "true", '"7"', "[]", "{}", "-1", "0", "4.9e-324", "18446744073709551617"]


def png(side: int = 28) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.arange(side * side) % 251).astype(np.uint8).reshape(side, side)).save(buffer, "PNG")
    return buffer.getvalue()


def json_bodies() -> list[tuple[str, str]]:
    """(route, raw JSON) with each extreme value in each numeric slot of each JSON route."""
    templates = [
        ("/v1/digits/predict", '{"instances": [{"pixels": [[%s]]}]}'),
        ("/v1/digits/predict", '{"instances": [{"pixels": %s}]}'),
        ("/v1/digits/predict", '{"instances": [{"image_b64": %s}]}'),
        ("/v1/digits/predict", '{"instances": %s}'),
        ("/v1/clustering/predict", '{"instances": [{"annual_income": %s, "spending_score": 3}]}'),
        ("/v1/clustering/predict", '{"instances": %s}'),
        ("/v1/clustering/fit", '{"data": [[%s, 1], [2, 3], [4, 5], [6, 7]], "k": 2}'),
        ("/v1/clustering/fit", '{"data": [[1, 2], [2, 3], [4, 5], [6, 7]], "k": %s}'),
        ("/v1/clustering/fit", '{"data": [[1, 2], [2, 3], [4, 5], [6, 7]], "k_min": %s, "k_max": 3}'),
        ("/v1/clustering/fit", '{"data": [[1, 2], [2, 3], [4, 5], [6, 7]], "scale": %s}'),
        ("/v1/feedback", '{"request_id": "0123456789abcdef0123456789abcdef", "label": "7", "index": %s}'),
        ("/v1/feedback", '{"request_id": %s, "label": "7"}'),
        ("/v1/feedback", '{"request_id": "x", "label": %s}'),
    ]
    return [(route, template % value) for route, template in templates for value in EXTREMES]


@pytest.mark.parametrize("route,body", json_bodies())
def test_extreme_json_values_are_never_a_500(client, route, body):
    response = client.post(route, content=body.encode(), headers={"content-type": "application/json"})
    assert response.status_code < 500, (route, body[:80], response.text[:300])
    if response.status_code >= 400:
        assert response.headers["content-type"] == "application/problem+json"


RAW_BODIES = [b"", b"\x00" * 100, b"\xff\xfe\xfd", "é".encode("latin-1"), b"[" * 50_000, b'{"a":' * 5000,
              b"{}", b"[]", b"null", b'"x"', b"1" * 5000]


@pytest.mark.parametrize("route", ["/v1/digits/predict", "/v1/clustering/predict", "/v1/clustering/fit",
                                   "/v1/feedback", "/v1/emotion/predict", "/v1/segmentation/predict",
                                   "/v1/clustering/palette"])
@pytest.mark.parametrize("content_type", ["application/json", "multipart/form-data",
                                          "multipart/form-data; boundary=x", "text/plain", None])
def test_malformed_bodies_and_content_types_are_never_a_500(client, route, content_type):
    headers = {"content-type": content_type} if content_type else {}
    for body in RAW_BODIES:
        response = client.post(route, content=body, headers=headers)
        assert response.status_code < 500, (route, content_type, body[:20], response.text[:300])


@pytest.mark.parametrize("field,payload", [
    ("image", b""), ("image", b"GIF89a" + b"\x00" * 40), ("image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 50),
    ("image", png()[:-20]), ("image", b"II*\x00" + b"\xff" * 60), ("image", b"\xff\xd8\xff" + b"\x00" * 60),
    ("audio", b"RIFF\x00\x00\x00\x00WAVEfmt "), ("audio", b"fLaC" + b"\x00" * 80),
    ("audio", b"OggS" + b"\x00" * 80), ("audio", b"\x1aE\xdf\xa3" + b"\x00" * 80),
])
def test_truncated_and_lying_files_are_never_a_500(client, field, payload):
    routes = {"image": ["/v1/digits/predict", "/v1/segmentation/predict", "/v1/clustering/palette"],
              "audio": ["/v1/emotion/predict"]}[field]
    for route in routes:
        response = client.post(route, files={field: ("upload.bin", payload, "application/octet-stream")})
        assert response.status_code < 500, (route, payload[:12], response.text[:300])


@pytest.mark.parametrize("query", ["threshold=0", "threshold=1", "threshold=nan", "threshold=1e400",
                                   "threshold=-1", "format=gif", "format=", "threshold=%00"])
def test_bad_query_parameters_are_never_a_500(client, query):
    response = client.post(f"/v1/segmentation/predict?{query}",
                           files={"image": ("a.png", png(64), "image/png")})
    assert 400 <= response.status_code < 500, (query, response.text[:300])


@pytest.mark.parametrize("path", ["/v1/monitoring/drift?window=" + "9" * 5000,
                                  "/v1/monitoring/drift?window=-1", "/v1/monitoring/drift?window=1e400s",
                                  "/v1/monitoring/dashboard?history=0s", "/v1/feedback?limit=" + "9" * 5000,
                                  "/v1/monitoring/accuracy?window=99999999999999999999d",
                                  "/v1/monitoring/drift?model=%00"])
def test_bad_monitoring_queries_are_never_a_500(client, path):
    response = client.get(path)
    assert response.status_code < 500, (path, response.text[:300])
    json.loads(response.text) if "dashboard" not in path or response.status_code >= 400 else None
