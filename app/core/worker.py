"""The gunicorn worker: uvicorn's, with a shutdown that drains keep-alive connections.

uvicorn's graceful shutdown (SIGTERM on a deploy or a dyno restart, or a recycle after
``GUNICORN_MAX_REQUESTS``) lets in-flight requests finish but cuts every idle keep-alive connection at
once. A busy client has its next request on the wire at that moment on most of them, and those
requests fail with "connection reset" although no one refused them (measured: 39 of 6 000 digit
requests at concurrency 8 lost to five recycles with two workers).

Here shutdown stops keeping connections alive instead of cutting them: a request already in flight,
or arriving on an open connection while the worker drains, is answered with ``Connection: close``,
and an idle connection is closed by its usual keep-alive timeout (gunicorn's ``keepalive``, 5 s).
The client learns from the response that the connection ends, and its next request opens a new one
(to another worker, or to the replacement). The listening socket is closed at once as before.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle
from uvicorn_worker import UvicornWorker

CLOSE_HEADER = (b"connection", b"close")


def _close_after(cycle: RequestResponseCycle) -> None:
    """End the connection once this response is sent, and say so in the response."""
    cycle.keep_alive = False
    if not cycle.response_started and CLOSE_HEADER not in cycle.scope["headers"]:
        # uvicorn adds "Connection: close" to a response whose request carried it
        cycle.scope["headers"].append(CLOSE_HEADER)


class DrainingH11Protocol(H11Protocol):
    # Shutdown is for the whole process: a connection accepted just as the listener closed, and so
    # missed by the server's shutdown() round over its connections, drains too (measured: such a
    # connection kept a busy client served until the graceful timeout cancelled its requests).
    draining = False

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if DrainingH11Protocol.draining and self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)

    def shutdown(self) -> None:
        DrainingH11Protocol.draining = True
        if self.cycle is not None and not self.cycle.response_complete:
            _close_after(self.cycle)
        elif self.timeout_keep_alive_task is None and not self.transport.is_closing():
            # Connected but nothing sent yet: give it the keep-alive timeout, as after a response.
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)

    def handle_events(self) -> None:
        super().handle_events()
        if self.draining and self.cycle is not None and not self.cycle.response_complete:
            _close_after(self.cycle)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # cancels the keep-alive timer
        idle = self.cycle is None or self.cycle.response_complete
        if self.draining and idle and self.timeout_keep_alive_task is None and not self.transport.is_closing():
            # Bytes of a request that is not complete yet (slow headers): keep the timer running.
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)


class Worker(UvicornWorker):
    CONFIG_KWARGS: dict[str, Any] = {"loop": "auto", "http": DrainingH11Protocol}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Connections that never finish (a trickling client) must not hold the shutdown until
        # gunicorn's SIGKILL: stop waiting for them 3 s before it, so the lifespan shutdown
        # (the prediction log's last flush) still runs.
        self.config.timeout_graceful_shutdown = max(1, self.cfg.graceful_timeout - 3)
