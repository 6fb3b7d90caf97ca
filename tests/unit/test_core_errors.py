"""Error mapping (app.core.errors): problem bodies, validation errors as the field to blame, the V2
protocol's error shape, and the handlers a bare FastAPI app gets from install_error_handlers."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI, HTTPException, Query
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field, ValidationError
from starlette.requests import Request

from app.core.errors import (
    PROBLEM_BASE,
    PROBLEM_MEDIA_TYPE,
    ProblemError,
    _field_from_loc,
    install_error_handlers,
    is_v2,
    problem_body,
    problem_from_validation,
    problem_response,
    v2_error,
)


class Point(BaseModel):
    x: float
    tags: list[int] = []


class Body(BaseModel):
    points: list[Point] = Field(min_length=1)


def validation_errors(raw: str) -> list[dict]:
    with pytest.raises(ValidationError) as info:
        Body.model_validate_json(raw)
    return info.value.errors(include_url=False)


def request_for(path: str, request_id: str | None = "rid-1") -> Request:
    state = {"request_id": request_id} if request_id is not None else {}
    return Request({"type": "http", "method": "POST", "path": path, "query_string": b"", "headers": [],
                    "scheme": "http", "server": ("testserver", 80), "state": state})


# --- ProblemError and the problem body --------------------------------------------------------


def test_a_problem_takes_its_title_from_its_status_unless_given_one():
    assert ProblemError(415, "x", "d").title == "Unsupported media type"
    assert ProblemError(422, "x", "d").title == "Unprocessable content"
    assert ProblemError(418, "x", "d").title == "Error"
    assert ProblemError(422, "x", "d", title="Custom").title == "Custom"


def test_a_problem_keeps_its_status_code_detail_field_headers_and_extras():
    problem = ProblemError(429, "rate-limited", "Slow down.", field="body", headers={"Retry-After": "3"},
                           limit=10)
    assert (problem.status, problem.code, problem.detail, problem.field) == (429, "rate-limited", "Slow down.",
                                                                              "body")
    assert problem.headers == {"Retry-After": "3"} and problem.extra == {"limit": 10}
    assert str(problem) == "Slow down."
    bare = ProblemError(400, "bad", "Bad.")
    assert bare.field is None and bare.headers == {} and bare.extra == {}


def test_problem_body_has_the_rfc_9457_members_and_only_the_optional_ones_given():
    assert problem_body(413, "file-too-large", "Too big.") == {
        "type": PROBLEM_BASE + "file-too-large", "title": "Payload too large", "status": 413,
        "detail": "Too big.", "code": "file-too-large"}
    full = problem_body(422, "invalid-request", "x: bad", title="T", field="x", request_id="r1",
                        instance="/v1/p", errors=[1])
    assert full == {"type": PROBLEM_BASE + "invalid-request", "title": "T", "status": 422, "detail": "x: bad",
                    "code": "invalid-request", "field": "x", "instance": "/v1/p", "request_id": "r1",
                    "errors": [1]}
    assert problem_body(599, "odd", "Odd.")["title"] == "Error"


# --- the V2 protocol's errors -----------------------------------------------------------------


@pytest.mark.parametrize("path, v2", [("/v2", True), ("/v2/", True), ("/v2/models/digits/infer", True),
                                      ("/v2x", False), ("/v1/v2", False), ("/", False)])
def test_v2_paths_are_v2_and_nothing_else(path, v2):
    assert is_v2(path) is v2


def test_v2_errors_are_400_for_invalid_input_and_keep_other_statuses():
    assert v2_error(422, "invalid-request", "x: bad") == (400, {"error": "invalid-request: x: bad"})
    assert v2_error(503, "model-unavailable", "Not loaded.") == (503, {"error": "model-unavailable: Not loaded."})
    assert v2_error(400, "malformed-json", "No.") == (400, {"error": "malformed-json: No."})


def test_problem_response_is_problem_json_with_the_path_and_request_id():
    request = request_for("/v1/digits/predict")
    response = problem_response(request, 422, "blank-image", "image is blank.", field="image",
                                headers={"X-Extra": "1"}, threshold=0.5)
    assert response.status_code == 422
    assert response.media_type == PROBLEM_MEDIA_TYPE
    assert response.headers["x-extra"] == "1"
    assert json.loads(response.body) == {
        "type": PROBLEM_BASE + "blank-image", "title": "Unprocessable content", "status": 422,
        "detail": "image is blank.", "code": "blank-image", "field": "image",
        "instance": "/v1/digits/predict", "request_id": "rid-1", "threshold": 0.5}
    assert request.state.error_code == "blank-image"


def test_problem_response_without_a_request_has_no_instance_or_request_id():
    response = problem_response(None, 503, "overloaded", "Busy.", title="Busy")
    assert json.loads(response.body) == {"type": PROBLEM_BASE + "overloaded", "title": "Busy", "status": 503,
                                         "detail": "Busy.", "code": "overloaded"}


def test_problem_response_on_a_v2_path_is_the_v2_error_body():
    request = request_for("/v2/models/digits/infer", request_id=None)
    response = problem_response(request, 422, "invalid-request", "inputs: missing", field="inputs",
                                headers={"Retry-After": "1"})
    assert response.status_code == 400
    assert response.media_type == "application/json"
    assert response.headers["retry-after"] == "1"
    assert json.loads(response.body) == {"error": "invalid-request: inputs: missing"}
    assert request.state.error_code == "invalid-request"


# --- validation errors -> the field to blame --------------------------------------------------


@pytest.mark.parametrize("loc, field", [
    (("body", "points", 0, "x"), "points[0].x"),
    (("body", "points", 2, "tags", 1), "points[2].tags[1]"),
    (("query", "threshold"), "threshold"),
    (("path", "task"), "task"),
    (("header", "x-api-key"), "x-api-key"),
    (("body",), "body"),
    ((), "body"),
    ((3,), "[3]"),
])
def test_a_validation_location_becomes_a_field_path(loc, field):
    assert _field_from_loc(loc) == field


def test_an_invalid_value_is_422_naming_the_first_field_and_listing_each():
    problem = problem_from_validation(validation_errors('{"points": [{"x": "a"}, {"x": 1, "tags": ["b"]}]}'))
    assert (problem.status, problem.code, problem.field) == (422, "invalid-request", "points[0].x")
    assert problem.detail == "points[0].x: Input should be a valid number, unable to parse string as a number"
    assert problem.extra == {"errors": [
        {"field": "points[0].x", "message": "Input should be a valid number, unable to parse string as a number"},
        {"field": "points[1].tags[0]", "message": "Input should be a valid integer, unable to parse string as an "
                                                  "integer"}]}


def test_at_most_20_validation_errors_are_listed():
    raw = json.dumps({"points": [{"x": "bad"}] * 25})
    problem = problem_from_validation(validation_errors(raw))
    assert [e["field"] for e in problem.extra["errors"]] == [f"points[{i}].x" for i in range(20)]


def test_json_that_cannot_be_parsed_is_400_malformed_json():
    errors = validation_errors('{"points": [')
    problem = problem_from_validation(errors)
    assert (problem.status, problem.code, problem.field) == (400, "malformed-json", "body")
    assert problem.detail == f"The body is not valid JSON: {errors[0]['msg']}."


def test_a_missing_body_is_422_empty_body_but_a_missing_member_names_the_member():
    empty = problem_from_validation([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
    assert (empty.status, empty.code, empty.field, empty.detail) == (422, "empty-body", "body",
                                                                     "The request body is empty.")
    member = problem_from_validation(validation_errors("{}"))
    assert (member.status, member.code, member.field) == (422, "invalid-request", "points")
    assert member.detail == "points: Field required"


def test_no_errors_at_all_is_still_a_problem_about_the_body():
    problem = problem_from_validation([])
    assert (problem.status, problem.code, problem.field, problem.detail) == (422, "invalid-request", "body",
                                                                             "body: invalid request")
    assert problem.extra == {"errors": []}


def test_an_error_without_a_message_says_invalid_value():
    problem = problem_from_validation([{"type": "value_error", "loc": ("query", "k")}])
    assert problem.detail == "k: invalid value"
    assert problem.extra == {"errors": [{"field": "k", "message": ""}]}


# --- the handlers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client():
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/problem")
    async def problem() -> None:
        raise ProblemError(409, "conflict-here", "Already there.", field="name", headers={"X-Why": "dup"},
                           existing=3)

    @app.get("/typed")
    async def typed(k: int = Query(...)) -> dict[str, int]:
        return {"k": k}

    @app.get("/teapot")
    async def teapot() -> None:
        raise HTTPException(403, detail={"why": "no"}, headers={"X-Denied": "1"})

    @app.get("/gone")
    async def gone() -> None:
        raise HTTPException(404, detail="That thing is gone.")

    with TestClient(app) as test_client:
        yield test_client


def test_a_raised_problem_is_answered_with_its_status_headers_and_members(client):
    response = client.get("/problem")
    assert response.status_code == 409
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert response.headers["x-why"] == "dup"
    assert response.json() == {"type": PROBLEM_BASE + "conflict-here", "title": "Conflict", "status": 409,
                               "detail": "Already there.", "code": "conflict-here", "field": "name",
                               "instance": "/problem", "existing": 3}


def test_a_framework_validation_error_is_422_naming_the_parameter(client):
    response = client.get("/typed", params={"k": "many"})
    assert response.status_code == 422
    body = response.json()
    assert (body["code"], body["field"], body["title"]) == ("invalid-request", "k", "Unprocessable content")
    assert body["detail"].startswith("k: Input should be a valid integer")
    assert body["errors"] == [{"field": "k", "message": body["detail"][len("k: "):]}]


def test_an_unknown_route_is_404_pointing_at_the_docs(client):
    response = client.get("/nowhere")
    assert response.status_code == 404
    body = response.json()
    assert (body["code"], body["title"]) == ("not-found", "Not found")
    assert body["detail"] == "No route GET /nowhere; see GET /docs for the API."


def test_a_404_with_its_own_detail_keeps_it(client):
    body = client.get("/gone").json()
    assert (body["status"], body["code"], body["detail"]) == (404, "not-found", "That thing is gone.")


def test_a_wrong_method_is_405_naming_method_and_path(client):
    response = client.delete("/problem")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET"
    body = response.json()
    assert (body["code"], body["title"]) == ("method-not-allowed", "Method not allowed")
    assert body["detail"] == "DELETE is not allowed on /problem."


def test_another_http_error_keeps_its_status_headers_and_detail_as_text(client):
    response = client.get("/teapot")
    assert response.status_code == 403
    assert response.headers["x-denied"] == "1"
    body = response.json()
    assert (body["code"], body["title"], body["detail"]) == ("http-error", "Forbidden", "{'why': 'no'}")


def test_an_error_without_a_location_blames_the_body():
    problem = problem_from_validation([{"type": "value_error", "msg": "bad shape"}])
    assert (problem.field, problem.detail) == ("body", "body: bad shape")
    assert problem.extra == {"errors": [{"field": "body", "message": "bad shape"}]}
