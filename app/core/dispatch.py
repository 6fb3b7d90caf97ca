"""The fast path for prediction POSTs, composed explicitly beside FastAPI's own stack.

FastAPI wraps every request in three layers of its own before the app's middleware (a 500 page,
exception telemetry, a body-size limit) and then matches the path against every route and solves
the route's dependencies. A prediction has its own of all of that (problem+json 500s, the request
context's limits and log, :class:`~app.core.pipeline.PredictionRoutes`), so a ``POST`` to a
prediction path (v1, or V2 inference) enters :meth:`ServiceApp.fast_path`: the same middleware
classes FastAPI runs, in the same order, sharing the worker's one
:class:`~app.core.middleware.RequestContext` (one in-flight count, one upload count). Every other
request goes through FastAPI as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from app.core.middleware import RequestContext, RequestContextMiddleware
from app.core.pipeline import Endpoint, PathRoute, PredictionRoutes


async def _not_a_prediction(scope: Scope, receive: Receive, send: Send) -> None:  # pragma: no cover
    raise RuntimeError("the fast path is entered for prediction paths only")


class ServiceApp(FastAPI):
    """FastAPI, with prediction POSTs dispatched on :attr:`fast_path` (see the module)."""

    fast_path: ASGIApp | None = None
    fast_routes: PredictionRoutes | None = None

    def add_fast_path(self, context: RequestContext, endpoints: list[Endpoint],
                      patterns: tuple[PathRoute, ...],
                      wrap: Callable[[ASGIApp], ASGIApp] = lambda app: app) -> None:
        """The prediction routes inside ``wrap`` (CORS, when configured) inside the request context:
        what FastAPI's stack runs for a prediction, minus the framework's own layers."""
        self.fast_routes = PredictionRoutes(_not_a_prediction, endpoints, patterns)
        self.fast_path = RequestContextMiddleware(wrap(self.fast_routes), context)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (self.fast_path is not None and scope["type"] == "http" and scope["method"] == "POST"
                and self.fast_routes is not None and self.fast_routes.find(scope["path"]) is not None):
            if self.root_path:
                scope["root_path"] = self.root_path
            scope["app"] = self
            await self.fast_path(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def cors_wrapper(settings: Any) -> Callable[[ASGIApp], ASGIApp]:
    """CORS around the prediction routes, as ``create_app`` adds it to FastAPI's stack."""
    from fastapi.middleware.cors import CORSMiddleware

    def wrap(app: ASGIApp) -> ASGIApp:
        if not settings.cors_origins:
            return app
        return CORSMiddleware(app, **cors_options(settings))

    return wrap


def cors_options(settings: Any) -> dict[str, Any]:
    return {"allow_origins": settings.cors_origins, "allow_methods": ["GET", "POST", "DELETE"],
            "allow_headers": ["*"],
            "expose_headers": ["X-Request-ID", "X-Correlation-ID", "X-Model-Version", "X-Inputs-Stored",
                               "Server-Timing", "Retry-After", "RateLimit-Limit", "RateLimit-Remaining",
                               "RateLimit-Reset"]}
