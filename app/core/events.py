"""What the core tells whoever listens: requests answered, predictions made, shadow predictions.

The core never imports a metrics backend or the prediction log (compare LitServe's callbacks): it
calls :class:`Observers`, and the monitoring registers itself there when the app is created. An
observer implements any of the ``on_*`` methods below; one that raises is logged and skipped, and
never fails the request (or the other observers).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

log = logging.getLogger("app.events")


class Observer(Protocol):
    """The events, each optional. Times are seconds or milliseconds as named."""

    def on_request_done(self, route: str, method: str, status: int, model: str, seconds: float) -> None:
        """Every HTTP request, once answered (the route template, or ``unmatched``)."""

    def on_predictions(self, request_id: str, model: str, version: str, rows: Sequence[Mapping[str, Any]],
                       latency_ms: float, raw_inputs: Sequence[bytes] | None, client_version: str | None) -> int:
        """One prediction request's rows (one per instance: prediction, confidence, features),
        when the client consented its raw inputs, and the client's release (X-Client-Version,
        bounded); returns how many of those inputs it keeps."""
        return 0

    async def on_settle(self, request_id: str, timeout_s: float) -> bool:
        """Return once what ``on_predictions`` took for ``request_id`` is durable (an observer that
        promises durability: the prediction log with LOG_DURABLE); False if it could not be made
        so within ``timeout_s``. The answer is sent only after every such observer returns True."""
        return True

    def on_shadow(self, request_id: str, model: str, version: str, rows: Sequence[Mapping[str, Any]],
                  latency_ms: float) -> None:
        """What a shadow version predicted for an answered request."""

    def on_shadow_dropped(self, model: str, reason: str) -> None:
        """A request not shadowed: ``queue-full`` or ``error``."""


EVENTS = ("on_request_done", "on_predictions", "on_settle", "on_shadow", "on_shadow_dropped")


class Observers:
    """The registered observers, per event (only those that implement it are called)."""

    def __init__(self) -> None:
        self._by_event: dict[str, list[Any]] = {event: [] for event in EVENTS}

    def add(self, observer: object) -> None:
        for event in EVENTS:
            method = getattr(observer, event, None)
            if method is not None:
                self._by_event[event].append(method)

    def _failed(self, event: str, method: Any) -> None:
        log.exception("observer failed", extra={"event": event, "observer": getattr(method, "__qualname__", "?")})

    def request_done(self, route: str, method: str, status: int, model: str, seconds: float) -> None:
        for call in self._by_event["on_request_done"]:
            try:
                call(route, method, status, model, seconds)
            except Exception:
                self._failed("on_request_done", call)

    def predictions(self, request_id: str, model: str, version: str, rows: Sequence[Mapping[str, Any]],
                    latency_ms: float, raw_inputs: Sequence[bytes] | None, client_version: str | None = None) -> int:
        """How many raw inputs are kept: the most any observer keeps (the prediction log)."""
        kept = 0
        for call in self._by_event["on_predictions"]:
            try:
                kept = max(kept, int(call(request_id, model, version, rows, latency_ms, raw_inputs,
                                          client_version) or 0))
            except Exception:
                self._failed("on_predictions", call)
        return kept

    @property
    def settles(self) -> bool:
        """Whether any observer must make predictions durable before they are answered."""
        return bool(self._by_event["on_settle"])

    async def settle(self, request_id: str, timeout_s: float) -> bool:
        for call in self._by_event["on_settle"]:
            try:
                if not await call(request_id, timeout_s):
                    return False
            except Exception:
                self._failed("on_settle", call)
                return False
        return True

    def shadow(self, request_id: str, model: str, version: str, rows: Sequence[Mapping[str, Any]],
               latency_ms: float) -> None:
        for call in self._by_event["on_shadow"]:
            try:
                call(request_id, model, version, rows, latency_ms)
            except Exception:
                self._failed("on_shadow", call)

    def shadow_dropped(self, model: str, reason: str) -> None:
        for call in self._by_event["on_shadow_dropped"]:
            try:
                call(model, reason)
            except Exception:
                self._failed("on_shadow_dropped", call)
