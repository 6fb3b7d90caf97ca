"""Prometheus metrics (prometheus-client), multiprocess-aware.

Under gunicorn each worker is its own process, so ``gunicorn.conf.py`` points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before the workers fork and marks dead workers;
``GET /metrics`` then aggregates every worker's files with ``MultiProcessCollector``. Without that
variable (unit tests, a plain ``uvicorn`` run) the default in-process registry is served.

Every sample carries the instance's name in a ``dyno`` label when ``DYNO`` is set (Heroku sets it:
``web.1``, ``web.2``...), so whoever scrapes or receives the metrics can tell the dynos apart.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Metric,
    generate_latest,
)
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0)

REQUESTS = Counter("http_requests_total", "HTTP requests by route, method, status and model",
                   ["route", "method", "status", "model"])
REQUEST_LATENCY = Histogram("http_request_duration_seconds", "Request latency by route and model",
                            ["route", "method", "model"], buckets=LATENCY_BUCKETS)
PREDICTIONS = Counter("predictions_total", "Predictions served, by model, version and predicted class",
                      ["model", "version", "prediction"])
INFERENCE_LATENCY = Histogram("inference_duration_seconds",
                              "Handler time per request as told to the prediction log (decode, "
                              "preprocess, model)",
                              ["model"], buckets=LATENCY_BUCKETS)
DRIFT_SCORE = Gauge("model_drift_score", "Largest drift score (PSI) over the model's features in the "
                    "current window", ["model"], multiprocess_mode="mostrecent")
DRIFT_DETECTED = Gauge("model_drift_detected", "1 if the model's drift status is 'drift'", ["model"],
                       multiprocess_mode="mostrecent")
LOG_WRITE_FAILURES = Counter("prediction_log_write_failures_total",
                             "Failed attempts to write buffered prediction-log rows")
LOG_ROWS_WRITTEN = Counter("prediction_log_rows_written_total", "Prediction-log rows written")
LOG_ROWS_DROPPED = Counter("prediction_log_rows_dropped_total",
                           "Prediction-log rows dropped because the bounded buffer was full")
LOG_BUFFERED = Gauge("prediction_log_buffered_rows", "Rows waiting in this worker's log buffer",
                     multiprocess_mode="livesum")
INPUTS_STORED = Counter("prediction_inputs_stored_total",
                        "Consented raw inputs kept in the prediction log, by model", ["model"])
INPUTS_NOT_STORED = Counter("prediction_inputs_not_stored_total",
                            "Consented raw inputs not kept, by model and reason (too-large)",
                            ["model", "reason"])
LOG_ROWS_PURGED = Counter("prediction_log_rows_purged_total",
                          "Prediction-log rows deleted past LOG_RETENTION_DAYS")
INPUTS_PURGED = Counter("prediction_inputs_purged_total", "Stored inputs deleted past INPUT_RETENTION_DAYS")
SHADOW_PREDICTIONS = Counter("shadow_predictions_total", "Requests predicted by a shadow version",
                             ["model", "version"])
SHADOW_DROPPED = Counter("shadow_dropped_total", "Requests not shadowed, by reason (queue-full, error)",
                         ["model", "reason"])


@functools.lru_cache(maxsize=4096)
def labelled(metric: Any, *values: str) -> Any:
    """``metric.labels(*values)``, remembered: the request path asks for the same few children on
    every request, and prometheus-client validates and locks on each ``labels`` call. Bounded;
    one past the bound only costs a ``labels`` call again."""
    return metric.labels(*values)


def observe_request(route: str, method: str, status: int, model: str, seconds: float) -> None:
    labelled(REQUESTS, route, method, str(status), model).inc()
    labelled(REQUEST_LATENCY, route, method, model).observe(seconds)


def instance_labels() -> dict[str, str]:
    """Labels naming this instance on every sample: ``dyno`` from ``DYNO``, when it is set."""
    dyno = os.environ.get("DYNO", "").strip()
    return {"dyno": dyno} if dyno else {}


class Labelled(Collector):
    """Another collector's metrics with constant labels added to every sample."""

    def __init__(self, source: Collector, labels: dict[str, str]) -> None:
        self.source = source
        self.labels = labels

    def collect(self):  # type: ignore[no-untyped-def]
        for family in self.source.collect():
            labelled_family = Metric(family.name, family.documentation, family.type, family.unit)
            labelled_family.samples = [sample._replace(labels={**sample.labels, **self.labels})
                                       for sample in family.samples]
            yield labelled_family


def exposition_registry() -> Collector:
    """What ``GET /metrics`` and the metrics pusher send: every worker's metrics under gunicorn
    (``PROMETHEUS_MULTIPROC_DIR``), this process's otherwise, with :func:`instance_labels`."""
    source: Collector = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        source = multiprocess.MultiProcessCollector(None)
    labels = instance_labels()
    if not labels and source is REGISTRY:
        return REGISTRY
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Labelled(source, labels) if labels else source)
    return registry


def render_metrics() -> tuple[bytes, str]:
    """The exposition text for ``GET /metrics`` and its content type."""
    return generate_latest(exposition_registry()), CONTENT_TYPE_LATEST
