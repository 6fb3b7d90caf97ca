"""Entry point the task routers call to record predictions (implemented by the monitoring slice)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import Request

from app.core.registry import ServedModel


def log_predictions(request: Request, model: ServedModel, rows: Sequence[Mapping[str, Any]], *,
                    latency_ms: float, raw_inputs: Sequence[bytes] | None = None) -> None:
    """Queue one prediction-log row per instance; never blocks or raises on the request path.

    Each row: ``{"prediction": str, "confidence": float | None, "features": {name: float}}``, in
    instance order (the instance index is stored, so feedback can name ``request_id`` + ``index``).
    ``raw_inputs`` are stored only when ``STORE_INPUTS=true``.
    """
    store = getattr(request.app.state, "prediction_log", None)
    if store is None:
        return
    store.enqueue(request_id=getattr(request.state, "request_id", ""), model=model.task,
                  version=model.version, rows=rows, latency_ms=latency_ms, raw_inputs=raw_inputs)
