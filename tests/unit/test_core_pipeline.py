"""The request pipeline (app.core.pipeline) on endpoints declared here, in-process: how a body is
read by its media type, the problems for what cannot be read (sizes, value counts, consent),
parameters, the envelope and its headers, what the job is given (its size, a dyno place, the event
loop), the prediction log call and its durable wait, the shadow hand-off, and the OpenAPI description
an endpoint gets. The parts that need no app are in test_core_pipeline_parts.py."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import time
from collections.abc import Iterator
from typing import Any, Literal

import pytest
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field

from app.core import pipeline
from app.core.config import Settings
from app.core.errors import ProblemError
from app.core.events import Observers
from app.core.idempotency import IDEMPOTENCY_PARAMETER
from app.core.limits import DB_CALL_TIMEOUT_S, JSON_VALUES_SLACK
from app.core.middleware import RequestContextMiddleware
from app.core.pipeline import (
    CLIENT_VERSION_PARAMETER,
    CONSENT_PARAMETER,
    CORRELATION_HEADER,
    PROBLEM_STATUSES,
    RAW_MEDIA_TYPE,
    Endpoint,
    Instance,
    Job,
    Outcome,
    Timing,
    handler,
    parse_params,
    register,
    request_body_doc,
    too_many,
    unsupported_media_type,
)
from app.core.places import DynoPlaces
from app.main import create_app


class EchoRequest(BaseModel):
    model_config = {"json_schema_extra": {"examples": [{"instances": [1, 2]}]}}
    instances: list[int] = Field(min_length=1)


class EchoParams(BaseModel):
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="a cut-off")
    mode: Literal["plain", "fancy"] = "plain"


class EchoResponse(BaseModel):
    predictions: list[dict[str, Any]]


def echo_run(job: Job) -> Outcome:
    """One prediction per instance saying what the pipeline handed over."""
    with job.timing.measure("decode"):
        sizes = [len(i.data) if i.data is not None else None for i in job.instances]
    predictions = [{"field": i.field, "size": size, "value": i.value, "first": i.data[:4].decode("latin-1") if i.data else None,
                    "params": job.params.model_dump() if job.params is not None else None,
                    "model_version": getattr(job.model, "version", None),
                    "upload_limit": job.settings.max_upload_bytes, "store_inputs": job.store_inputs,
                    "tensors": sorted(job.tensors)}
                   for i, size in zip(job.instances, sizes, strict=True)]
    rows = [{"prediction": i.field, "confidence": None, "features": {}} for i in job.instances]
    files = [i.data for i in job.instances if i.data is not None]
    return Outcome(predictions, rows, raw_inputs=files or None,
                   headers={"X-Echo-Count": str(len(job.instances))})


def binary_run(job: Job) -> Outcome:
    return Outcome([], [{"prediction": "png", "confidence": 1.0, "features": {}}],
                   binary=(b"\x89PNG" + job.instances[0].data, "image/png"))


ECHO = Endpoint(
    operation_id="test_echo", path="/test/echo", tag="test", summary="Echo", description="Echoes its inputs.",
    run=echo_run, response_schema=EchoResponse, name="echo", version="2.1.0", file_field="image",
    file_description="images to echo", raw_media=("image/", "text/csv"), json_schema=EchoRequest,
    json_instances=lambda body: [Instance(f"instances[{i}]", value=v) for i, v in enumerate(body.instances)],
    params_schema=EchoParams, max_instances=3)
SINGLE = Endpoint(
    operation_id="test_single", path="/test/single", tag="single-tag", summary="One", description="One file.",
    run=binary_run, response_schema=EchoResponse, file_field="audio", raw_media=("audio/",), version="0.3",
    binary_media=("image/png",), binary_description="a PNG")
MODEL_BACKED = Endpoint(
    operation_id="test_model", path="/test/model", tag="digits-tag", summary="M", description="Needs a model.",
    run=echo_run, response_schema=EchoResponse, model="digits", json_schema=EchoRequest,
    json_instances=lambda body: [Instance(f"instances[{i}]", value=v) for i, v in enumerate(body.instances)],
    max_instances=2)


def nan_run(job: Job) -> Outcome:
    return Outcome([{"score": float("nan")}], [{"prediction": "x", "confidence": None, "features": {}}])


NAN = Endpoint(**{**ECHO.__dict__, "operation_id": "test_nan", "path": "/test/nan", "run": nan_run})
PAIR = Endpoint(**{**ECHO.__dict__, "operation_id": "test_pair", "path": "/test/pair", "max_instances": 2})


def huge_run(job: Job) -> Outcome:
    """An answer orjson refuses: an integer past 64 bits."""
    return Outcome([{"n": 2 ** 70}], [{"prediction": "n", "confidence": None, "features": {}}])


HUGE = Endpoint(**{**ECHO.__dict__, "operation_id": "test_huge", "path": "/test/huge", "run": huge_run})


class GridRequest(BaseModel):
    instances: list[list[int]] = Field(min_length=1)


GRID = Endpoint(
    operation_id="test_grid", path="/test/grid", tag="test", summary="Grid", description="Rows of four values.",
    run=echo_run, response_schema=EchoResponse, name="grid", version="1.0", json_schema=GridRequest,
    json_instances=lambda body: [Instance(f"instances[{i}]", value=v) for i, v in enumerate(body.instances)],
    json_values_per_instance=4, json_error_codes={"missing": "missing-rows"}, max_instances=2)


class PlaceWatch:
    """The dyno places a test gives the app, for ``where_run`` to report on (None: not watched)."""

    places: Any = None


def where_run(job: Job) -> Outcome:
    """Where and with what the job ran: on the event loop or a thread, the body's size, places held."""
    try:
        asyncio.get_running_loop()
        on_loop = True
    except RuntimeError:
        on_loop = False
    held = PlaceWatch.places.status()["held_here"] if PlaceWatch.places is not None else None
    return Outcome([{"on_loop": on_loop, "body_bytes": job.body_bytes, "places_held": held}],
                   [{"prediction": "where", "confidence": None, "features": {}}])


THREADED = Endpoint(
    operation_id="test_threaded", path="/test/threaded", tag="test", summary="Where", description="Where it ran.",
    run=where_run, response_schema=EchoResponse, name="where", version="1", raw_media=("image/",))
INLINE = Endpoint(**{**THREADED.__dict__, "operation_id": "test_inline", "path": "/test/inline", "inline": True})
class StrictParams(BaseModel):
    """Parameters that refuse unknown keys, as segmentation's and the palette's do."""

    model_config = {"extra": "forbid"}
    threshold: float = Field(0.5, ge=0.0, le=1.0)


STRICT = Endpoint(**{**ECHO.__dict__, "operation_id": "test_strict", "path": "/test/strict",
                     "params_schema": StrictParams})
BINARY_MODEL = Endpoint(**{**SINGLE.__dict__, "operation_id": "test_binary_model", "path": "/test/binary-model",
                           "model": "segmentation"})
TEST_ENDPOINTS = (ECHO, SINGLE, MODEL_BACKED, NAN, PAIR, HUGE, GRID, THREADED, INLINE, BINARY_MODEL,
                  STRICT)


class FakeModel:
    version = "9.8.7"


async def read_with_tensors(request, endpoint, settings) -> pipeline.Read:
    read = await pipeline.read_v1(request, endpoint, settings)
    return pipeline.Read(read.instances, read.params, frozenset({"mask", "probability"}))


