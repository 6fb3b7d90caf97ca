"""Request context as one pure ASGI middleware: request id, deadline, limits, errors, access log.

Pure ASGI (not BaseHTTPMiddleware) so streaming bodies are counted as they arrive: a body over
MAX_UPLOAD_MB is refused with 413 from the Content-Length alone when there is one, and otherwise as
soon as the running count passes the limit, whatever the route then does with the read error.

Request ids are issued by the server: 12 hex digits of the arrival time in milliseconds, 40 random
bits and a 40-bit tag (HMAC-SHA256 of the rest under ``REQUEST_ID_SECRET``), unguessable, so the id
returned with a prediction is the client's key to that prediction (feedback, erasure) and nobody
else's; the tag tells the service's own fresh ids from made-up ones without a database lookup. A
client's own ``X-Request-ID`` is a correlation id: it is logged and echoed as ``X-Correlation-ID``,
never used as a key.

Behind a trusted proxy (``FORWARDED_ALLOW_IPS``) the client's address comes from the entry the proxy
appended to ``X-Forwarded-For`` (:mod:`app.core.clients`). Bodies still arriving are capped
per client and per worker (a trickling client cannot hold every place), and the bytes of the bodies
held by requests in progress are capped per worker (:class:`Uploads`).

Anything a route raises that is not a problem is logged as one JSON line with the request id and
its traceback, and answered with a 500 problem; it never reaches the server's own text log.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.clients import TrustedProxies
from app.core.events import Observers
from app.core.errors import PROBLEM_MEDIA_TYPE, is_v2, problem_body, v2_error
from app.core.execution import Deadline
from app.core.limits import BODY_BUFFER_BYTES, UPLOADS_IN_PROGRESS, UPLOADS_PER_CLIENT
from app.core.logging import info_with_fields

access_log = logging.getLogger("app.access")
error_log = logging.getLogger("app.errors")
_VALID_CORRELATION_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
REQUEST_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
_UNLIMITED_PATHS = ("/health/", "/metrics")


def _missing_page_headers(headers: list[tuple[bytes, bytes]],
                          page: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """For an HTML response: the page's security headers it does not set itself (a page with a
    policy of its own, like the API docs, keeps it); for anything else, none."""
    if not any(name == b"content-type" and value.startswith(b"text/html") for name, value in headers):
        return []
    present = {name for name, _ in headers}
    return [(name, value) for name, value in page if name not in present]


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


class _RequestIdKey:
    """The key that tags request ids: ``REQUEST_ID_SECRET`` (the same on every dyno), else one made
    by the gunicorn master before it forks (the same in every worker of this process tree).

    A tag is HMAC-SHA256 under the key, from an HMAC keyed once and copied for each tag: there is
    one request id per request, and the one-shot ``hmac.digest`` looks the digest up in OpenSSL on
    every call, which costs most where the model has just filled the CPU's caches. The HMAC is
    :mod:`hmac`'s own over hashlib's SHA-256 objects, whose copy is two hash states: given a name
    or ``hashlib.sha256`` itself, :func:`hmac.new` would make OpenSSL's HMAC instead, whose copy
    costs more; a Python function (:func:`_sha256`) keeps it on the first."""

    def __init__(self) -> None:
        self.key = os.urandom(32)

    @property
    def key(self) -> bytes:
        return self._key

    @key.setter
    def key(self, key: bytes) -> None:
        self._key = key
        self._keyed = hmac.new(key, digestmod=_sha256)

    def use(self, secret: str | None) -> None:
        if secret:
            self.key = hashlib.sha256(secret.encode()).digest()

    def tag(self, head: str) -> str:
        mac = self._keyed.copy()
        mac.update(head.encode())
        return mac.digest()[:5].hex()


def _sha256(data: bytes = b"") -> Any:
    """``hashlib.sha256`` as a plain function, for :class:`_RequestIdKey` (see there)."""
    return hashlib.sha256(data)


request_id_key = _RequestIdKey()


def new_request_id() -> str:
    """32 hex digits: the arrival time in milliseconds (12), 40 random bits (10), a 40-bit tag (10)."""
    head = f"{time.time_ns() // 1_000_000:012x}{_entropy.take(5).hex()}"
    return head + request_id_key.tag(head)


def request_id_age_s(request_id: str) -> float | None:
    """Seconds since this service issued ``request_id``; ``None`` for any id it did not issue (the
    tag does not match: made up, or issued under another REQUEST_ID_SECRET)."""
    if not REQUEST_ID_PATTERN.match(request_id):
        return None
    if not hmac.compare_digest(request_id[22:], request_id_key.tag(request_id[:22])):
        return None
    return time.time() - int(request_id[:12], 16) / 1000.0


class BodyTooLarge(Exception):
    pass


class UploadTimeout(Exception):
    """The client did not finish sending its body before the request's deadline (a trickled upload)."""


