"""App factory: settings, logging, middleware, routers and the lifespan that loads the models.

Served by ``gunicorn -c gunicorn.conf.py app.main:app`` (uvicorn workers); each worker process
builds its own app, so every worker has its own LiteRT interpreters.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response

from app.core.access import Access
from app.core.clients import TrustedProxies
from app.core.config import Settings, get_settings
from app.core.errors import (
    PROBLEM_MEDIA_TYPE,
    install_error_handlers,
    is_v2,
    problem_response,
)
from app.core.execution import build_execution
from app.core.limits import IDEMPOTENCY_LEASE_MARGIN_S, MAX_IN_FLIGHT
from app.core.limits_table import limits
from app.core.logging import configure_logging, native_stderr_as_log
from app.core.dispatch import ServiceApp, cors_options, cors_wrapper
from app.core.idempotency import IdempotencyMiddleware, IdempotencyStore
from app.core.events import Observers
from app.core.model_routes import router as model_router
from app.core.middleware import RequestContext, RequestContextMiddleware, Uploads, request_id_key
from app.core.pipeline import EXTRA_SCHEMAS, REGISTERED, PredictionRoutes
from app.core.registry import ModelRegistry, ModelSlot
from app.core.schemas import Liveness, Problem, Readiness
from app.core.shadow import ShadowRunner
from app.jobs.service import JobsMiddleware, add_job_contract, build_jobs
from app.jobs.service import router as jobs_router
from app.monitoring import setup_monitoring, shutdown_monitoring
from app.monitoring.lifecycle import router as lifecycle_router
from app.monitoring.metrics import render_metrics
from app.monitoring.observer import DurableMonitoringObserver, MonitoringObserver
from app.monitoring.router import router as monitoring_router
from app.openinference.models import V2_MODELS
from app.openinference.protocol import ErrorBody
from app.openinference.router import INFER_ROUTES as V2_INFER_ROUTES
from app.openinference.router import router as v2_router
from app.tasks import load_slices, tasks_of
from app.web.docs import add_docs
from app.web.router import HEADERS as PAGE_HEADERS
from app.web.router import add_web

API_DESCRIPTION = """Inference for four models trained offline: customer segments and ad-hoc K-means
(clustering), handwritten digits (CNN), EM membrane masks (U-Net) and speech emotion (MFCC + CNN).
Errors are RFC 9457 problem details; every response carries an X-Request-ID."""
log = logging.getLogger("app.main")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level)
    proxies = TrustedProxies.parse(settings.forwarded_allow_ips)
    request_id_key.use(settings.request_id_secret.get_secret_value() if settings.request_id_secret else None)
    slices = load_slices(settings.task_modules)
    tasks = tasks_of(slices)
    V2_MODELS.update({task.v2.name: task.v2 for task in tasks if task.v2 is not None})

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = ModelRegistry(settings, {s.name: s.model_class for s in slices if s.model_class})
        with native_stderr_as_log():
            registry.load_all()
        for s in slices:
            if s.import_error:
                registry.slots[s.name] = ModelSlot(
                    s.name, error=f"task code failed to import: {s.import_error}")
        app.state.registry = registry
        warn_about_admin(settings)
        app.state.execution = build_execution(settings)
        app.state.access = Access.from_settings(settings)
        setup_monitoring(app, settings)
        app.state.shadows = ShadowRunner(registry, observers)
        app.state.shadows.start()
        app.state.jobs = build_jobs(settings)
        try:
            yield
        finally:
            if app.state.jobs is not None:
                app.state.jobs.close()
            app.state.shadows.stop()
            shutdown_monitoring(app)
            app.state.execution.shutdown()

    # No trailing-slash redirects: they would echo the client's Host header back in a Location.
    app = ServiceApp(title="ML inference service", version="1.0.0", description=API_DESCRIPTION,
                     lifespan=lifespan, redirect_slashes=False, docs_url=None, redoc_url=None)
    app.state.settings = settings
    # The limits table (the service's rows and each task's) and each task's kind of input, for /v1/models.
    app.state.limits_table = limits(settings, [row for task in tasks for row in task.limits(settings)])
    app.state.task_media = {task.name: task.media for task in tasks}
    # The core tells observers what it does; the monitoring (metrics, the prediction log) is one.
    observers = app.state.observers = Observers()
    observers.add((DurableMonitoringObserver if settings.log_durable else MonitoringObserver)(app.state))
    install_error_handlers(app)
    # Innermost of our middleware: CORS and the request context still wrap every prediction.
    context = RequestContext(max_body_bytes=settings.max_upload_bytes, request_timeout_s=settings.request_timeout_s,
                             max_in_flight=MAX_IN_FLIGHT, proxies=proxies, uploads=Uploads(),
                             html_headers=PAGE_HEADERS, observers=observers)
    # Idempotency-Key on every POST: keys in the prediction log's database, shared by every dyno.
    keys = IdempotencyStore(settings.database_url, ttl_s=settings.idempotency_ttl_h * 3600.0,
                            lease_s=settings.request_timeout_s + IDEMPOTENCY_LEASE_MARGIN_S)
    app.add_middleware(PredictionRoutes, endpoints=REGISTERED, patterns=V2_INFER_ROUTES)
    app.add_middleware(IdempotencyMiddleware, store=keys)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, **cors_options(settings))
    app.add_middleware(RequestContextMiddleware, context=context)
    cors = cors_wrapper(settings)
    # Prefer: respond-async makes a prediction a job (only predictions take the fast path); inside the
    # idempotency layer, so a retried submission gets the same job.
    app.add_fast_path(context, REGISTERED, V2_INFER_ROUTES, lambda routes: cors(IdempotencyMiddleware(JobsMiddleware(routes), keys)))

    @app.get("/health/live", tags=["health"], operation_id="health_live", response_model=Liveness)
    async def live() -> dict[str, str]:
        """The process is up and answering."""
        return {"status": "ok"}

    @app.get("/health/ready", tags=["health"], operation_id="health_ready", response_model=Readiness,
             responses={503: {"description": "a model is not loaded (`models-not-ready`) or this "
                                             "worker's heavy queue is full (`saturated`)"}})
    async def ready(request: Request) -> Response:
        """200 when every model is loaded and this worker can take more work (``degraded`` when it
        answers but the prediction log's database is down: rows wait in memory, bounded); else 503
        naming the models that are not loaded or the kinds of work whose queue is full."""
        registry: ModelRegistry = request.app.state.registry
        execution = request.app.state.execution
        status = registry.status()
        saturated = execution.saturated
        if registry.ready and not saturated:
            prediction_log = getattr(request.app.state, "prediction_log", None)
            log_status = prediction_log.status() if prediction_log is not None else None
            degraded = log_status is not None and log_status["database"] != "ok"
            return JSONResponse({"status": "degraded" if degraded else "ready", "models": status,
                                 "gates": execution.status(), "places": execution.places_status(),
                                 "model_calls": execution.model_calls.status(), "prediction_log": log_status})
        if not registry.ready:
            not_ready = sorted(task for task, s in status.items() if not s["ready"])
            return problem_response(request, 503, "models-not-ready",
                                    f"Not loaded: {', '.join(not_ready)}.", not_ready=not_ready,
                                    models=status, headers={"Retry-After": "10"})
        return problem_response(request, 503, "saturated",
                                f"This worker's queue is full for: {', '.join(saturated)}.",
                                saturated=saturated, gates=execution.status(),
                                headers={"Retry-After": "2"})

    @app.get("/metrics", tags=["monitoring"], include_in_schema=False)
    async def metrics() -> Response:
        body, content_type = render_metrics()
        return Response(body, media_type=content_type)

    for s in slices:
        if s.router is not None:
            app.include_router(s.router)
    app.include_router(model_router)
    app.include_router(jobs_router)
    app.include_router(v2_router)
    app.include_router(monitoring_router)
    app.include_router(lifecycle_router)
    add_web(app, tasks)
    add_docs(app, {k: v for k, v in PAGE_HEADERS.items() if k != "Content-Security-Policy"})
    app.openapi = lambda: contract(app)  # type: ignore[method-assign]
    return app


def warn_about_admin(settings: Settings) -> None:
    """Say at start-up when the admin endpoints are closed to everyone, or open to anyone."""
    if settings.admin_closed:
        log.warning("admin endpoints closed: set ADMIN_TOKEN to read monitoring, feedback and the "
                    "dataset export (or ADMIN_OPEN=true for local use)")
    elif settings.admin_open and not (settings.admin_token and settings.admin_token.get_secret_value()):
        log.warning("admin endpoints open to anyone (ADMIN_OPEN=true): for local use only")


def contract(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document: FastAPI's, plus the request schemas the pipeline reads itself, the
    ``Problem`` schema on every error answer, and no framework validation-error shapes."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description,
                         routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for endpoint in REGISTERED:
        if endpoint.json_schema is not None:
            model_schema = endpoint.json_schema.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(model_schema.pop("$defs", {}))
            components[endpoint.json_schema.__name__] = model_schema
    components.update(EXTRA_SCHEMAS)
    problem = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    components["Problem"] = problem
    components["ErrorBody"] = ErrorBody.model_json_schema()
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path, operations in schema.get("paths", {}).items():
        error = ({"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}} if is_v2(path)
                 else {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}})
        for operation in operations.values():
            if is_v2(path):  # string path parameters: FastAPI's 422 cannot happen there
                operation.get("responses", {}).pop("422", None)
            for status, response in operation.get("responses", {}).items():
                if status.isdigit() and int(status) >= 400:
                    response["content"] = error
    add_job_contract(schema, [endpoint.path for endpoint in REGISTERED], V2_INFER_ROUTES)
    app.openapi_schema = schema
    return schema


app = create_app()
