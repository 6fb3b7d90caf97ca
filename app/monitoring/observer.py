"""The monitoring's side of the core's events (:mod:`app.core.events`): request metrics for every
request, and the prediction log (with its metrics) for predictions and shadow predictions.
Registered by the app factory; the core never imports it."""

from __future__ import annotations

import contextvars
from collections.abc import Mapping, Sequence
from typing import Any

from app.monitoring.metrics import SHADOW_DROPPED, SHADOW_PREDICTIONS, labelled, observe_request

# The index of a request's first instance within its batch: a job worker sends a large batch job
# as requests of the synchronous size and sets this for each, so the log numbers the job's
# instances 0..N-1 under its one request id (as feedback names them). 0 for any other request.
INSTANCE_OFFSET: contextvars.ContextVar[int] = contextvars.ContextVar("instance_offset", default=0)


class MonitoringObserver:
    def __init__(self, state: Any) -> None:
        self.state = state  # the app's state: its prediction_log is set once the lifespan has started


    def on_request_done(self, route: str, method: str, status: int, model: str, seconds: float) -> None:
        observe_request(route, method, status, model, seconds)

    def on_predictions(self, request_id: str, model: str, version: str, rows: Sequence[Mapping[str, Any]],
                       latency_ms: float, raw_inputs: Sequence[bytes] | None,
                       client_version: str | None = None) -> int:
        """One row per instance (``{"prediction", "confidence", "features"}``, in instance order, so
        feedback can name ``request_id`` + ``index``); never blocks or raises. Returns how many raw
        inputs will be kept (none: not consented, STORE_INPUTS=never, too large, or the buffer holds
        as many inputs as it may)."""
        store = getattr(self.state, "prediction_log", None)
        if store is None:
            return 0
        return store.enqueue(request_id, model, version, rows, latency_ms, raw_inputs, client_version,
                             INSTANCE_OFFSET.get()).inputs

    def on_shadow(self, request_id: str, model: str, version: str, rows: Sequence[Mapping[str, Any]],
                  latency_ms: float) -> None:
        store = getattr(self.state, "prediction_log", None)
        if store is not None:
            store.enqueue_shadow(request_id, model, version, rows, latency_ms, INSTANCE_OFFSET.get())
        labelled(SHADOW_PREDICTIONS, model, version).inc()

    def on_shadow_dropped(self, model: str, reason: str) -> None:
        labelled(SHADOW_DROPPED, model, reason).inc()


class DurableMonitoringObserver(MonitoringObserver):
    """LOG_DURABLE: a prediction is answered once its rows are written (the writer flushes at once)."""

    def __init__(self, state: Any) -> None:
        super().__init__(state)
        self.pending: dict[str, int] = {}  # request id -> the sequence number of its last row

    def on_predictions(self, request_id: str, model: str, version: str, rows: Sequence[Mapping[str, Any]],
                       latency_ms: float, raw_inputs: Sequence[bytes] | None,
                       client_version: str | None = None) -> int:
        store = getattr(self.state, "prediction_log", None)
        if store is None:
            return 0
        enqueued = store.enqueue(request_id, model, version, rows, latency_ms, raw_inputs, client_version,
                                 INSTANCE_OFFSET.get())
        # rows the buffer refused (full) cannot be made durable: -1 answers the settle with False
        self.pending[request_id] = enqueued.seq if enqueued == len(rows) else -1
        return enqueued.inputs

    async def on_settle(self, request_id: str, timeout_s: float) -> bool:
        seq = self.pending.pop(request_id, None)
        store = getattr(self.state, "prediction_log", None)
        if seq is None or store is None:
            return True  # nothing was taken: nothing to wait for
        return seq >= 0 and await store.written(seq, timeout_s)
