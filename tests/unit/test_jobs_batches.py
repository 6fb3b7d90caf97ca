"""Cutting a batch job into requests of the synchronous size (app.jobs.batches), on the real endpoints."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from app.core.errors import ProblemError
from app.core.limits import JOB_MAX_PARTS
from app.core.pipeline import REGISTERED
from app.jobs.batches import join, split
from app.tasks import load_slices


@pytest.fixture(scope="module")
def endpoints() -> dict:
    load_slices(["app.tasks.clustering", "app.tasks.digits", "app.tasks.segmentation", "app.tasks.emotion"])
    return {endpoint.path: endpoint for endpoint in REGISTERED}


def multipart(count: int, extra: dict | None = None) -> tuple[str, bytes]:
    request = httpx.Request("POST", "http://x/", files=[("image", (f"{i}.png", f"png-{i}".encode(), "image/png"))
                                                        for i in range(count)], data=extra or {})
    return request.headers["content-type"], request.read()


def test_multipart_files_are_cut_at_the_synchronous_limit_with_every_field_in_each_part(endpoints):
    digits = endpoints["/v1/digits/predict"]
    content_type, body = multipart(600)
    parts = asyncio.run(split(digits, content_type, body))
    assert [(p.first_instance, p.instances) for p in parts] == [(0, 256), (256, 256), (512, 88)]
    palette = endpoints["/v1/clustering/palette"]
    content_type, body = multipart(6, {"colors": "5"})
    parts = asyncio.run(split(palette, content_type, body))
    assert [p.instances for p in parts] == [4, 2]
    for part, names in zip(parts, [range(0, 4), range(4, 6)], strict=True):
        text = part.body.decode()
        assert text.count('name="colors"') == 1 and [f'filename="{i}.png"' in text for i in names] == [True] * len(names)
        assert f"png-{names[0]}" in text and part.content_type.startswith("multipart/form-data; boundary=")


def test_a_request_within_the_limit_is_one_part_unchanged(endpoints):
    content_type, body = multipart(3)
    (part,) = asyncio.run(split(endpoints["/v1/digits/predict"], content_type, body))
    assert (part.content_type, part.body) == (content_type, body)
    (raw,) = asyncio.run(split(endpoints["/v1/digits/predict"], "image/png", b"\x89PNG"))
    assert raw.body == b"\x89PNG"


def test_json_instances_and_csv_rows_are_cut_and_too_many_is_refused(endpoints):
    clustering = endpoints["/v1/clustering/predict"]
    rows = [{"annual_income": i, "spending_score": 50} for i in range(25_000)]
    parts = asyncio.run(split(clustering, "application/json", json.dumps({"instances": rows}).encode()))
    assert [p.instances for p in parts] == [10_000, 10_000, 5_000]
    assert json.loads(parts[2].body)["instances"][0] == {"annual_income": 20_000, "spending_score": 50}
    csv_parts = asyncio.run(split(clustering, "text/csv", b"spending_score,annual_income\n39,15\n81,15\n"))
    assert json.loads(csv_parts[0].body) == {"instances": [{"spending_score": 39.0, "annual_income": 15.0},
                                                           {"spending_score": 81.0, "annual_income": 15.0}]}
    with pytest.raises(ProblemError) as unknown:
        asyncio.run(split(clustering, "text/csv", b"income,score\n1,2\n"))
    assert unknown.value.code == "invalid-csv"
    too_many = {"instances": [{"annual_income": 1, "spending_score": 1}] * (10_000 * JOB_MAX_PARTS + 1)}
    with pytest.raises(ProblemError) as refused:
        asyncio.run(split(clustering, "application/json", json.dumps(too_many).encode()))
    assert (refused.value.status, refused.value.code) == (413, "too-many-instances")
    # CSV only where an instance is a row of numbers: elsewhere the body goes on whole (the synchronous
    # path answers 415)
    (whole,) = asyncio.run(split(endpoints["/v1/digits/predict"], "text/csv", b"pixels\n1\n"))
    assert whole.body == b"pixels\n1\n"


def test_join_keeps_the_first_envelope_and_every_prediction_in_order():
    answers = [{"model": "digits", "request_id": "r", "predictions": [1, 2]}, {"model": "digits", "predictions": [3]}]
    assert join(answers) == {"model": "digits", "request_id": "r", "predictions": [1, 2, 3]}
