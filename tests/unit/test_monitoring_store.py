"""The prediction log: schema, buffered writes, the bound, and surviving a database outage.

Every test runs on SQLite and on PostgreSQL (see tests/monitoring_db.py).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from app.monitoring.store import (
    PredictionLog,
    create_schema,
    make_engine,
    predictions,
    schema_ready,
)
from tests import monitoring_db
from tests.monitoring_db import TcpProxy, database_url, pg_address, sqlite_locked

ROW = {"prediction": "7", "confidence": 0.93, "features": {"raw_mean": 0.13, "ink_ratio": 0.19}}


@pytest.fixture(params=monitoring_db.BACKENDS)
def db_url(request, tmp_path):
    with database_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def engine(db_url):
    engine = make_engine(db_url)
    create_schema(engine)
    yield engine
    engine.dispose()


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def stored_rows(engine):
    with engine.connect() as conn:
        return conn.execute(select(predictions).order_by(predictions.c.id)).all()


def test_create_schema_is_idempotent_and_safe_when_processes_race(db_url):
    engines = [make_engine(db_url) for _ in range(4)]
    errors: list[Exception] = []

    def create(engine):
        try:
            create_schema(engine)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    create_schema(engines[0])  # and once more on an existing schema

    assert errors == []
    assert schema_ready(engines[0])
    for e in engines:
        e.dispose()


def test_rows_are_written_in_the_background_one_per_instance(engine):
    log = PredictionLog(engine, flush_interval_s=0.05)
    log.start()
    try:
        before = datetime.now(UTC)
        two = [ROW, {"prediction": "1", "confidence": None, "features": {"raw_mean": 0.5}}]
        assert log.enqueue("req-a", "digits", "1.0.0", two, latency_ms=12.5, raw_inputs=[b"x", b"y"]) == 2
        assert log.enqueue("req-b", "digits", "1.0.0", [ROW], latency_ms=3.0) == 1
        assert log.flush(10)
    finally:
        log.stop()

    rows = stored_rows(engine)
    assert [(r.request_id, r.instance, r.prediction) for r in rows] == \
        [("req-a", 0, "7"), ("req-a", 1, "1"), ("req-b", 0, "7")]
    first = rows[0]
    assert (first.model, first.version, first.latency_ms, first.confidence) == ("digits", "1.0.0", 12.5, 0.93)
    assert first.features == {"raw_mean": 0.13, "ink_ratio": 0.19}
    assert rows[1].confidence is None
    assert all(r.input is None for r in rows)  # STORE_INPUTS is off by default
    created = first.created_at.replace(tzinfo=first.created_at.tzinfo or UTC)
    assert before - timedelta(seconds=1) <= created <= datetime.now(UTC)
    assert log.rows_written == 3


def test_raw_inputs_are_stored_only_with_store_inputs(engine):
    log = PredictionLog(engine, store_inputs=True)
    log.enqueue("req-raw", "digits", "1.0.0", [ROW, ROW], latency_ms=1.0, raw_inputs=[b"\x89PNG", b"\x00\x01"])
    assert log.flush(10)
    assert [bytes(r.input) for r in stored_rows(engine)] == [b"\x89PNG", b"\x00\x01"]


def test_non_finite_features_are_stored_as_null(engine):
    log = PredictionLog(engine)
    log.enqueue("req-nan", "digits", "1.0.0",
                [{"prediction": 3, "confidence": float("nan"), "features": {"a": float("inf"), "b": 2}}],
                latency_ms=1.0)
    assert log.flush(10)
    (row,) = stored_rows(engine)
    assert (row.prediction, row.confidence, row.features) == ("3", None, {"a": None, "b": 2.0})


def test_rows_over_the_buffer_bound_are_dropped_and_counted(engine):
    log = PredictionLog(engine, buffer_size=5)  # writer not started: nothing drains the buffer
    dropped_before = metric("prediction_log_rows_dropped_total")

    assert log.enqueue("req-1", "digits", "1.0.0", [ROW] * 3, latency_ms=1.0) == 3
    assert log.enqueue("req-2", "digits", "1.0.0", [ROW] * 5, latency_ms=1.0) == 2

    assert (log.buffered, log.rows_dropped) == (5, 3)
    assert metric("prediction_log_rows_dropped_total") - dropped_before == 3
    assert log.flush(10)
    assert len(stored_rows(engine)) == 5


def test_predictions_counter_counts_every_row_by_class(engine):
    log = PredictionLog(engine)
    before = metric("predictions_total", model="storetest", version="9", prediction="7")
    log.enqueue("req-c", "storetest", "9", [ROW, ROW], latency_ms=1.0)
    assert metric("predictions_total", model="storetest", version="9", prediction="7") - before == 2


@contextlib.contextmanager
def outage_harness(db_url):
    """Yields (app-side database URL, cut(), restore()) for a real outage of the backend."""
    if db_url.startswith("sqlite"):
        lock: list[contextlib.ExitStack] = []

        def cut():
            stack = contextlib.ExitStack()
            stack.enter_context(sqlite_locked(db_url))
            lock.append(stack)

        def restore():
            lock.pop().close()

        yield db_url, cut, restore
        while lock:
            lock.pop().close()
    else:
        proxy = TcpProxy(pg_address(db_url))
        proxy.start()
        try:
            yield proxy.url_for(db_url), proxy.stop, proxy.start
        finally:
            proxy.stop()


def test_an_outage_keeps_rows_buffered_and_writes_them_when_the_database_returns(engine, db_url):
    with outage_harness(db_url) as (app_url, cut, restore):
        app_engine = make_engine(app_url, sqlite_busy_timeout_ms=100, connect_timeout_s=1)
        log = PredictionLog(app_engine, flush_interval_s=0.05, max_backoff_s=0.5)
        log.start()
        try:
            log.enqueue("before", "digits", "1.0.0", [ROW], latency_ms=1.0)
            assert log.flush(10)
            failures_before = metric("prediction_log_write_failures_total")

            cut()
            started = time.perf_counter()
            for i in range(20):
                assert log.enqueue(f"during-{i}", "digits", "1.0.0", [ROW], latency_ms=1.0) == 1
            enqueue_seconds = time.perf_counter() - started
            assert not log.flush(1.5)  # the database is gone: nothing can be written
            assert log.buffered == 20
            assert log.write_failures >= 1
            assert metric("prediction_log_write_failures_total") > failures_before
            assert metric("prediction_log_buffered_rows") == 20  # set by the failed attempts

            restore()
            assert log.flush(15)
            assert metric("prediction_log_buffered_rows") == 0  # and by the batch written
        finally:
            log.stop()
            app_engine.dispose()

    assert enqueue_seconds < 0.5  # never waited for the database (one try at it takes 1 s here)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(predictions)).scalar_one() == 21
    assert log.buffered == 0


def test_stop_flushes_what_is_buffered(engine):
    log = PredictionLog(engine, flush_interval_s=30)  # would not flush on its own for 30 s
    log.start()
    log.enqueue("req-stop", "digits", "1.0.0", [ROW] * 4, latency_ms=1.0)
    assert log.stop(10)
    assert len(stored_rows(engine)) == 4


def test_enqueue_never_raises_on_malformed_rows(engine):
    log = PredictionLog(engine)
    assert log.enqueue("req-bad", "digits", "1.0.0", [{"features": ["not", "a", "dict"]}], latency_ms=1.0) == 1
    assert log.enqueue("req-bad2", "digits", "1.0.0", None, latency_ms=1.0) == 0  # type: ignore[arg-type]
    assert log.flush(10)
    (row,) = stored_rows(engine)
    assert (row.prediction, row.features) == ("", {})


@pytest.mark.parametrize("features, stored", [
    ({"a": 0.5, "b": 28.0}, {"a": 0.5, "b": 28.0}),  # the common row: kept as it is
    ({"a": float("nan"), "b": 1.0}, {"a": None, "b": 1.0}),
    ({"a": float("inf"), "b": -float("inf")}, {"a": None, "b": None}),
    ({"a": 1e308, "b": 1e308}, {"a": 1e308, "b": 1e308}),  # their sum overflows: cleaned one by one
    ({"a": 3, "b": True, "c": "x", "d": None}, {"a": 3.0, "b": 1.0, "c": None, "d": None}),
    ({7: 0.25}, {"7": 0.25}),
])
def test_row_features_are_stored_as_finite_floats_or_null(features, stored):
    import numpy as np

    from app.monitoring.store import _row_values, json_text

    row = {"confidence": np.float32(0.5), "features": features}
    values = _row_values(row)
    assert values["features"] == stored and type(values["confidence"]) is float
    assert all(v is None or type(v) is float for v in values["features"].values())
    assert json.loads(json_text(values["features"])) == stored


def test_json_columns_never_hold_nan_and_take_any_integer():
    from app.monitoring.store import json_text

    assert json.loads(json_text({"x": float("nan"), "n": 2**70})) == {"x": None, "n": 2**70}


def test_a_log_made_before_a_column_existed_gains_it_and_keeps_its_rows(engine):
    from sqlalchemy import inspect, text

    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE predictions DROP COLUMN client_version"))
        conn.execute(text("INSERT INTO predictions (created_at, request_id, instance, model, version, latency_ms, "
                          "prediction, features) VALUES (CURRENT_TIMESTAMP, 'old', 0, 'digits', '1', 1.0, '7', '{}')"))
    assert "client_version" not in {c["name"] for c in inspect(engine).get_columns("predictions")}
    create_schema(engine)  # what the release step and every worker run at start-up
    assert "client_version" in {c["name"] for c in inspect(engine).get_columns("predictions")}
    log = PredictionLog(engine)
    log.enqueue("new", "digits", "1", [ROW], latency_ms=1.0, client_version="app/1.0")
    assert log.flush(5)
    with engine.connect() as conn:
        rows = dict(conn.execute(text("SELECT request_id, client_version FROM predictions")).all())
    assert rows == {"old": None, "new": "app/1.0"}