async def served_view(request: Request) -> JSONResponse:
    """What ``execute`` hands a protocol layer, as JSON (the V2 protocol reads ``Served`` itself)."""
    served = await pipeline.execute(request, MODEL_BACKED, read_with_tensors)
    return JSONResponse({"name": served.name, "version": served.version, "headers": served.headers,
                         "instances": [i.value for i in served.job.instances],
                         "tensors": sorted(served.job.tensors), "model": served.job.model.version,
                         "predictions": served.outcome.predictions})


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> FastAPI:
    root = tmp_path_factory.mktemp("pipeline")
    return create_app(Settings(models_dir=root / "models", max_upload_mb=1,
                               database_url=f"sqlite:///{root / 'log.db'}"))


@pytest.fixture(scope="module")
def started(app) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def client(app, started) -> Iterator[TestClient]:
    """The started app with the test endpoints' routes, built by ``handler`` for each test afresh."""
    paths = {e.path for e in TEST_ENDPOINTS} | {"/test/served"}
    for endpoint in TEST_ENDPOINTS:
        app.router.add_api_route(endpoint.path, handler(endpoint), methods=["POST"])
    app.router.add_api_route("/test/served", served_view, methods=["POST"])
    yield started
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in paths]


KEPT_INPUT_MAX_BYTES = 2 * 1024 * 1024


def kept_inputs(raw_inputs: list[bytes] | None) -> int:
    """What the prediction log reports as kept: here, the inputs up to KEPT_INPUT_MAX_BYTES."""
    return sum(1 for raw in raw_inputs or [] if raw is not None and len(raw) <= KEPT_INPUT_MAX_BYTES)


class Recorder:
    """An observer of predictions that keeps what it is told (and reports the inputs it keeps)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def on_predictions(self, request_id, model, version, rows, latency_ms, raw_inputs, client_version):
        self.calls.append({"request_id": request_id, "task": model, "version": version, "rows": list(rows),
                           "latency_ms": latency_ms, "raw_inputs": raw_inputs, "client_version": client_version})
        return kept_inputs(raw_inputs)


@pytest.fixture
def logged(app) -> Iterator[list[dict[str, Any]]]:
    """The app's observers replaced, for one test, by a recorder of what the pipeline tells them."""
    recorder, observers = Recorder(), Observers()
    observers.add(recorder)
    original, app.state.observers = app.state.observers, observers
    yield recorder.calls
    app.state.observers = original


def access_line(caplog, path: str) -> dict[str, Any]:
    """The access log entry of the last request to ``path`` (the middleware's JSON log line)."""
    [*_, record] = [r for r in caplog.records if r.name == "app.access" and getattr(r, "path", None) == path]
    return record.__dict__


def files(*contents: bytes, field: str = "image") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (f"f{i}.png", content, "image/png")) for i, content in enumerate(contents)]


# --- the pieces ------------------------------------------------------------------------------


def test_timing_adds_up_each_stage_and_the_header_lists_decode_inference_then_total():
    timing = Timing()
    assert timing.header(1.0) == "decode;dur=0.00, inference;dur=0.00, total;dur=1.00"
    for _ in range(2):
        with timing.measure("inference"):
            time.sleep(0.01)  # a stage that takes time: the clock is what Timing reads
    with timing.measure("encode"):
        pass
    assert timing.ms["inference"] >= 20.0
    stages = re.findall(r"(\w+);dur=([\d.]+)", timing.header(123.456))
    assert [name for name, _ in stages] == ["decode", "inference", "encode", "total"]
    assert stages[-1][1] == "123.46" and float(stages[1][1]) >= 20.0


def test_timing_records_each_stage_in_milliseconds_exactly(monkeypatch):
    """On a fake clock: a stage's duration is end minus start in ms, and repeats add up."""
    ticks = iter([10.0, 10.25, 20.0, 20.5, 30.0, 30.0])
    monkeypatch.setattr(time, "perf_counter", lambda: next(ticks))
    timing = Timing()
    for _ in range(2):
        with timing.measure("inference"):
            pass
    with timing.measure("encode"):
        pass
    assert timing.ms == {"inference": 750.0, "encode": 0.0}


def test_timing_counts_a_stage_that_raised():
    timing = Timing()
    with pytest.raises(ValueError), timing.measure("decode"):
        time.sleep(0.005)  # a stage that takes time before it raises
        raise ValueError
    assert timing.ms["decode"] >= 5.0


def test_an_unsupported_media_type_lists_what_the_endpoint_takes():
    problem = unsupported_media_type(ECHO, "text/plain")
    accepted = ["multipart/form-data (field 'image')", "application/json", "image/*", "text/csv*",
                RAW_MEDIA_TYPE]
    assert (problem.status, problem.code, problem.field) == (415, "unsupported-media-type", "content-type")
    assert problem.extra == {"accepted": accepted}
    assert problem.detail == f"This endpoint takes {', '.join(accepted)}; got text/plain."
    assert unsupported_media_type(MODEL_BACKED, "").detail == "This endpoint takes application/json; got no " \
                                                              "Content-Type."
    assert unsupported_media_type(SINGLE, "x/y").extra == {
        "accepted": ["multipart/form-data (field 'audio')", "audio/*", RAW_MEDIA_TYPE]}


def test_too_many_instances_is_422_naming_the_field_and_the_limit():
    problem = too_many(ECHO, 5, "image")
    assert (problem.status, problem.code, problem.field) == (422, "too-many-instances", "image")
    assert problem.detail == "image: at most 3 instance(s) per request; got 5."
    assert problem.extra == {"max_instances": 3}


def test_parameters_are_validated_by_the_endpoints_schema():
    assert parse_params(SINGLE, {"threshold": "2"}) is None  # no parameters: nothing to read
    params = parse_params(ECHO, {"threshold": "0.25", "mode": "fancy"})
    assert (params.threshold, params.mode) == (0.25, "fancy")
    assert parse_params(ECHO, {}).threshold == 0.5
    with pytest.raises(ProblemError) as info:
        parse_params(ECHO, {"threshold": "1.5"})
    assert (info.value.status, info.value.code, info.value.field) == (422, "invalid-request", "threshold")


# --- reading the body ------------------------------------------------------------------------


