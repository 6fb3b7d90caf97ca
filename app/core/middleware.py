"""Request context as one pure ASGI middleware: request id, body-size limit, access log, metrics.

Pure ASGI (not BaseHTTPMiddleware) so streaming bodies are counted as they arrive: a body over
MAX_UPLOAD_MB is refused with 413 from the Content-Length alone when there is one, and otherwise as
soon as the running count passes the limit, whatever the route then does with the read error.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.errors import PROBLEM_MEDIA_TYPE, problem_body
from app.monitoring.metrics import observe_request

access_log = logging.getLogger("app.access")
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class BodyTooLarge(Exception):
    pass


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        client_id = headers.get("x-request-id", "")
        request_id = client_id if _VALID_REQUEST_ID.match(client_id) else uuid.uuid4().hex
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        id_header = (b"x-request-id", request_id.encode())

        counters = {"in": 0, "out": 0, "status": 500, "started": False, "too_large": False}

        async def send_problem(status: int, code: str, detail: str) -> None:
            body = json.dumps(problem_body(status, code, detail, request_id=request_id,
                                           instance=scope.get("path")),
                              separators=(",", ":")).encode()
            state["error_code"] = code
            counters.update(status=status, started=True, out=len(body))
            await send({"type": "http.response.start", "status": status, "headers": [
                (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
                (b"content-length", str(len(body)).encode()), (b"connection", b"close"), id_header]})
            await send({"type": "http.response.body", "body": body})

        limit_detail = (f"The request body is larger than the {self.max_body_bytes / 1048576:g} MiB "
                        "limit (MAX_UPLOAD_MB).")

        async def receive_counted() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                counters["in"] += len(message.get("body", b""))
                if counters["in"] > self.max_body_bytes:
                    counters["too_large"] = True
                    raise BodyTooLarge()
            return message

        async def send_with_id(message: Message) -> None:
            if counters["too_large"]:  # the app reacted to the read error; answer 413 instead
                if not counters["started"]:
                    await send_problem(413, "payload-too-large", limit_detail)
                return
            if message["type"] == "http.response.start":
                counters["status"] = message["status"]
                counters["started"] = True
                message["headers"] = [*message.get("headers", []), id_header]
            elif message["type"] == "http.response.body":
                counters["out"] += len(message.get("body", b""))
            await send(message)

        try:
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                await send_problem(413, "payload-too-large", limit_detail)
                return
            try:
                await self.app(scope, receive_counted, send_with_id)
            except BodyTooLarge:
                if not counters["started"]:
                    await send_problem(413, "payload-too-large", limit_detail)
        finally:
            self._log(scope, state, counters, started)

    @staticmethod
    def _log(scope: Scope, state: dict[str, Any], counters: dict[str, Any], started: float) -> None:
        seconds = time.perf_counter() - started
        route = scope.get("route")
        route_path = getattr(route, "path", None) or "unmatched"
        model = state.get("model_name", "")
        observe_request(route_path, scope["method"], counters["status"], model, seconds)
        access_log.info("request", extra={
            "request_id": state.get("request_id"),
            "method": scope["method"],
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
