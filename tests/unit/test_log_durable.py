"""LOG_DURABLE: a prediction is answered only once its rows are written; a log that cannot write
them in time makes the answer a 503 instead of an unrecorded 200."""

from __future__ import annotations

import asyncio
import time

from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from app.monitoring.store import PredictionLog
from tests import monitoring_db
from tests.support import single_task_client

ROW = {"prediction": "7", "confidence": 0.9, "features": {"ink": 0.1}}


def test_written_returns_once_the_rows_are_in_the_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'log.db'}"
    log = PredictionLog(create_engine(url), flush_interval_s=30.0, durable=True)  # only wakes on rows
    log.start()
    try:
        enqueued = log.enqueue("req-1", "digits", "1.0.1", [ROW, ROW], latency_ms=1.0)
        started = time.monotonic()
        assert asyncio.run(log.written(enqueued.seq, 5.0))
        assert time.monotonic() - started < 5.0  # not the 30 s flush interval: written at once
        with create_engine(url).connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM predictions WHERE request_id = 'req-1'")).scalar() == 2
    finally:
        log.stop()


def test_written_gives_up_while_the_database_refuses_writes(tmp_path):
    url = f"sqlite:///{tmp_path / 'log.db'}"
    log = PredictionLog(create_engine(url), flush_interval_s=0.05, durable=True)
    log.start()
    try:
        assert asyncio.run(log.written(log.enqueue("warm", "digits", "1", [ROW], latency_ms=1.0).seq, 5.0))
        with monitoring_db.sqlite_locked(url):
            enqueued = log.enqueue("req-2", "digits", "1.0.1", [ROW], latency_ms=1.0)
            assert not asyncio.run(log.written(enqueued.seq, 0.5))
        assert asyncio.run(log.written(enqueued.seq, 15.0))  # written once the lock is gone
    finally:
        log.stop()


def test_a_durable_service_answers_after_the_write_and_503_when_it_cannot(tmp_path, monkeypatch):
    monkeypatch.setenv("LOG_DURABLE", "true")
    with single_task_client(tmp_path, "clustering", log_durable=True, log_flush_interval_s=30.0) as client:
        row = {"instances": [{"annual_income": 60, "spending_score": 50}]}
        answer = client.post("/v1/clustering/predict", json=row)
        assert answer.status_code == 200
        url = client.app.state.settings.database_url
        with create_engine(url).connect() as conn:  # already in the database when answered
            assert conn.execute(text("SELECT count(*) FROM predictions WHERE request_id = :r"),
                                {"r": answer.json()["request_id"]}).scalar() == 1
        with monitoring_db.sqlite_locked(url):
            refused = client.post("/v1/clustering/predict", json=row)
        assert refused.status_code == 503 and refused.json()["code"] == "log-unavailable"


def test_not_durable_by_default(tmp_path):
    with single_task_client(tmp_path, "clustering", log_flush_interval_s=30.0) as client:
        assert isinstance(client, TestClient)
        answer = client.post("/v1/clustering/predict", json={"instances": [{"annual_income": 60, "spending_score": 50}]})
        assert answer.status_code == 200
        with create_engine(client.app.state.settings.database_url).connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM predictions")).scalar() == 0  # still buffered
