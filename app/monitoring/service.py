"""Wiring the monitoring slice into the app: the lead's lifespan calls these two functions.

``setup_monitoring(app, settings)`` creates the engine, makes sure the schema exists (tolerating a
database that is down: the writer retries), starts the prediction-log writer thread and the drift
gauge refresher, and sets ``app.state.prediction_log`` and ``app.state.monitoring``.
``shutdown_monitoring(app)`` stops both, flushing buffered rows first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from sqlalchemy import Engine

from app.core.config import Settings
from app.core.execution import BlockingCalls
from app.core.limits import (
    DB_CALL_TIMEOUT_S,
    DB_QUEUE,
    DB_THREADS,
    INPUT_PURGE_INTERVAL_S,
)
from app.monitoring.drift import Window
from app.monitoring.periodic import Periodic
from app.monitoring.store import (
    PredictionLog,
    create_schema,
    make_engine,
    purge_inputs,
    purge_rows,
)

log = logging.getLogger("app.monitoring")


@dataclass
class Monitoring:
    settings: Settings
    engine: Engine
    prediction_log: PredictionLog
    calls: BlockingCalls  # request-path database work: a few threads, each call bounded in time
    refresher: DriftRefresher | None = None
    purger: InputPurger | None = None
    pusher: Periodic | None = None  # app.monitoring.push.MetricsPusher, with METRICS_PUSH_URL
    extra: dict[str, Any] = field(default_factory=dict)


class DriftRefresher(Periodic):
    """Recomputes every model's drift report (default window) every ``DRIFT_REFRESH_S`` seconds so
    the ``model_drift_score``/``model_drift_detected`` gauges stay current without a client asking.
    One query of at most ``DRIFT_WINDOW`` rows per model per period per worker."""

    name = "drift-refresher"
    failure = "drift gauges not refreshed"

    def __init__(self, app: FastAPI, monitoring: Monitoring) -> None:
        super().__init__(monitoring.settings.drift_refresh_s)
        self.app = app
        self.monitoring = monitoring

    def refresh(self) -> None:
        from app.monitoring.reports import model_drift_report

        registry = getattr(self.app.state, "registry", None)
        settings = self.monitoring.settings
        for model in registry.models() if registry is not None else []:
            model_drift_report(self.monitoring.engine, model, Window(count=settings.drift_window),
                               min_samples=settings.drift_min_samples)

    work = refresh


class InputPurger(Periodic):
    """Deletes stored inputs older than ``INPUT_RETENTION_DAYS`` and log rows older than
    ``LOG_RETENTION_DAYS`` at start-up, then every ``INPUT_PURGE_INTERVAL_S`` (or a tenth of the
    shorter retention, if less). Every worker runs it; the deletes are idempotent and batched, so
    workers racing cost only an empty query."""

    name = "input-purger"
    failure = "stored inputs not purged"
    run_at_start = True

    def __init__(self, monitoring: Monitoring) -> None:
        settings = monitoring.settings
        retention_s = min(settings.input_retention_days, settings.log_retention_days) * 86400.0
        super().__init__(min(INPUT_PURGE_INTERVAL_S, retention_s / 10.0))
        self.monitoring = monitoring

    def purge(self) -> int:
        settings = self.monitoring.settings
        rows = purge_rows(self.monitoring.engine, settings.log_retention_days)
        if rows:
            log.info("prediction-log rows past retention deleted", extra={
                "rows": rows, "retention_days": settings.log_retention_days})
        purged = purge_inputs(self.monitoring.engine, settings.input_retention_days)
        if purged:
            log.info("stored inputs past retention deleted", extra={
                "rows": purged, "retention_days": settings.input_retention_days})
        return purged

    def work(self) -> None:
        self.purge()


def setup_monitoring(app: FastAPI, settings: Settings) -> Monitoring:
    """Call once per worker process at start-up (in the lifespan, after the fork)."""
    engine = make_engine(settings.database_url)
    try:
        create_schema(engine)
    except Exception as exc:  # serve predictions anyway; the writer creates the schema on recovery
        log.error("prediction log: database unavailable at start-up",
                  extra={"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"})
    prediction_log = PredictionLog(engine, buffer_size=settings.log_buffer_size,
                                   flush_interval_s=settings.log_flush_interval_s,
                                   store_inputs=settings.store_inputs == "consented",
                                   durable=settings.log_durable)
    prediction_log.start()
    calls = BlockingCalls(DB_THREADS, DB_QUEUE, DB_CALL_TIMEOUT_S, "database")
    monitoring = Monitoring(settings, engine, prediction_log, calls)
    monitoring.refresher = DriftRefresher(app, monitoring)
    monitoring.refresher.start()
    monitoring.purger = InputPurger(monitoring)
    monitoring.purger.start()
    if settings.metrics_push_url is not None and settings.metrics_push_url.get_secret_value():
        from app.monitoring.push import MetricsPusher

        monitoring.pusher = MetricsPusher(settings.metrics_push_url.get_secret_value(),
                                          settings.metrics_push_job, settings.metrics_push_interval_s)
        monitoring.pusher.start()
    app.state.monitoring = monitoring
    app.state.prediction_log = prediction_log
    return monitoring


def shutdown_monitoring(app: FastAPI, timeout: float = 5.0) -> None:
    """Call at shutdown: flushes the buffered rows (up to ``timeout`` s) and stops the threads."""
    monitoring: Monitoring | None = getattr(app.state, "monitoring", None)
    if monitoring is None:
        return
    if monitoring.refresher is not None:
        monitoring.refresher.stop()
    if monitoring.purger is not None:
        monitoring.purger.stop()
    if monitoring.pusher is not None:
        monitoring.pusher.stop()
    monitoring.prediction_log.stop(timeout)
    monitoring.calls.shutdown()
    monitoring.engine.dispose()
    app.state.prediction_log = None
    app.state.monitoring = None
