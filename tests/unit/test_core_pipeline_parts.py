"""The request pipeline's parts that need no app (app.core.pipeline): the body reader's limits and
ASGI messages, the JSON size problem, a multipart body read outside an app, the body size the request
context counted, the observers of an app without any, the bounded client releases and the direct
dispatch of prediction paths (path parameters, the body)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.testclient import TestClient
from starlette.requests import ClientDisconnect, Request

from app.core import pipeline
from app.core.errors import ProblemError
from app.core.pipeline import ClientReleases, Endpoint, Outcome


def request_of(messages: Iterable[dict[str, Any]], headers: dict[str, str] | None = None,
               **scope: Any) -> tuple[Request, list[dict[str, Any]]]:
    """A request whose ``receive`` hands out ``messages`` and fails past them; the second item lists
    the messages read so far."""
    pending, read = list(messages), []

    async def receive() -> dict[str, Any]:
        assert pending, "read past the end of the body"
        read.append(pending.pop(0))
        return read[-1]

    raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": raw_headers, **scope}, receive), read


def part(body: bytes, more: bool) -> dict[str, Any]:
    return {"type": "http.request", "body": body, "more_body": more}


def read_body(request: Request, max_bytes: int | None = None) -> bytes:
    return asyncio.run(pipeline.read_body(request, max_bytes))


# --- the body --------------------------------------------------------------------------------


def test_a_body_that_arrives_in_parts_is_read_whole_in_order():
    assert read_body(request_of([part(b"ab", True), part(b"cd", False)])[0]) == b"abcd"
    assert read_body(request_of([part(b"a", True), part(b"", True), part(b"bc", False)])[0]) == b"abc"


def test_the_last_message_is_the_one_without_more_body_and_nothing_is_read_after_it():
    request, read = request_of([{"type": "http.request", "body": b"xyz"}])
    assert read_body(request) == b"xyz"
    assert len(read) == 1


def test_a_message_without_a_body_is_an_empty_part():
    assert read_body(request_of([{"type": "http.request", "more_body": True}, part(b"z", False)])[0]) == b"z"
    assert read_body(request_of([{"type": "http.request"}])[0]) == b""


def test_a_client_that_goes_away_while_sending_is_a_disconnect_not_a_short_body():
    with pytest.raises(ClientDisconnect):
        read_body(request_of([part(b"ab", True), {"type": "http.disconnect"}])[0])


def test_a_body_is_refused_as_soon_as_it_passes_the_limit():
    request, read = request_of([part(b"abc", True), part(b"def", True), part(b"ghi", False)])
    with pytest.raises(ProblemError) as info:
        read_body(request, 5)
    assert (info.value.status, info.value.code, info.value.field) == (413, "json-too-large", "body")
    assert len(read) == 2  # the third part is never read


def test_a_body_exactly_at_the_limit_is_read():
    assert read_body(request_of([part(b"abc", True), part(b"de", False)])[0], 5) == b"abcde"
    assert read_body(request_of([part(b"abcde", False)], {"Content-Length": "5"})[0], 5) == b"abcde"


def test_a_declared_length_over_the_limit_is_refused_before_any_of_the_body_is_read():
    request, read = request_of([part(b"abcdef", False)], {"Content-Length": "6"})
    with pytest.raises(ProblemError) as info:
        read_body(request, 5)
    assert (info.value.status, info.value.code) == (413, "json-too-large")
    assert read == []


def test_without_a_limit_the_reader_reads_any_size():
    request, _ = request_of([part(b"x" * 1000, True), part(b"y" * 1000, False)], {"Content-Length": "2000"})
    assert read_body(request) == b"x" * 1000 + b"y" * 1000


@pytest.mark.parametrize("max_bytes, shown", [(1024 * 1024, "1"), (512 * 1024, "0.5"), (8 * 1024 * 1024, "8")])
def test_the_json_size_problem_names_the_limit_in_mib(max_bytes, shown):
    problem = pipeline.json_too_large(max_bytes)
    assert (problem.status, problem.code, problem.field) == (413, "json-too-large", "body")
    assert problem.detail == (f"A JSON body is limited to {shown} MiB (MAX_JSON_MB); send large inputs as files "
                              "or binary tensors.")


# --- multipart outside an app ----------------------------------------------------------------


def test_a_malformed_multipart_body_read_outside_an_app_is_the_same_400():
    """Outside an app (no ``app`` in the scope) Starlette raises its parser's own exception: the same
    problem, with the parser's reason."""
    endpoint = Endpoint(operation_id="parts", path="/parts", tag="t", summary="s", description="d",
                        run=lambda job: Outcome([], []), response_schema=None, file_field="image")
    request, _ = request_of([part(b"garbage", False)], {"Content-Type": "multipart/form-data"})
    with pytest.raises(ProblemError) as info:
        asyncio.run(pipeline.read_multipart(request, endpoint, 1000))
    assert (info.value.status, info.value.code, info.value.field) == (400, "malformed-multipart", "body")
    assert info.value.detail == "The multipart body could not be parsed: Missing boundary in multipart."


