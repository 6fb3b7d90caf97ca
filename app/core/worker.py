"""The gunicorn worker: uvicorn's, on its fast stack, with connections that cannot outstay their welcome.

The HTTP protocol is uvicorn's httptools one (h11 where httptools is not installed), on uvloop
when it is installed (``loop: auto``), as MLServer and LitServe run it. Each gets
:class:`ConnectionGuard`:

* **A draining shutdown.** On SIGTERM (a deploy, a dyno restart, a recycle after
  ``GUNICORN_MAX_REQUESTS``) a request in flight, or arriving on an open connection while the
  worker drains, is answered with ``Connection: close`` instead of the connection being cut, so a
  busy client's next request goes to a new connection rather than failing with a reset. The
  listening socket closes at once as before.
* **A deadline for request headers.** A connection must deliver a complete request head within
  ``HEADER_TIMEOUT_S`` of being accepted (or of its previous response): idle and trickling
  connections are closed. uvicorn only times out keep-alive connections after a response.
* **A connection cap** below the process's file limit, with room for a burst of accepts (the
  listen backlog, sized from the same limit). At the cap, a new connection replaces the connection
  that has been idle longest; when none is idle it is answered 503 and closed. The worker never
  runs out of file descriptors, so ``accept`` never fails in a loop.
* **A write deadline.** A response the client does not read for ``WRITE_TIMEOUT_S`` (the socket's
  buffers full, no progress) is abandoned and its memory freed.
* **One write per small answer** (httptools): uvicorn writes a response's head and its body with
  two system calls; :class:`HeadWithBody` holds the head and sends it with the body's first part.

The client address and scheme behind a proxy are resolved by the app
(:mod:`app.core.clients`), not by uvicorn's proxy-headers middleware.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import resource
import time
import weakref
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn_worker import UvicornWorker

from app.core.limits import (
    CONNECTIONS_RESERVED_FDS,
    HEADER_TIMEOUT_S,
    MAX_CONNECTIONS,
    WRITE_TIMEOUT_S,
)

log = logging.getLogger("app.connections")
CLOSE_HEADER = (b"connection", b"close")


def file_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


def accept_batch(files: int) -> int:
    """The listen backlog, which is also how many connections the event loop accepts at once before
    it closes any: a quarter of the file limit, at most gunicorn's 2 048."""
    return max(64, min(2048, files // 4))


def connection_cap(files: int) -> int:
    """Connections one worker keeps open: ``MAX_CONNECTIONS``, or fewer when the file limit would
    not leave room for a burst of accepts (``accept_batch``) and ``CONNECTIONS_RESERVED_FDS``
    descriptors for everything else (logs, the database): ``accept`` never fails for want of one."""
    return max(8, min(MAX_CONNECTIONS, files - CONNECTIONS_RESERVED_FDS - accept_batch(files)))


def _over_capacity_answer() -> bytes:
    body = json.dumps({
        "type": "https://problems.inference.local/too-many-connections", "title": "Service unavailable",
        "status": 503, "code": "too-many-connections",
        "detail": "This worker holds as many connections as it can; retry shortly."},
        separators=(",", ":")).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\n"
            b"retry-after: 1\r\nconnection: close\r\ncontent-length: " + str(len(body)).encode()
            + b"\r\n\r\n" + body)


OVER_CAPACITY = _over_capacity_answer()


class _Refusals:
    """Counts connections refused or closed at the cap; logs them at most once per ``interval_s``."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self.count = 0
        self.evicted = 0
        self.logged_at = 0.0

    def note(self, *, evicted: bool) -> None:
        if evicted:
            self.evicted += 1
        else:
            self.count += 1
        now = time.monotonic()
        if now - self.logged_at >= self.interval_s:
            log.warning("connection cap reached", extra={
                "cap": ConnectionGuard.cap, "refused": self.count, "idle_closed": self.evicted})
            self.logged_at = now
            self.count = self.evicted = 0


_refusals = _Refusals()


class ConnectionGuard:
    """The timeouts, the cap and the draining shutdown, over either of uvicorn's HTTP protocols.

    Shutdown is for the whole process (``draining`` is shared): a connection accepted just as the
    listener closed, and so missed by the server's ``shutdown()`` round over its connections,
    drains too."""

    draining = False
    cap = MAX_CONNECTIONS  # set per worker at start-up (connection_cap())

    # what the protocols provide
    cycle: Any
    connections: set[Any]
    transport: Any
    loop: Any
    timeout_keep_alive: float
    timeout_keep_alive_task: Any
    timeout_keep_alive_handler: Any

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._refused = False
        self._idle_since = time.monotonic()
        self._header_timer: Any = self.loop.call_later(HEADER_TIMEOUT_S, self._header_timeout)
        self._write_timer: Any = None
        if len(self.connections) > ConnectionGuard.cap and not self._make_room():
            self._refused = True
            _refusals.note(evicted=False)
            transport.write(OVER_CAPACITY)
            transport.close()
            return
        if ConnectionGuard.draining and self.timeout_keep_alive_task is None:
            self._arm_keep_alive()

    def _make_room(self) -> bool:
        """Close the connection idle the longest (no request in progress) to admit this one."""
        idle = [c for c in self.connections if c is not self and isinstance(c, ConnectionGuard)
                and c._is_idle() and not c.transport.is_closing()]
        if not idle:
            return False
        min(idle, key=lambda c: c._idle_since).transport.close()
        _refusals.note(evicted=True)
        return True

    def _is_idle(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm_keep_alive(self) -> None:
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                            self.timeout_keep_alive_handler)

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._is_idle() and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._header_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._write_timer = None
        super().connection_lost(exc)  # type: ignore[misc]

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing():
            self._idle_since = time.monotonic()
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._header_timeout)

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(WRITE_TIMEOUT_S, self._write_timeout)

    def resume_writing(self) -> None:
        super().resume_writing()  # type: ignore[misc]
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_timeout(self) -> None:
        self._write_timer = None
        # A closing transport still holds what it has not sent (close waits for the buffer to drain).
        if self.transport.get_write_buffer_size():
            log.info("response abandoned: the client read nothing", extra={
                "write_timeout_s": WRITE_TIMEOUT_S,
                "buffered_bytes": self.transport.get_write_buffer_size()})
            self.transport.abort()

    def _close_after_response(self) -> None:
        """End the connection once the response in progress is sent, and say so in it."""
        raise NotImplementedError

    def shutdown(self) -> None:
        ConnectionGuard.draining = True
        if self.cycle is not None and not self.cycle.response_complete:
            self._close_after_response()
        elif self.timeout_keep_alive_task is None and not self.transport.is_closing():
            # Connected but nothing sent yet: give it the keep-alive timeout, as after a response.
            self._arm_keep_alive()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)  # type: ignore[misc]  # cancels the keep-alive timer
        if self.draining and self._is_idle() and self.timeout_keep_alive_task is None \
                and not self.transport.is_closing():
            # Bytes of a request that is not complete yet (slow headers): keep the timer running.
            self._arm_keep_alive()


class GuardedH11Protocol(ConnectionGuard, H11Protocol):
    def _close_after_response(self) -> None:
        self.cycle.keep_alive = False
        if not self.cycle.response_started and CLOSE_HEADER not in self.cycle.scope["headers"]:
            # uvicorn's h11 protocol adds "Connection: close" to a response whose request carried it
            self.cycle.scope["headers"].append(CLOSE_HEADER)

    def handle_events(self) -> None:
        super().handle_events()
        if self.draining and not self._is_idle():
            self._close_after_response()


class HeadWithBody:
    """The connection's transport as one response cycle sees it: the status line and headers are
    held and sent with the body's first part in one write (one system call, and one packet for a
    small answer). A body that does not follow in the same turn of the event loop (a stream that
    waits for its first part) gets the head sent at the end of that turn; a body part over
    ``JOIN_MAX`` bytes is written after the head rather than copied onto it; the head of an answer
    to ``HEAD``, which has no body, is written at once. The cycle is held weakly: uvicorn frees each
    cycle as soon as its request is done, and this adds no reference cycle."""

    JOIN_MAX = 64 * 1024
    __slots__ = ("_cycle", "_head", "_loop", "_transport")

    def __init__(self, transport: Any, cycle: Any, loop: Any) -> None:
        self._transport, self._loop = transport, loop
        self._cycle: Any = weakref.ref(cycle)  # None once the head has gone by
        self._head: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._cycle is not None:
            cycle = self._cycle()
            if cycle is not None and cycle.response_started:  # the head (a 100 Continue is written before)
                self._cycle = None
                if cycle.scope["method"] != "HEAD":
                    self._head = data
                    self._loop.call_soon(self._send_head)
                    return
        head, self._head = self._head, None
        if head is None:
            self._transport.write(data)
        elif len(data) <= self.JOIN_MAX:
            self._transport.write(head + data)
        else:
            self._transport.write(head)
            self._transport.write(data)

    def _send_head(self) -> None:
        head, self._head = self._head, None
        if head is not None and not self._transport.is_closing():
            self._transport.write(head)

    def close(self) -> None:
        self._send_head()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:  # the rest of the transport's interface, as it is
        return getattr(self._transport, name)


if importlib.util.find_spec("httptools") is not None:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttpToolsProtocol(ConnectionGuard, HttpToolsProtocol):
        def _close_after_response(self) -> None:
            self.cycle.keep_alive = False  # the response then carries "Connection: close"

        def on_headers_complete(self) -> None:
            previous = self.cycle
            super().on_headers_complete()
            if self.cycle is not previous:  # a new request (not an upgrade)
                self.cycle.transport = HeadWithBody(self.transport, self.cycle, self.loop)
            if self.draining and not self._is_idle():
                self._close_after_response()

    PROTOCOL: type[ConnectionGuard] = GuardedHttpToolsProtocol
else:  # pragma: no cover - httptools is in the serving requirements
    PROTOCOL = GuardedH11Protocol


class _OncePerInterval(logging.Filter):
    """Lets a repeating error through once per ``interval_s`` (the event loop's accept() failures
    at the file limit would otherwise be logged on every attempt)."""

    def __init__(self, message: str, interval_s: float = 60.0) -> None:
        super().__init__()
        self.message, self.interval_s = message, interval_s
        self.last, self.suppressed = 0.0, 0

    def filter(self, record: logging.LogRecord) -> bool:
        if self.message not in str(record.msg):
            return True
        now = time.monotonic()
        if now - self.last < self.interval_s:
            self.suppressed += 1
            return False
        record.msg = f"{record.msg} ({self.suppressed} more not logged in the last {self.interval_s:g} s)"
        self.last, self.suppressed = now, 0
        return True


class Worker(UvicornWorker):
    # proxy_headers off: the app resolves the client behind a trusted proxy itself (rightmost entry).
    CONFIG_KWARGS: dict[str, Any] = {"loop": "auto", "http": PROTOCOL, "proxy_headers": False}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Connections that never finish (a trickling client) must not hold the shutdown until
        # gunicorn's SIGKILL: stop waiting for them 3 s before it, so the lifespan shutdown
        # (the prediction log's last flush) still runs.
        self.config.timeout_graceful_shutdown = max(1, self.cfg.graceful_timeout - 3)

    def init_process(self) -> None:
        files = file_limit()
        ConnectionGuard.cap = connection_cap(files)
        self.config.backlog = accept_batch(files)
        logging.getLogger("asyncio").addFilter(_OncePerInterval("out of system resource"))
        super().init_process()
