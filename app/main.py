"""App factory: settings, logging, middleware, routers and the lifespan that loads the models.

Served by ``gunicorn -c gunicorn.conf.py app.main:app`` (uvicorn workers); each worker process
builds its own app, so every worker has its own LiteRT interpreters.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline

from app.core.access import Access
from app.core.config import Settings, get_settings
from app.core.errors import (
    PROBLEM_MEDIA_TYPE,
    install_error_handlers,
    is_v2,
    problem_response,
)
from app.core.execution import build_execution
from app.core.limits import MAX_IN_FLIGHT, limits_for
from app.core.logging import configure_logging, native_stderr_as_log
from app.core.middleware import RequestContextMiddleware
from app.core.pipeline import EXTRA_SCHEMAS, REGISTERED, PredictionRoutes
from app.core.registry import ModelRegistry, ModelSlot
from app.core.schemas import Liveness, ModelList, Problem, Readiness
from app.core.shadow import ShadowRunner
from app.monitoring import setup_monitoring, shutdown_monitoring
from app.monitoring.lifecycle import router as lifecycle_router
from app.monitoring.metrics import render_metrics
from app.monitoring.router import router as monitoring_router
from app.openinference.protocol import ErrorBody
from app.openinference.router import router as v2_router
from app.tasks import load_slices
from app.web.router import router as web_router
from app.web.router import static_files as web_static

API_DESCRIPTION = """Inference for four models trained offline: customer segments and ad-hoc K-means
(clustering), handwritten digits (CNN), EM membrane masks (U-Net) and speech emotion (MFCC + CNN).
Errors are RFC 9457 problem details; every response carries an X-Request-ID."""


class ServiceApp(FastAPI):
    """The FastAPI app, entered at the request context for a prediction.

    FastAPI wraps every request in three layers of its own before the app's middleware: a 500 page,
    exception telemetry (OpenTelemetry, off unless configured) and a body-size limit (unset). A
    prediction has its own of all three in :class:`RequestContextMiddleware` (problem+json 500s,
    the prediction metrics and log, MAX_UPLOAD_MB), so a ``POST`` to a prediction path starts
    there, at the very instance FastAPI built (one in-flight count for the worker); anything else
    goes through FastAPI as before. ~3 % of a digit's time in one process."""

    _prediction_entry: tuple[Any, Any] | None = None  # (the request context, the prediction paths)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            entry, paths = self._prediction_entry or self._find_prediction_entry()
            if scope["path"] in paths:
                if self.root_path:
                    scope["root_path"] = self.root_path
                scope["app"] = self
                await entry(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def _find_prediction_entry(self) -> tuple[Any, Any]:
        """The request context and the prediction routes in the middleware FastAPI built (no
        paths, so nothing is entered early, if either is missing)."""
        if self.middleware_stack is None:
            self.middleware_stack = self.build_middleware_stack()
        layers, layer = [], self.middleware_stack
        while layer is not None:
            layers.append(layer)
            layer = getattr(layer, "app", None)
        context = next((m for m in layers if isinstance(m, RequestContextMiddleware)), None)
        routes = next((m for m in layers if isinstance(m, PredictionRoutes)), None)
        self._prediction_entry = (context, routes.routes if context and routes else {})
        return self._prediction_entry


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level)
    slices = load_slices()

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
        app.state.execution = build_execution(settings)
        app.state.access = Access.from_settings(settings)
        monitoring = setup_monitoring(app, settings)
        app.state.shadows = ShadowRunner(registry, monitoring.prediction_log)
        app.state.shadows.start()
        try:
            yield
        finally:
            app.state.shadows.stop()
            shutdown_monitoring(app)
            app.state.execution.shutdown()

    # No trailing-slash redirects: they would echo the client's Host header back in a Location.
    # /docs and /redoc from assets installed with fastapi-offline: no CDN, they work offline.
    app = FastAPIOffline(title="ML inference service", version="1.0.0", description=API_DESCRIPTION,
                         lifespan=lifespan, redirect_slashes=False)
    # FastAPIOffline is a factory that returns a plain FastAPI; ServiceApp adds nothing to its state,
    # only the entry point for predictions.
    app.__class__ = ServiceApp
    app.state.settings = settings
    install_error_handlers(app)
    # Innermost of our middleware: CORS and the request context still wrap every prediction.
    app.add_middleware(PredictionRoutes, endpoints=REGISTERED)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["*"],
                           expose_headers=["X-Request-ID", "X-Correlation-ID", "X-Model-Version", "X-Inputs-Stored",
                                           "Server-Timing", "Retry-After", "RateLimit-Limit",
                                           "RateLimit-Remaining", "RateLimit-Reset"])
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_upload_bytes,
                       request_timeout_s=settings.request_timeout_s, max_in_flight=MAX_IN_FLIGHT)

    @app.get("/health/live", tags=["health"], operation_id="health_live", response_model=Liveness)
    async def live() -> dict[str, str]:
        """The process is up and answering."""
        return {"status": "ok"}

    @app.get("/health/ready", tags=["health"], operation_id="health_ready", response_model=Readiness,
             responses={503: {"description": "a model is not loaded (`models-not-ready`) or this "
                                             "worker's heavy queue is full (`saturated`)"}})
    async def ready(request: Request) -> Response:
        """200 when every model is loaded and this worker can take more work; else 503 naming the
        models that are not loaded or the kinds of work whose queue is full."""
        registry: ModelRegistry = request.app.state.registry
        execution = request.app.state.execution
        status = registry.status()
        saturated = execution.saturated
        if registry.ready and not saturated:
            return JSONResponse({"status": "ready", "models": status, "gates": execution.status()})
        if not registry.ready:
            not_ready = sorted(task for task, s in status.items() if not s["ready"])
            return problem_response(request, 503, "models-not-ready",
                                    f"Not loaded: {', '.join(not_ready)}.", not_ready=not_ready,
                                    models=status, headers={"Retry-After": "10"})
        return problem_response(request, 503, "saturated",
                                f"This worker's queue is full for: {', '.join(saturated)}.",
                                saturated=saturated, gates=execution.status(),
                                headers={"Retry-After": "2"})

    @app.get("/v1/models", tags=["models"], operation_id="models_list", response_model=ModelList)
    async def list_models(request: Request) -> dict[str, Any]:
        """Every task: the version serving it, input/output spec, labels, training metrics, created
        and the limits its endpoints enforce, or why it is not loaded; and its versions: which is
        primary (answers), which shadow (predicts after the answer, logged apart) and which are
        available to pin with MODEL_VERSIONS / SHADOW_VERSIONS."""
        registry: ModelRegistry = request.app.state.registry
        models = []
        for task, slot in registry.slots.items():
            extra = {"limits": limits_for(task, settings), "versions": registry.versions(task)}
            if slot.model is not None:
                models.append({**slot.model.describe(), "ready": True, **extra})
            else:
                models.append({"name": task, "task": task, "version": slot.version, "ready": False,
                               "error": slot.error, **extra})
        return {"models": models}

    @app.get("/metrics", tags=["monitoring"], include_in_schema=False)
    async def metrics() -> Response:
        body, content_type = render_metrics()
        return Response(body, media_type=content_type)

    for s in slices:
        if s.router is not None:
            app.include_router(s.router)
    app.include_router(v2_router)
    app.include_router(monitoring_router)
    app.include_router(lifecycle_router)
    app.include_router(web_router)
    app.mount("/static", web_static, name="static")
    app.openapi = lambda: contract(app)  # type: ignore[method-assign]
    return app


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
    app.openapi_schema = schema
    return schema


app = create_app()