# --- what the request context counted, the observers ----------------------------------------


def test_the_body_size_is_what_the_request_context_counted_else_zero():
    assert pipeline.body_bytes(Request({"type": "http", "state": {"body_bytes": 1234}})) == 1234
    assert pipeline.body_bytes(Request({"type": "http", "state": {}})) == 0
    assert pipeline.body_bytes(Request({"type": "http"})) == 0


def test_an_app_without_observers_has_none_to_tell():
    request = Request({"type": "http", "app": FastAPI()})
    assert pipeline.observers_of(request) is pipeline.NO_OBSERVERS
    assert pipeline.observers_of(request).predictions("r", "m", "1", [], 1.0, None) == 0


# --- client releases ---------------------------------------------------------------------------


def with_release(value: str | None) -> Request:
    headers = [] if value is None else [(b"x-client-version", value.encode())]
    return Request({"type": "http", "headers": headers})


def test_client_releases_are_kept_as_sent_up_to_the_limit_then_other():
    releases = ClientReleases(limit=2)
    assert releases.of(with_release(None)) is None
    assert releases.of(with_release(" app/1.4.2 ")) == "app/1.4.2"
    assert releases.of(with_release("web/2.0")) == "web/2.0"
    assert releases.of(with_release("ios/3.1")) == "other"  # a third new release
    assert releases.of(with_release("app/1.4.2")) == "app/1.4.2"  # one already seen keeps its name
    assert releases.of(with_release("ios/3.1")) == "other"
    assert releases.seen == {"app/1.4.2", "web/2.0"}


def test_a_malformed_client_release_is_invalid_and_takes_no_place():
    releases = ClientReleases(limit=1)
    for value in ("two words", "x" * 41, "-leading-dash", "", "app/1.0;drop"):
        assert releases.of(with_release(value)) == "invalid", value
    assert releases.of(with_release("a" * 40)) == "a" * 40
    assert releases.seen == {"a" * 40}


def test_the_default_bound_is_max_client_versions():
    from app.core.limits import MAX_CLIENT_VERSIONS

    releases = ClientReleases()
    names = [f"app/{i}" for i in range(MAX_CLIENT_VERSIONS)]
    assert [releases.of(with_release(name)) for name in names] == names
    assert releases.of(with_release("app/new")) == "other"


# --- the direct dispatch ---------------------------------------------------------------------


async def infer(request: Request) -> JSONResponse:
    """A prediction handler on a path with parameters: what it got."""
    body = await request.body()
    return JSONResponse({"params": request.path_params, "body": body.decode(), "route": request.scope["route"].path})


async def below(scope, receive, send) -> None:
    await PlainTextResponse("below", status_code=418)(scope, receive, send)


def test_a_prediction_path_with_parameters_reaches_its_handler_with_them_and_the_body():
    routes = pipeline.PredictionRoutes(below, [], (pipeline.PathRoute("/v2/models/{name}/infer", infer),))
    client = TestClient(routes)
    response = client.post("/v2/models/digits/infer", content=b'{"inputs": []}')
    assert response.status_code == 200
    assert response.json() == {"params": {"name": "digits"}, "body": '{"inputs": []}',
                               "route": "/v2/models/{name}/infer"}
    assert client.get("/v2/models/digits/infer").status_code == 418  # not a prediction: left to the app below
    assert client.post("/v2/models/digits/ready").status_code == 418
