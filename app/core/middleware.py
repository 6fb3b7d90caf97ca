"""Request context as one pure ASGI middleware: request id, deadline, limits, errors, access log.

Pure ASGI (not BaseHTTPMiddleware) so streaming bodies are counted as they arrive: a body over
MAX_UPLOAD_MB is refused with 413 from the Content-Length alone when there is one, and otherwise as
soon as the running count passes the limit, whatever the route then does with the read error.

Request ids are issued by the server: 12 hex digits of the arrival time in milliseconds and 80
random bits, unguessable, so the id returned with a prediction is the client's key to that
prediction (feedback, erasure) and nobody else's. A client's own ``X-Request-ID`` is a correlation
id: it is logged and echoed as ``X-Correlation-ID``, never used as a key.

Anything a route raises that is not a problem is logged as one JSON line with the request id and
its traceback, and answered with a 500 problem; it never reaches the server's own text log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.errors import PROBLEM_MEDIA_TYPE, is_v2, problem_body, v2_error
from app.core.execution import Deadline
from app.core.logging import info_with_fields
from app.monitoring.metrics import observe_request

access_log = logging.getLogger("app.access")
error_log = logging.getLogger("app.errors")
_VALID_CORRELATION_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
REQUEST_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
_UNLIMITED_PATHS = ("/health/", "/metrics")


class _Entropy:
    """Random bytes from the operating system's CSPRNG (``os.urandom``, as ``secrets`` uses), read
    4 KiB at a time: one system call per 400 request ids instead of one each. Dropped in a forked
    child (a gunicorn worker), so no two processes ever hand out the same bytes."""

    SIZE = 4096

    def __init__(self) -> None:
        self.pool, self.used = b"", 0
        self.lock = threading.Lock()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.pool, self.used = b"", 0

    def take(self, n: int) -> bytes:
        with self.lock:
            if self.used + n > len(self.pool):
                self.pool, self.used = os.urandom(self.SIZE), 0
            start = self.used
            self.used += n
            return self.pool[start:start + n]


_entropy = _Entropy()


def new_request_id() -> str:
    """32 hex digits: the arrival time in milliseconds (12) and 80 random bits (20)."""
    return f"{time.time_ns() // 1_000_000:012x}{_entropy.take(10).hex()}"


def request_id_age_s(request_id: str) -> float | None:
    """Seconds since a server-issued request id was made; ``None`` for anything else."""
    if not REQUEST_ID_PATTERN.match(request_id):
        return None
    return time.time() - int(request_id[:12], 16) / 1000.0


class BodyTooLarge(Exception):
    pass


class UploadTimeout(Exception):
    """The client did not finish sending its body before the request's deadline (a trickled upload)."""


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, request_timeout_s: float,
                 max_in_flight: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.request_timeout_s = request_timeout_s
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.limit_detail = (f"The request body is larger than the {max_body_bytes / 1048576:g} MiB "
                             "limit (MAX_UPLOAD_MB).")
        self.timeout_detail = (f"The request body did not arrive within {request_timeout_s:g} s "
                               "(REQUEST_TIMEOUT_S); send it at once, or retry on a better connection.")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        client_id, declared = "", None  # the two request headers read here (the last of each)
        for name, value in scope["headers"]:
            name = name.lower()
            if name == b"x-request-id":
                client_id = value.decode("latin-1")
            elif name == b"content-length":
                declared = value.decode("latin-1")
        request_id = new_request_id()
        correlation_id = client_id if _VALID_CORRELATION_ID.match(client_id) else None
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["correlation_id"] = correlation_id
        state["deadline"] = Deadline(self.request_timeout_s)
        id_headers = [(b"x-request-id", request_id.encode())]
        if correlation_id:
            id_headers.append((b"x-correlation-id", correlation_id.encode()))

        counters: dict[str, Any] = {"in": 0, "out": 0, "status": 500, "started": False, "refused": None}

        async def send_problem(status: int, code: str, detail: str,
                               extra_headers: dict[str, str] | None = None) -> None:
            extra_headers = extra_headers or {}
            media_type = PROBLEM_MEDIA_TYPE
            if is_v2(str(scope.get("path", ""))):
                status, document = v2_error(status, code, detail)
                media_type = "application/json"
            else:
                document = problem_body(status, code, detail, request_id=request_id,
                                        instance=scope.get("path"))
            body = json.dumps(document, separators=(",", ":")).encode()
            state["error_code"] = code
            counters.update(status=status, started=True, out=len(body))
            await send({"type": "http.response.start", "status": status, "headers": [
                (b"content-type", media_type.encode()),
                (b"content-length", str(len(body)).encode()), (b"connection", b"close"),
                *id_headers, *[(k.lower().encode(), v.encode()) for k, v in extra_headers.items()]]})
            await send({"type": "http.response.body", "body": body})

        limit_detail, timeout_detail = self.limit_detail, self.timeout_detail
        deadline: Deadline = state["deadline"]
        body_done = False
        # A body trickled in byte by byte must not hold the request past its deadline: one timer
        # per request (not an asyncio.timeout per message), armed at the first read, which cancels
        # the task reading the body only while it waits for more of it.
        timer: asyncio.TimerHandle | None = None
        receiving: asyncio.Task | None = None  # the task waiting in receive() for the body
        timed_out = False

        def upload_deadline() -> None:
            nonlocal timed_out
            if receiving is not None and not body_done:
                timed_out = True
                receiving.cancel()

        async def receive_counted() -> Message:
            nonlocal body_done, receiving, timer
            if body_done:  # afterwards the app only waits for a disconnect: no timeout there
                return await receive()
            if timer is None:
                timer = asyncio.get_running_loop().call_later(max(deadline.remaining(), 0.0),
                                                              upload_deadline)
            receiving = asyncio.current_task()
            try:
                message = await receive()
            except asyncio.CancelledError:
                if not timed_out or receiving is None:
                    raise
                receiving.uncancel()
                counters["refused"] = "timeout"
                raise UploadTimeout() from None
            finally:
                receiving = None
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                counters["in"] += len(message.get("body", b""))
                if counters["in"] > self.max_body_bytes:
                    counters["refused"] = "too_large"
                    raise BodyTooLarge()
            else:
                body_done = True
            if body_done:
                timer.cancel()
            return message

        async def refuse_body() -> None:
            if counters["started"]:
                return
            if counters["refused"] == "timeout":
                await send_problem(408, "upload-timeout", timeout_detail)
            else:
                await send_problem(413, "payload-too-large", limit_detail)

        async def send_with_id(message: Message) -> None:
            if counters["refused"]:  # the app reacted to the read error; answer 413/408 instead
                await refuse_body()
                return
            if message["type"] == "http.response.start":
                counters["status"] = message["status"]
                counters["started"] = True
                message["headers"] = [*message.get("headers", []), *id_headers]
            elif message["type"] == "http.response.body":
                counters["out"] += len(message.get("body", b""))
            await send(message)

        limited = not str(scope.get("path", "")).startswith(_UNLIMITED_PATHS)
        try:
            if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                await send_problem(413, "payload-too-large", limit_detail)
                return
            if limited and self.in_flight >= self.max_in_flight:
                await send_problem(503, "overloaded", f"This worker is answering {self.in_flight} "
                                   "requests, the most it takes at once; retry shortly.",
                                   {"Retry-After": "2"})
                return
            self.in_flight += limited
            try:
                await self.app(scope, receive_counted, send_with_id)
            except (BodyTooLarge, UploadTimeout):
                await refuse_body()
            except Exception:
                if counters["refused"]:  # the app turned the read error into another one
                    await refuse_body()
                    return
                error_log.exception("unhandled error", extra={
                    "request_id": request_id, "method": scope.get("method"), "path": scope.get("path")})
                if not counters["started"]:
                    await send_problem(500, "internal-error", "The server failed to handle this "
                                       "request; quote the request id.")
            finally:
                self.in_flight -= limited
        finally:
            if timer is not None:
                timer.cancel()
            self._log(scope, state, counters, started)

    @staticmethod
    def _log(scope: Scope, state: dict[str, Any], counters: dict[str, Any], started: float) -> None:
        seconds = time.perf_counter() - started
        route = scope.get("route")
        route_path = getattr(route, "path", None) or "unmatched"
        model = state.get("model_name", "")
        observe_request(route_path, scope["method"], counters["status"], model, seconds)
        info_with_fields(access_log, "request", {
            "request_id": state.get("request_id"),
            "correlation_id": state.get("correlation_id"),
            "method": scope["method"],
            "client": (scope.get("client") or (None,))[0],
            "route": route_path,
            "path": scope.get("path"),
            "status": counters["status"],
            "latency_ms": round(seconds * 1000, 2),
            "request_bytes": counters["in"],
            "response_bytes": counters["out"],
            "model": model or None,
            "model_version": state.get("model_version"),
            "error": state.get("error_code"),
        })