def test_multipart_files_are_instances_in_order_with_indexed_fields(client, logged):
    response = client.post("/test/echo", files=files(b"aaaa1", b"bb", b"cccc33"),
                           headers={"X-Data-Consent": "granted"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [(p["field"], p["size"], p["first"]) for p in body["predictions"]] == [
        ("image[0]", 5, "aaaa"), ("image[1]", 2, "bb"), ("image[2]", 6, "cccc")]
    assert body["predictions"][0]["params"] == {"threshold": 0.5, "mode": "plain"}
    assert logged[0]["raw_inputs"] == [b"aaaa1", b"bb", b"cccc33"]
    job = body["predictions"][0]
    assert (job["model_version"], job["upload_limit"], job["store_inputs"], job["tensors"]) == (
        None, 1024 * 1024, True, [])


def test_two_files_are_indexed_too(client):
    response = client.post("/test/pair", files=files(b"a", b"b"))
    assert [p["field"] for p in response.json()["predictions"]] == ["image[0]", "image[1]"]


def test_a_single_file_endpoint_names_its_instance_by_the_field_alone(client):
    response = client.post("/test/single", files=files(b"abc", field="audio"))
    assert response.status_code == 200
    assert response.content == b"\x89PNGabc"
    empty = client.post("/test/single", files=files(b"", field="audio")).json()
    assert (empty["code"], empty["field"], empty["detail"]) == ("empty-file", "audio", "audio is empty.")


def test_parameters_come_from_the_query_and_from_form_fields_which_win(client):
    response = client.post("/test/echo", params={"threshold": "0.1", "mode": "fancy"},
                           data={"threshold": "0.9"}, files=files(b"x"))
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["params"] == {"threshold": 0.9, "mode": "fancy"}


def test_a_parameter_sent_as_a_file_is_422_not_ignored(client):
    response = client.post("/test/echo", files=[*files(b"x"), ("threshold", ("t.txt", b"0.9", "text/plain"))])
    assert response.status_code == 422, response.text
    assert (response.json()["code"], response.json()["field"]) == ("not-a-value", "threshold")
    assert response.json()["detail"] == ("threshold is a parameter: send it as a text field or in the query "
                                         "string, not as a file.")


def test_an_invalid_form_parameter_is_422_naming_it(client):
    response = client.post("/test/echo", data={"mode": "loud"}, files=files(b"x"))
    assert response.status_code == 422
    assert response.json()["field"] == "mode"


def test_more_files_than_the_endpoint_takes_is_422_not_a_dropped_file(client):
    response = client.post("/test/echo", files=files(b"1", b"2", b"3", b"4"))
    assert response.status_code == 422
    body = response.json()
    assert (body["code"], body["field"], body["max_instances"]) == ("too-many-instances", "image", 3)
    assert body["detail"] == "image: at most 3 instance(s) per request; got 4."


def test_a_flood_of_files_is_refused_by_the_parser_before_it_reads_them_all(client):
    response = client.post("/test/echo", files=files(b"1", b"2", b"3", b"4", b"5"))  # one past max + 1
    assert response.status_code == 400
    body = response.json()
    assert (body["code"], body["detail"]) == ("malformed-multipart", "The multipart body could not be parsed: "
                                                                     "Too many files. Maximum number of files is 4.")


def test_a_flood_of_form_fields_is_refused_by_the_parser(client):
    fields = {f"f{i}": "x" for i in range(13)}  # 2 parameters + 3 files + 8 fields are read, no more
    assert client.post("/test/echo", data=fields, files=files(b"1")).json()["code"] == "unexpected-field"
    fields["f13"] = "x"
    body = client.post("/test/echo", data=fields, files=files(b"1")).json()
    assert body["code"] == "malformed-multipart" and "Too many fields" in body["detail"]


def test_a_form_without_the_file_field_names_the_fields_it_got(client):
    response = client.post("/test/echo", files=files(b"1", field="picture") + files(b"2", field="photo"))
    assert response.status_code == 422
    body = response.json()
    assert (body["code"], body["field"]) == ("missing-file", "image")
    assert body["detail"] == "Send one or more files in the form field 'image' (got 'photo', 'picture')."
    only_a_parameter = b'--xyz\r\nContent-Disposition: form-data; name="threshold"\r\n\r\n0.2\r\n--xyz--\r\n'
    empty = client.post("/test/echo", content=only_a_parameter,
                        headers={"content-type": "multipart/form-data; boundary=xyz"}).json()
    assert empty["detail"] == "Send one or more files in the form field 'image'."


def test_an_unexpected_form_field_beside_the_files_is_422_naming_it(client):
    response = client.post("/test/echo", data={"zeta": "1", "alpha": "2"}, files=files(b"1"))
    assert response.status_code == 422
    body = response.json()
    assert (body["code"], body["field"]) == ("unexpected-field", "alpha")
    assert body["detail"] == "Unexpected form field 'alpha'; send files in the field 'image'."


def test_a_part_without_a_file_name_in_the_file_field_is_the_file_bytes_intact(client, logged):
    png = b"\x89PNG\r\n\x1a\n\x00\xff\xfe" + bytes(range(256))  # not UTF-8: as a real image
    body = (b"--B\r\nContent-Disposition: form-data; name=\"image\"\r\nContent-Type: image/png\r\n\r\n"
            + png + b"\r\n--B\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nplain text\r\n--B--\r\n")
    response = client.post("/test/echo", content=body, headers={"Content-Type": "multipart/form-data; boundary=B",
                                                                 "X-Data-Consent": "granted"})
    assert response.status_code == 200, response.text
    assert logged[0]["raw_inputs"] == [png, b"plain text"]


def test_an_empty_or_oversized_file_is_refused_by_name(client):
    empty = client.post("/test/echo", files=files(b"ok", b""))
    assert empty.status_code == 422 and empty.json()["field"] == "image[1]"
    assert empty.json()["code"] == "empty-file"


def test_an_empty_part_without_a_file_name_is_refused_by_name(client):
    body = (b"--B\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nabc\r\n"
            b"--B\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\n\r\n--B--\r\n")
    response = client.post("/test/echo", content=body, headers={"Content-Type": "multipart/form-data; boundary=B"})
    assert response.status_code == 422
    problem = response.json()
    assert (problem["code"], problem["field"], problem["detail"]) == ("empty-file", "image[1]", "image[1] is empty.")


def test_a_part_without_a_file_name_holding_utf8_text_is_kept_as_sent(client, logged):
    """Text Starlette decoded as UTF-8 that Latin-1 cannot hold goes back to its UTF-8 bytes."""
    text = "€ 3,50 — naïve".encode()
    body = (b"--B\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\n" + text + b"\r\n--B--\r\n")
    response = client.post("/test/echo", content=body, headers={"Content-Type": "multipart/form-data; boundary=B",
                                                                 "X-Data-Consent": "granted"})
    assert response.status_code == 200, response.text
    assert logged[0]["raw_inputs"] == [text]
    assert response.json()["predictions"][0]["size"] == len(text)


@pytest.mark.parametrize("sent", [
    "café, 3,50 €".encode(),  # beyond Latin-1: only UTF-8 decodes to it
    "café; naïve".encode(),  # all within Latin-1: é is one Latin-1 byte or two UTF-8 ones
    "Ã©".encode(),  # its Latin-1 bytes are themselves valid UTF-8: it came as UTF-8
    b"\x89PNG\r\n\x1a\n\xe9\x00",  # not UTF-8, with control characters: a binary file
])
def test_a_part_without_a_file_name_is_kept_as_the_bytes_sent(client, logged, sent):
    body = (b"--B\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\n" + sent + b"\r\n--B--\r\n")
    response = client.post("/test/echo", content=body, headers={"Content-Type": "multipart/form-data; boundary=B",
                                                                 "X-Data-Consent": "granted"})
    assert response.status_code == 200, response.text
    assert logged[0]["raw_inputs"] == [sent]


def test_latin1_text_without_a_file_name_is_read_as_the_utf8_that_text_almost_always_is():
    """The one case the part's text cannot tell apart: Latin-1 text with no control characters."""
    from app.core.pipeline import part_bytes

    assert part_bytes(b"\xe9t\xe9".decode("latin-1")) == "été".encode()
    assert part_bytes(b"\xe9t\xe9\x00".decode("latin-1")) == b"\xe9t\xe9\x00"


def test_a_file_without_a_file_name_is_no_parameter_for_a_schema_that_refuses_unknown_ones(client):
    """The file field's part sent without a file name arrives as text, beside the text parameters; only
    the parameters reach the schema, so one that forbids unknown keys still takes the request."""
    body = (b"--B\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nabc\r\n"
            b"--B\r\nContent-Disposition: form-data; name=\"threshold\"\r\n\r\n0.25\r\n--B--\r\n")
    response = client.post("/test/strict", content=body, headers={"Content-Type": "multipart/form-data; boundary=B"})
    assert response.status_code == 200, response.text
    [prediction] = response.json()["predictions"]
    assert (prediction["field"], prediction["size"], prediction["params"]) == ("image[0]", 3, {"threshold": 0.25})
    unknown = client.post("/test/strict", params={"colour": "red"}, files=files(b"abc"))
    assert (unknown.status_code, unknown.json()["field"]) == (422, "colour")


def test_a_part_without_a_file_name_is_held_to_the_upload_limit_too(client, app, monkeypatch):
    """A file sent without a file name reaches the app as a form value: the parser stops it at the
    upload limit (MAX_UPLOAD_MB), as a file with a name is stopped."""
    monkeypatch.setattr(app.state.settings, "max_upload_mb", 0.01)  # 10 KiB
    part = b"\x89PNG" + b"\x00" * 20_000
    body = b"--B\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\n" + part + b"\r\n--B--\r\n"
    response = client.post("/test/echo", content=body, headers={"Content-Type": "multipart/form-data; boundary=B"})
    assert response.status_code == 400
    problem = response.json()
    assert (problem["code"], problem["field"]) == ("malformed-multipart", "body")
    assert problem["detail"] == "The multipart body could not be parsed: Part exceeded maximum size of 10KB."
    small = b"--B\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\n" + part[:9_000] + b"\r\n--B--\r\n"
    assert client.post("/test/echo", content=small,
                       headers={"Content-Type": "multipart/form-data; boundary=B"}).status_code == 200


@pytest.mark.parametrize("content, content_type, reason", [
    (b"--xyz\r\nContent-Disposition: form-data\r\n\r\nv\r\n--xyz--\r\n", "multipart/form-data; boundary=xyz",
     'The Content-Disposition header field "name" must be provided.'),
    (b"garbage", "multipart/form-data", "Missing boundary in multipart."),
])
def test_a_multipart_body_that_cannot_be_parsed_is_400_malformed_multipart(client, content, content_type, reason):
    response = client.post("/test/echo", content=content, headers={"content-type": content_type})
    assert response.status_code == 400
    body = response.json()
    assert (body["code"], body["field"]) == ("malformed-multipart", "body")
    assert body["detail"] == f"The multipart body could not be parsed: {reason}"


def test_json_instances_are_read_by_the_endpoints_schema(client):
    response = client.post("/test/echo", params={"mode": "fancy"}, json={"instances": [7, 8]})
    assert response.status_code == 200
    predictions = response.json()["predictions"]
    assert [(p["field"], p["value"], p["size"]) for p in predictions] == [("instances[0]", 7, None),
                                                                        ("instances[1]", 8, None)]
    assert predictions[0]["params"] == {"threshold": 0.5, "mode": "fancy"}


def test_json_with_more_instances_than_the_endpoint_takes_is_422_on_instances(client):
    response = client.post("/test/echo", json={"instances": [1, 2, 3, 4]})
    assert response.status_code == 422
    body = response.json()
    assert (body["code"], body["field"]) == ("too-many-instances", "instances")
    assert body["detail"] == "instances: at most 3 instance(s) per request; got 4."


@pytest.mark.parametrize("content, status, code, field", [
    (b"", 422, "empty-body", "body"),
    (b"  \n ", 422, "empty-body", "body"),
    (b"null", 422, "invalid-request", "body"),
    (b'{"instances": [1,', 400, "malformed-json", "body"),
    (b'{"instances": []}', 422, "invalid-request", "instances"),
    (b'{"instances": ["x"]}', 422, "invalid-request", "instances[0]"),
])
def test_json_that_cannot_be_read_names_the_problem(client, content, status, code, field):
    response = client.post("/test/echo", content=content, headers={"content-type": "application/json"})
    assert response.status_code == status
    body = response.json()
    assert (body["code"], body["field"]) == (code, field)


def test_json_nested_too_deep_is_400_malformed_json(client):
    response = client.post("/test/echo", content=b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                           headers={"content-type": "application/json"})
    assert response.status_code == 400
    body = response.json()
    assert (body["code"], body["field"]) == ("malformed-json", "body")
    assert "recursion limit" in body["detail"]


def json_body_of(size: int) -> bytes:
    """A valid EchoRequest of exactly ``size`` bytes (padded with a string the schema ignores)."""
    head, tail = b'{"instances": [1], "pad": "', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def test_a_json_body_over_max_json_mb_is_413_and_one_at_the_limit_is_read(client, app, monkeypatch):
    monkeypatch.setattr(app.state.settings, "max_json_mb", 0.5)  # under the 1 MiB upload limit
    at_limit = client.post("/test/echo", content=json_body_of(512 * 1024), headers={"content-type": "application/json"})
    assert at_limit.status_code == 200, at_limit.text
    over = client.post("/test/echo", content=json_body_of(512 * 1024 + 1), headers={"content-type": "application/json"})
    assert over.status_code == 413
    problem = over.json()
    assert (problem["code"], problem["field"]) == ("json-too-large", "body")
    assert problem["detail"] == ("A JSON body is limited to 0.5 MiB (MAX_JSON_MB); send large inputs as files or "
                                 "binary tensors.")
    raw = client.post("/test/echo", content=json_body_of(512 * 1024 + 1), headers={"content-type": "image/png"})
    assert raw.status_code == 200  # the JSON limit is the JSON body's only: a raw upload may be larger


def grid_body(values: int) -> bytes:
    """A valid GridRequest (one row of four) holding ``values`` values by the comma count: commas + 1."""
    body = b'{"instances": [[1, 2, 3, 4]], "pad": [' + b", ".join([b"0"] * (values - 4)) + b"]}"
    assert body.count(b",") + 1 == values
    return body


def test_a_json_body_with_more_values_than_the_endpoint_reads_is_413_before_it_is_parsed(client):
    """The bound: instances x values per instance + JSON_VALUES_SLACK (keys, ids, parameters)."""
    allowed = GRID.max_instances * GRID.json_values_per_instance + JSON_VALUES_SLACK
    at_bound = client.post("/test/grid", content=grid_body(allowed), headers={"content-type": "application/json"})
    assert at_bound.status_code == 200, at_bound.text
    assert at_bound.json()["predictions"][0]["value"] == [1, 2, 3, 4]
    over = client.post("/test/grid", content=grid_body(allowed + 1), headers={"content-type": "application/json"})
    assert over.status_code == 413
    problem = over.json()
    assert (problem["code"], problem["field"], problem["max_values"]) == ("too-many-values", "body", allowed)
    assert problem["detail"] == (f"The JSON body holds about {allowed + 1:,} values; this endpoint reads at most "
                                 f"{allowed:,} (its instance limit).")


def test_an_endpoints_own_code_names_a_kind_of_json_validation_error(client):
    missing = client.post("/test/grid", json={"rows": [[1, 2, 3, 4]]})
    assert missing.status_code == 422
    assert (missing.json()["code"], missing.json()["field"]) == ("missing-rows", "instances")
    other = client.post("/test/grid", json={"instances": [["a"]]})  # a kind without its own code
    assert (other.status_code, other.json()["code"]) == (422, "invalid-request")


def test_an_invalid_query_parameter_on_a_json_request_is_422(client):
    response = client.post("/test/echo", params={"threshold": "-1"}, json={"instances": [1]})
    assert response.status_code == 422
    assert response.json()["field"] == "threshold"


@pytest.mark.parametrize("content_type", ["image/png", "IMAGE/JPEG; q=1", "text/csv", RAW_MEDIA_TYPE])
def test_a_raw_upload_of_an_accepted_type_is_one_instance_named_body(client, content_type):
    response = client.post("/test/echo", params={"threshold": "0.75"}, content=b"rawbytes",
                           headers={"content-type": content_type})
    assert response.status_code == 200, response.text
    [prediction] = response.json()["predictions"]
    assert (prediction["field"], prediction["size"], prediction["first"]) == ("body", 8, "rawb")
    assert prediction["params"]["threshold"] == 0.75


def test_an_empty_raw_upload_is_422_and_a_bad_query_parameter_is_named(client):
    empty = client.post("/test/echo", content=b"", headers={"content-type": "image/png"})
    assert empty.status_code == 422
    assert (empty.json()["code"], empty.json()["field"]) == ("empty-file", "body")
    assert empty.json()["detail"] == "The request body is empty."
    no_json = client.post("/test/echo", content=b"", headers={"content-type": "application/json"})
    assert no_json.json()["detail"] == "The request body is empty."
    bad = client.post("/test/echo", params={"mode": "x"}, content=b"abc", headers={"content-type": "image/png"})
    assert bad.status_code == 422 and bad.json()["field"] == "mode"


@pytest.mark.parametrize("path, headers, got", [
    ("/test/echo", {"content-type": "text/plain"}, "text/plain"),
    ("/test/echo", {}, "no Content-Type"),
    ("/test/single", {"content-type": "application/json"}, "application/json"),  # no JSON shape there
    ("/test/single", {"content-type": "image/png"}, "image/png"),  # audio/* only
    ("/test/model", {"content-type": RAW_MEDIA_TYPE}, RAW_MEDIA_TYPE),  # no raw uploads there
    ("/test/model", {"content-type": "multipart/form-data; boundary=x"}, "multipart/form-data"),  # no files
])
def test_any_other_media_type_is_the_same_415(client, app, monkeypatch, path, headers, got):
    monkeypatch.setattr(app.state.registry, "get", lambda task: FakeModel())
    response = client.post(path, content=b"abc", headers=headers)
    assert response.status_code == 415
    body = response.json()
    assert (body["code"], body["field"]) == ("unsupported-media-type", "content-type")
    assert body["detail"].endswith(f"; got {got}.")


def test_the_raw_body_limit_is_enforced_by_the_reader_too():
    class Body:
        headers = {"content-type": "image/png"}
        query_params: dict[str, str] = {}

        async def receive(self) -> dict[str, Any]:
            return {"type": "http.request", "body": b"x" * 11, "more_body": False}

    import asyncio

    read = asyncio.run(pipeline.read_raw(Body(), ECHO, 11))
    assert [(i.field, i.data) for i in read] == [("body", b"x" * 11)]
    with pytest.raises(ProblemError) as info:
        asyncio.run(pipeline.read_raw(Body(), ECHO, 10))
    assert (info.value.status, info.value.code, info.value.field) == (413, "file-too-large", "body")
    assert info.value.detail == "The body is over the upload limit."


# --- the envelope, headers and the log -------------------------------------------------------


def test_the_envelope_names_the_endpoint_and_carries_the_request_id(client, logged, caplog):
    response = client.post("/test/echo", json={"instances": [5]})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"model", "version", "request_id", "predictions"}
    assert (body["model"], body["version"]) == ("echo", "2.1.0")
    assert body["request_id"] == response.headers["x-request-id"]
    assert response.headers["x-model-version"] == "2.1.0"
    assert response.headers["x-echo-count"] == "1"  # the run's own headers
    stages = re.findall(r"(\w+);dur=([\d.]+)", response.headers["server-timing"])
    assert [name for name, _ in stages] == ["decode", "inference", "total"]
    assert float(stages[2][1]) > 0.0
    [call] = logged
    assert (call["task"], call["version"]) == ("echo", "2.1.0")
    assert call["rows"] == [{"prediction": "instances[0]", "confidence": None, "features": {}}]
    assert 0.0 < call["latency_ms"] < 60_000 and call["raw_inputs"] is None  # no consent
    line = access_line(caplog, "/test/echo")
    assert (line["model"], line["model_version"], line["status"]) == ("test", "2.1.0", 200)


def test_the_envelope_is_compact_json_and_never_nan(client):
    response = client.post("/test/echo", json={"instances": [5]})
    assert response.content.startswith(b'{"model":"echo","version":"2.1.0","request_id":"')
    assert b'"predictions":[{"field":"instances[0]","size":null,' in response.content
    broken = client.post("/test/nan", json={"instances": [1]})
    assert broken.status_code == 500 and broken.json()["code"] == "internal-error"


def test_execute_hands_the_protocol_layer_the_job_the_outcome_and_the_headers(client, app, monkeypatch):
    monkeypatch.setattr(app.state.registry, "get", lambda task: FakeModel())
    response = client.post("/test/served", json={"instances": [3, 4]}, headers={"X-Data-Consent": "granted"})
    assert response.status_code == 200, response.text
    served = response.json()
    assert (served["name"], served["version"], served["model"]) == ("digits", "9.8.7", "9.8.7")
    assert served["instances"] == [3, 4] and served["tensors"] == ["mask", "probability"]
    assert [p["tensors"] for p in served["predictions"]] == [["mask", "probability"]] * 2
    assert [p["store_inputs"] for p in served["predictions"]] == [True, True]
    assert served["headers"]["X-Model-Version"] == "9.8.7"
    assert served["headers"]["X-Inputs-Stored"] == "false"  # JSON instances: no raw bytes to keep
    assert served["headers"]["X-Echo-Count"] == "2"
    assert served["headers"]["Server-Timing"].startswith("decode;dur=")


def test_an_answer_without_a_shadow_has_nothing_left_to_run(client, caplog):
    assert client.post("/test/echo", json={"instances": [1]}).status_code == 200
    assert not [r for r in caplog.records if r.name == "app.errors"]


def test_an_answer_orjson_cannot_encode_is_written_by_the_standard_encoder(client):
    response = client.post("/test/huge", json={"instances": [1]})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"] == [{"n": 2 ** 70}]
    assert response.content.endswith(b'"predictions":[{"n":1180591620717411303424}]}')


def test_the_prediction_log_gets_the_request_id_and_the_clients_release(client, logged):
    response = client.post("/test/echo", json={"instances": [1]}, headers={"X-Client-Version": "app/1.4.2"})
    assert response.status_code == 200
    assert logged[0]["request_id"] == response.headers["x-request-id"] == response.json()["request_id"]
    assert logged[0]["client_version"] == "app/1.4.2"
    client.post("/test/echo", json={"instances": [1]})
    assert logged[1]["client_version"] is None


class StoppedClock:
    """``time.perf_counter`` for the pipeline: the first reading, then ``elapsed_s`` later for good."""

    def __init__(self, elapsed_s: float) -> None:
        self.readings = iter([100.0])
        self.elapsed_s = elapsed_s

    def perf_counter(self) -> float:
        return next(self.readings, 100.0 + self.elapsed_s)


def test_server_timing_total_and_the_logged_latency_are_the_requests_time_in_ms(client, logged, monkeypatch):
    monkeypatch.setattr(pipeline, "time", StoppedClock(0.25))
    response = client.post("/test/echo", json={"instances": [1]})
    assert response.status_code == 200
    assert response.headers["server-timing"] == "decode;dur=0.00, inference;dur=0.00, total;dur=250.00"
    assert logged[0]["latency_ms"] == 250.0


def test_an_inline_endpoint_runs_its_job_on_the_event_loop_and_others_on_a_thread(client):
    for path, on_loop in (("/test/inline", True), ("/test/threaded", False)):
        response = client.post(path, content=b"x", headers={"content-type": "image/png"})
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["on_loop"] is on_loop


def test_the_job_knows_the_bodys_size_and_a_big_one_holds_a_dyno_place(client, app, monkeypatch, tmp_path):
    """A body of BIG_JOB_BYTES or more takes one of the dyno's places for its run (given back after);
    a smaller one takes none."""
    places = DynoPlaces(1, tmp_path / "places")
    monkeypatch.setattr(app.state.execution, "places", places)
    monkeypatch.setattr(pipeline, "BIG_JOB_BYTES", 64)
    monkeypatch.setattr(PlaceWatch, "places", places)
    for size, held in ((63, 0), (64, 1), (65, 1)):
        response = client.post("/test/threaded", content=b"x" * size, headers={"content-type": "image/png"})
        assert response.status_code == 200, response.text
        [prediction] = response.json()["predictions"]
        assert (prediction["body_bytes"], prediction["places_held"]) == (size, held)
        assert places.status()["held_here"] == 0


def test_a_binary_answer_is_sent_as_is_with_the_headers(client, logged):
    response = client.post("/test/single", content=b"wav!", headers={"content-type": "audio/wav"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.content == b"\x89PNGwav!"
    assert response.headers["x-model-version"] == "0.3"
    assert "total;dur=" in response.headers["server-timing"] and response.headers["x-request-id"]
    assert (logged[0]["task"], logged[0]["version"]) == ("single-tag", "0.3")
    assert logged[0]["raw_inputs"] is None


def test_an_endpoint_without_a_name_is_logged_and_answered_under_its_tag(client, logged):
    response = client.post("/test/single", files=files(b"x", field="audio"))
    assert response.status_code == 200
    assert logged[0]["task"] == "single-tag"


def test_a_model_backed_endpoint_answers_with_the_models_version(client, app, logged, monkeypatch, caplog):
    asked = []
    monkeypatch.setattr(app.state.registry, "get", lambda task: asked.append(task) or FakeModel())
    response = client.post("/test/model", json={"instances": [1, 2]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["version"]) == ("digits", "9.8.7")
    assert response.headers["x-model-version"] == "9.8.7"
    assert asked == ["digits"]
    assert (logged[0]["task"], logged[0]["version"]) == ("digits", "9.8.7")
    line = access_line(caplog, "/test/model")
    assert (line["model"], line["model_version"]) == ("digits", "9.8.7")


def test_a_model_backed_endpoint_is_503_while_its_model_is_not_loaded(client, logged):
    response = client.post("/test/model", json={"instances": [1]})
    assert response.status_code == 503
    assert response.json()["code"] == "model-unavailable"
    assert logged == []


def test_the_access_checks_headers_go_out_with_the_answer(client, app, monkeypatch):
    seen = []
    monkeypatch.setattr(app.state.access, "check",
                        lambda request: seen.append(request.headers.get("x-api-key")) or {"RateLimit-Limit": "5"})
    response = client.post("/test/echo", json={"instances": [1]}, headers={"X-API-Key": "k-1"})
    assert response.headers["ratelimit-limit"] == "5"
    assert seen == ["k-1"]  # the check is asked about this request, with its headers


def test_a_refused_access_check_answers_before_the_body_is_read(client, app, monkeypatch, logged):
    def refuse(request):
        raise ProblemError(401, "api-key-required", "Key please.", field="Authorization")

    monkeypatch.setattr(app.state.access, "check", refuse)
    response = client.post("/test/echo", content=b"not json", headers={"content-type": "application/json"})
    assert response.status_code == 401
    assert logged == []


# --- a durable prediction log (LOG_DURABLE) --------------------------------------------------


class Settler:
    """An observer that promises durability (the prediction log with LOG_DURABLE): says whether the
    request's predictions were made durable, and keeps what it was asked."""

    def __init__(self, durable: bool) -> None:
        self.durable = durable
        self.asked: list[tuple[str, float]] = []

    async def on_settle(self, request_id: str, timeout_s: float) -> bool:
        self.asked.append((request_id, timeout_s))
        return self.durable


@pytest.fixture
def settler(app, logged) -> Iterator[Settler]:
    """A settling observer beside the recorder of ``logged``; ``durable`` as the test sets it."""
    observer = Settler(durable=True)
    app.state.observers.add(observer)
    yield observer


def context_layer(app) -> RequestContextMiddleware:
    layer = app.middleware_stack
    while not isinstance(layer, RequestContextMiddleware):
        layer = layer.app
    return layer


def test_a_durable_log_is_waited_for_at_most_the_database_timeout(client, logged, settler):
    response = client.post("/test/echo", json={"instances": [1]})
    assert response.status_code == 200, response.text
    assert settler.asked == [(response.headers["x-request-id"], DB_CALL_TIMEOUT_S)]  # 25 s left: 5 s
    assert len(logged) == 1


def test_a_durable_log_is_never_waited_for_past_the_requests_deadline(client, app, settler, monkeypatch):
    monkeypatch.setattr(context_layer(app).context, "request_timeout_s", 3.0)
    assert client.post("/test/echo", json={"instances": [1]}).status_code == 200
    [(_, timeout_s)] = settler.asked
    assert 0.0 < timeout_s <= 3.0 < DB_CALL_TIMEOUT_S


def test_a_prediction_the_log_could_not_make_durable_is_503_not_answered(client, logged, settler):
    settler.durable = False
    response = client.post("/test/echo", json={"instances": [1]})
    assert response.status_code == 503
    problem = response.json()
    assert (problem["code"], problem["status"]) == ("log-unavailable", 503)
    assert problem["detail"] == ("The prediction could not be recorded in time (LOG_DURABLE is set, so it is not "
                                 "answered unrecorded); retry shortly.")
    assert response.headers["retry-after"] == "5"
    assert "predictions" not in problem and len(logged) == 1  # told, but not answered


# --- consent to keep the raw inputs ----------------------------------------------------------


@pytest.mark.parametrize("consent, stored", [(None, False), ("granted", True), (" Granted ", True),
                                             ("denied", False), ("DENIED", False)])
def test_raw_inputs_are_logged_only_with_the_clients_consent(client, logged, consent, stored):
    headers = {"X-Data-Consent": consent} if consent is not None else {}
    response = client.post("/test/echo", files=files(b"abc"), headers=headers)
    assert response.status_code == 200
    assert response.headers["x-inputs-stored"] == ("true" if stored else "false")
    assert logged[0]["raw_inputs"] == ([b"abc"] if stored else None)


def test_a_consent_other_than_granted_or_denied_is_422_naming_the_header(client, logged):
    response = client.post("/test/echo", files=files(b"abc"), headers={"X-Data-Consent": "yes please"})
    assert response.status_code == 422
    body = response.json()
    assert (body["code"], body["field"]) == ("invalid-consent", "X-Data-Consent")
    assert body["detail"] == "X-Data-Consent must be 'granted' or 'denied'; got 'yes please'."
    assert logged == []
    long = client.post("/test/echo", files=files(b"abc"), headers={"X-Data-Consent": "y" * 100}).json()
    assert long["detail"] == f"X-Data-Consent must be 'granted' or 'denied'; got '{'y' * 64}'."


@pytest.mark.parametrize("headers", [
    [("X-Data-Consent", "granted, denied")],
    [("X-Data-Consent", "granted"), ("X-Data-Consent", "DENIED")],
])
def test_consent_values_that_disagree_are_422_never_a_guess(client, logged, headers):
    response = client.post("/test/echo", files=files(b"abc"), headers=headers)
    assert response.status_code == 422
    problem = response.json()
    assert (problem["code"], problem["field"]) == ("invalid-consent", "X-Data-Consent")
    assert problem["detail"] == ("X-Data-Consent was sent with values that disagree ('granted' and 'denied'); "
                                 "send it once.")
    assert logged == []


@pytest.mark.parametrize("headers, stored", [
    ([("X-Data-Consent", "granted,granted")], "true"),
    ([("X-Data-Consent", "granted"), ("X-Data-Consent", " Granted")], "true"),
    ([("X-Data-Consent", "denied"), ("X-Data-Consent", "denied")], "false"),
])
def test_consent_sent_more_than_once_counts_when_every_value_agrees(client, logged, headers, stored):
    response = client.post("/test/echo", files=files(b"abc"), headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["x-inputs-stored"] == stored


def test_an_invalid_consent_among_several_shows_every_value_sent(client):
    response = client.post("/test/echo", files=files(b"abc"),
                           headers=[("X-Data-Consent", "granted"), ("X-Data-Consent", "maybe")])
    assert response.status_code == 422
    assert response.json()["detail"] == "X-Data-Consent must be 'granted' or 'denied'; got 'granted, maybe'."


def test_no_raw_input_is_kept_when_the_operator_says_never(client, app, logged, monkeypatch):
    monkeypatch.setattr(app.state.settings, "store_inputs", "never")
    response = client.post("/test/echo", files=files(b"abc"), headers={"X-Data-Consent": "granted"})
    assert response.headers["x-inputs-stored"] == "false"
    assert logged[0]["raw_inputs"] is None


def test_inputs_the_log_does_not_keep_are_not_reported_as_stored(client, logged, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "KEPT_INPUT_MAX_BYTES", 4)
    granted = {"X-Data-Consent": "granted"}
    assert client.post("/test/echo", files=files(b"12345"), headers=granted).headers["x-inputs-stored"] == "false"
    assert client.post("/test/echo", files=files(b"1234"), headers=granted).headers["x-inputs-stored"] == "true"
    assert client.post("/test/echo", files=files(b"12345", b"12"),
                       headers=granted).headers["x-inputs-stored"] == "true"  # one of them is kept


# --- the shadow version ---------------------------------------------------------------------


class FakeShadows:
    """The shadow runner's side of the pipeline: whether it is on, the in-progress count it waits on,
    and the jobs handed to it once their answer has gone."""

    def __init__(self, active: bool) -> None:
        self.active = active
        self.events: list[Any] = []

    def request_started(self) -> None:
        self.events.append("started")

    def request_finished(self) -> None:
        self.events.append("finished")

    def submit(self, endpoint, job, request_id) -> None:
        self.events.append((endpoint.operation_id, [i.value for i in job.instances], request_id))


@pytest.fixture
def shadows(app) -> Iterator[FakeShadows]:
    """An active fake in place of the app's shadow runner (put back afterwards)."""
    real, app.state.shadows = app.state.shadows, FakeShadows(active=True)
    yield app.state.shadows
    app.state.shadows = real


def test_an_active_shadow_gets_each_model_prediction_after_its_answer(client, app, monkeypatch, shadows):
    monkeypatch.setattr(app.state.registry, "get", lambda task: FakeModel())
    response = client.post("/test/model", json={"instances": [4, 5]})
    assert response.status_code == 200
    assert shadows.events == ["started", "finished", ("test_model", [4, 5], response.headers["x-request-id"])]


def test_an_active_shadow_gets_a_binary_answers_prediction_after_it_too(client, app, monkeypatch, shadows):
    monkeypatch.setattr(app.state.registry, "get", lambda task: FakeModel())
    response = client.post("/test/binary-model", content=b"wav!", headers={"content-type": "audio/wav"})
    assert response.status_code == 200
    assert response.content == b"\x89PNGwav!"
    assert shadows.events == ["started", "finished", ("test_binary_model", [None], response.headers["x-request-id"])]


def test_predictions_without_a_model_are_counted_in_progress_but_not_shadowed(client, shadows):
    assert client.post("/test/echo", json={"instances": [1]}).status_code == 200
    assert client.post("/test/single", content=b"x", headers={"content-type": "audio/wav"}).status_code == 200
    assert shadows.events == ["started", "finished", "started", "finished"]


def test_a_refused_request_still_leaves_the_in_progress_count(client, shadows):
    assert client.post("/test/echo", json={"instances": []}).status_code == 422
    assert shadows.events == ["started", "finished"]


def test_an_inactive_shadow_is_left_alone(client, app, monkeypatch, shadows):
    shadows.active = False
    monkeypatch.setattr(app.state.registry, "get", lambda task: FakeModel())
    assert client.post("/test/model", json={"instances": [1]}).status_code == 200
    assert shadows.events == []


# --- the contract ----------------------------------------------------------------------------


def test_the_request_body_of_a_multi_file_endpoint_documents_every_way_in():
    doc = request_body_doc(ECHO)
    assert doc["required"] is True
    content = doc["content"]
    assert list(content) == ["multipart/form-data", "application/json", RAW_MEDIA_TYPE]
    multipart = content["multipart/form-data"]
    assert (multipart["schema"]["type"], multipart["schema"]["required"]) == ("object", ["image"])
    properties = multipart["schema"]["properties"]
    assert properties["image"] == {"type": "array", "items": {"type": "string", "format": "binary"},
                                   "minItems": 1, "maxItems": 3, "description": "images to echo"}
    assert properties["threshold"]["description"] == "a cut-off"
    assert set(properties) == {"image", "threshold", "mode"}
    assert multipart["example"] == {"image": ["image-0.bin", "image-1.bin"]}
    assert content["application/json"] == {"schema": {"$ref": "#/components/schemas/EchoRequest"},
                                           "example": {"instances": [1, 2]}}
    assert content[RAW_MEDIA_TYPE] == {
        "schema": {"type": "string", "format": "binary",
                   "description": "one file as the whole body; Content-Type image/* or text/csv* is accepted too"},
        "example": "(the file's bytes)"}


def test_the_request_body_of_a_single_file_endpoint_has_one_binary_file():
    content = request_body_doc(SINGLE)["content"]
    assert list(content) == ["multipart/form-data", RAW_MEDIA_TYPE]
    assert content["multipart/form-data"]["schema"]["properties"] == {
        "audio": {"type": "string", "format": "binary", "description": ""}}
    assert content["multipart/form-data"]["example"] == {"audio": "audio-0.bin"}


def test_two_files_are_an_array_of_two():
    content = request_body_doc(Endpoint(**{**SINGLE.__dict__, "max_instances": 2}))["content"]
    multipart = content["multipart/form-data"]
    assert multipart["schema"] == {"type": "object", "required": ["audio"], "properties": {"audio": {
        "type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1, "maxItems": 2,
        "description": ""}}}
    assert multipart["example"] == {"audio": ["audio-0.bin", "audio-1.bin"]}


def test_a_json_only_endpoint_documents_json_and_its_own_examples():
    endpoint = Endpoint(**{**MODEL_BACKED.__dict__, "request_examples": {"application/json": {"instances": [3]},
                                                                         "text/plain": "3"}})
    content = request_body_doc(endpoint)["content"]
    assert content == {"application/json": {"schema": {"$ref": "#/components/schemas/EchoRequest"},
                                            "example": {"instances": [3]}},
                       "text/plain": {"example": "3"}}


class NoExamples(BaseModel):
    instances: list[int]


def test_a_json_schema_without_examples_documents_no_example():
    endpoint = Endpoint(**{**MODEL_BACKED.__dict__, "json_schema": NoExamples})
    assert request_body_doc(endpoint)["content"] == {
        "application/json": {"schema": {"$ref": "#/components/schemas/NoExamples"}}}


@pytest.fixture
def registered() -> Iterator[None]:
    """register() records endpoints for the whole app's contract: leave the records as found."""
    endpoints, schemas, handlers = list(pipeline.REGISTERED), dict(pipeline.EXTRA_SCHEMAS), dict(pipeline.HANDLERS)
    yield
    pipeline.REGISTERED[:] = endpoints
    pipeline.HANDLERS.clear()
    pipeline.HANDLERS.update(handlers)
    pipeline.EXTRA_SCHEMAS.clear()
    pipeline.EXTRA_SCHEMAS.update(schemas)


def test_register_adds_the_route_and_documents_its_answers_and_parameters(registered):
    router = APIRouter()
    example = {"model": "echo", "predictions": []}
    register(router, Endpoint(**{**SINGLE.__dict__, "params_schema": EchoParams, "response_example": example}))
    assert pipeline.REGISTERED[-1].operation_id == "test_single"
    app = FastAPI()
    app.include_router(router)
    operation = app.openapi()["paths"]["/test/single"]["post"]
    assert (operation["operationId"], operation["summary"], operation["description"], operation["tags"]) == (
        "test_single", "One", "One file.", ["single-tag"])
    for status, text in PROBLEM_STATUSES.items():
        assert operation["responses"][str(status)]["description"] == text
    success = operation["responses"]["200"]
    assert success["description"] == "one prediction per instance, in the order sent; a PNG"
    assert success["content"]["image/png"] == {"schema": {"type": "string", "format": "binary"}}
    assert success["content"]["application/json"]["example"] == example
    parameters = {p["name"]: p for p in operation["parameters"]}
    assert parameters["X-Request-ID"] == CORRELATION_HEADER
    assert parameters["X-Data-Consent"] == CONSENT_PARAMETER
    assert parameters["threshold"]["in"] == "query" and parameters["threshold"]["required"] is False
    assert parameters["threshold"]["schema"] == {"type": "number", "default": 0.5, "minimum": 0.0, "maximum": 1.0,
                                                 "description": "a cut-off", "title": "Threshold"}
    assert parameters["threshold"]["description"] == "a cut-off"
    assert parameters["mode"]["description"] == ""
    assert operation["requestBody"] == request_body_doc(
        Endpoint(**{**SINGLE.__dict__, "params_schema": EchoParams}))


def test_register_without_parameters_documents_only_the_four_headers(registered):
    router = APIRouter()
    register(router, MODEL_BACKED)
    register(router, Endpoint(**{**MODEL_BACKED.__dict__, "path": "/test/example", "operation_id": "test_example",
                                 "response_example": {"model": "digits"}}))
    app = FastAPI()
    app.include_router(router)
    operation = app.openapi()["paths"]["/test/model"]["post"]
    assert operation["parameters"] == [CORRELATION_HEADER, CONSENT_PARAMETER, CLIENT_VERSION_PARAMETER,
                                       IDEMPOTENCY_PARAMETER]
    assert operation["responses"]["200"] == {"description": "one prediction per instance, in the order sent",
                                             "headers": pipeline.ANSWER_HEADERS,
                                             "content": {"application/json": {"schema": {
                                                 "$ref": "#/components/schemas/EchoResponse"}}}}
    assert set(pipeline.ANSWER_HEADERS) == {"X-Request-ID", "X-Model-Version", "X-Inputs-Stored", "Server-Timing",
                                            "Idempotent-Replayed"}
    example = app.openapi()["paths"]["/test/example"]["post"]["responses"]["200"]["content"]["application/json"]
    assert example["example"] == {"model": "digits"}


def test_parameters_with_an_enum_put_it_in_the_contracts_extra_schemas(registered):
    from enum import Enum

    class Colour(str, Enum):
        red = "red"
        blue = "blue"

    class ColourParams(BaseModel):
        colour: Colour = Colour.red

    pipeline.EXTRA_SCHEMAS.pop("Colour", None)
    router = APIRouter()
    register(router, Endpoint(**{**SINGLE.__dict__, "params_schema": ColourParams}))
    assert pipeline.EXTRA_SCHEMAS["Colour"]["enum"] == ["red", "blue"]
    app = FastAPI()
    app.include_router(router)
    parameters = app.openapi()["paths"]["/test/single"]["post"]["parameters"]
    [colour] = [p for p in parameters if p["name"] == "colour"]
    assert colour["schema"]["$ref"] == "#/components/schemas/Colour"


def test_the_handler_is_named_and_documented_after_its_operation():
    predict = handler(ECHO)
    assert predict.__name__ == "test_echo"
    assert predict.__doc__ == "Echoes its inputs."


def test_the_direct_dispatch_calls_the_function_fastapis_route_calls_under_its_path(registered):
    router = APIRouter()
    register(router, ECHO)
    [route] = router.routes
    routes = pipeline.PredictionRoutes(None, [ECHO])
    found, predict, params = routes.find("/test/echo")
    assert (found.path, params) == ("/test/echo", {})  # what the access log and metrics read as the route
    assert predict is route.endpoint and predict.__name__ == "test_echo"
    assert routes.find("/test/echo/") is None and routes.find("/test/single") is None


@contextlib.contextmanager
def passing_below(layer) -> Iterator[list[tuple[str, str]]]:
    """(method, path) of each request that ``layer`` hands on to the app below it, while inside."""
    downstream, passed = layer.app, []

    async def recording(scope, receive, send):
        passed.append((scope["method"], scope["path"]))
        await downstream(scope, receive, send)

    layer.app = recording
    try:
        yield passed
    finally:
        layer.app = downstream


def test_predictions_are_dispatched_without_the_framework_and_the_rest_is_left_to_it(started, app, caplog):
    """``PredictionRoutes``: a POST to a registered prediction path is answered by its handler
    directly (a problem too: the digits model is not loaded here), logged under its route; any
    other method or path goes on to FastAPI (405, 404)."""
    layer = app.middleware_stack
    while not isinstance(layer, pipeline.PredictionRoutes):
        layer = layer.app
    with passing_below(layer) as passed:
        caplog.set_level("INFO", logger="app.access")
        answer = started.post("/v1/digits/predict", content=b"png", headers={"Content-Type": "image/png"})
        assert passed == []
        assert answer.status_code == 503 and answer.headers["content-type"] == "application/problem+json"
        problem = answer.json()
        assert problem["instance"] == "/v1/digits/predict" and problem["request_id"] == answer.headers["x-request-id"]
        line = access_line(caplog, "/v1/digits/predict")
        assert line["route"] == "/v1/digits/predict" and line["status"] == 503
        assert started.get("/v1/digits/predict").status_code == 405
        assert started.post("/v1/digits/predict/").status_code == 404
        assert passed == [("GET", "/v1/digits/predict"), ("POST", "/v1/digits/predict/")]


def test_predictions_enter_at_the_request_context_and_the_rest_goes_through_fastapi(started, app):
    """``ServiceApp``: a POST to a prediction path skips FastAPI's outer layers (500 page, telemetry,
    body limit) and enters the fast path: a request context sharing the worker's one
    ``RequestContext`` with FastAPI's (one in-flight count); every other request goes through
    FastAPI as before."""
    outer = app.middleware_stack
    layer = outer
    while not isinstance(layer, RequestContextMiddleware):
        layer = layer.app
    assert isinstance(app.fast_path, RequestContextMiddleware) and app.fast_path is not layer
    assert app.fast_path.context is layer.context
    assert app.fast_routes.find("/v1/digits/predict") is not None
    with passing_below(outer) as passed:
        answer = started.post("/v1/digits/predict", content=b"png", headers={"Content-Type": "image/png"})
        assert answer.status_code == 503 and answer.headers["content-type"] == "application/problem+json"
        assert answer.headers["x-request-id"] and passed == []
        assert started.get("/health/live").status_code == 200
        assert started.get("/v1/digits/predict").status_code == 405
        assert started.post("/v1/digits/predict/").status_code == 404
        assert passed == [("GET", "/health/live"), ("GET", "/v1/digits/predict"), ("POST", "/v1/digits/predict/")]


def test_v2_inference_paths_are_found_with_their_parameters():
    routes = pipeline.PredictionRoutes(None, [], (pipeline.PathRoute("/v2/models/{name}/infer", None),
                                                  pipeline.PathRoute("/v2/models/{name}/versions/{version}/infer", None)))
    assert routes.find("/v2/models/digits/infer")[2] == {"name": "digits"}
    assert routes.find("/v2/models/digits/versions/1.0.1/infer")[2] == {"name": "digits", "version": "1.0.1"}
    assert routes.find("/v2/models//infer") is None
    assert routes.find("/v2/models/digits/infer/") is None
    assert routes.find("/v2/models/digits/ready") is None