class Uploads:
    """Request bodies of one worker that are still arriving, per client and in all, and the bytes
    held by the bodies of every request in progress: what a trickling or flooding client can take."""

    def __init__(self, per_client: int = UPLOADS_PER_CLIENT, in_all: int = UPLOADS_IN_PROGRESS,
                 max_bytes: int = BODY_BUFFER_BYTES) -> None:
        self.per_client, self.in_all, self.max_bytes = per_client, in_all, max_bytes
        self.arriving: dict[str, int] = {}
        self.total = 0
        self.held = 0  # body bytes of the requests in progress

    def begin(self, client: str) -> str | None:
        """Count a body being awaited; the refusal kind when there is no room."""
        if self.arriving.get(client, 0) >= self.per_client:
            return "busy_client"
        if self.total >= self.in_all:
            return "busy_worker"
        self.arriving[client] = self.arriving.get(client, 0) + 1
        self.total += 1
        return None

    def end(self, client: str) -> None:
        left = self.arriving[client] - 1
        if left:
            self.arriving[client] = left
        else:
            del self.arriving[client]
        self.total -= 1


class RequestContext:
    """What every request of a worker shares: its limits, its trusted proxies, its counts of
    requests in progress and of bodies arriving, and the page headers for HTML answers. One per
    worker, whichever way a request enters (FastAPI's middleware or the prediction fast path)."""

    def __init__(self, max_body_bytes: int, request_timeout_s: float, max_in_flight: int,
                 proxies: TrustedProxies | None = None, uploads: Uploads | None = None,
                 html_headers: dict[str, str] | None = None, observers: Observers | None = None) -> None:
        self.max_body_bytes = max_body_bytes
        self.observers = observers or Observers()
        self.request_timeout_s = request_timeout_s
        self.max_in_flight = max_in_flight
        self.proxies = proxies or TrustedProxies.parse("127.0.0.1")
        self.uploads = uploads or Uploads()
        self.html_headers = [(k.lower().encode(), v.encode()) for k, v in (html_headers or {}).items()]
        self.in_flight = 0
        self.limit_detail = (f"The request body is larger than the {max_body_bytes / 1048576:g} MiB "
                             "limit (MAX_UPLOAD_MB).")
        self.timeout_detail = (f"The request body did not arrive within {request_timeout_s:g} s "
                               "(REQUEST_TIMEOUT_S); send it at once, or retry on a better connection.")


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, context: RequestContext) -> None:
        self.app = app
        self.context = context

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        ctx = self.context
        client_id, declared = "", None  # the request headers read here (the last of each)
        forwarded_for: list[bytes] = []
        forwarded_proto = None
        for name, value in scope["headers"]:
            name = name.lower()
            if name == b"x-request-id":
                client_id = value.decode("latin-1")
            elif name == b"content-length":
                declared = value.decode("latin-1")
            elif name == b"x-forwarded-for":
                forwarded_for.append(value)
            elif name == b"x-forwarded-proto":
                forwarded_proto = value
        peer = scope.get("client")
        if forwarded_for or forwarded_proto is not None:
            host = peer[0] if peer else None
            scope["client"] = (ctx.proxies.client(host, forwarded_for) or "unknown", peer[1] if peer else 0)
            scope["scheme"] = ctx.proxies.scheme(host, forwarded_proto, scope.get("scheme", "http"))
        client = scope["client"][0] if scope.get("client") else "unknown"
        state: dict[str, Any] = scope.setdefault("state", {})
        # A job worker sends a job's request under the request id its submission was given.
        request_id = state.get("job_request_id") or new_request_id()
        correlation_id = client_id if _VALID_CORRELATION_ID.match(client_id) else None
        state["request_id"] = request_id
        state["correlation_id"] = correlation_id
        state["deadline"] = Deadline(ctx.request_timeout_s)
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

        limit_detail, timeout_detail = ctx.limit_detail, ctx.timeout_detail
        deadline: Deadline = state["deadline"]
        uploads = ctx.uploads
        body_done = False
        arriving = False  # counted in uploads.arriving (the body is being awaited)
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

        def body_arrived() -> None:
            nonlocal arriving
            if arriving:
                uploads.end(client)
                arriving = False

        async def receive_counted() -> Message:
            nonlocal body_done, receiving, timer, arriving
            if body_done:  # afterwards the app only waits for a disconnect: no timeout there
                return await receive()
            if timer is None:
                timer = asyncio.get_running_loop().call_later(max(deadline.remaining(), 0.0),
                                                              upload_deadline)
                # Counted while the body is awaited: a body already received is taken and counted
                # off again without a pause, so only bodies still on the wire hold a place.
                refusal = uploads.begin(client)
                if refusal is not None:
                    counters["refused"] = refusal
                    raise BodyTooLarge()
                arriving = True
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
                size = len(message.get("body", b""))
                counters["in"] += size
                uploads.held += size
                if counters["in"] > ctx.max_body_bytes:
                    counters["refused"] = "too_large"
                    raise BodyTooLarge()
                if uploads.held > uploads.max_bytes:
                    counters["refused"] = "memory"
                    raise BodyTooLarge()
            else:
                body_done = True
            if body_done:
                timer.cancel()
                body_arrived()
                state["body_bytes"] = counters["in"]
            return message

        async def refuse_body() -> None:
            if counters["started"]:
                return
            refused = counters["refused"]
            if refused == "timeout":
                await send_problem(408, "upload-timeout", timeout_detail)
            elif refused == "busy_client":
                await send_problem(429, "too-many-uploads", f"This client already has "
                                   f"{uploads.per_client} request bodies arriving at once; send the "
                                   "next when one has arrived.", {"Retry-After": "1"})
            elif refused in ("busy_worker", "memory"):
                await send_problem(503, "overloaded", "This worker is receiving as many request bodies "
                                   "as it holds at once; retry shortly.", {"Retry-After": "2"})
            else:
                await send_problem(413, "payload-too-large", limit_detail)

        html_headers = ctx.html_headers

        async def send_with_id(message: Message) -> None:
            if counters["refused"]:  # the app reacted to the read error; answer the refusal instead
                await refuse_body()
                return
            if message["type"] == "http.response.start":
                counters["status"] = message["status"]
                counters["started"] = True
                headers = message.get("headers", [])
                if html_headers:
                    headers = [*headers, *_missing_page_headers(headers, html_headers)]
                # A replayed answer (app.core.idempotency) carries the request id it was first given.
                message["headers"] = [*headers, *(id_headers if not state.get("replayed") else id_headers[1:])]
            elif message["type"] == "http.response.body":
                counters["out"] += len(message.get("body", b""))
            await send(message)

        limited = not str(scope.get("path", "")).startswith(_UNLIMITED_PATHS)
        try:
            if declared is not None and declared.isdigit():
                if int(declared) > ctx.max_body_bytes:
                    await send_problem(413, "payload-too-large", limit_detail)
                    return
                if int(declared) + uploads.held > uploads.max_bytes:
                    await send_problem(503, "overloaded", "This worker holds as many request bodies as "
                                       "it can; retry shortly.", {"Retry-After": "2"})
                    return
            if limited and ctx.in_flight >= ctx.max_in_flight:
                await send_problem(503, "overloaded", f"This worker is answering {ctx.in_flight} "
                                   "requests, the most it takes at once; retry shortly.",
                                   {"Retry-After": "2"})
                return
            ctx.in_flight += limited
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
                ctx.in_flight -= limited
        finally:
            if timer is not None:
                timer.cancel()
            body_arrived()
            uploads.held -= counters["in"]
            self._log(scope, state, counters, started, ctx.observers)

    @staticmethod
    def _log(scope: Scope, state: dict[str, Any], counters: dict[str, Any], started: float,
             observers: Observers) -> None:
        seconds = time.perf_counter() - started
        route = scope.get("route")
        route_path = getattr(route, "path", None) or "unmatched"
        model = state.get("model_name", "")
        observers.request_done(route_path, scope["method"], counters["status"], model, seconds)
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
