"""Errors as RFC 9457 problem details (``application/problem+json``).

Handlers raise :class:`ProblemError` with a status, a short machine-readable ``code`` (which becomes
the problem ``type``), a human ``detail`` sentence and, where one input is to blame, the ``field``.
Every response also carries the request id so a client can quote it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_BASE = "https://problems.inference.local/"  # identifiers, documented in docs/api.md; not fetched

_TITLES = {
    400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not found",
    405: "Method not allowed", 406: "Not acceptable", 408: "Request timeout", 409: "Conflict",
    413: "Payload too large", 415: "Unsupported media type", 422: "Unprocessable content",
    429: "Too many requests", 500: "Internal server error", 503: "Service unavailable",
}


class ProblemError(Exception):
    """An error a client can act on. ``code`` is a short kebab-case identifier, e.g. ``blank-image``."""

    def __init__(self, status: int, code: str, detail: str, *, field: str | None = None,
                 title: str | None = None, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.field = field
        self.title = title or _TITLES.get(status, "Error")
        self.headers = headers or {}
        self.extra = extra


def problem_body(status: int, code: str, detail: str, *, title: str | None = None,
                 field: str | None = None, request_id: str | None = None,
                 instance: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + code,
        "title": title or _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "code": code,
    }
    if field is not None:
        body["field"] = field
    if instance is not None:
        body["instance"] = instance
    if request_id is not None:
        body["request_id"] = request_id
    body.update(extra)
    return body


def is_v2(path: str) -> bool:
    """The Open Inference Protocol's paths, whose errors are ``{"error": "..."}``."""
    return path == "/v2" or path.startswith("/v2/")


def v2_error(status: int, code: str, detail: str) -> tuple[int, dict[str, str]]:
    """A problem as the V2 protocol's error: invalid input is its 400, the rest keep their status."""
    return (400 if status == 422 else status), {"error": f"{code}: {detail}"}


def problem_response(request: Request | None, status: int, code: str, detail: str, *,
                     title: str | None = None, field: str | None = None,
                     headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None) if request is not None else None
    instance = request.url.path if request is not None else None
    if request is not None:
        request.state.error_code = code
    if instance is not None and is_v2(instance):
        status, body = v2_error(status, code, detail)
        return JSONResponse(body, status_code=status, headers=headers)
    body = problem_body(status, code, detail, title=title, field=field, request_id=request_id,
                        instance=instance, **extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def problem_answer(request: Request, exc: ProblemError) -> JSONResponse:
    """The answer to a raised :class:`ProblemError`: FastAPI's exception handler and the pipeline's
    direct dispatch of predictions both send it."""
    return problem_response(request, exc.status, exc.code, exc.detail, title=exc.title,
                            field=exc.field, headers=exc.headers, **exc.extra)


def _field_from_loc(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for part in parts:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out or "body"


def problem_from_validation(errors: list[dict[str, Any]], codes: dict[str, str] | None = None) -> ProblemError:
    """A pydantic validation error as the problem a client can act on: 400 for JSON that cannot be
    parsed, else 422 naming the first field (and listing up to 20). ``codes`` gives an endpoint's
    own code for a kind of error (``missing``, ``extra_forbidden``...) instead of invalid-request."""
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    field = _field_from_loc(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        return ProblemError(400, "malformed-json", f"The body is not valid JSON: {first.get('msg')}.",
                            field="body")
    if first.get("type") == "missing" and field == "body":
        return ProblemError(422, "empty-body", "The request body is empty.", field="body")
    detail = f"{field}: {first.get('msg', 'invalid value')}"
    issues = [{"field": _field_from_loc(e.get("loc", ())), "message": e.get("msg", "")}
              for e in errors[:20]]
    code = (codes or {}).get(str(first.get("type")), "invalid-request")
    return ProblemError(422, code, detail, field=field, errors=issues)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError) -> JSONResponse:
        return problem_answer(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problem = problem_from_validation(list(exc.errors()))
        return problem_response(request, problem.status, problem.code, problem.detail,
                                field=problem.field, **problem.extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"No route {request.method} {request.url.path}; see GET /docs for the API."
        if exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}."
        return problem_response(request, exc.status_code, code, detail,
                                headers=getattr(exc, "headers", None))
    # Anything else is logged (one JSON line with the request id) and answered with a 500 problem
    # by RequestContextMiddleware, so no traceback ever reaches the server's text log.
