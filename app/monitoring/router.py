"""Feedback, live accuracy, drift report and dashboard endpoints.

``POST /v1/feedback`` is open (clients send ground truth for their own request ids); everything
that reads the log back (feedback listing, accuracy, drift, dashboard) needs
``Authorization: Bearer $ADMIN_TOKEN``. Without ``ADMIN_TOKEN`` those endpoints answer 401 to
everyone, unless ``ADMIN_OPEN=true`` opens them (local use).

Every database call of a request runs on the monitoring's own few threads within a short timeout
and the request's deadline (:class:`~app.core.execution.BlockingCalls`): a slow or hung database
answers 503 in time and never holds the threads other requests use.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Query, Request, Response, Security
from fastapi.responses import HTMLResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from sqlalchemy.exc import SQLAlchemyError

from app.core.access import bearer_token, is_admin_token
from app.core.errors import ProblemError
from app.core.limits import FEEDBACK_MAX_WAITERS
from app.core.middleware import REQUEST_ID_PATTERN, request_id_age_s
from app.core.registry import ServedModel
from app.monitoring import reports
from app.monitoring.dashboard import render_dashboard
from app.monitoring.drift import Window, parse_window
from app.monitoring.service import Monitoring
from app.monitoring.store import utcnow

router = APIRouter(tags=["monitoring"])

FEEDBACK_POLL_S = 0.2
T = TypeVar("T")
# The dashboard is one self-contained page: inline styles and SVG, no script.
DASHBOARD_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
                 "form-action 'none'; frame-ancestors 'none'")


def monitoring_state(request: Request) -> Monitoring:
    monitoring = getattr(request.app.state, "monitoring", None)
    if monitoring is None:
        raise ProblemError(503, "monitoring-unavailable", "The prediction log is not running.")
    return monitoring


bearer = HTTPBearer(auto_error=False, scheme_name="AdminToken",
                    description="Authorization: Bearer $ADMIN_TOKEN")


async def require_admin(request: Request, monitoring: Annotated[Monitoring, Depends(monitoring_state)],
                        _: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)] = None) -> None:
    """Bearer ``ADMIN_TOKEN`` (401 without credentials, 403 with wrong ones); 401 to everyone when
    no token is configured, unless ``ADMIN_OPEN=true``."""
    settings = monitoring.settings
    if settings.admin_closed:
        raise ProblemError(401, "admin-closed", "The admin endpoints are closed: the operator has not "
                           "set ADMIN_TOKEN (or ADMIN_OPEN=true for local use).", field="Authorization",
                           headers={"WWW-Authenticate": 'Bearer realm="monitoring"'})
    token = settings.admin_token
    if token is None or not token.get_secret_value():
        return
    given = bearer_token(request.headers.get("authorization", ""))
    if given is None:
        raise ProblemError(401, "admin-token-required",
                           "This endpoint needs an 'Authorization: Bearer <ADMIN_TOKEN>' header.",
                           field="Authorization", headers={"WWW-Authenticate": 'Bearer realm="monitoring"'})
    if not is_admin_token(given, settings):
        raise ProblemError(403, "admin-token-invalid", "The bearer token is not the admin token.",
                           field="Authorization")


Admin = Depends(require_admin)


def admin_responses(example: Any, media_type: str = "application/json") -> dict[int | str, Any]:
    return {200: {"content": {media_type: {"example": example}}}, **ADMIN_RESPONSES}


ADMIN_RESPONSES: dict[int | str, Any] = {
    401: {"description": "no bearer token, or no ADMIN_TOKEN configured (`admin-closed`)"},
    403: {"description": "a bearer token that is not ADMIN_TOKEN"},
    404: {"description": "no model of that name"},
    422: {"description": "a window, history or limit that cannot be read"},
    503: {"description": "the prediction-log database is unavailable"},
}


def _flush_local(monitoring: Monitoring) -> None:
    """Write this worker's buffered rows first, so a report includes the requests this process just
    served (other workers' rows reach the database within LOG_FLUSH_INTERVAL_S)."""
    monitoring.prediction_log.flush(1.0)


def parse_window_param(text: str | None, monitoring: Monitoring) -> Window:
    try:
        return parse_window(text, monitoring.settings.drift_window)
    except ValueError as exc:
        raise ProblemError(422, "invalid-window", f"window: {exc}.", field="window") from None


ClientVersion = Annotated[str | None, Query(max_length=48, description="one client release, as sent in "
                                            "X-Client-Version (or other, invalid; none: without the header)")]


def client_filter(value: str | None) -> Any:
    """The reports' client filter for a ``client_version`` parameter: none given, all releases."""
    if value is None:
        return reports.ANY_CLIENT
    return None if value == "none" else value


def known_model(request: Request, model: str) -> None:
    """404 unless ``model`` names a task of this service."""
    registry = getattr(request.app.state, "registry", None)
    if registry is not None and model not in getattr(registry, "slots", {}):
        raise ProblemError(404, "unknown-model", f"model: no model named {model!r}.", field="model")


def served_models(request: Request, model: str | None) -> list[ServedModel]:
    registry = getattr(request.app.state, "registry", None)
    if registry is None:
        return []
    if model is None:
        return registry.models()
    known_model(request, model)
    return [registry.get(model)]  # 503 problem when it exists but is not loaded


def registry_of(request: Request) -> Any:
    return getattr(request.app.state, "registry", None)


def database_down(exc: Exception | str) -> ProblemError:
    reason = {"busy": "too many calls are waiting for it", "timeout": "it did not answer in time"}.get(
        exc, exc) if isinstance(exc, str) else type(exc).__name__
    return ProblemError(503, "database-unavailable",
                        f"The prediction-log database is unavailable ({reason}); retry later.",
                        headers={"Retry-After": "5"})


async def in_database(request: Request | None, monitoring: Monitoring, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on the monitoring's database threads, within the request's deadline; a 503
    problem when the database fails, is too slow or has too many calls waiting."""
    deadline = request.scope.get("state", {}).get("deadline") if request is not None else None
    try:
        return await monitoring.calls.run(deadline, database_down, fn, *args)
    except SQLAlchemyError as exc:
        raise database_down(exc) from None


class FeedbackIn(BaseModel):
    model_config = {"json_schema_extra": {"examples": [
        {"request_id": "019ab2c3d4e5f60718293a4b5c6d7e8f", "index": 0, "label": "7"}]}}

    request_id: str = Field(min_length=1, max_length=128,
                            description="the request_id returned with the prediction (X-Request-ID)")
    label: str = Field(min_length=1, max_length=256, description="the true label")
    index: int = Field(0, ge=0, le=100_000,
                       description="instance index within the request (0 for one instance)")


class _Waiters:
    """Feedback requests waiting for a prediction that is still in a worker's log buffer."""

    def __init__(self) -> None:
        self.count = 0


_waiters = _Waiters()


def unknown_request(request_id: str) -> ProblemError:
    return ProblemError(404, "unknown-request",
                        f"request_id: no logged prediction has request id {request_id!r}.",
                        field="request_id")


def _request_id_shape(request_id: str) -> bool:
    return REQUEST_ID_PATTERN.match(request_id) is not None


async def find_prediction(request: Request, monitoring: Monitoring, request_id: str) -> list[Any]:
    """The logged rows of a request, without holding a thread while waiting.

    An id not shaped like the server's is answered at once. A prediction made a moment ago may still
    be buffered: this worker's buffer is flushed; another worker's is written within two flush
    intervals, which a bounded number of requests wait for, asleep; only for ids this service
    issued (their tag verifies) and that are that recent. Any other id costs one lookup.
    """
    if not _request_id_shape(request_id):
        raise unknown_request(request_id)
    engine, log = monitoring.engine, monitoring.prediction_log
    rows = await in_database(request, monitoring, reports.prediction_of, engine, request_id)
    if rows:
        return rows
    if log.contains(request_id):
        await in_database(request, monitoring, log.flush, 2.0)
        return await in_database(request, monitoring, reports.prediction_of, engine, request_id)
    age = request_id_age_s(request_id)
    max_delay = 2 * monitoring.settings.log_flush_interval_s + 1.0
    if age is None or age > max_delay:
        return rows
    if _waiters.count >= FEEDBACK_MAX_WAITERS:
        raise ProblemError(503, "overloaded", "Too many feedback requests are waiting for their "
                           "predictions to be logged; retry in a second.", headers={"Retry-After": "1"})
    _waiters.count += 1
    try:
        while not rows and (request_id_age_s(request_id) or 0.0) <= max_delay:
            await asyncio.sleep(FEEDBACK_POLL_S)
            rows = await in_database(request, monitoring, reports.prediction_of, engine, request_id)
    finally:
        _waiters.count -= 1
    return rows


class FeedbackOut(BaseModel):
    model_config = {"json_schema_extra": {"examples": [
        {"request_id": "019ab2c3d4e5f60718293a4b5c6d7e8f", "index": 0, "label": "7", "model": "digits",
         "version": "1.0.1", "prediction": "7", "correct": True, "replaced": False}]}}

    request_id: str
    index: int
    label: str
    model: str
    version: str
    prediction: str = Field(description="what the model predicted for this instance")
    correct: bool
    replaced: bool = Field(description="whether an earlier label was replaced (it is never shown)")


@router.post("/v1/feedback", status_code=201, operation_id="feedback_create", response_model=FeedbackOut,
             responses={200: {"description": "an earlier label was replaced", "model": FeedbackOut},
                        400: {"description": "a body that is not JSON"},
                        413: {"description": "a body over MAX_UPLOAD_MB"},
                        404: {"description": "no prediction with that request id, or no such instance"},
                        422: {"description": "a label the model does not have, or a malformed body"},
                        503: {"description": "the prediction-log database is unavailable, or too many "
                                             "feedback requests are waiting"}})
async def post_feedback(body: FeedbackIn, request: Request, response: Response,
                        monitoring: Annotated[Monitoring, Depends(monitoring_state)]) -> dict[str, Any]:
    """Record the ground-truth label of one predicted instance (a second label replaces the first:
    201 when recorded, 200 when replaced). The request id is the one the server returned with the
    prediction; knowing it is what entitles a client to label it. The replaced label is never shown."""
    rows = await find_prediction(request, monitoring, body.request_id)
    if not rows:
        raise unknown_request(body.request_id)
    row = next((r for r in rows if r.instance == body.index), None)
    if row is None:
        raise ProblemError(404, "unknown-instance",
                           f"index: request {body.request_id!r} has {len(rows)} instance(s), "
                           f"numbered 0 to {len(rows) - 1}.", field="index")
    labels = _labels_of(request, row.model, row.version)
    if labels and body.label not in labels:
        raise ProblemError(422, "unknown-label",
                           f"label: {body.label!r} is not a {row.model} label ({', '.join(labels[:20])}).",
                           field="label")
    previous = await in_database(request, monitoring, reports.record_feedback, monitoring.engine,
                                 body.request_id, body.index, body.label)
    if previous is not None:
        response.status_code = 200
    return {"request_id": body.request_id, "index": body.index, "label": body.label, "model": row.model,
            "version": row.version, "prediction": row.prediction, "correct": row.prediction == body.label,
            "replaced": previous is not None}


def _labels_of(request: Request, model: str, version: str) -> list[str]:
    registry = getattr(request.app.state, "registry", None)
    slot = getattr(registry, "slots", {}).get(model) if registry is not None else None
    if slot is None or slot.model is None or slot.model.version != version:
        return []
    return [str(label) for label in slot.model.metadata.get("labels") or []]


@router.get("/v1/feedback", dependencies=[Admin], operation_id="feedback_list",
            responses=admin_responses({"feedback": [{
                "created_at": "2026-11-25T12:00:00+00:00", "request_id": "019ab2c3d4e5f60718293a4b5c6d7e8f",
                "index": 0, "label": "7", "model": "digits", "version": "1.0.1", "prediction": "7",
                "confidence": 0.99, "correct": True}]}))
async def get_feedback(request: Request, monitoring: Annotated[Monitoring, Depends(monitoring_state)],
                       model: str | None = None,
                       limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
    """The most recent feedback, newest first, with the prediction it labels."""

    def read() -> dict[str, Any]:
        _flush_local(monitoring)
        return {"feedback": reports.list_feedback(monitoring.engine, model, limit)}

    return await in_database(request, monitoring, read)


@router.get("/v1/monitoring/accuracy", dependencies=[Admin], operation_id="monitoring_accuracy",
            responses=admin_responses({"generated_at": "2026-11-25T12:00:00+00:00",
                                       "window": {"kind": "count", "count": 500},
                                       "models": [{"model": "digits", "labelled": 40, "correct": 39,
                                                   "accuracy": 0.975, "versions": ["1.0.1"], "per_class": {}}]}))
async def get_accuracy(request: Request, monitoring: Annotated[Monitoring, Depends(monitoring_state)],
                       model: str | None = None, window: str | None = None,
                       client_version: ClientVersion = None) -> dict[str, Any]:
    """Live accuracy per model over the window's predictions that have feedback (of one client
    release with ``client_version``; each report lists the releases it saw)."""
    win = parse_window_param(window, monitoring)
    names = [model] if model is not None else [m.task for m in served_models(request, None)]
    if model is not None:
        known_model(request, model)

    def read() -> dict[str, Any]:
        _flush_local(monitoring)
        return {"generated_at": utcnow().isoformat(timespec="seconds"), "window": win.describe(),
                "models": [reports.accuracy(monitoring.engine, name, win, client_filter(client_version))
                           for name in names]}

    return await in_database(request, monitoring, read)


@router.get("/v1/monitoring/drift", dependencies=[Admin], operation_id="monitoring_drift",
            responses=admin_responses({"generated_at": "2026-11-25T12:00:00+00:00",
                                       "window": {"kind": "count", "count": 500}, "min_samples": 30,
                                       "models": [{"model": "digits", "version": "1.0.1", "n": 500,
                                                   "status": "ok", "drift_score": 0.03}]}))
async def get_drift(request: Request, monitoring: Annotated[Monitoring, Depends(monitoring_state)],
                    model: str | None = None, window: str | None = None,
                    client_version: ClientVersion = None) -> dict[str, Any]:
    """Drift report per model (all loaded models when ``model`` is omitted) over ``window``:
    a count (``500``: the last 500 predictions) or a duration (``30m``, ``1h``, ``7d``). Each lists
    the client releases (``X-Client-Version``) in its window; ``client_version`` reports on one of
    them (``none``: the predictions sent without the header)."""
    win = parse_window_param(window, monitoring)
    models = served_models(request, model)

    def read() -> dict[str, Any]:
        _flush_local(monitoring)
        return reports.drift_report(monitoring.engine, models, win,
                                    min_samples=monitoring.settings.drift_min_samples,
                                    client_version=client_filter(client_version))

    return await in_database(request, monitoring, read)


@router.get("/v1/monitoring/dashboard", dependencies=[Admin], response_class=HTMLResponse,
            operation_id="monitoring_dashboard",
            responses=admin_responses("<!doctype html><title>Monitoring</title>...", "text/html"))
async def get_dashboard(request: Request, monitoring: Annotated[Monitoring, Depends(monitoring_state)],
                        model: str | None = None, window: str | None = None,
                        history: str = "24h", client_version: ClientVersion = None) -> HTMLResponse:
    """HTML page: reference vs current histograms, class distribution, drift score, latency and
    throughput over time (``history``, default the last 24 hours, in 24 buckets); of one client
    release with ``client_version``."""
    win = parse_window_param(window, monitoring)
    try:
        hist = parse_window(history, monitoring.settings.drift_window)
    except ValueError as exc:
        raise ProblemError(422, "invalid-window", f"history: {exc}.", field="history") from None
    models = served_models(request, model)
    shadows = getattr(registry_of(request), "shadows", {})
    release = client_filter(client_version)

    def read() -> list[dict[str, Any]]:
        _flush_local(monitoring)
        sections = []
        for m in models:
            rows = reports.window_rows(monitoring.engine, m.task, win, version=m.version,
                                       feature_names=reports.reference_features(m), client_version=release)
            report = reports.model_drift_report(monitoring.engine, m, win, rows=rows, client_version=release,
                                                min_samples=monitoring.settings.drift_min_samples)
            shadow_slot = shadows.get(m.task)
            shadow = (reports.shadow_report(monitoring.engine, m.task, win, shadow_slot.version)
                      if shadow_slot is not None else None)
            sections.append({"report": report, "reference": m.reference, "shadow": shadow,
                             "current_features": {k: reports.feature_values(rows, k) for k in rows.features},
                             "timeline": reports.timeline(monitoring.engine, m, hist,
                                                          min_samples=monitoring.settings.drift_min_samples)})
        return sections

    sections = await in_database(request, monitoring, read)
    html = render_dashboard(sections, generated_at=utcnow().isoformat(timespec="seconds"),
                            window=window or str(monitoring.settings.drift_window), history=history)
    return HTMLResponse(html, headers={"Cache-Control": "no-store", "Content-Security-Policy": DASHBOARD_CSP})
